"""Where ``M`` lives: one :class:`PiCaBank` per model, held once at model level.

``bank[adapter][group]`` is the trainable ``M`` of one group. The native front
end registers the bank as ``model.pica_bank``, the PEFT tuner as ``pica_M``; a
shared ``M`` is therefore one Parameter in ``parameters()`` and one entry of
``state_dict()``, and it is outside every per-layer FSDP2 group. Layers hold
an *unregistered* reference to the bank and a :class:`LayerMView`: a
persistent ``{adapter: M}`` mapping of that layer that looks ``M`` up in the
bank at each access, so whatever replaces Parameter objects later (``.to()``,
FSDP2, ``load_state_dict(assign=True)``) cannot leave a layer with a stale copy.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .state import AdapterState, StateCell


class BankStateView:
    """The adapter-state reads of a native layer whose ``_bank`` is its model's :class:`PiCaBank` (PiCaLinear,
    PiCaExperts): one value for all layers of a model, read here, never stored on the layer."""

    _bank: PiCaBank
    adapters: dict

    @property
    def pica_state_cell(self) -> StateCell:
        return self._bank.cell

    @property
    def state(self) -> AdapterState:
        """The adapter state of the model this layer belongs to (one value for all its layers)."""
        return self._bank.cell.value

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters merged into this layer's weights, in merge order (the model's merged stack, filtered)."""
        return self.state.merged_on(self.adapters)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)


class PiCaBank(nn.ModuleDict):
    """``{adapter: ParameterDict{group: M}}``; group keys contain no '.'.

    ``configs`` maps adapter names to their config (a plain attribute). ``cell`` holds the model's adapter state
    (:class:`~pica_kernels.core.state.StateCell`): the bank is the one model-level object every layer refers to.
    """

    def __init__(self) -> None:
        super().__init__()
        self.configs: dict = {}
        self.cell = StateCell()

    def forward(self, x):
        """The identity: the bank sits in the model's module tree, and a container model (``nn.Sequential``) calls
        every child in turn, the bank included (registered last, so it passes the output through)."""
        return x

    def has(self, adapter: str, group: str) -> bool:
        return adapter in self and group in self[adapter]

    def get(self, adapter: str, group: str) -> nn.Parameter:
        try:
            return self[adapter][group]
        except KeyError:
            raise KeyError(f"no M for adapter {adapter!r}, group {group!r} in the PiCa bank") from None

    def create(
        self,
        adapter: str,
        group: str,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
        init: torch.Tensor | None = None,
    ) -> nn.Parameter:
        """``M`` of (adapter, group), created zero (or as ``init``) if absent; an existing one must have ``shape``."""
        if adapter not in self:
            self[adapter] = nn.ParameterDict()
        params = self[adapter]
        if group in params:
            existing = params[group]
            if tuple(existing.shape) != tuple(shape):
                raise ValueError(
                    f"group {group!r} of adapter {adapter!r} already has M of shape {tuple(existing.shape)}, "
                    f"a layer asked for {tuple(shape)}"
                )
            return existing
        m = torch.zeros(shape, dtype=dtype, device=device) if init is None else init.to(device=device, dtype=dtype)
        params[group] = nn.Parameter(m)
        return params[group]

    def remove(self, adapter: str) -> None:
        if adapter in self:
            del self[adapter]

    def groups(self, adapter: str) -> dict[str, nn.Parameter]:
        return dict(self[adapter].items()) if adapter in self else {}


def random_m_init(shape: tuple[int, int], scale: float = 0.05) -> torch.Tensor:
    """A small random ``M`` (PEFT's ``init_weights=False``), drawn from the global torch RNG, float32 on CPU."""
    return torch.randn(shape, dtype=torch.float32) * scale


class AdapterView:
    """The mapping methods of a layer's ``{adapter: ...}`` view onto the bank, over ``self._groups`` (``{adapter:
    its group key(s)}``), ``__contains__`` and ``__getitem__``: what :class:`LayerMView` and the PEFT experts layer's
    view share."""

    def __delitem__(self, adapter: str) -> None:
        del self._groups[adapter]

    def __iter__(self) -> Iterator[str]:
        return iter([a for a in self._groups if a in self])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def keys(self):
        return list(self)

    def items(self):
        return [(a, self[a]) for a in self]

    def values(self):
        return [self[a] for a in self]


class LayerMView(AdapterView, nn.ParameterDict):
    """A layer's persistent ``{adapter: M}`` mapping onto the bank.

    A ``ParameterDict`` to code that inspects it (PEFT's ``get_layer_status``,
    ``set_requires_grad``), but it stores nothing: every access looks ``M`` up
    in the bank through the layer's ``{adapter: group key}`` (``groups``). The
    layer holds it as a plain attribute, never as a submodule, so ``M`` is
    registered once (by the bank). Deleting an adapter here forgets the layer's
    link to its group; the bank entry is the model's to drop. Assigning a tensor
    moves its values into the shared Parameter (``.data``), so sharing survives.
    """

    def __init__(self, bank: PiCaBank, groups: dict[str, str]) -> None:
        super().__init__()
        object.__setattr__(self, "_bank", bank)
        object.__setattr__(self, "_groups", groups)

    def __getitem__(self, adapter: str) -> nn.Parameter:
        if adapter not in self._groups or not self._bank.has(adapter, self._groups[adapter]):
            raise KeyError(adapter)
        return self._bank[adapter][self._groups[adapter]]

    def __setitem__(self, adapter: str, value: torch.Tensor) -> None:
        m = self[adapter]
        with torch.no_grad():
            m.data = value.data if isinstance(value, torch.Tensor) else value

    def __contains__(self, adapter: object) -> bool:
        return adapter in self._groups and self._bank.has(adapter, self._groups[adapter])

    def extra_repr(self) -> str:
        return ", ".join(f"{a}: {tuple(self[a].shape)}" for a in self)
