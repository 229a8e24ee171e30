"""save_adapter / load_adapter: round trips, M once per group, and every mismatch as a clear error."""

import json

import pytest
import torch
from conftest import randomize_m, tiny_model
from safetensors.torch import load_file

import pica_kernels as pk
from pica_kernels.native.apply import pica_layers
from pica_kernels.native.files import CONFIG_FILE, TENSORS_FILE, AdapterMismatchError

TOKENS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def _trained(tmp_path, store_bases=False, side="input", **cfg):
    model = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4, side=side, **cfg), progress=False)
    randomize_m(model)
    path = pk.save_adapter(model, tmp_path / "adapter", store_bases=store_bases)
    return model, path


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("store_bases", [False, True])
def test_round_trip_into_fresh_model(tmp_path, side, store_bases):
    model, path = _trained(tmp_path, store_bases, side)
    fresh = pk.load_adapter(tiny_model("llama"), path, progress=False)
    assert torch.equal(fresh(TOKENS).logits, model(TOKENS).logits)
    for name, layer in pica_layers(model):
        assert torch.equal(fresh.get_submodule(name).basis(), layer.basis())
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if "pica_bank" not in n)


def test_file_holds_each_m_once(tmp_path):
    model, path = _trained(tmp_path)
    tensors = load_file(path / TENSORS_FILE)
    m_keys = sorted(k for k in tensors if k.startswith("m."))
    assert m_keys == sorted(f"m.{k}" for k in model.pica_bank["default"])
    assert len(m_keys) == 5 and not any(k.startswith("basis.") for k in tensors)
    meta = json.loads((path / CONFIG_FILE).read_text())
    assert meta["config"]["rank"] == 4 and meta["config"]["side"] == "input"
    assert len(meta["groups"]["self_attn-q_proj-48x48"]["layers"]) == 3
    assert meta["base_model"]["class"] == "LlamaForCausalLM"


def test_round_trip_into_model_with_same_adapter(tmp_path):
    model, path = _trained(tmp_path)
    target = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4), progress=False)
    pk.load_adapter(target, path)
    assert torch.equal(target(TOKENS).logits, model(TOKENS).logits)


def test_load_as_second_adapter(tmp_path):
    model, path = _trained(tmp_path)
    other = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4), progress=False)
    pk.load_adapter(other, path, adapter_name="loaded", progress=False)
    assert pk.native.model.active_adapter(other) == "loaded"
    assert torch.equal(other(TOKENS).logits, model(TOKENS).logits)
    pk.set_adapter(other, "default")
    assert torch.equal(other(TOKENS).logits, tiny_model("llama")(TOKENS).logits)


def test_save_while_merged(tmp_path):
    model, _ = _trained(tmp_path)
    y = model(TOKENS).logits
    pk.merge(model)
    path = pk.save_adapter(model, tmp_path / "merged")
    fresh = pk.load_adapter(tiny_model("llama"), path, progress=False)
    assert torch.equal(fresh(TOKENS).logits, y)


def test_onto_another_base_model(tmp_path):
    _, path = _trained(tmp_path)
    other = tiny_model("llama", seed=1)  # same architecture, other weights
    with pytest.raises(AdapterMismatchError, match="base model: layer 'model.layers.0.self_attn.q_proj' weight: "
                                                   "values differ"):
        pk.load_adapter(other, path)
    assert not hasattr(other, "pica_bank")


def test_onto_another_architecture(tmp_path):
    _, path = _trained(tmp_path)
    with pytest.raises(AdapterMismatchError, match="layers: layer 'model.layers.0.self_attn.q_proj' of the adapter "
                                                   "is not in this GPT2LMHeadModel"):
        pk.load_adapter(tiny_model("gpt2"), path)
    import transformers as tf

    torch.manual_seed(0)
    wider = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80,
        num_key_value_heads=2))
    with pytest.raises(AdapterMismatchError, match=r"weight: shape \[64, 64\] in the model, \[48, 48\] in the "
                                                   r"adapter file"):
        pk.load_adapter(wider, path)


@pytest.mark.parametrize("key, value", [("rank", 2), ("side", "output"), ("share", False)])
def test_other_rank_side_or_sharing(tmp_path, key, value):
    _, path = _trained(tmp_path)
    model = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(**{"rank": 4, key: value}), progress=False)
    before = model(TOKENS).logits
    with pytest.raises(AdapterMismatchError, match=f"{key}: the adapter file has .*, the model's adapter "
                                                   f"'default' has {value!r}"):
        pk.load_adapter(model, path)
    assert torch.equal(model(TOKENS).logits, before)


def test_truncated_or_corrupted_tensors(tmp_path):
    _, path = _trained(tmp_path)
    data = (path / TENSORS_FILE).read_bytes()
    (path / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterMismatchError, match="tensors_sha256: .* records .*truncated, corrupted"):
        pk.load_adapter(tiny_model("llama"), path)
    flipped = bytearray(data)
    flipped[-3] ^= 0x40
    (path / TENSORS_FILE).write_bytes(bytes(flipped))
    with pytest.raises(AdapterMismatchError, match="tensors_sha256: "):
        pk.load_adapter(tiny_model("llama"), path)


def test_corrupted_or_missing_config(tmp_path):
    _, path = _trained(tmp_path)
    text = (path / CONFIG_FILE).read_text()
    (path / CONFIG_FILE).write_text(text[:100])
    with pytest.raises(AdapterMismatchError, match="is not valid JSON"):
        pk.load_adapter(tiny_model("llama"), path)
    (path / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="pica_config.json not found"):
        pk.load_adapter(tiny_model("llama"), path)


def test_drifted_basis_is_detected(tmp_path):
    _, path = _trained(tmp_path)
    model = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4), progress=False)
    layer = model.model.layers[1].mlp.down_proj
    with torch.no_grad():  # a basis that no longer matches: two singular vectors swapped
        layer.basis().copy_(layer.basis()[[1, 0, 2, 3]])
    with pytest.raises(AdapterMismatchError, match="layer 'model.layers.1.mlp.down_proj': its basis does not "
                                                   "match the adapter's fingerprint"):
        pk.load_adapter(model, path)


def test_tampered_stored_basis_is_detected_and_rolled_back(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pica_kernels.core.files import file_sha256

    _, path = _trained(tmp_path, store_bases=True)
    tensors = load_file(path / TENSORS_FILE)
    with safe_open(path / TENSORS_FILE, "pt") as f:
        file_meta = f.metadata()
    tensors["basis.model.layers.2.self_attn.k_proj"] = -tensors["basis.model.layers.2.self_attn.k_proj"]
    save_file(tensors, path / TENSORS_FILE, metadata=file_meta)  # a deliberate re-save, checksums recomputed
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["tensors_sha256"] = file_sha256(path / TENSORS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(meta))
    model = tiny_model("llama")
    with pytest.raises(AdapterMismatchError, match="'model.layers.2.self_attn.k_proj': its basis does not match"):
        pk.load_adapter(model, path)
    assert not hasattr(model, "pica_bank") and not list(pica_layers(model))


def test_half_precision_model_from_float32_adapter(tmp_path):
    model, path = _trained(tmp_path, store_bases=True)
    half = pk.load_adapter(tiny_model("llama").to(torch.bfloat16), path, progress=False)
    torch.testing.assert_close(half(TOKENS).logits.float(), model(TOKENS).logits, atol=0.1, rtol=0.05)


def test_load_into_merged_model_is_refused(tmp_path):
    _, path = _trained(tmp_path)
    model = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4), progress=False)
    pk.merge(model)
    with pytest.raises(AdapterMismatchError, match="is merged; unmerge"):
        pk.load_adapter(model, path)
