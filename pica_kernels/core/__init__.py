"""The adapter core shared by the native front end (``apply_pica`` & co.) and the PEFT tuner.

``bank``      where ``M`` lives (once per model) and each layer's view of it
``base``      which layers can be adapted, their weight as (out, in), a given basis checked and stored
``targets``   target matching, roles, group keys, per-module ranks
``merge``     delta weight, exact stacking merge / bit-exact unmerge
``forward``   a layer's whole forward and the mixed-task forward (dispatch to the ops)
``files``     fingerprints and the whole-file checks of adapter files
``defaults``  defaults and reserved names
``errors``    ``PiCaError`` and its subclasses
``imports``   the optional libraries imported without their known import-time noise
"""

from .errors import AdapterMismatchError, PiCaConfigError, PiCaError

__all__ = ["AdapterMismatchError", "PiCaConfigError", "PiCaError"]
