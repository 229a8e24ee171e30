"""PiCa on fused mixture-of-experts weights: the core both front ends call.

transformers 5 stores the experts of Mixtral, Qwen2-MoE / Qwen3-MoE, OLMoE (and others) as 3-D parameters of one
experts module: ``gate_up_proj`` (E, 2*ffn, hidden) and ``down_proj`` (E, hidden, ffn), routed tokens going through
``F.linear(x_e, gate_up_proj[e])``. This module adapts them with the same math as a dense layer, per expert:

**Roles.** A fused ``gate_up_proj`` holds two roles, as in a dense model: ``gate_proj`` (rows ``[0, ffn)`` of each
expert) and ``up_proj`` (rows ``[ffn, 2*ffn)``); ``down_proj`` is one role. Each role of an experts module is a
*pseudo-layer* named ``<module>.<role>`` (``model.layers.3.mlp.experts.up_proj``), so the role rule of
:mod:`.targets` gives ``mlp.experts.up_proj`` for every layer, distinct from a dense ``mlp.up_proj`` and from
``mlp.shared_expert.up_proj``. Targets match these names (``"up_proj"`` selects the up halves of every expert and
the dense ``up_proj`` layers alike), the parameter name (``"gate_up_proj"``: both halves) or the module's name.

**Bases.** One basis per expert and role: ``(E, r, in)`` on the input side (``P_e = Vh_e[:r]``), ``(E, out, r)``
on the output side (``U_e[:, :r]``), from the batched truncated SVD of the E expert matrices
(:func:`experts_bases`, through :func:`.bases.batched_bases`, so the basis cache serves it and a second load runs
no SVD).

**M.** Shared per role: one ``M`` for every expert of every layer of a role (the group of :func:`experts_group_key`;
``(out, r)`` input side, ``(r, in)`` output side), the gradient being the sum over experts and layers. With
``share_experts=False`` one ``M`` per expert, ``(E, out, r)`` / ``(E, r, in)``, still shared across layers when
``share`` is on (expert ``e`` of every layer), per layer when it is off.

**Forward.** ``ΔW`` is never materialised per step: :func:`routed_forward` runs the routed tokens of expert ``e``
through ``F.linear(x_e, W_e)`` plus the low-rank term ``(x_e @ B_e.T) @ A_e.T`` of every active adapter, with
``(A_e, B_e) = (M, P_e)`` input side, ``(U_e, M)`` output side (:func:`expert_factors`). It mirrors transformers'
own experts forward (tokens sorted by expert as its ``grouped_mm`` path does, gate/activation by the module's own
``_apply_gate``), so a zero ``M`` gives the base output up to the order of the final sum.

**Merge.** ``ΔW`` of a role is ``A @ B`` broadcast over experts, ``(E, out, in)`` (:func:`role_delta`), assembled
into the whole parameter (:func:`param_delta`) and merged by :func:`.merge.set_weight_stack` exactly as a dense
weight: ``round(W0 + Σ ΔW)`` in fp32 from the original ``W0``, kept as a non-persistent buffer
``pica_original_<param>`` so unmerge restores it bit for bit.

**Files.** Per pseudo-layer an adapter file stores ``fingerprint.<name>`` ``(E, r, 4)`` float64
(:func:`experts_fingerprint`), ``basis.<name>`` ``(E, r, in)`` / ``(E, out, r)`` when bases are stored, and in its
JSON the record of :func:`experts_record` (module, parameter, rows, number of experts, whether ``M`` is per expert);
``m.<group>`` is stored once per group as for dense layers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import reference
from ..ops import eager
from .defaults import BASE_ADAPTER
from .errors import PiCaConfigError, PiCaError
from .targets import group_key, matches

__all__ = [
    "ExpertRole",
    "ExpertsLayout",
    "UnsupportedExpertsError",
    "check_experts_fingerprint",
    "check_share_experts",
    "expert_factors",
    "experts_bases",
    "experts_fingerprint",
    "experts_group_key",
    "experts_layout",
    "experts_m_shape",
    "experts_record",
    "fused_parameters",
    "is_fused_experts",
    "original_experts",
    "original_param_buffer",
    "param_delta",
    "pseudo_name",
    "role_delta",
    "role_matches",
    "role_weight",
    "routed_forward",
    "routed_term",
    "set_experts_stack",
    "weight_of",
]


class UnsupportedExpertsError(PiCaError, TypeError):
    """A module holds fused expert weights in a layout PiCa does not adapt; the message names the module and the
    layout that was expected."""


#: What one adapter contributes to one role at forward time: (basis (E, r, in) | (E, out, r), M, side), ``M`` being
#: (out, r) | (r, in) shared by all experts or (E, out, r) | (E, r, in) one per expert.
ExpertTensors = tuple[torch.Tensor, torch.Tensor, str]


@dataclass(frozen=True)
class ExpertRole:
    """One role of an experts module: rows ``rows`` of dim 1 of parameter ``param`` (E, out_total, in).

    ``role``: "gate_proj", "up_proj" or "down_proj"; the pseudo-layer is ``<module>.<role>``.
    """

    role: str
    param: str
    rows: tuple[int, int]
    in_features: int

    @property
    def out_features(self) -> int:
        return self.rows[1] - self.rows[0]


@dataclass(frozen=True)
class ExpertsLayout:
    """The fused layout of one experts module: E experts, its roles, and which parameter feeds which step.

    ``up_param``: the input projection (``gate_up_proj`` (E, 2*ffn, hidden) for gated experts, ``up_proj``
    (E, ffn, hidden) otherwise); ``down_param``: ``down_proj`` (E, hidden, ffn); ``gated``: the input projection
    is split by the module's ``_apply_gate`` (gate half, up half).
    """

    num_experts: int
    roles: tuple[ExpertRole, ...]
    up_param: str
    down_param: str
    gated: bool

    def role(self, role: str) -> ExpertRole:
        for r in self.roles:
            if r.role == role:
                return r
        raise KeyError(f"no expert role {role!r}; this layout has {[r.role for r in self.roles]}")

    @property
    def params(self) -> tuple[str, str]:
        return (self.up_param, self.down_param)


def fused_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: parameter}`` of ``module``'s own (not its children's) parameters with 3 or more dimensions."""
    return {n: p for n, p in module.named_parameters(recurse=False) if p.dim() >= 3}


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds parameters of 3 or more dimensions of its own (fused experts, supported or not)."""
    return bool(fused_parameters(module))


_EXPECTED = ("a transformers experts module (decorated by use_experts_implementation: Mixtral, Qwen2-MoE, "
             "Qwen3-MoE, OLMoE ...) holding gate_up_proj (E, 2*ffn, hidden) with the gate half first (or up_proj "
             "(E, ffn, hidden) for non-gated experts) and down_proj (E, hidden, ffn), not transposed, without "
             "biases, without a post-expert norm, not expert-parallel")


def experts_layout(name: str, module: nn.Module) -> ExpertsLayout:
    """The layout of experts module ``name``, or :class:`UnsupportedExpertsError` naming it and what was expected.

    Reads the flags transformers' ``use_experts_implementation`` sets on the module (``has_gate``,
    ``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_post_expert_norm``, ``_is_expert_parallel``) and
    the shapes of its 3-D parameters.
    """
    def refuse(why: str) -> UnsupportedExpertsError:
        return UnsupportedExpertsError(f"experts module {name!r} ({type(module).__name__}): {why}; PiCa adapts "
                                       f"{_EXPECTED}")

    params = fused_parameters(module)
    if not hasattr(module, "has_gate") or not hasattr(module, "act_fn"):
        raise refuse(f"it has fused parameters {sorted(params)} but not transformers' experts interface "
                     f"(has_gate, act_fn)")
    flags = {"is_transposed": False, "has_bias": False, "has_post_expert_norm": False, "_is_expert_parallel": False}
    for flag, want in flags.items():
        if bool(getattr(module, flag, False)) != want:
            raise refuse(f"{flag}={getattr(module, flag)!r}")
    gated = bool(module.has_gate)
    if gated and not getattr(module, "is_concatenated", True):
        raise refuse("is_concatenated=False (gate and up rows interleaved)")
    up_param = "gate_up_proj" if gated else "up_proj"
    want = {up_param, "down_proj"}
    if set(params) != want:
        raise refuse(f"its fused parameters are {sorted(params)}, expected {sorted(want)}")
    up, down = params[up_param], params["down_proj"]
    if up.dim() != 3 or down.dim() != 3:
        raise refuse(f"{up_param} has shape {tuple(up.shape)}, down_proj {tuple(down.shape)}; both must be 3-D")
    e, up_out, hidden = up.shape
    ffn = up_out // 2 if gated else up_out
    if (gated and up_out % 2) or tuple(down.shape) != (e, hidden, ffn):
        raise refuse(f"{up_param} has shape {tuple(up.shape)} and down_proj {tuple(down.shape)}; expected "
                     f"{up_param} (E, {'2*' if gated else ''}ffn, hidden) and down_proj (E, hidden, ffn)")
    if getattr(module, "num_experts", e) != e:
        raise refuse(f"num_experts={module.num_experts} but the parameters hold {e} experts")
    if gated:
        roles = (ExpertRole("gate_proj", up_param, (0, ffn), hidden), ExpertRole("up_proj", up_param, (ffn, 2 * ffn),
                                                                                 hidden))
    else:
        roles = (ExpertRole("up_proj", up_param, (0, ffn), hidden),)
    roles = (*roles, ExpertRole("down_proj", "down_proj", (0, hidden), ffn))
    return ExpertsLayout(num_experts=e, roles=roles, up_param=up_param, down_param="down_proj", gated=gated)


def pseudo_name(module_name: str, role: ExpertRole) -> str:
    """The pseudo-layer name of ``role`` in experts module ``module_name``: ``<module>.<role>``."""
    return f"{module_name}.{role.role}"


def role_matches(module_name: str, role: ExpertRole, spec: str | Sequence[str]) -> bool:
    """Whether a ``target_modules`` / ``exclude`` value selects ``role`` of experts module ``module_name``: the
    pseudo-layer name (``...experts.up_proj``), the parameter (``...experts.gate_up_proj``: both halves) or the
    module itself (``...experts``: every role) matches it (:func:`.targets.matches`: '.'-boundary suffixes or one
    full-match regex); ``"all-linear"`` selects every role."""
    if spec == "all-linear":
        return True
    return any(matches(n, spec) for n in (pseudo_name(module_name, role), f"{module_name}.{role.param}",
                                          module_name))


def check_share_experts(value: object, field: str = "share_experts") -> bool:
    """A ``share_experts`` config value: a bool (True: one ``M`` per role for all experts; False: one per
    expert), else :class:`PiCaConfigError` naming the field."""
    if not isinstance(value, bool):
        raise PiCaConfigError(f"{field} must be a bool (True: one M per role shared by all experts, False: one M "
                              f"per expert), got {type(value).__name__} {value!r}")
    return value


def role_weight(weight: torch.Tensor, role: ExpertRole) -> torch.Tensor:
    """The rows of ``role`` in ``weight`` (E, out_total, in): a view (E, out, in)."""
    return weight[:, role.rows[0] : role.rows[1], :]


# ------------------------------------------------------------------------------------------------------ bases
def experts_bases(
    weights: Sequence[tuple[str, torch.Tensor]],
    rank: int | Mapping[str, int],
    side: str,
    *,
    method: str,
    seed: int,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Bases of named expert weights ``(E, out, in)``: ``{name: (E, r, in)}`` input side, ``(E, out, r)`` output.

    The E matrices of every weight go through :func:`.bases.batched_bases` (one batched truncated SVD per group
    of equal shape, dtype and device, across experts and layers, each batch looked up in the basis cache first).
    ``rank``: one rank or ``{name: rank}``. Expert ``e``'s basis is exactly the one a dense layer holding
    ``W_e`` would get from the same batch.
    """
    from .bases import batched_bases

    ranks = rank if isinstance(rank, Mapping) else {n: rank for n, _ in weights}
    flat: list[tuple[str, torch.Tensor]] = []
    flat_ranks: dict[str, int] = {}
    for name, w in weights:
        for e in range(w.shape[0]):
            key = f"{name}[{e}]"
            flat.append((key, w[e]))
            flat_ranks[key] = ranks[name]
    got = batched_bases(flat, flat_ranks, side, method=method, seed=seed, progress=progress)
    return {name: torch.stack([got[f"{name}[{e}]"] for e in range(w.shape[0])]) for name, w in weights}


# -------------------------------------------------------------------------------------------------- M and groups
def experts_m_shape(num_experts: int, out_features: int, in_features: int, rank: int, side: str,
                    per_expert: bool) -> tuple[int, ...]:
    """Shape of a role's ``M``: ``(out, r)`` / ``(r, in)`` shared by all experts, ``(E, out, r)`` / ``(E, r, in)``
    with one per expert (``per_expert``)."""
    shape = reference.m_shape(out_features, in_features, rank, side)
    return (num_experts, *shape) if per_expert else shape


def experts_group_key(name: str, num_experts: int, out_features: int, in_features: int, *, share: bool,
                      per_expert: bool, rank_suffix: int | None = None) -> str:
    """Bank key of the ``M`` of pseudo-layer ``name`` (``<module>.<role>``): :func:`.targets.group_key` of the
    role and the expert matrix shape, plus ``-e{E}`` when ``M`` is one per expert (only modules with as many
    experts can share it). ``mlp.experts.down_proj`` of (E, 32, 48) experts -> ``mlp-experts-down_proj-32x48``."""
    key = group_key(name, out_features, in_features, share, rank_suffix)
    return f"{key}-e{num_experts}" if per_expert else key


# ------------------------------------------------------------------------------------------------------ the math
def expert_factors(basis: torch.Tensor, m: torch.Tensor, side: str, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (out, r), B (r, in))`` of expert ``expert``, ``ΔW_e = A @ B``: ``(M, P_e)`` input side, ``(U_e, M)``
    output side; ``M`` (out, r) / (r, in) is shared, (E, out, r) / (E, r, in) is indexed. basis: (E, r, in) /
    (E, out, r)."""
    m_e = m[expert] if m.dim() == 3 else m
    return reference.lowrank_factors(basis[expert], m_e, side)


def role_delta(basis: torch.Tensor, m: torch.Tensor, side: str, weight_dtype: torch.dtype) -> torch.Tensor:
    """``ΔW`` of one role for every expert, (E, out, in), in float32 (float64 for a float64 base): ``M @ P_e``
    input side, ``U_e @ M`` output side (:func:`reference.delta_weight`, broadcast over experts)."""
    from .merge import accumulation_dtype

    return reference.delta_weight(basis, m, side).to(accumulation_dtype(weight_dtype))


def param_delta(layout: ExpertsLayout, param: str, weight: torch.Tensor, deltas: Mapping[str, torch.Tensor],
                dtype: torch.dtype) -> torch.Tensor:
    """``ΔW`` of a whole parameter ``param`` (E, out_total, in) in ``dtype`` from ``{role: (E, out, in)}`` of its
    adapted roles; rows of roles not in ``deltas`` are zero."""
    out = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    for role in layout.roles:
        if role.param == param and role.role in deltas:
            out[:, role.rows[0] : role.rows[1], :] += deltas[role.role].to(device=out.device, dtype=dtype)
    return out


def routed_term(x: torch.Tensor, counts: Sequence[int], adapters: Sequence[ExpertTensors]) -> torch.Tensor:
    """The low-rank term of routed tokens: ``Σ_adapters (x_e @ B_e.T) @ A_e.T`` for every expert's rows.

    x: (S, in), the rows of expert 0 first, then expert 1, ... (``counts[e]`` rows each, ``sum(counts) == S``);
    adapters: (basis, M, side) per adapter (:data:`ExpertTensors`). Returns (S, out) in x's dtype. Each product
    runs through :func:`pica_kernels.ops.eager.lowrank_term` (factors of another dtype cast as in a dense layer, ``dM``
    accumulated in fp32, autocast followed); ``ΔW`` is never formed.
    """
    pieces = []
    start = 0
    for e, n in enumerate(counts):
        if n:
            pieces.append(_expert_term(x[start : start + n], e, adapters))
            start += n
    return torch.cat(pieces) if pieces else x.new_zeros(0, 0)


def _expert_term(x_e: torch.Tensor, e: int, adapters: Sequence[ExpertTensors]) -> torch.Tensor:
    """``Σ (x_e @ B_e.T) @ A_e.T`` over ``adapters`` for the (n, in) rows of expert ``e``: (n, out)."""
    term = None
    for basis, m, side in adapters:
        a, b = expert_factors(basis, m, side, e)
        t = eager.lowrank_term(x_e, a, b)
        term = t if term is None else term + t
    return term


def _with_terms(y: torch.Tensor, x_e: torch.Tensor, e: int, layout: ExpertsLayout, param: str,
                adapters: Mapping[str, Sequence[ExpertTensors]]) -> torch.Tensor:
    """``y`` (n, out_total) of parameter ``param`` plus the term of each adapted role in its rows."""
    roles = [r for r in layout.roles if r.param == param and adapters.get(r.role)]
    if not roles:
        return y
    if len(roles) == 1 and roles[0].rows == (0, y.shape[-1]):
        return y + _expert_term(x_e, e, adapters[roles[0].role])
    pieces, at = [], 0
    for r in roles:
        if r.rows[0] > at:
            pieces.append(y.new_zeros(y.shape[0], r.rows[0] - at))
        pieces.append(_expert_term(x_e, e, adapters[r.role]).to(y.dtype))
        at = r.rows[1]
    if at < y.shape[-1]:
        pieces.append(y.new_zeros(y.shape[0], y.shape[-1] - at))
    return y + torch.cat(pieces, dim=-1)


def routed_forward(
    experts: nn.Module,
    layout: ExpertsLayout,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    adapters: Mapping[str, Sequence[ExpertTensors]],
) -> torch.Tensor:
    """The experts module's forward with PiCa terms: ``experts(hidden_states, top_k_index, top_k_weights)`` where
    each expert's projections are ``F.linear(x_e, W_e) + Σ (x_e @ B_e.T) @ A_e.T``.

    hidden_states: (T, hidden); top_k_index: (T, k) int, expert ids (ids >= E, expert-parallel sentinels, are
    dropped as transformers' grouped path drops them); top_k_weights: (T, k). adapters: ``{role: [(basis, M,
    side), ...]}`` of the active adapters (roles absent or empty: base only). Returns (T, hidden) in
    hidden_states' dtype.

    Tokens are sorted by expert (a stable sort: transformers' ``grouped_mm`` order) and each expert's rows run
    through its weights once; the weighted outputs are put back in token order and summed over ``k`` (its
    deterministic reshape + sum). The gate is the module's own ``_apply_gate`` (``act_fn(gate) * up``), the
    activation ``act_fn`` for non-gated experts.
    """
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be (tokens, hidden), got shape {tuple(hidden_states.shape)}")
    num_tokens, hidden = hidden_states.shape
    k = top_k_index.shape[-1]
    w_up = getattr(experts, layout.up_param)
    w_down = getattr(experts, layout.down_param)
    ids = top_k_index.reshape(-1)
    ids_sorted, perm = torch.sort(ids, stable=True)
    x = hidden_states[perm // k]
    counts = torch.bincount(ids_sorted.clamp(max=layout.num_experts), minlength=layout.num_experts + 1)
    counts = counts[: layout.num_experts].tolist()
    outs, start = [], 0
    for e, n in enumerate(counts):
        if not n:
            continue
        x_e = x[start : start + n]
        start += n
        h = _with_terms(F.linear(x_e, w_up[e]), x_e, e, layout, layout.up_param, adapters)
        h = experts._apply_gate(h) if layout.gated else experts.act_fn(h)
        outs.append(_with_terms(F.linear(h, w_down[e]), h, e, layout, layout.down_param, adapters))
    routed = start  # rows past it: sentinels
    y = torch.cat(outs) if outs else hidden_states.new_zeros(0, hidden)
    y = y * top_k_weights.reshape(-1)[perm[:routed]].unsqueeze(-1).to(y.dtype)
    full = y.new_zeros(ids.shape[0], hidden).index_copy(0, perm[:routed], y)
    return full.view(num_tokens, k, hidden).sum(dim=1).to(hidden_states.dtype)


def layer_forward(
    layer: nn.Module,
    experts: nn.Module,
    layout: ExpertsLayout,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    active: Sequence[str],
    names: Sequence[str] | None,
    disabled: bool,
    merged: bool,
    carried: Collection[str],
    tensors: Callable[[str], Mapping[str, ExpertTensors]],
) -> torch.Tensor:
    """The forward of a PiCa experts layer of either front end, ``(T, hidden)``, under the model's adapter state.

    layer: the PiCa layer wrapping ``experts`` (it keeps the original weights while merged, and ``merged_ms()``);
    active: the adapters whose terms apply; names: a mixed batch's adapter name per sequence (or None); disabled /
    merged: the model's state for this call; carried: the adapters this layer has; tensors(adapter): ``{role:
    (basis, M, side)}`` of one it has. Disabled: the experts' own forward (on the original weights while merged);
    a mixed batch: :func:`mixed_batch_forward`, refused while merged; merged: the experts' own forward on the merged
    weights (with the merged-backward tripwire); else :func:`routed_forward` with the active adapters' terms (the
    experts' own forward when none is carried here).
    """
    def run(h: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, adapters: Sequence[str]) -> torch.Tensor:
        terms: dict[str, list[ExpertTensors]] = {}
        for a in adapters:
            if a in carried:
                for role, t in tensors(a).items():
                    terms.setdefault(role, []).append(t)
        if not terms:
            return experts(h, index, weights)
        return routed_forward(experts, layout, h, index, weights, terms)

    if disabled:
        module = original_experts(layer, experts, layout) if merged else experts
        return module(hidden_states, top_k_index, top_k_weights)
    if names is not None:
        if merged:
            raise ValueError("cannot pass adapter_names (a mixed batch) while adapters are merged; unmerge first")
        return mixed_batch_forward(hidden_states, top_k_index, top_k_weights, names,
                                   lambda h, i, w, name: run(h, i, w, [] if name == BASE_ADAPTER else [name]))
    if merged:
        from .forward import merged_output

        return merged_output(layer, experts(hidden_states, top_k_index, top_k_weights))
    return run(hidden_states, top_k_index, top_k_weights, active)


def mixed_batch_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    names: Sequence[str],
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, str], torch.Tensor],
) -> torch.Tensor:
    """A mixed batch through an experts layer: sequence ``i``'s tokens through ``run(..., names[i])``.

    hidden_states: (batch*seq, hidden), the rows of sequence ``i`` being ``[i*seq, (i+1)*seq)`` (the MoE block
    flattens (batch, seq, hidden) in that order); top_k_index / top_k_weights: (batch*seq, k). ``run(hidden_states,
    top_k_index, top_k_weights, name)`` computes the rows of one adapter name (the layer decides what
    ``BASE_ADAPTER`` and names it does not carry mean). Returns (batch*seq, hidden).
    """
    tokens, batch = hidden_states.shape[0], len(names)
    if batch == 0 or tokens % batch:
        raise ValueError(f"adapter_names has {batch} names but the experts got {tokens} tokens, not a multiple: a "
                         f"mixed batch needs (batch={batch}, seq, hidden) inputs")
    seq = tokens // batch
    out = None
    for name in dict.fromkeys(names):
        rows = torch.cat([torch.arange(i * seq, (i + 1) * seq, device=hidden_states.device)
                          for i, n in enumerate(names) if n == name])
        y = run(hidden_states[rows], top_k_index[rows], top_k_weights[rows], name)
        out = y.new_zeros(tokens, y.shape[-1]) if out is None else out
        out = out.index_copy(0, rows, y)
    return out


# ------------------------------------------------------------------------------------------------------ merge
def original_param_buffer(param: str) -> str:
    """Name of the non-persistent buffer holding parameter ``param``'s original value while adapters are merged."""
    return f"pica_original_{param}"


def set_experts_stack(layer: nn.Module, experts: nn.Module, layout: ExpertsLayout, old: list[str], new: list[str],
                      deltas: Callable[[str], Mapping[str, torch.Tensor]], *, txn=None,
                      safe_merge: bool = False) -> None:
    """Make each fused parameter of ``experts`` ``round(W0 + Σ ΔW)`` over the merged stack ``new`` (``W0`` bit for
    bit when empty), holding the stack ``old`` now; the originals are kept on ``layer`` (the module wrapping
    ``experts``) as ``pica_original_<param>`` buffers (one copy of each parameter while merged).

    ``deltas(adapter)``: ``{role: ΔW (E, out, in)}`` of the roles the adapter covers (:func:`role_delta`).
    ``txn``/``safe_merge``: as in :func:`.merge.set_stack`; on a refused parameter the transaction puts back the
    parameters already changed.
    """
    from .merge import accumulation_dtype, set_weight_stack

    cache: dict[str, Mapping[str, torch.Tensor]] = {}

    def of(adapter: str) -> Mapping[str, torch.Tensor]:
        if adapter not in cache:
            cache[adapter] = deltas(adapter)
        return cache[adapter]

    for param in layout.params:
        weight = getattr(experts, param)
        acc = accumulation_dtype(weight.dtype)
        set_weight_stack(layer, original_param_buffer(param), weight, old, new,
                         lambda a, p=param, w=weight, d=acc: param_delta(layout, p, w, of(a), d),
                         txn=txn, safe_merge=safe_merge)


def original_experts(layer: nn.Module, experts: nn.Module, layout: ExpertsLayout) -> nn.Module:
    """A module computing what ``experts`` computed before any merge: ``experts`` itself when nothing is merged,
    else a shallow proxy whose parameters are the original values kept on ``layer``, so transformers' own forward
    (whichever experts implementation it dispatches to) gives the unmerged output without touching shared weights."""
    kept = {p: layer._buffers[original_param_buffer(p)] for p in layout.params
            if original_param_buffer(p) in layer._buffers}
    if not kept:
        return experts
    proxy = copy.copy(experts)
    object.__setattr__(proxy, "_parameters", {**experts._parameters, **kept})
    return proxy


# ------------------------------------------------------------------------------------------------------ files
def experts_fingerprint(basis: torch.Tensor, side: str) -> torch.Tensor:
    """Fingerprint of every expert's basis: (E, r, 4) float64 on CPU (:func:`pica_kernels.svd.basis_fingerprint`
    of each (r, in) / (out, r) basis)."""
    from ..svd import basis_fingerprint

    return torch.stack([basis_fingerprint(b, side) for b in basis])


def check_experts_fingerprint(name: str, basis: torch.Tensor, side: str, saved: torch.Tensor,
                              atol: float | None = None, saved_dtype: torch.dtype | None = None) -> None:
    """Every expert's basis (E, r, in) / (E, out, r) against ``saved`` (E, r, 4), or AdapterMismatchError naming
    the pseudo-layer, the expert and both values (:func:`.files.check_basis_fingerprint`)."""
    from .errors import AdapterMismatchError
    from .files import check_basis_fingerprint

    if saved.dim() != 3 or saved.shape[0] != basis.shape[0]:
        raise AdapterMismatchError(f"layer {name!r}: its fingerprint has shape {tuple(saved.shape)}, expected "
                                   f"({basis.shape[0]}, r, 4) for its {basis.shape[0]} experts")
    for e in range(basis.shape[0]):
        check_basis_fingerprint(f"{name}[expert {e}]", basis[e], side, saved[e], atol, saved_dtype)


def experts_record(module: str, role: ExpertRole, num_experts: int, per_expert: bool) -> dict:
    """The ``experts`` field of a pseudo-layer's record in an adapter file's JSON: where its rows live and how
    its ``M`` is shared (the loader rebuilds the pseudo-layer from it and checks it against the model)."""
    return {"module": module, "param": role.param, "rows": list(role.rows), "role": role.role,
            "num_experts": num_experts, "per_expert_m": per_expert}


def weight_of(experts: nn.Module, param: str, layer: nn.Module | None = None) -> torch.Tensor:
    """Parameter ``param`` of ``experts`` as stored before any merge (the original kept on ``layer``, if any)."""
    if layer is not None and original_param_buffer(param) in layer._buffers:
        return layer._buffers[original_param_buffer(param)]
    return getattr(experts, param)

