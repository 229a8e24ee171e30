"""One source of truth for adapter state: the six ways the per-layer state used to go wrong, as a user meets them.

Each case combines documented multi-adapter calls on a two-layer model (``q_proj``, ``v_proj``) or a tiny Llama
and checks what the model computes afterwards (design: pica_kernels/core/state.py, docs/design.md "Adapter state").
The concurrency cases (6) are in tests/core/test_adapter_threads.py.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import randomize_m, tiny_model
from torch import nn

import pica_kernels as pk
from pica_kernels.native.apply import pica_layers
from pica_kernels.native.layer import PiCaLinear
from pica_kernels.native.model import active_adapter


class TwoLayer(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.v_proj(torch.tanh(self.q_proj(x)))


X = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))


def _two_layer(adapters: list[tuple[str, list[str]]], seed: int = 0) -> TwoLayer:
    model = TwoLayer()
    for name, targets in adapters:
        pk.apply_pica(model, pk.PiCaConfig(rank=2, target_modules=targets), adapter_name=name, progress=False)
    gen = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for p in model.pica_bank.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _layer_actives(model) -> list:
    return [layer.active_adapter for _, layer in pica_layers(model)]


def _everything(model) -> dict:
    """Every tensor (values), requires_grad flag, the module tree and each layer's view of the state."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "tree": [(n, type(m).__name__) for n, m in model.named_modules()],
        "layers": [(n, layer.active_adapter, list(layer.merged_adapters), layer.disabled)
                   for n, layer in pica_layers(model)],
    }


def _assert_same(model, before: dict) -> None:
    after = _everything(model)
    assert after["tree"] == before["tree"]
    assert after["layers"] == before["layers"]
    assert after["grad"] == before["grad"]
    assert list(after["tensors"]) == list(before["tensors"])
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k


# ------------------------------------------------------------------ case 1
def test_merging_another_adapter_does_not_change_the_active_one(tmp_path):
    model = _two_layer([("A", ["q_proj", "v_proj"]), ("B", ["q_proj"])])
    with torch.no_grad():
        y_a = model(X)
    pk.merge(model, "B")
    pk.unmerge(model)
    assert _layer_actives(model) == ["A", "A"] and active_adapter(model) == "A"
    with torch.no_grad():
        assert torch.equal(model(X), y_a)
    path = pk.save_adapter(model, tmp_path / "saved")
    assert json.loads((path / "pica_config.json").read_text())["adapter_name"] == "A"


# ------------------------------------------------------------------ case 2
def test_a_refused_set_adapter_changes_nothing():
    model = _two_layer([("A", ["q_proj", "v_proj"]), ("B", ["v_proj"])])
    pk.merge(model)  # A, on both layers
    with torch.no_grad():
        y = model(X)
    before = _everything(model)
    with pytest.raises(RuntimeError, match="merged"):
        pk.set_adapter(model, "B")
    _assert_same(model, before)
    with torch.no_grad():
        assert torch.equal(model(X), y)
    assert [layer.merged_adapters for _, layer in pica_layers(model)] == [["A"], ["A"]]


# ------------------------------------------------------------------ case 3
def test_a_new_adapter_starts_inactive_on_every_layer():
    model = _two_layer([("A", ["q_proj"]), ("B", ["v_proj"]), ("C", ["v_proj"])])
    assert active_adapter(model) == "A"
    assert _layer_actives(model) == ["A", None]  # v_proj: A does not cover it, B and C are inactive
    with torch.no_grad():
        y = model(X)
        for p in model.pica_bank["C"].parameters():  # "training" C changes nothing while A is active
            p.add_(1.0)
        assert torch.equal(model(X), y)


# ------------------------------------------------------------------ case 4
class _Interrupt:
    """Calls the real function, raising KeyboardInterrupt on call number ``after`` (a Ctrl-C half-way)."""

    def __init__(self, real, after=1):
        self.real, self.after, self.calls = real, after, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)

    def __get__(self, obj, objtype=None):  # patched onto a class: bind like the method it replaces
        return self if obj is None else functools.partial(self, obj)


def test_an_interrupted_load_onto_an_existing_adapter_restores_every_layer(tmp_path, monkeypatch):
    model = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=2, target_modules=["q_proj", "v_proj", "o_proj"]),
                          adapter_name="a", progress=False)
    pk.apply_pica(model, pk.PiCaConfig(rank=2, target_modules=["q_proj"]), adapter_name="n", progress=False)
    randomize_m(model, seed=2)
    pk.set_adapter(model, "n")
    path = pk.save_adapter(model, tmp_path / "n")
    pk.set_adapter(model, "a")
    randomize_m(model, seed=3)  # the file's M differ from the model's
    before = _everything(model)
    assert _layer_actives(model)[:3] == ["a", "a", "a"]
    # Ctrl-C while the layers switch to the loaded adapter: the per-layer switch (before) or the state's publication.
    monkeypatch.setattr(PiCaLinear, "unmerge", _Interrupt(PiCaLinear.unmerge))
    monkeypatch.setattr(PiCaLinear, "set_adapter", _Interrupt(PiCaLinear.set_adapter, 2))
    try:
        from pica_kernels.core.state import Transaction
    except ImportError:  # the per-layer state of earlier versions: the two patches above apply
        Transaction = None
    if Transaction is not None:
        monkeypatch.setattr(Transaction, "publish", _Interrupt(Transaction.publish))
    with pytest.raises(KeyboardInterrupt):
        pk.load_adapter(model, path, progress=False)
    monkeypatch.undo()
    _assert_same(model, before)
    assert active_adapter(model) == "a"


# ------------------------------------------------------------------ case 5
def _peft_saved(tmp_path):
    from peft import get_peft_model

    from pica_kernels.peft import PiCaPeftConfig

    model = get_peft_model(tiny_model("llama"), PiCaPeftConfig(r=4))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.base_model.pica_M["default"].values():
            m.copy_(torch.randn(m.shape, generator=gen) * 0.05)
    model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


def _caller_model_state(model) -> dict:
    return {
        "keys": list(model.state_dict()),
        "values": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "tree": [(n, type(m).__name__) for n, m in model.named_modules()],
        "attrs": sorted(model.__dict__),
        "hooks": (len(model._forward_pre_hooks), len(model._forward_hooks)),
    }


@pytest.mark.parametrize("edit", ["other_base", "rank", "truncated"])
def test_a_refused_peft_from_pretrained_leaves_the_callers_model_as_it_was(tmp_path, edit):
    from peft import PeftModel

    import pica_kernels.peft  # noqa: F401  (registers the method)

    path = _peft_saved(tmp_path)
    model = tiny_model("llama", seed=1 if edit == "other_base" else 0)
    if edit == "rank":
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["r"] = 2
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    elif edit == "truncated":
        from safetensors.torch import load_file, save_file

        tensors = load_file(path / "adapter_model.safetensors")
        tensors.pop(sorted(k for k in tensors if ".pica_M." in k)[0])
        save_file(tensors, path / "adapter_model.safetensors")
    before = _caller_model_state(model)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(ids).logits
    with pytest.raises(ValueError):  # AdapterMismatchError is a ValueError; PEFT's own checks raise ValueError
        PeftModel.from_pretrained(model, path)
    after = _caller_model_state(model)
    assert after["tree"] == before["tree"]  # no PiCaPeftLinear left injected
    assert after["keys"] == before["keys"]  # no key renamed to ...base_layer.weight
    assert after["grad"] == before["grad"] and after["attrs"] == before["attrs"] and after["hooks"] == before["hooks"]
    assert all(torch.equal(after["values"][k], v) for k, v in before["values"].items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, y)


# ------------------------------------------------------------------ the state value itself
def test_the_state_is_one_value_for_the_model_and_every_layer_reads_it():
    from pica_kernels.native.model import adapter_state

    model = _two_layer([("A", ["q_proj", "v_proj"]), ("B", ["q_proj"])])
    state = adapter_state(model)
    assert (state.adapters, state.active, state.merged, state.disabled) == (("A", "B"), ("A",), (), False)
    pk.merge(model, "A")
    pk.merge(model, "B")
    assert adapter_state(model).merged == ("A", "B")
    assert [layer.merged_adapters for _, layer in pica_layers(model)] == [["A", "B"], ["A"]]
    with pytest.raises(RuntimeError, match="model-level"):
        model.q_proj.merge("A")  # a layer of a larger model cannot change the model's state on its own
    with pytest.raises(dataclass_frozen_error()):
        state.active = ("B",)


def dataclass_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError
