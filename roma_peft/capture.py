"""Routing capture: the differentiable routing vector ``r_i`` of chosen prompt tokens, across the tuned layers.

:class:`RoutingRecorder` hooks the selected routers and, while switched on for a forward pass, turns their outputs into
one vector per sample: the chosen token positions (:data:`POSITIONS`), in the chosen representation
(:data:`REPRESENTATIONS`), the tuned layers concatenated in layer order. :func:`collect_routing` runs it over samples
(the fixed targets ``r_j``). Why hooks rather than ``output_router_logits``: docs/design.md, "Routing capture".
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import RomaConfig
from .constants import ADAPTER_PREFIX
from .devices import input_device
from .model import resolve_routers
from .prompts import PromptEncoding, encode_samples, padding_token_id
from .routers import RouterInfo, find_routers, router_logits_from_input

__all__ = ["RoutingSpec", "RoutingRecorder", "token_position_weights", "collect_routing", "routers_for"]

POSITIONS = ("last", "first", "middle", "mean")
REPRESENTATIONS = ("probs", "logits", "topk")


@dataclass
class RoutingSpec:
    """What the routing vector ``r`` of a sample is."""

    position: str = field(
        default="last",
        metadata={
            "help": (
                "Prompt tokens whose routing is used: 'last' (paper default, Last1), 'first', 'middle' (with "
                "num_tokens: LastN/FirstN/MiddleN, averaged) or 'mean' (mean over the whole prompt)."
            )
        },
    )
    num_tokens: int = field(default=1, metadata={"help": "N for last/first/middle-N positions (paper: 1)."})
    representation: str = field(
        default="probs",
        metadata={
            "help": (
                "'probs': the family's dense routing weights over all experts (softmax or sigmoid, from the "
                "registry); 'logits': raw router logits; 'topk': the family's sparse top-k weights."
            )
        },
    )

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ValueError(f"routing position must be one of {POSITIONS}, got {self.position!r}.")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"routing representation must be one of {REPRESENTATIONS}, got {self.representation!r}.")
        if not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive integer, got {self.num_tokens!r}.")

    def describe(self) -> str:
        """A stable string used to tag stored routing targets (a neighbourhood built for another spec is stale)."""
        return f"{self.position}{self.num_tokens}:{self.representation}"


def token_position_weights(
    attention_mask: torch.Tensor, spec: RoutingSpec, prompt_last_index: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T) weights that pick (and average) the chosen prompt positions of each row.

    Args:
        attention_mask: (B, T) 1 for real tokens, 0 for padding (left or right).
        spec: Which positions.
        prompt_last_index: (B,) index of each row's last *prompt* token, when the rows also contain an answer. By
            default the last real token of each row.
    """
    mask = attention_mask.to(torch.long)
    batch, length = mask.shape
    arange = torch.arange(length, device=mask.device)
    if (mask.sum(dim=1) == 0).any():
        raise ValueError("A row of the batch has no real token (attention_mask is all zeros).")
    first = torch.argmax(mask, dim=1)  # first real token (left padding safe)
    last_real = (mask * (arange + 1)).argmax(dim=1)
    last = last_real if prompt_last_index is None else prompt_last_index.to(mask.device).long()
    if (last < first).any() or (last > last_real).any():
        bad = int(torch.nonzero((last < first) | (last > last_real))[0, 0])
        raise ValueError(
            f"Row {bad}: the prompt's last token is at position {int(last[bad])}, outside the row's real tokens "
            f"[{int(first[bad])}, {int(last_real[bad])}]. Was the prompt truncated (max_length too small)?"
        )
    n = spec.num_tokens
    if spec.position == "mean":
        start, stop = first, last
    elif spec.position == "last":
        start, stop = torch.maximum(last - n + 1, first), last
    elif spec.position == "first":
        start, stop = first, torch.minimum(first + n - 1, last)
    else:  # middle
        centre = (first + last) // 2
        start = torch.maximum(centre - (n - 1) // 2, first)
        stop = torch.minimum(start + n - 1, last)
    selected = (arange[None, :] >= start[:, None]) & (arange[None, :] <= stop[:, None])
    weights = selected.float()
    return weights / weights.sum(dim=1, keepdim=True)


def routers_for(model: nn.Module, routers: Sequence[RouterInfo] | None = None, config=None) -> list[RouterInfo]:
    """The routers whose routing makes up ``r``.

    In order of preference: ``routers`` if given; the routers tuned by the active RoMA adapter of ``model``; the
    routers a :class:`~roma_peft.RomaConfig` selects (``config``, default ``RomaConfig()``: the last 5 MoE layers).
    """
    if routers is not None:
        return list(routers)
    peft_config = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    if isinstance(peft_config, dict) and isinstance(active, str) and active in peft_config:
        resolved = getattr(peft_config[active], "resolved_routers", None)
        if resolved:
            return [r for r in find_routers(model) if r.projection_name in resolved]
    return resolve_routers(model, config or RomaConfig())


class RoutingRecorder:
    """Records the routing of selected routers during forward passes it is switched on for.

    Example::

        recorder = RoutingRecorder(peft_model)            # the routers tuned by the active RoMA adapter
        with recorder:
            out = peft_model(input_ids=ids, attention_mask=mask)
        r = recorder.routing(mask)                        # (batch, sum of experts over layers), with grad

    The hooks stay registered until :meth:`remove` (or use the recorder in a ``with`` block each step: hooks are
    only *active* inside it).
    """

    def __init__(
        self,
        model: nn.Module,
        routers: Sequence[RouterInfo] | None = None,
        spec: RoutingSpec | None = None,
        config=None,
    ):
        self.model = model
        self.spec = spec or RoutingSpec()
        self.routers = routers_for(model, routers, config)
        if not self.routers:
            raise ValueError("RoutingRecorder needs at least one router.")
        inexact = sorted({r.family.name for r in self.routers if not r.family.probs_exact})
        if self.spec.representation == "probs" and inexact:
            warnings.warn(
                f"Router family {inexact} does not route with a dense distribution over all experts, so the captured "
                "'probs' (the family's scoring over all experts) only approximate the weights the model uses. Use "
                "RoutingSpec(representation='topk') (--routing_representation topk) for the exact routing weights.",
                stacklevel=2,
            )
        self._records: dict[int, torch.Tensor] = {}
        self._sparse: dict[int, tuple] = {}
        self._active = False
        self._handles = [
            router.module.register_forward_hook(self._make_hook(i, router)) for i, router in enumerate(self.routers)
        ]
        # Grad mode of the outer forward call (outside any checkpointed region): a forward run under no_grad is a
        # legitimate target collection, a grad-enabled forward whose router outputs carry no grad is reentrant
        # checkpointing (which runs the layers under no_grad).
        self._outer_grad_enabled: bool | None = None
        self._handles.append(model.register_forward_pre_hook(self._outer_hook))

    def _outer_hook(self, module, args):
        if self._active and self._outer_grad_enabled is None:
            self._outer_grad_enabled = torch.is_grad_enabled()

    @property
    def dims(self) -> list[int]:
        """Width of each router's block in the concatenated vector."""
        return [r.num_experts for r in self.routers]

    def _make_hook(self, slot: int, router: RouterInfo):
        family = router.family

        def hook(module, args, output):
            if not self._active or slot in self._records:
                return  # off, or a recompute / second call within the same forward: keep the first capture
            if family.logits_source == "input":
                # module.weight is W + delta while RomaLayer substitutes it for the call
                logits = router_logits_from_input(router, args[0], module.weight)
            else:
                logits = output[router.logits_index] if isinstance(output, (tuple, list)) else output
            self._records[slot] = logits.reshape(-1, logits.shape[-1])
            if self.spec.representation == "topk" and isinstance(output, (tuple, list)):
                self._sparse[slot] = tuple(output)

        return hook

    def __enter__(self) -> RoutingRecorder:
        self._records.clear()
        self._sparse.clear()
        self._outer_grad_enabled = None
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._active = False

    def remove(self) -> None:
        """Unregister the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _per_token(self, slot: int, router: RouterInfo) -> torch.Tensor:
        logits = self._records[slot]
        family = router.family
        if self.spec.representation == "logits":
            return logits.float()
        if self.spec.representation == "probs":
            return family.score(logits)
        # topk: the family's sparse weights over all experts
        output = self._sparse.get(slot)
        if family.sparse == "outputs" and output is not None and len(output) >= 3:
            weights, index = output[1], output[2]
            dense = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
            return dense.scatter(1, index.reshape(logits.shape[0], -1), weights.reshape(logits.shape[0], -1).float())
        if family.sparse == "dense_output" and output is not None:
            return output[0].reshape(logits.shape).float()
        if family.sparse == "dispatch_mask" and output is not None and len(output) >= 2:
            return output[0].reshape(logits.shape).float() * output[1].reshape(logits.shape[0], 1).float()
        top_k = _top_k(router, self.model)
        scores = family.score(logits)
        values, index = scores.topk(top_k, dim=-1)
        values = values / values.sum(dim=-1, keepdim=True)
        return torch.zeros_like(scores).scatter(1, index, values)

    def routing(self, attention_mask: torch.Tensor, prompt_last_index: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) routing vectors of the last recorded forward pass, concatenated across the selected routers."""
        missing = [r.name for i, r in enumerate(self.routers) if i not in self._records]
        if missing:
            raise RuntimeError(
                f"No routing was recorded for {missing[0]} (and {len(missing) - 1} more). Run the model's forward "
                "inside `with recorder:`; if it ran, this router was skipped by the model (e.g. a layer not executed)."
            )
        weights = token_position_weights(attention_mask, self.spec, prompt_last_index)
        batch, length = weights.shape
        blocks = []
        for slot, router in enumerate(self.routers):
            per_token = self._per_token(slot, router)
            if per_token.shape[0] != batch * length:
                raise RuntimeError(
                    f"Router {router.name} saw {per_token.shape[0]} tokens but the batch has {batch}x{length}: the "
                    "attention_mask does not belong to the recorded forward pass."
                )
            blocks.append(torch.einsum("bt,bte->be", weights.to(per_token.device), per_token.view(batch, length, -1)))
        vector = torch.cat(blocks, dim=-1)
        if self._outer_grad_enabled and not vector.requires_grad and _has_trainable_router(self.model):
            raise RuntimeError(
                "The captured routing has no gradient although router deltas are trainable. This happens with "
                "reentrant gradient checkpointing (use_reentrant=True), which runs layers under no_grad: the RoMA "
                "regulariser would silently do nothing. Use gradient_checkpointing_kwargs={'use_reentrant': False}."
            )
        return vector


def _has_trainable_router(model: nn.Module) -> bool:
    return any(p.requires_grad for n, p in model.named_parameters() if ADAPTER_PREFIX in n)


def _top_k(router: RouterInfo, model: nn.Module) -> int:
    for owner in (router.module, getattr(model, "config", None)):
        for attr in ("top_k", "num_experts_per_tok", "moe_top_k", "moe_topk"):
            value = getattr(owner, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    ffn_config = getattr(getattr(model, "config", None), "ffn_config", None)
    value = getattr(ffn_config, "moe_top_k", None)
    return int(value) if value else 2


@torch.no_grad()
def collect_routing(
    model: nn.Module,
    tokenizer,
    samples: Sequence[dict],
    spec: RoutingSpec | None = None,
    routers: Sequence[RouterInfo] | None = None,
    config=None,
    batch_size: int = 16,
    template: str | None = None,
    progress: bool = True,
    encoding=None,
) -> torch.Tensor:
    """(N, D) float32 routing vectors of the prompts of ``samples`` (no gradient), e.g. neighbour targets r_j.

    The prompt tokens come from :func:`roma_peft.prompts.encode_samples`, the function the training collator and the
    scorer use, so ``r_j`` is read at exactly the token (and after exactly the truncation) where training reads the
    live ``r_i``. One forward pass over each prompt; the answer is not needed because routers are causal: the routing
    of the last prompt token is the same with or without the answer appended. Rows are right-padded so every prompt
    starts at position 0, as in an unpadded forward and in the (right-padded) training batches.

    Args:
        encoding: A :class:`~roma_peft.prompts.PromptEncoding` (template, max_length, truncation, special tokens);
            ``template`` alone is a shortcut for ``PromptEncoding(template=template)``. Pass the trainer's encoding
            (``RomaTrainingArguments.prompt_encoding(tokenizer)``) when targets are built for training.
    """
    if encoding is None:
        encoding = PromptEncoding(template=template) if template else PromptEncoding()
    elif template is not None and template != encoding.template:
        raise ValueError(f"collect_routing got template={template!r} and an encoding with {encoding.template!r}.")
    spec = spec or RoutingSpec()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    prompts = [e.prompt for e in encode_samples(tokenizer, samples, encoding)]
    pad = padding_token_id(tokenizer)
    recorder = RoutingRecorder(model, routers=routers, spec=spec, config=config)
    device = input_device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="Routing targets"):
            batch = prompts[start : start + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), int(pad), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, prompt in enumerate(batch):
                ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
                mask[row, : len(prompt)] = 1
            ids, mask = ids.to(device), mask.to(device)
            with recorder:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            out.append(recorder.routing(mask).float().cpu())
    finally:
        recorder.remove()
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, sum(recorder.dims))
