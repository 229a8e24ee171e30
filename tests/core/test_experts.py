"""The experts core (pica_kernels/core/experts.py) on tiny transformers MoE experts modules: layouts and their
refusals, per-expert bases from the batched SVD, the routed low-rank forward against the materialised ΔW
(reference.py math), gradcheck of the expert term in float64, and the bit-exact merge / unmerge of fused weights."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TOLERANCES
from torch import nn

from pica_kernels import reference
from pica_kernels.core import experts as X
from pica_kernels.core.merge import accumulation_dtype
from pica_kernels.svd import truncated_svd

H, FFN, E, K = 32, 24, 4, 2


def _experts(arch: str = "mixtral", dtype=torch.float32, seed: int = 0) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "mixtral":
        cfg = tf.MixtralConfig(vocab_size=64, hidden_size=H, intermediate_size=FFN, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
                               num_experts_per_tok=K)
        module = tf.models.mixtral.modeling_mixtral.MixtralExperts(cfg)
    elif arch == "olmoe":
        cfg = tf.OlmoeConfig(vocab_size=64, hidden_size=H, intermediate_size=FFN, num_hidden_layers=1,
                             num_attention_heads=4, num_experts=E, num_experts_per_tok=K)
        module = tf.models.olmoe.modeling_olmoe.OlmoeExperts(cfg)
    else:
        raise ValueError(arch)
    cfg._experts_implementation = "eager"
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    return module.to(dtype)


def _routing(tokens: int, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    weights = torch.rand(tokens, K, generator=g, dtype=dtype)
    return index, weights


def _bases(module, layout, rank, side, dtype=None):
    weights = [(r.role, X.role_weight(getattr(module, r.param), r)) for r in layout.roles]
    return X.experts_bases(weights, rank, side, method="accurate", seed=0)


def _adapters(layout, bases, rank, side, per_expert, seed=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for r in layout.roles:
        shape = X.experts_m_shape(layout.num_experts, r.out_features, r.in_features, rank, side, per_expert)
        out[r.role] = [(bases[r.role], torch.randn(shape, generator=g, dtype=dtype) * 0.3, side)]
    return out


def _merged_copy(module, layout, adapters):
    """A copy of ``module`` whose fused weights hold W + ΔW (ΔW materialised with reference.delta_weight per
    expert): what the routed low-rank forward must compute."""
    ref = copy.deepcopy(module)
    with torch.no_grad():
        for r in layout.roles:
            for basis, m, side in adapters.get(r.role, []):
                w = X.role_weight(getattr(ref, r.param), r)
                for e in range(layout.num_experts):
                    m_e = m[e] if m.dim() == 3 else m
                    w[e] += reference.delta_weight(basis[e], m_e, side).to(w.dtype)
    return ref


# ----------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_layout_splits_gate_up_into_two_roles(arch):
    module = _experts(arch)
    layout = X.experts_layout("model.layers.0.mlp.experts", module)
    assert layout.num_experts == E and layout.gated
    assert [(r.role, r.param, r.rows, r.in_features, r.out_features) for r in layout.roles] == [
        ("gate_proj", "gate_up_proj", (0, FFN), H, FFN),
        ("up_proj", "gate_up_proj", (FFN, 2 * FFN), H, FFN),
        ("down_proj", "down_proj", (0, H), FFN, H),
    ]
    w = X.role_weight(module.gate_up_proj, layout.role("up_proj"))
    assert w.shape == (E, FFN, H) and torch.equal(w, module.gate_up_proj[:, FFN:])


@pytest.mark.parametrize("flag, value", [("is_transposed", True), ("has_bias", True),
                                         ("has_post_expert_norm", True), ("is_concatenated", False),
                                         ("_is_expert_parallel", True)])
def test_unsupported_layout_names_the_module_and_the_flag(flag, value):
    module = _experts()
    setattr(module, flag, value)
    with pytest.raises(X.UnsupportedExpertsError, match=rf"experts module 'blocks.0.experts' \(MixtralExperts\): "
                                                       rf"{flag}={value!r}[ ;].*PiCa adapts a transformers experts"):
        X.experts_layout("blocks.0.experts", module)


def test_unsupported_module_without_the_experts_interface():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4, 8, 8))

    with pytest.raises(X.UnsupportedExpertsError, match=r"'m' \(Raw\): it has fused parameters \['w'\] but not "
                                                       r"transformers' experts interface"):
        X.experts_layout("m", Raw())


def test_unsupported_shapes_are_named():
    module = _experts()
    module.down_proj = nn.Parameter(torch.zeros(E, H, FFN + 1))
    with pytest.raises(X.UnsupportedExpertsError, match=r"gate_up_proj has shape \(4, 48, 32\) and down_proj "
                                                       r"\(4, 32, 25\)"):
        X.experts_layout("x", module)


# ----------------------------------------------------------------------------------------------- bases
@pytest.mark.parametrize("side", ["input", "output"])
def test_expert_bases_are_each_experts_own_svd_basis(side):
    module = _experts()
    layout = X.experts_layout("x", module)
    bases = _bases(module, layout, 4, side)
    for r in layout.roles:
        w = X.role_weight(module.gate_up_proj if r.param == "gate_up_proj" else module.down_proj, r)
        assert bases[r.role].shape == (E, *reference.basis_shape(r.out_features, r.in_features, 4, side))
        # The batched call equals the same batch decomposed directly (one stacked SVD per role).
        direct, _ = truncated_svd(w.detach().clone(), 4, side, method="accurate", seed=0)
        assert torch.equal(bases[r.role], direct)


# ----------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_zero_m_gives_the_base_output(arch):
    module = _experts(arch)
    layout = X.experts_layout("x", module)
    bases = _bases(module, layout, 4, "input")
    adapters = {r.role: [(bases[r.role], torch.zeros(r.out_features, 4), "input")] for r in layout.roles}
    index, weights = _routing(16)
    h = torch.randn(16, H)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(X.routed_forward(module, layout, h, index, weights, adapters),
                               module(h, index, weights), atol=atol, rtol=rtol)


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("per_expert", [False, True])
@pytest.mark.parametrize("roles", [("gate_proj", "up_proj", "down_proj"), ("up_proj",), ("gate_proj", "down_proj")])
def test_routed_lowrank_forward_equals_the_materialised_delta(side, per_expert, roles):
    module = _experts(dtype=torch.float64)
    layout = X.experts_layout("x", module)
    bases = _bases(module, layout, 3, side)
    adapters = {k: v for k, v in _adapters(layout, bases, 3, side, per_expert, dtype=torch.float64).items()
                if k in roles}
    index, weights = _routing(20, dtype=torch.float64)
    h = torch.randn(20, H, dtype=torch.float64)
    y = X.routed_forward(module, layout, h, index, weights, adapters)
    expected = _merged_copy(module, layout, adapters)(h, index, weights)
    atol, rtol = TOLERANCES[torch.float64]
    torch.testing.assert_close(y, expected, atol=atol, rtol=rtol)
    assert not torch.allclose(y, module(h, index, weights))  # the term is not zero


def test_two_adapters_sum_their_terms():
    module = _experts(dtype=torch.float64)
    layout = X.experts_layout("x", module)
    bases = _bases(module, layout, 3, "input")
    a = _adapters(layout, bases, 3, "input", False, seed=3, dtype=torch.float64)
    b = _adapters(layout, bases, 3, "input", True, seed=4, dtype=torch.float64)
    both = {k: a[k] + b[k] for k in a}
    index, weights = _routing(12, dtype=torch.float64)
    h = torch.randn(12, H, dtype=torch.float64)
    ref = _merged_copy(_merged_copy(module, layout, a), layout, b)
    torch.testing.assert_close(X.routed_forward(module, layout, h, index, weights, both), ref(h, index, weights),
                               atol=1e-10, rtol=1e-10)


def test_experts_without_tokens_and_sentinels_are_skipped():
    module = _experts(dtype=torch.float64)
    layout = X.experts_layout("x", module)
    bases = _bases(module, layout, 3, "input")
    adapters = _adapters(layout, bases, 3, "input", False, dtype=torch.float64)
    h = torch.randn(5, H, dtype=torch.float64)
    index = torch.tensor([[1, 3]] * 5)  # experts 0 and 2 get nothing
    weights = torch.rand(5, K, dtype=torch.float64)
    expected = _merged_copy(module, layout, adapters)(h, index, weights)
    torch.testing.assert_close(X.routed_forward(module, layout, h, index, weights, adapters), expected,
                               atol=1e-10, rtol=1e-10)
    # An expert-parallel sentinel (id E) contributes nothing, as in transformers' grouped path.
    sentinel = index.clone()
    sentinel[:, 1] = E
    y = X.routed_forward(module, layout, h, sentinel, weights, adapters)
    only = X.routed_forward(module, layout, h, index[:, :1], weights[:, :1], adapters)
    torch.testing.assert_close(y, only, atol=1e-12, rtol=0)


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("per_expert", [False, True])
def test_gradcheck_of_the_expert_term(side, per_expert):
    torch.manual_seed(0)
    counts = [3, 0, 2, 4]
    x = torch.randn(sum(counts), 6, dtype=torch.float64, requires_grad=True)
    basis = torch.randn(E, *reference.basis_shape(5, 6, 2, side), dtype=torch.float64)
    m = torch.randn(X.experts_m_shape(E, 5, 6, 2, side, per_expert), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, m: X.routed_term(x, counts, [(basis, m, side)]), (x, m))


def test_dm_of_a_shared_m_is_the_sum_over_experts():
    torch.manual_seed(0)
    counts = [3, 2, 0, 4]
    x = torch.randn(9, 6, dtype=torch.float64)
    basis = torch.randn(E, 2, 6, dtype=torch.float64)
    m = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(9, 5, dtype=torch.float64)
    (X.routed_term(x, counts, [(basis, m, "input")]) * dy).sum().backward()
    expected, start = torch.zeros(5, 2, dtype=torch.float64), 0
    for e, n in enumerate(counts):
        # Closed form of the input side with W and P frozen: dM = dy_e.T @ (x_e @ P_e.T).
        expected += dy[start:start + n].T @ (x[start:start + n] @ basis[e].T)
        start += n
    torch.testing.assert_close(m.grad, expected, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_stacks_and_unmerge_restores_every_bit(dtype):
    module = _experts(dtype=dtype)
    holder = nn.Module()
    layout = X.experts_layout("x", module)
    bases = _bases(module, layout, 3, "input")
    ads = {"a": _adapters(layout, bases, 3, "input", False, seed=5),
           "b": {k: v for k, v in _adapters(layout, bases, 3, "input", True, seed=6).items() if k != "gate_proj"}}

    def deltas(name):
        return {role: X.role_delta(*t[0][:2], t[0][2], dtype) for role, t in ads[name].items()}

    before = {p: getattr(module, p).detach().clone() for p in layout.params}
    X.set_experts_stack(holder, module, layout, [], ["a"], deltas)
    X.set_experts_stack(holder, module, layout, ["a"], ["a", "b"], deltas)
    acc = accumulation_dtype(dtype)
    for p in layout.params:
        expected = before[p].to(acc)
        for n in ("a", "b"):  # the stack, added in merge order in the accumulation dtype, rounded once, from W0
            expected = expected + X.param_delta(layout, p, before[p], deltas(n), acc)
        assert torch.equal(getattr(module, p), expected.to(dtype))
        assert torch.equal(holder._buffers[X.original_param_buffer(p)], before[p])
    # The proxy computes the unmerged output without touching the merged weights.
    proxy = X.original_experts(holder, module, layout)
    assert all(torch.equal(getattr(proxy, p), before[p]) for p in layout.params)
    X.set_experts_stack(holder, module, layout, ["a", "b"], [], deltas)
    for p in layout.params:
        assert torch.equal(getattr(module, p), before[p])
    assert not holder._buffers and X.original_experts(holder, module, layout) is module


def test_safe_merge_refuses_a_non_finite_weight():
    module = _experts()
    holder = nn.Module()
    layout = X.experts_layout("x", module)
    before = module.gate_up_proj.detach().clone()

    def deltas(name):
        return {"up_proj": torch.full((E, FFN, H), float("inf"))}

    with pytest.raises(ValueError, match=r"merging adapter\(s\) \['a'\] gives NaN or Inf"):
        X.set_experts_stack(holder, module, layout, [], ["a"], deltas, safe_merge=True)
    assert torch.equal(module.gate_up_proj, before) and not holder._buffers


# ----------------------------------------------------------------------------------------------- files
def test_fingerprint_per_expert_detects_a_changed_expert():
    from pica_kernels.core.errors import AdapterMismatchError

    module = _experts()
    layout = X.experts_layout("x", module)
    basis = _bases(module, layout, 3, "input")["up_proj"]
    fp = X.experts_fingerprint(basis, "input")
    assert fp.shape == (E, 3, 4) and fp.dtype == torch.float64
    X.check_experts_fingerprint("x.up_proj", basis, "input", fp)
    moved = basis.clone()
    moved[2] = -moved[2]
    with pytest.raises(AdapterMismatchError, match=r"layer 'x.up_proj\[expert 2\]'"):
        X.check_experts_fingerprint("x.up_proj", moved, "input", fp)
    with pytest.raises(AdapterMismatchError, match=r"expected \(4, r, 4\)"):
        X.check_experts_fingerprint("x.up_proj", basis, "input", fp[:3])


def test_group_keys_and_m_shapes():
    assert X.experts_group_key("model.layers.1.mlp.experts.down_proj", E, H, FFN, share=True,
                               per_expert=False) == f"mlp-experts-down_proj-{H}x{FFN}"
    assert X.experts_group_key("model.layers.1.mlp.experts.down_proj", E, H, FFN, share=True,
                               per_expert=True) == f"mlp-experts-down_proj-{H}x{FFN}-e{E}"
    assert X.experts_group_key("model.layers.1.mlp.experts.up_proj", E, FFN, H, share=False, per_expert=False,
                               rank_suffix=8) == f"model-layers-1-mlp-experts-up_proj-{FFN}x{H}-r8"
    assert X.experts_m_shape(E, FFN, H, 3, "input", False) == (FFN, 3)
    assert X.experts_m_shape(E, FFN, H, 3, "output", True) == (E, 3, H)


def test_role_matching_by_pseudo_layer_parameter_or_module():
    layout = X.experts_layout("m.layers.0.mlp.experts", _experts())
    name = "m.layers.0.mlp.experts"

    def picked(spec):
        return [r.role for r in layout.roles if X.role_matches(name, r, spec)]

    assert picked(["up_proj"]) == ["up_proj"]  # never gate_up_proj's gate half (a '.'-boundary suffix)
    assert picked(["gate_up_proj"]) == ["gate_proj", "up_proj"]
    assert picked(["experts"]) == ["gate_proj", "up_proj", "down_proj"]
    assert picked(["down_proj", "q_proj"]) == ["down_proj"]
    assert picked(r".*\.(gate|down)_proj") == ["gate_proj", "down_proj"]
    assert picked("all-linear") == ["gate_proj", "up_proj", "down_proj"]
    assert X.pseudo_name(name, layout.roles[1]) == "m.layers.0.mlp.experts.up_proj"


@pytest.mark.parametrize("value", [1, "yes", None])
def test_share_experts_must_be_a_bool(value):
    from pica_kernels.core.errors import PiCaConfigError

    with pytest.raises(PiCaConfigError, match=r"share_experts must be a bool"):
        X.check_share_experts(value)
    assert X.check_share_experts(False) is False
