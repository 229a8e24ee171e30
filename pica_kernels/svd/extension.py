"""Which implementation of the SVD core runs: the C++ extension ``pica_kernels._C`` or the torch twin.

The extension (csrc/, built by setup.py into ``pica_kernels/_C*.so``) registers
``torch.ops.pica.truncated_svd_core``; without it, :mod:`pica_kernels.svd.torch_core`
makes the same ATen calls in the same order. ``PICA_SVD_BACKEND=torch`` forces the
twin; ``PICA_REQUIRE_CPP=1`` makes the import fail instead of falling back (CI, GPU
scripts: a broken build cannot hide behind the twin).
"""

from __future__ import annotations

import os

import torch

try:  # absent in a pure-Python install
    from .. import _C  # noqa: F401  (registers torch.ops.pica.*)

    HAS_CPP = hasattr(torch.ops.pica, "truncated_svd_core")
    _CPP_ERROR: str | None = None if HAS_CPP else "pica_kernels._C has no truncated_svd_core op"
except ImportError as e:  # not built, or built against another torch
    HAS_CPP = False
    _CPP_ERROR = f"{type(e).__name__}: {e}"

if not HAS_CPP and os.environ.get("PICA_REQUIRE_CPP"):
    raise ImportError(f"PICA_REQUIRE_CPP is set but pica_kernels._C is not available: {_CPP_ERROR}")

BACKENDS = ("cpp", "torch")


def backend() -> str:
    """Which implementation of the SVD core runs: "cpp" (pica_kernels._C) or "torch" (fallback).

    ``PICA_SVD_BACKEND=torch`` in the environment forces the fallback.
    """
    if os.environ.get("PICA_SVD_BACKEND", "").lower() == "torch":
        return "torch"
    return "cpp" if HAS_CPP else "torch"


def backend_error() -> str | None:
    """Why the C++ extension is not available (None when it is)."""
    return _CPP_ERROR
