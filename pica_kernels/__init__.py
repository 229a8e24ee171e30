"""pica_kernels: fast, tested PiCa fine-tuning (arXiv 2505.20211).

Public API (see README.md):

    PiCaConfig, apply_pica, PiCaLinear       build
    parameter_report                         count trainable M and frozen bases
    save_adapter, load_adapter               adapter files (safetensors + JSON)
    export_lora                              write the adapter as a standard PEFT LoRA adapter (LoRA servers)
    merge, unmerge, merge_and_unload         fold ΔW into the base weights
    set_adapter, disable_adapter, delete_adapter   several adapters on one model
    truncated_svd, pica_linear               the ops
    lowrank_linear                           backend entry point: y = x@W.T + (x@B.T)@A.T + b
    mixed_batch                              one adapter per sequence of a batch
    PiCaError, AdapterMismatchError          errors (AdapterMismatchError and PiCaConfigError are PiCaErrors
    PiCaConfigError                          and ValueErrors)
    cache                                    the on-disk basis cache (PICA_KERNELS_CACHE; cache.clear())
"""

from . import cache
from ._version import __version__ as __version__
from .core.errors import AdapterMismatchError, PiCaConfigError, PiCaError
from .native.apply import apply_pica
from .native.config import PiCaConfig
from .native.export import export_lora
from .native.files import load_adapter, save_adapter
from .native.layer import PiCaLinear, mixed_batch
from .native.model import (
    delete_adapter,
    disable_adapter,
    merge,
    merge_and_unload,
    set_adapter,
    unmerge,
)
from .native.report import parameter_report
from .ops import lowrank_linear, pica_linear
from .svd import truncated_svd

__all__ = [
    "AdapterMismatchError",
    "PiCaConfig",
    "PiCaConfigError",
    "PiCaError",
    "PiCaLinear",
    "apply_pica",
    "cache",
    "delete_adapter",
    "disable_adapter",
    "export_lora",
    "load_adapter",
    "lowrank_linear",
    "merge",
    "merge_and_unload",
    "mixed_batch",
    "parameter_report",
    "pica_linear",
    "save_adapter",
    "set_adapter",
    "truncated_svd",
    "unmerge",
]
