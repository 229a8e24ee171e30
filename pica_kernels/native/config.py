"""``PiCaConfig``: how the native front end applies PiCa."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import InitVar, asdict, dataclass, field, fields

from ..core.config import PEFT_TO_NATIVE, check_shared_fields, set_aliases
from ..core.defaults import DEFAULT_SVD_METHOD, DEFAULT_TARGETS, DTYPES
from ..core.errors import PiCaConfigError
from ..core.experts import check_share_experts
from ..core.targets import check_module_spec


@dataclass
class PiCaConfig:
    """How to apply PiCa.

    Attributes:
        rank: basis rank r (alias ``r``).
        side: "input" (default; basis P = Vh[:r], M (out, r)) or "output".
        target_modules: a list of module-name suffixes (matched on "."
            boundaries, e.g. "q_proj" or "attention.output.dense"), a single
            regex string (full match on the module name), or "all-linear"
            (every linear layer except the output embedding / lm_head).
        exclude: names to skip, same forms as ``target_modules`` (alias ``exclude_modules``).
        share: one M per (role, shape) group (True) or one per layer (False) (alias ``share_m``).
        share_experts: fused MoE experts (``mlp.experts.gate_proj`` / ``up_proj`` / ``down_proj`` roles of a 3-D
            ``gate_up_proj`` / ``down_proj``): one M per role shared by every expert (True, default) or one M per
            expert, (E, out, r) (False); either way shared across layers as ``share`` says.
        rank_pattern: ``{module-name suffix or regex: rank}``, a rank for some layers other than ``rank``.
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
    share_experts: bool = True
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    svd_method: str = DEFAULT_SVD_METHOD
    svd_seed: int = 0
    m_dtype: str | None = None
    store_bases: bool = False
    r: InitVar[int | None] = None
    share_m: InitVar[bool | None] = None
    exclude_modules: InitVar[str | Sequence[str] | None] = None

    def __post_init__(self, r=None, share_m=None, exclude_modules=None) -> None:
        set_aliases(self, PEFT_TO_NATIVE, {"r": r, "share_m": share_m, "exclude_modules": exclude_modules})
        check_shared_fields(self, "rank", "exclude", svd_method_optional=False)
        check_share_experts(self.share_experts)
        if self.m_dtype is not None and self.m_dtype not in DTYPES:
            raise ValueError(f"m_dtype must be one of {sorted(DTYPES)}, got {self.m_dtype!r}")
        self.target_modules = check_module_spec(self.target_modules, "target_modules")
        if not self.target_modules:
            raise PiCaConfigError("target_modules is empty")

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("target_modules", "exclude"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PiCaConfig:
        known = {f.name for f in fields(cls)} | set(PEFT_TO_NATIVE)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PiCaConfig fields {sorted(unknown)}")
        return cls(**d)
