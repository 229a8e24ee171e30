"""PEFT-side containers and hooks of the PiCa tuner layer (no math: that is :mod:`pica_kernels.core`)."""

from __future__ import annotations

import torch
from peft.tuners._buffer_dict import BufferDict


class BasisDict(BufferDict):
    """A ``BufferDict`` whose entries are persistent (``store_bases=True``: saved with the adapter) or not (derived
    from ``W`` on load) one by one; re-assigning a key (PEFT's device/dtype moves) keeps its persistence."""

    def set(self, key: str, tensor: torch.Tensor, persistent: bool) -> None:
        self.register_buffer(key, tensor, persistent=persistent)

    def __setitem__(self, key, buffer):
        persistent = (key not in self._non_persistent_buffers_set) if key in self._buffers else self.persistent
        self.register_buffer(key, buffer, persistent=persistent)

    def __delitem__(self, key):
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)


def adapter_names_pre_forward_hook(module, args, kwargs, adapter_names):
    """Pre-forward hook (with_kwargs) that passes the per-sample `adapter_names` to a PiCa layer."""
    kwargs["adapter_names"] = adapter_names
    return args, kwargs
