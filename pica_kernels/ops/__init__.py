"""Ops of pica_kernels, one per file (kernel, launcher, custom op and autograd together).

``lowrank_linear`` is the backend entry point (``y = x@W.T + (x@B.T)@A.T + b``,
any factor trainable); ``pica_linear`` maps PiCa's basis and ``M`` onto it.
Which implementation runs (Triton or the reference) is decided per call by
:func:`pica_kernels.ops.backend.resolve_backend`.
"""

from .backend import resolve_backend
from .lowrank_linear import lowrank_linear
from .pica_linear import pica_linear

__all__ = ["lowrank_linear", "pica_linear", "resolve_backend"]
