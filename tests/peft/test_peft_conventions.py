"""PEFT's conventions the generic tuner tests rely on: RNG-seeded random init, persistent per-adapter containers."""

from __future__ import annotations

import torch
from conftest import tiny_model
from peft import get_peft_model

from pica_kernels.peft import PiCaPeftConfig, PiCaPeftLinear


def _random_init(adapter_name: str, seed: int):
    base = tiny_model("llama")  # seeds the RNG itself, so seed after it
    torch.manual_seed(seed)
    model = get_peft_model(base, PiCaPeftConfig(r=4, init_weights=False), adapter_name=adapter_name)
    return {k: m.detach().clone() for k, m in model.base_model.pica_M[adapter_name].items()}


def test_init_weights_false_draws_m_from_the_torch_rng_not_the_adapter_name():
    a, b = _random_init("first", seed=0), _random_init("second", seed=0)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the name does not change the weights
    c = _random_init("first", seed=1)
    assert not any(torch.equal(a[k], c[k]) for k in a)  # the seed does
    assert all(float(m.abs().max()) > 0 for m in a.values())


def test_pica_m_is_a_persistent_container_cleaned_on_delete():
    model = get_peft_model(tiny_model("llama"), PiCaPeftConfig(r=4))
    model.add_adapter("other", PiCaPeftConfig(r=4))
    layers = [m for m in model.modules() if isinstance(m, PiCaPeftLinear)]
    for layer in layers:
        assert layer.pica_M is layer.pica_M  # one container per layer, not a view built per access
        assert set(layer.pica_M) == {"default", "other"}
        assert "pica_M" not in dict(layer.named_children())  # M is registered once, by the tuner
    model.delete_adapter("other")
    for layer in layers:
        assert "other" not in layer.pica_M and "other" not in layer.pica_group and "other" not in layer.pica_basis
    assert list(model.base_model.pica_M) == ["default"]
    keys = [k for k in model.state_dict() if ".pica_M." in k]
    assert len(keys) == len(set(keys)) == len(model.base_model.pica_M["default"])


def test_init_weights_false_draws_small_values_not_a_standard_normal():
    """The documented scale: N(0, 0.05²) (pica_kernels.core.bank.random_m_init), small enough that the adapted
    model stays near its base -- not torch.randn's N(0, 1)."""
    from pica_kernels.core.bank import random_m_init

    values = torch.cat([m.reshape(-1) for m in _random_init("default", seed=0).values()])
    assert values.numel() >= 500 and values.dtype == torch.float32
    assert 0.8 * 0.05 <= values.std().item() <= 1.2 * 0.05  # ~7 standard errors either side
    assert abs(values.mean().item()) <= 0.01 and values.abs().max().item() <= 6 * 0.05
    torch.manual_seed(0)
    assert 0.8 * 0.05 <= random_m_init((64, 64)).std().item() <= 1.2 * 0.05
