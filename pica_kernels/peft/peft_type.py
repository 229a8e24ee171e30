"""``PeftType.PICA``: the member PEFT's closed method enum needs for "pica" (see ``_register.py``)."""

from __future__ import annotations

from peft.utils.peft_types import PeftType

PEFT_NAME = "pica"
PEFT_MEMBER = "PICA"


def ensure_peft_type() -> PeftType:
    """Return ``PeftType.PICA``, adding it to PEFT's enum on first call."""
    existing = PeftType.__members__.get(PEFT_MEMBER)
    if existing is not None:
        return existing
    add_member = getattr(PeftType, "_add_member_", None)  # Python >= 3.13 has a helper
    member = str.__new__(PeftType, PEFT_MEMBER)
    member._name_ = PEFT_MEMBER
    member._value_ = PEFT_MEMBER
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._value2member_map_[PEFT_MEMBER] = member
    if add_member is not None:
        add_member(PEFT_MEMBER, member)
    else:
        PeftType._member_map_[PEFT_MEMBER] = member
        PeftType._member_names_.append(PEFT_MEMBER)
        # EnumType.__setattr__ refuses to (re)bind member names; bypass it for the new name.
        type.__setattr__(PeftType, PEFT_MEMBER, member)
    assert PeftType(PEFT_MEMBER) is member and PeftType[PEFT_MEMBER] is member
    return member
