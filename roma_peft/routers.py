"""The router registry: every piece of architecture-specific knowledge about MoE routers.

RoMA trains only routers, so it must answer three questions for any Mixture-of-Experts model:

1. **Where are the routers?** transformers declares them itself: every MoE ``PreTrainedModel`` lists its router
   class in ``_can_record_outputs["router_logits"]`` (an ``OutputRecorder`` with the router class and the index of
   the logits in the router's output). We read that declaration instead of guessing from names, which finds the
   routers of every native family (including multimodal wrappers whose routers sit under
   ``model.language_model...``) and never picks up look-alike gates (Qwen2-MoE ``shared_expert_gate``,
   ``gate_proj``). Remote-code models (e.g. DeepSeekMoE's ``MoEGate``) declare nothing, so a name-based fallback
   accepts modules called exactly ``gate`` or ``router`` that project ``hidden -> n_experts``.
2. **Which tensor is trained?** Usually the router's own 2-D ``weight`` of shape ``(num_experts, hidden)``; some
   routers wrap an ``nn.Linear`` child (DBRX ``layer``, JetMoE ``layer``, HunYuan ``wg``, AfMoE ``gate``, Gemma4
   ``proj``, LongCat ``classifier``). GPT-OSS routers also own a ``bias``, which may be trained. Selection buffers
   such as ``e_score_correction_bias`` are never trained.
3. **How does the family turn logits into routing weights?** Softmax (OLMoE, Qwen, Mixtral, DeepSeek-V2 ...),
   sigmoid with a selection-only bias (DeepSeek-V3, GLM4-MoE, ...), or probabilities already (Gemma4). The routing
   capture (:mod:`roma_peft.capture`) uses this scoring to build the routing vector ``r`` that RoMA regularises.

All of it lives in :data:`ROUTER_FAMILIES` and :data:`ROUTER_CLASS_TO_FAMILY` below; nothing else in roma_peft
branches on the architecture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RouterFamily",
    "RouterInfo",
    "ROUTER_FAMILIES",
    "ROUTER_CLASS_TO_FAMILY",
    "SCORING_FUNCTIONS",
    "family_for",
    "find_routers",
    "group_by_layer",
    "select_moe_layers",
    "NoRoutersFoundError",
]


class NoRoutersFoundError(ValueError):
    """Raised when a model has no MoE router that RoMA can tune."""


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


def _sigmoid(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits.float())


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    # The router already returns probabilities (Gemma4): applying softmax again would flatten them.
    return logits.float()


#: Logits -> dense routing weights over all experts, by name (a registry field refers to them by name so that the
#: registry stays data and the docs table can be generated from it).
SCORING_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": _softmax,
    "sigmoid": _sigmoid,
    "probabilities": _probabilities,
}


@dataclass(frozen=True)
class RouterFamily:
    """How one family of routers is located, trained and scored.

    Attributes:
        name: Short family name, used in docs and error messages.
        scoring: Key of :data:`SCORING_FUNCTIONS`: how router logits become the family's dense routing weights.
        sparse: Where the family's *sparse* top-k routing weights come from:
            ``"outputs"`` -- the router returns ``(logits, top_k_weights, top_k_index)`` (most families);
            ``"dense_output"`` -- output ``[0]`` is already a dense ``(tokens, experts)`` score matrix (Llama4);
            ``"recompute"`` -- the router returns logits only, so top-k is recomputed from the scores (DBRX).
        projection: Attribute of the ``nn.Linear`` child that holds the router matrix, or ``None`` when the router
            owns its 2-D ``weight`` itself.
        logits_source: ``"output"`` (the logits are ``output[logits_index]``) or ``"input"`` (the router does not
            return logits, e.g. DeepSeekMoE's remote-code ``MoEGate``; they are recomputed from its input and
            effective weight).
        trainable_bias: Whether a router ``bias`` (GPT-OSS) is part of what RoMA trains.
        supported: ``False`` for routers whose structure RoMA cannot tune as a matrix (MLP routers, product keys).
        skipped: ``True`` for gate modules that are not routers in RoMA's sense (the expert *selection* does not
            depend on the gate, e.g. DeepSeek-V4 hash routing): :func:`find_routers` leaves them out, so their
            layers are neither counted as MoE layers nor tuned, and the model is not refused because of them.
        notes: One line for the architectures table in the docs.
    """

    name: str
    scoring: str = "softmax"
    sparse: str = "outputs"
    projection: Optional[str] = None
    logits_source: str = "output"
    trainable_bias: bool = False
    supported: bool = True
    skipped: bool = False
    notes: str = ""

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """Dense routing weights of this family over all experts, in float32."""
        return SCORING_FUNCTIONS[self.scoring](logits)


ROUTER_FAMILIES: dict[str, RouterFamily] = {
    family.name: family
    for family in [
        RouterFamily(
            "softmax",
            notes="softmax over experts, then top-k (renormalised where the config says so)",
        ),
        RouterFamily(
            "topk-softmax",
            notes="top-k of the raw logits, then softmax over the k selected; dense weights = softmax over all",
        ),
        RouterFamily(
            "topk-softmax-bias",
            trainable_bias=True,
            notes="as topk-softmax with a router bias, which RoMA may train (`train_router_bias`)",
        ),
        RouterFamily(
            "sigmoid",
            scoring="sigmoid",
            notes="sigmoid affinities; the selection-only bias (`e_score_correction_bias`) is never trained",
        ),
        RouterFamily(
            "llama4",
            scoring="sigmoid",
            sparse="dense_output",
            notes="top-k of the logits, sigmoid of the selected ones, others 0; logits are output[1]",
        ),
        RouterFamily(
            "linear-child",
            projection="layer",
            sparse="recompute",
            notes="router wraps an nn.Linear `layer` and returns logits only; top-k recomputed from softmax",
        ),
        RouterFamily("linear-child-wg", projection="wg", notes="router wraps an nn.Linear `wg`"),
        RouterFamily("linear-child-gate", scoring="sigmoid", projection="gate", notes="router wraps an nn.Linear `gate`"),
        RouterFamily(
            "linear-child-classifier",
            projection="classifier",
            notes="router wraps an nn.Linear `classifier` (rows = routed + zero experts)",
        ),
        RouterFamily(
            "probabilities",
            scoring="probabilities",
            projection="proj",
            notes="router output[0] is already probabilities; wraps an nn.Linear `proj`",
        ),
        RouterFamily(
            "remote-moegate",
            logits_source="input",
            notes="remote-code gate that returns no logits (DeepSeekMoE `MoEGate`); logits recomputed from its input",
        ),
        RouterFamily(
            "skipped-static-selection",
            skipped=True,
            notes="expert selection is a frozen token-id table (`tid2eid[input_ids]`), the gate only reweights the "
            "fixed experts: nothing to re-route, so RoMA leaves these layers out (transformers records no "
            "router_logits for them either)",
        ),
        RouterFamily(
            "unsupported-mlp-router",
            supported=False,
            notes="multi-layer router network; no single router matrix to tune",
        ),
        RouterFamily(
            "unsupported-product-keys",
            supported=False,
            notes="product-key routing without per-expert logits",
        ),
        RouterFamily(
            "unsupported-block",
            supported=False,
            notes="the recorder hooks the whole MoE block (several routers merged)",
        ),
    ]
}

_SIGMOID_ROUTERS = (
    "DeepseekV3TopkRouter DeepseekV32TopkRouter Glm4MoeTopkRouter Glm4MoeLiteTopkRouter Glm4vMoeTextTopkRouter "
    "Glm5NextTextTopkRouter GlmMoeDsaTopkRouter Dots1TopkRouter Dots3NoteTextTopkRouter KimiLinearTopkRouter "
    "AXK1TopkRouter AXK2TopkRouter BeamTopKRouter BailingHybridTopkRouter ExaoneMoeTopkRouter HYV3TopKRouter "
    "HYV4TopkRouter HYV4VLTopkRouter MiMoV2FlashTopkRouter MiniMaxM2TopKRouter MiniMaxM3VLTopKRouter "
    "MuseSparkTopkRouter NemotronHTopkRouter SolarOpenTopkRouter Step3p7TopKRouter FlintTopKRouter "
    "Lfm2MoeTopKRouter LagunaTopKRouter Kolibri1TopKRouter InklingTopkRouter"
).split()
_TOPK_SOFTMAX_ROUTERS = (
    "GraniteMoeTopKRouter GraniteMoeSharedTopKRouter GraniteMoeHybridTopKRouter GraniteMoeSWATopKRouter "
    "AriaTextTopKRouter Cohere2MoeTopKRouter"
).split()

#: Router class name -> family name. A router class not listed here uses the ``"softmax"`` family.
ROUTER_CLASS_TO_FAMILY: dict[str, str] = {
    **{name: "sigmoid" for name in _SIGMOID_ROUTERS},
    **{name: "topk-softmax" for name in _TOPK_SOFTMAX_ROUTERS},
    "GptOssTopKRouter": "topk-softmax-bias",
    "OpenAIPrivacyFilterTopKRouter": "topk-softmax-bias",
    "Llama4Router": "llama4",
    "DbrxRouter": "linear-child",
    "JetMoeTopKGating": "linear-child",
    "HunYuanMoEV1Gate": "linear-child-wg",
    "AfmoeTokenChoiceRouter": "linear-child-gate",
    "LongcatFlashTopkRouter": "linear-child-classifier",
    "Gemma4TextRouter": "probabilities",
    "DiffusionGemmaTextRouter": "probabilities",
    "MoEGate": "remote-moegate",
    "DeepseekV4HashRouter": "skipped-static-selection",
    "ZayaRouter": "unsupported-mlp-router",
    "DogeCDMoE": "unsupported-product-keys",
    "Ernie4_5_VLMoeMoeBlock": "unsupported-block",
}


def family_for(router: nn.Module) -> RouterFamily:
    """The registry entry for a router module (by class name; ``"softmax"`` when the class is not listed)."""
    return ROUTER_FAMILIES[ROUTER_CLASS_TO_FAMILY.get(type(router).__name__, "softmax")]


@dataclass
class RouterInfo:
    """One router found in a model.

    Attributes:
        name: Module path of the router in the *unwrapped* transformers model (``base_layer`` hops and the PEFT
            ``base_model.model.`` prefix removed), e.g. ``"model.layers.11.mlp.gate"``.
        module: The router module itself (the transformers class, not a RoMA wrapper).
        layer_index: Index of the decoder layer the router belongs to.
        projection_name: Module path of the module that owns the trained ``weight`` (the router itself, or its
            ``nn.Linear`` child).
        family: The registry entry that describes it.
        logits_index: Position of the logits in the router's output (from transformers' ``OutputRecorder``).
    """

    name: str
    module: nn.Module
    layer_index: int
    projection_name: str
    family: RouterFamily
    logits_index: int = 0
    num_experts: int = 0
    hidden_size: int = 0
    has_bias: bool = False
    extra: dict = field(default_factory=dict)


_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def _clean_name(name: str) -> str:
    """Drop PEFT wrapper hops so names match the stock transformers model."""
    name = name.replace(".base_layer", "")
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def _layer_index(name: str) -> Optional[int]:
    matches = _LAYER_INDEX.findall(name)
    return int(matches[-1]) if matches else None


def _declared_router_specs(model: nn.Module) -> list[tuple[type, int, Optional[str]]]:
    """(router class, logits index, layer_name) declared by every transformers sub-model's ``_can_record_outputs``."""
    specs = []
    seen = set()
    for module in model.modules():
        declared = getattr(type(module), "_can_record_outputs", None)
        if not declared or "router_logits" not in declared:
            continue
        entries = declared["router_logits"]
        entries = entries if isinstance(entries, (list, tuple)) else [entries]
        for entry in entries:
            if isinstance(entry, type):
                spec = (entry, 0, None)
            else:
                spec = (entry.target_class, int(getattr(entry, "index", 0) or 0), getattr(entry, "layer_name", None))
            if spec not in seen:
                seen.add(spec)
                specs.append(spec)
    return specs


def _own_matrix(module: nn.Module) -> Optional[torch.Tensor]:
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    if weight is not None and weight.dim() == 2 and weight.shape[0] > 1:
        return weight
    return None


def _unwrapped(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """The module itself, or the original module inside a PEFT tuner layer (e.g. a RomaLayer on DBRX's ``layer``)."""
    get_base_layer = getattr(module, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) and hasattr(module, "base_layer") else module


def _projection(router: nn.Module, family: RouterFamily) -> Optional[tuple[str, nn.Module]]:
    """The (relative name, module) that owns the router matrix: the router itself or one ``nn.Linear`` child.

    Works on an already wrapped model too: a child wrapped by a PEFT layer is looked through to its base layer.
    """
    if family.projection is not None:
        child = _unwrapped(getattr(router, family.projection, None))
        if child is not None and _own_matrix(child) is not None:
            return family.projection, child
    if _own_matrix(router) is not None:
        return "", router
    children = [(n, _unwrapped(c)) for n, c in router.named_children()]
    linear_children = [(n, c) for n, c in children if isinstance(c, nn.Linear) and c.out_features > 1]
    if len(linear_children) == 1:
        return linear_children[0]
    return None


def _unwrap(model: nn.Module) -> nn.Module:
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


_FALLBACK_NAMES = ("gate", "router")


def _fallback_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules named exactly ``gate``/``router`` that project hidden -> experts (remote-code models).

    Exact attribute names exclude ``shared_expert_gate``, ``gate_proj``, ``gate_up_proj``, ``output_gate`` ...;
    modules under ``experts`` and modules nested in another candidate are skipped.
    """
    found = []
    for name, module in model.named_modules():
        clean = _clean_name(name)
        if clean.rsplit(".", 1)[-1] not in _FALLBACK_NAMES or ".experts." in f".{clean}.":
            continue
        if any(clean.startswith(prev + ".") for prev, _ in found):
            continue
        if _projection(module, family_for(module)) is None:
            continue
        found.append((clean, module))
    return found


def find_routers(model: nn.Module, allow_fallback: bool = True) -> list[RouterInfo]:
    """Every MoE router of ``model``, in layer order.

    Works on a stock transformers model, on a model already wrapped by RoMA layers and on a ``PeftModel``: names
    are always those of the stock model. Dense layers have no router, so the result lists only MoE layers
    (DeepSeek ``first_k_dense_replace``, Qwen ``mlp_only_layers``, Llama4 ``moe_layers`` ... are handled for free).

    Args:
        model: The model to search.
        allow_fallback: Use the name-based fallback when the model declares no router (remote code).
    """
    model = _unwrap(model)
    specs = _declared_router_specs(model)
    candidates: list[tuple[str, nn.Module, int]] = []
    for name, module in model.named_modules():
        for router_cls, index, layer_name in specs:
            if isinstance(module, router_cls) and (layer_name is None or f".{layer_name}" in f".{_clean_name(name)}"):
                candidates.append((_clean_name(name), module, index))
                break
    if not candidates and allow_fallback:
        candidates = [(name, module, 0) for name, module in _fallback_candidates(model)]
    candidates = [c for c in candidates if not family_for(c[1]).skipped]

    routers = []
    for name, module, index in candidates:
        family = family_for(module)
        projection = _projection(module, family)
        layer = _layer_index(name)
        weight = None
        projection_name = name
        if projection is not None:
            rel, proj_module = projection
            projection_name = f"{name}.{rel}" if rel else name
            weight = _own_matrix(proj_module)
        bias = getattr(projection[1], "bias", None) if projection is not None else None
        routers.append(
            RouterInfo(
                name=name,
                module=module,
                layer_index=layer if layer is not None else len(routers),
                projection_name=projection_name,
                # No single matrix found: a router the registry already marks unsupported keeps its own reason
                # (e.g. Doge's product keys); any other is a multi-layer router network (Zaya-like).
                family=family if projection is not None or not family.supported
                else ROUTER_FAMILIES["unsupported-mlp-router"],
                logits_index=index,
                num_experts=int(weight.shape[0]) if weight is not None else 0,
                hidden_size=int(weight.shape[1]) if weight is not None else 0,
                has_bias=isinstance(bias, nn.Parameter),
            )
        )
    routers.sort(key=lambda r: (r.layer_index, r.name))
    return routers


def group_by_layer(routers: list[RouterInfo]) -> list[list[RouterInfo]]:
    """Routers grouped per MoE layer, in layer order (a layer may hold several routers, e.g. JetMoE)."""
    groups: dict[int, list[RouterInfo]] = {}
    for router in routers:
        groups.setdefault(router.layer_index, []).append(router)
    return [groups[i] for i in sorted(groups)]


LAYER_SELECTIONS = ("last", "first", "middle", "all", "indices")


def select_moe_layers(
    num_moe_layers: int, selection: str = "last", num_layers: int = 5, indices: Optional[list[int]] = None
) -> list[int]:
    """Positions (0-based, among MoE layers only) of the MoE layers to tune.

    ``last``/``first``/``middle`` take ``num_layers`` consecutive MoE layers; ``all`` takes every MoE layer;
    ``indices`` takes the listed positions (negative positions count from the end, as in Python).
    The paper's default is the last 5 MoE layers (its layer ablation: L5 > all layers > fewer layers).
    """
    if selection not in LAYER_SELECTIONS:
        raise ValueError(f"layer_selection must be one of {LAYER_SELECTIONS}, got {selection!r}.")
    if num_moe_layers <= 0:
        raise NoRoutersFoundError("The model has no MoE layer to select from.")
    if selection == "all":
        return list(range(num_moe_layers))
    if selection == "indices":
        if not indices:
            raise ValueError("layer_selection='indices' needs `moe_layer_indices`, a non-empty list of MoE-layer positions.")
        out = []
        for i in indices:
            if not -num_moe_layers <= i < num_moe_layers:
                raise ValueError(
                    f"MoE-layer index {i} is out of range: the model has {num_moe_layers} MoE layers "
                    f"(valid positions 0..{num_moe_layers - 1}, or negative from the end). Positions count MoE "
                    "layers only; dense layers have no router and are not counted."
                )
            out.append(i % num_moe_layers)
        if len(set(out)) != len(out):
            raise ValueError(f"moe_layer_indices {indices} name the same MoE layer twice.")
        return sorted(out)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
    if num_layers > num_moe_layers:
        raise ValueError(
            f"num_layers={num_layers} but the model has only {num_moe_layers} MoE layers; use num_layers <= "
            f"{num_moe_layers} or layer_selection='all'."
        )
    if selection == "last":
        return list(range(num_moe_layers - num_layers, num_moe_layers))
    if selection == "first":
        return list(range(num_layers))
    start = (num_moe_layers - num_layers) // 2
    return list(range(start, start + num_layers))


def router_logits_from_input(router: RouterInfo, hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Recompute logits for routers that do not return them (``logits_source == "input"``)."""
    return F.linear(hidden_states.reshape(-1, weight.shape[1]).to(weight.dtype), weight)
