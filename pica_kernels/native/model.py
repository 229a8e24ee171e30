"""The native front end's model-level API: switch, disable, delete and merge adapters.

``apply_pica`` lives in :mod:`pica_kernels.native.apply`, ``PiCaConfig`` in
:mod:`pica_kernels.native.config`, ``parameter_report`` in :mod:`pica_kernels.native.report`;
they are re-exported here for existing imports.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..core.bases import batched_bases
from ..core.defaults import DEFAULT_TARGETS
from ..core.state import (
    AdapterState,
    AdapterStateError,
    request,
    transaction,
    uninstall_forward_scope,
)
from ..core.targets import group_key, role_of
from .apply import BANK_NAME, apply_pica, find_targets, get_bank, pica_layers, set_submodule
from .config import PiCaConfig
from .layer import PiCaLinear, state_cells

__all__ = [
    "BANK_NAME", "DEFAULT_TARGETS", "AdapterState", "PiCaConfig", "active_adapter", "adapter_state", "apply_pica", "batched_bases", "delete_adapter",
    "disable_adapter", "find_targets", "get_bank", "group_key", "merge", "merge_and_unload", "parameter_report",
    "pica_layers", "role_of", "set_adapter", "set_disabled", "unmerge",
]


# ------------------------------------------------------------ adapters API
# Every call below is one transaction on the model's adapter state (pica_kernels.core.state): it computes the next
# state whole and validates it before touching a layer, publishes it, edits the layers, and on any exception
# (KeyboardInterrupt included) leaves the model exactly as it was. ``model`` may also be a PiCaLinear on its own.
def _layers_or_raise(model: nn.Module) -> list[PiCaLinear]:
    get_bank(model)
    return [m for _, m in pica_layers(model)]


def adapter_state(model: nn.Module) -> AdapterState:
    """The model's adapter state: adapters, active, merged (in order), disabled (an immutable value)."""
    return get_bank(model).cell.value


def active_adapter(model: nn.Module) -> str | None:
    active = adapter_state(model).active
    return active[0] if active else None


def _unknown(name, state: AdapterState) -> KeyError:
    return KeyError(f"unknown adapter {name!r}; the model has {sorted(state.adapters)}")


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter of the model (layers it does not cover give their base output).

    Refused, changing nothing, while other adapters are merged (``unmerge(model)`` first)."""
    with transaction(get_bank(model).cell, [model]) as txn:
        state = txn.before
        if adapter_name not in state.adapters:
            raise _unknown(adapter_name, state)
        if state.merged and adapter_name not in state.merged:
            raise AdapterStateError(f"adapters {list(state.merged)} are merged; unmerge(model) before switching to "
                                    f"{adapter_name!r} (nothing was changed)")
        txn.publish(state.evolve(active=(adapter_name,)))


def set_disabled(model: nn.Module, disabled: bool) -> None:
    """Disable (every layer gives its base output, exactly, also while merged) or enable the adapters, for every
    caller until changed; :func:`disable_adapter` disables for one request only."""
    with transaction(get_bank(model).cell, [model]) as txn:
        txn.publish(txn.before.evolve(disabled=disabled))


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Context in which the model computes exactly its base output (also while merged), for this thread / asyncio
    task only: other callers keep the adapters. Nothing shared is changed."""
    cells = state_cells(model)  # a PEFT model's too
    if not cells:
        get_bank(model)  # raises: no PiCa adapters
    with request(cells, disabled=True):
        yield model


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter everywhere; an active one is replaced by a remaining one (the first added)."""
    bank = get_bank(model)
    with transaction(bank.cell, [model]) as txn:
        state = txn.before
        if adapter_name not in state.adapters:
            raise _unknown(adapter_name, state)
        if adapter_name in state.merged:
            raise AdapterStateError(f"adapter {adapter_name!r} is merged; unmerge(model) before deleting it")
        remaining = [a for a in state.adapters if a != adapter_name]
        active = [a for a in state.active if a != adapter_name] or remaining[:1]
        txn.publish(state.evolve(adapters=remaining, active=active))
        for layer in _layers_or_raise(model):
            if adapter_name in layer.adapters:
                layer._remove_structure(adapter_name)
        bank.remove(adapter_name)
        bank.configs.pop(adapter_name, None)


# -------------------------------------------------------------------- merge
def _restack(model: nn.Module, txn, after: AdapterState, safe_merge: bool = False) -> None:
    txn.publish(after)
    for layer in _layers_or_raise(model):
        layer._set_stack(txn.before, after, txn, safe_merge=safe_merge)


def merge(model: nn.Module, adapter_name: str | None = None, *, safe_merge: bool = False) -> nn.Module:
    """Add ``ΔW`` of the active (or named) adapter into every base weight it covers; see :meth:`PiCaLinear.merge`.

    Merging another adapter afterwards stacks: the weights become ``round(W0 + ΔW_a + ΔW_b)``. The active adapter
    does not change. ``safe_merge``: a non-finite weight raises and nothing is merged.
    """
    with transaction(get_bank(model).cell, [model]) as txn:
        state = txn.before
        name = adapter_name or (state.active[0] if state.active else None)
        if name is None or name not in state.adapters:
            raise _unknown(name, state)
        if name not in state.merged:
            _restack(model, txn, state.evolve(merged=(*state.merged, name)), safe_merge)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every base weight bit for bit (every merged adapter, however many were stacked)."""
    with transaction(get_bank(model).cell, [model]) as txn:
        if txn.before.merged:
            _restack(model, txn, txn.before.evolve(merged=()))
    return model


def merge_and_unload(
    model: nn.Module, adapter_name: str | None = None, *, dequantize: bool = False, dtype: torch.dtype | None = None
) -> nn.Module:
    """Merge, then replace every PiCaLinear by its (merged) base layer and drop the bank: a plain model.

    Quantized bases: by default the merged weights are re-quantized (lossy, warns). With ``dequantize=True`` every
    quantized layer becomes a plain ``nn.Linear`` (adapted ones holding ``dequant(W0) + ΔW``, rounded once from
    fp32) in ``dtype`` (default: the dtype the weights were quantized from), so the result is an exact merge.
    """
    bank = get_bank(model)
    with transaction(bank.cell, [model]) as txn:
        state = txn.before
        name = adapter_name or (state.active[0] if state.active else None)
        stack = [*state.merged, *([name] if name in state.adapters and name not in state.merged else [])]
        if dequantize:
            from ..core.quant import dequantize_model, unload_dequantized

            for lname, layer in list(pica_layers(model)):
                if layer.quantization:
                    set_submodule(model, lname, unload_dequantized(
                        layer, [a for a in stack if a in layer.adapters], dtype))
        if stack != list(state.merged):
            _restack(model, txn, state.evolve(merged=stack))
        for lname, layer in list(pica_layers(model)):
            set_submodule(model, lname, layer.base_layer)
        delattr(model, BANK_NAME)
        uninstall_forward_scope(model)
        if dequantize:
            dequantize_model(model, dtype)
    return model


def parameter_report(model: nn.Module, adapter_name: str | None = None):
    """Trainable M and frozen basis counts per group (works on the meta device); see :mod:`pica_kernels.native.report`."""
    from .report import parameter_report as _report

    return _report(model, adapter_name)
