"""apply_pica: targets, groups and the shared M, counts on the meta device, adapters, merge."""

import copy

import pytest
import torch
from conftest import randomize_m, tiny_model
from torch import nn

import pica_kernels as pk
from pica_kernels.core.defaults import DEFAULT_TARGETS
from pica_kernels.core.targets import group_key, role_of
from pica_kernels.native.apply import find_targets, pica_layers
from pica_kernels.native.layer import PiCaLinear

TOKENS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))


def _logits(model):
    return model(TOKENS).logits


def test_role_and_group_key():
    assert role_of("model.layers.12.self_attn.q_proj") == "self_attn.q_proj"
    assert role_of("encoder.layer.0.attention.self.query") == "attention.self.query"
    assert role_of("lm_head") == "lm_head"
    assert role_of("blocks.3") == "blocks"
    assert group_key("model.layers.3.mlp.up_proj", 80, 48, share=True) == "mlp-up_proj-80x48"
    assert group_key("model.layers.3.mlp.up_proj", 80, 48, share=False) == "model-layers-3-mlp-up_proj-80x48"


def test_apply_replaces_targets_freezes_the_rest_and_keeps_output(tiny_llama):
    before = _logits(tiny_llama)
    pk.apply_pica(tiny_llama, pk.PiCaConfig(rank=4), progress=False)
    names = [n for n, _ in pica_layers(tiny_llama)]
    assert len(names) == 15 and all(n.split(".")[-1] in DEFAULT_TARGETS for n in names)
    assert isinstance(tiny_llama.model.layers[0].self_attn.o_proj, nn.Linear)  # not targeted
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable == {f"pica_bank.default.{k}" for k in
                         ["self_attn-q_proj-48x48", "self_attn-k_proj-24x48", "self_attn-v_proj-24x48",
                          "mlp-up_proj-80x48", "mlp-down_proj-48x80"]}
    assert torch.equal(_logits(tiny_llama), before)


def test_shared_m_is_held_once(tiny_llama):
    pk.apply_pica(tiny_llama, pk.PiCaConfig(rank=4), progress=False)
    sd_keys = [k for k in tiny_llama.state_dict() if "pica_bank" in k]
    assert len(sd_keys) == 5  # one per group, not one per layer
    assert not any("basis" in k for k in tiny_llama.state_dict())  # bases are derived, not state
    q0 = tiny_llama.model.layers[0].self_attn.q_proj
    q2 = tiny_llama.model.layers[2].self_attn.q_proj
    assert q0.m() is q2.m()
    assert not any("pica_bank" in n for n, _ in q0.named_parameters())  # layers only reference the bank
    assert q0.basis() is not q2.basis() and not torch.equal(q0.basis(), q2.basis())


def test_shared_m_gradient_is_sum_of_per_layer_gradients():
    shared = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4), progress=False)
    per_layer = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4, share=False), progress=False)
    assert len(list(per_layer.pica_bank.parameters())) == 15
    randomize_m(shared)
    with torch.no_grad():  # give each per-layer M the value of its group's shared M
        for name, layer in pica_layers(per_layer):
            layer.m().copy_(shared.get_submodule(name).m())
    _logits(shared).square().mean().backward()
    _logits(per_layer).square().mean().backward()
    for _, layer in pica_layers(shared):
        group = layer.adapters["default"].group
        members = [per_layer.get_submodule(n).m().grad for n, lay in pica_layers(shared)
                   if lay.adapters["default"].group == group]
        assert len(members) == 3
        torch.testing.assert_close(layer.m().grad, sum(members), atol=1e-6, rtol=1e-5)


class _TwoShapes(nn.Module):
    """Same role ("proj") at two shapes: must become two groups."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(12, 8)])

    def forward(self, x):
        return self.layers[0](x) + self.layers[1](x) + self.layers[2](x[..., :12])


def test_same_role_different_shapes_are_two_groups():
    model = pk.apply_pica(_TwoShapes(), pk.PiCaConfig(rank=2, target_modules=r"layers\.\d+"), progress=False)
    report = pk.parameter_report(model)
    assert {(g.role, g.weight_shape, len(g.layers)) for g in report.groups} == {("layers", (8, 16), 2), ("layers", (8, 12), 1)}
    assert report.trainable == 8 * 2 * 2


def test_target_forms(tiny_llama):
    cfg = pk.PiCaConfig(rank=2, target_modules="all-linear")
    names = [n for n, _ in find_targets(tiny_llama, cfg)]
    assert len(names) == 21 and "lm_head" not in names
    cfg = pk.PiCaConfig(rank=2, target_modules=r"model\.layers\.[01]\.mlp\.(up|down)_proj")
    assert [n for n, _ in find_targets(tiny_llama, cfg)] == [
        "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    cfg = pk.PiCaConfig(rank=2, target_modules=["self_attn.q_proj"], exclude=r"model\.layers\.0\..*")
    assert [n for n, _ in find_targets(tiny_llama, cfg)] == [
        "model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]


def test_unknown_target_is_an_error(tiny_llama):
    with pytest.raises(ValueError, match=r"target module 'qkv_proj' matches no module of LlamaForCausalLM.*"
                                         r"named like \['self_attn.q_proj', 'self_attn.k_proj'"):
        pk.apply_pica(tiny_llama, pk.PiCaConfig(rank=2, target_modules=["q_proj", "qkv_proj"]))
    assert not hasattr(tiny_llama, "pica_bank")  # nothing applied
    with pytest.raises(ValueError, match="matches no linear layer"):
        pk.apply_pica(tiny_llama, pk.PiCaConfig(rank=2, target_modules=r"nothing\.here"))


def test_non_linear_target_is_an_error(tiny_llama):
    with pytest.raises(TypeError, match="target module 'model.embed_tokens' is a Embedding"):
        pk.apply_pica(tiny_llama, pk.PiCaConfig(rank=2, target_modules=["embed_tokens"]))


def test_rank_larger_than_a_layer_allows(tiny_llama):
    with pytest.raises(ValueError, match=r"rank=30 is larger than min\(out, in\) = 24 of layer "
                                         r"'model.layers.0.self_attn.k_proj'"):
        pk.apply_pica(tiny_llama, pk.PiCaConfig(rank=30))
    assert not hasattr(tiny_llama, "pica_bank")


@pytest.mark.parametrize("bad", [dict(rank=0), dict(side="left"), dict(svd_method="magic"),
                                 dict(m_dtype="int8"), dict(target_modules=[])])
def test_bad_config(bad):
    with pytest.raises(ValueError):
        pk.PiCaConfig(**bad)


# The paper's parameter counts (docs/results/param_counts.md), from transformers' config classes on the meta device.
GEMMA_2B = dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                num_attention_heads=8, num_key_value_heads=1, head_dim=256)
GEMMA_7B = dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=16, head_dim=256)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8)
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("arch, cfg, rank, targets, trainable, bases", [
    ("gemma", GEMMA_2B, 256, None, 5_373_952, 113_246_208),
    ("gemma", GEMMA_2B, 32, None, 671_744, None),
    ("gemma", GEMMA_7B, 256, None, 10_223_616, None),
    ("gemma", GEMMA_7B, 128, None, 5_111_808, None),
    ("gemma", GEMMA_7B, 16, None, 638_976, None),
    ("llama", LLAMA3_8B, 256, ALL_SEVEN, 11_010_048, None),
    ("llama", LLAMA3_8B, 32, ALL_SEVEN, 1_376_256, None),
])
def test_paper_parameter_counts_on_meta_device(arch, cfg, rank, targets, trainable, bases):
    import transformers as tf

    config_cls = tf.GemmaConfig if arch == "gemma" else tf.LlamaConfig
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config_cls(**cfg))
    kwargs = {"target_modules": targets} if targets else {}
    pk.apply_pica(model, pk.PiCaConfig(rank=rank, **kwargs), progress=False)
    report = pk.parameter_report(model)
    assert report.trainable == trainable
    if bases is not None:
        assert report.frozen_bases == bases
    assert f"{trainable:,}" in str(report)


def _single_adapter_logits(config, m_values):
    """Logits of a fresh tiny Llama with one adapter of ``config`` whose M are ``m_values`` (by group)."""
    ref = pk.apply_pica(tiny_model("llama"), config, progress=False)
    with torch.no_grad():
        for key, p in ref.pica_bank["default"].items():
            p.copy_(m_values[key])
    return _logits(ref)


def test_multiple_adapters(tiny_llama):
    base = _logits(tiny_llama)
    cfg_a, cfg_c = pk.PiCaConfig(rank=4), pk.PiCaConfig(rank=2, target_modules=["o_proj"])
    pk.apply_pica(tiny_llama, cfg_a, progress=False)
    randomize_m(tiny_llama, seed=1)
    y_a = _logits(tiny_llama)
    pk.apply_pica(tiny_llama, pk.PiCaConfig(rank=4), adapter_name="b", progress=False)
    pk.apply_pica(tiny_llama, cfg_c, adapter_name="c", progress=False)
    with torch.no_grad():
        for p in tiny_llama.pica_bank["b"].parameters():
            p.normal_(0, 0.05)
        for p in tiny_llama.pica_bank["c"].parameters():
            p.normal_(0, 0.05)
    bank = {name: {k: p.detach().clone() for k, p in tiny_llama.pica_bank[name].items()} for name in "bc"}
    assert torch.equal(_logits(tiny_llama), y_a)  # added adapters start inactive
    q = tiny_llama.model.layers[0].self_attn.q_proj
    assert q.basis("b") is q.basis("default")  # same side and rank share the basis
    pk.set_adapter(tiny_llama, "b")
    y_b = _logits(tiny_llama)
    # Values, not only "outputs differ": each adapter gives what it gives alone on a fresh base model.
    torch.testing.assert_close(y_b, _single_adapter_logits(cfg_a, bank["b"]), atol=1e-6, rtol=1e-6)
    pk.set_adapter(tiny_llama, "c")  # adapts o_proj only; other layers give their base output
    y_c = _logits(tiny_llama)
    torch.testing.assert_close(y_c, _single_adapter_logits(cfg_c, bank["c"]), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(y_c, base)
    pk.set_adapter(tiny_llama, "b")
    with pk.disable_adapter(tiny_llama):
        assert torch.equal(_logits(tiny_llama), base)
    pk.merge(tiny_llama)
    with pk.disable_adapter(tiny_llama):  # also exact while merged
        assert torch.equal(_logits(tiny_llama), base)
    torch.testing.assert_close(_logits(tiny_llama), y_b, atol=1e-5, rtol=1e-5)
    pk.unmerge(tiny_llama)
    pk.delete_adapter(tiny_llama, "b")
    assert set(tiny_llama.pica_bank.configs) == {"default", "c"}
    assert pk.native.model.active_adapter(tiny_llama) == "default"  # fell back to a remaining adapter
    assert torch.equal(_logits(tiny_llama), y_a)
    assert "b" not in tiny_llama.pica_bank
    with pytest.raises(KeyError, match="unknown adapter 'b'"):
        pk.set_adapter(tiny_llama, "b")
    with pytest.raises(ValueError, match="already has an adapter named 'c'"):
        pk.apply_pica(tiny_llama, pk.PiCaConfig(rank=2, target_modules=["o_proj"]), adapter_name="c")


def test_merge_unmerge_merge_and_unload(tiny_llama):
    pk.apply_pica(tiny_llama, pk.PiCaConfig(rank=4), progress=False)
    randomize_m(tiny_llama)
    originals = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    y = _logits(tiny_llama)
    pk.merge(tiny_llama)
    torch.testing.assert_close(_logits(tiny_llama), y, atol=1e-5, rtol=1e-5)
    pk.unmerge(tiny_llama)
    assert all(torch.equal(p, originals[n]) for n, p in tiny_llama.named_parameters())
    plain = pk.merge_and_unload(tiny_llama)
    assert not any(isinstance(m, PiCaLinear) for m in plain.modules())
    assert not hasattr(plain, "pica_bank") and not any("pica" in k or "base_layer" in k for k in plain.state_dict())
    torch.testing.assert_close(_logits(plain), y, atol=1e-5, rtol=1e-5)


def test_dtype_move_keeps_sharing_and_deepcopy(tiny_llama):
    pk.apply_pica(tiny_llama, pk.PiCaConfig(rank=4), progress=False)
    randomize_m(tiny_llama)
    y = _logits(tiny_llama)
    clone = copy.deepcopy(tiny_llama)
    assert torch.equal(_logits(clone), y)
    clone.model.layers[0].self_attn.q_proj.m().data.zero_()  # the copy's bank is its own
    assert torch.equal(_logits(tiny_llama), y)
    tiny_llama.to(torch.float64)
    q0, q1 = tiny_llama.model.layers[0].self_attn.q_proj, tiny_llama.model.layers[1].self_attn.q_proj
    assert q0.m() is q1.m() and q0.m().dtype == torch.float64 and q0.basis().dtype == torch.float64
    torch.testing.assert_close(_logits(tiny_llama).float(), y, atol=1e-4, rtol=1e-4)
