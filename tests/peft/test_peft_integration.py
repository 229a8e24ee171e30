"""PiCa as a PEFT method, against the installed PEFT: the tuner contract of docs/peft.md ("What is where").

Tiny Llama with 3 decoder layers: every (role, shape) group is shared by three
layers, so each test of "M stays shared" has several layers to break.
"""

from __future__ import annotations

import importlib
import json
import warnings

import pytest
import torch
from conftest import tiny_model
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType
from safetensors.torch import load_file
from torch import nn

import pica_kernels.peft as pp
from pica_kernels import AdapterMismatchError
from pica_kernels.peft import PiCaPeftConfig, PiCaPeftLinear, PiCaPeftModel
from pica_kernels.peft.model import BASE_IDENTITY_KEY

N_LAYERS = 3
GROUPS = {  # group key -> M shape (input side, r=4): (out, r)
    "self_attn-q_proj-48x48": (48, 4),
    "self_attn-k_proj-24x48": (24, 4),
    "self_attn-v_proj-24x48": (24, 4),
    "mlp-up_proj-80x48": (80, 4),
    "mlp-down_proj-48x80": (48, 4),
}


def _ids(seed: int = 1, batch: int = 3) -> torch.Tensor:
    return torch.randint(0, 97, (batch, 9), generator=torch.Generator().manual_seed(seed))


def _pica_model(r: int = 4, adapter_name: str = "default", **kw) -> PeftModel:
    return get_peft_model(tiny_model("llama"), PiCaPeftConfig(r=r, **kw), adapter_name=adapter_name)


def _randomize(model: PeftModel, adapter: str = "default", seed: int = 3, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.base_model.pica_M[adapter].values():
            m.copy_(torch.randn(m.shape, generator=gen, dtype=torch.float64).to(m.dtype) * scale)


def _layers(model: nn.Module) -> list[tuple[str, PiCaPeftLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PiCaPeftLinear)]


def _logits(model: nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def _assert_m_shared(model: PeftModel, adapter: str = "default") -> None:
    """One Parameter per group, held by the tuner, referenced (not copied) by every layer of the group."""
    store = model.base_model.pica_M[adapter]
    assert sorted(store.keys()) == sorted(GROUPS)
    per_group: dict[str, list[PiCaPeftLinear]] = {}
    for _, layer in _layers(model):
        per_group.setdefault(layer.pica_group[adapter], []).append(layer)
    assert {g: len(v) for g, v in per_group.items()} == {g: N_LAYERS for g in GROUPS}
    for group, layers in per_group.items():
        for layer in layers:
            assert layer.get_m(adapter) is store[group]
            assert layer.pica_M[adapter] is store[group]
    ids = {id(p) for n, p in model.named_parameters() if ".pica_M." in n and f".{adapter}." in n}
    assert ids == {id(p) for p in store.values()}


# --------------------------------------------------------------- registration
def test_peft_type_member_and_registration():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    member = PeftType.PICA
    assert isinstance(member, PeftType) and member.value == "PICA" and member.name == "PICA"
    assert PeftType("PICA") is member and PeftType["PICA"] is member and "PICA" in list(PeftType)
    assert json.dumps(member) == '"PICA"'
    assert PEFT_TYPE_TO_CONFIG_MAPPING["PICA"] is PiCaPeftConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is PiCaPeftModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "pica_"
    n_members = len(PeftType)
    pp.register()  # idempotent
    pp.ensure_peft_type()
    importlib.reload(importlib.import_module("pica_kernels.peft._register")).register()
    assert len(PeftType) == n_members and PeftType.PICA is member
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member].__name__ == "PiCaPeftConfig"
    assert PiCaPeftConfig(r=4).peft_type is member


# ------------------------------------------------------------------- contract
def test_init_is_base_and_prefix_names_only_adapter_params():
    base = tiny_model("llama")
    ids = _ids()
    ref = _logits(base, ids)
    model = get_peft_model(base, PiCaPeftConfig(r=4))
    assert torch.equal(_logits(model, ids), ref)  # M = 0: exactly the base model
    assert len(_layers(model)) == 5 * N_LAYERS
    for _, layer in _layers(model):
        assert isinstance(layer.base_layer, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_prefix = {n for n, _ in model.named_parameters() if "pica_" in n}
    assert trainable == with_prefix == {f"base_model.pica_M.default.{g}" for g in GROUPS}
    n_trainable, _ = model.get_nb_trainable_parameters()
    assert n_trainable == sum(a * b for a, b in GROUPS.values())
    _assert_m_shared(model)
    status = model.get_layer_status()
    assert all(s.requires_grad == {"default": True} for s in status)
    assert all(s.available_adapters == ["default"] for s in status)


def test_forward_and_shared_gradient_match_reference():
    model = _pica_model()
    _randomize(model)
    ids = _ids()
    out = model(input_ids=ids).logits
    assert not torch.allclose(out, tiny_model("llama")(input_ids=ids).logits, atol=1e-4)
    out.square().mean().backward()
    store = model.base_model.pica_M["default"]
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in store.values())
    assert all(p.grad is None for n, p in model.named_parameters() if "pica_M" not in n)
    # The gradient of a shared M is the sum over its layers: M repeated per layer gives the same output and grads.
    unshared = get_peft_model(tiny_model("llama"), PiCaPeftConfig(r=4, share_m=False))
    with torch.no_grad():
        for _, layer in _layers(unshared):
            layer.get_m("default").copy_(store[_shared_key(layer)])
    out2 = unshared(input_ids=ids).logits
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)
    out2.square().mean().backward()
    sums: dict[str, torch.Tensor] = {}
    for _, layer in _layers(unshared):
        g = layer.get_m("default").grad
        sums[_shared_key(layer)] = sums.get(_shared_key(layer), 0) + g
    for key, m in store.items():
        torch.testing.assert_close(m.grad, sums[key], atol=1e-6, rtol=1e-5)


def _shared_key(layer: PiCaPeftLinear) -> str:
    """Group key a layer of an unshared model would have with share_m=True."""
    key = layer.pica_group["default"]  # model-layers-<i>-<role>-<shape>
    parts = key.split("-")
    return "-".join(parts[3:])


def test_disable_adapter_is_exact_base_also_while_merged():
    model = _pica_model()
    _randomize(model)
    ids = _ids()
    base_ref = _logits(tiny_model("llama"), ids)
    adapted = _logits(model, ids)
    with model.disable_adapter():
        assert torch.equal(_logits(model, ids), base_ref)
    torch.testing.assert_close(_logits(model, ids), adapted, atol=0, rtol=0)
    model.merge_adapter()
    assert all(layer.merged for _, layer in _layers(model))
    torch.testing.assert_close(_logits(model, ids), adapted, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        assert torch.equal(_logits(model, ids), base_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_fp32_round_once_and_unmerge_bit_exact(dtype):
    model = _pica_model()
    model.to(dtype)
    _randomize(model)
    originals = {n: layer.base_layer.weight.detach().clone() for n, layer in _layers(model)}
    expected = {
        n: (originals[n].float() + layer.get_delta_weight("default").float()).to(dtype) for n, layer in _layers(model)
    }
    model.merge_adapter()
    for n, layer in _layers(model):
        assert torch.equal(layer.base_layer.weight, expected[n])
        assert "pica_original_weight" not in model.state_dict()
    model.unmerge_adapter()
    for n, layer in _layers(model):
        assert torch.equal(layer.base_layer.weight, originals[n])
        assert not layer.merged


def test_safe_merge_raises_on_nan_and_leaves_weights():
    model = _pica_model()
    w0 = {n: layer.base_layer.weight.clone() for n, layer in _layers(model)}
    with torch.no_grad():
        model.base_model.pica_M["default"]["self_attn-q_proj-48x48"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    for n, layer in _layers(model):
        if "q_proj" in n:
            assert torch.equal(layer.base_layer.weight, w0[n])


def test_merge_and_unload_gives_plain_model():
    model = _pica_model()
    _randomize(model)
    ids = _ids()
    adapted = _logits(model, ids)
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, PiCaPeftLinear) for m in merged.modules())
    assert not any("pica" in n for n in merged.state_dict())
    torch.testing.assert_close(_logits(merged, ids), adapted, atol=1e-5, rtol=1e-5)


def test_add_set_delete_adapter_and_lazy_shared_state():
    model = _pica_model()
    _randomize(model, "default")
    ids = _ids()
    out_a = _logits(model, ids)
    model.add_adapter("other", PiCaPeftConfig(r=4))
    # Added adapter: its M exist on the tuner (created lazily; the injection hook ran only for "default"), inactive.
    _assert_m_shared(model, "other")
    assert model.active_adapters == ["default"]
    assert all(not m.requires_grad for m in model.base_model.pica_M["other"].values())
    assert all(m.requires_grad for m in model.base_model.pica_M["default"].values())
    assert torch.equal(_logits(model, ids), out_a)
    # Bases of equal side/rank/SVD settings are one tensor, not recomputed per adapter.
    for _, layer in _layers(model):
        assert layer.pica_basis["other"].data_ptr() == layer.pica_basis["default"].data_ptr()
    _randomize(model, "other", seed=7)
    model.set_adapter("other")
    out_b = _logits(model, ids)
    assert not torch.allclose(out_b, out_a)
    assert all(m.requires_grad for m in model.base_model.pica_M["other"].values())
    assert all(not m.requires_grad for m in model.base_model.pica_M["default"].values())
    # Deleting the active adapter falls back to the remaining one and cleans the tuner-held M.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.delete_adapter("other")
    assert model.active_adapters == ["default"]
    assert list(model.base_model.pica_M.keys()) == ["default"]
    assert not any(".other" in k for k in model.state_dict())
    assert all("other" not in layer.pica_basis and "other" not in layer.pica_group for _, layer in _layers(model))
    assert torch.equal(_logits(model, ids), out_a)
    assert all(m.requires_grad for m in model.base_model.pica_M["default"].values())


def test_delete_merged_adapter_refused():
    model = _pica_model()
    model.add_adapter("other", PiCaPeftConfig(r=4))
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model.delete_adapter("default")


# ----------------------------------------------------------------- save/load
def test_save_load_round_trip_m_stored_once(tmp_path):
    model = _pica_model()
    _randomize(model)
    ids = _ids()
    adapted = _logits(model, ids)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    m_keys = {k for k in tensors if ".pica_M." in k}
    assert m_keys == {f"base_model.pica_M.{g}" for g in GROUPS}  # once per group, never per layer
    for g, shape in GROUPS.items():
        assert tuple(tensors[f"base_model.pica_M.{g}"].shape) == shape
    fps = [k for k in tensors if k.endswith(".pica_fingerprint")]
    assert len(fps) == 5 * N_LAYERS
    assert set(tensors) == m_keys | set(fps) | {BASE_IDENTITY_KEY}  # bases are not stored by default
    cfg = PeftConfig.from_pretrained(tmp_path)
    assert type(cfg) is PiCaPeftConfig and cfg.peft_type is PeftType.PICA and cfg.r == 4
    assert cfg.svd_method is not None  # the concrete SVD method was recorded
    # Reload under another global seed: bases are recomputed deterministically.
    torch.manual_seed(12345)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert isinstance(loaded.base_model, PiCaPeftModel)
    assert torch.equal(_logits(loaded, ids), adapted)
    _assert_m_shared(loaded)
    assert all(not p.requires_grad for p in loaded.parameters())  # inference mode by default
    for (_, a), (_, b) in zip(_layers(model), _layers(loaded)):
        assert torch.equal(a.pica_basis["default"], b.pica_basis["default"])


def test_bases_identical_under_another_seed():
    torch.manual_seed(1)
    a = _pica_model(r=6)
    torch.manual_seed(999)
    _ = torch.randn(100)
    b = _pica_model(r=6)
    for (_, la), (_, lb) in zip(_layers(a), _layers(b)):
        assert torch.equal(la.pica_basis["default"], lb.pica_basis["default"])


def test_store_bases_saves_them_and_reloads_exactly(tmp_path):
    model = _pica_model(store_bases=True)
    _randomize(model)
    ids = _ids()
    adapted = _logits(model, ids)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    bases = {k: v for k, v in tensors.items() if k.endswith(".pica_basis")}
    assert len(bases) == 5 * N_LAYERS and not any(k.endswith("fingerprint") for k in tensors)
    for name, layer in _layers(model):
        assert torch.equal(bases[f"base_model.model.{name.removeprefix('base_model.model.')}.pica_basis"],
                           layer.pica_basis["default"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    assert torch.equal(_logits(loaded, ids), adapted)


def test_drifted_basis_detected_on_load(tmp_path):
    model = _pica_model()
    model.save_pretrained(tmp_path)
    other_base = tiny_model("llama", seed=5)  # a different base model: other singular vectors
    with pytest.raises(AdapterMismatchError, match="differs"):
        PeftModel.from_pretrained(other_base, tmp_path)


def test_selected_adapters_and_load_second_adapter(tmp_path):
    model = _pica_model()
    _randomize(model, "default")
    model.add_adapter("other", PiCaPeftConfig(r=2, side="output"))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in model.base_model.pica_M["other"].values():
            m.copy_(torch.randn(m.shape, generator=gen) * 0.05)
    ids = _ids()
    out_default = _logits(model, ids)
    model.set_adapter("other")
    out_other = _logits(model, ids)
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    assert not (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()
    model.set_adapter("default")
    model.save_pretrained(tmp_path / "d", selected_adapters=["default"])
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "d")
    loaded.load_adapter(tmp_path / "other", adapter_name="task2")
    assert sorted(loaded.base_model.pica_M.keys()) == ["default", "task2"]
    assert torch.equal(_logits(loaded, ids), out_default)
    loaded.set_adapter("task2")
    assert torch.equal(_logits(loaded, ids), out_other)


# -------------------------------------------------------------------- dtypes
def test_autocast_adapter_dtype_keeps_m_shared():
    base = tiny_model("llama").to(torch.bfloat16)
    model = get_peft_model(base, PiCaPeftConfig(r=4))  # autocast_adapter_dtype=True
    assert all(m.dtype == torch.float32 for m in model.base_model.pica_M["default"].values())
    _assert_m_shared(model)
    for _, layer in _layers(model):
        assert layer.pica_basis["default"].dtype == torch.bfloat16  # frozen bases follow W
    model2 = get_peft_model(tiny_model("llama").to(torch.bfloat16), PiCaPeftConfig(r=4), autocast_adapter_dtype=False)
    assert all(m.dtype == torch.bfloat16 for m in model2.base_model.pica_M["default"].values())
    _assert_m_shared(model2)
    _randomize(model)
    out = model(input_ids=_ids()).logits
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(m.grad is not None and m.grad.dtype == torch.float32 for m in model.base_model.pica_M["default"].values())


def test_model_to_dtype_and_load_keep_m_shared(tmp_path):
    model = _pica_model()
    _randomize(model)
    model.to(torch.bfloat16)
    _assert_m_shared(model)
    assert all(m.dtype == torch.bfloat16 for m in model.base_model.pica_M["default"].values())
    model.to(torch.float32)
    _assert_m_shared(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama").to(torch.bfloat16), tmp_path, is_trainable=True)
    _assert_m_shared(loaded)
    assert all(m.dtype == torch.float32 and m.requires_grad for m in loaded.base_model.pica_M["default"].values())


# ------------------------------------------------------------ mixed batches
@pytest.mark.parametrize("side", ["input", "output"])
def test_mixed_adapter_batch_matches_per_adapter(side):
    model = _pica_model(side=side)
    _randomize(model, "default")
    model.add_adapter("b", PiCaPeftConfig(r=4, side=side))
    _randomize(model, "b", seed=9)
    model.eval()
    ids = _ids(batch=5)
    names = ["default", "b", "__base__", "b", "default"]
    mixed = _logits(model, ids, adapter_names=names)
    singles = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        singles[name] = _logits(model, ids)
    with model.disable_adapter():
        singles["__base__"] = _logits(model, ids)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], singles[name][i], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="non-existing"):
        _logits(model, ids, adapter_names=["nope"] * 5)


# ------------------------------------------------------------------- others
def test_modules_to_save_trained_and_saved(tmp_path):
    model = _pica_model(modules_to_save=["lm_head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save.default" in n for n in trainable)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    ids = _ids()
    out = _logits(model, ids)
    model.save_pretrained(tmp_path)
    assert any("lm_head" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert torch.equal(_logits(loaded, ids), out)


def test_gpt2_conv1d_fan_in_fan_out_round_trip(tmp_path):
    base = tiny_model("gpt2")
    ids = _ids()
    ref = _logits(base, ids)
    model = get_peft_model(base, PiCaPeftConfig(r=4, target_modules=["c_attn", "c_fc"]))
    assert model.peft_config["default"].fan_in_fan_out
    assert torch.equal(_logits(model, ids), ref)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.base_model.pica_M["default"].values():
            m.copy_(torch.randn(m.shape, generator=gen) * 0.05)
    adapted = _logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path)
    assert torch.equal(_logits(loaded, ids), adapted)
    w0 = {n: layer.base_layer.weight.clone() for n, layer in _layers(model)}
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, ids), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert all(torch.equal(layer.base_layer.weight, w0[n]) for n, layer in _layers(model))


def test_bad_targets_and_rank_raise():
    with pytest.raises(ValueError, match="r=64 is larger"):
        get_peft_model(tiny_model("llama"), PiCaPeftConfig(r=64))
    with pytest.raises(ValueError):
        get_peft_model(tiny_model("llama"), PiCaPeftConfig(r=4, target_modules=["no_such_proj"]))
    with pytest.raises(ValueError, match="side"):
        PiCaPeftConfig(side="left")


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_hf_gradient_checkpointing_gives_same_m_grads(use_reentrant):
    ids = _ids(batch=2)
    ref = _pica_model()
    _randomize(ref)
    ref.train()
    ref(input_ids=ids, labels=ids).loss.backward()
    base = tiny_model("llama")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model = get_peft_model(base, PiCaPeftConfig(r=4))
    _randomize(model)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for key, m in ref.base_model.pica_M["default"].items():
        got = model.base_model.pica_M["default"][key].grad
        assert got is not None
        torch.testing.assert_close(got, m.grad, atol=1e-7, rtol=1e-6)


def test_low_cpu_mem_usage_load_keeps_m_shared(tmp_path):
    model = _pica_model()
    _randomize(model)
    ids = _ids()
    adapted = _logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, low_cpu_mem_usage=True)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    _assert_m_shared(loaded)  # load_state_dict(assign=True) replaced the Parameters; layers look M up by key
    assert torch.equal(_logits(loaded, ids), adapted)


def test_all_linear_layers_to_transform_and_model_status():
    model = _pica_model(target_modules="all-linear")
    assert len(model.base_model.pica_M["default"]) == 7  # + o_proj, gate_proj; never lm_head
    assert not any("lm_head" in n for n, _ in _layers(model))
    status = model.get_model_status()
    assert status.peft_types == {"default": "PICA"} and status.num_adapter_layers == 7 * N_LAYERS
    assert status.requires_grad == {"default": True} and status.enabled is True
    some = _pica_model(layers_to_transform=[0, 2], layers_pattern="layers")
    assert {n.split(".layers.")[1].split(".")[0] for n, _ in _layers(some)} == {"0", "2"}
