"""``PiCaPeftConfig``: the PEFT configuration of PiCa (arXiv 2505.20211)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from .. import reference
from ._register import ensure_peft_type

#: The paper's targets (DESIGN.md section 7): q, k, v, up, down projections.
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@dataclass
class PiCaPeftConfig(PeftConfig):
    """Configuration of a PiCa adapter for :func:`peft.get_peft_model`.

    PiCa adapts each targeted linear layer ``W`` (out, in) with a frozen basis
    of its own top-``r`` singular vectors and a trainable ``M`` shared by all
    layers of the same (role, shape) group (DESIGN.md section 1)::

        side="input":  y = x @ W.T + (x @ P.T) @ M.T    P = Vh[:r] (r, in),   M (out, r)
        side="output": y = x @ W.T + (x @ M.T) @ U_r.T  U_r = U[:, :r] (out, r), M (r, in)

    Args:
        r: basis rank.
        side: "input" (default, the paper's setting) or "output".
        target_modules: module-name suffixes, a regex (full match), or "all-linear".
            Defaults to the paper's q, k, v, up, down projections.
        exclude_modules: names to skip, same forms as ``target_modules``.
        share_m: one ``M`` per (role, shape) group, the role being the module name
            without layer indices (``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``);
            False gives one ``M`` per layer.
        svd_method: method of :func:`pica_kernels.truncated_svd`; None means its
            default, resolved to a concrete name when the adapter is created (so the
            saved config records what was used).
        svd_seed: seed of the randomised SVD sketch (bases come out identical under
            any global torch seed).
        store_bases: save every layer's basis in ``adapter_model.safetensors``
            (exact reload without SVD; costs r*(in or out) values per layer). When
            False, bases are recomputed on load and checked against a stored
            fingerprint.
        fan_in_fan_out: set automatically for transformers ``Conv1D`` layers (GPT-2),
            whose weight is stored (in, out); kept for PEFT compatibility.
        modules_to_save: extra modules trained fully and saved (e.g. a classifier head).
        init_weights: True: ``M`` starts at zero, so the model starts exactly at the
            base model. False: small random ``M`` (for tests only).
        layers_to_transform, layers_pattern: restrict to some layer indices, as in LoRA.
    """

    r: int = field(default=32, metadata={"help": "PiCa basis rank"})
    side: str = field(default="input", metadata={"help": "'input' (basis Vh[:r]) or 'output' (basis U[:, :r])"})
    target_modules: list[str] | str | None = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        metadata={"help": "Module names (suffixes), a regex, or 'all-linear'"},
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to skip"})
    share_m: bool = field(default=True, metadata={"help": "One M per (role, shape) group"})
    svd_method: str | None = field(default=None, metadata={"help": "truncated_svd method (None: its default)"})
    svd_seed: int = field(default=0, metadata={"help": "Seed of the SVD sketch"})
    store_bases: bool = field(default=False, metadata={"help": "Save the frozen bases in the adapter file"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Weights stored (in, out) (Conv1D)"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra trainable modules"})
    init_weights: bool = field(default=True, metadata={"help": "Zero-init M (identity at start)"})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Layer list name"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        reference.check_side(self.side)
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
