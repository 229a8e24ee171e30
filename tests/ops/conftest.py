"""Kernel tests: the Triton kernels against the float64 reference, under the CPU interpreter.

Without a GPU, Triton runs only in its interpreter, on CPU tensors, and only
if ``TRITON_INTERPRET=1`` is set before a kernel is built; it is set here, at
collection time (pica_kernels builds its kernels lazily, on first launch, so
an earlier ``import pica_kernels`` does not matter). The tests then force the
kernel path with ``backend="triton"``.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The module, not the function of the same name that pica_kernels.ops re-exports.
ll = importlib.import_module("pica_kernels.ops.lowrank_linear")


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an element left unwritten fails the test."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ll, "alloc", poisoned)
