"""The tuned-config table: block sizes measured on real GPUs, consulted before the heuristic.

:func:`~.launchers.select_config` asks :func:`lookup` first; when the table has no entry for a launch
(or none that fits the device), the per-regime heuristic of :mod:`.configs` decides. The table is a
JSON file shipped in the package (``tuned_configs.json``, next to this module) and written by
``benchmarks/gpu_tune.py``, which sweeps candidate configs (:func:`.autotune.candidate_configs`) on a
GPU, checks each against the reference and keeps the fastest. The choice is deterministic: the same table, device
and launch always give the same config.

Table format (``schema`` and ``version`` are checked; a table that fails them is ignored with a
warning, an entry that fails is skipped with a warning)::

    {"schema": "pica_kernels.tuned_configs", "version": 1,
     "entries": [
       {"arch": "sm_90", "mode": "CONCAT_K", "regime": "prefill", "dtypes": "bf16/bf16/fp32",
        "bucket": {"rows": 4096, "cols": 4096, "depth": 4096, "rank": 64},
        "config": {"BLOCK_ROWS": 128, "BLOCK_COLS": 128, "BLOCK_DEPTH": 64, "GROUP_ROWS": 8,
                   "num_warps": 8, "num_stages": 4},
        "measured": {"device": "NVIDIA H200", "ms": 0.41, "heuristic_ms": 0.45, ...}}]}

Key of an entry: ``arch`` (``sm_<major><minor>``), ``mode`` (a :class:`~.configs.Mode` name),
``regime`` (:func:`~.configs.regime`), ``dtypes`` (x / weight / factor element types, as
:func:`dtypes_name` writes them) and ``bucket``: the power-of-two ceilings of the launch's rows,
cols, depth and rank (:func:`shape_bucket`). A bucket field left out matches any value; of the
entries that match a launch the most specific (most bucket fields) wins, ties going to the first in
the file. ``config`` may give ``BLOCK_RANK`` (else the heuristic's rule); ``measured`` is free-form
provenance. An entry whose config does not fit the device (:func:`~.configs.estimate_shared_memory`
over ``smem_per_block``, or a DECODE rank tile narrower than the rank) is ignored with a one-time
warning and the next match, or the heuristic, is used.

Environment:
  ``PICA_KERNELS_TUNED=0``            ignore the table (the heuristic alone).
  ``PICA_KERNELS_TUNED_CONFIGS=path`` read this table instead of the shipped one.

Run-time autotuning (``PICA_KERNELS_AUTOTUNE=1``) is :mod:`.autotune`. Importable without triton.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ..env import env_flag
from .configs import BLOCK_NAMES, DeviceProps, Mode, block_rank, estimate_shared_memory, next_pow2, regime

SCHEMA = "pica_kernels.tuned_configs"
VERSION = 1
#: The table shipped in the package (package data).
TABLE_PATH = Path(__file__).with_name("tuned_configs.json")
ENV_TUNED = "PICA_KERNELS_TUNED"
ENV_TABLE = "PICA_KERNELS_TUNED_CONFIGS"

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
REGIMES = tuple(f"{p}{b}" for p in ("", "narrow-") for b in ("small", "mid", "prefill")) + ("decode",)
BUCKET_FIELDS = ("rows", "cols", "depth", "rank")
CONFIG_KEYS = (*BLOCK_NAMES, "num_warps", "num_stages")
_ARCH = re.compile(r"^sm_\d{2,3}$")
_DTYPES = re.compile(r"^(fp16|bf16|fp32)/(fp16|bf16|fp32)/(fp16|bf16|fp32)$")


class TableError(ValueError):
    """A tuned-config table that cannot be used at all (not JSON, wrong schema or version)."""


def table_enabled() -> bool:
    """False when ``PICA_KERNELS_TUNED=0``."""
    return env_flag(ENV_TUNED, default=True)


def table_path() -> Path:
    """The table in use: ``PICA_KERNELS_TUNED_CONFIGS`` if set, else the shipped one."""
    return Path(os.environ.get(ENV_TABLE) or TABLE_PATH)


def dtypes_name(dtypes: Sequence[torch.dtype]) -> str:
    """``(x, weight, factor)`` element types as a key: ``"bf16/bf16/fp32"``."""
    return "/".join(DTYPE_NAMES[dt] for dt in dtypes)


def shape_bucket(rows: int, cols: int, depth: int, rank: int) -> dict[str, int]:
    """Power-of-two ceilings of a launch's sizes (0 stays 0: PLAIN launches have rank 0)."""
    return {k: (next_pow2(v) if v > 0 else 0) for k, v in zip(BUCKET_FIELDS, (rows, cols, depth, rank))}


@dataclasses.dataclass(frozen=True)
class Entry:
    arch: str
    mode: Mode
    regime: str
    dtypes: str
    bucket: tuple[tuple[str, int], ...]  # the fields given, in BUCKET_FIELDS order
    config: tuple[tuple[str, int], ...]
    index: int  # position in the file (ties, warnings)

    @property
    def key(self) -> tuple:
        return (self.arch, self.mode, self.regime, self.dtypes)

    def matches(self, bucket: dict[str, int]) -> bool:
        return all(bucket[k] == v for k, v in self.bucket)


def _pow2(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0 and not v & (v - 1)


def parse_entry(raw, index: int) -> Entry:
    """One entry of the table, validated; ValueError naming what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError("an entry must be an object")
    missing = [k for k in ("arch", "mode", "regime", "dtypes", "config") if k not in raw]
    if missing:
        raise ValueError(f"missing {missing}")
    unknown = set(raw) - {"arch", "mode", "regime", "dtypes", "bucket", "config", "measured"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    if not isinstance(raw["arch"], str) or not _ARCH.match(raw["arch"]):
        raise ValueError(f"arch must look like 'sm_90', got {raw['arch']!r}")
    if raw["mode"] not in Mode.__members__:
        raise ValueError(f"mode must be one of {list(Mode.__members__)}, got {raw['mode']!r}")
    mode = Mode[raw["mode"]]
    if raw["regime"] not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {raw['regime']!r}")
    if (raw["regime"] == "decode") != (mode == Mode.DECODE):
        raise ValueError(f"regime {raw['regime']!r} does not go with mode {mode.name}")
    if not isinstance(raw["dtypes"], str) or not _DTYPES.match(raw["dtypes"]):
        raise ValueError(f"dtypes must look like 'bf16/bf16/fp32', got {raw['dtypes']!r}")
    bucket = raw.get("bucket", {})
    if not isinstance(bucket, dict) or set(bucket) - set(BUCKET_FIELDS):
        raise ValueError(f"bucket must be an object with fields among {BUCKET_FIELDS}, got {bucket!r}")
    for k, v in bucket.items():
        if not (v == 0 and k == "rank" and not isinstance(v, bool)) and not _pow2(v):
            raise ValueError(f"bucket {k} must be a power of two (rank may be 0), got {v!r}")
    config = raw["config"]
    if not isinstance(config, dict):
        raise ValueError("config must be an object")
    need = {"BLOCK_ROWS", "BLOCK_COLS", "BLOCK_DEPTH", "GROUP_ROWS", "num_warps", "num_stages"}
    if need - set(config) or set(config) - set(CONFIG_KEYS):
        raise ValueError(f"config needs {sorted(need)} (and may give BLOCK_RANK), got {sorted(config)}")
    for k, v in config.items():
        if k.startswith("BLOCK_") and not (_pow2(v) and v >= 16):
            raise ValueError(f"config {k} must be a power of two >= 16, got {v!r}")
        if k == "num_warps" and v not in (1, 2, 4, 8, 16):
            raise ValueError(f"config num_warps must be 1, 2, 4, 8 or 16, got {v!r}")
        if k in ("GROUP_ROWS", "num_stages") and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ValueError(f"config {k} must be a positive int, got {v!r}")
    return Entry(raw["arch"], mode, raw["regime"], raw["dtypes"],
                 tuple((k, bucket[k]) for k in BUCKET_FIELDS if k in bucket),
                 tuple((k, config[k]) for k in CONFIG_KEYS if k in config), index)


@dataclasses.dataclass
class Table:
    path: str
    entries: list[Entry]
    errors: list[str]  # entries skipped, with the reason
    index: dict[tuple, list[Entry]]

    @classmethod
    def from_json(cls, obj, path: str = "<memory>") -> Table:
        """Validate a parsed table: TableError for the whole, per-entry problems in ``errors``."""
        if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
            raise TableError(f"{path}: not a tuned-config table (expected \"schema\": {SCHEMA!r})")
        if obj.get("version") != VERSION:
            raise TableError(f"{path}: table version {obj.get('version')!r}; this pica_kernels reads version "
                             f"{VERSION}")
        if not isinstance(obj.get("entries"), list):
            raise TableError(f"{path}: \"entries\" must be a list")
        entries, errors, seen = [], [], {}
        for i, raw in enumerate(obj["entries"]):
            try:
                e = parse_entry(raw, i)
            except ValueError as err:
                errors.append(f"entry {i}: {err}")
                continue
            ident = (e.key, e.bucket)
            if ident in seen:
                errors.append(f"entry {i}: same key and bucket as entry {seen[ident]} (the first one is used)")
                continue
            seen[ident] = i
            entries.append(e)
        index: dict[tuple, list[Entry]] = {}
        for e in entries:
            index.setdefault(e.key, []).append(e)
        for group in index.values():  # most specific first; the file's order breaks ties
            group.sort(key=lambda e: (-len(e.bucket), e.index))
        return cls(path, entries, errors, index)

    def matches(self, arch: str, mode: Mode, reg: str, dtypes: str, bucket: dict[str, int]) -> list[Entry]:
        return [e for e in self.index.get((arch, mode, reg, dtypes), ()) if e.matches(bucket)]


def empty_table() -> dict:
    return {"schema": SCHEMA, "version": VERSION, "entries": []}


_WARNED: set = set()


def _warn_once(key, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


_CACHE: dict[str, Table | None] = {}


def clear_cache() -> None:
    """Forget the tables read (and the warnings given): the next lookup reads the file again."""
    _CACHE.clear()
    _WARNED.clear()


def load_table(path: Path | str | None = None) -> Table | None:
    """The table at ``path`` (default :func:`table_path`), parsed once per process (:func:`clear_cache`
    to re-read); None when it is missing or unusable (a warning says why, once)."""
    path = Path(path) if path is not None else table_path()
    if str(path) in _CACHE:
        return _CACHE[str(path)]
    table = None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        _warn_once(("bad", str(path)), f"pica_kernels: tuned-config table ignored: {path} is not UTF-8 text ({err})")
    except OSError as err:
        _warn_once(("missing", str(path)), f"pica_kernels: tuned-config table {path} cannot be read ({err}); "
                                           "using the heuristic configs")
    else:
        try:
            table = Table.from_json(json.loads(text), str(path))
        except (json.JSONDecodeError, TableError) as err:
            _warn_once(("bad", str(path)), f"pica_kernels: tuned-config table ignored: {err}")
        except RecursionError:  # nested deeper than the parser (or the table's walk) can follow
            _warn_once(("bad", str(path)), f"pica_kernels: tuned-config table ignored: {path} is nested too deeply "
                                           "to be a tuned-config table")
        else:
            if table.errors:
                _warn_once(("entries", str(path)), f"pica_kernels: {path}: {len(table.errors)} tuned "
                           "entries skipped: " + "; ".join(table.errors))
    _CACHE[str(path)] = table
    return table


def fits(config: dict, mode: Mode, rank: int, dtypes: Sequence[torch.dtype], device: DeviceProps) -> tuple[dict, str]:
    """``(blocks, "")`` when ``config`` can run this launch on ``device``, else ``({}, why)``.

    blocks: the five BLOCK_* / GROUP_ROWS values, BLOCK_RANK filled in by the heuristic's rule
    (:func:`~.configs.block_rank`) when absent.
    """
    blocks = {k: config[k] for k in BLOCK_NAMES if k in config}
    if "BLOCK_RANK" not in blocks:
        blocks["BLOCK_RANK"] = block_rank(mode, rank, blocks["BLOCK_DEPTH"], blocks["BLOCK_ROWS"])
    if mode == Mode.DECODE and blocks["BLOCK_RANK"] < rank:
        return {}, f"BLOCK_RANK {blocks['BLOCK_RANK']} < r = {rank} (DECODE holds t whole)"
    smem = estimate_shared_memory(blocks, config["num_stages"], mode, *(dt.itemsize for dt in dtypes),
                                  device.capability)
    if smem > device.smem_per_block:
        return {}, f"needs ~{smem} B of shared memory, {device.name} ({device.arch}) has {device.smem_per_block} B"
    return blocks, ""


def lookup(rows: int, cols: int, depth: int, rank: int, mode: Mode, dtypes: Sequence[torch.dtype],
           device: DeviceProps, table: Table | None = None) -> tuple[dict, int, int] | None:
    """(blocks, num_warps, num_stages) of the tuned entry for this launch, or None (use the heuristic).

    ``table``: default :func:`load_table` (None when ``PICA_KERNELS_TUNED=0``)."""
    if table is None:
        if not table_enabled():
            return None
        table = load_table()
        if table is None:
            return None
    if any(dt not in DTYPE_NAMES for dt in dtypes):
        return None
    for entry in table.matches(device.arch, mode, regime(rows, cols, mode), dtypes_name(dtypes),
                               shape_bucket(rows, cols, depth, rank)):
        config = dict(entry.config)
        blocks, why = fits(config, mode, rank, dtypes, device)
        if blocks:
            return blocks, config["num_warps"], config["num_stages"]
        _warn_once(("unfit", table.path, entry.index, device),
                   f"pica_kernels: tuned config ignored (entry {entry.index} of {table.path}, {mode.name} "
                   f"rows={rows} cols={cols} depth={depth} rank={rank}): {why}; using the next match or the "
                   "heuristic")
    return None
