"""Adapter semantics both front ends must keep: disabled = base (also merged), MoE roles, stacked merges,
M dtype defaults, and adapters loaded onto half-precision or foreign bases.

Written against public behaviour; each test names the bug it guards against.
"""

import pytest
import torch
from conftest import randomize_m, tiny_model
from torch import nn

import pica_kernels as pk
from pica_kernels import PiCaLinear, reference
from pica_kernels.core.targets import role_of
from pica_kernels.native.apply import pica_layers

TOKENS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def _layer(dtype=torch.float32, side="input"):
    torch.manual_seed(0)
    return PiCaLinear(nn.Linear(40, 24).to(dtype), rank=8, side=side)


def _fill(m, seed, scale=0.1):
    with torch.no_grad():
        m.copy_(torch.randn(m.shape, generator=torch.Generator().manual_seed(seed)) * scale)


# ----------------------------------------------------------- disabled while merged
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_layer_that_is_disabled_gives_exactly_the_base_output(dtype):
    layer = _layer(dtype)
    _fill(layer.m(), 1)
    x = torch.randn(5, 40).to(dtype)
    base = layer.base_layer(x)
    layer.merge()
    assert not torch.equal(layer(x), base)
    layer.disabled = True
    assert torch.equal(layer(x), base)  # bug guarded: a merged layer ignoring `disabled` returns W0+ΔW


# ------------------------------------------------------------------- MoE roles
class _Expert(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)


class _MoeMlp(nn.Module):
    def __init__(self, hidden=16, inter=12, experts=3):
        super().__init__()
        self.experts = nn.ModuleList(_Expert(hidden, inter) for _ in range(experts))
        self.shared_expert = _Expert(hidden, inter)

    def forward(self, x):
        return sum(e.down_proj(e.up_proj(x)) for e in self.experts) + self.shared_expert.down_proj(
            self.shared_expert.up_proj(x))


class _Block(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.mlp = _MoeMlp() if moe else _Expert(16, 12)

    def forward(self, x):
        return x + (self.mlp(x) if isinstance(self.mlp, _MoeMlp) else self.mlp.down_proj(self.mlp.up_proj(x)))


class _MoeModel(nn.Module):
    """Layer 0 dense (mlp.down_proj), layers 1-2 MoE (mlp.experts.{e}.down_proj + mlp.shared_expert.down_proj)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([_Block(False), _Block(True), _Block(True)])

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def test_role_of_names_with_several_indices():
    assert role_of("model.layers.3.mlp.experts.5.down_proj") == "mlp.experts.down_proj"
    assert role_of("model.layers.3.mlp.shared_expert.down_proj") == "mlp.shared_expert.down_proj"
    assert role_of("model.layers.3.mlp.down_proj") == "mlp.down_proj"
    assert role_of("model.layers.12.self_attn.q_proj") == "self_attn.q_proj"
    assert role_of("blocks.3") == "blocks"


def test_moe_experts_share_one_m_per_role_across_experts_and_layers():
    model = pk.apply_pica(_MoeModel(), pk.PiCaConfig(rank=2, target_modules=["down_proj"]), progress=False)
    layers = dict(pica_layers(model))
    m_of = {name: layer.m() for name, layer in layers.items()}
    experts = [m_of[f"layers.{i}.mlp.experts.{e}.down_proj"] for i in (1, 2) for e in range(3)]
    assert all(m is experts[0] for m in experts)  # one M for all experts of all layers
    shared = [m_of[f"layers.{i}.mlp.shared_expert.down_proj"] for i in (1, 2)]
    assert shared[0] is shared[1] and shared[0] is not experts[0]
    dense = m_of["layers.0.mlp.down_proj"]
    assert dense is not experts[0] and dense is not shared[0]
    assert sorted(model.pica_bank["default"]) == sorted(
        ["mlp-down_proj-16x12", "mlp-experts-down_proj-16x12", "mlp-shared_expert-down_proj-16x12"])


# -------------------------------------------------------------- stacked merges
def _two_adapter_layer(side):
    layer = _layer(side=side)
    layer.add_adapter("b", 8, side)
    _fill(layer.m("default"), 1)
    _fill(layer.m("b"), 2)
    return layer


@pytest.mark.parametrize("side", reference.SIDES)
def test_native_merging_two_adapters_stacks_and_unmerge_is_bit_exact(side):
    layer = _two_adapter_layer(side)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge("default")
    layer.merge("b")  # bug guarded: the second merge refused, or computed from the already rounded weight
    expected = (w0.float() + layer.delta_weight("default") + layer.delta_weight("b")).to(w0.dtype)
    assert torch.equal(layer.base_layer.weight, expected)
    assert layer.merged_adapters == ["default", "b"]
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)


def test_native_model_merge_of_two_adapters_stacks(tiny_llama):
    pk.apply_pica(tiny_llama, pk.PiCaConfig(rank=4), progress=False)
    pk.apply_pica(tiny_llama, pk.PiCaConfig(rank=4), adapter_name="b", progress=False)
    randomize_m(tiny_llama)
    w0 = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    pk.merge(tiny_llama, "default")
    pk.merge(tiny_llama, "b")
    q = tiny_llama.model.layers[1].self_attn.q_proj
    expected = (w0["model.layers.1.self_attn.q_proj.base_layer.weight"].float() + q.delta_weight("default")
                + q.delta_weight("b"))
    assert torch.equal(q.base_layer.weight, expected)
    pk.unmerge(tiny_llama)
    assert all(torch.equal(p, w0[n]) for n, p in tiny_llama.named_parameters())


# ------------------------------------------------------------------ M dtype
def test_m_defaults_to_float32_for_a_bfloat16_base():
    model = pk.apply_pica(tiny_model("llama").to(torch.bfloat16), pk.PiCaConfig(rank=4), progress=False)
    assert {p.dtype for p in model.pica_bank.parameters()} == {torch.float32}
    assert _layer(torch.bfloat16).m().dtype == torch.float32


# ---------------------------------------------------------- foreign / half bases
def _saved(tmp_path, scale=0.05):
    model = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4, store_bases=True), progress=False)
    randomize_m(model, scale=scale)
    return model, pk.save_adapter(model, tmp_path / "adapter")


def test_float32_adapter_with_stored_bases_onto_another_bfloat16_base_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    other = tiny_model("llama", seed=1).to(torch.bfloat16)
    with pytest.raises(pk.AdapterMismatchError, match="base model: layer .* weight: (norm|probe) .* beyond rounding"):
        pk.load_adapter(other, path, progress=False)
    assert not hasattr(other, "pica_bank")
    same = pk.load_adapter(tiny_model("llama").to(torch.bfloat16), path, progress=False)  # a bf16 copy loads
    assert hasattr(same, "pica_bank")


def test_half_precision_model_from_float32_adapter_reproduces_the_adapter_effect(tmp_path):
    model, path = _saved(tmp_path, scale=0.3)
    base32 = tiny_model("llama")
    effect = model(TOKENS).logits - base32(TOKENS).logits  # what the adapter changes, in fp32
    half = pk.load_adapter(tiny_model("llama").to(torch.bfloat16), path, progress=False)
    with pk.disable_adapter(half):
        base16 = half(TOKENS).logits.float()
    effect16 = half(TOKENS).logits.float() - base16
    # bf16 rounding moves the effect by a few percent; an adapter 25% off (M scaled by 0.75) moves it by ~25%.
    rel = float(torch.linalg.vector_norm(effect16 - effect) / torch.linalg.vector_norm(effect))
    assert rel < 0.1, rel
