"""Target matching, roles and group keys, shared by both front ends.

A layer's *role* is its module name after the layer index, with every further
index removed: ``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``,
``model.layers.3.mlp.experts.5.down_proj`` -> ``mlp.experts.down_proj`` (one
role for all experts of all layers, distinct from a dense ``mlp.down_proj``
and from ``mlp.shared_expert.down_proj``). A shared ``M`` belongs to a group =
(role, weight shape, rank): two layers of one role but different shapes or
ranks are two groups, never an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from .errors import PiCaConfigError


def role_of(name: str) -> str:
    """The module name after its first all-digit component, further indices removed.

    ``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``; a module that is itself an
    item of a list (``blocks.3``) gets its name without indices (``blocks``).
    """
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    if not idx:
        return name
    tail = [p for p in parts[idx[0] + 1 :] if not p.isdigit()]
    return ".".join(tail) if tail else ".".join(p for p in parts if not p.isdigit())


def group_key(name: str, out_features: int, in_features: int, share: bool, rank_suffix: int | None = None) -> str:
    """Key of a layer's ``M``: (role, shape) when shared, the full name otherwise. Contains no '.'.

    ``rank_suffix``: the layer's rank when a ``rank_pattern`` gave it one other
    than the config's (so layers of different ranks never share ``M``).
    """
    base = role_of(name) if share else name
    key = f"{base.replace('.', '-')}-{out_features}x{in_features}"
    return key if rank_suffix is None else f"{key}-r{rank_suffix}"


def suffix_match(name: str, suffix: str) -> bool:
    """``name`` ends with ``suffix`` on a '.' boundary (never a substring match)."""
    return name == suffix or name.endswith("." + suffix)


def matches(name: str, spec: str | Sequence[str] | set[str]) -> bool:
    """A str is a regex matched against the whole name; a collection holds '.'-boundary suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(suffix_match(name, s) for s in spec)


def rank_for(name: str, rank: int, rank_pattern: Mapping[str, int] | None) -> int:
    """The rank of layer ``name``: the first ``rank_pattern`` key that is a suffix of it (or a regex matching the
    whole name), else ``rank``."""
    for pattern, r in (rank_pattern or {}).items():
        if suffix_match(name, pattern) or re.fullmatch(pattern, name):
            return r
    return rank


def check_rank(rank: object, field: str = "rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise PiCaConfigError(f"{field} must be a positive int, got {rank!r}")
    return rank


def _check_regex(pattern: str, field: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise PiCaConfigError(f"{field}: {pattern!r} is not a valid regular expression ({e}); a str is matched as a "
                              f"regex against the whole module name, a list of str as module-name suffixes") from None


def check_module_spec(spec: object, field: str) -> str | tuple[str, ...]:
    """A ``target_modules`` / ``exclude`` value: a regex str (full match on the module name; ``"all-linear"`` too)
    or a collection of non-empty str suffixes. Returns the str, or the suffixes as a tuple (in their order)."""
    if isinstance(spec, str):
        _check_regex(spec, field)
        return spec
    expected = (f"{field} must be a regex str (matched against the whole module name), \"all-linear\", or a list "
                f"of module-name suffixes (str)")
    if isinstance(spec, Mapping) or not isinstance(spec, (Sequence, set, frozenset)):
        raise PiCaConfigError(f"{expected}; got {type(spec).__name__} {spec!r}")
    items = tuple(spec)
    for item in items:
        if not isinstance(item, str) or not item:
            raise PiCaConfigError(f"{expected}; got {item!r} among them ({spec!r})")
    return items


def check_seed(seed: object, field: str = "svd_seed") -> int:
    """A seed of ``torch.Generator.manual_seed``: an int (not a bool) in [-2**63, 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise PiCaConfigError(f"{field} must be an int in [-2**63, 2**64) (the seed of the SVD sketch), got {seed!r}")
    return seed


def check_rank_pattern(rank_pattern: object, field: str = "rank_pattern") -> dict[str, int]:
    if rank_pattern is None:
        return {}
    if not isinstance(rank_pattern, Mapping):
        raise PiCaConfigError(
            f"{field} must be a dict {{module name or regex: rank}}, got {type(rank_pattern).__name__}")
    for k, v in rank_pattern.items():
        if not isinstance(k, str):
            raise PiCaConfigError(f"{field} keys must be str, got {k!r}")
        _check_regex(k, f"{field} key")
        check_rank(v, f"{field}[{k!r}]")
    return dict(rank_pattern)


def check_layer_rank(name: str, rank: int, out_features: int, in_features: int, field: str = "rank") -> None:
    if rank > min(out_features, in_features):
        raise ValueError(
            f"{field}={rank} is larger than min(out, in) = {min(out_features, in_features)} of layer {name!r} "
            f"(out={out_features}, in={in_features}); lower it, give that layer its own rank with rank_pattern, "
            f"or exclude that layer"
        )


def fused_expert_parameters(model, adapted: set[str] | None = None) -> dict[str, int]:
    """``{module name: parameter count}`` of modules holding 3-D (or higher) parameters: fused MoE experts
    (transformers 5's ``experts.gate_up_proj`` (E, 2I, H), ``experts.down_proj`` (E, H, I)), except the modules in
    ``adapted`` (what a report counts as left out)."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.dim() >= 3 and id(p) not in seen:
            seen.add(id(p))
            module = name.rpartition(".")[0]
            if adapted is None or module not in adapted:
                out[module] = out.get(module, 0) + p.numel()
    return out


def warn_left_out(model, left_out: dict[str, int], why: str = "fused MoE experts are not supported here") -> float:
    """Warn (once per call) that ``left_out`` modules are not adapted (``why``: the reason the warning gives);
    returns their share of the model's parameters."""
    import warnings

    if not left_out:
        return 0.0
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    share = sum(left_out.values()) / max(total, 1)
    roles = sorted({role_of(n) for n in left_out})
    warnings.warn(
        f"target_modules='all-linear' leaves out {len(left_out)} module(s) with fused 3-D expert weights "
        f"({', '.join(roles)}), {100 * share:.1f}% of the model's parameters: {why}",
        UserWarning,
        stacklevel=3,
    )
    return share
