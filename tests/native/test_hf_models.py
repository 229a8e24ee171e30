"""apply / train / save / load / merge on tiny randomly initialised Llama, Gemma, BERT and GPT-2."""

import pytest
import torch
from conftest import TINY_TARGETS, tiny_model

import pica_kernels as pk
from pica_kernels.native.apply import pica_layers
from pica_kernels.native.layer import PiCaLinear

ARCHS = ["llama", "gemma", "bert", "gpt2"]


def _batch(arch):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (4, 10), generator=g)


def _output(model, arch, ids):
    out = model(input_ids=ids)
    return out.last_hidden_state if arch == "bert" else out.logits


def _loss(model, arch, ids):
    if arch == "bert":  # regress the hidden state onto a fixed random target
        target = torch.randn(ids.shape + (48,), generator=torch.Generator().manual_seed(2))
        return (model(input_ids=ids).last_hidden_state - target).square().mean()
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("arch", ARCHS)
def test_train_save_load_merge(arch, tmp_path):
    ids = _batch(arch)
    model = tiny_model(arch)
    base_out = _output(model, arch, ids)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    pk.apply_pica(model, pk.PiCaConfig(rank=4, target_modules=TINY_TARGETS[arch]), progress=False)
    assert torch.equal(_output(model, arch, ids), base_out)
    n_layers = len(list(pica_layers(model)))
    assert n_layers == {"llama": 15, "gemma": 15, "bert": 18, "gpt2": 12}[arch]  # gpt2: c_attn, attn.c_proj, c_fc, mlp.c_proj

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = _loss(model, arch, ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():  # only the M moved
        if "pica_bank" not in name:
            assert torch.equal(p, originals[name.replace(".base_layer", "")]), name
    tuned = _output(model, arch, ids)
    assert not torch.allclose(tuned, base_out)

    path = pk.save_adapter(model, tmp_path / arch)
    fresh = pk.load_adapter(tiny_model(arch), path, progress=False)
    assert torch.equal(_output(fresh, arch, ids), tuned)

    pk.merge(model)
    torch.testing.assert_close(_output(model, arch, ids), tuned, atol=1e-5, rtol=1e-5)
    pk.unmerge(model)
    assert all(torch.equal(p, originals[n.replace(".base_layer", "")])
               for n, p in model.named_parameters() if "pica_bank" not in n)
    plain = pk.merge_and_unload(fresh)
    assert not any(isinstance(m, PiCaLinear) for m in plain.modules())
    assert set(plain.state_dict()) == set(tiny_model(arch).state_dict())
    torch.testing.assert_close(_output(plain, arch, ids), tuned, atol=1e-5, rtol=1e-5)
