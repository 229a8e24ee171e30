"""The on-disk basis cache (pica_kernels.core.cache, ``PICA_KERNELS_CACHE``): hits are bit-identical and skip the
SVD, every setting that determines a basis is in the key, bad entries are never used, concurrent writers are safe,
the size is bounded, and a cached basis still goes through an adapter file's fingerprint check."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

import pica_kernels as pk
import pica_kernels.cache as cache
from pica_kernels.core import bases as core_bases
from pica_kernels.core import cache as core_cache
from pica_kernels.core.bases import batched_bases
from pica_kernels.core.errors import AdapterMismatchError
from pica_kernels.svd import truncated_svd


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "basis-cache"
    monkeypatch.setenv("PICA_KERNELS_CACHE", str(d))
    monkeypatch.delenv("PICA_KERNELS_CACHE_MAX_BYTES", raising=False)
    cache.reset_stats()
    return d


@pytest.fixture
def svd_calls(monkeypatch) -> list[tuple]:
    """Every batched SVD batched_bases runs: (batch size, rank, side)."""
    calls = []

    def counting(weight, rank, side="input", **kw):
        calls.append((weight.shape[0], rank, side))
        return truncated_svd(weight, rank, side, **kw)

    monkeypatch.setattr(core_bases, "truncated_svd", counting)
    return calls


def _weights(seed: int = 0, n: int = 3, shape=(24, 16), dtype=torch.float32) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(f"layer{i}", torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)) for i in range(n)]


def _bases(weights, rank=4, side="input", method="accurate", seed=0) -> dict[str, torch.Tensor]:
    return batched_bases(weights, rank, side, method=method, seed=seed)


def _entries(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def _buffers(model) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1].startswith("basis_")}


def _cache_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, cache.CacheWarning)]


# ------------------------------------------------------------------------------------------------ hits
def test_hit_is_bit_identical_and_skips_the_svd(cache_dir, svd_calls):
    cfg = pk.PiCaConfig(rank=4)
    first = _buffers(pk.apply_pica(tiny_model("llama"), cfg, progress=False))
    n_batches = len(svd_calls)
    assert n_batches > 0 and cache.stats()["writes"] == n_batches == len(_entries(cache_dir))
    second = _buffers(pk.apply_pica(tiny_model("llama"), cfg, progress=False))
    assert len(svd_calls) == n_batches  # no SVD on the second load
    assert cache.stats()["hits"] == n_batches
    assert first.keys() == second.keys() and len(first) == 15
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_both_front_ends_share_the_cache(cache_dir, svd_calls, tmp_path):
    """The native front end fills the cache; the PEFT tuner's injection and PeftModel.from_pretrained hit it."""
    from peft import PeftModel, get_peft_model

    from pica_kernels.core.defaults import DEFAULT_TARGETS
    from pica_kernels.peft import PiCaPeftConfig, PiCaPeftLinear

    native = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4), progress=False)
    n_batches = len(svd_calls)
    peft_model = get_peft_model(tiny_model("llama"), PiCaPeftConfig(r=4, target_modules=list(DEFAULT_TARGETS)))
    assert len(svd_calls) == n_batches
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
              if isinstance(m, PiCaPeftLinear)}
    assert len(layers) == 15
    for name, layer in layers.items():
        assert torch.equal(layer.pica_basis["default"], native.get_submodule(name).basis("default"))
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "peft-adapter")
    assert len(svd_calls) == n_batches
    assert cache.stats()["hits"] == 2 * n_batches


def test_load_adapter_hits_the_cache_apply_filled(cache_dir, svd_calls, tmp_path):
    model = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4), progress=False)
    with torch.no_grad():
        for p in model.pica_bank.parameters():
            p.normal_(0, 0.05)
    pk.save_adapter(model, tmp_path / "adapter")
    n_batches = len(svd_calls)
    loaded = pk.load_adapter(tiny_model("llama"), tmp_path / "adapter", progress=False)
    assert len(svd_calls) == n_batches
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("change", ["rank", "side", "seed", "method", "dtype", "weight", "order", "batch"])
def test_every_setting_is_in_the_key(cache_dir, svd_calls, change):
    weights = _weights()
    base = _bases(weights)
    assert len(svd_calls) == 1
    kw = dict(rank=4, side="input", method="accurate", seed=0)
    w = weights
    if change == "rank":
        kw["rank"] = 5
    elif change == "side":
        kw["side"] = "output"
    elif change == "seed":
        kw["seed"] = 1
    elif change == "method":
        kw["method"] = "fast"
    elif change == "dtype":
        w = [(n, t.double()) for n, t in weights]
    elif change == "weight":
        w = [(n, t.clone()) for n, t in weights]
        w[1][1][3, 5] += 1e-6  # one entry of one weight
    elif change == "order":
        w = weights[::-1]
    elif change == "batch":
        w = weights[:2]
    got = _bases(w, **kw)
    assert len(svd_calls) == 2, f"changing {change} must miss"
    assert cache.stats()["hits"] == 0
    if change == "order":  # same bases, another batch: recomputed, and (layers do not depend on position) equal
        assert all(torch.equal(got[n], base[n]) for n in base)
    again = _bases(w, **kw)
    assert len(svd_calls) == 2 and cache.stats()["hits"] == 1
    assert all(torch.equal(again[n], got[n]) for n in got)


def test_plain_names_and_versioned_presets_share_entries(cache_dir, svd_calls):
    """"accurate" runs "accurate-v2": the key holds the versioned preset, so both names hit one entry."""
    a = _bases(_weights(), method="accurate")
    b = _bases(_weights(), method="accurate-v2")
    assert len(svd_calls) == 1
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_batch_composition_changes_bits():
    """Why the cache keys whole batches: one layer's basis depends on its batch. A rank-deficient weight in the
    batch makes the orthonormality check re-run the whole batch as a full SVD (output side, long side wanted)."""
    gen = torch.Generator().manual_seed(0)
    w1 = torch.randn(64, 48, generator=gen)
    w2 = torch.randn(64, 2, generator=gen) @ torch.randn(2, 48, generator=gen)
    w3 = torch.randn(64, 48, generator=gen)
    alone, _ = truncated_svd(w1, 8, "output")
    with_gaussian, _ = truncated_svd(torch.stack([w1, w3]), 8, "output")
    with_deficient, _ = truncated_svd(torch.stack([w1, w2]), 8, "output")
    assert torch.equal(alone, with_gaussian[0])
    assert not torch.equal(alone, with_deficient[0])


def test_non_contiguous_and_bf16_weights(cache_dir, svd_calls):
    """A transposed view (Conv1D's weight as (out, in)) and bfloat16 weights are hashed by value."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 24, generator=gen)
    weights = [("a", w.T), ("b", torch.randn(24, 16, generator=gen).to(torch.bfloat16).float())]
    first = _bases(weights[:1])
    second = _bases([("a", w.T.contiguous())])
    assert len(svd_calls) == 1 and torch.equal(first["a"], second["a"])
    bf = [("b", weights[1][1].to(torch.bfloat16))]
    got = _bases(bf)
    again = _bases([("b", weights[1][1].to(torch.bfloat16).clone())])
    assert len(svd_calls) == 2 and torch.equal(got["b"], again["b"])


# ------------------------------------------------------------------------------------------ bad entries
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) - 37])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flipped":  # one byte of the last tensor's data: only the checksum can see it
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 0x40]) + data[-4:])
    elif how == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")


@pytest.mark.parametrize("how", ["truncated", "empty", "flipped", "garbage"])
def test_damaged_entry_is_warned_once_and_recomputed(cache_dir, svd_calls, how):
    weights = _weights()
    good = _bases(weights)
    (entry,) = _entries(cache_dir)
    _damage(entry, how)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _bases(weights)
    msgs = _cache_warnings(caught)
    assert len(msgs) == 1 and str(entry) in msgs[0], msgs
    assert len(svd_calls) == 2  # recomputed, not read
    assert all(torch.equal(got[n], good[n]) for n in good)
    # rewritten whole: the next load hits without a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = _bases(weights)
    assert not _cache_warnings(caught) and len(svd_calls) == 2
    assert all(torch.equal(again[n], good[n]) for n in good)


def test_foreign_entry_is_ignored(cache_dir, svd_calls):
    """A valid safetensors file under an entry's name that belongs to another key (or is no cache entry)."""
    a, b = _weights(seed=0), _weights(seed=1)
    _bases(a)
    (entry_a,) = _entries(cache_dir)
    _bases(b)
    (entry_b,) = [e for e in _entries(cache_dir) if e != entry_a]
    entry_a.write_bytes(entry_b.read_bytes())  # b's entry, whole and valid, under a's name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _bases(a)
    msgs = _cache_warnings(caught)
    assert len(msgs) == 1 and "key differs" in msgs[0]
    assert len(svd_calls) == 3
    ref = batched_bases(a, 4, "input", method="accurate", seed=0)
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    # a plain safetensors file of the right tensor names and shapes, without the cache's metadata
    save_file({f"basis.{i}": got[n].clone() for i, n in enumerate(got)}, str(entry_a))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _bases(a)
    assert len(_cache_warnings(caught)) == 1 and "not a basis-cache entry" in _cache_warnings(caught)[0]


def test_wrong_cached_basis_is_refused_by_the_adapter_fingerprint(cache_dir, tmp_path):
    """An entry with a valid checksum but another basis (planted): load_adapter's fingerprint check refuses it."""
    model = pk.apply_pica(tiny_model("llama"), pk.PiCaConfig(rank=4), progress=False)
    pk.save_adapter(model, tmp_path / "adapter")
    for entry in _entries(cache_dir):
        with safe_open(str(entry), "pt") as f:
            key = json.loads(f.metadata()["key"])
            bases = torch.stack([f.get_tensor(f"basis.{i}") for i in range(len(key["weights"]))])
        core_cache.store(key, -bases)  # sign-flipped: as orthonormal as the right one, another basis
    with pytest.raises(AdapterMismatchError, match="does not match the adapter's fingerprint.*basis cache"):
        pk.load_adapter(tiny_model("llama"), tmp_path / "adapter", progress=False)
    cache.clear()
    pk.load_adapter(tiny_model("llama"), tmp_path / "adapter", progress=False)  # recomputed: loads


def test_wrong_cached_basis_is_refused_by_the_peft_fingerprint(cache_dir, tmp_path):
    from peft import PeftModel, get_peft_model

    from pica_kernels.peft import PiCaPeftConfig

    model = get_peft_model(tiny_model("llama"), PiCaPeftConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "peft-adapter")
    for entry in _entries(cache_dir):
        with safe_open(str(entry), "pt") as f:
            key = json.loads(f.metadata()["key"])
            bases = torch.stack([f.get_tensor(f"basis.{i}") for i in range(len(key["weights"]))])
        core_cache.store(key, bases.flip(-2) if key["side"] == "input" else bases.flip(-1))  # rows swapped
    with pytest.raises(AdapterMismatchError, match="fingerprint"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "peft-adapter")


# ---------------------------------------------------------------------------------------- concurrency
def _fill_worker(d: str, k: int, barrier, out) -> None:
    os.environ["PICA_KERNELS_CACHE"] = d
    torch.set_num_threads(1)
    import warnings as w

    from pica_kernels.core import cache as c
    from pica_kernels.core.bases import batched_bases as bb

    groups = [_weights(seed=s, n=4, shape=(96, 64)) for s in range(3)]
    os.environ["PICA_KERNELS_CACHE"] = "0"
    refs = [bb(g, 16, "input", method="accurate", seed=0) for g in groups]
    os.environ["PICA_KERNELS_CACHE"] = d
    bad, n_warn = 0, 0
    barrier.wait()
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        for i in range(30):
            if i % 6 == 3 * k:  # each process empties the cache now and then: the other one rewrites under it
                c.clear()
            for g, ref in zip(groups, refs):
                got = bb(g, 16, "input", method="accurate", seed=0)
                bad += sum(not torch.equal(got[n], ref[n]) for n in ref)
        n_warn = sum(issubclass(x.category, c.CacheWarning) for x in caught)
    out.put((k, bad, n_warn, c.stats()))


def test_two_processes_fill_one_cache(cache_dir):
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_fill_worker, args=(str(cache_dir), k, barrier, out)) for k in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
        assert p.exitcode == 0
    for k, bad, n_warn, st in results:
        assert bad == 0, f"process {k} got {bad} wrong bases"
        assert n_warn == 0, f"process {k} read a partial or foreign entry {n_warn} times"
        assert st["hits"] > 0 and st["writes"] > 0 and st["ignored"] == 0
    entries = _entries(cache_dir)
    assert len(entries) == 3 and not list(cache_dir.glob(".tmp-*"))
    for e in entries:  # every entry left is whole and verifies
        with safe_open(str(e), "pt") as f:
            key = json.loads(f.metadata()["key"])
        assert core_cache.load(key) is not None


# ------------------------------------------------------------------------------------ size, off, clear
def test_full_cache_evicts_least_recently_used(cache_dir, monkeypatch, svd_calls):
    sets = [_weights(seed=s) for s in range(3)]
    _bases(sets[0])
    (entry0,) = _entries(cache_dir)
    size = entry0.stat().st_size
    monkeypatch.setenv("PICA_KERNELS_CACHE_MAX_BYTES", str(2 * size + size // 2))  # room for two entries
    _bases(sets[1])
    (entry1,) = [e for e in _entries(cache_dir) if e != entry0]
    os.utime(entry0, (1_000_000, 1_000_000))
    os.utime(entry1, (2_000_000, 2_000_000))
    _bases(sets[0])  # a hit touches entry0: entry1 is now the least recently used
    assert len(svd_calls) == 2 and entry0.stat().st_mtime > 2_000_000
    _bases(sets[2])  # a third entry: one must go
    assert entry0.exists() and not entry1.exists() and len(_entries(cache_dir)) == 2
    assert cache.size_bytes() <= 2 * size + size // 2
    _bases(sets[1])  # evicted: recomputed
    assert len(svd_calls) == 4


def test_entry_larger_than_the_bound_is_not_written(cache_dir, monkeypatch):
    monkeypatch.setenv("PICA_KERNELS_CACHE_MAX_BYTES", "1K")
    assert cache.max_bytes() == 1024
    _bases(_weights())
    assert _entries(cache_dir) == []


@pytest.mark.parametrize("value, expected", [("123", 123), ("4G", 4 * 1024**3), ("512MiB", 512 * 1024**2),
                                             ("", cache.DEFAULT_MAX_BYTES)])
def test_max_bytes_values(monkeypatch, value, expected):
    monkeypatch.setenv("PICA_KERNELS_CACHE_MAX_BYTES", value)
    assert cache.max_bytes() == expected


def test_bad_max_bytes_names_the_variable(cache_dir, monkeypatch, svd_calls):
    monkeypatch.setenv("PICA_KERNELS_CACHE_MAX_BYTES", "four gigs")
    with pytest.raises(ValueError, match="PICA_KERNELS_CACHE_MAX_BYTES.*'four gigs'"):
        _bases(_weights())
    assert svd_calls == []  # refused before any SVD


def test_zero_turns_the_cache_off(tmp_path, monkeypatch, svd_calls):
    monkeypatch.setenv("PICA_KERNELS_CACHE", "0")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.directory() is None
    _bases(_weights())
    _bases(_weights())
    assert len(svd_calls) == 2
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()
    assert cache.clear() == 0


def test_default_directory_is_the_user_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("PICA_KERNELS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.directory() == tmp_path / "xdg" / "pica_kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.directory() == tmp_path / "home" / ".cache" / "pica_kernels"
    _bases(_weights())
    assert len(_entries(tmp_path / "home" / ".cache" / "pica_kernels")) == 1


def test_clear_removes_only_cache_files(cache_dir, svd_calls):
    _bases(_weights(seed=0))
    _bases(_weights(seed=1))
    (cache_dir / "notes.txt").write_text("mine")
    assert cache.clear() == 2
    assert _entries(cache_dir) == [] and (cache_dir / "notes.txt").read_text() == "mine"
    _bases(_weights(seed=0))
    assert len(svd_calls) == 3


def test_unwritable_directory_warns_once_and_still_computes(tmp_path, monkeypatch, svd_calls):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PICA_KERNELS_CACHE", str(blocker / "cache"))
    core_cache._write_warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = _bases(_weights(seed=0))
        _bases(_weights(seed=1))
    msgs = _cache_warnings(caught)
    assert len(msgs) == 1 and "cannot write" in msgs[0]
    assert len(svd_calls) == 2 and set(a) == {"layer0", "layer1", "layer2"}


def test_meta_weights_skip_the_cache(cache_dir):
    with torch.device("meta"):
        w = [("a", torch.empty(24, 16))]
    got = _bases(w)
    assert got["a"].device.type == "meta" and not cache_dir.exists()
