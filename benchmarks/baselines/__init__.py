"""Baselines PiCa is benchmarked against. PEFT's LoRA and DoRA are used as installed; SVFT lives here."""

from .svft import PATTERNS, SVFTLinear, apply_svft, num_coefficients, svft_counts

__all__ = ["PATTERNS", "SVFTLinear", "apply_svft", "num_coefficients", "svft_counts"]
