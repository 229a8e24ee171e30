"""Grouped (shared-input) and multi-task launches against the float64 reference."""

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
from pica_kernels.ops import grouped_lowrank_linear, multitask_pica_linear
from pica_kernels.ops.kernels import launchers
from pica_kernels.ops.kernels.configs import config_override

BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]


def f64(t):
    return None if t is None else t.detach().cpu().to(torch.float64)


def qkv(dtype, rows=21, in_f=48, outs=(48, 16, 16), ranks=(8, 4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_f, generator=g).to(dtype)
    ws = [(torch.randn(o, in_f, generator=g) / in_f**0.5).to(dtype) for o in outs]
    bs = [(torch.randn(o, generator=g) * 0.1).to(dtype) if i != 1 else None for i, o in enumerate(outs)]  # k: no bias
    ms = [torch.randn(o, r, generator=g) * 0.3 for o, r in zip(outs, ranks)]
    b_cat = (torch.randn(sum(ranks), in_f, generator=g) / in_f**0.5).to(dtype)
    dev = lambda ts: [t if t is None else t.to(DEVICE) for t in ts]  # noqa: E731
    return x.to(DEVICE), dev(ws), dev(bs), dev(ms), b_cat.to(DEVICE), list(ranks)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_grouped_matches_per_projection_reference(dtype, backend):
    x, ws, bs, ms, b_cat, ranks = qkv(dtype)
    xg = x.to(DEVICE).requires_grad_()
    mg = [m.to(DEVICE).requires_grad_() for m in ms]
    ys = grouped_lowrank_linear(xg, [w.to(DEVICE) for w in ws], [b if b is None else b.to(DEVICE) for b in bs],
                                mg, b_cat.to(DEVICE), ranks, backend=backend)
    g = torch.Generator().manual_seed(5)
    dys = [torch.randn(y.shape, generator=g).to(dtype) for y in ys]
    torch.autograd.backward(ys, [d.to(DEVICE) for d in dys])

    x64 = f64(x).requires_grad_()
    m64 = [f64(m).requires_grad_() for m in ms]
    want, off = [], 0
    for w, b, m, r in zip(ws, bs, m64, ranks):
        want.append(reference.lowrank_linear(x64, f64(w), f64(b), m, f64(b_cat[off:off + r])))
        off += r
    torch.autograd.backward(want, [f64(d) for d in dys])
    for i, (y, w_) in enumerate(zip(ys, want)):
        assert_close_to_reference(y.cpu(), w_, dtype, f"y[{i}]")
        assert_close_to_reference(mg[i].grad.cpu(), m64[i].grad, dtype, f"dM[{i}]")
    assert_close_to_reference(xg.grad.cpu(), x64.grad, dtype, "dx")


@needs_triton
def test_grouped_shrink_is_one_launch(monkeypatch):
    launches = []
    real = launchers.launch_lowrank_gemm
    monkeypatch.setattr(launchers, "launch_lowrank_gemm", lambda *a, **k: launches.append(a[2].shape) or real(*a, **k))
    x, ws, bs, ms, b_cat, ranks = qkv(torch.float32)
    grouped_lowrank_linear(x, ws, bs, ms, b_cat, ranks, backend="triton")
    # 1 shrink against the concatenated bases -- ranks 8, 4, 5 each padded to a slot of 16: (in, 48) --
    # then one GEMM per projection.
    assert launches == [(48, 48), (48, 48), (48, 16), (48, 16)]


@needs_triton
def test_grouped_trainable_b_cat_lora_style():
    x, ws, bs, ms, b_cat, ranks = qkv(torch.float32, seed=2)
    bc = b_cat.clone().requires_grad_()
    ys = grouped_lowrank_linear(x, ws, bs, ms, bc, ranks, backend="triton")
    sum(y.square().sum() for y in ys).backward()
    bc64 = f64(b_cat).requires_grad_()
    off, total = 0, 0
    for w, b, m, r in zip(ws, bs, ms, ranks):
        total = total + reference.lowrank_linear(f64(x), f64(w), f64(b), f64(m), bc64[off:off + r]).square().sum()
        off += r
    total.backward()
    assert_close_to_reference(bc.grad, bc64.grad, torch.float32, "dB_cat")


def mt_inputs(dtype, nseq=3, seq=13, in_f=40, out_f=36, r=6, n_adapters=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(nseq, seq, in_f, generator=g).to(dtype)
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(dtype)
    b = (torch.randn(out_f, generator=g) * 0.1).to(dtype)
    p = (torch.randn(r, in_f, generator=g) / in_f**0.5).to(dtype)
    ms = torch.randn(n_adapters, out_f, r, generator=g) * 0.3
    return tuple(t.to(DEVICE) for t in (x, w, b, p, ms))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_multitask_matches_one_adapter_at_a_time(dtype, backend):
    x, w, b, p, ms = mt_inputs(dtype)
    ids = torch.tensor([2, 0, 2], device=DEVICE)
    xg = x.to(DEVICE).requires_grad_()
    msg = ms.to(DEVICE).requires_grad_()
    y = multitask_pica_linear(xg, w.to(DEVICE), b.to(DEVICE), p.to(DEVICE), msg, ids.to(DEVICE), backend=backend)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    y.backward(dy.to(DEVICE))

    x64 = f64(x).requires_grad_()
    ms64 = f64(ms).requires_grad_()
    want = torch.stack([
        reference.pica_linear(x64[i], f64(w), f64(b), f64(p), ms64[int(k)], "input") for i, k in enumerate(ids)
    ])
    want.backward(f64(dy))
    assert_close_to_reference(y.cpu(), want, dtype, "y")
    assert_close_to_reference(xg.grad.cpu(), x64.grad, dtype, "dx")
    assert_close_to_reference(msg.grad.cpu(), ms64.grad, dtype, "dM")
    assert torch.all(msg.grad[[1, 3]] == 0)  # adapters no sequence used get no gradient


@needs_triton
@config_override(BLOCK_ROWS=16, BLOCK_COLS=16, BLOCK_DEPTH=16)
def test_multitask_segments_span_several_tiles():
    # 37-token sequences with 16-row tiles: 3 tiles per segment, the last one ragged.
    x, w, b, p, ms = mt_inputs(torch.float32, nseq=4, seq=37, n_adapters=3, seed=4)
    ids = torch.tensor([1, 2, 0, 1], device=DEVICE)
    y = multitask_pica_linear(x, w, b, p, ms, ids, backend="triton")
    y_ref = multitask_pica_linear(x, w, b, p, ms, ids, backend="reference")
    assert max_rel_err(y, y_ref) <= TOLERANCES[torch.float32]
    assert torch.isfinite(y).all()


def test_multitask_rejects_bad_ids():
    x, w, b, p, ms = mt_inputs(torch.float32)
    with pytest.raises(ValueError, match="adapter_ids"):
        multitask_pica_linear(x, w, b, p, ms, torch.tensor([0, 1, 4], device=DEVICE))
    with pytest.raises(ValueError, match="adapter_ids"):
        multitask_pica_linear(x, w, b, p, ms, torch.tensor([0, 1], device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_grouped_and_multitask(backend):
    x, ws, bs, ms, b_cat, ranks = qkv(torch.float32, rows=7)
    torch.library.opcheck(
        torch.ops.pica.grouped_lowrank_linear.default,
        (x.requires_grad_(), ws, bs, [m.requires_grad_() for m in ms], b_cat, ranks, backend),
    )
    x, w, b, p, ms = mt_inputs(torch.float32, nseq=2, seq=5)
    torch.library.opcheck(
        torch.ops.pica.multitask_lowrank_linear.default,
        (x.requires_grad_(), w, b, ms.requires_grad_(), p, torch.tensor([1, 0], device=DEVICE), backend),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_backward_when_every_projection_has_a_bias(backend):
    """Regression: with a bias on every projection the backward returned one None for the whole bias
    list, which torch.library rejected ("... the same structure as the inputs")."""
    x, ws, _, ms, b_cat, ranks = qkv(torch.float32, seed=6)
    g = torch.Generator().manual_seed(6)
    bs = [(torch.randn(w.shape[0], generator=g) * 0.1).to(DEVICE) for w in ws]
    xg = x.clone().requires_grad_()
    mg = [m.clone().requires_grad_() for m in ms]
    ys = grouped_lowrank_linear(xg, ws, bs, mg, b_cat, ranks, backend=backend)
    sum((y * (i + 1)).sum() for i, y in enumerate(ys)).backward()
    x64 = f64(x).requires_grad_()
    m64 = [f64(m).requires_grad_() for m in ms]
    total, off = 0, 0
    for i, (w, b, m, r) in enumerate(zip(ws, bs, m64, ranks)):
        total = total + (i + 1) * reference.lowrank_linear(x64, f64(w), f64(b), m, f64(b_cat[off:off + r])).sum()
        off += r
    total.backward()
    for y, w, b, m, r, lo in zip(ys, ws, bs, ms, ranks, (0, 8, 12)):
        want = reference.lowrank_linear(f64(x), f64(w), f64(b), f64(m), f64(b_cat[lo:lo + r]))
        assert_close_to_reference(y.detach().cpu(), want, torch.float32, "y")
    assert_close_to_reference(xg.grad.cpu(), x64.grad, torch.float32, "dx")
    for i, (got, want) in enumerate(zip(mg, m64)):
        assert_close_to_reference(got.grad.cpu(), want.grad, torch.float32, f"dM[{i}]")
