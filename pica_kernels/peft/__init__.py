"""PiCa as a PEFT method: ``peft.get_peft_model(model, PiCaPeftConfig(r=32))``.

Importing this package registers the method "pica" with PEFT (see
``_register.py`` for the small shim PEFT's closed ``PeftType`` enum needs), so
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` understand
saved PiCa adapters as long as ``pica_kernels.peft`` has been imported.
Requires the ``peft`` extra (``pip install pica_kernels[peft]``).
"""

from ..core.imports import import_quietly

# PEFT imports transformers, and through it torchao and bitsandbytes: imported here first, without the known
# messages of optional kernels that cannot load on this machine (pica_kernels.core.imports).
import_quietly("peft")

from ._register import register  # noqa: E402
from .config import DEFAULT_TARGET_MODULES, PiCaPeftConfig  # noqa: E402
from .layer import PiCaPeftLinear  # noqa: E402
from .model import PiCaPeftModel  # noqa: E402
from .peft_type import PEFT_NAME, ensure_peft_type  # noqa: E402

register()

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "PEFT_NAME",
    "PiCaPeftConfig",
    "PiCaPeftLinear",
    "PiCaPeftModel",
    "ensure_peft_type",
    "register",
]
