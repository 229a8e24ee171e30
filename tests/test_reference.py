"""reference.py against an independent dense formulation, closed-form grads and gradcheck (float64)."""

import pytest
import torch
from conftest import pica_inputs

from pica_kernels import reference

SHAPES = [(1, 7, 5, 3), (37, 24, 40, 8), (16, 64, 33, 1), (5, 13, 13, 13)]  # (T, out, in, r)


@pytest.mark.parametrize("side", reference.SIDES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dense_weight(side, shape, bias):
    x, w, b, basis, m = pica_inputs(*shape, side, bias)
    # Independent formulation: the adapted weight written out element by element.
    if side == "input":
        delta = torch.einsum("or,ri->oi", m, basis)
    else:
        delta = torch.einsum("or,ri->oi", basis, m)
    expected = torch.einsum("ti,oi->to", x, w + delta) + (b if b is not None else 0)
    torch.testing.assert_close(reference.pica_linear(x, w, b, basis, m, side), expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(reference.delta_weight(basis, m, side), delta, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("side", reference.SIDES)
def test_leading_dims(side):
    x, w, b, basis, m = pica_inputs(12, 9, 10, 4, side)
    y = reference.pica_linear(x.reshape(2, 3, 2, 10), w, b, basis, m, side)
    assert y.shape == (2, 3, 2, 9)
    torch.testing.assert_close(y.reshape(12, 9), reference.pica_linear(x, w, b, basis, m, side))


@pytest.mark.parametrize("side", reference.SIDES)
@pytest.mark.parametrize("shape", SHAPES)
def test_closed_form_backward_matches_autograd(side, shape):
    x, w, b, basis, m = pica_inputs(*shape, side)
    x.requires_grad_(True)
    m.requires_grad_(True)
    dy = torch.randn(shape[0], shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    reference.pica_linear(x, w, b, basis, m, side).backward(dy)
    a, bb = reference.lowrank_factors(basis, m.detach(), side)
    t = x.detach() @ bb.T
    gx, da, db = reference.lowrank_backward(dy, x.detach(), t, w, a, bb, True, side == "input", side == "output")
    gm = da if side == "input" else db
    torch.testing.assert_close(x.grad, gx, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(m.grad, gm, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("side", reference.SIDES)
def test_gradcheck(side):
    x, w, b, basis, m = pica_inputs(6, 5, 7, 3, side)
    x.requires_grad_(True)
    m.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x_, m_: reference.pica_linear(x_, w, b, basis, m_, side), (x, m))


def test_mixed_dtype_m_is_cast_to_activation_dtype():
    x, w, b, basis, m = pica_inputs(4, 6, 8, 2, "input", dtype=torch.float32)
    y = reference.pica_linear(x.half(), w.half(), b.half(), basis.half(), m, "input")  # m stays float32
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), reference.pica_linear(x, w, b, basis, m, "input"), atol=2e-2, rtol=1e-2)


def test_shapes_and_side_check():
    assert reference.basis_shape(10, 20, 4, "input") == (4, 20)
    assert reference.basis_shape(10, 20, 4, "output") == (10, 4)
    assert reference.m_shape(10, 20, 4, "input") == (10, 4)
    assert reference.m_shape(10, 20, 4, "output") == (4, 20)
    with pytest.raises(ValueError, match="side must be one of"):
        reference.basis_shape(10, 20, 4, "left")
