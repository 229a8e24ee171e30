"""Which implementation an op runs: the pure-PyTorch reference or the Triton kernels.

Dispatch rule (every op of :mod:`pica_kernels.ops` follows it):

1. An explicit ``backend="reference"`` or ``backend="triton"`` argument wins.
2. Otherwise (``backend="auto"``, the default) the environment variable
   ``PICA_KERNELS_BACKEND`` (``reference`` | ``triton`` | ``auto``) decides.
3. ``auto``: Triton for CUDA tensors when ``triton`` imports, the reference
   otherwise (CPU tensors, or no Triton).
4. Whatever was asked, float64 (and any dtype other than fp16/bf16/fp32) runs
   the reference: the kernels are written for the training dtypes, and the
   interpreter's float64 ``tl.dot`` returned NaN when tried (triton 3.9).
5. A GPU older than sm_80 (sm_75, T4) runs the reference (cuBLAS) unless
   ``triton`` was asked for explicitly (argument or environment variable),
   with a one-time warning naming the GPU and why: Triton emits no tensor-core
   MMA instruction for Turing (every ``tl.dot`` becomes FMA, with register
   spills of KBs; docs/kernels.md), so the kernels run there far slower than
   cuBLAS. bf16 there never runs the kernels (no bf16 tensor cores: they do
   not compile): the reference, or an error when ``triton`` was asked for
   explicitly or ``PICA_KERNELS_STRICT=1``.

``triton`` on CPU tensors is allowed only under the Triton CPU interpreter
(``TRITON_INTERPRET=1`` in the environment); this is how the tests run the
kernels on machines without a GPU. Asking for ``triton`` where it cannot run
raises instead of silently falling back. A launch that fails on the user's
GPU (compile error, out of resources) falls back per shape class; see
:mod:`pica_kernels.ops.kernels.launchers`.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from .env import env_flag
from .kernels.configs import bf16_tensor_cores, device_props
from .kernels.launchers import STRICT_ENV_VAR, strict_mode

BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "PICA_KERNELS_BACKEND"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return env_flag("TRITON_INTERPRET")


@functools.cache
def triton_library_compiled() -> bool:
    """True when ``triton.language``'s own jitted functions were decorated in compiler mode.

    ``triton.jit`` picks interpreter or compiler mode when it decorates; triton's library functions are
    decorated once, at ``import triton``. If ``TRITON_INTERPRET=1`` was set only after that, the kernels
    (decorated later, interpreted) call a compiled ``tl.cdiv``, which fails inside every program with Triton's
    "Cannot call @triton.jit'd outside of the scope of a kernel".
    """
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return isinstance(tl.cdiv, JITFunction)


def triton_can_run(device: torch.device) -> bool:
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """``"reference"`` or ``"triton"`` for ``dtype`` tensors on ``device`` (rule in the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    explicit = backend == "triton"
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    if dtype is not None and dtype not in KERNEL_DTYPES:
        return "reference"
    explicit = explicit or backend == "triton"
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "reference"
    elif backend == "triton" and not triton_can_run(device):
        why = (
            "triton is not installed (pip install 'pica_kernels[triton]')"
            if not triton_available()
            else f"tensors are on {device}; Triton runs on CUDA, or on CPU only with TRITON_INTERPRET=1"
        )
        raise RuntimeError(f"backend 'triton' was requested but cannot run: {why}")
    if backend == "triton" and device.type == "cpu" and triton_library_compiled():
        raise RuntimeError(
            "triton was imported before TRITON_INTERPRET=1 was set: its own jitted functions (tl.cdiv ...) "
            "were decorated in compiler mode and the interpreted kernels cannot call them; set "
            "TRITON_INTERPRET=1 before anything imports triton (torch._dynamo, hence transformers, does)"
        )
    if backend == "triton" and dtype == torch.bfloat16 and device.type == "cuda":
        props = device_props(device)
        if not bf16_tensor_cores(props):
            message = (f"{props.name} ({props.arch}) has no bf16 tensor cores: the Triton kernels do not "
                       f"compile for bf16 there")
            if explicit or strict_mode():
                why = "backend 'triton' was requested" if explicit else f"{STRICT_ENV_VAR}=1"
                raise RuntimeError(f"pica_kernels: {message} ({why}); use fp16 or backend='reference'")
            if props.name not in _WARNED_NO_BF16:
                _WARNED_NO_BF16.add(props.name)
                warnings.warn(f"pica_kernels: {message}; bf16 runs the reference (PyTorch) path on it.",
                              RuntimeWarning, stacklevel=3)
            return "reference"
    if backend == "triton" and device.type == "cuda" and not explicit:
        props = device_props(device)
        if props.capability < FAST_CAPABILITY:
            if props.name not in _WARNED_SLOW:
                _WARNED_SLOW.add(props.name)
                warnings.warn(f"pica_kernels: {props.name} ({props.arch}) runs the reference (cuBLAS) path: "
                              "Triton emits no tensor-core MMA instruction before sm_80 (every tl.dot becomes "
                              "FMA, with register spills), so the kernels are far slower than cuBLAS there. "
                              f"backend='triton' or {ENV_VAR}=triton runs them anyway (fp16 / fp32).",
                              RuntimeWarning, stacklevel=3)
            return "reference"
    return backend


_WARNED_NO_BF16: set[str] = set()
_WARNED_SLOW: set[str] = set()
#: The oldest architecture the kernels run on by default (Ampere: tensor-core MMA from Triton).
FAST_CAPABILITY = (8, 0)
