"""Shared fixtures: tolerance table, tiny Hugging Face models, the real SmolLM2-135M."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton runs only in its interpreter, and only for functions decorated while
# TRITON_INTERPRET=1 was set: `triton.jit` picks the mode when it decorates, and triton's own jitted
# library functions (tl.cdiv ...) are decorated when triton is first imported. Many test modules import
# triton indirectly at collection (transformers -> torch._dynamo imports it), so the variable is set
# here, before any test module is imported; set later, the kernels would be interpreted while tl.cdiv
# stays compiled, and every interpreted launch fails ("Cannot call @triton.jit'd outside of the scope of
# a kernel"). `import torch` alone does not import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from skip_policy import pytest_configure, pytest_runtest_makereport  # noqa: F401  (hooks: CI=true fails on skips)

# The suite never writes to the user's basis cache (~/.cache/pica_kernels), and no test sees another's entries:
# the cache is off for every test (and the subprocesses they start); tests/core/test_cache.py turns it on in its own
# tmp directories.
os.environ["PICA_KERNELS_CACHE"] = "0"

# `pytester` runs inner pytest sessions (tests/test_skip_policy.py checks the CI skip policy with it).
pytest_plugins = ["pytester"]

#: The small data files the tests read (slices of the real sets or generated rows; see tests/data/README.md).
DATA_DIR = Path(__file__).resolve().parent / "data"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--real-data", metavar="DIR", default=None,
                     help="directory of the full data sets (SST-2/, CoLA/, STS-B/, gsm8k/): runs the real_data tests "
                          "(`make test-real-data`); without it they are deselected, not skipped")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--real-data"):
        return
    real = [item for item in items if item.get_closest_marker("real_data")]
    if real:
        config.hook.pytest_deselected(items=real)
        items[:] = [item for item in items if not item.get_closest_marker("real_data")]


@pytest.fixture
def real_data_dir(request: pytest.FixtureRequest) -> Path:
    """The --real-data directory (tests using it carry @pytest.mark.real_data, so it is always given)."""
    path = Path(request.config.getoption("--real-data"))
    assert path.is_dir(), f"--real-data {path} is not a directory"
    return path

# One tolerance table per dtype (FlagGems style): (atol, rtol) of a result
# against the float64 reference, for O(1) inputs and reductions of a few hundred terms.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (1e-1, 3e-2),
}


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), atol=atol, rtol=rtol)


def pica_inputs(T, out_f, in_f, r, side, bias=True, dtype=torch.float64, seed=0):
    """Seeded random ``(x (T, in), W (out, in), bias (out,) or None, basis, M)`` of one PiCa layer on ``side``."""
    from pica_kernels import reference  # imported here: TRITON_INTERPRET is set above before the package loads

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, in_f, generator=g, dtype=dtype)
    w = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    b = torch.randn(out_f, generator=g, dtype=dtype) if bias else None
    basis = torch.randn(*reference.basis_shape(out_f, in_f, r, side), generator=g, dtype=dtype)
    m = torch.randn(*reference.m_shape(out_f, in_f, r, side), generator=g, dtype=dtype)
    return x, w, b, basis, m


def tiny_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=4)
    if arch == "llama":
        return tf.LlamaConfig(intermediate_size=80, num_key_value_heads=2, **common)
    if arch == "gemma":
        return tf.GemmaConfig(intermediate_size=80, num_key_value_heads=1, head_dim=12, **common)
    if arch == "bert":
        return tf.BertConfig(intermediate_size=80, max_position_embeddings=64, **common)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=97, n_embd=48, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    model = tf.BertModel(cfg) if arch == "bert" else tf.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


#: Targets per tiny architecture: linear layers of attention and MLP.
TINY_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "intermediate.dense", "output.dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


def randomize_m(model, seed: int = 1, scale: float = 0.05) -> None:
    """Give every M of every adapter random values, so adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.pica_bank.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale)


@pytest.fixture(scope="session")
def smollm2_base():
    """The real SmolLM2-135M-Instruct, loaded once per session (~20 s); copy before mutating."""
    from pica_kernels.registry_models import load_smollm2

    return load_smollm2()


@pytest.fixture
def smollm2(smollm2_base):
    model, tok = smollm2_base
    return copy.deepcopy(model), tok
