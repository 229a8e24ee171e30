"""torch.compile(fullgraph=True) of a model with PiCa layers: no graph break, same values as eager."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import (
    DEVICE,
    TOLERANCES,
    max_rel_err,
    needs_triton,
    poison_kernel_outputs,  # noqa: F401  (autouse)
)
from torch import nn

from pica_kernels import PiCaLinear
from pica_kernels.core.bank import PiCaBank
from pica_kernels.ops.backend import ENV_VAR


class TwoLayer(nn.Module):
    """Two layers of one role sharing M (one bank key), one output-side layer, leading dims (B, S, d)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bank = PiCaBank()
        self.l1 = PiCaLinear(nn.Linear(24, 24), rank=4, bank=self.bank, group="shared")
        self.l2 = PiCaLinear(nn.Linear(24, 24), rank=4, bank=self.bank, group="shared")
        self.l3 = PiCaLinear(nn.Linear(24, 16), rank=3, side="output")
        with torch.no_grad():
            for p in self.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.2)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


@pytest.mark.parametrize(
    "compile_backend, kernels",
    [("aot_eager", "reference"), ("inductor", "reference"), pytest.param("aot_eager", "triton", marks=needs_triton)],
)
def test_compile_fullgraph_matches_eager(compile_backend, kernels, monkeypatch):
    # The op is opaque to the compiler: the backend is picked when it runs, so
    # forcing the Triton kernels (interpreter on CPU) works inside the graph too.
    monkeypatch.setenv(ENV_VAR, kernels)
    model = TwoLayer().to(DEVICE)
    x = torch.randn(2, 5, 24, device=DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2  # the shared M once, and l3's M

    def step(fn):
        for p in params:
            p.grad = None
        y = fn(x)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in params]

    y_eager, g_eager = step(model)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    y_comp, g_comp = step(compiled)
    tol = TOLERANCES[torch.float32]
    assert max_rel_err(y_comp, y_eager) <= tol
    for ge, gc in zip(g_eager, g_comp):
        assert max_rel_err(gc, ge) <= tol
    # The shared M received the sum of both layers' gradients.
    assert g_eager[0].abs().sum() > 0
