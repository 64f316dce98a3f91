"""``roma-peft demo``: the README's main job, RoMA end to end on the shipped miniature, offline, in minutes.

    roma-peft demo                 # about 4 minutes on one (shared) CPU core
    roma-peft demo --quick         # under a minute (small subsets; used by the tests)

Steps: load the shipped OLMoE (world 0 of the benchmark: 8 MoE layers, 16 experts, top-2) and its tokenizer with
``AutoModelForCausalLM`` / ``AutoTokenizer``; generate the task suite; score the base model (S = correct training
samples); embed the questions with all-MiniLM-L6-v2 (offline) and build k=3 successful neighbourhoods; score the
test-time neighbour-routing baseline (C3PO-style kernel regression); train plain router tuning, RoMA and the ``self``
control on the last 5 MoE layers with :class:`~roma_peft.trainer.RomaTrainer` over several training seeds; print the
accuracy table with 95 % intervals and whether the differences exceed seed noise; draw the routing manifolds; save the
RoMA adapter, reload it with ``PeftModel.from_pretrained`` on a fresh stock model and check that its test accuracy and
predictions are reproduced exactly.

Hyper-parameters come from ``assets/selected_hparams.json``, the dev-split selection of the full benchmark
(``python -m roma_peft.benchmark.runner --write-selection``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..loading import quiet_peft_wrapping
from .report import _noise_sentence, mean_ci, paired
from .runner import (
    BenchmarkConfig,
    evaluate,
    load_base_model,
    make_figures,
    neighbour_swap_baseline,
    prepare,
    train_variant,
)
from .variants import load_selected_variants

__all__ = ["main"]

_LABELS = {
    "base": "base model",
    "swap": "neighbour-routing swap (test-time, C3PO-style)",
    "none": "router tuning",
    "manifold": "RoMA",
    "self": "self-anchor control",
}


def _cell(values) -> str:
    mean, _, half = mean_ci(values)
    return f"{100 * mean:.2f}" + (f" ± {100 * half:.2f}" if len(values) > 1 else "")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="roma-peft demo", description="RoMA end to end on the shipped miniature.")
    parser.add_argument(
        "--output_dir",
        "--out",
        dest="out",
        default="roma-demo",
        help="Output directory (adapter, figure, results.json); --out is an alias.",
    )
    parser.add_argument("--quick", action="store_true", help="Small subsets and one epoch (under a minute).")
    parser.add_argument("--seeds", type=int, default=3, help="Training seeds per method (>= 2 gives intervals).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on small shared CPUs).")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    torch.set_num_threads(args.threads)
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    seeds = tuple(range(args.seeds))
    config = BenchmarkConfig(out=str(out), seeds=seeds, max_eval=400, progress=True)
    if args.quick:
        config = replace(config, max_train=96, max_eval=48, epochs=1.0, progress=False)
    print("[1/6] Loading the shipped model, generating the suite, scoring the base model", flush=True)
    ctx = prepare(config)
    chosen = load_selected_variants()
    print("[2/6] Test-time baseline: forcing the successful neighbours' routing (no training)", flush=True)
    swap = neighbour_swap_baseline(ctx, chosen["manifold"])
    rows = {
        "base": {"train": [ctx.base["train"].acc], "test": [ctx.base["test"].acc]},
        "swap": {"train": [], "test": [swap["accuracy"]]},
    }
    models = {}
    for step, name in enumerate(("none", "manifold", "self"), start=3):
        variant = chosen[name]
        print(
            f"[{step}/6] Training {name} (lr {variant.learning_rate:g}, lambda {variant.roma_lambda:g}, last "
            f"{variant.num_layers} MoE layers) with seeds {list(seeds)}",
            flush=True,
        )
        rows[name] = {"train": [], "test": []}
        for seed in seeds:
            model, _ = train_variant(ctx, variant, seed=seed)
            rows[name]["test"].append(evaluate(ctx, model, "test"))
            if seed == seeds[0]:  # training accuracy once per method: it shows how far tuning moves the fit
                rows[name]["train"].append(evaluate(ctx, model, "train"))
                models[name] = model

    print(
        f"\n| method | train acc (seed {seeds[0]}) | test acc (shifted) |   (test: mean ± 95 % interval over "
        f"{len(seeds)} training seeds)"
    )
    print("|---|---|---|")
    for name, accs in rows.items():
        train = f"{100 * accs['train'][0]:.2f}" if accs["train"] else "-"
        print(f"| {_LABELS[name]} | {train} | {_cell(accs['test'])} |")
    tests = {name: rows[name]["test"] for name in ("none", "manifold", "self")}
    noise = _noise_sentence(tests)
    print()
    for ref, label in (("none", "router tuning"), ("self", "the self-anchor control")):
        diff, _, half, _ = paired(tests["manifold"], tests[ref])
        verdict = "larger than" if abs(diff) > half else "within"
        print(
            f"RoMA − {label}: {100 * diff:+.2f} points (95 % paired interval ± {100 * half:.2f}): {verdict} seed noise."
        )
    print(noise)
    print(
        f"The neighbour-routing swap costs one MiniLM embedding and one k-NN search over |S| = "
        f"{swap['reference_set']} stored embeddings per test item at inference; the tuned models cost nothing "
        "extra."
    )

    print(
        "\n[6/6] Drawing the routing manifolds; saving the RoMA adapter and reloading it on a fresh stock model",
        flush=True,
    )
    figures = make_figures(
        ctx, models["manifold"], chosen["manifold"], None, out, max_points=300 if args.quick else 600
    )
    print(
        f"  figure: {figures['figure']}; k-NN overlap embedding vs routing: "
        + ", ".join(f"{k} {v:.3f}" for k, v in figures["knn_overlap"].items())
    )
    from peft import PeftModel

    from ..scoring import score_multiple_choice

    adapter_dir = out / "roma-adapter"
    models["manifold"].save_pretrained(adapter_dir)
    with quiet_peft_wrapping():
        reloaded = PeftModel.from_pretrained(load_base_model(ctx.model_path), adapter_dir)
    before = score_multiple_choice(models["manifold"], ctx.tokenizer, ctx.splits["test"], progress=False)
    after = score_multiple_choice(reloaded, ctx.tokenizer, ctx.splits["test"], progress=False)
    reproduced = before.pred == after.pred and before.acc == after.acc
    print(
        f"  adapter: {adapter_dir} (router deltas only); reloaded test accuracy {100 * after.acc:.2f} "
        f"-> {'reproduced exactly' if reproduced else 'NOT REPRODUCED'}"
    )
    results = {
        "rows": rows,
        "seeds": list(seeds),
        "noise": noise,
        "swap_baseline": swap,
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
