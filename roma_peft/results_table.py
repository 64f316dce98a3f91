"""A report laid out like the paper's Table 1: a row per variant, a column per benchmark, and the average.

Input: *records*, one per (variant, seed, benchmark, protocol)::

    {"variant": "roma", "seed": 0, "benchmark": "mmlu", "protocol": "lm_eval",
     "accuracy": 0.571, "stderr": 0.0042, "n": 14042}

(:func:`roma_peft.harness.to_records` makes them from an evaluation). Accuracies are fractions; the report shows
percentages, like the paper.

Each cell is the mean over seeds with a 95% interval:

* two or more seeds: Student's t interval over the seeds, ``mean ± t(0.975, k-1) * sd / sqrt(k)`` with ``sd`` the
  sample standard deviation (ddof 1) of the per-seed accuracies. It measures how much the *training* seed moves
  the number (data order, mix draw, initialisation), which is what a comparison of methods needs;
* one seed: ``± 1.96 * stderr`` with the benchmark's binomial standard error (lm-eval's ``acc_stderr``), the
  sampling error of a finite test set only.

The ``avg`` column is, per seed, the unweighted mean over the benchmarks that have a number (the paper's average
weights each benchmark equally), then the same interval over seeds. A block per protocol (``lm_eval`` first, then
``letter``); the letter protocol has no GSM8K entry (shown as ``—``), so its average is over seven benchmarks and says
so. With ``paper_model`` (``"olmoe"`` or ``"deepseekmoe"``) the paper's Table 1 rows (Base model, Router Tuning,
RoMA) follow for comparison.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["BENCHMARK_ORDER", "PAPER_TABLE1", "VARIANT_ORDER", "cell_stats", "mean_ci", "table1_report", "write_report"]

BENCHMARK_ORDER = ("mmlu", "hellaswag", "arc_challenge", "arc_easy", "piqa", "winogrande", "boolq", "gsm8k")
"""The paper's Table 1 column order."""

HEADERS = {
    "mmlu": "MMLU",
    "hellaswag": "HellaSwag",
    "arc_challenge": "ARC-C",
    "arc_easy": "ARC-E",
    "piqa": "PIQA",
    "winogrande": "WinoGrande",
    "boolq": "BoolQ",
    "gsm8k": "GSM8K",
}

VARIANT_ORDER = ("base", "router_tuning", "roma")
"""Rows come in this order; other variants (controls) follow in the order they first appear."""

PAPER_TABLE1: dict[str, dict[str, dict[str, float]]] = {
    "deepseekmoe": {
        "Base model": dict(zip(BENCHMARK_ORDER, (46.2, 78.0, 50.3, 73.8, 79.9, 70.1, 72.3, 62.2))),
        "Router Tuning": dict(zip(BENCHMARK_ORDER, (49.3, 81.5, 57.2, 76.6, 82.0, 73.8, 74.5, 64.8))),
        "RoMA": dict(zip(BENCHMARK_ORDER, (56.8, 87.9, 61.4, 81.5, 85.2, 76.8, 80.6, 67.4))),
    },
    "olmoe": {
        "Base model": dict(zip(BENCHMARK_ORDER, (57.8, 77.9, 51.3, 79.8, 80.7, 72.2, 75.4, 45.5))),
        "Router Tuning": dict(zip(BENCHMARK_ORDER, (63.2, 81.7, 62.5, 83.8, 80.9, 75.3, 77.8, 47.2))),
        "RoMA": dict(zip(BENCHMARK_ORDER, (69.0, 86.7, 67.2, 88.0, 85.8, 81.8, 81.7, 49.4))),
    },
}
"""The paper's Table 1 (percent), rows Base model / Router Tuning / RoMA, for DeepSeekMoE-16B and OLMoE-1B-7B
(arXiv 2511.07419, Table 1). The paper does not say which OLMoE checkpoint (0924 / 0125, base / instruct)."""

_PROTOCOL_TITLES = {
    "lm_eval": "lm-evaluation-harness (lm_eval.simple_evaluate, zero-shot)",
    "letter": "zero-shot letter protocol (roma_peft's interpretation; see docs/evaluation.md)",
}
NOT_APPLICABLE = "—"


def mean_ci(values: Iterable[float]) -> tuple[float, float, float]:
    """Mean, standard deviation (ddof 1) and the half-width of the 95 % Student-t interval of the mean; 0, 0 for one
    value. The one interval rule of the recipe report and the offline benchmark."""
    from scipy import stats

    values = [float(v) for v in values]
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, 0.0, 0.0
    std = statistics.stdev(values)
    return mean, std, float(stats.t.ppf(0.975, len(values) - 1)) * std / math.sqrt(len(values))


def cell_stats(values: Sequence[float], stderrs: Sequence[float | None] = ()) -> tuple[float, float | None]:
    """``(mean, half-width of the 95% interval)`` of one cell (fractions in, fractions out).

    ``k >= 2`` values: ``t(0.975, k-1) * sd(ddof=1) / sqrt(k)`` (scipy's Student t quantile). One value: ``1.96 *
    stderr`` (its binomial standard error; ``None`` when it has none).
    """
    from scipy import stats

    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("cell_stats needs at least one value.")
    k = len(vals)
    mean = sum(vals) / k
    if k == 1:
        err = stderrs[0] if stderrs else None
        return mean, (
            None
            if err is None or (isinstance(err, float) and math.isnan(err))
            else float(stats.norm.ppf(0.975)) * float(err)
        )
    mean, _, half = mean_ci(vals)
    return mean, half


def _check(records: list[dict]) -> None:
    need = ("variant", "seed", "benchmark", "protocol", "accuracy")
    for i, r in enumerate(records):
        missing = [k for k in need if k not in r]
        if missing:
            raise ValueError(f"record {i} lacks {missing}: {r}")
    seen = {}
    for r in records:
        key = (r["variant"], r["seed"], r["benchmark"], r["protocol"])
        if key in seen:
            raise ValueError(
                f"two records for variant {key[0]!r}, seed {key[1]!r}, benchmark {key[2]!r}, protocol "
                f"{key[3]!r}; each (variant, seed, benchmark, protocol) must appear once."
            )
        seen[key] = r


def _fmt(mean: float, half: float | None) -> str:
    return f"{100 * mean:.1f}" + (f" ± {100 * half:.1f}" if half is not None else "")


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    values = list(dict.fromkeys(values))
    return [v for v in order if v in values] + [v for v in values if v not in order]


def table1_report(records: Iterable[Mapping], *, paper_model: str | None = None) -> str:
    """The markdown report (see the module docstring): a block per protocol, a row per variant, a column per
    benchmark plus ``avg``, each cell ``mean ± 95% half-width`` in percent with the number of seeds per variant;
    with ``paper_model`` (``"olmoe"`` / ``"deepseekmoe"``) the paper's Table 1 rows for comparison."""
    records = [dict(r) for r in records]
    _check(records)
    if paper_model is not None and paper_model.lower() not in PAPER_TABLE1:
        raise ValueError(f"paper_model must be one of {list(PAPER_TABLE1)} (or None), got {paper_model!r}.")
    lines = [
        "# Results (Table 1 layout)",
        "",
        "Accuracy in percent: mean over seeds ± half-width of the 95% interval (Student t over seeds; one "
        "seed: 1.96 × the binomial standard error). `avg` is the unweighted mean over the benchmarks shown; "
        f"`{NOT_APPLICABLE}` means not applicable.",
        "",
    ]
    for protocol in _ordered((r["protocol"] for r in records), ("lm_eval", "letter")):
        rows = [r for r in records if r["protocol"] == protocol]
        benches = _ordered((r["benchmark"] for r in rows), BENCHMARK_ORDER)
        applicable = [b for b in benches if any(r["benchmark"] == b and r["accuracy"] is not None for r in rows)]
        lines += [f"## {_PROTOCOL_TITLES.get(protocol, protocol)}", ""]
        avg_note = "" if applicable == benches else f" ({len(applicable)} benchmarks)"
        lines.append("| variant | seeds | " + " | ".join(HEADERS.get(b, b) for b in benches) + f" | avg{avg_note} |")
        lines.append("|---" * (len(benches) + 3) + "|")
        for variant in _ordered((r["variant"] for r in rows), VARIANT_ORDER):
            vrows = [r for r in rows if r["variant"] == variant]
            seeds = list(dict.fromkeys(r["seed"] for r in vrows))
            cells = []
            for b in benches:
                cell = [r for r in vrows if r["benchmark"] == b and r["accuracy"] is not None]
                if not cell:
                    cells.append(NOT_APPLICABLE)
                    continue
                cells.append(_fmt(*cell_stats([r["accuracy"] for r in cell], [r.get("stderr") for r in cell])))
            cells.append(_average_cell(vrows, applicable, seeds))
            lines.append(f"| {variant} | {len(seeds)} | " + " | ".join(cells) + " |")
        lines.append("")
    if paper_model is not None:
        lines += _paper_block(paper_model.lower())
    return "\n".join(lines).rstrip() + "\n"


def _average_cell(vrows: list[dict], applicable: list[str], seeds: list) -> str:
    """Per seed: the mean over ``applicable`` benchmarks (only seeds that have all of them); then over seeds. One
    seed: its standard error is ``sqrt(sum(stderr_b^2)) / m`` (independent test sets)."""
    per_seed, avg_stderr = [], []
    for seed in seeds:
        got = {r["benchmark"]: r for r in vrows if r["seed"] == seed and r["accuracy"] is not None}
        if not applicable or any(b not in got for b in applicable):
            continue
        per_seed.append(sum(got[b]["accuracy"] for b in applicable) / len(applicable))
        errs = [got[b].get("stderr") for b in applicable]
        avg_stderr.append(
            None if any(e is None for e in errs) else math.sqrt(sum(float(e) ** 2 for e in errs)) / len(applicable)
        )
    if not per_seed:
        return NOT_APPLICABLE
    return _fmt(*cell_stats(per_seed, avg_stderr[:1] if len(per_seed) == 1 else ()))


def _paper_block(model: str) -> list[str]:
    table = PAPER_TABLE1[model]
    lines = [
        f"## The paper's Table 1 ({'OLMoE' if model == 'olmoe' else 'DeepSeekMoE'}), for comparison",
        "",
        "| row | " + " | ".join(HEADERS[b] for b in BENCHMARK_ORDER) + " | avg |",
        "|---" * (len(BENCHMARK_ORDER) + 2) + "|",
    ]
    for name, row in table.items():
        avg = sum(row.values()) / len(row)
        lines.append(f"| {name} | " + " | ".join(f"{row[b]:.1f}" for b in BENCHMARK_ORDER) + f" | {avg:.1f} |")
    lines += [
        "",
        "The paper names neither the evaluation template nor the metric per benchmark (acc / acc_norm, "
        "GSM8K's answer extraction), nor the number of seeds; compare trends, not decimals.",
        "",
    ]
    return lines


def write_report(records: Iterable[Mapping], out_dir: str, *, paper_model: str | None = None) -> dict[str, str]:
    """Write ``report.md`` (:func:`table1_report`) and ``results.json`` (the records) into ``out_dir``; returns the
    two paths as ``{"report": ..., "results": ...}``."""
    records = [dict(r) for r in records]
    text = table1_report(records, paper_model=paper_model)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"report": os.path.join(out_dir, "report.md"), "results": os.path.join(out_dir, "results.json")}
    with open(paths["report"], "w", encoding="utf-8") as f:
        f.write(text)
    with open(paths["results"], "w", encoding="utf-8") as f:
        json.dump({"records": records, "paper_model": paper_model}, f, indent=1, ensure_ascii=False, default=str)
    return paths
