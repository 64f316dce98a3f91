"""``RomaConfig``: which routers a RoMA adapter changes.

The split follows PEFT and TRL: this config holds only what is needed to *rebuild the adapted model* (which routers,
which layers, whether the router bias is adapted), so that ``adapter_config.json`` alone reproduces the routing changes
of a saved adapter. Everything about *how the routers are trained* (lambda, neighbours, token position, regulariser)
lives in :class:`roma_peft.trainer.RomaTrainingArguments` and :class:`roma_peft.neighbours.NeighbourhoodConfig`, the
way LoRA's rank lives in ``LoraConfig`` but the learning rate in ``TrainingArguments``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from .routers import LAYER_SELECTIONS

ROMA_PEFT_TYPE_NAME = "ROMA"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"


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
    "target_modules": (lambda v: v is None or isinstance(v, str) or _is_str_list(v),
                       "null, a regex string or a list of module names"),
    "exclude_modules": (lambda v: v is None or isinstance(v, str) or _is_str_list(v),
                        "null, a regex string or a list of module names"),
    "layer_selection": (lambda v: isinstance(v, str), f"one of {LAYER_SELECTIONS}"),
    "num_layers": (_is_int, "a positive integer"),
    "moe_layer_indices": (lambda v: v is None or (isinstance(v, (list, tuple)) and all(_is_int(i) for i in v)),
                          "null or a list of integers"),
    "train_router_bias": (lambda v: isinstance(v, bool), "true or false"),
    "init_weights": (lambda v: isinstance(v, bool), "true or false"),
    "resolved_routers": (lambda v: v is None or (isinstance(v, dict) and all(
        isinstance(k, str) and _is_shape(s) for k, s in v.items())),
        "null or an object mapping router module paths to weight shapes, e.g. "
        "{\"model.layers.5.mlp.gate\": [64, 2048]}"),
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
            hint = (" Fix that field in the file or re-save the adapter with save_pretrained()."
                    if source != "RomaConfig" else "")
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
            "\"peft_type\": \"ROMA\"; re-save the adapter with save_pretrained()."
        )
    if not isinstance(peft_type, str):
        raise ValueError(f"{config_file}: field 'peft_type' must be a string such as \"ROMA\", got {peft_type!r}.")
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(
            f"{config_file}: field 'peft_type' is {peft_type!r}, which is not a PEFT method known here (a RoMA "
            "adapter has \"ROMA\" and needs `import roma_peft`; another method needs the package that provides it)."
        )
    if peft_type == ROMA_PEFT_TYPE_NAME:
        validate_config_fields(values, source=config_file)
    return values


def install_config_checks() -> None:
    """Make PEFT's own config reading fail clearly on a bad ``adapter_config.json`` (idempotent).

    ``PeftModel.from_pretrained``/``load_adapter`` first call ``PeftConfig._get_peft_type``, which indexes the raw JSON
    before any RoMA code runs, and transformers' ``load_adapter`` calls ``PeftConfig.from_pretrained``; both read the
    file with ``PeftConfigMixin.from_json_file``. Wrapped here:

    * ``from_json_file``: invalid JSON raises ``json.JSONDecodeError`` (same type as before) whose message names the
      file; a JSON value that is not an object raises ``ValueError``; a ``"peft_type": "ROMA"`` config has every field
      type-checked (:func:`validate_config_fields`), naming the file and the field. Other methods' valid configs are
      returned unchanged.
    * ``_get_peft_type``: a missing or unknown ``peft_type`` raises ``ValueError`` naming the file (was
      ``KeyError: 'peft_type'``).
    """
    from peft.config import PeftConfigMixin

    if getattr(PeftConfigMixin, "_roma_config_checks", False):
        return
    original_read = PeftConfigMixin.__dict__["from_json_file"].__func__
    original_type = PeftConfigMixin.__dict__["_get_peft_type"].__func__

    def from_json_file(cls, path_json_file: str, **kwargs):
        try:
            values = original_read(cls, path_json_file, **kwargs)
        except json.JSONDecodeError as exc:
            raise json.JSONDecodeError(
                f"{path_json_file} is corrupt (not valid JSON: {exc.msg}). Re-save the adapter with "
                "save_pretrained(). Position", exc.doc, exc.pos
            ) from exc
        if not isinstance(values, dict):
            raise ValueError(
                f"{path_json_file} is not an adapter config: it holds a JSON {type(values).__name__}, not an object "
                "with fields such as 'peft_type'. Re-save the adapter with save_pretrained()."
            )
        if values.get("peft_type") == ROMA_PEFT_TYPE_NAME:
            validate_config_fields(values, source=str(path_json_file))
        return values

    def _get_peft_type(cls, model_id: str, **hf_hub_download_kwargs):
        subfolder = hf_hub_download_kwargs.get("subfolder", None)
        path = os.path.join(model_id, subfolder) if subfolder is not None else model_id
        config_file = os.path.join(str(path), ADAPTER_CONFIG_NAME)
        if os.path.isfile(config_file):
            read_adapter_config(config_file)  # missing/unknown peft_type, bad RoMA fields: named, before PEFT indexes
        try:
            return original_type(cls, model_id, **hf_hub_download_kwargs)
        except KeyError as exc:
            if exc.args != ("peft_type",):
                raise
            raise ValueError(
                f"The {ADAPTER_CONFIG_NAME} of {model_id!r} has no 'peft_type' field, so PEFT cannot tell which "
                "method made it. A RoMA adapter has \"peft_type\": \"ROMA\"; re-save it with save_pretrained()."
            ) from None

    from_json_file.__doc__ = original_read.__doc__
    _get_peft_type.__doc__ = original_type.__doc__
    PeftConfigMixin.from_json_file = classmethod(from_json_file)
    PeftConfigMixin._get_peft_type = classmethod(_get_peft_type)
    PeftConfigMixin._roma_config_checks = True


def check_adapter_dir(path: str) -> None:
    """Fail early, with a clear message, on a local directory that is not a loadable RoMA adapter.

    Checks that ``adapter_config.json`` is a valid config (JSON object, ``peft_type``, field types; see
    :func:`read_adapter_config`), that the weights are in ``adapter_model.safetensors`` (a
    pickled ``adapter_model.bin`` is refused: RoMA adapters are loaded from safetensors only, never unpickled) and
    that the safetensors header is readable.
    """
    files = sorted(os.listdir(path))
    config_file = os.path.join(path, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"{path!r} is not a PEFT adapter directory: it has no {ADAPTER_CONFIG_NAME} (files: {files[:10]}). Pass the "
            "directory that save_pretrained() wrote."
        )
    read_adapter_config(config_file)
    weights = os.path.join(path, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, PICKLED_WEIGHTS_NAME)):
            raise ValueError(
                f"{path!r} holds {PICKLED_WEIGHTS_NAME} but no {ADAPTER_WEIGHTS_NAME}. RoMA adapters are loaded from "
                "safetensors only; pickled weights are never unpickled. Convert it in a trusted environment "
                "(safetensors.torch.save_file(torch.load(..., weights_only=True), ...)) or re-save with "
                "save_pretrained()."
            )
        raise FileNotFoundError(
            f"{path!r} has {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME} (files: {files[:10]}): the adapter "
            "weights are missing. Re-save the adapter with save_pretrained()."
        )
    from safetensors import safe_open

    try:
        with safe_open(weights, framework="pt") as f:
            list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ValueError(
            f"{weights} is corrupt or truncated and cannot be read ({type(exc).__name__}: {exc}). Re-save the adapter."
        ) from exc


@dataclass
class RomaConfig(PeftConfig):
    """Configuration of a RoMA router-delta adapter.

    Each selected router gets a trainable float32 delta ``Δ`` added to its weight at call time (``W + Δ``), initialised
    to zero so that the wrapped model is bit-identical to the base model until trained.

    Example::

        import roma_peft  # registers the ROMA method with PEFT
        from peft import get_peft_model

        model = get_peft_model(base_model, roma_peft.RomaConfig())  # last 5 MoE layers, routers found automatically
        model.print_trainable_parameters()
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Restrict the candidate routers to modules matching these names (PEFT semantics: exact names or "
                "suffixes, or one regex string). Default None: every router the registry finds "
                "(roma_peft.routers). Layer selection is applied to the routers that remain."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Routers to exclude (PEFT semantics: names, suffixes or a regex)."}
    )
    layer_selection: str = field(
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
    moe_layer_indices: Optional[list[int]] = field(
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
    resolved_routers: Optional[dict[str, list[int]]] = field(
        default=None,
        metadata={
            "help": (
                "Filled in automatically when the adapter is created: the exact module paths that hold the adapted "
                "router matrices and their (num_experts, hidden) shapes. On load it is the source of truth and is "
                "checked against the base model (a different layer count or shape raises a clear error)."
            )
        },
    )
    resolved_bias_routers: Optional[list[str]] = field(
        default=None, metadata={"help": "Filled in automatically: the routers whose bias is adapted too."}
    )
    num_moe_layers: Optional[int] = field(
        default=None,
        metadata={"help": "Filled in automatically: how many MoE layers the base model had (checked on load)."},
    )
    base_model_type: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Filled in automatically: the base model's `config.model_type`. Loading onto a model of another type "
                "warns (equal router shapes do not mean equal routing: e.g. softmax vs sigmoid scoring)."
            )
        },
    )
    router_family: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Filled in automatically: the roma_peft router family of the adapted routers (roma_peft.routers, "
                "e.g. 'softmax' or 'sigmoid'). Loading onto routers of another family warns."
            )
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={"help": "Not used by RoMA (use layer_selection/moe_layer_indices); kept for PEFT compatibility."},
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Not used by RoMA; kept for PEFT compatibility."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Not supported by RoMA (only router deltas are saved); must stay None."}
    )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load a saved config (PEFT semantics); a local directory is first checked to be a loadable RoMA adapter.

        ``PeftModel.from_pretrained``, ``PeftModel.load_adapter`` and ``AutoPeftModel*.from_pretrained`` all come
        through here, so a missing/corrupt adapter file or a pickled ``adapter_model.bin`` fails before any weight is
        read.
        """
        path = (
            os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else str(pretrained_model_name_or_path)
        )
        if os.path.isdir(path):
            check_adapter_dir(path)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    def __post_init__(self):
        validate_config_fields(vars(self))
        super().__post_init__()
        from .registration import roma_peft_type

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
