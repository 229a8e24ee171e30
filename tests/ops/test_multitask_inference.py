"""The eager CPU inference path of multitask_pica_linear (ops.eager.grouped_inference) against the float64
reference, in each of its branches: one adapter, each adapter one run of sequences, interleaved runs of long
sequences (a GEMM per run), interleaved short sequences (a GEMM per adapter, index_add_)."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import assert_close_to_reference

from pica_kernels import reference
from pica_kernels.ops import eager, multitask_pica_linear

# (name, adapter ids, tokens per sequence); 5 adapters in m_stack, not all used.
CASES = [
    ("one-adapter", [3, 3, 3, 3, 3, 3], 7),
    ("blocks", [0, 0, 2, 2, 2, 4], 5),
    ("interleaved-long", [1, 4, 1, 0, 4, 1], 19),  # runs of 19 tokens: a GEMM per run
    ("interleaved-short", [1, 4, 1, 0, 4, 1], 1),  # decoding: a GEMM per adapter
    ("one-sequence", [2], 3),
]


def inputs(nseq, seq, dtype, bias=True, seed=0, in_f=24, out_f=20, rank=6, n=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(nseq, seq, in_f, generator=g, dtype=torch.float64)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    b = torch.randn(out_f, generator=g, dtype=torch.float64) * 0.1 if bias else None
    p = torch.linalg.qr(torch.randn(in_f, rank, generator=g, dtype=torch.float64))[0].T.contiguous()
    ms = torch.randn(n, out_f, rank, generator=g, dtype=torch.float64) * 0.5
    exact = (x, w, b, p, ms)
    return exact, tuple(None if v is None else v.to(dtype) for v in exact)


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of grouped_inference (the path under test must actually run)."""
    seen = []
    real = eager.grouped_inference
    monkeypatch.setattr(eager, "grouped_inference", lambda *a: seen.append(a[-1].tolist()) or real(*a))
    return seen


@pytest.mark.parametrize("as_list", [False, True], ids=["stack", "list"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(("case", "ids", "seq"), CASES, ids=[c[0] for c in CASES])
def test_inference_path_matches_the_reference(case, ids, seq, bias, dtype, as_list, calls):
    (x64, w64, b64, p64, ms64), (x, w, b, p, ms) = inputs(len(ids), seq, dtype, bias)
    adapter_ids = torch.tensor(ids)
    with torch.no_grad():
        y = multitask_pica_linear(x, w, b, p, list(ms) if as_list else ms, adapter_ids, backend="reference")
    assert calls == [ids]
    want, _ = reference.multitask_forward(x64, w64, b64, ms64, p64, adapter_ids)
    # And independently of multitask_forward: each sequence through the one-adapter reference.
    each = torch.stack([reference.pica_linear(x64[i], w64, b64, p64, ms64[k], "input") for i, k in enumerate(ids)])
    torch.testing.assert_close(want, each, atol=1e-12, rtol=1e-12)
    assert y.dtype == dtype and y.shape == want.shape
    assert_close_to_reference(y, want, dtype, "y")


def test_the_branches_are_the_ones_named(monkeypatch):
    """Each case above runs the branch its name says: count addmm_ (a run) and index_add_ (an adapter)."""
    used = []
    real_addmm, real_index_add = torch.Tensor.addmm_, torch.Tensor.index_add_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, *a, **k: used.append("run") or real_addmm(self, *a, **k))
    monkeypatch.setattr(torch.Tensor, "index_add_",
                        lambda self, *a, **k: used.append("adapter") or real_index_add(self, *a, **k))
    expected = {"one-adapter": ["run"], "blocks": ["run"] * 3, "interleaved-long": ["run"] * 6,
                "interleaved-short": ["adapter"] * 3, "one-sequence": ["run"]}
    for case, ids, seq in CASES:
        used.clear()
        _, (x, w, b, p, ms) = inputs(len(ids), seq, torch.float32)
        with torch.no_grad():
            eager.grouped_inference(x, w, b, p, ms, torch.tensor(ids))
        assert used == expected[case], case


def test_with_a_gradient_the_custom_op_runs_and_agrees(calls):
    """Training keeps the closed-form backward (the custom op); its forward equals the inference path's."""
    _, (x, w, b, p, ms) = inputs(4, 9, torch.float32)
    ids = torch.tensor([1, 0, 1, 3])
    msg = ms.clone().requires_grad_()
    y_train = multitask_pica_linear(x, w, b, p, msg, ids, backend="reference")
    assert calls == [] and y_train.requires_grad
    with torch.no_grad():
        y_serve = multitask_pica_linear(x, w, b, p, ms, ids, backend="reference")
    assert calls == [ids.tolist()]
    torch.testing.assert_close(y_serve, y_train.detach(), atol=2e-5, rtol=2e-5)
    # requires_grad but no graph being built (no_grad): inference path; grad mode with frozen inputs: inference path
    y_plain = multitask_pica_linear(x, w, b, p, ms, ids, backend="reference")
    assert len(calls) == 2 and not y_plain.requires_grad


def test_empty_sequences():
    _, (x, w, b, p, ms) = inputs(3, 0, torch.float32)
    with torch.no_grad():
        y = eager.grouped_inference(x, w, b, p, ms, torch.tensor([0, 1, 0]))
    assert y.shape == (3, 0, 20)


def test_a_list_of_m_trains_through_the_custom_op(calls):
    """A list of (out, r) M's in several dtypes: with a gradient the op stacks them (promoted dtype) and each M
    gets the gradient of its own sequences, as with a stacked tensor."""
    (x64, w64, b64, p64, ms64), (x, w, b, p, ms) = inputs(4, 6, torch.float32)
    ids = torch.tensor([2, 0, 2, 0])
    m_list = [ms[0].clone().requires_grad_(), ms[1].clone().requires_grad_(),
              ms[2].double().clone().requires_grad_()]
    y = multitask_pica_linear(x, w, b, p, m_list, ids, backend="reference")
    assert calls == [] and y.dtype == torch.float32
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    y.backward(dy)
    m64 = ms64[:3].clone().requires_grad_()
    want, _ = reference.multitask_forward(x64, w64, b64, m64, p64, ids)
    want.backward(dy.double())
    assert_close_to_reference(y, want, torch.float32, "y")
    for i in (0, 2):
        assert_close_to_reference(m_list[i].grad, m64.grad[i], torch.float32, f"dM[{i}]")
    assert m_list[1].grad is None or torch.all(m_list[1].grad == 0)


def test_a_bad_list_of_m_is_refused_by_name():
    _, (x, w, b, p, ms) = inputs(2, 3, torch.float32)
    ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"m_stack\[1\] must be \(20, 6\)"):
        multitask_pica_linear(x, w, b, p, [ms[0], ms[1][:, :5]], ids)
    with pytest.raises(TypeError, match="m_stack must be"):
        multitask_pica_linear(x, w, b, p, [], ids)
    with pytest.raises(ValueError, match="adapter_ids must lie in"):
        multitask_pica_linear(x, w, b, p, [ms[0]], ids)
