"""Accumulation precision: every reduction runs in fp32 whatever the operand dtype.

Two bugs a developer could plausibly write survive the per-dtype tolerance
table (made for O(1) values and short reductions), so these tests measure
against float64 with the SAME rounded operands the kernels saw: what remains
is the accumulation error (and one final rounding), which fp32 keeps near
1e-6 and a 16-bit accumulator does not.

* dM (``dA = dy.T @ t``) with bf16 activations and an fp32 ``M``: accumulated
  and returned in fp32, ~1e-5 relative to a float64 ``dy.T @ t`` (a
  bf16-rounded dM is off by ~2e-3).
* fp16 operands with depth-4096 reductions (in = 4096 in the forward, 4096
  tokens in dM): the fp32 accumulator, not the output dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pica_kernels.ops import pica_linear
from pica_kernels.ops.kernels import launchers
from tests.ops.kernel_helpers import (
    DEVICE,
    needs_triton,
    poison_kernel_outputs,  # noqa: F401  (autouse)
)

BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]
# One rounding of an fp16 result is at most 2**-11 of its magnitude; allow two.
FP16_ONE_ROUNDING = 2 * 2.0**-11


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (no floor at 1: these values are not O(1))."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert got.shape == want.shape and torch.isfinite(got).all()
    return float((got - want).abs().max() / want.abs().max())


def saved_t(x, weight, bias, m, basis, backend):
    """The activation ``t = x @ P.T`` exactly as the given backend's forward rounds and saves it."""
    if backend == "triton":
        return launchers.triton_forward(x, weight, bias, m, basis)[1]
    return F.linear(x, basis.to(x.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [5, 48])  # the one-launch decode form and the two-launch form
def test_dm_bf16_activations_fp32_m_accumulates_in_fp32(rows, backend):
    g = torch.Generator().manual_seed(rows)
    in_f, out_f, rank = 32, 24, 16
    x = torch.randn(rows, in_f, generator=g).to(torch.bfloat16).to(DEVICE)
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(torch.bfloat16).to(DEVICE)
    basis = (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(torch.bfloat16).to(DEVICE)
    m = (torch.randn(out_f, rank, generator=g) * 0.3).to(DEVICE).requires_grad_()  # fp32, as PiCaLinear keeps it
    # Positive dy and a positive-mean t: partial sums grow, as they do over many tokens.
    dy = torch.rand(rows, out_f, generator=g).to(torch.bfloat16).to(DEVICE)
    pica_linear(x, w, None, basis, m, backend=backend).backward(dy)
    t = saved_t(x, w, None, m.detach(), basis, backend)
    want = dy.double().T @ t.double()
    assert m.grad.dtype == torch.float32
    err = rel_err(m.grad, want)
    assert err <= 1e-5, f"dM relative error {err:.2e}: not accumulated (or not kept) in fp32"


def cancelling(rows: int, cols: int, depth: int, g: torch.Generator, peak: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 ``a`` (rows, depth), ``b`` (cols, depth) whose products sum to ~``peak`` over the first half of
    the depth and cancel over the second half down to ~1/16 of it: the running sum of ``a @ b.T`` peaks
    far above the result, as in mean-zero activations, so a 16-bit accumulator's rounding at the peak
    shows in the result, while fp32's does not."""
    half = depth // 2
    a = torch.rand(rows, half, generator=g).repeat(1, 2)
    first = torch.rand(cols, half, generator=g) * (4 * peak / half)
    b = torch.cat([first, -first + torch.rand(cols, half, generator=g) * (peak / 4 / half)], dim=1)
    return a.half().to(DEVICE), b.half().to(DEVICE)


@needs_triton
@pytest.mark.parametrize("rows", [3, 20])  # decode form; two-launch form
def test_fp16_forward_depth_4096_accumulates_in_fp32(rows):
    g = torch.Generator().manual_seed(rows)
    in_f, out_f, rank = 4096, 16, 8
    x, w = cancelling(rows, out_f, in_f, g, peak=4.0)
    basis = cancelling(rows, rank, in_f, g, peak=4.0)[1]
    m = torch.rand(out_f, rank, generator=g).half().to(DEVICE)
    y, t = launchers.triton_forward(x, w, None, m, basis)
    err_t = rel_err(t, x.double() @ basis.double().T)
    assert err_t <= FP16_ONE_ROUNDING, f"t relative error {err_t:.2e}: accumulator not fp32?"
    # y from the kernel's own rounded t: then only the accumulation and one rounding remain.
    err = rel_err(y, x.double() @ w.double().T + t.double() @ m.double().T)
    assert err <= FP16_ONE_ROUNDING, f"y relative error {err:.2e}: accumulator not fp32?"


@needs_triton
def test_fp16_dm_over_4096_tokens_accumulates_in_fp32():
    g = torch.Generator().manual_seed(0)
    rows, out_f, rank, in_f = 4096, 16, 8, 16
    dy = torch.rand(rows, out_f, generator=g).half().to(DEVICE)
    t = torch.rand(rows, rank, generator=g).half().to(DEVICE)
    w = torch.randn(out_f, in_f, generator=g).half().to(DEVICE)
    m = torch.randn(out_f, rank, generator=g).to(DEVICE)
    basis = torch.randn(rank, in_f, generator=g).half().to(DEVICE)
    _, dm, _ = torch.ops.pica.lowrank_linear_backward(dy, None, t, w, m, basis, False, True, False, "triton")
    err = rel_err(dm, dy.double().T @ t.double())
    assert err <= 1e-5, f"dM relative error {err:.2e} over 4096 tokens: accumulator not fp32?"
