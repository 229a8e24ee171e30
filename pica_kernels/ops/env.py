"""On/off switches read from the environment (``PICA_KERNELS_STRICT``, ``PICA_KERNELS_TUNED``, ...)."""

from __future__ import annotations

import os

TRUE = ("1", "true", "yes", "on")


def env_flag(name: str, default: bool = False) -> bool:
    """True when the variable ``name`` is one of :data:`TRUE` (any case); ``default`` when it is unset."""
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in TRUE
