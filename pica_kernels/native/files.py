"""Adapter files: ``save_adapter`` / ``load_adapter``.

An adapter is a directory with two files:

``pica_adapter.safetensors``
    ``m.<group>``            each group's M, once (never once per layer)
    ``fingerprint.<layer>``  (r, 4) float64 projection of the layer's basis
    ``basis.<layer>``        the basis itself, only with ``store_bases=True``
    metadata ``config_sha256``: the checksum of the JSON below
``pica_config.json``
    the PiCaConfig, the group map (role, shapes, rank, member layers), per
    layer its group, rank and base weight identity, the identity of every
    other tensor of the base model (``base_tensors``), the sha256 of the
    safetensors file and the JSON's own sha256 (``json_sha256``).

Every part is checked against every other before the model is touched, and
a mismatch raises :class:`AdapterMismatchError` naming the field and both
values: every group and layer the JSON names must be in the tensor file and
nothing else may be there; ranks and shapes must agree; then the checksums;
then the base model (targeted and untargeted tensors, see
:mod:`pica_kernels.core.files`); finally each recomputed (or stored) basis
against its fingerprint. A failed load, also one interrupted by Ctrl-C,
leaves the model exactly as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..core import experts as core_experts
from ..core import quant as core_quant
from ..core.config import check_on_mismatch
from ..core.defaults import check_adapter_name
from ..core.errors import AdapterMismatchError
from ..core.files import (
    NO_DATA,
    base_tensors,
    check_base_tensors,
    check_basis_fingerprint,
    check_m_values,
    check_when_data,
    compare_identity,
    dtype_from_name,
    dtype_name,
    file_sha256,
    json_checksum,
    load_json,
    require,
    tensor_identity,
    unverified,
)
from ..core.plan import layer_group
from ..core.state import transaction
from ..core.targets import role_of
from ..svd import basis_fingerprint, method_from_file, versioned_method
from .apply import BANK_NAME, apply_checked, expert_layers, get_bank, pica_layers
from .config import PiCaConfig
from .experts import PiCaExperts
from .layer import PiCaLinear
from .model import adapter_config, adapter_layers, set_adapter

__all__ = ["CONFIG_FILE", "TENSORS_FILE", "AdapterMismatchError", "load_adapter", "read_adapter", "save_adapter"]

TENSORS_FILE = "pica_adapter.safetensors"
CONFIG_FILE = "pica_config.json"
FORMAT = "pica_kernels.adapter"
FORMAT_VERSION = 2


def _original_weight(module: nn.Module) -> torch.Tensor:
    """The base weight as stored (Conv1D: (in, out); quantized base: dequantized), before any merge."""
    if isinstance(module, PiCaLinear):
        return module.original_weight
    return core_quant.dequantized_weight(module) if core_quant.is_quantized_base(module) else module.weight


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

    name, config = adapter_config(model, adapter_name)
    store = config.store_bases if store_bases is None else store_bases
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, dict] = {}
    layers: dict[str, dict] = {}
    record = _Record(config, store, tensors, groups, layers)
    for lname, layer in adapter_layers(model, name):
        record.add(lname, layer.adapters[name], layer.m(name), layer.basis(name),
                   [layer.out_features, layer.in_features], layer.original_weight, basis_fingerprint,
                   fan_in_fan_out=layer.fan_in_fan_out, quantization=layer.quantization)
    _save_experts(model, name, record)
    adapted = {f"{n}.weight" for n in layers}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pica_kernels_version": __version__,
        "adapter_name": name,
        # The versioned SVD preset ("accurate" -> "accurate-v2"): a later change of defaults cannot move the bases.
        "config": {**config.to_dict(), "svd_method": versioned_method(config.svd_method)},
        "stores_bases": store,
        "base_model": _base_model_identity(model),
        "groups": groups,
        "layers": layers,
        "base_tensors": {k: tensor_identity(t) for k, t in base_tensors(model).items() if k not in adapted},
    }
    config_sha = json_checksum(meta)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # Write to temporary names and rename, so an interrupted save never leaves
    # a half-written pair that looks valid.
    fd, tmp_tensors = tempfile.mkstemp(dir=path, suffix=".safetensors.tmp")
    os.close(fd)
    save_file(tensors, tmp_tensors, metadata={"format": FORMAT, "config_sha256": config_sha})
    meta["tensors_sha256"] = file_sha256(tmp_tensors)
    meta["json_sha256"] = config_sha
    fd, tmp_json = tempfile.mkstemp(dir=path, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp_tensors, path / TENSORS_FILE)
    os.replace(tmp_json, path / CONFIG_FILE)
    return path


class _Record:
    """The parts of an adapter file being written: ``tensors``, ``groups`` and ``layers`` (see the module
    docstring), one layer (or fused-experts pseudo-layer) at a time."""

    def __init__(self, config: PiCaConfig, store: bool, tensors: dict, groups: dict, layers: dict) -> None:
        self.config, self.store, self.tensors, self.groups, self.layers = config, store, tensors, groups, layers

    def add(self, lname: str, spec, m: torch.Tensor, basis: torch.Tensor, weight_shape: list[int],
            weight: torch.Tensor, fingerprint: Callable[[torch.Tensor, str], torch.Tensor], *, fan_in_fan_out: bool,
            quantization, group_extra: dict | None = None, layer_extra: dict | None = None) -> None:
        """Layer ``lname``: its group's entry (``M`` once; ``weight_shape`` (out, in)), its fingerprint and basis,
        and its record (``weight``: its original weight, whose identity is recorded; ``fingerprint(basis, side)``:
        the basis' fingerprint, taken once the values are known to exist)."""
        if m.device.type == "meta":
            raise ValueError("cannot save an adapter of a model on the meta device (it has no values)")
        g = self.groups.setdefault(spec.group, {
            "role": role_of(lname) if self.config.share else lname,
            "weight_shape": weight_shape,
            "rank": spec.rank,
            "m_shape": list(m.shape),
            "m_dtype": dtype_name(m.dtype),
            "layers": [],
            **(group_extra or {}),
        })
        g["layers"].append(lname)
        self.tensors[f"m.{spec.group}"] = m.detach().to("cpu").contiguous()
        self.tensors[f"fingerprint.{lname}"] = fingerprint(basis, spec.side).contiguous()
        if self.store:
            self.tensors[f"basis.{lname}"] = basis.detach().to("cpu").contiguous()
        self.layers[lname] = {
            "group": spec.group,
            "rank": spec.rank,
            "basis_dtype": dtype_name(basis.dtype),
            "fan_in_fan_out": fan_in_fan_out,
            "weight": tensor_identity(weight),
            "quantization": quantization,
            **(layer_extra or {}),
        }


def _save_experts(model: nn.Module, name: str, record: _Record) -> None:
    """The fused-experts part of an adapter file, per pseudo-layer ``<module>.<role>``: ``fingerprint.<layer>``
    (E, r, 4), ``basis.<layer>`` (E, r, in) / (E, out, r) when bases are stored, its record in ``layers`` (group,
    rank, basis dtype, the identity of the role's original rows (E, out, in), and ``experts``:
    :func:`pica_kernels.core.experts.experts_record`), and its group with ``weight_shape`` (out, in) of one expert
    and ``experts`` E when ``M`` is one per expert."""
    for mname, layer in expert_layers(model):
        for role, spec in layer.adapters.get(name, {}).items():
            m, basis, r = layer.m(role, name), layer.basis(role, name), layer.layout.role(role)
            per_expert = m.dim() == 3
            record.add(f"{mname}.{role}", spec, m, basis, [r.out_features, r.in_features], layer.role_weight(role),
                       core_experts.experts_fingerprint, fan_in_fan_out=False, quantization=None,
                       group_extra={"experts": layer.num_experts} if per_expert else None,
                       layer_extra={"experts": core_experts.experts_record(mname, r, layer.num_experts, per_expert)})


# --------------------------------------------------------------------- read
def _cross_check(meta: dict, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every group, layer and fingerprint the JSON names is in the tensor file, nothing else is, ranks agree."""
    config = require(meta, "config", dict, where)
    groups = require(meta, "groups", dict, where)
    layers = require(meta, "layers", dict, where)
    require(meta, "base_tensors", dict, where)
    try:
        check_adapter_name(require(meta, "adapter_name", str, where))
    except ValueError as e:
        raise AdapterMismatchError(f"adapter_name: {where} records {meta['adapter_name']!r}: {e}") from None
    rank, side = require(config, "rank", int, f"{where} config"), require(config, "side", str, f"{where} config")
    stores = bool(meta.get("stores_bases"))
    json_keys = {f"m.{g}" for g in groups} | {f"fingerprint.{n}" for n in layers}
    if stores:
        json_keys |= {f"basis.{n}" for n in layers}
    for key in sorted(set(tensors) - json_keys):
        kind, _, name = key.partition(".")
        field = {"m": "groups", "fingerprint": "layers", "basis": "layers"}.get(kind, "tensors")
        raise AdapterMismatchError(
            f"{field}: the tensor file holds {key!r} but pica_config.json lists no {kind if kind != 'm' else 'group'} "
            f"{name!r} ({len(groups)} groups, {len(layers)} layers listed); the JSON was edited or belongs to "
            f"another save"
        )
    for key in sorted(json_keys - set(tensors)):
        kind, _, name = key.partition(".")
        field = "groups" if kind == "m" else "layers"
        raise AdapterMismatchError(f"{field}: pica_config.json lists {'group' if kind == 'm' else 'layer'} {name!r}, "
                                   f"the tensor file holds no {key!r} (a tensor was removed from the file)")
    member_of: dict[str, str] = {}
    for key, g in groups.items():
        gw = f"{where} groups[{key!r}]"
        g_rank = require(g, "rank", int, gw)
        for n in require(g, "layers", list, gw):
            member_of[n] = key
        m = tensors[f"m.{key}"]
        check_m_values(key, m, where, require(g, "m_dtype", str, gw))
        out_f, in_f = require(g, "weight_shape", list, gw)
        expected = (out_f, g_rank) if side == "input" else (g_rank, in_f)
        if "experts" in g:  # fused experts with one M per expert: (E, out, r) / (E, r, in)
            expected = (require(g, "experts", int, gw), *expected)
        if tuple(m.shape) != expected:
            field = "rank" if g_rank == rank else f"groups[{key!r}].rank"
            got = m.shape[-1] if side == "input" else m.shape[-2]
            raise AdapterMismatchError(
                f"{field}: pica_config.json says {g_rank}, the tensor file's m.{key} has shape {list(m.shape)} "
                f"(rank {got})"
            )
    for n, info in layers.items():
        lw = f"{where} layers[{n!r}]"
        g = require(info, "group", str, lw)
        l_rank = require(info, "rank", int, lw)
        require(info, "weight", dict, lw)
        dtype_from_name(require(info, "basis_dtype", str, lw))
        if member_of.get(n) != g:
            raise AdapterMismatchError(f"layers[{n!r}].group: pica_config.json says {g!r}, its groups list it in "
                                       f"{member_of.get(n)!r}")
        fp = tensors[f"fingerprint.{n}"]
        fp_rank = fp.shape[0] if fp.dim() < 3 else fp.shape[-2]
        if "experts" in info:
            _check_experts_record(n, info, groups[g], fp, lw)
        elif fp.dim() != 2:
            raise AdapterMismatchError(f"layers[{n!r}]: its fingerprint has shape {list(fp.shape)}, a dense layer's "
                                       f"is (r, 4) (an experts layer's record names its experts)")
        if fp_rank != l_rank or groups[g]["rank"] != l_rank:
            raise AdapterMismatchError(
                f"rank: pica_config.json says {l_rank} for layer {n!r} (group rank {groups[g]['rank']}), its "
                f"fingerprint in the tensor file has rank {fp_rank}"
            )
        if l_rank != rank and not config.get("rank_pattern"):
            raise AdapterMismatchError(f"rank: pica_config.json says {rank}, layer {n!r} has rank {l_rank} and "
                                       f"the config has no rank_pattern")
    for n in sorted(set(member_of) - set(layers)):
        raise AdapterMismatchError(f"layers: group {member_of[n]!r} lists layer {n!r}, pica_config.json's "
                                   f"layers do not")


def _check_experts_record(name: str, info: dict, group: dict, fingerprint: torch.Tensor, where: str) -> None:
    """A fused-experts pseudo-layer's record against itself, its group and its fingerprint (E, r, 4)."""
    rec = require(info, "experts", dict, where)
    rw = f"{where} experts"
    for key, kind in (("module", str), ("param", str), ("role", str), ("rows", list), ("num_experts", int),
                      ("per_expert_m", bool)):
        require(rec, key, kind, rw)
    e = rec["num_experts"]
    if name != f"{rec['module']}.{rec['role']}":
        raise AdapterMismatchError(f"layers[{name!r}].experts: it records module {rec['module']!r} and role "
                                   f"{rec['role']!r}, which name {rec['module']}.{rec['role']!r}")
    if fingerprint.dim() != 3 or fingerprint.shape[0] != e:
        raise AdapterMismatchError(f"layers[{name!r}]: its fingerprint has shape {list(fingerprint.shape)}, "
                                   f"expected ({e}, r, 4) for its {e} experts")
    if rec["per_expert_m"] != ("experts" in group) or group.get("experts", e) != e:
        raise AdapterMismatchError(f"layers[{name!r}].experts: per_expert_m={rec['per_expert_m']} with "
                                   f"{e} experts, its group records experts={group.get('experts')}")


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and check an adapter directory whole: ``(metadata, tensors)`` (tensors on CPU).

    Raises :class:`AdapterMismatchError` naming the field when any part disagrees with another.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, ten_file = path / CONFIG_FILE, path / TENSORS_FILE
    for f in (cfg_file, ten_file):
        if not f.is_file():
            raise FileNotFoundError(f"adapter file {f} not found (an adapter directory holds {CONFIG_FILE} "
                                    f"and {TENSORS_FILE})")
    meta = load_json(cfg_file.read_bytes(), str(cfg_file))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterMismatchError(f"format: {cfg_file} is not a pica_kernels adapter config (format="
                                   f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterMismatchError(f"format_version: {cfg_file} has {meta.get('format_version')!r}; this "
                                   f"pica_kernels {__version__} reads {FORMAT_VERSION} (re-save the adapter)")
    digest = file_sha256(ten_file)
    if digest != meta.get("tensors_sha256"):
        raise AdapterMismatchError(
            f"tensors_sha256: {ten_file} has sha256 {digest[:16]}..., {cfg_file} records "
            f"{str(meta.get('tensors_sha256'))[:16]}... (truncated, corrupted, or from another save)"
        )
    try:
        tensors = load_file(ten_file)
        with safe_open(ten_file, "pt") as f:
            file_meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise AdapterMismatchError(f"{ten_file} cannot be read: {e}") from None
    _cross_check(meta, tensors, str(cfg_file))
    recorded, bound, actual = meta.get("json_sha256"), file_meta.get("config_sha256"), json_checksum(meta)
    if actual != recorded or actual != bound:
        raise AdapterMismatchError(
            f"json_sha256: the content of {cfg_file} has sha256 {actual[:16]}..., the file records "
            f"{str(recorded)[:16]}... and its tensor file {str(bound)[:16]}...: the JSON was edited by hand"
        )
    return meta, tensors


# --------------------------------------------------------------------- load
def _check_base_model(model: nn.Module, meta: dict, on_mismatch: str) -> dict[str, dict]:
    """Targeted weights must match (always an error); untargeted tensors too (error, or a warning on request).
    Returns the identities of untargeted tensors with no data yet (checked at the first forward that has it)."""
    modules = dict(model.named_modules())
    for lname, info in meta["layers"].items():
        if "experts" in info:
            _check_expert_role(model, modules, lname, info, meta)
            continue
        module = modules.get(lname)
        if module is None or not (isinstance(module, PiCaLinear) or hasattr(module, "weight")):
            raise AdapterMismatchError(
                f"layers: layer {lname!r} of the adapter is not in this {type(model).__name__} (the adapter was "
                f"saved from a {meta['base_model']['class']}, model_type {meta['base_model']['model_type']!r})"
            )
        base = module.base_layer if isinstance(module, PiCaLinear) else module
        now_quant, saved_quant = core_quant.quant_info(base), info.get("quantization")
        if now_quant != saved_quant:
            raise AdapterMismatchError(
                f"layers[{lname!r}].quantization: the adapter was trained on a base quantized as {saved_quant}, this "
                f"model's layer is {now_quant or 'not quantized'}; quantize the base the same way before loading"
            )
        _check_layer_weight(lname, _original_weight(module), info, meta)
    adapted = {f"{n}.weight" for n in meta["layers"]}
    return check_base_tensors(base_tensors(model), meta["base_tensors"], on_mismatch, _LOAD_ANYWAY, skip=adapted)


_LOAD_ANYWAY = "pass check_base_model='warn' to load anyway"


def _check_expert_role(model: nn.Module, modules: dict[str, nn.Module], lname: str, info: dict, meta: dict) -> None:
    """A fused-experts pseudo-layer of the file against the model: its experts module is there, in a layout PiCa
    adapts, holding the role in the same rows of the same parameter, and the role's original weights (E, out, in)
    have the identity the file records."""
    rec = info["experts"]
    module = modules.get(rec["module"])
    saved_from = (f"the adapter was saved from a {meta['base_model']['class']}, model_type "
                  f"{meta['base_model']['model_type']!r}")
    if module is None or not (isinstance(module, PiCaExperts) or core_experts.is_fused_experts(module)):
        raise AdapterMismatchError(f"layers: experts module {rec['module']!r} of the adapter (layer {lname!r}) is not "
                                   f"in this {type(model).__name__} ({saved_from})")
    try:
        layout = module.layout if isinstance(module, PiCaExperts) else \
            core_experts.experts_layout(rec["module"], module)
        role = layout.role(rec["role"])
    except (core_experts.UnsupportedExpertsError, KeyError) as e:
        raise AdapterMismatchError(f"layers[{lname!r}].experts: {e}") from None
    if (role.param, list(role.rows), layout.num_experts) != (rec["param"], rec["rows"], rec["num_experts"]):
        raise AdapterMismatchError(
            f"layers[{lname!r}].experts: the file has {rec['num_experts']} experts with the role in rows "
            f"{rec['rows']} of {rec['param']!r}, this model {layout.num_experts} in rows {list(role.rows)} of "
            f"{role.param!r}")
    weight = module.role_weight(role.role) if isinstance(module, PiCaExperts) else \
        core_experts.role_weight(getattr(module, role.param), role)
    _check_layer_weight(lname, weight, info, meta)


def _check_layer_weight(lname: str, weight: torch.Tensor, info: dict, meta: dict) -> None:
    """A targeted weight (a dense layer's, or an expert role's rows (E, out, in)) against the identity the file
    records for layer ``lname``: always an error when it differs, or has no data to check."""
    what, now = f"layer {lname!r} weight", tensor_identity(weight)
    problem = compare_identity(what, now, info["weight"]) or unverified(what, now, info["weight"])
    if NO_DATA in now and not problem:
        problem = f"{what}: it has no data in this model ({now[NO_DATA]}); its basis needs its values"
    if problem:
        raise AdapterMismatchError(f"base model: {problem}; load the adapter onto the model it was trained on "
                                   f"({meta['base_model']})")


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    progress: bool = True,
    basis_atol: float | None = None,
    check_base_model: str = "error",
) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model`` and return it.

    ``model`` is a base model (PiCa is applied with the saved config) or a PiCa
    model; with an adapter of the same name already there, its M is replaced
    after checking rank, side and layers match. The loaded adapter becomes
    active. Bases are recomputed with the saved SVD settings (or taken from
    the file when it stores them) and must match the saved fingerprints within
    ``basis_atol`` (default: :data:`FINGERPRINT_ATOL` of the basis dtype).
    ``check_base_model``: "error" (default) refuses a model whose untargeted
    tensors (embeddings, norms, other projections) differ from the adapter's
    base model; "warn" loads with a warning. Targeted weights must always match.
    Atomic: on any failure (also KeyboardInterrupt) the model is left as it was.
    """
    check_on_mismatch(check_base_model)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    meta, tensors = read_adapter(path)
    name = adapter_name or meta["adapter_name"]
    try:
        saved = meta["config"]
        if isinstance(saved.get("svd_method"), str):  # a plain preset name: a file from before versioning (v1)
            saved = {**saved, "svd_method": method_from_file(saved["svd_method"])}
        config = PiCaConfig.from_dict(saved)
    except (TypeError, ValueError) as e:
        raise AdapterMismatchError(f"config: the adapter config in {path} is invalid: {e}") from None
    saved_layers: dict[str, dict] = meta["layers"]
    bank = getattr(model, BANK_NAME, None)
    had_bank = bank is not None
    existing = had_bank and name in getattr(bank, "configs", {})

    # 1. Structure and base model, before anything is computed or changed.
    if existing:
        have: PiCaConfig = bank.configs[name]
        for key in ("rank", "side", "share", "rank_pattern"):
            if getattr(have, key) != getattr(config, key):
                raise AdapterMismatchError(
                    f"{key}: the adapter file has {getattr(config, key)!r}, the model's adapter {name!r} has "
                    f"{getattr(have, key)!r}; load under another adapter_name or apply a matching config"
                )
        model_layers = {n for n, _ in adapter_layers(model, name)}
        model_layers |= {f"{n}.{role}" for n, layer in expert_layers(model) for role in layer.adapters.get(name, {})}
        if model_layers != set(saved_layers):
            missing = sorted(set(saved_layers) - model_layers)[:3]
            extra = sorted(model_layers - set(saved_layers))[:3]
            raise AdapterMismatchError(
                f"layers: adapter {name!r} of the model covers other layers than the file: missing {missing}, "
                f"extra {extra}"
            )
    pending = _check_base_model(model, meta, check_base_model)
    modules = dict(model.named_modules())
    for lname, info in saved_layers.items():
        rec = info.get("experts")
        module = modules[rec["module"] if rec else lname]
        if isinstance(module, (PiCaLinear, PiCaExperts)) and module.merged:
            raise AdapterMismatchError(f"layer {lname!r} is merged; unmerge(model) before loading an adapter")
        shape = info["weight"]["shape"]
        if rec:
            e, out_f, in_f = shape
            want = core_experts.experts_group_key(lname, e, out_f, in_f, share=config.share,
                                                  per_expert=rec["per_expert_m"],
                                                  rank_suffix=None if info["rank"] == config.rank else info["rank"])
        else:
            out_f, in_f = shape[::-1] if info.get("fan_in_fan_out") else shape
            want = layer_group(lname, out_f, in_f, info["rank"], config.rank, config.share)
        if want != info["group"]:
            raise AdapterMismatchError(f"layers[{lname!r}].group: the file says {info['group']!r}, its name, shape "
                                       f"and rank give {want!r}")

    # 2. Apply (computing bases) when the adapter is new: one transaction, undone exactly on any failure.
    stored = {n: tensors[f"basis.{n}"] for n in saved_layers if f"basis.{n}" in tensors}
    with transaction(bank.cell if had_bank else None, [model]) as txn:
        if not existing:
            exact = PiCaConfig(**{**config.to_dict(), "target_modules": tuple(saved_layers), "exclude": None,
                                  "rank_pattern": {n: info["rank"] for n, info in saved_layers.items()
                                                   if info["rank"] != config.rank}})
            apply_checked(model, exact, name, progress=progress, bases=stored)
            get_bank(model).configs[name] = config
        layers = dict(pica_layers(model))
        modules = dict(model.named_modules())
        # 3. Fingerprints: the basis each M will multiply must be the one it was trained with.
        for lname, info in saved_layers.items():
            saved_dtype = dtype_from_name(info["basis_dtype"])
            if "experts" in info:
                basis = modules[info["experts"]["module"]].basis(info["experts"]["role"], name)
                core_experts.check_experts_fingerprint(lname, basis, config.side, tensors[f"fingerprint.{lname}"],
                                                       basis_atol, saved_dtype)
                continue
            check_basis_fingerprint(lname, layers[lname].basis(name), config.side, tensors[f"fingerprint.{lname}"],
                                    basis_atol, saved_dtype)
        # 4. M, once per group.
        bank = get_bank(model)
        with torch.no_grad():
            for key in meta["groups"]:
                param = bank.get(name, key)
                if existing:
                    txn.keep(param)
                param.copy_(tensors[f"m.{key}"].to(device=param.device, dtype=param.dtype))
        set_adapter(model, name)
    # Identities recorded without data (meta / offloaded tensors at save time) are checked at the first forward.
    check_when_data(model, pending, lambda: base_tensors(model), check_base_model, _LOAD_ANYWAY)
    return model
