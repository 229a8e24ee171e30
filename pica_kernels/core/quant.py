"""Quantized frozen bases (QLoRA-style): bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` and torchao-quantized ``nn.Linear``.

What PiCa needs from a quantized layer, in one place:

- :func:`quant_info`: what the quantisation is (method, type, block size, ...), recorded in adapter files and
  compared on load (an adapter trained on an nf4 base is refused on an fp4 or int8 one).
- :func:`dequantized_weight`: ``W`` (out, in) as the layer computes with it; the basis is the SVD of this, and
  the base-weight identity in adapter files is taken from it (it is the same for every fresh quantisation of the
  same weights, unlike a byte checksum of storage that re-quantising changes).
- the forward is the base layer's own output plus the low-rank term (:mod:`pica_kernels.core.forward`, given no
  weight), so the quantized GEMM is whatever the library runs.
- :func:`set_quantized_stack`: merge re-quantizes ``dequant(W0) + ΣΔW`` (lossy, with a
  warning, as PEFT does); the original quantized storage objects (packed data and quantization state) are kept,
  so unmerge puts them back bit for bit. Memory: the original packed weight stays alive while merged (for nf4
  about a quarter of a 16-bit copy), no dequantized copy is kept.
- :func:`quantize_base`: quantize the linear layers of a model (nf4, fp4, bnb int8, torchao int8).

bitsandbytes and torchao are optional (``pip install 'pica_kernels[quant]'``); a module of theirs can only exist
once they are imported, so detection looks at ``sys.modules`` and never imports them.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .defaults import DTYPES

__all__ = [
    "QUANT_EXTRA",
    "dequantized_copy",
    "dequantized_weight",
    "is_quantized_base",
    "quant_info",
    "quantize_base",
    "set_quantized_stack",
]

QUANT_EXTRA = "pica_kernels[quant]"
QUANT_METHODS = ("nf4", "fp4", "bnb-int8", "torchao-int8")
SNAPSHOT = "_pica_quant_original"


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


def _require(package: str):
    from .imports import import_quietly

    try:
        return import_quietly(package)
    except ImportError as e:
        raise ImportError(
            f"quantized bases need {package}: pip install '{QUANT_EXTRA}' (bitsandbytes and torchao)"
        ) from e


def _bnb_kind(module: nn.Module) -> str | None:
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "bnb-4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "bnb-8bit"
    return None


def _is_torchao_tensor(t) -> bool:
    utils = sys.modules.get("torchao.utils")
    return utils is not None and isinstance(t, utils.TorchAOBaseTensor)


def quant_kind(module: nn.Module) -> str | None:
    """"bnb-4bit", "bnb-8bit", "torchao" or None (not a quantized base)."""
    kind = _bnb_kind(module)
    if kind is not None:
        return kind
    if isinstance(module, nn.Linear) and _is_torchao_tensor(module.weight):
        return "torchao"
    return None


def is_quantized_base(module: nn.Module) -> bool:
    return quant_kind(module) is not None


def quant_info(module: nn.Module) -> dict | None:
    """JSON-able description of a layer's quantisation (None for a plain layer).

    bitsandbytes 4-bit: ``{"method": "bitsandbytes", "type": "nf4"|"fp4", "block_size": 64, "double_quant": bool,
    "dtype": original dtype}``; 8-bit: ``{"method": "bitsandbytes", "type": "int8", "block_size": in_features}``
    (one scale per row); torchao: ``{"method": "torchao", "type": tensor class, "block_size": [...], "dtype": ...}``.
    """
    kind = quant_kind(module)
    if kind == "bnb-4bit":
        standard_4bit_storage(module)
        qs = module.weight.quant_state
        if qs is None:
            raise ValueError("a bitsandbytes Linear4bit whose weight is not quantized yet: move it to a device "
                             "first (module.to('cpu') or .to('cuda')), then adapt it")
        return {"method": "bitsandbytes", "type": qs.quant_type, "block_size": int(qs.blocksize),
                "double_quant": bool(qs.nested), "dtype": _dtype_name(qs.dtype)}
    if kind == "bnb-8bit":
        return {"method": "bitsandbytes", "type": "int8", "block_size": int(module.in_features)}
    if kind == "torchao":
        w = module.weight
        return {"method": "torchao", "type": type(w).__name__, "block_size": [int(b) for b in w.block_size],
                "dtype": _dtype_name(w.dtype)}
    return None


@dataclass
class _Storage:
    """The quantized storage of a layer: the weight Parameter object itself plus state held outside it."""

    weight: nn.Parameter
    extra: dict = field(default_factory=dict)


def standard_4bit_storage(module: nn.Module) -> None:
    """Keep a bitsandbytes ``Linear4bit`` on its standard storage (packed nibbles, absmax, quant state).

    On CPUs with AVX512-BF16, bitsandbytes (>= 0.49) repacks a ``Linear4bit``'s weight in place on its first
    forward in eval mode without grad (``_convert_weight_packed_for_cpu``): a new nibble layout, absmax un-nested
    and rounded to bfloat16, compute in bfloat16. That changes the layer's outputs and dequantized weight (so the
    basis, the base-weight identity and merge / unmerge would depend on whether an inference forward ran) and its
    inverse is lossy. PiCa turns the repacking off for the layers it adapts (``support_avx512bf16_for_cpu``) and
    unpacks a layer that was repacked already with bitsandbytes' own inverse (what its ``state_dict`` does).
    """
    module.support_avx512bf16_for_cpu = False
    w = module.weight
    qs = getattr(w, "quant_state", None)
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, qs)


def _storage(module: nn.Module) -> _Storage:
    kind = quant_kind(module)
    if kind == "bnb-8bit":
        return _Storage(module.weight, {"CB": module.state.CB, "SCB": module.state.SCB})
    if kind == "bnb-4bit":
        standard_4bit_storage(module)
    return _Storage(module.weight)


def _dequantize(kind: str, storage: _Storage) -> torch.Tensor:
    w = storage.weight
    if kind == "bnb-4bit":
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(w.data, w.quant_state)
    if kind == "bnb-8bit":
        from bitsandbytes.functional import int8_vectorwise_dequant

        scb = w.SCB if getattr(w, "SCB", None) is not None else storage.extra["SCB"]
        return int8_vectorwise_dequant(w.data, scb)
    return w.dequantize()


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """``W`` (out, in) of a quantized layer as it computes with it (bnb 4-bit / torchao: in the dtype the weight was
    quantized from; bnb 8-bit: float32)."""
    return _dequantize(quant_kind(module), _storage(module)).detach()


def original_dequantized_weight(layer: nn.Module, base_layer: nn.Module) -> torch.Tensor:
    """The dequantized weight of the storage before any merge (the current one when nothing is merged)."""
    snap = getattr(layer, SNAPSHOT, None)
    kind = quant_kind(base_layer)
    return _dequantize(kind, snap).detach() if snap is not None else dequantized_weight(base_layer)


@torch.no_grad()
def _set_quantized(module: nn.Module, weight: torch.Tensor, like: _Storage) -> None:
    """Quantize ``weight`` (out, in) into ``module`` the way ``like`` was quantized (new storage objects)."""
    kind = quant_kind(module)
    old = like.weight
    if kind == "bnb-4bit":
        from bitsandbytes.nn import Params4bit

        qs = old.quant_state
        new = Params4bit(weight.to(qs.dtype).cpu(), requires_grad=False, quant_type=qs.quant_type,
                         blocksize=qs.blocksize, compress_statistics=qs.nested, quant_storage=old.quant_storage,
                         module=module)
        module.weight = new.to(old.device)
    elif kind == "bnb-8bit":
        from bitsandbytes.nn import Int8Params

        new = Int8Params(weight.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False)
        module.weight = new.to(old.device)
        module.state.CB, module.state.SCB = None, None  # rebuilt from the new weight at the next forward
    else:
        from torchao.quantization import PerRow

        if list(old.block_size) != [1, old.shape[-1]]:
            raise NotImplementedError(
                f"merging into a torchao {type(old).__name__} with block_size {list(old.block_size)}: only per-row "
                f"int8 weight-only is re-quantized; use merge_and_unload(model, dequantize=True)"
            )
        module.weight = nn.Parameter(type(old).from_hp(weight.to(old.dtype), PerRow()), requires_grad=False)


def _restore(module: nn.Module, storage: _Storage) -> None:
    module.weight = storage.weight
    if storage.extra:
        module.state.CB, module.state.SCB = storage.extra["CB"], storage.extra["SCB"]


@torch.no_grad()
def set_quantized_stack(layer: nn.Module, base_layer: nn.Module, old: list[str], new: list[str], delta, *,
                        txn=None, safe_merge: bool = False) -> None:
    """Make a quantized ``base_layer`` hold the merged stack ``new`` (it holds ``old`` now): re-quantize
    ``dequant(W0) + Σ ΔW`` (lossy, with a warning), or put the original storage objects back bit for bit when
    ``new`` is empty. ``delta(name)`` gives ``ΔW`` (out, in). The original storage is kept on the layer while merged;
    ``txn`` puts the current storage objects back on rollback."""
    original = getattr(layer, SNAPSHOT, None)
    current = _storage(base_layer)
    if txn is not None:
        txn.on_rollback(lambda: _restore(base_layer, current))
    if not new:
        _restore(base_layer, original)
        object.__delattr__(layer, SNAPSHOT)
        return
    original = original or current
    merged = _dequantize(quant_kind(base_layer), original).to(torch.float32)
    for name in new:
        merged = merged + delta(name).to(device=merged.device, dtype=torch.float32)
    if safe_merge and not bool(torch.isfinite(merged).all()):
        raise ValueError(f"merging adapter(s) {[n for n in new if n not in old]} gives NaN or Inf in the weight; "
                         f"nothing was merged")
    warnings.warn(
        f"merging into a quantized base ({quant_info(base_layer)}) re-quantizes W0 + ΔW: lossy, the merged layer "
        f"differs from base + adapter by the quantization error; unmerge() restores the original storage exactly, "
        f"merge_and_unload(model, dequantize=True) gives an exact unquantized merge",
        UserWarning,
        stacklevel=5,
    )
    _set_quantized(base_layer, merged, original)
    object.__setattr__(layer, SNAPSHOT, original)  # not a submodule / buffer: the Parameter object itself


@torch.no_grad()
def dequantized_copy(module: nn.Module, weight: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` with ``weight`` (out, in) (default: the module's dequantized weight) and its bias, in
    ``dtype`` (default: the dtype the weight was quantized from; float32 for bnb int8)."""
    w = dequantized_weight(module) if weight is None else weight
    target = dtype or (DTYPES.get(quant_info(module).get("dtype")) if quant_info(module) else None) or w.dtype
    bias = getattr(module, "bias", None)
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=target)
    out.weight.copy_(w.to(target))
    if bias is not None:
        out.bias.copy_(bias.detach().to(target))
    out.requires_grad_(False)
    return out


def quantize_base(
    model: nn.Module,
    method: str = "nf4",
    *,
    skip: tuple[str, ...] = ("lm_head",),
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = True,
    block_size: int = 64,
) -> nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` (in place, on its device) except names ending in ``skip``.

    method: "nf4" / "fp4" (bitsandbytes ``Linear4bit``, ``double_quant`` and ``block_size`` apply), "bnb-int8"
    (``Linear8bitLt``, no outliers kept in 16 bits) or "torchao-int8" (int8 weight-only, per-row scales).
    ``compute_dtype``: of the 4-bit GEMM (default: the weight's dtype).
    """
    if method not in QUANT_METHODS:
        raise ValueError(f"method must be one of {QUANT_METHODS}, got {method!r}")
    if method == "torchao-int8":
        _require("torchao")
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, name: isinstance(m, nn.Linear) and name.split(".")[-1] not in skip)
        return model
    bnb = _require("bitsandbytes")
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.split(".")[-1] in skip:
            continue
        dev = module.weight.device
        if method in ("nf4", "fp4"):
            new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                    compute_dtype=compute_dtype or module.weight.dtype, compress_statistics=double_quant,
                                    quant_type=method, device="meta")
            new.weight = bnb.nn.Params4bit(module.weight.data.cpu(), requires_grad=False, quant_type=method,
                                           blocksize=block_size, compress_statistics=double_quant, module=new)
        else:
            new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                      has_fp16_weights=False, threshold=0.0, device="meta")
            new.weight = bnb.nn.Int8Params(module.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        new = new.to(dev)  # bitsandbytes quantizes when the module is moved to a device
        if method in ("nf4", "fp4"):  # the standard 4-bit path everywhere (see standard_4bit_storage)
            new.support_avx512bf16_for_cpu = False
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def is_quantized_tensor(t) -> bool:
    """A torchao quantized tensor (bitsandbytes storage is plain uint8/int8 data, checksummed as it is)."""
    return _is_torchao_tensor(t)


@torch.no_grad()
def unload_dequantized(layer: nn.Module, stack: list[str], dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` for a PiCa layer on a quantized base: ``dequant(W0) + Σ ΔW`` over ``stack`` (the
    adapters to merge, in order), summed in fp32 from the original storage and rounded once to ``dtype``."""
    w = layer.original_weight.to(torch.float32)
    for name in stack:
        w = w + layer.delta_weight(name).to(device=w.device, dtype=torch.float32)
    return dequantized_copy(layer.base_layer, w, dtype)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized layer left in ``model`` by a plain ``nn.Linear`` of its dequantized weight."""
    for name, module in list(model.named_modules()):
        if name and is_quantized_base(module):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, dequantized_copy(module, None, dtype))
    return model
