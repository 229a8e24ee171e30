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
  or fine-tuned model does not. Every field of an identity must be there: a
  field missing from a file is a refusal, never a check skipped. A tensor with
  no data (the meta device; an accelerate-offloaded tensor is read from its
  offload store instead) records ``"values": "not recorded: ..."`` in place of
  the sample: an adapter file holding such an identity cannot vouch for those
  values (refused unless the caller accepts a warning), and a model tensor with
  no data at load time is checked later, at the first forward where its data
  is there (:func:`check_base_tensors` returns those pending identities).

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
from .base import PiCaLayer
from .defaults import FINGERPRINT_ATOL
from .errors import AdapterMismatchError
from .merge import original_layer_weight

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


#: Key of an identity recorded from a tensor with no data (its value says why); such an identity has no sample.
NO_DATA = "values"
#: The fields an identity with data always has; floating-point (and complex) tensors also have FLOAT_FIELDS.
SAMPLE_FIELDS = ("sample_sha256",)
FLOAT_FIELDS = ("norm", "sample_norm", "probe")


def has_data(t: torch.Tensor) -> bool:
    return t.device.type != "meta"


@torch.no_grad()
def tensor_identity(t: torch.Tensor) -> dict:
    """Shape, dtype and a fixed sample's checksum, norm and probe of ``t`` (any shape); gathered on its device.

    A tensor with no data (meta device) gets ``{NO_DATA: "not recorded: ..."}`` instead of the sample fields."""
    t = t.detach()
    flat = t.reshape(-1)
    n = flat.numel()
    ident = {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
    if not has_data(t):
        ident[NO_DATA] = f"not recorded: the tensor had no data ({t.device.type} device)"
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


def _missing_field(saved: object) -> str | None:
    """The first field an identity read from a file lacks (or has of the wrong type), else None."""
    if not isinstance(saved, dict):
        return "the identity itself"
    if not isinstance(saved.get("shape"), list):
        return "shape"
    if not isinstance(saved.get("dtype"), str):
        return "dtype"
    if NO_DATA in saved:
        return None if isinstance(saved[NO_DATA], str) else NO_DATA
    try:
        is_float = dtype_from_name(saved["dtype"]).is_floating_point or dtype_from_name(saved["dtype"]).is_complex
    except AdapterMismatchError:
        return "dtype"
    for key in SAMPLE_FIELDS + (FLOAT_FIELDS if is_float else ()):
        if key not in saved or not isinstance(saved[key], str if key in SAMPLE_FIELDS else (int, float)) \
                or isinstance(saved[key], bool):
            return key
    return None


def compare_identity(what: str, now: dict, saved: dict) -> str | None:
    """None when ``now`` is the tensor ``saved`` describes (up to dtype rounding), else what differs.

    A field missing from ``saved`` is a difference. When either side has no data (``NO_DATA``) only shape and
    dtype can be compared here: see :func:`unverified` for what the caller must do with such a pair."""
    missing = _missing_field(saved)
    if missing is not None:
        return (f"{what}: the adapter file's identity of it has no valid {missing!r} field (a truncated or "
                f"hand-edited file)")
    if now["shape"] != saved["shape"]:
        return f"{what}: shape {now['shape']} in the model, {saved['shape']} in the adapter file"
    if NO_DATA in now or NO_DATA in saved:
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
        if key in now and not math.isclose(now[key], saved[key], rel_tol=rtol, abs_tol=rtol * saved[scale]):
            return (f"{what}: {key} {now[key]:.8g} in the model ({now['dtype']}), {saved[key]:.8g} in the adapter "
                    f"file ({saved['dtype']}), beyond rounding")
    return None


def unverified(what: str, now: dict, saved: dict) -> str | None:
    """Why the values of a tensor whose shape matched (:func:`compare_identity`) could not be compared: the
    adapter file recorded none (a difference the caller refuses, or warns about on request), else None. A model
    tensor with no data is no such reason: its check waits for the data (:func:`check_base_tensors`)."""
    if NO_DATA in saved:
        return (f"{what}: the adapter file does not record its values ({saved[NO_DATA]}), so this model's cannot be "
                f"checked against them")
    return None


def load_json(data: str | bytes, where: str) -> object:
    """Parse JSON read from an adapter file, or AdapterMismatchError naming ``where``: not UTF-8, not JSON, or
    nested deeper than the parser can follow (a RecursionError)."""
    try:
        return json.loads(data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterMismatchError(f"{where} is not valid JSON (truncated or corrupted?): {e}") from None
    except RecursionError:
        raise AdapterMismatchError(f"{where} is not valid JSON for an adapter: nested too deeply to read") from None


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


def check_m_values(group: str, m: torch.Tensor, where: str, recorded_dtype: str | None = None) -> None:
    """An ``M`` read from a file: floating point, of the dtype the file's JSON records for it (when it records one),
    every entry finite; else AdapterMismatchError naming the group (a cast would hide an int8 or NaN ``M``)."""
    if recorded_dtype is not None and dtype_name(m.dtype) != recorded_dtype:
        raise AdapterMismatchError(f"groups[{group!r}].m_dtype: {where} records {recorded_dtype}, its tensor "
                                   f"m.{group} is {dtype_name(m.dtype)}")
    if not m.is_floating_point():
        raise AdapterMismatchError(f"M of group {group!r} in {where} has dtype {dtype_name(m.dtype)}; M is a "
                                   f"floating-point matrix")
    if not bool(torch.isfinite(m).all()):
        bad = int((~torch.isfinite(m)).sum())
        raise AdapterMismatchError(f"M of group {group!r} in {where} has {bad} non-finite (NaN or Inf) entries; "
                                   f"an adapter with them gives NaN outputs (was it saved after a diverged step?)")


def fingerprint_atol(basis_dtype: torch.dtype, saved_dtype: torch.dtype | None = None) -> float:
    """The default fingerprint tolerance: that of the coarser of the basis dtype here and the one the adapter was
    saved with (an fp32-trained adapter on an fp64 copy of its base differs by fp32 rounding, not fp64's)."""
    return max(FINGERPRINT_ATOL.get(basis_dtype, max(FINGERPRINT_ATOL.values())),
               FINGERPRINT_ATOL.get(saved_dtype, 0.0) if saved_dtype is not None else 0.0)


def check_basis_fingerprint(layer: str, basis: torch.Tensor, side: str, saved: torch.Tensor,
                            atol: float | None = None, saved_dtype: torch.dtype | None = None) -> None:
    """The basis ``M`` will multiply must be the one it was trained with: its fingerprint against ``saved`` within
    ``atol`` (default :func:`fingerprint_atol` of the basis dtype and ``saved_dtype``, the dtype of the basis the
    fingerprint was taken from), or AdapterMismatchError naming the layer and both values (the maximum difference
    and the tolerance)."""
    from ..svd import basis_fingerprint

    got = basis_fingerprint(basis, side)
    atol = fingerprint_atol(basis.dtype, saved_dtype) if atol is None else atol
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


#: state_dict entries of an adapted model that are not the base model's: PiCa's own (the native bank ``pica_bank.``,
#: the PEFT layers' ``pica_*`` entries) and PEFT's trained copies.
_NOT_BASE = (".pica_", "modules_to_save.", "token_adapter.")


def _is_base_entry(key: str) -> bool:
    return not key.startswith("pica_") and not any(p in key for p in _NOT_BASE)


def _base_name(key: str) -> str:
    """The base model's name of an entry of the adapted model (``…base_layer.weight`` -> ``…weight``)."""
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own tensors by their plain state_dict names, for the whole-model identity of an adapter file.

    ``model``: the model the PiCa layers of either front end sit in (a PEFT front end passes the model inside its
    ``PeftModel``). An adapted layer's weight is taken as before any merge, under the base model's name
    (``…q_proj.weight``, never ``…base_layer.weight``); PiCa's own entries (``M``, bases) and PEFT's trained copies are
    left out. A module with a ``pica_original_tensors()`` method (the native fused-experts layer) gives its adapted
    tensors as before any merge, ``{state_dict key relative to it: tensor}``. Quantized-base hook: a quantized
    layer's storage entries (packed weight, absmax, SCB, quant state...) stand as one ``<layer>.weight``, its
    dequantized weight: the same for every fresh quantisation of the same weights, and unchanged by a merge that
    re-quantizes. Sharded (DTensor) entries are left out: identities are taken where the whole tensor is.
    """
    modules = dict(model.named_modules())
    originals = {f"{n}.base_layer.weight": original_layer_weight(m) for n, m in modules.items()
                 if isinstance(m, PiCaLayer)}
    for n, m in modules.items():  # layers holding several adapted tensors (fused experts) name their originals
        named = getattr(m, "pica_original_tensors", None)
        if callable(named):
            originals.update({f"{n}.{key}": t for key, t in named().items()})
    quantized = {n: m for n, m in modules.items() if n and quant.is_quantized_base(m)}
    for n, m in quantized.items():
        originals.setdefault(f"{n}.weight", quant.dequantized_weight(m))
    storage = tuple(f"{n}." for n in quantized)
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if not _is_base_entry(key) or type(t).__name__ == "DTensor":
            continue
        if key.startswith(storage) and key not in originals and not key.endswith(".bias"):
            continue
        out[_base_name(key)] = originals[key] if key in originals else offloaded_data(model, key, t)
    return out


def offloaded_data(model: nn.Module, key: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` (state_dict entry ``key`` of ``model``), or, when it has no data because accelerate offloaded it (the
    module's parameter on the meta device, its values in the module's ``_hf_hook.weights_map``), those values."""
    if has_data(t):
        return t
    module_name, _, leaf = key.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return t
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        weights = getattr(h, "weights_map", None)
        if weights is not None and getattr(h, "offload", False):
            try:
                value = weights[leaf]
            except KeyError:
                continue
            if isinstance(value, torch.Tensor) and has_data(value):
                return value
    return t


def check_base_tensors(now: dict[str, torch.Tensor], saved: dict[str, dict], on_mismatch: str, hint: str,
                       skip: frozenset[str] | set[str] = frozenset(),
                       adapted: frozenset[str] | set[str] = frozenset()) -> dict[str, dict]:
    """The model's tensors (:func:`base_tensors`) against the identities an adapter file recorded.

    Any tensor missing, extra (but those in ``skip``), of other values, or whose recorded identity lacks a field
    is a ``base_tensors`` mismatch: an AdapterMismatchError naming the first tensor and both values, or a warning
    with ``on_mismatch="warn"``; so is an identity recorded without data (nothing to check the values against).
    ``adapted``: the names of the adapted layers' weights among them, so that the message says where the model
    differs. ``hint`` says how to load anyway (front-end specific). Returns ``{name: identity}`` of the model's
    tensors that have no data yet (meta device): :func:`check_when_data` checks them once they do.
    """
    if not isinstance(saved, dict):
        raise AdapterMismatchError("base_tensors: the adapter file's identities are not a JSON object")
    problems: list[tuple[str, str]] = []
    pending: dict[str, dict] = {}
    for key, ident in saved.items():
        t = now.get(key)
        if t is None:
            problems.append((key, f"tensor {key!r} of the base model is missing from this model"))
            continue
        got = tensor_identity(t)
        p = compare_identity(f"tensor {key!r}", got, ident) or unverified(f"tensor {key!r}", got, ident)
        if p:
            problems.append((key, p))
        elif NO_DATA in got:
            pending[key] = ident
    extra = sorted(set(now) - set(saved) - set(skip))
    if extra:
        problems.append((extra[0], f"this model has tensors the adapter's base model had not: {extra[:3]}"))
    _report(problems, adapted, on_mismatch, hint)
    return pending


def _report(problems: list[tuple[str, str]], adapted, on_mismatch: str, hint: str) -> None:
    if not problems:
        return
    inside = sum(key in adapted for key, _ in problems)
    where = ("in the weights of the adapted layers" if inside == len(problems) else
             "outside the adapted layers" if inside == 0 else
             f"in the weights of the adapted layers ({inside}) and outside them ({len(problems) - inside})")
    msg = (f"base_tensors: the model differs from the adapter's base model {where} ({len(problems)} "
           f"difference(s)); first: {problems[0][1]}")
    if on_mismatch == "warn":
        warnings.warn(msg, UserWarning, stacklevel=4)
    else:
        raise AdapterMismatchError(f"{msg}; {hint}")


def check_when_data(model: nn.Module, pending: dict[str, dict], tensors: Callable[[], dict[str, torch.Tensor]],
                    on_mismatch: str, hint: str, adapted: frozenset[str] | set[str] = frozenset()) -> None:
    """Check ``pending`` identities (from :func:`check_base_tensors`) at the first forward of ``model`` where the
    tensors have data; ``tensors()`` gives the model's tensors by name then. The hook removes itself once every
    one was checked; a mismatch found then raises (or warns) as :func:`check_base_tensors` does, before the
    forward runs."""
    if not pending:
        return
    left = dict(pending)

    def hook(module, args):
        now = tensors()
        problems = []
        for key in list(left):
            t = now.get(key)
            if t is None or has_data(t):
                got = None if t is None else tensor_identity(t)
                p = (f"tensor {key!r} of the base model is missing from this model" if got is None
                     else compare_identity(f"tensor {key!r}", got, left[key]))
                del left[key]
                if p:
                    problems.append((key, p))
        if not left:
            handle.remove()
        _report(problems, adapted, on_mismatch, hint)

    handle = model.register_forward_pre_hook(hook)
