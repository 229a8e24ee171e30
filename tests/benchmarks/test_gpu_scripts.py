"""benchmarks/gpu.sh --dry-run (CPU, tiny sizes, ~1 minute): the one GPU command runs its four phases and
writes the files a GPU run writes, and what it writes is usable -- the tuned table validates and
select_config honours it, each bucket's choice is its fastest correct candidate, every candidate fits the
shared-memory model, the timing grid has its rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pica_kernels.ops.kernels import tuned
from pica_kernels.ops.kernels.configs import GPU_TABLE, Mode, estimate_shared_memory
from pica_kernels.ops.kernels.launchers import select_config

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("triton", reason="the dry run launches the kernels in Triton's interpreter")
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("gpu.sh needs bash and coreutils' timeout")
    out = tmp_path_factory.mktemp("gpu-dry")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PICA_KERNELS_", "TRITON_"))}
    env["PY"] = sys.executable
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--results-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, out


def test_dry_run_runs_every_phase_and_writes_the_files(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    names = sorted(p.name for p in out.iterdir())
    grid = [n for n in names if n.startswith("kernels-smoke-")]  # named after the CPU
    assert sorted(set(names) - set(grid)) == sorted(["gpu-run-dry-run.log", "tune-dry-run.json", "tune-dry-run.md",
                                                     "tuned_configs.json", "smem-dry-run-cpu.json",
                                                     "smem-dry-run-cpu.md"])
    assert len(grid) == 2 and {Path(n).suffix for n in grid} == {".json", ".md"}
    assert len(names) <= 8  # what one device call brings back
    log = (out / "gpu-run-dry-run.log").read_text()
    for phase in ("tests", "tune", "smem", "bench"):
        assert f"phase {phase}: ok, rc=0" in log, log[-3000:]
    assert "skipped" in log  # (a): the real-size tests skip on a CPU, and say so


def test_the_sweep_writes_a_table_select_config_honours(dry_run, monkeypatch):
    _, out = dry_run
    results = json.loads((out / "tune-dry-run.json").read_text())
    meta, buckets = results["meta"], results["buckets"]
    assert meta["dry_run"] and not meta["partial"] and meta["buckets_done"] == meta["buckets_planned"] == len(buckets)
    props = GPU_TABLE[meta["arch"]]
    raw = json.loads((out / "tuned_configs.json").read_text())
    table = tuned.Table.from_json(raw)
    assert table.errors == [] and len(table.entries) == sum(b["entry"] is not None for b in buckets) > 0
    monkeypatch.setenv(tuned.ENV_TABLE, str(out / "tuned_configs.json"))
    monkeypatch.delenv(tuned.ENV_TUNED, raising=False)
    tuned.clear_cache()
    try:
        for b in buckets:
            assert len(b["candidates"]) >= 2 and b["candidates"][0]["heuristic"]
            for c in b["candidates"]:
                assert c["status"] == "ok", c  # checked against the float64 reference before timing
                assert c["error"] <= 4e-3  # fp16 tolerance
                mode = Mode[b["mode"]]
                sizes = [DTYPES[d].itemsize for d in b["dtypes"].split("/")]
                assert estimate_shared_memory(c["config"], c["config"]["num_stages"], mode, *sizes,
                                              props.capability) == c["predicted_shared"] <= props.smem_per_block
            fastest = min(b["candidates"], key=lambda c: c["ms"])
            assert b["best"] == fastest
            wins = not fastest["heuristic"] and fastest["ms"] < b["heuristic_ms"] * (1 - meta["margin"])
            assert (b["entry"] is not None) == wins
            s = b["sizes"]
            dtypes = tuple(DTYPES[d] for d in b["dtypes"].split("/"))
            cfg = select_config(s["rows"], s["cols"], s["depth"], s["rank"], Mode[b["mode"]], dtypes, props)
            got = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            want = b["entry"]["config"] if wins else b["candidates"][0]["config"]  # the entry, or the heuristic
            assert got == want, (b["launch"], got, want)
    finally:
        tuned.clear_cache()


def test_the_smem_check_and_the_timing_grid_wrote_rows(dry_run):
    _, out = dry_run
    smem = json.loads((out / "smem-dry-run-cpu.json").read_text())
    sources = {k["source"] for k in smem["kernels"]}
    assert sources == {"ops", "tune"} and smem["meta"]["measured"] == 0  # the interpreter compiles nothing
    assert all(k["measured_shared"] is None and k["predicted_shared"] > 0 for k in smem["kernels"])
    stem = next(out.glob("kernels-smoke-*.json")).with_suffix("")
    grid = json.loads(stem.with_suffix(".json").read_text())
    assert not grid["meta"]["partial"]
    methods = {r["method"] for r in grid["results"]}
    assert {"frozen", "pica_kernel", "pica_reference", "lora_addmm"} <= methods
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in grid["results"])
    assert "| 17 | 48x40 | 4 |" in stem.with_suffix(".md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="an in-process CPU dry run would decorate the kernels for "
                    "the interpreter; on a GPU benchmarks/gpu.sh runs the real sweep")
def test_the_sweep_merges_into_an_existing_table(tmp_path, monkeypatch):
    """Entries of other architectures survive a sweep; a bucket the sweep measured again loses its old
    entry (replaced, or removed when the heuristic won); a file that is not a table is refused."""
    pytest.importorskip("triton")
    from benchmarks import gpu_tune

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the dry run launches in the interpreter (restored after)
    first = tmp_path / "first.json"
    assert gpu_tune.main(["--dry-run", "--table", str(first)]) == 0
    measured = json.loads(first.with_name("tune-dry-run-sm_90.json").read_text())["buckets"]
    stale_cfg = {"BLOCK_ROWS": 16, "BLOCK_COLS": 16, "BLOCK_DEPTH": 16, "GROUP_ROWS": 3, "num_warps": 2,
                 "num_stages": 2}
    keep = {"arch": "sm_86", "mode": "PLAIN", "regime": "prefill", "dtypes": "bf16/bf16/bf16", "bucket": {},
            "config": {**stale_cfg, "GROUP_ROWS": 5}}
    stale = [{k: b[k] for k in ("arch", "mode", "regime", "dtypes", "bucket")} | {"config": stale_cfg}
             for b in measured]
    table = tmp_path / "table.json"
    table.write_text(json.dumps({**tuned.empty_table(), "entries": [keep, *stale]}))
    assert gpu_tune.main(["--dry-run", "--table", str(table)]) == 0
    entries = json.loads(table.read_text())["entries"]
    assert keep in entries
    assert not any(e["config"]["GROUP_ROWS"] == 3 for e in entries)
    assert len(entries) == 1 + sum(b["entry"] is not None for b in measured)
    assert tuned.Table.from_json(json.loads(table.read_text())).errors == []
    table.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(tuned.TableError):
        gpu_tune.main(["--dry-run", "--table", str(table)])
