"""pica_kernels.native.analysis: intruder dimensions, DoRA magnitude/direction, Theorem 1 projection errors."""

import math

import pytest
import torch

from pica_kernels.native import analysis


def _weight(out_f=48, in_f=32, seed=0):
    # A spectrum with clear gaps, so that singular vectors are well defined.
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=torch.float64))
    n = min(out_f, in_f)
    s = torch.linspace(10.0, 1.0, n, dtype=torch.float64)
    return u[:, :n] @ torch.diag(s) @ v[:, :n].T


@pytest.mark.parametrize("side", ["output", "input"])
def test_small_update_has_no_intruders(side):
    w0 = _weight()
    w = w0 + 1e-3 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = analysis.intruder_dimensions(w0, w, k=10, threshold=0.5, side=side)
    assert res["count"] == 0
    assert min(res["best_cos"]) > 0.99


@pytest.mark.parametrize("side", ["output", "input"])
def test_a_new_dominant_direction_is_one_intruder(side):
    w0 = _weight()
    g = torch.Generator().manual_seed(2)
    a = torch.randn(w0.shape[0], generator=g, dtype=torch.float64)
    b = torch.randn(w0.shape[1], generator=g, dtype=torch.float64)
    # Orthogonal to the top 10 on both sides is impossible to guarantee for a random vector; a random
    # direction in 48/32 dims has |cos| ~ 1/sqrt(dim) with each pre-trained vector: far below 0.5.
    spike = 30.0 * torch.outer(a / a.norm(), b / b.norm())
    res = analysis.intruder_dimensions(w0, w0 + spike, k=10, threshold=0.5, side=side)
    assert res["count"] == 1
    assert res["best_cos"][0] < 0.5 and min(res["best_cos"][1:]) >= 0.5


def test_intruder_arguments_are_checked():
    w0 = _weight()
    with pytest.raises(ValueError, match="k must be in"):
        analysis.intruder_dimensions(w0, w0, k=33)
    with pytest.raises(ValueError, match="threshold must be in"):
        analysis.intruder_dimensions(w0, w0, threshold=1.5)
    with pytest.raises(ValueError, match="same"):
        analysis.intruder_dimensions(w0, w0[:, :5])
    with pytest.raises(ValueError, match="side"):
        analysis.intruder_dimensions(w0, w0, side="left")


def test_magnitude_direction_separates_scale_and_rotation():
    w0 = _weight()
    scaled = w0 * 1.5
    res = analysis.magnitude_direction(w0, scaled)
    assert res["delta_d"] == pytest.approx(0.0, abs=1e-12)
    assert res["delta_m"] == pytest.approx(0.5 * float(w0.norm(dim=1).mean()), rel=1e-12)
    # Rotate every row by a fixed angle in a plane orthogonal to it: same norm, cos = cos(theta).
    theta = 0.3
    g = torch.Generator().manual_seed(3)
    other = torch.randn(w0.shape, generator=g, dtype=torch.float64)
    other -= (other * w0).sum(1, keepdim=True) / w0.pow(2).sum(1, keepdim=True) * w0
    other *= w0.norm(dim=1, keepdim=True) / other.norm(dim=1, keepdim=True)
    rotated = math.cos(theta) * w0 + math.sin(theta) * other
    res = analysis.magnitude_direction(w0, rotated)
    assert res["delta_m"] == pytest.approx(0.0, abs=1e-10)
    assert res["delta_d"] == pytest.approx(1 - math.cos(theta), rel=1e-9)


@pytest.mark.parametrize("side", ["input", "output"])
def test_update_inside_the_pica_subspace_projects_exactly(side):
    w0 = _weight(40, 24)
    u, _, vh = torch.linalg.svd(w0, full_matrices=False)
    g = torch.Generator().manual_seed(4)
    r = 6
    if side == "input":  # PiCa's default: ΔW = M @ Vh[:r]
        delta = torch.randn(40, r, generator=g, dtype=torch.float64) @ vh[:r]
    else:
        delta = u[:, :r] @ torch.randn(r, 24, generator=g, dtype=torch.float64)
    res = analysis.projection_errors(w0, delta, [1, 3, r, 12], side=side)
    assert res["pretrained"][2] == pytest.approx(0.0, abs=1e-20)
    assert res["pretrained"][3] == pytest.approx(0.0, abs=1e-20)
    assert res["pretrained"][0] > 0.1
    assert res["bound"][2] == pytest.approx(0.0, abs=1e-20)
    assert res["random"][2] > 0.3  # a random 6-dim subspace of R^24 / R^40 misses most of it
    assert res["delta_fro2"] == pytest.approx(float(delta.pow(2).sum()))


def test_theorem1_term_is_eckart_young_and_bounds_every_subspace():
    g = torch.Generator().manual_seed(5)
    w0 = _weight(30, 20)
    delta = torch.randn(30, 20, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(delta)
    for r in (0, 1, 5, 20):
        assert analysis.theorem1_bound(delta, r) == pytest.approx(float(s[r:].pow(2).sum()), rel=1e-12, abs=1e-20)
    res = analysis.projection_errors(w0, delta, list(range(1, 21)), side="input")
    for pre, bound, rnd in zip(res["pretrained"], res["bound"], res["random"]):
        assert bound <= pre + 1e-12 and bound <= rnd + 1e-12  # no rank-r subspace beats the optimum
    assert res["pretrained"][-1] == pytest.approx(0.0, abs=1e-20)  # r = in: the whole space
    with pytest.raises(ValueError, match="rank must be in"):
        analysis.theorem1_bound(delta, 21)
    with pytest.raises(ValueError, match="ranks must be in"):
        analysis.projection_errors(w0, delta, [0, 4])
    with pytest.raises(ValueError, match="delta is zero"):
        analysis.projection_errors(w0, torch.zeros_like(delta), [4])


def test_singular_vector_drift():
    w0 = _weight()
    assert analysis.singular_vector_drift(w0, w0, 8) == {"eps_output": pytest.approx(0.0, abs=1e-10),
                                                          "eps_input": pytest.approx(0.0, abs=1e-10)}
    # Swap the first two singular values: the top two singular vectors trade places, ε = 1.
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    s2 = s.clone()
    s2[0], s2[1] = s[1], s[0]
    swapped = u @ torch.diag(s2) @ vh
    res = analysis.singular_vector_drift(w0, swapped, 4)
    assert res["eps_output"] == pytest.approx(1.0, abs=1e-8)
    assert res["eps_input"] == pytest.approx(1.0, abs=1e-8)


def test_float32_and_real_weights():
    from pica_kernels.registry_models import load_minilm

    bert, _ = load_minilm()
    w0 = bert.encoder.layer[0].attention.self.query.weight.detach()  # (384, 384) float32
    u, _, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    delta = (1e-2 * torch.randn(384, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
             @ vh[:16]).float()
    res = analysis.projection_errors(w0, delta, [16, 64])
    assert res["pretrained"][0] < 1e-10  # float32 rounding of ΔW only
    assert res["random"][0] > 0.9
    assert analysis.intruder_dimensions(w0, w0 + delta)["count"] == 0
