"""truncated_svd: accuracy against float64 SVD, determinism, backends, bad inputs.

Shapes are small (d <= 512) because CI machines have 2 cores; the real-weight
test (SmolLM2-135M) checks the presets on the spectra that matter.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from pica_kernels import svd as svd_mod
from pica_kernels.svd import accuracy_report, resolve_knobs, truncated_svd

# Per-dtype tolerances (one table, FlagGems style): orthonormality of the basis
# and singular-value error relative to sigma_1.
ORTHO_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
SIGMA_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q


def make_matrix(m: int, n: int, spectrum: str, seed: int = 0) -> torch.Tensor:
    """(m, n) float64 with known singular vectors and an LLM-like spectrum (or an MP bulk)."""
    gen = torch.Generator().manual_seed(seed)
    d = min(m, n)
    i = torch.arange(1, d + 1, dtype=torch.float64)
    if spectrum == "mp":
        # Marchenko-Pastur bulk (Gaussian noise, edge 1 + sqrt(d/max)) plus a
        # decaying tail of 24 spikes above it: trained weights look like this.
        noise = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(max(m, n))
        spikes = 2.0 + 6.0 * torch.linspace(1, 0, 24, dtype=torch.float64) ** 2
        return noise + (_orthonormal(m, 24, gen) * spikes) @ _orthonormal(n, 24, gen).T
    if spectrum == "power":  # sigma_i = i^-0.5: flat, like real projections
        s = i**-0.5
    elif spectrum == "steep":
        s = i**-1.0
    elif spectrum.startswith("gap"):  # "gap<r>": a 10x drop after index r
        r = int(spectrum[3:])
        s = torch.where(i <= r, 1.0 + 1.0 / i, 0.1 / i)
    elif spectrum.startswith("lowrank"):  # "lowrank<k>": exactly rank k
        k = int(spectrum[7:])
        s = torch.where(i <= k, 1.0 / i, torch.zeros_like(i))
    else:
        raise ValueError(spectrum)
    return (_orthonormal(m, d, gen) * s) @ _orthonormal(n, d, gen).T


def check(weight, basis, sigma, side, *, energy, cos2, dtype=torch.float32):
    rep = accuracy_report(weight, basis, side, sigma)
    assert rep["ortho"] <= ORTHO_TOL[dtype], rep
    assert rep["energy"] >= energy, rep
    assert rep["cos2"] >= cos2, rep
    return rep


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize(
    "shape,rank,path",
    [
        ((384, 384), 16, "krylov"),  # square
        ((256, 512), 12, "krylov"),  # wide (Krylov on the output side)
        ((512, 256), 12, "krylov"),  # tall
        ((3, 256, 384), 12, "krylov"),  # batch
        ((192, 576), 64, "gram"),  # GQA k/v shape of SmolLM2: Gram path
        ((384, 256), 200, "gram"),  # rank a large fraction of d
    ],
)
def test_gapped_spectrum_recovers_exact_subspace(shape, rank, path, side):
    """With a 10x gap at r the subspace is well defined: everything must match the float64 SVD."""
    mats = [make_matrix(*shape[-2:], f"gap{rank}", seed=s) for s in range(shape[0] if len(shape) == 3 else 1)]
    w = torch.stack(mats).float() if len(shape) == 3 else mats[0].float()
    # Small matrices take the Gram path by default; force Krylov where tested.
    kw = {"exact_ratio": 1e9} if path == "krylov" else {}
    assert resolve_knobs("accurate", rank, *shape[-2:], **kw)["path"] == path
    basis, sigma = truncated_svd(w, rank, side, **kw)
    out_f, in_f = shape[-2:]
    lead = shape[:-2]
    assert basis.shape == ((*lead, rank, in_f) if side == "input" else (*lead, out_f, rank))
    assert sigma.shape == (*lead, rank) and basis.dtype == sigma.dtype == torch.float32
    assert basis.is_contiguous()
    rep = check(w, basis, sigma, side, energy=1 - 1e-6, cos2=1 - 1e-6)
    assert rep["sigma_rel_err"] <= SIGMA_TOL[torch.float32]
    assert bool((sigma[..., :-1] >= sigma[..., 1:]).all())


@pytest.mark.parametrize("spectrum", ["power", "steep", "mp"])
@pytest.mark.parametrize("shape", [(512, 512), (384, 768), (768, 384)])
def test_llm_like_spectra_accurate(spectrum, shape):
    """LLM-like spectra without a gap at r: "accurate" meets the SmolLM2 targets on the Krylov path."""
    w = make_matrix(*shape, spectrum).float()
    for rank in (8, 16):
        # (steps+1)·block = 216 / 288 < d: forced onto the Krylov path (default would be Gram at this size).
        assert resolve_knobs("accurate", rank, *shape, exact_ratio=1e9)["path"] == "krylov"
        basis, sigma = truncated_svd(w, rank, "input", seed=1, exact_ratio=1e9)
        rep = check(w, basis, sigma, "input", energy=0.9999, cos2=0.99)
        assert rep["sigma_rel_err"] <= 1e-3


def test_fast_preset_is_cheaper_and_less_accurate_than_accurate():
    w = make_matrix(512, 512, "power").float()
    fast = accuracy_report(w, truncated_svd(w, 24, method="fast")[0])
    acc = accuracy_report(w, truncated_svd(w, 24, method="accurate")[0])
    assert fast["energy"] >= 0.99 and fast["ortho"] <= ORTHO_TOL[torch.float32]
    assert acc["energy"] > fast["energy"] and acc["cos2"] > fast["cos2"]
    k = resolve_knobs("fast", 24, 512, 512)
    a = resolve_knobs("accurate", 24, 512, 512)
    assert (k["steps"] + 1) * k["block"] < (a["steps"] + 1) * a["block"]


def test_beats_svd_lowrank():
    """torch.svd_lowrank (even with q=r+8, niter=4) misses the subspace of a flat spectrum; accurate does not."""
    w = make_matrix(512, 512, "power").float()
    rank = 24
    _, _, v = torch.svd_lowrank(w, q=rank + 8, niter=4)
    lowrank = accuracy_report(w, v[:, :rank].T.contiguous())
    acc = accuracy_report(w, truncated_svd(w, rank)[0])
    assert acc["energy"] >= 0.9999 and acc["cos2"] >= 0.999
    assert lowrank["cos2"] < 0.999 and acc["energy"] > lowrank["energy"] and acc["cos2"] > lowrank["cos2"]


def test_exact_method_matches_float64_svd():
    w = make_matrix(200, 300, "power")
    basis, sigma = truncated_svd(w, 20, "output", method="exact")
    assert basis.dtype == torch.float64
    rep = check(w, basis, sigma, "output", energy=1 - 1e-12, cos2=1 - 1e-12, dtype=torch.float64)
    assert rep["sigma_rel_err"] <= 1e-12


@pytest.mark.parametrize("path_ratio", [0.5, 1e9])  # Gram path; Krylov path forced
def test_float64_weight_stays_float64(path_ratio):
    w = make_matrix(256, 384, "gap10")
    basis, sigma = truncated_svd(w, 10, exact_ratio=path_ratio, steps=6)
    assert basis.dtype == sigma.dtype == torch.float64
    rep = check(w, basis, sigma, "input", energy=1 - 1e-12, cos2=1 - 1e-10, dtype=torch.float64)
    assert rep["sigma_rel_err"] <= SIGMA_TOL[torch.float64]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(dtype):
    """bf16/fp16 weights run in float32 (Grams in float64) and give the SVD of the rounded weight."""
    w = make_matrix(256, 512, "gap16").to(dtype)
    basis, sigma = truncated_svd(w, 16, "input")
    assert basis.dtype == torch.float32
    rep = check(w.double(), basis, sigma, "input", energy=1 - 1e-6, cos2=1 - 1e-5)
    assert rep["sigma_rel_err"] <= 1e-5
    # Same as decomposing the float32 upcast (what the float32 path sees).
    assert torch.equal(basis, truncated_svd(w.float(), 16, "input")[0])


def test_rank_deficient_block_falls_back_to_eigh_orthonormalisation():
    """A rank-40 weight with a Krylov space of 5 x 32 = 160 > 40 directions: Cholesky breaks, eigh takes over."""
    w = make_matrix(384, 384, "lowrank40").float()
    basis, sigma = truncated_svd(w, 16, steps=4, exact_ratio=1e9)
    check(w, basis, sigma, "input", energy=1 - 1e-6, cos2=1 - 1e-6)


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("method", ["accurate", "accurate-v1"])
@pytest.mark.parametrize("ratio", [0.5, 1e9])
def test_rank_below_requested_rank_still_orthonormal(side, ratio, method):
    """GQA-like 192 x 576 of rank 10 asked for r = 32: the extra vectors are an orthonormal completion."""
    w = make_matrix(192, 576, "lowrank10").float()
    # 2 steps keep the Krylov space (3 x 48 = 144) below d = 192, so ratio 1e9 takes the Krylov path.
    assert resolve_knobs(method, 32, 192, 576, steps=2, exact_ratio=ratio)["path"] == ("gram" if ratio < 1 else "krylov")
    basis, sigma = truncated_svd(w, 32, side, method=method, steps=2, exact_ratio=ratio)
    rep = accuracy_report(w, basis, side, sigma)
    assert rep["ortho"] <= ORTHO_TOL[torch.float32] and rep["energy"] >= 1 - 1e-6
    assert rep["sigma_rel_err"] <= 1e-5
    # The top-10 subspace (the only defined one) is exact.
    assert accuracy_report(w, basis[:10] if side == "input" else basis[:, :10], side)["cos2"] >= 1 - 1e-6


def test_zero_weight():
    basis, sigma = truncated_svd(torch.zeros(64, 96), 4)
    assert torch.equal(sigma, torch.zeros(4))
    assert (basis @ basis.T - torch.eye(4)).abs().max() <= 1e-6


def test_accuracy_report_detects_a_wrong_basis():
    w = make_matrix(128, 128, "gap8")
    good = truncated_svd(w, 8, method="exact")[0]
    bad = torch.linalg.qr(good.T + 0.3 * torch.randn(128, 8, dtype=torch.float64))[0].T
    rep_good, rep_bad = accuracy_report(w, good), accuracy_report(w, bad)
    assert rep_good["cos2"] > 1 - 1e-12 and rep_bad["cos2"] < 0.99 and rep_bad["energy"] < 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["krylov", "krylov-v1", "gram", "full"])
def test_extreme_scale_weights_give_the_same_basis(path, dtype):
    """A weight times 1e-25 or 1e18 (float32; 1e-200 / 1e160 float64) has the singular vectors of the weight.

    Regression: the Gram/Ritz eigh runs in float32 on squared scales, so |W| ~ 1e-25 underflowed (Gram path)
    and ~1e18 overflowed (Krylov path) into a wrong basis with no error. Each layer of a batch is normalised
    by its own power of two, so a power-of-two multiple of W gives the very same bits.
    """
    w = make_matrix(256, 384, "gap8").to(dtype)
    kw = {"krylov": {"exact_ratio": 1e9}, "krylov-v1": {"exact_ratio": 1e9, "method": "accurate-v1"},
          "gram": {}, "full": {"method": "exact"}}[path]
    assert resolve_knobs(kw.get("method", "accurate"), 8, 256, 384, exact_ratio=kw.get("exact_ratio"))["path"] == (
        path.split("-")[0])
    base, sigma = truncated_svd(w, 8, "input", **kw)
    tiny, huge = (1e-25, 1e18) if dtype == torch.float32 else (1e-200, 1e160)
    for factor in (tiny, huge):
        basis, s = truncated_svd(w * factor, 8, "input", **kw)
        torch.testing.assert_close(basis, base, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0)
        torch.testing.assert_close(s / factor, sigma, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    basis, s = truncated_svd(w * 2.0**-90, 8, "input", **kw)
    assert torch.equal(basis, base) and torch.equal(s, sigma * 2.0**-90)
    # A batch of one layer at each scale: each is normalised by its own scale.
    batch, s = truncated_svd(torch.stack([w, w * tiny, w * huge]), 8, "input", **kw)
    for i in range(3):
        torch.testing.assert_close(batch[i], base, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0)


def test_oversampling_is_needed_on_a_cluster_below_r():
    """The "accurate" preset's oversampling is what resolves a spectrum crowded just below sigma_r.

    sigma_1..32 fall from 2 to 1, then sigma_33, sigma_34, ... = 0.999, 0.998, ...: a relative gap of 1e-3
    at r = 32 with a dense cluster under it (real LLM spectra are this flat near r). With block r + 16 the
    8 Krylov steps resolve it (mean cos² 0.99992); with block r they stop at 0.998 (and sigma errors 7x
    larger). Runs the default preset on the Krylov path (1024², 9 x 48 < 512), in a second.
    """
    gen = torch.Generator().manual_seed(0)
    i = torch.arange(1, 1025, dtype=torch.float64)
    s = torch.where(i <= 32, 2.0 - (i - 1) / 31, 1.0 - 1e-3 * (i - 32)).clamp(min=0.3)
    w = ((_orthonormal(1024, 1024, gen) * s) @ _orthonormal(1024, 1024, gen).T).float()
    ref = torch.linalg.svd(w.double(), full_matrices=False)
    basis, sigma = truncated_svd(w, 32)
    rep = accuracy_report(w, basis, "input", sigma, reference=ref)
    assert rep["energy"] >= 0.9999 and rep["cos2"] >= 0.999 and rep["sigma_rel_err"] <= 1.5e-4, rep
    assert resolve_knobs("accurate", 32, 1024, 1024) == {
        "method": "accurate-v2", "path": "krylov", "algorithm": 2, "block": 48, "steps": 8}
    # The bar is not loose: the same 8 steps without oversampling miss it.
    basis0, sigma0 = truncated_svd(w, 32, oversample=0)
    rep0 = accuracy_report(w, basis0, "input", sigma0, reference=ref)
    assert rep0["cos2"] < 0.999 and rep0["sigma_rel_err"] > 1.5e-4, rep0


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_bits_and_canonical_signs():
    w = make_matrix(256, 384, "power").float()
    kw = {"exact_ratio": 1e9}  # the Krylov path, where the seed matters
    b1, s1 = truncated_svd(w, 12, seed=7, **kw)
    b2, s2 = truncated_svd(w.clone(), 12, seed=7, **kw)
    assert torch.equal(b1, b2) and torch.equal(s1, s2)
    b3, _ = truncated_svd(w, 12, seed=8, **kw)
    assert not torch.equal(b1, b3)  # the seed does reach the sketch...
    assert accuracy_report(w, b3)["cos2"] >= 0.99  # ...and barely matters
    idx = b1.abs().argmax(-1, keepdim=True)
    assert bool((torch.gather(b1, -1, idx) > 0).all())


def test_layer_basis_independent_of_batch_position():
    """The sketch is shared across the batch: a layer gets (nearly) the same basis alone or stacked."""
    ws = torch.stack([make_matrix(256, 384, "gap12", seed=s) for s in range(3)]).float()
    batch, _ = truncated_svd(ws, 12, exact_ratio=1e9)
    for i in range(3):
        alone, _ = truncated_svd(ws[i], 12, exact_ratio=1e9)
        torch.testing.assert_close(batch[i], alone, atol=1e-5, rtol=0)


def test_cpp_backend_matches_torch_fallback_bit_for_bit():
    if not svd_mod.HAS_CPP:
        pytest.skip(f"C++ extension not built: {svd_mod.backend_error()}")
    for shape, rank, side, kw in [
        ((2, 256, 384), 12, "input", {}),  # Krylov v2
        ((2, 256, 384), 12, "input", {"method": "accurate-v1"}),  # Krylov v1
        ((384, 256), 12, "output", {"method": "fast"}),  # Krylov v2, tall
        ((384, 256), 12, "output", {}),  # Krylov, tall
        ((192, 576), 64, "output", {}),  # Gram
        ((384, 384), 16, "input", {"steps": 4, "exact_ratio": 1e9}),  # eigh orthonormalisation (v2)
        ((384, 384), 16, "input", {"steps": 4, "exact_ratio": 1e9, "method": "accurate-v1"}),  # (v1)
        ((128, 96), 8, "input", {"method": "exact"}),
    ]:
        spectrum = "lowrank40" if "exact_ratio" in kw else "power"
        w = make_matrix(*shape[-2:], spectrum).float()
        if len(shape) == 3:
            w = torch.stack([w, w.flip(0)])
        a = truncated_svd(w, rank, side, backend="cpp", **kw)
        b = truncated_svd(w, rank, side, backend="torch", **kw)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (shape, rank, side, kw)


def test_backend_reported(monkeypatch):
    assert svd_mod.backend() == ("cpp" if svd_mod.HAS_CPP else "torch")
    assert (svd_mod.backend_error() is None) == svd_mod.HAS_CPP
    monkeypatch.setenv("PICA_SVD_BACKEND", "torch")
    assert svd_mod.backend() == "torch"
    if os.environ.get("PICA_REQUIRE_CPP"):
        assert svd_mod.HAS_CPP


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_and_cuda_agree():
    w = make_matrix(1024, 768, "gap32").float()
    for side in ("input", "output"):
        cpu, s_cpu = truncated_svd(w, 32, side)
        gpu, s_gpu = truncated_svd(w.cuda(), 32, side)
        assert gpu.is_cuda
        vc = cpu if side == "input" else cpu.T
        vg = gpu.cpu() if side == "input" else gpu.cpu().T
        assert float((vc.double() @ vg.double().T).pow(2).sum() / 32) >= 0.9999
        torch.testing.assert_close(vg, vc, atol=1e-4, rtol=0)  # canonical signs: same vectors, not just subspace
        torch.testing.assert_close(s_gpu.cpu(), s_cpu, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- inputs


def test_meta_device_returns_shapes_without_computing():
    b, s = truncated_svd(torch.empty(2, 96, 64, device="meta"), 8, "output")
    assert b.device.type == "meta" and b.shape == (2, 96, 8) and s.shape == (2, 8)


@pytest.mark.parametrize(
    "weight,rank,kwargs,err,match",
    [
        (torch.randn(8, 6), 0, {}, ValueError, r"rank must be in \[1, min\(out, in\)\] = \[1, 6\]"),
        (torch.randn(8, 6), 7, {}, ValueError, r"got rank=7"),
        (torch.randn(8, 6), 2.0, {}, TypeError, "rank must be an int"),
        (torch.ones(8, 6, dtype=torch.int32), 2, {}, TypeError, "floating-point"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1, {}, ValueError, "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 1, {}, ValueError, "NaN or Inf"),
        (torch.empty(0, 8, 6), 2, {}, ValueError, "empty batch"),
        (torch.randn(6), 1, {}, ValueError, "must be \\(out, in\\)"),
        (torch.randn(2, 3, 8, 6), 1, {}, ValueError, "must be \\(out, in\\)"),
        (torch.randn(8, 6), 2, {"method": "svd"}, ValueError, "method must be one of"),
        (torch.randn(8, 6), 2, {"steps": -1}, ValueError, "steps must be"),
        (torch.randn(8, 6), 2, {"oversample": 1.5}, ValueError, "oversample must be"),
        (torch.randn(8, 6), 2, {"backend": "cuda"}, ValueError, "backend must be"),
        ([[1.0, 2.0]], 1, {}, TypeError, "must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(weight, rank, kwargs, err, match):
    with pytest.raises(err, match=match):
        truncated_svd(weight, rank, **kwargs)


def test_bad_side():
    with pytest.raises(ValueError, match="side"):
        truncated_svd(torch.randn(8, 6), 2, "left")


def test_mismatched_shapes_in_a_batch_are_an_error():
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        truncated_svd(torch.stack([torch.randn(8, 6), torch.randn(8, 5)]), 2)


def test_knobs_and_path_selection():
    def knobs(*args, **kw):
        k = resolve_knobs(*args, **kw)
        return k["path"], k["block"], k["steps"]

    assert resolve_knobs("accurate", 16, 4096, 4096) == {
        "method": "accurate-v2", "path": "krylov", "algorithm": 2, "block": 32, "steps": 8}
    assert knobs("accurate", 128, 4096, 4096) == ("krylov", 160, 8)  # oversample r/4 above 64
    assert knobs("accurate", 64, 576, 1536)[0] == "gram"  # 9 x 80 >= 0.5 x 576
    assert resolve_knobs("fast", 16, 576, 1536) == {
        "method": "fast-v2", "path": "krylov", "algorithm": 2, "block": 24, "steps": 3}
    assert knobs("accurate", 8, 6, 6)[1] == 6  # block capped at d
    assert resolve_knobs("exact", 8, 64, 64)["path"] == "full"
    assert knobs("accurate", 16, 4096, 4096, exact_ratio=0.0)[0] == "gram"
    # r = 256 on a large weight: 9 x 320 >= 0.5 x 4096, so v2 narrows the block and takes
    # the most steps (>= 6) below the switch instead of the 4096 x 4096 eigh that v1 runs.
    for shape in ((4096, 4096), (14336, 4096), (4096, 14336)):
        assert knobs("accurate", 256, *shape) == ("krylov", 272, 6)
        assert knobs("accurate-v1", 256, *shape)[0] == "gram"
    # Where the rule matters: r = 200 (block r + r/4 = 266, 9 x 266 >= 2048) narrows to 216 and keeps all 8
    # steps (9 x 216 = 1944 < 2048) -- "the most steps below the switch", not the minimum: a rule taking 6
    # steps (or the first count from below) gives the same 6 at r = 256 but a less accurate basis here.
    # r = 224: 240 wide, 8 steps would be 2160, 7 steps 1920 < 2048.
    assert knobs("accurate", 200, 4096, 4096) == ("krylov", 216, 8)
    assert knobs("accurate", 224, 4096, 4096) == ("krylov", 240, 7)
    assert knobs("accurate-v1", 200, 4096, 4096)[0] == "gram"
    # Explicit knobs are used as given (no narrowing): the Gram path.
    assert knobs("accurate", 200, 4096, 4096, steps=8)[0] == "gram"
    assert knobs("accurate", 512, 4096, 4096)[0] == "gram"  # not even 6 steps fit
    assert knobs("accurate", 24, 576, 1536)[0] == "gram"  # small d: the Gram path stays (cheap, exact)
    assert knobs("accurate", 256, 4096, 4096, steps=8)[0] == "gram"  # explicit knobs are taken as given
    # A Krylov space as large as d is never run, whatever exact_ratio says (it would be rounding noise).
    assert knobs("accurate", 32, 384, 512, exact_ratio=1e9)[0] == "gram"  # 9 x 48 >= 384
    assert knobs("accurate", 32, 384, 512, steps=6, exact_ratio=1e9)[0] == "krylov"  # 7 x 48 < 384
    for name in ("accurate-v1", "fast-v1"):
        assert resolve_knobs(name, 16, 4096, 4096)["algorithm"] == 1


def test_presets_are_versioned():
    """Plain names follow the newest presets; versioned names, and legacy files' plain names, stay reproducible."""
    assert svd_mod.versioned_method("accurate") == "accurate-v2"
    assert svd_mod.versioned_method("fast") == "fast-v2"
    assert svd_mod.versioned_method("exact") == "exact"
    assert svd_mod.versioned_method("accurate-v1") == "accurate-v1"
    assert svd_mod.LEGACY_SVD_METHODS == {"accurate": "accurate-v1", "fast": "fast-v1"}
    assert set(svd_mod.SVD_METHOD_ALIASES.values()) <= set(svd_mod.SVD_METHODS)
    with pytest.raises(ValueError, match="method must be one of"):
        svd_mod.versioned_method("accurate-v9")
    w = make_matrix(256, 384, "power").float()
    v1, _ = truncated_svd(w, 6, method="accurate-v1", exact_ratio=1e9)
    v2, _ = truncated_svd(w, 6, method="accurate", exact_ratio=1e9)
    assert torch.equal(v2, truncated_svd(w, 6, method="accurate-v2", exact_ratio=1e9)[0])
    assert not torch.equal(v1, v2)  # another algorithm: other rounding...
    torch.testing.assert_close(v1, v2, atol=1e-4, rtol=0)  # ...same vectors


# Fingerprints (first 3 vectors) of bases computed by pica_kernels before presets were versioned (the commit
# before "truncated_svd: versioned presets"): a file recording "accurate"/"fast" from then must still verify.
_V1_FINGERPRINTS = {
    "accurate-v1": [[-1.3568863227817356, -0.05917444179182157, 0.15669976193482343, 1.487195466007549],
                    [-0.40651615656624357, -1.0872082753929364, 0.14302841591184973, 0.20097772026383373],
                    [1.224435737692715, 1.4151084374998342, -0.6330134958224795, 1.431251287298635]],
    "fast-v1": [[-1.3568834708129451, -0.0591701332310343, 0.1567010332265679, 1.4871951924034044],
                [-0.40649023066910944, -1.0871631941261042, 0.14302600909664095, 0.20099707360268323],
                [1.224501313769692, 1.415235169523608, -0.6332139252035364, 1.4312386772854302]],
    "gram": [[1.920334995005641, -0.3498845746864243, -1.7138377768696267, -0.5556861431985424],
             [-0.23582735298311638, -0.30087509783993166, -0.27233537309067224, -0.21459978139419417],
             [-0.7040740328123171, -0.08878178500129907, -1.0270317521672299, 0.03177449326143611]],
}


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("case", sorted(_V1_FINGERPRINTS))
def test_v1_presets_reproduce_old_bases(case, backend):
    """The v1 presets (and the Gram path, unchanged) give the bases pica_kernels computed before v2."""
    if backend == "cpp" and not svd_mod.HAS_CPP:
        pytest.skip(f"C++ extension not built: {svd_mod.backend_error()}")
    if case == "gram":
        w, kw = make_matrix(192, 576, "power").float(), {"method": "accurate"}
    else:
        w, kw = make_matrix(256, 384, "power").float(), {"method": case, "exact_ratio": 1e9}
    basis, _ = truncated_svd(w, 6, "input", backend=backend, **kw)
    fp = svd_mod.basis_fingerprint(basis, "input")[:3]
    # 2e-6: far inside the adapter files' float32 fingerprint tolerance (1e-4). The same fp32 SVD differs between
    # ATen dispatch levels: up to 1.04e-6 from the record under ATEN_CPU_CAPABILITY=default, 4.0e-7 under avx2 and
    # avx512 (measured; 1e-6 failed on the default level). At this size v2 lands as close (3e-7..1.4e-6), so this
    # checks that v1 still gives the old bases, not that it differs from v2 (that needs a matrix where the
    # presets' bases differ by >> 1e-6).
    torch.testing.assert_close(fp, torch.tensor(_V1_FINGERPRINTS[case], dtype=torch.float64), atol=2e-6, rtol=0)


def test_config_default_is_accurate():
    from pica_kernels import PiCaConfig

    assert PiCaConfig().svd_method == "accurate"
    assert PiCaConfig(svd_method="fast").svd_method == "fast"
    with pytest.raises(ValueError, match="svd_method must be one of"):
        PiCaConfig(svd_method="lowrank")


# --------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def smollm2_weights():
    from pica_kernels.registry_models import load_smollm2

    # No importorskip: `make test` installs the model package, so a missing model must fail, not skip.
    model, _ = load_smollm2(dtype=torch.float32)
    roles = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # 3 of 30 layers (first, middle, last) keep the float64 reference SVDs
    # within the time budget; each role is one batch, as in apply_pica.
    layers = (0, 15, 29)
    out = {}
    for role in roles:
        ws = [dict(model.named_modules())[f"model.layers.{i}.{'self_attn' if role[0] in 'qkvo' else 'mlp'}.{role}"].weight
              for i in layers]
        w = torch.stack([x.detach().clone() for x in ws])
        out[role] = (w, torch.linalg.svd(w.double(), full_matrices=False))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("rank", [16, 32, 64, 128])
def test_smollm2_accuracy(smollm2_weights, rank):
    """The issue's bar on real weights: energy >= 0.9999 and mean cos² >= 0.99 on every projection checked."""
    for role, (w, ref) in smollm2_weights.items():
        basis, sigma = truncated_svd(w, rank, "input")
        rep = accuracy_report(w, basis, "input", sigma, reference=ref)
        assert rep["energy"] >= 0.9999, (role, rank, rep)
        assert rep["cos2"] >= 0.99, (role, rank, rep)
        assert rep["ortho"] <= ORTHO_TOL[torch.float32], (role, rank, rep)
    if rank == 16:
        # At SmolLM2's size the presets take the Gram path; the Krylov path must meet the bar too.
        for role in ("o_proj", "up_proj", "down_proj"):
            w, ref = smollm2_weights[role]
            basis, sigma = truncated_svd(w, rank, "input", exact_ratio=1e9)
            rep = accuracy_report(w, basis, "input", sigma, reference=ref)
            assert rep["energy"] >= 0.9999 and rep["cos2"] >= 0.99, (role, "krylov", rep)
    # svd_lowrank with the same rank misses the bar somewhere (why this module exists).
    if rank == 32:
        w, ref = smollm2_weights["up_proj"]
        _, _, v = torch.svd_lowrank(w, q=rank + 8, niter=4)
        rep = accuracy_report(w, v[..., :rank].transpose(-1, -2), "input", reference=ref)
        assert rep["energy"] < 0.9999


# --------------------------------------------------------------------------- used everywhere


def test_apply_pica_and_save_load_use_the_batched_accurate_svd(tmp_path):
    """apply_pica (one batched call per group), PiCaLinear and load_adapter all get their bases from truncated_svd."""
    from torch import nn

    from pica_kernels import PiCaConfig, PiCaLinear, apply_pica, load_adapter, save_adapter
    from pica_kernels.native.apply import pica_layers

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(96, 64, bias=False)

    def build():
        torch.manual_seed(0)
        model = nn.Module()
        model.layers = nn.ModuleList([Block() for _ in range(3)])
        return model

    model = apply_pica(build(), PiCaConfig(rank=8, target_modules=["q_proj"]), progress=False)
    layers = dict(pica_layers(model))
    stack = torch.stack([layers[f"layers.{i}.q_proj"].base_weight for i in range(3)])
    expected, _ = truncated_svd(stack, 8, "input", method="accurate", seed=0)
    for i in range(3):
        assert torch.equal(layers[f"layers.{i}.q_proj"].basis(), expected[i])
    # A standalone layer gets the same basis up to rounding (the sketch is shared across a batch).
    lin = nn.Linear(96, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(stack[1])
    torch.testing.assert_close(PiCaLinear(lin, 8).basis(), expected[1], atol=1e-5, rtol=0)
    # Reloading recomputes the same bases (the fingerprint check passes).
    save_adapter(model, tmp_path / "ad")
    fresh = load_adapter(build(), tmp_path / "ad")
    for i in range(3):
        assert torch.equal(dict(pica_layers(fresh))[f"layers.{i}.q_proj"].basis(), expected[i])
