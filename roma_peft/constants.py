"""Names that every other roma_peft module shares: the PEFT method, the adapter prefix, file names.

The leaf of the import graph (it imports no other roma_peft module), like PEFT's ``peft.utils.constants`` and
``peft.utils.peft_types``: :mod:`roma_peft.config`, :mod:`roma_peft.model`, :mod:`roma_peft.export` and
:mod:`roma_peft.registration` all read the ``ROMA`` type from here, so none of them imports another to learn it.
"""

from __future__ import annotations

from aenum import extend_enum
from peft.utils.peft_types import PeftType

__all__ = [
    "PEFT_TYPE_NAME",
    "PEFT_METHOD_NAME",
    "ADAPTER_PREFIX",
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PICKLED_WEIGHTS_NAME",
    "CURVES_FILE",
    "HEATMAPS_FILE",
    "ROUTING_STATS_FILE",
    "roma_peft_type",
    "is_roma_config",
    "has_roma_adapter",
]

#: The ``peft_type`` written into ``adapter_config.json`` (``PeftType.ROMA``'s name and value).
PEFT_TYPE_NAME = "ROMA"
#: The name given to ``peft.utils.register_peft_method`` (PEFT wants the lower-case type).
PEFT_METHOD_NAME = "roma"
#: Prefix of every adapter parameter (``roma_delta``, ``roma_bias_delta``); PEFT and transformers find adapter tensors
#: by ``peft_type.lower() + "_"``.
ADAPTER_PREFIX = "roma_"

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"

#: What :func:`roma_peft.plots.save_training_plots` writes next to an adapter (the model card links the figures).
CURVES_FILE = "training_curves.png"
HEATMAPS_FILE = "routing_heatmaps.png"
ROUTING_STATS_FILE = "routing_stats.json"


def roma_peft_type() -> PeftType:
    """The ``PeftType.ROMA`` member, added to PEFT's closed ``PeftType`` enum on first use.

    PEFT only registers methods whose name is a ``PeftType`` member, and transformers' adapter loader calls
    ``peft_type.value.lower()``, so a plain string would not do. Idempotent; a PEFT that ships its own ``ROMA`` member
    is used as is.

    Returns:
        `PeftType`: the ``ROMA`` member.
    """
    if PEFT_TYPE_NAME not in PeftType.__members__:
        extend_enum(PeftType, PEFT_TYPE_NAME, PEFT_TYPE_NAME)
    return PeftType[PEFT_TYPE_NAME]


def is_roma_config(config) -> bool:
    """Whether ``config`` (any PEFT config, or anything with a ``peft_type``) describes a RoMA adapter.

    Compares the type's value, so a config whose ``peft_type`` is still the plain string ``"ROMA"`` counts too.
    """
    peft_type = getattr(config, "peft_type", None)
    return getattr(peft_type, "value", peft_type) == PEFT_TYPE_NAME


def has_roma_adapter(model) -> bool:
    """Whether ``model`` (a ``PeftModel``, or anything with a ``peft_config`` dict) holds at least one RoMA adapter."""
    return any(is_roma_config(c) for c in (getattr(model, "peft_config", None) or {}).values())
