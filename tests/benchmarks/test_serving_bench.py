"""benchmarks/serving_bench.py at tiny size (a random 2-layer Llama, one round, a few seconds): every (N, threads,
method) row is written with a positive throughput, the output checks it records held, and the markdown renders."""

from __future__ import annotations

import json

import torch

from benchmarks import serving_bench as S


def test_serving_bench_writes_every_row(tmp_path):
    threads_before = torch.get_num_threads()
    S.main(["--tiny", "--rounds", "1", "--seq", "4", "--rank", "8", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads_before  # the benchmark's thread setting does not leak
    res = json.loads((tmp_path / "serving.json").read_text())
    rows = {(r["n"], r["threads"], r["method"]): r for r in res["rows"]}
    want = {(n, t, m) for n in (1, 4, 16, 64) for t in (1, 2) for m in ("frozen", "pica", "lora")}
    assert set(rows) == want
    for key, r in rows.items():
        assert r["tokens_per_s"] > 0 and r["rounds"] == 1, key
        assert r["tokens_per_sample"] == 64 * 4 * key[1], key
        assert r["peak_bytes"] > 0, key
    # The adapters change the output, a 2-thread request computes what it computes alone, N = 64 mixes.
    assert res["checks"] and all(c["held"] for c in res["checks"]), [c for c in res["checks"] if not c["held"]]
    assert {(g["n"], g["threads"], g["clock"]) for g in res["goals"]} == {
        (n, t, c) for n in (1, 16, 64) for t in (1, 2) for c in ("wall", "cpu")}
    meta = res["meta"]
    assert meta["cpu_model"] and len(meta["loadavg_before"]) == 3 and len(meta["loadavg_1min_per_round"]) == 1
    assert meta["added_bytes"]["pica"] > 0 and meta["added_bytes"]["lora"] > 0
    md = (tmp_path / "serving.md").read_text()
    assert md.count("\n| 64 | 2 | lora |") == 1 and "load average" in md
