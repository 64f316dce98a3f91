"""``roma-peft``: the command line, TRL-style (``HfArgumentParser`` over config dataclasses).

Subcommands (``roma-peft <command> --help`` lists every option; ``--config FILE.yaml`` (or ``.json``) gives options
from a file, and flags on the command line override them)::

    roma-peft neighbours  --model_name_or_path M --train_file train.jsonl --output_dir nb/          # S, N(i), W, r_j
    roma-peft train       --model_name_or_path M --train_file train.jsonl --neighbourhood_dir nb/ --output_dir out/
    roma-peft evaluate    --model_name_or_path M [--adapter_path out/] --eval_file test.jsonl
    roma-peft merge       --model_name_or_path M --adapter_path out/ --output_dir merged/
    roma-peft export-lora --model_name_or_path M --adapter_path out/ --output_dir lora/
    roma-peft diagnose    --model_name_or_path M --train_file data.jsonl --output_dir diag/  # does RoMA's premise hold?
    roma-peft demo ...    (the offline miniature of the paper, roma_peft.benchmark.demo)

``neighbours`` and ``train`` must use the same adapter layer options (``--num_layers`` ...) and routing options
(``--routing_position`` ...): the stored targets are tagged with them and ``train`` refuses a mismatch.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["main", "ModelArguments", "DataArguments", "AdapterArguments", "NeighboursArguments"]

COMMANDS = ("neighbours", "train", "evaluate", "merge", "export-lora", "demo", "diagnose")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Base MoE model (hub name or local directory)."})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Default: the model's."})
    adapter_path: Optional[str] = field(default=None, metadata={"help": "A saved RoMA adapter to load."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype: 'auto' (the checkpoint's), 'bfloat16'/'bf16', 'float16'/'fp16' or "
                          "'float32'/'fp32'. RoMA's router deltas are float32 whatever this is."},
    )
    device_map: Optional[str] = field(
        default=None,
        metadata={"help": "Where the weights go: 'auto' (spread over every GPU, for models larger than one), 'cpu', "
                          "'cuda', 'cuda:1', or a JSON dict {module: device}. Default: the GPU when there is one ('auto'; "
                          "under torchrun each process's own GPU), else the CPU; `train` leaves placement to the "
                          "Trainer."},
    )
    attn_implementation: Optional[str] = field(
        default=None, metadata={"help": "'eager', 'sdpa', 'flash_attention_2' ... (default: transformers' choice)."}
    )
    revision: Optional[str] = field(
        default=None, metadata={"help": "Branch, tag or commit of a hub checkpoint (model, config and tokenizer)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote model code (e.g. DeepSeekMoE)."})
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "Quantize the frozen base to 4 bit with bitsandbytes (pip install bitsandbytes); the routers "
                          "stay unquantized (put into llm_int8_skip_modules automatically)."},
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "Quantize the frozen base to 8 bit with bitsandbytes; routers stay unquantized."}
    )
    bnb_4bit_compute_dtype: Optional[str] = field(
        default=None, metadata={"help": "Compute dtype of 4-bit layers (default: --dtype unless 'auto', else float32)."}
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit quantization type: 'nf4' or 'fp4'."})
    bnb_4bit_use_double_quant: bool = field(
        default=False, metadata={"help": "Also quantize the 4-bit quantization constants (saves ~0.4 bit/weight)."}
    )
    llm_int8_skip_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "More modules to keep unquantized (the routers and lm_head are kept automatically)."},
    )

    def loading_kwargs(self) -> dict:
        """The keyword arguments of :func:`roma_peft.loading.load_model_and_tokenizer` (errors name the flags)."""
        return dict(
            tokenizer_name_or_path=self.tokenizer_name_or_path, dtype=self.dtype, device_map=self.device_map,
            attn_implementation=self.attn_implementation, revision=self.revision,
            trust_remote_code=self.trust_remote_code, load_in_4bit=self.load_in_4bit, load_in_8bit=self.load_in_8bit,
            bnb_4bit_compute_dtype=self.bnb_4bit_compute_dtype, bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
            llm_int8_skip_modules=self.llm_int8_skip_modules, prefix="--",
        )


@dataclass
class DataArguments:
    train_file: Optional[str] = field(default=None, metadata={"help": "Training samples: JSONL or hub name."})
    train_split: Optional[str] = field(default=None, metadata={"help": "Split of a hub dataset (default train)."})
    eval_file: Optional[str] = field(default=None, metadata={"help": "Evaluation samples: JSONL or hub name."})
    eval_split: Optional[str] = field(default=None, metadata={"help": "Split of the hub eval dataset."})
    column_map: Optional[str] = field(
        default=None,
        metadata={"help": "How rows become samples: a roma_peft.data.HUB_COLUMN_MAPS name (e.g. 'arc_easy'), or a JSON "
                          "object {schema key: column}, e.g. '{\"question\": \"q\", \"options\": [\"A\", \"B\"], "
                          "\"label\": \"gold\"}'."},
    )
    dataset_config: Optional[str] = field(
        default=None, metadata={"help": "Configuration name of a hub dataset that is not in the registry."}
    )
    max_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N samples."})


@dataclass
class AdapterArguments:
    """The ``RomaConfig`` options (which routers are tuned); ignored when ``--adapter_path`` is given."""

    layer_selection: str = field(default="last", metadata={"help": "'last', 'first', 'middle', 'all', 'indices'."})
    num_layers: int = field(default=5, metadata={"help": "MoE layers tuned (paper: last 5)."})
    moe_layer_indices: Optional[list[int]] = field(default=None, metadata={"help": "Explicit MoE layer positions."})
    target_modules: Optional[list[str]] = field(default=None, metadata={"help": "Restrict to these router names."})
    train_router_bias: bool = field(default=True, metadata={"help": "Also adapt a router bias where there is one."})

    def to_config(self):
        from .config import RomaConfig

        return RomaConfig(layer_selection=self.layer_selection, num_layers=self.num_layers,
                          moe_layer_indices=self.moe_layer_indices, target_modules=self.target_modules,
                          train_router_bias=self.train_router_bias)


@dataclass
class NeighboursArguments:
    output_dir: str = field(metadata={"help": "Where the neighbourhood (and the base model's scores) are saved."})
    prompt_template: str = field(default="Question: {question}\nAnswer:", metadata={"help": "Prompt template."})
    routing_position: str = field(default="last", metadata={"help": "As RomaTrainingArguments.routing_position."})
    routing_num_tokens: int = field(default=1, metadata={"help": "As RomaTrainingArguments.routing_num_tokens."})
    routing_representation: str = field(default="probs", metadata={"help": "As in RomaTrainingArguments."})
    max_length: Optional[int] = field(
        default=None,
        metadata={"help": "As RomaTrainingArguments.max_length: the targets are read from the same truncated prompts "
                          "as training (recorded; `train` reads it back)."},
    )
    use_chat_template: bool = field(
        default=False, metadata={"help": "As RomaTrainingArguments.use_chat_template (recorded; `train` reads it back)."}
    )
    system_prompt: Optional[str] = field(default=None, metadata={"help": "With --use_chat_template: a system turn."})
    batch_size: int = field(default=16, metadata={"help": "Batch size of scoring and routing capture."})
    shard_block_size: int = field(
        default=256,
        metadata={"help": "Samples per block of the S stage; with several processes (torchrun / accelerate launch) "
                          "each rank takes whole blocks. The results depend on it, not on the number of processes."},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace a neighbourhood already saved in --output_dir (refused otherwise)."}
    )


@dataclass
class TrainCommandArguments:
    neighbourhood_dir: Optional[str] = field(
        default=None, metadata={"help": "Output of `roma-peft neighbours` (needed by manifold/random/self)."}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Train into an --output_dir that already holds an adapter or checkpoints (refused "
                          "otherwise, unless --resume_from_checkpoint continues that run)."},
    )


@dataclass
class EvalCommandArguments:
    output_file: Optional[str] = field(default=None, metadata={"help": "Write per-sample predictions (JSON)."})
    prompt_template: str = field(default="Question: {question}\nAnswer:", metadata={"help": "Prompt template."})
    use_chat_template: bool = field(default=False, metadata={"help": "Wrap prompts in the tokenizer's chat template."})
    system_prompt: Optional[str] = field(default=None, metadata={"help": "With --use_chat_template: a system turn."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward."})
    shard_block_size: int = field(
        default=256,
        metadata={"help": "Samples per block; with several processes each rank scores whole blocks (the scores "
                          "depend on it, not on the number of processes)."},
    )


@dataclass
class OutputArguments:
    output_dir: str = field(metadata={"help": "Output directory (must be new or empty)."})
    overwrite: bool = field(default=False, metadata={"help": "Allow writing into a non-empty directory."})
    adapter_name: str = field(default="default", metadata={"help": "Adapter to export."})


# ---------------------------------------------------------------------------------------------- helpers
def _config_file(argv) -> tuple[Optional[str], list[str]]:
    """The config file of a command line and the remaining flags: ``--config FILE`` (TRL style) or a leading
    ``FILE.yaml``/``FILE.json`` positional; command-line flags override the file."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a file (YAML or JSON).")
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    if argv and not argv[0].startswith("-") and argv[0].endswith((".json", ".yaml", ".yml")):
        return argv[0], argv[1:]
    return None, argv


def _read_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path!r}: no such file.")
    with open(path, encoding="utf-8") as f:
        try:
            if path.endswith(".json"):
                data = json.load(f)
            else:
                import yaml

                data = yaml.safe_load(f)
        except Exception as exc:  # noqa: BLE001 - JSON or YAML syntax errors, re-raised as one line
            raise ValueError(f"--config {path!r} cannot be parsed: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of option names to values, got {type(data).__name__}.")
    return data


def _parse(dataclasses, argv, prog):
    """Parse a command line into ``dataclasses`` (``HfArgumentParser``), TRL style: the values of ``--config FILE``
    (or a leading ``FILE.yaml``/``FILE.json``) become the defaults and the flags on the command line override them."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclasses, prog=f"roma-peft {prog}")
    path, rest = _config_file(argv)
    if path is not None:
        config = _read_config(path)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"--config {path!r}: unknown option(s) {unknown} for `roma-peft {prog}` "
                             f"(see roma-peft {prog} --help).")
        parser.set_defaults(**config)
        for action in parser._actions:  # a value from the file satisfies a required option
            if action.dest in config:
                action.required = False
    return parser.parse_args_into_dataclasses(args=rest)


def _load_model(margs: ModelArguments, adapter: Optional[AdapterArguments] = None, trainable: bool = False,
                clamp_layers: bool = False):
    """The base model and tokenizer (:func:`roma_peft.loading.load_model_and_tokenizer`: dtype, device map, attention,
    revision, remote code, bitsandbytes with unquantized routers), then the adapter: ``--adapter_path`` is loaded
    (trainable when ``trainable``), else ``adapter`` makes a new one; no adapter when neither is given."""
    from peft import PeftModel, get_peft_model

    import roma_peft  # noqa: F401  (registers ROMA)
    from .loading import check_adapted_routers, default_device_map, load_model_and_tokenizer

    kwargs = margs.loading_kwargs()
    if kwargs.get("device_map") is None and not trainable:
        kwargs["device_map"] = default_device_map()  # scoring / capture / evaluation run on the GPU when there is one
    model, tok = load_model_and_tokenizer(margs.model_name_or_path, **kwargs)
    with warnings.catch_warnings():
        # PEFT reads the deprecated `is_gradient_checkpointing` of transformers models when it wraps one (FutureWarning
        # on every load); nothing for the user to change
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if margs.adapter_path:
            model = PeftModel.from_pretrained(model, margs.adapter_path, is_trainable=trainable)
        elif adapter is not None:
            if clamp_layers:
                _fit_layer_count(adapter, model)
            model = get_peft_model(model, adapter.to_config())
    if margs.adapter_path or adapter is not None:
        check_adapted_routers(model)  # tuned routers quantized or offloaded (meta) cannot carry a float32 delta
    return model, tok


def _fit_layer_count(adapter: "AdapterArguments", model) -> None:
    """The default ``--num_layers`` (the paper's 5) on a model with fewer MoE layers: tune them all and say so, instead
    of failing. Only when the user did not set ``--num_layers``; an explicit value that does not fit stays an error."""
    from .routers import find_routers, group_by_layer

    if adapter.layer_selection not in ("last", "first", "middle"):
        return
    available = len(group_by_layer(find_routers(model)))
    if 0 < available < adapter.num_layers:
        print(f"roma-peft: the model has {available} MoE layers, fewer than the default --num_layers "
              f"{adapter.num_layers}: tuning all {available} (set --num_layers to choose).", file=sys.stderr)
        adapter.num_layers = available


def _explicit_options(argv) -> set[str]:
    """Option names the user set: ``--name``/``--name=value`` flags and the keys of the config file."""
    path, rest = _config_file(argv)
    explicit = set(_read_config(path)) if path is not None else set()
    return explicit | {a[2:].split("=", 1)[0].replace("-", "_") for a in rest if a.startswith("--")}


def _settings_from_neighbourhood(directory: str, explicit: set[str], adapter_args: Optional["AdapterArguments"],
                                 train_args) -> None:
    """``train`` reads the layer selection, prompt and routing options back from ``roma-peft neighbours``' output.

    Options the user did not set take the neighbourhood's values; an option set to another value is refused here,
    before the model loads, naming both values (the targets r_j were made under the stored ones).
    """
    from .neighbours import Neighbourhood

    conditions = Neighbourhood.check_saved(directory).get("conditions") or {}
    stored: list[tuple[object, str, object]] = []
    for name, value in (conditions.get("adapter") or {}).items():
        if adapter_args is not None and hasattr(adapter_args, name):
            stored.append((adapter_args, name, value))
    prompt = conditions.get("prompt") or {}
    for name, key in (("prompt_template", "template"), ("max_length", "max_length"),
                      ("use_chat_template", "chat_template"), ("system_prompt", "system_prompt")):
        if key in prompt:
            stored.append((train_args, name, prompt[key]))
    for name, key in (("routing_position", "position"), ("routing_num_tokens", "num_tokens"),
                      ("routing_representation", "representation")):
        if key in (conditions.get("routing") or {}):
            stored.append((train_args, name, conditions["routing"][key]))
    conflicts = []
    for owner, name, value in stored:
        value = list(value) if isinstance(value, tuple) else value
        current = getattr(owner, name)
        current = sorted(current) if isinstance(current, (set, frozenset)) else current
        if name in explicit and current != value:
            conflicts.append(f"--{name} {current!r} (the neighbourhood was built with {value!r})")
        elif name not in explicit:
            setattr(owner, name, value)
    if conflicts:
        raise ValueError(
            f"the neighbourhood in {directory!r} was built under other settings: " + "; ".join(conflicts) + ". Drop "
            "these options (train reads them from the neighbourhood) or rebuild it with `roma-peft neighbours`."
        )


def _samples(path, split, column_map, max_samples, config=None):
    from .data import load_samples

    if isinstance(column_map, str) and column_map.lstrip().startswith("{"):
        try:
            column_map = json.loads(column_map)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"--column_map is not valid JSON ({exc.msg} at character {exc.pos}): {column_map!r}."
            ) from None
    samples = load_samples(path, column_map=column_map, split=split, config=config)
    return samples[:max_samples] if max_samples else samples


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---------------------------------------------------------------------------------------------- checks
# Run right after parsing, before any model is loaded or anything is written: arguments that cannot work are refused
# in one line (``main`` prints ``roma-peft <command>: error: ...`` and exits with status 2).
_DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt")
_ADAPTER_MARKERS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
_NEIGHBOURHOOD_MARKERS = ("neighbourhood.safetensors", "neighbourhood.json")  # base_scores.json is regenerated


def _check_exists(flag: str, path: Optional[str], kind: str = "directory") -> None:
    from .loading import looks_like_local_path

    if path and not os.path.exists(path) and looks_like_local_path(path):
        raise FileNotFoundError(f"{flag} {path!r}: no such {kind}.")


def _check_model_args(margs: ModelArguments) -> None:
    """The loading options (``--dtype``, ``--device_map``, ``--attn_implementation``, quantization: see
    :func:`roma_peft.loading.check_loading_options`), and the model/tokenizer/adapter paths: a local path must exist;
    a local adapter must be readable."""
    from .loading import check_loading_options

    kwargs = margs.loading_kwargs()
    for name in ("tokenizer_name_or_path", "revision", "trust_remote_code", "bnb_4bit_use_double_quant"):
        kwargs.pop(name)
    check_loading_options(**kwargs)
    _check_exists("--model_name_or_path", margs.model_name_or_path)
    _check_exists("--tokenizer_name_or_path", margs.tokenizer_name_or_path)
    _check_exists("--adapter_path", margs.adapter_path)
    if margs.adapter_path and os.path.isdir(margs.adapter_path):
        from .config import check_adapter_dir

        check_adapter_dir(margs.adapter_path)  # corrupt config/weights fail here, before the base model loads


def _check_data_file(flag: str, path: Optional[str]) -> None:
    """A local samples file must exist and be readable (a hub dataset name is left to ``load_samples``)."""
    from .loading import looks_like_local_path

    if not path:
        return
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise OSError(f"{flag} {path!r} cannot be read: {exc.strerror or exc}.") from exc
    elif not os.path.isdir(path) and (looks_like_local_path(path) or path.endswith(_DATA_EXTENSIONS)):
        raise FileNotFoundError(f"{flag} {path!r}: no such file.")


def _check_output_dir(path: str, markers: tuple, overwrite: bool, what: str, how: str) -> None:
    """Refuse an output directory that holds ``markers`` (or, with ``markers=()``, anything) unless ``overwrite``."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"--output_dir {path!r} is a file, not a directory.")
    if overwrite or not os.path.isdir(path):
        return
    entries = sorted(os.listdir(path))
    found = entries if not markers else [
        e for e in entries if e in markers or (e.startswith("checkpoint-") and "checkpoint-*" in markers)
    ]
    if found:
        raise FileExistsError(
            f"--output_dir {path!r} already holds {what} ({', '.join(found[:4])}{' ...' if len(found) > 4 else ''}). "
            f"Refusing to overwrite it: choose a new --output_dir, or {how}."
        )


def _check_neighbours_command(margs, dargs, nconfig, nargs) -> None:
    from .capture import RoutingSpec
    from .prompts import PromptEncoding

    nconfig.validate()
    RoutingSpec(nargs.routing_position, nargs.routing_num_tokens, nargs.routing_representation)
    if nargs.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {nargs.batch_size}.")
    if nargs.shard_block_size < 1:
        raise ValueError(f"--shard_block_size must be >= 1, got {nargs.shard_block_size}.")
    _check_model_args(margs)
    _check_data_file("--train_file", dargs.train_file)
    _check_output_dir(nargs.output_dir, _NEIGHBOURHOOD_MARKERS, nargs.overwrite, "a neighbourhood",
                      "pass --overwrite to replace it")
    PromptEncoding(nargs.prompt_template, nargs.max_length, chat_template=nargs.use_chat_template,
                   system_prompt=nargs.system_prompt)  # the prompt options


def _check_train_command(margs, dargs, targs, args) -> None:
    from .neighbours import Neighbourhood
    from .regularizers import NEIGHBOUR_REGULARIZERS

    _check_model_args(margs)
    _check_data_file("--train_file", dargs.train_file)
    _check_data_file("--eval_file", dargs.eval_file)
    if targs.neighbourhood_dir:
        Neighbourhood.check_saved(targs.neighbourhood_dir)
    elif args.regularizer in NEIGHBOUR_REGULARIZERS and args.roma_lambda > 0:
        raise ValueError(
            f"--regularizer {args.regularizer} needs --neighbourhood_dir (the output of `roma-peft neighbours` on the "
            "same --train_file); build one first, or choose a regulariser without neighbours (--regularizer none)."
        )
    resume = args.resume_from_checkpoint
    if resume and str(resume).lower() not in ("true", "false"):
        _check_exists("--resume_from_checkpoint", str(resume))
    if not resume and args.output_dir:
        _check_output_dir(args.output_dir, _ADAPTER_MARKERS + ("checkpoint-*",), targs.overwrite,
                          "a trained adapter or checkpoints",
                          "pass --overwrite to replace it, or --resume_from_checkpoint to continue that run")


def _check_evaluate_command(margs, dargs) -> None:
    _check_model_args(margs)
    _check_data_file("--eval_file", dargs.eval_file or dargs.train_file)


def _check_export_command(margs, oargs) -> None:
    _check_model_args(margs)
    _check_output_dir(oargs.output_dir, (), oargs.overwrite, "files", "pass --overwrite to write into it")


# ---------------------------------------------------------------------------------------------- commands
def cmd_neighbours(argv) -> dict:
    from .capture import RoutingRecorder, RoutingSpec
    from .conditions import routing_conditions
    from .distributed import collect_routing_sharded, distributed_state, embed_sharded, place_model, score_sharded
    from .prompts import PromptEncoding
    from .neighbours import NeighbourhoodConfig, build_neighbourhood
    from .trainer import routing_spec_string

    margs, dargs, aargs, nconfig, nargs = _parse(
        (ModelArguments, DataArguments, AdapterArguments, NeighbourhoodConfig, NeighboursArguments), argv, "neighbours"
    )
    _check_neighbours_command(margs, dargs, nconfig, nargs)  # before the model loads or anything is written
    if not dargs.train_file:
        raise SystemExit("roma-peft neighbours: --train_file is required")
    samples = _samples(dargs.train_file, dargs.train_split, dargs.column_map, dargs.max_samples, dargs.dataset_config)
    # several processes (torchrun / accelerate launch): each rank scores, captures and embeds its share of the
    # samples (roma_peft.distributed), every rank gets all results in order, the main process builds and saves
    state = distributed_state()
    model, tok = _load_model(margs, aargs, clamp_layers="num_layers" not in _explicit_options(argv))
    place_model(model, state)
    spec = RoutingSpec(nargs.routing_position, nargs.routing_num_tokens, nargs.routing_representation)
    encoding = PromptEncoding.for_tokenizer(tok, nargs.prompt_template, nargs.max_length,
                                            chat_template=nargs.use_chat_template, system_prompt=nargs.system_prompt)
    shard = {"block_size": nargs.shard_block_size, "state": state}
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        scores = score_sharded(model, tok, samples, batch_size=nargs.batch_size, encoding=encoding, **shard)
    embeddings = embed_sharded(samples, nconfig.embedding_model, field=nconfig.embed_field, **shard)
    recorder = RoutingRecorder(model, spec=spec)
    tag = routing_spec_string(spec, recorder.routers)
    recorder.remove()
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        routing = collect_routing_sharded(model, tok, samples, spec=spec, batch_size=nargs.batch_size,
                                          encoding=encoding, **shard)
    summary = {"base_acc": scores.acc, "routing_spec": tag, "output_dir": nargs.output_dir}
    if state.is_main_process:
        os.makedirs(nargs.output_dir, exist_ok=True)
        scores.save(os.path.join(nargs.output_dir, "base_scores.json"))
        conditions = routing_conditions(model, tok, samples, encoding, routing_spec=tag, spec=spec,
                                        scored_template=nargs.prompt_template)
        nb = build_neighbourhood(samples, scores, embeddings, nconfig, routing=routing, routing_spec=tag,
                                 conditions=conditions)
        nb.save(nargs.output_dir, overwrite=nargs.overwrite)
        summary = {"base_acc": scores.acc, **nb.summary(), "routing_spec": tag, "output_dir": nargs.output_dir}
        _print(summary)
    state.wait_for_everyone()  # the other ranks return once the neighbourhood is on disk
    return summary


def cmd_train(argv) -> dict:
    from .neighbours import Neighbourhood
    from .trainer import RomaTrainer, RomaTrainingArguments

    margs, dargs, aargs, targs, args = _parse(
        (ModelArguments, DataArguments, AdapterArguments, TrainCommandArguments, RomaTrainingArguments), argv, "train"
    )
    _check_train_command(margs, dargs, targs, args)  # before the model loads or anything is written
    if not dargs.train_file:
        raise SystemExit("roma-peft train: --train_file is required")
    samples = _samples(dargs.train_file, dargs.train_split, dargs.column_map, dargs.max_samples, dargs.dataset_config)
    eval_samples = (_samples(dargs.eval_file, dargs.eval_split, dargs.column_map, None, dargs.dataset_config)
                    if dargs.eval_file else None)
    explicit = _explicit_options(argv)
    if targs.neighbourhood_dir:  # a loaded adapter (--adapter_path) brings its own layer selection
        _settings_from_neighbourhood(targs.neighbourhood_dir, explicit, None if margs.adapter_path else aargs, args)
    model, tok = _load_model(margs, aargs, trainable=True,
                             clamp_layers="num_layers" not in explicit and not targs.neighbourhood_dir)
    nb = Neighbourhood.load(targs.neighbourhood_dir, samples=samples) if targs.neighbourhood_dir else None
    trainer = RomaTrainer(model=model, args=args, train_dataset=samples, neighbourhood=nb, eval_dataset=eval_samples,
                          processing_class=tok)
    trainer.roma_data_source = {"train": dargs.train_file, "eval": dargs.eval_file}  # named in the model card
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = dict(result.metrics)
    if eval_samples is not None:  # eval_loss, eval_accuracy(_norm)(_stderr), eval_samples, eval_roma/*
        metrics.update(trainer.evaluate())
    trainer.save_state()  # trainer_state.json: the log history, kept next to the adapter
    trainer.save_plots()  # training_curves.png, routing_heatmaps.png, routing_stats.json (roma_peft.plots)
    trainer.save_model(args.output_dir)  # adapter + README.md model card (settings, final metrics, figures)
    if trainer.is_world_process_zero():  # once under torchrun / accelerate launch
        tok.save_pretrained(args.output_dir)
        trainer.save_metrics("train", metrics)
        _print(metrics)
    return metrics


def cmd_evaluate(argv) -> dict:
    from .distributed import distributed_state, place_model, score_sharded
    from .prompts import PromptEncoding

    margs, dargs, eargs = _parse((ModelArguments, DataArguments, EvalCommandArguments), argv, "evaluate")
    _check_evaluate_command(margs, dargs)
    path = dargs.eval_file or dargs.train_file
    if not path:
        raise SystemExit("roma-peft evaluate: --eval_file is required")
    samples = _samples(path, dargs.eval_split or dargs.train_split, dargs.column_map, dargs.max_samples,
                       dargs.dataset_config)
    state = distributed_state()  # several processes: each scores its share, the main process prints and writes
    model, tok = _load_model(margs)
    place_model(model, state)
    encoding = PromptEncoding.for_tokenizer(tok, eargs.prompt_template, chat_template=eargs.use_chat_template,
                                            system_prompt=eargs.system_prompt)
    result = score_sharded(model, tok, samples, batch_size=eargs.batch_size, encoding=encoding,
                           block_size=eargs.shard_block_size, state=state)
    metrics = result.metrics("eval")  # the names `train` reports: eval_accuracy(_norm)(_stderr), eval_samples
    if state.is_main_process:
        if eargs.output_file:
            result.save(eargs.output_file)
        _print(metrics)
    state.wait_for_everyone()
    return metrics


def _export_model(argv, prog):
    margs, oargs = _parse((ModelArguments, OutputArguments), argv, prog)
    if not margs.adapter_path:
        raise SystemExit(f"roma-peft {prog}: --adapter_path is required")
    _check_export_command(margs, oargs)
    if prog == "merge" and (margs.load_in_4bit or margs.load_in_8bit):
        raise ValueError("merge writes a full-precision checkpoint (W + delta): load the base without --load_in_4bit / "
                         "--load_in_8bit.")
    model, tok = _load_model(margs)
    return model, tok, oargs


def cmd_merge(argv) -> dict:
    from .export import export_merged

    model, tok, oargs = _export_model(argv, "merge")
    export_merged(model, oargs.output_dir, overwrite=oargs.overwrite)
    tok.save_pretrained(oargs.output_dir)
    out = {"merged": oargs.output_dir}
    _print(out)
    return out


def cmd_export_lora(argv) -> dict:
    from .export import export_to_lora

    model, tok, oargs = _export_model(argv, "export-lora")
    export_to_lora(model, oargs.output_dir, adapter_name=oargs.adapter_name, overwrite=oargs.overwrite)
    out = {"lora_adapter": oargs.output_dir}
    _print(out)
    return out


def cmd_demo(argv):
    try:
        demo = importlib.import_module("roma_peft.benchmark.demo")
    except ImportError as exc:
        if getattr(exc, "name", None) != "roma_peft.benchmark.demo":
            raise
        raise SystemExit("roma-peft demo: roma_peft.benchmark.demo is not available in this installation.")
    return demo.main(argv)


@dataclass
class DiagnoseArguments:
    """``roma-peft diagnose`` options besides :class:`roma_peft.diagnose.DiagnoseConfig` (what is measured)."""

    output_dir: str = field(metadata={"help": "Where diagnose.json, report.md and the PNG figures are written."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a diagnosis already in --output_dir."})
    prompt_template: str = field(default="Question: {question}\nAnswer:", metadata={"help": "Prompt template."})
    max_length: Optional[int] = field(default=None, metadata={"help": "As RomaTrainingArguments.max_length."})
    use_chat_template: bool = field(default=False, metadata={"help": "Wrap prompts in the tokenizer's chat template."})
    system_prompt: Optional[str] = field(default=None, metadata={"help": "With --use_chat_template: a system turn."})


def _check_diagnose_command(margs, dargs, dconfig, diag_args) -> None:
    from .diagnose import DIAGNOSIS_FILES
    from .prompts import PromptEncoding

    _check_model_args(margs)
    if not dargs.train_file:
        raise ValueError("--train_file is required: the samples to diagnose (JSONL, parquet, folder or hub name).")
    _check_data_file("--train_file", dargs.train_file)
    dconfig.validate()  # layer selection syntax, counts, metric
    _check_output_dir(diag_args.output_dir, DIAGNOSIS_FILES, diag_args.overwrite, "a diagnosis",
                      "pass --overwrite to replace it")
    PromptEncoding(diag_args.prompt_template, diag_args.max_length, chat_template=diag_args.use_chat_template,
                   system_prompt=diag_args.system_prompt)  # the prompt options


def cmd_diagnose(argv) -> dict:
    """Does RoMA's premise hold for this model and data? (roma_peft.diagnose; docs/diagnose.md)"""
    from .diagnose import DiagnoseConfig, diagnose
    from .prompts import PromptEncoding

    margs, dargs, dconfig, diag_args = _parse((ModelArguments, DataArguments, DiagnoseConfig, DiagnoseArguments),
                                              argv, "diagnose")
    _check_diagnose_command(margs, dargs, dconfig, diag_args)  # before the model loads or anything is written
    samples = _samples(dargs.train_file, dargs.train_split, dargs.column_map, dargs.max_samples, dargs.dataset_config)
    model, tok = _load_model(margs)  # on the GPU when there is one (--device_map), see _load_model
    if hasattr(model, "merge_and_unload"):  # --adapter_path: diagnose the adapted routers as a stock model
        model = model.merge_and_unload()
    model.eval()
    encoding = PromptEncoding.for_tokenizer(tok, diag_args.prompt_template, diag_args.max_length,
                                            chat_template=diag_args.use_chat_template,
                                            system_prompt=diag_args.system_prompt)
    result = diagnose(model, tok, samples, dconfig, encoding=encoding, output_dir=diag_args.output_dir,
                      overwrite=diag_args.overwrite, source=str(dargs.train_file))
    print(result["verdict"]["text"])
    figures = ", ".join(result.get("figures", [])) or "none"
    print(f"\nnumbers: {os.path.join(diag_args.output_dir, 'diagnose.json')}; report: "
          f"{os.path.join(diag_args.output_dir, 'report.md')}; figures: {figures}")
    return result


HANDLERS = {"neighbours": cmd_neighbours, "train": cmd_train, "evaluate": cmd_evaluate, "merge": cmd_merge,
            "export-lora": cmd_export_lora, "demo": cmd_demo, "diagnose": cmd_diagnose}


def run(argv: Optional[list[str]] = None):
    """Run one subcommand and return its result (a dict); errors propagate. ``main`` is the console entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"roma-peft {__version__}")
        return None
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in HANDLERS:
        usage = __doc__.split("\n\n", 1)[1]
        if argv and argv[0] in ("-h", "--help"):
            print(usage)
            return None
        # no command, or an unknown one: a usage error (exit status 2), as argparse-based CLIs do
        problem = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"roma-peft: {problem}; choose one of {', '.join(COMMANDS)} (roma-peft --version for the version)\n",
              file=sys.stderr)
        print(usage, file=sys.stderr)
        raise SystemExit(2)
    return HANDLERS[argv[0]](argv[1:])


def main(argv: Optional[list[str]] = None) -> int:
    """``roma-peft``: exit status 0 on success; a bad input prints one clear line instead of a traceback."""
    try:
        run(argv)
    except _user_errors() as exc:
        command = (list(sys.argv[1:] if argv is None else argv) or ["roma-peft"])[0]
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"roma-peft {command}: error: {message}", file=sys.stderr)
        return 2
    return 0


def _user_errors() -> tuple:
    """The exceptions that mean bad input or a diverged run, not a bug: one line and exit status 2 (others keep their
    traceback). Evaluated only when an exception propagates; a class whose module was never imported cannot have
    been raised, so nothing is imported here."""
    errors = [ValueError, OSError]  # OSError includes FileNotFoundError / FileExistsError
    for module, name in (("roma_peft.trainer", "NonFiniteLossError"), ("roma_peft.layer", "NonFiniteAdapterError"),
                         ("safetensors", "SafetensorError")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            errors.append(cls)
    return tuple(errors)


if __name__ == "__main__":
    raise SystemExit(main())
