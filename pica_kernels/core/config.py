"""What both front ends' configs share: the field spellings each accepts from the other, and the checks of the fields
they have in common (``PiCaConfig`` and ``PiCaPeftConfig`` are the boundary where these values are checked; the
code behind them receives checked values)."""

from __future__ import annotations

from collections.abc import Mapping

from .. import reference
from ..svd import preset
from .targets import check_module_spec, check_rank, check_rank_pattern, check_seed

#: The native front end's field names -> the PEFT front end's; each config accepts the other's spelling
#: (``PiCaConfig(r=8, share_m=False)``, ``PiCaPeftConfig(rank=8, share=False)``).
NATIVE_TO_PEFT = {"rank": "r", "share": "share_m", "exclude": "exclude_modules"}
PEFT_TO_NATIVE = {peft: native for native, peft in NATIVE_TO_PEFT.items()}

#: Accepted values of ``check_base_model`` (``load_adapter``'s argument, ``PiCaPeftConfig``'s field).
ON_MISMATCH = ("error", "warn")


def set_aliases(config: object, aliases: Mapping[str, str], given: Mapping[str, object]) -> None:
    """Set every alias ``given`` (not None) on the field ``aliases`` names for it."""
    for alias, value in given.items():
        if value is not None:
            setattr(config, aliases[alias], value)


def check_shared_fields(config: object, rank_field: str, exclude_field: str, *, svd_method_optional: bool) -> None:
    """Check the fields both configs have, in place (``rank_pattern`` normalised to a dict): the rank (named
    ``rank_field`` in this config), ``svd_seed``, ``rank_pattern``, ``side``, ``svd_method`` (None allowed with
    ``svd_method_optional``: the PEFT tuner fills in the default) and the ``exclude_field`` spec (None allowed). ``target_modules`` differs between the
    front ends (PEFT allows None and stores a set) and is theirs to check with :func:`check_module_spec`."""
    check_rank(getattr(config, rank_field), rank_field)
    check_seed(config.svd_seed)
    config.rank_pattern = check_rank_pattern(config.rank_pattern)
    reference.check_side(config.side)
    if not (svd_method_optional and config.svd_method is None):
        preset(config.svd_method, "svd_method")  # the one check of a method name (pica_kernels.svd.presets)
    exclude = getattr(config, exclude_field)
    if exclude is not None:
        setattr(config, exclude_field, check_module_spec(exclude, exclude_field))


def check_on_mismatch(value: object, field: str = "check_base_model") -> str:
    if value not in ON_MISMATCH:
        raise ValueError(f"{field} must be 'error' or 'warn', got {value!r}")
    return value
