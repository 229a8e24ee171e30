"""The real models load offline from their PyPI packages without those packages' own dependencies."""

import torch

from pica_kernels.registry_models import load_minilm


def test_minilm_loads_and_embeds():
    model, tok = load_minilm()
    assert type(model).__name__ == "BertModel"
    enc = tok(["PiCa adapts the column space.", "A cat sat on the mat."], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    assert hidden.shape[:2] == enc["input_ids"].shape and hidden.shape[-1] == 384
    assert torch.isfinite(hidden).all() and hidden.std() > 0.1
