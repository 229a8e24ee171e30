"""The SVFT baseline (benchmarks/baselines/svft.py): math, patterns, init, gradients, parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.baselines.svft import PATTERNS, SVFTLinear, apply_svft, num_coefficients, svft_counts


def _linear(out_f=24, in_f=16, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    lin.requires_grad_(False)
    return lin


def _dense_m(layer: SVFTLinear) -> torch.Tensor:
    """M as a dense (n, n) float64 matrix, duplicates summed (torch_sparse semantics)."""
    m = torch.zeros(layer.n, layer.n, dtype=torch.float64)
    return m.index_put((layer.rows, layer.cols), layer.m_values.detach().double(), accumulate=True)


@pytest.mark.parametrize("n", [1, 2, 7, 32])
@pytest.mark.parametrize("d", [0, 1, 2, 5])
def test_num_coefficients_counts_the_band(n, d):
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    assert num_coefficients(n, "banded", d) == int(((i - j).abs() <= d).sum())
    assert num_coefficients(n, "random", d) == num_coefficients(n, "top_k", d) == num_coefficients(n, "banded", d)
    assert num_coefficients(n, "plain", d) == n


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (12, 12)])
@pytest.mark.parametrize("pattern,d", [("plain", 0), ("banded", 2), ("random", 2), ("top_k", 1)])
def test_dense_weight_is_u_sigma_plus_gm_vh(shape, pattern, d):
    lin = _linear(*shape, dtype=torch.float64)
    layer = SVFTLinear(lin, pattern, d, seed=3)
    with torch.no_grad():
        layer.gate.fill_(0.7)
    g = torch.sigmoid(torch.tensor(0.7, dtype=torch.float64))
    expected = layer.u @ (torch.diag(layer.s) + g * _dense_m(layer)) @ layer.vh
    torch.testing.assert_close(layer.dense_weight(), expected, atol=1e-12, rtol=1e-12)
    x = torch.randn(5, shape[1], dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ expected.T + lin.bias, atol=1e-12, rtol=1e-12)
    assert layer.num_coefficients == num_coefficients(min(shape), pattern, d)


def test_patterns_place_the_right_entries():
    lin = _linear(12, 12, dtype=torch.float64)
    banded = SVFTLinear(lin, "banded", 2)
    assert int((banded.rows - banded.cols).abs().max()) == 2
    assert len(set(zip(banded.rows.tolist(), banded.cols.tolist()))) == banded.num_coefficients
    plain = SVFTLinear(lin, "plain")
    assert torch.equal(plain.rows, torch.arange(12)) and torch.equal(plain.cols, torch.arange(12))
    # top_k on a square weight: the k largest entries of U @ Vh.T (the public code's rule).
    top = SVFTLinear(lin, "top_k", 1)
    coeffs = top.u @ top.vh.T
    picked = coeffs[top.rows, top.cols]
    assert picked.min() >= coeffs.reshape(-1).sort(descending=True).values[top.num_coefficients - 1]
    # random: reproducible by seed, different across seeds
    r1, r2, r3 = (SVFTLinear(lin, "random", 2, seed=s) for s in (1, 1, 2))
    assert torch.equal(r1.rows, r2.rows) and torch.equal(r1.cols, r2.cols)
    assert not (torch.equal(r1.rows, r3.rows) and torch.equal(r1.cols, r3.cols))


@pytest.mark.parametrize("pattern,d", [("plain", 0), ("banded", 2), ("random", 1), ("top_k", 2)])
def test_zero_m_reproduces_the_base_layer(pattern, d):
    lin = _linear(40, 24)
    x = torch.randn(3, 7, 24)
    # Official design: W is rebuilt from its float64 SVD, rounded to float32 -> equal to round-off.
    layer = SVFTLinear(lin, pattern, d, init="zero")
    torch.testing.assert_close(layer(x), lin(x), atol=1e-5, rtol=1e-5)
    # keep_base: W + U (g*0) Vh is W bit for bit.
    exact = SVFTLinear(lin, pattern, d, init="zero", keep_base=True)
    assert torch.equal(exact(x), lin(x))


def test_official_init_is_kaiming_normal_with_a_zero_gate_and_moves_the_output():
    lin = _linear(300, 200)
    layer = SVFTLinear(lin, "banded", 2, init="official", seed=0)
    k = layer.num_coefficients
    assert layer.gate.item() == 0.0
    std = layer.m_values.detach().std().item()
    assert abs(std - (2.0 / k) ** 0.5) < 0.1 * (2.0 / k) ** 0.5
    x = torch.randn(4, 200)
    # sigmoid(0) * M != 0: the public code's layer does not start at the base layer.
    assert not torch.allclose(layer(x), lin(x), atol=1e-4)


def test_gradients_reach_only_the_coefficients_and_gate():
    lin = _linear(20, 12, dtype=torch.float64)
    layer = SVFTLinear(lin, "plain", seed=1)
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(6, 20, dtype=torch.float64)
    layer(x).backward(gy)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"m_values", "gate"}
    assert layer.bias is not None and layer.bias.grad is None
    assert all(not b.requires_grad for b in layer.buffers())
    # Closed form: dL/dm_i = sigmoid(g) * u_i^T (gy^T x) v_i; dL/dg = sigmoid'(g) * sum_i m_i u_i^T G v_i.
    grad_w = gy.T @ x.detach()
    per_i = (layer.u.T @ grad_w @ layer.vh.T).diagonal()
    torch.testing.assert_close(layer.m_values.grad, 0.5 * per_i, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(layer.gate.grad, (0.25 * (layer.m_values.detach() * per_i).sum()).reshape(1),
                               atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(x.grad, gy @ layer.dense_weight().detach(), atol=1e-10, rtol=1e-10)


def test_rank_truncation_and_given_factors():
    lin = _linear(16, 10, dtype=torch.float64)
    layer = SVFTLinear(lin, "plain", rank=4, init="zero")
    assert layer.u.shape == (16, 4) and layer.vh.shape == (4, 10) and layer.num_coefficients == 4
    u, s, vh = torch.linalg.svd(lin.weight, full_matrices=False)
    torch.testing.assert_close(layer.dense_weight(), (u[:, :4] * s[:4]) @ vh[:4])
    given = SVFTLinear(lin, "plain", init="zero", factors=(u, s, vh))
    torch.testing.assert_close(given.dense_weight(), lin.weight, atol=1e-12, rtol=1e-12)


def test_bad_arguments_fail():
    lin = _linear()
    with pytest.raises(ValueError, match="pattern"):
        SVFTLinear(lin, "diagonal")
    with pytest.raises(ValueError, match="init"):
        SVFTLinear(lin, init="random")
    with pytest.raises(TypeError):
        SVFTLinear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_svft(nn.Sequential(lin), target_modules=["q_proj"])
    assert set(PATTERNS) == {"plain", "banded", "random", "top_k"}


def test_apply_svft_on_a_tiny_llama_starts_at_the_base_with_keep_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    apply_svft(model, pattern="banded", off_diag=1, init="zero", keep_base=True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    counts = svft_counts(model)
    assert counts["layers"] == 14
    # per layer: q, o 48; k, v min(24, 48) = 24 (2 kv heads x 12); gate, up, down 48 -> banded d=1: 3n - 2
    per_layer = sum(3 * n - 2 for n in (48, 24, 24, 48, 48, 48, 48))
    assert counts["coefficients"] == 2 * per_layer
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == counts["coefficients"] + counts["gates"]


def test_gemma_2b_svft_plain_parameter_count():
    """SVFT_P on Gemma-2B, all seven projections: 18 layers x sum of min(out, in) = 193,536 (paper's count)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                      num_attention_heads=8, num_key_value_heads=1, head_dim=256)
    with torch.device("meta"):
        model = GemmaForCausalLM(cfg)
    apply_svft(model, pattern="plain")
    counts = svft_counts(model)
    assert counts["layers"] == 18 * 7
    assert counts["coefficients"] == 193_536 == 18 * (2048 + 256 + 256 + 2048 + 3 * 2048)
    assert counts["gates"] == 126
    # Frozen factors U, sigma, Vh: n * (out + in + 1) per layer.
    per_layer = sum(n * (o + i + 1) for o, i, n in [(2048, 2048, 2048), (256, 2048, 256), (256, 2048, 256),
                                                     (2048, 2048, 2048), (16384, 2048, 2048),
                                                     (16384, 2048, 2048), (2048, 16384, 2048)])
    assert counts["frozen_factors"] == 18 * per_layer
    # Banded d=2 on the same model: n*5 - 6 per layer.
    with torch.device("meta"):
        model_b = GemmaForCausalLM(cfg)
    apply_svft(model_b, pattern="banded", off_diag=2)
    assert svft_counts(model_b)["coefficients"] == 193_536 * 5 - 18 * 7 * 6
