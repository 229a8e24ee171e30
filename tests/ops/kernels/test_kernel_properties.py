"""Property-based tests of the Triton kernels (CPU interpreter) against the float64 reference.

Hypothesis draws the shapes (T from 0, odd in/out, any r from 1 to min(in, out)),
memory layouts of every operand (contiguous, transposed, sliced out of a wider
buffer, expanded with stride 0), dtypes (fp32, fp16, bf16), bias on/off, side
and which factors train; values come from a seeded generator. Values AND
gradients are compared with the per-dtype tolerance table of kernel_helpers.py.

Budget: an example costs 0.5-3 s under the interpreter; the properties below
run ~80 examples in all. Dims <= 128 and T <= 48 keep it there.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis", reason="hypothesis is not installed (the GPU machines may lack it)")

from hypothesis import given, note, settings  # noqa: E402
from hypothesis import strategies as st

from pica_kernels import reference
from pica_kernels.ops import grouped_lowrank_linear, lowrank_linear, multitask_pica_linear, pica_linear
from pica_kernels.ops.kernels import launchers
from pica_kernels.ops.kernels.configs import config_override
from tests.ops.kernel_helpers import (
    DEVICE,
    KERNEL_PROFILE,
    TOLERANCES,
    assert_close_to_reference,
    max_rel_err,
    needs_triton,
    poison_kernel_outputs,  # noqa: F401  (autouse)
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")
MAX_DIM, MAX_T = 128, 48


def f64(t):
    return None if t is None else t.detach().cpu().to(torch.float64)


class Operand:
    """Values stored with a given memory layout: ``leaf`` holds them, ``view(leaf)`` (any dtype copy of it)
    is the (rows, cols) operand.

    contiguous: the leaf itself; transposed: a column-major (rows, cols) view of a (cols, rows) leaf;
    sliced: every other column of a (rows, 2 cols) leaf (row stride 2 cols, column stride 2);
    expanded: one row broadcast to every row (row stride 0). The gradient compared is the view's (what
    the op returns for its argument), kept with ``retain_grad``: autograd's reduction onto an expanded
    16-bit leaf (97 fp16 rows summed) is not the kernel's rounding.
    """

    def __init__(self, layout: str, rows: int, cols: int, gen: torch.Generator, scale: float, dtype: torch.dtype):
        self.layout = layout
        shape = {"contiguous": (rows, cols), "transposed": (cols, rows), "sliced": (rows, 2 * cols),
                 "expanded": (1, cols)}[layout]
        self.rows, self.cols = rows, cols
        self.leaf = (torch.randn(shape, generator=gen) * scale).to(dtype).to(DEVICE)

    def view(self, leaf: torch.Tensor) -> torch.Tensor:
        if self.layout == "transposed":
            return leaf.T
        if self.layout == "sliced":
            return leaf[:, ::2]
        if self.layout == "expanded":
            return leaf.expand(self.rows, self.cols)
        return leaf

    def trainable(self):
        view = self.view(self.leaf.detach().clone().requires_grad_())
        view.retain_grad()
        return view

    def reference(self):
        view = self.view(f64(self.leaf).requires_grad_())
        view.retain_grad()
        return view


def assert_as_accurate_as_reference(got, same_dtype_ref, want64, dtype, what):
    """``got`` within the tolerance table of the float64 result -- or, where the reference path itself,
    run in the same dtype, cannot meet the table, within twice its error.

    The second case is cancellation: with stride-0 (expanded) operands every row of x or of the basis
    is the same, and a 16-bit intermediate both paths round by contract (``s = dy @ A`` in dy's
    dtype) can be large next to the sum it cancels down to.
    """
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an element the kernel never wrote?)"
    err = max_rel_err(got, want64)
    bound = max(TOLERANCES[dtype], 2 * max_rel_err(same_dtype_ref, want64))
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.1e} for {dtype}"


@st.composite
def lowrank_cases(draw, max_t=MAX_T):
    """Shapes, dtypes and layouts of one ``y = x@W.T + (x@B.T)@A.T + bias`` call."""
    in_f = draw(st.integers(1, MAX_DIM))
    out_f = draw(st.integers(1, MAX_DIM))
    return dict(
        rows=draw(st.integers(0, max_t)),
        in_f=in_f,
        out_f=out_f,
        rank=draw(st.integers(1, min(in_f, out_f))),
        dtype=draw(st.sampled_from(DTYPES)),
        factor_dtype=draw(st.sampled_from(("x", "fp32"))),  # an fp32 M with 16-bit activations
        bias=draw(st.sampled_from((None, "contiguous", "strided", "expanded"))),
        layouts={name: draw(st.sampled_from(LAYOUTS)) for name in ("x", "weight", "a", "b", "dy")},
        seed=draw(st.integers(0, 2**16)),
    )


def build(case):
    """Operands of a case: x (T, in), weight (out, in), a (out, r), b (r, in), bias (out,)|None, dy (T, out)."""
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, lay = case["dtype"], case["layouts"]
    fdtype = torch.float32 if case["factor_dtype"] == "fp32" else dtype
    rows, in_f, out_f, rank = case["rows"], case["in_f"], case["out_f"], case["rank"]
    ops = dict(
        x=Operand(lay["x"], rows, in_f, gen, 1.0, dtype),
        weight=Operand(lay["weight"], out_f, in_f, gen, in_f**-0.5, dtype),
        a=Operand(lay["a"], out_f, rank, gen, rank**-0.5, fdtype),
        b=Operand(lay["b"], rank, in_f, gen, in_f**-0.5, fdtype),
        dy=Operand(lay["dy"], rows, out_f, gen, 1.0, dtype),
    )
    bias = None
    if case["bias"] is not None:
        values = (torch.randn(out_f, generator=gen) * 0.1).to(dtype).to(DEVICE)
        if case["bias"] == "strided":
            bias = torch.stack([values, torch.full_like(values, 1e3)], dim=1)[:, 0]
        elif case["bias"] == "expanded":
            bias = values[:1].expand(out_f)
        else:
            bias = values
    return ops, bias


@needs_triton
@settings(KERNEL_PROFILE, max_examples=30)
@given(case=lowrank_cases(), side=st.sampled_from(reference.SIDES))
def test_pica_linear_property(case, side):
    """pica_linear (x and M trainable, W and the basis frozen) on the kernels == float64 reference."""
    note(case)
    ops, bias = build(case)
    dtype = case["dtype"]
    # input side: (A, B) = (M, P); output side: (A, B) = (U_r, M).
    m_name, basis_name = ("a", "b") if side == "input" else ("b", "a")
    basis = ops[basis_name].view(ops[basis_name].leaf)
    weight = ops["weight"].view(ops["weight"].leaf)
    dy = ops["dy"].view(ops["dy"].leaf)

    def run(backend):
        x = ops["x"].trainable()
        m = ops[m_name].trainable()
        y = pica_linear(x, weight, bias, basis, m, side=side, backend=backend)
        y.backward(dy)
        return y, x.grad, m.grad

    got, same_dtype = run("triton"), run("reference")
    x64 = ops["x"].reference()
    m64 = ops[m_name].reference()
    y64 = reference.pica_linear(x64, f64(weight), f64(bias), f64(basis), m64, side)
    y64.backward(f64(dy))
    assert got[0].dtype == dtype and got[0].shape == y64.shape
    assert got[1].dtype == dtype and got[2].dtype == ops[m_name].leaf.dtype
    for name, g, r, w in zip(("y", "dx", "dM"), got, same_dtype, (y64, x64.grad, m64.grad)):
        assert_as_accurate_as_reference(g.detach().cpu(), r.detach().cpu(), w, dtype, name)


@needs_triton
@settings(KERNEL_PROFILE, max_examples=20)
@given(case=lowrank_cases(), trainable=st.sets(st.sampled_from(("x", "a", "b")), min_size=1))
def test_lowrank_linear_property(case, trainable):
    """lowrank_linear with any subset of x, A, B trainable (LoRA: both factors) == float64 reference."""
    note((case, trainable))
    ops, bias = build(case)
    dtype = case["dtype"]
    dy = ops["dy"].view(ops["dy"].leaf)

    def run(backend):
        views = {n: ops[n].trainable() if n in trainable else ops[n].view(ops[n].leaf)
                 for n in ("x", "weight", "a", "b")}
        y = lowrank_linear(views["x"], views["weight"], bias, views["a"], views["b"], backend=backend)
        y.backward(dy)
        return y, {n: views[n].grad for n in trainable}

    (y, grads), (y_ref, grads_ref) = run("triton"), run("reference")
    views64 = {n: ops[n].reference() if n in trainable else f64(ops[n].view(ops[n].leaf))
               for n in ("x", "weight", "a", "b")}
    y64 = reference.lowrank_linear(views64["x"], views64["weight"], f64(bias), views64["a"], views64["b"])
    y64.backward(f64(dy))
    assert_as_accurate_as_reference(y.detach().cpu(), y_ref.detach().cpu(), y64, dtype, "y")
    for name in sorted(trainable):
        assert grads[name].dtype == ops[name].leaf.dtype, name
        assert_as_accurate_as_reference(grads[name].cpu(), grads_ref[name].cpu(), views64[name].grad, dtype,
                                        f"d{name}")


@needs_triton
@settings(KERNEL_PROFILE, max_examples=15)
@given(
    case=lowrank_cases(max_t=40),
    split_k=st.integers(1, 5),
    mode=st.sampled_from(("plain", "concat_k", "decode")),
    small_blocks=st.booleans(),
)
def test_launcher_property(case, split_k, mode, small_blocks):
    """One launch in each mode, with split-K and 16-wide blocks (several tiles in every dimension)."""
    note((case, split_k, mode, small_blocks))
    ops, bias = build(case)
    dtype, rank = case["dtype"], case["rank"]
    x, weight = (ops[n].view(ops[n].leaf) for n in ("x", "weight"))
    a, b = (ops[n].view(ops[n].leaf) for n in ("a", "b"))
    rows, out_f = x.shape[0], weight.shape[0]
    out = launchers.alloc((rows, out_f), dtype, x.device)
    t64 = f64(x) @ f64(b).T
    blocks = dict(BLOCK_ROWS=16, BLOCK_COLS=16, BLOCK_DEPTH=16) if small_blocks else {}
    with config_override(**blocks):
        if mode == "plain":
            launchers.launch_lowrank_gemm(out, x, weight.T, bias=bias, split_k=split_k)
            want = f64(x) @ f64(weight).T + (0 if bias is None else f64(bias))
        elif mode == "concat_k":
            t = (x @ b.to(dtype).T) if rows else x.new_zeros(0, rank)
            launchers.launch_lowrank_gemm(out, x, weight.T, t=t, factor_up=a.T, bias=bias, split_k=split_k)
            want = reference.lowrank_linear(f64(x), f64(weight), f64(bias), f64(a), f64(b))
            same_dtype = reference.lowrank_linear(x, weight, bias, a, b)
        else:
            t_out = launchers.alloc((rows, rank), dtype, x.device)
            launchers.launch_lowrank_gemm(out, x, weight.T, factor_down=b.T, factor_up=a.T, t_out=t_out,
                                          bias=bias, split_k=split_k)
            want = reference.lowrank_linear(f64(x), f64(weight), f64(bias), f64(a), f64(b))
            same_dtype = reference.lowrank_linear(x, weight, bias, a, b)
            assert_close_to_reference(t_out.cpu(), t64, dtype, "t")
    if mode == "plain":
        assert_close_to_reference(out.cpu(), want, dtype, "out (plain)")
    else:  # t is rounded to x's dtype before t @ A.T, as in the reference
        assert_as_accurate_as_reference(out.cpu(), same_dtype.cpu(), want, dtype, f"out ({mode})")


@st.composite
def grouped_cases(draw):
    n = draw(st.integers(2, 3))
    in_f = draw(st.integers(1, 64))
    outs = [draw(st.integers(1, 64)) for _ in range(n)]
    return dict(
        rows=draw(st.integers(0, 24)), in_f=in_f, outs=outs,
        ranks=[draw(st.integers(1, min(in_f, o))) for o in outs],
        biases=[draw(st.booleans()) for _ in range(n)],
        dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 2**16)),
    )


@needs_triton
@settings(KERNEL_PROFILE, max_examples=8)
@given(case=grouped_cases())
def test_grouped_property(case):
    """Grouped q/k/v-style projections (one shrink launch), any mix of biases: values, dx and every dM."""
    note(case)
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, rows, in_f = case["dtype"], case["rows"], case["in_f"]
    x = torch.randn(rows, in_f, generator=gen).to(dtype)
    ws = [(torch.randn(o, in_f, generator=gen) * in_f**-0.5).to(dtype) for o in case["outs"]]
    bs = [(torch.randn(o, generator=gen) * 0.1).to(dtype) if has else None
          for o, has in zip(case["outs"], case["biases"])]
    ms = [torch.randn(o, r, generator=gen) * r**-0.5 for o, r in zip(case["outs"], case["ranks"])]
    b_cat = (torch.randn(sum(case["ranks"]), in_f, generator=gen) * in_f**-0.5).to(dtype)
    dys = [torch.randn(rows, o, generator=gen).to(dtype) for o in case["outs"]]
    dev = [t if t is None else t.to(DEVICE) for t in bs]
    xg = x.to(DEVICE).requires_grad_()
    mg = [m.to(DEVICE).requires_grad_() for m in ms]
    ys = grouped_lowrank_linear(xg, [w.to(DEVICE) for w in ws], dev, mg, b_cat.to(DEVICE), case["ranks"],
                                backend="triton")
    torch.autograd.backward(ys, [d.to(DEVICE) for d in dys])
    x64 = f64(x).requires_grad_()
    m64 = [f64(m).requires_grad_() for m in ms]
    want, off = [], 0
    for w, b, m, r in zip(ws, bs, m64, case["ranks"]):
        want.append(reference.lowrank_linear(x64, f64(w), f64(b), m, f64(b_cat[off:off + r])))
        off += r
    torch.autograd.backward(want, [f64(d) for d in dys])
    for i, (y, w) in enumerate(zip(ys, want)):
        assert_close_to_reference(y.detach().cpu(), w, dtype, f"y[{i}]")
        assert_close_to_reference(mg[i].grad.cpu(), m64[i].grad, dtype, f"dM[{i}]")
    assert_close_to_reference(xg.grad.cpu(), x64.grad, dtype, "dx")


@needs_triton
@settings(KERNEL_PROFILE, max_examples=8)
@given(
    nseq=st.integers(1, 4), seq=st.integers(0, 12), in_f=st.integers(1, 64), out_f=st.integers(1, 64),
    n_adapters=st.integers(1, 3), dtype=st.sampled_from(DTYPES), data=st.data(),
)
def test_multitask_property(nseq, seq, in_f, out_f, n_adapters, dtype, data):
    """One adapter per sequence (segments of the concatenated-K launch) against one adapter at a time."""
    rank = data.draw(st.integers(1, min(in_f, out_f)))
    ids = data.draw(st.lists(st.integers(0, n_adapters - 1), min_size=nseq, max_size=nseq))
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(nseq, seq, in_f, generator=gen).to(dtype)
    w = (torch.randn(out_f, in_f, generator=gen) * in_f**-0.5).to(dtype)
    b = (torch.randn(out_f, generator=gen) * 0.1).to(dtype)
    p = (torch.randn(rank, in_f, generator=gen) * in_f**-0.5).to(dtype)
    ms = torch.randn(n_adapters, out_f, rank, generator=gen) * rank**-0.5
    dy = torch.randn(nseq, seq, out_f, generator=gen).to(dtype)
    xg = x.to(DEVICE).requires_grad_()
    msg = ms.to(DEVICE).requires_grad_()
    y = multitask_pica_linear(xg, w.to(DEVICE), b.to(DEVICE), p.to(DEVICE), msg, torch.tensor(ids, device=DEVICE),
                              backend="triton")
    y.backward(dy.to(DEVICE))
    x64 = f64(x).requires_grad_()
    ms64 = f64(ms).requires_grad_()
    want = torch.stack([reference.pica_linear(x64[i], f64(w), f64(b), f64(p), ms64[k], "input")
                        for i, k in enumerate(ids)])
    want.backward(f64(dy))
    assert_close_to_reference(y.detach().cpu(), want, dtype, "y")
    assert_close_to_reference(xg.grad.cpu(), x64.grad, dtype, "dx")
    assert_close_to_reference(msg.grad.cpu(), ms64.grad, dtype, "dM")
