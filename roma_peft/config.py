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


def check_adapter_dir(path: str) -> None:
    """Fail early, with a clear message, on a local directory that is not a loadable RoMA adapter.

    Checks that ``adapter_config.json`` is valid JSON, that the weights are in ``adapter_model.safetensors`` (a
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
    try:
        with open(config_file) as f:
            json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_file} is corrupt (not valid JSON: {exc}). Re-save the adapter.") from exc
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
