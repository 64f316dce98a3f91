"""Generate docs/architectures.md from the router registry (roma_peft/routers.py). Run: python scripts/gen_architectures_doc.py"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Families exercised on tiny random models by tests/test_families.py (router class -> test family name).
TESTED = {
    "OlmoeTopKRouter": "olmoe",
    "Qwen2MoeTopKRouter": "qwen2_moe",
    "Qwen3MoeTopKRouter": "qwen3_moe",
    "MixtralTopKRouter": "mixtral",
    "DeepseekV2TopkRouter": "deepseek_v2",
    "DeepseekV3TopkRouter": "deepseek_v3",
    "GptOssTopKRouter": "gpt_oss",
    "GraniteMoeTopKRouter": "granitemoe",
    "Llama4Router": "llama4_text",
    "DbrxRouter": "dbrx",
    "LongcatFlashTopkRouter": "longcat_flash (router reads its child's weight; routed + zero-expert rows)",
    "Qwen3VLMoeTextTopKRouter": "qwen3_vl_moe (multimodal wrapper, routers under model.language_model)",
    "DeepseekV4TopKRouter": "deepseek_v4 (scores with its own `score_fn`: sqrtsoftplus; also scoring_func='sigmoid')",
    "Inkling2TopKRouter": "inkling2 (scores with its own `score_fn`: sigmoid)",
}
#: Router classes whose captured routing is checked against the model's own routing weights by
#: tests/test_router_scoring.py (beyond tests/test_families.py).
SCORING_TESTED = {
    "Inkling2LoopTopKRouter": "inkling2_loop (own `score_fn`: sigmoid)",
    "Cohere2MoeTopKRouter": "cohere2_moe with expert_selection_fn='sigmoid'",
}

SPARSE = {
    "outputs": "router output (logits, top-k weights, top-k index)",
    "dense_output": "router output[0] (dense scores)",
    "recompute": "recomputed: top-k of the scores",
}


SWEEP_JSON = os.path.join(ROOT, "docs", "sweep_families.json")


def render_sweep(path: str = SWEEP_JSON) -> list[str]:
    """The per-model-type sweep section, from the JSON written by scripts/sweep_families.py (empty if absent)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        sweep = json.load(f)
    results = sweep["results"]
    counts: dict[str, int] = {}
    for r in results.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [
        "## Sweep over every MoE model type in transformers",
        "",
        f"`{sweep['command']}` on {sweep['date']} (transformers {sweep['transformers']}, torch {sweep['torch']}, "
        "CPU): a tiny random model per model type (hidden 32, 4 layers with >= 2 MoE layers, 8 experts, top-k 2, "
        "float32, eval mode), checked through the public API: wrap with `RomaConfig(num_layers=2)` (only RoMA "
        "deltas trainable, zero-init output bit-identical), random deltas change the output, save -> reload on a "
        "fresh copy and `merge_and_unload` reproduce it exactly, and the gradients of a `RoutingRecorder` routing "
        "loss and of the LM loss reach every delta. `unsupported`: RoMA refuses the router with the registry's "
        "reason.",
        "",
        "Summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" (of {len(results)} model types).",
        "",
        "Step 4 checks that the routing RoMA captures is the routing the model uses, for every token of every "
        "tuned router, with the random deltas on: `RoutingRecorder` with representation `topk` must equal the top-k "
        "weights the model routes with (read from the router's output, or from the experts' inputs where the router "
        "returns logits only); with `probs` it must equal the model's own dense scores where the model computes them "
        "(`= own scores`: the router's `score_fn`, or the probabilities it returns) and, at the experts the model "
        "selected, be proportional to the model's top-k weights (`∝ weights`: one factor per token for "
        "renormalisation and scaling factors). The scoring column says which scoring RoMA uses and where it comes "
        "from: `registry` (the class entry), the router's own declaration, `proven` or `assumed` (the latter two only "
        "for router classes the registry does not know; `assumed` also warns).",
        "",
        "| model type | class swept | router class | registry family | scoring (source) | captured probs / topk = model's routing | status | failing step / reason | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model_type, r in results.items():
        reason = " ".join(x for x in (r.get("step", ""), r.get("error", "")) if x).replace("|", "\\|")
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**"
        scoring = (
            "; ".join(
                f"{x.split(' (', 1)[0]} (`{x.split(' (', 1)[1][:-1]}`)" if " (" in x else x
                for x in r.get("scoring", [])
            )
            if r["status"] != "unsupported"
            else ""
        )
        if r.get("scoring_warnings"):
            scoring += " **warned**"
        lines.append(
            f"| `{model_type}` | {r.get('model_class', '')} | {', '.join(r.get('router_classes', []))} | "
            f"{', '.join(r.get('families', []))} | {scoring} | {_routing_check(r.get('routing_check'))} | {status} | "
            f"{reason} | {r.get('seconds', 0)} |"
        )
    lines.append("")
    return lines


def _routing_check(check) -> str:
    """'probs / topk' verdicts of the sweep's step 4, short."""
    if not check:
        return ""
    out = []
    for name in ("probs", "topk"):
        verdict = check.get(name, "")
        if verdict.startswith("ok"):
            marks = [m for m, key in (("= own scores", "= router"), ("∝ weights", "proportional")) if key in verdict]
            out.append("ok" + (f" ({', '.join(marks)})" if marks and name == "probs" else ""))
        else:
            out.append("**differs**")
    return " / ".join(out)


def _scoring(fam) -> str:
    if fam.scoring == "declared":
        return "the router's own `score_fn` (config `scoring_func`)"
    return fam.scoring


def render() -> str:
    from roma_peft.routers import ROUTER_CLASS_TO_FAMILY, ROUTER_FAMILIES

    lines = [
        "# Supported router architectures",
        "",
        "<!-- GENERATED by scripts/gen_architectures_doc.py from roma_peft/routers.py; do not edit by hand. -->",
        "",
        "RoMA finds routers through the classes transformers models declare in "
        '`_can_record_outputs["router_logits"]`. Remote-code models that declare nothing fall back to modules named '
        "exactly `gate`/`router` that map hidden -> n_experts.",
        "",
        "How a router's logits become the routing weights RoMA captures (`scoring`) is taken from the model wherever "
        "it declares it: a scoring function on the router module (`score_fn`, `scoring_function`: DeepSeek-V4, "
        "Inkling2, Muse-Spark) or a scoring name (`scoring_func`, `expert_selection_fn`: remote-code `MoEGate`, "
        "Cohere2) wins over the class entry below. A router class not listed below is unknown: its scoring is "
        "proven from its own outputs (its top-k weights must be proportional to exactly one scoring of its logits), "
        "else taken from the config's `scoring_func`, else softmax is assumed; the last two issue a "
        "`ScoringAssumptionWarning` naming the assumption and the override (`module.scoring_func = ...` or "
        "`roma_peft.routers.register_router_class(...)`).",
        "",
        "## Families",
        "",
        "| family | scoring (dense routing weights) | sparse top-k source | projection (trained matrix) | trainable bias | logits from | supported | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fam in ROUTER_FAMILIES.values():
        lines.append(
            f"| `{fam.name}` | {_scoring(fam)} | {SPARSE.get(fam.sparse, fam.sparse)} | "
            f"{'`' + fam.projection + '.weight` (nn.Linear child)' if fam.projection else 'own `weight`'} | "
            f"{'yes' if fam.trainable_bias else 'no'} | {fam.logits_source} | {'skipped (layer not tuned)' if fam.skipped else 'yes' if fam.supported else '**no**'} | "
            f"{fam.notes} |"
        )
    lines += [
        "",
        "## Router classes",
        "",
        "| router class | family | scoring | sparse source | projection | trainable bias | tested here |",
        "|---|---|---|---|---|---|---|",
    ]
    classes = dict(ROUTER_CLASS_TO_FAMILY)
    for cls in TESTED:
        classes.setdefault(cls, "softmax")
    for cls in sorted(classes):
        fam = ROUTER_FAMILIES[classes[cls]]
        tested = TESTED.get(cls, "")
        tested = ("yes: " + tested) if tested else ""
        if cls in SCORING_TESTED:
            tested = "scoring: " + SCORING_TESTED[cls]
        lines.append(
            f"| `{cls}` | `{fam.name}` | {_scoring(fam)} | {fam.sparse} | {fam.projection or 'own weight'} | "
            f"{'yes' if fam.trainable_bias else 'no'} | {tested} |"
        )
    lines += [
        "",
        "Tested families: " + ", ".join(sorted(set(TESTED.values()))) + " (tests/test_families.py: wrap, train, "
        "save/reload, merge, disable, routing capture vs a hand reference). tests/test_router_scoring.py checks the "
        "captured `probs` / `topk` against the model's own routing weights for the declared-scoring routers and the "
        "warning / proof for unknown router classes. Every class is checked against the model's routing by the "
        "sweep below.",
        "",
    ]
    lines += render_sweep()
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "architectures.md"))
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = open(args.out).read() if os.path.exists(args.out) else ""
        sys.exit(0 if current == text else 1)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
