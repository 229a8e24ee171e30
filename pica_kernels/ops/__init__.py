"""Ops of pica_kernels.

Public entry points (argument checks, then dispatch), one module each, none
named like the function it holds:

* :func:`lowrank_linear` (:mod:`.lowrank`) -- the backend entry point,
  ``y = x@W.T + (x@B.T)@A.T + b``, any factor trainable;
* :func:`pica_linear` (:mod:`.pica`) -- PiCa's basis and ``M`` mapped onto it;
* :func:`grouped_lowrank_linear` (:mod:`.grouped`) -- projections sharing one
  input (q/k/v) with one shrink launch;
* :func:`multitask_pica_linear` (:mod:`.multitask`) -- one adapter per
  sequence, the basis shared.

:mod:`.custom_ops` holds the ``torch.library`` ops and autograd of
``lowrank_linear``; :mod:`.kernels` the Triton kernel (:mod:`.kernels.lowrank_gemm`),
its configs (:mod:`.kernels.configs`) and launchers (:mod:`.kernels.launchers`).
Which implementation runs (Triton or the reference) is decided per call by
:func:`pica_kernels.ops.backend.resolve_backend`.
"""

from .backend import resolve_backend
from .grouped import grouped_lowrank_linear
from .lowrank import lowrank_linear
from .multitask import multitask_pica_linear
from .pica import pica_linear

__all__ = ["grouped_lowrank_linear", "lowrank_linear", "multitask_pica_linear", "pica_linear", "resolve_backend"]
