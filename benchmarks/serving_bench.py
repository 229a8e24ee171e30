"""Multi-adapter serving: one batch whose sequences use N different adapters, PiCa ``mixed_batch`` vs PEFT LoRA.

    python benchmarks/serving_bench.py              # -> benchmarks/results/serving.json and serving.md (make bench-serving)
    python benchmarks/serving_bench.py --ns 1,16 --threads 1 --rounds 3
    python benchmarks/serving_bench.py --tiny --rounds 1 --out /tmp/x   # random tiny Llama, seconds (the smoke test)

Model: the real SmolLM2-135M-Instruct (``pica_kernels.registry_models.load_smollm2``, float32, eval, no grad).
One request = one prefill forward of a batch of ``--batch`` sequences x ``--seq`` tokens (random token ids, seeded)
with ``logits_to_keep=1`` (a server computes the logits of the last position only; the full vocabulary projection
of every token would dilute every adapter's cost alike). Sequence i uses adapter ``i % N``.

Methods, all targeting the same layers (q_proj, k_proj, v_proj, up_proj, down_proj; the project default) at the
same rank r (default 32, the project default):

- ``frozen``: the base model alone, the floor;
- ``pica``: ``apply_pica`` (input side, M shared per role: the project default) called ``max(ns)`` times, one
  adapter each; the adapters share each layer's basis P, so a mixed batch computes ``x @ P.T`` once for all
  sequences (``pica_kernels.mixed_batch(model, names)`` around the forward);
- ``lora``: PEFT ``get_peft_model`` + ``add_adapter`` up to ``max(ns)`` LoRA adapters
  (``LoraConfig(r, lora_alpha=r, lora_dropout=0)``), served with ``model(..., adapter_names=names)`` (PEFT's mixed
  batch: per adapter, gather its sequences, A then B, scatter-add).

Every adapter has non-zero, seeded random weights (PiCa's M, LoRA's B; LoRA's A keeps PEFT's random init), so no
path can skip its term; the script checks that each method's output differs from the frozen model's.

Threads (decided here): intra-op parallelism is set to 1 thread (``torch.set_num_threads(1)``, also in each worker
thread). ``threads=1``: one request at a time. ``threads=2``: two concurrent requests, each its own batch (other
token ids, the same adapter assignment), each in its own Python thread with one intra-op thread, started together
(a barrier); the sample is the wall time until both are done and the throughput counts both batches' tokens. This
is how a CPU server uses two cores for independent requests; it also exposes the GIL (both methods run Python per
layer, PEFT per adapter and layer). A 2-thread PiCa request enters its own ``mixed_batch`` and waits for the other
request before leaving it (a barrier inside the block), so a selection written onto shared layers -- the state
design before issue 21's -- cannot be reset under the other request; the run checks each thread's output against
the 1-thread output of the same batch.

Timing: one round runs every cell -- (method, N, threads), frozen once per thread count -- once, in a freshly
shuffled order (harness.Interleaved's protocol); ``--rounds`` rounds after one untimed warm-up forward per cell.
Per cell: median wall time and median process CPU time (both threads' CPU in the 2-thread case); tokens/s =
tokens of the sample / median wall time; overhead = median over rounds of (cell time / frozen time of the same
round and thread count) - 1, on each clock. The 1-minute load average is recorded before every round.

Peak memory: one extra 1-thread forward per cell under ``torch.profiler`` with ``profile_memory=True``, the
maximum of the running sum of the CPU allocator's allocation (+bytes) and free (-bytes) events above the level
before the forward (harness.peak_bytes' method). The profiler logs the thread that runs it only (and with
``profile_all_threads`` torch 2.13 logs no memory events at all), so a 2-thread row reports the sum of the two
requests' own peaks (each equal to the 1-thread peak of the same shapes): the bound when both peak together. tracemalloc sees only Python's allocator, not torch's; a
process RSS delta depends on whether glibc hands memory freed by an earlier forward back to the OS, so it measures
the allocator's history more than the request. Also recorded: the resident bytes each method adds to the model
(bases + the adapters' parameters).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
METHODS = ("frozen", "pica", "lora")
RESULT_NAME = "serving"


# ------------------------------------------------------------------- models
def tiny_llama(seed: int = 0):
    """A random 2-layer Llama (hidden 64, kv heads 2): the smoke test's model."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return tf.LlamaForCausalLM(cfg).eval()


def adapter_names(n: int) -> list[str]:
    return [f"a{i}" for i in range(n)]


def build_pica(base, n: int, rank: int, seed: int):
    import pica_kernels as pk

    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    for name in adapter_names(n):
        pk.apply_pica(model, pk.PiCaConfig(rank=rank, target_modules=TARGETS), adapter_name=name, progress=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.pica_bank.parameters():  # every M of every adapter: non-zero, distinct
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval(), time.perf_counter() - t0


def build_lora(base, n: int, rank: int, seed: int):
    from peft import LoraConfig, get_peft_model

    def cfg():
        return LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS)

    t0 = time.perf_counter()
    torch.manual_seed(seed)  # PEFT's kaiming init of A
    names = adapter_names(n)
    model = get_peft_model(copy.deepcopy(base), cfg(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, cfg())
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:  # zero by default: the update would vanish
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval(), time.perf_counter() - t0


def added_bytes(model, base) -> int:
    """Bytes of parameters and buffers ``model`` holds beyond ``base``'s (bases, M, LoRA A/B)."""

    def total(m):
        seen = {}
        for t in list(m.parameters()) + list(m.buffers()):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())

    return total(model) - total(base)


# ------------------------------------------------------------------ forwards
def request_fn(method: str, model, ids: torch.Tensor, names: list[str] | None):
    """One prefill forward of ``ids`` (batch, seq); returns the last position's logits (batch, vocab)."""
    import pica_kernels as pk

    def run(barrier: threading.Barrier | None = None):
        with torch.no_grad():
            if method == "pica":
                with pk.mixed_batch(model, names):
                    out = model(input_ids=ids, logits_to_keep=1).logits
                    if barrier is not None:  # leave the block only when the other request is done too
                        barrier.wait()
            elif method == "lora":
                out = model(input_ids=ids, logits_to_keep=1, adapter_names=names).logits
            else:
                out = model(input_ids=ids, logits_to_keep=1).logits
        return out[:, -1]

    return run


def run_cell(fns, threads: int) -> tuple[float, float, list[torch.Tensor]]:
    """Run one sample: ``fns[0]()`` alone, or ``fns[0]`` and ``fns[1]`` in two threads started together.
    Returns (wall s, process CPU s, outputs)."""
    if threads == 1:
        w0, c0 = time.perf_counter(), time.process_time()
        out = fns[0]()
        return time.perf_counter() - w0, time.process_time() - c0, [out]
    start = threading.Barrier(threads + 1)
    inside = threading.Barrier(threads)
    outs: list = [None] * threads
    errors: list = []

    def worker(i):
        torch.set_num_threads(1)
        start.wait()
        try:
            outs[i] = fns[i](inside)
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller
            errors.append(e)
            inside.abort()

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    start.wait()
    w0, c0 = time.perf_counter(), time.process_time()
    for t in ts:
        t.join()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    if errors:
        raise errors[0]
    return wall, cpu, outs


def peak_bytes(fn) -> int:
    """High-water mark of the torch CPU allocator while ``fn()`` runs in this thread, above the level before.

    harness.peak_bytes' method. The profiler logs the allocations of the thread that runs it only (with
    ``profile_all_threads`` torch 2.13 logs none), so a request is profiled alone in this thread."""
    from benchmarks import harness as H

    return H.peak_bytes(fn, torch.device("cpu"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------- run
def run(args) -> dict:
    from benchmarks import harness as H

    ns = sorted({int(v) for v in args.ns.split(",")})
    thread_counts = sorted({int(v) for v in args.threads.split(",")})
    if args.batch < max(ns):
        raise SystemExit(f"--batch {args.batch} < N = {max(ns)}: every adapter needs a sequence")
    torch.set_num_threads(1)
    load_before = list(os.getloadavg())
    t0 = time.perf_counter()
    if args.tiny:
        base, model_name = tiny_llama(args.seed), "random tiny Llama (2 layers, hidden 64)"
    else:
        from pica_kernels.registry_models import load_smollm2

        base, model_name = load_smollm2()[0], "SmolLM2-135M-Instruct"
    base = base.eval().requires_grad_(False)  # float32 (load_smollm2 and the tiny model both)
    load_s = time.perf_counter() - t0
    pica, pica_s = build_pica(base, max(ns), args.rank, args.seed)
    lora, lora_s = build_lora(base, max(ns), args.rank, args.seed)
    models = {"frozen": base, "pica": pica, "lora": lora}
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen) for _ in range(max(thread_counts))]

    # Cells: (method, N, threads); frozen does not depend on N (one cell per thread count, N = 0).
    cells = [("frozen", 0, t) for t in thread_counts]
    cells += [(m, n, t) for t in thread_counts for n in ns for m in ("pica", "lora")]

    def fns(cell):
        method, n, threads = cell
        names = None if method == "frozen" else [adapter_names(n)[i % n] for i in range(args.batch)]
        return [request_fn(method, models[method], batches[i], names) for i in range(threads)]

    # Warm-up, correctness checks and peak memory (untimed).
    print(f"{model_name}: load {load_s:.1f} s, PiCa x{max(ns)} {pica_s:.1f} s, LoRA x{max(ns)} {lora_s:.1f} s",
          flush=True)
    reference_out, checks, peaks = {}, [], {}
    for cell in cells:
        _, _, outs = run_cell(fns(cell), cell[2])
        if cell[2] == 1:
            reference_out[cell[:2]] = outs[0]
    for cell in cells:
        method, n, threads = cell
        if threads == 1:
            holder = {}
            f = fns(cell)
            peaks[cell] = peak_bytes(lambda f=f, holder=holder: holder.setdefault("r", run_cell(f, 1)))
            outs = holder["r"][2]
        else:  # each request's allocations are its own (the model is shared): the sum of their peaks, each
            # request's equal to the 1-thread peak of the same shapes where that was measured
            one = peaks.get((method, n, 1))
            peaks[cell] = threads * one if one is not None else sum(peak_bytes(f) for f in fns(cell))
            _, _, outs = run_cell(fns(cell), threads)
        ref = reference_out.get((method, n))
        if ref is not None:
            diff = float((outs[0] - ref).abs().max())
            checks.append({"check": f"{method} N={n} {threads} thread(s): request 0 equals the 1-thread output",
                           "held": diff <= 1e-4 * max(1.0, float(ref.abs().max())), "max_abs_diff": diff})
        if method != "frozen" and ("frozen", 0) in reference_out:
            frozen_ref = reference_out[("frozen", 0)]
            d = float((outs[0] - frozen_ref).abs().max())
            checks.append({"check": f"{method} N={n} {threads} thread(s): the adapters change the output",
                           "held": d > 1e-4, "max_abs_diff_to_frozen": d})
        print(f"  {method:6s} N={n:<3d} threads={threads}: peak {peaks[cell] / 2**20:.1f} MiB", flush=True)
    # Distinct adapters give distinct outputs (N > 1): the mixed batch really mixes.
    for method in ("pica", "lora"):
        nmax = max(ns)
        if nmax > 1:
            out = reference_out[(method, nmax)]
            n_mix = min(nmax, args.batch)
            one = reference_out[(method, min(ns))] if min(ns) == 1 else None
            if one is not None:
                d = float((out[1:n_mix] - one[1:n_mix]).abs().max())
                checks.append({"check": f"{method}: N={nmax} differs from N=1 on sequences 1..{n_mix - 1}",
                               "held": d > 1e-4, "max_abs_diff": d})

    # Timed rounds.
    rng = random.Random(args.seed)
    samples = {c: {"wall": [], "cpu": []} for c in cells}
    loads = []
    t_rounds = time.perf_counter()
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        order = list(cells)
        rng.shuffle(order)
        for cell in order:
            wall, cpu, _ = run_cell(fns(cell), cell[2])
            samples[cell]["wall"].append(wall)
            samples[cell]["cpu"].append(cpu)
        print(f"  round {r + 1}/{args.rounds} done ({time.perf_counter() - t_rounds:.0f} s, load {loads[-1]:.2f})",
              flush=True)

    rows = []
    for t in thread_counts:
        base_cell = ("frozen", 0, t)
        for n in ns:
            for method in METHODS:
                cell = base_cell if method == "frozen" else (method, n, t)
                s = samples[cell]
                wall, cpu = statistics.median(s["wall"]), statistics.median(s["cpu"])
                tokens = args.batch * args.seq * t
                row = {"n": n, "threads": t, "method": method, "tokens_per_sample": tokens,
                       "tokens_per_s": tokens / wall, "wall_median_s": wall, "cpu_median_s": cpu,
                       "wall_min_s": min(s["wall"]), "rounds": len(s["wall"]), "peak_bytes": peaks[cell],
                       "samples_wall_s": s["wall"], "samples_cpu_s": s["cpu"]}
                for clock in ("wall", "cpu"):
                    row[f"overhead_{clock}"] = statistics.median(
                        a / b for a, b in zip(s[clock], samples[base_cell][clock])) - 1
                rows.append(row)

    goals = goal_checks(rows, ns, thread_counts)
    return {
        "meta": {
            "command": "python benchmarks/serving_bench.py " + " ".join(args.argv),
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "model": model_name, "batch": args.batch, "seq": args.seq, "rank": args.rank, "targets": TARGETS,
            "ns": ns, "threads": thread_counts, "rounds": args.rounds, "seed": args.seed,
            "intra_op_threads_per_request": 1, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "peft": _version("peft"), "transformers": _version("transformers"),
            "loadavg_before": load_before, "loadavg_after": list(os.getloadavg()), "loadavg_1min_per_round": loads,
            "load_s": load_s, "pica_apply_s": pica_s, "lora_apply_s": lora_s,
            "rounds_s": time.perf_counter() - t_rounds,
            "added_bytes": {"pica": added_bytes(pica, base), "lora": added_bytes(lora, base)},
            "adapters_loaded": max(ns),
            "harness_rank_default": H.RANK,
        },
        "checks": checks,
        "goals": goals,
        "rows": rows,
    }


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except ImportError:
        return None


def goal_checks(rows: list[dict], ns: list[int], thread_counts: list[int]) -> list[dict]:
    """PiCa's overhead over frozen <= LoRA's at N = 1, <= half of LoRA's for N >= 16, per thread count and clock."""
    by = {(r["n"], r["threads"], r["method"]): r for r in rows}
    out = []
    for t in thread_counts:
        for n in ns:
            if n != 1 and n < 16:
                continue
            factor = 1.0 if n == 1 else 0.5
            for clock in ("wall", "cpu"):
                p, lo = by[(n, t, "pica")][f"overhead_{clock}"], by[(n, t, "lora")][f"overhead_{clock}"]
                out.append({"n": n, "threads": t, "clock": clock, "pica": p, "lora": lo, "limit": factor * lo,
                            "held": p <= factor * lo})
    return out


# ----------------------------------------------------------------- markdown
def mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def markdown(res: dict) -> str:
    m = res["meta"]
    la = lambda v: " / ".join(f"{x:.2f}" for x in v)  # noqa: E731
    per_round = m["loadavg_1min_per_round"]
    lines = [
        f"# Multi-adapter serving: PiCa mixed_batch vs PEFT LoRA adapter_names ({m['model']})", "",
        f"Measured {m['date_utc']} by `{m['command'].strip()}`; {m['cpu_model']} ({m['cpu_count']} cores), "
        f"torch {m['torch']}, peft {m['peft']}, transformers {m['transformers']}, float32, no grad.",
        f"**Shared machine**: other jobs ran on the same cores; load average {la(m['loadavg_before'])} before, "
        f"{la(m['loadavg_after'])} after (1/5/15 min); 1-minute load at the start of each round: "
        f"{', '.join(f'{x:.2f}' for x in per_round)}.", "",
        f"Request: one prefill of {m['batch']} sequences x {m['seq']} tokens (logits of the last position only); "
        f"sequence i uses adapter i mod N; {m['adapters_loaded']} adapters loaded per method; rank {m['rank']} on "
        f"{', '.join(m['targets'])}. PiCa: input side, M shared per role, the basis shared by all adapters, "
        f"`with pica_kernels.mixed_batch(model, names)`. LoRA: PEFT `model(..., adapter_names=names)`, "
        f"`lora_alpha = r`. Threads: 1 = one request, one intra-op thread; 2 = two concurrent requests (own "
        f"batches) in two Python threads, one intra-op thread each; tokens/s counts both. {m['rounds']} interleaved "
        f"shuffled rounds after a warm-up; time = median, overhead = median over rounds of time / frozen time "
        f"of the same round - 1, on wall and on process CPU time.", "",
        "| N | threads | method | tokens/s | wall ms (median) | overhead (wall) | overhead (CPU) | peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        ov = "" if r["method"] == "frozen" else f"{100 * r['overhead_wall']:+.1f}%"
        oc = "" if r["method"] == "frozen" else f"{100 * r['overhead_cpu']:+.1f}%"
        lines.append(f"| {r['n']} | {r['threads']} | {r['method']} | {r['tokens_per_s']:.0f} | "
                     f"{1e3 * r['wall_median_s']:.0f} | {ov} | {oc} | {mib(r['peak_bytes'])} |")
    lines += ["", "Goal: PiCa's overhead no larger than LoRA's at N = 1, at most half of LoRA's from N = 16 on.", "",
              "| N | threads | clock | PiCa overhead | LoRA overhead | limit | held |", "|---|---|---|---|---|---|---|"]
    for g in res["goals"]:
        lines.append(f"| {g['n']} | {g['threads']} | {g['clock']} | {100 * g['pica']:+.1f}% | "
                     f"{100 * g['lora']:+.1f}% | {100 * g['limit']:+.1f}% | {'yes' if g['held'] else 'NO'} |")
    ok = sum(c["held"] for c in res["checks"])
    lines += ["", f"Checks ({ok} of {len(res['checks'])} held): every method's output differs from the frozen "
              "model's; a 2-thread request's output equals the 1-thread output of the same batch; N = max differs "
              "from N = 1." + ("" if ok == len(res["checks"]) else " **Failed: "
                               + "; ".join(c["check"] for c in res["checks"] if not c["held"]) + "**"), "",
              f"Peak memory: one 1-thread forward per cell under torch.profiler (profile_memory), the high-water "
              f"mark of the torch CPU allocator above the level before it; 2 threads: the sum of both requests' "
              f"peaks (the profiler sees one thread). Resident bytes "
              f"added to the model for {m['adapters_loaded']} adapters: PiCa {mib(m['added_bytes']['pica'])} (bases + "
              f"M), LoRA {mib(m['added_bytes']['lora'])}. Setup: model load {m['load_s']:.0f} s, PiCa apply "
              f"{m['pica_apply_s']:.1f} s, LoRA {m['lora_apply_s']:.1f} s; timed rounds {m['rounds_s']:.0f} s. "
              f"Raw samples (both clocks): `{RESULT_NAME}.json`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", default="1,4,16,64", help="numbers of distinct adapters in the batch")
    ap.add_argument("--threads", default="1,2", help="concurrent requests (each one intra-op thread)")
    ap.add_argument("--batch", type=int, default=64, help="sequences per request (>= max N)")
    ap.add_argument("--seq", type=int, default=16, help="tokens per sequence")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a random tiny Llama instead of SmolLM2 (smoke test)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--report-only", action="store_true", help=f"re-render {RESULT_NAME}.md from OUT/{RESULT_NAME}.json")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    args.argv = [a for a in argv if a != "--report-only"]
    path = args.out / f"{RESULT_NAME}.json"
    if args.report_only:
        res = json.loads(path.read_text())
    else:
        threads_before = torch.get_num_threads()
        try:
            res = run(args)
        finally:
            torch.set_num_threads(threads_before)
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
    (args.out / f"{RESULT_NAME}.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
