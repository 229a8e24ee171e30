"""The tuned-config table (pica_kernels/ops/kernels/tuned.py): schema, bucket lookup, fallback to the
heuristic, environment switches, unfit and bad entries, select_config honouring an entry, the candidate
generator of the sweep, run-time autotuning's choice -- and the safety net's catch of the CUDA driver's
"too many resources requested for launch". All on CPU with DeviceProps built by hand (GPU_TABLE)."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

from pica_kernels import reference
from pica_kernels.ops import pica_linear
from pica_kernels.ops.kernels import autotune, launchers, tuned
from pica_kernels.ops.kernels.configs import (
    GPU_TABLE,
    DeviceProps,
    Mode,
    block_rank,
    config_override,
    estimate_shared_memory,
    heuristic_config,
)
from pica_kernels.ops.kernels.launchers import select_config
from tests.ops.kernel_helpers import (
    DEVICE,
    TOLERANCES,
    max_rel_err,
    needs_triton,
    poison_kernel_outputs,  # noqa: F401  (autouse)
)

H100, A10 = GPU_TABLE["sm_90"], GPU_TABLE["sm_86"]
BF16_M32 = (torch.bfloat16, torch.bfloat16, torch.float32)
F16 = (torch.float16,) * 3
#: A launch: y = [x | t] @ [W | M].T at T = 4096, 4096 x 4096, r = 64, bf16 x with an fp32 M.
PREFILL = (4096, 4096, 4096, 64, Mode.CONCAT_K, BF16_M32)


def entry(config=None, arch="sm_90", mode="CONCAT_K", regime="prefill", dtypes="bf16/bf16/fp32", **bucket):
    config = config or {"BLOCK_ROWS": 64, "BLOCK_COLS": 256, "BLOCK_DEPTH": 32, "GROUP_ROWS": 4,
                        "num_warps": 8, "num_stages": 5}
    return {"arch": arch, "mode": mode, "regime": regime, "dtypes": dtypes, "bucket": bucket, "config": config}


def table(*entries, **top):
    return {**tuned.empty_table(), **top, "entries": list(entries)}


@pytest.fixture
def use_table(tmp_path, monkeypatch):
    """Write a table and point PICA_KERNELS_TUNED_CONFIGS at it (the cache and warnings reset around)."""
    monkeypatch.delenv(tuned.ENV_TUNED, raising=False)
    monkeypatch.delenv(autotune.ENV_AUTOTUNE, raising=False)

    def write(obj, name="table.json"):
        path = tmp_path / name
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        monkeypatch.setenv(tuned.ENV_TABLE, str(path))
        tuned.clear_cache()
        return path

    tuned.clear_cache()
    yield write
    tuned.clear_cache()


def as_tuple(cfg):
    return dict(cfg.kwargs), cfg.num_warps, cfg.num_stages


def heuristic(rows, cols, depth, rank, mode, dtypes, props):
    blocks, warps, stages = heuristic_config(rows, cols, rank, mode, dtypes, props)
    return blocks, warps, stages


# ----------------------------------------------------------------------------- the shipped table


def test_shipped_table_is_valid_and_package_data():
    raw = json.loads(tuned.TABLE_PATH.read_text())
    assert raw["schema"] == tuned.SCHEMA and raw["version"] == tuned.VERSION
    parsed = tuned.Table.from_json(raw, str(tuned.TABLE_PATH))
    assert parsed.errors == []  # every shipped entry is used
    for e in parsed.entries:
        assert e.arch in GPU_TABLE, e  # measured on a known architecture
    if sys.version_info >= (3, 11):
        from pathlib import Path

        import tomllib

        pyproject = tomllib.loads((Path(__file__).resolve().parents[3] / "pyproject.toml").read_text())
        assert "tuned_configs.json" in pyproject["tool"]["setuptools"]["package-data"]["pica_kernels.ops.kernels"]


# ----------------------------------------------------------------------------- lookup


def test_shape_bucket_and_dtype_names():
    assert tuned.shape_bucket(4096, 1024, 14336, 0) == {"rows": 4096, "cols": 1024, "depth": 16384, "rank": 0}
    assert tuned.shape_bucket(3000, 17, 1, 24) == {"rows": 4096, "cols": 32, "depth": 1, "rank": 32}
    assert tuned.dtypes_name(BF16_M32) == "bf16/bf16/fp32"


def test_lookup_most_specific_bucket_wins_and_other_keys_miss():
    general = {"BLOCK_ROWS": 128, "BLOCK_COLS": 64, "BLOCK_DEPTH": 64, "GROUP_ROWS": 8, "num_warps": 4,
               "num_stages": 3}
    by_cols = {**general, "BLOCK_COLS": 128}
    exact = {**general, "BLOCK_ROWS": 64, "BLOCK_COLS": 256, "num_warps": 8}
    t = tuned.Table.from_json(table(
        entry(general),
        entry(by_cols, cols=4096),
        entry(exact, rows=4096, cols=4096, depth=4096, rank=64),
        entry({**exact, "num_stages": 4}, rows=4096, cols=4096, depth=4096, rank=64),  # duplicate: skipped
    ))
    assert len(t.errors) == 1 and "same key and bucket as entry 2" in t.errors[0]

    def got(rows, cols, depth, rank, mode=Mode.CONCAT_K, dtypes=BF16_M32, props=H100):
        return tuned.lookup(rows, cols, depth, rank, mode, dtypes, props, table=t)

    blocks, warps, stages = got(*PREFILL[:4])
    assert (blocks["BLOCK_COLS"], warps, stages) == (256, 8, 3)
    assert blocks["BLOCK_RANK"] == 64  # not in the entry: the heuristic's rule (min(depth step, 64, r))
    assert got(3000, 4000, 4096, 33)[0]["BLOCK_COLS"] == 256  # same power-of-two bucket
    assert got(4096, 4096, 4096, 16)[0]["BLOCK_COLS"] == 128  # other rank: the cols-only entry
    assert got(4096, 1024, 4096, 64)[0]["BLOCK_COLS"] == 64  # other cols: the general entry
    assert got(*PREFILL[:4], props=A10) is None  # other architecture
    assert got(*PREFILL[:4], dtypes=F16) is None  # other dtypes
    assert got(40, 4096, 4096, 64) is None  # other regime (mid)
    assert got(4096, 4096, 4096, 0, mode=Mode.PLAIN) is None  # other mode


def test_select_config_honours_an_entry_and_the_env_switches(use_table, monkeypatch):
    cfg = {"BLOCK_ROWS": 64, "BLOCK_COLS": 256, "BLOCK_DEPTH": 32, "BLOCK_RANK": 32, "GROUP_ROWS": 4,
           "num_warps": 8, "num_stages": 5}
    path = use_table(table(entry(cfg, rows=4096, cols=4096)))
    want = ({k: cfg[k] for k in cfg if k.isupper()}, 8, 5)
    assert as_tuple(select_config(*PREFILL, H100)) == want
    heur = heuristic(*PREFILL, H100)
    assert heur != want  # the entry changed something
    # The 16-bit M variant, another architecture, another bucket: the heuristic.
    assert as_tuple(select_config(*PREFILL[:5], (torch.bfloat16,) * 3, H100)) == heuristic(
        *PREFILL[:5], (torch.bfloat16,) * 3, H100)
    assert as_tuple(select_config(*PREFILL, A10)) == heuristic(*PREFILL, A10)
    assert as_tuple(select_config(8192, 4096, 4096, 64, Mode.CONCAT_K, BF16_M32, H100)) == heuristic(
        8192, 4096, 4096, 64, Mode.CONCAT_K, BF16_M32, H100)
    # An override is applied last, over the tuned entry.
    with config_override(BLOCK_COLS=64):
        assert select_config(*PREFILL, H100).kwargs["BLOCK_COLS"] == 64
    # PICA_KERNELS_TUNED=0: the table is not read at all.
    monkeypatch.setenv(tuned.ENV_TUNED, "0")
    assert as_tuple(select_config(*PREFILL, H100)) == heur
    monkeypatch.setenv(tuned.ENV_TUNED, "1")
    assert as_tuple(select_config(*PREFILL, H100)) == want
    # PICA_KERNELS_TUNED_CONFIGS unset: the shipped table (no entry for this launch).
    monkeypatch.delenv(tuned.ENV_TABLE)
    assert tuned.table_path() == tuned.TABLE_PATH
    if not tuned.load_table().matches("sm_90", Mode.CONCAT_K, "prefill", "bf16/bf16/fp32",
                                      tuned.shape_bucket(*PREFILL[:4])):
        assert as_tuple(select_config(*PREFILL, H100)) == heur
    assert path.exists()


def test_an_entry_that_does_not_fit_is_ignored_with_one_warning(use_table):
    big = {"BLOCK_ROWS": 128, "BLOCK_COLS": 128, "BLOCK_DEPTH": 128, "GROUP_ROWS": 8, "num_warps": 8,
           "num_stages": 4}
    small = {"BLOCK_ROWS": 64, "BLOCK_COLS": 64, "BLOCK_DEPTH": 64, "GROUP_ROWS": 8, "num_warps": 4,
             "num_stages": 3}
    smem = estimate_shared_memory({**big, "BLOCK_RANK": 64}, 4, Mode.CONCAT_K, 2, 2, 4, (8, 6))
    assert smem > A10.smem_per_block
    use_table(table(entry(big, arch="sm_86", cols=4096), entry(small, arch="sm_86")))
    with pytest.warns(RuntimeWarning, match=r"tuned config ignored \(entry 0 .*shared memory.*sm_86"):
        cfg = select_config(*PREFILL, A10)
    assert as_tuple(cfg)[1:] == (4, 3) and cfg.kwargs["BLOCK_COLS"] == 64  # the next match is used
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        select_config(*PREFILL, A10)
    # The same entry fits a part with more shared memory of the same architecture: used there.
    roomy = DeviceProps("sm_86 with 227 KB", (8, 6), 227 * 1024, 84)
    big_blocks = {k: v for k, v in big.items() if k.isupper()}
    assert as_tuple(select_config(*PREFILL, roomy)) == ({**big_blocks, "BLOCK_RANK": 64}, 8, 4) != as_tuple(
        select_config(*PREFILL, A10))


def test_a_decode_entry_narrower_than_the_rank_is_ignored(use_table):
    cfg = {"BLOCK_ROWS": 16, "BLOCK_COLS": 64, "BLOCK_DEPTH": 64, "BLOCK_RANK": 32, "GROUP_ROWS": 1,
           "num_warps": 4, "num_stages": 3}
    use_table(table(entry(cfg, mode="DECODE", regime="decode", dtypes="fp16/fp16/fp16")))
    assert select_config(8, 4096, 4096, 32, Mode.DECODE, F16, H100).kwargs["BLOCK_RANK"] == 32  # r = 32: used
    with pytest.warns(RuntimeWarning, match="BLOCK_RANK 32 < r = 64"):
        got = select_config(8, 4096, 4096, 64, Mode.DECODE, F16, H100)
    assert as_tuple(got) == heuristic(8, 4096, 4096, 64, Mode.DECODE, F16, H100)


@pytest.mark.parametrize("bad, why", [
    ({"BLOCK_ROWS": 24}, "power of two"),
    ({"num_warps": 3}, "num_warps"),
    ({"num_stages": 0}, "positive int"),
    ({"BLOCK_M": 16}, "config needs"),
])
def test_bad_entries_are_skipped_and_named(use_table, bad, why):
    good = entry(None, cols=4096)
    broken = entry({**good["config"], **bad}, rows=4096)
    use_table(table(broken, good))
    with pytest.warns(RuntimeWarning, match=rf"1 tuned entries skipped: entry 0: .*{why}"):
        cfg = select_config(*PREFILL, H100)
    assert as_tuple(cfg)[1:] == (8, 5)  # the valid entry is still used


@pytest.mark.parametrize("raw", [
    entry(None, mode="SPLIT"), entry(None, regime="huge"), entry(None, arch="ampere"),
    entry(None, dtypes="bf16"), entry(None, regime="decode"), entry(None, cols=3000),
    {**entry(None), "extra": 1}, {"arch": "sm_90"},
])
def test_schema_of_an_entry(raw):
    with pytest.raises(ValueError):
        tuned.parse_entry(raw, 0)


@pytest.mark.parametrize("obj, why", [
    (table(schema="something.else"), "not a tuned-config table"),
    (table(version=2), "version 2"),
    ("{not json", "Expecting property name"),
    ({"schema": tuned.SCHEMA, "version": tuned.VERSION, "entries": {}}, "must be a list"),
])
def test_an_unusable_table_is_ignored_with_a_warning(use_table, obj, why):
    use_table(obj)
    with pytest.warns(RuntimeWarning, match=why):
        cfg = select_config(*PREFILL, H100)
    assert as_tuple(cfg) == heuristic(*PREFILL, H100)


def test_a_missing_table_warns_and_uses_the_heuristic(use_table, tmp_path, monkeypatch):
    monkeypatch.setenv(tuned.ENV_TABLE, str(tmp_path / "nowhere.json"))
    with pytest.warns(RuntimeWarning, match="nowhere.json cannot be read"):
        assert as_tuple(select_config(*PREFILL, H100)) == heuristic(*PREFILL, H100)


# ----------------------------------------------------------------------------- candidates


@pytest.mark.parametrize("arch", ["sm_75", "sm_86", "sm_90"])
@pytest.mark.parametrize("launch", [
    PREFILL,
    (4096, 64, 4096, 0, Mode.PLAIN, F16),  # the shrink t = x @ P.T (narrow)
    (40, 14336, 4096, 256, Mode.CONCAT_K, F16),  # mid
    (1, 4096, 4096, 64, Mode.DECODE, F16),
    (8, 4096, 14336, 256, Mode.CONCAT_K, BF16_M32),  # the decode-time second launch at r = 256
])
def test_candidates_fit_by_the_shared_memory_model_heuristic_first(arch, launch):
    props = GPU_TABLE[arch]
    if torch.bfloat16 in launch[5] and arch == "sm_75":
        return
    cands = autotune.candidate_configs(*launch, props)
    blocks, warps, stages = heuristic(*launch, props)
    assert cands[0] == {**blocks, "num_warps": warps, "num_stages": stages}
    assert block_rank(launch[4], launch[3], blocks["BLOCK_DEPTH"], blocks["BLOCK_ROWS"]) == blocks["BLOCK_RANK"]  # the heuristic's own rule
    assert len(cands) == len({tuple(sorted(c.items())) for c in cands}) > 1
    for c in cands:
        smem = estimate_shared_memory(c, c["num_stages"], launch[4], *(d.itemsize for d in launch[5]),
                                      props.capability)
        assert smem <= props.smem_per_block, c
        assert c["BLOCK_ROWS"] * c["BLOCK_COLS"] <= autotune.MAX_ACC_PER_THREAD * 32 * c["num_warps"], c
        if launch[4] == Mode.DECODE:
            assert c["BLOCK_RANK"] >= launch[3]
        if launch[1] <= 64 and launch[4] != Mode.DECODE:
            assert c["BLOCK_COLS"] == 64  # narrow: the output width
        with config_override(**c):  # every candidate is a valid override
            pass
    assert autotune.candidate_configs(*launch, props, limit=3) == cands[:3]  # deterministic order
    if arch == "sm_90" and launch is PREFILL:
        assert any(c["num_stages"] == 5 for c in cands)  # 227 KB: deeper pipelines are candidates
        def smem(c):
            return estimate_shared_memory(c, c["num_stages"], Mode.CONCAT_K, 2, 2, 4, (9, 0))

        assert max(map(smem, cands)) > A10.smem_per_block  # the larger part gets larger candidates


# ----------------------------------------------------------------------------- run-time autotuning


@needs_triton
def test_pick_fastest_times_real_launches_and_skips_failing_candidates():
    """pick_fastest over real (interpreter) launches: the pick is the fastest recorded, a candidate that
    cannot run is skipped with its error, and the launch's result is right whichever config ran."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 48, generator=g).to(DEVICE)
    w = torch.randn(48, 36, generator=g).to(DEVICE)
    out = torch.empty(40, 36, device=DEVICE)
    candidates = [
        {"BLOCK_ROWS": 32, "BLOCK_COLS": 32, "BLOCK_DEPTH": 32},
        {"BLOCK_ROWS": 16, "BLOCK_COLS": 16, "BLOCK_DEPTH": 16},
        {"BLOCK_ROWS": 24},  # not a power of two: config_override refuses it
    ]

    def run(c):
        with config_override(**c):
            launchers.launch_lowrank_gemm(out, x, w)

    best, timings = autotune.pick_fastest(candidates, run, lambda fn: autotune.median_ms(fn, reps=3, warmup=0))
    assert [c for c, _ in timings] == candidates
    assert isinstance(timings[2][1], str) and "power of two" in timings[2][1]
    times = [ms for _, ms in timings[:2]]
    assert best == candidates[times.index(min(times))]
    run(best)
    assert max_rel_err(out, x.double() @ w.double()) <= TOLERANCES[torch.float32]
    with pytest.raises(RuntimeError, match="no candidate config ran"):
        autotune.pick_fastest(candidates[2:], run, lambda fn: 0.0)


def test_autotune_remembers_its_choice_per_key(monkeypatch):
    monkeypatch.setattr(autotune, "AUTOTUNED", {})
    runs = []
    fake_ms = {16: 2.0, 32: 1.0, 64: 3.0}  # deterministic timings: the choice logic, not the clock

    def run(c):
        runs.append(c["BLOCK_ROWS"])

    monkeypatch.setattr(autotune, "median_ms", lambda fn, **kw: (fn(), fake_ms[runs[-1]])[1])
    cands = [{"BLOCK_ROWS": r} for r in (16, 32, 64)]
    assert autotune.autotune(("k",), cands, run, cuda=False) == {"BLOCK_ROWS": 32}
    n = len(runs)
    assert autotune.autotune(("k",), cands[::-1], run, cuda=False) == {"BLOCK_ROWS": 32}  # cached: no runs
    assert autotune.autotune(("k",), lambda: pytest.fail("not called when cached"), run) == {"BLOCK_ROWS": 32}
    assert len(runs) == n
    assert autotune.autotune(("k2",), lambda: cands[2:], run, cuda=False) == {"BLOCK_ROWS": 64}  # made lazily
    assert autotune.autotune_enabled() is False  # off unless PICA_KERNELS_AUTOTUNE=1
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    assert autotune.autotune_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="run-time autotuning times launches on a CUDA device")
def test_autotune_on_a_gpu_gives_the_reference_result(monkeypatch):
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    monkeypatch.setattr(autotune, "AUTOTUNED", {})
    monkeypatch.setattr(autotune, "AUTOTUNE_CANDIDATES", 4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 1024, generator=g).to("cuda", torch.bfloat16)
    w = (torch.randn(1024, 1024, generator=g) / 32).to("cuda", torch.bfloat16)
    basis = torch.linalg.qr(torch.randn(1024, 64, generator=g)).Q.T.contiguous().to("cuda", torch.bfloat16)
    m = (torch.randn(1024, 64, generator=g) * 0.1).to("cuda")
    y = pica_linear(x, w, None, basis, m, backend="triton")
    want = reference.pica_linear(x.float(), w.float(), None, basis.float(), m, "input")
    assert len(autotune.AUTOTUNED) == 2  # the shrink and the concatenated-K GEMM
    assert float((y.float() - want).abs().max() / want.abs().max().clamp_min(1)) <= TOLERANCES[torch.bfloat16]


# ----------------------------------------------------------------------------- safety net: CUDA launch refusal


class _RaisingKernel:
    """Stands in for the jitted kernel: every launch raises ``error`` (the CUDA driver's refusal cannot be
    provoked on a CPU)."""

    def __init__(self, error):
        self.error, self.launches = error, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise self.error

        return launch


@needs_triton
def test_too_many_resources_requested_for_launch_falls_back(monkeypatch):
    monkeypatch.setenv(launchers.STRICT_ENV_VAR, "0")
    launchers.reset_fallbacks()
    refusal = RuntimeError("Triton Error [CUDA]: too many resources requested for launch")
    monkeypatch.setattr(launchers.kernel_module(), "lowrank_gemm_kernel", _RaisingKernel(refusal))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(20, 40, generator=g).to(DEVICE), torch.randn(36, 40, generator=g).to(DEVICE)
    basis, m = torch.randn(6, 40, generator=g).to(DEVICE), torch.randn(36, 6, generator=g).to(DEVICE)
    try:
        with pytest.warns(RuntimeWarning, match="too many resources requested for launch"):
            y = pica_linear(x, w, None, basis, m, backend="triton")
        # Bit for bit against what the fallback runs (the custom op's reference branch: reference.lowrank_forward
        # with M and the basis as the factors); eager backend="reference" may take another route (merged W).
        assert torch.equal(y, reference.lowrank_forward(x, w, None, m, basis)[0])
        assert launchers.FALLBACK_SHAPE_CLASSES
        # Strict mode raises; any other RuntimeError is a bug and propagates as itself.
        launchers.reset_fallbacks()
        monkeypatch.setenv(launchers.STRICT_ENV_VAR, "1")
        with pytest.raises(RuntimeError, match="PICA_KERNELS_STRICT=1"):
            pica_linear(x, w, None, basis, m, backend="triton")
        monkeypatch.setenv(launchers.STRICT_ENV_VAR, "0")
        monkeypatch.setattr(launchers.kernel_module(), "lowrank_gemm_kernel",
                            _RaisingKernel(RuntimeError("an unrelated bug")))
        with pytest.raises(RuntimeError, match="^an unrelated bug$"):
            pica_linear(x, w, None, basis, m, backend="triton")
        assert launchers.FALLBACK_SHAPE_CLASSES == {}
    finally:
        launchers.reset_fallbacks()
