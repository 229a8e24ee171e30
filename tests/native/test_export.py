"""export_lora: a PiCa adapter written as a standard PEFT LoRA adapter gives the PiCa model's outputs in PEFT."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from conftest import TINY_TARGETS, randomize_m, tiny_model
from safetensors.torch import load_file

from pica_kernels import PiCaConfig, PiCaLinear, apply_pica
from pica_kernels.native.export import export_lora


def _out(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (elementwise relative error blows up where an output is ~0)."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _load_lora(base, path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return peft.PeftModel.from_pretrained(base, path)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("share", [True, False])
def test_export_matches_pica_in_peft(arch, side, share, tmp_path):
    base = tiny_model(arch)
    fresh_base = copy.deepcopy(base)
    first = TINY_TARGETS[arch][0]
    config = PiCaConfig(rank=8, side=side, share=share, target_modules=TINY_TARGETS[arch], rank_pattern={first: 4})
    model = apply_pica(base, config, progress=False)
    randomize_m(model)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _out(model, ids)
        base_out = _out(fresh_base, ids)
    export_lora(model, tmp_path)
    lora = _load_lora(fresh_base, tmp_path)
    with torch.no_grad():
        actual = _out(lora, ids)
    assert max_rel_err(expected, base_out) > 1e-2, "the adapter must change the output for the test to mean anything"
    assert max_rel_err(actual, expected) <= 1e-6

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 8
    assert not cfg["use_rslora"] and cfg["lora_dropout"] == 0
    assert cfg["rank_pattern"] and set(cfg["rank_pattern"].values()) == {4}
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    assert cfg["fan_in_fan_out"] == (arch == "gpt2")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PiCaLinear)]
    assert len(tensors) == 2 * len(layers)
    for name, layer in layers:
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        basis, m = layer.basis(), layer.m()
        trained, frozen = (b, a) if side == "input" else (a, b)
        assert torch.equal(trained, m.detach()) and torch.equal(frozen, basis)
        assert a.shape == (layer.adapters["default"].rank, layer.in_features)
        assert b.shape == (layer.out_features, layer.adapters["default"].rank)


def test_export_writes_short_target_names_only_when_they_select_exactly(tmp_path):
    model = apply_pica(tiny_model("llama"), PiCaConfig(rank=4, target_modules=["q_proj", "v_proj"]), progress=False)
    export_lora(model, tmp_path / "short")
    assert json.loads((tmp_path / "short" / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    # Only layer 0's q_proj: "q_proj" would select the other layers' too, so full names are written.
    model = apply_pica(tiny_model("llama"), PiCaConfig(rank=4, target_modules=["layers.0.self_attn.q_proj"]),
                       progress=False)
    randomize_m(model)
    export_lora(model, tmp_path / "full")
    cfg = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    ids = torch.randint(0, 97, (1, 7))
    lora = _load_lora(tiny_model("llama"), tmp_path / "full")
    with torch.no_grad():
        assert max_rel_err(_out(lora, ids), _out(model, ids)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_export_half_precision_within_rounding(dtype, tmp_path):
    base = tiny_model("llama").to(dtype)
    fresh_base = copy.deepcopy(base)
    model = apply_pica(base, PiCaConfig(rank=8, target_modules=TINY_TARGETS["llama"]), progress=False)
    randomize_m(model)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _out(model, ids)
    export_lora(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {t.dtype for k, t in tensors.items() if "lora_B" in k} == {torch.float32}  # M exported in its own fp32
    lora = _load_lora(fresh_base, tmp_path)
    with torch.no_grad():
        actual = _out(lora, ids)
    # Both compute in `dtype` with different operation orders: a few units of the dtype's rounding.
    eps = torch.finfo(dtype).eps
    assert max_rel_err(actual, expected) <= 8 * eps


def test_export_from_the_peft_front_end(tmp_path):
    from peft import get_peft_model

    from pica_kernels.peft import PiCaPeftConfig

    base = tiny_model("llama")
    fresh_base = copy.deepcopy(base)
    model = get_peft_model(base, PiCaPeftConfig(r=4, target_modules=TINY_TARGETS["llama"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ids = torch.randint(0, 97, (2, 9), generator=gen)
    with torch.no_grad():
        expected = _out(model, ids)
        base_out = _out(fresh_base, ids)
    assert max_rel_err(expected, base_out) > 1e-2
    export_lora(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    lora = _load_lora(fresh_base, tmp_path)
    with torch.no_grad():
        actual = _out(lora, ids)
    assert max_rel_err(actual, expected) <= 1e-6


def test_export_refuses_a_model_without_pica(tmp_path):
    with pytest.raises(ValueError, match="no PiCa layer"):
        export_lora(tiny_model("llama"), tmp_path)


def test_export_warns_when_merged(tmp_path):
    from pica_kernels import merge

    model = apply_pica(tiny_model("llama"), PiCaConfig(rank=4), progress=False)
    merge(model)
    with pytest.warns(UserWarning, match="merged"):
        export_lora(model, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["input-shared", "output-unshared-rank_pattern-nf4"])
def test_export_smollm2_matches_in_peft(case, smollm2, smollm2_base, tmp_path):
    """The real SmolLM2: the default (input side, M shared per role, all five roles), and the output side with one M
    per layer and a rank_pattern on an nf4 base (three roles, to keep the SVDs few)."""
    model, tok = smollm2
    fresh_base = copy.deepcopy(smollm2_base[0])
    if case == "input-shared":
        config = PiCaConfig(rank=16)
    else:
        from pica_kernels.core.quant import quantize_base

        quantize_base(model, "nf4")
        fresh_base = copy.deepcopy(model)  # the same nf4 storage (quantizing twice would cost ~10 s more)
        config = PiCaConfig(rank=16, side="output", share=False, target_modules=["q_proj", "v_proj", "down_proj"],
                            rank_pattern={"v_proj": 8})
    apply_pica(model, config, progress=False)
    randomize_m(model, scale=0.01)
    ids = tok("PiCa adapters export as LoRA.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = _out(model, ids)
        base_out = _out(fresh_base, ids)
    assert max_rel_err(expected, base_out) > 1e-3, "the adapter must change the output for the test to mean anything"
    export_lora(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["lora_alpha"] == cfg["r"] == 16
    if case != "input-shared":
        assert set(cfg["rank_pattern"].values()) == {8} and len(cfg["rank_pattern"]) == 30, cfg["rank_pattern"]
        tensors = load_file(tmp_path / "adapter_model.safetensors")
        a = tensors["base_model.model.model.layers.3.self_attn.v_proj.lora_A.weight"]
        b = tensors["base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"]
        layer = model.model.layers[3].self_attn.v_proj
        assert torch.equal(a, layer.m().detach()) and torch.equal(b, layer.basis())  # output side: A = M, B = U_r
        assert a.shape == (8, 576) and b.shape == (192, 8)
    lora = _load_lora(fresh_base, tmp_path)
    with torch.no_grad():
        actual = _out(lora, ids)
    assert max_rel_err(actual, expected) <= 1e-6
