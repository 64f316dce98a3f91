"""What decides S and the routing targets r_j, recorded with a neighbourhood and checked before training.

A neighbourhood is only valid for the conditions it was made under: S and r_j belong to one prompt (template,
tokenizer, truncation), one base model (the router weights it was scored and captured with), one routing spec and one
layer selection of the adapter. Built under one set and used under another, everything still runs and the
regulariser silently pulls towards the routing of other tokens or another model. So :func:`routing_conditions`
records them and :func:`check_conditions` refuses a mismatch, naming both values.

The comparisons are on *effects*, not on spellings: the prompt is compared through a hash of every sample's prompt
tokens (so a different template, tokenizer, chat template or truncation that changes a single prompt token is caught,
while ``max_length=2048`` vs no limit on short prompts is not a false alarm), the base model through a hash of its
router weights (base weights, with any RoMA adapter ignored).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .layer import RomaLayer
from .model import _router_matrix
from .prompts import PromptEncoding, encode_samples, prompt_tokens_hash
from .routers import find_routers
from .zero3 import full_value

__all__ = ["routing_conditions", "check_conditions", "router_fingerprint", "ConditionsMismatchError"]

ADAPTER_SELECTION_FIELDS = (
    "layer_selection",
    "num_layers",
    "moe_layer_indices",
    "target_modules",
    "exclude_modules",
    "train_router_bias",
)


class ConditionsMismatchError(ValueError):
    """A neighbourhood (S, N(i), r_j) was made under other conditions than the ones it is used under."""


def router_fingerprint(model: nn.Module) -> str | None:
    """sha256 over the names, shapes, dtypes and values of every router matrix of the base model.

    Router matrices are small (hidden x experts per layer: ~100 MB for a 235B model), so hashing them all costs well
    under a second and identifies the checkpoint the routing came from. ``None`` when a weight is not materialised
    (meta device, e.g. disk offload).
    """
    # a merged RoMA layer's base weight holds W + Δ; its saved pre-merge copy is the checkpoint's W
    pristine = {
        id(layer.get_base_layer().weight): layer._pre_merge_weight
        for layer in model.modules()
        if isinstance(layer, RomaLayer) and layer._pre_merge_weight is not None
    }
    h = hashlib.sha256()
    for router in find_routers(model):
        weight = _router_matrix(router)
        weight = pristine.get(id(weight), weight)
        if not isinstance(weight, torch.Tensor):
            continue
        full = getattr(weight, "full_tensor", None)  # a DTensor shard (FSDP2): hash the whole matrix
        weight = full() if callable(full) else full_value(weight)  # ZeRO-3: gathered (a collective)
        if weight.device.type == "meta":
            return None
        data = weight.detach().contiguous().cpu()
        h.update(f"{router.name}|{tuple(data.shape)}|{data.dtype}|".encode())
        h.update(data.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _adapter_selection(model: nn.Module) -> dict | None:
    peft_config = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    if not isinstance(peft_config, dict) or active not in peft_config:
        return None
    config = peft_config[active]
    out = {name: getattr(config, name, None) for name in ADAPTER_SELECTION_FIELDS}
    out = {k: (sorted(v) if isinstance(v, (set, frozenset)) else v) for k, v in out.items()}
    out["resolved_routers"] = sorted(getattr(config, "resolved_routers", None) or [])
    return out


def routing_conditions(
    model: nn.Module,
    tokenizer,
    samples: Sequence[Mapping[str, Any]],
    encoding=None,
    routing_spec: str | None = None,
    scored_template: str | None = None,
    spec=None,
) -> dict:
    """The conditions S and r_j of ``samples`` are made under, as a JSON-able dict for the neighbourhood's metadata.

    Args:
        model: The model whose base routers scored S and produced r_j (a ``PeftModel`` with a RoMA adapter: its base
            weights are fingerprinted and its layer selection recorded).
        tokenizer: The tokenizer the prompts were encoded with.
        samples: The training samples, in neighbourhood row order.
        encoding: The :class:`~roma_peft.prompts.PromptEncoding` used for capture (and training).
        routing_spec: The routing tag (``roma_peft.trainer.routing_spec_string``).
        spec: The :class:`~roma_peft.capture.RoutingSpec` (its fields are recorded so a command can read them back).
        scored_template: The template S was scored with, when it came from a ``ScoreResult``.
    """
    encoding = encoding or PromptEncoding()
    config = getattr(model, "config", None)
    return {
        "prompt": encoding.describe(tokenizer),
        "prompt_tokens_hash": prompt_tokens_hash(encode_samples(tokenizer, samples, encoding)),
        "scored_template": scored_template,
        "model": getattr(config, "_name_or_path", None) or None,
        "model_type": getattr(config, "model_type", None),
        "router_fingerprint": router_fingerprint(model),
        "routing_spec": routing_spec,
        "routing": None
        if spec is None
        else {"position": spec.position, "num_tokens": spec.num_tokens, "representation": spec.representation},
        "adapter": _adapter_selection(model),
    }


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def check_conditions(
    stored: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    what: str = "neighbourhood",
    hint: str = "Rebuild it under the current conditions (`roma-peft neighbours` or "
    "roma_peft.build_neighbourhood) or use the ones it was built with.",
) -> None:
    """Refuse ``current`` conditions that differ from ``stored`` ones in anything that decides S or r_j.

    Keys absent on either side (an older neighbourhood, a fingerprint that could not be computed) are not compared.
    The error lists every difference with both values.
    """
    if not stored:
        return
    problems = []
    s_prompt, c_prompt = stored.get("prompt") or {}, current.get("prompt") or {}
    if (
        stored.get("prompt_tokens_hash")
        and current.get("prompt_tokens_hash")
        and stored["prompt_tokens_hash"] != current["prompt_tokens_hash"]
    ):
        changed = {
            k: (s_prompt.get(k), c_prompt.get(k))
            for k in sorted(set(s_prompt) | set(c_prompt))
            if s_prompt.get(k) != c_prompt.get(k)
        }
        detail = "; ".join(f"{k}: {_short(a)} (stored) vs {_short(b)} (now)" for k, (a, b) in changed.items())
        problems.append(
            "the prompts tokenise differently, so r_j was read at other tokens than r_i will be"
            + (f" ({detail})" if detail else " (same settings: the tokenizer's vocabulary or the data differ)")
        )
    s_tpl, c_tpl = stored.get("scored_template"), c_prompt.get("template")
    if s_tpl and c_tpl and s_tpl != c_tpl:
        problems.append(
            f"S was scored with the template {_short(s_tpl)} but the prompt template now is {_short(c_tpl)}"
        )
    if (
        stored.get("router_fingerprint")
        and current.get("router_fingerprint")
        and stored["router_fingerprint"] != current["router_fingerprint"]
    ):
        problems.append(
            f"the base model differs: router weights fingerprint {stored['router_fingerprint'][:12]} "
            f"({stored.get('model')}, {stored.get('model_type')}) vs {current['router_fingerprint'][:12]} "
            f"({current.get('model')}, {current.get('model_type')})"
        )
    s_spec, c_spec = stored.get("routing_spec"), current.get("routing_spec")
    if s_spec and c_spec and s_spec != c_spec:
        problems.append(f"routing spec/tuned routers {_short(s_spec)} (stored) vs {_short(c_spec)} (now)")
    s_ad, c_ad = stored.get("adapter") or {}, current.get("adapter") or {}
    if s_ad and c_ad and s_ad.get("resolved_routers") != c_ad.get("resolved_routers"):
        changed = {k: (s_ad.get(k), c_ad.get(k)) for k in ADAPTER_SELECTION_FIELDS if s_ad.get(k) != c_ad.get(k)}
        problems.append(
            f"the adapter tunes other routers ({len(s_ad.get('resolved_routers') or [])} stored vs "
            f"{len(c_ad.get('resolved_routers') or [])} now; selection "
            + "; ".join(f"{k}: {a!r} (stored) vs {b!r} (now)" for k, (a, b) in changed.items())
            + ")"
        )
    if problems:
        raise ConditionsMismatchError(
            f"The {what} was made under other conditions: " + "; ".join(problems) + ". " + hint
        )
