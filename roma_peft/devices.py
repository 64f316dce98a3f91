"""Where a model's inputs go.

Every public function that runs a model (scoring, routing capture, the oracle, the trainer's helpers) must put its
tensors on the model's device, also for a model dispatched over several devices with ``device_map="auto"``: there
the input ids belong on the device of the input embedding (accelerate's hooks move activations from layer to layer),
which need not be the device of ``next(model.parameters())``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["input_device"]


def input_device(model: nn.Module) -> torch.device:
    """The device input ids must be on: the input embedding's, else the first materialised parameter's, else CPU."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        try:
            weight = getattr(get_embeddings(), "weight", None)
        except (NotImplementedError, AttributeError):
            weight = None
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            return weight.device
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")
