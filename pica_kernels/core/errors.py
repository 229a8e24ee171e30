"""One error hierarchy for both front ends.

``PiCaError`` is the base of every error pica_kernels raises about adapters.
``AdapterMismatchError`` (also a ``ValueError``, as before) says an adapter file
does not fit a model, or is damaged; the message names the field and both
values. ``PiCaConfigError`` (also a ``ValueError``) says a configuration value
or argument is not one PiCa accepts; the message names it and what is expected.
"""

from __future__ import annotations


class PiCaError(Exception):
    """Base class of the errors raised by pica_kernels' adapter code."""


class AdapterMismatchError(PiCaError, ValueError):
    """An adapter file does not fit this model (or is damaged); the message names what differs."""


class PiCaConfigError(PiCaError, ValueError):
    """A configuration field or argument has a value PiCa does not accept; the message names it and what is
    expected."""
