"""PiCa as a PEFT method: ``peft.get_peft_model(model, PiCaPeftConfig(r=32))``.

Importing this package registers the method "pica" with PEFT (see
``_register.py`` for the small shim PEFT's closed ``PeftType`` enum needs), so
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` understand
saved PiCa adapters as long as ``pica_kernels.peft`` has been imported.
Requires the ``peft`` extra (``pip install pica_kernels[peft]``).
"""

from ._register import PEFT_NAME, ensure_peft_type, register
from .config import DEFAULT_TARGET_MODULES, PiCaPeftConfig
from .layer import PiCaPeftLinear
from .model import BasisMismatchError, PiCaPeftModel

register()

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "PEFT_NAME",
    "BasisMismatchError",
    "PiCaPeftConfig",
    "PiCaPeftLinear",
    "PiCaPeftModel",
    "ensure_peft_type",
    "register",
]
