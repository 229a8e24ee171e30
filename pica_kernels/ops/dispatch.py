"""How a call of an op reaches an implementation: autocast at the entry, then the eager path or the custom op,
and inside the custom op the Triton launches or the reference math.

* Autocast (:func:`follows_autocast`, below): every entry point casts for autocast before anything else.
* :func:`use_eager`: on CPU tensors outside ``torch.compile``, with the backend resolving to the reference,
  an entry point calls :mod:`.eager` directly (no custom-op round trip).
* :func:`run_op`: the body of every custom op -- the Triton launches when the backend resolves to
  ``triton``; a shape class whose kernel failed to compile or launch (:class:`~.kernels.launchers.KernelFallback`,
  warned once) and every other case run the reference math with autocast off, its saved ``t`` laid out as the
  kernels lay it out (a fake kernel promises one layout, whichever branch runs).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable

import torch

from .backend import resolve_backend
from .kernels.launchers import KernelFallback

# ------------------------------------------------------------------- autocast
# PiCa follows autocast as nn.Linear does. Inside ``torch.autocast(device, dtype)`` the operands autocast would
# cast for F.linear -- x, the frozen weight and the bias, where floating point and not float64 -- run in the
# region's dtype (bf16 or fp16); the output is in that dtype. The factors are NOT cast by autocast: an fp32 ``M``
# (and basis) stays fp32, is cast for the GEMMs by :func:`.eager.cast_factor` (once per change), and ``dM`` is
# accumulated in fp32 and returned fp32 -- autocast's own cast of M would put a cast node in the graph and round
# dM to bf16. The math then runs with autocast off: every GEMM is written for the dtypes it is handed
# (``reference.mm_fp32`` would otherwise be cast back to bf16, and ``addmm_`` into a bf16 output refuses an fp32
# operand). The public entry points (pica_kernels.ops, and eager.lowrank_linear / lowrank_term) do the cast, through
# follows_autocast; the custom ops run in their inputs' dtypes with autocast off inside.


def autocast_dtype(x) -> torch.dtype | None:
    """The dtype of the autocast region enabled for ``x``'s device type, or None outside one (or for a
    device type autocast does not know, e.g. meta)."""
    # One C call answers the common case (no region anywhere) before the per-device queries: the entry points
    # and the layers ask on every call.
    if not torch._C._is_any_autocast_enabled() or not isinstance(x, torch.Tensor):
        return None
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def autocast_operand(v, dtype: torch.dtype | None):
    """``v`` as autocast hands an operand of F.linear to the GEMM in a ``dtype`` region: a floating-point
    tensor other than float64 cast to ``dtype``; anything else (None, float64, integers, a non-tensor that the
    argument checks will refuse) unchanged. A list or tuple is cast item by item (grouped weights)."""
    if isinstance(v, (list, tuple)):
        return type(v)(autocast_operand(item, dtype) for item in v)
    if dtype is None or not isinstance(v, torch.Tensor) or not v.is_floating_point() \
            or v.dtype in (dtype, torch.float64):
        return v
    return v.to(dtype)


def compute_dtype(v: torch.Tensor) -> torch.dtype:
    """The dtype ``v`` (x or a frozen weight) takes in a linear layer's GEMM under the current autocast state."""
    amp = autocast_dtype(v)
    return amp if amp is not None and v.is_floating_point() and v.dtype != torch.float64 else v.dtype


def autocast_off(x: torch.Tensor):
    """A context with autocast off for ``x``'s device type (a no-op context where it is off already)."""
    if autocast_dtype(x) is None:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def follows_autocast(*operands: str):
    """Decorate an entry point whose parameters ``operands`` (x first; the frozen weight(s) and bias(es)) are
    what autocast casts for F.linear: inside a region they are cast (:func:`autocast_operand`) and the function
    runs with autocast off; outside one it is called as is (one C call decides)."""

    def wrap(fn):
        position = {name: i for i, name in enumerate(inspect.signature(fn).parameters)}

        @functools.wraps(fn)
        def entry(*args, **kwargs):
            x = args[0] if args else kwargs[operands[0]]
            amp = autocast_dtype(x)
            if amp is None:
                return fn(*args, **kwargs)
            args = list(args)
            for name in operands:
                if position[name] < len(args):
                    args[position[name]] = autocast_operand(args[position[name]], amp)
                elif name in kwargs:
                    kwargs[name] = autocast_operand(kwargs[name], amp)
            with torch.autocast(x.device.type, enabled=False):
                return fn(*args, **kwargs)

        return entry

    return wrap


# ------------------------------------------------------------------- dispatch
def use_eager(backend: str, x: torch.Tensor) -> bool:
    """True when an entry point should run :mod:`.eager` directly: CPU tensors, not being traced by
    ``torch.compile``/``torch.export``, and the backend rule resolving to the reference. The eager path's
    own autograd (closed-form backward, same saved tensors) then replaces the custom-op round trip, which
    cost more than the math at small T on CPU. Under compilation, and wherever the kernels may run, the
    custom op stays (its fake kernel and schema are what ``torch.compile`` and ``opcheck`` need)."""
    return (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and resolve_backend(backend, x.device, x.dtype) == "reference"
    )


def run_op(backend: str, x: torch.Tensor, kernel: Callable, reference: Callable, layout: Callable | None = None):
    """The body of a custom op: ``kernel()`` (the Triton launches) when ``backend`` resolves to ``triton`` for
    ``x`` and its shape class compiles and launches, else ``layout(reference())`` run with autocast off (the op
    computes in its inputs' dtypes whatever region calls it); ``layout`` (default: none) lays the reference's
    outputs out as the kernels lay them out."""
    if resolve_backend(backend, x.device, x.dtype) == "triton":
        try:
            return kernel()
        except KernelFallback:
            pass  # this shape class failed to compile or launch (warned once): the reference runs it
    with autocast_off(x):
        out = reference()
    return out if layout is None else layout(out)
