"""Make "pica" a PEFT method that PEFT's own entry points understand.

PEFT (0.21) keeps its methods in a closed ``str`` enum, ``peft.utils.PeftType``,
and ``peft.utils.register_peft_method`` refuses any name that is not a member of
it. Configs store the member (``config.peft_type``), ``save_pretrained`` writes
it to ``adapter_config.json`` and reads ``.value`` for the model card, and
``PeftConfig.from_pretrained`` / ``PeftModel.from_pretrained`` look the string
up in ``PEFT_TYPE_TO_CONFIG_MAPPING`` / ``PEFT_TYPE_TO_TUNER_MAPPING``.

The shim (``peft_type.py``) adds one real member, ``PeftType.PICA = "PICA"``, to that enum
(the same bookkeeping ``enum`` does for members defined in the class body:
``_member_map_``, ``_value2member_map_``, ``_member_names_`` and the class
attribute), then calls the public ``register_peft_method(name="pica", ...)``.
So ``PeftType("PICA")``, ``PeftType["PICA"]``, ``PeftType.PICA.value``,
iteration and ``"PICA" in list(PeftType)`` behave as for built-in members.

Both steps are idempotent (importing ``pica_kernels.peft`` twice, or reloading
it, re-points the mapping tables at the current classes instead of raising).
The upstream change that makes this shim unnecessary is described in docs/peft.md.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import PiCaPeftConfig
from .model import PiCaPeftModel
from .peft_type import PEFT_NAME, ensure_peft_type

PREFIX = "pica_"


def register() -> None:
    """Register the PiCa config and tuner with PEFT (idempotent)."""
    member = ensure_peft_type()
    if member in PEFT_TYPE_TO_TUNER_MAPPING or member in PEFT_TYPE_TO_CONFIG_MAPPING:
        # Already registered (import twice, importlib.reload): point the tables at the current classes.
        PEFT_TYPE_TO_CONFIG_MAPPING[member] = PiCaPeftConfig
        PEFT_TYPE_TO_TUNER_MAPPING[member] = PiCaPeftModel
        PEFT_TYPE_TO_PREFIX_MAPPING[member] = PREFIX
        return
    register_peft_method(name=PEFT_NAME, config_cls=PiCaPeftConfig, model_cls=PiCaPeftModel, prefix=PREFIX)
