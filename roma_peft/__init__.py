"""roma_peft: Routing Manifold Alignment (RoMA) for Mixture-of-Experts LLMs, as a PEFT method.

``import roma_peft`` registers the ``ROMA`` PEFT method, after which the stock PEFT entry points work::

    import roma_peft
    from peft import get_peft_model, PeftModel

    model = get_peft_model(moe_model, roma_peft.RomaConfig())   # router deltas on the last 5 MoE layers

Where things live (see docs/design.md): routers are found in :mod:`roma_peft.routers`, samples become prompt tokens
in :mod:`roma_peft.prompts`, routing is captured in :mod:`roma_peft.capture`, neighbours are built in
:mod:`roma_peft.neighbours`, the loss is added in :mod:`roma_peft.trainer`.
"""

import importlib

from .capture import RoutingRecorder, RoutingSpec, collect_routing
from .config import RomaConfig
from .export import LoraExportError, export_merged, export_to_lora
from .layer import RomaLayer
from .model import RomaModel, resolve_routers
from .registration import register as _register
from .routers import (
    ROUTER_FAMILIES,
    NoRoutersFoundError,
    RouterFamily,
    RouterInfo,
    ScoringAssumptionWarning,
    find_routers,
    register_router_class,
    select_moe_layers,
)

__version__ = "0.1.0"

_register()

# Imported on first use, so that ``import roma_peft`` stays light (no Trainer, sentence-transformers or sklearn).
_LAZY_EXPORTS = {
    "RomaTrainer": "trainer",
    "RomaTrainingArguments": "trainer",
    "NonFiniteLossError": "trainer",
    "NonFiniteAdapterError": "layer",
    "ConditionsMismatchError": "conditions",
    "routing_conditions": "conditions",
    "RomaDataCollator": "collator",
    "PromptTruncatedError": "prompts",
    "PromptEncoding": "prompts",
    "encode_samples": "prompts",
    "load_samples": "data",
    "paper_training_mix": "recipe_data",
    "score_multiple_choice": "scoring",
    "score_generative": "scoring",
    "successful_ids": "scoring",
    "ScoreResult": "scoring",
    "embed_samples": "embeddings",
    "load_model_and_tokenizer": "loading",
    "diagnose": "diagnose",
    "DiagnoseConfig": "diagnose",
    "NeighbourhoodConfig": "neighbours",
    "Neighbourhood": "neighbours",
    "build_neighbourhood": "neighbours",
}


def __getattr__(name):
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "RomaConfig",
    "RomaLayer",
    "RomaModel",
    "resolve_routers",
    "find_routers",
    "select_moe_layers",
    "RouterFamily",
    "RouterInfo",
    "ROUTER_FAMILIES",
    "NoRoutersFoundError",
    "ScoringAssumptionWarning",
    "register_router_class",
    "RoutingRecorder",
    "RoutingSpec",
    "collect_routing",
    "export_to_lora",
    "export_merged",
    "LoraExportError",
    *_LAZY_EXPORTS,
]
