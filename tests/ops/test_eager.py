"""The eager CPU path (pica_kernels/ops/eager.py): every route of its lowrank_linear against the reference and
gradcheck, what it saves for the backward, the cached factor casts, and the adapter term alone."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, pica_inputs

from pica_kernels import ops, reference
from pica_kernels.ops import eager, lowrank

# ops.pica_linear / ops.lowrank_linear on eager CPU tensors call the eager path directly (no custom op).
# eager.lowrank_linear takes one of three routes: plain autograd (few tokens, factors in x's
# dtype), _LowRankLinear factored (factors of another dtype), _LowRankLinear merged (many fp32/fp64
# tokens). Every route is checked below.

ROUTES = ("autograd", "factored", "merged")


def _route(route, x, w, b, a, bb):
    """eager.lowrank_linear forced onto one route; x (T, in) -> (T, out)."""
    if route == "autograd":
        assert not eager.merged_pays(x, w, a, bb, True)
        return eager.lowrank_linear(x, w, b, a, bb)
    return eager._LowRankLinear.apply(x, w, b, a, bb, route == "merged")[0]


def _old_lowrank_linear(x, weight, bias, a, b):
    """The reference math before the direct CPU path (two F.linear and an out-of-place add; autograd)."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x, b.to(x.dtype)), a.to(x.dtype))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_every_route_every_argument(route, bias):
    g = torch.Generator().manual_seed(3)
    shapes = [(5, 7), (6, 7), (6,), (6, 3), (3, 7)]
    args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    if not bias:
        args[2] = None
    diff = [t for t in args if t is not None]

    def fn(*ts):
        it = iter(ts)
        x, w, b_, a, bb = (next(it) if t is not None else None for t in args)
        return _route(route, x, w, b_, a, bb)

    assert torch.autograd.gradcheck(fn, diff)


@pytest.mark.parametrize("side", reference.SIDES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [6, 400], ids=["few-tokens", "many-tokens"])
def test_gradcheck_direct_path_pica(side, bias, rows):
    """ops.pica_linear on CPU (the direct path) in float64, x and M differentiable; 400 rows take the merged form."""
    x, w, b, basis, m = pica_inputs(rows, 5, 7, 3, side, bias)
    assert eager.merged_pays(x, w, *reference.lowrank_factors(basis, m, side), True) == (rows == 400)
    x.requires_grad_(True)
    m.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x_, m_: ops.pica_linear(x_, w, b, basis, m_, side=side), (x, m))


@pytest.fixture
def count_custom_op(monkeypatch):
    """Number of times the custom op's reference implementation ran."""
    calls = []
    real = lowrank.reference_forward
    monkeypatch.setattr(lowrank, "reference_forward", lambda *a: calls.append(1) or real(*a))
    return calls


def test_eager_cpu_skips_the_custom_op(count_custom_op, monkeypatch):
    x, w, b, basis, m = pica_inputs(9, 6, 8, 3, "input", dtype=torch.float32)
    m.requires_grad_(True)
    want = reference.pica_linear(x, w, b, basis, m)
    ops.pica_linear(x, w, b, basis, m).sum().backward()
    ops.lowrank_linear(x, w, b, m, basis, backend="reference").sum().backward()
    assert count_custom_op == []
    # The custom op itself still runs the reference (what torch.compile and CUDA tensors get) ...
    torch.testing.assert_close(torch.ops.pica.lowrank_linear(x, w, b, m, basis, "reference")[0], want)
    assert len(count_custom_op) == 1
    # ... and the entry points take it while being compiled.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(ops.pica_linear(x, w, b, basis, m), want)
    torch.testing.assert_close(ops.lowrank_linear(x, w, b, m, basis), want)
    assert len(count_custom_op) == 3


def _saved_shapes(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("rows, m_dtype", [(37, torch.float32), (2000, torch.float32), (37, torch.float64)],
                         ids=["autograd", "merged", "factored-mixed-dtype"])
def test_direct_path_saves_t_not_x(rows, m_dtype):
    """PiCa input side on the direct path: the activation saved is t (T, r), never x (T, in), on every route."""
    x, w, b, basis, m = pica_inputs(rows, 72, 80, 12, "input", dtype=torch.float32)
    m = m.to(m_dtype).requires_grad_(True)
    x.requires_grad_(True)
    saved, y = _saved_shapes(lambda: ops.pica_linear(x, w, b, basis, m))
    assert (rows, 12) in saved and (rows, 80) not in saved, saved
    y.sum().backward()  # and the backward runs from what was saved
    assert m.grad.dtype == m_dtype and x.grad.shape == x.shape
    x, w, b, basis, m = pica_inputs(rows, 72, 80, 12, "output", dtype=torch.float32)
    saved, _ = _saved_shapes(lambda: ops.pica_linear(x.requires_grad_(), w, b, basis, m.requires_grad_(), side="output"))
    assert (rows, 80) in saved  # output side: dM = (dy @ U_r).T @ x needs x


ODD_SHAPES = [(1, 7, 5, 3), (3, 37, 29, 5), (300, 37, 29, 5), (64, 13, 61, 13)]  # (T, out, in, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("side", reference.SIDES)
def test_direct_path_equals_previous_reference_math(dtype, shape, side):
    """Values and gradients of the direct path against the reference math as it was (fp32 M, like PiCaLinear)."""
    rows, out_f, in_f, r = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(rows, in_f, generator=g).to(dtype)
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(dtype)
    b = (torch.randn(out_f, generator=g) * 0.1).to(dtype)
    basis = (torch.randn(*reference.basis_shape(out_f, in_f, r, side), generator=g) / r**0.5).to(dtype)
    m = torch.randn(*reference.m_shape(out_f, in_f, r, side), generator=g) * 0.3
    dy = torch.randn(rows, out_f, generator=g).to(dtype)
    results = []
    for fn in (ops.pica_linear, lambda *a, side: _old_lowrank_linear(*a[:3], *reference.lowrank_factors(*a[3:], side))):
        xi, mi = x.clone().requires_grad_(), m.clone().requires_grad_()
        y = fn(xi, w, b, basis, mi, side=side)
        y.backward(dy)
        results.append((y, xi.grad, mi.grad))
    atol, rtol = TOLERANCES[dtype]
    for name, new, old in zip(("y", "dx", "dM"), *results):
        assert new.dtype == old.dtype and new.shape == old.shape, name
        torch.testing.assert_close(new.double(), old.double(), atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("side", reference.SIDES)
@pytest.mark.parametrize("path", ["direct", "custom-op", "term"])
def test_bf16_activations_fp32_m_grad_is_accumulated_in_fp32(side, path):
    """bf16 x with an fp32 M: dM must be the float64 ``dy.T @ t`` (input side; ``(dy @ U_r).T @ x``
    output side) of the bf16 operands to fp32 accuracy (~1e-5), not rounded to bf16 (~2e-3 off)."""
    rows, out_f, in_f, r = 256, 48, 40, 8
    x, w, b, basis, m = pica_inputs(rows, out_f, in_f, r, side, dtype=torch.float32, seed=4)
    x, w, b, basis = (t.bfloat16() for t in (x, w, b, basis))
    dy = torch.randn(rows, out_f, generator=torch.Generator().manual_seed(9)).bfloat16()
    m.requires_grad_(True)
    if path == "direct":
        ops.pica_linear(x, w, b, basis, m, side=side).backward(dy)
    elif path == "custom-op":
        a, bb = reference.lowrank_factors(basis, m, side)
        torch.ops.pica.lowrank_linear(x, w, b, a, bb, "reference")[0].backward(dy)
    else:  # the adapter term alone, as PEFT's layer adds it to the base output (several adapters, quantized)
        eager.lowrank_term(x, *reference.lowrank_factors(basis, m, side)).backward(dy)
    assert m.grad.dtype == torch.float32
    if side == "input":
        want = dy.double().T @ (x @ basis.T).double()  # t as the forward rounds it: bf16
    else:
        want = (dy @ basis).double().T @ x.double()  # s = dy @ U_r as the backward rounds it: bf16
    err = ((m.grad.double() - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-5, err


def test_cast_of_fp32_m_is_reused_until_m_changes():
    x, w, b, basis, m = pica_inputs(5, 6, 8, 3, "input", dtype=torch.float32)
    x, w, b, basis = (t.bfloat16() for t in (x, w, b, basis))
    m = torch.nn.Parameter(m)
    first = eager.cast_factor(m, torch.bfloat16)
    assert eager.cast_factor(m, torch.bfloat16) is first and first.dtype == torch.bfloat16
    assert eager.cast_factor(m, torch.float32) is m
    y0 = ops.pica_linear(x, w, b, basis, m)
    opt = torch.optim.SGD([m], lr=0.5)
    y0.float().square().sum().backward()
    opt.step()  # in place: bumps m's version counter
    assert eager.cast_factor(m, torch.bfloat16) is not first

    def fresh():  # the forward with a cast made now, bypassing the cache
        return reference.lowrank_forward(x, w, b, m.detach().bfloat16(), basis)[0]

    torch.testing.assert_close(ops.pica_linear(x, w, b, basis, m), fresh(), atol=0, rtol=0)
    with torch.no_grad():
        m.copy_(torch.ones_like(m))
    torch.testing.assert_close(ops.pica_linear(x, w, b, basis, m), fresh(), atol=0, rtol=0)
    with torch.no_grad():
        m.data = torch.zeros_like(m)  # new storage
    torch.testing.assert_close(ops.pica_linear(x, w, b, basis, m), F.linear(x, w, b), atol=0, rtol=0)


def test_cast_of_m_is_refreshed_after_a_fused_optimizer_step():
    """A fused optimizer (transformers.Trainer's default adamw_torch_fused) rewrites M without bumping its version
    counter; the cached bf16 cast must not outlive its step (it did: under Trainer(bf16=True) M never moved)."""
    x, w, b, basis, m = pica_inputs(5, 6, 8, 3, "input", dtype=torch.float32)
    x, w, b, basis = (t.bfloat16() for t in (x, w, b, basis))
    m = torch.nn.Parameter(m)
    opt = torch.optim.AdamW([m], lr=0.1, fused=True)
    ops.pica_linear(x, w, b, basis, m).float().square().sum().backward()
    version = m._version
    opt.step()
    assert m._version == version  # why the version-keyed cache alone cannot see this write
    assert torch.equal(eager.cast_factor(m, torch.bfloat16), m.detach().bfloat16())
    want = reference.lowrank_forward(x, w, b, m.detach().bfloat16(), basis)[0]
    torch.testing.assert_close(ops.pica_linear(x, w, b, basis, m), want, atol=0, rtol=0)  # the same computation


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_lowrank_term(dtype):
    """The adapter term alone: values and gradients; gradcheck in float64, fp32 factors under bf16 x."""
    x, _, _, basis, m = pica_inputs(7, 6, 8, 3, "input")
    a, bb = m.requires_grad_(), basis.requires_grad_()
    if dtype == torch.float64:
        xg = x.requires_grad_()
        assert torch.autograd.gradcheck(lambda *t: eager.lowrank_term(*t), (xg, a, bb))
        assert torch.autograd.gradcheck(lambda *t: eager._LowRankTerm.apply(*t)[0], (xg, a, bb))
        return
    x = x.reshape(7, 1, 8).bfloat16().requires_grad_()
    a32, b32 = a.detach().float().requires_grad_(), bb.detach().float().requires_grad_()
    y = eager.lowrank_term(x, a32, b32)
    assert y.shape == (7, 1, 6) and y.dtype == torch.bfloat16
    y.float().sum().backward()
    want = (x.detach().double() @ b32.detach().double().T) @ a32.detach().double().T
    atol, rtol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(y.double(), want, atol=atol, rtol=rtol)
    assert a32.grad.dtype == b32.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
