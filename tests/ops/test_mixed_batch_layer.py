"""PiCaLinear serving one adapter per sequence (multi-task launch through the layer)."""

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
from pica_kernels.core.defaults import BASE_ADAPTER
from pica_kernels.native.layer import grouped_forward, mixed_batch
from pica_kernels.ops.backend import ENV_VAR
from pica_kernels.ops.kernels import launchers


def layer_with_adapters(side="input", rank=4, second_rank=None, seed=0):
    torch.manual_seed(seed)
    layer = PiCaLinear(nn.Linear(32, 28), rank=rank, side=side, adapter_name="a")
    layer.add_adapter("b", second_rank or rank, side)
    with torch.no_grad():
        for name in ("a", "b"):
            layer.m(name).normal_(0, 0.3)
    return layer.to(DEVICE)


def one_at_a_time(layer, x, names):
    outs = []
    for i, name in enumerate(names):
        if name == BASE_ADAPTER:
            outs.append(layer.base_layer(x[i : i + 1]))
        else:
            layer.set_adapter(name)
            outs.append(layer(x[i : i + 1]))
    return torch.cat(outs)


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=needs_triton)])
def test_mixed_batch_equals_one_adapter_at_a_time(kernels, monkeypatch):
    monkeypatch.setenv(ENV_VAR, kernels)
    launches = []
    real = launchers.launch_lowrank_gemm
    monkeypatch.setattr(launchers, "launch_lowrank_gemm", lambda *a, **k: launches.append(k.get("tasks")) or real(*a, **k))
    layer = layer_with_adapters()
    x = torch.randn(4, 9, 32, device=DEVICE)
    names = ["b", BASE_ADAPTER, "a", "b"]
    m_b = layer.m("b")
    y = layer(x, adapter_names=names)
    if kernels == "triton":  # one shrink + one multi-task GEMM for the whole batch
        assert len(launches) == 2 and launches[1].tolist() == [0, 2, 1, 0]
    want = one_at_a_time(layer, x, names)
    assert max_rel_err(y, want) <= TOLERANCES[torch.float32]
    # Gradients reach each adapter's M from its own sequences only.
    y[1:3].sum().backward()
    assert m_b.grad is None or torch.all(m_b.grad == 0)
    assert layer.m("a").grad.abs().sum() > 0


def test_mixed_batch_falls_back_for_output_side_and_unequal_ranks():
    for layer in (layer_with_adapters(side="output"), layer_with_adapters(rank=4, second_rank=6)):
        x = torch.randn(3, 5, 32, device=DEVICE)
        names = ["a", "b", "a"]
        assert max_rel_err(layer(x, adapter_names=names), one_at_a_time(layer, x, names)) <= TOLERANCES[torch.float32]


def test_mixed_batch_context_manager_over_a_model():
    torch.manual_seed(1)
    model = nn.Sequential(layer_with_adapters(seed=1), nn.Tanh())
    x = torch.randn(2, 4, 32, device=DEVICE)
    with mixed_batch(model, ["b", "a"]):
        y = model(x)
    # Outside the block, the active adapter again: the selection was this block's only.
    assert max_rel_err(model(x), torch.tanh(one_at_a_time(model[0], x, ["a", "a"]))) <= TOLERANCES[torch.float32]
    want = torch.tanh(one_at_a_time(model[0], x, ["b", "a"]))
    assert max_rel_err(y, want) <= TOLERANCES[torch.float32]
    with pytest.raises(ValueError, match="batch=3"):
        model[0](x, adapter_names=["a", "b", "a"])
    with pytest.raises(KeyError, match="nope"):
        model[0](x, adapter_names=["a", "nope"])


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("side", ["input", "output"])
def test_grouped_forward_equals_separate_layers(side, kernels, monkeypatch):
    monkeypatch.setenv(ENV_VAR, kernels)
    torch.manual_seed(3)
    layers = [PiCaLinear(nn.Linear(32, o, bias=o != 12), rank=r, side=side).to(DEVICE)
              for o, r in ((32, 6), (12, 4), (12, 5))]
    with torch.no_grad():
        for layer in layers:
            layer.m().normal_(0, 0.3)
    x = torch.randn(2, 7, 32, device=DEVICE, requires_grad=True)
    ys = grouped_forward(x, layers)
    sum((y * (i + 1)).sum() for i, y in enumerate(ys)).backward()
    got_dx, got_dm = x.grad.clone(), [layer.m().grad.clone() for layer in layers]
    x.grad = None
    for layer in layers:
        layer.m().grad = None
    want = [layer(x) for layer in layers]
    sum((y * (i + 1)).sum() for i, y in enumerate(want)).backward()
    tol = TOLERANCES[torch.float32]
    for y, w in zip(ys, want):
        assert y.shape == w.shape and max_rel_err(y, w) <= tol
    assert max_rel_err(got_dx, x.grad) <= tol
    for g, layer in zip(got_dm, layers):
        assert max_rel_err(g, layer.m().grad) <= tol
