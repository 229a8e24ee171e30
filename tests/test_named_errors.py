"""Bad inputs get an error that names the argument and what was expected, never a bare library error.

Each case here escaped as a bare ``re.error`` / ``TypeError`` / ``RuntimeError`` / ``RecursionError`` (or was
accepted) before it was checked where the value enters.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from torch import nn

import pica_kernels as pk
from pica_kernels.core.errors import PiCaConfigError

ROOT = Path(__file__).resolve().parents[1]


def _native_config(**kw):
    return pk.PiCaConfig(**kw)


def _peft_config(**kw):
    from pica_kernels.peft import PiCaPeftConfig

    return PiCaPeftConfig(**kw)


CONFIGS = {"native": _native_config, "peft": _peft_config}


# ------------------------------------------------------------------ config values
@pytest.mark.parametrize("fe", ["native", "peft"])
@pytest.mark.parametrize("field", ["target_modules", "exclude"])
@pytest.mark.parametrize(("value", "says"), [
    ("(", "not a valid regular expression"),
    ([None], "None among them"),
    (["q_proj", 3], "3 among them"),
    ([""], "'' among them"),
    (5, "got int 5"),
    ({"q_proj": 1}, "got dict"),
])
def test_module_specs_refused_at_config_construction(fe, field, value, says):
    with pytest.raises(PiCaConfigError, match=rf"^{field}.*{says}") as info:
        CONFIGS[fe](**{field: value})
    assert isinstance(info.value, ValueError) and isinstance(info.value, pk.PiCaError)


@pytest.mark.parametrize("fe", ["native", "peft"])
def test_rank_pattern_key_that_is_no_regex_refused(fe):
    with pytest.raises(PiCaConfigError, match=r"^rank_pattern key: '\[' is not a valid regular expression"):
        CONFIGS[fe](rank_pattern={"[": 4})


@pytest.mark.parametrize("fe", ["native", "peft"])
@pytest.mark.parametrize("seed", ["x", True, 1.0, None, 2**64])
def test_svd_seed_must_be_an_int(fe, seed):
    with pytest.raises(PiCaConfigError, match=r"^svd_seed must be an int"):
        CONFIGS[fe](svd_seed=seed)


@pytest.mark.parametrize("fe", ["native", "peft"])
def test_valid_module_specs_still_accepted(fe):
    cfg = CONFIGS[fe](target_modules=r".*\.(q|v)_proj", exclude=["layers.0.self_attn.q_proj"], svd_seed=-3)
    assert cfg.target_modules == r".*\.(q|v)_proj" and cfg.svd_seed == -3


# ------------------------------------------------------------------ x in another dtype
@pytest.mark.parametrize("merged", [False, True])
def test_x_of_another_dtype_than_the_layer_named(merged):
    torch.manual_seed(0)
    layer = pk.PiCaLinear(nn.Linear(8, 6), 3)
    if merged:
        layer.merge()
    with pytest.raises(TypeError, match=r"^x has dtype torch.float64, the layer's weight has torch.float32"):
        layer(torch.randn(2, 8, dtype=torch.float64))


def test_x_of_another_dtype_named_in_a_peft_layer():
    from peft import get_peft_model

    model = get_peft_model(tiny_model("llama"), _peft_config(r=4))
    x = torch.randn(2, 48, dtype=torch.float64)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(TypeError, match=r"^x has dtype torch.float64, the layer's weight has torch.float32"):
        layer(x)


# ------------------------------------------------------------------ backward through a merged model
@pytest.mark.parametrize("fe", ["native", "peft"])
def test_backward_through_a_merged_model_says_it_is_merged(fe):
    tokens = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    if fe == "native":
        model = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4), progress=False)
        pk.merge(model)
    else:
        from peft import get_peft_model

        model = get_peft_model(tiny_model("llama"), _peft_config(r=4))
        model.merge_adapter()
    model.train()
    loss = model(tokens).logits.float().pow(2).mean()
    with pytest.raises(RuntimeError, match=r"adapter 'default' is merged into the base weights.*unmerge"):
        loss.backward()
    # Inference through the merged model is unaffected: eval mode, or no grad, gives plain outputs.
    model.eval()
    assert not model(tokens).logits.requires_grad
    model.train()
    with torch.no_grad():
        model(tokens)


def test_merged_model_with_a_frozen_m_trains_the_rest():
    """M frozen on purpose (training something else through a merged model): no error, nothing silently lost."""
    tokens = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    model = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4), progress=False)
    pk.merge(model)
    for p in model.pica_bank.parameters():
        p.requires_grad_(False)
    head = model.lm_head.weight
    head.requires_grad_(True)
    model(tokens).logits.pow(2).mean().backward()
    assert head.grad is not None


# ------------------------------------------------------------------ files: tuned-config table
@pytest.mark.parametrize("content", [b"\xff\xfe{not utf-8", b"[" * 100_000 + b"]" * 100_000])
def test_unreadable_tuned_config_table_warns_and_is_ignored(tmp_path, monkeypatch, content):
    from pica_kernels.ops.kernels import tuned

    path = tmp_path / "tuned.json"
    path.write_bytes(content)
    monkeypatch.setenv("PICA_KERNELS_TUNED_CONFIGS", str(path))
    tuned.clear_cache()
    try:
        with pytest.warns(RuntimeWarning, match="tuned-config table ignored"):
            assert tuned.load_table() is None
    finally:
        monkeypatch.delenv("PICA_KERNELS_TUNED_CONFIGS")
        tuned.clear_cache()


# ------------------------------------------------------------------ files: adapter config
@pytest.fixture(scope="module")
def saved_native(tmp_path_factory):
    torch.manual_seed(0)
    model = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4), progress=False)
    return pk.save_adapter(model, tmp_path_factory.mktemp("named") / "a")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite(path: Path, edit) -> None:
    """Edit pica_config.json and make it self-consistent again (its checksum is unkeyed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from pica_kernels.core.files import file_sha256, json_checksum

    meta = json.loads((path / "pica_config.json").read_text())
    edit(meta)
    sha = json_checksum(meta)
    file = path / "pica_adapter.safetensors"
    with safe_open(file, "pt") as f:
        metadata = f.metadata()
    save_file(load_file(file), file, metadata={**metadata, "config_sha256": sha})
    meta["json_sha256"], meta["tensors_sha256"] = sha, file_sha256(file)
    (path / "pica_config.json").write_text(json.dumps(meta))


def test_deeply_nested_adapter_config_refused(saved_native, tmp_path):
    path = _copy(saved_native, tmp_path / "a")
    (path / "pica_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(pk.AdapterMismatchError, match="pica_config.json is not valid JSON"):
        pk.load_adapter(tiny_model("llama"), path, progress=False)


@pytest.mark.parametrize("name", ["a.b", "a/b", "__base__", ""])
def test_adapter_name_in_a_file_that_the_name_check_rejects(saved_native, tmp_path, name):
    path = _copy(saved_native, tmp_path / "a")
    _rewrite(path, lambda meta: meta.__setitem__("adapter_name", name))
    with pytest.raises(pk.AdapterMismatchError, match=r"^adapter_name: .*adapter_name"):
        pk.load_adapter(tiny_model("llama"), path, progress=False)


# ------------------------------------------------------------------ adapter names that are paths
@pytest.mark.parametrize("name", ["a/b", "/abs/path", "a\\b"])
def test_adapter_names_with_path_separators_refused_natively(name, tmp_path, saved_native):
    model = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4), progress=False)
    with pytest.raises(PiCaConfigError, match=r"^adapter_name must not contain"):
        pk.apply_pica(model, pk.PiCaConfig(rank=4), adapter_name=name, progress=False)
    with pytest.raises(PiCaConfigError, match=r"^adapter_name must not contain"):
        pk.load_adapter(tiny_model("llama"), saved_native, adapter_name=name, progress=False)


@pytest.mark.parametrize("name", ["a/b", "/abs/path", "a\\b"])
def test_adapter_names_with_path_separators_refused_by_peft(name, tmp_path):
    from peft import PeftModel, get_peft_model

    model = get_peft_model(tiny_model("llama"), _peft_config(r=4))
    with pytest.raises(PiCaConfigError, match=r"^adapter_name must not contain"):
        model.add_adapter(name, _peft_config(r=4))
    assert name not in model.peft_config
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["README.md", "adapter_config.json",
                                                                      "adapter_model.safetensors"]
    with pytest.raises(PiCaConfigError, match=r"^adapter_name must not contain"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "saved", adapter_name=name)
    with pytest.raises(PiCaConfigError, match=r"^adapter_name must not contain"):
        get_peft_model(tiny_model("llama"), _peft_config(r=4), adapter_name=name)


# ------------------------------------------------------------------ PEFT: where the model differs
def test_peft_mismatch_in_an_adapted_weight_is_named_so(tmp_path):
    from peft import PeftModel, get_peft_model

    model = get_peft_model(tiny_model("llama"), _peft_config(r=4))
    model.save_pretrained(tmp_path)
    other = tiny_model("llama")
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    with pytest.raises(pk.AdapterMismatchError) as info:
        PeftModel.from_pretrained(other, tmp_path)
    msg = str(info.value)
    assert "outside the adapted layers" not in msg
    assert "in the weights of the adapted layers" in msg and "model.layers.0.self_attn.q_proj.weight" in msg


# ------------------------------------------------------------------ a clean first impression
NOISE = ("Failed to load", "kernels-community", "trust_remote_code", "_C_mxfp8", "_C_cutlass",
         "is an Enum subclass")


def _stderr_of(code: str) -> str:
    env = {k: v for k, v in __import__("os").environ.items()}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return res.stderr + res.stdout


def test_importing_the_peft_front_end_is_quiet():
    out = _stderr_of("import pica_kernels.peft")
    assert not [line for line in out.splitlines() if any(n in line for n in NOISE)], out


def test_loading_a_registry_model_is_quiet():
    """The demo's first step (load_smollm2; MiniLM here, the same path and far smaller) resolves transformers'
    model classes, which imports torchao: its optional-kernel messages stay out of the output."""
    out = _stderr_of("from pica_kernels.registry_models import load_minilm; load_minilm()")
    assert not [line for line in out.splitlines() if any(n in line for n in NOISE)], out


def test_the_demo_export_step_is_quiet():
    """The export step's imports (PEFT, and with it transformers' quantizers, torchao and bitsandbytes) and a LoRA
    export and reload, as examples/demo.py runs them, print nothing of the optional kernels they could not load."""
    code = """
import torch, warnings
from conftest import tiny_model
import pica_kernels as pk
from pica_kernels.core.imports import import_quietly
PeftModel = import_quietly("peft").PeftModel
from pica_kernels.native.export import export_lora
import tempfile, pathlib
model = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4), progress=False)
d = pathlib.Path(tempfile.mkdtemp()) / "lora"
export_lora(model, d)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    PeftModel.from_pretrained(tiny_model("llama"), d)
"""
    out = _stderr_of(f"import sys; sys.path.insert(0, 'tests'); exec({code!r})")
    assert not [line for line in out.splitlines() if any(n in line for n in NOISE)], out
    demo = (ROOT / "examples" / "demo.py").read_text()
    assert "from peft import" not in demo and 'import_quietly("peft")' in demo


def test_known_noise_filter_keeps_other_messages():
    import logging

    from pica_kernels.core.imports import quiet_known_import_noise

    logger = logging.getLogger("torchao")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(), quiet_known_import_noise():
            logger.warning("Failed to load /x/torchao/_C_mxfp8.so: Could not load this library")
            logger.warning("something else")
        logger.warning("Failed to load /x/torchao/_C_mxfp8.so: after the import")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something else",
                                                "Failed to load /x/torchao/_C_mxfp8.so: after the import"]
