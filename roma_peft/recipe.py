"""The paper's experiment as a file: recipes, a dry-run planner and a one-command runner.

A *recipe* (YAML or JSON; shipped ones in ``roma_peft/recipes/``) names everything one reproduction of the paper
needs: the model and how to load it, the training mix (sources and counts), the neighbourhood, the tuned layers and
training settings, the variants to compare (base, router tuning, RoMA, controls), the seeds, the benchmarks and their
protocols, and the architecture facts the dry run needs without downloading anything::

    roma-peft recipe olmoe-1b-7b-0125-instruct --dry_run            # the plan: sizes, steps, passes, memory, time
    roma-peft recipe olmoe-1b-7b-0125-instruct --output_dir runs/olmoe
    accelerate launch --num_processes 8 -m roma_peft.cli recipe qwen3-30b-a3b --output_dir runs/qwen3

:func:`load_recipe` reads and checks a recipe (every bad field is refused naming the field and the valid values,
before any weight loads); :func:`plan_recipe` computes the plan (no download); :func:`run_recipe` runs it:
mix -> neighbourhood (S, N(i), W, r_j) -> train every variant x seed -> evaluate each on the benchmarks -> report.
Each stage runs the same code as the matching ``roma-peft`` command (``cli.cmd_neighbours``, ``cli.cmd_train``, fed a
config file written into ``<output_dir>/stages/``, so every stage can be rerun by hand), the evaluation goes through
:mod:`roma_peft.harness` and the report through :mod:`roma_peft.results_table`. A stage whose output exists is
skipped (and says so) unless ``overwrite``. Under ``accelerate launch`` / ``torchrun`` every rank runs the recipe:
the S stage splits its samples across ranks (:mod:`roma_peft.distributed`), the Trainer runs DDP / FSDP2, and only
the main process writes files and prints. docs/reproducing.md has the commands and the plans.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from .distributed import distributed_state
from .harness import PROTOCOLS
from .loading import normalize_dtype

__all__ = [
    "Recipe",
    "RecipeError",
    "Plan",
    "VARIANTS",
    "STAGES",
    "RECIPES_DIR",
    "shipped_recipes",
    "load_recipe",
    "estimate_parameters",
    "plan_recipe",
    "format_plan",
    "run_recipe",
    "cmd_recipe",
]

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
"""Where the shipped recipes live (package data)."""

SHIPPED_MODEL_PREFIX = "shipped:"
"""``model.name: shipped:roma-mini-olmoe`` names the tiny checkpoint shipped in ``roma_peft/benchmark/assets``."""

STAGES = ("mix", "neighbours", "train", "evaluate", "report")
"""The runner's stages, in order."""

VARIANTS: dict[str, dict | None] = {
    "base": None,  # the untouched model: evaluated, never trained
    "router_tuning": {"regularizer": "none", "roma_lambda": 0.0},  # paper Table 1 "Router Tuning": task loss only
    "roma": {"regularizer": "manifold"},  # paper Eq. 9
    "random": {"regularizer": "random"},  # paper Fig. 8 / Table 5 "Rand": random successful neighbours
    "self": {"regularizer": "self"},  # pull toward the sample's own base routing (roma_peft control)
    "l1": {"regularizer": "l1"},  # paper Fig. 10 / Table 7
    "l2": {"regularizer": "l2"},  # paper Fig. 10 / Table 7
    "entropy": {"regularizer": "entropy"},  # paper Fig. 10 / Table 7
}
"""What each variant name trains: ``None`` = not trained; otherwise the RomaTrainingArguments it overrides."""


# Options per sample of each training source, for counting the scoring passes (one forward row per option).
# Fixed by the dataset's layout, except the two marked "mean", which vary per row (estimates, see the note).
SOURCE_OPTIONS: dict[str, tuple[float, str]] = {
    "commonsense_qa": (5, "5 choices (dataset card)"),
    "social_i_qa": (3, "answerA-C"),
    "openbookqa": (4, "4 choices"),
    "sciq": (4, "3 distractors + correct_answer"),
    "knowref": (2, "two candidates"),
    "multirc": (4, "mean, estimated: the first correct candidate + the wrong ones of a question"),
    "bigbench": (4, "mean, estimated: multiple_choice_targets vary by task (2 to 10+)"),
    "super_glue": (2.03, "BoolQ/RTE/WiC/WSC/COPA 2, CB 3, weighted by the default allocation (docs/data.md)"),
}

# Options per item of each benchmark (lm-eval's task definitions); None = generative.
BENCHMARK_OPTIONS: dict[str, float | None] = {
    "mmlu": 4,
    "hellaswag": 4,
    "piqa": 2,
    "arc_challenge": 4,
    "arc_easy": 4,
    "winogrande": 2,
    "boolq": 2,
    "gsm8k": None,
}


class RecipeError(ValueError):
    """A recipe field is missing, unknown or has a bad value; the message names the field and the valid values."""


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# ------------------------------------------------------------------------------------------------- the recipe
@dataclass
class ModelSpec:
    """The checkpoint and how to load it (the ``roma-peft`` loading flags, docs/loading.md)."""

    name: str = _f(None, "Hub name or local directory; 'shipped:roma-mini-olmoe' = the tiny checkpoint in the package.")
    revision: str | None = _f(None, "Branch, tag or commit of the hub checkpoint.")
    dtype: Literal["auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32"] = _f(
        "auto", "Weights dtype ('auto': the checkpoint's, architecture.dtype). Router deltas are float32 anyway."
    )
    device_map: str | None = _f(None, "As --device_map (None: the GPU when there is one; train: the Trainer's).")
    attn_implementation: str | None = _f(None, "As --attn_implementation ('sdpa', 'flash_attention_2', ...).")
    trust_remote_code: bool = _f(False, "Run the checkpoint's own modelling code (DeepSeekMoE).")
    use_chat_template: bool = _f(False, "Wrap questions in the tokenizer's chat template (instruct models).")
    system_prompt: str | None = _f(None, "With use_chat_template: a system turn.")
    prompt_template: str = _f("Question: {question}\nAnswer:", "Prompt template (inside the chat turn if any).")

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise RecipeError(
                "model.name is required: a hub name (allenai/OLMoE-1B-7B-0125-Instruct), a local "
                f"directory, or '{SHIPPED_MODEL_PREFIX}roma-mini-olmoe'."
            )

    def path(self) -> str:
        """The name to load: ``shipped:<dir>`` resolved to the package's asset directory."""
        if self.name.startswith(SHIPPED_MODEL_PREFIX):
            from .benchmark.suite import shipped_model_path

            shipped = shipped_model_path()
            wanted = self.name[len(SHIPPED_MODEL_PREFIX) :]
            if wanted != shipped.name:
                raise RecipeError(
                    f"model.name {self.name!r}: the package ships only '{SHIPPED_MODEL_PREFIX}{shipped.name}'."
                )
            return str(shipped)
        return self.name


@dataclass
class ArchitectureSpec:
    """Architecture facts for the dry run (from the checkpoint's config.json; nothing is downloaded)."""

    source: str = _f("", "Where these numbers come from (a config.json, a model card, a count).")
    model_type: str = _f("", "config.json model_type.")
    dtype: Literal["bfloat16", "float16", "float32"] = _f("bfloat16", "The checkpoint's dtype (config torch_dtype).")
    params_total: int = _f(0, "All parameters (embeddings included).")
    params_active: int = _f(0, "Parameters used per token (k routed experts + shared experts + the rest).")
    num_hidden_layers: int = _f(0, "Decoder layers.")
    first_moe_layer: int = _f(0, "Index of the first MoE layer (DeepSeekMoE: 1, its layer 0 is dense).")
    hidden_size: int = _f(0, "Hidden size h.")
    num_attention_heads: int = _f(0, "Query heads.")
    num_key_value_heads: int = _f(0, "Key/value heads (GQA).")
    head_dim: int = _f(0, "Per-head dimension.")
    num_experts: int = _f(0, "Routed experts per MoE layer (E).")
    experts_per_token: int = _f(0, "Routed experts per token (top-k).")
    moe_intermediate_size: int = _f(0, "Intermediate size of one routed expert.")
    num_shared_experts: int = _f(0, "Shared (always active) experts.")
    shared_intermediate_size: int = _f(0, "Intermediate size of all shared experts together.")
    dense_intermediate_size: int = _f(0, "Intermediate size of the dense MLP of the layers before first_moe_layer.")
    vocab_size: int = _f(0, "Vocabulary size.")
    tie_word_embeddings: bool = _f(False, "Input and output embeddings shared.")
    router_bias: bool = _f(False, "Routers carry a bias.")

    def __post_init__(self):
        for name in (
            "params_total",
            "params_active",
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_experts",
            "experts_per_token",
            "moe_intermediate_size",
            "vocab_size",
        ):
            if getattr(self, name) < 1:
                raise RecipeError(
                    f"architecture.{name} must be a positive integer (from the model's config.json), "
                    f"got {getattr(self, name)!r}."
                )
        if not 0 <= self.first_moe_layer < self.num_hidden_layers:
            raise RecipeError(
                f"architecture.first_moe_layer must be in [0, {self.num_hidden_layers}), got {self.first_moe_layer}."
            )
        if self.experts_per_token > self.num_experts:
            raise RecipeError(
                f"architecture.experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})."
            )
        if self.params_active > self.params_total:
            raise RecipeError("architecture.params_active exceeds params_total.")

    @property
    def moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_moe_layer


@dataclass
class DataSpec:
    """The training mix (roma_peft.recipe_data.paper_training_mix)."""

    sources: dict[str, int] = _f({}, "Samples per source: the paper's PAPER_COUNTS, or any registry name.")
    seed: int = _f(0, "Seed of the draw (same seed, same rows).")
    split: str = _f("train", "Split drawn from (validation and test stay unseen).")
    bigbench_tasks: list[str] | None = _f(None, "BIG-Bench tasks (default: recipe_data.BIGBENCH_TASKS).")
    superglue_tasks: list[str] | None = _f(None, "SuperGLUE tasks (default: recipe_data.SUPERGLUE_TASKS).")
    local_copies: dict[str, str] = _f(
        {},
        "member name -> local copy in the hub's schema (file or folder), read "
        "with that member's converter; relative paths: from the recipe file.",
    )
    strict: bool = _f(False, "A source with fewer rows than asked is an error (default: a warning, all rows used).")

    def __post_init__(self):
        from .recipe_data import PAPER_COUNTS, source_members

        if not self.sources:
            raise RecipeError(f"data.sources is empty; the paper's: {dict(PAPER_COUNTS)}.")
        for name, count in self.sources.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise RecipeError(f"data.sources.{name} must be a sample count (integer >= 0), got {count!r}.")
            try:
                source_members(name, self.bigbench_tasks, self.superglue_tasks)
            except ValueError as exc:
                raise RecipeError(
                    f"data.sources: unknown source {name!r}. The paper's sources: {list(PAPER_COUNTS)}; registry: {exc}"
                ) from None

    @property
    def size(self) -> int:
        return sum(self.sources.values())


@dataclass
class NeighbourhoodSpec:
    """How S's neighbourhoods are built (roma_peft.neighbours.NeighbourhoodConfig) and the S stage's batching."""

    method: Literal["knn", "eps", "random"] = _f("knn", "Paper Eq. 3 (k-NN), Eq. 4 (eps-ball), or random.")
    k: int = _f(3, "Neighbours per sample (paper Fig. 8: k=3 best).")
    eps: float = _f(0.5, "Similarity threshold of method='eps'.")
    sigma: float | None = _f(None, "Gaussian bandwidth of Eq. 5 (None: from the data).")
    embedding_model: str | None = _f(None, "Sentence embedder (None: the packaged all-MiniLM-L6-v2).")
    success_metric: Literal["acc", "acc_norm"] = _f("acc", "What counts as correct for S.")
    batch_size: int = _f(16, "Scoring / capture batch size.")
    shard_block_size: int = _f(256, "Samples per block of the sharded S stage.")

    def __post_init__(self):
        try:
            self.config().validate()
        except ValueError as exc:
            raise RecipeError(f"neighbourhood: {exc}") from None
        for name in ("batch_size", "shard_block_size"):
            if getattr(self, name) < 1:
                raise RecipeError(f"neighbourhood.{name} must be >= 1, got {getattr(self, name)}.")

    def config(self):
        from .neighbours import NeighbourhoodConfig

        kw = dict(method=self.method, k=self.k, eps=self.eps, sigma=self.sigma, success_metric=self.success_metric)
        if self.embedding_model:
            kw["embedding_model"] = self.embedding_model
        return NeighbourhoodConfig(**kw)


@dataclass
class AdapterSpec:
    """Which routers are tuned (roma_peft.RomaConfig)."""

    layer_selection: Literal["last", "first", "middle", "all"] = _f("last", "Paper Fig. 6: the last layers.")
    num_layers: int = _f(5, "MoE layers tuned (paper: the last 5).")
    train_router_bias: bool = _f(True, "Also adapt a router bias where there is one.")

    def __post_init__(self):
        if self.num_layers < 1:
            raise RecipeError(f"adapter.num_layers must be >= 1, got {self.num_layers}.")


@dataclass
class TrainingSpec:
    """Training settings (roma_peft.trainer.RomaTrainingArguments); ``extra`` passes any other of its fields."""

    roma_lambda: float = _f(0.8, "lambda of Eq. 9 (released script: 0.8).")
    learning_rate: float = _f(7e-5, "AdamW learning rate (released script).")
    weight_decay: float = _f(0.01, "Weight decay (released script).")
    num_train_epochs: float = _f(3.0, "Epochs (released script).")
    per_device_train_batch_size: int = _f(32, "Batch size per process (released script: 32 on one GPU).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: the epochs decide).")
    max_length: int | None = _f(None, "Longest row in tokens (None: no truncation).")
    bf16: bool = _f(False, "bf16 autocast (the router deltas stay float32).")
    routing_position: Literal["last", "first", "middle", "all"] = _f("last", "Paper Fig. 7: Last1 best.")
    routing_num_tokens: int = _f(1, "N of Last-N.")
    extra: dict[str, Any] = _f(
        {},
        "Any other RomaTrainingArguments / TrainingArguments field, e.g. "
        "{save_steps: 500, fsdp: true, fsdp_config: fsdp2.json}.",
    )

    def __post_init__(self):
        if not (math.isfinite(self.roma_lambda) and self.roma_lambda >= 0):
            raise RecipeError(f"training.roma_lambda must be a finite number >= 0, got {self.roma_lambda!r}.")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "routing_num_tokens"):
            if getattr(self, name) < 1:
                raise RecipeError(f"training.{name} must be >= 1, got {getattr(self, name)}.")
        if not self.num_train_epochs > 0:
            raise RecipeError(f"training.num_train_epochs must be > 0, got {self.num_train_epochs}.")
        if self.max_length is not None and self.max_length < 2:
            raise RecipeError(f"training.max_length must be >= 2 or null, got {self.max_length}.")
        from .trainer import RomaTrainingArguments

        known = {f.name for f in dataclasses.fields(RomaTrainingArguments)}
        reserved = {f.name for f in dataclasses.fields(TrainingSpec)} | {
            "output_dir",
            "seed",
            "regularizer",
            "prompt_template",
            "use_chat_template",
            "system_prompt",
        }
        for name in self.extra:
            if name in reserved:
                raise RecipeError(
                    f"training.extra.{name}: set by the recipe itself (training.{name}, model.*, "
                    "variants or seeds); remove it from extra."
                )
            if name not in known:
                raise RecipeError(
                    f"training.extra.{name}: not a RomaTrainingArguments field (see roma-peft train --help)."
                )


@dataclass
class EvaluationSpec:
    """Benchmarks and protocols (roma_peft.harness.evaluate_protocols)."""

    benchmarks: list[str] = _f([], "Of the paper's eight (roma_peft.harness.PAPER_BENCHMARKS).")
    protocols: list[Literal["lm_eval", "letter"]] = _f(
        ["lm_eval"], "lm_eval: lm-eval's task definitions; letter: the paper's zero-shot letter protocol."
    )
    mode: Literal["adapter", "merged", "lora"] = _f(
        "adapter",
        "How a trained variant is evaluated: the adapter in-process, a merged checkpoint, or the LoRA export.",
    )
    limit: int | None = _f(None, "Items per benchmark (None: all; for smoke runs).")
    batch_size: int = _f(16, "Evaluation batch size.")
    num_fewshot: int = _f(0, "lm-eval shots (the paper: zero-shot).")
    include_path: str | None = _f(None, "Folder of extra lm-eval task YAMLs (relative: from the recipe file).")
    tasks: dict[str, str] = _f({}, "benchmark -> lm-eval task replacing the stock one (local stand-ins).")
    local_copies: dict[str, str] = _f(
        {},
        "benchmark -> local file of its rows (sample schema) for the letter "
        "protocol, instead of the hub (relative: from the recipe file).",
    )
    data_loader: str | None = _f(
        None,
        "'file.py:function' giving the letter protocol's rows, function(source, "
        "split) -> samples (relative: from the recipe file); default: the hub.",
    )
    letters: str = _f("ABCDEFGHIJ", "Option labels of the letter protocol.")
    use_chat_template: bool | None = _f(
        None,
        "Evaluate with the tokenizer's chat template (lm-eval's apply_chat_template, and the letter protocol's "
        "prompts); default (null): as model.use_chat_template, i.e. as the model was trained and S was built.",
    )
    benchmark_sizes: dict[str, int] = _f({}, "Items per benchmark for the dry run (default: the paper's Fig. 12).")

    def __post_init__(self):
        valid = list(BENCHMARK_OPTIONS)
        if not self.benchmarks:
            raise RecipeError(f"evaluation.benchmarks is empty; the paper's: {valid}.")
        unknown = [b for b in self.benchmarks if b not in BENCHMARK_OPTIONS]
        if unknown:
            raise RecipeError(
                f"evaluation.benchmarks: unknown benchmark(s) {unknown}; valid: {valid} (a local "
                "stand-in task goes in evaluation.tasks: {benchmark: task})."
            )
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise RecipeError(f"evaluation.benchmarks lists a benchmark twice: {self.benchmarks}.")
        for name in ("tasks", "local_copies", "benchmark_sizes"):
            extra = [b for b in getattr(self, name) if b not in self.benchmarks]
            if extra:
                raise RecipeError(f"evaluation.{name}: {extra} not among evaluation.benchmarks {self.benchmarks}.")
        if len(set(self.protocols)) != len(self.protocols) or not self.protocols:
            raise RecipeError(
                f"evaluation.protocols must list each of {list(PROTOCOLS)} at most once, got {self.protocols!r}."
            )
        if self.limit is not None and self.limit < 1:
            raise RecipeError(f"evaluation.limit must be >= 1 or null, got {self.limit}.")
        if self.data_loader is not None and (
            self.data_loader.count(":") < 1 or not self.data_loader.rsplit(":", 1)[0].endswith(".py")
        ):
            raise RecipeError(f"evaluation.data_loader must be 'path/to/file.py:function', got {self.data_loader!r}.")
        if self.batch_size < 1 or self.num_fewshot < 0:
            raise RecipeError("evaluation.batch_size must be >= 1 and evaluation.num_fewshot >= 0.")


@dataclass
class EstimateSpec:
    """Assumptions of the dry run's time and memory figures (stated in the plan; not measurements)."""

    mean_prompt_tokens: int = _f(160, "Mean prompt tokens per sample (for FLOPs).")
    mean_answer_tokens: int = _f(4, "Mean answer tokens per option (for FLOPs and the logits kept).")
    max_tokens: int | None = _f(None, "Padded row length for the memory estimate (None: training.max_length).")
    generation_tokens: int = _f(256, "New tokens per generative item (lm-eval's gsm8k max_gen_toks).")
    effective_tflops: float = _f(100.0, "Sustained TFLOP/s per GPU the time estimate assumes.")
    gpus: int = _f(1, "GPUs (processes) the time is divided over.")

    def __post_init__(self):
        for name in ("mean_prompt_tokens", "mean_answer_tokens", "gpus"):
            if getattr(self, name) < 1:
                raise RecipeError(f"estimate.{name} must be >= 1, got {getattr(self, name)}.")
        if not self.effective_tflops > 0:
            raise RecipeError(f"estimate.effective_tflops must be > 0, got {self.effective_tflops}.")


@dataclass
class Recipe:
    """One reproduction of the paper's experiment (see the module docstring). Build with :func:`load_recipe`."""

    name: str = _f("", "Recipe name (the shipped file's stem).")
    model: ModelSpec = _f(None, "The checkpoint and its loading options.")
    architecture: ArchitectureSpec = _f(None, "Architecture facts for the dry run.")
    data: DataSpec = _f(None, "The training mix.")
    description: str = _f("", "One line.")
    paper_model: Literal["olmoe", "deepseekmoe"] | None = _f(None, "The paper's Table 1 block to compare with.")
    neighbourhood: NeighbourhoodSpec = _f(None, "Neighbourhood settings.")
    adapter: AdapterSpec = _f(None, "Tuned routers.")
    training: TrainingSpec = _f(None, "Training settings.")
    variants: list[str] = _f(["base", "router_tuning", "roma"], f"Variants to run, from {list(VARIANTS)}.")
    seeds: list[int] = _f([0], "Training seeds of every trained variant.")
    evaluation: EvaluationSpec = _f(None, "Benchmarks and protocols.")
    estimate: EstimateSpec = _f(None, "Dry-run assumptions.")
    base_dir: str | None = _f(None, "Folder relative paths are resolved from (set by load_recipe).")

    def __post_init__(self):
        for name, cls in (
            ("neighbourhood", NeighbourhoodSpec),
            ("adapter", AdapterSpec),
            ("training", TrainingSpec),
            ("estimate", EstimateSpec),
        ):
            if getattr(self, name) is None:
                setattr(self, name, cls())
        for name in ("model", "architecture", "data", "evaluation"):
            if getattr(self, name) is None:
                raise RecipeError(f"recipe field {name!r} is required.")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise RecipeError(f"variants: unknown variant(s) {unknown}; valid: {list(VARIANTS)}.")
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise RecipeError(f"variants must list distinct names from {list(VARIANTS)}, got {self.variants!r}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise RecipeError(f"seeds must be a non-empty list of distinct integers, got {self.seeds!r}.")
        if self.adapter.num_layers > self.architecture.moe_layers and self.adapter.layer_selection != "all":
            raise RecipeError(
                f"adapter.num_layers ({self.adapter.num_layers}) exceeds the model's MoE layers "
                f"({self.architecture.moe_layers}, architecture)."
            )

    def resolve(self, path: str | None) -> str | None:
        """A path of the recipe, relative ones taken from the recipe file's folder."""
        if path is None or os.path.isabs(path) or self.base_dir is None:
            return path
        return os.path.normpath(os.path.join(self.base_dir, path))

    @property
    def trained_variants(self) -> list[str]:
        return [v for v in self.variants if VARIANTS[v] is not None]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("base_dir")
        return d


# --------------------------------------------------------------------------------------------- loading recipes
def shipped_recipes() -> list[str]:
    """Names of the recipes shipped with the package (``roma-peft recipe NAME``)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _check_type(value, hint, where: str):
    """``value`` converted to ``hint`` (int -> float allowed), or a RecipeError naming ``where``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Union or origin is types.UnionType:  # Optional[X] and X | None
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], where) if len(inner) == 1 else value
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{where}: {value!r} is not one of {list(args)}.")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where} must be a list, got {type(value).__name__} {value!r}.")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be a mapping, got {type(value).__name__} {value!r}.")
        return {k: _check_type(v, args[1], f"{where}.{k}") for k, v in value.items()} if args else value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 7e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise RecipeError(f"{where} must be {hint.__name__}, got {type(value).__name__} {value!r}.")
    return value


def _build(cls, data, where: str):
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping of fields, got {type(data).__name__} {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.name != "base_dir"}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {unknown}; valid: {sorted(fields)}.")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        try:
            if path.endswith(".json"):
                data = json.load(f)
            else:
                import yaml

                data = yaml.safe_load(f)
        except Exception as exc:  # noqa: BLE001 - JSON or YAML syntax errors, as one line
            raise RecipeError(f"recipe {path!r} cannot be parsed: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path!r} must hold a mapping of fields, got {type(data).__name__}.")
    return data


def load_recipe(path_or_name: str | os.PathLike | dict, overrides: dict | None = None) -> Recipe:
    """A checked :class:`Recipe` from a shipped name (``olmoe-1b-7b-0125-instruct``), a YAML/JSON file, or a dict.

    ``overrides`` replaces top-level fields (``{"seeds": [0], "variants": [...]}``) before the checks. Every bad
    field raises :class:`RecipeError` naming the field and the valid values; nothing is loaded or downloaded.
    """
    if isinstance(path_or_name, dict):
        data, base = dict(path_or_name), None
        data.setdefault("name", "custom")
    else:
        text = os.fspath(path_or_name)
        shipped = RECIPES_DIR / f"{text}.yaml"
        if os.path.isfile(text):
            path = text
        elif "/" not in text and not text.endswith((".yaml", ".yml", ".json")) and shipped.is_file():
            path = str(shipped)
        else:
            raise RecipeError(f"no recipe {text!r}: not a file, and not a shipped recipe ({shipped_recipes()}).")
        data, base = _read(path), os.path.dirname(os.path.abspath(path))
        data.setdefault("name", Path(path).stem)
    data.update(overrides or {})
    recipe = _build(Recipe, data, "")
    recipe.base_dir = base
    return recipe


# ---------------------------------------------------------------------------------------------------- the plan
def estimate_parameters(arch: ArchitectureSpec) -> tuple[int, int]:
    """``(total, active)`` parameters from the architecture facts: embeddings, attention (q, k, v, o), routers,
    routed experts (gate, up, down: 3·h·I each), shared experts and dense MLPs. Norm weights are left out (< 0.01 %),
    so this is a check of the recipe's counts, not a replacement for them."""
    h, e, k = arch.hidden_size, arch.num_experts, arch.experts_per_token
    d_q, d_kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    attention = 2 * h * d_q + 2 * h * d_kv
    expert = 3 * h * arch.moe_intermediate_size
    shared = 3 * h * arch.shared_intermediate_size
    router = e * h + (e if arch.router_bias else 0)
    dense = 3 * h * arch.dense_intermediate_size
    embeddings = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    moe_layers, dense_layers = arch.moe_layers, arch.first_moe_layer
    total = (
        embeddings
        + arch.num_hidden_layers * attention
        + dense_layers * dense
        + moe_layers * (router + e * expert + shared)
    )
    active = total - moe_layers * (e - k) * expert
    return total, active


def _bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


@dataclass
class Plan:
    """What :func:`run_recipe` would do, computed without downloading anything (:func:`plan_recipe`)."""

    recipe: str
    model: str
    mix: dict[str, int]
    mix_size: int
    runs: list[dict]  # one per trained variant x seed: variant, seed, steps, rows
    steps_per_run: int
    global_batch: int
    passes: dict[str, dict]  # stage -> {"forward": n, ...}
    evaluation: dict[str, dict]  # benchmark -> {"items", "options", "rows", "models"}
    memory: dict[str, int]  # bytes
    flops: dict[str, float]
    time_s: dict[str, float]
    assumptions: list[str]
    formulas: dict[str, str]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _dtype_bytes(recipe: Recipe) -> int:
    dtype = recipe.model.dtype
    return normalize_dtype(recipe.architecture.dtype if dtype == "auto" else dtype).itemsize


def _tuned_span(recipe: Recipe) -> tuple[int, int]:
    """(number of tuned MoE layers, decoder layers from the first tuned one to the top)."""
    arch, ad = recipe.architecture, recipe.adapter
    moe = list(range(arch.first_moe_layer, arch.num_hidden_layers))
    n = len(moe) if ad.layer_selection == "all" else min(ad.num_layers, len(moe))
    if ad.layer_selection == "last":
        chosen = moe[-n:]
    elif ad.layer_selection == "first" or ad.layer_selection == "all":
        chosen = moe[:n]
    else:
        start = (len(moe) - n) // 2
        chosen = moe[start : start + n]
    return n, arch.num_hidden_layers - chosen[0]


def activation_elements_per_token(arch: ArchitectureSpec) -> int:
    """Tensor elements one token keeps for the backward in one MoE decoder layer (the formula of the memory estimate):

    attention ``2h + 3·d_q + 3·d_kv`` (residual and normed input; q, k, v; q and k after RoPE/norm; the attention
    output; a memory-efficient kernel keeps no T x T scores) + MoE block ``2h + 2E + k·(h + 3·I) + 3·I_shared``
    (residual and normed input; router logits and probabilities; per routed copy its input, gate, up and gated
    product; the shared experts' three).
    """
    h, e, k = arch.hidden_size, arch.num_experts, arch.experts_per_token
    d_q, d_kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    attention = 2 * h + 3 * d_q + 3 * d_kv
    moe = 2 * h + 2 * e + k * (h + 3 * arch.moe_intermediate_size) + 3 * arch.shared_intermediate_size
    return attention + moe


def plan_recipe(recipe: Recipe, world_size: int | None = None) -> Plan:
    """The dry run: sizes, optimizer steps, forward passes per stage, GPU memory and time, without any download.

    ``world_size``: processes sharing the training batch and the passes (default ``recipe.estimate.gpus``).
    Memory (bytes, one GPU, training): weights ``params_total x dtype bytes`` + activations kept for the backward
    ``micro_batch x max_tokens x layers_from_first_tuned x activation_elements_per_token x dtype bytes`` (the frozen
    layers below the first tuned one keep nothing: their inputs need no gradient) + logits ``micro_batch x
    answer_tokens x vocab x 4 x 2`` (float32 logits and their gradient, only at answer positions) + router deltas
    ``tuned_layers x E x h x 16`` (float32 value, gradient, Adam m and v). Time = FLOPs / (effective TFLOP/s x GPUs)
    with FLOPs = 2 x params_active x tokens per forward and as much again for the backward above the first tuned layer.
    """
    arch, tr, est, ev = recipe.architecture, recipe.training, recipe.estimate, recipe.evaluation
    world = world_size or est.gpus
    n = recipe.data.size
    global_batch = tr.per_device_train_batch_size * world * tr.gradient_accumulation_steps
    batches = math.ceil(n / (tr.per_device_train_batch_size * world))
    per_epoch = max(1, math.ceil(batches / tr.gradient_accumulation_steps))
    steps = tr.max_steps if tr.max_steps > 0 else math.ceil(per_epoch * tr.num_train_epochs)
    rows = steps * global_batch if tr.max_steps > 0 else math.ceil(n * tr.num_train_epochs)
    runs = [
        {"variant": v, "seed": s, "steps": steps, "rows": rows} for v in recipe.trained_variants for s in recipe.seeds
    ]

    score_rows = sum(count * SOURCE_OPTIONS.get(src, (4, ""))[0] for src, count in recipe.data.sources.items())
    tuned, span = _tuned_span(recipe)
    models_evaluated = (1 if "base" in recipe.variants else 0) + len(runs)
    evaluation = {}
    eval_rows = eval_tokens = 0.0
    for b in ev.benchmarks:
        from .recipe_data import PAPER_BENCHMARKS

        items = ev.benchmark_sizes.get(b) or (PAPER_BENCHMARKS[b].paper_size if b in PAPER_BENCHMARKS else 0)
        items = min(items, ev.limit) if ev.limit else items
        options = BENCHMARK_OPTIONS.get(b, 4)
        per_protocol = {}
        for p in ev.protocols:
            if options is None and p == "letter":  # no options: the letter protocol does not apply (harness)
                per_protocol[p] = {"not applicable": 0}
            elif options is None:  # generative: one generation per item
                per_protocol[p] = {"generations": items}
                eval_tokens += items * (est.mean_prompt_tokens + est.generation_tokens) * models_evaluated
            else:
                rows = items * options if p == "lm_eval" else items  # letter: one forward scores every letter
                per_protocol[p] = {"forward_rows": rows}
                eval_rows += rows * models_evaluated
        evaluation[b] = {"items": items, "options": options, "per_model": per_protocol, "models": models_evaluated}

    row_tokens = est.mean_prompt_tokens + est.mean_answer_tokens
    train_rows = sum(r["rows"] for r in runs)
    passes = {
        "base_scoring": {"forward_rows": int(round(score_rows)), "tokens": int(round(score_rows * row_tokens))},
        "routing_capture": {"forward_rows": n, "tokens": n * est.mean_prompt_tokens},
        "embedding": {"embedder_forwards": n},
        "training": {"forward_backward_rows": train_rows, "per_run": runs[0]["rows"] if runs else 0, "runs": len(runs)},
        "evaluation": {"forward_rows": int(eval_rows), "models": models_evaluated},
    }

    dtype_bytes = _dtype_bytes(recipe)
    max_tokens = est.max_tokens or tr.max_length or 2048
    micro = tr.per_device_train_batch_size
    delta_params = tuned * (arch.num_experts * arch.hidden_size + (arch.num_experts if arch.router_bias else 0))
    memory = {
        "weights": arch.params_total * dtype_bytes,
        "activations": micro * max_tokens * span * activation_elements_per_token(arch) * dtype_bytes,
        "logits": micro * est.mean_answer_tokens * arch.vocab_size * 4 * 2,
        "optimizer": delta_params * 16,
    }
    memory["training_total"] = sum(memory.values())
    memory["router_delta_params"] = delta_params

    fwd = 2.0 * arch.params_active
    backward_share = span / arch.num_hidden_layers  # the backward runs only above the first tuned layer
    flops = {
        "S stage": fwd * (score_rows * row_tokens + n * est.mean_prompt_tokens),
        "training": fwd * (1 + backward_share) * train_rows * row_tokens,
        "evaluation": fwd * (eval_rows * row_tokens + eval_tokens),
    }
    rate = est.effective_tflops * 1e12 * world
    time_s = {k: v / rate for k, v in flops.items()}
    time_s["total"] = sum(time_s.values())
    assumptions = [
        f"throughput: {est.effective_tflops:g} TFLOP/s sustained per GPU x {world} GPU(s) (an assumption, not a "
        "measurement; MoE kernels and short sequences run far below the GPU's peak)",
        f"tokens: {est.mean_prompt_tokens} per prompt and {est.mean_answer_tokens} per answer on average (assumed); "
        f"memory at rows padded to {max_tokens} tokens (estimate.max_tokens, else training.max_length, else 2048)",
        "options per sample: "
        + ", ".join(f"{s} {SOURCE_OPTIONS.get(s, (4, 'assumed'))[0]:g}" for s in recipe.data.sources)
        + " (bigbench, multirc: estimated means)",
        "benchmark sizes: the paper's Appendix Fig. 12 (or evaluation.benchmark_sizes / limit); GSM8K generation "
        f"counted as {est.generation_tokens} new tokens per item (FLOPs only: generation is memory-bound, slower)",
        "the embedder (MiniLM, 22M parameters) is left out of the FLOPs",
    ]
    formulas = {
        "weights": "params_total x dtype bytes",
        "activations": "micro_batch x max_tokens x layers_from_first_tuned x (attention 2h+3d_q+3d_kv + MoE "
        "2h+2E+k(h+3I)+3I_shared) x dtype bytes",
        "logits": "micro_batch x answer_tokens x vocab x 4 B x 2 (fp32 logits + gradient, answer positions only)",
        "optimizer": "tuned_layers x E x h x 16 B (fp32 delta, gradient, Adam m, v)",
        "steps": f"ceil(ceil(|mix| / (batch x processes)) / grad_accum) x epochs = ceil(ceil({n} / "
        f"{micro * world}) / {tr.gradient_accumulation_steps}) x {tr.num_train_epochs:g}",
        "FLOPs": "2 x params_active x tokens (forward) x (1 + layers_from_first_tuned / layers) when training",
    }
    return Plan(
        recipe=recipe.name,
        model=recipe.model.name,
        mix=dict(recipe.data.sources),
        mix_size=n,
        runs=runs,
        steps_per_run=steps,
        global_batch=global_batch,
        passes=passes,
        evaluation=evaluation,
        memory=memory,
        flops=flops,
        time_s=time_s,
        assumptions=assumptions,
        formulas=formulas,
    )


def format_plan(plan: Plan) -> str:
    """The plan as text (what ``roma-peft recipe NAME --dry_run`` prints)."""
    lines = [f"recipe {plan.recipe}: {plan.model}", "", f"training mix: {plan.mix_size:,} samples"]
    lines += [f"  {src:<16}{count:>8,}" for src, count in plan.mix.items()]
    lines += [
        "",
        "stages:",
        f"  S: base scoring      {plan.passes['base_scoring']['forward_rows']:>12,} forward rows (sum of options)",
        f"  S: routing capture   {plan.passes['routing_capture']['forward_rows']:>12,} forward rows (prompts)",
        f"  S: embedding         {plan.passes['embedding']['embedder_forwards']:>12,} embedder forwards",
    ]
    tr = plan.passes["training"]
    lines.append(
        f"  training            {tr['runs']} run(s) x {tr['per_run']:,} forward+backward rows, "
        f"{plan.steps_per_run:,} optimizer steps each (global batch {plan.global_batch})"
    )
    for variant in dict.fromkeys(r["variant"] for r in plan.runs):
        seeds = [str(r["seed"]) for r in plan.runs if r["variant"] == variant]
        lines.append(f"    {variant:<14} seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}")
    lines.append(f"  evaluation          {plan.passes['evaluation']['models']} model(s) x benchmarks:")
    for b, e in plan.evaluation.items():
        per = ", ".join(
            f"{p}: not applicable"
            if "not applicable" in v
            else f"{p}: {next(iter(v.values())):,} {next(iter(v)).replace('_', ' ')}"
            for p, v in e["per_model"].items()
        )
        lines.append(f"    {b:<14} {e['items']:>6,} items  ({per} per model)")
    lines.append(f"                      {plan.passes['evaluation']['forward_rows']:,} forward rows in all")
    m = plan.memory
    lines += [
        "",
        "GPU memory (training, one GPU; estimate):",
        f"  weights             {_bytes(m['weights']):>12}   {plan.formulas['weights']}",
        f"  activations         {_bytes(m['activations']):>12}   {plan.formulas['activations']}",
        f"  logits              {_bytes(m['logits']):>12}   {plan.formulas['logits']}",
        f"  router deltas+Adam  {_bytes(m['optimizer']):>12}   {m['router_delta_params']:,} float32 parameters",
        f"  total               {_bytes(m['training_total']):>12}",
        "",
        "time (estimate):",
    ]
    lines += [
        f"  {k:<18}{_duration(v):>12}   ({plan.flops[k]:.2e} FLOPs)" for k, v in plan.time_s.items() if k != "total"
    ]
    lines += [f"  {'total':<18}{_duration(plan.time_s['total']):>12}", "", "assumptions:"]
    lines += [f"  - {a}" for a in plan.assumptions]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ the run
def _say(state, message: str) -> None:
    if state.is_main_process:
        print(f"roma-peft recipe: {message}", file=sys.stderr, flush=True)


def _write_yaml(path: str, data: dict) -> None:
    import yaml

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)


def _mix_loader(recipe: Recipe):
    """``loader(member, split)`` for paper_training_mix: a local copy when the recipe names one, else the hub."""
    from .data import load_samples
    from .recipe_data import hub_loader

    copies = {k: recipe.resolve(v) for k, v in recipe.data.local_copies.items()}

    def loader(member: str, split: str) -> list:
        if member in copies:
            return load_samples(
                copies[member], column_map=member, split=split if os.path.isdir(copies[member]) else None
            )
        return hub_loader(member, split)

    return loader


def _model_args(recipe: Recipe) -> dict:
    m = recipe.model
    args = {"model_name_or_path": m.path(), "dtype": m.dtype, "trust_remote_code": m.trust_remote_code}
    for name in ("revision", "attn_implementation", "device_map"):
        value = getattr(m, name)
        if value is not None:
            args[name] = value
    return args


def _stage_paths(output_dir: str) -> dict:
    return {
        "mix": os.path.join(output_dir, "data", "train.jsonl"),
        "mix_info": os.path.join(output_dir, "data", "mix.json"),
        "neighbours": os.path.join(output_dir, "neighbourhood"),
        "train": os.path.join(output_dir, "train"),
        "evaluate": os.path.join(output_dir, "eval"),
        "report": os.path.join(output_dir, "report"),
        "stages": os.path.join(output_dir, "stages"),
    }


def _settings_hash(recipe: Recipe) -> str:
    """What the stored stage outputs depend on (variants, seeds and evaluation may change between runs)."""
    d = recipe.to_dict()
    keep = {k: d[k] for k in ("model", "data", "neighbourhood", "adapter", "training")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_output_dir(recipe: Recipe, output_dir: str, overwrite: bool) -> None:
    marker = os.path.join(output_dir, "recipe.json")
    if overwrite or not os.path.isfile(marker):
        return
    with open(marker, encoding="utf-8") as f:
        stored = json.load(f)
    if stored.get("settings_hash") != _settings_hash(recipe):
        old = stored.get("recipe", {})
        new = recipe.to_dict()
        changed = [
            f"{section}.{k}"
            for section in ("model", "data", "neighbourhood", "adapter", "training")
            for k in set(old.get(section, {})) | set(new[section])
            if old.get(section, {}).get(k) != new[section].get(k)
        ]
        raise FileExistsError(
            f"--output_dir {output_dir!r} holds a run of recipe {old.get('name')!r} with other settings "
            f"({', '.join(changed[:6]) or 'recipe'}): its stages would be reused. Choose a new --output_dir, or pass "
            "--overwrite to redo every stage."
        )


def check_paths(recipe: Recipe) -> None:
    """The recipe's local files (model directory, data and evaluation copies, include_path) exist: checked before
    any stage runs, so a typo fails in one line instead of after hours of training."""
    checks = [("model.name", recipe.model.path(), False)]
    checks += [(f"data.local_copies.{k}", recipe.resolve(v), True) for k, v in recipe.data.local_copies.items()]
    checks += [
        (f"evaluation.local_copies.{k}", recipe.resolve(v), True) for k, v in recipe.evaluation.local_copies.items()
    ]
    if recipe.evaluation.include_path:
        checks.append(("evaluation.include_path", recipe.resolve(recipe.evaluation.include_path), True))
    if recipe.evaluation.data_loader:
        checks.append(("evaluation.data_loader", recipe.resolve(recipe.evaluation.data_loader.rsplit(":", 1)[0]), True))
    from .loading import looks_like_local_path

    for where, path, local in checks:
        if (local or looks_like_local_path(path)) and not os.path.exists(path):
            hint = (
                " (the tiny-offline recipe reads fixtures of a source checkout: run it from a clone of the repository)"
                if recipe.name == "tiny-offline"
                else ""
            )
            raise FileNotFoundError(f"recipe {recipe.name!r}: {where} {path!r} does not exist{hint}.")


def run_recipe(
    recipe: Recipe, output_dir: str, *, overwrite: bool = False, dry_run: bool = False, stages: list[str] | None = None
) -> dict:
    """Run the recipe into ``output_dir``: mix -> neighbours -> train (variants x seeds) -> evaluate -> report.

    ``stages``: a subset of :data:`STAGES` (default: all). A stage whose output is on disk is skipped (said on
    stderr) unless ``overwrite``. ``dry_run``: return the plan (:func:`plan_recipe`) without running anything.
    Returns ``{"plan"}`` for a dry run, else the records, the report path and what each stage did.
    """
    stages = list(STAGES if stages is None else stages)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise RecipeError(f"stages: unknown stage(s) {bad}; valid: {list(STAGES)}.")
    plan = plan_recipe(recipe)
    if dry_run:
        return {"plan": plan}
    check_paths(recipe)
    state = distributed_state()  # joins the process group under a launcher; rank 0 writes and prints
    _check_output_dir(recipe, output_dir, overwrite)
    state.wait_for_everyone()  # every rank read the stored recipe before the main process rewrites it
    paths = _stage_paths(output_dir)
    done: dict[str, Any] = {}
    if state.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "recipe.json"), "w", encoding="utf-8") as f:
            json.dump({"settings_hash": _settings_hash(recipe), "recipe": recipe.to_dict()}, f, indent=2)
        with open(os.path.join(output_dir, "plan.txt"), "w", encoding="utf-8") as f:
            f.write(format_plan(plan) + "\n")
    if "mix" in stages:
        done["mix"] = _stage_mix(recipe, paths, overwrite, state)
    if "neighbours" in stages:
        done["neighbours"] = _stage_neighbours(recipe, paths, overwrite, state)
    if "train" in stages:
        done["train"] = _stage_train(recipe, paths, overwrite, state)
    records = None
    if "evaluate" in stages:
        records = _stage_evaluate(recipe, paths, overwrite, state)
        done["evaluate"] = f"{len(records)} records"
    if "report" in stages:
        records = records if records is not None else _read_records(recipe, paths)
        done["report"] = _stage_report(recipe, paths, records, state)
    state.wait_for_everyone()
    return {"output_dir": output_dir, "stages": done, "records": records or [], "report": paths["report"]}


def _stage_mix(recipe: Recipe, paths: dict, overwrite: bool, state) -> str:
    from .data import save_jsonl
    from .recipe_data import paper_training_mix

    skip = os.path.isfile(paths["mix"]) and not overwrite
    state.wait_for_everyone()  # every rank decided before the main process writes
    if skip:
        _say(state, f"stage mix: skipped, {paths['mix']} exists (--overwrite to redo it)")
        return "skipped"
    if state.is_main_process:
        d = recipe.data
        mix = paper_training_mix(
            d.seed,
            d.sources,
            _mix_loader(recipe),
            split=d.split,
            bigbench_tasks=d.bigbench_tasks,
            superglue_tasks=d.superglue_tasks,
            strict=d.strict,
        )
        os.makedirs(os.path.dirname(paths["mix"]), exist_ok=True)
        save_jsonl(mix, paths["mix"])
        counts: dict[str, int] = {}
        for s in mix:
            counts[s["source"]] = counts.get(s["source"], 0) + 1
        with open(paths["mix_info"], "w", encoding="utf-8") as f:
            json.dump({"seed": d.seed, "asked": d.sources, "drawn": counts, "size": len(mix)}, f, indent=2)
        _say(state, f"stage mix: {len(mix):,} samples -> {paths['mix']}")
    state.wait_for_everyone()
    return "done"


def _stage_neighbours(recipe: Recipe, paths: dict, overwrite: bool, state) -> str:
    from .cli import cmd_neighbours

    nb_dir = paths["neighbours"]
    skip = os.path.isfile(os.path.join(nb_dir, "neighbourhood.json")) and not overwrite
    state.wait_for_everyone()  # every rank decided before the main process writes
    if skip:
        _say(state, f"stage neighbours: skipped, {nb_dir} holds a neighbourhood (--overwrite to rebuild it)")
        return "skipped"
    nbh, m, tr, ad = recipe.neighbourhood, recipe.model, recipe.training, recipe.adapter
    config = {
        **_model_args(recipe),
        "train_file": paths["mix"],
        "output_dir": nb_dir,
        "overwrite": overwrite,
        "layer_selection": ad.layer_selection,
        "num_layers": ad.num_layers,
        "train_router_bias": ad.train_router_bias,
        "method": nbh.method,
        "k": nbh.k,
        "eps": nbh.eps,
        "sigma": nbh.sigma,
        "success_metric": nbh.success_metric,
        "prompt_template": m.prompt_template,
        "use_chat_template": m.use_chat_template,
        "system_prompt": m.system_prompt,
        "max_length": tr.max_length,
        "routing_position": tr.routing_position,
        "routing_num_tokens": tr.routing_num_tokens,
        "batch_size": nbh.batch_size,
        "shard_block_size": nbh.shard_block_size,
    }
    if nbh.embedding_model:
        config["embedding_model"] = nbh.embedding_model
    config = {k: v for k, v in config.items() if v is not None}
    path = os.path.join(paths["stages"], "neighbours.yaml")
    if state.is_main_process:
        _write_yaml(path, config)
    state.wait_for_everyone()
    _say(state, f"stage neighbours: roma-peft neighbours --config {path}")
    cmd_neighbours(["--config", path])
    return "done"


def _train_dir(paths: dict, variant: str, seed: int) -> str:
    return os.path.join(paths["train"], f"{variant}-seed{seed}")


def _stage_train(recipe: Recipe, paths: dict, overwrite: bool, state) -> dict:
    from .cli import cmd_train

    tr = recipe.training
    out = {}
    for variant in recipe.trained_variants:
        for seed in recipe.seeds:
            run_dir = _train_dir(paths, variant, seed)
            key = f"{variant}-seed{seed}"
            skip = os.path.isfile(os.path.join(run_dir, "adapter_config.json")) and not overwrite
            resume = (
                not skip
                and not overwrite
                and os.path.isdir(run_dir)
                and any(e.startswith("checkpoint-") for e in os.listdir(run_dir))
            )
            state.wait_for_everyone()  # every rank decided before the main process writes
            if skip:
                _say(state, f"stage train {key}: skipped, {run_dir} holds an adapter (--overwrite to retrain)")
                out[key] = "skipped"
                continue
            config = {
                **_model_args(recipe),
                "train_file": paths["mix"],
                "neighbourhood_dir": paths["neighbours"],
                "output_dir": run_dir,
                "overwrite": overwrite,
                "seed": seed,
                "learning_rate": tr.learning_rate,
                "weight_decay": tr.weight_decay,
                "num_train_epochs": tr.num_train_epochs,
                "per_device_train_batch_size": tr.per_device_train_batch_size,
                "gradient_accumulation_steps": tr.gradient_accumulation_steps,
                "max_steps": tr.max_steps,
                "bf16": tr.bf16,
                "roma_lambda": tr.roma_lambda,
                "report_to": "none",
                **tr.extra,
                **VARIANTS[variant],
            }
            if resume:
                from transformers.trainer_utils import get_last_checkpoint

                config["resume_from_checkpoint"] = get_last_checkpoint(run_dir)
                _say(state, f"stage train {key}: resuming from {config['resume_from_checkpoint']}")
            path = os.path.join(paths["stages"], f"train-{key}.yaml")
            if state.is_main_process:
                _write_yaml(path, config)
            state.wait_for_everyone()
            _say(state, f"stage train {key}: roma-peft train --config {path}")
            cmd_train(["--config", path])
            out[key] = "done"
    return out


def _eval_file(paths: dict, variant: str, seed: int | None) -> str:
    return os.path.join(paths["evaluate"], f"{variant}.json" if seed is None else f"{variant}-seed{seed}.json")


def _evaluated_models(recipe: Recipe, paths: dict) -> list[tuple[str, int | None, str | None]]:
    """(variant, seed, adapter path) of every model evaluated; the base model once, without a seed."""
    models = [("base", None, None)] if "base" in recipe.variants else []
    models += [(v, s, _train_dir(paths, v, s)) for v in recipe.trained_variants for s in recipe.seeds]
    return models


def _letter_loader(recipe: Recipe):
    """``loader(source, split)`` of the letter protocol's rows: evaluation.data_loader, else evaluation.local_copies
    (sample-schema files) with the hub for the rest; ``None`` (the harness's default, the hub) when neither is set."""
    ev = recipe.evaluation
    if ev.data_loader:
        import importlib.util

        path, function = ev.data_loader.rsplit(":", 1)
        path = recipe.resolve(path)
        spec = importlib.util.spec_from_file_location(f"roma_recipe_loader_{Path(path).stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, function, None)):
            raise RecipeError(f"evaluation.data_loader: {path!r} defines no function {function!r}.")
        return getattr(module, function)
    copies = {k: recipe.resolve(v) for k, v in ev.local_copies.items()}
    if not copies:
        return None
    from .data import load_samples
    from .recipe_data import hub_loader

    def loader(source: str, split: str) -> list:
        return load_samples(copies[source]) if source in copies else hub_loader(source, split)

    return loader


def _stage_evaluate(recipe: Recipe, paths: dict, overwrite: bool, state) -> list[dict]:
    """Every model (the base once, each trained variant x seed) on the benchmarks, one model load per model
    (:func:`roma_peft.harness.evaluate_protocols`); results per model in ``eval/<variant>[-seed<s>].json``.
    Benchmarks already in that file are skipped unless ``overwrite``."""
    from . import harness

    ev, m = recipe.evaluation, recipe.model
    records: list[dict] = []
    for variant, seed, adapter in _evaluated_models(recipe, paths):
        path = _eval_file(paths, variant, seed)
        name = variant if seed is None else f"{variant}-seed{seed}"
        results = _load_json(path) if os.path.isfile(path) and not overwrite else {}
        protocols = [p for p in ev.protocols if any(b not in results.get(p, {}) for b in ev.benchmarks)]
        todo = [b for b in ev.benchmarks if any(b not in results.get(p, {}) for p in protocols)]
        if not protocols:
            _say(state, f"stage evaluate {name}: skipped, every result is in {path}")
        else:
            _say(state, f"stage evaluate {name}: {', '.join(protocols)} on {', '.join(todo)}")
            chat = m.use_chat_template if ev.use_chat_template is None else ev.use_chat_template
            got = harness.evaluate_protocols(
                m.path(),
                todo,
                adapter_path=adapter,
                mode=ev.mode,
                protocols=protocols,
                limit=ev.limit,
                batch_size=ev.batch_size,
                num_fewshot=ev.num_fewshot,
                include_path=recipe.resolve(ev.include_path),
                tasks={b: t for b, t in ev.tasks.items() if b in todo} or None,
                data_loader=_letter_loader(recipe),
                letters=ev.letters,
                use_chat_template=chat,
                system_prompt=m.system_prompt if chat else None,
                dtype=m.dtype,
                device_map=m.device_map,
                attn_implementation=m.attn_implementation,
                revision=m.revision,
                trust_remote_code=m.trust_remote_code,
                verbose=False,
            )
            for protocol, per in got.items():
                results.setdefault(protocol, {}).update(per)
            if state.is_main_process:
                os.makedirs(paths["evaluate"], exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(results, f, indent=2, default=str)
            state.wait_for_everyone()
        records += _records(variant, seed, results, ev)
    return records


def _load_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _records(variant: str, seed: int | None, results: dict, ev: EvaluationSpec) -> list[dict]:
    out = []
    for protocol in ev.protocols:
        for benchmark in ev.benchmarks:
            r = results.get(protocol, {}).get(benchmark)
            if r is None:
                continue
            out.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "benchmark": benchmark,
                    "protocol": protocol,
                    "accuracy": r["accuracy"],
                    "stderr": r.get("stderr"),
                    "n": r.get("n"),
                    "metric": r.get("metric"),
                }
            )
    return out


def _read_records(recipe: Recipe, paths: dict) -> list[dict]:
    records = []
    for variant, seed, _ in _evaluated_models(recipe, paths):
        path = _eval_file(paths, variant, seed)
        if os.path.isfile(path):
            records += _records(variant, seed, _load_json(path), recipe.evaluation)
    return records


def _stage_report(recipe: Recipe, paths: dict, records: list[dict], state) -> str:
    from . import results_table

    if not records:
        raise RecipeError(f"stage report: no evaluation results under {paths['evaluate']}; run the evaluate stage.")
    if state.is_main_process:
        written = results_table.write_report(records, paths["report"], paper_model=recipe.paper_model)
        with open(written["report"], encoding="utf-8") as f:
            print(f.read(), flush=True)
        _say(state, f"stage report: {written['report']} (records: {written['results']})")
    return os.path.join(paths["report"], "report.md")


# ----------------------------------------------------------------------------------------------------- the CLI
@dataclass
class RecipeCommandArguments:
    """``roma-peft recipe NAME_OR_FILE`` options (the recipe itself is the first argument)."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Where every stage writes (required unless --dry_run)."}
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Print the plan (sizes, steps, passes, memory, time) without downloading or running anything."
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "Redo stages whose output exists (default: skip them)."})
    stages: list[str] | None = field(default=None, metadata={"help": f"Run only these of {list(STAGES)}."})
    seeds: list[int] | None = field(default=None, metadata={"help": "Override the recipe's seeds."})
    variants: list[str] | None = field(default=None, metadata={"help": f"Override the variants ({list(VARIANTS)})."})
    limit: int | None = field(default=None, metadata={"help": "Items per benchmark (a smoke run)."})
    gpus: int | None = field(
        default=None, metadata={"help": "Processes for the dry run's estimate (default: the recipe's estimate.gpus)."}
    )
    json: bool = field(default=False, metadata={"help": "With --dry_run: print the plan as JSON."})


def _parse_recipe_args(argv: list[str]) -> RecipeCommandArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(RecipeCommandArguments, prog="roma-peft recipe NAME_OR_FILE")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def cmd_recipe(argv: list[str]) -> dict:
    """``roma-peft recipe NAME_OR_FILE [--dry_run] [--output_dir DIR] [--overwrite] [--stages ...] [--seeds ...]``.

    Bad input raises ``ValueError`` / ``OSError`` with one clear line (the console entry point prints it and exits
    with status 2). Returns the plan (``--dry_run``) or what each stage did."""
    argv = list(argv)
    if argv and argv[0] in ("-h", "--help"):
        _parse_recipe_args(argv)  # prints the options and exits
    if not argv or argv[0].startswith("-"):
        raise RecipeError(
            f"roma-peft recipe needs a recipe first: a shipped name ({', '.join(shipped_recipes())}) "
            "or a YAML/JSON file, e.g. `roma-peft recipe olmoe-1b-7b-0125-instruct --dry_run`."
        )
    target, args = argv[0], _parse_recipe_args(argv[1:])
    overrides: dict[str, Any] = {}
    if args.seeds:
        overrides["seeds"] = args.seeds
    if args.variants:
        overrides["variants"] = args.variants
    recipe = load_recipe(target, overrides)
    if args.limit is not None:
        recipe.evaluation = dataclasses.replace(recipe.evaluation, limit=args.limit)  # re-checked
    if args.dry_run:
        plan = plan_recipe(recipe, world_size=args.gpus)
        print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
        return {"plan": plan.to_dict()}
    if not args.output_dir:
        raise RecipeError("roma-peft recipe: --output_dir is required to run a recipe (or pass --dry_run).")
    result = run_recipe(recipe, args.output_dir, overwrite=args.overwrite, stages=args.stages)
    return {**{k: v for k, v in result.items() if k != "records"}, "records": len(result["records"])}
