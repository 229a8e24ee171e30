"""PiCa through PEFT on fused mixture-of-experts weights (``target_parameters``), with real PEFT.

Tiny random Mixtral, Qwen2-MoE (with its dense shared expert, adapted through ``target_modules``) and OLMoE:
output at init equals the base, three training steps move only ``M``, the trainable count is what the sharing rule
predicts, save/load gives identical outputs, merged equals unmerged and unmerge restores every weight bit for bit,
``disable_adapter`` gives the base, mixed batches, a layout PiCa does not adapt is refused naming the module.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from moe_models import DENSE_TARGETS, EXPERT_PARAMETERS, MOE_ARCHS, moe_ids, tiny_moe
from peft import PeftModel, get_peft_model

from pica_kernels.core.experts import UnsupportedExpertsError
from pica_kernels.peft import PiCaPeftConfig
from pica_kernels.peft.experts import PiCaPeftExperts

R = 4
#: float32, two computations of one output in different orders (a batch of 1 against a mixed batch of 3): 4e-6.
FP32_RTOL = 4e-6
HIDDEN, FFN, E, LAYERS = 32, 48, 4, 2


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _config(arch: str, **kw) -> PiCaPeftConfig:
    return PiCaPeftConfig(r=R, target_modules=DENSE_TARGETS[arch], target_parameters=list(EXPERT_PARAMETERS), **kw)


def _peft(arch: str, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return get_peft_model(tiny_moe(arch), _config(arch, **kw))


def _randomize(model, seed: int = 1, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.base_model.pica_M.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _logits(model, ids=None, **kw):
    with torch.no_grad():
        return model(input_ids=moe_ids() if ids is None else ids, **kw).logits


def _expected_trainable(arch: str, per_expert: bool) -> int:
    """One M per role (shared by all experts and both layers): gate (ffn, r), up (ffn, r), down (hidden, r); with one
    M per expert, E of each. Dense targets: q (32x32) and v (16x32, 2 kv heads of 8): (out, r) each; Qwen2-MoE's
    shared expert up (40, r) and down (32, r)."""
    experts = (FFN + FFN + HIDDEN) * R * (E if per_expert else 1)
    dense = (HIDDEN + 16) * R + ((40 + HIDDEN) * R if arch == "qwen2_moe" else 0)
    return experts + dense


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_output_at_init_equals_the_base(arch):
    """M starts at zero. The routed PiCa forward sums each token's k expert outputs in its own order (transformers'
    grouped path in another), so the output equals the base's to fp32 rounding, not bit for bit."""
    base_out = _logits(tiny_moe(arch))
    model = _peft(arch)
    experts = [m for m in model.modules() if isinstance(m, PiCaPeftExperts)]
    assert len(experts) == LAYERS
    assert set(experts[0].pica_r["default"]) == {"gate_proj", "up_proj", "down_proj"}
    assert rel(_logits(model), base_out) <= 1e-6


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("per_expert", [False, True])
def test_three_steps_move_only_m_and_trainable_count_follows_the_sharing_rule(arch, per_expert):
    model = _peft(arch, share_experts=not per_expert)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(".pica_M." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == _expected_trainable(arch, per_expert)
    groups = {n.rpartition(".")[2]: tuple(p.shape) for n, p in trainable.items()}
    down = (E, HIDDEN, R) if per_expert else (HIDDEN, R)
    assert groups[f"mlp-experts-down_proj-{HIDDEN}x{FFN}" + (f"-e{E}" if per_expert else "")] == down
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    model.train()
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids = moe_ids(batch=4, length=16, seed=3)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = dict([*model.named_parameters(), *model.named_buffers()])
    moved = {n for n, t in before.items() if not torch.equal(t, after[n].detach())}
    assert moved == set(trainable), f"moved: {sorted(moved - set(trainable))}, still: {sorted(set(trainable) - moved)}"


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("kw", [{}, {"store_bases": True}, {"share_experts": False}, {"side": "output"}],
                         ids=["default", "store_bases", "per_expert", "output_side"])
def test_save_and_load_give_identical_outputs(arch, kw, tmp_path):
    model = _peft(arch, **kw)
    _randomize(model)
    model.eval()
    expected = _logits(model)
    assert rel(expected, _logits(tiny_moe(arch))) > 1e-2, "the adapter must change the output"
    model.save_pretrained(tmp_path)
    torch.manual_seed(1234)  # bases are recomputed on load: the global seed must not matter
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        reloaded = PeftModel.from_pretrained(tiny_moe(arch), tmp_path).eval()
    assert torch.equal(_logits(reloaded), expected)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_load_onto_other_experts_is_refused(arch, tmp_path):
    """The expert weights are part of the base model's identity and their bases are fingerprinted: other experts
    (only the fused weights differ) are refused."""
    from pica_kernels.core.errors import AdapterMismatchError

    model = _peft(arch)
    _randomize(model)
    model.save_pretrained(tmp_path)
    other = tiny_moe(arch)
    with torch.no_grad():
        other.model.layers[1].mlp.experts.down_proj.mul_(1.5)
    with pytest.raises(AdapterMismatchError, match=r"layers\.1\.mlp\.experts\.down_proj"):
        PeftModel.from_pretrained(other, tmp_path)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_merged_equals_unmerged_and_unmerge_restores_every_bit(arch):
    model = _peft(arch)
    _randomize(model)
    model.eval()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".pica_M." not in n}
    unmerged = _logits(model)
    model.merge_adapter()
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert not torch.equal(experts.base_layer.down_proj, weights[
        "base_model.model.model.layers.0.mlp.experts.base_layer.down_proj"]), "merging must change the weights"
    assert rel(_logits(model), unmerged) <= 1e-5
    with model.disable_adapter():
        assert torch.equal(_logits(model), _logits(tiny_moe(arch)))  # disabled while merged: the original weights
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if ".pica_M." not in n:
            assert torch.equal(p.detach(), weights[n]), n
    assert torch.equal(_logits(model), unmerged)
    merged_model = model.merge_and_unload()
    assert not any(isinstance(m, PiCaPeftExperts) for m in merged_model.modules())
    assert rel(_logits(merged_model), unmerged) <= 1e-5


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_disabled_adapter_gives_the_base_output(arch):
    model = _peft(arch)
    _randomize(model)
    model.eval()
    with model.disable_adapter():
        disabled = _logits(model)
    assert torch.equal(disabled, _logits(tiny_moe(arch)))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_mixed_batch_serves_each_sequence_with_its_adapter(arch):
    """Qwen2-MoE's dense shared expert gets the token-flattened batch (batch*seq, hidden), as the experts do."""
    model = _peft(arch)
    model.add_adapter("other", _config(arch))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.base_model.pica_M.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.eval()
    ids = moe_ids(batch=3, length=9, seed=2)
    mixed = _logits(model, ids, adapter_names=["default", "other", "__base__"])
    model.set_adapter("default")
    assert rel(mixed[0], _logits(model, ids[:1])[0]) <= FP32_RTOL
    model.set_adapter("other")
    assert rel(mixed[1], _logits(model, ids[1:2])[0]) <= FP32_RTOL
    with model.disable_adapter():
        assert rel(mixed[2], _logits(model, ids[2:3])[0]) <= FP32_RTOL


def test_target_parameters_select_roles_and_exclude_removes_them():
    """``experts.up_proj`` selects the up half of gate_up_proj only; ``exclude_modules`` drops a role."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        up = get_peft_model(tiny_moe("mixtral"), PiCaPeftConfig(r=R, target_modules=None,
                                                                target_parameters=["experts.up_proj"]))
        no_down = get_peft_model(tiny_moe("olmoe"), PiCaPeftConfig(
            r=R, target_modules=None, target_parameters=list(EXPERT_PARAMETERS), exclude_modules=["down_proj"]))
    layer = up.base_model.model.model.layers[1].mlp.experts
    assert set(layer.pica_r["default"]) == {"up_proj"}
    assert [n.rpartition(".")[2] for n, p in up.named_parameters() if p.requires_grad] == [
        f"mlp-experts-up_proj-{FFN}x{HIDDEN}"]
    assert set(no_down.base_model.model.model.layers[0].mlp.experts.pica_r["default"]) == {"gate_proj", "up_proj"}


def test_unsupported_expert_layout_is_refused_naming_the_module():
    """gpt-oss stores its experts transposed, with biases, gate/up rows interleaved and its own activation: PiCa's
    experts core does not adapt that layout, and says so for the module the config selected; the model is left as
    it was."""
    base = tiny_moe("gpt_oss")
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(UnsupportedExpertsError, match=r"model\.layers\.0\.mlp\.experts.*GptOssExperts.*PiCa adapts"):
        get_peft_model(base, PiCaPeftConfig(r=R, target_modules=None, target_parameters=["experts.down_proj"]))
    after = base.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_target_parameters_are_checked_in_the_config():
    with pytest.raises(ValueError, match="target_parameters must be a list"):
        PiCaPeftConfig(target_parameters="experts.down_proj")
    with pytest.raises(ValueError, match="share_experts"):
        PiCaPeftConfig(target_parameters=["experts.down_proj"], share_experts="no")
    with pytest.raises(ValueError, match="layers_to_transform selects target_modules only"):
        get_peft_model(tiny_moe("mixtral"), PiCaPeftConfig(target_parameters=["experts.down_proj"],
                                                           layers_to_transform=[0]))


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("side", ["input", "output"])
def test_native_and_peft_front_ends_agree(arch, side):
    """The same model, config and seed through apply_pica and get_peft_model: the same bases (bit for bit), the same
    groups of M, and with the same M the same output (the same core functions on the same tensors)."""
    from pica_kernels import PiCaConfig, apply_pica
    from pica_kernels.native.experts import PiCaExperts

    native = apply_pica(tiny_moe(arch), PiCaConfig(rank=R, side=side, target_modules=[
        *DENSE_TARGETS[arch], *EXPERT_PARAMETERS]), progress=False)
    model = _peft(arch, side=side)
    _randomize(model)
    peft_ms = dict(model.base_model.pica_M["default"].items())
    native_ms = dict(native.pica_bank["default"].items())
    assert set(native_ms) == set(peft_ms)
    with torch.no_grad():
        for group, m in native_ms.items():
            m.copy_(peft_ms[group])
    for i in range(LAYERS):
        n_layer = native.get_submodule(f"model.layers.{i}.mlp.experts")
        p_layer = model.base_model.model.get_submodule(f"model.layers.{i}.mlp.experts")
        assert isinstance(n_layer, PiCaExperts) and isinstance(p_layer, PiCaPeftExperts)
        assert set(n_layer.adapters["default"]) == set(p_layer.pica_r["default"]) == {"gate_proj", "up_proj",
                                                                                       "down_proj"}
        for role in p_layer.pica_r["default"]:
            assert torch.equal(n_layer.basis(role, "default"), p_layer.pica_basis["default"][role]), (i, role)
    model.eval()
    assert torch.equal(_logits(native), _logits(model))


def test_added_adapter_starts_inactive_and_delete_leaves_the_first_as_it_was():
    model = _peft("olmoe")
    _randomize(model)
    model.eval()
    before = _logits(model)
    model.add_adapter("b", _config("olmoe", share_experts=False))
    layer = model.base_model.model.model.layers[0].mlp.experts
    assert set(layer.pica_r) == {"default", "b"}
    b_ms = dict(model.base_model.pica_M["b"].items())
    assert b_ms and not any(m.requires_grad for m in b_ms.values())  # added: not trainable until set_adapter
    assert torch.equal(_logits(model), before)
    model.set_adapter("b")
    assert all(m.requires_grad for m in b_ms.values())
    assert not any(m.requires_grad for m in model.base_model.pica_M["default"].parameters())
    model.set_adapter("default")
    model.delete_adapter("b")
    assert set(layer.pica_r) == set(layer.pica_basis) == set(layer.pica_group) == {"default"}
    assert "b" not in model.base_model.pica_M
    assert torch.equal(_logits(model), before)
