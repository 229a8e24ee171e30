"""pica_linear rejects malformed arguments with errors naming the argument."""

import pytest
import torch

from pica_kernels import pica_linear


def _args(side="input"):
    x, w, b = torch.randn(3, 8), torch.randn(6, 8), torch.randn(6)
    basis, m = (torch.randn(2, 8), torch.randn(6, 2)) if side == "input" else (torch.randn(6, 2), torch.randn(2, 8))
    return x, w, b, basis, m


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "x": torch.randn(3, 7)}, r"x must be \(\.\.\., in=8\)"),
        (lambda a: {**a, "m": torch.randn(2, 6)}, r"m must be \(6, 2\)"),
        (lambda a: {**a, "basis": torch.randn(2, 8, 1)}, "basis and m must be 2-D"),
        (lambda a: {**a, "bias": torch.randn(5)}, r"bias must be \(6,\)"),
        (lambda a: {**a, "side": "both"}, "side must be one of"),
        (lambda a: {**a, "x": a["x"].double()}, "x has dtype torch.float64 but weight has torch.float32"),
        (lambda a: {**a, "x": a["x"].to("meta")}, "weight is on cpu but x is on meta"),
    ],
)
def test_bad_arguments(change, message):
    x, w, b, basis, m = _args()
    args = change(dict(x=x, weight=w, bias=b, basis=basis, m=m, side="input"))
    with pytest.raises((ValueError, TypeError), match=message):
        pica_linear(**args)


def test_output_side_shapes_are_checked():
    x, w, b, basis, m = _args("output")
    assert pica_linear(x, w, b, basis, m, side="output").shape == (3, 6)
    with pytest.raises(ValueError, match=r"m must be \(2, 8\)"):
        pica_linear(x, w, b, basis, m.T.contiguous(), side="output")
