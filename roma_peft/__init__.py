"""roma_peft: Routing Manifold Alignment (RoMA) for Mixture-of-Experts LLMs, as a PEFT method.

``import roma_peft`` registers the ``ROMA`` PEFT method, after which the stock PEFT entry points work::

    import roma_peft
    from peft import get_peft_model, PeftModel

    model = get_peft_model(moe_model, roma_peft.RomaConfig())   # router deltas on the last 5 MoE layers
"""

from .config import RomaConfig
from .layer import RomaLayer
from .model import RomaModel, resolve_routers
from .registration import register as _register
from .routers import ROUTER_FAMILIES, NoRoutersFoundError, RouterFamily, RouterInfo, find_routers, select_moe_layers

__version__ = "0.1.0"

_register()

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
]
