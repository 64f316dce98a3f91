"""``roma-peft``: the command line, TRL-style (``HfArgumentParser`` over config dataclasses).

Subcommands (``roma-peft <command> --help`` lists every option; a single ``.json``/``.yaml`` file may replace the
flags)::

    roma-peft neighbours  --model_name_or_path M --train_file train.jsonl --output_dir nb/          # S, N(i), W, r_j
    roma-peft train       --model_name_or_path M --train_file train.jsonl --neighbourhood_dir nb/ --output_dir out/
    roma-peft evaluate    --model_name_or_path M [--adapter_path out/] --eval_file test.jsonl
    roma-peft merge       --model_name_or_path M --adapter_path out/ --output_dir merged/
    roma-peft export-lora --model_name_or_path M --adapter_path out/ --output_dir lora/
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
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["main", "ModelArguments", "DataArguments", "AdapterArguments", "NeighboursArguments"]

COMMANDS = ("neighbours", "train", "evaluate", "merge", "export-lora", "demo")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Base MoE model (hub name or local directory)."})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Default: the model's."})
    adapter_path: Optional[str] = field(default=None, metadata={"help": "A saved RoMA adapter to load."})
    dtype: str = field(default="auto", metadata={"help": "'auto', 'float32', 'bfloat16' or 'float16'."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote model code."})


@dataclass
class DataArguments:
    train_file: Optional[str] = field(default=None, metadata={"help": "Training samples: JSONL or hub name."})
    train_split: Optional[str] = field(default=None, metadata={"help": "Split of a hub dataset (default train)."})
    eval_file: Optional[str] = field(default=None, metadata={"help": "Evaluation samples: JSONL or hub name."})
    eval_split: Optional[str] = field(default=None, metadata={"help": "Split of the hub eval dataset."})
    column_map: Optional[str] = field(default=None, metadata={"help": "A roma_peft.data.HUB_COLUMN_MAPS name."})
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
    batch_size: int = field(default=16, metadata={"help": "Batch size of scoring and routing capture."})


@dataclass
class TrainCommandArguments:
    neighbourhood_dir: Optional[str] = field(
        default=None, metadata={"help": "Output of `roma-peft neighbours` (needed by manifold/random/self)."}
    )


@dataclass
class EvalCommandArguments:
    output_file: Optional[str] = field(default=None, metadata={"help": "Write per-sample predictions (JSON)."})
    prompt_template: str = field(default="Question: {question}\nAnswer:", metadata={"help": "Prompt template."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward."})


@dataclass
class OutputArguments:
    output_dir: str = field(metadata={"help": "Output directory (must be new or empty)."})
    overwrite: bool = field(default=False, metadata={"help": "Allow writing into a non-empty directory."})
    adapter_name: str = field(default="default", metadata={"help": "Adapter to export."})


# ---------------------------------------------------------------------------------------------- helpers
def _parse(dataclasses, argv, prog):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclasses, prog=f"roma-peft {prog}")
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def _load_model(margs: ModelArguments, adapter: Optional[AdapterArguments] = None, trainable: bool = False):
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import roma_peft  # noqa: F401  (registers ROMA)

    dtype = margs.dtype if margs.dtype == "auto" else getattr(torch, margs.dtype)
    model = AutoModelForCausalLM.from_pretrained(margs.model_name_or_path, dtype=dtype,
                                                 trust_remote_code=margs.trust_remote_code)
    tok = AutoTokenizer.from_pretrained(margs.tokenizer_name_or_path or margs.model_name_or_path,
                                        trust_remote_code=margs.trust_remote_code)
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if margs.adapter_path:
        model = PeftModel.from_pretrained(model, margs.adapter_path, is_trainable=trainable)
    elif adapter is not None:
        model = get_peft_model(model, adapter.to_config())
    return model, tok


def _samples(path, split, column_map, max_samples):
    from .data import load_samples

    samples = load_samples(path, column_map=column_map, split=split)
    return samples[:max_samples] if max_samples else samples


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---------------------------------------------------------------------------------------------- commands
def cmd_neighbours(argv) -> dict:
    from .capture import RoutingRecorder, RoutingSpec, collect_routing
    from .embeddings import embed_samples
    from .neighbours import NeighbourhoodConfig, build_neighbourhood
    from .scoring import score_multiple_choice
    from .trainer import routing_spec_string

    margs, dargs, aargs, nconfig, nargs = _parse(
        (ModelArguments, DataArguments, AdapterArguments, NeighbourhoodConfig, NeighboursArguments), argv, "neighbours"
    )
    if not dargs.train_file:
        raise SystemExit("roma-peft neighbours: --train_file is required")
    samples = _samples(dargs.train_file, dargs.train_split, dargs.column_map, dargs.max_samples)
    model, tok = _load_model(margs, aargs)
    spec = RoutingSpec(nargs.routing_position, nargs.routing_num_tokens, nargs.routing_representation)
    os.makedirs(nargs.output_dir, exist_ok=True)
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        scores = score_multiple_choice(model, tok, samples, batch_size=nargs.batch_size,
                                       template=nargs.prompt_template)
    scores.save(os.path.join(nargs.output_dir, "base_scores.json"))
    embeddings = embed_samples(samples, nconfig.embedding_model, field=nconfig.embed_field)
    recorder = RoutingRecorder(model, spec=spec)
    tag = routing_spec_string(spec, recorder.routers)
    recorder.remove()
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        routing = collect_routing(model, tok, samples, spec=spec, batch_size=nargs.batch_size,
                                  template=nargs.prompt_template)
    nb = build_neighbourhood(samples, scores, embeddings, nconfig, routing=routing, routing_spec=tag)
    nb.save(nargs.output_dir)
    summary = {"base_acc": scores.acc, **nb.summary(), "routing_spec": tag, "output_dir": nargs.output_dir}
    _print(summary)
    return summary


def cmd_train(argv) -> dict:
    from .neighbours import Neighbourhood
    from .trainer import RomaTrainer, RomaTrainingArguments

    margs, dargs, aargs, targs, args = _parse(
        (ModelArguments, DataArguments, AdapterArguments, TrainCommandArguments, RomaTrainingArguments), argv, "train"
    )
    if not dargs.train_file:
        raise SystemExit("roma-peft train: --train_file is required")
    samples = _samples(dargs.train_file, dargs.train_split, dargs.column_map, dargs.max_samples)
    eval_samples = (_samples(dargs.eval_file, dargs.eval_split, dargs.column_map, None) if dargs.eval_file else None)
    model, tok = _load_model(margs, aargs, trainable=True)
    nb = Neighbourhood.load(targs.neighbourhood_dir, samples=samples) if targs.neighbourhood_dir else None
    trainer = RomaTrainer(model=model, args=args, train_dataset=samples, neighbourhood=nb, eval_dataset=eval_samples,
                          processing_class=tok)
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    tok.save_pretrained(args.output_dir)
    metrics = dict(result.metrics)
    if eval_samples is not None:
        metrics.update(trainer.evaluate())
    trainer.save_metrics("train", metrics)
    _print(metrics)
    return metrics


def cmd_evaluate(argv) -> dict:
    from .scoring import score_multiple_choice

    margs, dargs, eargs = _parse((ModelArguments, DataArguments, EvalCommandArguments), argv, "evaluate")
    path = dargs.eval_file or dargs.train_file
    if not path:
        raise SystemExit("roma-peft evaluate: --eval_file is required")
    samples = _samples(path, dargs.eval_split or dargs.train_split, dargs.column_map, dargs.max_samples)
    model, tok = _load_model(margs)
    result = score_multiple_choice(model, tok, samples, batch_size=eargs.batch_size, template=eargs.prompt_template)
    if eargs.output_file:
        result.save(eargs.output_file)
    metrics = {"acc": result.acc, "acc_norm": result.acc_norm, "n": len(samples)}
    _print(metrics)
    return metrics


def _export_model(argv, prog):
    margs, oargs = _parse((ModelArguments, OutputArguments), argv, prog)
    if not margs.adapter_path:
        raise SystemExit(f"roma-peft {prog}: --adapter_path is required")
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


HANDLERS = {"neighbours": cmd_neighbours, "train": cmd_train, "evaluate": cmd_evaluate, "merge": cmd_merge,
            "export-lora": cmd_export_lora, "demo": cmd_demo}


def run(argv: Optional[list[str]] = None):
    """Run one subcommand and return its result (a dict); errors propagate. ``main`` is the console entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in HANDLERS:
        usage = __doc__.split("\n\n", 1)[1]
        if argv and argv[0] not in ("-h", "--help"):
            print(f"roma-peft: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}\n", file=sys.stderr)
            print(usage, file=sys.stderr)
            raise SystemExit(2)
        print(usage)
        return None
    return HANDLERS[argv[0]](argv[1:])


def main(argv: Optional[list[str]] = None) -> int:
    """``roma-peft``: exit status 0 on success; a bad input prints one clear line instead of a traceback."""
    try:
        run(argv)
    except (ValueError, FileNotFoundError, OSError) as exc:
        command = (list(sys.argv[1:] if argv is None else argv) or ["roma-peft"])[0]
        print(f"roma-peft {command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
