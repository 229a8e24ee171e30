"""``apply_pica``: find the targets, compute their bases, wrap them in :class:`PiCaLinear` — atomically.

Fused MoE experts (3-D ``gate_up_proj`` / ``down_proj`` of a transformers experts module) are targets too: their
roles are the pseudo-layers ``<module>.gate_proj`` / ``.up_proj`` / ``.down_proj``
(:mod:`pica_kernels.core.experts`), and the module is wrapped in one :class:`PiCaExperts`.

Everything that can fail (target matching, ranks, group keys, the SVD of
every basis) runs before the model is touched; the edit itself (freezing,
the bank, the module swaps) is undone on any exception, KeyboardInterrupt
included, so the model is either fully adapted or exactly as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..core import experts as core_experts
from ..core.bank import PiCaBank
from ..core.base import check_float_weight, is_supported_base, weight_out_in
from ..core.bases import batched_bases
from ..core.defaults import DTYPES, check_adapter_name
from ..core.plan import LayerPlan, plan_layers
from ..core.state import install_forward_scope, transaction
from ..core.targets import matches, role_of, suffix_match, warn_left_out
from .config import PiCaConfig
from .experts import PiCaExperts, experts_basis_buffer_name
from .layer import AdapterSpec, PiCaLinear, basis_buffer_name

BANK_NAME = "pica_bank"


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, skipping PiCa's own internals (base layers inside PiCaLinear / PiCaExperts, the bank)."""
    inside = set()
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, (PiCaLinear, PiCaExperts, PiCaBank)):
            inside.add(name)
        if name and not isinstance(module, PiCaBank):
            yield name, module


@dataclass(frozen=True)
class ExpertTarget:
    """A fused experts module ``config`` selects: its name, the module (the experts module or the PiCaExperts
    wrapping it), its layout, and the selected roles (pseudo-layers ``<name>.<role>``)."""

    name: str
    module: nn.Module
    layout: core_experts.ExpertsLayout
    roles: tuple[core_experts.ExpertRole, ...]


def _scan(model: nn.Module, config: PiCaConfig) -> tuple[list[tuple[str, nn.Module]], list[ExpertTarget]]:
    """Dense targets ``(name, module)`` and fused-experts targets of ``config``; raises on a name that matches
    nothing, a non-linear match, or a selected experts module of a layout PiCa does not adapt."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets, exclude = config.target_modules, config.exclude
    found: list[tuple[str, nn.Module]] = []
    experts: list[ExpertTarget] = []
    matched: list[str] = []  # every name a suffix target may have selected (dense names, pseudo-layers, params)
    left_out: dict[str, int] = {}
    for name, module in candidate_modules(model):
        if exclude is not None and matches(name, exclude):
            continue
        if isinstance(module, PiCaExperts) or core_experts.is_fused_experts(module):
            target = _expert_target(name, module, config, left_out)
            if target is not None:
                experts.append(target)
                matched += [name, *(core_experts.pseudo_name(name, r) for r in target.roles),
                            *(f"{name}.{r.param}" for r in target.roles)]
            continue
        if targets == "all-linear":
            if not (isinstance(module, PiCaLinear) or is_supported_base(module)):
                continue
            base = module.base_layer if isinstance(module, PiCaLinear) else module
            if base is out_emb or name.split(".")[-1] == "lm_head":
                continue
        elif not matches(name, targets):
            continue
        if not (isinstance(module, PiCaLinear) or is_supported_base(module)):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}; PiCa adapts nn.Linear and "
                f"transformers Conv1D layers, and fused MoE experts (check target_modules={config.target_modules!r})"
            )
        found.append((name, module))
        matched.append(name)
    if not isinstance(targets, str):
        for t in targets:
            if not any(suffix_match(n, t) for n in matched):
                excluded = exclude is not None and any(suffix_match(n, t) for n, _ in candidate_modules(model))
                why = " (all its matches are excluded)" if excluded else ""
                raise ValueError(
                    f"target module {t!r} matches no module of {type(model).__name__}{why}; "
                    f"linear layers here are named like {_example_linear_names(model)}"
                )
    if not found and not experts:
        raise ValueError(f"target_modules={targets!r} matches no linear layer of {type(model).__name__}")
    if targets == "all-linear":
        warn_left_out(model, left_out, "their layout is not one PiCa adapts (pica_kernels.core.experts."
                                       "experts_layout says why; name them in target_modules for the error)")
    return found, experts


def _expert_target(name: str, module: nn.Module, config: PiCaConfig, left_out: dict[str, int]) -> ExpertTarget | None:
    """The roles of experts module ``name`` that ``config`` selects (None: none). A layout PiCa does not adapt is
    an error where the targets name it, and is left out (counted in ``left_out``, warned about) under
    ``"all-linear"``."""
    targets, exclude = config.target_modules, config.exclude
    if isinstance(module, PiCaExperts):
        layout = module.layout
    else:
        try:
            layout = core_experts.experts_layout(name, module)
        except core_experts.UnsupportedExpertsError:
            params = core_experts.fused_parameters(module)
            if targets == "all-linear":
                left_out[name] = sum(p.numel() for p in params.values())
                return None
            if any(matches(n, targets) for n in (name, *(f"{name}.{p}" for p in params))):
                raise
            return None
    roles = tuple(r for r in layout.roles if core_experts.role_matches(name, r, targets)
                  and not (exclude is not None and core_experts.role_matches(name, r, exclude)))
    return ExpertTarget(name, module, layout, roles) if roles else None


def find_targets(model: nn.Module, config: PiCaConfig) -> list[tuple[str, nn.Module]]:
    """The dense (name, module) pairs ``config`` selects (fused experts: :func:`find_expert_targets`); raises on a
    name that matches nothing or a non-linear match.

    With ``target_modules="all-linear"``, warns about fused 3-D expert weights of a layout PiCa does not adapt.
    """
    return _scan(model, config)[0]


def find_expert_targets(model: nn.Module, config: PiCaConfig) -> list[ExpertTarget]:
    """The fused experts modules ``config`` selects, with their selected roles."""
    return _scan(model, config)[1]


def _example_linear_names(model: nn.Module, k: int = 6) -> list[str]:
    roles = []
    for name, module in candidate_modules(model):
        if is_supported_base(module) or isinstance(module, PiCaLinear):
            r = role_of(name)
            if r not in roles:
                roles.append(r)
    return roles[:k]


def get_bank(model: nn.Module) -> PiCaBank:
    bank = getattr(model, BANK_NAME, None)
    if not isinstance(bank, PiCaBank):
        raise ValueError(f"{type(model).__name__} has no PiCa adapters; call apply_pica(model, config) first")
    return bank


def pica_layers(model: nn.Module) -> Iterator[tuple[str, PiCaLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, PiCaLinear):
            yield name, module


def expert_layers(model: nn.Module) -> Iterator[tuple[str, PiCaExperts]]:
    for name, module in model.named_modules():
        if isinstance(module, PiCaExperts):
            yield name, module


def all_layers(model: nn.Module) -> list[PiCaLinear | PiCaExperts]:
    """Every PiCa layer of ``model``, dense and fused experts (what an adapter-state transition edits)."""
    return [m for m in model.modules() if isinstance(m, (PiCaLinear, PiCaExperts))]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _weight_oi(module: nn.Module) -> torch.Tensor:
    return module.base_weight if isinstance(module, PiCaLinear) else weight_out_in(module)


def layer_plan(model: nn.Module, config: PiCaConfig) -> list[tuple[nn.Module, LayerPlan]]:
    """``(module, plan)`` of every dense target (:func:`pica_kernels.core.plan.plan_layers`: rank, checked, group
    key); fused experts: :func:`plans`."""
    return plans(model, config)[0]


def plans(model: nn.Module, config: PiCaConfig) -> tuple[list[tuple[nn.Module, LayerPlan]],
                                                        list[tuple[ExpertTarget, dict[str, LayerPlan]]]]:
    """The plans of the dense targets and of each experts target's roles (``{role: LayerPlan}`` under the
    pseudo-layer names), from one :func:`~pica_kernels.core.plan.plan_layers` over both, so a dense layer and an
    expert role never claim one key. With ``share_experts=False`` an expert role's key ends in ``-e{E}``
    (:func:`pica_kernels.core.experts.experts_group_key`)."""
    dense, experts = _scan(model, config)
    shapes = []
    for name, module in dense:
        weight = _weight_oi(module)
        check_float_weight(weight, f"layer {name!r}: weight")
        shapes.append((name, *weight.shape))
    for t in experts:
        shapes += [(core_experts.pseudo_name(t.name, r), r.out_features, r.in_features) for r in t.roles]
    planned = plan_layers(shapes, rank=config.rank, rank_pattern=config.rank_pattern, share=config.share)
    expert_plans = []
    for t in experts:
        roles = {}
        for r in t.roles:
            p = planned[core_experts.pseudo_name(t.name, r)]
            if not config.share_experts:
                p = LayerPlan(p.name, p.out_features, p.in_features, p.rank, f"{p.group}-e{t.layout.num_experts}")
            roles[r.role] = p
        expert_plans.append((t, roles))
    return [(module, planned[name]) for name, module in dense], expert_plans


def _expert_bases(expert_plans, config: PiCaConfig, given: dict[str, torch.Tensor],
                  progress: bool) -> dict[str, torch.Tensor]:
    """The bases of every expert role that needs one: given (``load_adapter``'s stored ones), held already by the
    PiCaExperts (another adapter of equal side and rank: None), or computed by one batched SVD call."""
    out: dict[str, torch.Tensor | None] = {}
    needed, ranks = [], {}
    for t, roles in expert_plans:
        for role, p in roles.items():
            if p.name in given:
                out[p.name] = given[p.name]
            elif isinstance(t.module, PiCaExperts) and hasattr(t.module, experts_basis_buffer_name(
                    role, config.side, p.rank)):
                out[p.name] = None
            else:
                weight = t.module.role_weight(role) if isinstance(t.module, PiCaExperts) else \
                    core_experts.role_weight(getattr(t.module, t.layout.role(role).param), t.layout.role(role))
                needed.append((p.name, weight))
                ranks[p.name] = p.rank
    out.update(core_experts.experts_bases(needed, ranks, config.side, method=config.svd_method,
                                          seed=config.svd_seed, progress=progress))
    return out


def apply_pica(
    model: nn.Module,
    config: PiCaConfig | None = None,
    *,
    adapter_name: str = "default",
    progress: bool = True,
    bases: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Replace the targeted layers of ``model`` by :class:`PiCaLinear` (in place) and return it.

    All parameters of the model are frozen; the new ``M`` (zero-initialised, so
    the output is unchanged) are the only trainable ones. On a model that
    already has PiCa adapters, adds ``adapter_name`` as a new, inactive adapter
    (bases are shared with existing adapters of the same side and rank). On a
    model on the ``meta`` device only shapes are built (no SVD): use it with
    :func:`parameter_report` to plan budgets without weights. Atomic: on any
    exception (also KeyboardInterrupt) the model is left exactly as it was.

    ``bases`` maps layer names to precomputed bases (load_adapter passes stored ones).
    """
    check_adapter_name(adapter_name)
    return apply_checked(model, config or PiCaConfig(), adapter_name, progress=progress, bases=bases)


def apply_checked(model: nn.Module, config: PiCaConfig, adapter_name: str, *, progress: bool,
                  bases: dict[str, torch.Tensor] | None) -> nn.Module:
    """:func:`apply_pica` for a caller that checked ``adapter_name`` already (``load_adapter``)."""
    existing = getattr(model, BANK_NAME, None)
    bank = existing if isinstance(existing, PiCaBank) else None
    if bank is not None and adapter_name in bank.configs:
        raise ValueError(f"model already has an adapter named {adapter_name!r}")
    plan, expert_plans = plans(model, config)

    # 1. Everything that can fail or take long, before the model is touched.
    bases = dict(bases or {})
    needed = []
    for module, p in plan:
        if p.name in bases:
            continue
        if isinstance(module, PiCaLinear) and hasattr(module, basis_buffer_name(config.side, p.rank)):
            continue  # shared with an existing adapter of the same side and rank
        needed.append((p.name, _weight_oi(module)))
    ranks = {p.name: p.rank for _, p in plan}
    bases.update(batched_bases(needed, {n: ranks[n] for n, _ in needed}, config.side, method=config.svd_method,
                               seed=config.svd_seed, progress=progress))
    expert_bases = _expert_bases(expert_plans, config, bases, progress)

    # 2. The edit: one transaction on the model's adapter state, undone exactly on any exception.
    first = bank is None
    m_dtype = DTYPES[config.m_dtype] if config.m_dtype else None
    with transaction(None if first else bank.cell, [model]) as txn:
        if first:
            bank = PiCaBank()
            model.add_module(BANK_NAME, bank)
            install_forward_scope(model, bank.cell)
            for p in model.parameters():
                p.requires_grad_(False)
            for p in bank.parameters():
                p.requires_grad_(True)
        before = bank.cell.value
        for module, p in plan:
            kwargs = dict(group=p.group, basis=bases.get(p.name), m_dtype=m_dtype,
                          svd_method=config.svd_method, svd_seed=config.svd_seed)
            if isinstance(module, PiCaLinear):
                module._add_structure(adapter_name, p.rank, config.side, **kwargs)
            else:
                set_submodule(model, p.name, PiCaLinear._checked(module, p.rank, config.side, adapter_name=adapter_name,
                                                                 bank=bank, **kwargs))
        for t, roles in expert_plans:
            layer = t.module
            if not isinstance(layer, PiCaExperts):
                layer = PiCaExperts(t.module, t.layout, bank)
                set_submodule(model, t.name, layer)
            layer._add_structure(adapter_name, {role: AdapterSpec(config.side, p.rank, p.group)
                                                for role, p in roles.items()},
                                 {role: expert_bases[p.name] for role, p in roles.items()}, m_dtype=m_dtype,
                                 per_expert=not config.share_experts)
        bank.configs[adapter_name] = config
        # PEFT semantics: an added adapter starts inactive (the first one is active).
        now = bank.cell.value  # new layers register the adapter on a bank they are handed; the state is set here
        adapters = now.adapters if adapter_name in now.adapters else (*now.adapters, adapter_name)
        after = now.evolve(adapters=adapters, active=before.active or (adapter_name,))
        if first:
            bank.cell.value = after.validated()
        else:
            txn.publish(after)
    return model
