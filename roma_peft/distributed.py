"""Several processes (``accelerate launch`` / ``torchrun``): the S stage and evaluation split across ranks.

Scoring, routing capture and task embeddings are pure functions of the samples; each rank runs the ordinary
single-process function on its share of fixed-size *blocks* of samples and the results are gathered back in sample
order (accelerate's ``PartialState``, ``split_between_processes``, ``gather_object``), so 1, 2 or 8 processes give
bitwise the same results. Why blocks, and what "the same" means: docs/design.md, "Distributed S stage". Not for a
sharded model (FSDP / ZeRO-3): the S stage runs on an unsharded copy per rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .capture import collect_routing
from .data import data_hash, validate_samples
from .embeddings import embed_samples
from .scoring import ScoreResult, score_multiple_choice

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "block_bounds",
    "collect_routing_sharded",
    "distributed_state",
    "embed_sharded",
    "merge_score_results",
    "place_model",
    "run_sharded",
    "score_sharded",
]

DEFAULT_BLOCK_SIZE = 256
"""Samples per block of the sharded S stage (see the module docstring). Fixed, never derived from the number of
processes: results depend on the block size, not on how many ranks share the blocks."""


def launched_world_size() -> int:
    """How many processes a launcher (torchrun, accelerate launch, mpirun) started, read from its environment; 1 when
    the process was started by hand."""
    return max(int(os.environ.get(name, "1") or 1) for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))


def distributed_state():
    """accelerate's ``PartialState`` (created on first use: under ``torchrun``/``accelerate launch`` it joins the
    process group, gloo on CPU, nccl on GPUs; in a plain single process it starts nothing).

    A state that already exists (made by a Trainer, an ``Accelerator`` or an earlier call) is returned as it is.
    accelerate only joins a CPU process group when asked (``PartialState(cpu=True)``, what ``accelerate launch --cpu``
    and ``TrainingArguments(use_cpu=True)`` do); so when a launcher started several processes and accelerate found no
    accelerator, the state is made again with ``cpu=True`` (gloo)."""
    if PartialState._shared_state:
        return PartialState()
    state = PartialState()
    if launched_world_size() > 1 and state.num_processes == 1:
        PartialState._reset_state()
        state = PartialState(cpu=True)
    return state


def place_model(model, state=None):
    """With several processes on accelerators, move an undispatched model to this rank's device (``cuda:LOCAL_RANK``
    ...). A model loaded with a ``device_map`` (``hf_device_map``) or a single process is left where it is."""
    state = state if state is not None else distributed_state()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if state.num_processes > 1 and state.device.type != "cpu" and not getattr(base, "hf_device_map", None):
        model.to(state.device)
    return model


def block_bounds(n: int, block_size: int = DEFAULT_BLOCK_SIZE) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: ``n`` samples cut into consecutive blocks of ``block_size`` (the last may be
    shorter)."""
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")
    return [(start, min(start + block_size, n)) for start in range(0, n, block_size)]


def run_sharded(
    fn: Callable[[list], Any],
    samples: Sequence,
    merge: Callable[[list], Any] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    state=None,
    progress: bool = False,
    desc: str = "blocks",
):
    """``merge([fn(block) for block in blocks])`` with the blocks split across the running processes.

    ``samples`` is cut into blocks of ``block_size`` (:func:`block_bounds`); each rank calls ``fn`` on a contiguous
    run of whole blocks (accelerate's ``split_between_processes`` over the block list) and the per-block results are
    gathered (``gather_object``) on every rank, in block order, before ``merge`` (default: the list itself). The
    result therefore does not depend on the number of processes. Every rank must call this with the same samples
    and block size (it is a collective). With one process it runs the blocks in order and communicates nothing.
    """
    samples = list(samples)
    state = state if state is not None else distributed_state()
    blocks = block_bounds(len(samples), block_size)
    if not blocks:
        outputs = [fn(samples)]
    else:
        with state.split_between_processes(blocks) as mine:
            local = [
                fn(samples[a:b]) for a, b in tqdm(mine, desc=desc, disable=not (progress and state.is_main_process))
            ]
        if state.num_processes > 1:
            outputs = gather_object(local)  # one list of block results per rank, flattened in rank order
        else:
            outputs = local
        if len(outputs) != len(blocks):
            raise RuntimeError(
                f"gathered {len(outputs)} block results for {len(blocks)} blocks (a rank returned a list per block?)."
            )
    return outputs if merge is None else merge(outputs)


# ----------------------------------------------------------------------------------------------- the S stage
def merge_score_results(parts: list, samples: Sequence[dict]):
    """One :class:`~roma_peft.scoring.ScoreResult` from the results of consecutive blocks of ``samples``."""
    first = parts[0]
    for part in parts[1:]:
        if part.kind != first.kind or part.metadata != first.metadata:
            raise RuntimeError(f"blocks were scored under other settings: {part.metadata} vs {first.metadata}.")

    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else [x for v in values for x in v]

    merged = ScoreResult(
        ids=cat("ids"),
        kind=first.kind,
        pred=cat("pred"),
        pred_norm=cat("pred_norm"),
        correct=cat("correct"),
        correct_norm=cat("correct_norm"),
        loglikelihoods=cat("loglikelihoods"),
        greedy=cat("greedy"),
        data_hash=data_hash(samples),
        metadata=dict(first.metadata),
    )
    if merged.ids != [s["id"] for s in samples]:
        raise RuntimeError("the gathered scores are not in sample order.")
    return merged


def score_sharded(
    model, tokenizer, samples, block_size: int = DEFAULT_BLOCK_SIZE, progress: bool = True, state=None, **kwargs
):
    """:func:`~roma_peft.scoring.score_multiple_choice` split across processes; the same ScoreResult (bitwise) for
    any number of processes. ``kwargs`` go to ``score_multiple_choice`` (``batch_size``, ``encoding`` ...)."""
    samples = validate_samples(samples)  # ids are assigned from the global position, before the split

    def score(block):
        return score_multiple_choice(model, tokenizer, block, progress=False, **kwargs)

    return run_sharded(
        score,
        samples,
        lambda parts: merge_score_results(parts, samples),
        block_size=block_size,
        state=state,
        progress=progress,
        desc="scoring blocks",
    )


def collect_routing_sharded(
    model,
    tokenizer,
    samples,
    batch_size: int = 16,
    block_size: int = DEFAULT_BLOCK_SIZE,
    progress: bool = True,
    state=None,
    **kwargs,
):
    """:func:`~roma_peft.capture.collect_routing` split across processes: (N, D) float32, bitwise equal to one
    ``collect_routing`` call over all samples for any number of processes (blocks are whole capture batches)."""
    samples = list(samples)
    block = -(-block_size // batch_size) * batch_size  # whole capture batches: the same batches as one call

    def capture(part):
        return collect_routing(model, tokenizer, part, batch_size=batch_size, progress=False, **kwargs)

    return run_sharded(
        capture,
        samples,
        lambda parts: torch.cat(parts) if len(parts) > 1 else parts[0],
        block_size=block,
        state=state,
        progress=progress,
        desc="routing blocks",
    )


def embed_sharded(
    samples,
    model_name_or_path: str | None = None,
    field: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    progress: bool = True,
    state=None,
    **kwargs,
) -> np.ndarray:
    """:func:`~roma_peft.embeddings.embed_samples` split across processes: float32 ``(N, dim)``, the same array
    (bitwise) for any number of processes. Each rank loads the embedding model (on CPU unless ``model=`` is given)."""
    samples = list(samples)

    def embed(part):
        return embed_samples(part, model_name_or_path, field=field, progress=False, **kwargs)

    return run_sharded(
        embed,
        samples,
        lambda parts: np.concatenate(parts, axis=0),
        block_size=block_size,
        state=state,
        progress=progress,
        desc="embedding blocks",
    )
