"""The benchmark harness's measurements (benchmarks/harness.py): what they count must be right."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import harness as H


def test_saved_bytes_frozen_pica_and_a_layer_that_saves_x():
    base, factors = H.make_base(48, 40, torch.device("cpu"))
    x = torch.randn(10, 40, requires_grad=True)
    assert H.saved_activation_bytes(lambda: base(x), base)["saved_bytes"] == 0
    pica = H.pica_layer(H.fresh_copy(base), factors, rank=8)
    got = H.saved_activation_bytes(lambda: pica(x), pica)
    assert got["saved_bytes"] == 10 * 8 * 4 and got["saved_shapes"] == [[10, 8]]

    class SavesX(nn.Module):  # a trainable full-rank weight: autograd keeps x
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(48, 40))

        def forward(self, x):
            return F.linear(x, self.w)

    m = SavesX()
    assert H.saved_activation_bytes(lambda: m(x), m)["saved_bytes"] == x.numel() * 4


def test_peak_bytes_sees_a_large_temporary():
    def fn():
        t = torch.ones(1024, 1024)  # 4 MiB, freed before returning
        return float(t.sum())

    peak = H.peak_bytes(fn, torch.device("cpu"))
    assert 4 * 1024**2 <= peak < 5 * 1024**2


def test_interleaved_rounds_record_every_method_and_paired_ratios():
    calls = []
    inter = H.Interleaved({"frozen": lambda: calls.append("f"), "other": lambda: calls.append("o")},
                          torch.device("cpu"))
    for _ in range(4):
        inter.run_round()
    s = inter.summary("frozen")
    assert s["frozen"]["rounds"] == s["other"]["rounds"] == 4 and len(calls) == 8
    assert s["frozen"]["ratio_to_frozen"] == 1.0 and s["other"]["ratio_to_frozen"] > 0


def test_interleaved_inner_calls_average_into_one_sample():
    calls = []
    inter = H.Interleaved({"frozen": lambda: calls.append("f"), "other": lambda: calls.append("o")},
                          torch.device("cpu"), inner=5)
    for _ in range(3):
        inter.run_round()
    assert len(calls) == 30 and all(len(v) == 3 for v in inter.samples.values())
    assert inter.subset({"o": "other"}).summary("o")["o"]["inner"] == 5


def test_budget_rank_and_svft_factors():
    assert H.lora_budget_rank(576, 576) == 16 and H.lora_budget_rank(1536, 576) == 23
    assert H.lora_budget_rank(576, 1536) == 9 and H.lora_budget_rank(192, 576) == 8
    base, f = H.make_base(64, 32, torch.device("cpu"))
    torch.testing.assert_close((f["u"] * f["s"]) @ f["vh"], base.weight, atol=1e-5, rtol=1e-5)
    svft = H.svft_layer(H.fresh_copy(base), f, "plain", 0)
    assert svft.num_coefficients == 32
