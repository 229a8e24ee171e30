"""Ops of pica_kernels: one module per op, each holding its entry point(s), ``torch.library`` custom op
(namespace ``pica``, ``torch.ops.pica.*``) and autograd.

* :func:`lowrank_linear` and :func:`pica_linear` (:mod:`.lowrank`) -- ``y = x@W.T + (x@B.T)@A.T + b``, any
  factor trainable; PiCa's basis and ``M`` mapped onto it;
* :func:`grouped_lowrank_linear` (:mod:`.grouped`) -- projections sharing one input (q/k/v) with one shrink
  launch;
* :func:`multitask_pica_linear` (:mod:`.multitask`) -- one adapter per sequence, the basis shared.

Shared by all of them: :mod:`.checks` (each argument checked once, at the entry point), :mod:`.dispatch`
(autocast at the entry; the eager path or the custom op; inside the op the Triton launches, a kernel
fallback or the reference), :mod:`.backend` (which implementation a call runs), :mod:`.eager` (the CPU
eager path) and :mod:`.kernels` (the Triton kernel, its launchers, configs, rank padding and tuned table).
The math they implement is :mod:`pica_kernels.reference`.
"""

from .backend import resolve_backend
from .grouped import grouped_lowrank_linear
from .lowrank import lowrank_linear, pica_linear
from .multitask import multitask_pica_linear

__all__ = ["grouped_lowrank_linear", "lowrank_linear", "multitask_pica_linear", "pica_linear", "resolve_backend"]
