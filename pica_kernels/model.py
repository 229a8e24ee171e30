"""Apply PiCa to a model: targets, groups, the shared M, multiple adapters, merge.

Groups (DESIGN.md section 1): one ``M`` per (role, shape), the role being the
module name with the layer index removed (``model.layers.3.self_attn.q_proj``
-> ``self_attn.q_proj``). Two modules of one role but different shapes are two
groups. All ``M`` live in one :class:`~pica_kernels.layer.PiCaBank` registered
once on the model as ``model.pica_bank``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from . import reference
from .layer import PiCaBank, PiCaLinear, basis_buffer_name, is_supported_base, weight_out_in
from .svd import SVD_METHODS, truncated_svd

#: The paper's targets (DESIGN.md section 7): q, k, v, up, down projections.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
BANK_NAME = "pica_bank"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Batch of the basis SVD, in weight elements: bounds the stack of one group
# (2**27 elements = 512 MiB in the float32 working copy; the exact Gram path
# of a short side d adds only d x d float64 per layer) on a 7B model.
_SVD_BATCH_ELEMENTS = 2**27


@dataclass
class PiCaConfig:
    """How to apply PiCa.

    Attributes:
        rank: basis rank r.
        side: "input" (default; basis P = Vh[:r], M (out, r)) or "output".
        target_modules: a list of module-name suffixes (matched on "."
            boundaries, e.g. "q_proj" or "attention.output.dense"), a single
            regex string (full match on the module name), or "all-linear"
            (every linear layer except the output embedding / lm_head).
        exclude: names to skip, same forms as ``target_modules``.
        share: one M per (role, shape) group (True) or one per layer (False).
        svd_method, svd_seed: basis computation, see :func:`truncated_svd`
            ("accurate" randomised block Krylov by default, "fast", or "exact").
        m_dtype: dtype of M; None means float32 (also for bf16/fp16 models),
            float64 for float64 layers.
        store_bases: save the bases in adapter files (exact reload without SVD).
    """

    rank: int = 32
    side: str = "input"
    target_modules: str | Sequence[str] = DEFAULT_TARGETS
    exclude: str | Sequence[str] | None = None
    share: bool = True
    svd_method: str = "accurate"
    svd_seed: int = 0
    m_dtype: str | None = None
    store_bases: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        reference.check_side(self.side)
        if self.svd_method not in SVD_METHODS:
            raise ValueError(f"svd_method must be one of {SVD_METHODS}, got {self.svd_method!r}")
        if self.m_dtype is not None and self.m_dtype not in _DTYPES:
            raise ValueError(f"m_dtype must be one of {sorted(_DTYPES)}, got {self.m_dtype!r}")
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules is empty")
        if self.exclude is not None and not isinstance(self.exclude, str):
            self.exclude = tuple(self.exclude)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("target_modules", "exclude"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PiCaConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PiCaConfig fields {sorted(unknown)}")
        return cls(**d)


# ------------------------------------------------------------------- targets
def role_of(name: str) -> str:
    """Module name with the layer index removed: the part after the last all-digit component
    (``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``), or, for a layer that is itself an item of a
    list (``blocks.3``), the name without its indices (``blocks``)."""
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    if not idx:
        return name
    tail = parts[idx[-1] + 1 :]
    return ".".join(tail) if tail else ".".join(p for p in parts if not p.isdigit())


def group_key(name: str, out_features: int, in_features: int, share: bool) -> str:
    """Bank key of a layer's M: (role, shape) when shared, the full name otherwise. Contains no '.'."""
    base = role_of(name) if share else name
    return f"{base.replace('.', '-')}-{out_features}x{in_features}"


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _matches(name: str, spec: str | Sequence[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(_suffix_match(name, s) for s in spec)


def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
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
    """The (name, module) pairs ``config`` selects; raises on a name that matches nothing or a non-linear match."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = config.target_modules
    found: list[tuple[str, nn.Module]] = []
    for name, module in _candidate_modules(model):
        if config.exclude is not None and _matches(name, config.exclude):
            continue
        if targets == "all-linear":
            if not (isinstance(module, PiCaLinear) or is_supported_base(module)):
                continue
            base = module.base_layer if isinstance(module, PiCaLinear) else module
            if base is out_emb or name.split(".")[-1] == "lm_head":
                continue
        elif not _matches(name, targets):
            continue
        if not (isinstance(module, PiCaLinear) or is_supported_base(module)):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}; PiCa adapts nn.Linear and "
                f"transformers Conv1D layers only (check target_modules={config.target_modules!r})"
            )
        found.append((name, module))
    if not isinstance(targets, str):
        for t in targets:
            if not any(_suffix_match(n, t) for n, _ in found):
                excluded = config.exclude is not None and any(
                    _suffix_match(n, t) for n, _ in _candidate_modules(model)
                )
                why = " (all its matches are excluded)" if excluded else ""
                raise ValueError(
                    f"target module {t!r} matches no module of {type(model).__name__}{why}; "
                    f"linear layers here are named like {_example_linear_names(model)}"
                )
    if not found:
        raise ValueError(f"target_modules={targets!r} matches no linear layer of {type(model).__name__}")
    return found


def _example_linear_names(model: nn.Module, k: int = 6) -> list[str]:
    roles = []
    for name, module in _candidate_modules(model):
        if is_supported_base(module) or isinstance(module, PiCaLinear):
            r = role_of(name)
            if r not in roles:
                roles.append(r)
    return roles[:k]


# ------------------------------------------------------------------- apply
def get_bank(model: nn.Module) -> PiCaBank:
    bank = getattr(model, BANK_NAME, None)
    if not isinstance(bank, PiCaBank):
        raise ValueError(f"{type(model).__name__} has no PiCa adapters; call apply_pica(model, config) first")
    return bank


def pica_layers(model: nn.Module) -> Iterator[tuple[str, PiCaLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, PiCaLinear):
            yield name, module


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _weight_oi(module: nn.Module) -> torch.Tensor:
    return module.base_weight if isinstance(module, PiCaLinear) else weight_out_in(module)


def batched_bases(
    layers: list[tuple[str, torch.Tensor]],
    rank: int,
    side: str,
    *,
    method: str,
    seed: int,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Bases of named (out, in) weights: one batched truncated SVD per group of equal shape, dtype and device.

    Returns ``{name: basis}`` (views into the batched result). Shared by apply_pica and the PEFT tuner.
    """
    by_shape: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, w in layers:
        by_shape.setdefault((tuple(w.shape), w.dtype, w.device), []).append((name, w))
    bases: dict[str, torch.Tensor] = {}
    bar = None
    if progress and len(layers) > 1 and layers[0][1].device.type != "meta":
        from tqdm.auto import tqdm

        bar = tqdm(total=len(layers), desc=f"PiCa bases (r={rank}, {side} side)", unit="layer")
    for group in by_shape.values():
        step = max(1, _SVD_BATCH_ELEMENTS // group[0][1].numel())
        for i in range(0, len(group), step):
            chunk = group[i : i + step]
            stack = torch.stack([w.detach() for _, w in chunk])
            basis, _ = truncated_svd(stack, rank, side, method=method, seed=seed)
            for (name, _), b in zip(chunk, basis):
                bases[name] = b
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return bases


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
    :func:`parameter_report` to plan budgets without weights.

    ``bases`` maps layer names to precomputed bases (load_adapter passes stored ones).
    """
    config = config or PiCaConfig()
    existing = getattr(model, BANK_NAME, None)
    bank = existing if isinstance(existing, PiCaBank) else None
    if bank is not None and adapter_name in bank.configs:
        raise ValueError(f"model already has an adapter named {adapter_name!r}")
    targets = find_targets(model, config)
    for name, module in targets:
        out_f, in_f = _weight_oi(module).shape
        if config.rank > min(out_f, in_f):
            raise ValueError(
                f"rank={config.rank} is larger than min(out, in) = {min(out_f, in_f)} of layer {name!r} "
                f"(out={out_f}, in={in_f}); lower the rank or exclude that layer"
            )
    keys: dict[str, tuple[str, tuple[int, int]]] = {}
    for name, module in targets:
        out_f, in_f = _weight_oi(module).shape
        key = group_key(name, out_f, in_f, config.share)
        ident = (role_of(name) if config.share else name, (out_f, in_f))
        if keys.setdefault(key, ident) != ident:
            raise ValueError(f"group key {key!r} is claimed by {keys[key]} and {ident}; rename a module")

    first = bank is None
    if first:
        for p in model.parameters():
            p.requires_grad_(False)
        bank = PiCaBank()
        model.add_module(BANK_NAME, bank)

    bases = dict(bases or {})
    needed = []
    for name, module in targets:
        if name in bases:
            continue
        if isinstance(module, PiCaLinear) and hasattr(module, basis_buffer_name(config.side, config.rank)):
            continue  # shared with an existing adapter of the same side and rank
        needed.append((name, _weight_oi(module)))
    bases.update(batched_bases(needed, config.rank, config.side, method=config.svd_method,
                               seed=config.svd_seed, progress=progress))

    m_dtype = _DTYPES[config.m_dtype] if config.m_dtype else None
    for name, module in targets:
        out_f, in_f = _weight_oi(module).shape
        key = group_key(name, out_f, in_f, config.share)
        kwargs = dict(group=key, basis=bases.get(name), m_dtype=m_dtype,
                      svd_method=config.svd_method, svd_seed=config.svd_seed)
        if isinstance(module, PiCaLinear):
            module.add_adapter(adapter_name, config.rank, config.side, **kwargs)
        else:
            layer = PiCaLinear(module, config.rank, config.side, adapter_name=adapter_name, bank=bank, **kwargs)
            if not first:
                # PEFT semantics: an added adapter starts inactive, also on layers it newly wraps.
                layer.active_adapter = None
            _set_submodule(model, name, layer)
    bank.configs[adapter_name] = config
    return model


# ------------------------------------------------------------ adapters API
def _layers_or_raise(model: nn.Module) -> list[PiCaLinear]:
    get_bank(model)
    return [m for _, m in pica_layers(model)]


def active_adapter(model: nn.Module) -> str | None:
    layers = _layers_or_raise(model)
    return layers[0].active_adapter if layers else None


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter of every PiCa layer."""
    bank = get_bank(model)
    if adapter_name not in bank.configs:
        raise KeyError(f"unknown adapter {adapter_name!r}; the model has {sorted(bank.configs)}")
    for layer in _layers_or_raise(model):
        if adapter_name in layer.adapters:
            layer.set_adapter(adapter_name)
        else:
            layer.unmerge()
            layer.active_adapter = None  # this layer is not adapted by adapter_name: base output


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Context in which the model computes exactly its base output (unmerging and re-merging if merged)."""
    layers = _layers_or_raise(model)
    merged = {id(layer): layer.merged_adapter for layer in layers}
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
            if merged[id(layer)] is not None:
                layer.merge(merged[id(layer)])


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter everywhere; the active adapter falls back to a remaining one."""
    bank = get_bank(model)
    if adapter_name not in bank.configs:
        raise KeyError(f"unknown adapter {adapter_name!r}; the model has {sorted(bank.configs)}")
    for layer in _layers_or_raise(model):
        if adapter_name in layer.adapters:
            layer.delete_adapter(adapter_name)
    bank.remove(adapter_name)
    del bank.configs[adapter_name]
    remaining = next(iter(bank.configs), None)
    if remaining is not None and active_adapter(model) is None:
        set_adapter(model, remaining)


# -------------------------------------------------------------------- merge
def merge(model: nn.Module, adapter_name: str | None = None, *, safe_merge: bool = False) -> nn.Module:
    """Add ``ΔW`` of the active (or named) adapter into every base weight; see :meth:`PiCaLinear.merge`."""
    layers = _layers_or_raise(model)
    if safe_merge:
        # Check every layer before touching any, so a failure leaves the model unmerged.
        for layer in layers:
            name = adapter_name or layer.active_adapter
            if name in layer.adapters and not layer.merged:
                merged = layer.base_weight.to(torch.float32) + layer.delta_weight(name)
                if not bool(torch.isfinite(merged).all()):
                    raise ValueError(f"merging adapter {name!r} gives NaN or Inf in a weight; nothing was merged")
    for layer in layers:
        name = adapter_name or layer.active_adapter
        if name in layer.adapters:
            layer.merge(name)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every base weight bit for bit."""
    for layer in _layers_or_raise(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Merge, then replace every PiCaLinear by its (merged) base layer and drop the bank: a plain model."""
    merge(model, adapter_name)
    for name, layer in list(pica_layers(model)):
        _set_submodule(model, name, layer.base_layer)
    delattr(model, BANK_NAME)
    return model


# ------------------------------------------------------------------- report
@dataclass
class GroupReport:
    key: str
    role: str
    weight_shape: tuple[int, int]
    m_shape: tuple[int, int]
    layers: list[str]
    trainable: int
    frozen_bases: int


@dataclass
class ParameterReport:
    adapter: str
    rank: int
    side: str
    groups: list[GroupReport]
    base_parameters: int

    @property
    def trainable(self) -> int:
        return sum(g.trainable for g in self.groups)

    @property
    def frozen_bases(self) -> int:
        return sum(g.frozen_bases for g in self.groups)

    @property
    def layers(self) -> int:
        return sum(len(g.layers) for g in self.groups)

    def __str__(self) -> str:
        rows = [("group", "weight (out x in)", "M", "layers", "trainable", "frozen basis")]
        for g in self.groups:
            rows.append((g.role, "x".join(map(str, g.weight_shape)), "x".join(map(str, g.m_shape)),
                         str(len(g.layers)), f"{g.trainable:,}", f"{g.frozen_bases:,}"))
        rows.append(("total", "", "", str(self.layers), f"{self.trainable:,}", f"{self.frozen_bases:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"PiCa adapter {self.adapter!r}: rank {self.rank}, {self.side} side, "
                 f"base model {self.base_parameters:,} parameters "
                 f"(trainable = {100 * self.trainable / max(self.base_parameters, 1):.3f}% of it)"]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def parameter_report(model: nn.Module, adapter_name: str | None = None) -> ParameterReport:
    """Trainable M and frozen basis counts per group (works on the meta device)."""
    bank = get_bank(model)
    adapter_name = adapter_name or active_adapter(model)
    if adapter_name not in bank.configs:
        raise KeyError(f"unknown adapter {adapter_name!r}; the model has {sorted(bank.configs)}")
    config = bank.configs[adapter_name]
    groups: dict[str, GroupReport] = {}
    base_params = 0
    for name, layer in pica_layers(model):
        if adapter_name not in layer.adapters:
            continue
        spec = layer.adapters[adapter_name]
        m = layer.m(adapter_name)
        g = groups.get(spec.group)
        if g is None:
            g = groups[spec.group] = GroupReport(
                spec.group, role_of(name) if config.share else name,
                (layer.out_features, layer.in_features), tuple(m.shape), [], m.numel(), 0)
        g.layers.append(name)
        g.frozen_bases += layer.basis(adapter_name).numel()
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith(BANK_NAME + ".") or id(p) in seen:
            continue
        seen.add(id(p))
        base_params += p.numel()
    return ParameterReport(adapter_name, config.rank, config.side, list(groups.values()), base_params)
