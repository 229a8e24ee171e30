"""PiCa on mixture-of-experts models with fused 3-D expert weights, native front end: tiny random Mixtral,
Qwen2-MoE (with its shared expert, a dense nn.Linear role of its own) and OLMoE from transformers' config classes
(hidden 32, 4 experts, 2 layers). Init = base, training moves only M, save/load, merge/unmerge (bit-exact), the
trainable count of the sharing rule, the routed low-rank forward against the materialised ΔW, the adapter state
(disable, several adapters, set_adapter, delete, mixed batch), refusals, and the basis cache."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TOLERANCES

import pica_kernels as pk
from pica_kernels import reference
from pica_kernels.core import cache
from pica_kernels.core import experts as core_experts
from pica_kernels.core.errors import AdapterMismatchError, PiCaConfigError
from pica_kernels.native.apply import expert_layers
from pica_kernels.native.experts import PiCaExperts
from pica_kernels.native.files import load_adapter, save_adapter
from pica_kernels.native.model import adapter_state, set_disabled
from pica_kernels.native.report import parameter_report

HIDDEN, FFN, SHARED_FFN, E, LAYERS, RANK = 32, 24, 40, 4, 2, 4
ARCHS = ["mixtral", "qwen2_moe", "olmoe"]
#: Every projection but routers and Qwen2-MoE's one-row shared_expert_gate: attention, dense MLP roles (Qwen2-MoE's
#: shared expert) and the three expert roles.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_moe(arch: str, seed: int = 0, dtype=torch.float32):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=61, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2)
    if arch == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=FFN, num_local_experts=E, **common)
    elif arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=FFN,
                                shared_expert_intermediate_size=SHARED_FFN, num_experts=E, **common)
    elif arch == "olmoe":
        cfg = tf.OlmoeConfig(intermediate_size=FFN, num_experts=E, **common)
    else:
        raise ValueError(arch)
    if dtype == torch.float64:  # torch._grouped_mm (transformers' default experts path) takes no float64
        cfg._experts_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():  # random expert weights of O(1) effect (the init's are tiny)
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0, 0.2)
    return model


def _ids(seed: int = 0, batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, 61, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _randomize(model, seed: int = 1, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.pica_bank.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _assert_close(a, b, dtype=torch.float32):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def _config(**kw):
    return pk.PiCaConfig(**{"rank": RANK, "target_modules": TARGETS, **kw})


# ----------------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("arch", ARCHS)
def test_experts_are_wrapped_and_the_output_at_init_equals_the_base(arch):
    model = tiny_moe(arch)
    ids = _ids()
    base = model(ids).logits
    pk.apply_pica(model, _config(), progress=False)
    layers = dict(expert_layers(model))
    assert sorted(layers) == [f"model.layers.{i}.mlp.experts" for i in range(LAYERS)]
    for layer in layers.values():
        assert set(layer.adapters["default"]) == {"gate_proj", "up_proj", "down_proj"}
        assert layer.basis("up_proj", "default").shape == (E, RANK, HIDDEN)
        assert layer.basis("down_proj", "default").shape == (E, RANK, FFN)
    if arch == "qwen2_moe":  # the shared expert is a dense role of its own, next to the experts' roles
        assert isinstance(model.model.layers[0].mlp.shared_expert.up_proj, pk.PiCaLinear)
    _assert_close(model(ids).logits, base)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("share_experts", [True, False])
@pytest.mark.parametrize("share", [True, False])
def test_trainable_count_is_what_the_sharing_rule_predicts(arch, share_experts, share):
    model = tiny_moe(arch)
    pk.apply_pica(model, _config(share=share, share_experts=share_experts), progress=False)
    cfg = model.config
    head = cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head
    attention = RANK * (HIDDEN + kv + kv + HIDDEN)  # M (out, r) of q, k, v, o
    experts = RANK * (FFN + FFN + HIDDEN) * (1 if share_experts else E)  # gate, up, down
    dense = RANK * (SHARED_FFN + SHARED_FFN + HIDDEN) if arch == "qwen2_moe" else 0  # the shared expert
    per_layer = attention + experts + dense
    expected = per_layer * (1 if share else LAYERS)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report = parameter_report(model)
    assert trainable == report.trainable == expected
    # Frozen bases: one per expert of every layer and role, whatever the sharing.
    expert_bases = LAYERS * E * RANK * (HIDDEN + HIDDEN + FFN)
    assert sum(g.frozen_bases for g in report.groups if ".experts." in g.role) == expert_bases
    roles = {g.role for g in report.groups}
    if share:
        assert {"mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"} <= roles
        down = next(g for g in report.groups if g.role == "mlp.experts.down_proj")
        assert down.m_shape == ((E, HIDDEN, RANK) if not share_experts else (HIDDEN, RANK))
        assert down.layers == [f"model.layers.{i}.mlp.experts.down_proj" for i in range(LAYERS)]
    assert not report.left_out


@pytest.mark.parametrize("arch", ARCHS)
def test_three_training_steps_move_only_m(arch):
    model = tiny_moe(arch)
    pk.apply_pica(model, _config(), progress=False)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ms = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert ms and all(n.startswith("pica_bank.") for n in ms)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(3, batch=4, seq=9)
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, ms[n]), f"{n} did not move"
    expert_ms = [n for n in ms if "experts" in n]
    assert len(expert_ms) == 3  # gate, up, down: one M per role for all experts and layers


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("share_experts", [True, False])
def test_save_load_gives_identical_outputs(arch, share_experts, tmp_path):
    model = tiny_moe(arch)
    fresh = copy.deepcopy(model)
    pk.apply_pica(model, _config(share_experts=share_experts), progress=False)
    _randomize(model)
    ids = _ids()
    y = model(ids).logits
    save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "pica_config.json").read_text())
    rec = meta["layers"]["model.layers.1.mlp.experts.up_proj"]
    assert rec["experts"] == {"module": "model.layers.1.mlp.experts", "param": "gate_up_proj", "rows": [FFN, 2 * FFN],
                              "role": "up_proj", "num_experts": E, "per_expert_m": not share_experts}
    assert rec["weight"]["shape"] == [E, FFN, HIDDEN]
    load_adapter(fresh, tmp_path / "a", progress=False)
    assert torch.equal(fresh(ids).logits, y)
    # Loading onto the adapted model itself (M replaced in place) too.
    _randomize(model, seed=9)
    load_adapter(model, tmp_path / "a", progress=False)
    assert torch.equal(model(ids).logits, y)


def test_stored_bases_reload_without_svd(tmp_path, monkeypatch):
    model = tiny_moe("mixtral")
    fresh = copy.deepcopy(model)
    pk.apply_pica(model, _config(store_bases=True), progress=False)
    _randomize(model)
    ids = _ids()
    y = model(ids).logits
    save_adapter(model, tmp_path / "a")
    from pica_kernels.core import bases as core_bases

    def no_svd(*a, **k):
        raise AssertionError("the SVD ran although every basis is stored")

    monkeypatch.setattr(core_bases, "truncated_svd", no_svd)
    load_adapter(fresh, tmp_path / "a", progress=False)
    assert torch.equal(fresh(ids).logits, y)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_unmerged_and_unmerge_restores_every_bit(arch):
    model = tiny_moe(arch)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    pk.apply_pica(model, _config(), progress=False)
    pk.apply_pica(model, _config(share_experts=False), adapter_name="b", progress=False)
    _randomize(model)
    ids = _ids()
    y = model(ids).logits
    pk.merge(model)
    experts = model.model.layers[0].mlp.experts
    assert experts.merged and not torch.equal(experts.base_layer.gate_up_proj, before[
        "model.layers.0.mlp.experts.gate_up_proj"])
    _assert_close(model(ids).logits, y)
    with pk.disable_adapter(model):  # disabled while merged: exactly the base
        base_model = tiny_moe(arch)
        assert torch.equal(model(ids).logits, base_model(ids).logits)
    pk.merge(model, "b")  # stacks
    pk.unmerge(model)
    after = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
             if not k.startswith("pica_bank.")}
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert not any(n.startswith("pica_original") for n, _ in experts.named_buffers())
    assert torch.equal(model(ids).logits, y)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_merge_and_unload_gives_the_plain_model_with_the_merged_weights(arch):
    model = tiny_moe(arch)
    pk.apply_pica(model, _config(), progress=False)
    _randomize(model)
    ids = _ids()
    y = model(ids).logits
    pk.merge_and_unload(model)
    assert not list(expert_layers(model)) and not hasattr(model, "pica_bank")
    assert type(model.model.layers[0].mlp.experts).__name__.endswith("Experts")
    _assert_close(model(ids).logits, y)


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("share_experts", [True, False])
def test_lowrank_forward_equals_the_materialised_delta_on_fresh_inputs(side, share_experts):
    model = tiny_moe("olmoe", dtype=torch.float64)
    ref = copy.deepcopy(model)
    pk.apply_pica(model, _config(side=side, share_experts=share_experts), progress=False)
    _randomize(model, scale=0.3)
    # The reference: every weight plus its ΔW from reference.delta_weight (per expert for fused weights).
    with torch.no_grad():
        for name, layer in expert_layers(model):
            experts = ref.get_submodule(name)
            for role, (basis, m, s) in layer.tensors("default").items():
                r = layer.layout.role(role)
                w = core_experts.role_weight(getattr(experts, r.param), r)
                for e in range(E):
                    w[e] += reference.delta_weight(basis[e], m[e] if m.dim() == 3 else m, s)
        for name, module in model.named_modules():
            if isinstance(module, pk.PiCaLinear):
                ref.get_submodule(name).weight += reference.delta_weight(module.basis(), module.m(), side)
    for seed in (11, 12):
        ids = _ids(seed, batch=3, seq=5)
        _assert_close(model(ids).logits, ref(ids).logits, torch.float64)


# ----------------------------------------------------------------------------------------------- adapter state
def test_disable_set_adapter_delete_and_mixed_batch():
    model = tiny_moe("mixtral")
    base_model = copy.deepcopy(model)
    pk.apply_pica(model, _config(), progress=False)
    pk.apply_pica(model, _config(target_modules=["experts"]), adapter_name="b", progress=False)
    _randomize(model)
    ids = _ids(batch=3)
    base = base_model(ids).logits
    y_a = model(ids).logits
    pk.set_adapter(model, "b")
    y_b = model(ids).logits
    assert not torch.allclose(y_a, y_b)
    set_disabled(model, True)
    assert torch.equal(model(ids).logits, base)
    set_disabled(model, False)
    with pk.disable_adapter(model):
        assert torch.equal(model(ids).logits, base)
    # One adapter per sequence: each row as in a batch of its own adapter.
    with pk.mixed_batch(model, ["default", "__base__", "b"]):
        mixed = model(ids).logits
    _assert_close(mixed[0], y_a[0])
    _assert_close(mixed[1], base[1])
    _assert_close(mixed[2], y_b[2])
    pk.delete_adapter(model, "b")
    layer = model.model.layers[0].mlp.experts
    assert list(layer.adapters) == ["default"] and "b" not in model.pica_bank
    assert torch.equal(model(ids).logits, y_a)


def test_adapter_of_the_experts_only_is_disabled_by_the_context():
    model = tiny_moe("mixtral")
    base = copy.deepcopy(model)(_ids()).logits
    pk.apply_pica(model, _config(target_modules=["experts"]), progress=False)
    _randomize(model)
    with pk.disable_adapter(model):
        assert torch.equal(model(_ids()).logits, base)


def test_backward_through_merged_experts_says_why():
    model = tiny_moe("mixtral")
    pk.apply_pica(model, _config(target_modules=["experts"]), progress=False)
    pk.merge(model)
    model.train()
    with pytest.raises(RuntimeError, match=r"adapter 'default' is merged into the base weights"):
        model(_ids(), labels=_ids()).loss.backward()


def test_targets_select_roles_by_pseudo_layer_parameter_or_module():
    model = tiny_moe("mixtral")
    pk.apply_pica(model, pk.PiCaConfig(rank=RANK, target_modules=["gate_up_proj"]), progress=False)
    assert set(model.model.layers[1].mlp.experts.adapters["default"]) == {"gate_proj", "up_proj"}
    model = tiny_moe("mixtral")
    pk.apply_pica(model, pk.PiCaConfig(rank=RANK, target_modules=["down_proj"],
                                       rank_pattern={"model.layers.1.mlp.experts.down_proj": 2}), progress=False)
    assert set(model.model.layers[0].mlp.experts.adapters["default"]) == {"down_proj"}
    assert model.model.layers[1].mlp.experts.basis("down_proj", "default").shape == (E, 2, FFN)
    groups = {g.key for g in parameter_report(model).groups}
    assert groups == {f"mlp-experts-down_proj-{HIDDEN}x{FFN}", f"mlp-experts-down_proj-{HIDDEN}x{FFN}-r2"}
    model = tiny_moe("mixtral")
    pk.apply_pica(model, pk.PiCaConfig(rank=RANK, target_modules="all-linear", exclude=["gate_proj"]),
                  progress=False)
    assert set(model.model.layers[0].mlp.experts.adapters["default"]) == {"up_proj", "down_proj"}


# ----------------------------------------------------------------------------------------------- refusals
def _transposed_experts(model):
    """Mark every experts module as transposed (as gpt-oss stores them): a layout PiCa does not adapt."""
    for layer in model.model.layers:
        layer.mlp.experts.is_transposed = True


def test_unsupported_layout_is_an_error_where_targeted_and_left_out_under_all_linear():
    model = tiny_moe("mixtral")
    _transposed_experts(model)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(core_experts.UnsupportedExpertsError,
                       match=r"experts module 'model.layers.0.mlp.experts' \(MixtralExperts\): is_transposed=True"):
        pk.apply_pica(model, _config(), progress=False)
    assert model.state_dict().keys() == before.keys() and not hasattr(model, "pica_bank")
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in model.parameters())
    with pytest.warns(UserWarning, match=r"leaves out 2 module\(s\) with fused 3-D expert weights \(mlp.experts\), "
                                         rf"{100 * experts / total:.1f}% of the model's parameters: their layout"):
        pk.apply_pica(model, pk.PiCaConfig(rank=2, target_modules="all-linear", exclude=["gate"]), progress=False)
    report = parameter_report(model)
    assert report.left_out == {f"model.layers.{i}.mlp.experts": experts // 2 for i in range(2)}
    assert "not adapted: 2 fused expert module(s) (mlp.experts)" in str(report)


def test_share_experts_is_checked_at_the_config():
    with pytest.raises(PiCaConfigError, match=r"share_experts must be a bool"):
        pk.PiCaConfig(share_experts="no")


def test_load_refuses_other_expert_weights_and_a_changed_layout(tmp_path):
    model = tiny_moe("mixtral")
    pk.apply_pica(model, _config(target_modules=["experts"]), progress=False)
    _randomize(model)
    save_adapter(model, tmp_path / "a")
    other = tiny_moe("mixtral", seed=5)
    with pytest.raises(AdapterMismatchError, match=r"base model: layer 'model.layers.0.mlp.experts.gate_proj' weight"):
        load_adapter(other, tmp_path / "a", progress=False)
    assert not hasattr(other, "pica_bank")
    moved = tiny_moe("mixtral")
    _transposed_experts(moved)
    with pytest.raises(AdapterMismatchError, match=r"layers\['model.layers.0.mlp.experts.gate_proj'\].experts: "
                                                   r"experts module .* is_transposed=True"):
        load_adapter(moved, tmp_path / "a", progress=False)


def _edit(path, edit_meta=None, edit_tensors=None) -> None:
    """Edit an adapter's JSON and / or tensors, then make the pair self-consistent again (checksums)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from pica_kernels.core.files import file_sha256, json_checksum

    meta = json.loads((path / "pica_config.json").read_text())
    file = path / "pica_adapter.safetensors"
    tensors = load_file(file)
    with safe_open(file, "pt") as f:
        metadata = f.metadata()
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    sha = json_checksum(meta)
    save_file(tensors, file, metadata={**metadata, "config_sha256": sha})
    meta["json_sha256"], meta["tensors_sha256"] = sha, file_sha256(file)
    (path / "pica_config.json").write_text(json.dumps(meta))


def test_a_drifted_expert_basis_is_refused(tmp_path):
    model = tiny_moe("mixtral")
    pk.apply_pica(model, _config(target_modules=["experts"], store_bases=True), progress=False)
    save_adapter(model, tmp_path / "a")

    def flip(tensors):
        tensors["basis.model.layers.1.mlp.experts.down_proj"][2] *= -1  # expert 2's basis flipped

    _edit(tmp_path / "a", edit_tensors=flip)
    fresh = tiny_moe("mixtral")
    with pytest.raises(AdapterMismatchError, match=r"layer 'model.layers.1.mlp.experts.down_proj\[expert 2\]'"):
        load_adapter(fresh, tmp_path / "a", progress=False)
    assert not hasattr(fresh, "pica_bank") and not list(expert_layers(fresh))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["layers"]["model.layers.0.mlp.experts.up_proj"]["experts"].update(rows=[0, FFN]),
     r"layers\['model.layers.0.mlp.experts.up_proj'\].experts: the file has 4 experts with the role in rows "
     r"\[0, 24\] of 'gate_up_proj', this model 4 in rows \[24, 48\]"),
    (lambda m: m["layers"]["model.layers.0.mlp.experts.up_proj"]["experts"].update(per_expert_m=True),
     r"per_expert_m=True with 4 experts, its group records experts=None"),
    (lambda m: m["layers"]["model.layers.0.mlp.experts.up_proj"]["experts"].update(role="gate_proj"),
     r"it records module 'model.layers.0.mlp.experts' and role 'gate_proj'"),
    (lambda m: m["layers"]["model.layers.0.mlp.experts.up_proj"].pop("experts"),
     r"its fingerprint has shape \[4, 4, 4\], a dense layer's is \(r, 4\)"),
])
def test_an_edited_experts_record_is_refused(tmp_path, edit, message):
    model = tiny_moe("mixtral")
    pk.apply_pica(model, _config(target_modules=["experts"]), progress=False)
    save_adapter(model, tmp_path / "a")
    _edit(tmp_path / "a", edit_meta=edit)
    with pytest.raises(AdapterMismatchError, match=message):
        load_adapter(tiny_moe("mixtral"), tmp_path / "a", progress=False)


# ----------------------------------------------------------------------------------------------- basis cache
def test_a_second_load_runs_no_svd(tmp_path, monkeypatch):
    monkeypatch.setenv("PICA_KERNELS_CACHE", str(tmp_path / "cache"))
    from pica_kernels.core import bases as core_bases

    calls = []
    real = core_bases.truncated_svd

    def counting(weight, *a, **k):
        calls.append(tuple(weight.shape))
        return real(weight, *a, **k)

    monkeypatch.setattr(core_bases, "truncated_svd", counting)
    first = tiny_moe("olmoe")
    pk.apply_pica(first, _config(), progress=False)
    assert any(shape[0] == LAYERS * E for shape in calls)  # the experts of every layer in one batched call
    calls.clear()
    cache.reset_stats()
    second = tiny_moe("olmoe")
    pk.apply_pica(second, _config(), progress=False)
    assert calls == [] and cache.stats()["hits"] > 0
    for (_, a), (_, b) in zip(expert_layers(first), expert_layers(second)):
        assert torch.equal(a.basis("up_proj", "default"), b.basis("up_proj", "default"))


def test_experts_layer_is_a_module_of_the_model():
    model = tiny_moe("mixtral")
    pk.apply_pica(model, _config(), progress=False)
    layer = model.model.layers[0].mlp.experts
    assert isinstance(layer, PiCaExperts) and "experts=4" in repr(layer)
    # M registered once, by the bank; bases are non-persistent buffers, the base weights keep their keys.
    keys = model.state_dict().keys()
    assert "model.layers.0.mlp.experts.base_layer.gate_up_proj" in keys
    assert not any("basis" in k for k in keys)
    assert sum(1 for k in keys if k.startswith("pica_bank.default.mlp-experts")) == 3


def test_a_meta_model_gets_shapes_and_counts_without_svd():
    import transformers as tf

    cfg = tiny_moe("mixtral").config
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    pk.apply_pica(model, _config(), progress=False)
    assert parameter_report(model).trainable == RANK * (HIDDEN + 16 + 16 + HIDDEN) + RANK * (FFN + FFN + HIDDEN)
    assert model.model.layers[0].mlp.experts.basis("gate_proj", "default").device.type == "meta"


def test_an_interrupted_apply_leaves_the_model_as_it_was(monkeypatch):
    model = tiny_moe("mixtral")
    pk.apply_pica(model, _config(), progress=False)
    _randomize(model)
    ids = _ids()
    y = model(ids).logits
    keys = list(model.state_dict())
    tree = [(n, type(m)) for n, m in model.named_modules()]
    real = PiCaExperts._add_structure
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second experts module: the first is edited already
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PiCaExperts, "_add_structure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pk.apply_pica(model, _config(target_modules=["experts"]), adapter_name="b", progress=False)
    assert list(model.state_dict()) == keys and [(n, type(m)) for n, m in model.named_modules()] == tree
    assert all(list(layer.adapters) == ["default"] for _, layer in expert_layers(model))
    assert "b" not in model.pica_bank and adapter_state(model).adapters == ("default",)
    assert not any(n.startswith("basis_") and "b" in n for n, _ in model.named_buffers())
    assert torch.equal(model(ids).logits, y)


def test_autocast_bf16_follows_the_fp32_model_and_keeps_fp32_m_gradients():
    model = tiny_moe("mixtral")
    pk.apply_pica(model, _config(), progress=False)
    _randomize(model)
    ids = _ids()
    y = model(ids).logits
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    _assert_close(out.logits.float(), y, torch.bfloat16)
    out.loss.backward()
    ms = {n: p for n, p in model.named_parameters() if p.requires_grad and "experts" in n}
    assert len(ms) == 3
    for n, p in ms.items():
        assert p.dtype == p.grad.dtype == torch.float32 and bool(p.grad.abs().sum() > 0), n
