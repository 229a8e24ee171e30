"""``apply_pica``: find the targets, compute their bases, wrap them in :class:`PiCaLinear` — atomically.

Everything that can fail (target matching, ranks, group keys, the SVD of
every basis) runs before the model is touched; the edit itself (freezing,
the bank, the module swaps) is undone on any exception, KeyboardInterrupt
included, so the model is either fully adapted or exactly as it was.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..core.bank import PiCaBank
from ..core.base import is_supported_base, weight_out_in
from ..core.bases import batched_bases
from ..core.defaults import DTYPES, check_adapter_name
from ..core.plan import LayerPlan, plan_layers
from ..core.state import install_forward_scope, transaction
from ..core.targets import fused_expert_parameters, matches, role_of, suffix_match, warn_left_out
from .config import PiCaConfig
from .layer import PiCaLinear, basis_buffer_name

BANK_NAME = "pica_bank"


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, skipping PiCa's own internals (base layers inside PiCaLinear, the bank)."""
    inside = set()
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, (PiCaLinear, PiCaBank)):
            inside.add(name)
        if name and not isinstance(module, PiCaBank):
            yield name, module


def find_targets(model: nn.Module, config: PiCaConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs ``config`` selects; raises on a name that matches nothing or a non-linear match.

    With ``target_modules="all-linear"``, warns about fused 3-D expert weights left out.
    """
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = config.target_modules
    found: list[tuple[str, nn.Module]] = []
    for name, module in candidate_modules(model):
        if config.exclude is not None and matches(name, config.exclude):
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
                f"transformers Conv1D layers only (check target_modules={config.target_modules!r})"
            )
        found.append((name, module))
    if not isinstance(targets, str):
        for t in targets:
            if not any(suffix_match(n, t) for n, _ in found):
                excluded = config.exclude is not None and any(suffix_match(n, t) for n, _ in candidate_modules(model))
                why = " (all its matches are excluded)" if excluded else ""
                raise ValueError(
                    f"target module {t!r} matches no module of {type(model).__name__}{why}; "
                    f"linear layers here are named like {_example_linear_names(model)}"
                )
    if not found:
        raise ValueError(f"target_modules={targets!r} matches no linear layer of {type(model).__name__}")
    if targets == "all-linear":
        warn_left_out(model, fused_expert_parameters(model))
    return found


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


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _weight_oi(module: nn.Module) -> torch.Tensor:
    return module.base_weight if isinstance(module, PiCaLinear) else weight_out_in(module)


def layer_plan(model: nn.Module, config: PiCaConfig) -> list[tuple[nn.Module, LayerPlan]]:
    """``(module, plan)`` of every target (:func:`pica_kernels.core.plan.plan_layers`: rank, checked, group key)."""
    targets = find_targets(model, config)
    shapes = [(name, *_weight_oi(module).shape) for name, module in targets]
    plans = plan_layers(shapes, rank=config.rank, rank_pattern=config.rank_pattern, share=config.share)
    return [(module, plans[name]) for name, module in targets]


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
    config = config or PiCaConfig()
    check_adapter_name(adapter_name)
    existing = getattr(model, BANK_NAME, None)
    bank = existing if isinstance(existing, PiCaBank) else None
    if bank is not None and adapter_name in bank.configs:
        raise ValueError(f"model already has an adapter named {adapter_name!r}")
    plan = layer_plan(model, config)

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
