"""Ops of pica_kernels, one per file (kernel, launcher and autograd together).

Today every op runs the pure-PyTorch reference; the Triton kernels of
DESIGN.md section 3 plug in here, behind the same names and signatures.
"""

from .pica_linear import pica_linear

__all__ = ["pica_linear"]
