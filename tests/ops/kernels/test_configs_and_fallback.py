"""Device-aware configs (fit by construction), the launch safety net, strict mode, the sm_75 bf16 rule,
and the block-size override."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from pica_kernels import reference
from pica_kernels.ops import backend as backend_mod
from pica_kernels.ops import grouped_lowrank_linear, lowrank, pica_linear
from pica_kernels.ops.kernels import configs, launchers
from pica_kernels.ops.kernels.configs import GPU_TABLE, Mode, config_override, estimate_shared_memory
from pica_kernels.ops.kernels.launchers import select_config
from pica_kernels.ops.kernels.padding import padded_rank
from tests.ops.kernel_helpers import (
    DEVICE,
    assert_close_to_reference,
    needs_triton,
    poison_kernel_outputs,  # noqa: F401  (autouse)
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.fixture(autouse=True)
def heuristic_only(monkeypatch):
    """These tests pin the heuristic; with the tuned-config table on, a shipped entry would replace it
    (the table and select_config's use of it: test_tuned_configs.py)."""
    monkeypatch.setenv("PICA_KERNELS_TUNED", "0")


# ----------------------------------------------------------------------------- configs


def launches_of_a_layer(rows, out_f, in_f, rank, dtype, factor_dtype):
    """(rows, cols, depth, rank, mode, dtypes) of every launch the ops make for one layer (fwd + bwd)."""
    x, f = dtype, factor_dtype
    rank = padded_rank(rank)  # the launchers run every rank padded to a multiple of 16
    if launchers.use_decode(rows, rank):
        fwd = [(rows, out_f, in_f, rank, Mode.DECODE, (x, x, f))]
    else:
        fwd = [(rows, rank, in_f, 0, Mode.PLAIN, (x, x, x)), (rows, out_f, in_f, rank, Mode.CONCAT_K, (x, x, f))]
    bwd = [
        (rows, rank, out_f, 0, Mode.PLAIN, (x, f, f)),  # s = dy @ A
        (rows, in_f, out_f, rank, Mode.CONCAT_K, (x, x, f)),  # dx = [dy | s] @ [W ; B] (B = M on the output side)
        (out_f, rank, rows, 0, Mode.PLAIN, (x, x, x)),  # dA = dy.T @ t
        (rank, in_f, rows, 0, Mode.PLAIN, (x, x, x)),  # dB = s.T @ x
    ]
    return fwd + bwd


@pytest.mark.parametrize("arch", sorted(GPU_TABLE))
def test_every_config_fits_shared_memory_by_construction(arch):
    """Every launch of the sweep the compile gate covers gets a config within the architecture's limit."""
    props = GPU_TABLE[arch]
    checked = 0
    for dtype in DTYPES:
        if dtype == torch.bfloat16 and not configs.bf16_tensor_cores(props):
            continue  # sm_75: bf16 runs the reference path
        for factor_dtype in {dtype, torch.float32}:
            for rows in (1, 8, 16, 17, 64, 4096):
                for out_f, in_f in ((576, 576), (1024, 4096), (4096, 14336), (14336, 4096), (1000, 3001)):
                    for rank in (1, 8, 16, 24, 32, 64, 128, 256):
                        for launch in launches_of_a_layer(rows, out_f, in_f, rank, dtype, factor_dtype):
                            cfg = select_config(*launch, props)
                            smem = estimate_shared_memory(cfg.kwargs, cfg.num_stages, launch[4],
                                                          *(d.itemsize for d in launch[5]), props.capability)
                            assert smem <= props.smem_per_block, (arch, launch, cfg, smem)
                            kw = cfg.kwargs
                            if launch[4] == Mode.DECODE:
                                assert kw["BLOCK_RANK"] >= launch[3]
                            assert kw["BLOCK_RANK"] <= 64 or launch[4] == Mode.DECODE
                            assert cfg.num_stages >= 2 and kw["BLOCK_DEPTH"] >= 32
                            checked += 1
    assert checked > 1000


@pytest.mark.parametrize("arch", ["sm_86", "sm_89", "sm_120"])
@pytest.mark.parametrize("rank", [64, 256])
def test_decode_time_launches_fit_99_kb(arch, rank):
    """Regression: at T <= 16, r = 64 (one-launch decode) and r = 256 (its second launch) needed 110,592 B,
    over the 101,376 B of sm_86/89/120 -- generate() crashed with OutOfResources on those GPUs."""
    props = GPU_TABLE[arch]
    for dtype, factor in ((torch.float16, torch.float16), (torch.bfloat16, torch.float32)):
        for launch in launches_of_a_layer(8, 4096, 4096, rank, dtype, factor)[:2]:
            cfg = select_config(*launch, props)
            smem = estimate_shared_memory(cfg.kwargs, cfg.num_stages, launch[4], *(d.itemsize for d in launch[5]),
                                          props.capability)
            assert smem <= 101_376, (launch, cfg, smem)
            assert cfg.num_stages >= 2  # still pipelined
    # The config the issue measured is what the estimate calls 110,592 B: the model matches the compiler.
    old = {"BLOCK_ROWS": 16, "BLOCK_COLS": 64, "BLOCK_DEPTH": 128, "BLOCK_RANK": 64}
    assert estimate_shared_memory(old, 4, Mode.DECODE, 2, 2, 2) == 110_592 + configs.SMEM_RESERVE


def test_shared_memory_model_matches_measured_compiles():
    """Points measured with triton.compile with the JIT's specialisation (triton 3.9): the estimate is the
    measurement plus the fixed reserve, or above it (never below)."""
    reserve = configs.SMEM_RESERVE
    big = {"BLOCK_ROWS": 128, "BLOCK_COLS": 128, "BLOCK_DEPTH": 64, "BLOCK_RANK": 64}
    assert estimate_shared_memory(big, 3, Mode.CONCAT_K, 2, 2, 4) == 98_304 + reserve  # sm_86, fp32 M
    assert estimate_shared_memory(big, 3, Mode.CONCAT_K, 2, 2, 2) == 65_536 + reserve
    assert estimate_shared_memory({**big, "BLOCK_RANK": 16}, 3, Mode.PLAIN, 2, 2, 2) == 65_536 + reserve
    assert estimate_shared_memory({**big, "BLOCK_RANK": 16}, 4, Mode.PLAIN, 2, 2, 2) == 98_304 + reserve
    decode = {"BLOCK_ROWS": 16, "BLOCK_COLS": 64, "BLOCK_DEPTH": 128, "BLOCK_RANK": 64}
    assert estimate_shared_memory(decode, 3, Mode.DECODE, 2, 2, 2) == 73_728 + reserve
    narrow = {"BLOCK_ROWS": 128, "BLOCK_COLS": 16, "BLOCK_DEPTH": 128, "BLOCK_RANK": 16}
    assert estimate_shared_memory(narrow, 4, Mode.PLAIN, 2, 2, 2, (9, 0)) == 147_456 + reserve  # 4 buffers
    assert estimate_shared_memory(big, 4, Mode.CONCAT_K, 2, 2, 2, (10, 0)) >= 131_088  # sm_100: + barriers
    assert estimate_shared_memory(big, 4, Mode.CONCAT_K, 2, 2, 4, (9, 0)) >= 180_224
    assert estimate_shared_memory(decode, 4, Mode.DECODE, 2, 2, 2, (9, 0)) >= 110_592
    # mma.sync's cp.async pipeline keeps num_stages - 1 buffers: sm_120 (no wgmma), sm_90 tiles of < 64 rows.
    assert estimate_shared_memory({**big, "BLOCK_RANK": 16}, 3, Mode.PLAIN, 2, 2, 2, (12, 0)) == 65_536 + reserve
    small = {"BLOCK_ROWS": 16, "BLOCK_COLS": 64, "BLOCK_DEPTH": 128, "BLOCK_RANK": 32}
    assert estimate_shared_memory(small, 4, Mode.CONCAT_K, 2, 2, 2, (9, 0)) == 61_440 + reserve


def test_regimes_and_device_awareness():
    h100, a10, t4 = GPU_TABLE["sm_90"], GPU_TABLE["sm_86"], GPU_TABLE["sm_75"]
    f16 = (torch.float16,) * 3
    prefill = select_config(4096, 4096, 4096, 16, Mode.CONCAT_K, f16, h100)
    assert prefill.kwargs["BLOCK_ROWS"] == 128 and prefill.num_stages == 4  # 227 KB holds four stages
    assert select_config(4096, 4096, 4096, 16, Mode.CONCAT_K, f16, a10).num_stages == 3
    t4_cfg = select_config(4096, 4096, 4096, 16, Mode.CONCAT_K, f16, t4)
    assert estimate_shared_memory(t4_cfg.kwargs, t4_cfg.num_stages, Mode.CONCAT_K, 2, 2, 2, (7, 5)) <= 64 * 1024
    shrink = select_config(4096, 16, 4096, 0, Mode.PLAIN, f16, h100)  # t = x @ P.T: narrow output
    assert shrink.kwargs["BLOCK_COLS"] == 16
    assert configs.regime(4096, 16, Mode.PLAIN) == "narrow-prefill"
    assert configs.regime(8, 4096, Mode.DECODE) == "decode"
    assert configs.regime(40, 4096, Mode.CONCAT_K) == "mid"
    mid = select_config(40, 4096, 4096, 16, Mode.CONCAT_K, f16, h100)
    assert mid.kwargs["BLOCK_ROWS"] == 64


def test_split_k_only_below_one_wave():
    h100 = GPU_TABLE["sm_90"]
    # k/v projections at N = 1024, T = 4096 with 128x128 tiles: 256 tiles on 132 SMs -- no split.
    assert configs.choose_split_k(256, 64, h100) == 1
    assert configs.choose_split_k(132, 64, h100) == 1
    # dA = dy.T @ t at out = 4096, r = 16: 32 tiles, depth T = 4096 in 64 steps -> split to fill the GPU.
    assert configs.choose_split_k(32, 64, h100) == 5
    assert configs.choose_split_k(32, 7, h100) == 1  # short depth: not worth the partials
    assert configs.choose_split_k(1, 4096, h100) == 64  # capped
    assert configs.choose_split_k(3, 64, None) == 1  # CPU interpreter


@pytest.mark.parametrize("arch", sorted(GPU_TABLE))
def test_grouped_qkv_launches_split_k_only_below_one_wave(arch):
    """The grid the launcher plans (configs + tiles + split-K) for grouped q/k/v at Llama-3-8B prefill:
    x (4096, 4096), q 4096 and k/v 1024 outputs, ranks padded (8 -> 16). A launch with a wave of tiles or
    more never splits K (k/v on 132 SMs: 256 tiles, split 1 -- not 2, ~32 MB of fp32 partials each)."""
    props = GPU_TABLE[arch]
    dtype = torch.float16 if arch == "sm_75" else torch.bfloat16
    rows, in_f, outs, rank = 4096, 4096, (4096, 1024, 1024), padded_rank(8)
    shrink = (rows, 3 * rank, in_f, 0, Mode.PLAIN, (dtype, dtype, dtype))
    launches = [shrink] + [(rows, out_f, in_f, rank, Mode.CONCAT_K, (dtype, dtype, torch.float32)) for out_f in outs]
    for launch in launches:
        cfg = select_config(*launch, props)
        grid = launchers.plan_grid(*launch[:3], cfg.kwargs, props)
        if grid.tiles >= props.sm_count:
            assert grid.split_k == 1, (arch, launch, grid)
        else:  # below one wave, with a long depth: split to fill the GPU
            assert grid.split_k > 1 and grid.tiles * grid.split_k >= props.sm_count, (arch, launch, grid)
        if launch[4] == Mode.CONCAT_K:
            assert grid.split_k == 1, (arch, launch, grid)
    if arch == "sm_90":
        kv = select_config(*launches[2], props)
        assert launchers.plan_grid(rows, 1024, in_f, kv.kwargs, props).tiles == 256


def test_config_override_validates_and_nests():
    with pytest.raises(ValueError, match="unknown key"):
        with config_override(BLOCK_M=16):
            pass
    with pytest.raises(ValueError, match="power of two"):
        with config_override(BLOCK_ROWS=24):
            pass
    f32 = (torch.float32,) * 3
    with config_override(BLOCK_ROWS=16, BLOCK_COLS=16):
        with config_override(BLOCK_COLS=64, num_stages=2):
            cfg = select_config(40, 40, 40, 8, Mode.CONCAT_K, f32, None, interpreted=True)
            assert (cfg.kwargs["BLOCK_ROWS"], cfg.kwargs["BLOCK_COLS"], cfg.num_stages) == (16, 64, 2)
        assert select_config(40, 40, 40, 8, Mode.CONCAT_K, f32, None, interpreted=True).kwargs["BLOCK_COLS"] == 16
    assert select_config(40, 40, 40, 8, Mode.CONCAT_K, f32, None, interpreted=True).kwargs["BLOCK_COLS"] == 32


# ----------------------------------------------------------------------------- safety net


class _OutOfResourcesKernel:
    """Stands in for the jitted kernel: every launch raises OutOfResources, as on a GPU whose shared memory
    is smaller than the config needs."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime.errors import OutOfResources

            self.launches += 1
            raise OutOfResources(110_592, 101_376, "shared memory")

        return launch


@pytest.fixture
def failing_kernel(monkeypatch):
    launchers.reset_fallbacks()
    fake = _OutOfResourcesKernel()
    monkeypatch.setattr(launchers.kernel_module(), "lowrank_gemm_kernel", fake)
    yield fake
    launchers.reset_fallbacks()


def pica_inputs(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 40, generator=g).to(DEVICE)
    w = (torch.randn(36, 40, generator=g) / 40**0.5).to(DEVICE)
    b = (torch.randn(36, generator=g) * 0.1).to(DEVICE)
    basis = (torch.randn(6, 40, generator=g) / 40**0.5).to(DEVICE)
    m = (torch.randn(36, 6, generator=g) * 0.3).to(DEVICE)
    return x, w, b, basis, m


def forward_backward(backend, x, w, b, basis, m, dy):
    x, m = x.clone().requires_grad_(), m.clone().requires_grad_()
    y = pica_linear(x, w, b, basis, m, backend=backend)
    y.backward(dy)
    return y.detach(), x.grad, m.grad


@needs_triton
def test_out_of_resources_warns_once_and_falls_back_to_the_reference(failing_kernel, monkeypatch):
    monkeypatch.setenv(launchers.STRICT_ENV_VAR, "0")
    x, w, b, basis, m = pica_inputs(20)
    dy = torch.randn(20, 36, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with pytest.warns(RuntimeWarning, match=r"OutOfResources.*CONCAT_K|PLAIN.*OutOfResources") as record:
        got = forward_backward("triton", x, w, b, basis, m, dy)
    messages = [str(r.message) for r in record if issubclass(r.category, RuntimeWarning)]
    assert all("reference" in msg and "BLOCK_ROWS" in msg and "interpreter" in msg for msg in messages)
    # The shape, the config, the device (the shrink x @ P.T runs rank 6 padded to 16, kernels/padding.py).
    assert any("rows=20 cols=16 depth=40" in msg for msg in messages)
    # The fallback IS the custom op's reference branch: bit for bit. (Eager CPU's backend="reference"
    # skips the custom op and differentiates the reference forward with autograd: the same math, but
    # its dM sums in another order, ~1e-6 off in fp32 -- compared below at fp32 tolerance.)
    y_ref, t_ref = lowrank.reference_forward(x, w, b, m, basis)
    dx_ref, dm_ref, _ = lowrank.reference_backward(dy, None, t_ref, w, m, basis, True, True, False)
    for name, g_, w_ in zip(("y", "dx", "dM"), got, (y_ref, dx_ref, dm_ref)):
        assert torch.equal(g_, w_), name
    want = forward_backward("reference", x, w, b, basis, m, dy)
    for name, g_, w_ in zip(("y", "dx", "dM"), got, want):
        assert_close_to_reference(g_, w_, torch.float32, name)
    # From now on that shape class skips the kernel: no launch, no second warning.
    launches = failing_kernel.launches
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = forward_backward("triton", x, w, b, basis, m, dy)
    assert failing_kernel.launches == launches
    assert all(torch.equal(a, b_) for a, b_ in zip(again, got))
    # The grouped op falls back the same way: bit for bit against what its fallback runs, the grouped
    # reference (one shrink GEMM of width 6 + 3, sliced). The single-layer reference shrinks with a GEMM
    # of width 3, another shape and so maybe another BLAS micro-kernel: equal to rounding only.
    weights, biases, factors, b_cat = [w, w[:12]], [b, None], [m, m[:12, :3]], torch.cat([basis, basis[:3]])
    ys = grouped_lowrank_linear(x, weights, biases, factors, b_cat, [6, 3], backend="triton")
    want_ys, _ = reference.grouped_lowrank_forward(x, weights, biases, factors, b_cat, [6, 3])
    for y_, want_ in zip(ys, want_ys):
        assert torch.equal(y_, want_)
    assert_close_to_reference(ys[1], reference.lowrank_linear(x, w[:12], None, m[:12, :3], basis[:3]), x.dtype)


@needs_triton
def test_strict_mode_raises_instead(failing_kernel, monkeypatch):
    monkeypatch.setenv(launchers.STRICT_ENV_VAR, "1")
    x, w, b, basis, m = pica_inputs(3)
    with pytest.raises(RuntimeError, match=r"PICA_KERNELS_STRICT=1") as info:
        pica_linear(x, w, b, basis, m, backend="triton")
    assert "OutOfResources" in str(info.value) and "DECODE rows=3" in str(info.value)
    assert launchers.FALLBACK_SHAPE_CLASSES == {}


def test_the_suite_runs_in_strict_mode():
    assert launchers.strict_mode()  # kernel_helpers sets PICA_KERNELS_STRICT=1 for every kernel test


@needs_triton
def test_triton_was_imported_in_the_mode_the_kernels_run_in():
    """tests/conftest.py sets TRITON_INTERPRET=1 (no GPU) before any test module imports triton: triton's
    own jitted functions (tl.cdiv) are decorated at its import, and an interpreted kernel cannot call a
    compiled one. Checked here in whatever order the suite runs, after every module was collected."""
    assert backend_mod.triton_library_compiled() == (not backend_mod.interpreter_enabled())


@needs_triton
def test_triton_imported_before_the_interpreter_switch_is_a_clear_error():
    """A process that imported triton (torch._dynamo, transformers do) before setting TRITON_INTERPRET=1
    gets an error saying so, not Triton's "Cannot call @triton.jit'd outside of the scope of a kernel"."""
    code = (
        "import os, torch, triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from pica_kernels.ops import pica_linear\n"
        "x, w, basis, m = torch.randn(3, 8), torch.randn(6, 8), torch.eye(8)[:2].contiguous(), torch.randn(6, 2)\n"
        "try:\n"
        "    pica_linear(x, w, None, basis, m, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('RuntimeError:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[3]  # the repository root
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "RuntimeError: triton was imported before TRITON_INTERPRET=1 was set" in out.stdout, out.stdout


# ----------------------------------------------------------------------------- sm_75 and bf16


@pytest.fixture
def fake_t4(monkeypatch):
    monkeypatch.setattr(backend_mod, "device_props", lambda device: GPU_TABLE["sm_75"])
    monkeypatch.setattr(backend_mod, "triton_available", lambda: True)
    monkeypatch.setattr(backend_mod, "_WARNED_NO_BF16", set())
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    return torch.device("cuda", 0)


def test_bf16_on_sm75_runs_the_reference_with_one_warning(fake_t4, monkeypatch):
    monkeypatch.setenv(launchers.STRICT_ENV_VAR, "0")
    with pytest.warns(RuntimeWarning, match=r"Tesla T4 \(sm_75\) has no bf16 tensor cores"):
        assert backend_mod.resolve_backend("auto", fake_t4, torch.bfloat16) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert backend_mod.resolve_backend("auto", fake_t4, torch.bfloat16) == "reference"
    with pytest.warns(RuntimeWarning, match=r"Tesla T4 \(sm_75\) runs the reference"):
        assert backend_mod.resolve_backend("auto", fake_t4, torch.float16) == "reference"  # no MMA: cuBLAS
    assert backend_mod.resolve_backend("triton", fake_t4, torch.float16) == "triton"  # asked for explicitly


def test_sm75_runs_the_reference_by_default_for_every_dtype(monkeypatch):
    """Only the device-properties lookup is faked (a T4's, as torch reports them); the dispatch is real.
    Triton emits no tensor-core MMA for Turing: the kernels run there only when asked for."""
    import types

    def props(major, minor, name):
        return types.SimpleNamespace(name=name, major=major, minor=minor, multi_processor_count=40,
                                     shared_memory_per_block_optin=64 * 1024)

    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    monkeypatch.setenv(launchers.STRICT_ENV_VAR, "0")
    monkeypatch.setattr(backend_mod, "_WARNED_SLOW", set())
    monkeypatch.setattr(backend_mod, "_WARNED_NO_BF16", set())
    cuda = torch.device("cuda", 0)
    configs.device_props.cache_clear()
    try:
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props(7, 5, "Tesla T4"))
        with pytest.warns(RuntimeWarning, match=r"Tesla T4 \(sm_75\) runs the reference \(cuBLAS\) path: "
                                                r"Triton emits no tensor-core MMA"):
            assert backend_mod.resolve_backend("auto", cuda, torch.float16) == "reference"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bf16 warns its own reason (no bf16 tensor cores)
            assert backend_mod.resolve_backend("auto", cuda, torch.bfloat16) == "reference"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once
            assert backend_mod.resolve_backend("auto", cuda, torch.float32) == "reference"
            assert backend_mod.resolve_backend("auto", cuda, torch.float16) == "reference"
            assert backend_mod.resolve_backend("triton", cuda, torch.float16) == "triton"
            monkeypatch.setenv(backend_mod.ENV_VAR, "triton")
            assert backend_mod.resolve_backend("auto", cuda, torch.float32) == "triton"
            monkeypatch.delenv(backend_mod.ENV_VAR)
            configs.device_props.cache_clear()
            monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props(8, 0, "A100"))
            assert backend_mod.resolve_backend("auto", cuda, torch.float16) == "triton"  # sm_80: the kernels
    finally:
        configs.device_props.cache_clear()


def test_bf16_on_sm75_raises_when_triton_is_explicit_or_strict(fake_t4, monkeypatch):
    monkeypatch.setenv(launchers.STRICT_ENV_VAR, "0")
    with pytest.raises(RuntimeError, match="backend 'triton' was requested"):
        backend_mod.resolve_backend("triton", fake_t4, torch.bfloat16)
    monkeypatch.setenv(backend_mod.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="Tesla T4"):
        backend_mod.resolve_backend("auto", fake_t4, torch.bfloat16)
    monkeypatch.delenv(backend_mod.ENV_VAR)
    monkeypatch.setenv(launchers.STRICT_ENV_VAR, "1")
    with pytest.raises(RuntimeError, match="PICA_KERNELS_STRICT=1"):
        backend_mod.resolve_backend("auto", fake_t4, torch.bfloat16)
    monkeypatch.setattr(backend_mod, "device_props", lambda device: GPU_TABLE["sm_80"])
    assert backend_mod.resolve_backend("triton", fake_t4, torch.bfloat16) == "triton"


@pytest.mark.parametrize("arch", [*sorted(GPU_TABLE), None])
@pytest.mark.parametrize("out_f", [1, 2, 8, 15])
def test_layers_with_few_outputs_get_tiles_of_at_least_16(arch, out_f):
    """A classifier head (out = 1, 2, ...): every launch of its forward and backward gets row, column, depth
    and rank tiles of at least 16 (``tl.dot``'s minimum), on every architecture (None: the interpreter)."""
    props = GPU_TABLE[arch] if arch is not None else None
    checked = 0
    for dtype in DTYPES:
        if props is not None and dtype == torch.bfloat16 and not configs.bf16_tensor_cores(props):
            continue  # sm_75: bf16 runs the reference path
        for factor_dtype in {dtype, torch.float32}:
            for rows in (1, 8, 16, 17, 64, 4096):
                for in_f in (64, 576, 4096):
                    for rank in sorted({1, min(out_f, 8)}):
                        for launch in launches_of_a_layer(rows, out_f, in_f, rank, dtype, factor_dtype):
                            kw = select_config(*launch, props, interpreted=props is None).kwargs
                            narrow = {k: kw[k] for k in ("BLOCK_ROWS", "BLOCK_COLS", "BLOCK_DEPTH", "BLOCK_RANK")
                                      if k in kw and kw[k] < 16}
                            assert not narrow, (arch, launch, narrow)
                            checked += 1
    assert checked > 100
