"""Importing the optional libraries (PEFT and, through transformers, torchao and bitsandbytes) without their noise.

On a machine without the GPUs or the network they look for, importing them logs messages that say nothing about
the user's work: torchao cannot load its CUDA-only extensions (``Failed to load .../torchao/_C_mxfp8...``,
``_C_cutlass_90a``) and registers enums that torch now warns about (``... is an Enum subclass and is now natively
supported by torch.compile ...``); bitsandbytes, on a CPU with AVX-512 BF16, cannot fetch its optional CPU kernel
from the hub (``Failed to load CPU gemm_4bit_forward from kernels-community ... trust_remote_code``). Those exact
messages, and only while :func:`quiet_known_import_noise` is active, are dropped by a filter on the logger that
emits each one; anything else these loggers say still shows.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from types import ModuleType

#: logger name -> substrings of a message; a record of that logger containing all of one tuple is dropped.
KNOWN_NOISE: dict[str, tuple[tuple[str, ...], ...]] = {
    "torchao": (("Failed to load", "torchao", "_C"),),
    "torch.utils._pytree": (("is an Enum subclass and is now natively supported by torch.compile",),),
    "bitsandbytes.backends.cpu.ops": (("Failed to load CPU gemm_4bit_forward from kernels-community",),),
}


class _KnownNoise(logging.Filter):
    def __init__(self, patterns: tuple[tuple[str, ...], ...]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not any(all(part in msg for part in parts) for parts in self.patterns)


@contextlib.contextmanager
def quiet_known_import_noise():
    """Within the block, the known import-time messages of :data:`KNOWN_NOISE` are not emitted."""
    filters = [(logging.getLogger(name), _KnownNoise(patterns)) for name, patterns in KNOWN_NOISE.items()]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)


def import_quietly(name: str) -> ModuleType:
    """``importlib.import_module(name)`` under :func:`quiet_known_import_noise`."""
    with quiet_known_import_noise():
        return importlib.import_module(name)
