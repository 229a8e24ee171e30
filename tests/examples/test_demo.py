"""examples/demo.py (``make demo``) on a 4-bit base: ``make demo QUANTIZE=nf4`` is wired to ``--quantize nf4``, and the
quantized path runs the whole job (few steps, low rank, one generated answer)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_demo():
    spec = importlib.util.spec_from_file_location("examples_demo", ROOT / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_make_demo_quantize_passes_the_switch(tmp_path):
    def demo_line(*extra):
        # -n: print the recipes without running them; a VENV that does not exist makes the demo line predictable.
        res = subprocess.run(["make", "-n", "-C", str(ROOT), "demo", f"VENV={tmp_path}/venv", *extra],
                             capture_output=True, text=True, check=True)
        return [line for line in res.stdout.splitlines() if "examples/demo.py" in line][-1]

    assert demo_line("QUANTIZE=nf4").split()[-3:] == ["examples/demo.py", "--quantize", "nf4"]
    assert demo_line().split()[-1] == "examples/demo.py"


@pytest.mark.slow
def test_demo_on_an_nf4_base(smollm2_base, tmp_path, capsys, monkeypatch):
    """The demo's quantized path end to end, on a small random Llama with SmolLM2's tokenizer: the real model in nf4
    is covered by tests/core/test_quant.py::test_smollm2_nf4_end_to_end (a full demo run on it costs minutes here)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    tok = smollm2_base[1]
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    base = tf.LlamaForCausalLM(cfg).eval()
    demo = _load_demo()
    monkeypatch.setenv("PICA_KERNELS_CACHE", str(tmp_path / "basis-cache"))  # the demo reports cold and warm
    out = tmp_path / "adapter"
    demo.main(["--quantize", "nf4", "--steps", "4", "--batch-size", "4", "--rank", "8", "--lr", "3e-2",
               "--generate", "1", "--out", str(out)], base_and_tok=(base, tok))
    text = capsys.readouterr().out
    assert "bitsandbytes.nn.modules.Linear4bit" in text and "'type': 'nf4'" in text
    assert "quantized storage) untouched by training: True" in text
    assert "identical to the trained model's: True" in text
    # step 1 computes and caches the bases of the nf4 layers (dequantized), the reload into a fresh quantization
    # reads every batch back, and both times are printed
    assert re.search(r"apply_pica took [\d.]+ s \(cold basis cache: \d+ SVD batches computed", text), text
    assert re.search(r"load_adapter into the fresh base took [\d.]+ s \(warm basis cache: all \d+ SVD batches "
                     r"read back", text), text
    assert "warned lossy: True" in text
    assert "(packed data and quant state) bit for bit: True" in text
    rel = float(re.search(r"PEFT LoRA logits vs PiCa: max relative error (\S+)", text).group(1))
    assert rel <= 1e-6, rel
    assert "merge_and_unload(dequantize=True) -> LlamaForCausalLM with no PiCa or quantized modules: True" in text
    losses = [float(v) for v in re.search(r"loss every 1 steps: (.*) ->", text).group(1).split()]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    adapter_cfg = json.loads((out.with_name("adapter-lora") / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["r"] == 8
    assert '"nf4"' in (out / "pica_config.json").read_text()  # the PiCa adapter file records the quantization
