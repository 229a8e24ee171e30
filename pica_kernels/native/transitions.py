"""The native front end's adapter-state transitions: activate, disable, delete, merge, unmerge.

Each is one transaction on the adapter state held by a bank (:mod:`pica_kernels.core.state`): it computes the next
state whole and validates it before touching a layer, publishes it, edits the layers, and on any exception
(KeyboardInterrupt included) leaves ``root`` exactly as it was. ``root`` is a model built by ``apply_pica`` (its
bank is ``root.pica_bank``, ``layers`` its PiCaLinear layers) or a PiCaLinear on its own (``layers == [root]``);
:mod:`.model` and :class:`~pica_kernels.native.layer.PiCaLinear` call these with their own bank and layers.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..core.bank import PiCaBank
from ..core.state import AdapterState, AdapterStateError, transaction


def unknown_adapter(name, state: AdapterState) -> KeyError:
    return KeyError(f"unknown adapter {name!r}; the model has {sorted(state.adapters)}")


def set_active(bank: PiCaBank, root: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter; refused, changing nothing, while other adapters are merged."""
    with transaction(bank.cell, [root]) as txn:
        state = txn.before
        if adapter_name not in state.adapters:
            raise unknown_adapter(adapter_name, state)
        if state.merged and adapter_name not in state.merged:
            raise AdapterStateError(f"adapters {list(state.merged)} are merged; unmerge(model) before switching to "
                                    f"{adapter_name!r} (nothing was changed)")
        txn.publish(state.evolve(active=(adapter_name,)))


def set_disabled(bank: PiCaBank, root: nn.Module, disabled: bool) -> None:
    with transaction(bank.cell, [root]) as txn:
        txn.publish(txn.before.evolve(disabled=disabled))


def delete(bank: PiCaBank, root: nn.Module, layers: Sequence[nn.Module], adapter_name: str) -> None:
    """Remove an adapter everywhere; an active one is replaced by a remaining one (the first added)."""
    with transaction(bank.cell, [root]) as txn:
        state = txn.before
        if adapter_name not in state.adapters:
            raise unknown_adapter(adapter_name, state)
        if adapter_name in state.merged:
            raise AdapterStateError(f"adapter {adapter_name!r} is merged; unmerge(model) before deleting it")
        remaining = [a for a in state.adapters if a != adapter_name]
        active = [a for a in state.active if a != adapter_name] or remaining[:1]
        txn.publish(state.evolve(adapters=remaining, active=active))
        for layer in layers:
            if adapter_name in layer.adapters:
                layer._remove_structure(adapter_name)
        bank.remove(adapter_name)
        bank.configs.pop(adapter_name, None)


def restack(layers: Sequence[nn.Module], txn, after: AdapterState, safe_merge: bool = False) -> None:
    """Publish ``after`` and bring every layer's weight to its merged stack (inside ``txn``)."""
    txn.publish(after)
    for layer in layers:
        layer._set_stack(txn.before, after, txn, safe_merge=safe_merge)


def merge(bank: PiCaBank, root: nn.Module, layers: Sequence[nn.Module], adapter_name: str | None,
          safe_merge: bool = False) -> None:
    """Stack ``ΔW`` of the active (or named) adapter onto the merged weights; the active adapter does not change."""
    with transaction(bank.cell, [root]) as txn:
        state = txn.before
        name = adapter_name or (state.active[0] if state.active else None)
        if name is None or name not in state.adapters:
            raise unknown_adapter(name, state)
        if name not in state.merged:
            restack(layers, txn, state.evolve(merged=(*state.merged, name)), safe_merge)


def unmerge(bank: PiCaBank, root: nn.Module, layers: Sequence[nn.Module]) -> None:
    """Restore every base weight bit for bit (every merged adapter, however many were stacked)."""
    with transaction(bank.cell, [root]) as txn:
        if txn.before.merged:
            restack(layers, txn, txn.before.evolve(merged=()))
