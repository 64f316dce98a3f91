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
   sigmoid with a selection-only bias (DeepSeek-V3, GLM4-MoE, ...), probabilities already (Gemma4), or whatever the
   model declares (DeepSeek-V4 ``sqrtsoftplus``, Inkling2 ``sigmoid``: the router's own ``score_fn``, built from the
   config's ``scoring_func``). The routing capture (:mod:`roma_peft.capture`) uses this scoring to build the routing
   vector ``r`` that RoMA regularises. A declaration on the router module (a ``score_fn``-like function, or a
   ``scoring_func``-like string such as Cohere2's ``expert_selection_fn``) always wins over the class entry; a router
   class the registry does not know gets its scoring *proven* from its own outputs (its top-k weights must be
   proportional to exactly one scoring of its logits) or a :class:`ScoringAssumptionWarning` naming what was assumed
   and how to override it (see :func:`family_for`). Nothing falls back to softmax silently.

All of it lives in :data:`ROUTER_FAMILIES` and :data:`ROUTER_CLASS_TO_FAMILY` below; nothing else in roma_peft
branches on the architecture.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from .zero3 import full_shape

__all__ = [
    "RouterFamily",
    "RouterInfo",
    "ROUTER_FAMILIES",
    "ROUTER_CLASS_TO_FAMILY",
    "SCORING_FUNCTIONS",
    "ScoringAssumptionWarning",
    "family_for",
    "register_router_class",
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


def _sqrtsoftplus(logits: torch.Tensor) -> torch.Tensor:
    # DeepSeek-V4's default `scoring_func` (transformers' SqrtSoftplusActivation): sqrt(softplus(x)).
    return F.softplus(logits.float()).sqrt()


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    # The router already returns probabilities (Gemma4): applying softmax again would flatten them.
    return logits.float()


#: Logits -> dense routing weights over all experts, by name (a registry field refers to them by name so that the
#: registry stays data and the docs table can be generated from it).
SCORING_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": _softmax,
    "sigmoid": _sigmoid,
    "sqrtsoftplus": _sqrtsoftplus,
    "probabilities": _probabilities,
}


def _log_weights(weights: torch.Tensor) -> torch.Tensor:
    # softmax is shift invariant: log(p) is *a* logit vector whose softmax is p (p must sum to 1)
    return torch.log(weights.float().clamp_min(1e-12))


def _logit(weights: torch.Tensor) -> torch.Tensor:
    return torch.logit(weights.float(), eps=1e-7)


def _inverse_sqrtsoftplus(weights: torch.Tensor) -> torch.Tensor:
    # y = sqrt(softplus(x))  =>  x = log(expm1(y^2)) = z + log(-expm1(-z)) with z = y^2 (stable for small and large z)
    z = weights.float().square().clamp_min(1e-12)
    return z + torch.log(-torch.expm1(-z))


#: Dense routing weights -> router logits that the scoring maps back to them (the inverse of
#: :data:`SCORING_FUNCTIONS`, up to the softmax's free shift). ``probabilities`` has none: those routers return
#: probabilities computed inside the router from their projection, which the registry does not model. Used to force a
#: router's routing weights (``roma_peft.benchmark.oracle.score_with_routing``, ``roma-peft diagnose``).
INVERSE_SCORING_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": _log_weights,
    "sigmoid": _logit,
    "sqrtsoftplus": _inverse_sqrtsoftplus,
}

#: ``RouterFamily.scoring`` of families whose scoring is read from each router module (see :func:`family_for`).
DECLARED = "declared"

#: Scorings a router's outputs or declared function are matched against (``probabilities`` is not a function of logits).
_CANDIDATE_SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")
#: Strings a model uses to declare its scoring (config ``scoring_func``, Cohere2 ``expert_selection_fn`` ...).
_SCORING_NAMES = {
    "softmax": "softmax",
    "sigmoid": "sigmoid",
    "sqrtsoftplus": "sqrtsoftplus",
    "sqrt_softplus": "sqrtsoftplus",
    "probabilities": "probabilities",
}
#: Router attributes holding the function the router scores its logits with (DeepSeek-V4 / Inkling2 ``score_fn``,
#: Muse-Spark ``scoring_function``).
_SCORE_FN_ATTRS = ("score_fn", "scoring_function", "score_func", "scoring_fn")
#: Router attributes holding the *name* of its scoring (remote-code ``MoEGate.scoring_func``, Cohere2
#: ``expert_selection_fn``; also the documented override for a router class RoMA does not know).
_SCORE_NAME_ATTRS = ("scoring_func", "score_func", "scoring_function", "expert_selection_fn")


class ScoringAssumptionWarning(UserWarning):
    """RoMA could not prove how a router scores its logits and assumed a scoring (the message says which)."""


@dataclass(frozen=True)
class RouterFamily:
    """How one family of routers is located, trained and scored.

    Attributes:
        name: Short family name, used in docs and error messages.
        scoring: Key of :data:`SCORING_FUNCTIONS`: how router logits become the family's dense routing weights.
        sparse: Where the family's *sparse* top-k routing weights come from:
            ``"outputs"`` -- the router returns ``(logits, top_k_weights, top_k_index)`` (most families);
            ``"dense_output"`` -- output ``[0]`` is already a dense ``(tokens, experts)`` score matrix (Llama4);
            ``"recompute"`` -- the router returns logits only, so top-k is recomputed from the scores (DBRX);
            ``"dispatch_mask"`` -- output ``[0]`` is a (capacity-masked) one-hot dispatch mask and ``[1]`` the selected
            expert's weight (Switch).
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
        logits_width: Attribute of the router holding the number of logit columns (the router's width in the routing
            vector) when its matrix has more rows than that (Inkling: the shared-expert rows are not in the logits);
            ``None``: one logit per matrix row.
        scoring_source: Where ``scoring`` comes from for one router (set by :func:`family_for`): ``"registry"`` (the
            class entry), the router's declaration (e.g. ``"DeepseekV4TopKRouter.score_fn"``), ``"proven ..."``
            (matched against the router's own outputs), or ``"assumed ..."`` (a warning was issued).
        score_fn: The router's own scoring function, when it declares one RoMA cannot name (used as is).
        probs_exact: ``False`` when no dense distribution over all experts equals the weights the family routes with
            (PhiMoE's sparsemixer): capturing ``probs`` then warns and points to ``topk``, which is exact.
    """

    name: str
    scoring: str = "softmax"
    sparse: str = "outputs"
    projection: str | None = None
    logits_source: str = "output"
    trainable_bias: bool = False
    supported: bool = True
    skipped: bool = False
    notes: str = ""
    logits_width: str | None = None
    scoring_source: str = "registry"
    score_fn: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    probs_exact: bool = True

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """Dense routing weights of this family over all experts, in float32."""
        if self.score_fn is not None:
            return self.score_fn(logits.float()).float()
        if self.scoring not in SCORING_FUNCTIONS:
            raise ValueError(
                f"Router family {self.name!r} scores with each router's own declared function; use the family that "
                "find_routers / family_for(router) resolved for the router, not the registry entry."
            )
        return SCORING_FUNCTIONS[self.scoring](logits)

    @property
    def invertible(self) -> bool:
        """Whether :meth:`logits_for` can map routing weights back to router logits for this family."""
        return self.score_fn is None and self.scoring in INVERSE_SCORING_FUNCTIONS

    def logits_for(self, weights: torch.Tensor) -> torch.Tensor:
        """Router logits whose :meth:`score` is ``weights`` (float32), e.g. to force a routing; raises
        ``NotImplementedError`` for a scoring without an inverse (see :data:`INVERSE_SCORING_FUNCTIONS`)."""
        if not self.invertible:
            raise NotImplementedError(
                f"Router family {self.name!r} (scoring {self.scoring!r}, from {self.scoring_source}) has no inverse "
                f"scoring: its routing weights cannot be mapped back to router logits. Invertible scorings: "
                f"{sorted(INVERSE_SCORING_FUNCTIONS)}."
            )
        return INVERSE_SCORING_FUNCTIONS[self.scoring](weights)


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
            "score-fn",
            scoring=DECLARED,
            notes="scores with the router's own `score_fn` (built from the config's `scoring_func`: `sqrtsoftplus`, "
            "`sigmoid`, `softmax`), read from each router module; top-k on score + `e_score_correction_bias`, renormalised",
        ),
        RouterFamily(
            "sigmoid-shared-rows",
            scoring="sigmoid",
            logits_width="num_experts",
            notes="as sigmoid, but the matrix has routed + shared-expert rows and the logits (and the routing vector) "
            "cover the routed experts only (Inkling); the shared experts' weight is normalised with the selected ones",
        ),
        RouterFamily(
            "sparsemixer",
            probs_exact=False,
            notes="PhiMoE sparsemixer: each selected expert's weight is a softmax over a jitter-thresholded subset of the "
            "logits, so the dense `probs` (softmax over all experts) only approximate the routing weights; `topk` "
            "(the router's own multipliers) is exact",
        ),
        RouterFamily(
            "capacity-softmax",
            sparse="recompute",
            notes="NLLB-MoE: softmax over experts, top-2 with expert capacity; the router returns no "
            "(weights, index) pair (logits are output[2]), so `topk` is recomputed from the softmax",
        ),
        RouterFamily(
            "switch-dispatch",
            sparse="dispatch_mask",
            notes="Switch: softmax over experts, top-1 with expert capacity; `topk` is the router's own dispatch mask "
            "(output[0], capacity-masked one-hot) times the selected expert's unnormalised probability (output[1])",
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
        RouterFamily(
            "linear-child-gate", scoring="sigmoid", projection="gate", notes="router wraps an nn.Linear `gate`"
        ),
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
    "Lfm2MoeTopKRouter LagunaTopKRouter Kolibri1TopKRouter"
).split()
#: Softmax over all experts, then top-k (renormalised where the router or config says so). Listed explicitly, so that a
#: router class that is in no list is *unknown* (its scoring is proven or warned about, never silently softmax).
_SOFTMAX_ROUTERS = (
    "OlmoeTopKRouter FlexOlmoTopKRouter MellumTopKRouter LaraMiniTopKRouter MixtralTopKRouter MiniMaxTopKRouter "
    "JambaTopKRouter Qwen2MoeTopKRouter Qwen3MoeTopKRouter Qwen3NextTopKRouter Qwen3_5MoeTopKRouter "
    "Qwen3VLMoeTextTopKRouter Qwen3OmniMoeTextTopKRouter Qwen3OmniMoeThinkerTextTopKRouter "
    "Qwen3OmniMoeTalkerTextTopKRouter Qwen4ExpTextTopKRouter DeepseekV2TopkRouter DeepseekOcr2TextTopkRouter "
    "UnlimitedOcrTextTopkRouter Mistral4TopkRouter MistralLarge4TextTopkRouter Ernie4_5_MoeTopKRouter"
).split()
_TOPK_SOFTMAX_ROUTERS = (
    "GraniteMoeTopKRouter GraniteMoeSharedTopKRouter GraniteMoeHybridTopKRouter GraniteMoeSWATopKRouter "
    "AriaTextTopKRouter Cohere2MoeTopKRouter"
).split()

#: Router class name -> family name. A router class not listed here is *unknown*: it gets the ``"softmax"`` family's
#: structure, and its scoring is taken from its own declaration, proven from its outputs, or assumed with a
#: :class:`ScoringAssumptionWarning` (see :func:`family_for`; add a class with :func:`register_router_class`).
ROUTER_CLASS_TO_FAMILY: dict[str, str] = {
    **{name: "softmax" for name in _SOFTMAX_ROUTERS},
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
    "DeepseekV4TopKRouter": "score-fn",
    "Inkling2TopKRouter": "score-fn",
    "Inkling2LoopTopKRouter": "score-fn",
    "InklingTopkRouter": "sigmoid-shared-rows",
    "PhimoeTopKRouter": "sparsemixer",
    "SwitchTransformersTop1Router": "switch-dispatch",
    "NllbMoeTop2Router": "capacity-softmax",
    "Gemma4TextRouter": "probabilities",
    "DiffusionGemmaTextRouter": "probabilities",
    "MoEGate": "remote-moegate",
    "DeepseekV4HashRouter": "skipped-static-selection",
    "ZayaRouter": "unsupported-mlp-router",
    "DogeCDMoE": "unsupported-product-keys",
    "Ernie4_5_VLMoeMoeBlock": "unsupported-block",
}


def register_router_class(class_name: str, family: str) -> None:
    """Tell the registry which family a router class belongs to (e.g. a remote-code router RoMA does not know).

    Example: ``register_router_class("MyMoEGate", "sigmoid")``. A router that scores with a function of its own can
    instead declare it on the module, which always wins over the class entry: ``gate.scoring_func = "sqrtsoftplus"``
    (one of ``softmax``, ``sigmoid``, ``sqrtsoftplus``, ``probabilities``) or ``gate.score_fn = <callable>``.

    Args:
        class_name (`str`): the router class's ``__name__``.
        family (`str`): a key of :data:`ROUTER_FAMILIES`.
    """
    if family not in ROUTER_FAMILIES:
        raise ValueError(f"Unknown router family {family!r}; choose one of {sorted(ROUTER_FAMILIES)}.")
    ROUTER_CLASS_TO_FAMILY[class_name] = family


def _registered_family(router: nn.Module) -> RouterFamily:
    """The registry entry of the router's class (the ``softmax`` structure for an unknown class), scoring unresolved."""
    return ROUTER_FAMILIES[ROUTER_CLASS_TO_FAMILY.get(type(router).__name__, "softmax")]


def _identify(fn: Callable) -> str | None:
    """The name of the scoring a callable computes, found by evaluating it (None if it matches none)."""
    probe = torch.linspace(-6.0, 6.0, 24).reshape(2, 12)
    try:
        with torch.no_grad():
            out = fn(probe)
    except Exception:
        return None
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
        return None
    for name in _CANDIDATE_SCORINGS:
        if torch.allclose(out.float(), SCORING_FUNCTIONS[name](probe), rtol=1e-5, atol=1e-6):
            return name
    return None


def _declared_scoring(router: nn.Module) -> tuple[str, str, Callable | None] | None:
    """(scoring, source, own function or None) the router module declares itself, or None.

    A scoring *function* on the router (``score_fn`` ...) is the model's own code: it is named by evaluating it, or
    used as is when it matches no known scoring. A scoring *name* (``scoring_func``, ``expert_selection_fn`` ...) must
    be one RoMA implements; another value is reported with a warning and ignored.
    """
    cls = type(router).__name__
    for attr in _SCORE_FN_ATTRS:
        fn = getattr(router, attr, None)
        if fn is not None and callable(fn) and not isinstance(fn, str):
            name = _identify(fn)
            if name is not None:
                return name, f"{cls}.{attr}", None
            return f"{attr}:{type(fn).__name__}", f"{cls}.{attr} (its own function, used as is)", fn
    for attr in _SCORE_NAME_ATTRS:
        value = getattr(router, attr, None)
        if isinstance(value, str):
            name = _SCORING_NAMES.get(value.lower())
            if name is not None:
                return name, f"{cls}.{attr}={value!r}", None
            _warn_once(
                cls,
                None,
                f"{cls}.{attr}={value!r} names a scoring RoMA does not implement (it knows "
                f"{sorted(_SCORING_NAMES)}); the declaration is ignored",
            )
    return None


def _config_scoring(config) -> tuple[str, str] | None:
    """A ``scoring_func`` the model config (or its text config) declares, as (scoring, source)."""
    configs = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            configs.append(get_text_config())
        except Exception:
            pass
    for cfg in configs:
        value = getattr(cfg, "scoring_func", None)
        if isinstance(value, str) and value.lower() in _SCORING_NAMES:
            return _SCORING_NAMES[value.lower()], f"config.scoring_func={value!r}"
    return None


def _prove_scoring(router: nn.Module, hidden_size: int) -> str | None:
    """The one scoring consistent with the router's own outputs on a random probe, or None.

    Runs the router's ``forward`` (no hooks, no grad) on random hidden states. When it returns ``(logits, top-k
    weights, top-k index)`` with k >= 2, a scoring ``s`` is consistent if the weights are ``s(logits)`` at the selected
    experts up to one factor per token (renormalisation, scaling factor). Proven only when exactly one scoring is.
    """
    param = next(router.parameters(), None)
    if param is None or param.device.type == "meta" or hidden_size <= 0:
        return None
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, hidden_size, generator=generator).to(device=param.device, dtype=param.dtype)
    out = None
    with torch.no_grad():
        for probe in (x, x[None]):
            try:
                out = router.forward(probe)
                break
            except Exception:
                continue
    if not isinstance(out, (tuple, list)) or len(out) < 3:
        return None
    logits, weights, index = out[0], out[1], out[2]
    if not all(isinstance(t, torch.Tensor) for t in (logits, weights, index)) or index.is_floating_point():
        return None
    try:
        logits = logits.reshape(16, -1).float()
        weights = weights.reshape(16, -1).float()
        index = index.reshape(16, -1).long()
    except RuntimeError:
        return None
    if weights.shape != index.shape or index.shape[1] < 2 or not torch.isfinite(logits).all():
        return None
    consistent = []
    rtol = max(1e-4, 4 * torch.finfo(out[1].dtype).eps)  # bf16 / fp16 routers round their weights
    for name in _CANDIDATE_SCORINGS:
        selected = SCORING_FUNCTIONS[name](logits).gather(1, index)
        ratio = weights / selected.clamp_min(1e-30)
        if torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=rtol, atol=0.0):
            consistent.append(name)
    return consistent[0] if len(consistent) == 1 else None


_WARNED: set = set()


def _warn_once(cls: str, scoring: str | None, why: str) -> None:
    """One :class:`ScoringAssumptionWarning` per (class, assumption): ``find_routers`` runs many times per model."""
    key = (cls, scoring, why)
    if key in _WARNED:
        return
    _WARNED.add(key)
    if scoring is None:
        warnings.warn(f"roma_peft: router class {cls}: {why}.", ScoringAssumptionWarning, stacklevel=4)
        return
    warnings.warn(
        f"roma_peft: router class {cls}: {why}. RoMA therefore assumes scoring {scoring!r} to turn its logits into the "
        "routing weights it captures and regularises (representation 'probs', and 'topk' where it is recomputed). If "
        "the model scores its experts differently, declare it on the router modules (`module.scoring_func = "
        "'sigmoid'`; one of softmax, sigmoid, sqrtsoftplus, probabilities) or register the class "
        f"(`roma_peft.routers.register_router_class({cls!r}, '<family>')`, families: {', '.join(ROUTER_FAMILIES)}).",
        ScoringAssumptionWarning,
        stacklevel=4,
    )


def _resolve(router: nn.Module, family: RouterFamily, hidden_size: int, config=None, cache: dict | None = None):
    """``family`` with the scoring this router really uses (see :func:`family_for`)."""
    declared = _declared_scoring(router)
    if declared is not None:
        scoring, source, fn = declared
        return replace(family, scoring=scoring, scoring_source=source, score_fn=fn)
    known = type(router).__name__ in ROUTER_CLASS_TO_FAMILY
    if (known and family.scoring != DECLARED) or family.skipped or not family.supported:
        return family if family.scoring != DECLARED else replace(family, scoring="softmax", scoring_source="unused")
    cls = type(router).__name__
    cache = {} if cache is None else cache
    if type(router) not in cache:
        cache[type(router)] = _prove_scoring(router, hidden_size)
    proven = cache[type(router)]
    if proven is not None:
        return replace(
            family,
            scoring=proven,
            scoring_source=f"proven: {cls}'s top-k weights are {proven}(logits) "
            "at the selected experts up to one factor per token",
        )
    what = (
        f"the registry expects {cls} to declare its scoring function (`score_fn`) but it has none"
        if known
        else f"{cls} is not in the RoMA registry, declares no scoring and its scoring could not be proven "
        "from its outputs (they are not (logits, top-k weights, top-k index) with k >= 2, or fit several scorings)"
    )
    from_config = _config_scoring(config) if config is not None else None
    if from_config is not None:
        scoring, source = from_config
        _warn_once(cls, scoring, f"{what}; the model config declares {source}, which is used unverified")
        return replace(family, scoring=scoring, scoring_source=f"assumed from {source} (unverified)")
    _warn_once(cls, "softmax", what)
    return replace(family, scoring="softmax", scoring_source="assumed (warned): unknown router")


def family_for(router: nn.Module, config=None) -> RouterFamily:
    """The registry family of a router module, with the scoring this router really uses.

    The structure (projection, sparse source, support) comes from the class entry in :data:`ROUTER_CLASS_TO_FAMILY`.
    The scoring, in order of preference:

    1. the router's own declaration: a scoring function (``score_fn``, ``scoring_function``: DeepSeek-V4, Inkling2,
       Muse-Spark; named by evaluating it, or used as is) or a scoring name (``scoring_func``, ``expert_selection_fn``:
       remote-code ``MoEGate``, Cohere2);
    2. the class entry, for a class the registry knows (each one checked against the model's own routing weights by
       ``scripts/sweep_families.py``);
    3. for an unknown class: *proven* from the router's outputs (:func:`_prove_scoring`), else the config's
       ``scoring_func`` (``config``), else softmax -- these two with a :class:`ScoringAssumptionWarning` (once per
       class) that names the assumption and how to override it.
    """
    family = _registered_family(router)
    projection = _projection(router, family)
    weight = _own_matrix(projection[1]) if projection is not None else None
    return _resolve(router, family, int(full_shape(weight)[1]) if weight is not None else 0, config)


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
        num_experts: Rows of the router matrix (0 when unknown).
        hidden_size: Columns of the router matrix (0 when unknown).
        has_bias: Whether the matrix owner has a ``bias`` tensor.
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


_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def _clean_name(name: str) -> str:
    """Drop PEFT wrapper hops so names match the stock transformers model."""
    name = name.replace(".base_layer", "")
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def _layer_index(name: str) -> int | None:
    matches = _LAYER_INDEX.findall(name)
    return int(matches[-1]) if matches else None


def _declared_router_specs(model: nn.Module) -> list[tuple[type, int, str | None]]:
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


def _own_matrix(module: nn.Module) -> torch.Tensor | None:
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    if weight is not None and len(full_shape(weight)) == 2 and full_shape(weight)[0] > 1:
        return weight
    return None


def _unwrapped(module: nn.Module | None) -> nn.Module | None:
    """The module itself, or the original module inside a PEFT tuner layer (e.g. a RomaLayer on DBRX's ``layer``)."""
    get_base_layer = getattr(module, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) and hasattr(module, "base_layer") else module


def _projection(router: nn.Module, family: RouterFamily) -> tuple[str, nn.Module] | None:
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
        if _projection(module, _registered_family(module)) is None:
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
    candidates = [c for c in candidates if not _registered_family(c[1]).skipped]

    config = getattr(model, "config", None)
    proofs: dict = {}  # router class -> proven scoring (one probe per unknown class)
    routers = []
    for name, module, index in candidates:
        family = _registered_family(module)
        projection = _projection(module, family)
        layer = _layer_index(name)
        weight = None
        projection_name = name
        if projection is not None:
            rel, proj_module = projection
            projection_name = f"{name}.{rel}" if rel else name
            weight = _own_matrix(proj_module)
        family = _resolve(module, family, int(full_shape(weight)[1]) if weight is not None else 0, config, proofs)
        bias = getattr(projection[1], "bias", None) if projection is not None else None
        routers.append(
            RouterInfo(
                name=name,
                module=module,
                layer_index=layer if layer is not None else len(routers),
                projection_name=projection_name,
                # No single matrix found: a router the registry already marks unsupported keeps its own reason
                # (e.g. Doge's product keys); any other is a multi-layer router network (Zaya-like).
                family=family
                if projection is not None or not family.supported
                else ROUTER_FAMILIES["unsupported-mlp-router"],
                logits_index=index,
                num_experts=_logits_width(module, family, weight),
                hidden_size=int(full_shape(weight)[1]) if weight is not None else 0,
                has_bias=isinstance(bias, nn.Parameter),
            )
        )
    routers.sort(key=lambda r: (r.layer_index, r.name))
    return routers


def _logits_width(router: nn.Module, family: RouterFamily, weight: torch.Tensor | None) -> int:
    """How many logits (experts in the routing vector) the router produces: its matrix rows unless the family says."""
    if weight is None:
        return 0
    width = getattr(router, family.logits_width, None) if family.logits_width else None
    rows = int(full_shape(weight)[0])
    return int(width) if isinstance(width, int) and 0 < width <= rows else rows


def group_by_layer(routers: list[RouterInfo]) -> list[list[RouterInfo]]:
    """Routers grouped per MoE layer, in layer order (a layer may hold several routers, e.g. JetMoE)."""
    groups: dict[int, list[RouterInfo]] = {}
    for router in routers:
        groups.setdefault(router.layer_index, []).append(router)
    return [groups[i] for i in sorted(groups)]


#: How :func:`select_moe_layers` (and ``RomaConfig.layer_selection``) picks MoE layers.
LayerSelection = Literal["last", "first", "middle", "all", "indices"]
LAYER_SELECTIONS: tuple[str, ...] = get_args(LayerSelection)


def select_moe_layers(
    num_moe_layers: int, selection: str = "last", num_layers: int = 5, indices: list[int] | None = None
) -> list[int]:
    """Positions (0-based, among MoE layers only) of the MoE layers to tune.

    ``last``/``first``/``middle`` take ``num_layers`` consecutive MoE layers; ``all`` takes every MoE layer;
    ``indices`` takes the listed positions (negative positions count from the end, as in Python).
    The paper's default is the last 5 MoE layers (its layer ablation: L5 > all layers > fewer layers).

    Args:
        num_moe_layers (`int`): how many MoE layers the model has.
        selection (`LayerSelection`): ``"last"``, ``"first"``, ``"middle"``, ``"all"`` or ``"indices"``.
        num_layers (`int`): how many layers ``last``/``first``/``middle`` take.
        indices (`list[int]`, *optional*): the positions for ``"indices"``.

    Returns:
        `list[int]`: sorted MoE-layer positions.

    Raises:
        ValueError: an unknown selection, out-of-range or repeated indices, or more layers than the model has.
    """
    if selection not in LAYER_SELECTIONS:
        raise ValueError(f"layer_selection must be one of {LAYER_SELECTIONS}, got {selection!r}.")
    if num_moe_layers <= 0:
        raise NoRoutersFoundError("The model has no MoE layer to select from.")
    if selection == "all":
        return list(range(num_moe_layers))
    if selection == "indices":
        if not indices:
            raise ValueError(
                "layer_selection='indices' needs `moe_layer_indices`, a non-empty list of MoE-layer positions."
            )
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
