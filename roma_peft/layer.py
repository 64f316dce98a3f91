"""``RomaLayer``: a router with a trainable float32 delta, ``W + Δ`` at call time, exact merge and unmerge.

The router's own forward runs with ``W + Δ`` substituted for its weight, so every family keeps its routing code and
every hook keeps firing; why, and why merging is bitwise exact: docs/design.md, "Delta application".
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .zero3 import full_shape, is_partitioned, local_shard

__all__ = ["RomaLayer", "NonFiniteAdapterError", "nonfinite_routers", "check_adapter_finite"]


class NonFiniteAdapterError(FloatingPointError):
    """A RoMA adapter's router weights (``Δ`` or ``W + Δ`` in the model's dtype) are NaN/inf: it is never saved."""


def _local(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The local values of a DTensor (FSDP2 / tensor parallel) or of a ZeRO-3 parameter (flat), else the tensor."""
    if tensor is not None and hasattr(tensor, "to_local"):
        return tensor.to_local()
    return local_shard(tensor) if tensor is not None else None


class RomaLayer(nn.Module, BaseTunerLayer):
    """Wraps one router matrix owner (the router module or its ``nn.Linear`` child) with per-adapter deltas.

    Args:
        base_layer (`nn.Module`): the module that owns the router's ``weight`` (and ``bias``).
        adapter_name (`str`): the first adapter's name.
        train_bias (`bool`): also give the adapter a bias delta (only where ``base_layer`` has a bias).
        init_weights (`bool`): zero deltas (`True`) or small random ones (tests).
    """

    adapter_layer_names = ("roma_delta", "roma_bias_delta")
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, train_bias: bool = False, init_weights: bool = True):
        super().__init__()
        self.base_layer = base_layer
        self.roma_delta = nn.ParameterDict()
        self.roma_bias_delta = nn.ParameterDict()
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        # The exact pre-merge weights, so that unmerge is bitwise exact.
        self._pre_merge_weight: torch.Tensor | None = None
        self._pre_merge_bias: torch.Tensor | None = None
        # Set by roma_peft.zero3.prepare_deepspeed_zero3: the MoE block around this router is a ZeRO-3 leaf module.
        self.zero3_prepared = False
        self.update_layer(adapter_name, train_bias=train_bias, init_weights=init_weights)

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, train_bias: bool = False, init_weights: bool = True) -> None:
        """Add the delta(s) of a new adapter, float32, on the base weight's device."""
        weight = self.get_base_layer().weight
        delta = torch.zeros(full_shape(weight), dtype=torch.float32, device=weight.device)
        if not init_weights:
            delta.normal_(std=0.02)
        self.roma_delta[adapter_name] = nn.Parameter(delta)
        bias = getattr(self.get_base_layer(), "bias", None)
        if train_bias and isinstance(bias, torch.Tensor):
            bias_delta = torch.zeros(full_shape(bias), dtype=torch.float32, device=bias.device)
            if not init_weights:
                bias_delta.normal_(std=0.02)
            self.roma_bias_delta[adapter_name] = nn.Parameter(bias_delta)
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # Follow the base weight's device but never its dtype: deltas stay float32 (see module docstring).
        target = device if device is not None else self.get_base_layer().weight.device
        for container in (self.roma_delta, self.roma_bias_delta):
            if adapter_name in container and container[adapter_name].device != target:
                if container[adapter_name].device.type == "meta":
                    continue
                container[adapter_name] = nn.Parameter(
                    container[adapter_name].detach().to(target, dtype=torch.float32),
                    requires_grad=container[adapter_name].requires_grad,
                )

    # ------------------------------------------------------------------ effective weights
    def _effective(self, base: torch.Tensor, container: nn.ParameterDict, adapter_names: list[str]) -> torch.Tensor:
        total = base.float()
        for name in adapter_names:
            if name in container:
                total = total + container[name].to(base.device)
        return total.to(base.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The float32 delta of ``adapter_name`` (what is saved, exported and merged)."""
        return self.roma_delta[adapter_name]

    def _active_with_delta(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.roma_delta]

    def nonfinite_reason(self, adapter_names: list[str] | None = None) -> str | None:
        """Why the router weights of ``adapter_names`` are not finite, or None when they are.

        Checks what the model computes with, not only the float32 deltas: ``W + Σ Δ`` cast to the base weight's dtype
        (the expression of :meth:`_effective`, i.e. what the forward substitutes). A finite delta can still overflow in
        fp16 (max 65504) once added to ``W``. ``adapter_names`` defaults to the active adapters (what the forward
        uses); a merged layer is checked against its pre-merge weight. Positions where ``W`` itself is not finite are
        not blamed on the adapter. Sharded (DTensor) or meta tensors are checked as far as they are local.
        """
        names = self._active_with_delta() if adapter_names is None else list(adapter_names)
        base = self.get_base_layer()
        pristine = {"weight": self._pre_merge_weight, "bias": self._pre_merge_bias}
        for attr, container in (("weight", self.roma_delta), ("bias", self.roma_bias_delta)):
            present = [a for a in names if a in container]
            deltas = [_local(container[a]) for a in present]
            deltas = [(a, d) for a, d in zip(present, deltas) if d.device.type != "meta"]
            for a, d in deltas:
                if not bool(torch.isfinite(d).all()):
                    return f"the {attr} delta of adapter {a!r} holds NaN/inf"
            w = _local(pristine[attr] if pristine[attr] is not None else getattr(base, attr, None))
            if not deltas or not isinstance(w, torch.Tensor) or w.device.type == "meta":
                continue
            if any(d.shape != w.shape for _, d in deltas):
                continue  # a shard layout we cannot line up: the deltas themselves were checked above
            total = w.detach().float()
            for _, d in deltas:
                total = total + d.detach().to(w.device)
            bad = ~torch.isfinite(total.to(w.dtype)) & torch.isfinite(w)
            if bool(bad.any()):
                largest = float(total[bad].abs().max())
                limit = torch.finfo(w.dtype).max if w.dtype.is_floating_point else float("inf")
                return (
                    f"W + Δ ({attr}) of adapter(s) {[a for a, _ in deltas]} is NaN/inf in the model's dtype {w.dtype} "
                    f"although every Δ is finite (largest |W + Δ| = {largest:.4g}, {w.dtype} max = {limit:.4g})"
                )
        return None

    @property
    def weight(self) -> torch.Tensor:
        """The router matrix the model sees: ``W + Δ`` while adapters are active and unmerged, else ``W``.

        Some routers read their projection child's weight instead of calling it (LongCat-Flash:
        ``F.linear(x, self.classifier.weight)``); returning the base weight here (PEFT's default) would silently
        bypass the delta.
        """
        base = self.get_base_layer()
        active = self._active_with_delta()
        if self.disable_adapters or self.merged or not active:
            return base.weight
        return self._effective(base.weight, self.roma_delta, active)

    @property
    def bias(self) -> torch.Tensor | None:
        base = self.get_base_layer()
        active = [a for a in self._active_with_delta() if a in self.roma_bias_delta]
        if self.disable_adapters or self.merged or not active:
            return getattr(base, "bias", None)
        return self._effective(base.bias, self.roma_bias_delta, active)

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any):
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(*args, **kwargs)
        if self.merged:
            return base(*args, **kwargs)
        active = self._active_with_delta()
        if not active:
            return base(*args, **kwargs)
        if is_partitioned(base.weight) and not self.zero3_prepared:
            # Substituting W + Δ for a partitioned parameter of a module that ZeRO-3 hooks itself breaks the fetch
            # hook: AttributeError: 'Tensor' object has no attribute 'ds_status' (deepspeed 0.19.8, docs/distributed.md)
            raise NotImplementedError(
                "This RoMA router's weight is a DeepSpeed ZeRO-3 partitioned parameter, but the model was not prepared "
                "for ZeRO-3: call roma_peft.zero3.prepare_deepspeed_zero3(model) before the DeepSpeed engine is "
                "created (RomaTrainer does it when TrainingArguments.deepspeed selects stage 3). It marks the MoE "
                "blocks around the tuned routers as ZeRO-3 leaf modules (without them ZeRO-3's fetch hooks fail on "
                "W + Δ: 'Tensor' object has no attribute 'ds_status') and lets their gradients reach the deltas."
            )
        params = {"weight": self._effective(base.weight, self.roma_delta, active)}
        if any(a in self.roma_bias_delta for a in active):
            params["bias"] = self._effective(base.bias, self.roma_bias_delta, active)
        return self._call_with(base, params, args, kwargs)

    @staticmethod
    def _call_with(base: nn.Module, params: dict[str, torch.Tensor], args: tuple, kwargs: dict):
        """Call ``base`` with some of its own parameters replaced by tensors, then put the originals back.

        Equivalent to ``torch.func.functional_call(base, params, args, kwargs)`` for parameters that ``base`` owns
        directly, without its generic re-parametrisation machinery (measured: most of the unmerged overhead on small
        models). The router's own ``forward`` and all its hooks run unchanged; the substituted tensors carry the
        autograd graph to the deltas.
        """
        own = base._parameters
        saved = {name: own[name] for name in params}
        try:
            for name, tensor in params.items():
                own[name] = tensor
            return base(*args, **kwargs)
        finally:
            for name, tensor in saved.items():
                own[name] = tensor

    # ------------------------------------------------------------------ merge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write ``W + Δ`` into the base weight (exactly the forward's expression)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.roma_delta]
        if not adapter_names:
            return
        base = self.get_base_layer()
        if is_partitioned(base.weight) and base.weight.numel() != full_shape(base.weight).numel():
            raise RuntimeError(
                "Cannot merge a RoMA adapter into a ZeRO-3 partitioned router weight (its data is empty here). Merge "
                "inside deepspeed.zero.GatheredParameters(..., modifier_rank=0), or load the saved adapter on a "
                "model without ZeRO-3 and merge there."
            )
        if self._pre_merge_weight is None:
            self._pre_merge_weight = base.weight.data.clone()
            if isinstance(getattr(base, "bias", None), torch.Tensor):
                self._pre_merge_bias = base.bias.data.clone()
        # Merging on top of earlier merges: recompute from the pristine weight with every merged adapter, so that the
        # result equals the forward with all of them active.
        names = self.merged_adapters + adapter_names
        new_weight = self._effective(self._pre_merge_weight, self.roma_delta, names)
        if safe_merge and not torch.isfinite(new_weight).all():
            raise ValueError(f"NaNs/infs detected in the merged router weight of adapter(s) {adapter_names}.")
        base.weight.data.copy_(new_weight)
        if self._pre_merge_bias is not None and any(a in self.roma_bias_delta for a in names):
            base.bias.data.copy_(self._effective(self._pre_merge_bias, self.roma_bias_delta, names))
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Restore the original router weight bitwise."""
        if not self.merged:
            return
        base = self.get_base_layer()
        base.weight.data.copy_(self._pre_merge_weight)
        if self._pre_merge_bias is not None:
            base.bias.data.copy_(self._pre_merge_bias)
        self._pre_merge_weight = None
        self._pre_merge_bias = None
        self.merged_adapters = []

    def __repr__(self) -> str:
        return "roma." + super().__repr__()


def nonfinite_routers(model: nn.Module, adapter_names: list[str] | None = None) -> list[tuple[str, str]]:
    """Every RoMA layer of ``model`` whose router weights are NaN/inf (see :meth:`RomaLayer.nonfinite_reason`).

    Args:
        model (`nn.Module`): a model with RoMA layers.
        adapter_names (`list[str]`, *optional*): the adapters to check (default: each layer's active adapters, what
            the model computes with).

    Returns:
        `list[tuple[str, str]]`: ``(module path, reason)`` per offending layer; empty when all are finite.
    """
    bad = []
    for name, module in model.named_modules():
        if isinstance(module, RomaLayer):
            reason = module.nonfinite_reason(adapter_names)
            if reason is not None:
                bad.append((name.replace("base_model.model.", ""), reason))
    return bad


def check_adapter_finite(model: nn.Module, adapter_name: str) -> None:
    """Raise :class:`NonFiniteAdapterError` when ``adapter_name``'s router weights are not finite.

    Checks the deltas and ``W + Δ`` in the base weight's dtype (see :meth:`RomaLayer.nonfinite_reason`); run before an
    adapter is saved, so that a diverged adapter never reaches the disk.

    Args:
        model (`nn.Module`): a ``PeftModel`` or any model with RoMA layers injected.
        adapter_name (`str`): the adapter to check.

    Raises:
        NonFiniteAdapterError: naming the first router whose weights are NaN/inf and why.
    """
    bad = nonfinite_routers(model, [adapter_name])
    if bad:
        name, reason = bad[0]
        more = f" (and {len(bad) - 1} more router(s))" if len(bad) > 1 else ""
        raise NonFiniteAdapterError(
            f"Refusing to save RoMA adapter {adapter_name!r}: at router {name!r}, {reason}{more}. The model would "
            "compute NaN logits with it. Training diverged (lower the learning rate); reload the last good checkpoint."
        )
