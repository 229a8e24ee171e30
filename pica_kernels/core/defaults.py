"""Defaults shared by the native and the PEFT front end."""

from __future__ import annotations

import torch

from .errors import PiCaConfigError

#: The paper's targets: q, k, v, up and down projections.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")

#: In a mixed batch's ``adapter_names``: this sequence uses the base model alone.
BASE_ADAPTER = "__base__"

#: Default method of :func:`pica_kernels.truncated_svd` for bases.
DEFAULT_SVD_METHOD = "accurate"

# Max |fingerprint difference| accepted per basis dtype. Fingerprint entries are
# O(1) (unit vectors against N(0,1) probes); rounding a basis to the dtype
# moves them by about eps/2 (bf16: ~1e-3), a drifted basis by O(1).
FINGERPRINT_ATOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_m_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """dtype of a new ``M``: float32 (also for half-precision bases, as PEFT keeps adapter weights),
    float64 for a float64 base."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def check_adapter_name(name: object) -> str:
    """An adapter name must be a non-empty str without '.', '/' or '\\', and not the mixed-batch sentinel.

    '.' would split state_dict keys; '/' and '\\' would make a path of the name where a front end saves an adapter
    under its name (PEFT writes a non-default adapter to ``<save dir>/<name>``: ``/abs/path`` would escape it)."""
    if not isinstance(name, str) or not name:
        raise PiCaConfigError(f"adapter_name must be a non-empty str, got {name!r}")
    if name == BASE_ADAPTER:
        raise PiCaConfigError(f"adapter_name {BASE_ADAPTER!r} is reserved (it marks base-model rows of a mixed batch)")
    for bad in (".", "/", "\\"):
        if bad in name:
            raise PiCaConfigError(f"adapter_name must not contain {bad!r}, got {name!r}")
    return name
