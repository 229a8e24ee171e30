"""The LoRA-for-parameters layout export_lora writes for fused MoE experts, checked against real PEFT.

Per expert ``e`` of a 3-D expert parameter PiCa adds ``ΔW_e = up_e @ down_e``; written by
:func:`pica_kernels.core.export.write_lora_adapter` and loaded with ``peft.PeftModel.from_pretrained``, the model
must compute what the base model with every ``W_e + ΔW_e`` computes (tiny Mixtral, Qwen2-MoE, OLMoE; gpt-oss for a
transposed, gate/up-interleaved layout), and a layout PEFT would misread is refused with the reason.
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from moe_models import tiny_moe

from pica_kernels.core.errors import PiCaError
from pica_kernels.core.export import LoraExportError, expert_lora_factors, lora_factors, write_lora_adapter

E, FFN, HIDDEN = 4, 48, 32


def _rel(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _roles(arch: str, parameter: str):
    """(rows, out) of each PiCa role of ``parameter``: a fused gate_up holds a gate and an up role."""
    if parameter == "down_proj":
        return [slice(0, HIDDEN)], HIDDEN
    if arch == "gpt_oss":  # interleaved: gate rows 0, 2, 4, ...; up rows 1, 3, 5, ...
        return [slice(0, None, 2), slice(1, None, 2)], 2 * FFN
    return [slice(0, FFN), slice(FFN, 2 * FFN)], 2 * FFN


def _random_parts(rows_list, out, n_in, r, side, per_expert, gen):
    parts = []
    for rows in rows_list:
        n_rows = len(range(out)[rows])
        if side == "input":
            basis = torch.linalg.qr(torch.randn(E, n_in, r, generator=gen)).Q.transpose(1, 2)  # P (E, r, in)
            m = torch.randn(*(E,) * per_expert, n_rows, r, generator=gen) * 0.2  # M (rows, r) or (E, rows, r)
        else:
            basis = torch.linalg.qr(torch.randn(E, n_rows, r, generator=gen)).Q  # U_r (E, rows, r)
            m = torch.randn(*(E,) * per_expert, r, n_in, generator=gen) * 0.2  # M (r, in) or (E, r, in)
        parts.append((rows, basis, m, side))
    return parts


def _delta(parts, out, n_in):
    """Every expert's ΔW (E, out, in) straight from the PiCa factors (no LoRA layout involved)."""
    d = torch.zeros(E, out, n_in, dtype=torch.float64)
    for rows, basis, m, side in parts:
        d[:, rows] = (m.double() @ basis.double()) if side == "input" else (basis.double() @ m.double())
    return d


def _load(base, path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match.*")
        return peft.PeftModel.from_pretrained(base, str(path)).eval()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmoe", "gpt_oss"])
@pytest.mark.parametrize(("side", "per_expert"), [("input", False), ("output", False), ("input", True)])
def test_expert_layout_loads_in_peft_with_the_same_outputs(arch, side, per_expert, tmp_path):
    base = tiny_moe(arch)
    expected_model = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    experts_layers, r = [], 3
    for li in range(2):
        module = f"model.layers.{li}.mlp.experts"
        experts = base.get_submodule(module)
        order = [n for n, _ in experts.named_parameters(recurse=False)]
        for parameter in ("gate_up_proj", "down_proj"):
            rows_list, out = _roles(arch, parameter)
            n_in = HIDDEN if parameter == "gate_up_proj" else FFN
            parts = _random_parts(rows_list, out, n_in, r, side, per_expert, gen)
            transposed = arch == "gpt_oss"
            experts_layers.append(expert_lora_factors(
                module, parameter, parts, out, order.index(parameter),
                stored_transposed=transposed, peft_reads_transposed=bool(getattr(experts, "is_transposed", False))))
            w = expected_model.get_submodule(module).get_parameter(parameter)
            d = _delta(parts, out, n_in)
            with torch.no_grad():
                w.add_((d.transpose(1, 2) if transposed else d).to(w.dtype))
    write_lora_adapter(tmp_path, [], base_model_name_or_path=None, expert_layers=experts_layers,
                       all_expert_names=[f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                                         for p in ("gate_up_proj", "down_proj")])
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert cfg["target_modules"] == [] and cfg["r"] == cfg["lora_alpha"]
    lora = _load(base, tmp_path)
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = expected_model(input_ids=ids).logits
        actual = lora(input_ids=ids).logits
        plain = tiny_moe(arch)(input_ids=ids).logits
    assert _rel(expected, plain) > 1e-2, "the adapter must change the output for the test to mean anything"
    assert _rel(actual, expected) <= 1e-6


def test_nested_wrapper_keys_and_expert_major_lora_a(tmp_path):
    """PEFT nests one wrapper per adapted parameter (the module's first parameter innermost): gate_up_proj's keys
    carry ``.base_layer`` when down_proj is adapted too, not otherwise; lora_A rows are expert-major, lora_B
    columns rank-major (column k*E + e)."""
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(0)
    parts = _random_parts([slice(0, HIDDEN)], HIDDEN, FFN, 2, "input", True, gen)
    down = expert_lora_factors("m.experts", "down_proj", parts, HIDDEN, 1, stored_transposed=False,
                               peft_reads_transposed=False)
    parts_gu = _random_parts([slice(0, FFN), slice(FFN, 2 * FFN)], 2 * FFN, HIDDEN, 2, "input", False, gen)
    gate_up = expert_lora_factors("m.experts", "gate_up_proj", parts_gu, 2 * FFN, 0, stored_transposed=False,
                                  peft_reads_transposed=False)
    assert gate_up.rank == 4  # gate and up: two roles of rank 2
    write_lora_adapter(tmp_path / "both", [], base_model_name_or_path=None, expert_layers=[down, gate_up])
    t = load_file(tmp_path / "both" / "adapter_model.safetensors")
    assert set(t) == {"base_model.model.m.experts.lora_A.weight", "base_model.model.m.experts.lora_B.weight",
                      "base_model.model.m.experts.base_layer.lora_A.weight",
                      "base_model.model.m.experts.base_layer.lora_B.weight"}
    a, b = t["base_model.model.m.experts.lora_A.weight"], t["base_model.model.m.experts.lora_B.weight"]
    assert a.shape == (E * 2, FFN) and b.shape == (HIDDEN, 2 * E)
    for e in range(E):
        assert torch.equal(a[2 * e:2 * e + 2], parts[0][1][e])  # P_e
        assert torch.equal(b[:, e::E], parts[0][2][e])  # M_e
    cfg = json.loads((tmp_path / "both" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["rank_pattern"] == {r"m\.experts\.gate_up_proj": 4}
    write_lora_adapter(tmp_path / "one", [], base_model_name_or_path=None, expert_layers=[gate_up])
    assert set(load_file(tmp_path / "one" / "adapter_model.safetensors")) == {
        "base_model.model.m.experts.lora_A.weight", "base_model.model.m.experts.lora_B.weight"}


def test_full_parameter_names_when_short_ones_select_more(tmp_path):
    gen = torch.Generator().manual_seed(0)
    parts = _random_parts([slice(0, HIDDEN)], HIDDEN, FFN, 2, "input", False, gen)
    only = expert_lora_factors("model.layers.0.mlp.experts", "down_proj", parts, HIDDEN, 1, stored_transposed=False,
                               peft_reads_transposed=False)
    everything = [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]
    write_lora_adapter(tmp_path, [], base_model_name_or_path=None, expert_layers=[only], all_expert_names=everything)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["model.layers.0.mlp.experts.down_proj"]


def test_layout_peft_would_misread_is_refused_naming_module_and_reason():
    """A module storing (E, in, out) without is_transposed (transformers' Llama4TextExperts does): PEFT would apply
    ΔW_e transposed (silently, for square experts), so the export refuses."""
    gen = torch.Generator().manual_seed(0)
    parts = _random_parts([slice(0, HIDDEN)], HIDDEN, HIDDEN, 2, "input", False, gen)
    with pytest.raises(LoraExportError) as info:
        expert_lora_factors("model.layers.0.feed_forward.experts", "down_proj", parts, HIDDEN, 1,
                            stored_transposed=True, peft_reads_transposed=False)
    msg = str(info.value)
    assert "model.layers.0.feed_forward.experts.down_proj" in msg
    assert "(E, in, out)" in msg and "is_transposed" in msg and "PEFT cannot express" in msg
    assert isinstance(info.value, PiCaError)


def test_conv1d_layers_and_experts_in_one_adapter_are_refused(tmp_path):
    """PEFT's ParamWrapper refuses fan_in_fan_out, one value for the whole LoRA config: a Conv1D layer and an
    expert parameter cannot share one exported adapter."""
    gen = torch.Generator().manual_seed(0)
    parts = _random_parts([slice(0, HIDDEN)], HIDDEN, FFN, 2, "input", False, gen)
    expert = expert_lora_factors("m.experts", "down_proj", parts, HIDDEN, 1, stored_transposed=False,
                                 peft_reads_transposed=False)
    conv = lora_factors("m.c_attn", torch.randn(2, 8), torch.randn(8, 2), "input", fan_in_fan_out=True)
    with pytest.raises(LoraExportError, match=r"m\.experts\.down_proj.*fan_in_fan_out.*'m\.c_attn'"):
        write_lora_adapter(tmp_path, [conv], base_model_name_or_path=None, expert_layers=[expert])
    assert not (tmp_path / "adapter_model.safetensors").exists()
