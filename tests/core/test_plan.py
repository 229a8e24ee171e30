"""The per-layer plan (pica_kernels.core.plan): rank, rank check and group key once per target, for both front ends."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pica_kernels as pk
from pica_kernels.core import plan as core_plan
from pica_kernels.core.plan import LayerPlan, layer_group, plan_layers


def test_plan_gives_each_target_its_rank_and_key():
    plans = plan_layers([("model.layers.0.mlp.up_proj", 80, 48), ("model.layers.1.mlp.up_proj", 80, 48),
                         ("model.layers.0.self_attn.q_proj", 48, 48)],
                        rank=8, rank_pattern={"q_proj": 4}, share=True)
    assert plans["model.layers.0.mlp.up_proj"] == LayerPlan("model.layers.0.mlp.up_proj", 80, 48, 8, "mlp-up_proj-80x48")
    assert plans["model.layers.1.mlp.up_proj"].group == "mlp-up_proj-80x48"  # one M for the role
    # rank_pattern's rank is in the key, so layers of different ranks never share M
    assert plans["model.layers.0.self_attn.q_proj"] == LayerPlan(
        "model.layers.0.self_attn.q_proj", 48, 48, 4, "self_attn-q_proj-48x48-r4")
    assert layer_group("model.layers.0.self_attn.q_proj", 48, 48, 4, 8, True) == "self_attn-q_proj-48x48-r4"
    assert layer_group("model.layers.0.self_attn.q_proj", 48, 48, 8, 8, False) == "model-layers-0-self_attn-q_proj-48x48"


@pytest.mark.parametrize(("rank_field", "pattern", "says"), [
    ("rank", {}, r"^rank=9 is larger than min\(out, in\) = 8 of layer 'a.small' \(out=8, in=16\)"),
    ("r", {}, r"^r=9 is larger than min\(out, in\) = 8"),
    ("rank", {"small": 12}, r"^rank_pattern rank=12 is larger than min\(out, in\) = 8"),
])
def test_a_rank_the_layer_cannot_hold_names_the_layer(rank_field, pattern, says):
    with pytest.raises(ValueError, match=says):
        plan_layers([("a.small", 8, 16)], rank=9 if not pattern else 4, rank_pattern=pattern, share=True,
                    rank_field=rank_field)


def test_two_roles_that_would_share_a_key_are_refused():
    with pytest.raises(ValueError, match=r"group key 'x-y_proj-8x8' is claimed by \('x.y_proj', \(8, 8\), 2\) and "
                                         r"\('x-y_proj', \(8, 8\), 2\); rename a module"):
        plan_layers([("x.y_proj", 8, 8), ("x-y_proj", 8, 8)], rank=2, rank_pattern=None, share=True)


class _Colliding(nn.Module):
    """Two modules of different roles whose group keys collide ('.' and '-' both become '-')."""

    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Module()
        self.x.y_proj = nn.Linear(8, 8)
        self.add_module("x-y_proj", nn.Linear(8, 8))

    def forward(self, t):
        return self.x.y_proj(t) + getattr(self, "x-y_proj")(t)


def test_both_front_ends_refuse_colliding_group_keys_and_leave_the_model_as_it_was():
    """Before the shared plan the PEFT tuner gave both modules one M (the same key, the same shape) silently."""
    from peft import get_peft_model

    from pica_kernels.peft import PiCaPeftConfig

    torch.manual_seed(0)
    for build in (lambda m: pk.apply_pica(m, pk.PiCaConfig(rank=2, target_modules=["x.y_proj", "x-y_proj"]), progress=False),
                  lambda m: get_peft_model(m, PiCaPeftConfig(r=2, target_modules=["x.y_proj", "x-y_proj"]))):
        model = _Colliding()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="group key 'x-y_proj-8x8' is claimed by"):
            build(model)
        assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_the_peft_tuner_plans_each_target_once(monkeypatch):
    """The PEFT tuner computes each target's rank once (it computed it four times per target), and its plan is the
    native front end's."""
    from conftest import tiny_model
    from peft import get_peft_model

    from pica_kernels.peft import PiCaPeftConfig

    calls = []
    real = core_plan.rank_for

    def counting(name, rank, rank_pattern):
        calls.append(name)
        return real(name, rank, rank_pattern)

    monkeypatch.setattr(core_plan, "rank_for", counting)
    peft_model = get_peft_model(tiny_model("llama"), PiCaPeftConfig(r=4, rank_pattern={"k_proj": 2}))
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
              if type(m).__name__ == "PiCaPeftLinear"}
    assert sorted(calls) == sorted(layers)  # once per target
    native = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4, rank_pattern={"k_proj": 2}), progress=False)
    native_groups = {n: layer.adapters["default"].group for n, layer in native.named_modules()
                     if isinstance(layer, pk.PiCaLinear)}
    assert {n: m.pica_group["default"] for n, m in layers.items()} == native_groups
