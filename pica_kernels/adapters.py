"""Adapter files: ``save_adapter`` / ``load_adapter`` (DESIGN.md section 5).

An adapter is a directory with two files:

``pica_adapter.safetensors``
    ``m.<group>``            each group's M, once (never once per layer)
    ``fingerprint.<layer>``  (r, 4) float64 projection of the layer's basis
    ``basis.<layer>``        the basis itself, only with ``store_bases=True``
``pica_config.json``
    the PiCaConfig, the group map (role, shapes, member layers), per layer the
    base weight's shape, dtype, sha256 and two float64 statistics, the
    sha256 of the safetensors file, and the base model's class and type.

Loading checks, in order, and raises ``AdapterMismatchError`` naming what
differs: file integrity (sha256), rank/side/share against an existing adapter
of the same name, every layer present with the same weight shape, base weights
identical (bit for bit when the dtype is the same, within the dtype's rounding
otherwise), M shapes, and finally each recomputed (or stored) basis against its
fingerprint. A failed load leaves the model as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .layer import PiCaLinear
from .model import (
    BANK_NAME,
    PiCaConfig,
    _set_submodule,
    active_adapter,
    apply_pica,
    delete_adapter,
    get_bank,
    group_key,
    pica_layers,
    role_of,
)
from .svd import basis_fingerprint

TENSORS_FILE = "pica_adapter.safetensors"
CONFIG_FILE = "pica_config.json"
FORMAT = "pica_kernels.adapter"
FORMAT_VERSION = 1

# Max |fingerprint difference| accepted per basis dtype. Fingerprint entries are
# O(1) (unit vectors against N(0,1) probes); rounding a basis to the dtype
# moves them by about eps/2 (bf16: ~1e-3), a drifted basis by O(1).
FINGERPRINT_ATOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# Relative tolerance of the weight statistics when the base dtype changed.
_WEIGHT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


class AdapterMismatchError(ValueError):
    """The adapter file does not fit this model (or is damaged); the message says what differs."""


# ------------------------------------------------------------------ helpers
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise AdapterMismatchError(f"unknown dtype {name!r} in adapter file")
    return dtype


def _original_weight(layer: PiCaLinear) -> torch.Tensor:
    """The base weight as stored (Conv1D: (in, out)), before any merge."""
    return layer.original_weight if layer.merged else layer.base_layer.weight


def weight_identity(weight: torch.Tensor) -> dict:
    """sha256 of the raw bytes plus two float64 statistics usable across dtypes."""
    w = weight.detach()
    digest = hashlib.sha256(w.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()).hexdigest()
    w64 = w.to("cpu", torch.float64)
    gen = torch.Generator().manual_seed(7)
    g_rows = torch.randn(w64.shape[0], generator=gen, dtype=torch.float64)
    g_cols = torch.randn(w64.shape[1], generator=gen, dtype=torch.float64)
    return {
        "shape": list(w.shape),
        "dtype": _dtype_name(w.dtype),
        "sha256": digest,
        "norm": float(torch.linalg.vector_norm(w64)),
        "probe": float(g_rows @ w64 @ g_cols),
    }


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _base_model_identity(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "name_or_path": getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None),
    }


# --------------------------------------------------------------------- save
def save_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *, store_bases: bool | None = None
) -> Path:
    """Write adapter ``adapter_name`` (default: the active one) to directory ``path``; returns it.

    ``store_bases`` (default: the config's) also saves every basis, so a reload
    needs no SVD and reproduces the model exactly even on other hardware.
    """
    from safetensors.torch import save_file

    bank = get_bank(model)
    name = adapter_name or active_adapter(model)
    if name not in bank.configs:
        raise KeyError(f"unknown adapter {name!r}; the model has {sorted(bank.configs)}")
    config: PiCaConfig = bank.configs[name]
    store = config.store_bases if store_bases is None else store_bases
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, dict] = {}
    layers: dict[str, dict] = {}
    for lname, layer in pica_layers(model):
        if name not in layer.adapters:
            continue
        spec = layer.adapters[name]
        m = layer.m(name)
        if m.device.type == "meta":
            raise ValueError("cannot save an adapter of a model on the meta device (it has no values)")
        g = groups.setdefault(spec.group, {
            "role": role_of(lname) if config.share else lname,
            "weight_shape": [layer.out_features, layer.in_features],
            "m_shape": list(m.shape),
            "m_dtype": _dtype_name(m.dtype),
            "layers": [],
        })
        g["layers"].append(lname)
        tensors[f"m.{spec.group}"] = m.detach().to("cpu").contiguous()
        basis = layer.basis(name)
        tensors[f"fingerprint.{lname}"] = basis_fingerprint(basis, spec.side).contiguous()
        if store:
            tensors[f"basis.{lname}"] = basis.detach().to("cpu").contiguous()
        layers[lname] = {
            "group": spec.group,
            "basis_dtype": _dtype_name(basis.dtype),
            "fan_in_fan_out": layer.fan_in_fan_out,
            "weight": weight_identity(_original_weight(layer)),
        }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # Write to temporary names and rename, so an interrupted save never leaves
    # a half-written pair that looks valid.
    fd, tmp_tensors = tempfile.mkstemp(dir=path, suffix=".safetensors.tmp")
    os.close(fd)
    save_file(tensors, tmp_tensors, metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pica_kernels_version": __version__,
        "adapter_name": name,
        "config": config.to_dict(),
        "stores_bases": store,
        "base_model": _base_model_identity(model),
        "tensors_sha256": _file_sha256(Path(tmp_tensors)),
        "groups": groups,
        "layers": layers,
    }
    fd, tmp_json = tempfile.mkstemp(dir=path, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp_tensors, path / TENSORS_FILE)
    os.replace(tmp_json, path / CONFIG_FILE)
    return path


# --------------------------------------------------------------------- load
def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and integrity-check an adapter directory: ``(metadata, tensors)`` (tensors on CPU)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, ten_file = path / CONFIG_FILE, path / TENSORS_FILE
    for f in (cfg_file, ten_file):
        if not f.is_file():
            raise FileNotFoundError(f"adapter file {f} not found (an adapter directory holds {CONFIG_FILE} "
                                    f"and {TENSORS_FILE})")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterMismatchError(f"{cfg_file} is not valid JSON (truncated or corrupted?): {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterMismatchError(f"{cfg_file} is not a pica_kernels adapter config (format={meta.get('format')!r})"
                                   if isinstance(meta, dict) else f"{cfg_file} is not a pica_kernels adapter config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterMismatchError(f"{cfg_file} has format_version {meta.get('format_version')!r}; this "
                                   f"pica_kernels {__version__} reads version {FORMAT_VERSION}")
    digest = _file_sha256(ten_file)
    if digest != meta.get("tensors_sha256"):
        raise AdapterMismatchError(
            f"{ten_file} does not match the checksum recorded in {cfg_file} (truncated, corrupted, or from "
            f"another save): sha256 {digest[:16]}... != {str(meta.get('tensors_sha256'))[:16]}..."
        )
    try:
        tensors = load_file(ten_file)
    except (SafetensorError, OSError) as e:
        raise AdapterMismatchError(f"{ten_file} cannot be read: {e}") from None
    return meta, tensors


def _check_weight(lname: str, module: nn.Module, saved: dict, model: nn.Module, meta: dict) -> None:
    w = _original_weight(module) if isinstance(module, PiCaLinear) else module.weight
    if list(w.shape) != saved["shape"]:
        raise AdapterMismatchError(
            f"layer {lname!r}: the model's weight has shape {list(w.shape)}, the adapter was saved for "
            f"{saved['shape']} (base model {meta['base_model']['class']}); is this the same base model?"
        )
    now = weight_identity(w)
    if now["dtype"] == saved["dtype"]:
        if now["sha256"] != saved["sha256"]:
            raise AdapterMismatchError(
                f"layer {lname!r}: the base weight differs from the one the adapter was trained on "
                f"(sha256 {now['sha256'][:12]}... != {saved['sha256'][:12]}...); load the adapter onto "
                f"the same base model ({meta['base_model']})"
            )
        return
    rtol = max(_WEIGHT_RTOL[_dtype(now["dtype"])], _WEIGHT_RTOL[_dtype(saved["dtype"])])
    for key in ("norm", "probe"):
        a, b = now[key], saved[key]
        if not math.isclose(a, b, rel_tol=rtol, abs_tol=rtol * saved["norm"]):
            raise AdapterMismatchError(
                f"layer {lname!r}: base weight ({now['dtype']}) differs from the saved one ({saved['dtype']}) "
                f"beyond rounding: {key} {a:.6g} vs {b:.6g}"
            )


def _unload(model: nn.Module) -> None:
    """Undo apply_pica completely (no merge): base layers back in place, bank removed."""
    for lname, layer in list(pica_layers(model)):
        layer.unmerge()
        _set_submodule(model, lname, layer.base_layer)
    if hasattr(model, BANK_NAME):
        delattr(model, BANK_NAME)


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    progress: bool = True,
    basis_atol: float | None = None,
) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model`` and return it.

    ``model`` is a base model (PiCa is applied with the saved config) or a PiCa
    model; with an adapter of the same name already there, its M is replaced
    after checking rank, side and layers match. The loaded adapter becomes
    active. Bases are recomputed with the saved SVD settings (or taken from
    the file when it stores them) and must match the saved fingerprints within
    ``basis_atol`` (default: :data:`FINGERPRINT_ATOL` of the basis dtype).
    """
    meta, tensors = read_adapter(path)
    name = adapter_name or meta["adapter_name"]
    try:
        config = PiCaConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise AdapterMismatchError(f"adapter config in {path} is invalid: {e}") from None
    saved_layers: dict[str, dict] = meta["layers"]
    modules = dict(model.named_modules())
    bank = getattr(model, BANK_NAME, None)
    existing = bank is not None and name in getattr(bank, "configs", {})

    # 1. Structure and base weights, before anything is computed or changed.
    if existing:
        have: PiCaConfig = bank.configs[name]
        for key in ("rank", "side", "share"):
            if getattr(have, key) != getattr(config, key):
                raise AdapterMismatchError(
                    f"{key}: the adapter file has {getattr(config, key)!r}, the model's adapter {name!r} has "
                    f"{getattr(have, key)!r}; load under another adapter_name or apply a matching config"
                )
        model_layers = {n for n, layer in pica_layers(model) if name in layer.adapters}
        if model_layers != set(saved_layers):
            missing = sorted(set(saved_layers) - model_layers)[:3]
            extra = sorted(model_layers - set(saved_layers))[:3]
            raise AdapterMismatchError(
                f"adapter {name!r} of the model covers other layers than the file: missing {missing}, extra {extra}"
            )
    for lname, info in saved_layers.items():
        module = modules.get(lname)
        if module is None:
            raise AdapterMismatchError(
                f"layer {lname!r} of the adapter is not in this {type(model).__name__} (the adapter was saved "
                f"from a {meta['base_model']['class']}, model_type {meta['base_model']['model_type']!r})"
            )
        _check_weight(lname, module, info["weight"], model, meta)
        if isinstance(module, PiCaLinear) and module.merged:
            raise AdapterMismatchError(f"layer {lname!r} is merged; unmerge(model) before loading an adapter")
        out_f, in_f = info["weight"]["shape"][::-1] if info.get("fan_in_fan_out") else info["weight"]["shape"]
        if group_key(lname, out_f, in_f, config.share) != info["group"]:
            raise AdapterMismatchError(f"layer {lname!r}: group {info['group']!r} in the file does not follow "
                                       f"from its name and shape; the file is inconsistent")
    for key, g in meta["groups"].items():
        t = tensors.get(f"m.{key}")
        if t is None:
            raise AdapterMismatchError(f"group {key!r} ({g['role']}) has no tensor m.{key} in {path}")
        if list(t.shape) != g["m_shape"]:
            raise AdapterMismatchError(f"group {key!r}: M in the file is {list(t.shape)}, expected {g['m_shape']}")

    # 2. Apply (computing bases) when the adapter is new; roll back on any failure.
    stored = {n: tensors[f"basis.{n}"] for n in saved_layers if f"basis.{n}" in tensors}
    if meta.get("stores_bases") and len(stored) != len(saved_layers):
        raise AdapterMismatchError(f"{path} says it stores bases but some basis.<layer> tensors are missing")
    created_bank = bank is None
    try:
        if not existing:
            exact = PiCaConfig(**{**config.to_dict(), "target_modules": tuple(saved_layers), "exclude": None})
            apply_pica(model, exact, adapter_name=name, progress=progress, bases=stored)
            get_bank(model).configs[name] = config
        layers = dict(pica_layers(model))
        # 3. Fingerprints: the basis each M will multiply must be the one it was trained with.
        for lname in saved_layers:
            layer = layers[lname]
            basis = layer.basis(name)
            atol = basis_atol if basis_atol is not None else FINGERPRINT_ATOL[basis.dtype]
            diff = float((basis_fingerprint(basis, config.side) - tensors[f"fingerprint.{lname}"]).abs().max())
            if not diff <= atol:
                raise AdapterMismatchError(
                    f"layer {lname!r}: its basis does not match the adapter's fingerprint (max difference "
                    f"{diff:.3g} > {atol:.3g}); the basis drifted (other base weights, SVD settings, dtype or "
                    f"device). Save with store_bases=True for an exact reload."
                )
        # 4. M, once per group.
        with torch.no_grad():
            bank = get_bank(model)
            for key in meta["groups"]:
                param = bank.get(name, key)
                param.copy_(tensors[f"m.{key}"].to(device=param.device, dtype=param.dtype))
    except Exception:
        if not existing:
            if created_bank:
                _unload(model)
            else:
                delete_adapter(model, name)
        raise
    from .model import set_adapter

    set_adapter(model, name)
    return model
