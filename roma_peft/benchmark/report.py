"""Render the benchmark's ``results.json`` as ``docs/benchmarks.md`` (every number comes from the results file).

The layout follows the order the protocol was fixed in: the premise table first (measured on the base model before
any method was trained), then per world the dev selection and the main table, then the pooled paired comparisons,
the ablations and the figures.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..results_table import mean_ci

__all__ = ["write_report", "render_report", "combine", "PREMISE_THRESHOLDS", "mean_ci", "paired"]

_DESCRIPTIONS = {
    "none": "router tuning (lambda = 0; the paper's baseline)",
    "manifold": "RoMA (k-NN successful neighbours, fixed base targets)",
    "self": "control: pull r_i toward the sample's OWN base routing (trust region; not in the paper)",
    "random": "control: random successful neighbours (paper's 'Rand')",
    "l2": "control: L2 on the router deltas",
}

#: The premise thresholds of issue 11, fixed before any RoMA-vs-control number was looked at (fractions).
PREMISE_THRESHOLDS = {
    "oracle_gold_gain": 0.15,
    "swap_baseline_gain": 0.05,
    "router_tuning_train_move": 0.10,
    "embedding_purity": 0.90,
    "routing_purity_below": 0.90,
}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f}"


def _ms(values) -> str:
    mean, std, half = mean_ci(values)
    if len(values) < 2:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f} [{100 * (mean - half):.2f}, {100 * (mean + half):.2f}]"


def paired(a, b) -> tuple[float, float, float, float]:
    """Mean difference a - b, its std, the 95 % CI half-width and the two-sided paired t-test p-value."""
    diffs = [x - y for x, y in zip(a, b)]
    mean, std, half = mean_ci(diffs)
    p = float("nan")
    if len(diffs) > 1 and std > 0:
        from scipy import stats

        p = float(stats.ttest_rel(a, b).pvalue)
    return mean, std, half, p


def _compare(a, b) -> tuple[str, float, float]:
    """``"better"``, ``"worse"`` (two-sided paired t-test, 5 % level) or ``"same"``, with the mean of a - b and p."""
    mean, _, _, p = paired(a, b)
    if math.isnan(p) or p >= 0.05:
        return "same", mean, p
    return ("better" if mean > 0 else "worse"), mean, p


_WORDS = {"better": "significantly better", "worse": "significantly **worse**", "same": "not significant at 5%"}


def _verdict(tests: dict) -> str:
    """Plain words for the question the benchmark exists to answer (5% level, paired, two-sided: a significant
    difference is called better or worse by its sign)."""
    vs_self, mean_self, p_self = _compare(tests["manifold"], tests["self"])
    opening = {
        "better": "RoMA beat the `self` anchor",
        "worse": "RoMA was significantly **worse** than the `self` anchor",
        "same": "RoMA did **not** beat the `self` anchor significantly",
    }[vs_self]
    parts = [opening + f" (manifold − self = {100 * mean_self:+.2f} points, p = {p_self:.3g})."]
    controls = [ref for ref in ("random", "l2") if ref in tests]
    beaten = []
    for ref in controls:
        outcome, mean, p = _compare(tests["manifold"], tests[ref])
        parts.append(f"manifold − {ref} = {100 * mean:+.2f} points (p = {p:.3g}; {_WORDS[outcome]}).")
        beaten.append(outcome == "better")
    if "none" in tests:
        outcome, mean, p = _compare(tests["manifold"], tests["none"])
        parts.append(
            f"Against plain router tuning: manifold − none = {100 * mean:+.2f} points (p = {p:.3g}; {_WORDS[outcome]})."
        )
    if controls and not all(beaten):
        parts.append(
            "Because RoMA did not beat every control that carries no neighbour information (random neighbours, L2 on "
            "the deltas), this run does **not** show that aligning with *successful neighbours* is what helps."
        )
    elif controls and vs_self == "better":
        parts.append("RoMA beat every control, so neighbour alignment helped beyond a trust region in this run.")
    return " ".join(parts)


def _noise_sentence(tests: dict) -> str:
    """Whether the differences between methods are larger than seed noise (paired 95 % intervals)."""
    names = [n for n in ("manifold", "self", "random", "l2") if n in tests and "none" in tests]
    if not names or len(tests["none"]) < 2:
        return "With a single training seed the seed noise is unknown, so no difference can be called real."
    outside = []
    for name in names:
        mean, _, half, _ = paired(tests[name], tests["none"])
        if abs(mean) > half:
            outside.append(f"{name} ({100 * mean:+.2f} ± {100 * half:.2f})")
    if not outside:
        return (
            "Every method's difference from plain router tuning lies within its 95 % paired interval over "
            "training seeds: the differences are not larger than seed noise."
        )
    return (
        "Differences from plain router tuning larger than seed noise (95 % paired interval excludes 0): "
        + ", ".join(outside)
        + "."
    )


def _provenance(key) -> list[str]:
    """The code and library versions every number came from (the runner's cache key), if recorded."""
    if not key:
        return []
    libraries = ", ".join(f"{k} {v}" for k, v in key.get("libraries", {}).items())
    return [f"- Code: roma_peft source sha256 `{str(key.get('code', '?'))[:16]}`; {libraries}"]


def _premise_rows(worlds: dict) -> list[str]:
    th = PREMISE_THRESHOLDS
    names = list(worlds)

    def get(world, key):
        return (worlds[world].get("premises") or {}).get(key)

    def status(value, ok) -> str:
        return "" if value is None else (" (holds)" if ok(value) else " (**fails**)")

    header = "| premise (test split, base model) | threshold | " + " | ".join(f"world {w}" for w in names) + " |"
    lines = [header, "|---|---|" + "---|" * len(names)]

    def row(label, threshold, render):
        lines.append(f"| {label} | {threshold} | " + " | ".join(render(w) for w in names) + " |")

    def pretraining(w):
        acc = (worlds[w].get("pretraining") or {}).get("train_id")
        return "n/a" if acc is None else _pct(acc)

    row(
        "0. the world's pretraining: in-distribution train accuracy (%; the model knows the facts)",
        "reported",
        pretraining,
    )
    row(
        "1. oracle toward gold: accuracy gain on the oracle items (points)",
        "≥ +15",
        lambda w: (
            _pts(get(w, "oracle_gold_gain")) + status(get(w, "oracle_gold_gain"), lambda v: v >= th["oracle_gold_gain"])
        ),
    )
    row(
        "1. control: the same optimisation toward a random wrong option: accuracy (base → wrong)",
        "reported",
        lambda w: f"{_pct(get(w, 'oracle_base_accuracy'))} → {_pct(get(w, 'oracle_wrong_accuracy'))}",
    )
    row(
        "1. failed items fixed toward gold / moved to the wrong target (%)",
        "reported",
        lambda w: f"{_pct(get(w, 'oracle_gold_fix_rate'))} / {_pct(get(w, 'oracle_wrong_steer_rate'))}",
    )
    row(
        "2. neighbour-routing swap (k = 3 successful train neighbours, kernel weights; no label): gain over base "
        "on all test items (points)",
        "≥ +5",
        lambda w: (
            _pts(get(w, "swap_baseline_gain"))
            + status(get(w, "swap_baseline_gain"), lambda v: v >= th["swap_baseline_gain"])
        ),
    )

    def within(w):
        s = get(w, "swap_in_within_test") or {}
        if not s.get("available"):
            return "n/a"
        return f"{s['neighbours_fixed']} vs {s['random_fixed']} of {s['n_items']} (p = {s['p_value']:.2g})"

    row(
        "2. diagnose swap-in within test: failed items fixed, neighbours vs random successful samples",
        "reported",
        within,
    )
    row(
        "3. router tuning (lambda = 0, dev-selected lr, seed 0): train accuracy move (points)",
        "≥ +10",
        lambda w: (
            _pts(get(w, "router_tuning_train_move"))
            + status(get(w, "router_tuning_train_move"), lambda v: v >= th["router_tuning_train_move"])
        ),
    )
    row(
        "4. task purity of embedding neighbours (k = 3, %)",
        "≥ 90",
        lambda w: (
            _pct(get(w, "embedding_purity")) + status(get(w, "embedding_purity"), lambda v: v >= th["embedding_purity"])
        ),
    )
    row(
        "4. task purity of base-routing neighbours at the tuned layers (k = 3, %)",
        "not pure (< 90)",
        lambda w: (
            _pct(get(w, "routing_purity")) + status(get(w, "routing_purity"), lambda v: v < th["routing_purity_below"])
        ),
    )
    row(
        "k-NN overlap embedding vs base routing (chance)",
        "reported",
        lambda w: f"{_pct(get(w, 'knn_overlap'))} ({_pct(get(w, 'knn_overlap_chance'))})",
    )
    row("`roma-peft diagnose` verdict", "", lambda w: str(get(w, "verdict") or "n/a"))
    return lines


def _world_section(seed: str, results: dict) -> list[str]:
    final = results["final"]
    base_test = results["base"]["test"]
    oracle = results.get("oracle") or {}
    gap = None
    if oracle.get("gold") and oracle.get("base_on_oracle_items") is not None:
        gap = oracle["gold"]["accuracy"] - oracle["base_on_oracle_items"]
    cfg = results["config"]
    lines = [
        f"## World {seed}",
        "",
        f"- Model: `{results.get('model_path', '')}`; {results['num_moe_layers']} MoE layers, tuned: the last "
        f"{results['chosen']['none']['num_layers']}; routing vector = softmax routing of the last prompt token",
        "- Splits: "
        + ", ".join(f"{k} {v}" for k, v in results["splits"].items())
        + f"; successful training samples |S| = {results['successful_train']}",
        "- Base accuracy: " + ", ".join(f"{k} {_pct(v)}" for k, v in results["base"].items()),
        f"- Training seeds {cfg['seeds']}, {cfg['epochs']:g} epochs, batch {cfg['batch_size']}; wall time "
        f"{results.get('wall_seconds', 0) / 60:.1f} min",
        *_provenance(results.get("cache_key")),
        "",
        "### Selection (dev split only, seed 0)",
        "",
        "| method | lr | lambda | dev acc |",
        "|---|---|---|---|",
    ]
    for row in results.get("selection", []):
        lines.append(f"| {row['method']} | {row['lr']:g} | {row['lambda']:g} | {_pct(row['dev'])} |")
    lines += [
        "",
        "Chosen: "
        + ", ".join(
            f"{k}: lr {v['learning_rate']:g}, lambda {v['roma_lambda']:g}" for k, v in results["chosen"].items()
        )
        + f"; oracle step size (dev) {results.get('oracle_lr', 'n/a')}",
        "",
    ]
    lines += [
        "### Main table (test = shifted distribution, scored once per seed)",
        "",
        "mean ± std over training seeds [95 % t-interval of the mean]",
        "",
        "| method | what it is | dev acc | test acc | oracle gap closed |",
        "|---|---|---|---|---|",
        f"| base | the pretrained model, no tuning | {_pct(results['base']['dev'])} | {_pct(base_test)} | 0 |",
    ]
    for name, entry in final.items():
        tests = [r["test"] for r in entry["runs"]]
        devs = [r["dev"] for r in entry["runs"]]
        closed = f"{(statistics.mean(tests) - base_test) / gap:.2f}" if gap and gap > 0 else ""
        lines.append(f"| {name} | {_DESCRIPTIONS.get(name, name)} | {_ms(devs)} | {_ms(tests)} | {closed} |")
    swap = results.get("swap_baseline") or {}
    if swap:
        closed = f"{(swap['accuracy'] - base_test) / gap:.2f}" if gap and gap > 0 else ""
        lines.append(
            f"| neighbour swap | test-time baseline (C3PO-style kernel regression): the k = {swap['k']} "
            "successful training neighbours' routing forced at the tuned routers; no training, no seed | "
            f"| {_pct(swap['accuracy'])} | {closed} |"
        )
    if oracle.get("gold"):
        n = oracle.get("n_items")
        lines.append(
            f"| oracle (gold) | per-sample routing optimised toward the gold option (paper Eq. 1), on {n} test "
            f"items (base on them: {_pct(oracle.get('base_on_oracle_items'))}) | | "
            f"{_pct(oracle['gold']['accuracy'])} | 1 |"
        )
        lines.append(
            f"| oracle (wrong) | control: the same optimisation toward a random WRONG option, same {n} items "
            f"| | {_pct(oracle['wrong']['accuracy'])} | |"
        )
    if swap:
        embed = swap.get("embed_seconds")
        lines += [
            "",
            f"Neighbour swap: {swap['fixed']} test items fixed, {swap['broken']} broken. Extra inference "
            f"cost: per item one MiniLM embedding of the question and one k-NN search over the |S| = "
            f"{swap['reference_set']} stored training embeddings, plus the stored base routing of S; the LM "
            "forward is unchanged. Measured here for the whole test split: embedding "
            + (f"{embed:.1f} s" if embed is not None else "n/a")
            + f", k-NN {swap['knn_seconds']:.2f} s, scoring with the forced routing {swap['scoring_seconds']:.1f}"
            f" s vs {swap['base_scoring_seconds']:.1f} s plain (max routing error "
            f"{swap['max_routing_error']:.1e}). A router-tuned model (RoMA or a control) has no extra cost.",
        ]
    tests = {name: [r["test"] for r in entry["runs"]] for name, entry in final.items()}
    lines += [
        "",
        "### Paired differences on test (same seeds; paired t-test over seeds)",
        "",
        "| comparison | mean diff (points) | std | 95 % CI | p |",
        "|---|---|---|---|---|",
    ]
    lines += _paired_rows(tests)
    if "none" in tests:
        lines += ["", _noise_sentence(tests)]
    if "manifold" in tests and "self" in tests:
        lines += ["", f"**World {seed}: does neighbour alignment help beyond a trust region?** " + _verdict(tests)]
    ablations = results.get("ablations") or {}
    if ablations:
        lines += ["", "### Ablations (test accuracy, mean ± std over the ablation seeds)", ""]
        for group, rows in ablations.items():
            lines += [f"#### {group}", "", "| setting | test acc |", "|---|---|"]
            for label, accs in rows.items():
                lines.append(f"| {label} | {_ms(accs)} |")
            lines.append("")
    figures = results.get("figures") or {}
    if figures:
        lines += [
            "",
            f"![routing manifolds, world {seed}](figures/routing_manifolds_world{seed}.png)",
            "",
            "k-NN overlap between task-embedding space and routing space (k=10, test items; 1 = same "
            "neighbours): " + ", ".join(f"{name} {value:.3f}" for name, value in figures["knn_overlap"].items()),
        ]
    return lines + [""]


def _paired_rows(tests: dict) -> list[str]:
    pairs = [(name, ref) for name in tests for ref in ("none", "self") if name != ref and ref in tests]
    pairs += [("manifold", ref) for ref in ("random", "l2") if "manifold" in tests and ref in tests]
    rows = []
    for name, ref in pairs:
        mean, std, half, p = paired(tests[name], tests[ref])
        rows.append(f"| {name} − {ref} | {100 * mean:+.2f} | {100 * std:.2f} | ± {100 * half:.2f} | {p:.3g} |")
    return rows


def render_report(results: dict) -> str:
    """``results`` is the runner's combined ``results.json`` (``{"worlds": {seed: per-world results}, ...}``)."""
    worlds = results["worlds"]
    lines = [
        "# Benchmarks: the offline RoMA miniature",
        "",
        "Generated by `roma_peft/benchmark/runner.py` from its `results.json`; do not edit by hand. The suite, the "
        "model recipe, the premise thresholds and this protocol were fixed before any RoMA-vs-control number was "
        "looked at (order of work: `docs/benchmark-suite.md`).",
        "",
        f"- Command: `{results.get('command', '')}`",
        f"- Machine: {results.get('machine', next(iter(worlds.values())).get('machine', ''))}",
        f"- Worlds (suite seeds, each with its own pretrained model): {', '.join(worlds)}",
        "",
        "## Premises (measured first, on the base model)",
        "",
    ]
    lines += _premise_rows(worlds)
    lines += [
        "",
        "Oracle and diagnose swap-in: `roma-peft diagnose` on the test split at the tuned layers (full "
        "reports in each world's `diagnose-test/`); the neighbour-routing swap is the main table's test-time "
        "baseline; router tuning is the dev-selected `none` run of seed 0 scored on train.",
        "",
    ]
    for seed, world in worlds.items():
        lines += _world_section(seed, world)
    if len(worlds) > 1 and all(w.get("final") for w in worlds.values()):
        lines += _pooled_section(worlds)
    return "\n".join(lines) + "\n"


def _pooled_section(worlds: dict) -> list[str]:
    """Pooled over worlds: one paired observation per (world, seed); differences are within-world, so worlds with
    different base accuracies are comparable."""
    methods = [m for m in next(iter(worlds.values()))["final"] if all(m in w["final"] for w in worlds.values())]
    tests = {m: [] for m in methods}
    for w in worlds.values():
        seeds = [r["seed"] for r in w["final"][methods[0]]["runs"]]
        for m in methods:
            by_seed = {r["seed"]: r["test"] for r in w["final"][m]["runs"]}
            tests[m] += [by_seed[s] for s in seeds]
    lines = [
        "## Pooled over worlds",
        "",
        f"Paired over every (world, training seed): n = {len(tests[methods[0]])}.",
        "",
        "| comparison | mean diff (points) | std | 95 % CI | p |",
        "|---|---|---|---|---|",
    ]
    lines += _paired_rows(tests)
    lines += ["", _noise_sentence(tests)]
    if "manifold" in tests and "self" in tests:
        lines += ["", "**Does neighbour alignment help beyond a trust region here?** " + _verdict(tests)]
    return lines + [""]


def write_report(results: dict, path) -> str:
    Path(path).write_text(render_report(results))
    return str(path)


def combine(results_files) -> dict:
    """One combined results dict from several ``results.json`` files (a world's own, or a combined one), e.g. of
    worlds run as separate processes: ``python -m roma_peft.benchmark.report OUT.md A/world-0/results.json
    B/world-1/results.json``."""
    import json

    worlds, commands = {}, []
    for path in results_files:
        data = json.loads(Path(path).read_text())
        if "worlds" in data:
            worlds.update(data["worlds"])
            commands.append(data.get("command", ""))
        else:
            worlds[str(data["config"]["suite_seed"])] = data
            commands.append(data.get("command", ""))
    for world in worlds.values():  # results written before the runner recorded it: read the model's own record
        info = Path(world.get("model_path", "")) / "training_info.json"
        if "pretraining" not in world and info.is_file():
            world["pretraining"] = json.loads(info.read_text()).get("base_accuracy", {})
    machine = next(iter(worlds.values())).get("machine", "")
    return {
        "command": "; ".join(dict.fromkeys(c for c in commands if c)),
        "machine": machine,
        "worlds": dict(sorted(worlds.items(), key=lambda kv: int(kv[0]))),
    }


if __name__ == "__main__":  # python -m roma_peft.benchmark.report OUT.md RESULTS.json [RESULTS.json ...]
    import sys

    if len(sys.argv) < 3:
        raise SystemExit("usage: python -m roma_peft.benchmark.report OUT.md RESULTS.json [RESULTS.json ...]")
    write_report(combine(sys.argv[2:]), sys.argv[1])
