"""PEFT-side containers and hooks of the PiCa tuner layer (no math: that is :mod:`pica_kernels.core`)."""

from __future__ import annotations

import contextlib

import torch
from peft.tuners._buffer_dict import BufferDict

from ..core.state import AdapterStateError, current_selection


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


class CellStateMixin:
    """PEFT's per-layer bookkeeping (``active_adapter(s)``, ``disable_adapters``, ``merged_adapters``) read from the
    model's one AdapterState (:mod:`pica_kernels.core.state`), held by the tuner's bank (``self._pica_store``); the
    tuner's transactions change it. PEFT's per-layer code assigns ``_active_adapter`` / ``_disable_adapters`` while
    the tuner runs it inside a transaction that has published the same value already: those writes are ignored.
    ``self.pica_r`` names the adapters the layer carries."""

    @property
    def pica_state_cell(self):
        return self._pica_store.cell

    @property
    def _active_adapter(self) -> list[str]:
        return list(self._pica_store.cell.value.active)

    @_active_adapter.setter
    def _active_adapter(self, value) -> None:
        pass

    @property
    def _disable_adapters(self) -> bool:
        return self._pica_store.cell.value.disabled

    @_disable_adapters.setter
    def _disable_adapters(self, value) -> None:
        pass

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters merged into this layer's weights, in merge order (the model's merged stack, filtered)."""
        return self._pica_store.cell.value.merged_on(self.pica_r)

    @contextlib.contextmanager
    def _forward_state(self, names: list[str] | None):
        """``(state, names, disabled)`` of one forward: the model's adapter state, held for the forward (a no-op
        inside the model's forward, which holds it already), the per-sample ``adapter_names`` (given to the layer,
        else the call's selection) and whether adapters are off for this call. ``names`` given were checked by the
        tuner."""
        cell = self._pica_store.cell
        token = cell.acquire_forward()
        try:
            state = cell.value
            sel = current_selection(cell)
            if names is None and sel is not None and sel.names is not None:
                names = list(sel.names)
            yield state, names, state.disabled or (sel is not None and sel.disabled)
        finally:
            cell.release_forward(token)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merging is the model's: ``model.merge_adapter()`` (one transaction over every layer)."""
        raise AdapterStateError(
            f"{type(self).__name__}.merge on one layer: the merged stack is the model's (one value for all its "
            f"layers); call model.merge_adapter(...) / merge_and_unload(...)")

    def unmerge(self) -> None:
        """Unmerging is the model's: ``model.unmerge_adapter()``."""
        raise AdapterStateError(
            f"{type(self).__name__}.unmerge on one layer: the merged stack is the model's; call "
            f"model.unmerge_adapter()")


def adapter_names_pre_forward_hook(module, args, kwargs, adapter_names):
    """Pre-forward hook (with_kwargs) that passes the per-sample `adapter_names` to a PiCa layer."""
    kwargs["adapter_names"] = adapter_names
    return args, kwargs
