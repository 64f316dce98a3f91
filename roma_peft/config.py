"""``RomaConfig``, the PEFT config of a RoMA adapter, and the checks of a saved ``adapter_config.json``.

The config holds only what rebuilds the adapted model (which routers, which layers, whether the router bias is
adapted), so ``adapter_config.json`` alone reproduces a saved adapter's routing changes; how the routers are trained
lives in :class:`~roma_peft.trainer.RomaTrainingArguments` and :class:`~roma_peft.neighbours.NeighbourhoodConfig`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from safetensors import safe_open

from .constants import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_TYPE_NAME,
    PICKLED_WEIGHTS_NAME,
    roma_peft_type,
)
from .routers import LAYER_SELECTIONS, LayerSelection

__all__ = [
    "RomaConfig",
    "InvalidAdapterConfigError",
    "validate_config_fields",
    "read_adapter_config",
    "check_adapter_dir",
    "check_adapter_weights",
]


class InvalidAdapterConfigError(ValueError):
    """A RoMA config field (in ``adapter_config.json`` or passed to ``RomaConfig``) has the wrong type or value."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str_list(value) -> bool:
    return isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value)


def _is_shape(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_int(v) and v > 0 for v in value)


#: field -> (check, what it must be). Every field of RomaConfig that roma_peft reads; checked on construction, so a
#: config built by PEFT from a hand-edited adapter_config.json fails here, naming the field, not deep inside loading.
_FIELD_CHECKS = {
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "revision": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "target_modules": (
        lambda v: v is None or isinstance(v, str) or _is_str_list(v),
        "null, a regex string or a list of module names",
    ),
    "exclude_modules": (
        lambda v: v is None or isinstance(v, str) or _is_str_list(v),
        "null, a regex string or a list of module names",
    ),
    "layer_selection": (lambda v: isinstance(v, str), f"one of {LAYER_SELECTIONS}"),
    "num_layers": (_is_int, "a positive integer"),
    "moe_layer_indices": (
        lambda v: v is None or (isinstance(v, (list, tuple)) and all(_is_int(i) for i in v)),
        "null or a list of integers",
    ),
    "train_router_bias": (lambda v: isinstance(v, bool), "true or false"),
    "init_weights": (lambda v: isinstance(v, bool), "true or false"),
    "resolved_routers": (
        lambda v: v is None or (isinstance(v, dict) and all(isinstance(k, str) and _is_shape(s) for k, s in v.items())),
        'null or an object mapping router module paths to weight shapes, e.g. {"model.layers.5.mlp.gate": [64, 2048]}',
    ),
    "resolved_bias_routers": (lambda v: v is None or _is_str_list(v), "null or a list of router module paths"),
    "num_moe_layers": (lambda v: v is None or (_is_int(v) and v > 0), "null or a positive integer"),
    "base_model_type": (lambda v: v is None or isinstance(v, str), "null or a string (the base model's model_type)"),
    "router_family": (lambda v: v is None or isinstance(v, str), "null or a string (a roma_peft router family)"),
}


def validate_config_fields(values: dict, source: str = "RomaConfig") -> None:
    """Raise :class:`InvalidAdapterConfigError` naming ``source`` and the first field of the wrong type."""
    for name, (ok, expected) in _FIELD_CHECKS.items():
        if name in values and not ok(values[name]):
            value = values[name]
            hint = (
                " Fix that field in the file or re-save the adapter with save_pretrained()."
                if source != "RomaConfig"
                else ""
            )
            raise InvalidAdapterConfigError(
                f"{source}: field {name!r} must be {expected}, got {value!r} ({type(value).__name__}).{hint}"
            )
    routers, bias = values.get("resolved_routers"), values.get("resolved_bias_routers")
    if bias and routers is not None:
        unknown = [name for name in bias if name not in routers]
        if unknown:
            raise InvalidAdapterConfigError(
                f"{source}: field 'resolved_bias_routers' names {unknown[0]!r}, which is not in 'resolved_routers' "
                f"({list(routers)[:4]}). Fix the file or re-save the adapter with save_pretrained()."
            )


def read_adapter_config(config_file: str) -> dict:
    """Read a local ``adapter_config.json`` and check it: valid JSON, an object, with a ``peft_type``; for a RoMA
    adapter also the type of every field. Every error names the file and the field."""
    try:
        with open(config_file, encoding="utf-8") as f:
            values = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{config_file} is corrupt (not valid JSON: {exc}). Re-save the adapter with save_pretrained()."
        ) from exc
    if not isinstance(values, dict):
        raise ValueError(
            f"{config_file} is not an adapter config: it holds a JSON {type(values).__name__}, not an object with "
            "fields such as 'peft_type'. Pass the directory that save_pretrained() wrote, or re-save the adapter."
        )
    peft_type = values.get("peft_type")
    if peft_type is None:
        raise ValueError(
            f"{config_file} has no 'peft_type' field, so PEFT cannot tell which method made it. A RoMA adapter has "
            '"peft_type": "ROMA"; re-save the adapter with save_pretrained().'
        )
    if not isinstance(peft_type, str):
        raise ValueError(f"{config_file}: field 'peft_type' must be a string such as \"ROMA\", got {peft_type!r}.")
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(
            f"{config_file}: field 'peft_type' is {peft_type!r}, which is not a PEFT method known here (a RoMA "
            'adapter has "ROMA" and needs `import roma_peft`; another method needs the package that provides it).'
        )
    if peft_type == PEFT_TYPE_NAME:
        validate_config_fields(values, source=config_file)
    return values


def _config_file(path: str) -> str:
    """``path/adapter_config.json``, or a ``FileNotFoundError`` listing what the directory holds instead."""
    config_file = os.path.join(path, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(config_file):
        files = sorted(os.listdir(path))
        raise FileNotFoundError(
            f"{path!r} is not a PEFT adapter directory: it has no {ADAPTER_CONFIG_NAME} (files: {files[:10]}). Pass the "
            "directory that save_pretrained() wrote."
        )
    return config_file


def check_adapter_weights(path: str) -> None:
    """Check that a local adapter directory holds readable ``adapter_model.safetensors`` weights.

    A pickled ``adapter_model.bin`` is refused (RoMA adapters are loaded from safetensors only, never unpickled), and
    the safetensors header must be readable, so a truncated download fails here and not halfway through loading.

    Raises:
        FileNotFoundError: no weights file.
        ValueError: only pickled weights, or a corrupt safetensors file.
    """
    weights = os.path.join(path, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, PICKLED_WEIGHTS_NAME)):
            raise ValueError(
                f"{path!r} holds {PICKLED_WEIGHTS_NAME} but no {ADAPTER_WEIGHTS_NAME}. RoMA adapters are loaded from "
                "safetensors only; pickled weights are never unpickled. Convert it in a trusted environment "
                "(safetensors.torch.save_file(torch.load(..., weights_only=True), ...)) or re-save with "
                "save_pretrained()."
            )
        files = sorted(os.listdir(path))
        raise FileNotFoundError(
            f"{path!r} has {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME} (files: {files[:10]}): the adapter "
            "weights are missing. Re-save the adapter with save_pretrained()."
        )
    try:
        with safe_open(weights, framework="pt") as f:
            list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ValueError(
            f"{weights} is corrupt or truncated and cannot be read ({type(exc).__name__}: {exc}). Re-save the adapter."
        ) from exc


def check_adapter_dir(path: str) -> dict:
    """Fail early, with a clear message, on a local directory that is not a loadable RoMA adapter.

    Checks ``adapter_config.json`` (:func:`read_adapter_config`), then the weights (:func:`check_adapter_weights`).

    Args:
        path (`str`): the directory ``save_pretrained()`` wrote.

    Returns:
        `dict`: the checked contents of ``adapter_config.json``.
    """
    values = read_adapter_config(_config_file(path))
    check_adapter_weights(path)
    return values


@dataclass
class RomaConfig(PeftConfig):
    """Configuration of a RoMA router-delta adapter.

    Each selected router gets a trainable float32 delta ``Δ`` added to its weight at call time (``W + Δ``), initialised
    to zero so that the wrapped model is bit-identical to the base model until trained. Every field is checked when the
    config is built (also when PEFT builds it from a hand-edited ``adapter_config.json``).

    Args:
        target_modules (`list[str]` or `str`, *optional*):
            Restrict the candidate routers to these module names (exact names, suffixes, or one regex string).
            Default: every router the registry (:mod:`roma_peft.routers`) finds.
        exclude_modules (`list[str]` or `str`, *optional*):
            Routers to leave out (same matching as ``target_modules``).
        layer_selection (`Literal["last", "first", "middle", "all", "indices"]`, defaults to `"last"`):
            Which MoE layers to tune; only MoE layers count. Setting ``moe_layer_indices`` alone implies ``"indices"``.
        num_layers (`int`, defaults to 5):
            How many MoE layers ``last``/``first``/``middle`` select (the paper: the last 5).
        moe_layer_indices (`list[int]`, *optional*):
            MoE-layer positions for ``"indices"`` (0-based among MoE layers, negative from the end).
        train_router_bias (`bool`, defaults to `True`):
            Also adapt a router's own bias where it has one (GPT-OSS); selection-only buffers are never trained.
        init_weights (`bool`, defaults to `True`):
            Zero deltas (the adapted model equals the base model); `False` gives small random deltas, for tests.
        resolved_routers, resolved_bias_routers, num_moe_layers, base_model_type, router_family:
            Filled in when the adapter is created (the exact router paths and shapes, the biased routers, the MoE
            layer count, the model type and router family) and checked against the base model on load.

    Raises:
        InvalidAdapterConfigError: a field has the wrong type (naming the field, and the file when read from one).
        ValueError: an unknown ``layer_selection``, ``"indices"`` without indices, ``num_layers < 1``, or a PEFT field
            RoMA does not use (``layers_to_transform``, ``layers_pattern``, ``modules_to_save``).

    Example::

        import roma_peft  # registers the ROMA method with PEFT
        from peft import get_peft_model

        model = get_peft_model(base_model, roma_peft.RomaConfig())  # last 5 MoE layers, routers found automatically
        model.print_trainable_parameters()
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Restrict the candidate routers to modules matching these names (PEFT semantics: exact names or "
                "suffixes, or one regex string). Default None: every router the registry finds "
                "(roma_peft.routers). Layer selection is applied to the routers that remain."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Routers to exclude (PEFT semantics: names, suffixes or a regex)."}
    )
    layer_selection: LayerSelection = field(
        default="last",
        metadata={
            "help": (
                f"Which MoE layers to tune, one of {LAYER_SELECTIONS}. Only MoE layers count; dense layers have no "
                "router. The paper's default is the last 5 MoE layers (its Figure 6 / Table 3 ablation)."
            )
        },
    )
    num_layers: int = field(
        default=5, metadata={"help": "How many MoE layers `last`, `first` or `middle` selects (paper: 5)."}
    )
    moe_layer_indices: list[int] | None = field(
        default=None,
        metadata={
            "help": (
                "Explicit MoE-layer positions (0-based among MoE layers, negative from the end) for "
                "layer_selection='indices'. Setting it alone implies 'indices'."
            )
        },
    )
    train_router_bias: bool = field(
        default=True,
        metadata={
            "help": (
                "Also adapt a router's own bias where it has one (GPT-OSS). Selection-only buffers such as "
                "`e_score_correction_bias` are never trained."
            )
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "True: deltas start at zero (the adapted model equals the base model). False: small random deltas, "
                "useful only for tests."
            )
        },
    )
    resolved_routers: dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": (
                "Filled in automatically when the adapter is created: the exact module paths that hold the adapted "
                "router matrices and their (num_experts, hidden) shapes. On load it is the source of truth and is "
                "checked against the base model (a different layer count or shape raises a clear error)."
            )
        },
    )
    resolved_bias_routers: list[str] | None = field(
        default=None, metadata={"help": "Filled in automatically: the routers whose bias is adapted too."}
    )
    num_moe_layers: int | None = field(
        default=None,
        metadata={"help": "Filled in automatically: how many MoE layers the base model had (checked on load)."},
    )
    base_model_type: str | None = field(
        default=None,
        metadata={
            "help": (
                "Filled in automatically: the base model's `config.model_type`. Loading onto a model of another type "
                "warns (equal router shapes do not mean equal routing: e.g. softmax vs sigmoid scoring)."
            )
        },
    )
    router_family: str | None = field(
        default=None,
        metadata={
            "help": (
                "Filled in automatically: the roma_peft router family of the adapted routers (roma_peft.routers, "
                "e.g. 'softmax' or 'sigmoid'). Loading onto routers of another family warns."
            )
        },
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "Not used by RoMA (use layer_selection/moe_layer_indices); kept for PEFT compatibility."},
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Not used by RoMA; kept for PEFT compatibility."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Not supported by RoMA (only router deltas are saved); must stay None."}
    )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load a saved config (PEFT semantics); a local directory is also checked to be a loadable RoMA adapter.

        ``PeftModel.from_pretrained``, ``PeftModel.load_adapter`` and ``AutoPeftModel*.from_pretrained`` all come
        through here, so a missing/corrupt adapter file or a pickled ``adapter_model.bin`` fails before any weight is
        read. ``adapter_config.json`` is read once, by :meth:`from_json_file`.
        """
        path = (
            os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else str(pretrained_model_name_or_path)
        )
        local = os.path.isdir(path)
        if local:
            _config_file(path)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if local:
            check_adapter_weights(path)
        return config

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs) -> dict:
        """PEFT's reader of ``adapter_config.json`` with every check of :func:`read_adapter_config` (each error names
        the file and the field); a ``runtime_config`` entry is dropped with a warning, as PEFT does."""
        values = read_adapter_config(path_json_file)
        if "runtime_config" in values:
            warnings.warn(
                "The configuration file contains a `runtime_config` key. This is ignored. Runtime configurations are "
                "only valid at runtime.",
                stacklevel=2,
            )
            del values["runtime_config"]
        return values

    def __post_init__(self):
        validate_config_fields(vars(self))
        super().__post_init__()
        self.peft_type = roma_peft_type()
        if self.moe_layer_indices is not None and self.layer_selection == "last":
            self.layer_selection = "indices"
        if self.layer_selection not in LAYER_SELECTIONS:
            raise ValueError(f"layer_selection must be one of {LAYER_SELECTIONS}, got {self.layer_selection!r}.")
        if self.layer_selection == "indices" and not self.moe_layer_indices:
            raise ValueError("layer_selection='indices' needs moe_layer_indices, e.g. moe_layer_indices=[-2, -1].")
        if self.layer_selection in ("last", "first", "middle") and (
            not isinstance(self.num_layers, int) or self.num_layers < 1
        ):
            raise ValueError(f"num_layers must be a positive integer, got {self.num_layers!r}.")
        if self.layers_to_transform is not None or self.layers_pattern is not None:
            raise ValueError(
                "RomaConfig does not use layers_to_transform/layers_pattern (they would be silently ignored): select "
                "layers with layer_selection/num_layers or moe_layer_indices, which count MoE layers only."
            )
        if self.modules_to_save:
            raise ValueError(
                "RomaConfig does not support modules_to_save: a RoMA adapter holds only router deltas. Train other "
                "modules with another PEFT method."
            )
        if isinstance(self.target_modules, list):
            self.target_modules = list(self.target_modules)
