"""Registering RoMA as a PEFT method (run once by ``import roma_peft``).

PEFT has no plugin entry points: a method is known to PEFT when its name is a member of the closed ``PeftType``
str-enum and its config/tuner/prefix are in PEFT's mappings. ``register_peft_method`` fills the mappings but refuses
names that are not ``PeftType`` members, and transformers' own adapter loader calls ``peft_type.value.lower()``, so a
plain string or a private enum is not enough (measured on peft 0.20/0.21 and transformers 5.24). We therefore add a
real ``ROMA`` member to ``PeftType`` with ``aenum.extend_enum`` and then use the official ``register_peft_method``.
Both steps are guarded, so importing roma_peft twice (or reloading it) is harmless, and a future PEFT that ships its own
``ROMA`` member is used as is.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

PEFT_METHOD_NAME = "roma"
ADAPTER_PREFIX = "roma_"


def roma_peft_type() -> PeftType:
    """The ``PeftType.ROMA`` member, created on first use."""
    if "ROMA" not in PeftType.__members__:
        from aenum import extend_enum

        extend_enum(PeftType, "ROMA", "ROMA")
    return PeftType["ROMA"]


def register() -> None:
    """Make ``ROMA`` known to PEFT's ``get_peft_model``, ``PeftModel.from_pretrained``, ``PeftConfig`` ... ."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import RomaConfig
    from .model import RomaModel

    peft_type = roma_peft_type()
    registered_config = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered_config is not None:
        if registered_config.__name__ == RomaConfig.__name__ and PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is not None:
            # Already registered (re-import or importlib.reload): point the mappings at the current classes.
            from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

            PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = RomaConfig
            PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = RomaModel
            PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = ADAPTER_PREFIX
            _install_hooks()
            return
        raise RuntimeError(
            f"PEFT already has a method registered as ROMA ({registered_config.__module__}."
            f"{registered_config.__name__}); roma_peft cannot register its own. Uninstall the other package or "
            "use its implementation."
        )
    register_peft_method(name=PEFT_METHOD_NAME, config_cls=RomaConfig, model_cls=RomaModel, prefix=ADAPTER_PREFIX)
    _install_hooks()


def _install_hooks() -> None:
    """The model-card hooks (PEFT metadata survives ``push_to_hub``); see :mod:`roma_peft.export`. The save hook
    (no NaN adapter, never a pickled ``.bin`` that roma_peft cannot load): :func:`roma_peft.model.install_save_hooks`.
    The config checks (a bad ``adapter_config.json`` fails naming the file and the field, also inside PEFT's own
    reading of it): :func:`roma_peft.config.install_config_checks`.
    """
    from .config import install_config_checks
    from .export import install_model_card_hooks
    from .model import install_save_hooks

    install_model_card_hooks()
    install_save_hooks()
    install_config_checks()
