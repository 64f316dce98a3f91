"""What each ``roma-peft`` command does (``roma-peft --help`` lists them; the console script is :mod:`roma_peft_cli`).

The command line itself (the command table, the argument dataclasses, the ``--config FILE`` parser, ``--help`` and
``--version``) lives in the light package :mod:`roma_peft_cli`, so that help and version never import torch or PEFT.
This module holds the commands' implementations (``cmd_<command>(argv)``, each returning its result), imported when
a command runs, and the checks that refuse bad input before any model loads.

``neighbours`` and ``train`` must use the same adapter layer options (``--num_layers`` ...) and routing options
(``--routing_position`` ...): the stored targets are tagged with them, ``train`` reads them back from the
neighbourhood and refuses a mismatch.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys

from roma_peft_cli import main, run
from roma_peft_cli.arguments import (
    AdapterArguments,
    DataArguments,
    DiagnoseArguments,
    EvalCommandArguments,
    ModelArguments,
    NeighboursArguments,
    TrainCommandArguments,
)
from roma_peft_cli.parser import explicit_options as _explicit_options
from roma_peft_cli.parser import parse_command

__all__ = [
    "main",
    "run",
    "ModelArguments",
    "DataArguments",
    "AdapterArguments",
    "NeighboursArguments",
    "TrainCommandArguments",
    "EvalCommandArguments",
    "DiagnoseArguments",
]


# ---------------------------------------------------------------------------------------------- helpers
def _load_model(
    margs: ModelArguments,
    adapter: AdapterArguments | None = None,
    trainable: bool = False,
    clamp_layers: bool = False,
    adapter_name: str = "default",
):
    """The base model and tokenizer (:func:`roma_peft.loading.load_model_and_tokenizer`: dtype, device map, attention,
    revision, remote code, bitsandbytes with unquantized routers), then the adapter: ``--adapter_path`` is loaded
    (trainable when ``trainable``, under the name ``adapter_name``), else ``adapter`` makes a new one; no adapter when
    neither is given."""
    from peft import PeftModel, get_peft_model

    import roma_peft  # noqa: F401  (registers ROMA)

    from .loading import check_adapted_routers, default_device_map, load_model_and_tokenizer, quiet_peft_wrapping

    kwargs = margs.loading_kwargs()
    if kwargs.get("device_map") is None and not trainable:
        kwargs["device_map"] = default_device_map()  # scoring / capture / evaluation run on the GPU when there is one
    model, tok = load_model_and_tokenizer(margs.model_name_or_path, **kwargs)
    with quiet_peft_wrapping():
        if margs.adapter_path:
            model = PeftModel.from_pretrained(
                model, margs.adapter_path, adapter_name=adapter_name, is_trainable=trainable
            )
        elif adapter is not None:
            if clamp_layers:
                _fit_layer_count(adapter, model)
            model = get_peft_model(model, adapter.to_config())
    if margs.adapter_path or adapter is not None:
        check_adapted_routers(model)  # tuned routers quantized or offloaded (meta) cannot carry a float32 delta
    return model, tok


def _fit_layer_count(adapter: AdapterArguments, model) -> None:
    """The default ``--num_layers`` (the paper's 5) on a model with fewer MoE layers: tune them all and say so, instead
    of failing. Only when the user did not set ``--num_layers``; an explicit value that does not fit stays an error."""
    from .routers import find_routers, group_by_layer

    if adapter.layer_selection not in ("last", "first", "middle"):
        return
    available = len(group_by_layer(find_routers(model)))
    if 0 < available < adapter.num_layers:
        print(
            f"roma-peft: the model has {available} MoE layers, fewer than the default --num_layers "
            f"{adapter.num_layers}: tuning all {available} (set --num_layers to choose).",
            file=sys.stderr,
        )
        adapter.num_layers = available


def _settings_from_neighbourhood(
    directory: str, explicit: set[str], adapter_args: AdapterArguments | None, train_args
) -> None:
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
    for name, key in (
        ("prompt_template", "template"),
        ("max_length", "max_length"),
        ("use_chat_template", "chat_template"),
        ("system_prompt", "system_prompt"),
    ):
        if key in prompt:
            stored.append((train_args, name, prompt[key]))
    for name, key in (
        ("routing_position", "position"),
        ("routing_num_tokens", "num_tokens"),
        ("routing_representation", "representation"),
    ):
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


def _check_exists(flag: str, path: str | None, kind: str = "directory") -> None:
    from .loading import looks_like_local_path

    if path and not os.path.exists(path) and looks_like_local_path(path):
        raise FileNotFoundError(f"{flag} {path!r}: no such {kind}.")


def _prompt_encoding(args, tokenizer=None):
    """The one prompt encoding of a command's prompt options (``--prompt_template``, ``--max_length`` where the
    command has it, ``--use_chat_template``, ``--system_prompt``): built bare to check the options before any model
    loads, and with the tokenizer (its truncation side recorded, its chat template checked) for the run."""
    from .prompts import PromptEncoding

    options = dict(
        template=args.prompt_template,
        max_length=getattr(args, "max_length", None),
        chat_template=args.use_chat_template,
        system_prompt=args.system_prompt,
    )
    return PromptEncoding(**options) if tokenizer is None else PromptEncoding.for_tokenizer(tokenizer, **options)


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


def _check_data_file(flag: str, path: str | None) -> None:
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
    found = (
        entries
        if not markers
        else [e for e in entries if e in markers or (e.startswith("checkpoint-") and "checkpoint-*" in markers)]
    )
    if found:
        raise FileExistsError(
            f"--output_dir {path!r} already holds {what} ({', '.join(found[:4])}{' ...' if len(found) > 4 else ''}). "
            f"Refusing to overwrite it: choose a new --output_dir, or {how}."
        )


def _check_neighbours_command(margs, dargs, nconfig, nargs) -> None:
    from .capture import RoutingSpec

    nconfig.validate()
    RoutingSpec(nargs.routing_position, nargs.routing_num_tokens, nargs.routing_representation)
    if nargs.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {nargs.batch_size}.")
    if nargs.shard_block_size < 1:
        raise ValueError(f"--shard_block_size must be >= 1, got {nargs.shard_block_size}.")
    _check_model_args(margs)
    _check_data_file("--train_file", dargs.train_file)
    _check_output_dir(
        nargs.output_dir, _NEIGHBOURHOOD_MARKERS, nargs.overwrite, "a neighbourhood", "pass --overwrite to replace it"
    )
    _prompt_encoding(nargs)  # the prompt options


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
    if args.refresh_successful_set and not (targs.neighbourhood_dir and args.refresh_targets_steps > 0):
        raise ValueError(
            "--refresh_successful_set rebuilds S and the neighbourhoods every --refresh_targets_steps steps from the "
            "neighbourhood's recorded settings: give both --neighbourhood_dir (the output of `roma-peft neighbours`) "
            f"and --refresh_targets_steps N > 0 (got {args.refresh_targets_steps})."
        )
    resume = args.resume_from_checkpoint
    if resume and str(resume).lower() not in ("true", "false"):
        _check_exists("--resume_from_checkpoint", str(resume))
    if not resume and args.output_dir:
        _check_output_dir(
            args.output_dir,
            _ADAPTER_MARKERS + ("checkpoint-*",),
            targs.overwrite,
            "a trained adapter or checkpoints",
            "pass --overwrite to replace it, or --resume_from_checkpoint to continue that run",
        )


def _check_evaluate_command(margs, dargs) -> None:
    _check_model_args(margs)
    _check_data_file("--eval_file", dargs.eval_file)


def _check_export_command(margs, oargs) -> None:
    _check_model_args(margs)
    _check_output_dir(oargs.output_dir, (), oargs.overwrite, "files", "pass --overwrite to write into it")


# ---------------------------------------------------------------------------------------------- commands
def cmd_neighbours(argv) -> dict:
    from .capture import RoutingRecorder, RoutingSpec
    from .conditions import routing_conditions
    from .distributed import collect_routing_sharded, distributed_state, embed_sharded, place_model, score_sharded
    from .neighbours import build_neighbourhood
    from .trainer import routing_spec_string

    margs, dargs, aargs, nconfig, nargs = parse_command("neighbours", argv)
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
    encoding = _prompt_encoding(nargs, tok)
    shard = {"block_size": nargs.shard_block_size, "state": state}
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        scores = score_sharded(model, tok, samples, batch_size=nargs.batch_size, encoding=encoding, **shard)
    embeddings = embed_sharded(samples, nconfig.embedding_model, field=nconfig.embed_field, **shard)
    recorder = RoutingRecorder(model, spec=spec)
    tag = routing_spec_string(spec, recorder.routers)
    recorder.remove()
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        routing = collect_routing_sharded(
            model, tok, samples, spec=spec, batch_size=nargs.batch_size, encoding=encoding, **shard
        )
    summary = {"base_acc": scores.acc, "routing_spec": tag, "output_dir": nargs.output_dir}
    if state.is_main_process:
        os.makedirs(nargs.output_dir, exist_ok=True)
        scores.save(os.path.join(nargs.output_dir, "base_scores.json"))
        conditions = routing_conditions(
            model, tok, samples, encoding, routing_spec=tag, spec=spec, scored_template=nargs.prompt_template
        )
        nb = build_neighbourhood(
            samples, scores, embeddings, nconfig, routing=routing, routing_spec=tag, conditions=conditions
        )
        nb.save(nargs.output_dir, overwrite=nargs.overwrite)
        summary = {"base_acc": scores.acc, **nb.summary(), "routing_spec": tag, "output_dir": nargs.output_dir}
        _print(summary)
    state.wait_for_everyone()  # the other ranks return once the neighbourhood is on disk
    return summary


def cmd_train(argv) -> dict:
    from .neighbours import Neighbourhood
    from .trainer import RomaTrainer

    margs, dargs, aargs, targs, args = parse_command("train", argv)
    _check_train_command(margs, dargs, targs, args)  # before the model loads or anything is written
    if not dargs.train_file:
        raise SystemExit("roma-peft train: --train_file is required")
    samples = _samples(dargs.train_file, dargs.train_split, dargs.column_map, dargs.max_samples, dargs.dataset_config)
    eval_samples = (
        _samples(dargs.eval_file, dargs.eval_split, dargs.column_map, None, dargs.dataset_config)
        if dargs.eval_file
        else None
    )
    explicit = _explicit_options(argv)
    if targs.neighbourhood_dir:  # a loaded adapter (--adapter_path) brings its own layer selection
        _settings_from_neighbourhood(targs.neighbourhood_dir, explicit, None if margs.adapter_path else aargs, args)
    model, tok = _load_model(
        margs, aargs, trainable=True, clamp_layers="num_layers" not in explicit and not targs.neighbourhood_dir
    )
    nb = Neighbourhood.load(targs.neighbourhood_dir, samples=samples) if targs.neighbourhood_dir else None
    embeddings = _task_embeddings(samples, nb) if args.refresh_successful_set else None
    trainer = RomaTrainer(
        model=model,
        args=args,
        train_dataset=samples,
        neighbourhood=nb,
        eval_dataset=eval_samples,
        processing_class=tok,
        embeddings=embeddings,
    )
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


def _task_embeddings(samples, nb):
    """The task embeddings ``--refresh_successful_set`` rebuilds the neighbourhoods from: the training samples embedded
    as ``roma-peft neighbours`` embedded them (the embedding model and text field recorded with the neighbourhood),
    split across processes under torchrun / accelerate launch."""
    from .distributed import distributed_state, embed_sharded
    from .neighbours import NeighbourhoodConfig

    config = NeighbourhoodConfig.from_dict(nb.metadata.get("config") or {})
    return embed_sharded(samples, config.embedding_model, field=config.embed_field, state=distributed_state())


def cmd_evaluate(argv) -> dict:
    from .distributed import distributed_state, place_model, score_sharded

    margs, dargs, eargs = parse_command("evaluate", argv)
    _check_evaluate_command(margs, dargs)
    if not dargs.eval_file:
        raise SystemExit("roma-peft evaluate: --eval_file is required")
    samples = _samples(dargs.eval_file, dargs.eval_split, dargs.column_map, dargs.max_samples, dargs.dataset_config)
    state = distributed_state()  # several processes: each scores its share, the main process prints and writes
    model, tok = _load_model(margs)
    place_model(model, state)
    encoding = _prompt_encoding(eargs, tok)
    result = score_sharded(
        model,
        tok,
        samples,
        batch_size=eargs.batch_size,
        encoding=encoding,
        block_size=eargs.shard_block_size,
        state=state,
    )
    metrics = result.metrics("eval")  # the names `train` reports: eval_accuracy(_norm)(_stderr), eval_samples
    if state.is_main_process:
        if eargs.output_file:
            result.save(eargs.output_file)
        _print(metrics)
    state.wait_for_everyone()
    return metrics


def _export_model(argv, prog):
    margs, oargs = parse_command(prog, argv)
    if not margs.adapter_path:
        raise SystemExit(f"roma-peft {prog}: --adapter_path is required")
    _check_exists("--adapter_path", margs.adapter_path)
    margs.adapter_path = _named_adapter_dir(margs.adapter_path, oargs.adapter_name)
    _check_export_command(margs, oargs)
    if prog == "merge" and (margs.load_in_4bit or margs.load_in_8bit):
        raise ValueError(
            "merge writes a full-precision checkpoint (W + delta): load the base without --load_in_4bit / "
            "--load_in_8bit."
        )
    model, tok = _load_model(margs, adapter_name=oargs.adapter_name)
    return model, tok, oargs


def _named_adapter_dir(path: str, name: str) -> str:
    """The folder of adapter ``name`` in ``path``, PEFT's multi-adapter layout: ``save_pretrained`` writes the
    ``default`` adapter at the top of the directory and every other adapter ``NAME`` in its ``NAME/`` subfolder."""
    if name == "default":
        return path
    if not os.path.isdir(path):
        raise ValueError(
            f"--adapter_name {name!r} picks a subfolder of a local adapter directory; --adapter_path "
            f"{path!r} is not one. Download the hub adapter first (huggingface-cli download {path} "
            "--local-dir DIR) and pass --adapter_path DIR."
        )
    folder = os.path.join(path, name)
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return folder
    held = (["default"] if os.path.isfile(os.path.join(path, "adapter_config.json")) else []) + sorted(
        e for e in os.listdir(path) if os.path.isfile(os.path.join(path, e, "adapter_config.json"))
    )
    raise ValueError(
        f"--adapter_name {name!r}: --adapter_path {path!r} has no adapter of that name (no "
        f"{name}/adapter_config.json); it holds {', '.join(map(repr, held)) or 'no adapter'}."
    )


def cmd_merge(argv) -> dict:
    from .export import export_merged

    model, tok, oargs = _export_model(argv, "merge")
    export_merged(model, oargs.output_dir, overwrite=oargs.overwrite)  # merges the loaded (active) adapter
    tok.save_pretrained(oargs.output_dir)
    out = {"merged": oargs.output_dir, "adapter_name": oargs.adapter_name}
    _print(out)
    return out


def cmd_export_lora(argv) -> dict:
    from .export import export_to_lora

    model, tok, oargs = _export_model(argv, "export-lora")
    export_to_lora(model, oargs.output_dir, adapter_name=oargs.adapter_name, overwrite=oargs.overwrite)
    out = {"lora_adapter": oargs.output_dir, "adapter_name": oargs.adapter_name}
    _print(out)
    return out


def cmd_demo(argv):
    try:
        demo = importlib.import_module("roma_peft.benchmark.demo")
    except ImportError as exc:
        if getattr(exc, "name", None) != "roma_peft.benchmark.demo":
            raise
        raise SystemExit("roma-peft demo: roma_peft.benchmark.demo is not available in this installation.") from None
    return demo.main(argv)


def _check_diagnose_command(margs, dargs, dconfig, diag_args) -> None:
    from .diagnose import DIAGNOSIS_FILES

    _check_model_args(margs)
    if not dargs.train_file:
        raise ValueError("--train_file is required: the samples to diagnose (JSONL, parquet, folder or hub name).")
    _check_data_file("--train_file", dargs.train_file)
    dconfig.validate()  # layer selection syntax, counts, metric
    _check_output_dir(
        diag_args.output_dir, DIAGNOSIS_FILES, diag_args.overwrite, "a diagnosis", "pass --overwrite to replace it"
    )
    _prompt_encoding(diag_args)  # the prompt options


def cmd_diagnose(argv) -> dict:
    """Does RoMA's premise hold for this model and data? (roma_peft.diagnose; docs/diagnose.md)"""
    from .diagnose import diagnose

    margs, dargs, dconfig, diag_args = parse_command("diagnose", argv)
    _check_diagnose_command(margs, dargs, dconfig, diag_args)  # before the model loads or anything is written
    samples = _samples(dargs.train_file, dargs.train_split, dargs.column_map, dargs.max_samples, dargs.dataset_config)
    model, tok = _load_model(margs)  # on the GPU when there is one (--device_map), see _load_model
    if hasattr(model, "merge_and_unload"):  # --adapter_path: diagnose the adapted routers as a stock model
        model = model.merge_and_unload()
    model.eval()
    encoding = _prompt_encoding(diag_args, tok)
    result = diagnose(
        model,
        tok,
        samples,
        dconfig,
        encoding=encoding,
        output_dir=diag_args.output_dir,
        overwrite=diag_args.overwrite,
        source=str(dargs.train_file),
    )
    print(result["verdict"]["text"])
    figures = ", ".join(result.get("figures", [])) or "none"
    print(
        f"\nnumbers: {os.path.join(diag_args.output_dir, 'diagnose.json')}; report: "
        f"{os.path.join(diag_args.output_dir, 'report.md')}; figures: {figures}"
    )
    return result


if __name__ == "__main__":
    raise SystemExit(main())
