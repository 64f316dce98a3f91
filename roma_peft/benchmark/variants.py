"""The benchmark's training configurations (:class:`Variant`) and the dev-selected ones it records for the demo.

A leaf module: the runner (which selects variants on dev and writes the record) and the demo (which reads it) both
import from here, so imports run one way (``demo -> runner -> variants``).

The record is not written into the installed package by default: ``python -m roma_peft.benchmark.runner
--write-selection`` writes ``OUT/selected_hparams.json``, and a maintainer who wants the demo to use it copies it to
``roma_peft/benchmark/assets/selected_hparams.json`` (the file the demo ships with).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

__all__ = ["Variant", "SHIPPED_SELECTION", "load_selected_variants", "selection_record"]

#: The dev-selected hyper-parameters the demo ships with (written from a runner's ``selected_hparams.json``).
SHIPPED_SELECTION = Path(__file__).parent / "assets" / "selected_hparams.json"


@dataclass(frozen=True)
class Variant:
    """One training configuration of the benchmark (a row of a table)."""

    name: str
    regularizer: str = "none"
    roma_lambda: float = 0.0
    learning_rate: float = 1e-2
    layer_selection: str = "last"
    num_layers: int = 5
    moe_layer_indices: tuple[int, ...] | None = None
    position: str = "last"
    num_tokens: int = 1
    neighbour_method: str = "knn"
    k: int = 3
    eps: float = 0.5
    data_fraction: float = 1.0

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def selection_record(chosen: dict[str, Variant], source: str) -> dict:
    """The JSON written by ``--write-selection`` (and read by :func:`load_selected_variants`)."""
    return {"source": source, "chosen": {name: asdict(v) for name, v in chosen.items()}}


def load_selected_variants(path: Path | None = None) -> dict[str, Variant]:
    """The dev-selected variants of a selection record (default: the shipped one); without a record, the runner's
    grid midpoints (lr 1e-2, lambda 10)."""
    path = Path(path) if path is not None else SHIPPED_SELECTION
    if path.exists():
        data = json.loads(path.read_text())
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
