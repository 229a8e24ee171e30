"""Export a PiCa adapter as a standard PEFT LoRA adapter (one implementation for both front ends).

A PiCa layer is structurally a LoRA layer ``y = base(x) + (x @ A.T) @ B.T * scaling``:

======  =====================  =====================
side    ``lora_A`` (r, in)     ``lora_B`` (out, r)
======  =====================  =====================
input   ``P`` (frozen basis)   ``M`` (trained)
output  ``M`` (trained)        ``U_r`` (frozen basis)
======  =====================  =====================

with ``scaling = lora_alpha / r = 1`` (``lora_alpha = r`` per layer, no rsLoRA,
no dropout). The file is what ``peft.PeftModel.from_pretrained`` reads and what
LoRA servers (vLLM, SGLang, TGI multi-LoRA; llama.cpp after
``convert_lora_to_gguf.py``) load: ``adapter_config.json`` and
``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``. The format has
no notion of a shared matrix, so a shared ``M`` is written once per layer.

Fused MoE experts (a 3-D parameter, ``experts.gate_up_proj`` (E, 2*ffn, hidden)) are written in PEFT's LoRA
format for parameters (``target_parameters``, PEFT's ``lora.ParamWrapper``): per parameter ``lora_A`` is
``(E*r, in)``, expert ``e``'s rows ``[e*r, (e+1)*r)``, and ``lora_B`` is ``(out, r*E)`` with expert ``e``'s
column ``k`` at ``k*E + e`` (PEFT reshapes it ``(out, r, E)``), so that PEFT computes
``ΔW_e = lora_B_e @ lora_A_e`` (out, in) for every expert. PEFT wraps each targeted parameter of a module in one
more ``ParamWrapper``, the module's first parameter innermost, so a parameter's keys carry one ``.base_layer``
per adapted parameter after it on the same module (``experts.base_layer.lora_A.weight`` is ``gate_up_proj`` when
``down_proj`` is adapted too). What that format cannot say is refused with :class:`LoraExportError`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import reference
from .base import LoraFactors
from .errors import PiCaError
from .experts import ExpertsLayout

__all__ = [
    "LORA_CONFIG_FILE",
    "LORA_TENSORS_FILE",
    "ExpertLoraFactors",
    "LoraExportError",
    "expert_lora_factors",
    "experts_lora_factors",
    "lora_factors",
    "write_lora_adapter",
]

LORA_CONFIG_FILE = "adapter_config.json"
LORA_TENSORS_FILE = "adapter_model.safetensors"
#: PEFT's key prefix of a LoRA adapter file (``PeftModel`` wraps the model as ``base_model.model``).
PEFT_KEY_PREFIX = "base_model.model."


def lora_factors(name: str, basis: torch.Tensor, m: torch.Tensor, side: str, fan_in_fan_out: bool) -> LoraFactors:
    """The LoRA factors of one PiCa layer. basis: P (r, in) or U_r (out, r); m: M (out, r) or (r, in).

    The tensors keep their own dtypes (basis in the weight's dtype, M usually float32), so the
    exported values are exactly the ones the PiCa layer computes with.
    """
    up, down = reference.lowrank_factors(basis, m, side)  # y += (x @ down.T) @ up.T: up (out, r), down (r, in)
    return LoraFactors(name, down.detach().to("cpu").contiguous(), up.detach().to("cpu").contiguous(), fan_in_fan_out)


class LoraExportError(PiCaError, ValueError):
    """A PiCa adapter (part) that PEFT's LoRA format cannot express with the outputs the PiCa model has."""


@dataclass(frozen=True)
class ExpertLoraFactors:
    """One fused expert parameter of the exported adapter (PEFT LoRA ``target_parameters``).

    module: the experts module's name in the base model; parameter: the 3-D parameter's name on it.
    lora_a: (E, R, in), lora_b: (E, out, R): expert ``e``'s ``ΔW_e = lora_b[e] @ lora_a[e]`` (out, in), in the
    expert's own (out, in) sense whatever the stored layout (PEFT reads (E, in, out) storage from the module's
    ``is_transposed``). position: the parameter's index in the module's ``named_parameters(recurse=False)``
    order, which decides how PEFT nests its wrappers (see the module docstring).
    """

    module: str
    parameter: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    position: int

    @property
    def name(self) -> str:
        return f"{self.module}.{self.parameter}"

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]

    def peft_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``lora_A`` (E*R, in) and ``lora_B`` (out, R*E) as PEFT's ``ParamWrapper`` stores them."""
        e, r, n_in = self.lora_a.shape
        lora_a = self.lora_a.reshape(e * r, n_in)
        lora_b = self.lora_b.permute(1, 2, 0).reshape(self.lora_b.shape[1], r * e)  # column k*E + e = lora_b[e][:, k]
        return lora_a.contiguous(), lora_b.contiguous()


def expert_lora_factors(
    module: str,
    parameter: str,
    parts: list[tuple[slice, torch.Tensor, torch.Tensor, str]],
    out_features: int,
    position: int,
    *,
    stored_transposed: bool,
    peft_reads_transposed: bool,
) -> ExpertLoraFactors:
    """The LoRA factors of one fused expert parameter adapted by PiCa in one or several row blocks (roles).

    parts: ``(rows, basis, m, side)`` per role: ``rows`` the slice of the expert's output rows the role holds (a
    fused ``gate_up_proj`` holds gate rows ``[0, ffn)`` and up rows ``[ffn, 2*ffn)``), ``basis`` P (E, r, in) or
    U_r (E, rows, r), ``m`` M (rows, r) / (r, in), shared by the experts, or (E, rows, r) / (E, r, in), one per
    expert. The LoRA rank is the sum of the roles' ranks: ``lora_a`` stacks the roles' (r, in) factors,
    ``lora_b`` places each role's (rows, r) factor in its own rows and columns (zero elsewhere, which adds exact
    zeros), so ``ΔW_e`` is the PiCa one. Tensors keep their dtypes (basis: the weight's; M: its own).

    stored_transposed: the parameter holds (E, in, out) (the expert computes ``x @ W[e]``), not (E, out, in);
    peft_reads_transposed: what PEFT will assume, the experts module's ``is_transposed`` attribute (transformers'
    ``use_experts_implementation`` sets it; False when absent). Where the two differ PEFT would apply every
    expert's ``ΔW_e`` transposed (or fail on the shapes): refused with :class:`LoraExportError`.
    """
    if stored_transposed != peft_reads_transposed:
        stored, read = ("(E, in, out)", "(E, out, in)") if stored_transposed else ("(E, out, in)", "(E, in, out)")
        raise LoraExportError(
            f"{module}.{parameter}: the experts store it as {stored}, but PEFT's LoRA for parameters would read it as "
            f"{read} (it follows the module's is_transposed attribute, {peft_reads_transposed}), so the exported "
            f"adapter would apply every expert's delta weight transposed: PEFT cannot express this layout "
            f"(an experts class that declares is_transposed={stored_transposed} would be read correctly)"
        )
    downs, ups = [], []
    for _, basis, m, side in parts:
        up, down = reference.lowrank_factors(basis.detach(), m.detach(), side)  # up (E|·, rows, r), down (E|·, r, in)
        downs.append(down)
        ups.append(up)
    n_exp = max(t.shape[0] for t in (*downs, *ups) if t.dim() == 3)
    n_in = downs[0].shape[-1]
    rank = sum(d.shape[-2] for d in downs)
    a_dtype = functools.reduce(torch.promote_types, (d.dtype for d in downs))
    b_dtype = functools.reduce(torch.promote_types, (u.dtype for u in ups))
    lora_a = torch.zeros(n_exp, rank, n_in, dtype=a_dtype)
    lora_b = torch.zeros(n_exp, out_features, rank, dtype=b_dtype)
    col = 0
    for (rows, *_), down, up in zip(parts, downs, ups):
        r = down.shape[-2]
        lora_a[:, col:col + r] = down.to("cpu")
        lora_b[:, rows, col:col + r] = up.to("cpu")
        col += r
    return ExpertLoraFactors(module, parameter, lora_a, lora_b, position)


def experts_lora_factors(
    name: str,
    experts: torch.nn.Module,
    layout: ExpertsLayout,
    tensors: Mapping[str, tuple[torch.Tensor, torch.Tensor, str]],
) -> list[ExpertLoraFactors]:
    """The factors of every adapted fused parameter of experts module ``experts`` (named ``name`` in the base model)
    from one adapter's ``{role: (basis, M, side)}`` (basis (E, r, in) / (E, out, r); M shared (out, r) / (r, in) or
    per expert (E, out, r) / (E, r, in)): each role is a row block of its parameter (:func:`expert_lora_factors`).
    PiCa's expert layouts are (E, out, in) (:func:`pica_kernels.core.experts.experts_layout`); PEFT reads the
    orientation from the module's ``is_transposed``."""
    parts: dict[str, list] = {}
    for role, (basis, m, side) in tensors.items():
        r = layout.role(role)
        parts.setdefault(r.param, []).append((slice(*r.rows), basis, m, side))
    order = [n for n, _ in experts.named_parameters(recurse=False)]
    return [
        expert_lora_factors(name, param, param_parts, getattr(experts, param).shape[1], order.index(param),
                            stored_transposed=False,
                            peft_reads_transposed=bool(getattr(experts, "is_transposed", False)))
        for param, param_parts in parts.items()
    ]


def _pattern(name: str) -> str:
    """A PEFT rank/alpha pattern that matches module ``name`` only (PEFT tests ``(.*\\.)?(pattern)$``)."""
    return re.escape(name)


def _short_names(names: list[str], all_names: Iterable[str] | None, parts: int) -> list[str]:
    """The last ``parts`` name components when they select exactly ``names`` among ``all_names``, else full names.

    PEFT selects a module (``target_modules``) or a parameter (``target_parameters``) whose full name is a listed
    name or ends with ``"." + name``.
    """
    if all_names is not None:
        short = sorted({".".join(n.split(".")[-parts:]) for n in names})
        selected = {n for n in all_names if any(n == s or n.endswith("." + s) for s in short)}
        if selected == set(names):
            return short
    return sorted(names)


def _target_modules(names: list[str], all_linear_names: Iterable[str] | None) -> list[str]:
    """Last name components when they select exactly ``names`` among the model's linear layers, else full names."""
    return _short_names(names, all_linear_names, 1)


def write_lora_adapter(
    path: str | os.PathLike,
    layers: list[LoraFactors],
    *,
    base_model_name_or_path: str | None,
    task_type: str | None = None,
    all_linear_names: Iterable[str] | None = None,
    expert_layers: list[ExpertLoraFactors] = (),
    all_expert_names: Iterable[str] | None = None,
    extra_config: dict | None = None,
) -> Path:
    """Write ``layers`` (and fused ``expert_layers``) as a PEFT LoRA adapter directory ``path``; returns it.

    ``r`` is the most common rank (of the expert parameters when there are any: PEFT 0.21 warns about
    ``rank_pattern`` keys that name parameters, though it applies them); layers of another rank get
    ``rank_pattern`` and ``alpha_pattern`` entries (``lora_alpha = r`` everywhere, so the scaling is 1).
    ``all_linear_names``: every adaptable module name of the base model, used to write short ``target_modules``
    (``["q_proj", "v_proj"]``, what LoRA servers expect) when they select exactly the exported layers;
    ``all_expert_names``: every fused expert parameter's full name, for short ``target_parameters``
    (``["experts.down_proj"]``) in the same way.
    """
    from safetensors.torch import save_file

    expert_layers = list(expert_layers)
    if not layers and not expert_layers:
        raise ValueError("no PiCa layer to export (the adapter has no layers)")
    names = [layer.name for layer in (*layers, *expert_layers)]
    if len(set(names)) != len(names):
        raise ValueError(f"module names must be unique, got duplicates {sorted(n for n, c in Counter(names).items() if c > 1)}")
    if expert_layers and any(layer.fan_in_fan_out for layer in layers):
        conv = next(layer.name for layer in layers if layer.fan_in_fan_out)
        raise LoraExportError(
            f"{expert_layers[0].name}: PEFT's LoRA for parameters (lora.ParamWrapper) refuses fan_in_fan_out, which "
            f"the Conv1D layer {conv!r} of the same adapter needs (one value per LoRA config); export the two kinds "
            f"of layer as two adapters"
        )
    ranked = expert_layers or layers
    rank = Counter(layer.rank for layer in ranked).most_common(1)[0][0]
    rank_pattern = {_pattern(layer.name): layer.rank for layer in (*layers, *expert_layers) if layer.rank != rank}
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        key = f"{PEFT_KEY_PREFIX}{layer.name}"
        # Shared M: one clone per layer, as the format has no shared tensors (safetensors refuses aliased storage).
        tensors[f"{key}.lora_A.weight"] = layer.lora_a.clone()
        tensors[f"{key}.lora_B.weight"] = layer.lora_b.clone()
    for expert in expert_layers:
        # PEFT nests one ParamWrapper per targeted parameter of a module, the first (by position) innermost.
        depth = sum(o.module == expert.module and o.position > expert.position for o in expert_layers)
        key = f"{PEFT_KEY_PREFIX}{expert.module}{'.base_layer' * depth}"
        lora_a, lora_b = expert.peft_tensors()
        tensors[f"{key}.lora_A.weight"] = lora_a.clone()
        tensors[f"{key}.lora_B.weight"] = lora_b.clone()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers),
        "target_modules": _target_modules([layer.name for layer in layers], all_linear_names),
        **({"target_parameters": _short_names([e.name for e in expert_layers], all_expert_names, 2)}
           if expert_layers else {}),
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        **(extra_config or {}),
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / LORA_TENSORS_FILE), metadata={"format": "pt"})
    with open(path / LORA_CONFIG_FILE, "w") as f:
        json.dump(config, f, indent=2)
    return path
