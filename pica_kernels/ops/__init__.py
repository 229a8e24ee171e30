"""Ops of pica_kernels, one per file (kernel, launcher, custom op and autograd together).

``lowrank_linear`` is the backend entry point (``y = x@W.T + (x@B.T)@A.T + b``,
any factor trainable); ``pica_linear`` maps PiCa's basis and ``M`` onto it;
``grouped_lowrank_linear`` shares one shrink launch between projections of
the same input (q/k/v); ``multitask_pica_linear`` serves one adapter per
sequence with the basis shared.
Which implementation runs (Triton or the reference) is decided per call by
:func:`pica_kernels.ops.backend.resolve_backend`.
"""

from .backend import resolve_backend
from .grouped import grouped_lowrank_linear
from .lowrank_linear import lowrank_linear
from .multitask import multitask_pica_linear
from .pica_linear import pica_linear

__all__ = ["grouped_lowrank_linear", "lowrank_linear", "multitask_pica_linear", "pica_linear", "resolve_backend"]
