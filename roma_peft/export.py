"""Export paths for tools that never import roma_peft, and the RoMA model card.

* :func:`export_merged`: ``merge_and_unload()`` + ``save_pretrained``, a stock checkpoint with ``W + Δ`` in its routers.
* :func:`export_to_lora`: a standard PEFT LoRA adapter that reproduces the deltas exactly (``B @ A = Δ``).
* :func:`update_model_card`: the PEFT metadata and the RoMA section of ``README.md`` (what the adapter is, how to
  load it with and without roma_peft, the tuned routers, the training settings and metrics, the citation).

Why the LoRA export is exact and which PEFT pitfalls it avoids: docs/export.md and docs/design.md.
"""

from __future__ import annotations

import os

import torch
from huggingface_hub import ModelCard, ModelCardData
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from .constants import CURVES_FILE, HEATMAPS_FILE, is_roma_config
from .layer import RomaLayer
from .routers import _layer_index

__all__ = ["export_to_lora", "export_merged", "update_model_card", "LoraExportError", "TRAINING_INFO_ATTRIBUTE"]

_CARD_BEGIN = "<!-- roma_peft:begin -->"
_CARD_END = "<!-- roma_peft:end -->"


class LoraExportError(ValueError):
    """Raised when a RoMA adapter cannot be expressed exactly as a LoRA adapter."""


# ---------------------------------------------------------------------------------------------------------- helpers
def _roma_layers(peft_model: nn.Module, adapter_name: str) -> dict:
    layers = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, RomaLayer) and adapter_name in module.roma_delta:
            layers[name.replace("base_model.model.", "", 1) if name.startswith("base_model.model.") else name] = module
    return layers


def _prepare_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(
            f"{out_dir!r} exists and is not empty ({len(os.listdir(out_dir))} entries). Refusing to overwrite files "
            "there; choose a new directory or pass overwrite=True."
        )
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir!r} exists and is not a directory.")
    os.makedirs(out_dir, exist_ok=True)


# ---------------------------------------------------------------------------------------------------------- LoRA
def export_to_lora(peft_model: nn.Module, out_dir: str, adapter_name: str = "default", overwrite: bool = False) -> str:
    """Write RoMA adapter ``adapter_name`` of ``peft_model`` as a standard PEFT LoRA adapter in ``out_dir``.

    The result loads with stock PEFT (``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``, transformers'
    ``model.load_adapter``, ``lm_eval ... peft=<dir>``) without roma_peft, and reproduces the RoMA model's logits
    exactly in float32. Routers with different expert counts are handled with ``r = max(E)``: ``lora_A`` is ``Δ``
    padded with zero rows and ``lora_B = [I_E | 0]``, still an exact product.

    Args:
        peft_model: A ``PeftModel`` (or a model with RoMA layers injected).
        out_dir: Output directory; must be empty or absent unless ``overwrite=True``.
        adapter_name: Which RoMA adapter to export.
        overwrite: Allow writing into a non-empty directory (files with the same names are replaced).

    Returns:
        ``out_dir``.

    Raises:
        LoraExportError: the adapter has a non-zero router bias delta (not representable by LoRA), or no such adapter.
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is False.
    """
    peft_config = getattr(peft_model, "peft_config", {}).get(adapter_name)
    layers = _roma_layers(peft_model, adapter_name)
    if peft_config is None or not is_roma_config(peft_config) or not layers:
        available = [k for k, c in getattr(peft_model, "peft_config", {}).items() if is_roma_config(c)]
        raise LoraExportError(f"No RoMA adapter named {adapter_name!r} in this model (RoMA adapters: {available}).")
    for name, layer in layers.items():
        bias = layer.roma_bias_delta[adapter_name] if adapter_name in layer.roma_bias_delta else None
        if bias is not None and bool(torch.any(bias != 0)):
            raise LoraExportError(
                f"Router {name!r} has a non-zero bias delta in adapter {adapter_name!r}. A router bias delta is not "
                "representable as a LoRA adapter (LoRA only adds a low-rank matrix to the weight). Export a merged "
                "stock checkpoint instead (roma_peft.export.export_merged / merge_and_unload + save_pretrained), or "
                "train with RomaConfig(train_router_bias=False)."
            )
    rank = max(int(layer.roma_delta[adapter_name].shape[0]) for layer in layers.values())
    tensors = {}
    target_parameters = []
    for name, layer in layers.items():
        delta = layer.roma_delta[adapter_name].detach().to("cpu", torch.float32)
        experts, hidden = delta.shape
        lora_a = torch.zeros(rank, hidden, dtype=torch.float32)
        lora_a[:experts] = delta
        lora_b = torch.zeros(experts, rank, dtype=torch.float32)
        lora_b[:, :experts] = torch.eye(experts, dtype=torch.float32)
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.contiguous()
        target_parameters.append(f"{name}.weight")

    _prepare_dir(out_dir, overwrite)
    lora_config = LoraConfig(
        target_modules=[],
        target_parameters=target_parameters,
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        bias="none",
        task_type=peft_config.task_type,
        base_model_name_or_path=peft_config.base_model_name_or_path,
        inference_mode=True,
    )
    lora_config.save_pretrained(out_dir)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    base = peft_config.base_model_name_or_path
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(
            "---\n"
            + (f"base_model: {base}\n" if base else "")
            + "library_name: peft\ntags:\n- peft\n- lora\n- roma\n"
            + (f"- base_model:adapter:{base}\n" if base else "")
            + "---\n\n"
            "# LoRA export of a RoMA router adapter\n\n"
            "This is a standard PEFT LoRA adapter (no roma_peft needed to load it) that reproduces a RoMA (Routing "
            "Manifold Alignment) adapter exactly: each router weight is targeted by its full parameter name "
            f"(`target_parameters`) with `r = lora_alpha = {rank}`, `lora_B = I` and `lora_A = Δ`.\n\n"
            f"- Base model: `{base}`\n"
            f"- Routers ({len(target_parameters)}): " + ", ".join(f"`{p}`" for p in target_parameters) + "\n"
        )
    return out_dir


# ---------------------------------------------------------------------------------------------------------- merged
def export_merged(peft_model: nn.Module, out_dir: str, overwrite: bool = False, **save_kwargs) -> nn.Module:
    """``merge_and_unload()`` + ``save_pretrained(out_dir)``: a full stock checkpoint with ``W + Δ`` in its routers.

    ``merge_and_unload`` works in place: ``peft_model`` is consumed (its base model now holds the merged weights).
    Tokenizers are not saved; save yours next to it.

    Args:
        peft_model (`PeftModel`): the model with the RoMA adapter(s) to merge.
        out_dir (`str`): output directory; must be empty or absent unless ``overwrite=True``.
        overwrite (`bool`): allow writing into a non-empty directory.
        **save_kwargs: passed on to ``save_pretrained`` (``safe_serialization``, ``max_shard_size`` ...).

    Returns:
        `PreTrainedModel`: the merged stock model that was saved.

    Raises:
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is False.
    """
    _prepare_dir(out_dir, overwrite)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out_dir, **save_kwargs)
    return merged


# ---------------------------------------------------------------------------------------------------------- card
PAPER_TITLE = "Routing Manifold Alignment Improves Generalization of Mixture-of-Experts LLMs"
PAPER_URL = "https://arxiv.org/abs/2511.07419"
CITATION = """@article{li2025roma,
  title   = {Routing Manifold Alignment Improves Generalization of Mixture-of-Experts LLMs},
  author  = {Li, Zhongyang and Li, Ziyue and Zhou, Tianyi},
  journal = {arXiv preprint arXiv:2511.07419},
  year    = {2025}
}"""
TRAINING_INFO_ATTRIBUTE = "_roma_training_info"  # set on the PeftModel by RomaTrainer; read by the save hooks


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "\\n")


def _value(value, code: bool = True) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v, code) for v in value) if value else "-"
    if value is None or value == "":
        return "-"
    text = _cell(value)
    return f"`{text}`" if isinstance(value, str) and code else text


def _table(rows: dict, header: str = "setting", code: bool = True) -> list[str]:
    lines = [f"| {header} | value |", "|---|---|"]
    lines += [f"| {_cell(name)} | {_value(value, code)} |" for name, value in rows.items()]
    return lines


def _card_section(
    peft_model: nn.Module, training: dict | None = None, adapter_id: str | None = None, directory: str | None = None
) -> str:
    configs = {n: c for n, c in getattr(peft_model, "peft_config", {}).items() if is_roma_config(c)}
    bases = [c.base_model_name_or_path for c in configs.values() if c.base_model_name_or_path]
    base = bases[0] if bases else None
    base_name = base or "<base model>"
    adapter = adapter_id or "path/to/this/adapter"
    lines = [_CARD_BEGIN, f"# RoMA router adapter for `{base_name}`", ""]
    lines.append(
        f"A **PEFT** adapter of type **ROMA** ([Routing Manifold Alignment]({PAPER_URL}), the `roma_peft` plugin). "
        "It changes only the **router (gate) weights** of the tuned Mixture-of-Experts layers of the base model: each "
        "tuned router computes with `W + Δ`, where `Δ` is a float32 delta stored here; experts, attention and "
        "embeddings are the base model's, untouched, and inference costs the same as the base model."
    )
    lines.append("")
    lines.append(
        "RoMA post-trains the routers with the task loss plus a manifold regulariser that pulls each sample's routing "
        "weights toward those of its *successful neighbours* (nearby samples in a task-embedding space that the base "
        "model answers correctly), so that similar tasks share expert choices."
    )
    lines += [
        "",
        "## How to load it",
        "",
        "With `roma_peft` (`pip install roma-peft`; the import registers the ROMA method with PEFT):",
        "",
        "```python",
        "import roma_peft  # registers the ROMA PEFT method",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_name}")',
        f'model = PeftModel.from_pretrained(base, "{adapter}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base_name}")',
        "```",
        "",
        "Without `roma_peft` (lm-eval, vLLM, plain transformers), export it once with roma_peft, exactly "
        "(see roma_peft's `docs/export.md`):",
        "",
        f"- a standard PEFT **LoRA** adapter: `roma-peft export-lora --model_name_or_path {base_name} "
        f'--adapter_path {adapter} --output_dir lora/`, then `PeftModel.from_pretrained(base, "lora/")` with '
        "stock PEFT;",
        f"- a **merged** checkpoint (`W + Δ` written into the routers): `roma-peft merge --model_name_or_path "
        f"{base_name} --adapter_path {adapter} --output_dir merged/`, then "
        '`AutoModelForCausalLM.from_pretrained("merged/")`.',
        "",
    ]
    lines += ["## Tuned routers", ""]
    for name, config in configs.items():
        routers = list((config.resolved_routers or {}).keys())
        layers = sorted({i for i in (_layer_index(r) for r in routers) if i is not None})
        lines.append(f"### Adapter `{name}`")
        lines.append("")
        lines.append("- PEFT method: ROMA")
        lines.append(f"- Base model: `{config.base_model_name_or_path or 'not recorded'}`")
        lines.append(
            f"- Layer selection: `{config.layer_selection}`"
            + (f" (num_layers={config.num_layers})" if config.layer_selection in ("last", "first", "middle") else "")
            + (f", MoE-layer indices {config.moe_layer_indices}" if config.moe_layer_indices else "")
            + (f" of {config.num_moe_layers} MoE layers" if config.num_moe_layers else "")
        )
        lines.append(f"- Tuned decoder layers: {layers}")
        lines.append(f"- Tuned routers ({len(routers)}): " + ", ".join(f"`{r}`" for r in routers))
        if config.resolved_bias_routers:
            lines.append("- Router biases also tuned: " + ", ".join(f"`{r}`" for r in config.resolved_bias_routers))
        lines.append("")
    if training:
        lines += [
            "## Training",
            "",
            "Trained with `roma_peft.RomaTrainer` (`roma-peft train`). Every RoMA setting:",
            "",
        ]
        for section, rows in training.items():
            if section == "results" or not rows:
                continue
            lines += [f"### {section[:1].upper() + section[1:]}", ""] + _table(rows) + [""]
        results = training.get("results") or {}
        if results:
            lines += (
                [
                    "## Results",
                    "",
                    "Final values of this run (`eval_*`: the evaluation set, multiple-choice "
                    "accuracy by lm-eval's log-likelihood rule, ± the standard error):",
                    "",
                ]
                + _table(results, header="metric", code=False)
                + [""]
            )
        if directory and os.path.exists(os.path.join(directory, CURVES_FILE)):
            lines += [f"![training curves]({CURVES_FILE})", ""]
        if directory and os.path.exists(os.path.join(directory, HEATMAPS_FILE)):
            lines += [f"![routing of the tuned layers, base vs tuned]({HEATMAPS_FILE})", ""]
    lines += [
        "## Citation",
        "",
        f"[{PAPER_TITLE}]({PAPER_URL}), Zhongyang Li, Ziyue Li, Tianyi Zhou, 2025.",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    lines.append(_CARD_END)
    return "\n".join(lines)


def _peft_template_text() -> str | None:
    """The body of the unfilled card template PEFT writes for a new adapter (huggingface_hub's default template)."""
    try:
        return ModelCard.from_template(ModelCardData()).text.strip()
    except Exception:  # pragma: no cover - a hub version without the default template
        return None


def update_model_card(
    peft_model: nn.Module,
    directory: str,
    training: dict | None = None,
    adapter_id: str | None = None,
    metadata: dict | None = None,
) -> None:
    """Add the PEFT metadata and the RoMA card to ``directory/README.md`` (created if absent); idempotent.

    The RoMA part (between ``<!-- roma_peft:begin -->`` and ``<!-- roma_peft:end -->``) says what the adapter is, how
    to load it with and without roma_peft, the tuned routers, and, with ``training`` (default: what
    :class:`~roma_peft.trainer.RomaTrainer` attached to the model, see :meth:`RomaTrainer.roma_card_info`), every RoMA
    setting and the final metrics, then the paper's citation. It replaces an earlier RoMA part; PEFT's unfilled
    template ("[More Information Needed]" everywhere) is dropped, anything else a user wrote is kept.

    Args:
        peft_model (`PeftModel`): the model whose RoMA adapters the card describes.
        directory (`str`): where ``README.md`` is (or is created).
        training (`dict`, *optional*): ``{section: {setting: value}}`` of the run; default: what ``RomaTrainer``
            attached to the model.
        adapter_id (`str`, *optional*): the Hub repository or path the loading snippet names.
        metadata (`dict`, *optional*): more card metadata (``license``, ``language``, ``datasets``, ``tags`` ...).
    """
    if training is None:
        training = getattr(peft_model, TRAINING_INFO_ATTRIBUTE, None)
    path = os.path.join(directory, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    tags = list(card.data.tags or [])
    base = None
    for config in getattr(peft_model, "peft_config", {}).values():
        if is_roma_config(config):
            base = base or config.base_model_name_or_path
    extra_tags = list((metadata or {}).get("tags") or [])
    for tag in ("peft", "roma", "mixture-of-experts", *extra_tags) + ((f"base_model:adapter:{base}",) if base else ()):
        if tag not in tags:
            tags.append(tag)
    # PEFT writes an empty base_model (and its adapter tag) for a base model without a name: drop them
    tags = [t for t in tags if t != "base_model:adapter:"]
    card.data.tags = tags
    if base and not card.data.get("base_model"):
        card.data["base_model"] = base
    if not card.data.get("base_model"):
        card.data.pop("base_model", None)
    for key, value in (metadata or {}).items():
        if key != "tags" and value:
            card.data[key] = value
    text = card.text
    template = _peft_template_text()
    if template and template in text:
        text = text.replace(template, "")
    section = _card_section(peft_model, training, adapter_id=adapter_id, directory=directory)
    if _CARD_BEGIN in text and _CARD_END in text:
        before, rest = text.split(_CARD_BEGIN, 1)
        after = rest.split(_CARD_END, 1)[1]
        text = before + section + after
    else:
        text = section + "\n\n" + text
    card.text = text.rstrip() + "\n"
    card.save(path)
