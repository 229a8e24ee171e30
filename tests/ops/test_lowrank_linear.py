"""The fused lowrank_linear / pica_linear kernels against the float64 reference.

Runs the Triton kernels (``backend="triton"``) under the CPU interpreter on
small shapes (see kernel_helpers.py); every kernel output buffer starts NaN-filled.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import (
    DEVICE,
    TOLERANCES,
    assert_close_to_reference,
    max_rel_err,
    needs_triton,
    poison_kernel_outputs,  # noqa: F401  (autouse)
)

from pica_kernels import reference
from pica_kernels.ops import lowrank_linear, pica_linear
from pica_kernels.ops.backend import ENV_VAR, resolve_backend
from pica_kernels.ops.kernels import launchers
from pica_kernels.ops.kernels.configs import config_override

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(rows, in_f, out_f, rank, side, dtype, seed=0, bias=True):
    """x (rows, in), W (out, in), bias (out,), basis, M (float32, as PiCaLinear keeps it); O(1) outputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_f, generator=g).to(dtype)
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(dtype)
    b = (torch.randn(out_f, generator=g) * 0.1).to(dtype) if bias else None
    if side == "input":
        basis = (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(dtype)
        m = torch.randn(out_f, rank, generator=g) * 0.3
    else:
        basis = (torch.randn(out_f, rank, generator=g) / rank**0.5).to(dtype)
        m = torch.randn(rank, in_f, generator=g) / in_f**0.5
    return [t.to(DEVICE) if t is not None else None for t in (x, w, b, basis, m)]


def f64(t):
    return None if t is None else t.detach().cpu().to(torch.float64)


def run_pica(x, w, b, basis, m, side, dy, backend):
    """Forward + backward; returns (y, dx, dM)."""
    x = x.detach().requires_grad_()
    m = m.detach().requires_grad_()
    y = pica_linear(x, w, b, basis, m, side=side, backend=backend)
    y.backward(dy)
    return y, x.grad, m.grad


def reference64(x, w, b, basis, m, side, dy):
    x64 = f64(x).requires_grad_()
    m64 = f64(m).requires_grad_()
    y = reference.pica_linear(x64, f64(w), f64(b), f64(basis), m64, side)
    y.backward(f64(dy))
    return y, x64.grad, m64.grad


def check_against_reference(x, w, b, basis, m, side, dtype, seed=1):
    dy = torch.randn(x.shape[:-1] + (w.shape[0],), generator=torch.Generator().manual_seed(seed)).to(dtype)
    got = run_pica(x, w, b, basis, m, side, dy.to(DEVICE), "triton")
    want = reference64(x, w, b, basis, m, side, dy)
    for name, g_, w_ in zip(("y", "dx", "dM"), got, want):
        assert_close_to_reference(g_.cpu(), w_, dtype, f"{name} ({side}, {dtype})")
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert got[2].dtype == m.dtype  # dM in M's own dtype (float32)
    return got


@needs_triton
@pytest.mark.parametrize("rows", [1, 37])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", reference.SIDES)
def test_forward_backward_match_reference(side, dtype, rows):
    # 72, 80, 12: not multiples of any block; rows=1 takes the one-launch decode path.
    x, w, b, basis, m = make_inputs(rows, 80, 72, 12, side, dtype, seed=rows)
    check_against_reference(x, w, b, basis, m, side, dtype)


@needs_triton
@pytest.mark.parametrize("side", reference.SIDES)
def test_many_tiles_in_every_dimension(side):
    # Blocks of 16 give 4 row tiles, 6 column tiles, 5 depth steps and 2 rank
    # steps (r=20), with GROUP_ROWS=3 leaving a ragged last group of row tiles.
    x, w, b, basis, m = make_inputs(50, 70, 90, 20, side, torch.float32, seed=7)
    with config_override(BLOCK_ROWS=16, BLOCK_COLS=16, BLOCK_DEPTH=16, GROUP_ROWS=3):
        check_against_reference(x, w, b, basis, m, side, torch.float32)


@needs_triton
@pytest.mark.parametrize("rows", [1, 5, 16, 17])
def test_decode_and_two_launch_forms_agree(rows):
    x, w, b, basis, m = make_inputs(rows, 80, 72, 64, "input", torch.float16, seed=rows)
    a, bb = reference.lowrank_factors(basis, m, "input")
    y1, t1 = launchers.triton_forward(x, w, b, a, bb, decode=True)
    y2, t2 = launchers.triton_forward(x, w, b, a, bb, decode=False)
    want_y, want_t = reference.lowrank_linear(f64(x), f64(w), f64(b), f64(a), f64(bb)), f64(x) @ f64(bb).T
    for got_y, got_t in ((y1, t1), (y2, t2)):
        assert_close_to_reference(got_y.cpu(), want_y, torch.float16, "y")
        assert_close_to_reference(got_t.cpu(), want_t, torch.float16, "t")
    # Both forms round t to fp16 once from an fp32 accumulator over the same K order.
    assert max_rel_err(t1, t2) <= TOLERANCES[torch.float16]
    assert launchers.use_decode(rows, 64) == (rows <= launchers.DECODE_MAX_T)


@needs_triton
@pytest.mark.parametrize("split_k", [2, 3, 7])
@config_override(BLOCK_ROWS=16, BLOCK_COLS=16, BLOCK_DEPTH=16)
def test_split_k_partials_sum_to_the_product(split_k):
    # The skinny GEMMs of the shrink and of dA/dB split K on a GPU; force it here.
    # 7 splits of depth 70 in 16-wide blocks: 5 blocks, so the launcher trims to 5 splits.
    g = torch.Generator().manual_seed(split_k)
    x = torch.randn(37, 70, generator=g).to(DEVICE)
    p = torch.randn(12, 70, generator=g).to(DEVICE)
    for a1, b1 in ((x, p.T), (x.T, x[:, :12])):  # shrink (T, r); dA-like (in, r) reducing over T
        c = launchers.alloc((a1.shape[0], b1.shape[1]), torch.float32, a1.device)
        launchers.launch_lowrank_gemm(c, a1, b1, split_k=split_k)
        assert_close_to_reference(c, f64(a1) @ f64(b1), torch.float32, f"split_k={split_k}")
        again = launchers.launch_lowrank_gemm(launchers.alloc(c.shape, torch.float32, c.device), a1, b1,
                                              split_k=split_k)
        assert torch.equal(again, c)  # fixed-order reduction: bitwise reproducible


@needs_triton
@pytest.mark.parametrize("decode", [True, False])
@config_override(BLOCK_ROWS=16, BLOCK_COLS=16, BLOCK_DEPTH=16)
def test_split_k_in_the_fused_forms(decode):
    """Split-K of the decode and concatenated-K launches: bias and low-rank term added once, t summed."""
    x, w, b, basis, m = make_inputs(5, 70, 36, 6, "input", torch.float32, seed=4)
    a, bb = reference.lowrank_factors(basis, m, "input")
    want_y = reference.lowrank_linear(f64(x), f64(w), f64(b), f64(a), f64(bb))
    y = launchers.alloc((5, 36), torch.float32, x.device)
    if decode:
        t = launchers.alloc((5, 6), torch.float32, x.device)
        launchers.launch_lowrank_gemm(y, x, w.T, factor_down=bb.T, factor_up=a.T, t_out=t, bias=b, split_k=3)
        assert_close_to_reference(t, f64(x) @ f64(bb).T, torch.float32, "t")
    else:
        t = x @ bb.T
        launchers.launch_lowrank_gemm(y, x, w.T, t=t, factor_up=a.T, bias=b, split_k=3)
    assert_close_to_reference(y, want_y, torch.float32, "y")


@needs_triton
def test_decode_path_is_one_launch(monkeypatch):
    launches = []
    real = launchers.launch_lowrank_gemm
    monkeypatch.setattr(launchers, "launch_lowrank_gemm", lambda *a, **k: launches.append(k) or real(*a, **k))
    x, w, b, basis, m = make_inputs(3, 48, 40, 8, "input", torch.float32)
    pica_linear(x, w, b, basis, m, backend="triton")
    assert len(launches) == 1 and launches[0]["factor_down"] is not None
    launches.clear()
    x, w, b, basis, m = make_inputs(40, 48, 40, 8, "input", torch.float32)
    pica_linear(x, w, b, basis, m, backend="triton")
    assert len(launches) == 2  # shrink, then the concatenated-K GEMM


@needs_triton
@pytest.mark.parametrize("side", reference.SIDES)
def test_leading_dims_noncontiguous_and_stride0(side):
    dtype = torch.float32
    x, w, b, basis, m = make_inputs(24, 40, 36, 6, side, dtype, seed=3)
    # x: (2, 3, 4, in) sliced out of a wider buffer; W: a transposed view (GPT-2
    # Conv1D stores (in, out)); basis: column-major (what torch.linalg.qr returns).
    wide = torch.zeros(2, 3, 4, 2 * 40, dtype=dtype, device=DEVICE)
    wide[..., ::2] = x.reshape(2, 3, 4, 40)
    x4 = wide[..., ::2]
    w_t = w.T.contiguous().T
    basis_cm = basis.T.contiguous().T
    assert not x4.is_contiguous() and not w_t.is_contiguous() and not basis_cm.is_contiguous()
    xg = x4.detach().requires_grad_()
    mg = m.detach().clone().requires_grad_()
    y = pica_linear(xg, w_t, b, basis_cm, mg, side=side, backend="triton")
    y.sum().backward()  # autograd hands the op a stride-0 (expanded) grad
    want = reference64(x4, w, b, basis, m, side, torch.ones(2, 3, 4, 36, dtype=dtype))
    assert y.shape == (2, 3, 4, 36)
    for name, got, exp in zip(("y", "dx", "dM"), (y, xg.grad, mg.grad), want):
        assert_close_to_reference(got.cpu(), exp, dtype, name)


@needs_triton
def test_stride0_x_and_strided_bias():
    """A broadcast (stride-0) x and a bias that is a strided view are read correctly."""
    x, w, b, basis, m = make_inputs(1, 40, 36, 6, "input", torch.float32, seed=9)
    x0 = x.expand(13, 40)  # every row the same, stride (0, 1)
    b_wide = torch.stack([b, torch.full_like(b, 1e3)], dim=1)  # (36, 2)
    bias_view = b_wide[:, 0]  # stride 2
    assert x0.stride(0) == 0 and bias_view.stride(0) == 2
    for rows in (x0, x0[:3]):  # two-launch form and decode form
        y = pica_linear(rows, w, bias_view, basis, m, backend="triton")
        want = reference.pica_linear(f64(rows), f64(w), f64(b), f64(basis), f64(m), "input")
        assert_close_to_reference(y, want, torch.float32, f"stride-0 x, T={rows.shape[0]}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lora_everything_trainable(dtype):
    """The generic op with both factors, W and bias trainable (LoRA with an unfrozen base)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(29, 40, generator=g).to(dtype)
    w = (torch.randn(33, 40, generator=g) / 40**0.5).to(dtype)
    bias = (torch.randn(33, generator=g) * 0.1).to(dtype)
    a = torch.randn(33, 8, generator=g) * 0.2
    b = torch.randn(8, 40, generator=g) / 40**0.5
    dy = torch.randn(29, 33, generator=g).to(dtype)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, w, bias, a, b)]
    lowrank_linear(*leaves[:3], *leaves[3:], backend="triton").backward(dy.to(DEVICE))
    leaves64 = [f64(t).requires_grad_() for t in (x, w, bias, a, b)]
    reference.lowrank_linear(*leaves64).backward(f64(dy))
    for name, got, want in zip(("dx", "dW", "dbias", "dA", "dB"), leaves, leaves64):
        assert got.grad.dtype == got.dtype
        # dW and dbias reduce over tokens in the input dtype; give them 2x.
        assert max_rel_err(got.grad.cpu(), want.grad) <= 2 * TOLERANCES[dtype], name


@needs_triton
def test_input_side_saves_t_not_x():
    """PiCa input side: the activation saved for backward is t (T, r), never x (T, in)."""
    x, w, b, basis, m = make_inputs(37, 80, 72, 12, "input", torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        pica_linear(x.requires_grad_(), w, b, basis, m.requires_grad_(), backend="triton")
    assert (37, 12) in saved and (37, 80) not in saved, saved
    saved.clear()
    x, w, b, basis, m = make_inputs(37, 80, 72, 12, "output", torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        pica_linear(x.requires_grad_(), w, b, basis, m.requires_grad_(), side="output", backend="triton")
    assert (37, 80) in saved  # output side: dM = (dy @ U_r).T @ x needs x


@needs_triton
def test_zero_tokens():
    x, w, b, basis, m = make_inputs(0, 40, 36, 6, "input", torch.float32)
    y = pica_linear(x, w, b, basis, m, backend="triton")
    assert y.shape == (0, 36)


def test_gradcheck_reference_op():
    """The custom op's own backward (reference path) in float64, every input differentiable."""
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in ((5, 7), (6, 7), (6,), (6, 3), (3, 7))]
    assert torch.autograd.gradcheck(lambda *t: lowrank_linear(*t, backend="reference"), args)
    # PiCa input side: only x and M differentiable.
    x, w, b, basis, m = (f64(t) for t in make_inputs(5, 7, 6, 3, "input", torch.float64))
    for side in reference.SIDES:
        x, w, b, basis, m = (f64(t) for t in make_inputs(5, 7, 6, 3, side, torch.float64))
        x.requires_grad_()
        m.requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x_, m_, s=side, w=w, b=b, p=basis: pica_linear(x_, w, b, p, m_, side=s, backend="reference"),
            (x, m),
        )


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_opcheck(backend):
    x, w, b, basis, m = make_inputs(9, 24, 20, 4, "input", torch.float32)
    m.requires_grad_()
    x.requires_grad_()
    torch.library.opcheck(torch.ops.pica.lowrank_linear.default, (x, w, b, m, basis, backend))
    torch.library.opcheck(torch.ops.pica.lowrank_linear.default, (x, w, None, m, basis, backend))
    dy = torch.randn(9, 20, device=DEVICE)
    t = x.detach() @ basis.T
    torch.library.opcheck(
        torch.ops.pica.lowrank_linear_backward.default,
        (dy, x.detach(), t, w, m.detach(), basis, True, True, True, backend),
    )


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("auto", cpu) == "reference"
    assert resolve_backend("reference", cpu) == "reference"
    monkeypatch.setenv(ENV_VAR, "reference")
    assert resolve_backend("auto", cpu) == "reference"
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend("auto", cpu)
    with pytest.raises(ValueError, match="backend must be"):
        resolve_backend("cuda", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="cannot run"):
        resolve_backend("triton", cpu)


@needs_triton
def test_env_var_routes_pica_linear_layer_to_kernels(monkeypatch):
    from torch import nn

    from pica_kernels import PiCaLinear

    calls = []
    real = launchers.triton_forward
    monkeypatch.setattr(launchers, "triton_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    layer = PiCaLinear(nn.Linear(40, 36).to(DEVICE), rank=6)
    with torch.no_grad():
        layer.m().normal_()
    x = torch.randn(5, 40, device=DEVICE)
    monkeypatch.setenv(ENV_VAR, "reference")
    y_ref = layer(x)
    assert calls == []
    monkeypatch.setenv(ENV_VAR, "triton")
    y_tri = layer(x)
    assert calls == [1]
    assert max_rel_err(y_tri, y_ref) <= TOLERANCES[torch.float32]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="real sizes need a CUDA device (hours in the interpreter)")
@pytest.mark.parametrize("rank", [16, 64, 256])
@pytest.mark.parametrize("out_f, in_f", [(4096, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("rows", [16, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_real_sizes_cuda(rows, out_f, in_f, rank, dtype):
    """Llama-sized layers in bf16 and fp16 against a float32 reference on the device (benchmarks/gpu.sh)."""
    x, w, b, basis, m = make_inputs(rows, in_f, out_f, rank, "input", dtype, seed=rank)
    dy = torch.randn(rows, out_f, device=DEVICE).to(dtype)
    y, dx, dm = run_pica(x, w, b, basis, m, "input", dy, "triton")
    x32, m32 = x.float().requires_grad_(), m.float().requires_grad_()
    y32 = reference.pica_linear(x32, w.float(), b.float(), basis.float(), m32, "input")
    y32.backward(dy.float())
    for name, got, want in (("y", y, y32), ("dx", dx, x32.grad), ("dM", dm, m32.grad)):
        assert torch.isfinite(got).all(), name
        err = float((got.float() - want).abs().max() / want.abs().max().clamp_min(1.0))
        assert err <= TOLERANCES[dtype], f"{name}: {err:.3e}"


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_zero_tokens_backward(backend):
    """Regression: backward over T = 0 (an empty batch, an MoE expert that got no tokens) raised
    ZeroDivisionError in the Triton launcher; every gradient must come back, dA and dB exactly zero."""
    g = torch.Generator().manual_seed(0)
    leaves = [t.to(DEVICE).requires_grad_() for t in (
        torch.randn(0, 40, generator=g), torch.randn(36, 40, generator=g), torch.randn(36, generator=g),
        torch.randn(36, 6, generator=g), torch.randn(6, 40, generator=g))]
    y = lowrank_linear(*leaves, backend=backend)
    assert y.shape == (0, 36)
    y.sum().backward()
    x, w, bias, a, b = leaves
    assert x.grad.shape == (0, 40)
    for name, leaf in (("dW", w), ("dbias", bias), ("dA", a), ("dB", b)):
        assert torch.equal(leaf.grad, torch.zeros_like(leaf)), name
    for side in reference.SIDES:  # PiCa: only x and M trainable (t saved, x not)
        x, w, b, basis, m = make_inputs(0, 40, 36, 6, side, torch.float32)
        _, dx, dm = run_pica(x, w, b, basis, m, side, torch.zeros(0, 36, device=DEVICE), backend)
        assert dx.shape == (0, 40) and torch.equal(dm, torch.zeros_like(m)), side
