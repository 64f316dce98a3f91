"""Sweep RoMA over every MoE model type of the installed transformers, on tiny random models (CPU).

Discovery: a model type is swept when its modeling module has a ``PreTrainedModel`` class for that config whose
``_can_record_outputs`` declares ``router_logits`` (preferring ``*ForCausalLM``, then ``*ForConditionalGeneration``,
then the text model), or when its config wraps a MoE ``text_config`` (multimodal wrappers: the
conditional-generation class is run with text-only input).

For each type a tiny random model (hidden 32, 4 layers with >= 2 MoE layers, 8 experts, top-k 2, float32, eval
mode) is checked through the public API only:

1. ``get_peft_model(model, RomaConfig(num_layers=2))`` finds routers, only ``roma_`` deltas are trainable, and the
   zero-initialised adapter leaves the output bit-identical;
2. random deltas change the output; ``save_pretrained`` -> ``PeftModel.from_pretrained`` on a fresh copy reproduces
   it exactly; ``merge_and_unload`` equals the unmerged model;
3. ``RoutingRecorder`` gives a routing vector whose gradient reaches every delta, and so does the LM loss;
4. the routing RoMA captures is the routing the model uses (with the random deltas on, every token, every tuned
   router): ``RoutingRecorder`` with representation ``topk`` must equal the top-k weights the model routes with (read
   from the router's output, or from the experts' inputs where the router returns logits only), and with ``probs``
   must equal the model's own dense scores where the model computes them (the router's ``score_fn`` / its returned
   probabilities) and, at the experts the model selected, be proportional to its top-k weights (one factor per token:
   renormalisation, scaling factor). A wrong scoring (softmax captured for a sigmoid or sqrt-softplus router) fails
   here. Any ``ScoringAssumptionWarning`` the registry issues is recorded.

Families whose routers RoMA cannot tune as a matrix must fail step 1 with the registry's reason; they are reported
as ``unsupported``.

Run (about 5-10 minutes on one CPU thread)::

    python scripts/sweep_families.py                      # all types, writes docs/sweep_families.json
    python scripts/sweep_families.py --only olmoe,jamba   # re-run some types, merged into the existing JSON
    python scripts/gen_architectures_doc.py               # refresh docs/architectures.md from the JSON
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_JSON = os.path.join(ROOT, "docs", "sweep_families.json")

VOCAB = 96
HIDDEN = 32
EXPERTS = 8
TOP_K = 2

# Generic tiny values, passed to a config only when its constructor accepts the name.
TEXT_TINY = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    d_model=HIDDEN,
    intermediate_size=32,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=16,
    num_hidden_layers=4,
    num_layers=4,
    n_layers=4,
    num_attention_heads=4,
    n_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    # experts / top-k under every name transformers uses
    num_experts=EXPERTS,
    num_local_experts=EXPERTS,
    n_routed_experts=EXPERTS,
    moe_num_experts=EXPERTS,
    num_experts_per_tok=TOP_K,
    moe_topk=TOP_K,
    moe_k=TOP_K,
    top_k_experts=TOP_K,
    moe_top_k=TOP_K,
    # at most one leading dense layer, trivial expert groups
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    num_dense_layers=1,
    n_shared_experts=1,
    # no chunked / sliding attention surprises at 8 tokens
    sliding_window=64,
)
# DeepSeek-style multi-head latent attention: num_key_value_heads == num_attention_heads, head_dim == qk_rope_head_dim.
MLA_TINY = dict(
    num_key_value_heads=4,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    head_dim=8,
)
# Non-text sub-configs of multimodal wrappers: as small as they go.
SUB_TINY = dict(
    hidden_size=16,
    intermediate_size=16,
    num_hidden_layers=1,
    depth=1,
    num_layers=1,
    num_attention_heads=2,
    num_heads=2,
    num_key_value_heads=2,
    out_hidden_size=HIDDEN,
    projection_dim=HIDDEN,
    head_dim=8,
    patch_size=4,
    image_size=16,
)

#: Per model type: config overrides the generic values cannot guess (a key "text" goes to the text sub-config; a
#: dict under a wrapper's other sub-config name, e.g. "vision_config", is merged into that sub-config's tiny values).
_MROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])
_OCR2_TEXT = dict(mlp_layer_types=["dense", "sparse", "sparse", "sparse"])
_HYV4_TEXT = dict(rope_parameters=dict(_MROPE))
_GLM4V_TEXT = dict(rope_parameters=dict(_MROPE, partial_rotary_factor=1.0))
_SPARSE3 = ["dense", "sparse", "sparse", "sparse"]  # `mlp_layer_types` defaults to 3 leading dense layers
_ERNIE_VL_TEXT = dict(moe_intermediate_size=[16, 16], mlp_layer_types=_SPARSE3)  # text, vision expert widths
_GLM5_TEXT = dict(
    qk_rope_head_dim=0, qk_nope_head_dim=8, head_dim=8, index_topk=4, index_kpool=1, mlp_layer_types=_SPARSE3
)
# Qwen4-Exp builds its QSA token indexer unconditionally: every `indexer_*` field is needed
_QSA = dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=2)
OVERRIDES: dict[str, dict] = {
    "dbrx": dict(
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=32, moe_num_experts=EXPERTS, moe_top_k=TOP_K),
    ),
    "doge": dict(is_moe=True, num_experts=16),  # product keys: num_experts must be a square
    "gemma4_text": dict(enable_moe_block=True),
    "gemma4": dict(text=dict(enable_moe_block=True)),
    "llama4_text": dict(interleave_moe_layer_step=1, intermediate_size_mlp=32),
    "llama4": dict(text=dict(interleave_moe_layer_step=1, intermediate_size_mlp=32)),
    "jamba": dict(expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1),
    "qwen3_5_moe": dict(text=dict(layer_types=["linear_attention", "full_attention"] * 2)),
    "longcat_flash": dict(zero_expert_num=2),  # default 256 identity experts drown the 8 routed ones
    "zaya": dict(num_experts_per_tok=1),  # ZAYA validates top-1 only (it is unsupported by RoMA anyway)
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1),
    "hy_v4_vl_text": _HYV4_TEXT,
    "hy_v4_vl": dict(text=_HYV4_TEXT),
    "glm4v_moe_text": _GLM4V_TEXT,
    "glm4v_moe": dict(text=_GLM4V_TEXT),
    "deepseek_ocr2_text": _OCR2_TEXT,
    "deepseek_ocr2": dict(text=_OCR2_TEXT),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),
    "ernie4_5_vl_moe_text": _ERNIE_VL_TEXT,
    "ernie4_5_vl_moe": dict(text=_ERNIE_VL_TEXT),
    "glm5_next_text": _GLM5_TEXT,
    "glm5_next": dict(text=_GLM5_TEXT),
    "qwen4_exp_text": _QSA,
    "qwen4_exp": dict(text=_QSA),
    "qwen3_omni_moe_talker_text": dict(shared_expert_intermediate_size=16),
    # transformers 5.24: the thinker's get_rope_index reads `vision_start_token_id`, which its config lacks
    "qwen3_omni_moe_thinker": dict(vision_start_token_id=VOCAB - 4),
    "beam": dict(mlp_layer_types=_SPARSE3),
    "step3p5": dict(mlp_layer_types=_SPARSE3),
    "step3p7": dict(text=dict(mlp_layer_types=_SPARSE3)),
    # one hash-routed layer (static token->expert table) kept on purpose, then three learned-router MoE layers
    "deepseek_v4": dict(mlp_layer_types=["hash_moe", "moe", "moe", "moe"]),
    "muse_spark": dict(audio_config=dict(patch_sizes=[4], hidden_sizes=[16], depths=[1])),  # one entry per layer
    "inkling2": dict(vision_config=dict(text_hidden_size=HIDDEN)),
    "inkling2_loop": dict(vision_config=dict(text_hidden_size=HIDDEN)),
    # the vision tower defaults to a 42-layer expert pyramid (`per_layer_config` for layers 25..41); the text model
    # to sliding-window layers with 64-head MLA (`swa_*`): keep the tower dense and the text model unwindowed
    "dots3_note": dict(
        text=dict(use_sliding_window=False, mlp_layer_types=_SPARSE3),
        vision_config=dict(mlp_layer_types=["dense"], adapter_in_dim=16, adapter_out_dim=HIDDEN),
        audio_config=dict(adapter_input_size=16, adapter_out_dim=HIDDEN),
    ),
    "nemotron_h": dict(layers_block_type=["linear_attention", "moe", "full_attention", "moe"]),
}

#: Extra forward kwargs per model type (never a RoMA setting: workarounds for the model's own forward).
FORWARD_KWARGS: dict[str, dict] = {}

#: Model types fed ``inputs_embeds`` (a fixed random tensor) instead of ``input_ids``: transformers 5.24's
#: Qwen3OmniMoeTalkerModel.forward embeds ids with a nonexistent ``self.embed_tokens`` (the talker is always driven
#: by embeddings from the thinker in the full model).
EMBEDS_INPUT = {"qwen3_omni_moe_talker_text"}

#: Model types that cannot run here, with the reason (only what is not a config problem).
SKIP: dict[str, str] = {
    "llama4": "transformers 5.24 bug: Llama4ForConditionalGeneration.forward reads `outputs.image_outputs`, which the "
    "text model's output lacks, on every forward (also with return_dict=False); its text model is swept as "
    "llama4_text",
}


def _accepted(cls) -> set[str]:
    names = set(inspect.signature(cls.__init__).parameters)
    names |= set(getattr(cls, "attribute_map", {}) or {})
    return names


def _tiny_kwargs(config_cls, base: dict, overrides: dict) -> dict:
    accepted = _accepted(config_cls)
    kwargs = {k: v for k, v in base.items() if k in accepted}
    if "kv_lora_rank" in accepted:
        kwargs.update({k: v for k, v in MLA_TINY.items() if k in accepted})
    kwargs.update(overrides)
    return kwargs


def _tiny_sub_kwargs(config_cls) -> dict:
    """Tiny kwargs for a non-text sub-config, recursing into its own sub-configs (e.g. OCR vision = SAM + encoder)."""
    kwargs = _tiny_kwargs(config_cls, SUB_TINY, {})
    for name, sub_cls in (getattr(config_cls, "sub_configs", None) or {}).items():
        if isinstance(sub_cls, type):
            kwargs[name] = _tiny_sub_kwargs(sub_cls)
    return kwargs


def _declares_router_logits(cls) -> bool:
    for klass in cls.__mro__:
        declared = klass.__dict__.get("_can_record_outputs")
        if declared and "router_logits" in declared:
            return True
    return False


def _classes_for(config_cls, module) -> list[type]:
    from transformers import PreTrainedModel

    return [
        c
        for c in vars(module).values()
        if isinstance(c, type)
        and issubclass(c, PreTrainedModel)
        and c.__module__ == module.__name__
        and getattr(c, "config_class", None) is config_cls
    ]


def _rank(cls) -> int:
    name = cls.__name__
    for i, suffix in enumerate(("ForCausalLM", "ForConditionalGeneration", "TextModel", "Model")):
        if name.endswith(suffix):
            return i
    return 9


def discover() -> dict[str, dict]:
    """model_type -> {config, model_class, kind}: every MoE type of the installed transformers.

    A type is MoE when a model class of its config declares ``router_logits`` in ``_can_record_outputs`` (through
    its MRO), or when its config wraps a MoE ``text_config``. Non-text sub-configs (vision / audio encoders) share
    the family's ``PreTrainedModel`` base and hence its declaration; they are not MoE and are left out.
    """
    from transformers.models.auto import modeling_auto as auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, model_type_to_module_name

    configs, modules = {}, {}
    for model_type in sorted(CONFIG_MAPPING.keys()):
        try:
            configs[model_type] = CONFIG_MAPPING[model_type]
            name = model_type_to_module_name(model_type)
            modules[model_type] = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        except Exception:
            configs.pop(model_type, None)
    non_text = {
        sub
        for cls in configs.values()
        for key, sub in (getattr(cls, "sub_configs", None) or {}).items()
        if key != "text_config" and isinstance(sub, type)
    }
    mappings = [
        getattr(auto, n)
        for n in (
            "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
            "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
            "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
            "MODEL_MAPPING_NAMES",
        )
    ]
    wrapper_mappings = [
        getattr(auto, n)
        for n in (
            "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
            "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
            "MODEL_MAPPING_NAMES",
        )
    ]

    def pick(model_type, module, config_cls, table):
        causal = [c for c in _classes_for(config_cls, module) if c.__name__.endswith("ForCausalLM")]
        if causal and table is mappings:
            return causal[0]
        for mapping in table:
            cls = getattr(module, mapping.get(model_type) or "", None)
            if isinstance(cls, type):
                return cls
        own = sorted(_classes_for(config_cls, module), key=_rank)
        return own[0] if own else None

    native, found = set(), {}
    for model_type, config_cls in configs.items():
        if config_cls in non_text or "text_config" in (getattr(config_cls, "sub_configs", None) or {}):
            continue
        module = modules[model_type]
        declaring = [c for c in _classes_for(config_cls, module) if _declares_router_logits(c)]
        if not declaring:
            continue
        cls = pick(model_type, module, config_cls, mappings)
        found[model_type] = dict(config=config_cls, model_class=cls, kind="text")
        native.add(config_cls)
    for model_type, config_cls in configs.items():
        if config_cls.sub_configs.get("text_config") in native if getattr(config_cls, "sub_configs", None) else False:
            cls = pick(model_type, modules[model_type], config_cls, wrapper_mappings)
            if cls is not None:
                found[model_type] = dict(config=config_cls, model_class=cls, kind="wrapper")
    return dict(sorted(found.items()))


def build_config(model_type: str, info: dict):
    config_cls = info["config"]
    overrides = dict(OVERRIDES.get(model_type, {}))
    text_overrides = overrides.pop("text", {})
    if info["kind"] == "wrapper":
        kwargs = {}
        for name, sub_cls in config_cls.sub_configs.items():
            if name == "text_config":
                kwargs[name] = _tiny_kwargs(sub_cls, TEXT_TINY, text_overrides)
            elif isinstance(sub_cls, type):
                kwargs[name] = _tiny_sub_kwargs(sub_cls)
        accepted = _accepted(config_cls)
        for key in ("image_token_id", "video_token_id", "image_token_index", "audio_token_id", "pad_token_id"):
            if key in accepted:
                kwargs.setdefault(key, {"pad_token_id": 0}.get(key, VOCAB - 1))
        for key, value in overrides.items():  # a dict for a sub-config is merged into its tiny kwargs
            if isinstance(value, dict) and isinstance(kwargs.get(key), dict):
                kwargs[key] = {**kwargs[key], **value}
            else:
                kwargs[key] = value
        return config_cls(**kwargs)
    return config_cls(**_tiny_kwargs(config_cls, TEXT_TINY, {**overrides, **text_overrides}))


class _Timeout(Exception):
    pass


def _scatter(index, weights, rows: int, experts: int):
    import torch

    dense = torch.zeros(rows, experts, dtype=torch.float32, device=weights.device)
    return dense.scatter(1, index.reshape(rows, -1).long(), weights.reshape(rows, -1).float())


def model_topk_weights(router, output, expert_args, rows: int, experts: int):
    """(tokens, experts) weights the model routes with (0 outside the selected experts), and where they were read.

    From the model's own tensors only: the router's output, or the inputs of the experts module next to it when the
    router returns logits only (DBRX).
    """
    import torch

    cls = type(router.module).__name__
    if cls == "JetMoeTopKGating":  # (index_sorted_experts, batch_index, batch_gates, expert_size, logits)
        _, batch_index, batch_gates, expert_size, _ = output
        sorted_experts = torch.repeat_interleave(torch.arange(experts), torch.as_tensor(expert_size))
        dense = torch.zeros(rows, experts)
        dense[batch_index, sorted_experts] = batch_gates.float()
        return dense, "router output (batch_index, batch_gates, expert_size)"
    if cls == "SwitchTransformersTop1Router":  # (one-hot expert mask after capacity, top-1 probability, logits)
        return (output[0].float() * output[1].float()).reshape(rows, experts), "router output[0] * output[1]"
    if cls == "NllbMoeTop2Router":  # (top-1 mask, dense combine weights, logits)
        return output[1].float().reshape(rows, experts), "router output[1] (dense combine weights)"
    if router.family.sparse == "dense_output":  # Llama4: (dense scores of the selected experts, logits)
        return output[0].float().reshape(rows, experts), "router output[0] (dense scores)"
    if (
        isinstance(output, (tuple, list))
        and len(output) >= 3
        and isinstance(output[2], torch.Tensor)
        and not output[2].is_floating_point()
    ):
        return _scatter(output[2], output[1], rows, experts), "router output (top-k weights, top-k index)"
    if expert_args:
        tensors = [a for a in expert_args if isinstance(a, torch.Tensor) and a.dim() == 2 and a.shape[0] == rows]
        index = [a for a in tensors if not a.is_floating_point()]
        weights = [a for a in tensors if a.is_floating_point() and index and a.shape == index[0].shape]
        if index and weights:
            return _scatter(index[0], weights[0], rows, experts), "experts' inputs (top-k index, top-k weights)"
    raise RuntimeError(f"cannot read the routing weights {cls} routes with")


def model_dense_scores(router, output, logits):
    """The model's own dense scores over all experts, where it computes them (else None), and what they are."""
    for attr in ("score_fn", "scoring_function"):
        fn = getattr(router.module, attr, None)
        if callable(fn):
            return fn(logits).float(), f"router.{attr}(logits)"
    if router.family.scoring == "probabilities":
        return output[0].float().reshape(logits.shape), "router output[0] (probabilities)"
    return None, ""


def _close(a, b, rtol=1e-4, atol=1e-6) -> tuple[bool, float]:
    import torch

    err = float((a - b).abs().max()) if a.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=rtol, atol=atol)), err


def check_routing_equality(model, forward, batch: int, length: int) -> dict:
    """Step 4: for each tuned router, captured ``probs`` / ``topk`` vs the weights the model routes with."""
    import torch

    from roma_peft.capture import RoutingRecorder, RoutingSpec

    probs_rec = RoutingRecorder(model, spec=RoutingSpec(representation="probs"))
    routers = probs_rec.routers
    topk_rec = RoutingRecorder(model, routers=routers, spec=RoutingSpec(representation="topk"))
    own, expert_args, handles = {}, {}, []
    stock = model.get_base_model() if hasattr(model, "get_base_model") else model
    for slot, router in enumerate(routers):
        handles.append(
            router.module.register_forward_hook(lambda mod, args, output, slot=slot: own.setdefault(slot, output))
        )
        parent = stock.get_submodule(router.name.rsplit(".", 1)[0]) if "." in router.name else None
        experts = getattr(parent, "experts", None) if parent is not None else None
        if isinstance(experts, torch.nn.Module):
            handles.append(
                experts.register_forward_pre_hook(lambda mod, args, slot=slot: expert_args.setdefault(slot, args))
            )
    full = torch.ones(batch, length, dtype=torch.long)
    try:
        with torch.no_grad(), probs_rec, topk_rec:
            forward(full)
        per_t = {}
        for name, rec in (("probs", probs_rec), ("topk", topk_rec)):
            try:
                per_t[name] = torch.stack(
                    [rec.routing(full, prompt_last_index=torch.full((batch,), t)) for t in range(length)], dim=1
                )  # (B, T, D)
            except Exception as exc:  # the capture itself fails for this representation
                per_t[name] = exc
    finally:
        for h in handles:
            h.remove()
        probs_rec.remove()
        topk_rec.remove()

    checks = {"probs": [], "topk": []}
    errors = {"probs": [], "topk": []}
    for name in ("probs", "topk"):
        if not isinstance(per_t[name], Exception) and per_t[name].shape[-1] != sum(probs_rec.dims):
            errors[name].append(
                f"the routing vector has {per_t[name].shape[-1]} entries but RoutingRecorder.dims "
                f"says {probs_rec.dims} (the registry's expert count per router is wrong)"
            )
    offset = 0
    rows = batch * length
    for slot, router in enumerate(routers):
        output = own[slot]
        logits = output[router.logits_index] if isinstance(output, (tuple, list)) else output
        experts = logits.shape[-1]  # the router's logits width (Inkling: routed experts only, the matrix has more rows)
        logits = logits.reshape(-1, experts)
        weights, where = model_topk_weights(router, output, expert_args.get(slot), rows, experts)
        captured = {}
        for name in ("probs", "topk"):
            if isinstance(per_t[name], Exception):
                errors[name].append(f"{router.name}: capture raised {type(per_t[name]).__name__}: {per_t[name]}")
                continue
            captured[name] = per_t[name][:, :, offset : offset + experts].reshape(rows, experts).float()
        offset += experts
        if "topk" in captured:
            ok, err = _close(captured["topk"], weights)
            (checks if ok else errors)["topk"].append(
                f"= {where}" if ok else f"{router.name}: topk != {where} (max abs diff {err:.3g})"
            )
        if "probs" not in captured:
            continue
        probs = captured["probs"]
        scores, what = model_dense_scores(router, output, logits)
        if scores is not None:
            ok, err = _close(probs, scores)
            (checks if ok else errors)["probs"].append(
                f"= {what}" if ok else f"{router.name}: probs != {what} (max abs diff {err:.3g})"
            )
        selected = weights != 0
        used = selected.any(dim=1)
        if not used.any():
            errors["probs"].append(f"{router.name}: the model selected no expert")
            continue
        w, p, sel = weights[used], probs[used], selected[used]
        factor = (w * sel).sum(1, keepdim=True) / (p * sel).sum(1, keepdim=True)
        if int(sel.sum(1).max()) < 2:
            factor = torch.ones_like(factor)  # top-1: nothing to compare ratios with, the weight must be the score
        ok, err = _close(factor * p * sel, w * sel, rtol=1e-4, atol=1e-6)
        (checks if ok else errors)["probs"].append(
            f"proportional to {where} at the selected experts"
            if ok
            else f"{router.name}: probs at the selected experts not proportional to the model's weights ({where}; max "
            f"abs diff {err:.3g}): the registry's scoring {router.family.scoring!r} is not what the model routes with"
        )
    summary = {}
    for name in ("probs", "topk"):
        summary[name] = (
            ("differs: " + errors[name][0]) if errors[name] else ("ok: " + "; ".join(sorted(set(checks[name]))))
        )
    return summary


def _alarm(signum, frame):
    raise _Timeout("timed out")


def check_family(model_type: str, info: dict, tmpdir: str) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import PeftModel, get_peft_model

    import roma_peft
    from roma_peft.capture import RoutingRecorder

    step = "config"
    try:
        config = build_config(model_type, info)
        model_cls = info["model_class"]

        def build():
            torch.manual_seed(0)
            return model_cls(config).float().eval()

        step = "build"
        base = build()
        torch.manual_seed(1)
        ids = torch.randint(3, VOCAB - 8, (2, 8))
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        embeds = torch.randn(2, 8, HIDDEN)
        extra = {"use_cache": False, **FORWARD_KWARGS.get(model_type, {})}
        if "decoder_input_ids" in inspect.signature(base.forward).parameters:
            # encoder-decoder MoE (Switch, NLLB) and block diffusion (random canvas unless one is given)
            extra["decoder_input_ids"] = ids

        def out(model, with_mask=False, attention_mask=None):
            attention_mask = mask if with_mask else attention_mask
            kwargs = dict(extra, attention_mask=attention_mask) if attention_mask is not None else extra
            if model_type in EMBEDS_INPUT:
                result = model(inputs_embeds=embeds, **kwargs)
            else:
                result = model(input_ids=ids, **kwargs)
            if isinstance(result, tuple):
                return result[0]
            logits = getattr(result, "logits", None)
            return logits if logits is not None else result.last_hidden_state

        roma_peft.routers._WARNED.clear()  # every type reports its own scoring assumptions
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", roma_peft.routers.ScoringAssumptionWarning)
            routers = roma_peft.find_routers(base)
        moe_layers = len(roma_peft.routers.group_by_layer(routers))
        detail = dict(
            model_class=model_cls.__name__,
            router_classes=sorted({type(r.module).__name__ for r in routers}),
            families=sorted({r.family.name for r in routers}),
            scoring=sorted({f"{r.family.scoring} ({r.family.scoring_source})" for r in routers if r.family.supported}),
            scoring_warnings=[
                str(w.message) for w in caught if issubclass(w.category, roma_peft.routers.ScoringAssumptionWarning)
            ],
            moe_layers=moe_layers,
            router_paths=[r.projection_name for r in routers][:2],
        )
        if moe_layers < 2:
            return dict(
                status="fail", step="config", error=f"tiny config has {moe_layers} MoE layer(s), need >= 2", **detail
            )
        with torch.no_grad():
            reference = out(base)

        step = "1 get_peft_model"
        try:
            model = get_peft_model(base, roma_peft.RomaConfig(num_layers=2))
        except ValueError as exc:
            unsupported = [r.family for r in routers if not r.family.supported]
            if (unsupported and unsupported[0].notes in str(exc)) or "(tied routers)" in str(exc):
                return dict(status="unsupported", step=step, error=str(exc).splitlines()[0], **detail)
            raise
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        layers = model.base_model.roma_layers()
        assert trainable and all(".roma_" in n for n in trainable), f"non-RoMA trainable params: {trainable[:3]}"
        assert len(layers) >= 2, f"only {len(layers)} routers wrapped"
        step = "1 zero-init identity"
        with torch.no_grad():
            assert torch.equal(out(model), reference), "zero-initialised deltas changed the output"

        step = "2 random deltas"
        torch.manual_seed(3)
        for param in model.parameters():
            if param.requires_grad:
                param.data.normal_(std=0.5)
        with torch.no_grad():
            adapted = out(model)
        assert not torch.allclose(adapted, reference), "random deltas did not change the output"
        step = "2 save/reload"
        path = os.path.join(tmpdir, model_type)
        model.save_pretrained(path)
        reloaded = PeftModel.from_pretrained(build(), path)
        with torch.no_grad():
            again = out(reloaded)
        assert torch.equal(again, adapted), f"reloaded output differs (max {float((again - adapted).abs().max()):.3g})"
        step = "2 merge_and_unload"
        merged = reloaded.merge_and_unload()
        assert not any(isinstance(m, roma_peft.RomaLayer) for m in merged.modules()), "RomaLayer left after merge"
        with torch.no_grad():
            merged_out = out(merged)
        assert torch.equal(merged_out, adapted), (
            f"merged output differs (max {float((merged_out - adapted).abs().max()):.3g})"
        )
        del reloaded, merged

        step = "3 routing gradient"
        deltas = {n: p for n, p in model.named_parameters() if p.requires_grad and ".roma_delta." in n}
        recorder = RoutingRecorder(model)
        with recorder:
            logits = out(model, with_mask=True)
        routing = recorder.routing(mask)
        recorder.remove()
        assert routing.shape[0] == 2 and routing.requires_grad, f"routing vector {tuple(routing.shape)} has no grad"
        torch.manual_seed(5)
        model.zero_grad()
        (routing * torch.randn_like(routing)).sum().backward(retain_graph=True)
        dead = [n for n, p in deltas.items() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not dead, f"no routing gradient reached {dead[0]}"
        step = "3 LM-loss gradient"
        model.zero_grad()
        if logits.shape[-1] == VOCAB or logits.shape[-1] > HIDDEN:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1) % logits.shape[-1]
            )
        else:  # a backbone without a head: any scalar of its output
            loss = (logits * torch.randn_like(logits)).sum()
        loss.backward()
        dead = [n for n, p in deltas.items() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not dead, f"no LM-loss gradient reached {dead[0]}"
        detail["routing_dim"] = int(routing.shape[1])

        step = "4 routing = model's weights"
        model.zero_grad()
        check = check_routing_equality(model, lambda full: out(model, attention_mask=full), *ids.shape)
        detail["routing_check"] = check
        differs = [f"{k}: {v[len('differs: ') :]}" for k, v in check.items() if v.startswith("differs")]
        if differs:
            return dict(status="fail", step=step, error=" | ".join(differs)[:400], **detail)
        return dict(status="ok", step="", error="", **detail)
    except _Timeout:
        raise
    except Exception as exc:  # one line per family
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        if os.environ.get("SWEEP_TRACEBACK"):
            traceback.print_exc()
        result = dict(status="fail", step=step, error=message)
        try:
            result.update(detail)  # noqa: F821 - set once the model was built
        except NameError:
            pass
        return result


def markdown(results: dict[str, dict]) -> str:
    lines = [
        "| model type | class | router class | family | status | failing step | error / reason | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model_type in sorted(results):
        r = results[model_type]
        error = (r.get("error") or "").replace("|", "\\|")
        lines.append(
            f"| {model_type} | {r.get('model_class', '')} | {', '.join(r.get('router_classes', []))} | "
            f"{', '.join(r.get('families', []))} | {r['status']} | {r.get('step', '')} | {error} | "
            f"{r.get('seconds', 0):.1f} |"
        )
    counts = {}
    for r in results.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines.append("")
    lines.append("Summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" (of {len(results)})")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated model types (merged into the existing JSON)")
    parser.add_argument("--json", default=DEFAULT_JSON)
    parser.add_argument("--timeout", type=int, default=240, help="seconds per model type")
    parser.add_argument("--list", action="store_true", help="only list the discovered model types")
    args = parser.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()

    families = discover()
    if args.list:
        for model_type, info in families.items():
            print(model_type, info["model_class"].__name__, info["kind"])
        return
    wanted = [t for t in args.only.split(",") if t] or list(families)
    unknown = [t for t in wanted if t not in families]
    if unknown:
        parser.error(f"not MoE model types here: {unknown}")

    previous = {}
    if args.only and os.path.exists(args.json):
        previous = json.load(open(args.json)).get("results", {})
    results = dict(previous)
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory() as tmpdir:
        for model_type in wanted:
            start = time.perf_counter()
            if model_type in SKIP:
                result = dict(status="skipped", step="", error=SKIP[model_type])
            else:
                signal.alarm(args.timeout)
                try:
                    result = check_family(model_type, families[model_type], tmpdir)
                except _Timeout:
                    result = dict(status="fail", step="timeout", error=f"over {args.timeout} s on CPU")
                finally:
                    signal.alarm(0)
            result["seconds"] = round(time.perf_counter() - start, 1)
            result["kind"] = families[model_type]["kind"]
            results[model_type] = result
            print(
                f"{model_type:32s} {result['status']:12s} {result['seconds']:6.1f}s {result.get('step', '')} "
                f"{result.get('error', '')}",
                flush=True,
            )

    command = "python scripts/sweep_families.py" + (f" --only {args.only}" if args.only else "")
    payload = dict(
        command=command,
        date=datetime.date.today().isoformat(),
        transformers=transformers.__version__,
        torch=torch.__version__,
        results=dict(sorted(results.items())),
    )
    with open(args.json, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=False)
        f.write("\n")
    print()
    print(markdown(results))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
