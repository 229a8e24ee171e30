"""Per-model suite: a full training step of the real SmolLM2-135M-Instruct with each method.

Step = forward with labels (cross-entropy) + backward + AdamW step + zero_grad, on a batch of real
text (GSM-8K train rows, ``BENCH_BATCH`` x ``BENCH_SEQ`` tokens, default 4 x 128). Every method
targets the same layers (q, k, v, up, down: PiCa's default and the paper's) of its own copy of the
model; the steps run interleaved (see harness.py). Recorded per method: step time (median, ratio to
the frozen model), peak memory of one step, activations saved by one forward, trainable and frozen
parameter counts, bytes added to the resident model (bases, U and V), AdamW state bytes, and the
time from a loaded base model to a ready one (adapter construction, basis SVDs included).

The frozen baseline runs forward + backward with the input embeddings requiring grad
(``enable_input_require_grads``), so it computes every dx the adapters need, and no optimizer.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from benchmarks import harness as H

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
BATCH = int(os.environ.get("BENCH_BATCH", 4))
SEQ = int(os.environ.get("BENCH_SEQ", 128))
ROUNDS = int(os.environ.get("BENCH_MODEL_ROUNDS", 3))


def _batch(tok, dev):
    if DATA.exists():
        rows = [json.loads(line) for _, line in zip(range(BATCH), DATA.open())]
        texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
    else:  # another checkout layout: any text of the right length does for timing
        texts = ["The quick brown fox jumps over the lazy dog. " * 40] * BATCH
    enc = tok(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=SEQ)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {k: v.to(dev) for k, v in enc.items()}, labels.to(dev)


def _apply(name: str, model):
    """Apply one method to ``model`` in place (or wrap it); returns the model to train."""
    if name == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    if name.startswith("pica"):
        import pica_kernels as pk

        return pk.apply_pica(model, pk.PiCaConfig(rank=int(name.split("-r")[1]), target_modules=TARGETS),
                             progress=False)
    if name.startswith(("lora", "dora")):
        from peft import LoraConfig, get_peft_model

        r = int(name.split("-r")[1])
        cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=TARGETS,
                         use_dora=name.startswith("dora"))
        return get_peft_model(model, cfg)
    if name == "svft-p":
        from benchmarks.baselines.svft import apply_svft

        return apply_svft(model, TARGETS, pattern="plain")
    raise ValueError(name)


# PEFT LoRA at PiCa r=32's budget: PiCa shares one M per role, 98,304 trainable on SmolLM2; LoRA's
# smallest rank, r=1, already trains 207,360 (r * sum(out+in) * 30 layers), so r=1 is the match.
METHODS = ["frozen", f"pica-r{H.RANK}", f"lora-r{H.RANK}", "lora-r1", f"dora-r{H.RANK}", "svft-p"]


@pytest.fixture(scope="module")
def smollm2():
    from pica_kernels.registry_models import load_smollm2

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    load_s = time.perf_counter() - t0
    tok.pad_token = tok.pad_token or tok.eos_token
    return model.to(H.device()), tok, load_s


def _state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if torch.is_tensor(t))


def _resident(model) -> int:
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_model_step(benchmark, smollm2):
    base, tok, load_s = smollm2
    dev = H.device()
    enc, labels = _batch(tok, dev)
    base_resident = _resident(base)
    base_params = sum(p.numel() for p in base.parameters())

    models, opts, info = {}, {}, {}
    for name in METHODS:
        fresh = copy.deepcopy(base)
        H.sync(dev)
        t0 = time.perf_counter()
        model = _apply(name, fresh).train()
        H.sync(dev)
        apply_s = time.perf_counter() - t0
        trainable = [p for p in model.parameters() if p.requires_grad]
        opts[name] = torch.optim.AdamW(trainable, lr=1e-5) if trainable else None
        models[name] = model
        n_train = sum(p.numel() for p in trainable)
        info[name] = {
            "trainable": n_train,
            "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "frozen_buffers": sum(b.numel() for b in model.buffers() if b.is_floating_point()),
            "resident_bytes": _resident(model),
            "resident_over_base_bytes": _resident(model) - base_resident,
            "apply_s": apply_s,
            "load_to_ready_s": load_s + apply_s,
        }

    def step_fn(name):
        model, opt = models[name], opts[name]

        def run():
            loss = model(**enc, labels=labels).loss
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

        return run

    fns = {name: step_fn(name) for name in METHODS}
    # Warm-up step of each method, measured for memory (not timed): peak of the whole step and the
    # activations its forward saves. Being the first step, its peak includes allocating AdamW's state.
    for name in METHODS:
        saved = {}

        def measured(name=name, saved=saved):
            saved.update(H.saved_activation_bytes(fns[name], models[name]))

        info[name]["peak_bytes"] = H.peak_bytes(measured, dev)
        info[name]["saved_bytes"] = saved["saved_bytes"]
        info[name]["optimizer_state_bytes"] = _state_bytes(opts[name]) if opts[name] else 0
    inter = H.Interleaved(fns, dev)
    benchmark.group = f"smollm2-135m train step {BATCH}x{SEQ}"
    benchmark.pedantic(inter.run_round, rounds=ROUNDS, iterations=1)
    timing = inter.summary("frozen")
    for name in METHODS:
        info[name]["step"] = timing[name]
    benchmark.extra_info.update({
        "suite": "model", "model": "SmolLM2-135M-Instruct", "batch": BATCH, "seq": SEQ, "targets": TARGETS,
        "base_params": base_params, "base_load_s": load_s, "methods": info, "env": H.environment(),
    })
    # Sanity, not performance: counts the README states, every round ran every method.
    assert info[f"pica-r{H.RANK}"]["trainable"] == 98_304
    assert info["lora-r1"]["trainable"] == 207_360
    assert info["svft-p"]["trainable"] == 30 * (576 + 192 + 192 + 576 + 576) + 150  # sum of min(out, in), gates
    assert all(len(v) == ROUNDS for v in inter.samples.values())


# ---------------------------------------------------------------------------------------------- ready time
READY_ROUNDS = int(os.environ.get("BENCH_READY_ROUNDS", 5))


def test_ready_time(benchmark, tmp_path):
    """Ready = load SmolLM2 from its GGUF file + make it trainable, per method, with the basis cache cold and warm.

    Every variant loads the model afresh (what a user waits for); the variants run interleaved, shuffled per
    round. ``pica-r32 off``: the cache turned off (``PICA_KERNELS_CACHE=0``, the SVD as before the cache);
    ``cold``: an empty cache directory (SVD + hashing + writing); ``warm``: a directory filled before the rounds
    (hashing + reading). ``load_adapter``: a fresh base model + ``load_adapter`` of an adapter saved before the
    rounds (bases recomputed or read from the cache, fingerprints checked). Wall time is the figure (CPU time in
    the JSON); the apply part (after loading) is timed too, as it is the part the cache changes.
    """
    import pica_kernels as pk
    import pica_kernels.cache as cache
    from pica_kernels.registry_models import load_smollm2

    warm_dir, adapter = tmp_path / "warm-cache", tmp_path / "adapter"
    os.environ["PICA_KERNELS_CACHE"] = str(warm_dir)
    model, _ = load_smollm2()
    model = _apply(f"pica-r{H.RANK}", model)  # fills the warm cache, warms up imports
    with torch.no_grad():
        for p in model.pica_bank.parameters():
            p.normal_(0, 0.01)
    pk.save_adapter(model, adapter)
    del model
    cold_dirs = iter(range(10**6))
    apply_s: dict[str, list[float]] = {}
    stats: dict[str, dict] = {}

    def variant(name: str, how: str, cache_dir):
        def run():
            d = cache_dir() if callable(cache_dir) else cache_dir
            os.environ["PICA_KERNELS_CACHE"] = str(d)
            cache.reset_stats()
            model, _ = load_smollm2()
            t0 = time.perf_counter()
            if how == "apply":
                _apply(name.split()[0], model)
            else:
                pk.load_adapter(model, adapter, progress=False)
            apply_s.setdefault(name, []).append(time.perf_counter() - t0)
            stats[name] = cache.stats()
            if callable(cache_dir):
                cache.clear()

        return run

    def fresh():
        return tmp_path / f"cold-{next(cold_dirs)}"

    r = f"r{H.RANK}"
    fns = {
        f"lora-{r}": variant(f"lora-{r}", "apply", 0),
        f"pica-{r} off": variant(f"pica-{r} off", "apply", 0),
        f"pica-{r} cold": variant(f"pica-{r} cold", "apply", fresh),
        f"pica-{r} warm": variant(f"pica-{r} warm", "apply", warm_dir),
        "load_adapter cold": variant("load_adapter cold", "load", fresh),
        "load_adapter warm": variant("load_adapter warm", "load", warm_dir),
    }
    inter = H.Interleaved(fns, torch.device("cpu"))
    env = H.environment()
    benchmark.group = "smollm2-135m ready (load + apply)"
    benchmark.pedantic(inter.run_round, rounds=READY_ROUNDS, iterations=1)
    os.environ["PICA_KERNELS_CACHE"] = "0"
    lora = f"lora-{r}"
    info = {}
    for name in fns:
        wall, cpu = inter.wall[name], inter.samples[name]
        info[name] = {
            "ready_wall_median_s": statistics.median(wall), "ready_cpu_median_s": statistics.median(cpu),
            "apply_median_s": statistics.median(apply_s[name]),
            "ready_ratio_to_lora": statistics.median(a / b for a, b in zip(wall, inter.wall[lora])),
            "rounds": len(wall), "ready_wall_s": wall, "apply_s": apply_s[name], "cache_stats_last": stats[name],
        }
    benchmark.extra_info.update({
        "suite": "ready", "model": "SmolLM2-135M-Instruct", "targets": TARGETS, "rank": H.RANK, "methods": info,
        "env": env, "loadavg_end": list(os.getloadavg()), "cache_entry_bytes": sum(
            f.stat().st_size for f in warm_dir.iterdir()),
    })
    # Sanity, not performance: warm variants hit every batch and ran no SVD; cold ones wrote every batch.
    assert stats[f"pica-{r} warm"]["misses"] == 0 and stats[f"pica-{r} warm"]["hits"] > 0
    assert stats["load_adapter warm"]["misses"] == 0
    assert stats[f"pica-{r} cold"]["hits"] == 0 and stats[f"pica-{r} cold"]["writes"] > 0
