"""On-disk cache of bases: the second load of a model skips the truncated SVD.

Every ``apply_pica``, ``load_adapter`` and PEFT injection computes its bases in
:func:`pica_kernels.core.bases.batched_bases`, one batched truncated SVD per
batch of weights of equal shape (dtype, device, rank). That function asks this
cache first, so both front ends share it.

What a cache entry is. One safetensors file per *batch* (not per layer):
``basis.0 … basis.{L-1}`` (L, r, in) or (L, out, r) as :func:`truncated_svd`
returns the batch, keyed by everything that determines those bits
(:func:`batch_key`): the sha256 of every weight's bytes in batch order, shape,
dtype, the versioned SVD preset, rank, side, seed, SVD backend, device type
(and GPU name / CPU instruction set) and torch version. Per batch because a
layer's basis is not a function of that layer alone: the SVD takes some
decisions for the whole batch (``_cholqr`` falls back to the eigh route for every
layer when one layer's Cholesky fails; an orthonormality check failing on one
layer re-runs the whole batch as a full SVD). Measured: the output-side rank-8
basis of a 64 x 48 Gaussian weight is bit-identical alone and batched with
another Gaussian weight, but differs by 3.7e-7 when batched with a rank-2
weight (tests/core/test_cache.py::test_batch_composition_changes_bits). A per-batch
key returns exactly the bits the SVD would compute now; the same model and
config always form the same batches (both front ends group the targets in
module order), so a second load hits every batch.

Where. ``PICA_KERNELS_CACHE``: a directory; unset or empty: the user cache dir
(``$XDG_CACHE_HOME/pica_kernels``, else ``~/.cache/pica_kernels``); ``0`` turns
the cache off. ``PICA_KERNELS_CACHE_MAX_BYTES`` bounds its size (default 4 GiB;
plain bytes or a K/M/G/T suffix, powers of 1024): after each write the least
recently used entries (oldest mtime; a hit touches its entry) are deleted until
the directory fits. SmolLM2-135M's 150 bases at r = 32 take 14.4 MiB.

Safety. An entry is written to a temporary file in the same directory and
renamed over its name (``os.replace``, atomic on POSIX and Windows), so a reader
sees a whole entry or none, and several processes (torchrun ranks) may fill one
cache at once: whoever renames last wins, both wrote the same bits. An entry
stores its key and the sha256 of each tensor in its metadata; a read checks the
format, the key, the tensor names, shapes, dtypes and checksums, and an entry
failing any check (truncated, foreign, edited, of another key) is ignored with
one :class:`CacheWarning`, recomputed and rewritten -- never used. A hit still
goes through the fingerprint check of an adapter file being loaded (the
fingerprint of the basis the adapter was trained with), like a computed basis.

Cost. The key needs a full-content hash of every target weight, in
``torch.get_num_threads()`` threads (hashlib releases the GIL). Measured on
SmolLM2-135M's 150 target weights (69.7M float32 parameters, 279 MB), one
thread, in one process: sha256 (SHA-NI) 0.17 s of CPU time (0.49 s wall at a
load average of 13.5 on 2 cores), the accurate r = 32 SVD it saves 6.1 s of CPU
time (18 s wall): 2.8%. Weights on a GPU are copied to the host to be hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ENV_DIR = "PICA_KERNELS_CACHE"
ENV_MAX_BYTES = "PICA_KERNELS_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 4 * 1024**3
#: Format name and version written into every entry; bump the version when the entry layout or key changes.
FORMAT = "pica_kernels.basis_cache"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
_ENTRY_RE = re.compile(r"^[0-9a-f]{40}\.safetensors$")
_TMP_PREFIX = ".tmp-"
# A temporary file older than this is a leftover of a killed writer (a write of the largest entries takes
# well under a second): removed by the next eviction pass.
_STALE_TMP_S = 3600.0
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


class CacheWarning(UserWarning):
    """A basis-cache entry was ignored (and recomputed), or the cache could not be written."""


_lock = threading.Lock()
_stats = {"hits": 0, "misses": 0, "writes": 0, "ignored": 0}
_write_warned: set[str] = set()


def directory() -> Path | None:
    """The cache directory (``PICA_KERNELS_CACHE``, else the user cache dir), or None when it is off (``0``)."""
    value = os.environ.get(ENV_DIR, "").strip()
    if value == "0":
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pica_kernels"


def max_bytes() -> int:
    """The size bound (``PICA_KERNELS_CACHE_MAX_BYTES``, default 4 GiB); ValueError naming the variable if bad."""
    value = os.environ.get(ENV_MAX_BYTES, "").strip()
    if not value:
        return DEFAULT_MAX_BYTES
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)(?:i?B)?", value, flags=re.IGNORECASE)
    if m is None:
        raise ValueError(f"{ENV_MAX_BYTES} must be a number of bytes, optionally with a K/M/G/T suffix "
                         f"(powers of 1024), e.g. 4G; got {value!r}")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def stats() -> dict[str, int]:
    """Counts of this process since start (or :func:`reset_stats`): batch hits, misses, entries written,
    entries ignored (bad or foreign)."""
    with _lock:
        return dict(_stats)


def reset_stats() -> None:
    with _lock:
        for k in _stats:
            _stats[k] = 0


def _count(key: str) -> None:
    with _lock:
        _stats[key] += 1


def _entries(d: Path) -> list[os.DirEntry]:
    try:
        return [e for e in os.scandir(d) if _ENTRY_RE.match(e.name) or e.name.startswith(_TMP_PREFIX)]
    except FileNotFoundError:
        return []


def clear() -> int:
    """Delete every entry of the cache directory (only the cache's own files); returns how many were deleted."""
    d = directory()
    if d is None:
        return 0
    n = 0
    for e in _entries(d):
        try:
            os.unlink(e.path)
            n += 1
        except FileNotFoundError:
            pass
    return n


def size_bytes() -> int:
    """Bytes the cache's entries take now (0 when off or empty)."""
    d = directory()
    total = 0
    for e in _entries(d) if d is not None else []:
        try:
            total += e.stat().st_size
        except FileNotFoundError:
            pass
    return total


# ------------------------------------------------------------------------------------------------ keys
def _sha256_tensor(t: torch.Tensor) -> str:
    """sha256 of the bytes of ``t`` (any shape/dtype), row-major, as its host copy."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h = hashlib.sha256()
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def cacheable(weight: torch.Tensor) -> bool:
    """Only plain tensors with data are hashed (not meta, not DTensor or other subclasses: their bytes are
    not the whole weight)."""
    w = weight.detach()
    return type(w) is torch.Tensor and w.device.type != "meta" and w.is_floating_point()


def batch_key(weights: list[torch.Tensor], rank: int, side: str, *, method: str, seed: int) -> dict | None:
    """What determines the bases of one SVD batch (weights (out, in) of equal shape, dtype and device, in batch
    order); None when a weight cannot be hashed (:func:`cacheable`). JSON-serialisable."""
    from ..svd import backend, versioned_method

    if not weights or not all(cacheable(w) for w in weights):
        return None
    w0 = weights[0]
    workers = max(1, min(torch.get_num_threads(), len(weights), 16))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            digests = list(pool.map(_sha256_tensor, weights))
    else:
        digests = [_sha256_tensor(w) for w in weights]
    dev = w0.device
    if dev.type == "cuda":
        machine = torch.cuda.get_device_name(dev)
    elif dev.type == "cpu":
        machine = torch.backends.cpu.get_cpu_capability()
    else:
        machine = ""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "torch": torch.__version__,
        "svd_method": versioned_method(method), "svd_backend": backend(), "device": dev.type, "machine": machine,
        "rank": int(rank), "side": side, "seed": int(seed), "dtype": str(w0.dtype).removeprefix("torch."),
        "shape": list(w0.shape), "weights": digests,
    }


def _key_json(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def entry_path(key: dict) -> Path | None:
    """Where the entry of ``key`` lives (None when the cache is off)."""
    d = directory()
    if d is None:
        return None
    return d / (hashlib.sha256(_key_json(key).encode()).hexdigest()[:40] + SUFFIX)


def _expected(key: dict) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape (L, r, in) or (L, out, r) and dtype of the batch of bases ``key`` describes."""
    out_f, in_f = key["shape"]
    rank, n = key["rank"], len(key["weights"])
    shape = (n, rank, in_f) if key["side"] == "input" else (n, out_f, rank)
    return shape, torch.float64 if key["dtype"] == "float64" else torch.float32


# ------------------------------------------------------------------------------------------ read / write
def _parse(data: bytes, key_json: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | str:
    """The (L, ...) bases in ``data`` (a whole entry file), or what is wrong with it."""
    from safetensors.torch import load as st_load

    if len(data) < 8:
        return f"truncated ({len(data)} bytes)"
    hlen = int.from_bytes(data[:8], "little")
    if hlen > len(data) - 8:
        return f"truncated (header of {hlen} bytes, {len(data)} in the file)"
    try:
        header = json.loads(data[8:8 + hlen])
        meta = header.get("__metadata__") or {}
    except (ValueError, AttributeError):
        return "not a safetensors file"
    if meta.get("format") != FORMAT:
        return f"not a basis-cache entry (format {meta.get('format')!r})"
    if meta.get("key") != key_json:
        return "its key differs from the one it is stored under (a foreign or renamed entry)"
    try:
        tensors = st_load(data)
        sums = json.loads(meta.get("sha256", ""))
    except Exception as e:  # safetensors raises its own SafetensorError on a damaged body
        return f"unreadable ({type(e).__name__}: {e})"
    names = [f"basis.{i}" for i in range(shape[0])]
    if sorted(tensors) != sorted(names) or not isinstance(sums, list) or len(sums) != len(names):
        return f"holds tensors {sorted(tensors)[:3]}..., expected {names[:3]}..."
    for name, digest in zip(names, sums):
        t = tensors[name]
        if tuple(t.shape) != shape[1:] or t.dtype != dtype:
            return f"{name} is {t.dtype} {list(t.shape)}, expected {dtype} {list(shape[1:])}"
        if _sha256_tensor(t) != digest:
            return f"{name} fails its checksum"
    return torch.stack([tensors[n] for n in names])


def _warn(msg: str) -> None:
    warnings.warn(f"basis cache: {msg}", CacheWarning, stacklevel=4)


def load(key: dict, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The cached bases of ``key`` ((L, r, in) or (L, out, r), on ``device``), or None on a miss.

    A present entry that fails a check is ignored with one :class:`CacheWarning` (the caller recomputes and
    :func:`store` overwrites it). A hit touches the entry's mtime (least-recently-used eviction).
    """
    path = entry_path(key)
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # no entry (or no directory: store says so once)
        _count("misses")
        return None
    except OSError as e:
        _count("misses")
        _warn(f"cannot read {path} ({e}); computing the bases")
        return None
    shape, dtype = _expected(key)
    got = _parse(data, _key_json(key), shape, dtype)
    if isinstance(got, str):
        _count("ignored")
        _count("misses")
        _warn(f"ignoring {path}: {got}; computing the bases again")
        return None
    try:
        os.utime(path)
    except OSError:
        pass  # evicted meanwhile, or a read-only cache: the hit stands
    _count("hits")
    return got.to(device)


def store(key: dict, bases: torch.Tensor) -> Path | None:
    """Write the (L, ...) ``bases`` of ``key`` atomically, then evict least-recently-used entries beyond
    :func:`max_bytes`. Failures to write only warn (once per directory): the cache is an optimisation."""
    from safetensors.torch import save as st_save

    path = entry_path(key)
    if path is None:
        return None
    shape, dtype = _expected(key)
    if tuple(bases.shape) != shape or bases.dtype != dtype:
        raise ValueError(f"bases of shape {list(bases.shape)} {bases.dtype} do not fit the key "
                         f"({list(shape)} {dtype})")
    tensors = {f"basis.{i}": b.detach().to("cpu", copy=True).contiguous() for i, b in enumerate(bases)}
    sums = [_sha256_tensor(tensors[f"basis.{i}"]) for i in range(len(tensors))]
    blob = st_save(tensors, metadata={"format": FORMAT, "key": _key_json(key), "sha256": json.dumps(sums)})
    limit = max_bytes()
    if len(blob) > limit:
        return None
    d = path.parent
    tmp = None
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".part", dir=d)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        if str(d) not in _write_warned:
            _write_warned.add(str(d))
            _warn(f"cannot write to {d} ({e}); bases are computed but not cached "
                  f"(set {ENV_DIR} to a writable directory, or to 0 to turn the cache off)")
        return None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    _count("writes")
    evict(limit, keep=path)
    return path


def evict(limit: int | None = None, keep: Path | None = None) -> int:
    """Delete least-recently-used entries (oldest mtime first, never ``keep``) until the cache takes at most
    ``limit`` bytes (default :func:`max_bytes`), and stale temporary files; returns how many were deleted."""
    d = directory()
    if d is None:
        return 0
    limit = max_bytes() if limit is None else limit
    now = time.time()
    entries, total, n = [], 0, 0
    for e in _entries(d):
        try:
            st = e.stat()
        except FileNotFoundError:
            continue
        if e.name.startswith(_TMP_PREFIX):
            if now - st.st_mtime > _STALE_TMP_S:
                try:
                    os.unlink(e.path)
                    n += 1
                except OSError:
                    pass
            continue
        entries.append((st.st_mtime, e.path, st.st_size))
        total += st.st_size
    for _, p, size in sorted(entries):
        if total <= limit:
            break
        if keep is not None and os.path.basename(p) == keep.name:
            continue
        try:
            os.unlink(p)
            n += 1
        except FileNotFoundError:
            pass
        total -= size
    return n
