"""Figures of a RoMA run, written as PNG with matplotlib (Agg, no pyplot): training curves and routing heatmaps.

* :func:`plot_training_curves`: the losses, lambda, the ``roma/*`` routing terms and eval accuracy from
  ``trainer.state.log_history``;
* :func:`routing_statistics` / :func:`plot_routing_heatmaps`: per tuned layer, expert utilisation, routing entropy
  and expert balance, base vs tuned;
* :func:`save_training_plots`: both, next to an adapter (what ``roma-peft train`` writes).

Needs the ``plots`` extra (``pip install "roma-peft[plots]"``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ._optional import require
from .capture import RoutingRecorder, RoutingSpec, collect_routing
from .constants import CURVES_FILE, HEATMAPS_FILE, ROUTING_STATS_FILE
from .regularizers import layer_blocks

__all__ = [
    "plot_training_curves",
    "routing_statistics",
    "plot_routing_heatmaps",
    "save_training_plots",
    "CURVES_FILE",
    "HEATMAPS_FILE",
    "ROUTING_STATS_FILE",
]


def _figure(figsize):
    """A matplotlib Figure on the Agg canvas, without pyplot: no display needed, and the backend or open figures of
    an interactive session (Jupyter) are left alone."""
    require("matplotlib", "Drawing training plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _series(log_history: Iterable[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            steps.append(float(entry.get("step", len(steps))))
            values.append(float(value))
    return steps, values


def _regularizer_keys(log_history: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = []
    for entry in log_history:
        for key in entry:
            if key.startswith("roma/") and key.endswith("_loss") and key != "roma/task_loss" and key not in keys:
                keys.append(key)
    return keys


def plot_training_curves(log_history: Sequence[Mapping[str, Any]], path: str, title: str | None = None) -> str:
    """Draw the curves of ``log_history`` (``trainer.state.log_history``) into the PNG ``path``; returns ``path``.

    Panels (each only when logged): loss (train ``loss``, ``eval_loss``), task loss (``roma/task_loss``,
    ``eval_roma/task_loss``), regulariser (``roma/<regularizer>_loss``, ``roma/neighbour_distance`` and their eval
    counterparts), lambda (``roma/lambda``), routing (``roma/routing_entropy``, ``roma/expert_balance``,
    ``roma/neighbour_similarity``), eval accuracy (``eval_accuracy``, ``eval_accuracy_norm`` with their standard
    errors). Raises ``ValueError`` when nothing plottable was logged.
    """
    history = list(log_history)
    regs = _regularizer_keys(history)
    panels = [
        ("loss", "total loss", [("loss", "train"), ("eval_loss", "eval")]),
        ("task loss", "task loss (CE)", [("roma/task_loss", "train"), ("eval_roma/task_loss", "eval")]),
        (
            "regulariser",
            "R (before lambda)",
            [(k, k[len("roma/") :]) for k in regs]
            + [("eval_" + k, "eval " + k[len("roma/") :]) for k in regs]
            + ([("roma/neighbour_distance", "neighbour distance")] if "roma/manifold_loss" not in regs else []),
        ),
        ("lambda", "effective lambda", [("roma/lambda", "lambda")]),
        (
            "routing",
            "value",
            [
                ("roma/routing_entropy", "routing entropy"),
                ("roma/expert_balance", "expert balance"),
                ("roma/neighbour_similarity", "neighbour similarity"),
                ("eval_roma/routing_entropy", "eval routing entropy"),
                ("eval_roma/expert_balance", "eval expert balance"),
            ],
        ),
        ("eval accuracy", "accuracy", [("eval_accuracy", "acc"), ("eval_accuracy_norm", "acc_norm")]),
    ]
    drawn = []
    for name, ylabel, lines in panels:
        data = [(label, key, *_series(history, key)) for key, label in lines]
        data = [d for d in data if d[2]]
        if data:
            drawn.append((name, ylabel, data))
    if not drawn:
        raise ValueError("plot_training_curves: the log history has no loss, roma/* or eval value to plot.")
    cols = min(3, len(drawn))
    rows = math.ceil(len(drawn) / cols)
    fig = _figure((4.6 * cols, 3.3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (name, ylabel, data) in zip(axes.flat, drawn):
        for label, key, steps, values in data:
            style = "o-" if key.startswith("eval_") or len(steps) < 3 else "-"
            ax.plot(steps, values, style, label=label, markersize=3)
            _, stderr = _series(history, key + "_stderr") if key.startswith("eval_accuracy") else ([], [])
            if stderr and len(stderr) == len(values):
                low = [v - e for v, e in zip(values, stderr)]
                high = [v + e for v, e in zip(values, stderr)]
                ax.fill_between(steps, low, high, alpha=0.2)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(data) > 1 or name in ("regulariser", "routing"):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(drawn) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _makedirs_for(path)
    fig.savefig(path, dpi=110)
    return path


def _makedirs_for(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)


def _subset(samples: Sequence[dict], max_samples: int | None) -> list[dict]:
    samples = list(samples)
    if max_samples is None or len(samples) <= max_samples:
        return samples
    step = len(samples) / max_samples  # evenly spread, so that every part of the data (task) is represented
    return [samples[int(i * step)] for i in range(max_samples)]


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


@torch.no_grad()
def routing_statistics(
    model,
    tokenizer,
    samples: Sequence[dict],
    encoding=None,
    spec=None,
    max_samples: int | None = 512,
    batch_size: int = 16,
) -> dict:
    """Per-layer expert utilisation, routing entropy and balance of ``model`` with its adapter disabled and enabled.

    Args:
        model: A ``PeftModel`` with an active RoMA adapter (the tuned routers are the layers).
        samples: Schema samples whose prompts are run (e.g. the training samples).
        encoding: The :class:`~roma_peft.prompts.PromptEncoding` of training (default: the default template).
        spec: The training :class:`~roma_peft.capture.RoutingSpec`; its position is where entropy is read
            (default: the last prompt token).
        max_samples: Use at most this many samples, evenly spread (None: all).

    Returns a JSON-able dict: ``layers`` (router names), ``experts`` (per layer), ``utilisation`` /
    ``entropy`` / ``balance`` each ``{"base": ..., "tuned": ...}`` (utilisation: a list of per-layer lists), and
    ``n_samples``, ``utilisation_spec``, ``entropy_spec``.
    """
    spec = spec or RoutingSpec()
    chosen = _subset(samples, max_samples)
    if not chosen:
        raise ValueError("routing_statistics needs at least one sample.")
    recorder = RoutingRecorder(model, spec=spec)
    routers, dims = recorder.routers, recorder.dims
    recorder.remove()
    util_spec = RoutingSpec(position="mean", representation="topk")
    ent_spec = RoutingSpec(position=spec.position, num_tokens=spec.num_tokens, representation="probs")
    kwargs = dict(routers=routers, encoding=encoding, progress=False, batch_size=batch_size)

    def capture():
        util = collect_routing(model, tokenizer, chosen, spec=util_spec, **kwargs)
        probs = collect_routing(model, tokenizer, chosen, spec=ent_spec, **kwargs)
        utilisation = [b.mean(0) for b in layer_blocks(util, dims, "probs")]
        entropy = [float(_entropy(b).mean()) for b in layer_blocks(probs, dims, "probs")]
        balance = [float(_entropy(u) / math.log(max(u.numel(), 2))) for u in utilisation]
        return [u.tolist() for u in utilisation], entropy, balance

    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise TypeError("routing_statistics compares the adapter disabled vs enabled: pass a PeftModel.")
    with disable():
        base = capture()
    tuned = capture()
    return {
        "layers": [r.name.replace("base_model.model.", "") for r in routers],
        "experts": list(dims),
        "n_samples": len(chosen),
        "utilisation_spec": util_spec.describe(),
        "entropy_spec": ent_spec.describe(),
        "utilisation": {"base": base[0], "tuned": tuned[0]},
        "entropy": {"base": base[1], "tuned": tuned[1]},
        "balance": {"base": base[2], "tuned": tuned[2]},
    }


def _matrix(rows: Sequence[Sequence[float]]):
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _short(name: str) -> str:
    parts = name.split(".")
    for part in parts:
        if part.isdigit():
            return f"layer {part}"
    return name if len(name) <= 24 else "…" + name[-23:]


def plot_routing_heatmaps(
    model,
    tokenizer,
    samples: Sequence[dict],
    path: str,
    encoding=None,
    spec=None,
    max_samples: int | None = 512,
    batch_size: int = 16,
    stats: dict | None = None,
) -> dict:
    """Heatmaps of per-layer expert utilisation and routing entropy/balance, base vs tuned, into the PNG ``path``.

    Args:
        model, tokenizer, samples: the adapted model and the samples to route (see :func:`routing_statistics`).
        path (`str`): the PNG to write.
        encoding, spec, max_samples, batch_size: passed to :func:`routing_statistics`.
        stats (`dict`, *optional*): its result, to draw without running the model.

    Returns:
        `dict`: the statistics drawn.
    """
    if stats is None:
        stats = routing_statistics(
            model, tokenizer, samples, encoding=encoding, spec=spec, max_samples=max_samples, batch_size=batch_size
        )
    base, tuned = _matrix(stats["utilisation"]["base"]), _matrix(stats["utilisation"]["tuned"])
    diff = tuned - base
    labels = [_short(n) for n in stats["layers"]]
    n_layers, n_experts = base.shape
    fig = _figure((max(11.0, 0.42 * n_experts * 3 + 3), 1.2 + 0.5 * n_layers + 3.0))
    grid = fig.add_gridspec(2, 3, height_ratios=[max(n_layers, 1), max(n_layers, 1)])
    vmax = float(np.nanmax([np.nanmax(base), np.nanmax(tuned)]))
    dmax = float(np.nanmax(np.abs(diff))) or 1e-6
    panels = [
        (base, "utilisation, base", "viridis", 0.0, vmax),
        (tuned, "utilisation, tuned", "viridis", 0.0, vmax),
        (diff, "utilisation, tuned - base", "RdBu_r", -dmax, dmax),
    ]
    for col, (data, title, cmap, lo, hi) in enumerate(panels):
        ax = fig.add_subplot(grid[0, col])
        image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_yticks(range(n_layers), labels, fontsize=8)
        ax.set_xlabel("expert")
        if n_experts <= 32:
            ax.set_xticks(range(n_experts), [str(e) for e in range(n_experts)], fontsize=6)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    # entropy and balance: layers x (base, tuned), and their change
    ent = np.array([stats["entropy"]["base"], stats["entropy"]["tuned"]]).T
    bal = np.array([stats["balance"]["base"], stats["balance"]["tuned"]]).T
    change = np.stack([ent[:, 1] - ent[:, 0], bal[:, 1] - bal[:, 0]], axis=1)
    for col, (data, title, cmap, xt) in enumerate(
        [
            (ent, f"routing entropy ({stats.get('entropy_spec', '')})", "magma", ["base", "tuned"]),
            (bal, "expert balance H(u)/log E", "cividis", ["base", "tuned"]),
            (change, "tuned - base", "RdBu_r", ["entropy", "balance"]),
        ]
    ):
        ax = fig.add_subplot(grid[1, col])
        if col == 2:
            m = float(np.nanmax(np.abs(data))) or 1e-6
            image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=-m, vmax=m, interpolation="nearest")
        else:
            image = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest")
        for (i, j), value in np.ndenumerate(data):
            shade = image.norm(value) if np.isfinite(value) else 0.0
            dark = shade < 0.5 if col < 2 else abs(float(shade) - 0.5) > 0.35
            ax.text(
                j,
                i,
                f"{value:+.3f}" if col == 2 else f"{value:.3f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if dark else "black",
            )
        ax.set_title(title, fontsize=10)
        ax.set_yticks(range(n_layers), labels, fontsize=8)
        ax.set_xticks(range(2), xt)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(
        f"Routing of the tuned layers on {stats['n_samples']} samples: adapter disabled (base) vs enabled "
        f"(tuned); utilisation = share of top-k weight over all prompt tokens",
        fontsize=10,
    )
    fig.tight_layout()
    _makedirs_for(path)
    fig.savefig(path, dpi=110)
    return stats


def save_training_plots(
    output_dir: str,
    log_history: Sequence[Mapping[str, Any]] | None = None,
    model=None,
    tokenizer=None,
    samples: Sequence[dict] | None = None,
    encoding=None,
    spec=None,
    max_samples: int | None = 512,
    batch_size: int = 16,
    stats: dict | None = None,
    title: str | None = None,
) -> dict[str, str]:
    """Write ``training_curves.png`` and ``routing_heatmaps.png`` + ``routing_stats.json`` into ``output_dir``.

    Args:
        output_dir (`str`): where the files go (next to the adapter).
        log_history (`list[dict]`, *optional*): ``trainer.state.log_history``, for the curves.
        model, tokenizer, samples, encoding, spec, max_samples, batch_size: what :func:`routing_statistics` runs on,
            for the heatmaps.
        stats (`dict`, *optional*): a result of :func:`routing_statistics`, to draw without running the model.
        title (`str`, *optional*): the figures' title.

    Returns:
        `dict[str, str]`: ``{what: path}`` of the files written; parts without their inputs are skipped.
    """
    written: dict[str, str] = {}
    os.makedirs(output_dir, exist_ok=True)
    if log_history:
        try:
            written["training_curves"] = plot_training_curves(
                log_history, os.path.join(output_dir, CURVES_FILE), title=title
            )
        except ValueError:
            pass  # nothing was logged (e.g. no logging step was reached)
    if stats is not None or (model is not None and tokenizer is not None and samples):
        stats = plot_routing_heatmaps(
            model,
            tokenizer,
            samples or [],
            os.path.join(output_dir, HEATMAPS_FILE),
            encoding=encoding,
            spec=spec,
            max_samples=max_samples,
            batch_size=batch_size,
            stats=stats,
        )
        written["routing_heatmaps"] = os.path.join(output_dir, HEATMAPS_FILE)
        with open(os.path.join(output_dir, ROUTING_STATS_FILE), "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=1)
        written["routing_stats"] = os.path.join(output_dir, ROUTING_STATS_FILE)
    return written
