"""PiCaLinear: init = base, forward vs reference, basis, merge/unmerge bit-exactness, errors."""

import copy

import pytest
import torch
from conftest import TOLERANCES, assert_close_to_reference
from torch import nn
from transformers.pytorch_utils import Conv1D

from pica_kernels import PiCaLinear, pica_linear, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYER_SHAPES = [(24, 40, 8), (33, 17, 5), (16, 16, 16)]  # (out, in, r)


def _linear(out_f, in_f, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def _fill_m(layer, seed=3, scale=0.1):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        layer.m().copy_(torch.randn(layer.m().shape, generator=g) * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", reference.SIDES)
@pytest.mark.parametrize("bias", [True, False])
def test_fresh_layer_is_exactly_the_base(dtype, side, bias):
    base = _linear(24, 40, bias, dtype)
    x = torch.randn(3, 5, 40).to(dtype)
    expected = base(x)
    layer = PiCaLinear(copy.deepcopy(base), rank=8, side=side)
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", reference.SIDES)
@pytest.mark.parametrize("shape", LAYER_SHAPES)
def test_forward_matches_float64_reference(dtype, side, shape):
    out_f, in_f, r = shape
    layer = PiCaLinear(_linear(out_f, in_f, dtype=dtype), rank=r, side=side)
    _fill_m(layer)
    x = torch.randn(2, 7, in_f).to(dtype)
    expected = reference.pica_linear(
        x.double(), layer.base_weight.double(), layer.base_layer.bias.double(),
        layer.basis().double(), layer.m().double(), side,
    )
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 7, out_f)
    assert_close_to_reference(y, expected, dtype)


@pytest.mark.parametrize("side", reference.SIDES)
def test_basis_is_top_singular_vectors(side):
    layer = PiCaLinear(_linear(30, 20, dtype=torch.float64), rank=6, side=side)
    u, s, vh = torch.linalg.svd(layer.base_weight)
    basis = layer.basis()
    vecs = basis if side == "input" else basis.T  # (r, n)
    ref = vh[:6] if side == "input" else u[:, :6].T
    torch.testing.assert_close(vecs @ vecs.T, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)
    # Same vectors up to sign, and the sign is canonical (largest-|entry| positive).
    torch.testing.assert_close((vecs * ref).sum(-1).abs(), torch.ones(6, dtype=torch.float64), atol=1e-10, rtol=0)
    idx = vecs.abs().argmax(-1)
    assert bool((vecs.gather(-1, idx[:, None]) > 0).all())


def test_only_m_is_trainable_and_gets_gradient():
    layer = PiCaLinear(_linear(12, 10), rank=4)
    _fill_m(layer)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["pica_bank.default.m"]
    layer(torch.randn(5, 10)).square().sum().backward()
    assert layer.m().grad is not None and layer.m().grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("side", reference.SIDES)
def test_gradcheck_through_layer(side):
    layer = PiCaLinear(_linear(6, 5, dtype=torch.float64), rank=3, side=side)
    _fill_m(layer)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    m = layer.m()

    def f(x_, m_):
        return pica_linear(x_, layer.base_weight, layer.base_layer.bias, layer.basis(), m_, side=side)

    assert torch.autograd.gradcheck(f, (x, m))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", reference.SIDES)
def test_merge_rounds_once_and_unmerge_is_bit_exact(dtype, side):
    layer = PiCaLinear(_linear(24, 40, dtype=dtype), rank=8, side=side)
    _fill_m(layer)
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(6, 40).to(dtype)
    y_unmerged = layer(x)
    layer.merge()
    assert layer.merged
    expected = (original.float() + reference.delta_weight(layer.basis(), layer.m(), side)).to(dtype)
    assert torch.equal(layer.base_layer.weight, expected)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(layer(x).double(), y_unmerged.double(), atol=10 * atol, rtol=10 * rtol)
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, original)
    assert torch.equal(layer(x), y_unmerged)


def test_safe_merge_refuses_nan():
    layer = PiCaLinear(_linear(8, 8), rank=2)
    with torch.no_grad():
        layer.m().fill_(float("nan"))
    original = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(layer.base_layer.weight, original)


def test_conv1d_base_matches_linear_equivalent():
    torch.manual_seed(0)
    conv = Conv1D(24, 40)  # nx=40 inputs, nf=24 outputs, weight (40, 24)
    with torch.no_grad():
        conv.bias.normal_()
    lin = nn.Linear(40, 24)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    a, b = PiCaLinear(conv, rank=5), PiCaLinear(lin, rank=5)
    assert a.base_weight.shape == (24, 40)
    torch.testing.assert_close(a.basis(), b.basis())
    _fill_m(a)
    _fill_m(b)
    x = torch.randn(3, 40)
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)
    original = conv.weight.detach().clone()
    a.merge()
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)
    a.unmerge()
    assert torch.equal(conv.weight, original)


def test_layer_adapters_share_basis_by_side_and_rank():
    layer = PiCaLinear(_linear(12, 10), rank=4)
    layer.add_adapter("same", 4)
    layer.add_adapter("bigger", 6)
    assert layer.basis("same") is layer.basis("default")
    assert layer.basis("bigger").shape == (6, 10)
    assert layer.active_adapter == "default"
    layer.set_adapter("bigger")
    with torch.no_grad():
        layer.m("bigger").fill_(0.5)
    x = torch.randn(2, 10)
    assert not torch.equal(layer(x), layer.base_layer(x))
    layer.delete_adapter("bigger")
    assert layer.active_adapter == "default" and not hasattr(layer, "basis_input_r6")
    assert set(layer.pica_bank) == {"default", "same"}


@pytest.mark.parametrize("rank", [0, -1, 11, 3.0, True])
def test_bad_rank_is_rejected(rank):
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, min\(out, in\)\] = \[1, 10\]"):
        PiCaLinear(_linear(12, 10), rank=rank)


def test_non_linear_base_is_rejected():
    with pytest.raises(TypeError, match="base_layer must be nn.Linear or transformers Conv1D, got Embedding"):
        PiCaLinear(nn.Embedding(10, 4), rank=2)


def test_wrong_basis_shape_is_rejected():
    with pytest.raises(ValueError, match=r"basis must have shape \(4, 10\)"):
        PiCaLinear(_linear(12, 10), rank=4, basis=torch.zeros(4, 12))


def test_basis_buffer_owns_its_storage():
    v = torch.linalg.svd(torch.randn(12, 10))[2].contiguous()  # (10, 10), so v[:3] is a contiguous view
    layer = PiCaLinear(_linear(12, 10), rank=3, basis=v[:3])
    assert layer.basis().untyped_storage().nbytes() == 3 * 10 * 4  # not the whole V
    assert torch.equal(layer.basis(), v[:3])


@pytest.mark.parametrize("other", [dict(out_f=5, rank=2, side="input"), dict(out_f=6, rank=3, side="input"),
                                   dict(out_f=6, rank=2, side="output")])
def test_a_layer_on_a_shared_bank_group_of_another_shape_is_refused_at_creation(other):
    """One M per group: a second layer asking the bank's group "g" for another M shape (other out, rank or side)
    is refused when it is built -- not at its first forward -- and the bank keeps the one M it had."""
    from pica_kernels.core.bank import PiCaBank

    bank = PiCaBank()
    first = PiCaLinear(_linear(6, 8), rank=2, bank=bank, group="g")
    m = first.m()
    shape = tuple(reference.m_shape(other["out_f"], 8, other["rank"], other["side"]))
    with pytest.raises(ValueError, match=rf"group 'g' of adapter 'default' already has M of shape \(6, 2\), a layer "
                                         rf"asked for \({shape[0]}, {shape[1]}\)"):
        PiCaLinear(_linear(other["out_f"], 8), rank=other["rank"], side=other["side"], bank=bank, group="g")
    assert list(bank.groups("default")) == ["g"] and bank.get("default", "g") is m and m.shape == (6, 2)
    same = PiCaLinear(_linear(6, 8), rank=2, bank=bank, group="g")  # the same shape shares it
    assert same.m() is m
