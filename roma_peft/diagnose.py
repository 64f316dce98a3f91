"""``roma-peft diagnose``: does RoMA's premise hold for *this* model and *this* data?

RoMA (paper, section 3) rests on three claims. Before spending a training run, measure each one:

1. **Routing errors are fixable by routing.** Per-sample oracle routing (paper Eq. 1, optimised toward the gold
   option; :func:`roma_peft.benchmark.oracle.oracle_routing`) next to the *same* optimisation toward a random wrong
   option. If routing can push the answer to a wrong option as easily as to the gold one, the oracle gain only shows
   that routing is a steering wheel, not that a better routing is there to be learned.
2. **The embedding knows the task.** k-NN task purity of the sentence embedding (where samples carry ``task``), and
   the *swap-in* test: for failed items, force the kernel-regression estimate of what RoMA pulls the routing toward
   (the W-weighted average of the k successful neighbours' routing, ``sum_j W_ij r_j``; C3PO's kernel-regression
   baseline) at the tuned routers and count the items that become correct, against the same with k *random*
   successful samples' routing (:func:`roma_peft.benchmark.oracle.score_with_routing`).
3. **The router is misaligned with the embedding.** k-NN overlap between the embedding space and each layer's routing
   space (1 = same neighbourhoods, ``k / (n - 1)`` = chance), routing entropy and expert utilisation per layer.

:func:`verdict` turns the numbers into one plain paragraph by the explicit thresholds of :class:`Thresholds`
(documented with every number in ``docs/diagnose.md``). :func:`diagnose` runs everything and, with ``output_dir``,
writes ``diagnose.json`` (every number), ``report.md`` and PNG figures.

Cost: one scoring pass over all samples, two routing passes (dense and top-k weights), per layer selection two oracle
runs (``oracle_steps`` forward+backward passes over ``num_items`` items each) and two forced-routing scoring passes
over at most ``num_items`` failed items. Everything runs on the model's device, batched, with progress bars.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .devices import describe_machine

__all__ = [
    "DiagnoseConfig",
    "Thresholds",
    "LayerSelection",
    "parse_layer_selections",
    "task_purity",
    "routing_entropy",
    "expert_utilisation",
    "mcnemar_p_value",
    "neighbour_routing",
    "wrong_goals",
    "verdict",
    "diagnose",
    "write_diagnosis",
    "report_markdown",
    "DIAGNOSIS_FILES",
]

FORMAT_VERSION = 1
#: Files whose presence means an output directory already holds a diagnosis (refused without ``overwrite``).
DIAGNOSIS_FILES = ("diagnose.json", "report.md")

# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Thresholds:
    """The explicit rules the verdict follows (see ``docs/diagnose.md``). Rates are fractions (0.05 = 5 points)."""

    min_oracle_gain: float = 0.05
    """Premise 1: oracle routing toward gold must raise accuracy on the oracle items by at least this much, else
    routing has no headroom."""
    min_repair_margin: float = 0.10
    """Premise 1: on the base model's failed items, the fraction the oracle fixes (toward gold) minus the fraction the
    same optimisation steers to a random other wrong option must be at least this, else the oracle gain is steering,
    not repair."""
    max_repair_p_value: float = 0.05
    """Premise 1: ... and the paired difference must be unlikely by chance (one-sided exact McNemar test); a margin
    above the threshold with a larger p-value is *inconclusive* (more items needed)."""
    min_purity_lift: float = 0.5
    """Premise 2: task purity above chance, ``(purity - chance) / (1 - chance)``, must be at least this."""
    min_swap_margin: float = 0.05
    """Premise 2: the neighbours' routing must fix at least this fraction more failed items than random successful
    samples' routing ..."""
    max_swap_p_value: float = 0.05
    """... and that difference must be unlikely by chance (one-sided exact McNemar test, :func:`mcnemar_p_value`); a
    margin above the threshold with a larger p-value is *inconclusive*."""
    max_overlap_lift: float = 0.5
    """Premise 3: the router counts as misaligned when its k-NN overlap with the embedding above chance,
    ``(overlap - chance) / (1 - chance)``, is below this."""


@dataclass
class DiagnoseConfig:
    """What :func:`diagnose` measures and how hard it tries (also the ``roma-peft diagnose`` options)."""

    num_items: int = field(
        default=200,
        metadata={
            "help": (
                "Items per oracle run (a seeded random sample of the data) and at most this many failed items for the "
                "swap-in test."
            )
        },
    )
    layer_selections: str = field(
        default="last1,last2,last5",
        metadata={
            "help": (
                "Comma-separated layer selections, each measured separately: lastN, firstN, middleN, all, or "
                "indices:i/j/... (MoE-layer positions, negative from the end), e.g. 'last1,last2,indices:-4/-1'. A "
                "selection that needs more MoE layers than the model has is skipped (and reported)."
            )
        },
    )
    k: int = field(default=3, metadata={"help": "Neighbours of the swap-in, task purity and k-NN overlap."})
    seed: int = field(default=0, metadata={"help": "Seed of the item samples, wrong options and random neighbours."})
    oracle_steps: int = field(default=30, metadata={"help": "Adam steps of the oracle (toward gold and toward wrong)."})
    oracle_lr: float = field(default=0.05, metadata={"help": "Step size of the oracle's router-input offsets."})
    oracle_batch_size: int = field(default=32, metadata={"help": "Samples per oracle batch (forward + backward)."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward for scoring and routing capture."})
    embedding_model: str | None = field(
        default=None,
        metadata={
            "help": (
                "sentence-transformers model (name or path) for the task embedding; default all-MiniLM-L6-v2, offline."
            )
        },
    )
    embed_field: str | None = field(
        default=None,
        metadata={"help": ("Sample key that is embedded; default 'embed_text' if present else 'question'.")},
    )
    success_metric: str = field(default="acc", metadata={"help": "'acc' or 'acc_norm': what counts as answered (S)."})
    figures: bool = field(default=True, metadata={"help": "Draw the PNG figures (matplotlib, Agg backend)."})
    max_figure_points: int = field(default=600, metadata={"help": "Points in the 2-D manifold projections."})

    def validate(self) -> None:
        for name in ("num_items", "k", "oracle_batch_size", "batch_size", "max_figure_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if isinstance(self.oracle_steps, bool) or not isinstance(self.oracle_steps, int) or self.oracle_steps < 0:
            raise ValueError(f"oracle_steps must be an integer >= 0, got {self.oracle_steps!r}.")
        if not (isinstance(self.oracle_lr, (int, float)) and math.isfinite(self.oracle_lr) and self.oracle_lr > 0):
            raise ValueError(f"oracle_lr must be a positive number, got {self.oracle_lr!r}.")
        if self.success_metric not in ("acc", "acc_norm"):
            raise ValueError(f"success_metric must be 'acc' or 'acc_norm', got {self.success_metric!r}.")
        parse_layer_selections(self.layer_selections)


@dataclass(frozen=True)
class LayerSelection:
    """One layer selection of ``--layer_selections`` (``name`` as the user wrote it)."""

    name: str
    layer_selection: str
    num_layers: int = 5
    indices: tuple[int, ...] | None = None

    def to_config(self):
        from .config import RomaConfig

        if self.layer_selection == "indices":
            return RomaConfig(layer_selection="indices", moe_layer_indices=list(self.indices))
        return RomaConfig(layer_selection=self.layer_selection, num_layers=self.num_layers)


_COUNTED = re.compile(r"^(last|first|middle)([1-9][0-9]*)$")
_INDICES = re.compile(r"^indices:(-?[0-9]+(?:/-?[0-9]+)*)$")
_GRAMMAR = (
    "lastN, firstN, middleN (N >= 1), all, or indices:i/j/... with MoE-layer positions (negative from the "
    "end), comma-separated, e.g. 'last1,last2,last5' or 'last2,indices:-4/-1'"
)


def parse_layer_selections(spec) -> list[LayerSelection]:
    """Parse ``"last1,last2,indices:-3/-1"`` (or a list of such tokens) into :class:`LayerSelection` s.

    Only the syntax is checked here (before any model is loaded); whether the model has enough MoE layers is checked
    by :func:`roma_peft.model.resolve_routers` when the selection is used.
    """
    tokens = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else [str(t).strip() for t in spec]
    if not tokens or any(not t for t in tokens):
        raise ValueError(f"layer selections {spec!r}: empty selection; use {_GRAMMAR}.")
    out = []
    for token in tokens:
        counted, listed = _COUNTED.match(token), _INDICES.match(token)
        if token == "all":
            out.append(LayerSelection(token, "all"))
        elif counted:
            out.append(LayerSelection(token, counted.group(1), num_layers=int(counted.group(2))))
        elif listed:
            indices = tuple(int(i) for i in listed.group(1).split("/"))
            if len(set(indices)) != len(indices):
                raise ValueError(f"layer selection {token!r} names the same MoE layer twice.")
            out.append(LayerSelection(token, "indices", indices=indices))
        else:
            raise ValueError(f"layer selection {token!r} is not valid; use {_GRAMMAR}.")
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"layer selections {spec!r} list a selection twice.")
    return out


# ---------------------------------------------------------------------------------------------- measures


def task_purity(embeddings, tasks: Sequence[str | None], k: int = 3) -> dict | None:
    """k-NN task purity of an embedding: the mean fraction of each sample's k nearest neighbours with its ``task``.

    Returns ``None`` when there are fewer than two distinct tasks or a sample has none. ``chance`` is the purity a
    space unrelated to the tasks has in expectation (``mean_i (n_{task_i} - 1) / (n - 1)``), ``lift`` the purity
    above chance on a 0..1 scale, ``(purity - chance) / (1 - chance)``; ``per_task`` the purity of each task's samples.
    """
    from .neighbours import nearest_neighbours

    tasks = list(tasks)
    if any(t is None or t == "" for t in tasks) or len(set(tasks)) < 2:
        return None
    labels = np.asarray([str(t) for t in tasks])
    n = len(labels)
    neighbours = nearest_neighbours(embeddings, k)
    same = labels[neighbours] == labels[:, None]
    purity = float(same.mean())
    names, counts = np.unique(labels, return_counts=True)
    size = dict(zip(names, counts))
    chance = float(np.mean([(size[t] - 1) / (n - 1) for t in labels]))
    per_task = {str(t): float(same[labels == t].mean()) for t in names}
    return {
        "value": purity,
        "chance": chance,
        "lift": _lift(purity, chance),
        "k": k,
        "n_tasks": int(len(names)),
        "per_task": per_task,
    }


def routing_entropy(weights: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-sample entropy of dense routing weights ``(N, E)``, normalised to [0, 1] by ``log E``.

    Weights are first normalised to sum to 1 (sigmoid families' weights do not): 1 = uniform over all experts,
    0 = all weight on one expert.
    """
    w = np.asarray(weights, dtype=np.float64)
    p = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-30)
    h = -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=1)
    return h / math.log(w.shape[1]) if w.shape[1] > 1 else np.zeros(len(w))


def expert_utilisation(sparse: torch.Tensor | np.ndarray) -> dict:
    """How the last prompt token's selected experts spread over the experts of one router.

    ``sparse`` is ``(N, E)`` top-k routing weights (zero for experts not selected, the ``topk`` representation of
    :func:`roma_peft.capture.collect_routing`). ``frequency[e]``: fraction of samples that select expert e;
    ``effective_experts``: ``exp(entropy)`` of the selection shares (E when every expert is picked equally often, 1
    when one expert takes every selection); ``dead_experts``: experts no sample selects; ``max_share``: the share of
    all selections that go to the busiest expert.
    """
    selected = np.asarray(sparse, dtype=np.float64) > 0
    frequency = selected.mean(axis=0) if len(selected) else np.zeros(selected.shape[1])
    share = frequency / max(frequency.sum(), 1e-30)
    nz = share[share > 0]
    return {
        "frequency": [float(f) for f in frequency],
        "effective_experts": float(np.exp(-(nz * np.log(nz)).sum())) if nz.size else 0.0,
        "dead_experts": int((frequency == 0).sum()),
        "max_share": float(share.max()) if share.size else 0.0,
    }


def paired_comparison(a, b) -> tuple[int, int, float]:
    """Items where ``a`` succeeds and ``b`` not (wins), the reverse (losses), and the one-sided McNemar p-value."""
    wins = sum(x and not y for x, y in zip(a, b))
    losses = sum(y and not x for x, y in zip(a, b))
    return wins, losses, mcnemar_p_value(wins, losses)


def mcnemar_p_value(wins: int, losses: int) -> float:
    """One-sided exact McNemar test: P(X >= wins) for X ~ Binomial(wins + losses, 1/2).

    ``wins``: items fixed by the neighbours' routing but not by the random control; ``losses``: the reverse.
    """
    n = wins + losses
    if n == 0:
        return 1.0
    return float(sum(math.comb(n, i) for i in range(wins, n + 1)) / 2**n)


def neighbour_routing(neighbourhood, rows, routing: torch.Tensor) -> torch.Tensor:
    """The kernel-regression estimate of what RoMA pulls each sample's routing toward: ``sum_j W_ij r_j`` over its
    successful neighbours N(i) (C3PO's kernel-regression baseline), for the samples at ``rows``.

    ``neighbourhood`` is a :class:`~roma_peft.neighbours.Neighbourhood` (its ``weights`` are W, normalised over N(i));
    ``routing`` the ``(N, D)`` routing vectors of all its samples (stored into it). A sample without any neighbour
    keeps its own routing.
    """
    rows = torch.as_tensor(rows, dtype=torch.long, device="cpu")
    neighbourhood.set_routing(routing)
    targets, weights, mask = neighbourhood.lookup(rows)
    estimate = (targets * weights.unsqueeze(-1)).sum(dim=1)
    alone = ~mask.any(dim=1)
    estimate[alone] = neighbourhood.routing[rows[alone]]
    return estimate


def _lift(value: float, chance: float) -> float:
    return float((value - chance) / (1 - chance)) if chance < 1 else 0.0


def _rate(num: int, den: int) -> float | None:
    return float(num / den) if den else None


# ---------------------------------------------------------------------------------------------- verdict


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} points"


def _pct(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if 0 < abs(x) < 0.095 else f"{100 * x:.0f}%"


def _premise1(sel: dict, th: Thresholds) -> tuple[str, str]:
    o = sel.get("oracle")
    if not o:
        return "unknown", "The oracle was not run for this selection."
    gold, wrong = o["gold"], o["wrong"]
    if gold["gain"] < th.min_oracle_gain:
        return "no_headroom", (
            f"Even oracle routing toward the gold answer changes accuracy by only {_pts(gold['gain'])} "
            f"({gold['fixed']} of {o['n_base_wrong']} base failures fixed, {gold['broken']} correct items broken, on "
            f"{o['n_items']} items), below the {_pts(th.min_oracle_gain).lstrip('+')} needed: routing has little "
            "headroom here."
        )
    margin, p = o["repair_margin"], o["repair_p_value"]
    compare = (
        f"oracle routing toward the gold answer fixes {_pct(gold['fix_rate'])} of the base model's failures "
        f"({gold['fixed']}/{o['n_base_wrong']}, accuracy {_pts(gold['gain'])}), the same optimisation toward "
        f"another wrong option moves {_pct(wrong['steer_rate'])} of them there ({wrong['steered']}/"
        f"{wrong['n_failed_not_at_target']}; margin {_pts(margin)}, p = {p:.3g})"
    )
    if margin is None or margin < th.min_repair_margin:
        return "steering", (f"Routing is a steering wheel: {compare}, so the oracle gain is steering, not repair.")
    if p > th.max_repair_p_value:
        return "inconclusive", (
            f"Premise 1 is inconclusive: {compare}; the margin is large enough but could be "
            "chance on this few items (raise --num_items)."
        )
    return "holds", f"Routing errors look fixable by routing: {compare}."


def _premise2(sel: dict, purity: dict | None, th: Thresholds) -> tuple[str, str, dict]:
    parts, statuses = [], {}
    if purity is None:
        statuses["purity"] = "unknown"
        parts.append("Task purity was not measured (the samples carry fewer than two 'task' labels).")
    elif purity["lift"] < th.min_purity_lift:
        statuses["purity"] = "fails"
        parts.append(
            f"The embedding does not separate your tasks: {_pct(purity['value'])} of embedding neighbours "
            f"share the task (chance {_pct(purity['chance'])}, lift {purity['lift']:.2f} < "
            f"{th.min_purity_lift})."
        )
    else:
        statuses["purity"] = "holds"
        parts.append(
            f"The embedding separates the tasks: {_pct(purity['value'])} of embedding neighbours share the "
            f"task (chance {_pct(purity['chance'])})."
        )
    swap = sel.get("swap_in") or {}
    if not swap.get("available"):
        statuses["swap_in"] = "unknown"
        parts.append(f"The swap-in test was not run ({swap.get('reason', 'no failed items')}).")
    else:
        nb, rnd, n = swap["neighbours"]["fixed"], swap["random"]["fixed"], swap["n_items"]
        big = swap["margin"] >= th.min_swap_margin
        ok = big and swap["p_value"] <= th.max_swap_p_value
        statuses["swap_in"] = "holds" if ok else ("inconclusive" if big else "fails")
        if big and not ok:
            parts.append(
                f"Swapping in the successful neighbours' routing fixes {nb} of {n} failed items against {rnd} "
                f"with random successful samples' routing, but p = {swap['p_value']:.3g}: inconclusive on "
                "this few items (raise --num_items)."
            )
        elif ok:
            parts.append(
                f"Swapping in the successful neighbours' routing fixes {nb} of {n} failed items against {rnd} "
                f"with random successful samples' routing (p = {swap['p_value']:.3g}): the neighbours carry a "
                "routing that answers the item."
            )
        else:
            parts.append(
                f"Swapping in the successful neighbours' routing fixes {nb} of {n} failed items, {rnd} with "
                f"random successful samples' routing (margin {_pts(swap['margin'])}, p = "
                f"{swap['p_value']:.3g}): the embedding's neighbours do not carry a better routing than "
                "random successful samples."
            )
    values = set(statuses.values())
    if "fails" in values:
        status = "fails"
    elif statuses.get("swap_in") == "holds" and statuses.get("purity") in ("holds", "unknown"):
        status = "holds"
    elif "inconclusive" in values:
        status = "inconclusive"
    else:
        status = "unknown"
    return status, " ".join(parts), statuses


def _premise3(sel: dict, th: Thresholds) -> tuple[str, str]:
    ov = sel.get("knn_overlap")
    if not ov:
        return "unknown", "The k-NN overlap was not measured."
    if ov["lift"] < th.max_overlap_lift:
        return "holds", (
            f"The tuned routing shares {_pct(ov['value'])} of each sample's embedding neighbours (chance "
            f"{_pct(ov['chance'])}): the router is misaligned with the embedding, which is what RoMA's "
            "manifold term corrects."
        )
    return "fails", (
        f"The tuned routing already shares {_pct(ov['value'])} of each sample's embedding neighbours "
        f"(chance {_pct(ov['chance'])}): there is little misalignment for RoMA's manifold term to "
        "correct."
    )


_HEADLINES = {
    "all": "RoMA has headroom here.",
    "no_headroom": "Routing has little headroom here.",
    "steering": "The oracle gain is steering, not repair.",
    "purity": "The embedding does not separate your tasks.",
    "swap_in": "The embedding's neighbours do not carry a routing that fixes failures.",
    "aligned": "The router already follows the embedding.",
    "unknown": "Inconclusive: part of RoMA's premise could not be measured, or needs more items.",
}


def _judge(sel: dict, purity: dict | None, th: Thresholds) -> dict:
    p1, t1 = _premise1(sel, th)
    p2, t2, parts2 = _premise2(sel, purity, th)
    p3, t3 = _premise3(sel, th)
    if p1 in ("no_headroom", "steering"):
        key = p1
    elif p2 == "fails":
        key = "purity" if parts2.get("purity") == "fails" else "swap_in"
    elif p3 == "fails":
        key = "aligned"
    elif p1 == p2 == p3 == "holds":
        key = "all"
    else:
        key = "unknown"
    return {
        "key": key,
        "premises": {
            "1_fixable_by_routing": p1,
            "2_embedding_knows_task": p2,
            "2_parts": parts2,
            "3_router_misaligned": p3,
        },
        "sentences": [t1, t2, t3],
    }


def verdict(result: dict, thresholds: Thresholds | None = None) -> dict:
    """The plain-words verdict of a diagnosis (the dict :func:`diagnose` returns, or hand-made numbers of that shape).

    Each layer selection is judged on its own (premise 1: oracle gain and repair margin; premise 2: task purity, the
    same for all, and the swap-in margin; premise 3: k-NN overlap lift). The verdict reports the most favourable
    selection (most premises holding; ties go to the larger repair margin, then to the order given). The headline is
    the first failing premise in the order 1, 2, 3, or "RoMA has headroom here" when all three hold.
    """
    th = thresholds or Thresholds()
    purity = result.get("purity")
    judged = {name: _judge(sel, purity, th) for name, sel in (result.get("selections") or {}).items()}
    if not judged:
        return {
            "selection": None,
            "key": "unknown",
            "headline": _HEADLINES["unknown"],
            "text": _HEADLINES["unknown"] + " No layer selection could be measured on this model.",
            "premises": {},
            "per_selection": {},
        }

    def rank(item):
        position, (name, j) = item
        holds = sum(v == "holds" for k, v in j["premises"].items() if k != "2_parts")
        margin = (result["selections"][name].get("oracle") or {}).get("repair_margin")
        return (-holds, -(margin if margin is not None else -math.inf), position)

    best_name, best = sorted(enumerate(judged.items()), key=rank)[0][1]
    text = " ".join(
        [_HEADLINES[best["key"]], *best["sentences"], f"(Layer selection {best_name}; thresholds: docs/diagnose.md.)"]
    )
    return {
        "selection": best_name,
        "key": best["key"],
        "headline": _HEADLINES[best["key"]],
        "text": text,
        "premises": best["premises"],
        "per_selection": {name: {"key": j["key"], "premises": j["premises"]} for name, j in judged.items()},
    }


# ---------------------------------------------------------------------------------------------- the run


def _check_output_dir(output_dir: str, overwrite: bool) -> None:
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"output_dir {output_dir!r} is a file, not a directory.")
    found = [f for f in DIAGNOSIS_FILES if os.path.exists(os.path.join(output_dir, f))]
    if found and not overwrite:
        raise FileExistsError(
            f"{output_dir!r} already holds a diagnosis ({', '.join(found)}). Refusing to overwrite "
            "it: choose another output directory, or pass overwrite=True (CLI: --overwrite)."
        )


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def wrong_goals(samples: Sequence[dict], base_pred: Sequence[int], seed: int = 0) -> list[int]:
    """The wrong option each item's routing is steered toward in the control: a random option that is neither the
    gold one nor (where another exists) the one the base model already predicts, so that on failed items both the
    oracle and the control must move the answer to an option the model does not pick."""
    rng = random.Random(seed)
    goals = []
    for s, pred in zip(samples, base_pred):
        wrong = [j for j in range(len(s["options"])) if j != s["label"]]
        fresh = [j for j in wrong if j != pred]
        goals.append(rng.choice(fresh or wrong))
    return goals


def _oracle_numbers(samples, base_pred: list[int], gold, wrong) -> dict:
    """Premise 1's numbers from the two oracle runs on the same items (see ``docs/diagnose.md``)."""
    labels = [s["label"] for s in samples]
    n = len(samples)
    base_ok = [p == y for p, y in zip(base_pred, labels)]
    gold_ok = list(gold.correct)
    base_hit = [p == g for p, g in zip(base_pred, wrong.goal)]
    hit = [p == g for p, g in zip(wrong.pred, wrong.goal)]
    failed = [i for i in range(n) if not base_ok[i]]
    fixed = sum(gold_ok[i] for i in failed)
    # the control on the same failed items: those whose wrong target is not already the base prediction
    eligible = [i for i in failed if not base_hit[i]]
    steered_failed = sum(hit[i] for i in eligible)
    wins, losses, p_value = paired_comparison([gold_ok[i] for i in eligible], [hit[i] for i in eligible])
    base_acc = sum(base_ok) / n
    gold_numbers = {
        "accuracy": gold.accuracy,
        "correct": sum(gold_ok),
        "gain": gold.accuracy - base_acc,
        "fixed": fixed,
        "broken": sum(b and not g for g, b in zip(gold_ok, base_ok)),
        "fix_rate": _rate(fixed, len(failed)),
    }
    wrong_numbers = {
        "accuracy": wrong.accuracy,
        "correct": sum(wrong.correct),
        "target_hits": sum(hit),
        "base_target_hits": sum(base_hit),
        "gain": (sum(hit) - sum(base_hit)) / n,
        "steered": steered_failed,
        "n_failed_not_at_target": len(eligible),
        "steer_rate": _rate(steered_failed, len(eligible)),
        "steered_all": sum(h and not b for h, b in zip(hit, base_hit)),
        "steer_rate_all": _rate(sum(h and not b for h, b in zip(hit, base_hit)), n - sum(base_hit)),
    }
    fix, steer = gold_numbers["fix_rate"], wrong_numbers["steer_rate"]
    return {
        "n_items": n,
        "base_accuracy": base_acc,
        "base_correct": sum(base_ok),
        "n_base_wrong": len(failed),
        "gold": gold_numbers,
        "wrong": wrong_numbers,
        "gain_difference": gold_numbers["gain"] - wrong_numbers["gain"],
        "repair_margin": None if fix is None or steer is None else fix - steer,
        "repair_wins": wins,
        "repair_losses": losses,
        "repair_p_value": p_value,
    }


def diagnose(
    model,
    tokenizer,
    samples: Sequence[dict],
    config: DiagnoseConfig | None = None,
    encoding=None,
    embeddings=None,
    thresholds: Thresholds | None = None,
    output_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    source: str | None = None,
) -> dict:
    """Measure RoMA's three premises on ``model`` and ``samples`` (multiple choice) and return every number.

    Args:
        model: A causal MoE LM (any family the registry knows), already on its device; it is not changed.
        samples: Schema samples with ``options`` and ``label`` (``task`` enables the purity measure).
        config: What to measure (:class:`DiagnoseConfig`).
        encoding: The :class:`~roma_peft.prompts.PromptEncoding` of scoring/training (default: the plain template).
        embeddings: ``(N, d)`` task embeddings; default :func:`roma_peft.embeddings.embed_samples` with
            ``config.embedding_model`` / ``config.embed_field``.
        thresholds: The verdict's rules (:class:`Thresholds`).
        output_dir: When given, :func:`write_diagnosis` writes ``diagnose.json``, ``report.md`` and the figures
            there (a directory already holding a diagnosis is refused unless ``overwrite``, before any model work).
        source: A description of the data (recorded).

    Returns the dict written to ``diagnose.json``: ``base``, ``purity``, ``layers`` (per router: k-NN overlap, entropy,
    utilisation), ``selections`` (per layer selection: ``oracle``, ``swap_in``, ``knn_overlap``), ``verdict``.
    """
    from .benchmark.figures import knn_overlap
    from .benchmark.oracle import oracle_routing, score_with_routing
    from .capture import RoutingSpec, collect_routing
    from .data import data_hash, validate_samples
    from .devices import input_device
    from .embeddings import DEFAULT_EMBEDDING_MODEL, embed_samples
    from .model import resolve_routers
    from .neighbours import NeighbourhoodConfig, build_neighbourhood
    from .prompts import PromptEncoding
    from .routers import NoRoutersFoundError, find_routers
    from .scoring import score_multiple_choice

    if getattr(model, "peft_config", None):
        raise ValueError(
            "diagnose measures a stock model, but this one carries a PEFT adapter (its routers would be "
            "forced through the base weights only). Merge it first: model = model.merge_and_unload() "
            "(the CLI does this for --adapter_path), or pass the base model."
        )
    config = config or DiagnoseConfig()
    config.validate()
    thresholds = thresholds or Thresholds()
    selections = parse_layer_selections(config.layer_selections)
    if output_dir is not None:
        _check_output_dir(output_dir, overwrite)
    samples = validate_samples(samples)
    no_options = [s["id"] for s in samples if not s.get("options") or s.get("label") is None]
    if no_options:
        raise ValueError(
            f"{len(no_options)} sample(s) have no options/label (first: {no_options[0]!r}); diagnose "
            "needs multiple-choice samples (the oracle and the swap-in test score options)."
        )
    n = len(samples)
    if n <= config.k + 1:
        raise ValueError(f"diagnose needs more than k + 1 = {config.k + 1} samples, got {n}.")
    encoding = encoding or PromptEncoding.for_tokenizer(tokenizer)
    device = input_device(model)
    timing: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timing[name] = round(now - clock, 2)
        clock = now

    # base accuracy and S
    base = score_multiple_choice(
        model, tokenizer, samples, batch_size=config.batch_size, encoding=encoding, progress=progress
    )
    correct = base.correct_mask(config.success_metric)
    base_pred = list(base.pred if config.success_metric == "acc" else base.pred_norm)
    lap("base_scoring")

    # the task embedding
    if embeddings is None:
        embeddings = embed_samples(samples, config.embedding_model, field=config.embed_field, progress=progress)
    emb = np.asarray(
        embeddings.detach().cpu() if isinstance(embeddings, torch.Tensor) else embeddings, dtype=np.float32
    )
    if emb.shape[0] != n:
        raise ValueError(f"embeddings must have one row per sample ({n}), got shape {emb.shape}.")
    lap("embedding")

    # routing of every MoE router at the last prompt token: dense weights and the family's top-k weights
    all_routers = [r for r in find_routers(model) if r.family.supported]
    if not all_routers:
        raise NoRoutersFoundError("diagnose found no MoE router RoMA can tune in this model.")
    routing = collect_routing(
        model,
        tokenizer,
        samples,
        spec=RoutingSpec(),
        routers=all_routers,
        batch_size=config.batch_size,
        encoding=encoding,
        progress=progress,
    )
    sparse = collect_routing(
        model,
        tokenizer,
        samples,
        spec=RoutingSpec(representation="topk"),
        routers=all_routers,
        batch_size=config.batch_size,
        encoding=encoding,
        progress=progress,
    )
    offsets = np.cumsum([0] + [r.num_experts for r in all_routers])
    columns = {r.name: slice(int(offsets[i]), int(offsets[i + 1])) for i, r in enumerate(all_routers)}
    lap("routing_capture")

    tasks = [s.get("task") for s in samples]
    purity = task_purity(emb, tasks, config.k)
    has_tasks = purity is not None
    groups = [str(t) for t in tasks] if has_tasks else ["successful" if c else "failed" for c in correct]
    group_names = sorted(set(groups), key=lambda g: (-groups.count(g), g))[:30]
    chance_overlap = config.k / (n - 1)
    layers = []
    for router in all_routers:
        block = routing[:, columns[router.name]].numpy()
        entropy = routing_entropy(block)
        overlap = knn_overlap(emb, block, config.k)
        layers.append(
            {
                "router": router.name,
                "layer": router.layer_index,
                "family": router.family.name,
                "scoring": router.family.scoring,
                "num_experts": router.num_experts,
                "knn_overlap": {"value": overlap, "chance": chance_overlap, "lift": _lift(overlap, chance_overlap)},
                "entropy": float(entropy.mean()),
                "entropy_by_group": {g: float(entropy[[x == g for x in groups]].mean()) for g in group_names},
                "utilisation": expert_utilisation(sparse[:, columns[router.name]].numpy()),
            }
        )
    lap("premise3_layers")

    rng = random.Random(config.seed)
    oracle_rows = sorted(rng.sample(range(n), min(config.num_items, n)))
    failed = [i for i in range(n) if not correct[i]]
    swap_rows = sorted(rng.sample(failed, min(config.num_items, len(failed))))
    oracle_samples = [samples[i] for i in oracle_rows]
    oracle_wrong = wrong_goals(oracle_samples, [base_pred[i] for i in oracle_rows], config.seed)
    swap_samples = [samples[i] for i in swap_rows]
    neighbourhoods, swap_reason = {}, None
    try:
        embedding_name = config.embedding_model or DEFAULT_EMBEDDING_MODEL
        for method in ("knn", "random"):
            nb_config = NeighbourhoodConfig(
                method=method,
                k=config.k,
                seed=config.seed,
                embedding_model=embedding_name,
                success_metric=config.success_metric,
            )
            neighbourhoods[method] = build_neighbourhood(samples, correct, emb, nb_config, progress=False)
    except ValueError as exc:  # S empty or smaller than k + 1
        swap_reason = str(exc)
    if not swap_rows:
        swap_reason = "the base model answers every sample"

    results, skipped, oracle_routing_of = {}, {}, {}
    for sel in selections:
        try:
            routers = resolve_routers(model, sel.to_config())
        except (ValueError, NoRoutersFoundError) as exc:
            skipped[sel.name] = " ".join(str(exc).split())
            continue
        cols = np.concatenate([np.arange(columns[r.name].start, columns[r.name].stop) for r in routers])
        sel_routing = routing[:, cols]
        out: dict[str, Any] = {"layers": [r.layer_index for r in routers], "routers": [r.name for r in routers]}
        overlap = knn_overlap(emb, sel_routing.numpy(), config.k)
        out["knn_overlap"] = {"value": overlap, "chance": chance_overlap, "lift": _lift(overlap, chance_overlap)}
        # premise 1: oracle toward gold and toward a random wrong option, same items, same budget
        kwargs = dict(
            steps=config.oracle_steps,
            lr=config.oracle_lr,
            batch_size=config.oracle_batch_size,
            seed=config.seed,
            progress=progress,
            encoding=encoding,
        )
        gold = oracle_routing(model, tokenizer, oracle_samples, routers, target="gold", **kwargs)
        wrong = oracle_routing(model, tokenizer, oracle_samples, routers, target="wrong", goals=oracle_wrong, **kwargs)
        oracle_routing_of[sel.name] = gold.routing
        out["oracle"] = _oracle_numbers(oracle_samples, [base_pred[i] for i in oracle_rows], gold, wrong)
        out["oracle"]["fixed_ids"] = [
            s["id"] for s, ok, i in zip(oracle_samples, gold.correct, oracle_rows) if ok and not correct[i]
        ]
        # premise 2: swap in the neighbours' (and, as control, random successful samples') routing
        not_invertible = [r for r in routers if not r.family.invertible]
        if swap_reason or not_invertible:
            reason = swap_reason or (
                f"router family {not_invertible[0].family.name!r} (scoring "
                f"{not_invertible[0].family.scoring!r}) has no inverse scoring, so its routing "
                "weights cannot be forced"
            )
            out["swap_in"] = {"available": False, "reason": reason}
        else:
            swap = {"available": True, "n_items": len(swap_rows)}
            outcome = {}
            index = torch.tensor(swap_rows, dtype=torch.long, device="cpu")
            for method, nb in neighbourhoods.items():
                estimate = neighbour_routing(nb, index, sel_routing)
                res = score_with_routing(
                    model,
                    tokenizer,
                    swap_samples,
                    routers,
                    estimate,
                    batch_size=config.batch_size,
                    encoding=encoding,
                    progress=progress,
                )
                outcome[method] = res
                swap["neighbours" if method == "knn" else "random"] = {
                    "fixed": sum(res.correct),
                    "fix_rate": res.accuracy,
                    "changed": sum(p != base_pred[i] for p, i in zip(res.pred, swap_rows)),
                    "max_routing_error": res.max_error,
                    "fixed_ids": [s["id"] for s, ok in zip(swap_samples, res.correct) if ok],
                }
            swap["margin"] = (swap["neighbours"]["fixed"] - swap["random"]["fixed"]) / len(swap_rows)
            swap["wins"], swap["losses"], swap["p_value"] = paired_comparison(
                outcome["knn"].correct, outcome["random"].correct
            )
            out["swap_in"] = swap
        results[sel.name] = out
        lap(f"selection_{sel.name}")

    result: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": getattr(getattr(model, "config", None), "_name_or_path", None),
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "data": {
            "source": source,
            "n_samples": n,
            "data_hash": data_hash(samples),
            "has_tasks": has_tasks,
            "n_tasks": len(set(tasks)) if has_tasks else 0,
        },
        "settings": {
            **asdict(config),
            "embedding_model": config.embedding_model or DEFAULT_EMBEDDING_MODEL,
            "encoding": encoding.describe(tokenizer),
        },
        "thresholds": asdict(thresholds),
        "base": {
            "accuracy": float(np.mean(correct)),
            "metric": config.success_metric,
            "n": n,
            "n_successful": int(np.sum(correct)),
            "n_failed": int(n - np.sum(correct)),
        },
        "items": {
            "oracle_ids": [samples[i]["id"] for i in oracle_rows],
            "swap_ids": [samples[i]["id"] for i in swap_rows],
        },
        "moe_layers": sorted({r.layer_index for r in all_routers}),
        "purity": purity,
        "layers": layers,
        "selections": results,
        "skipped_selections": skipped,
    }
    result["verdict"] = verdict(result, thresholds)
    timing["total"] = round(time.perf_counter() - started, 2)
    result["run"] = {"seconds": timing, "machine": describe_machine(device)}
    result = _jsonable(result)
    if output_dir is not None:
        write_diagnosis(
            result,
            output_dir,
            overwrite=overwrite,
            figures=config.figures,
            manifold_data=_manifold_data(
                emb, routing, columns, oracle_rows, oracle_routing_of, results, groups, config
            ),
        )
    return result


def _manifold_data(emb, routing, columns, oracle_rows, oracle_routing_of, results, groups, config) -> dict | None:
    """Points of the 2-D projection figure: the oracle items of the widest measured selection."""
    if not results:
        return None
    name = max(results, key=lambda k: len(results[k]["routers"]))
    cols = np.concatenate([np.arange(columns[r].start, columns[r].stop) for r in results[name]["routers"]])
    rows = list(range(len(oracle_rows)))
    random.Random(config.seed).shuffle(rows)
    rows = sorted(rows[: config.max_figure_points])
    picked = [oracle_rows[i] for i in rows]
    return {
        "selection": name,
        "panels": {
            "task embedding": emb[picked],
            f"base routing ({name})": routing[picked][:, cols].numpy(),
            f"oracle routing, gold ({name})": oracle_routing_of[name].numpy()[rows],
        },
        "labels": [groups[i] for i in picked],
    }


# ---------------------------------------------------------------------------------------------- output


def write_diagnosis(
    result: dict, output_dir: str, overwrite: bool = False, figures: bool = True, manifold_data: dict | None = None
) -> dict:
    """Write ``diagnose.json``, ``report.md`` and (with ``figures``) the PNGs; returns ``{name: path}``."""
    _check_output_dir(output_dir, overwrite)
    os.makedirs(output_dir, exist_ok=True)
    paths = {}
    if figures:
        paths.update(_draw_figures(result, output_dir, manifold_data))
    result["figures"] = sorted(os.path.basename(p) for p in paths.values())
    paths["json"] = os.path.join(output_dir, "diagnose.json")
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    paths["report"] = os.path.join(output_dir, "report.md")
    with open(paths["report"], "w", encoding="utf-8") as f:
        f.write(report_markdown(result))
    return paths


def _fmt(x, pct: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def report_markdown(result: dict) -> str:
    """The human-readable report of a diagnosis (``report.md``)."""
    v = result["verdict"]
    base = result["base"]
    lines = [
        f"# RoMA diagnosis: {result.get('model') or 'model'}",
        "",
        f"**{v['headline']}**",
        "",
        v["text"],
        "",
        f"Data: {result['data']['n_samples']} samples ({result['data'].get('source') or 'given'}), base accuracy "
        f"{_fmt(base['accuracy'])}% ({base['n_successful']} successful, {base['n_failed']} failed); k = "
        f"{result['settings']['k']}; embedding {result['settings']['embedding_model']}.",
        "",
    ]
    purity = result.get("purity")
    if purity:
        lines += [
            f"Task purity of the embedding (premise 2): {_fmt(purity['value'])}% of k-NN share the task, chance "
            f"{_fmt(purity['chance'])}%, lift {purity['lift']:.2f} ({purity['n_tasks']} tasks).",
            "",
        ]
    lines += [
        "## Per layer selection",
        "",
        "| selection | layers | base acc | oracle gold acc | oracle wrong acc | gold gain - wrong gain | failed "
        "items fixed (gold) | failed items steered (wrong) | p | swap-in fixed: neighbours / random / n | p | "
        "k-NN overlap (chance) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, sel in result["selections"].items():
        o, s, ov = sel["oracle"], sel.get("swap_in") or {}, sel["knn_overlap"]
        swap = f"{s['neighbours']['fixed']} / {s['random']['fixed']} / {s['n_items']}" if s.get("available") else "n/a"
        p_value = f"{s['p_value']:.3g}" if s.get("available") else "n/a"
        lines.append(
            f"| {name} | {sel['layers']} | {_fmt(o['base_accuracy'])} | {_fmt(o['gold']['accuracy'])} | "
            f"{_fmt(o['wrong']['accuracy'])} | {_fmt(o['gain_difference'])} | {_fmt(o['gold']['fix_rate'])} "
            f"({o['gold']['fixed']}/{o['n_base_wrong']}) | {_fmt(o['wrong']['steer_rate'])} ({o['wrong']['steered']}/"
            f"{o['wrong']['n_failed_not_at_target']}) | {o['repair_p_value']:.3g} | {swap} | {p_value} |"
        )
        lines[-1] += f" {_fmt(ov['value'])} ({_fmt(ov['chance'])}) |"
    for name, why in (result.get("skipped_selections") or {}).items():
        lines.append(f"\nSkipped `{name}`: {why}")
    lines += [
        "",
        "All rates in %. Accuracies are on the oracle items; swap-in counts are failed items that become correct.",
        "",
        "## Per MoE layer (premise 3)",
        "",
        "| router | k-NN overlap (chance) | entropy | effective experts | dead experts | max share |",
        "|---|---|---|---|---|---|",
    ]
    for layer in result["layers"]:
        u = layer["utilisation"]
        overlap = layer["knn_overlap"]
        lines.append(
            f"| {layer['router']} | {_fmt(overlap['value'])} ({_fmt(overlap['chance'])}) "
            f"| {layer['entropy']:.3f} | {u['effective_experts']:.1f} / {layer['num_experts']} | "
            f"{u['dead_experts']} | {_fmt(u['max_share'])} |"
        )
    if result.get("figures"):
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in result["figures"]]
    run = result.get("run", {})
    lines += ["", f"Run: {run.get('seconds', {}).get('total', 'n/a')} s on {run.get('machine', 'n/a')}.", ""]
    return "\n".join(lines)


def _draw_figures(result: dict, output_dir: str, manifold_data: dict | None) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    sels = result["selections"]
    if sels:
        names = list(sels)
        x = np.arange(len(names))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        fix = [100 * (sels[s]["oracle"]["gold"]["fix_rate"] or 0) for s in names]
        steer = [100 * (sels[s]["oracle"]["wrong"]["steer_rate"] or 0) for s in names]
        axes[0].bar(x - 0.2, fix, 0.4, label="oracle -> gold: failed items fixed")
        axes[0].bar(x + 0.2, steer, 0.4, label="oracle -> another wrong option: failed items moved there")
        axes[0].set_title("Premise 1: repair or steering?")
        swaps = [sels[s].get("swap_in") or {} for s in names]
        nb = [100 * s["neighbours"]["fix_rate"] if s.get("available") else 0 for s in swaps]
        rnd = [100 * s["random"]["fix_rate"] if s.get("available") else 0 for s in swaps]
        axes[1].bar(x - 0.2, nb, 0.4, label="neighbours' routing (sum W_ij r_j)")
        axes[1].bar(x + 0.2, rnd, 0.4, label="random successful samples' routing")
        axes[1].set_title("Premise 2: failed items fixed by swap-in")
        for ax in axes:
            ax.set_xticks(x)
            ax.set_xticklabels(names)
            ax.set_ylabel("%")
            ax.set_ylim(0, 100)
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths["premises"] = os.path.join(output_dir, "premises.png")
        fig.savefig(paths["premises"], dpi=110)
        plt.close(fig)

    layers = result["layers"]
    if layers:
        width = max(layer["num_experts"] for layer in layers)
        util = np.full((len(layers), width), np.nan)
        for i, layer in enumerate(layers):
            util[i, : layer["num_experts"]] = layer["utilisation"]["frequency"]
        groups = list(layers[0]["entropy_by_group"])
        ent = np.array([[layer["entropy_by_group"][g] for g in groups] for layer in layers])
        labels = [f"L{layer['layer']}" for layer in layers]
        fig, axes = plt.subplots(
            1,
            3,
            figsize=(15, 0.35 * len(layers) + 3),
            gridspec_kw={"width_ratios": [max(width, 4), max(len(groups), 3), 4]},
        )
        im = axes[0].imshow(util, aspect="auto", cmap="viridis", vmin=0)
        axes[0].set_title("expert selection frequency (last prompt token)")
        axes[0].set_xlabel("expert")
        fig.colorbar(im, ax=axes[0], fraction=0.046)
        im = axes[1].imshow(ent, aspect="auto", cmap="magma", vmin=0, vmax=1)
        axes[1].set_title("routing entropy / log E")
        axes[1].set_xticks(range(len(groups)))
        axes[1].set_xticklabels(groups, rotation=60, ha="right", fontsize=7)
        fig.colorbar(im, ax=axes[1], fraction=0.046)
        overlap = [layer["knn_overlap"]["value"] for layer in layers]
        axes[2].barh(range(len(layers)), overlap, color="tab:blue")
        axes[2].axvline(layers[0]["knn_overlap"]["chance"], color="k", ls="--", lw=1, label="chance")
        axes[2].set_xlim(0, 1)
        axes[2].invert_yaxis()
        axes[2].set_title("k-NN overlap: embedding vs routing")
        axes[2].legend(fontsize=8)
        for ax in axes:
            ax.set_yticks(range(len(layers)))
            ax.set_yticklabels(labels)
        fig.tight_layout()
        paths["layers"] = os.path.join(output_dir, "layers.png")
        fig.savefig(paths["layers"], dpi=110)
        plt.close(fig)

    if manifold_data and len(manifold_data["labels"]) >= 20:
        from .benchmark.figures import plot_manifolds

        paths["manifolds"] = plot_manifolds(
            manifold_data["panels"],
            manifold_data["labels"],
            os.path.join(output_dir, "manifolds.png"),
            title="oracle items, last prompt token",
        )
    return paths
