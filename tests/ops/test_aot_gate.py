"""The ahead-of-time compile gate (pica_kernels/ops/kernels/aot.py): no GPU needed.

* The gate's argument specialisation is Triton's own: for real launches (run here under the CPU
  interpreter, their arguments intercepted), the binder's specialisation of the real tensors equals the
  gate's, which it computes from launches recorded on ``meta`` tensors -- including a misaligned
  pointer (an ``x`` that starts 4 bytes into its storage), an integer equal to 1 and divisible-by-16 integers.
* The largest tile of every (architecture, regime) compiles for all seven architectures and passes the
  gate's checks (in a subprocess: the kernels are decorated once per process, in compiler mode there).
* docs/kernels.md was produced from the current kernel source and configs (its recorded hash).
"""

from __future__ import annotations

import json
import types

import pytest
import torch
from kernel_helpers import poison_kernel_outputs  # noqa: F401  (autouse: unwritten outputs are NaN)

pytest.importorskip("triton")

from pica_kernels.ops import grouped  # noqa: E402
from pica_kernels.ops.kernels import aot, launchers, padding  # noqa: E402
from pica_kernels.ops.kernels.configs import GPU_TABLE  # noqa: E402


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
        grouped._grouped_triton(meta[0], [w.to("meta") for w in weights], [bb.to("meta") for bb in biases],
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
