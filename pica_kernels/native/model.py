"""The native front end's model-level API: switch, disable, delete and merge adapters.

Every call is one transaction on the model's adapter state (:mod:`.transitions`); ``model`` may also be a
PiCaLinear on its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..core.state import AdapterState, request, transaction, uninstall_forward_scope
from . import transitions
from .apply import BANK_NAME, all_layers, expert_layers, get_bank, pica_layers, set_submodule
from .config import PiCaConfig
from .experts import PiCaExperts
from .layer import PiCaLinear, state_cells

__all__ = ["active_adapter", "adapter_config", "adapter_layers", "adapter_state", "delete_adapter", "disable_adapter", "merge", "merge_and_unload",
           "set_adapter", "set_disabled", "unmerge"]


def _layers(model: nn.Module) -> list[PiCaLinear | PiCaExperts]:
    return all_layers(model)


def adapter_state(model: nn.Module) -> AdapterState:
    """The model's adapter state: adapters, active, merged (in order), disabled (an immutable value)."""
    return get_bank(model).cell.value


def active_adapter(model: nn.Module) -> str | None:
    active = adapter_state(model).active
    return active[0] if active else None


def adapter_config(model: nn.Module, adapter_name: str | None = None) -> tuple[str, PiCaConfig]:
    """``(name, config)`` of adapter ``adapter_name`` (default: the active one); KeyError naming the model's adapters
    when it has no such adapter."""
    bank = get_bank(model)
    name = adapter_name or active_adapter(model)
    if name not in bank.configs:
        raise KeyError(f"unknown adapter {name!r}; the model has {sorted(bank.configs)}")
    return name, bank.configs[name]


def adapter_layers(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, PiCaLinear]]:
    """The (name, layer) pairs of the PiCaLinear layers ``adapter_name`` covers."""
    return ((n, layer) for n, layer in pica_layers(model) if adapter_name in layer.adapters)


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter of the model (layers it does not cover give their base output).

    Refused, changing nothing, while other adapters are merged (``unmerge(model)`` first)."""
    transitions.set_active(get_bank(model), model, adapter_name)


def set_disabled(model: nn.Module, disabled: bool) -> None:
    """Disable (every layer gives its base output, exactly, also while merged) or enable the adapters, for every
    caller until changed; :func:`disable_adapter` disables for one request only."""
    transitions.set_disabled(get_bank(model), model, disabled)


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
    transitions.delete(bank, model, _layers(model), adapter_name)


# -------------------------------------------------------------------- merge
def merge(model: nn.Module, adapter_name: str | None = None, *, safe_merge: bool = False) -> nn.Module:
    """Add ``ΔW`` of the active (or named) adapter into every base weight it covers; see :meth:`PiCaLinear.merge`.

    Merging another adapter afterwards stacks: the weights become ``round(W0 + ΔW_a + ΔW_b)``. The active adapter
    does not change. ``safe_merge``: a non-finite weight raises and nothing is merged.
    """
    bank = get_bank(model)
    transitions.merge(bank, model, _layers(model), adapter_name, safe_merge)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every base weight bit for bit (every merged adapter, however many were stacked)."""
    bank = get_bank(model)
    transitions.unmerge(bank, model, _layers(model))
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
            transitions.restack(_layers(model), txn, state.evolve(merged=stack))
        for lname, layer in [*pica_layers(model), *expert_layers(model)]:
            set_submodule(model, lname, layer.base_layer)
        delattr(model, BANK_NAME)
        uninstall_forward_scope(model)
        if dequantize:
            dequantize_model(model, dtype)
    return model

