"""Triton kernels of the ops, their configs and launchers.

* :mod:`.lowrank_gemm` -- the ``@triton.jit`` kernel(s), at module level so they
  can be reached by name (ahead-of-time compiles, autotuning). Importing it
  imports triton and decorates the kernels ONCE, in interpreter or compiler
  mode depending on ``TRITON_INTERPRET`` at that moment; the launchers import it
  lazily, on the first launch, so ``import pica_kernels`` needs no triton.
* :mod:`.launchers` -- argument plumbing from torch tensors to a launch:
  strides, grid, split-K, the forward / backward / grouped / multi-task launch
  sequences, and :func:`~.launchers.select_config` (the config of a launch).
* :mod:`.configs` -- the kernel's modes and the per-regime heuristic (block
  sizes fitted to a device's shared memory), and the test override.
* :mod:`.tuned` -- the table of configs tuned on real GPUs, looked up first.
* :mod:`.autotune` -- run-time autotuning (``PICA_KERNELS_AUTOTUNE=1``) and the
  candidate configs a tuning sweep times.
* :mod:`.padding` -- ranks padded to a multiple of 16 for the launches (the
  JIT's divisibility hints): zero-padded factors cached per tensor version.

Imports point down: launchers -> autotune -> tuned -> configs; padding stands alone.
"""
