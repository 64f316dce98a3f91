"""Loading a base MoE model and its tokenizer for RoMA: dtype, device placement, attention kernel, revision,
remote code, and bitsandbytes-quantized frozen bases whose routers stay in full precision.

:func:`load_model_and_tokenizer` is what every ``roma-peft`` command uses; the options are checked first
(:func:`check_loading_options`), so a bad option fails in one line before any weight is read. How routers are kept
out of quantization: docs/design.md, "Quantized bases".
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import init_empty_weights
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from .layer import RomaLayer
from .routers import find_routers

__all__ = [
    "quiet_peft_wrapping",
    "looks_like_local_path",
    "default_device_map",
    "load_model_and_tokenizer",
    "model_loading_kwargs",
    "check_loading_options",
    "normalize_dtype",
    "parse_device_map",
    "router_skip_modules",
    "quantizable_share",
    "check_routers_unquantized",
    "check_adapted_routers",
    "RouterNotTrainableError",
    "DTYPE_NAMES",
]

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
"""The dtypes accepted by ``dtype`` (long names; each also has a short alias, see :data:`DTYPE_ALIASES`)."""

DTYPE_ALIASES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's placement strategies (``auto`` = ``balanced``: spread the layers over every GPU, then CPU, then disk)."""

QUANT_TYPES_4BIT = ("nf4", "fp4")

_BNB_QUANTIZED_CLASSES = ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4", "Params4bit", "Int8Params")
_FALLBACK_ROUTER_PATTERNS = (r".*\.gate", r".*\.router", "lm_head")  # regexes with a module boundary (transformers 5)


class RouterNotTrainableError(ValueError):
    """A router RoMA would tune is quantized or offloaded, so a float32 delta cannot be added to its matrix."""


def _name(option: str, prefix: str) -> str:
    return f"{prefix}{option}"


# ---------------------------------------------------------------------------------------------- dtype
def normalize_dtype(dtype: str | torch.dtype | None, option: str = "dtype", prefix: str = "") -> str | torch.dtype:
    """``"auto"`` or a ``torch.dtype`` from a name (``bf16``/``bfloat16``, ``fp16``/``float16``, ``fp32``/``float32``,
    ``auto``; case-insensitive, ``torch.`` prefix allowed) or a torch floating dtype. Anything else: ValueError."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
        name = str(dtype)
    else:
        name = str(dtype)
        key = name.strip().lower().removeprefix("torch.")
        if key in DTYPE_ALIASES:
            canonical = DTYPE_ALIASES[key]
            return "auto" if canonical == "auto" else getattr(torch, canonical)
    raise ValueError(
        f"{_name(option, prefix)} {name!r} is not supported; use one of {', '.join(DTYPE_NAMES)} (or the short names "
        "fp32, bf16, fp16)."
    )


# ---------------------------------------------------------------------------------------------- devices
def _accelerators() -> list[tuple[str, int]]:
    """(device type, count) of the accelerators torch can use here, CUDA first."""
    found = []
    if torch.cuda.is_available():
        found.append(("cuda", torch.cuda.device_count()))
    for kind in ("xpu", "npu", "hpu", "mlu", "musa"):
        backend = getattr(torch, kind, None)
        try:
            if backend is not None and backend.is_available():
                found.append((kind, backend.device_count()))
        except Exception:  # noqa: BLE001 - a half-installed backend is simply not available
            continue
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append(("mps", 1))
    return found


def _no_device(what: str, value: Any, kind: str, hint: str = "use 'cpu', or run on a machine with a GPU") -> ValueError:
    if kind == "cuda":
        build = (
            "a CPU-only build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        )
        why = f"CUDA is not available on this machine ({build}, torch.cuda.is_available() is False)"
    else:
        why = f"no {kind} device is available on this machine"
    return ValueError(f"{what} {value!r}: {why}; {hint}.")


def _check_device(value: Any, what: str, allow_disk: bool = False) -> str | int:
    """One device of a device map: an accelerator index, ``cpu``, ``cuda``, ``cuda:N`` ... (``disk`` in a dict)."""
    if isinstance(value, torch.device):
        value = str(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what} {value!r} is not a device (use an index, 'cpu', 'cuda', 'cuda:1' ...).")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what} {value!r} is not a device index (must be >= 0).")
        accelerators = _accelerators()
        if not accelerators:
            raise _no_device(what, value, "cuda")
        kind, count = accelerators[0]
        if value >= count:
            raise ValueError(
                f"{what} {value!r}: there is no {kind} device {value}; this machine has {count} "
                f"({', '.join(f'{kind}:{i}' for i in range(count))})."
            )
        return value
    text = value.strip()
    if text == "disk":
        if allow_disk:
            return text
        raise ValueError(f"{what} 'disk' is only allowed for some modules inside a JSON device map.")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"{what} {value!r} is not a device; use {', '.join(DEVICE_MAP_STRATEGIES)}, 'cpu', 'cuda', 'cuda:1' or a "
            "JSON dict {module name: device}."
        ) from None
    if device.type == "cpu":
        return "cpu"
    if device.type == "meta":
        raise ValueError(f"{what} 'meta' would load no weights; use 'cpu', 'cuda', 'cuda:N' or 'auto'.")
    available = dict(_accelerators())
    if device.type not in available:
        raise _no_device(what, value, device.type)
    count = available[device.type]
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"{what} {value!r}: there is no {device.type} device {device.index}; this machine has {count} "
            f"({', '.join(f'{device.type}:{i}' for i in range(count))})."
        )
    return text


def default_device_map() -> str | None:
    """Where a command that only *runs* the model (scoring, routing capture, evaluation, diagnosis) puts it when the
    user gave no ``device_map``: the accelerator when there is one, never silently the CPU of a GPU machine.

    One process: ``"auto"`` (one GPU, or spread over several for a model larger than one). Several processes
    (torchrun / accelerate launch: ``WORLD_SIZE`` > 1): each process's own GPU, ``cuda:LOCAL_RANK``, so the ranks
    split the samples, not the model. No accelerator: ``None`` (the CPU). Training does not use this: the Trainer
    places the model itself.
    """
    if not torch.cuda.is_available():
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "auto"


def parse_device_map(device_map: Any, option: str = "device_map", prefix: str = "") -> None | str | int | dict:
    """Check a ``device_map`` and return what ``from_pretrained`` takes, without loading anything.

    Accepts ``None`` (no placement: transformers loads on the CPU), a strategy (``auto``, ``balanced``,
    ``balanced_low_0``, ``sequential``), a device (``cpu``, ``cuda``, ``cuda:1``, an index, a ``torch.device``), or a
    dict ``{module name: device}`` (also as a JSON string, e.g. ``'{"": "cuda:0"}'``; ``disk`` allowed there). A device
    this machine does not have (``cuda`` without CUDA, ``cuda:3`` on a 2-GPU machine) is a ValueError.
    """
    what = _name(option, prefix)
    if device_map is None:
        return None
    if isinstance(device_map, str):
        text = device_map.strip()
        if text == "" or text.lower() == "none":
            return None
        if text.startswith("{"):
            try:
                device_map = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{what} is not valid JSON ({exc.msg} at character {exc.pos}): {text!r}.") from None
            if not isinstance(device_map, dict):
                raise ValueError(f"{what} must be a JSON object {{module name: device}}, got {text!r}.")
        elif text.lower() in DEVICE_MAP_STRATEGIES:
            return text.lower()
        else:
            return _check_device(text, what)
    if isinstance(device_map, dict):
        if not device_map:
            raise ValueError(f'{what} is an empty dict; map at least one module ("" = the whole model) to a device.')
        checked = {}
        for module, device in device_map.items():
            if not isinstance(module, str):
                raise ValueError(f"{what}: module names must be strings, got {module!r}.")
            checked[module] = _check_device(device, f"{what} (module {module!r})", allow_disk=True)
        return checked
    return _check_device(device_map, what)


# ---------------------------------------------------------------------------------------------- attention
def _attention_names() -> list[str]:
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        names = list(ALL_ATTENTION_FUNCTIONS.valid_keys())
    except Exception:  # noqa: BLE001 - an older/newer transformers: keep the usual names
        names = ["sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "paged|eager"]
    return ["eager", *[n for n in names if n != "eager"]]


def _flash_attention_available(version: int) -> bool:
    try:
        from transformers.modeling_flash_attention_utils import (
            FLASH_ATTENTION_COMPATIBILITY_MATRIX,
        )

        if FLASH_ATTENTION_COMPATIBILITY_MATRIX[version]["general_availability_check"]():
            return True
    except Exception:  # noqa: BLE001 - unknown version/layout: fall back to the package check
        if version == 2 and importlib.util.find_spec("flash_attn") is not None:
            return True
    return importlib.util.find_spec("kernels") is not None  # transformers falls back to hub kernels


def check_attn_implementation(name: str | None, option: str = "attn_implementation", prefix: str = "") -> str | None:
    """A known attention implementation (``eager``, ``sdpa``, ``flash_attention_2`` ..., ``paged|...``, or a hub
    kernel ``org/repo``); ``flash_attention_*`` also needs a CUDA GPU and its package. Returns the name."""
    if name is None or str(name).strip() == "":
        return None
    name = str(name).strip()
    what = _name(option, prefix)
    known = _attention_names()
    base = name.removeprefix("paged|")
    if "/" not in base and name not in known and base not in known:
        raise ValueError(
            f"{what} {name!r} is not supported; use one of {', '.join(known)} (or a hub kernel 'org/repo')."
        )
    if base.startswith("flash_attention_"):
        if not torch.cuda.is_available():
            raise _no_device(what, name, "cuda", "flash attention runs on CUDA GPUs only, use sdpa or eager here")
        version = base.rsplit("_", 1)[-1]
        if version.isdigit() and not _flash_attention_available(int(version)):
            package = "flash-attn" if version == "2" else f"FlashAttention {version}"
            raise ValueError(
                f"{what} {name!r} needs {package} (pip install flash-attn, or the 'kernels' package); "
                "use sdpa otherwise."
            )
    return name


# ---------------------------------------------------------------------------------------------- options
def looks_like_local_path(path: str) -> bool:
    """Whether ``path`` can only be a local path (absolute, ``./``, ``~``, or not a valid hub repo id)."""
    if os.path.isabs(path) or path.startswith((".", "~")) or (os.sep != "/" and os.sep in path):
        return True
    try:
        validate_repo_id(path)
    except HFValidationError:
        return True
    return False


def _check_path(option: str, path: str | None, prefix: str) -> None:
    if path and not os.path.exists(path) and looks_like_local_path(str(path)):
        raise FileNotFoundError(f"{_name(option, prefix)} {str(path)!r}: no such directory.")


def check_loading_options(
    *,
    dtype: Any = "auto",
    device_map: Any = None,
    attn_implementation: str | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    bnb_4bit_compute_dtype: Any = None,
    bnb_4bit_quant_type: str = "nf4",
    llm_int8_skip_modules: Sequence[str] | None = None,
    quantization_config: Any = None,
    model_name_or_path: str | None = None,
    tokenizer_name_or_path: str | None = None,
    prefix: str = "",
) -> dict:
    """Check every loading option without reading a weight; returns them normalised (``dtype`` a torch dtype or
    ``"auto"``, ``device_map`` parsed, ...). Raises ValueError (FileNotFoundError for a missing local path) with one
    line naming the option; ``prefix="--"`` names them as command-line flags."""
    _check_path("model_name_or_path", model_name_or_path, prefix)
    _check_path("tokenizer_name_or_path", tokenizer_name_or_path, prefix)
    out = {
        "dtype": normalize_dtype(dtype, "dtype", prefix),
        "device_map": parse_device_map(device_map, "device_map", prefix),
        "attn_implementation": check_attn_implementation(attn_implementation, "attn_implementation", prefix),
        "bnb_4bit_compute_dtype": None,
    }
    if load_in_4bit and load_in_8bit:
        raise ValueError(
            f"{_name('load_in_4bit', prefix)} and {_name('load_in_8bit', prefix)} exclude each other; "
            "choose one quantization."
        )
    quantized = bool(load_in_4bit or load_in_8bit)
    if quantization_config is not None and quantized:
        raise ValueError(
            f"pass either quantization_config or {_name('load_in_4bit', prefix)}/"
            f"{_name('load_in_8bit', prefix)}, not both."
        )
    if bnb_4bit_compute_dtype is not None:
        compute = normalize_dtype(bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype", prefix)
        if compute == "auto":
            raise ValueError(
                f"{_name('bnb_4bit_compute_dtype', prefix)} must be a dtype (bfloat16, float16 or float32), not 'auto'."
            )
        out["bnb_4bit_compute_dtype"] = compute
    if str(bnb_4bit_quant_type).lower() not in QUANT_TYPES_4BIT:
        raise ValueError(
            f"{_name('bnb_4bit_quant_type', prefix)} {bnb_4bit_quant_type!r} is not supported; use "
            f"{' or '.join(QUANT_TYPES_4BIT)}."
        )
    if llm_int8_skip_modules is not None and (
        isinstance(llm_int8_skip_modules, str) or not all(isinstance(m, str) for m in llm_int8_skip_modules)
    ):
        raise ValueError(f"{_name('llm_int8_skip_modules', prefix)} must be a list of module names.")
    if quantized or (quantization_config is not None and _is_bnb_config(quantization_config)):
        if not _bitsandbytes_installed():
            flag = _name("load_in_4bit" if load_in_4bit else "load_in_8bit", prefix) if quantized else "quantization"
            raise ValueError(f"{flag} needs the bitsandbytes package (pip install bitsandbytes).")
    return out


def _bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _is_bnb_config(config: Any) -> bool:
    method = getattr(config, "quant_method", None) or (config.get("quant_method") if isinstance(config, dict) else None)
    return str(getattr(method, "value", method)) == "bitsandbytes"


# ---------------------------------------------------------------------------------------------- quantization
def router_skip_modules(
    model_name_or_path: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    config: Any = None,
) -> tuple[list[str], list[str]]:
    """``(router module names, transformers' default skips)`` of a checkpoint, found without loading its weights.

    Builds the model from its config on the meta device (``accelerate.init_empty_weights``) and runs
    :func:`roma_peft.routers.find_routers` on it. The default skips (``lm_head``, tied/output embeddings) are what
    transformers keeps unquantized when ``llm_int8_skip_modules`` is unset: setting it replaces them, so they are
    returned to be kept. If the empty model cannot be built, name patterns (``*.gate``, ``*.router``, ``lm_head``) are
    returned instead, with a warning (the check after loading still catches a router that was quantized).
    """
    routers, defaults, _ = _inspect_checkpoint(model_name_or_path, revision, trust_remote_code, config)
    return routers, defaults


def _inspect_checkpoint(model_name_or_path, revision, trust_remote_code, config=None):
    """(router names, default skips, the meta-device model or None) -- see :func:`router_skip_modules`."""
    try:
        if config is None:
            config = AutoConfig.from_pretrained(
                model_name_or_path, revision=revision, trust_remote_code=trust_remote_code
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with init_empty_weights(include_buffers=False):
                meta_model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            routers = [r.name for r in find_routers(meta_model)]
    except Exception as exc:  # noqa: BLE001 - fall back to patterns; loading then reports the real error if any
        warnings.warn(
            f"roma_peft: could not build {model_name_or_path!r} on the meta device to find its routers "
            f"({type(exc).__name__}: {exc}); keeping modules named *.gate / *.router unquantized by pattern.",
            stacklevel=3,
        )
        return [], list(_FALLBACK_ROUTER_PATTERNS), None
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        defaults = sorted(get_keys_to_not_convert(meta_model))
    except Exception:  # noqa: BLE001 - private helper moved: keep the usual output head
        defaults = ["lm_head"]
    return routers, defaults, meta_model


def quantizable_share(model: nn.Module, skip_modules: Sequence[str] = ()) -> float:
    """Share of ``model``'s parameters that bitsandbytes can quantize: the weights of ``nn.Linear`` modules not in
    ``skip_modules``. Fused MoE experts (one 3-D parameter per layer: OLMoE, Qwen3-MoE, Mixtral ... in transformers 5)
    are not ``nn.Linear`` and stay in ``dtype``."""
    total = sum(p.numel() for p in model.parameters())
    skip = tuple(skip_modules)
    linear = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(
            name == s or name.startswith(s + ".") or name.endswith("." + s) for s in skip
        ):
            continue
        linear += module.weight.numel()
    return linear / total if total else 0.0


def _bnb_config(load_in_4bit, load_in_8bit, compute_dtype, quant_type, double_quant, skip_modules):
    kwargs: dict[str, Any] = {"llm_int8_skip_modules": list(skip_modules)}
    if load_in_4bit:
        kwargs.update(
            load_in_4bit=True, bnb_4bit_quant_type=str(quant_type).lower(), bnb_4bit_use_double_quant=bool(double_quant)
        )
        if compute_dtype is not None:
            kwargs["bnb_4bit_compute_dtype"] = compute_dtype
    else:
        kwargs["load_in_8bit"] = True
    return BitsAndBytesConfig(**kwargs)


def _quantized_reason(module: nn.Module | None) -> str | None:
    """Why a router matrix owner cannot take a float32 delta (quantized), or None."""
    if module is None:
        return None
    base = module.get_base_layer() if callable(getattr(module, "get_base_layer", None)) else module
    for sub in base.modules():  # the router and its projection child (nn.Linear `layer`, `gate`, `wg` ...)
        classes = [type(sub).__name__]
        weight = sub._parameters.get("weight")
        if weight is not None:
            classes.append(type(weight).__name__)
        hit = next((c for c in classes if c in _BNB_QUANTIZED_CLASSES), None)
        if hit is not None:
            return f"bitsandbytes {hit}"
        if isinstance(weight, torch.Tensor) and (not weight.dtype.is_floating_point or weight.element_size() == 1):
            return f"weight dtype {weight.dtype}"
    return None


def check_routers_unquantized(model: nn.Module, routers: Sequence | None = None) -> None:
    """Refuse a model whose routers were quantized (bitsandbytes ``Linear4bit``/``Linear8bitLt``, int8/fp8 weights).

    ``routers``: the :class:`~roma_peft.routers.RouterInfo` to check (default: every router of ``model``). The error
    lists the router module names to pass as ``llm_int8_skip_modules``.
    """
    if routers is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            routers = find_routers(model)
    modules = dict(model.named_modules())
    bad = []
    for router in routers:
        owner = modules.get(router.projection_name)
        if owner is None:
            owner = modules.get(f"base_model.model.{router.projection_name}")
        reason = _quantized_reason(owner if owner is not None else router.module)
        if reason is not None:
            bad.append((router.name, reason))
    if bad:
        names = [n for n, _ in bad]
        shown = ", ".join(f"{n} ({why})" for n, why in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise RouterNotTrainableError(
            f"{len(bad)} router(s) were quantized: {shown}. RoMA adds a float32 delta to each router matrix, so the "
            f"routers must stay unquantized: pass llm_int8_skip_modules={json.dumps(names)} (command line: "
            f"--llm_int8_skip_modules {' '.join(names)}), or load the base without quantization."
        )


def check_adapted_routers(model: nn.Module) -> None:
    """Refuse a model whose RoMA-wrapped routers cannot train: quantized, or offloaded by accelerate (weight on the
    meta device: ``device_map`` sent that layer to CPU/disk offload, where the float32 delta cannot live).

    Call it after ``get_peft_model`` / ``PeftModel.from_pretrained``; ``roma-peft`` does.
    """
    quantized, offloaded = [], []
    for name, module in model.named_modules():
        if not isinstance(module, RomaLayer):
            continue
        clean = name.removeprefix("base_model.model.")
        reason = _quantized_reason(module)
        if reason is not None:
            quantized.append(f"{clean} ({reason})")
        weight = module.get_base_layer()._parameters.get("weight")
        if isinstance(weight, torch.Tensor) and weight.device.type == "meta":
            offloaded.append(clean)
    if quantized:
        raise RouterNotTrainableError(
            f"tuned router(s) are quantized: {', '.join(quantized[:4])}{' ...' if len(quantized) > 4 else ''}. Keep the "
            "routers unquantized (llm_int8_skip_modules / --llm_int8_skip_modules with their module names)."
        )
    if offloaded:
        raise RouterNotTrainableError(
            f"tuned router(s) are offloaded to CPU/disk by the device map (their weight is on the meta device): "
            f"{', '.join(offloaded[:4])}{' ...' if len(offloaded) > 4 else ''}. RoMA keeps a float32 delta next to each "
            "tuned router, so these layers must sit on a GPU or wholly on the CPU: use more GPUs, give them more room "
            "(max_memory), or pass a JSON --device_map that places those layers on a device."
        )


# ---------------------------------------------------------------------------------------------- loading
def model_loading_kwargs(
    model_name_or_path: str,
    *,
    dtype: Any = "auto",
    device_map: Any = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    bnb_4bit_compute_dtype: Any = None,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_use_double_quant: bool = False,
    llm_int8_skip_modules: Sequence[str] | None = None,
    quantization_config: Any = None,
    prefix: str = "",
) -> dict:
    """The keyword arguments :func:`load_model_and_tokenizer` hands to ``AutoModelForCausalLM.from_pretrained``.

    Checks the options first (:func:`check_loading_options`). For ``load_in_4bit``/``load_in_8bit`` this builds the
    ``BitsAndBytesConfig`` with the routers (found on a meta-device copy, :func:`router_skip_modules`), transformers'
    default skips and ``llm_int8_skip_modules`` in its ``llm_int8_skip_modules``. The 4-bit compute dtype defaults to
    ``dtype`` when that is not ``auto`` (else bitsandbytes' default, float32).
    """
    opts = check_loading_options(
        dtype=dtype,
        device_map=device_map,
        attn_implementation=attn_implementation,
        load_in_4bit=load_in_4bit,
        load_in_8bit=load_in_8bit,
        bnb_4bit_compute_dtype=bnb_4bit_compute_dtype,
        bnb_4bit_quant_type=bnb_4bit_quant_type,
        llm_int8_skip_modules=llm_int8_skip_modules,
        quantization_config=quantization_config,
        model_name_or_path=model_name_or_path,
        prefix=prefix,
    )
    kwargs: dict[str, Any] = {"dtype": opts["dtype"], "trust_remote_code": bool(trust_remote_code)}
    if opts["device_map"] is not None:
        kwargs["device_map"] = opts["device_map"]
    if opts["attn_implementation"] is not None:
        kwargs["attn_implementation"] = opts["attn_implementation"]
    if revision:
        kwargs["revision"] = revision
    if load_in_4bit or load_in_8bit:
        routers, defaults, meta_model = _inspect_checkpoint(model_name_or_path, revision, trust_remote_code)
        skip = list(dict.fromkeys([*defaults, *routers, *(llm_int8_skip_modules or [])]))
        share = quantizable_share(meta_model, skip) if meta_model is not None else 1.0
        if share < 0.5:
            half = opts["dtype"] in (torch.bfloat16, torch.float16)
            warnings.warn(
                f"roma_peft: bitsandbytes quantizes nn.Linear layers only, {100 * share:.0f}% of the parameters of "
                f"{model_name_or_path!r}; the rest (fused MoE experts, embeddings) stays in "
                + (f"{opts['dtype']}" if opts["dtype"] != "auto" else "the checkpoint's dtype")
                + ", so the memory saved is small"
                + ("." if half else " (load with dtype bfloat16 to halve it)."),
                stacklevel=2,
            )
        compute = opts["bnb_4bit_compute_dtype"]
        if compute is None and isinstance(opts["dtype"], torch.dtype):
            compute = opts["dtype"]
        kwargs["quantization_config"] = _bnb_config(
            load_in_4bit, load_in_8bit, compute, bnb_4bit_quant_type, bnb_4bit_use_double_quant, skip
        )
    elif quantization_config is not None:
        if _is_bnb_config(quantization_config) and not isinstance(quantization_config, dict):
            routers, defaults = router_skip_modules(
                model_name_or_path, revision=revision, trust_remote_code=trust_remote_code
            )
            given = list(getattr(quantization_config, "llm_int8_skip_modules", None) or defaults)
            quantization_config.llm_int8_skip_modules = list(
                dict.fromkeys([*given, *routers, *(llm_int8_skip_modules or [])])
            )
        kwargs["quantization_config"] = quantization_config
    return kwargs


def load_model_and_tokenizer(
    model_name_or_path: str,
    *,
    tokenizer_name_or_path: str | None = None,
    dtype: Any = "auto",
    device_map: Any = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    bnb_4bit_compute_dtype: Any = None,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_use_double_quant: bool = False,
    llm_int8_skip_modules: Sequence[str] | None = None,
    quantization_config: Any = None,
    model_kwargs: dict | None = None,
    tokenizer_kwargs: dict | None = None,
    prefix: str = "",
):
    """Load a causal-LM MoE base model and its tokenizer for RoMA; returns ``(model, tokenizer)``.

    Args:
        model_name_or_path: Hub name or local directory.
        tokenizer_name_or_path: Default: the model's.
        dtype: ``"auto"`` (the checkpoint's dtype), ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``,
            ``"float32"``/``"fp32"`` or a torch dtype. RoMA's router deltas are float32 whatever this is.
        device_map: ``None`` (CPU), ``"auto"`` (spread over every GPU, for models larger than one), ``"cpu"``,
            ``"cuda"``, ``"cuda:1"``, an index, or a dict / JSON string ``{module: device}``. A device this machine
            does not have is refused before loading.
        attn_implementation: ``"eager"``, ``"sdpa"``, ``"flash_attention_2"`` ... (default: transformers' choice).
        revision: Branch, tag or commit of a hub checkpoint (model, config and, unless another tokenizer is named,
            tokenizer).
        trust_remote_code: Run the checkpoint's own modelling code (DeepSeekMoE, ...).
        load_in_4bit / load_in_8bit: Quantize the frozen base with bitsandbytes; the routers and transformers'
            default skips stay unquantized (see the module docstring). Needs ``pip install bitsandbytes`` and, for
            most bitsandbytes builds, a GPU.
        bnb_4bit_compute_dtype: Compute dtype of 4-bit layers (default: ``dtype`` unless ``"auto"``).
        bnb_4bit_quant_type: ``"nf4"`` (default) or ``"fp4"``.
        bnb_4bit_use_double_quant: Also quantize the quantization constants.
        llm_int8_skip_modules: More module names to keep unquantized (added to the routers and default skips).
        quantization_config: A ready ``BitsAndBytesConfig`` (or another quantizer's config) instead of the flags;
            a bitsandbytes one gets the routers added to its ``llm_int8_skip_modules``.
        model_kwargs / tokenizer_kwargs: Passed on to ``from_pretrained`` (``max_memory``, ``offload_folder`` ...).
        prefix: How errors name the options (``"--"`` on the command line).

    The tokenizer gets ``pad_token = eos_token`` when it has no pad token. A quantized model whose routers were
    quantized anyway raises :class:`RouterNotTrainableError`.
    """
    _check_path("tokenizer_name_or_path", tokenizer_name_or_path, prefix)
    kwargs = model_loading_kwargs(
        model_name_or_path,
        dtype=dtype,
        device_map=device_map,
        attn_implementation=attn_implementation,
        revision=revision,
        trust_remote_code=trust_remote_code,
        load_in_4bit=load_in_4bit,
        load_in_8bit=load_in_8bit,
        bnb_4bit_compute_dtype=bnb_4bit_compute_dtype,
        bnb_4bit_quant_type=bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
        llm_int8_skip_modules=llm_int8_skip_modules,
        quantization_config=quantization_config,
        prefix=prefix,
    )
    kwargs.update(model_kwargs or {})
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, **kwargs)
    if kwargs.get("quantization_config") is not None or getattr(model, "is_quantized", False):
        check_routers_unquantized(model)
    tok_kwargs: dict[str, Any] = {"trust_remote_code": bool(trust_remote_code)}
    if revision and not tokenizer_name_or_path:
        tok_kwargs["revision"] = revision
    tok_kwargs.update(tokenizer_kwargs or {})
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path or model_name_or_path, **tok_kwargs)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@contextmanager
def quiet_peft_wrapping() -> Iterator[None]:
    """Silence one upstream deprecation while PEFT wraps a model (``get_peft_model`` / ``PeftModel.from_pretrained``).

    PEFT 0.21 reads ``model.is_gradient_checkpointing``, which transformers 5 deprecated with a ``FutureWarning`` on
    every wrap; there is nothing for a user to change. Only that message, only inside this block: every other warning
    still reaches the user.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
