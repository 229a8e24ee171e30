"""Quantized frozen bases: bitsandbytes nf4 / fp4 / int8 and torchao int8 weight-only, on CPU."""

from __future__ import annotations

import copy
import json
import sys
import warnings

import pytest
import torch
from conftest import DATA_DIR, TINY_TARGETS, randomize_m, tiny_model
from torch import nn

from pica_kernels import (
    AdapterMismatchError,
    PiCaConfig,
    PiCaLinear,
    apply_pica,
    load_adapter,
    merge,
    merge_and_unload,
    save_adapter,
    truncated_svd,
    unmerge,
)
from pica_kernels.core.quant import dequantized_weight, is_quantized_base, quant_info, quantize_base
from pica_kernels.native.export import export_lora

METHODS = ["nf4", "fp4", "bnb-int8", "torchao-int8"]
IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))


def quantized_llama(method: str, dtype: torch.dtype = torch.float32):
    kw = {"double_quant": method == "nf4"} if method in ("nf4", "fp4") else {}  # nf4 with, fp4 without double quant
    return quantize_base(tiny_model("llama").to(dtype), method, **kw)


def adapted(method: str, **cfg):
    model = apply_pica(quantized_llama(method), PiCaConfig(rank=8, target_modules=TINY_TARGETS["llama"], **cfg),
                       progress=False)
    return model


def storage(model) -> dict[str, torch.Tensor]:
    """Every non-adapter tensor of the model: quantized packed data, scales, quant state, biases, norms."""
    out = {}
    for k, t in model.state_dict().items():
        if k.startswith("pica_bank."):
            continue
        if hasattr(t, "qdata"):  # torchao tensor subclass: its packed data and scales
            out[k + ".qdata"], out[k + ".scale"] = t.qdata.clone(), t.scale.clone()
        else:
            out[k] = t.detach().clone()
    return out


def same_storage(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("method", METHODS)
def test_apply_train_only_m_changes(method):
    base = quantized_llama(method)
    layer = base.model.layers[0].self_attn.q_proj
    assert is_quantized_base(layer) and quant_info(layer)["method"] in ("bitsandbytes", "torchao")
    w_deq = dequantized_weight(layer)
    y_base = logits(base)
    model = apply_pica(base, PiCaConfig(rank=8, target_modules=TINY_TARGETS["llama"]), progress=False)
    pica = model.model.layers[0].self_attn.q_proj
    assert isinstance(pica, PiCaLinear) and pica.quantization == quant_info(pica.base_layer)
    # The basis is the SVD of the dequantized weight; M is fp32 and zero, so the output is the base's exactly.
    expected_basis, _ = truncated_svd(w_deq, 8, "input")
    torch.testing.assert_close(pica.basis(), expected_basis.to(pica.basis().dtype), atol=0, rtol=0)
    assert pica.m().dtype == torch.float32
    assert torch.equal(logits(model), y_base)
    before = storage(model)
    m_before = {k: p.detach().clone() for k, p in model.pica_bank.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("pica_bank.") for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert same_storage(storage(model), before), "training must leave the quantized storage untouched"
    assert all(not torch.equal(p, m_before[k]) for k, p in model.pica_bank.named_parameters())


@pytest.mark.parametrize("method", METHODS)
def test_save_load_fresh_quantized_base(method, tmp_path):
    model = adapted(method)
    randomize_m(model)
    expected = logits(model)
    save_adapter(model, tmp_path)
    loaded = load_adapter(quantized_llama(method), tmp_path)
    assert torch.equal(logits(loaded), expected)


def llama_32():
    """A tiny Llama whose layer widths are multiples of 32, as bitsandbytes' CPU repacking needs."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def test_bnb_cpu_repacking_is_kept_off(tmp_path):
    """On AVX512-BF16 CPUs bitsandbytes repacks a Linear4bit in place on its first eval forward without grad
    (another layout, absmax in bfloat16, bfloat16 compute): PiCa keeps its bases on the standard storage, so eval
    outputs equal train outputs, storage is untouched, and save -> load works in eval mode."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    def nf4_base():
        model = quantize_base(llama_32(), "nf4")
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on an AVX512-BF16 machine
        return model

    every_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = apply_pica(nf4_base(), PiCaConfig(rank=4, target_modules=every_linear), progress=False)
    randomize_m(model)
    adapted_bases = [m.base_layer for m in model.modules() if isinstance(m, PiCaLinear)]
    assert len(adapted_bases) == 14 and all(not b.support_avx512bf16_for_cpu for b in adapted_bases)
    model.train()
    y_train = logits(model)
    before = storage(model)
    model.eval()
    y_eval = logits(model)
    assert torch.equal(y_eval, y_train)
    assert not any(getattr(b.weight.quant_state, "packing_format_for_cpu", False) for b in adapted_bases)
    assert same_storage(storage(model), before)
    save_adapter(model, tmp_path)
    assert torch.equal(logits(load_adapter(nf4_base().eval(), tmp_path)), y_eval)

    # A base repacked before PiCa sees it: unpacked with bitsandbytes' own inverse (what its state_dict does).
    packed = nf4_base()
    q = packed.model.layers[0].self_attn.q_proj
    q.weight.data, q.weight.quant_state = _convert_weight_packed_for_cpu(q.weight.data, q.weight.quant_state)
    reference = copy.deepcopy(q)
    reference.state_dict()  # bitsandbytes unpacks on state_dict
    model = apply_pica(packed, PiCaConfig(rank=4), progress=False)
    pica = model.model.layers[0].self_attn.q_proj
    assert not getattr(pica.base_layer.weight.quant_state, "packing_format_for_cpu", False)
    assert pica.quantization == quant_info(reference) and pica.quantization["double_quant"]
    torch.testing.assert_close(dequantized_weight(pica.base_layer), dequantized_weight(reference), atol=0, rtol=0)


@pytest.mark.parametrize("method", ["nf4", "torchao-int8"])
def test_load_onto_a_base_quantized_differently_is_refused(method, tmp_path):
    model = adapted(method)
    randomize_m(model)
    save_adapter(model, tmp_path)
    for other in [quantized_llama("fp4"), quantized_llama("bnb-int8"), tiny_model("llama")]:
        before = storage(other)
        with pytest.raises(AdapterMismatchError, match=r"quantization"):
            load_adapter(other, tmp_path)
        assert same_storage(storage(other), before) and not hasattr(other, "pica_bank")
    # nf4 with another block size: the same method and type, still refused.
    if method == "nf4":
        with pytest.raises(AdapterMismatchError, match=r"'block_size': 128"):
            load_adapter(quantize_base(tiny_model("llama"), "nf4", block_size=128), tmp_path)


@pytest.mark.parametrize("method", METHODS)
def test_merge_requantizes_with_warning_and_unmerge_restores_bit_for_bit(method):
    model = adapted(method)
    randomize_m(model, scale=0.01)
    expected = logits(model)
    before = storage(model)
    with pytest.warns(UserWarning, match="lossy"):
        merge(model)
    merged = logits(model)
    # Lossy, but the quantization error of a small ΔW: far closer to the adapted model than to... a wrong merge.
    assert not same_storage(storage(model), before)
    rel = ((merged - expected).abs().max() / expected.abs().max()).item()
    assert rel < 0.5, rel
    unmerge(model)
    assert same_storage(storage(model), before)
    assert torch.equal(logits(model), expected)


def test_merge_on_nf4_keeps_the_layer_nf4_with_its_quantization_settings():
    """A merge re-quantizes W0 + ΔW the way W0 was quantized: still a Linear4bit, same quant type, block size
    (128 here, not the default 64), double quantization, dtypes and storage; its weight is bitsandbytes' own
    quantization of W0 + ΔW with those settings (the same computation: bit for bit)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    model = apply_pica(quantize_base(tiny_model("llama"), "nf4", block_size=128, double_quant=True),
                       PiCaConfig(rank=8, target_modules=TINY_TARGETS["llama"]), progress=False)
    randomize_m(model, scale=0.01)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PiCaLinear)}

    def settings(base):
        qs = base.weight.quant_state
        return (type(base).__name__, qs.quant_type, int(qs.blocksize), bool(qs.nested), qs.dtype, qs.shape,
                base.weight.quant_storage, base.weight.dtype, base.compute_dtype)

    before = {n: settings(layer.base_layer) for n, layer in layers.items()}
    assert all(s[:4] == ("Linear4bit", "nf4", 128, True) for s in before.values())
    targets = {n: dequantized_weight(layer.base_layer).float() + layer.delta_weight().float()
               for n, layer in layers.items()}
    with pytest.warns(UserWarning, match="lossy"):
        merge(model)
    for n, layer in layers.items():
        base = layer.base_layer
        assert settings(base) == before[n], n
        assert quant_info(base) == layer.quantization, n
        kind, quant_type, block, nested, dtype = before[n][:5]
        fresh = bnb.nn.Params4bit(targets[n].to(dtype), requires_grad=False, quant_type=quant_type, blocksize=block,
                                  compress_statistics=nested, quant_storage=before[n][6]).to("cpu")
        want = dequantize_4bit(fresh.data, fresh.quant_state)
        assert torch.equal(dequantize_4bit(base.weight.data, base.weight.quant_state), want), n


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_unload_dequantize_gives_a_plain_model(method):
    model = adapted(method)
    randomize_m(model, scale=0.01)
    expected = logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no re-quantization (and so no lossy warning) on this path
        plain = merge_and_unload(model, dequantize=True)
    assert not any(is_quantized_base(m) or isinstance(m, PiCaLinear) for m in plain.modules())
    assert all(type(m) is nn.Linear for n, m in plain.named_modules() if n.endswith(("q_proj", "o_proj", "down_proj")))
    assert not hasattr(plain, "pica_bank")
    rel = ((logits(plain) - expected).abs().max() / expected.abs().max()).item()
    # fp32 dequantized weights + ΔW, rounded once: equal to base(x) + term up to fp32 GEMM reordering.
    assert rel <= 1e-5, rel


def test_merge_and_unload_dequantize_16_bit():
    model = apply_pica(quantized_llama("nf4", torch.bfloat16), PiCaConfig(rank=8), progress=False)
    plain = merge_and_unload(model, dequantize=True)
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    assert not any(is_quantized_base(m) for m in plain.modules())


@pytest.mark.parametrize("method", ["nf4", "torchao-int8"])
def test_export_lora_with_a_quantized_base(method, tmp_path):
    import peft

    model = adapted(method)
    randomize_m(model)
    expected = logits(model)
    export_lora(model, tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        lora = peft.PeftModel.from_pretrained(quantized_llama(method), tmp_path)
    actual = logits(lora)
    assert ((actual - expected).abs().max() / expected.abs().max()).item() <= 1e-6


def test_quantize_base_names_the_extra_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ImportError, match=r"pica_kernels\[quant\]"):
        quantize_base(tiny_model("llama"), "nf4")
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_base(tiny_model("llama"), "int3")


@pytest.mark.slow
def test_smollm2_nf4_end_to_end(smollm2, smollm2_base, tmp_path):
    from pica_kernels import parameter_report

    model, tok = smollm2
    quantize_base(model, "nf4")
    apply_pica(model, PiCaConfig(rank=8, target_modules=["q_proj", "v_proj"]), progress=False)
    report = parameter_report(model)
    # One M per role (q: 576x8, v: 192x8), shared by the 30 layers; the nf4 base counts as frozen.
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) == 576 * 8 + 192 * 8
    # Real text: GSM-8K train rows shipped in tests/data.
    rows = [json.loads(line) for line in (DATA_DIR / "gsm8k" / "train.jsonl").open()][:1]
    enc = tok([f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows], return_tensors="pt",
              padding="max_length", truncation=True, max_length=48)
    ids, labels = enc.input_ids, enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(4):
        loss = model(ids, attention_mask=enc.attention_mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    with torch.no_grad():
        expected = model(ids).logits
    save_adapter(model, tmp_path)
    fresh = quantize_base(copy.deepcopy(smollm2_base[0]), "nf4")
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


@pytest.mark.parametrize("method", ["nf4", "torchao-int8"])
def test_peft_front_end_on_a_quantized_base(method, tmp_path):
    from peft import PeftModel, get_peft_model

    from pica_kernels.peft import PiCaPeftConfig

    base = quantized_llama(method)
    y_base = logits(base)
    model = get_peft_model(base, PiCaPeftConfig(r=4, target_modules=TINY_TARGETS["llama"]))
    assert torch.equal(logits(model), y_base)
    before = storage(model.base_model.model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    trained = logits(model)
    with pytest.warns(UserWarning, match="lossy"):
        model.merge_adapter()
    model.unmerge_adapter()
    after = {k: v for k, v in storage(model.base_model.model).items()}
    assert {k: v for k, v in after.items() if "pica" not in k}.keys() == {k for k in before if "pica" not in k}
    assert all(torch.equal(after[k], before[k]) for k in before if "pica" not in k)
    assert torch.equal(logits(model), trained)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(quantized_llama(method), tmp_path)
    assert torch.equal(logits(reloaded), trained)
    export_lora(model, tmp_path / "lora")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        lora = PeftModel.from_pretrained(quantized_llama(method), tmp_path / "lora")
    assert ((logits(lora) - trained).abs().max() / trained.abs().max()).item() <= 1e-6
