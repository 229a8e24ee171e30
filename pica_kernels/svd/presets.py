"""SVD presets and their versions, and what one call of :func:`pica_kernels.truncated_svd` runs.

A method name ("accurate", "fast-v1", "exact") is resolved once, where it enters
(:func:`preset`), into a :class:`Preset`: its versioned name, version, knobs and the
Krylov code it runs. A call then turns the preset, the rank and the weight's shape
into a :class:`Plan` (:func:`resolve_knobs`): the path, block and steps, and the
integer path code the numeric core (``torch.ops.pica.truncated_svd_core``, csrc/)
takes. The measurements behind the presets are in docs/svd.md.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Path codes of the numeric core (csrc/svd.cpp and its torch twin,
#: :mod:`pica_kernels.svd.torch_core`).
KRYLOV_V1, GRAM, FULL, KRYLOV_V2 = 0, 1, 2, 3

# Use the exact Gram path when the Krylov space would span at least this
# fraction of the short side d: there both paths cost about the same, and near
# k/d -> 1 the Krylov blocks become rank-deficient (docs/svd.md).
_EXACT_RATIO = 0.5


@dataclass(frozen=True)
class Preset:
    """One versioned preset: a name that always computes the same basis.

    ``block = rank + max(oversample, round(oversample_frac·rank))`` directions,
    ``steps`` applications of AᵀA, run by the Krylov of path code ``krylov``
    (:data:`KRYLOV_V1` or :data:`KRYLOV_V2`; :data:`FULL` for "exact", which has no
    knobs). ``wide_*``: on a weight with ``d = min(out, in) >= wide_min_d`` where
    the Krylov space would cross the Gram switch, a block of ``rank +
    wide_oversample`` with the most steps (down to ``wide_min_steps``) below it.
    """

    name: str
    version: int
    krylov: int
    oversample: int = 0
    oversample_frac: float = 0.0
    steps: int = 0
    wide_oversample: int | None = None
    wide_min_steps: int | None = None
    wide_min_d: int | None = None


#: Versioned presets. A preset's name with its version ("accurate-v2") always
#: computes the same basis, so an adapter file that records it can be verified
#: against a recomputed basis after the defaults change; the plain names point
#: at the newest version (:data:`SVD_METHOD_ALIASES`). v1: the settings of
#: pica_kernels <= 0.1 adapter files; v2: the same knobs run by the leaner
#: Krylov, plus the narrower block at large rank (docs/svd.md, "Presets").
SVD_PRESETS = {
    "accurate-v1": Preset("accurate-v1", 1, KRYLOV_V1, oversample=16, oversample_frac=0.25, steps=8),
    "fast-v1": Preset("fast-v1", 1, KRYLOV_V1, oversample=8, steps=3),
    "accurate-v2": Preset("accurate-v2", 2, KRYLOV_V2, oversample=16, oversample_frac=0.25, steps=8,
                          wide_oversample=16, wide_min_steps=6, wide_min_d=2048),
    "fast-v2": Preset("fast-v2", 2, KRYLOV_V2, oversample=8, steps=3),
}

#: The full float64 SVD (the reference); no knobs, so no version.
EXACT = Preset("exact", 0, FULL)

#: Plain preset names -> the versioned preset they run today.
SVD_METHOD_ALIASES = {"accurate": "accurate-v2", "fast": "fast-v2"}

#: Plain preset names as recorded by adapter files written before presets were
#: versioned -> the preset that reproduces those files' bases.
LEGACY_SVD_METHODS = {"accurate": "accurate-v1", "fast": "fast-v1"}

#: Methods ``truncated_svd`` accepts (also valid ``PiCaConfig.svd_method``):
#: the plain names, every versioned preset, and "exact".
SVD_METHODS = ("accurate", "fast", "exact", *SVD_PRESETS)


def preset(method: str, argument: str = "method") -> Preset:
    """The preset ``method`` runs today; a ValueError naming ``argument`` for an unknown name.

    The one check of a method name: configs call it with ``argument="svd_method"``.
    """
    if not isinstance(method, str) or method not in SVD_METHODS:
        raise ValueError(f"{argument} must be one of {SVD_METHODS}, got {method!r}")
    name = SVD_METHOD_ALIASES.get(method, method)
    return EXACT if name == EXACT.name else SVD_PRESETS[name]


def versioned_method(method: str) -> str:
    """The versioned preset ``method`` runs today ("accurate" -> "accurate-v2"; "exact" stays).

    Adapter files record this name, so that their bases can be recomputed (and
    verified against the stored fingerprints) after the plain names move on.
    """
    return preset(method).name


def method_from_file(method: str) -> str:
    """The preset that reproduces the bases of an adapter file recording ``method``.

    Files record the versioned name (:func:`versioned_method`) and get it back as is; a plain name can only come
    from a file written before presets were versioned, and meant the v1 preset (:data:`LEGACY_SVD_METHODS`).
    """
    return LEGACY_SVD_METHODS.get(method, method)


@dataclass(frozen=True)
class Plan:
    """What one call runs: ``path`` "krylov" | "gram" | "full", the block and the Krylov steps."""

    preset: Preset
    path: str
    block: int
    steps: int

    @property
    def method(self) -> str:
        """The versioned preset name (what adapter files record)."""
        return self.preset.name

    @property
    def algorithm(self) -> int:
        """Which Krylov runs: 1 or 2 (the preset's version) on the Krylov path, 0 off it."""
        return (1 if self.preset.krylov == KRYLOV_V1 else 2) if self.path == "krylov" else 0

    @property
    def code(self) -> int:
        """The path code of the numeric core: :data:`KRYLOV_V1`, :data:`GRAM`, :data:`FULL` or :data:`KRYLOV_V2`."""
        return {"krylov": self.preset.krylov, "gram": GRAM, "full": FULL}[self.path]

    def describe(self) -> str:
        """One line for tables: "gram", "full" or "krylov v2, block 80, 8 steps"."""
        if self.path != "krylov":
            return self.path
        return f"krylov v{self.algorithm}, block {self.block}, {self.steps} steps"


def resolve_knobs(
    method: str | Preset, rank: int, out_f: int, in_f: int, oversample: int | None = None,
    steps: int | None = None, exact_ratio: float | None = None,
) -> Plan:
    """The effective settings of a call on a weight (out_f, in_f) at ``rank`` (checked by the caller).

    ``block = rank + oversample`` (capped at d = min(out, in)); ``path`` is
    "gram" when ``(steps+1)·block >= min(exact_ratio, 1)·d``. "accurate-v2" on a
    weight with d >= 2048 first tries a narrower block (r + 16) with fewer steps
    (>= 6) below that switch; explicit ``oversample`` or ``steps`` turn that off:
    explicit knobs are used as given.
    """
    p = method if isinstance(method, Preset) else preset(method)
    if p is EXACT:
        return Plan(p, "full", 0, 0)
    explicit = oversample is not None or steps is not None
    if oversample is None:
        oversample = max(p.oversample, int(p.oversample_frac * rank + 0.5))
    steps = p.steps if steps is None else steps
    ratio = _EXACT_RATIO if exact_ratio is None else exact_ratio
    for name, v in (("oversample", oversample), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if not 0 <= ratio:
        raise ValueError(f"exact_ratio must be >= 0, got {ratio!r}")
    d = min(out_f, in_f)
    block = min(rank + oversample, d)
    # A Krylov space of (steps+1)·block >= d directions would exhaust the short
    # side: its last blocks are rounding noise, and the Gram path is exact
    # there, whatever exact_ratio asks.
    if (steps + 1) * block < min(ratio * d, d):
        return Plan(p, "krylov", block, steps)
    if not explicit and p.wide_min_steps is not None and d >= p.wide_min_d:
        # Large rank on a large weight: a narrower block and fewer steps instead
        # of the d x d eigh (a Krylov step on a narrow block gains more than the
        # same Krylov dimension spent on a wider block).
        wide = min(rank + p.wide_oversample, d)
        for s in range(steps, p.wide_min_steps - 1, -1):
            if (s + 1) * wide < min(ratio * d, d):
                return Plan(p, "krylov", wide, s)
    return Plan(p, "gram", block, steps)
