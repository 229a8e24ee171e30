"""Stateful property test of the adapter state, over both front ends (native and PEFT).

Random sequences of add / set / merge / unmerge / disable / delete / save+load / mixed batch, and any of them with
a failure (an exception or a KeyboardInterrupt) injected at its k-th call of an inner function, on a small float64
model with adapters covering different layer subsets, ranks and sides. After every step the model's output equals
the one computed with reference math from a plain copy of the base model in the expected state (W0, plus the merged
stack where merged, plus the active adapter where not), and PEFT's / the native bookkeeping agrees with that state;
a step that failed changed nothing (every tensor bit for bit, requires_grad, module tree, state).

Budget: a fixed number of examples and steps, derandomised (the same sequences every run), so the run time is fixed.
The stacked-merge cases the machine must meet are also pinned as plain tests below (and on quantized bases).
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

import pica_kernels as pk
from pica_kernels import reference
from pica_kernels.core import merge as core_merge
from pica_kernels.core.state import Transaction
from pica_kernels.native.apply import pica_layers
from pica_kernels.native.layer import PiCaLinear
from pica_kernels.native.model import adapter_state

LAYERS = ("q_proj", "v_proj", "o_proj")
#: name -> (targets, rank, side): different layer subsets, ranks and sides.
SPECS = {
    "A": (["q_proj", "v_proj", "o_proj"], 2, "input"),
    "B": (["q_proj"], 3, "input"),
    "C": (["v_proj", "o_proj"], 1, "input"),
    "D": (["o_proj", "q_proj"], 2, "output"),
}
X = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
ATOL = 1e-10


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)
        self.o_proj = nn.Linear(8, 6)

    def forward(self, x):
        return self.o_proj(torch.tanh(self.v_proj(torch.tanh(self.q_proj(x)))))


def reference_forward(weights: dict[str, tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(F.linear(x, *weights["q_proj"]))
    h = torch.tanh(F.linear(h, *weights["v_proj"]))
    return F.linear(h, *weights["o_proj"])


class Injected(Exception):
    pass


class _Fail:
    """Replaces a function: the k-th call raises ``exc`` (a failure or a Ctrl-C half-way), others run it."""

    def __init__(self, real, k, exc):
        self.real, self.k, self.exc, self.calls = real, k, exc, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.k:
            raise self.exc()
        return self.real(*args, **kwargs)

    def __get__(self, obj, objtype=None):
        return self if obj is None else functools.partial(self, obj)


class AdapterMachine(RuleBasedStateMachine):
    """The expected state (adapters in order, active, merged stack) beside the real model."""

    peft = False

    def __init__(self) -> None:
        super().__init__()
        self.base = Net().double()
        self.w0 = {n: (getattr(self.base, n).weight.detach().clone(), getattr(self.base, n).bias.detach().clone())
                   for n in LAYERS}
        self.adapters: list[str] = []
        self.active: list[str] = []
        self.merged: list[str] = []
        self.delta: dict[tuple[str, str], torch.Tensor] = {}
        self.seeds = iter(range(1000))
        import tempfile

        self.tmp = tempfile.TemporaryDirectory()

    def teardown(self) -> None:
        self.tmp.cleanup()

    # ------------------------------------------------------------------ front end
    def _config(self, name):
        targets, rank, side = SPECS[name]
        if self.peft:
            from pica_kernels.peft import PiCaPeftConfig

            return PiCaPeftConfig(r=rank, side=side, target_modules=targets, store_bases=True)
        return pk.PiCaConfig(rank=rank, side=side, target_modules=targets, store_bases=True)

    def _layers(self):
        if self.peft:
            from pica_kernels.peft import PiCaPeftLinear

            return {n.rpartition(".")[2]: m for n, m in self.model.named_modules() if isinstance(m, PiCaPeftLinear)}
        return {n: m for n, m in pica_layers(self.model)}

    def _covers(self, name, layer):
        return layer in SPECS[name][0]

    def _tensors(self, layer_module, name):
        if self.peft:
            return layer_module.pica_basis[name], layer_module.get_m(name), layer_module.pica_side[name]
        return layer_module.basis(name), layer_module.m(name), layer_module.adapters[name].side

    def _m_params(self, name):
        bank = self.model.base_model.pica_M if self.peft else self.model.pica_bank
        return list(bank[name].values())

    def _add(self, name):
        if self.peft:
            if not hasattr(self, "model"):
                from peft import get_peft_model

                self.model = get_peft_model(self.base, self._config(name), adapter_name=name)
            else:
                self.model.add_adapter(name, self._config(name))
        else:
            if not hasattr(self, "model"):
                self.model = self.base
            pk.apply_pica(self.model, self._config(name), adapter_name=name, progress=False)

    def _after_add(self, name):
        gen = torch.Generator().manual_seed(next(self.seeds))
        with torch.no_grad():
            for p in self._m_params(name):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
        for lname, module in self._layers().items():
            if self._covers(name, lname):
                basis, m, side = self._tensors(module, name)
                self.delta[(name, lname)] = reference.delta_weight(basis.double(), m.double(), side).detach().clone()

    # ------------------------------------------------------------------ expected output
    def _weights(self, *, merged_only=None, adapter=None, disabled=False):
        out = {}
        for lname in LAYERS:
            w, b = self.w0[lname]
            if not disabled:
                stack = [a for a in self.merged if self._covers(a, lname)]
                if adapter is not None:
                    stack = [adapter] if self._covers(adapter, lname) else []
                elif not stack:
                    stack = [a for a in self.active if self._covers(a, lname)]
                for a in stack:
                    w = w + self.delta[(a, lname)]
            out[lname] = (w, b)
        return out

    def expected(self, disabled=False):
        return reference_forward(self._weights(disabled=disabled), X)

    def expected_mixed(self, names):
        rows = [reference_forward(self._weights(adapter=None if n == "__base__" else n,
                                                disabled=n == "__base__"), X[i: i + 1])
                for i, n in enumerate(names)]
        return torch.cat(rows)

    def output(self, **kw):
        with torch.no_grad():
            return self.model(X, **kw)

    # ------------------------------------------------------------------ the step snapshot
    def snapshot(self):
        return {
            "tensors": {k: v.detach().clone() for k, v in self.model.state_dict(keep_vars=True).items()},
            "grad": {k: p.requires_grad for k, p in self.model.named_parameters()},
            "tree": [(n, type(m).__name__) for n, m in self.model.named_modules()],
            "state": self.state(),
            "peft": (list(self.model.active_adapters), sorted(self.model.peft_config)) if self.peft else None,
        }

    def state(self):
        return self.model.base_model.adapter_state if self.peft else adapter_state(self.model)

    def assert_unchanged(self, before):
        after = self.snapshot()
        assert after["tree"] == before["tree"]
        assert after["state"] == before["state"]
        assert after["grad"] == before["grad"]
        assert after["peft"] == before["peft"]
        assert list(after["tensors"]) == list(before["tensors"])
        for k, v in before["tensors"].items():
            assert torch.equal(after["tensors"][k], v), k

    # ------------------------------------------------------------------ rules
    @initialize()
    def start(self):
        self._add("A")
        self._after_add("A")
        self.adapters, self.active = ["A"], ["A"]

    def _do(self, op, name=None, names=None):
        """Run ``op`` and update the expected state; returns the output a selection computed (mixed batch)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if op == "add":
                self._add(name)
                self.adapters.append(name)
                self._after_add(name)
            elif op == "set":
                if self.peft:
                    self.model.set_adapter(name)
                    if self.active != [name]:
                        self.merged = []  # PEFT unmerges before switching
                elif self.merged and name not in self.merged:
                    with pytest.raises(RuntimeError, match="merged"):
                        pk.set_adapter(self.model, name)
                    return None
                else:
                    pk.set_adapter(self.model, name)
                self.active = [name]
            elif op == "merge":
                if self.peft:
                    self.model.base_model.merge_adapter(adapter_names=[name])
                else:
                    pk.merge(self.model, name)
                if name not in self.merged:
                    self.merged.append(name)
            elif op == "unmerge":
                if self.peft:
                    self.model.base_model.unmerge_adapter()
                else:
                    pk.unmerge(self.model)
                self.merged = []
            elif op == "delete":
                if name in self.merged:
                    with pytest.raises((RuntimeError, ValueError), match="merged"):
                        (self.model.delete_adapter(name) if self.peft else pk.delete_adapter(self.model, name))
                    return None
                (self.model.delete_adapter(name) if self.peft else pk.delete_adapter(self.model, name))
                self.adapters.remove(name)
                self.delta = {k: v for k, v in self.delta.items() if k[0] != name}
                active = [a for a in self.active if a != name]
                if not active and name in self.active:
                    active = (sorted(self.adapters) if self.peft else self.adapters)[:1]
                self.active = active
            elif op == "save_load":
                path = self.tmp.name + f"/{name}-{next(self.seeds)}"
                if self.peft:
                    self.model.save_pretrained(path, selected_adapters=[name])
                    sub = path if name == "default" else f"{path}/{name}"
                    self.model.load_adapter(sub, adapter_name=name, is_trainable=True)
                else:
                    pk.save_adapter(self.model, path, name)
                    if self.merged:
                        with pytest.raises(pk.AdapterMismatchError, match="merged"):
                            pk.load_adapter(self.model, path, progress=False)
                        return None
                    pk.load_adapter(self.model, path, progress=False)
                    self.active = [name]
            elif op == "mixed":
                if self.merged:
                    with pytest.raises(ValueError, match="merged"):
                        self._mixed(names)
                    return None
                return self._mixed(names)
        return None

    def _mixed(self, names):
        if self.peft:
            return self.output(adapter_names=names)
        with pk.mixed_batch(self.model, names):
            return self.output()

    @rule(name=st.sampled_from(sorted(SPECS)))
    def add(self, name):
        if name not in self.adapters:
            self._do("add", name)

    @rule(data=st.data())
    def set(self, data):
        self._do("set", data.draw(st.sampled_from(self.adapters)))

    @rule(data=st.data())
    def merge(self, data):
        self._do("merge", data.draw(st.sampled_from(self.adapters)))

    @rule()
    def unmerge(self):
        self._do("unmerge")

    @precondition(lambda self: len(self.adapters) >= 2)
    @rule(data=st.data())
    def delete(self, data):
        self._do("delete", data.draw(st.sampled_from(self.adapters)))

    @rule(data=st.data())
    def save_load(self, data):
        self._do("save_load", data.draw(st.sampled_from(self.adapters)))

    @rule(data=st.data())
    def mixed(self, data):
        names = data.draw(st.lists(st.sampled_from([*self.adapters, "__base__"]), min_size=2, max_size=2))
        y = self._do("mixed", names=names)
        if y is not None:
            torch.testing.assert_close(y, self.expected_mixed(names), atol=ATOL, rtol=0)

    @rule()
    def disable(self):
        with torch.no_grad():
            if self.peft:
                with self.model.disable_adapter():
                    y = self.output()
            else:
                with pk.disable_adapter(self.model):
                    y = self.output()
        torch.testing.assert_close(y, self.expected(disabled=True), atol=ATOL, rtol=0)

    def _failing(self, op, data, k, interrupt):
        """``op`` with a failure injected at the k-th call of an inner function: all or nothing."""
        if op == "add":
            free = [n for n in SPECS if n not in self.adapters]
            if not free:
                return
            name = data.draw(st.sampled_from(free))
        elif op == "delete":
            name = data.draw(st.sampled_from([a for a in self.adapters if a not in self.merged] or self.adapters))
        else:
            name = data.draw(st.sampled_from(self.adapters))
        targets = {
            "add": [(self._layer_cls(), "update_layer" if self.peft else "_add_structure"), (Transaction, "publish")],
            "set": [(Transaction, "publish"), (core_merge, "set_stack")],
            "merge": [(core_merge, "set_stack"), (Transaction, "publish")],
            "unmerge": [(core_merge, "set_stack")],
            "delete": [(self._layer_cls(), "delete_adapter" if self.peft else "_remove_structure")],
            # Native load copies M in with copy_ inside its transaction; PEFT's own load_state_dict does, after ours.
            "save_load": [(Transaction, "publish")] + ([] if self.peft else [(torch.Tensor, "copy_")]),
        }[op]
        owner, attr = data.draw(st.sampled_from(targets))
        exc = KeyboardInterrupt if interrupt else Injected
        before = self.snapshot()
        expected = (list(self.adapters), list(self.active), list(self.merged), dict(self.delta))
        own = attr in vars(owner)
        real = vars(owner)[attr] if own else None
        setattr(owner, attr, _Fail(getattr(owner, attr), k, exc))

        def put_back():
            if own:
                setattr(owner, attr, real)
            elif attr in vars(owner):
                delattr(owner, attr)

        try:
            self._do(op, name)
        except (Injected, KeyboardInterrupt):
            put_back()
            self.adapters, self.active, self.merged, self.delta = expected
            self.assert_unchanged(before)
        finally:
            put_back()

    # A failure at call 2 or 3 of a per-layer step: some layers were changed when it came.
    @rule(data=st.data(), k=st.integers(1, 3), interrupt=st.booleans())
    def failing_add(self, data, k, interrupt):
        self._failing("add", data, k, interrupt)

    @rule(data=st.data(), k=st.integers(1, 3), interrupt=st.booleans())
    def failing_set(self, data, k, interrupt):
        self._failing("set", data, k, interrupt)

    @rule(data=st.data(), k=st.integers(1, 3), interrupt=st.booleans())
    def failing_merge(self, data, k, interrupt):
        self._failing("merge", data, k, interrupt)

    @precondition(lambda self: bool(self.merged))
    @rule(data=st.data(), k=st.integers(1, 3), interrupt=st.booleans())
    def failing_unmerge(self, data, k, interrupt):
        self._failing("unmerge", data, k, interrupt)

    @precondition(lambda self: len(self.adapters) >= 2)
    @rule(data=st.data(), k=st.integers(1, 3), interrupt=st.booleans())
    def failing_delete(self, data, k, interrupt):
        self._failing("delete", data, k, interrupt)

    @rule(data=st.data(), k=st.integers(1, 3), interrupt=st.booleans())
    def failing_save_load(self, data, k, interrupt):
        self._failing("save_load", data, k, interrupt)

    def _layer_cls(self):
        if self.peft:
            from pica_kernels.peft import PiCaPeftLinear

            return PiCaPeftLinear
        return PiCaLinear

    # ------------------------------------------------------------------ after every step
    @invariant()
    def output_is_the_expected_states(self):
        if not hasattr(self, "model"):
            return
        torch.testing.assert_close(self.output(), self.expected(), atol=ATOL, rtol=0)

    @invariant()
    def bookkeeping_agrees(self):
        if not hasattr(self, "model"):
            return
        state = self.state()
        assert list(state.adapters) == self.adapters and list(state.active) == self.active
        assert list(state.merged) == self.merged and not state.disabled
        for lname, layer in self._layers().items():
            assert layer.merged_adapters == [a for a in self.merged if self._covers(a, lname)]
            if self.peft:
                assert layer.active_adapters == self.active and layer.disable_adapters is False
            else:
                assert layer.active_adapter == next((a for a in self.active if self._covers(a, lname)), None)
        if self.peft:
            assert list(self.model.active_adapters) == self.active
            assert sorted(self.model.peft_config) == sorted(self.adapters)
            assert self.model.base_model.merged == bool(self.merged)


class PeftAdapterMachine(AdapterMachine):
    peft = True


# Fixed budget: the same sequences every run (derandomize), sized for ~1 minute on a quiet 2-core machine.
_BUDGET = settings(max_examples=20, stateful_step_count=12, derandomize=True, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))

TestNativeAdapterState = AdapterMachine.TestCase
TestNativeAdapterState.settings = _BUDGET
TestPeftAdapterState = PeftAdapterMachine.TestCase
TestPeftAdapterState.settings = _BUDGET


# ------------------------------------------------------------------ pinned cases
def _stacked(model_factory):
    model = model_factory()
    pk.apply_pica(model, pk.PiCaConfig(rank=2, target_modules=list(LAYERS)), adapter_name="a", progress=False)
    pk.apply_pica(model, pk.PiCaConfig(rank=2, target_modules=["q_proj", "o_proj"]), adapter_name="b",
                  progress=False)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.pica_bank.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def test_after_two_stacked_merges_unmerge_leaves_every_layer_unmerged_and_disabled_is_the_base():
    model = _stacked(lambda: Net().double())
    base = copy.deepcopy(model)
    with torch.no_grad():
        with pk.disable_adapter(base):
            y0 = base(X)
        y_a = model(X)
    pk.merge(model, "a")
    pk.merge(model, "b")
    pk.unmerge(model)
    assert all(not layer.merged and layer.merged_adapters == [] for _, layer in pica_layers(model))
    assert all(core_merge.ORIGINAL_WEIGHT not in layer._buffers for _, layer in pica_layers(model))
    with torch.no_grad():
        with pk.disable_adapter(model):
            assert torch.equal(model(X), y0)
        assert torch.equal(model(X), y_a)  # the active adapter's term again (not dropped as "merged")
    pk.merge(model, "a")  # the next merge works from W0
    q = model.q_proj
    assert torch.equal(q.base_layer.weight, (base.q_proj.base_layer.weight + q.delta_weight("a")).to(torch.float64))


@pytest.mark.parametrize("method", ["nf4", "bnb-int8"])
def test_stacked_merges_on_a_quantized_base_add_each_delta_once_and_unmerge_restores_the_storage(method):
    pytest.importorskip("bitsandbytes")
    from pica_kernels.core.quant import dequantized_weight, quantize_base

    model = _stacked(lambda: quantize_base(Net(), method))
    layers = dict(pica_layers(model))
    storage = {n: (layer.base_layer.weight.data.clone(), layer.base_layer.weight) for n, layer in layers.items()}
    w0 = {n: dequantized_weight(layer.base_layer).float() for n, layer in layers.items()}
    # The error one re-quantization of this weight makes (quantize W0 + ΔW_a once, compare with it).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pk.merge(model, "a")
        once = {n: (dequantized_weight(layer.base_layer).float() - w0[n] - layer.delta_weight("a").float())
                for n, layer in layers.items()}
        pk.merge(model, "b")
    for n, layer in layers.items():
        want = w0[n] + layer.delta_weight("a").float() + (layer.delta_weight("b").float() if n != "v_proj" else 0)
        err = (dequantized_weight(layer.base_layer).float() - want).abs().max()
        # One re-quantization of W0 + ΔW_a + ΔW_b (not of an already re-quantized weight, not ΔW_a twice).
        assert err <= 2 * once[n].abs().max() + 1e-6, (n, float(err))
        if n != "v_proj":
            double_a = (dequantized_weight(layer.base_layer).float() - want - layer.delta_weight("a").float())
            assert double_a.abs().max() > err  # ΔW_a counted twice would be this far off
    pk.unmerge(model)
    for n, layer in layers.items():
        assert layer.base_layer.weight is storage[n][1]  # the original storage object back
        assert torch.equal(layer.base_layer.weight.data, storage[n][0])  # bit for bit
        assert not layer.merged
