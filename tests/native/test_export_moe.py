"""export_lora of PiCa adapters on fused MoE experts: PEFT's LoRA for parameters (``target_parameters``) loads them
and computes the PiCa model's outputs; what that format cannot express is refused naming the module and why."""

from __future__ import annotations

import contextlib
import json
import warnings

import peft
import pytest
import torch
from moe_models import DENSE_TARGETS, EXPERT_PARAMETERS, MOE_ARCHS, moe_ids, tiny_moe, tiny_moe_config
from safetensors.torch import load_file
from torch import nn

from pica_kernels.core.export import LoraExportError
from pica_kernels.native.export import export_lora
from pica_kernels.peft import PiCaPeftConfig

R = 4
#: float32, PEFT LoRA against PiCa: PEFT's parametrization adds B_e @ A_e into each expert's weight before the GEMM,
#: PiCa keeps the low-rank term separate, through two MoE layers (routing weights, softmax, residuals). Measured max
#: relative error 3.6e-7..8.3e-7 over the cases here (avx512, avx2 and default dispatch, 1 thread), so 4e-6.
FP32_RTOL = 4e-6


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        # PEFT 0.21 checks rank_pattern keys against modules only; it applies those naming parameters all the same.
        warnings.filterwarnings("ignore", message=".*pattern keys did not match any targeted module.*")
        yield


def _pica_peft(arch: str, **kw):
    with _quiet():
        model = peft.get_peft_model(tiny_moe(arch), PiCaPeftConfig(
            r=R, target_modules=DENSE_TARGETS[arch], target_parameters=list(EXPERT_PARAMETERS), **kw))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.base_model.pica_M.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _load_lora(arch: str, path):
    with _quiet():
        return peft.PeftModel.from_pretrained(tiny_moe(arch), str(path)).eval()


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("kw", [{}, {"side": "output"}, {"share_experts": False},
                                {"rank_pattern": {"experts.down_proj": 2}}],
                         ids=["input", "output", "per_expert", "rank_pattern"])
def test_export_of_expert_adapter_loads_in_peft_lora_with_the_same_outputs(arch, kw, tmp_path):
    model = _pica_peft(arch, **kw)
    ids = moe_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        plain = tiny_moe(arch)(input_ids=ids).logits
    assert rel(expected, plain) > 1e-2, "the adapter must change the output for the test to mean anything"
    export_lora(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert cfg["target_modules"] == sorted(n.rpartition(".")[2] for n in DENSE_TARGETS[arch])
    down_rank = kw.get("rank_pattern", {}).get("experts.down_proj", R)
    # gate_up_proj carries its gate and up roles side by side: rank 2r; down_proj rank r.
    assert cfg["r"] == cfg["lora_alpha"] == 2 * R
    patterns = {k.replace("\\", ""): v for k, v in cfg["rank_pattern"].items()}
    downs = {f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)}
    assert {k: v for k, v in patterns.items() if k in downs} == dict.fromkeys(downs, down_rank)
    assert {v for k, v in patterns.items() if k not in downs} == {R}  # the dense layers
    assert not any("gate_up_proj" in k for k in patterns)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    # down_proj is the outer PEFT wrapper, gate_up_proj (declared first) the inner one.
    assert tensors["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].shape == (4 * down_rank, 48)
    assert tensors["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (4 * 2 * R, 32)
    lora = _load_lora(arch, tmp_path)
    with torch.no_grad():
        actual = lora(input_ids=ids).logits
    assert rel(actual, expected) <= FP32_RTOL


def test_export_of_a_merged_expert_adapter_warns(tmp_path):
    with _quiet():
        model = peft.get_peft_model(tiny_moe("olmoe"), PiCaPeftConfig(r=R, target_modules=None,
                                                                      target_parameters=["experts.down_proj"]))
    model.merge_adapter()
    with pytest.warns(UserWarning, match=r"2 PiCa layer\(s\) are merged \(e\.g\. '.*layers\.0\.mlp\.experts'\)"):
        export_lora(model, tmp_path)


class _ConvAndExperts(nn.Module):
    """A GPT-2 style Conv1D layer (weight stored (in, out)) feeding a Mixtral MoE block."""

    def __init__(self):
        import transformers as tf
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        torch.manual_seed(0)
        self.c_fc = Conv1D(32, 32)
        self.mlp = tf.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(tiny_moe_config("mixtral"))
        with torch.no_grad():  # both are created with torch.empty (transformers initialises in from_config)
            for p in self.parameters():
                p.normal_(0, 0.1)

    def forward(self, x):
        return self.mlp(self.c_fc(x))


def test_conv1d_and_experts_in_one_adapter_are_refused_naming_both(tmp_path):
    """PEFT's LoRA for parameters (lora.ParamWrapper) refuses fan_in_fan_out, which a Conv1D layer of the same LoRA
    config needs: such an adapter cannot be one PEFT LoRA adapter, and export_lora says so before writing."""
    model = peft.get_peft_model(_ConvAndExperts(), PiCaPeftConfig(r=R, target_modules=["c_fc"],
                                                                  target_parameters=["experts.down_proj"]))
    with pytest.raises(LoraExportError) as info:
        export_lora(model, tmp_path / "out")
    msg = str(info.value)
    assert "mlp.experts.down_proj" in msg and "'c_fc'" in msg and "fan_in_fan_out" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_export_of_a_native_expert_adapter_equals_the_peft_front_ends(arch, tmp_path):
    """apply_pica's experts layer hands out the same factors: the two front ends export identical files."""
    from pica_kernels import PiCaConfig, apply_pica

    native = apply_pica(tiny_moe(arch), PiCaConfig(rank=R, target_modules=[*DENSE_TARGETS[arch],
                                                                           *EXPERT_PARAMETERS]), progress=False)
    model = _pica_peft(arch)
    with torch.no_grad():
        for group, m in native.pica_bank["default"].items():
            m.copy_(model.base_model.pica_M["default"][group])
    export_lora(native, tmp_path / "native")
    export_lora(model, tmp_path / "peft")
    a = load_file(tmp_path / "native" / "adapter_model.safetensors")
    b = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    cfg_a = json.loads((tmp_path / "native" / "adapter_config.json").read_text())
    cfg_b = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg_a == cfg_b
    lora = _load_lora(arch, tmp_path / "native")
    ids = moe_ids()
    with torch.no_grad():
        assert rel(lora(input_ids=ids).logits, native(input_ids=ids).logits) <= FP32_RTOL
