"""``RomaModel``: the PEFT tuner that puts :class:`~roma_peft.layer.RomaLayer` on the selected routers.

A new adapter resolves its config against the model once (registry, ``target_modules``/``exclude_modules``, layer
selection) and records the exact router paths and shapes in ``resolved_routers``; a saved adapter is checked against
the base model (names, shapes, MoE layer count) before anything is injected, and its weights must match exactly.
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_target_module_exists
from torch import nn

from .config import RomaConfig
from .constants import ADAPTER_PREFIX
from .hooks import install_peft_model_hooks
from .layer import NonFiniteAdapterError, RomaLayer, check_adapter_finite
from .routers import NoRoutersFoundError, RouterInfo, find_routers, group_by_layer, select_moe_layers
from .zero3 import full_shape, storage_key

__all__ = ["RomaModel", "resolve_routers", "check_adapter_finite"]


def _matches(config: RomaConfig, name: str, attr: str) -> bool:
    """PEFT's own name matching (exact, suffix or regex) for ``target_modules`` / ``exclude_modules``."""
    patterns = getattr(config, attr)
    if not patterns:
        return False
    probe = RomaConfig(target_modules=patterns)
    return bool(check_target_module_exists(probe, name))


def _describe(routers: list[RouterInfo], limit: int = 6) -> str:
    names = [r.name for r in routers]
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def resolve_routers(model: nn.Module, config: RomaConfig, routers: list[RouterInfo] | None = None) -> list[RouterInfo]:
    """The routers ``config`` selects in ``model`` (target/exclude filters, then MoE-layer selection).

    Args:
        model (`nn.Module`): a transformers MoE model (or a PEFT model wrapping one).
        config (`RomaConfig`): the selection to apply.
        routers (`list[RouterInfo]`, *optional*): ``find_routers(model)`` if the caller already has it (saves a
            walk of the model).

    Returns:
        `list[RouterInfo]`: the selected routers, in layer order.

    Raises:
        NoRoutersFoundError: the model has no router, or the filters leave none.
        ValueError: a selected router is of a family RoMA cannot tune, or shares its weight with another router.
    """
    all_routers = find_routers(model) if routers is None else routers
    routers = all_routers
    if not routers:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise NoRoutersFoundError(
            f"No MoE router found in this {model_type} model. Searched: the router classes that transformers models "
            "declare in `_can_record_outputs['router_logits']`, then modules named exactly 'gate' or 'router' that "
            "map hidden -> n_experts. Is this a Mixture-of-Experts model? For a remote-code MoE whose router has "
            "another name, pass RomaConfig(target_modules=[...]) with the router module names."
        )
    if config.target_modules:
        matched = [r for r in routers if _matches(config, r.name, "target_modules")]
        if not matched:
            raise NoRoutersFoundError(
                f"target_modules={config.target_modules!r} matched none of the {len(routers)} routers found: "
                f"{_describe(routers)}. Use router module names such as {routers[-1].name.rsplit('.', 1)[-1]!r} "
                "or full paths, or leave target_modules=None to use every router."
            )
        routers = matched
    if config.exclude_modules:
        routers = [r for r in routers if not _matches(config, r.name, "exclude_modules")]
        if not routers:
            raise NoRoutersFoundError(f"exclude_modules={config.exclude_modules!r} excluded every router.")
    layers = group_by_layer(routers)
    positions = select_moe_layers(len(layers), config.layer_selection, config.num_layers, config.moe_layer_indices)
    selected = [router for pos in positions for router in layers[pos]]
    bad = [r for r in selected if not r.family.supported]
    if bad:
        raise ValueError(
            f"Router {bad[0].name} ({type(bad[0].module).__name__}) cannot be tuned by RoMA: {bad[0].family.notes}."
        )
    _check_untied(selected, all_routers)
    return selected


def _router_matrix(router: RouterInfo) -> torch.Tensor | None:
    owner = router.module if router.projection_name == router.name else None
    if owner is None:
        rel = router.projection_name[len(router.name) + 1 :]
        owner = router.module.get_submodule(rel)
    owner = owner.get_base_layer() if isinstance(owner, BaseTunerLayer) else owner
    return getattr(owner, "weight", None)


def _check_untied(selected: list[RouterInfo], all_routers: list[RouterInfo]) -> None:
    """Refuse routers whose matrix is shared with another router (e.g. DiffusionGemma's encoder/decoder routers).

    Each RoMA layer owns its delta, so two tied routers would get two deltas: the unmerged model would no longer
    have tied routers, and merging would write both deltas into the one shared tensor (merged != unmerged).
    """
    weights = {router.name: _router_matrix(router) for router in all_routers}
    owners: dict[int, list[str]] = {}
    for name, weight in weights.items():
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            owners.setdefault(storage_key(weight), []).append(name)
    for router in selected:
        weight = weights.get(router.name)
        if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
            continue
        sharing = owners.get(storage_key(weight), [])
        if len(sharing) > 1:
            raise ValueError(
                f"Routers {sharing} share one weight tensor (tied routers). RoMA gives each adapted router its own "
                "delta, which would untie them and make merging inexact. Exclude all of them "
                f"(RomaConfig(exclude_modules={sharing!r})) or select other layers."
            )


def _model_type(model: nn.Module) -> str | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if isinstance(model_type, str) else None


def _family_names(routers: list[RouterInfo]) -> str | None:
    """The router family of ``routers`` (``"softmax"``, ``"sigmoid"`` ...); several joined by ``+``."""
    names = sorted({router.family.name for router in routers})
    return "+".join(names) if names else None


def _warn_other_family(model: nn.Module, config: RomaConfig, routers: list[RouterInfo]) -> None:
    """Warn when a saved adapter is loaded onto another model type or router family (names and shapes matched).

    Equal shapes do not mean equal routing: an OLMoE (softmax) adapter on a DeepSeek-V3 (sigmoid) base loads, but its
    deltas were trained for another scoring function. Adapters saved before these fields existed are not checked.
    """
    differences = []
    model_type = _model_type(model)
    if config.base_model_type is not None and model_type is not None and model_type != config.base_model_type:
        differences.append(f"model_type {config.base_model_type!r} (adapter) vs {model_type!r} (this model)")
    family = _family_names(routers)
    if config.router_family is not None and family is not None and family != config.router_family:
        differences.append(f"router family {config.router_family!r} (adapter) vs {family!r} (this model)")
    if differences:
        warnings.warn(
            f"This RoMA adapter was made for another kind of model: {'; '.join(differences)}. Router names and shapes "
            "match, so it loads, but its router deltas were trained for the other model's routing and may not mean "
            "anything here. Load it on the base model it was trained on (adapter_config.json: "
            "base_model_name_or_path).",
            UserWarning,
            stacklevel=2,
        )


class RomaModel(BaseTuner):
    """PEFT tuner for RoMA: only router deltas are trainable, saved and merged.

    Created by ``peft.get_peft_model(model, RomaConfig(...))`` after ``import roma_peft``; use the PEFT API
    (``save_pretrained``, ``PeftModel.from_pretrained``, ``merge_and_unload``, ``disable_adapter`` ...) as with LoRA.

    Args:
        model (`nn.Module`): the base MoE model to adapt.
        config (`RomaConfig` or `dict[str, RomaConfig]`): the adapter config(s), as PEFT's ``BaseTuner`` takes them.
        adapter_name (`str`): the name of the first adapter, ``"default"`` by default.
    """

    prefix: str = ADAPTER_PREFIX
    tuner_layer_cls = RomaLayer
    target_module_mapping: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ resolution
    def _resolve_config(self, model: nn.Module, config: RomaConfig) -> None:
        """Fill ``resolved_routers`` on a new config, or check a loaded one against ``model``."""
        all_routers = find_routers(model)
        if config.resolved_routers is None:
            _record_routers(model, config, all_routers)
        else:
            _check_saved_routers(model, config, all_routers)

    def _prepare_adapter_config(self, peft_config: RomaConfig, model_config: dict) -> RomaConfig:
        # Routers are found by the registry, not by a model_type -> target_modules table.
        return peft_config

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        if not isinstance(config, RomaConfig):
            raise TypeError(f"RomaModel needs a RomaConfig, got {type(config).__name__}.")
        install_peft_model_hooks()  # a RoMA adapter now exists: its card and save checks (see roma_peft.hooks)
        self._resolve_config(model, config)
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=None,  # the config names the exact routers; never guess them from a state dict
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: RomaConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """PEFT's key remapping, then a strict check: the checkpoint holds exactly the deltas the config names.

        PEFT itself only warns about missing adapter keys (the delta would silently stay zero, i.e. a partially loaded
        adapter). RoMA refuses: every adapted router must receive its delta, with the right shape.
        """
        state_dict = super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )

        def strip(key: str) -> str:
            return key.removeprefix("base_model.model.")

        suffix = f".{adapter_name}"
        expected = {
            strip(name): tuple(param.shape)
            for name, param in model.named_parameters()
            if name.endswith(suffix) and any(f".{attr}." in name for attr in RomaLayer.adapter_layer_names)
        }
        loaded = {strip(k): tuple(v.shape) for k, v in state_dict.items() if ADAPTER_PREFIX in k}
        for key, shape in expected.items():
            router = key.rsplit(".roma_", 1)[0]
            if key not in loaded:
                raise ValueError(
                    f"The RoMA checkpoint has no delta for router {router!r} ({key.rsplit('.', 2)[-2]}), although "
                    "its adapter_config.json adapts it: the adapter file is incomplete or belongs to another adapter. "
                    "Refusing to load a partial adapter; re-save it with save_pretrained()."
                )
            if loaded[key] != shape:
                raise ValueError(
                    f"Router shape mismatch at {router!r}: the checkpoint's delta has shape {loaded[key]} but the base "
                    f"model's router needs {shape}. Load the adapter on the base model it was trained on."
                )
        unexpected = sorted(set(loaded) - set(expected))
        if unexpected:
            raise ValueError(
                f"The RoMA checkpoint holds {len(unexpected)} tensor(s) that its adapter_config.json does not name "
                f"(first: {unexpected[0]!r}): config and weights do not belong together. Refusing to load."
            )
        return state_dict

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection of the adapter's tensors (what ``save_pretrained`` / ``get_peft_model_state_dict`` write),
        refused when the adapter is not finite: a NaN delta, or a finite delta whose ``W + Δ`` overflows in the model's
        dtype, would be saved and reload with NaN logits."""
        selected = super()._get_adapter_state_dict(
            model=model,
            config=config,
            adapter_name=adapter_name,
            state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        bad = [
            key
            for key, value in selected.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
        ]
        if bad:
            raise NonFiniteAdapterError(
                f"Refusing to save RoMA adapter {adapter_name!r}: {len(bad)} of its tensors hold NaN/inf (first: "
                f"{bad[0]!r}). Training diverged; reload the last good checkpoint."
            )
        check_adapter_finite(model, adapter_name)
        return selected

    @staticmethod
    def _check_target_module_exists(peft_config: RomaConfig, key: str):
        if key in (peft_config.resolved_routers or {}):
            return True
        # Report excluded routers to PEFT as excluded (otherwise it warns that exclude_modules excluded nothing).
        if peft_config.exclude_modules and _matches(peft_config, key, "exclude_modules"):
            return _ExcludedModule()
        return False

    def _create_and_replace(
        self,
        peft_config: RomaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        train_bias = current_key in (peft_config.resolved_bias_routers or [])
        if isinstance(target, RomaLayer):
            target.update_layer(adapter_name, train_bias=train_bias, init_weights=peft_config.init_weights)
            return
        if isinstance(target, BaseTunerLayer):
            raise ValueError(
                f"{current_key} is already wrapped by another PEFT method ({type(target).__name__}); RoMA cannot be "
                "stacked on it."
            )
        new_module = RomaLayer(target, adapter_name, train_bias=train_bias, init_weights=peft_config.init_weights)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ------------------------------------------------------------------ convenience
    def roma_layers(self) -> dict[str, RomaLayer]:
        """Module path (in the stock model) -> RoMA layer, in layer order."""
        return {
            name.replace("base_model.model.", ""): module
            for name, module in self.model.named_modules()
            if isinstance(module, RomaLayer)
        }


def _router_owner(model: nn.Module, name: str) -> nn.Module:
    """The module owning router ``name``'s matrix, unwrapped from a PEFT layer if one is already injected."""
    owner = model.get_submodule(name)
    return owner.get_base_layer() if isinstance(owner, BaseTunerLayer) else owner


def _record_routers(model: nn.Module, config: RomaConfig, all_routers) -> None:
    """A new adapter: record which routers it adapts (names, shapes, biases) and what base it was made for."""
    selected = resolve_routers(model, config, all_routers)
    shapes = {}
    bias = []
    for router in selected:
        owner = _router_owner(model, router.projection_name)
        shapes[router.projection_name] = list(full_shape(owner.weight))
        if config.train_router_bias and router.family.trainable_bias and router.has_bias:
            bias.append(router.projection_name)
    config.resolved_routers = shapes
    config.resolved_bias_routers = bias
    config.num_moe_layers = len(group_by_layer(all_routers))
    config.base_model_type = _model_type(model)
    config.router_family = _family_names(selected)


def _check_saved_routers(model: nn.Module, config: RomaConfig, all_routers) -> None:
    """A saved adapter: every named router must exist with the same shape, on a base with the same MoE layer count
    (and a bias where the adapter trained one); otherwise a ValueError that says which base to load it on."""
    available = {r.projection_name: r for r in all_routers}
    num_layers = len(group_by_layer(all_routers))
    if not all_routers:
        raise NoRoutersFoundError(
            f"This RoMA adapter adapts {len(config.resolved_routers)} routers (first: "
            f"{next(iter(config.resolved_routers), None)!r}) but the base model ({type(model).__name__}) has no MoE "
            "router. Load the adapter on the base model it was trained on (adapter_config.json: "
            "base_model_name_or_path)."
        )
    for name, shape in config.resolved_routers.items():
        if name not in available:
            hint = (
                f" The adapter was made for a model with {config.num_moe_layers} MoE layers; this one has {num_layers}."
                if config.num_moe_layers is not None and config.num_moe_layers != num_layers
                else ""
            )
            raise ValueError(
                f"This RoMA adapter adapts router {name!r}, which does not exist in the base model "
                f"({type(model).__name__}).{hint} Routers found: {_describe(all_routers)}. Load the adapter on the "
                "base model it was trained on (adapter_config.json: base_model_name_or_path)."
            )
        owner = _router_owner(model, name)
        if list(owner.weight.shape) != list(shape):
            raise ValueError(
                f"Router shape mismatch at {name!r}: the adapter's delta has shape {tuple(shape)} "
                f"(num_experts, hidden) but the base model's router weight has shape {tuple(owner.weight.shape)}. "
                "Load the adapter on the base model it was trained on."
            )
    if config.num_moe_layers is not None and config.num_moe_layers != num_layers:
        # Same router names and shapes but a different depth: "the last 5 MoE layers" of the adapter are not the
        # last 5 of this model, so loading would silently change which layers are adapted.
        raise ValueError(
            f"MoE layer count mismatch: this RoMA adapter was made for a base model with {config.num_moe_layers} "
            f"MoE layers, but this {type(model).__name__} has {num_layers} (first adapted router: "
            f"{next(iter(config.resolved_routers))!r}). Load the adapter on the base model it was trained on "
            "(adapter_config.json: base_model_name_or_path)."
        )
    _warn_other_family(model, config, [available[name] for name in config.resolved_routers])
    if config.resolved_bias_routers:
        for name in config.resolved_bias_routers:
            owner = _router_owner(model, name)
            if not isinstance(getattr(owner, "bias", None), torch.Tensor):
                raise ValueError(
                    f"This RoMA adapter adapts the bias of router {name!r}, but that router has no bias in the "
                    "base model. Load the adapter on the base model it was trained on."
                )
