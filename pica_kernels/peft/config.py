"""``PiCaPeftConfig``: the PEFT configuration of PiCa (arXiv 2505.20211)."""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field

from peft.config import PeftConfig

from ..core.config import NATIVE_TO_PEFT, check_on_mismatch, check_shared_fields, set_aliases
from ..core.defaults import DEFAULT_SVD_METHOD, DEFAULT_TARGETS
from ..core.experts import check_share_experts
from ..core.targets import check_module_spec
from ..svd import method_from_file, versioned_method
from .peft_type import ensure_peft_type

#: The paper's targets: q, k, v, up, down projections (the native front end's default too).
DEFAULT_TARGET_MODULES = list(DEFAULT_TARGETS)


@dataclass
class PiCaPeftConfig(PeftConfig):
    """Configuration of a PiCa adapter for :func:`peft.get_peft_model`.

    PiCa adapts each targeted linear layer ``W`` (out, in) with a frozen basis
    of its own top-``r`` singular vectors and a trainable ``M`` shared by all
    layers of the same (role, shape) group (docs/design.md)::

        side="input":  y = x @ W.T + (x @ P.T) @ M.T    P = Vh[:r] (r, in),   M (out, r)
        side="output": y = x @ W.T + (x @ M.T) @ U_r.T  U_r = U[:, :r] (out, r), M (r, in)

    Args:
        r: basis rank (alias ``rank``).
        side: "input" (default, the paper's setting) or "output".
        target_modules: module-name suffixes, a regex (full match), or "all-linear".
            Defaults to the paper's q, k, v, up, down projections.
        exclude_modules: names to skip, same forms as ``target_modules`` (alias ``exclude``).
        share_m: one ``M`` per (role, shape) group, the role being the module name
            without layer indices (``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``);
            False gives one ``M`` per layer (alias ``share``).
        rank_pattern: ``{module-name suffix or regex: rank}``, a rank other than ``r`` for some layers
            (e.g. a small layer that cannot hold rank ``r``), as LoRA's ``rank_pattern``.
        svd_method: method of :func:`pica_kernels.truncated_svd` (default "accurate").
        svd_seed: seed of the randomised SVD sketch (bases come out identical under
            any global torch seed).
        check_base_model: on load, a base model whose tensors (untargeted ones too: embeddings, norms, other
            projections) differ from those the adapter was saved with: "error" (default) or "warn".
        store_bases: save every layer's basis in ``adapter_model.safetensors``
            (exact reload without SVD; costs r*(in or out) values per layer). When
            False, bases are recomputed on load and checked against a stored
            fingerprint.
        fan_in_fan_out: set automatically for transformers ``Conv1D`` layers (GPT-2),
            whose weight is stored (in, out); kept for PEFT compatibility.
        modules_to_save: extra modules trained fully and saved (e.g. a classifier head).
        init_weights: True: ``M`` starts at zero, so the model starts exactly at the
            base model. False: small random ``M`` from the global torch RNG (for tests only).
        layers_to_transform, layers_pattern: restrict to some layer indices, as in LoRA (``target_modules`` only).
        target_parameters: fused mixture-of-experts weights to adapt, as LoRA's ``target_parameters``: names (or
            '.'-boundary suffixes) of 3-D expert parameters, ``["experts.gate_up_proj", "experts.down_proj"]``
            (transformers 5's Mixtral, Qwen2-MoE / Qwen3-MoE, OLMoE experts). A fused ``gate_up_proj`` is two
            roles, ``gate_proj`` and ``up_proj`` (its halves; ``"experts.up_proj"`` selects one), each with a
            basis per expert (E, r, in) and one ``M`` per role shared by the experts and layers (docs/peft.md).
        share_experts: True (default): one ``M`` per expert role shared by every expert; False: one ``M`` per
            expert, (E, out, r).
    """

    r: int = field(default=32, metadata={"help": "PiCa basis rank"})
    side: str = field(default="input", metadata={"help": "'input' (basis Vh[:r]) or 'output' (basis U[:, :r])"})
    target_modules: list[str] | str | None = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        metadata={"help": "Module names (suffixes), a regex, or 'all-linear'"},
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to skip"})
    share_m: bool = field(default=True, metadata={"help": "One M per (role, shape) group"})
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module rank: {name or regex: rank}"})
    svd_method: str | None = field(default=DEFAULT_SVD_METHOD, metadata={"help": "truncated_svd method"})
    svd_seed: int = field(default=0, metadata={"help": "Seed of the SVD sketch"})
    store_bases: bool = field(default=False, metadata={"help": "Save the frozen bases in the adapter file"})
    check_base_model: str = field(default="error", metadata={
        "help": "On load, a base model that differs from the adapter's (any tensor): 'error' or 'warn'"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Weights stored (in, out) (Conv1D)"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra trainable modules"})
    init_weights: bool = field(default=True, metadata={"help": "Zero-init M (identity at start)"})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Layer list name"})
    target_parameters: list[str] | None = field(default=None, metadata={
        "help": "Fused MoE expert parameters (suffixes), e.g. ['experts.gate_up_proj', 'experts.down_proj']"})
    share_experts: bool = field(default=True, metadata={"help": "One M per expert role for all experts"})
    rank: InitVar[int | None] = None
    share: InitVar[bool | None] = None
    exclude: InitVar[list[str] | str | None] = None

    def __post_init__(self, rank=None, share=None, exclude=None) -> None:
        super().__post_init__()
        set_aliases(self, NATIVE_TO_PEFT, {"rank": rank, "share": share, "exclude": exclude})
        self.peft_type = ensure_peft_type()
        check_shared_fields(self, "r", "exclude_modules", svd_method_optional=True)
        check_on_mismatch(self.check_base_model)
        # None: PEFT's own rules (target_parameters, or a model-type default) decide; refused later when none apply.
        if self.target_modules is not None:
            self.target_modules = check_module_spec(self.target_modules, "target_modules")
        for key in ("target_modules", "exclude_modules"):  # PEFT keeps suffix lists as sets
            spec = getattr(self, key)
            if spec is not None and not isinstance(spec, str):
                setattr(self, key, set(spec))
        check_share_experts(self.share_experts)
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str) or not all(
                    isinstance(t, str) and t for t in self.target_parameters):
                raise ValueError(f"target_parameters must be a list of parameter names (suffixes such as "
                                 f"'experts.down_proj'), got {self.target_parameters!r}")
            self.target_parameters = list(self.target_parameters)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")

    def to_dict(self) -> dict:
        """As PEFT's, with the versioned SVD preset ("accurate" -> "accurate-v2"), so ``adapter_config.json`` names
        the preset its bases were computed with even after the plain names move on."""
        d = super().to_dict()
        if d.get("svd_method") is not None:
            d["svd_method"] = versioned_method(d["svd_method"])
        return d

    @classmethod
    def check_kwargs(cls, **kwargs):
        """A saved config (``from_pretrained``): a plain preset name comes from a file written before presets were
        versioned, and meant the v1 preset (:func:`pica_kernels.svd.method_from_file`)."""
        kwargs = super().check_kwargs(**kwargs)
        if isinstance(kwargs.get("svd_method"), str):
            kwargs["svd_method"] = method_from_file(kwargs["svd_method"])
        return kwargs
