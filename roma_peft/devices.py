"""Where a model's inputs go, and which machine a measurement ran on.

Every public function that runs a model (scoring, routing capture, the oracle, the trainer's helpers) must put its
tensors on the model's device, also for a model dispatched over several devices with ``device_map="auto"``: there
the input ids belong on the device of the input embedding (accelerate's hooks move activations from layer to layer),
which need not be the device of ``next(model.parameters())``.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

import torch
from torch import nn

__all__ = ["input_device", "machine_info", "describe_machine"]


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


def machine_info(device=None) -> dict:
    """What a benchmark or diagnosis records about the machine it measured on (one definition for every script).

    Args:
        device (`torch.device` or `str`, *optional*): the device the model ran on; a CUDA device adds its name.

    Returns:
        `dict`: cpu model, architecture, logical CPUs, 1-minute load, torch threads, Python / torch / transformers /
        peft versions and, when given, the device.
    """
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "arch": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for package in ("transformers", "peft"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    if device is not None:
        device = torch.device(device)
        name = str(device)
        if device.type == "cuda" and torch.cuda.is_available():
            name += f" ({torch.cuda.get_device_name(device)})"
        info["device"] = name
    return info


def describe_machine(device=None) -> str:
    """:func:`machine_info` as one line, e.g. ``x86_64 AMD EPYC ..., 2 logical CPUs (load 1.2), 1 torch thread(s),
    Python 3.11.7, torch 2.13.0+cpu, transformers 5.24.0, peft 0.21.2``."""
    i = machine_info(device)
    load = f" (load {i['load_avg_1m']})" if i["load_avg_1m"] is not None else ""
    text = (
        f"{i['arch']} {i['cpu']}, {i['logical_cpus']} logical CPUs{load}, {i['torch_threads']} torch thread(s), "
        f"Python {i['python']}, torch {i['torch']}, transformers {i['transformers']}, peft {i['peft']}"
    )
    return text + (f", model on {i['device']}" if "device" in i else "")
