"""Every op refuses a bad argument on every path (eager reference, Triton), naming it, and checks it once per call.

The cases of the robustness list that reach the ops: a 0-d ``x`` (was an ``IndexError``), a bias whose dtype
differs from ``x`` (a cryptic matmul error on the reference path, accepted silently by the Triton path), and
integer or bool factors (cast silently). Each is run through each public op, on the reference path and the
Triton path (CPU interpreter without a GPU), next to the same call with good arguments, which must run.
"""

from __future__ import annotations

import collections
import functools

import pytest
import torch
from kernel_helpers import DEVICE, needs_triton
from torch import nn

from pica_kernels import PiCaLinear, reference
from pica_kernels.ops import checks, grouped_lowrank_linear, lowrank_linear, multitask_pica_linear, pica_linear

BACKENDS = ["auto", pytest.param("triton", marks=needs_triton)]
OUT, IN, R = 6, 8, 2


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    return dict(x=t(3, IN), weight=t(OUT, IN), bias=t(OUT), basis=t(R, IN), m=t(OUT, R))


def _lowrank(a, backend):
    return lowrank_linear(a["x"], a["weight"], a["bias"], a["m"], a["basis"], backend=backend)


def _pica(a, backend):
    return pica_linear(a["x"], a["weight"], a["bias"], a["basis"], a["m"], backend=backend)


def _grouped(a, backend):
    return grouped_lowrank_linear(a["x"], [a["weight"]] * 2, [a["bias"]] * 2, [a["m"]] * 2,
                                  torch.cat([a["basis"], a["basis"]]), [R, R], backend=backend)[0]


def _multitask(a, backend):
    x = a["x"].reshape(1, *a["x"].shape) if a["x"].dim() else a["x"]
    return multitask_pica_linear(x, a["weight"], a["bias"], a["basis"], torch.stack([a["m"], a["m"]]),
                                 torch.zeros(x.shape[0] if x.dim() else 1, dtype=torch.long, device=DEVICE),
                                 backend=backend)


OPS = {"lowrank_linear": _lowrank, "pica_linear": _pica, "grouped": _grouped, "multitask": _multitask}
# (change, error class, message naming the argument; per op where the argument has another name there)
CASES = {
    "0-d x": (lambda a: {**a, "x": torch.tensor(1.0, device=DEVICE)}, ValueError, r"x must be \(\.\.\., in=8\), got shape \(\)"),
    "bias dtype": (lambda a: {**a, "bias": a["bias"].double()}, TypeError,
                   r"bias(es\[0\])? has dtype torch.float64 but x has torch.float32"),
    "int basis": (lambda a: {**a, "basis": a["basis"].long()}, TypeError,
                  {"lowrank_linear": "b must be a floating-point tensor, got torch.int64",
                   "grouped": "b_cat must be a floating-point tensor, got torch.int64",
                   None: "basis must be a floating-point tensor, got torch.int64"}),
    "bool m": (lambda a: {**a, "m": a["m"] > 0}, TypeError,
               {"lowrank_linear": "a must be a floating-point tensor, got torch.bool",
                "grouped": r"a\[0\] must be a floating-point tensor, got torch.bool",
                "multitask": "m_stack must be a floating-point tensor, got torch.bool",
                None: "m must be a floating-point tensor, got torch.bool"}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", CASES)
def test_bad_argument_is_refused_naming_it_on_every_path(case, op, backend):
    change, error, message = CASES[case]
    if isinstance(message, dict):
        message = message.get(op, message[None])
    good = _tensors()
    assert OPS[op](good, backend).shape[-1] == OUT  # the path runs with good arguments
    with pytest.raises(error, match=message):
        OPS[op](change(good), backend)


@pytest.fixture
def check_calls(monkeypatch):
    """Counts the calls of each check function (the real ones run)."""
    calls = collections.Counter()
    for name in ("check_x", "check_weight", "check_bias", "check_factor"):
        real = getattr(checks, name)

        @functools.wraps(real)
        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(checks, name, counted)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["lowrank_linear", "pica_linear"])
def test_each_argument_is_checked_once_per_call(check_calls, op, backend):
    OPS[op](_tensors(), backend)
    assert check_calls == {"check_x": 1, "check_weight": 1, "check_bias": 1, "check_factor": 2}


def test_grouped_checks_x_and_b_cat_once_not_per_projection(check_calls):
    _grouped(_tensors(), "auto")
    assert check_calls == {"check_x": 1, "check_weight": 2, "check_bias": 2, "check_factor": 3}


def test_layer_forward_checks_x_once(check_calls):
    layer = PiCaLinear(nn.Linear(IN, OUT), rank=R).to(DEVICE)
    layer(torch.randn(3, IN, device=DEVICE))
    assert check_calls["check_x"] == 1 and check_calls["check_bias"] == 1
    check_calls.clear()
    layer.disabled = True  # the base layer alone: checked by the layer, once
    layer(torch.randn(3, IN, device=DEVICE))
    assert check_calls == {"check_x": 1}
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., in=8\), got shape \(\)"):
        layer(torch.tensor(1.0, device=DEVICE))


def test_fallbacks_are_the_reference_math():
    """The ops' reference branches compute exactly what reference.py specifies (no second copy of the math)."""
    a = _tensors()
    b_cat = torch.cat([a["basis"], a["basis"] * 2])
    ys = grouped_lowrank_linear(a["x"], [a["weight"]] * 2, [a["bias"], None], [a["m"], a["m"] * 3], b_cat, [R, R],
                                backend="reference")
    want, _ = reference.grouped_lowrank_forward(a["x"], [a["weight"]] * 2, [a["bias"], None], [a["m"], a["m"] * 3],
                                                b_cat, [R, R])
    for y, w in zip(ys, want):
        torch.testing.assert_close(y, w, rtol=0, atol=0)
    x = torch.randn(3, 4, IN, device=DEVICE, requires_grad=True)
    m_stack = torch.stack([a["m"], -a["m"]]).requires_grad_()
    ids = torch.tensor([1, 0, 1], device=DEVICE)
    y = multitask_pica_linear(x, a["weight"], a["bias"], a["basis"], m_stack, ids, backend="reference")
    y_ref, t = reference.multitask_forward(x.detach(), a["weight"], a["bias"], m_stack.detach(), a["basis"], ids)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    dy = torch.randn_like(y)
    y.backward(dy)
    dx, _, dm = reference.multitask_backward(dy, t, a["weight"], m_stack.detach(), a["basis"], ids, True, False, True)
    torch.testing.assert_close(x.grad, dx, rtol=0, atol=0)
    torch.testing.assert_close(m_stack.grad, dm, rtol=0, atol=0)
    # and the multitask reference is the per-sequence PiCa reference
    for i in range(3):
        torch.testing.assert_close(y_ref[i], reference.pica_linear(x[i].detach(), a["weight"], a["bias"], a["basis"],
                                                                   m_stack[ids[i]].detach()))


@pytest.mark.parametrize("path", ["reference.lowrank_linear", "auto", "reference", "op/reference",
                                  pytest.param("triton", marks=needs_triton),
                                  pytest.param("op/triton", marks=needs_triton),
                                  pytest.param("backward-op/triton", marks=needs_triton)])
@pytest.mark.parametrize("ranks", [(R, R + 3), (R + 3, R)])
def test_factors_of_different_ranks_are_refused_on_every_path(path, ranks):
    """a (out, r_a) with b (r_b, in), r_a != r_b: a ValueError naming a and b wherever the call enters -- also the
    custom ops called directly (torch.ops), past the entry points; the Triton launches pad the rank and would
    read past the narrower factor."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, IN, generator=g).to(DEVICE), torch.randn(OUT, IN, generator=g).to(DEVICE)
    a, b = torch.randn(OUT, ranks[0], generator=g).to(DEVICE), torch.randn(ranks[1], IN, generator=g).to(DEVICE)
    calls = {
        "reference.lowrank_linear": lambda: reference.lowrank_linear(x, w, None, a, b),
        "op/reference": lambda: torch.ops.pica.lowrank_linear(x, w, None, a, b, "reference", 16),
        "op/triton": lambda: torch.ops.pica.lowrank_linear(x, w, None, a, b, "triton", 16),
        "backward-op/triton": lambda: torch.ops.pica.lowrank_linear_backward(
            torch.ones(3, OUT, device=DEVICE), x, x @ b.T, w, a, b, True, True, False, "triton"),
    }
    call = calls.get(path, lambda: lowrank_linear(x, w, None, a, b, backend=path))
    with pytest.raises(ValueError, match=r"\ba\b.*\bb\b|b must be"):
        call()
    # The same call with matching ranks runs.
    b = torch.randn(ranks[0], IN, generator=g).to(DEVICE)
    calls.get(path, lambda: lowrank_linear(x, w, None, a, b, backend=path))()
