"""SVFT (Lingam et al., NeurIPS 2024, arXiv 2405.19597): the baseline PiCa is compared against.

SVFT keeps the full thin SVD ``W = U diag(σ) Vh`` of each targeted weight
frozen and trains a sparse ``n x n`` coefficient matrix ``M`` (``n = min(out,
in)``) over ``diag(σ)``. Every forward rebuilds the dense weight::

    W' = U (diag(σ) + sigmoid(g) * M) Vh            (out, in)
    y  = x @ W'.T + b

This file follows the public code (github.com/VijayLingam95/SVFT,
``svft/svft_layers.py``) in everything that affects cost or parameter counts;
what differs is only how the sparse product is written (no ``torch_sparse``):

* The original ``nn.Linear`` weight is dropped; ``U`` (out, n), ``σ`` (n,)
  and ``Vh`` (n, in) are stored instead (frozen). ``W'`` is rebuilt at every
  forward and, since it depends on the trainable ``M``, autograd keeps it (and
  ``diag(σ+gM) Vh``) for the backward: during training SVFT holds
  ``U + Vh + W' + (n, in)``, i.e. ``(1 + min/max)·|W|`` frozen plus ``≥ |W|``
  saved per layer. ``keep_base=True`` keeps ``W`` and rebuilds only
  ``ΔW = U (sigmoid(g) M) Vh`` (exact base output at ``M = 0``, one more ``|W|``).
* Patterns of ``M`` (indices are fixed buffers, values ``m_values`` trainable):
  ``"plain"`` the diagonal (SVFT_P, ``n`` values); ``"banded"`` with
  ``off_diag=d`` the ``|i-j| <= d`` band (SVFT_B^d, ``n(2d+1) - d(d+1)``
  values; ``d = 0`` is plain); ``"random"`` the same count of uniformly drawn
  (row, col) pairs, duplicates allowed and summed as in ``torch_sparse``
  (SVFT_R^d); ``"top_k"`` the same count of entries with the largest
  ``U @ Vh.T`` coefficient for a square weight, else of whichever of ``U``,
  ``Vh`` is square (SVFT_T^k; the public code's rule, kept as is).
* Initialisation (``init="official"``): ``m_values`` from
  ``kaiming_normal_`` on a ``(1, k)`` view (std ``sqrt(2/k)``) and a trainable
  scalar gate ``g = 0``, so ``sigmoid(g) = 0.5`` and the adapted layer does
  NOT start exactly at the base layer. ``init="zero"`` zeroes ``m_values``
  (the layer then reproduces the base, to SVD round-off without
  ``keep_base``). Trainable per layer: ``k`` coefficients + 1 gate.
* ``rank``: keep only the top ``rank`` singular triplets (as the public code;
  this truncates ``W`` itself unless ``keep_base``).

Cost: rebuilding ``W'`` is ``out·in·n`` multiply-adds per forward and about
twice that in the backward (``dM`` needs ``U.T @ dW' @ Vh.T``), whatever the
number of tokens ``T``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PATTERNS = ("plain", "banded", "random", "top_k")


def num_coefficients(n: int, pattern: str = "plain", off_diag: int = 0) -> int:
    """Number of trainable entries of ``M`` for an ``n x n`` coefficient matrix."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    d = 0 if pattern == "plain" else off_diag
    if d < 0:
        raise ValueError(f"off_diag must be >= 0, got {off_diag}")
    d = min(d, n - 1)
    return n * (2 * d + 1) - d * (d + 1)


def _pattern_indices(
    pattern: str,
    n: int,
    off_diag: int,
    u: torch.Tensor,
    vh: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the trainable entries of M, each (k,) int64 on the CPU."""
    k = num_coefficients(n, pattern, off_diag)
    if pattern == "plain":
        idx = torch.arange(n)
        return idx, idx.clone()
    if pattern == "banded":
        d = min(off_diag, n - 1)
        i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        mask = (i - j).abs() <= d
        return i[mask].contiguous(), j[mask].contiguous()
    if pattern == "random":
        rows = torch.randint(0, n, (k,), generator=generator)
        cols = torch.randint(0, n, (k,), generator=generator)
        return rows, cols
    # top_k: the public code's coefficient matrix, verbatim in meaning.
    if u.shape[0] == u.shape[1] and vh.shape[0] == vh.shape[1]:
        coeffs = u @ vh.T
    else:
        coeffs = u if u.shape[0] == u.shape[1] else vh
    top = torch.topk(coeffs.detach().reshape(-1).cpu().float(), k).indices
    return top // coeffs.shape[1], top % coeffs.shape[1]


class SVFTLinear(nn.Module):
    """A linear layer adapted with SVFT. See the module docstring for the math and the choices.

    Args:
        base: the ``nn.Linear`` to adapt (weight (out, in), optional bias).
        pattern: "plain", "banded", "random" or "top_k".
        off_diag: ``d`` of banded/random/top_k (ignored for plain).
        rank: keep the top ``rank`` singular triplets (default all ``min(out, in)``).
        init: "official" (kaiming-normal values, gate 0) or "zero".
        keep_base: keep ``W`` and add ``ΔW = U (g M) Vh`` instead of rebuilding ``W'`` from ``σ``.
        factors: precomputed ``(U (out, n), σ (n,), Vh (n, in))`` (skips the SVD; benchmarks
            pass synthetic factors). On the meta device no SVD runs either.
        seed: seed of the random pattern and of the official initialisation.

    Shapes: input (..., in) -> output (..., out).
    """

    def __init__(
        self,
        base: nn.Linear,
        pattern: str = "plain",
        off_diag: int = 0,
        *,
        rank: int | None = None,
        init: str = "official",
        keep_base: bool = False,
        factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be nn.Linear, got {type(base).__name__}")
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
        if init not in ("official", "zero"):
            raise ValueError(f"init must be 'official' or 'zero', got {init!r}")
        weight = base.weight
        self.out_features, self.in_features = weight.shape
        full = min(self.out_features, self.in_features)
        n = full if rank is None else min(int(rank), full)
        if n <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        self.n, self.pattern, self.off_diag, self.keep_base = n, pattern, off_diag, keep_base
        device, dtype = weight.device, weight.dtype
        meta = device.type == "meta"
        gen = torch.Generator().manual_seed(seed)

        if meta:
            u = torch.empty(self.out_features, n, device=device, dtype=dtype)
            s = torch.empty(n, device=device, dtype=dtype)
            vh = torch.empty(n, self.in_features, device=device, dtype=dtype)
            k = num_coefficients(n, pattern, off_diag)
            rows = cols = torch.empty(k, dtype=torch.long, device=device)
        else:
            if factors is None:
                u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
            else:
                u, s, vh = factors
            u, s, vh = u[:, :n], s[:n], vh[:n]
            u = u.detach().to(device=device, dtype=dtype).contiguous()
            s = s.detach().to(device=device, dtype=dtype).contiguous()
            vh = vh.detach().to(device=device, dtype=dtype).contiguous()
            rows, cols = _pattern_indices(pattern, n, off_diag, u, vh, gen)
            rows, cols = rows.to(device), cols.to(device)

        self.register_buffer("u", u)
        self.register_buffer("s", s)
        self.register_buffer("vh", vh)
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)
        # Plain (and banded d=0) M is the diagonal: scale rows instead of scatter-adding.
        self._diagonal = pattern == "plain" or (pattern == "banded" and off_diag == 0)
        # M values in float32 at least (as PEFT keeps adapter weights), the gate a float32 scalar.
        m_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        values = torch.zeros(rows.shape[0], device=device, dtype=m_dtype)
        if init == "official" and not meta:
            std = math.sqrt(2.0 / max(1, values.numel()))  # kaiming_normal_ on a (1, k) view: fan_in = k
            values = (torch.randn(values.shape, generator=gen, dtype=torch.float64) * std).to(device, m_dtype)
        self.m_values = nn.Parameter(values)
        self.gate = nn.Parameter(torch.zeros(1, device=device, dtype=m_dtype))
        if keep_base:
            self.register_buffer("weight", weight.detach())
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)

    @property
    def num_coefficients(self) -> int:
        return self.m_values.numel()

    def _scaled_rows(self, diag: torch.Tensor | None) -> torch.Tensor:
        """``(diag(σ or 0) + g M) @ Vh``, (n, in): the sparse product, as torch_sparse's spmm would do it."""
        g = torch.sigmoid(self.gate).to(self.vh.dtype)
        vals = self.m_values.to(self.vh.dtype) * g
        if self._diagonal:
            scale = vals if diag is None else diag + vals
            return scale[:, None] * self.vh
        base = torch.zeros_like(self.vh) if diag is None else diag[:, None] * self.vh
        return base.index_add(0, self.rows, vals[:, None] * self.vh[self.cols])

    def dense_weight(self) -> torch.Tensor:
        """The weight used by the forward, (out, in), rebuilt from the factors."""
        if self.keep_base:
            return self.weight + self.u @ self._scaled_rows(None)
        return self.u @ self._scaled_rows(self.s)

    def delta_weight(self) -> torch.Tensor:
        """``U (g M) Vh``, (out, in)."""
        return self.u @ self._scaled_rows(None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, n={self.n}, pattern={self.pattern}, "
                f"off_diag={self.off_diag}, coefficients={self.num_coefficients}, keep_base={self.keep_base}")


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def apply_svft(
    model: nn.Module,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    pattern: str = "plain",
    off_diag: int = 0,
    **kwargs,
) -> nn.Module:
    """Replace every ``nn.Linear`` whose name ends with one of ``target_modules`` (on "." boundaries)
    by an :class:`SVFTLinear`, freeze everything else, return the model (modified in place).

    Works on a meta-device model (shapes only, no SVD) for parameter counting.
    """
    targets = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and any(_suffix_match(name, t) for t in target_modules)
    ]
    if not targets:
        raise ValueError(f"no nn.Linear matches {list(target_modules)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SVFTLinear(mod, pattern, off_diag, **kwargs))
    return model


def svft_counts(model: nn.Module) -> dict[str, int]:
    """Coefficients of M, gates, and frozen factor entries (U, σ, Vh) over all SVFT layers of a model."""
    layers = [m for m in model.modules() if isinstance(m, SVFTLinear)]
    return {
        "layers": len(layers),
        "coefficients": sum(m.num_coefficients for m in layers),
        "gates": sum(m.gate.numel() for m in layers),
        "frozen_factors": sum(m.u.numel() + m.s.numel() + m.vh.numel() for m in layers),
    }
