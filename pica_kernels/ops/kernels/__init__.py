"""Triton kernels of the ops, their configs and launchers.

* :mod:`.lowrank_gemm` -- the ``@triton.jit`` kernel(s), at module level so they
  can be reached by name (ahead-of-time compiles, autotuning). Importing it
  imports triton and decorates the kernels ONCE, in interpreter or compiler
  mode depending on ``TRITON_INTERPRET`` at that moment; the launchers import it
  lazily, on the first launch, so ``import pica_kernels`` needs no triton.
* :mod:`.configs` -- the kernel's modes, block sizes per regime as
  ``triton.Config``, and the test override (no triton needed to import).
* :mod:`.launchers` -- argument plumbing from torch tensors to a launch:
  strides, grid, split-K, and the forward/backward launch sequences.
* :mod:`.padding` -- ranks padded to a multiple of 16 for the launches (the
  JIT's divisibility hints): zero-padded factors cached per tensor version.
"""
