"""DeepSpeed ZeRO-3: everything roma_peft needs to know about partitioned parameters, in one place.

Under ZeRO-3 (the stage-3 engine, or a model loaded under ``deepspeed.zero.Init`` as ``roma-peft train --deepspeed``
does), a parameter's own ``data`` is empty outside its module's forward; DeepSpeed keeps the full shape in
``ds_shape`` and this rank's slice of the flattened tensor in ``ds_tensor``. Code that reads shapes, identities or
values of router weights goes through the helpers here instead of ``tensor.shape`` / ``data_ptr()``.

:func:`prepare_deepspeed_zero3` makes a RoMA model trainable under ZeRO-3 (``RomaTrainer`` calls it); why it does
what it does, measured with deepspeed 0.19.8: docs/distributed.md, "DeepSpeed".
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_partitioned", "full_shape", "local_shard", "full_value", "storage_key", "prepare_deepspeed_zero3"]


def is_partitioned(tensor: torch.Tensor | None) -> bool:
    """Whether ``tensor`` is a DeepSpeed ZeRO-3 parameter (``deepspeed.zero.Init`` or the stage-3 engine)."""
    return tensor is not None and hasattr(tensor, "ds_id")


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The full shape of ``tensor``, also of a ZeRO-3 parameter (whose ``shape`` is empty between forwards)."""
    return tensor.ds_shape if is_partitioned(tensor) else tensor.shape


def storage_key(tensor: torch.Tensor):
    """What identifies ``tensor``'s storage, to find tied weights: ``data_ptr()``, or the parameter object itself
    under ZeRO-3 (every empty partitioned parameter shares one address)."""
    return ("zero3", id(tensor)) if is_partitioned(tensor) else tensor.data_ptr()


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's values of a ZeRO-3 parameter, flat, without the padding (``ds_tensor``); other tensors as they are.

    Two parameters of the same shape are sliced alike, so the shards of ``W`` and ``Δ`` line up element by element.
    """
    shard = getattr(tensor, "ds_tensor", None)
    if shard is None:
        return tensor
    flat = shard.detach().reshape(-1)
    group = getattr(tensor, "ds_process_group", None)
    rank = torch.distributed.get_rank(group=group) if torch.distributed.is_initialized() else 0
    start = flat.numel() * rank
    return flat[: max(0, min(flat.numel(), tensor.ds_numel - start))]


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of ``tensor``, detached: a ZeRO-3 parameter is gathered into a copy (``GatheredParameters``, a
    collective: every rank must call it for the same parameter); other tensors as they are."""
    if not is_partitioned(tensor):
        return tensor.detach()
    import deepspeed

    with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
        return tensor.detach().clone()


def prepare_deepspeed_zero3(model: nn.Module) -> list[type]:
    """Make the RoMA layers of ``model`` train under DeepSpeed ZeRO-3; call it before the engine is created.

    ``RomaTrainer`` calls it when ``TrainingArguments.deepspeed`` selects stage 3
    (``transformers.integrations.is_deepspeed_zero3_enabled()``); a hand-written accelerate/DeepSpeed loop calls it
    after ``get_peft_model`` and before ``accelerator.prepare``. Two things:

    * The MoE block around each tuned router becomes a ZeRO-3 leaf module (``deepspeed.utils.set_z3_leaf_modules``,
      by class): ZeRO-3 gathers the block's parameters (router weight and deltas included) for the block as a whole
      and puts no hooks below it, so :class:`~roma_peft.layer.RomaLayer` can substitute ``W + Δ`` for the router's
      weight. Without it the router's own fetch hook meets the substituted tensor (``'Tensor' object has no
      attribute 'ds_status'``). It also gathers all experts of the block on every rank, the usual ZeRO-3 set-up for
      MoE blocks.
    * The block's input is made to require grad (a forward pre-hook run before DeepSpeed's, only while grad is
      enabled). ZeRO-3 reduces a leaf module's gradients in a full backward hook, which fires once the gradients of
      the block's inputs are computed; when no input requires grad (the first tuned layer, all layers below being
      frozen) it fires before the deltas have a gradient, partitions an empty one, and the deltas' ``AccumulateGrad``
      fails: ``The size of tensor a (0) must match the size of tensor b (32)``, for plain router training too. The
      hidden states are detached first (they carry no graph), so the forward values are unchanged.

    Args:
        model (`nn.Module`): a ``PeftModel`` (or any model) with RoMA layers injected, not yet given to DeepSpeed.

    Returns:
        `list[type]`: the MoE block classes made leaf modules.

    Raises:
        ValueError: a RoMA layer has no enclosing MoE block.
    """
    from deepspeed.utils import set_z3_leaf_modules

    # function-level: layer.py and routers.py import this module's helpers
    from .layer import RomaLayer
    from .routers import find_routers

    parents: dict[int, nn.Module] = {}
    for module in model.modules():
        for child in module.children():
            parents[id(child)] = module
    routers = {id(r.module) for r in find_routers(model)}
    blocks: dict[int, nn.Module] = {}
    for layer in model.modules():
        if not isinstance(layer, RomaLayer):
            continue
        # The RoMA layer wraps the router itself (the block is its parent) or the router's projection child (the
        # router is its parent, the block the router's parent).
        owner = layer if id(layer.get_base_layer()) in routers else parents.get(id(layer))
        block = parents.get(id(owner)) if owner is not None else None
        if block is None:
            raise ValueError(f"Cannot find the MoE block around the RoMA layer {layer.get_base_layer()!r}.")
        blocks[id(block)] = block
        layer.zero3_prepared = True
    classes = list(dict.fromkeys(type(block) for block in blocks.values()))
    if classes:
        set_z3_leaf_modules(model, classes)
    for block in blocks.values():
        if not getattr(block, "_roma_zero3_input_hook", False):
            block.register_forward_pre_hook(_input_requires_grad, with_kwargs=True, prepend=True)
            block._roma_zero3_input_hook = True
    return classes


def _input_requires_grad(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a ZeRO-3 leaf MoE block (see :func:`prepare_deepspeed_zero3`): its hidden states (the first
    tensor argument) require grad while grad is enabled, so that ZeRO-3's gradient reduction waits for the deltas."""
    if not torch.is_grad_enabled():
        return None
    if args and isinstance(args[0], torch.Tensor):
        if args[0].requires_grad or not args[0].is_floating_point():
            return None
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and not hidden.requires_grad:
        return args, {**kwargs, "hidden_states": hidden.detach().requires_grad_(True)}
    return None
