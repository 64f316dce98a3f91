"""``roma-peft demo``: the README's main job, RoMA end to end on the shipped tiny MoE, offline, in minutes.

    roma-peft demo                 # about 5-10 minutes on one CPU core
    roma-peft demo --quick         # under a minute (small subsets; used by the tests)

Steps: load the shipped OLMoE-architecture model and its tokenizer with ``AutoModelForCausalLM`` /
``AutoTokenizer``; generate the task suite; score the base model (S = correct training samples); embed the
questions with all-MiniLM-L6-v2 (offline) and build k=3 successful neighbourhoods; train plain router tuning, RoMA
and the ``self`` control with :class:`~roma_peft.trainer.RomaTrainer`; print the accuracy table; draw the routing
manifolds; save the RoMA adapter, reload it with ``PeftModel.from_pretrained`` on a fresh stock model and check that
its test accuracy and predictions are reproduced exactly.

Hyper-parameters come from ``assets/selected_hparams.json``, which the full benchmark
(``python -m roma_peft.benchmark.runner``) writes from its dev-split selection.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from .runner import BenchmarkConfig, Variant, evaluate, load_base_model, make_figures, prepare, train_variant

__all__ = ["main", "load_selected_variants"]

SELECTED_HPARAMS = Path(__file__).parent / "assets" / "selected_hparams.json"


def load_selected_variants() -> dict[str, Variant]:
    """The dev-selected variants recorded by the full benchmark (fallback: the runner's grid midpoints)."""
    if SELECTED_HPARAMS.exists():
        data = json.loads(SELECTED_HPARAMS.read_text())
        return {
            name: Variant(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items()})
            for name, fields in data["chosen"].items()
        }
    base = Variant(name="none", learning_rate=1e-2)
    return {
        "none": base,
        "manifold": replace(base, name="manifold", regularizer="manifold", roma_lambda=10.0),
        "self": replace(base, name="self", regularizer="self", roma_lambda=10.0),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="roma-peft demo", description="RoMA end to end on the shipped tiny MoE.")
    parser.add_argument("--output_dir", "--out", dest="out", default="roma-demo",
                        help="Output directory (adapter, figure, results.json); --out is an alias.")
    parser.add_argument("--quick", action="store_true", help="Small subsets and one epoch (about a minute).")
    parser.add_argument("--seed", type=int, default=0, help="Training seed.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on small shared CPUs).")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    config = BenchmarkConfig(out=str(out), seeds=(args.seed,), max_eval=600, progress=True)
    if args.quick:
        config = replace(config, max_train=96, max_eval=48, epochs=1.0, progress=False)
    print("[1/6] Loading the shipped model, generating the suite, scoring the base model", flush=True)
    ctx = prepare(config)
    chosen = load_selected_variants()
    rows = {"base": {"train": ctx.base["train"].acc, "test": ctx.base["test"].acc}}
    models = {}
    for step, name in enumerate(("none", "manifold", "self"), start=2):
        variant = chosen[name]
        print(f"[{step}/6] Training {name} (lr {variant.learning_rate:g}, lambda {variant.roma_lambda:g})", flush=True)
        model, _ = train_variant(ctx, variant, seed=args.seed)
        models[name] = model
        rows[name] = {"train": evaluate(ctx, model, "train"), "test": evaluate(ctx, model, "test")}

    print("\n| method | train acc | test acc (shifted) |\n|---|---|---|")
    labels = {"base": "base model", "none": "router tuning", "manifold": "RoMA", "self": "self-anchor control"}
    for name, accs in rows.items():
        print(f"| {labels[name]} | {100 * accs['train']:.2f} | {100 * accs['test']:.2f} |")

    print("\n[5/6] Drawing the routing manifolds", flush=True)
    figures = make_figures(ctx, models["manifold"], chosen["manifold"], None, out, max_points=300 if args.quick else 600)
    print(f"  figure: {figures['figure']}; k-NN overlap embedding vs routing: "
          + ", ".join(f"{k} {v:.3f}" for k, v in figures["knn_overlap"].items()))

    print("[6/6] Saving the RoMA adapter and reloading it on a fresh stock model", flush=True)
    from peft import PeftModel

    from ..scoring import score_multiple_choice

    adapter_dir = out / "roma-adapter"
    models["manifold"].save_pretrained(adapter_dir)
    reloaded = PeftModel.from_pretrained(load_base_model(ctx.model_path), adapter_dir)
    before = score_multiple_choice(models["manifold"], ctx.tokenizer, ctx.splits["test"], progress=False)
    after = score_multiple_choice(reloaded, ctx.tokenizer, ctx.splits["test"], progress=False)
    reproduced = before.pred == after.pred and before.acc == after.acc
    print(f"  adapter: {adapter_dir} (router deltas only); reloaded test accuracy {100 * after.acc:.2f} "
          f"-> {'reproduced exactly' if reproduced else 'NOT REPRODUCED'}")
    results = {
        "rows": rows,
        "figure": figures["figure"],
        "knn_overlap": figures["knn_overlap"],
        "adapter": str(adapter_dir),
        "reloaded_test_acc": after.acc,
        "reproduced": reproduced,
        "wall_seconds": time.time() - start,
        "quick": args.quick,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"Done in {results['wall_seconds']:.0f} s. Results: {out / 'results.json'}")
    if not reproduced:
        raise SystemExit("The reloaded adapter did not reproduce the trained model's predictions.")
    return results


if __name__ == "__main__":
    main()
