"""Ranks that are not a multiple of 16 run the aligned kernel on zero-padded factors (kernels/padding.py).

Under the CPU interpreter (kernel_helpers.py) at small sizes: the padded launches against the float64
reference (forward and backward, dM at its true shape), the padded copies made once per factor version
(a second forward builds none; an in-place update of M makes exactly one), both sides, grouped and
multi-task launches, and the reference path left alone.
"""

from __future__ import annotations

import pytest
import torch

from pica_kernels import reference
from pica_kernels.ops import grouped_lowrank_linear, multitask_pica_linear, pica_linear
from pica_kernels.ops.kernels import launchers, padding
from pica_kernels.ops.kernels.padding import PAD_CACHE, RANK_ALIGN, padded_rank
from tests.ops.kernel_helpers import (
    DEVICE,
    assert_close_to_reference,
    needs_triton,
    poison_kernel_outputs,  # noqa: F401  (autouse)
)

pytestmark = needs_triton

RANKS = [1, 8, 24]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def f64(t):
    return None if t is None else t.detach().cpu().to(torch.float64)


def pica_inputs(rows, in_f, out_f, rank, side, dtype, seed=0):
    """x, W, bias, basis in ``dtype``; M in float32 (as PiCaLinear keeps it); O(1) outputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_f, generator=g).to(dtype)
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(dtype)
    bias = (torch.randn(out_f, generator=g) * 0.1).to(dtype)
    if side == "input":
        basis = (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(dtype)
        m = torch.randn(out_f, rank, generator=g) * 0.3
    else:
        basis = (torch.randn(out_f, rank, generator=g) / rank**0.5).to(dtype)
        m = torch.randn(rank, in_f, generator=g) / in_f**0.5
    return [t.to(DEVICE) for t in (x, w, bias, basis, m)]


def pica_step(x, w, bias, basis, m, side, dy, backend="triton"):
    """Forward + backward; returns (y, dx) and leaves dM in m.grad (m is a leaf requiring grad)."""
    x = x.detach().requires_grad_()
    y = pica_linear(x, w, bias, basis, m, side=side, backend=backend)
    y.backward(dy)
    return y.detach(), x.grad


def reference64(x, w, bias, basis, m, side, dy):
    x64, m64 = f64(x).requires_grad_(), f64(m).requires_grad_()
    y = reference.pica_linear(x64, f64(w), f64(bias), f64(basis), m64, side)
    y.backward(f64(dy))
    return y, x64.grad, m64.grad


@pytest.mark.parametrize("rows", [3, 20], ids=["decode", "two-launch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", reference.SIDES)
@pytest.mark.parametrize("rank", RANKS)
def test_padded_rank_matches_reference(rank, side, dtype, rows):
    x, w, bias, basis, m = pica_inputs(rows, 40, 36, rank, side, dtype, seed=rank)
    dy = torch.randn(rows, 36, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    m = m.requires_grad_()
    y, dx = pica_step(x, w, bias, basis, m, side, dy)
    want_y, want_dx, want_dm = reference64(x, w, bias, basis, m, side, dy)
    assert_close_to_reference(y.cpu(), want_y, dtype, "y")
    assert_close_to_reference(dx.cpu(), want_dx, dtype, "dx")
    # dM at its true shape, in M's own dtype, contiguous: the padding never leaves the launchers.
    assert m.grad.shape == m.shape and m.grad.dtype == torch.float32 and m.grad.is_contiguous()
    assert_close_to_reference(m.grad.cpu(), want_dm, dtype, "dM")


@pytest.mark.parametrize("decode", [True, False])
def test_saved_t_is_a_view_of_the_padded_buffer(decode):
    rank = 24
    x, w, bias, basis, m = pica_inputs(5, 40, 36, rank, "input", torch.float32)
    _, t = launchers.triton_forward(x, w, bias, m, basis, decode=decode)
    assert t.shape == (5, rank) and t.stride() == (padded_rank(rank), 1)  # no copy to a packed (T, r)
    assert t.untyped_storage().nbytes() == 5 * padded_rank(rank) * t.element_size()
    assert_close_to_reference(t.cpu(), f64(x) @ f64(basis).T, torch.float32, "t")
    wide = padding.widen_cols(t, padded_rank(rank))
    assert wide.shape == (5, 32) and torch.equal(wide[:, rank:].cpu(), torch.zeros(5, 8))  # zero columns are exact
    # A packed t (no room in its rows) is read at width r: still the right dM.
    packed = t.contiguous()
    assert padding.widen_cols(packed, 32) is packed
    dy = torch.randn(5, 36, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    _, dm, _ = torch.ops.pica.lowrank_linear_backward(dy, None, packed, w, m, basis, False, True, False,
                                                             "triton")
    assert dm.shape == m.shape
    assert_close_to_reference(dm.cpu(), f64(dy).T @ f64(t), torch.float32, "dM from a packed t")


@pytest.mark.parametrize("side", reference.SIDES)
def test_factors_are_padded_once_per_version(side):
    rank = 8
    x, w, bias, basis, m = pica_inputs(20, 40, 36, rank, side, torch.float32, seed=3)
    m = torch.nn.Parameter(m)
    opt = torch.optim.SGD([m], lr=0.5)
    dy = torch.randn(20, 36, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    PAD_CACHE.clear()

    before = PAD_CACHE.builds
    pica_step(x, w, bias, basis, m, side, dy)
    assert PAD_CACHE.builds - before == 2  # the basis and M, once each for forward AND backward
    before = PAD_CACHE.builds
    m.grad = None
    pica_step(x, w, bias, basis, m, side, dy)
    assert PAD_CACHE.builds == before  # unchanged M: no new padded copy
    opt.step()  # an in-place update bumps M's version counter
    before = PAD_CACHE.builds
    m.grad = None
    y, dx = pica_step(x, w, bias, basis, m, side, dy)
    assert PAD_CACHE.builds - before == 1  # M again (its new values), never the frozen basis
    want_y, want_dx, want_dm = reference64(x, w, bias, basis, m, side, dy)
    assert_close_to_reference(y.cpu(), want_y, torch.float32, "y after the step (a stale copy?)")
    assert_close_to_reference(m.grad.cpu(), want_dm, torch.float32, "dM after the step")
    assert len(PAD_CACHE) == 2  # the stale copy of M was dropped, not kept beside the new one
    with torch.no_grad():
        m.mul_(0.5)  # any in-place write counts, not only optimizer steps
    before = PAD_CACHE.builds
    y = pica_linear(x, w, bias, basis, m, side=side, backend="triton")
    assert PAD_CACHE.builds - before == 1
    assert_close_to_reference(y.detach().cpu(), reference64(x, w, bias, basis, m, side, dy)[0], torch.float32, "y")


def test_a_fused_optimizer_step_refreshes_the_padded_m():
    """A fused optimizer (transformers.Trainer's default adamw_torch_fused) rewrites M without bumping its version
    counter: the padded copy must still be rebuilt after its step (the step hook drops it), never served stale."""
    x, w, bias, basis, m = pica_inputs(20, 40, 36, 8, "input", torch.float32, seed=3)
    m = torch.nn.Parameter(m)
    opt = torch.optim.AdamW([m], lr=0.1, fused=True)
    dy = torch.randn(20, 36, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    pica_step(x, w, bias, basis, m, "input", dy)
    version = m._version
    opt.step()
    assert m._version == version  # why the version-keyed cache alone cannot see this write
    y = pica_linear(x, w, bias, basis, m, side="input", backend="triton")
    assert_close_to_reference(y.detach().cpu(), reference64(x, w, bias, basis, m, "input", dy)[0], torch.float32,
                              "y after a fused step (a stale padded M?)")


def test_reference_path_pads_no_factor_and_keeps_the_kernels_t_layout():
    x, w, bias, basis, m = pica_inputs(20, 40, 36, 8, "input", torch.float32)
    y, t = torch.ops.pica.lowrank_linear(x, w, bias, m, basis, "reference", RANK_ALIGN)
    # The op's t has one layout whichever branch runs (its fake kernel promises it to torch.compile).
    assert t.shape == (20, 8) and t.stride() == (16, 1)
    _, t_kernel = torch.ops.pica.lowrank_linear(x, w, bias, m, basis, "triton", RANK_ALIGN)
    assert t_kernel.stride() == t.stride()
    # rank_align left at its default (1): nothing padded, t packed -- the op as it was before padding.
    before = PAD_CACHE.builds
    for backend in ("reference", "triton"):
        _, t_packed = torch.ops.pica.lowrank_linear(x, w, bias, m, basis, backend)
        assert t_packed.is_contiguous() and t_packed.shape == (20, 8)
        assert_close_to_reference(t_packed.cpu(), f64(x) @ f64(basis).T, torch.float32, f"packed t ({backend})")
    assert PAD_CACHE.builds == before
    want_y, want_t = reference.lowrank_forward(x, w, bias, m, basis)
    assert torch.equal(y, want_y) and torch.equal(t, want_t)  # the reference math itself is not padded
    before = PAD_CACHE.builds
    pica_linear(x, w, bias, basis, m.requires_grad_(), backend="reference").sum().backward()
    assert PAD_CACHE.builds == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_grouped_padded_ranks(dtype):
    ranks = [8, 1, 24]
    outs = [48, 16, 24]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(21, 40, generator=g).to(dtype).to(DEVICE)
    ws = [(torch.randn(o, 40, generator=g) / 40**0.5).to(dtype).to(DEVICE) for o in outs]
    bs = [(torch.randn(o, generator=g) * 0.1).to(dtype).to(DEVICE) for o in outs]
    ms = [torch.nn.Parameter((torch.randn(o, r, generator=g) * 0.3).to(DEVICE)) for o, r in zip(outs, ranks)]
    b_cat = (torch.randn(sum(ranks), 40, generator=g) / 40**0.5).to(dtype).to(DEVICE)
    dys = [torch.randn(21, o, generator=g).to(dtype).to(DEVICE) for o in outs]
    PAD_CACHE.clear()

    def step():
        for m in ms:
            m.grad = None
        xg = x.detach().requires_grad_()
        ys = grouped_lowrank_linear(xg, ws, bs, ms, b_cat, ranks, backend="triton")
        torch.autograd.backward(ys, dys)
        return ys, xg.grad

    before = PAD_CACHE.builds
    ys, dx = step()
    first = PAD_CACHE.builds - before
    # B_cat in padded slots (1), each M (3), each projection's rows of B_cat for its dx (3): once each.
    assert first == 7
    x64 = f64(x).requires_grad_()
    m64 = [f64(m).requires_grad_() for m in ms]
    want, off = [], 0
    for w, b, m, r in zip(ws, bs, m64, ranks):
        want.append(reference.lowrank_linear(x64, f64(w), f64(b), m, f64(b_cat[off:off + r])))
        off += r
    torch.autograd.backward(want, [f64(d) for d in dys])
    for i, (y, w_) in enumerate(zip(ys, want)):
        assert_close_to_reference(y.detach().cpu(), w_, dtype, f"y[{i}]")
        assert ms[i].grad.shape == ms[i].shape
        assert_close_to_reference(ms[i].grad.cpu(), m64[i].grad, dtype, f"dM[{i}]")
    assert_close_to_reference(dx.cpu(), x64.grad, dtype, "dx")

    before = PAD_CACHE.builds
    again, _ = step()
    assert PAD_CACHE.builds == before  # nothing re-padded while nothing changed
    assert all(torch.equal(a, b) for a, b in zip(again, ys))
    with torch.no_grad():
        ms[2].add_(1.0)
    before = PAD_CACHE.builds
    ys = grouped_lowrank_linear(x, ws, bs, ms, b_cat, ranks, backend="triton")
    assert PAD_CACHE.builds - before == 1  # only the M that changed
    want = reference.lowrank_linear(f64(x), f64(ws[2]), f64(bs[2]), f64(ms[2]), f64(b_cat[9:]))
    assert_close_to_reference(ys[2].detach().cpu(), want, dtype, "y[2] after an update of its M")


def test_grouped_trainable_b_cat_gets_its_gradient_at_true_shape():
    # LoRA-style grouping: the concatenated B factors train; dB of every projection at its r_i rows.
    ranks, outs = [5, 3], [24, 16]
    g = torch.Generator().manual_seed(6)
    x = torch.randn(18, 32, generator=g).to(DEVICE)
    ws = [(torch.randn(o, 32, generator=g) / 32**0.5).to(DEVICE) for o in outs]
    a = [(torch.randn(o, r, generator=g) * 0.3).to(DEVICE).requires_grad_() for o, r in zip(outs, ranks)]
    b_cat = (torch.randn(8, 32, generator=g) / 32**0.5).to(DEVICE).requires_grad_()
    ys = grouped_lowrank_linear(x, ws, [None, None], a, b_cat, ranks, backend="triton")
    sum((y * (i + 1)).sum() for i, y in enumerate(ys)).backward()
    b64 = f64(b_cat).requires_grad_()
    a64 = [f64(ai).requires_grad_() for ai in a]
    total = sum((i + 1) * reference.lowrank_linear(f64(x), f64(w), None, ai, b64[lo:lo + r]).sum()
                for i, (w, ai, r, lo) in enumerate(zip(ws, a64, ranks, (0, 5))))
    total.backward()
    assert b_cat.grad.shape == b_cat.shape
    assert_close_to_reference(b_cat.grad.cpu(), b64.grad, torch.float32, "dB_cat")
    for i in range(2):
        assert_close_to_reference(a[i].grad.cpu(), a64[i].grad, torch.float32, f"dA[{i}]")


@pytest.mark.parametrize("rank", [8, 24])
def test_multitask_padded_ranks(rank):
    nseq, seq, in_f, out_f = 3, 6, 40, 36
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(nseq, seq, in_f, generator=g).to(DEVICE)
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(DEVICE)
    bias = (torch.randn(out_f, generator=g) * 0.1).to(DEVICE)
    basis = (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(DEVICE)
    m_stack = torch.nn.Parameter((torch.randn(2, out_f, rank, generator=g) * 0.3).to(DEVICE))
    ids = torch.tensor([1, 0, 1], device=DEVICE)
    dy = torch.randn(nseq, seq, out_f, generator=g).to(DEVICE)
    PAD_CACHE.clear()
    before = PAD_CACHE.builds
    xg = x.clone().requires_grad_()
    y = multitask_pica_linear(xg, w, bias, basis, m_stack, ids, backend="triton")
    y.backward(dy)
    assert PAD_CACHE.builds - before == 2  # the shared basis and the stack of M's
    x64, ms64 = f64(x).requires_grad_(), f64(m_stack).requires_grad_()
    want = torch.stack([reference.pica_linear(x64[i], f64(w), f64(bias), f64(basis), ms64[int(ids[i])])
                        for i in range(nseq)])
    want.backward(f64(dy))
    assert_close_to_reference(y.detach().cpu(), want, torch.float32, "y")
    assert_close_to_reference(xg.grad.cpu(), x64.grad, torch.float32, "dx")
    assert m_stack.grad.shape == m_stack.shape
    assert_close_to_reference(m_stack.grad.cpu(), ms64.grad, torch.float32, "dM stack")
    before = PAD_CACHE.builds
    multitask_pica_linear(x, w, bias, basis, m_stack, ids, backend="triton")
    assert PAD_CACHE.builds == before
