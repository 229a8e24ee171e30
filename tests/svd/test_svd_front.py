"""truncated_svd (pica_kernels/svd/__init__.py): accuracy against float64 SVD, determinism, bad inputs, callers.

Shapes are small (d <= 512) because CI machines have 2 cores; the real-weight
test (SmolLM2-135M) checks the presets on the spectra that matter.
"""

from __future__ import annotations

import pytest
import torch
from svd_helpers import ORTHO_TOL, SIGMA_TOL, _orthonormal, check, make_matrix, plan_dict

from pica_kernels.svd import resolve_knobs, truncated_svd
from tools.svd_accuracy import accuracy_report

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
    assert resolve_knobs("accurate", rank, *shape[-2:], **kw).path == path
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
        assert resolve_knobs("accurate", rank, *shape, exact_ratio=1e9).path == "krylov"
        basis, sigma = truncated_svd(w, rank, "input", seed=1, exact_ratio=1e9)
        rep = check(w, basis, sigma, "input", energy=0.9999, cos2=0.99)
        assert rep["sigma_rel_err"] <= 1e-3



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
    assert resolve_knobs(method, 32, 192, 576, steps=2, exact_ratio=ratio).path == ("gram" if ratio < 1 else "krylov")
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
    assert resolve_knobs(kw.get("method", "accurate"), 8, 256, 384, exact_ratio=kw.get("exact_ratio")).path == (
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
    assert plan_dict(resolve_knobs("accurate", 32, 1024, 1024)) == {
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
    from pica_kernels.native.model import pica_layers

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
