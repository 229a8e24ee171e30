"""Fingerprints and whole-file checks of adapter files, for every front end.

Two kinds of fingerprint:

* of a **basis**: :func:`pica_kernels.svd.basis_fingerprint` (its projections on
  fixed probes), compared within :data:`FINGERPRINT_ATOL` of the basis dtype;
* of a **base-model tensor** (:func:`tensor_identity`): its shape, dtype and a
  fixed sample of up to 65536 evenly spaced entries, gathered on the tensor's
  own device (sha256 of their bytes, their float64 norm and a float64 probe).
  Same dtype: the sample must be bit-identical; another dtype: norm and probe
  within that dtype's rounding. The sample is the same whatever the device, so
  an adapter saved on a GPU checks on a CPU. Covering every tensor of the state
  dict (untargeted ``o_proj``, embeddings, norms included) gathers at most
  65536 entries per tensor and copies no weight: ~20M entries for an 8B model.
  A change to a few entries between the sampled ones goes unseen; a different
  or fine-tuned model does not.

An adapter's JSON is covered by its own sha256 and bound to its tensor file
(whose metadata carries the JSON's checksum, and whose sha256 the JSON holds).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from . import quant
from .defaults import FINGERPRINT_ATOL
from .errors import AdapterMismatchError

SAMPLE_SIZE = 65536
# Relative tolerance of norm and probe: same dtype, float64 sums of identical values (order may differ);
# another dtype: the coarser dtype's rounding.
SAME_DTYPE_RTOL = 1e-9
CROSS_DTYPE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise AdapterMismatchError(f"unknown dtype {name!r} in adapter file")
    return dtype


@functools.lru_cache(maxsize=8)
def _probe(k: int) -> torch.Tensor:
    """Fixed N(0, 1) float64 probe of length k (the same on every machine)."""
    return torch.randn(k, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


@torch.no_grad()
def tensor_identity(t: torch.Tensor) -> dict:
    """Shape, dtype and a fixed sample's checksum, norm and probe of ``t`` (any shape); gathered on its device."""
    t = t.detach()
    flat = t.reshape(-1)
    n = flat.numel()
    ident = {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
    if n == 0 or t.device.type == "meta":
        return ident
    k = min(n, SAMPLE_SIZE)
    # Integer positions (a float linspace rounds past the end beyond 2**24 elements).
    idx = torch.arange(k, device=t.device, dtype=torch.int64) * (n - 1) // max(k - 1, 1)
    sample = flat[idx].cpu()
    ident["sample_sha256"] = hashlib.sha256(sample.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    if t.is_floating_point() or t.is_complex():
        s64 = sample.to(torch.float64)
        probe = _probe(s64.numel())
        ident["norm"] = ident["sample_norm"] = float(torch.linalg.vector_norm(s64))
        ident["probe"] = float(s64 @ probe)
    return ident


def compare_identity(what: str, now: dict, saved: dict) -> str | None:
    """None when ``now`` is the tensor ``saved`` describes (up to dtype rounding), else what differs."""
    if now["shape"] != saved["shape"]:
        return f"{what}: shape {now['shape']} in the model, {saved['shape']} in the adapter file"
    if "sample_sha256" not in now or "sample_sha256" not in saved:
        return None
    if now["dtype"] == saved["dtype"]:
        if now["sample_sha256"] != saved["sample_sha256"]:
            return f"{what}: values differ (sample sha256 {now['sample_sha256'][:12]}... in the model, " \
                   f"{saved['sample_sha256'][:12]}... in the adapter file)"
        rtol = SAME_DTYPE_RTOL
    else:
        if "norm" not in now or "norm" not in saved:
            return f"{what}: dtype {now['dtype']} in the model, {saved['dtype']} in the adapter file"
        rtol = max(CROSS_DTYPE_RTOL.get(dtype_from_name(now["dtype"]), 1e-2),
                   CROSS_DTYPE_RTOL.get(dtype_from_name(saved["dtype"]), 1e-2))
    for key, scale in (("norm", "norm"), ("probe", "sample_norm")):
        if key in now and key in saved and not math.isclose(
            now[key], saved[key], rel_tol=rtol, abs_tol=rtol * saved[scale]
        ):
            return (f"{what}: {key} {now[key]:.8g} in the model ({now['dtype']}), {saved[key]:.8g} in the adapter "
                    f"file ({saved['dtype']}), beyond rounding")
    return None


def json_checksum(meta: dict) -> str:
    """sha256 of the canonical JSON of ``meta`` without its own ``json_sha256`` and ``tensors_sha256`` fields."""
    body = {k: v for k, v in meta.items() if k not in ("json_sha256", "tensors_sha256")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def require(meta: dict, key: str, kind: type, where: str):
    """``meta[key]`` of type ``kind``, or AdapterMismatchError naming the missing / malformed field."""
    if key not in meta:
        raise AdapterMismatchError(f"{where}: field {key!r} is missing (truncated or hand-edited file?)")
    value = meta[key]
    if not isinstance(value, kind):
        raise AdapterMismatchError(f"{where}: field {key!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def check_m_tensors(found: dict[str, tuple], expected: dict[str, tuple], rank: int, side: str, where: str) -> None:
    """The ``M`` of an adapter file (``{group: shape}``) against the groups the model built from its config.

    A group in one but not the other is a ``groups`` mismatch; a shape that differs in its rank dimension is a
    ``rank`` mismatch (the config was edited, or belongs to another file); both name the two values.
    """
    for g in sorted(set(found) - set(expected)):
        raise AdapterMismatchError(f"groups: {where} holds M of group {g!r}, the model built from its config has no "
                                   f"such group ({len(expected)} groups: {sorted(expected)[:4]}...)")
    for g in sorted(set(expected) - set(found)):
        raise AdapterMismatchError(f"groups: the model built from the config has group {g!r}, {where} holds no M "
                                   f"for it (a group was removed from the file)")
    axis = 1 if side == "input" else 0
    for g, shape in found.items():
        if tuple(shape) != tuple(expected[g]):
            raise AdapterMismatchError(f"rank: the config says {expected[g][axis]}, {where} has M of group {g!r} "
                                       f"with shape {list(shape)} (rank {shape[axis]})")


def check_basis_fingerprint(layer: str, basis: torch.Tensor, side: str, saved: torch.Tensor,
                            atol: float | None = None) -> None:
    """The basis ``M`` will multiply must be the one it was trained with: its fingerprint against ``saved`` within
    ``atol`` (default :data:`FINGERPRINT_ATOL` of the basis dtype), or AdapterMismatchError naming the layer and
    both values (the maximum difference and the tolerance)."""
    from ..svd import basis_fingerprint

    got = basis_fingerprint(basis, side)
    atol = FINGERPRINT_ATOL[basis.dtype] if atol is None else atol
    saved = saved.to(got.dtype)
    diff = float((got - saved).abs().max()) if got.shape == saved.shape else math.inf
    if not diff <= atol:
        raise AdapterMismatchError(
            f"layer {layer!r}: its basis does not match the adapter's fingerprint (max difference {diff:.3g} > "
            f"{atol:.3g}): the basis recomputed here differs from the one the adapter was trained with (other base "
            f"weights, SVD settings, dtype or device). Save with store_bases=True for an exact reload."
            + _cache_hint()
        )


def _cache_hint() -> str:
    from .cache import directory

    d = directory()
    return "" if d is None else (f" The basis may have come from the basis cache {d}: pica_kernels.cache.clear() "
                                 f"or PICA_KERNELS_CACHE=0 rules that out.")


def base_tensors(model: nn.Module, originals: dict[str, torch.Tensor], keep: Callable[[str], bool],
                 fold: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """The base model's own tensors by their plain state_dict names, for the whole-model identity of an adapter file.

    ``originals``: state_dict key -> the tensor to use instead (an adapted layer's weight before any merge);
    ``keep(key)``: False for the adapter's own entries (M, bases, trained copies); ``fold(key)``: the name the base
    model has for an entry of the adapted model (``…base_layer.weight`` -> ``…weight``). Quantized-base hook: a
    quantized layer's storage entries (packed weight, absmax, SCB, quant state...) stand as one ``<layer>.weight``,
    its dequantized weight: the same for every fresh quantisation of the same weights, and unchanged by a merge
    that re-quantizes. Sharded (DTensor) entries are left out: identities are taken where the whole tensor is.
    """
    originals = dict(originals)
    quantized = {n: m for n, m in model.named_modules() if n and quant.is_quantized_base(m)}
    for n, m in quantized.items():
        originals.setdefault(f"{n}.weight", quant.dequantized_weight(m))
    storage = tuple(f"{n}." for n in quantized)
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if not keep(key) or type(t).__name__ == "DTensor":
            continue
        if key.startswith(storage) and key not in originals and not key.endswith(".bias"):
            continue
        out[fold(key)] = originals.get(key, t)
    return out


def check_base_tensors(now: dict[str, torch.Tensor], saved: dict[str, dict], on_mismatch: str, hint: str,
                       skip: frozenset[str] | set[str] = frozenset()) -> None:
    """The model's tensors (:func:`base_tensors`) against the identities an adapter file recorded.

    Any tensor missing, extra (but those in ``skip``) or of other values is a ``base_tensors`` mismatch: an
    AdapterMismatchError naming the first tensor and both values, or a warning with ``on_mismatch="warn"``.
    ``hint`` says how to load anyway (front-end specific).
    """
    problems = []
    for key, ident in saved.items():
        t = now.get(key)
        if t is None:
            problems.append(f"tensor {key!r} of the base model is missing from this model")
            continue
        p = compare_identity(f"tensor {key!r}", tensor_identity(t), ident)
        if p:
            problems.append(p)
    extra = sorted(set(now) - set(saved) - set(skip))
    if extra:
        problems.append(f"this model has tensors the adapter's base model had not: {extra[:3]}")
    if problems:
        msg = (f"base_tensors: the model differs from the adapter's base model outside the adapted layers "
               f"({len(problems)} difference(s)); first: {problems[0]}")
        if on_mismatch == "warn":
            warnings.warn(msg, UserWarning, stacklevel=4)
        else:
            raise AdapterMismatchError(f"{msg}; {hint}")
