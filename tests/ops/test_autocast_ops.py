"""The ops under ``torch.autocast``: they follow it as ``nn.Linear`` does, on every path.

Inside an autocast region the entry points (``pica_linear``, ``lowrank_linear``, ``grouped_lowrank_linear``,
``multitask_pica_linear``) cast x, the frozen weight(s) and bias(es) to the region's dtype, as autocast casts
F.linear's operands, and keep the factors' dtypes: an fp32 ``M`` stays fp32 and gets an fp32 gradient,
accumulated in fp32. So the custom op and the Triton kernels receive what a CUDA autocast region hands them --
bf16/fp16 x and W, fp32 M -- here under the CPU interpreter (kernel_helpers.py) in a CPU autocast region. The
custom ops themselves compute in their inputs' dtypes whatever region calls them (what their fake kernels
promise). Expected values: the reference math on the autocast-cast inputs, in float64.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import (
    DEVICE,
    assert_close_to_reference,
    needs_triton,
    poison_kernel_outputs,  # noqa: F401  (autouse)
)

from pica_kernels import reference
from pica_kernels.ops import grouped_lowrank_linear, multitask_pica_linear, pica_linear

AMP_DTYPES = [torch.bfloat16, torch.float16]
BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fp32_inputs(rows, in_f, out_f, rank, side, seed=0):
    """x, W, bias, basis, M all fp32 (an fp32 model entering an autocast region); O(1) outputs."""
    g = _gen(seed)
    x = torch.randn(rows, in_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    b = torch.randn(out_f, generator=g) * 0.1
    if side == "input":
        basis, m = torch.randn(rank, in_f, generator=g) / in_f**0.5, torch.randn(out_f, rank, generator=g) * 0.3
    else:
        basis, m = torch.randn(out_f, rank, generator=g) / rank**0.5, torch.randn(rank, in_f, generator=g) / in_f**0.5
    return [t.to(DEVICE) for t in (x, w, b, basis, m)]


def amp64(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An operand autocast casts (x, W, bias), as the GEMM sees it, in float64."""
    return t.detach().cpu().to(dtype).double()


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().double()


@pytest.mark.parametrize("side", reference.SIDES)
@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_pica_linear_follows_autocast(backend, dtype, side):
    x, w, b, basis, m = fp32_inputs(12, 40, 36, 8, side)
    x.requires_grad_()
    m = torch.nn.Parameter(m)
    with torch.autocast(DEVICE, dtype=dtype):
        y = pica_linear(x, w, b, basis, m, side, backend=backend)
    assert y.dtype == dtype
    dy = torch.randn(y.shape, generator=_gen(1)).to(dtype).to(DEVICE)
    y.backward(dy)
    x64, m64 = amp64(x, dtype).requires_grad_(), f64(m).requires_grad_()
    want = reference.pica_linear(x64, amp64(w, dtype), amp64(b, dtype), f64(basis), m64, side)
    want.backward(f64(dy))
    assert_close_to_reference(y, want, dtype, "y")
    assert_close_to_reference(x.grad, x64.grad, dtype, "dx")
    assert_close_to_reference(m.grad, m64.grad, dtype, "dM")
    assert x.grad.dtype == m.dtype == m.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_compute_in_their_inputs_dtypes_under_autocast(backend):
    """Called directly inside a region, the custom ops run in the dtypes they are given (fp32 here), as their fake
    kernels promise -- autocast is applied by the entry points, before the op -- and give what they give outside."""
    x, w, b, basis, m = fp32_inputs(12, 40, 36, 8, "input")
    dy = torch.randn(12, 36, generator=_gen(1)).to(DEVICE)
    outs = []
    for region in (False, True):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=region):
            y, t = torch.ops.pica.lowrank_linear(x, w, b, m, basis, backend, 16)
            grads = torch.ops.pica.lowrank_linear_backward(dy, None, t, w, m, basis, True, True, False,
                                                                   backend)
        outs.append((y, t, *grads[:2]))
    for inside, outside in zip(outs[1], outs[0]):
        assert inside.dtype == torch.float32
        assert torch.equal(inside, outside)  # the same computation on the same shapes


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_pica_linear_under_autocast_matches_eager(backend):
    """torch.compile(fullgraph=True) of the entry point inside a bf16 region: the cast is traced, the opaque op runs
    in bf16 with an fp32 M, and values and gradients match eager under the same region."""
    dtype = torch.bfloat16
    x, w, b, basis, m = fp32_inputs(12, 40, 36, 8, "input")
    m = torch.nn.Parameter(m)

    def fn(inp):
        return pica_linear(inp, w, b, basis, m, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):
        m.grad = None
        xi = x.detach().clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=dtype):
            y = f(xi)
        y.float().square().sum().backward()
        results.append((y, xi.grad, m.grad))
    (y_e, dx_e, dm_e), (y_c, dx_c, dm_c) = results
    assert y_c.dtype == dtype and dx_c.dtype == torch.float32 and dm_c.dtype == torch.float32
    assert_close_to_reference(y_c, f64(y_e), dtype, "y")
    assert_close_to_reference(dx_c, f64(dx_e), dtype, "dx")
    assert_close_to_reference(dm_c, f64(dm_e), dtype, "dM")


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_follows_autocast(backend, dtype):
    ranks, outs = [3, 5], [36, 20]
    g = _gen(0)
    x = torch.randn(10, 40, generator=g).to(DEVICE).requires_grad_()
    ws = [(torch.randn(o, 40, generator=g) / 40**0.5).to(DEVICE) for o in outs]
    bs = [(torch.randn(o, generator=g) * 0.1).to(DEVICE) for o in outs]
    b_cat = (torch.randn(sum(ranks), 40, generator=g) / 40**0.5).to(DEVICE)
    ms = [torch.nn.Parameter((torch.randn(o, r, generator=g) * 0.3).to(DEVICE)) for o, r in zip(outs, ranks)]
    with torch.autocast(DEVICE, dtype=dtype):
        ys = grouped_lowrank_linear(x, ws, bs, ms, b_cat, ranks, backend=backend)
    assert [y.dtype for y in ys] == [dtype, dtype]
    dys = [torch.randn(y.shape, generator=_gen(i + 1)).to(dtype).to(DEVICE) for i, y in enumerate(ys)]
    torch.autograd.backward(ys, dys)
    x64 = amp64(x, dtype).requires_grad_()
    m64 = [f64(mi).requires_grad_() for mi in ms]
    wants = [reference.lowrank_linear(x64, amp64(wi, dtype), amp64(bi, dtype), mi, f64(bb))
             for wi, bi, mi, bb in zip(ws, bs, m64, b_cat.split(ranks))]
    torch.autograd.backward(wants, [f64(dy) for dy in dys])
    for i, (y, want) in enumerate(zip(ys, wants)):
        assert_close_to_reference(y, want, dtype, f"y[{i}]")
        assert ms[i].grad.dtype == torch.float32
        assert_close_to_reference(ms[i].grad, m64[i].grad, dtype, f"dM[{i}]")
    assert x.grad.dtype == torch.float32
    assert_close_to_reference(x.grad, x64.grad, dtype, "dx")


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_multitask_follows_autocast(backend, dtype):
    g = _gen(0)
    x = torch.randn(3, 4, 40, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(36, 40, generator=g) / 40**0.5).to(DEVICE)
    b = (torch.randn(36, generator=g) * 0.1).to(DEVICE)
    basis = (torch.randn(8, 40, generator=g) / 40**0.5).to(DEVICE)
    m_stack = torch.nn.Parameter((torch.randn(2, 36, 8, generator=g) * 0.3).to(DEVICE))
    ids = torch.tensor([1, 0, 1], device=DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        y = multitask_pica_linear(x, w, b, basis, m_stack, ids, backend=backend)
    assert y.dtype == dtype
    dy = torch.randn(y.shape, generator=_gen(1)).to(dtype).to(DEVICE)
    y.backward(dy)
    x64, m64 = amp64(x, dtype).requires_grad_(), f64(m_stack).requires_grad_()
    want, _ = reference.multitask_forward(x64, amp64(w, dtype), amp64(b, dtype), m64, f64(basis), ids.cpu())
    want.backward(f64(dy))
    assert_close_to_reference(y, want, dtype, "y")
    assert_close_to_reference(x.grad, x64.grad, dtype, "dx")
    assert m_stack.grad.dtype == torch.float32
    assert_close_to_reference(m_stack.grad, m64.grad, dtype, "dM")
