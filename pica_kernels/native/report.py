"""``parameter_report``: trainable ``M`` and frozen basis counts per group, and what was left out."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..core.targets import fused_expert_parameters, role_of
from .apply import BANK_NAME, expert_layers
from .model import adapter_config, adapter_layers


@dataclass
class GroupReport:
    """One group: its ``M`` (counted once) and the frozen bases of its member layers. Fused experts: the members
    are pseudo-layers ``<module>.<role>``, ``weight_shape`` is (E, out, in) and each member's basis holds E."""

    key: str
    role: str
    weight_shape: tuple[int, ...]
    m_shape: tuple[int, ...]
    layers: list[str]
    trainable: int
    frozen_bases: int


@dataclass
class ParameterReport:
    adapter: str
    rank: int
    side: str
    groups: list[GroupReport]
    base_parameters: int
    #: ``{module name: parameters}`` of fused 3-D expert weights PiCa left out (a layout it does not adapt, see
    #: :func:`pica_kernels.core.experts.experts_layout`).
    left_out: dict[str, int] = field(default_factory=dict)

    @property
    def left_out_share(self) -> float:
        """Share of the base model's parameters in fused expert weights that are not adapted."""
        return sum(self.left_out.values()) / max(self.base_parameters, 1)

    @property
    def trainable(self) -> int:
        return sum(g.trainable for g in self.groups)

    @property
    def frozen_bases(self) -> int:
        return sum(g.frozen_bases for g in self.groups)

    @property
    def layers(self) -> int:
        return sum(len(g.layers) for g in self.groups)

    def __str__(self) -> str:
        rows = [("group", "weight (out x in)", "M", "layers", "trainable", "frozen basis")]
        for g in self.groups:
            rows.append((g.role, "x".join(map(str, g.weight_shape)), "x".join(map(str, g.m_shape)),
                         str(len(g.layers)), f"{g.trainable:,}", f"{g.frozen_bases:,}"))
        rows.append(("total", "", "", str(self.layers), f"{self.trainable:,}", f"{self.frozen_bases:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"PiCa adapter {self.adapter!r}: rank {self.rank}, {self.side} side, "
                 f"base model {self.base_parameters:,} parameters "
                 f"(trainable = {100 * self.trainable / max(self.base_parameters, 1):.3f}% of it)"]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        if self.left_out:
            lines.append(f"not adapted: {len(self.left_out)} fused expert module(s) "
                         f"({', '.join(sorted({role_of(n) for n in self.left_out}))}), "
                         f"{sum(self.left_out.values()):,} parameters = {100 * self.left_out_share:.1f}% of the model")
        return "\n".join(lines)


def parameter_report(model: nn.Module, adapter_name: str | None = None) -> ParameterReport:
    """Trainable M and frozen basis counts per group (works on the meta device)."""
    adapter_name, config = adapter_config(model, adapter_name)
    groups: dict[str, GroupReport] = {}
    base_params = 0
    for name, layer in adapter_layers(model, adapter_name):
        spec = layer.adapters[adapter_name]
        m = layer.m(adapter_name)
        g = groups.get(spec.group)
        if g is None:
            g = groups[spec.group] = GroupReport(
                spec.group, role_of(name) if config.share else name,
                (layer.out_features, layer.in_features), tuple(m.shape), [], m.numel(), 0)
        g.layers.append(name)
        g.frozen_bases += layer.basis(adapter_name).numel()
    for name, layer in expert_layers(model):
        for role, spec in layer.adapters.get(adapter_name, {}).items():
            m = layer.m(role, adapter_name)
            r = layer.layout.role(role)
            g = groups.get(spec.group)
            pseudo = f"{name}.{role}"
            if g is None:
                g = groups[spec.group] = GroupReport(
                    spec.group, role_of(pseudo) if config.share else pseudo,
                    (layer.num_experts, r.out_features, r.in_features), tuple(m.shape), [], m.numel(), 0)
            g.layers.append(pseudo)
            g.frozen_bases += layer.basis(role, adapter_name).numel()
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith(BANK_NAME + ".") or id(p) in seen:
            continue
        seen.add(id(p))
        base_params += p.numel()
    # Adapted experts and the bank (a per-expert M is 3-D too) are not left out.
    wrapped = {f"{name}.base_layer" for name, _ in expert_layers(model)}
    wrapped |= {name for name, _ in model.named_modules() if name == BANK_NAME or name.startswith(BANK_NAME + ".")}
    return ParameterReport(adapter_name, config.rank, config.side, list(groups.values()), base_params,
                           fused_expert_parameters(model, wrapped))
