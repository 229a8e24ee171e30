"""The per-layer plan both front ends build before touching a model: each target's rank and the key of its ``M``.

One computation per target, in this order: its rank (``rank_pattern`` or the config's rank), the check that the
layer can hold it, its group key. ``apply_pica``, the PEFT tuner and ``load_adapter`` read the plan; none of them
recomputes a rank or a key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .targets import check_layer_rank, group_key, rank_for, role_of


@dataclass(frozen=True)
class LayerPlan:
    """One target: its weight shape (out, in), its rank and the bank key of its ``M``."""

    name: str
    out_features: int
    in_features: int
    rank: int
    group: str


def layer_group(name: str, out_features: int, in_features: int, rank: int, config_rank: int, share: bool) -> str:
    """The group key of a layer of rank ``rank`` under a config of rank ``config_rank``: a layer that ``rank_pattern``
    gave another rank gets it in its key, so layers of different ranks never share ``M``."""
    return group_key(name, out_features, in_features, share, None if rank == config_rank else rank)


def plan_layers(
    shapes: Iterable[tuple[str, int, int]],
    *,
    rank: int,
    rank_pattern: Mapping[str, int] | None,
    share: bool,
    rank_field: str = "rank",
) -> dict[str, LayerPlan]:
    """``{name: LayerPlan}`` of the targets ``(name, out, in)`` under a checked config.

    Raises ``ValueError`` naming the layer when its rank exceeds ``min(out, in)`` (``rank_field``: the config's name
    of the rank, "rank" or "r"), and when two targets of different roles, shapes or ranks would get the same key
    (their names differ only in '.' against '-'), which would make them share one ``M``.
    """
    plans: dict[str, LayerPlan] = {}
    claimed: dict[str, tuple] = {}
    for name, out_f, in_f in shapes:
        r = rank_for(name, rank, rank_pattern)
        check_layer_rank(name, r, out_f, in_f, rank_field if r == rank else "rank_pattern rank")
        key = layer_group(name, out_f, in_f, r, rank, share)
        ident = (role_of(name) if share else name, (out_f, in_f), r)
        if claimed.setdefault(key, ident) != ident:
            raise ValueError(f"group key {key!r} is claimed by {claimed[key]} and {ident}; rename a module")
        plans[name] = LayerPlan(name, out_f, in_f, r, key)
    return plans
