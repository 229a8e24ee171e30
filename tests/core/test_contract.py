"""One contract, both front ends: the native API (``apply_pica`` & co.) and the PEFT tuner.

Same config and seed give the same bases, the same ``M`` after one training
step and the same merged weights; both stack merges and unmerge bit for bit;
both refuse a tampered file with the same error class naming the same field.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from torch import nn

import pica_kernels as pk
from pica_kernels.native.apply import pica_layers

TOKENS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
FRONT_ENDS = ["native", "peft"]


class Native:
    def build(self, model, **cfg):
        return pk.apply_pica(model, pk.PiCaConfig(**cfg), progress=False)

    def add(self, model, name, **cfg):
        return pk.apply_pica(model, pk.PiCaConfig(**cfg), adapter_name=name, progress=False)

    def layers(self, model):
        return {n: layer for n, layer in pica_layers(model)}

    def basis(self, layer, adapter="default"):
        return layer.basis(adapter)

    def weight(self, layer):
        return layer.base_layer.weight

    def ms(self, model, adapter="default"):
        return dict(model.pica_bank[adapter].items())

    def merge(self, model, adapter):
        pk.merge(model, adapter)

    def unmerge(self, model):
        pk.unmerge(model)

    def delta(self, layer, adapter):
        return layer.delta_weight(adapter)

    def logits(self, model):
        return model(TOKENS).logits

    def save(self, model, path):
        return pk.save_adapter(model, path)

    def load(self, path, model=None, check_base_model="error"):
        model = tiny_model("llama") if model is None else model
        return pk.load_adapter(model, path, progress=False, check_base_model=check_base_model)

    def tamper_rank(self, path, rank):
        meta = json.loads((path / "pica_config.json").read_text())
        meta["config"]["rank"] = rank
        (path / "pica_config.json").write_text(json.dumps(meta))


    def remove_group(self, path, group):
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        from pica_kernels.core.files import file_sha256

        file = path / "pica_adapter.safetensors"
        with safe_open(file, "pt") as f:
            metadata = f.metadata()
        tensors = load_file(file)
        del tensors[f"m.{group}"]
        save_file(tensors, file, metadata=metadata)  # a deliberate re-save, its checksum recomputed
        meta = json.loads((path / "pica_config.json").read_text())
        meta["tensors_sha256"] = file_sha256(file)
        (path / "pica_config.json").write_text(json.dumps(meta))


class Peft(Native):
    def build(self, model, **cfg):
        from peft import get_peft_model

        from pica_kernels.peft import PiCaPeftConfig

        return get_peft_model(model, PiCaPeftConfig(**cfg))

    def add(self, model, name, **cfg):
        from pica_kernels.peft import PiCaPeftConfig

        model.add_adapter(name, PiCaPeftConfig(**cfg))
        return model

    def layers(self, model):
        from pica_kernels.peft import PiCaPeftLinear

        return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
                if isinstance(m, PiCaPeftLinear)}

    def basis(self, layer, adapter="default"):
        return layer.pica_basis[adapter]

    def weight(self, layer):
        return layer.get_base_layer().weight

    def ms(self, model, adapter="default"):
        return dict(model.base_model.pica_M[adapter].items())

    def merge(self, model, adapter):
        model.base_model.merge_adapter([adapter])

    def unmerge(self, model):
        model.base_model.unmerge_adapter()

    def delta(self, layer, adapter):
        return layer.get_delta_weight(adapter)

    def save(self, model, path):
        model.save_pretrained(path)
        return path

    def load(self, path, model=None, check_base_model="error"):
        from peft import PeftModel

        from pica_kernels.peft import PiCaPeftConfig

        config = PiCaPeftConfig.from_pretrained(path)
        config.check_base_model = check_base_model
        return PeftModel.from_pretrained(tiny_model("llama") if model is None else model, path, config=config)

    def tamper_rank(self, path, rank):
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["r"] = rank
        (path / "adapter_config.json").write_text(json.dumps(cfg))


    def remove_group(self, path, group):
        from safetensors.torch import load_file, save_file

        file = path / "adapter_model.safetensors"
        tensors = load_file(file)
        del tensors[f"base_model.pica_M.{group}"]
        save_file(tensors, file, metadata={"format": "pt"})


API = {"native": Native(), "peft": Peft()}
CONFIG = dict(rank=4, side="input", svd_seed=3)


def _set_m(api, model, seed=1, adapter="default"):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in sorted(api.ms(model, adapter)):
            m = api.ms(model, adapter)[key]
            m.copy_(torch.randn(m.shape, generator=gen) * 0.05)


def _one_step(api):
    model = api.build(tiny_model("llama"), **CONFIG)
    _set_m(api, model)
    api.logits(model).pow(2).mean().backward()
    with torch.no_grad():
        for m in api.ms(model).values():
            m -= 0.1 * m.grad
    return model


@pytest.fixture(scope="module")
def trained():
    return {fe: _one_step(API[fe]) for fe in FRONT_ENDS}


def test_same_bases(trained):
    native, peft = (API[fe].layers(trained[fe]) for fe in FRONT_ENDS)
    assert native.keys() == peft.keys()
    for name in native:
        assert torch.equal(API["native"].basis(native[name]), API["peft"].basis(peft[name])), name


def test_same_m_after_one_step(trained):
    native, peft = (API[fe].ms(trained[fe]) for fe in FRONT_ENDS)
    assert native.keys() == peft.keys()
    for key in native:
        torch.testing.assert_close(native[key], peft[key], atol=1e-7, rtol=1e-6, msg=key)
        assert native[key].dtype == peft[key].dtype == torch.float32


def test_same_merged_weights(trained):
    for fe in FRONT_ENDS:
        API[fe].merge(trained[fe], "default")
    try:
        native, peft = (API[fe].layers(trained[fe]) for fe in FRONT_ENDS)
        for name in native:
            assert torch.equal(API["native"].weight(native[name]), API["peft"].weight(peft[name])), name
    finally:
        for fe in FRONT_ENDS:
            API[fe].unmerge(trained[fe])


@pytest.mark.parametrize("fe", FRONT_ENDS)
def test_merging_two_adapters_stacks_and_unmerge_is_bit_exact(fe):
    api = API[fe]
    model = api.build(tiny_model("llama"), **CONFIG)
    api.add(model, "b", **CONFIG)
    _set_m(api, model, 1)
    _set_m(api, model, 2, adapter="b")
    layers = api.layers(model)
    w0 = {n: api.weight(layer).detach().clone() for n, layer in layers.items()}
    api.merge(model, "default")
    api.merge(model, "b")  # PEFT semantics: a second merge stacks
    for n, layer in layers.items():
        expected = (w0[n].float() + api.delta(layer, "default") + api.delta(layer, "b")).to(w0[n].dtype)
        assert torch.equal(api.weight(layer), expected), n
    api.unmerge(model)
    assert all(torch.equal(api.weight(layer), w0[n]) for n, layer in layers.items())


@pytest.mark.parametrize("fe", FRONT_ENDS)
def test_m_is_float32_for_a_bfloat16_base(fe):
    api = API[fe]
    model = api.build(tiny_model("llama").to(torch.bfloat16), **CONFIG)
    assert {m.dtype for m in api.ms(model).values()} == {torch.float32}


@pytest.mark.parametrize("fe", FRONT_ENDS)
def test_round_trip_and_tampered_rank(fe, trained, tmp_path):
    api = API[fe]
    path = api.save(trained[fe], tmp_path / fe)
    loaded = api.load(path)
    assert torch.equal(api.logits(loaded), api.logits(trained[fe]))
    api.tamper_rank(path, 8)
    with pytest.raises(pk.AdapterMismatchError, match=r"^rank: .*8.*\(rank 4\)|^rank: .*8.* has rank 4"):
        api.load(path)


@pytest.mark.parametrize("fe", FRONT_ENDS)
def test_rank_pattern_gives_small_layers_their_own_rank(fe):
    api = API[fe]
    # k/v projections are 24x48: rank 30 does not fit them, rank_pattern gives them 8.
    model = api.build(tiny_model("llama"), rank=30, rank_pattern={"k_proj": 8, "v_proj": 8})
    for name, layer in api.layers(model).items():
        want = 8 if name.endswith(("k_proj", "v_proj")) else 30
        assert min(api.basis(layer).shape) == want, name
    with pytest.raises(ValueError, match="larger than min"):
        api.build(tiny_model("llama"), rank=30)


@pytest.mark.parametrize("fe", FRONT_ENDS)
def test_base_sentinel_refused_as_adapter_name(fe):
    api = API[fe]
    model = api.build(tiny_model("llama"), **CONFIG)
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        api.add(model, "__base__", **CONFIG)


@pytest.mark.parametrize("alias", [dict(r=4, share_m=False, exclude_modules=["k_proj"]),
                                   dict(rank=4, share=False, exclude=["k_proj"])])
def test_config_fields_accept_both_spellings(alias):
    from pica_kernels.peft import PiCaPeftConfig

    native, peft = pk.PiCaConfig(**alias), PiCaPeftConfig(**alias)
    assert (native.rank, native.share, native.exclude) == (4, False, ("k_proj",))
    assert (peft.r, peft.share_m, peft.exclude_modules) == (4, False, {"k_proj"})


@pytest.mark.parametrize("fe", FRONT_ENDS)
def test_group_removed_from_the_tensor_file(fe, trained, tmp_path):
    api = API[fe]
    path = api.save(trained[fe], tmp_path / fe)
    api.remove_group(path, "mlp-up_proj-80x48")
    with pytest.raises(pk.AdapterMismatchError, match=r"^groups: .*'mlp-up_proj-80x48'.*holds no"):
        api.load(path)


@pytest.mark.parametrize("fe", FRONT_ENDS)
@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight"])
def test_model_differing_only_outside_the_targets(fe, trained, tmp_path, tensor):
    api = API[fe]
    path = api.save(trained[fe], tmp_path / fe)

    def other():
        model = tiny_model("llama")
        with torch.no_grad():
            model.get_parameter(tensor)[0, 0] += 1.0  # first entries are in every sample
        return model

    with pytest.raises(pk.AdapterMismatchError, match=f"^base_tensors: .*tensor {tensor!r}: values differ"):
        api.load(path, other())
    with pytest.warns(UserWarning, match=f"^base_tensors: .*tensor {tensor!r}"):
        loaded = api.load(path, other(), check_base_model="warn")
    assert torch.isfinite(api.logits(loaded)).all()


@pytest.mark.parametrize("fe", FRONT_ENDS)
def test_model_with_a_tensor_its_base_lacked_is_refused(fe, trained, tmp_path):
    """Every other tensor equal, one more in the model (an lm_head bias): the whole-model check compares the
    key sets too, not only the tensors the file names."""
    api = API[fe]
    path = api.save(trained[fe], tmp_path / fe)

    def other():
        model = tiny_model("llama")
        model.lm_head.bias = nn.Parameter(torch.zeros(model.lm_head.out_features))
        return model

    with pytest.raises(pk.AdapterMismatchError, match=r"^base_tensors: .*'lm_head\.bias'"):
        api.load(path, other())
    with pytest.warns(UserWarning, match=r"^base_tensors: .*'lm_head\.bias'"):
        api.load(path, other(), check_base_model="warn")


def _tiny_phi3():
    """A tiny Phi-3: fused ``mlp.gate_up_proj`` and ``self_attn.qkv_proj`` next to ``mlp.down_proj``."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Phi3Config(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("fe", FRONT_ENDS)
def test_a_suffix_target_never_matches_inside_a_fused_name(fe):
    """``target_modules=["up_proj"]`` names a module ending in ``.up_proj``: Phi-3's fused ``gate_up_proj``
    (gate and up stacked, one (2 * intermediate, hidden) weight) is another module and stays as it is."""
    api = API[fe]
    model = _tiny_phi3()
    assert any(n.endswith("mlp.gate_up_proj") for n, _ in model.named_modules())
    with pytest.raises(ValueError, match="up_proj"):  # nothing matches: refused, not an empty adapter
        api.build(model, rank=4, target_modules=["up_proj"])
    model = api.build(_tiny_phi3(), rank=4, target_modules=["gate_up_proj"])
    assert sorted(api.layers(model)) == ["model.layers.0.mlp.gate_up_proj", "model.layers.1.mlp.gate_up_proj"]
