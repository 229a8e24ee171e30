"""Mixed precision: PiCa layers under ``torch.autocast`` follow it as ``nn.Linear`` does.

Inside ``torch.autocast(device, dtype)`` a layer's GEMMs run in the region's dtype (x, W and the bias cast as
F.linear's are), ``M`` stays fp32 and its gradient is accumulated in fp32 (docs/design.md, "Mixed precision").
The expected values are the reference math on the inputs cast to the autocast dtype, evaluated in float64, with
the per-dtype tolerance of the shared table. The op-level checks (custom op, torch.compile, grouped, multi-task,
Triton) are in tests/ops/test_autocast_ops.py; the PEFT front end under the Trainer in tests/peft.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_reference, tiny_model
from torch import nn
from train_helpers import BF16_LOSS_RTOL, trainer_losses

from pica_kernels import PiCaConfig, PiCaLinear, apply_pica, reference

AMP_DTYPES = [torch.bfloat16, torch.float16]


def _layer(side: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> PiCaLinear:
    torch.manual_seed(seed)
    layer = PiCaLinear(nn.Linear(24, 16).to(dtype), rank=4, side=side)
    with torch.no_grad():
        layer.m().normal_(0, 0.3)
    return layer


def _expected(layer: PiCaLinear, x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype, side: str):
    """(y, dx, dM) of the reference math on x, W, b cast to ``dtype`` (the operands autocast hands F.linear), the
    basis and M as the layer keeps them, evaluated in float64."""
    def f64(t):
        return t.detach().to(dtype).double() if t.dtype != torch.float64 else t.detach()

    x64 = f64(x).requires_grad_()
    m64 = layer.m().detach().double().requires_grad_()
    base = layer.base_layer
    y = reference.pica_linear(x64, f64(base.weight), f64(base.bias), layer.basis().detach().double(), m64, side)
    y.backward(dy.double())
    return y, x64.grad, m64.grad


@pytest.mark.parametrize("side", reference.SIDES)
@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=str)
def test_layer_follows_autocast(dtype, side):
    """Forward in the autocast dtype, backward to an fp32 x and an fp32 M, against the reference in that dtype."""
    layer = _layer(side)
    x = torch.randn(2, 3, 24, requires_grad=True)  # leading dims, fp32 as a model's hidden states enter
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(dy)
    want_y, want_dx, want_dm = _expected(layer, x, dy, dtype, side)
    assert_close_to_reference(y, want_y, dtype)
    assert_close_to_reference(x.grad, want_dx, dtype)
    # M and its gradient stay fp32; dM is accumulated in fp32 from the autocast-dtype t and dy.
    assert layer.m().dtype == torch.float32 and layer.m().grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32  # through the cast, as nn.Linear's input gradient
    assert_close_to_reference(layer.m().grad, want_dm, dtype)


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=str)
def test_zero_m_layer_equals_nn_linear_under_autocast(dtype):
    """With M = 0 the layer under autocast gives what its nn.Linear gives under autocast: bit for bit, since both
    run the same addmm on the same (2-D) shapes and the zero low-rank term adds exact zeros."""
    torch.manual_seed(0)
    linear = nn.Linear(24, 16)
    layer = PiCaLinear(linear, rank=4)
    x = torch.randn(5, 24)
    with torch.autocast("cpu", dtype=dtype):
        want = linear(x)
        got = layer(x)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)


def test_bf16_layer_fp32_input_under_autocast_runs_the_fused_op(monkeypatch):
    """A bf16 layer fed fp32 hidden states inside a bf16 region: x is cast like F.linear's, so the fused op runs
    (not the base layer plus a separate term), and the result matches the all-bf16 layer outside autocast."""
    import pica_kernels.ops as ops

    layer = _layer("input", dtype=torch.bfloat16)
    assert layer.m().dtype == torch.float32  # the default M dtype of a bf16 layer
    x = torch.randn(4, 24)
    calls = []
    real = ops.lowrank_linear
    monkeypatch.setattr(ops, "lowrank_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert calls, "the fused op was not used"
    assert torch.equal(y, layer(x.to(torch.bfloat16)))  # the same op on the same bf16 operands


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=str)
def test_backward_inside_the_region_equals_backward_outside(dtype):
    """A backward run inside the autocast region must not let autocast recast the fp32 dM reduction."""
    grads = []
    for inside in (False, True):
        layer = _layer("input")
        x = torch.randn(6, 24, generator=torch.Generator().manual_seed(2))
        with torch.autocast("cpu", dtype=dtype):
            y = layer(x)
            if inside:
                y.float().square().sum().backward()
        if not inside:
            y.float().square().sum().backward()
        grads.append(layer.m().grad)
    assert grads[1].dtype == torch.float32
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("method", ["nf4", "bnb-int8", "torchao-int8"])
def test_quantized_base_under_autocast(method):
    """A quantized base runs its own forward (whatever dtype its library gives under autocast); the PiCa term is
    added in the autocast dtype and dM is accumulated in fp32 (it was rounded through autocast's bf16 GEMM)."""
    pytest.importorskip("torchao" if method.startswith("torchao") else "bitsandbytes")
    from pica_kernels.core.quant import quantize_base

    dtype = torch.bfloat16
    torch.manual_seed(0)
    base = quantize_base(nn.Sequential(nn.Linear(64, 32)), method, skip=())[0]
    layer = PiCaLinear(base, rank=4)
    with torch.no_grad():
        layer.m().normal_(0, 0.3)
    x = torch.randn(48, 64)
    with torch.autocast("cpu", dtype=dtype):
        want_base = base(x)
        y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    y.backward(dy)
    t = x.to(dtype).double() @ layer.basis().to(dtype).double().T  # the term's shrink, in the autocast dtype
    term = t @ layer.m().detach().double().T
    assert_close_to_reference(y, want_base.double() + term, dtype)
    assert layer.m().grad.dtype == torch.float32
    # The term is a bf16 tensor: its gradient is dy rounded to bf16, and t is as the forward rounded it.
    want_dm = dy.to(dtype).double().T @ t.to(dtype).double()
    err = float((layer.m().grad.double() - want_dm).abs().max() / want_dm.abs().max())
    assert err < 1e-4, err  # fp32 accumulation; a bf16 GEMM for dM was ~2e-3 off


def test_native_model_trains_under_trainer_bf16(tmp_path):
    """A tiny Llama with PiCa (apply_pica) trains 3 steps under transformers.Trainer(bf16=True, use_cpu=True): the
    losses track an fp32 run within BF16_LOSS_RTOL (train_helpers.py says why), M stays fp32, and the loss falls
    by far more than that tolerance (a bf16 run whose M never moved -- the stale cast behind a fused AdamW step --
    stayed at its first loss)."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    runs = {}
    for bf16 in (False, True):
        model = apply_pica(tiny_model("llama"), PiCaConfig(rank=4, target_modules=targets), progress=False)
        runs[bf16] = trainer_losses(model, tmp_path / str(bf16), bf16=bf16)
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    fp32, bf16 = runs[False], runs[True]
    # It trains, and by more than twice the tolerance: a bf16 run stuck at its first loss falls outside it.
    assert fp32[-1] < fp32[0] * (1 - 2 * BF16_LOSS_RTOL), fp32
    assert bf16 != fp32  # autocast did run (the same fp32 computation would give the same losses)
    assert bf16 == pytest.approx(fp32, rel=BF16_LOSS_RTOL)
