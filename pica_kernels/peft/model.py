"""``PiCaPeftModel``: the PEFT tuner of PiCa.

Shared state (docs/design.md): every ``M`` lives once, in
``self.pica_M[adapter][group]`` on the tuner (``base_model.pica_M`` of a
``PeftModel``), so it is one Parameter in ``parameters()`` and one tensor in
``adapter_model.safetensors``; layers hold an unregistered reference to the
container and look ``M`` up by key. What PEFT does by default and would break
here, and what this class does instead:

- dtype cast (``autocast_adapter_dtype``): PEFT's ``cast_adapter_dtype`` swaps in
  new Parameter objects per layer; :meth:`_cast_adapter_dtype` casts each ``M``
  in place (``.data``), once, so it stays one object shared by its layers.
- device moves: :meth:`PiCaPeftLinear._move_adapter_to_device_of_base_layer`
  moves ``M`` in place, never re-wrapping it.
- ``_pre_injection_hook`` runs for the first adapter only: ``M`` of every adapter
  is created lazily in :meth:`_create_and_replace`.
- ``delete_adapter``: also drops the adapter's ``M`` from the tuner.
- save/load: ``M`` is saved once per group (key ``base_model.pica_M.<group>``);
  bases are recomputed on load from ``W`` with the config's SVD method and seed
  (independent of the global torch seed) and checked against a stored
  fingerprint, or saved outright with ``store_bases=True``.
"""

from __future__ import annotations

import json
import warnings
import weakref
from contextlib import contextmanager
from functools import partial

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from peft.tuners.tuners_utils import _set_adapter as _peft_set_aux_adapter
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .. import reference
from ..core import experts as core_experts
from ..core.bank import PiCaBank, random_m_init
from ..core.base import check_float_weight, is_fan_in_fan_out, is_supported_base, weight_out_in
from ..core.bases import batched_bases
from ..core.defaults import (
    BASE_ADAPTER,
    DEFAULT_SVD_METHOD,
    check_adapter_name,
    default_m_dtype,
)
from ..core.errors import AdapterMismatchError
from ..core.files import (
    base_tensors,
    check_base_tensors,
    check_basis_fingerprint,
    check_m_tensors,
    check_m_values,
    check_when_data,
    dtype_from_name,
    load_json,
    tensor_identity,
)
from ..core.plan import LayerPlan, plan_layers
from ..core.state import (
    AdapterState,
    Snapshot,
    StateCell,
    install_forward_scope,
    request,
    transaction,
    uninstall_forward_scope,
)
from ..core.targets import check_layer_rank, fused_expert_parameters, matches, rank_for, warn_left_out
from ..svd import basis_fingerprint, truncated_svd
from .config import PiCaPeftConfig
from .containers import adapter_names_pre_forward_hook
from .experts import PiCaPeftExperts
from .layer import PiCaPeftLinear

__all__ = ["PiCaPeftModel"]

#: tuner -> {adapter: Snapshot of the model before that adapter was injected}, until its weights are loaded.
_UNDO_LOAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_LOW_PRECISION = {torch.float16, torch.bfloat16}
FINGERPRINT_KEY = "pica_fingerprint"


#: Key of the base model's identity in ``adapter_model.safetensors``: the JSON of {tensor name: identity} as uint8.
BASE_IDENTITY_KEY = "base_model.pica_base_model_identity"


def _inner(model: nn.Module) -> nn.Module:
    """The model the PiCa layers sit in, under a PeftModel or the tuner (the bare model as it is)."""
    if isinstance(model, PiCaPeftModel):
        return model.model
    if isinstance(getattr(model, "base_model", None), PiCaPeftModel):
        return model.base_model.model
    return model


def _base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own tensors under the adapted ``model`` (:func:`pica_kernels.core.files.base_tensors`)."""
    return base_tensors(_inner(model))


def _adapted_weights(model: nn.Module) -> set[str]:
    """Names (as :func:`_base_tensors` gives them) of the adapted layers' weights (fused expert parameters too)."""
    out = set()
    for n, m in _inner(model).named_modules():
        if isinstance(m, PiCaPeftLinear):
            out.add(f"{n}.weight")
        elif isinstance(m, PiCaPeftExperts):
            out.update(f"{n}.{p}" for p in m.layout.params)
    return out


#: The PEFT front end's layer classes: dense (``target_modules``) and fused experts (``target_parameters``).
_LAYERS = (PiCaPeftLinear, PiCaPeftExperts)


_LOAD_ANYWAY = ("load with a PiCaPeftConfig whose check_base_model='warn' "
                "(PeftModel.from_pretrained(model, path, config=config)) to load anyway")


class PiCaPeftModel(BaseTuner):
    """PiCa for PEFT: ``peft.get_peft_model(model, PiCaPeftConfig(...))`` (see the module docstring)."""

    prefix: str = "pica_"
    # Both layer classes: PEFT's layer walks (delete_adapter, set_adapter, freezing) test isinstance against it.
    tuner_layer_cls = _LAYERS
    target_module_mapping: dict = {}
    uses_shared_state: bool = True

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, low_cpu_mem_usage: bool = False,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
        # The caller's model as it was, so that a refused construction (here) or a refused load of the first
        # adapter (PeftModel.from_pretrained: _remap_adapter_state_dict_for_load) leaves it exactly as it was:
        # no PiCa layer injected, its state_dict keys and requires_grad unchanged.
        snapshot = Snapshot.take(None, [model], data=False)
        try:
            super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                             state_dict=state_dict)
        except BaseException:
            snapshot.restore()
            raise
        _UNDO_LOAD[self] = {adapter_name: snapshot}

    # ------------------------------------------------------------ adapter state
    def _cell(self) -> StateCell:
        return self._m_store().cell

    @property
    def adapter_state(self) -> AdapterState:
        """The model's adapter state (one immutable value; PEFT's per-layer bookkeeping reads it)."""
        return self._cell().value

    def _restack(self, txn, after: AdapterState, safe_merge: bool = False) -> None:
        txn.publish(after)
        for module in self.model.modules():
            if isinstance(module, _LAYERS):
                module._set_stack(txn.before, after, txn, safe_merge=safe_merge)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate ``adapter_name`` (one or several), in one transaction; merged adapters are unmerged first
        (with PEFT's warning)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        with transaction(self._cell(), [self]) as txn:
            state = txn.before
            unknown = [n for n in names if n not in state.adapters]
            if unknown:
                raise ValueError(f"Adapter(s) {unknown} not found; the model has {list(state.adapters)}")
            if state.merged and list(state.active) != names:  # a switch; re-setting the same ones keeps merges
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.",
                              stacklevel=2)
                self._restack(txn, state.evolve(merged=()))
            txn.publish(self._cell().value.evolve(active=names))
            self._activate(adapter_name, inference_mode)
            self.active_adapter = adapter_name

    def _activate(self, adapter_name, inference_mode: bool = False) -> None:
        """requires_grad of the active adapters (PEFT's per-layer set_adapter; the state is published already)."""
        _peft_set_aux_adapter(self.model, adapter_name, inference_mode=inference_mode)
        for module in self.model.modules():
            if isinstance(module, _LAYERS):
                module.set_adapter(adapter_name, inference_mode=inference_mode)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        """Enable / disable every layer at once (the model's state); merged weights stay merged: a disabled layer
        computes its base output from the original weight."""
        with transaction(self._cell(), [self]) as txn:
            txn.publish(txn.before.evolve(disabled=not enabled))
            super()._enable_adapter_layers(enabled)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge the active (or named) adapters into the base weights, stacking: ``round(W0 + Σ ΔW)`` in fp32 from
        ``W0`` (see core.merge). One transaction: a failure (a NaN with ``safe_merge``) merges nothing."""
        self._check_merge_allowed()
        with transaction(self._cell(), [self]) as txn:
            state = txn.before
            names = list(state.active) if adapter_names is None else list(adapter_names)
            unknown = [n for n in names if n not in state.adapters]
            if unknown:
                raise ValueError(f"Adapter(s) {unknown} not found; the model has {list(state.adapters)}")
            new = [n for n in dict.fromkeys(names) if n not in state.merged]
            if not new:
                warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
                return
            self._restack(txn, state.evolve(merged=(*state.merged, *new)), safe_merge)

    def unmerge_adapter(self) -> None:
        """Restore every base weight bit for bit."""
        with transaction(self._cell(), [self]) as txn:
            if not txn.before.merged:
                warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
                return
            self._restack(txn, txn.before.evolve(merged=()))

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: list[str] | None = None):
        with transaction(self._cell(), [self]) as txn:
            if merge:
                state = txn.before
                names = list(state.active) if adapter_names is None else list(adapter_names)
                new = [n for n in dict.fromkeys(names) if n not in state.merged]
                if new:
                    self._check_merge_allowed()
                    self._restack(txn, state.evolve(merged=(*state.merged, *new)), safe_merge)
            model = super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)
            uninstall_forward_scope(self.model)
        return model

    # ------------------------------------------------------------ shared M
    def _m_store(self) -> PiCaBank:
        store = self._modules.get("pica_M")
        if store is None:
            store = PiCaBank()
            self.pica_M = store
        return store

    def _get_or_create_m(
        self, adapter_name: str, group: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
        init_weights: bool,
    ) -> nn.Parameter:
        store = self._m_store()
        # init_weights=False: small random M from the global torch RNG (PEFT's convention: the adapter name
        # must not change the weights), drawn once per group.
        init = None if init_weights or store.has(adapter_name, group) or device.type == "meta" else random_m_init(shape)
        return store.create(adapter_name, group, shape, dtype, device, init=init)

    def _pre_injection_hook(self, model: nn.Module, config: PiCaPeftConfig, adapter_name: str) -> None:
        install_forward_scope(model, self._m_store().cell)

    # ------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config: PiCaPeftConfig, model_config: dict) -> PiCaPeftConfig:
        if peft_config.target_modules is None:
            if not peft_config.target_parameters:
                raise ValueError("Please specify `target_modules` or `target_parameters` in the PiCa config")
            peft_config.target_modules = set()  # experts only
        if peft_config.target_parameters and peft_config.layers_to_transform is not None:
            raise ValueError("layers_to_transform selects target_modules only; with target_parameters name the "
                             "layers' parameters in full (e.g. 'model.layers.0.mlp.experts.down_proj')")
        if peft_config.svd_method is None:
            peft_config.svd_method = DEFAULT_SVD_METHOD
        return peft_config

    def _target_items(self, model: nn.Module, config: PiCaPeftConfig) -> list[tuple[str, nn.Module]]:
        """(name, module) of the modules this config will adapt, skipping internals of existing tuner layers."""
        inside: list[str] = []
        found = []
        for key, module in model.named_modules():
            if not key or any(key.startswith(p) for p in inside):
                continue
            if isinstance(module, BaseTunerLayer):
                inside.append(key + ".")
            if self._check_target_module_exists(config, key):
                found.append((key, module))
        return found

    def _plan(self, model: nn.Module, config: PiCaPeftConfig) -> tuple[dict[str, LayerPlan], dict[str, torch.Tensor]]:
        """The per-layer plan of every target (rank checked, group key; :func:`pica_kernels.core.plan.plan_layers`)
        and its bases: one batched truncated SVD per (shape, dtype, device), or the basis of an existing adapter
        with the same side, rank and SVD settings."""
        targets = []
        for key, module in self._target_items(model, config):
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if is_supported_base(base):  # other modules: _create_and_replace raises the clear error
                weight = weight_out_in(base)
                check_float_weight(weight, f"layer {key!r}: weight")
                targets.append((key, module, weight))
        plans = plan_layers([(key, *w.shape) for key, _, w in targets], rank=config.r,
                            rank_pattern=config.rank_pattern, share=config.share_m, rank_field="r")
        bases: dict[str, torch.Tensor] = {}
        weights: list[tuple[str, torch.Tensor]] = []
        for key, module, w in targets:
            if isinstance(module, PiCaPeftLinear):
                for other, r in module.pica_r.items():
                    oc = self.peft_config.get(other)
                    if (
                        oc is not None and r == plans[key].rank and module.pica_side[other] == config.side
                        and (oc.svd_method, oc.svd_seed) == (config.svd_method, config.svd_seed)
                    ):
                        bases[key] = module.pica_basis[other]
                        break
                if key in bases:
                    continue
            if w.device.type != "meta":
                weights.append((key, w))
        bases.update(batched_bases(weights, {key: plans[key].rank for key, _ in weights}, config.side,
                                   method=config.svd_method, seed=config.svd_seed))
        return plans, bases

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        check_adapter_name(adapter_name)
        config = self.peft_config[adapter_name]
        self._prepare_adapter_config(config, self.get_model_config(model))
        self._pending_experts = self._plan_experts(model, config) if config.target_parameters else {}
        if config.target_modules == "all-linear":
            warn_left_out(model, fused_expert_parameters(model, adapted=set(self._pending_experts)))
        _maybe_include_all_linear_layers(config, model)
        self._pending_plan, self._pending_bases = self._plan(model, config)
        cell = self._m_store().cell
        # Kept until the adapter's weights are loaded (PeftModel.load_adapter), so a refused file undoes this.
        _UNDO_LOAD.setdefault(self, {})[adapter_name] = Snapshot.take(cell, [self], data=False)
        try:
            with transaction(cell, [self]) as txn:
                before = txn.before
                if adapter_name in before.adapters:
                    raise ValueError(f"adapter {adapter_name!r} already exists")
                # PEFT semantics: the first adapter is active, an added one starts inactive.
                txn.publish(before.evolve(adapters=(*before.adapters, adapter_name),
                                          active=before.active or (adapter_name,)))
                install_forward_scope(model, cell)
                super().inject_adapter(
                    model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                    low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict,
                )
        except BaseException:
            # PeftModel.add_adapter put the config in before injecting and drops it on Exception only.
            if self.peft_config.get(adapter_name) is not None and len(self.peft_config) > 1:
                self.peft_config.pop(adapter_name, None)
            raise
        finally:
            self._pending_plan, self._pending_bases, self._pending_experts = {}, {}, {}

    def _create_and_replace(
        self, peft_config: PiCaPeftConfig, adapter_name: str, target: nn.Module, target_name: str,
        parent: nn.Module, current_key: str, **optional_kwargs,
    ) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        if isinstance(target, BaseTunerLayer) and not isinstance(target, PiCaPeftLinear):
            raise TypeError(f"{current_key!r} already holds a {type(target).__name__} adapter; PiCa cannot stack on it")
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not is_supported_base(base):
            raise TypeError(
                f"Target module {current_key!r} is a {type(base).__name__}; PiCa supports torch.nn.Linear and "
                "transformers Conv1D only (check target_modules)"
            )
        # (out, in); quantized-base hook: the dequantized weight, which gives M's dtype and device (the storage is
        # uint8 / int8)
        weight = weight_out_in(base)
        out_f, in_f = weight.shape
        side = peft_config.side
        plan = (getattr(self, "_pending_plan", None) or {}).get(current_key)
        if plan is None:  # a target inject_adapter's plan did not list: planned and checked here
            check_float_weight(weight, f"layer {current_key!r}: weight")
            plan = plan_layers([(current_key, out_f, in_f)], rank=peft_config.r, rank_pattern=peft_config.rank_pattern,
                               share=peft_config.share_m, rank_field="r")[current_key]
        r = plan.rank
        if is_fan_in_fan_out(base):
            peft_config.fan_in_fan_out = True
        basis = (getattr(self, "_pending_bases", None) or {}).get(current_key)
        if basis is None:
            basis, _ = truncated_svd(weight, r, side, method=peft_config.svd_method, seed=peft_config.svd_seed)
        group = plan.group
        m_dtype = default_m_dtype(weight.dtype)
        m = self._get_or_create_m(
            adapter_name, group, reference.m_shape(out_f, in_f, r, side), m_dtype, weight.device,
            peft_config.init_weights,
        )
        kwargs = dict(r=r, side=side, group=group, basis=basis, store_basis=peft_config.store_bases,
                      inference_mode=peft_config.inference_mode)
        if isinstance(target, PiCaPeftLinear):
            target.update_layer(adapter_name, **kwargs)
        else:
            new_module = PiCaPeftLinear(target, self._m_store(), adapter_name, **kwargs)
            self._replace_module(parent, target_name, new_module, target)
        if adapter_name not in self.active_adapters:
            m.requires_grad_(False)  # an added adapter is not trainable until set_adapter

    # ------------------------------------------------------------ fused experts (target_parameters)
    def _plan_experts(self, model: nn.Module, config: PiCaPeftConfig) -> dict[str, tuple]:
        """``{experts module name: (module, layout, {role: (rank, group key, basis)})}`` of every experts module
        with a role ``target_parameters`` selects (and ``exclude_modules`` does not): the parameter
        (``experts.gate_up_proj``: both its roles), the role (``experts.up_proj``) or the module. Ranks from
        ``rank_pattern`` (the role's name ``<module>.<role>``, else the parameter's) checked; bases from one
        batched SVD across experts and layers (:func:`pica_kernels.core.experts.experts_bases`), or an existing
        adapter's basis of the same side, rank and SVD settings."""
        found: dict[str, tuple] = {}
        for name, module in model.named_modules():
            if isinstance(module, PiCaPeftExperts):
                experts, layout = module.base_layer, module.layout
            elif core_experts.is_fused_experts(module) and not name.endswith(".base_layer"):
                experts, layout = module, None
            else:
                continue
            if layout is None:
                try:
                    layout = core_experts.experts_layout(name, experts)
                except core_experts.UnsupportedExpertsError:
                    # Refused (naming the module and the layout expected) only when the config selects it.
                    named = (name, *(f"{name}.{p}" for p in core_experts.fused_parameters(experts)))
                    if any(matches(n, config.target_parameters) for n in named):
                        raise
                    continue
            roles = [role for role in layout.roles if self._selects_role(config, name, role)]
            if roles:
                found[name] = (module, experts, layout, roles)
        if not found:
            return {}
        ranks: dict[str, int] = {}
        plans: dict[str, tuple] = {}
        weights: list[tuple[str, torch.Tensor]] = []
        reused: dict[str, torch.Tensor] = {}
        for name, (module, experts, layout, roles) in found.items():
            plans[name] = (module, layout, {})
            for role in roles:
                pseudo = core_experts.pseudo_name(name, role)
                r = rank_for(pseudo, config.r, config.rank_pattern)
                if r == config.r:
                    r = rank_for(f"{name}.{role.param}", config.r, config.rank_pattern)
                check_layer_rank(pseudo, r, role.out_features, role.in_features,
                                 "r" if r == config.r else "rank_pattern rank")
                group = core_experts.experts_group_key(
                    pseudo, layout.num_experts, role.out_features, role.in_features, share=config.share_m,
                    per_expert=not config.share_experts, rank_suffix=None if r == config.r else r)
                plans[name][2][role.role] = (r, group)
                ranks[pseudo] = r
                if isinstance(module, PiCaPeftExperts):
                    for other, other_ranks in module.pica_r.items():
                        oc = self.peft_config.get(other)
                        if (oc is not None and other_ranks.get(role.role) == r and module.pica_side[other] == config.side
                                and (oc.svd_method, oc.svd_seed) == (config.svd_method, config.svd_seed)):
                            reused[pseudo] = module.pica_basis[other][role.role]
                            break
                if pseudo not in reused:
                    weight = core_experts.weight_of(experts, role.param, module if module is not experts else None)
                    weights.append((pseudo, core_experts.role_weight(weight, role)))
        bases = core_experts.experts_bases(weights, ranks, config.side, method=config.svd_method,
                                           seed=config.svd_seed) if weights else {}
        bases.update(reused)
        return {name: (module, layout, {role: (r, g, bases[f"{name}.{role}"]) for role, (r, g) in roles.items()})
                for name, (module, layout, roles) in plans.items()}

    @staticmethod
    def _selects_role(config: PiCaPeftConfig, name: str, role) -> bool:
        if not core_experts.role_matches(name, role, config.target_parameters):
            return False
        return not (config.exclude_modules and core_experts.role_matches(name, role, config.exclude_modules))

    def _inject_parameters(self, peft_config: PiCaPeftConfig, model: nn.Module, adapter_name: str,
                           low_cpu_mem_usage: bool) -> list[str]:
        """Wrap (or extend) every experts module :meth:`_plan_experts` selected in a :class:`PiCaPeftExperts`, one
        layer per module holding all its adapted roles (PEFT's LoRA nests one wrapper per parameter instead);
        returns the adapted parameters' names."""
        from peft.utils.other import _get_submodules

        targeted: list[str] = []
        for name, (module, layout, roles) in getattr(self, "_pending_experts", {}).items():
            weight = getattr(module.base_layer if isinstance(module, PiCaPeftExperts) else module, layout.up_param)
            m_dtype = default_m_dtype(weight.dtype)
            for role_name, (r, group, _) in roles.items():
                role = layout.role(role_name)
                shape = core_experts.experts_m_shape(layout.num_experts, role.out_features, role.in_features, r,
                                                     peft_config.side, not peft_config.share_experts)
                m = self._get_or_create_m(adapter_name, group, shape, m_dtype, weight.device,
                                          peft_config.init_weights)
                if adapter_name not in self.active_adapters:
                    m.requires_grad_(False)  # an added adapter is not trainable until set_adapter
            kwargs = dict(roles=roles, side=peft_config.side, store_basis=peft_config.store_bases,
                          inference_mode=peft_config.inference_mode)
            if isinstance(module, PiCaPeftExperts):
                module.update_layer(adapter_name, **kwargs)
            else:
                for p in module.parameters():
                    p.requires_grad_(False)
                parent, target, target_name = _get_submodules(model, name)
                new_module = PiCaPeftExperts(target, self._m_store(), layout, adapter_name, **kwargs)
                self._replace_module(parent, target_name, new_module, target)
            targeted.extend(f"{name}.{p}" for p in dict.fromkeys(layout.role(r).param for r in roles))
        return targeted

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        """PEFT's, except around experts layers: an experts module has no ``weight`` for PEFT's device placement,
        and a :class:`PiCaPeftExperts` is built with its bases on the fused weights' device already."""
        if isinstance(new_module, PiCaPeftExperts) or isinstance(child, PiCaPeftExperts):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    # -------------------------------------------------------- PEFT overrides
    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Cast ``M`` of ``adapter_name`` in place (the Parameter objects, hence the sharing, survive).

        autocast on: float16/bfloat16 ``M`` become float32. Off: ``M`` takes the dtype of its layers' weights.
        """
        store = self._modules.get("pica_M")
        if store is None or adapter_name not in store:
            return
        weight_dtypes: dict[str, torch.dtype] = {}
        for module in self.model.modules():
            if isinstance(module, PiCaPeftLinear) and adapter_name in module.pica_group:
                weight_dtypes.setdefault(module.pica_group[adapter_name], module.get_base_layer().weight.dtype)
            elif isinstance(module, PiCaPeftExperts) and adapter_name in module.pica_group:
                dtype = module.original(module.layout.up_param).dtype
                for group in module.pica_group[adapter_name].values():
                    weight_dtypes.setdefault(group, dtype)
        for group, m in store[adapter_name].items():
            if m.device.type == "meta":
                continue
            if autocast_adapter_dtype:
                target = torch.float32 if m.dtype in _LOW_PRECISION else m.dtype
            else:
                wdt = weight_dtypes.get(group, m.dtype)
                target = wdt if wdt.is_floating_point else m.dtype
            if m.dtype != target:
                with torch.no_grad():
                    m.data = m.data.to(target)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter in one transaction; an active one is replaced as PEFT does (the remaining active
        ones, else the first remaining adapter by name)."""
        with transaction(self._cell(), [self]) as txn:
            state = txn.before
            if adapter_name not in state.adapters or adapter_name not in self.peft_config:
                raise ValueError(f"Adapter {adapter_name} does not exist")
            if adapter_name in state.merged:
                raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge "
                                 f"them first.")
            remaining = [a for a in state.adapters if a != adapter_name]
            active = [a for a in state.active if a != adapter_name]
            if not active and adapter_name in state.active and remaining:
                active = sorted(remaining)[:1]
                warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                              f"{active[0]}.", stacklevel=2)
            txn.publish(state.evolve(adapters=remaining, active=active))
            super().delete_adapter(adapter_name)
            if active != list(state.active) and active:
                self._activate(active)  # requires_grad of the new active adapters
            self.active_adapter = active[0] if len(active) == 1 else active
            _UNDO_LOAD.get(self, {}).pop(adapter_name, None)
            store = self._modules.get("pica_M")
            if store is not None and adapter_name in store:
                del store[adapter_name]

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """``model(..., adapter_names=[...])``: one adapter name (or "__base__") per sample of the batch."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` while adapters are merged; unmerge first")
        unknown = {n for n in adapter_names if n != BASE_ADAPTER} - set(self.peft_config)
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        names = list(adapter_names)
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            names = [n for n in names for _ in range(num_beams)]
        # PiCa layers read the selection from a context variable (this call only, never the shared layers);
        # PEFT's own wrappers (modules_to_save) still take it from a hook.
        handles = []
        for module in self.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                hook = partial(adapter_names_pre_forward_hook, adapter_names=names)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with request([self._cell()], names=names):
                yield
        finally:
            for h in handles:
                h.remove()

    @property
    def merged(self) -> bool:
        return bool(self._cell().value.merged)

    # ------------------------------------------------------------ save/load
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if not config.store_bases:
            # Bases are recomputed on load: store a fingerprint per layer so a drifted basis is detected.
            for name, module in model.named_modules():
                if isinstance(module, PiCaPeftLinear) and adapter_name in module.pica_basis:
                    name = name.replace("_fsdp_wrapped_module.", "")
                    fp = basis_fingerprint(module.pica_basis[adapter_name], module.pica_side[adapter_name])
                    out[f"{name}.{FINGERPRINT_KEY}.{adapter_name}"] = fp.contiguous()
                elif isinstance(module, PiCaPeftExperts) and adapter_name in module.pica_r:
                    # One (E, r, 4) fingerprint per role, under the role's pseudo-layer name <module>.<role>.
                    name = name.replace("_fsdp_wrapped_module.", "")
                    side = module.pica_side[adapter_name]
                    for role in module.pica_r[adapter_name]:
                        fp = core_experts.experts_fingerprint(module.pica_basis[adapter_name][role], side)
                        out[f"{name}.{role}.{FINGERPRINT_KEY}.{adapter_name}"] = fp.contiguous()
        # The whole base model's identity (untargeted weights, embeddings, norms too), as the native files hold it.
        identity = {k: tensor_identity(t) for k, t in _base_tensors(model).items()}
        out[BASE_IDENTITY_KEY] = torch.frombuffer(bytearray(json.dumps(identity).encode()), dtype=torch.uint8)
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        tuner = model.base_model if isinstance(getattr(model, "base_model", None), PiCaPeftModel) else model
        undo = _UNDO_LOAD.get(tuner, {}).pop(adapter_name, None)
        try:
            return cls._checked_remap(model, config, adapter_name, state_dict)
        except BaseException:
            # A refused file: undo the injection of this adapter (PeftModel.from_pretrained / load_adapter injected
            # it before the weights were read), so the model is exactly as before the call.
            if undo is not None:
                undo.restore()
                if isinstance(tuner, PiCaPeftModel):
                    tuner.peft_config.pop(adapter_name, None)
            raise

    @classmethod
    def _checked_remap(cls, model, config, adapter_name, state_dict):
        suffix = "." + FINGERPRINT_KEY
        fingerprints = {k[: -len(suffix)]: v for k, v in state_dict.items() if k.endswith(suffix)}
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith(suffix)}
        identity = state_dict.pop(BASE_IDENTITY_KEY, None)
        on_mismatch = getattr(config, "check_base_model", "error")
        saved: dict = {}
        if identity is None:
            msg = ("base_tensors: the adapter file records no identity of its base model (key "
                   f"{BASE_IDENTITY_KEY!r} missing: written by another program, or edited), so the model cannot be "
                   "checked against it")
            if on_mismatch != "warn":
                raise AdapterMismatchError(f"{msg}; {_LOAD_ANYWAY}")
            warnings.warn(msg, UserWarning, stacklevel=3)
        else:
            saved = load_json(identity.cpu().numpy().tobytes(), f"the adapter file's {BASE_IDENTITY_KEY}")
            adapted = _adapted_weights(model)
            pending = check_base_tensors(_base_tensors(model), saved, on_mismatch, _LOAD_ANYWAY, adapted=adapted)
            check_when_data(model, pending, lambda: _base_tensors(model), on_mismatch, _LOAD_ANYWAY, adapted)
        for key, value in state_dict.items():
            if ".pica_M." in key:
                check_m_values(key.rpartition(".")[2], value, "the adapter file")
        bank = next((m for m in model.modules() if isinstance(m, PiCaBank)), None)
        if bank is not None and adapter_name in bank:
            # The file whole against the model its config built: every group's M present, nothing extra, ranks agree.
            found = {k.rpartition(".")[2]: tuple(v.shape) for k, v in state_dict.items() if ".pica_M." in k}
            expected = {g: tuple(m.shape) for g, m in bank.groups(adapter_name).items()}
            check_m_tensors(found, expected, config.r, config.side, "the adapter file")
            if not config.store_bases:
                layers = {n.replace("_fsdp_wrapped_module.", "") for n, m in model.named_modules()
                          if isinstance(m, PiCaPeftLinear) and adapter_name in m.pica_basis}
                layers |= {f"{n.replace('_fsdp_wrapped_module.', '')}.{role}" for n, m in model.named_modules()
                           if isinstance(m, PiCaPeftExperts) and adapter_name in m.pica_r
                           for role in m.pica_r[adapter_name]}
                missing = sorted(n for n in layers if n not in fingerprints
                                 and n.removeprefix("base_model.model.") not in fingerprints)
                if missing:
                    raise AdapterMismatchError(f"layers: the model built from the config adapts {missing[0]!r}, the "
                                               f"adapter file has no basis fingerprint for it ({len(missing)} missing)")
        if fingerprints and not config.store_bases:
            modules = {n.replace("_fsdp_wrapped_module.", ""): m for n, m in model.named_modules()}
            for name, stored in fingerprints.items():
                module = modules.get(name, modules.get(name.removeprefix("base_model.model.")))
                owner, _, role = name.rpartition(".")
                experts = modules.get(owner, modules.get(owner.removeprefix("base_model.model.")))
                if (module is None and isinstance(experts, PiCaPeftExperts) and adapter_name in experts.pica_r
                        and role in experts.pica_r[adapter_name]):
                    layer = name.removeprefix("base_model.model.")
                    entry = saved.get(f"{owner.removeprefix('base_model.model.')}.{experts.layout.role(role).param}")
                    saved_dtype = entry.get("dtype") if isinstance(entry, dict) else None
                    core_experts.check_experts_fingerprint(
                        layer, experts.pica_basis[adapter_name][role], experts.pica_side[adapter_name], stored,
                        saved_dtype=dtype_from_name(saved_dtype) if saved_dtype else None)
                    continue
                if not isinstance(module, PiCaPeftLinear) or adapter_name not in module.pica_basis:
                    raise AdapterMismatchError(
                        f"the adapter file has a PiCa basis fingerprint for {name!r}, but the model has no PiCa "
                        f"layer of adapter {adapter_name!r} there (wrong base model or target_modules?)"
                    )
                layer = name.removeprefix("base_model.model.")
                # The basis had the dtype of the (dequantized) weight it was computed from.
                entry = saved.get(f"{layer}.weight")
                saved_dtype = entry.get("dtype") if isinstance(entry, dict) else None
                check_basis_fingerprint(layer, module.pica_basis[adapter_name], module.pica_side[adapter_name], stored,
                                        saved_dtype=dtype_from_name(saved_dtype) if saved_dtype else None)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
