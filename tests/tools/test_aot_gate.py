"""The ahead-of-time compile gate (tools/aot.py): no GPU needed.

* The gate's argument specialisation is Triton's own: for real launches (run here under the CPU
  interpreter, their arguments intercepted), the binder's specialisation of the real tensors equals the
  gate's, which it computes from launches recorded on ``meta`` tensors -- including a misaligned
  pointer (an ``x`` that starts 4 bytes into its storage), an integer equal to 1 and divisible-by-16 integers.
* The largest tile of every (architecture, regime) compiles for all seven architectures and passes the
  gate's checks (in a subprocess: the kernels are decorated once per process, in compiler mode there).
* docs/kernels.md was produced from the current sources of every file that decides a launch (its
  recorded hash), its sweep covers both PiCa sides, and every per-regime maximum it shows is the maximum
  of the recorded compiles; the configs' shared-memory estimate matches what those compiles allocate.
* The gate fails on planted bad configs: an output-side config that spills, an fp32-output (dM) class
  over the shared-memory limit; and the class key keeps every pointer's dtype (the fp32 output of dM is
  compiled as its own kernel).
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import types

import pytest
import torch

from tests.ops.kernel_helpers import poison_kernel_outputs  # noqa: F401  (autouse: unwritten outputs are NaN)

pytest.importorskip("triton")

from pica_kernels.ops import grouped  # noqa: E402
from pica_kernels.ops.kernels import launchers, padding  # noqa: E402
from pica_kernels.ops.kernels.configs import GPU_TABLE, Mode, estimate_shared_memory  # noqa: E402
from tools import aot  # noqa: E402


def test_docs_kernels_md_matches_current_kernel_source_and_configs():
    recorded = aot.recorded_hash()
    assert recorded is not None, "docs/kernels.md (or its hash line) is missing: run `make aot`"
    assert recorded == aot.source_hash(), (
        "docs/kernels.md was produced from another kernel source / configs: rerun `make aot` and commit it")
    text = aot.DEFAULT_MARKDOWN.read_text()
    for arch in aot.ARCHS:
        assert f"### {arch} " in text, f"no resource table for {arch} in docs/kernels.md"
    report = json.loads(aot.DEFAULT_JSON.read_text())
    assert report["source_hash"] == recorded
    assert set(aot.OPS) <= set(report["sweep"]["ops"]), "the recorded sweep is not the default one"
    assert {op for spec in report["specs"] for op in spec["ops"]} >= {"forward/output", "backward/output"}
    assert report["failures"] == [], "the full sweep has failures: fix them or record them in aot.KNOWN_FAILURES"
    # Every exemption is still needed (a known failure that disappeared must leave aot.KNOWN_FAILURES).
    seen = {k for spec in report["specs"] for k in aot.known(aot.Spec(**_spec_fields(spec)))}
    assert seen == set(aot.KNOWN_FAILURES)


def _spec_fields(d: dict) -> dict:
    return dict(arch=d["arch"], mode=d["mode"], regime=d["regime"], dtypes=tuple(d["dtypes"]), config=d["config"],
                estimate=d["estimate"], args=(), constexprs=d["constexprs"], ops=set(d["ops"]), example=d["example"],
                result=d["result"])


def _intercepted_launches(monkeypatch, fn):
    """Run ``fn`` with the real (interpreted) kernel, recording each launch's (args, constexprs)."""
    real = launchers.kernel_module()
    seen = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((args, dict(kwargs)))
                return real.lowrank_gemm_kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(launchers, "kernel_module",
                        lambda: types.SimpleNamespace(INTERPRETED=real.INTERPRETED, lowrank_gemm_kernel=Spy()))
    out = fn()
    return seen, out


def test_gate_specialisation_equals_the_jit_binder_on_real_launches(monkeypatch):
    """Grouped q/k/v forward at r = 1 (run padded to 16) on an x that starts 4 bytes into its storage."""
    torch.manual_seed(0)
    T, n_in, outs, ranks = 8, 48, [32, 32, 32], [1, 1, 1]
    # A contiguous view 4 bytes into its storage: no 16-byte hint on x's pointer. (Ranks are padded to
    # slots of 16 now, so the t slices are aligned and no longer give the test its misaligned pointers.)
    x = torch.randn(T * n_in + 1)[1:].view(T, n_in)
    weights = [torch.randn(o, n_in) for o in outs]
    biases = [torch.randn(o) for o in outs]
    a = [torch.randn(o, r) for o, r in zip(outs, ranks)]
    b_cat = torch.randn(sum(ranks), n_in)
    real, ys = _intercepted_launches(
        monkeypatch, lambda: grouped.grouped_lowrank_linear(x, weights, biases, a, b_cat, ranks, backend="triton"))
    monkeypatch.undo()
    ref = [torch.nn.functional.linear(x, w, bias) + (x @ b_cat[i:i + 1].T) @ ai.T
           for i, (w, bias, ai) in enumerate(zip(weights, biases, a))]
    for y, r in zip(ys, ref):
        torch.testing.assert_close(y, r, atol=1e-4, rtol=1e-4)

    # The gate's way: the same launches recorded on meta tensors (config from the same select_config: this
    # process is interpreted, so both sides get the interpreter's blocks; depth < 8 steps: no split-K).
    sink = []
    meta = [torch.empty(T * n_in + 1, device="meta")[1:].view(T, n_in), b_cat.to("meta")]  # x's offset too
    with launchers.recording_launches(GPU_TABLE["sm_86"], sink):
        launchers.triton_grouped_forward(meta[0], [w.to("meta") for w in weights], [bb.to("meta") for bb in biases],
                                         [ai.to("meta") for ai in a], meta[1], ranks, padding.RANK_ALIGN)
    assert len(sink) == len(real) == 4  # one shrink + three concatenated-K GEMMs
    cc = aot.capability("sm_86")
    misaligned = ones = divisible = 0
    for (real_args, real_kw), (_grid, meta_args, meta_kw) in zip(real, sink):
        assert real_kw == meta_kw
        jit = aot.bind(cc, real_args, real_kw)  # the binder on the real tensors (real addresses)
        gate = aot.bind(cc, aot.describe_args(meta_args), meta_kw)
        assert gate[0] == jit[0], "the gate's specialisation differs from the JIT binder's"
        assert aot.specialise(cc, aot.describe_args(meta_args), meta_kw) == aot.specialise(cc, real_args, real_kw)
        spec = jit[3]
        misaligned += sum(s[0].startswith("*") and s[1] != "D" for s in spec)
        ones += sum(s == ("constexpr", 1) for s in spec[:len(real_args)])
        divisible += sum(s[0] == "i32" and s[1] == "D" for s in spec)
    # The comparison covers each kind of hint: pointers without the 16-byte hint, ==1 constants, /16 ints.
    assert misaligned >= 2 and ones > 0 and divisible > 0


def test_unhinted_compile_is_a_different_kernel():
    """Why the binder matters: dropping the divisibility hints changes the compiled kernel (sm_86 decode)."""
    pytest.importorskip("triton.backends.nvidia")
    sink = aot.record("sm_86", aot.Point("forward/input", "fp16", 4096, 4096, 64, 1, False))
    (_grid, args, cexprs), = sink  # T = 1, r = 64: the one-launch decode form
    desc = aot.describe_args(args)
    options, signature, constexprs, attrs = aot.specialise(86, desc, cexprs)
    assert attrs and all(v == [["tt.divisibility", 16]] for v in attrs.values() if v)
    unaligned = tuple(("tensor", v[1], v[2] + 2) if isinstance(v, tuple) else v for v in desc)
    assert aot.bind(86, unaligned, cexprs)[0] != aot.bind(86, desc, cexprs)[0]


def test_largest_tile_of_every_architecture_and_regime_compiles_and_fits(tmp_path):
    out = tmp_path / "gate.json"
    proc = aot.run_subprocess("--largest", "--quiet", *aot.TEST_SWEEP_ARGS, "--json", str(out), timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["source_hash"] == aot.source_hash()
    groups = {(row["arch"], row["group"].split()[0]) for row in report["summary"]}
    for arch in aot.ARCHS:
        regimes = {g for a, g in groups if a == arch}
        assert {"decode", "small", "mid", "prefill", "narrow-small", "narrow-prefill"} <= regimes, (arch, regimes)
    for spec in report["specs"]:
        result = spec["result"]
        assert "error" not in result, (spec["arch"], spec["example"], result)
        assert result["shared"] <= GPU_TABLE[spec["arch"]].smem_per_block, spec
        assert result["registers"] and result["mma"]
    assert report["failures"] == [], "\n".join(report["failures"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_source_hash_covers_every_file_that_decides_a_launch(tmp_path):
    """docs/kernels.md goes stale (the test above fails) when the kernel, the launchers, the configs, the
    rank padding or the tuned-config table changes, e.g. DECODE_MAX_R in launchers.py."""
    src = aot.KERNELS_DIR
    assert {"lowrank_gemm.py", "launchers.py", "configs.py", "padding.py", "tuned_configs.json"} <= set(
        aot.HASHED_SOURCES)
    for name in aot.HASHED_SOURCES:
        shutil.copy(src / name, tmp_path / name)
    assert aot.source_hash(tmp_path) == aot.source_hash()
    text = (tmp_path / "launchers.py").read_text()
    assert "DECODE_MAX_R = 64" in text
    (tmp_path / "launchers.py").write_text(text.replace("DECODE_MAX_R = 64", "DECODE_MAX_R = 256"))
    assert aot.source_hash(tmp_path) != aot.source_hash()
    for name in aot.HASHED_SOURCES:
        shutil.copy(src / name, tmp_path / name)
        before = aot.source_hash(tmp_path)
        (tmp_path / name).write_bytes((src / name).read_bytes() + b"\n")
        assert aot.source_hash(tmp_path) != before, name


def test_class_key_keeps_the_output_dtype():
    """s = dy @ A (16-bit output) and dA = dy.T @ t (fp32 output) share mode, operand dtypes and (here, the
    interpreter's blocks) config: the fp32-output kernel is still its own class, so the gate compiles it."""
    specs = aot.collect([("sm_86", aot.Point("backward/input", "fp16", 64, 64, 16, 64, False))])
    plain = [s for s in aot.representatives(specs).values() if s.mode == "plain"]
    assert {s.out_dtype for s in plain} == {"float16", "float32"}
    assert len({(s.dtypes, tuple(sorted(s.config.items()))) for s in plain}) == 1  # the same GEMM otherwise
    assert all(len(s.pointers) == 9 for s in plain)


#: 128 x 256 fp32 accumulators over 128 threads: 256 registers each, above the 255 a thread has.
SPILLING = {"BLOCK_ROWS": 128, "BLOCK_COLS": 256, "BLOCK_DEPTH": 32, "BLOCK_RANK": 16, "GROUP_ROWS": 1,
            "num_warps": 4, "num_stages": 2}
#: 3 x (128 x 128 + 128 x 128) x 2 B = 196,608 B of pipeline buffers: above sm_86's 101,376 B.
OVERSIZE = {"BLOCK_ROWS": 128, "BLOCK_COLS": 128, "BLOCK_DEPTH": 128, "BLOCK_RANK": 16, "GROUP_ROWS": 8,
            "num_warps": 8, "num_stages": 4}


def test_gate_fails_on_planted_output_side_spill_and_fp32_output_class_over_the_limit(tmp_path):
    plants = [{"when": {"op": "backward/output", "mode": "PLAIN", "out": "float32"}, "config": SPILLING},
              {"when": {"op": "backward/input", "mode": "PLAIN", "out": "float32"}, "config": OVERSIZE}]
    out = tmp_path / "planted.json"
    proc = aot.run_subprocess("--quiet", "--archs", "sm_86", "--variants", "fp16", "--sizes", "1024", "--ranks", "16",
                              "--tokens", "64", "--ops", "backward/input,backward/output", "--plant",
                              json.dumps(plants), "--json", str(out), timeout=1800)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 1, "the gate passed planted bad configs"
    specs = json.loads(out.read_text())["specs"]
    planted = {"spill": [], "shared": []}
    for spec in specs:
        config = {k: v for k, v in spec["config"].items()}
        if config == {**config, **SPILLING}:
            planted["spill"].append(spec)
            assert spec["pointers"][6] == "float32" and "backward/output" in spec["ops"]
            assert any("register spills" in f for f in spec["failures"]), spec
        elif config == {**config, **OVERSIZE}:
            planted["shared"].append(spec)
            assert spec["pointers"][6] == "float32" and "backward/input" in spec["ops"]
            assert any("shared memory" in f and "> 101376 B" in f for f in spec["failures"]), spec
        else:  # the launches not planted pass
            assert spec["failures"] == [], spec
    assert planted["spill"] and planted["shared"], [s["config"] for s in specs]


def _md_tables(text: str) -> dict:
    """{(arch, group): {column: cell}} of docs/kernels.md's per-architecture resource tables."""
    rows, arch, header = {}, None, None
    for line in text.splitlines():
        m = re.match(r"### (sm_\d+) ", line)
        if m:
            arch, header = m.group(1), None
            continue
        if arch and line.startswith("| regime "):
            header = [c.strip() for c in line.strip("|").split("|")]
        elif arch and header and line.startswith("| ") and not line.startswith("|---"):
            cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            rows[(arch, cells["regime"])] = cells
        elif not line.strip():  # a table ends at a blank line
            header = None
    return rows


def test_every_regime_maximum_in_docs_equals_the_recorded_compiles():
    """Each row of docs/kernels.md's tables against the specs recorded in kernels_aot.json (not its summary)."""
    report = json.loads(aot.DEFAULT_JSON.read_text())
    want = collections.defaultdict(lambda: {"compiles": 0, "launches": 0, "shared": 0, "regs": 0, "spill": 0})
    for spec in report["specs"]:
        row = want[(spec["arch"], f"{spec['regime']} {spec['mode']}")]
        row["compiles"] += 1
        row["launches"] += spec["launches"]
        r = spec["result"]
        row["shared"] = max(row["shared"], r.get("shared", 0))
        row["regs"] = max(row["regs"], r.get("registers") or 0)
        row["spill"] = max(row["spill"], r.get("spill_bytes") or 0)
    docs = _md_tables(aot.DEFAULT_MARKDOWN.read_text())
    assert set(docs) == set(want)
    for key, w in want.items():
        d = docs[key]
        assert int(d["max shared (B)"]) == w["shared"], (key, d, w)
        assert int(d["max regs"]) == w["regs"], (key, d, w)
        assert int(re.search(r"\((\d+)\)", d["kernels spilling (max B)"]).group(1)) == w["spill"], (key, d, w)
        assert int(d["compiles"]) == w["compiles"] and int(d["launches"]) == w["launches"], (key, d, w)


def test_shared_memory_estimate_matches_what_triton_allocates():
    """configs.estimate_shared_memory (as it is now) against every recorded compile's metadata.shared: never
    below it, and within 5 % of it for the largest kernel of every (architecture, mode) -- the configs fit
    the memory that exists, not a pessimistic model of it (sm_75, whose FMA dots stage less, aside)."""
    report = json.loads(aot.DEFAULT_JSON.read_text())
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4}
    best = collections.defaultdict(float)
    for spec in report["specs"]:
        shared = spec["result"].get("shared")
        if shared is None:
            continue
        est = estimate_shared_memory(spec["config"], spec["config"]["num_stages"], Mode[spec["mode"].upper()],
                                     *(itemsize[d] for d in spec["dtypes"]), GPU_TABLE[spec["arch"]].capability)
        assert shared <= est, (spec["arch"], spec["example"], spec["config"], shared, est)
        best[(spec["arch"], spec["mode"])] = max(best[(spec["arch"], spec["mode"])], shared / est)
    loose = {k: round(v, 3) for k, v in best.items() if v < 0.95 and k[0] != "sm_75"}
    assert not loose, f"the estimate is far above the compiles' shared memory: {loose}"
