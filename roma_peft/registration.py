"""Registering RoMA as a PEFT method (run once by ``import roma_peft``).

PEFT has no plugin entry points: a method is known to PEFT when its name is a ``PeftType`` member and its config, tuner
and prefix are in PEFT's mappings. :func:`register` adds the member (:func:`roma_peft.constants.roma_peft_type`) and
calls PEFT's own ``register_peft_method``; why a real enum member is needed: docs/design.md.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import RomaConfig
from .constants import ADAPTER_PREFIX, PEFT_METHOD_NAME, roma_peft_type
from .hooks import install_config_checks
from .model import RomaModel

__all__ = ["register", "roma_peft_type", "ADAPTER_PREFIX", "PEFT_METHOD_NAME"]


def register() -> None:
    """Make ``ROMA`` known to PEFT's ``get_peft_model``, ``PeftModel.from_pretrained``, ``PeftConfig`` ... .

    Idempotent: a second call (re-import, ``importlib.reload``) points PEFT's mappings at the current classes. Also
    installs the checks on PEFT's reading of ``adapter_config.json`` (:func:`roma_peft.hooks.install_config_checks`).

    Raises:
        RuntimeError: another package already registered a PEFT method called ``ROMA``.
    """
    peft_type = roma_peft_type()
    registered_config = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered_config is None:
        register_peft_method(name=PEFT_METHOD_NAME, config_cls=RomaConfig, model_cls=RomaModel, prefix=ADAPTER_PREFIX)
    elif registered_config.__name__ == RomaConfig.__name__ and PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is not None:
        # Already registered (re-import or importlib.reload): point the mappings at the current classes.
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = RomaConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = RomaModel
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = ADAPTER_PREFIX
    else:
        raise RuntimeError(
            f"PEFT already has a method registered as ROMA ({registered_config.__module__}."
            f"{registered_config.__name__}); roma_peft cannot register its own. Uninstall the other package or "
            "use its implementation."
        )
    install_config_checks()
