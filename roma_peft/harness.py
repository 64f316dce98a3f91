"""The paper's eight benchmarks through ``lm_eval.simple_evaluate``, and its zero-shot letter protocol.

RoMA's Table 1 reports MMLU, HellaSwag, PIQA, ARC-Challenge, ARC-Easy, WinoGrande, BoolQ and GSM8K. This module
evaluates a base model, a RoMA adapter, its merged checkpoint or its LoRA export on them, with two protocols:

* ``"lm_eval"`` -- EleutherAI's lm-evaluation-harness (``lm_eval.simple_evaluate``) on its own task files, zero-shot
  by default; the metric read per benchmark is in :data:`PAPER_BENCHMARKS` (the paper names none; the reasons are
  there and in ``docs/evaluation.md``).
* ``"letter"`` -- the paper's "zero-shot letter" protocol, *as interpreted here* (the paper names no template): the
  options are listed in the prompt as ``A. ...``, ``B. ...`` and the model scores the letter continuations; the
  prediction is the letter with the largest log-likelihood. Exact prompt (:func:`letter_samples`)::

      Question: <question>
      A. <option 0>
      B. <option 1>
      ...
      Answer:            <- continuations " A", " B", ... (the trailing space belongs to the continuation)

  It runs on roma_peft's own scorer (:func:`roma_peft.distributed.score_sharded` ->
  :func:`roma_peft.scoring.score_multiple_choice` -> :func:`roma_peft.prompts.encode_samples`), on the rows
  :func:`roma_peft.recipe_data.load_benchmark` loads (the registry :data:`roma_peft.data.HUB_COLUMN_MAPS`: the same
  hub repos and splits as lm-eval's tasks). GSM8K has no options: its letter entry is "not applicable"
  (:data:`NOT_APPLICABLE`).

Modes (``mode``): ``"adapter"`` loads the base with :func:`roma_peft.loading.load_model_and_tokenizer` and the RoMA
adapter with ``PeftModel.from_pretrained`` in this process (``import roma_peft`` registers RoMA) and hands the model
object to lm-eval's ``HFLM``; ``"merged"`` writes :func:`roma_peft.export.export_merged` (plus the tokenizer) and
``"lora"`` writes :func:`roma_peft.export.export_to_lora`, and each is then loaded by lm-eval's stock ``hf`` model
from the directory (``pretrained=<merged dir>`` / ``pretrained=<base>, peft=<lora dir>``), exactly what a tool that
cannot import roma_peft does. Without ``adapter_path`` the base model is evaluated (mode ``"adapter"`` only).
On the same adapter in float32 the three modes give the same numbers (``tests/test_harness.py``).

Several processes (``torchrun`` / ``accelerate launch``): lm-eval's ``hf`` model splits the requests across ranks
itself only on CUDA with more than one GPU (otherwise every rank evaluates everything); a model *object* handed to
``HFLM`` is never split by lm-eval, so the adapter mode gives HFLM this rank's index, the world size and an
``Accelerator`` -- lm-eval then splits the requests and gathers the results on rank 0. The letter protocol splits its
samples with :func:`roma_peft.distributed.score_sharded` (the same numbers for any number of processes). Results are
broadcast from rank 0, so every rank returns the same dict, and only rank 0 prints.

Public API (stable; the recipe runner calls it):

* :data:`PAPER_BENCHMARKS` -- ``name -> HarnessBenchmark(name, task, metric, filter, letter, per_subtask_limit, reason)``.
* :func:`evaluate_benchmarks(model_name_or_path, benchmarks, *, adapter_path, mode, protocol, ...)
  <evaluate_benchmarks>` -> ``{benchmark: {"accuracy", "stderr", "n", "metric", "protocol", ...}}``.
* :func:`evaluate_protocols` -- both protocols from one model load: ``{protocol: {benchmark: entry}}``.
* :func:`to_records` -- entries -> the records :func:`roma_peft.results_table.table1_report` takes.
* :func:`check_evaluation_request` -- the checks :func:`evaluate_protocols` makes before loading a model (it also
  checks the loading options and that lm-eval knows every task).
* :func:`letter_samples` -- the letter-protocol form of samples (the exact prompt above).

The letter protocol alone (``protocols="letter"``) does not import lm-eval. Docs: ``docs/evaluation.md``.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .loading import load_model_and_tokenizer, quiet_peft_wrapping
from .prompts import PromptEncoding
from .recipe_data import PAPER_BENCHMARKS as PAPER_BENCHMARK_DATA
from .recipe_data import load_benchmark

logger = logging.getLogger(__name__)

__all__ = [
    "HarnessBenchmark",
    "PAPER_BENCHMARKS",
    "PROTOCOLS",
    "MODES",
    "NOT_APPLICABLE",
    "DEFAULT_LETTERS",
    "check_evaluation_request",
    "evaluate_benchmarks",
    "evaluate_protocols",
    "format_results",
    "letter_samples",
    "to_records",
]

PROTOCOLS = ("lm_eval", "letter")
"""``lm_eval``: lm-evaluation-harness task files; ``letter``: the paper's zero-shot letter protocol (interpreted)."""

MODES = ("adapter", "merged", "lora")
"""How an adapter reaches lm-eval: in-process model object, merged checkpoint, or exported LoRA (``peft=``)."""

NOT_APPLICABLE = "—"
"""Shown for a (benchmark, protocol) pair that does not exist: GSM8K under the letter protocol."""

DEFAULT_LETTERS = "ABCDEFGHIJ"
"""Option labels of the letter protocol (ARC has up to 5 options, MMLU/HellaSwag 4, the rest 2)."""


@dataclass(frozen=True)
class HarnessBenchmark:
    """How one paper benchmark is evaluated: the lm-eval task, the metric read from it and the letter protocol."""

    name: str
    """The benchmark's name (a key of :data:`roma_peft.recipe_data.PAPER_BENCHMARKS`: where its rows come from)."""
    task: str
    """lm-eval task (or group) name."""
    metric: str
    """lm-eval metric reported in the table (``acc``, ``acc_norm``, ``exact_match``)."""
    filter: str = "none"
    """lm-eval filter whose metric is read (``none`` for log-likelihood tasks)."""
    letter: bool = True
    """Whether the letter protocol applies (the benchmark has options)."""
    per_subtask_limit: bool = False
    """``limit`` applies per subtask (an lm-eval group such as ``mmlu``); the letter protocol mirrors it by ``task``."""
    reason: str = ""
    """Why this metric (the paper does not say)."""

    @property
    def metric_key(self) -> str:
        """The key of lm-eval's results dict: ``"<metric>,<filter>"``."""
        return f"{self.metric},{self.filter}"

    @property
    def data(self):
        """The benchmark's rows: :data:`roma_peft.recipe_data.PAPER_BENCHMARKS` entry (source, split, paper size)."""
        return PAPER_BENCHMARK_DATA[self.name]


_NORM = (
    "acc_norm: the log-likelihood per character of the option; options of this benchmark differ much in "
    "length, and acc_norm is what the Open LLM Leaderboard, OLMES and most MoE papers (OLMoE, DeepSeekMoE) "
    "report for it"
)
PAPER_BENCHMARKS: dict[str, HarnessBenchmark] = {
    b.name: b
    for b in (
        HarnessBenchmark(
            "mmlu",
            "mmlu",
            "acc",
            per_subtask_limit=True,
            reason="lm-eval's mmlu group (57 subjects, letters A-D in the prompt, scored on the letter), accuracy "
            "averaged over questions (weight_by_size); only acc exists",
        ),
        HarnessBenchmark("hellaswag", "hellaswag", "acc_norm", reason=_NORM),
        HarnessBenchmark("piqa", "piqa", "acc_norm", reason=_NORM),
        HarnessBenchmark("arc_challenge", "arc_challenge", "acc_norm", reason=_NORM),
        HarnessBenchmark(
            "arc_easy",
            "arc_easy",
            "acc_norm",
            reason="acc_norm, as ARC-Challenge: one metric for both halves of ARC (lm-eval reports acc as well)",
        ),
        HarnessBenchmark(
            "winogrande",
            "winogrande",
            "acc",
            reason="only acc exists (lm-eval scores the sentence suffix after each option)",
        ),
        HarnessBenchmark("boolq", "boolq", "acc", reason="only acc exists (continuations ' yes' / ' no')"),
        HarnessBenchmark(
            "gsm8k",
            "gsm8k",
            "exact_match",
            filter="flexible-extract",
            letter=False,
            reason="exact_match after the flexible-extract filter (the last number of the generation): zero-shot, a "
            "model does not know the '#### <answer>' format that strict-match needs",
        ),
    )
}
"""The eight benchmarks of the paper's Table 1 -> lm-eval task, metric and letter protocol. Keys equal
:data:`roma_peft.recipe_data.PAPER_BENCHMARKS` (where the rows come from)."""
assert set(PAPER_BENCHMARKS) == set(PAPER_BENCHMARK_DATA), "harness and recipe_data disagree on the benchmarks"

Loader = Callable[[str, str], list]

_EXTRA_LOADING_OPTIONS = tuple(
    p
    for p in inspect.signature(load_model_and_tokenizer).parameters
    if p
    not in (
        "model_name_or_path",
        "prefix",
        "tokenizer_name_or_path",
        "dtype",
        "device_map",
        "attn_implementation",
        "revision",
        "trust_remote_code",
    )
)
"""``loading_kwargs`` accepted by :func:`evaluate_protocols`: the options of ``load_model_and_tokenizer`` that have no
argument of their own here (quantization, ``model_kwargs``, ``tokenizer_kwargs``)."""


# ---------------------------------------------------------------------------------------------------------- checks
def _as_list(value, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def _check_limit(limit) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise ValueError(
            f"limit must be None, a positive integer (rows per task) or a fraction in (0, 1], got {limit!r}."
        )
    if isinstance(limit, int) and limit < 1 or isinstance(limit, float) and not 0 < limit <= 1:
        raise ValueError(
            f"limit must be None, a positive integer (rows per task) or a fraction in (0, 1], got {limit!r}."
        )


def _check_adapter(adapter_path: str | None, mode: str) -> None:
    from .loading import looks_like_local_path

    if adapter_path is None:
        if mode != "adapter":
            raise ValueError(
                f"mode={mode!r} exports an adapter but adapter_path is None; pass the adapter directory "
                "(or use mode='adapter' without adapter_path to evaluate the base model)."
            )
        return
    if not isinstance(adapter_path, (str, os.PathLike)):
        raise ValueError(f"adapter_path must be a directory or hub id, got {type(adapter_path).__name__}.")
    path = os.fspath(adapter_path)
    if os.path.isdir(path):
        cfg = os.path.join(path, "adapter_config.json")
        if not os.path.isfile(cfg):
            raise ValueError(
                f"adapter_path {path!r} has no adapter_config.json: not a saved PEFT adapter (save one "
                "with model.save_pretrained / RomaTrainer.save_model)."
            )
        with open(cfg, encoding="utf-8") as f:
            peft_type = json.load(f).get("peft_type")
        if peft_type != "ROMA":
            raise ValueError(
                f"adapter_path {path!r} holds a {peft_type} adapter, not a RoMA one; evaluate a LoRA "
                "export with lm-eval's own `peft=` argument, or pass the RoMA adapter directory."
            )
    elif looks_like_local_path(path):
        raise FileNotFoundError(f"adapter_path {path!r} does not exist (no such directory).")


def check_evaluation_request(
    benchmarks: str | Sequence[str] | None = None,
    *,
    adapter_path: str | None = None,
    mode: str = "adapter",
    protocols: str | Sequence[str] = ("lm_eval",),
    tasks: Mapping[str, str] | None = None,
    include_path: str | None = None,
    limit: int | float | None = None,
    letters: Sequence[str] = DEFAULT_LETTERS,
    batch_size: int = 8,
    num_fewshot: int = 0,
) -> tuple[list[str], list[str]]:
    """Every check that needs no model, run before anything loads; returns ``(benchmarks, protocols)``.

    Refuses: an unknown benchmark (the valid names listed), an unknown mode or protocol, ``merged``/``lora`` without
    an adapter, an adapter directory that is missing or not a RoMA adapter, a ``tasks`` override for an unknown
    benchmark, a missing ``include_path``, a bad ``limit`` / ``batch_size`` / ``num_fewshot``, fewer
    letters than options could need, and protocol ``lm_eval`` without lm-eval installed.
    """
    names = _as_list(benchmarks, "benchmarks") or list(PAPER_BENCHMARKS)
    unknown = [b for b in names if b not in PAPER_BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; the paper's eight are: {', '.join(PAPER_BENCHMARKS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark listed twice in {names}.")
    protos = _as_list(protocols, "protocols")
    bad = [p for p in protos if p not in PROTOCOLS]
    if bad or not protos:
        raise ValueError(f"unknown protocol(s) {bad or protos!r}; choose from {PROTOCOLS}.")
    if mode not in MODES:
        raise ValueError(
            f"unknown mode {mode!r}; choose from {MODES} ('adapter': the RoMA adapter in-process, "
            "'merged': an exported merged checkpoint, 'lora': the exported LoRA adapter)."
        )
    _check_adapter(adapter_path, mode)
    for key in tasks or {}:  # overrides for benchmarks not evaluated this time are allowed (one mapping for all)
        if key not in PAPER_BENCHMARKS:
            raise ValueError(
                f"tasks override for unknown benchmark {key!r}; the paper's eight are: {', '.join(PAPER_BENCHMARKS)}."
            )
    for key, value in (tasks or {}).items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"tasks[{key!r}] must be an lm-eval task name, got {value!r}.")
    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"include_path {include_path!r} is not a directory of lm-eval task YAML files.")
    _check_limit(limit)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot must be an integer >= 0, got {num_fewshot!r}.")
    if "letter" in protos and (len(letters) < 2 or len(set(letters)) != len(letters)):
        raise ValueError(f"letters must be at least two distinct labels, got {letters!r}.")
    if "lm_eval" in protos and importlib.util.find_spec("lm_eval") is None:
        raise ImportError(
            "protocol 'lm_eval' needs lm-evaluation-harness: pip install 'roma-peft[eval]' "
            "(lm-eval>=0.4.5), or use protocol='letter' only."
        )
    return names, protos


# ---------------------------------------------------------------------------------------------------------- letter
def letter_samples(samples: Sequence[Mapping[str, Any]], letters: Sequence[str] = DEFAULT_LETTERS) -> list[dict]:
    """The letter-protocol form of multiple-choice samples: options listed in the question, letters as options.

    ``{"question": q, "options": [o0, o1], "label": 1}`` becomes
    ``{"question": "q\\nA. o0\\nB. o1", "options": ["A", "B"], "label": 1}`` (other keys kept); with the default
    template the prompt is ``"Question: q\\nA. o0\\nB. o1\\nAnswer:"`` and the continuations ``" A"``, ``" B"``.
    """
    out = []
    for s in samples:
        options = s.get("options")
        if not options:
            raise ValueError(f"sample {s.get('id')!r} has no options; the letter protocol needs multiple choice.")
        if len(options) > len(letters):
            raise ValueError(
                f"sample {s.get('id')!r} has {len(options)} options but only {len(letters)} letters "
                f"({''.join(letters)!r})."
            )
        listed = "\n".join(f"{letters[j]}. {o}" for j, o in enumerate(options))
        out.append({**s, "question": f"{s['question']}\n{listed}", "options": list(letters[: len(options)])})
    return out


def _check_letters_tokenize(tokenizer, letters: Sequence[str], n: int) -> None:
    """Each letter must be its own token sequence: a tokenizer that maps them to one unknown token cannot choose."""
    from .prompts import encode_pairs

    used = list(letters[:n])
    conts = [tuple(c) for _, c in encode_pairs(tokenizer, [("Answer:", " " + x) for x in used])]
    if len(set(conts)) != len(conts):
        raise ValueError(
            f"the tokenizer gives the same tokens to different letters among {used} ({conts}): the "
            "letter protocol cannot tell the options apart; pass letters that are in its vocabulary."
        )


def _head(samples: list[dict], limit, per_task: bool) -> list[dict]:
    """lm-eval's ``limit``: the first ``limit`` rows (a fraction: ``ceil(limit * n)``), per subtask for a group."""
    if limit is None:
        return samples

    def cut(rows):
        k = int(math.ceil(len(rows) * limit)) if isinstance(limit, float) else int(limit)
        return rows[:k]

    if not per_task:
        return cut(samples)
    groups: dict[str, list] = {}
    for s in samples:
        groups.setdefault(str(s.get("task")), []).append(s)
    return [s for rows in groups.values() for s in cut(rows)]


def _letter_entry(
    model, tokenizer, bench: HarnessBenchmark, *, limit, data_loader, letters, batch_size, state, encoding
) -> dict:
    if not bench.letter:
        return {
            "accuracy": None,
            "stderr": None,
            "n": 0,
            "metric": NOT_APPLICABLE,
            "protocol": "letter",
            "note": "not applicable: the benchmark has no options",
        }
    from .distributed import score_sharded
    from .scoring import mean_stderr

    rows = _head(list(load_benchmark(bench.name, data_loader)), limit, bench.per_subtask_limit)
    if not rows:
        raise ValueError(f"benchmark {bench.name!r}: no rows to evaluate.")
    samples = letter_samples(rows, letters)
    _check_letters_tokenize(tokenizer, letters, max(len(s["options"]) for s in samples))
    result = score_sharded(
        model, tokenizer, samples, batch_size=batch_size, progress=False, state=state, encoding=encoding
    )
    acc, n = result.acc, len(result.correct)
    return {
        "accuracy": acc,
        "stderr": mean_stderr(acc, n),
        "n": n,
        "metric": "acc",
        "protocol": "letter",
        "task": bench.name,
    }


# ---------------------------------------------------------------------------------------------------------- lm-eval
def _device_args(device_map) -> dict:
    """``HFLM`` placement arguments for the stock ``hf`` path (merged / lora) from roma_peft's ``device_map``."""
    from .loading import DEVICE_MAP_STRATEGIES, default_device_map, parse_device_map

    dm = parse_device_map(device_map) if device_map is not None else default_device_map()
    if dm is None:
        return {"device": "cpu"}
    if isinstance(dm, str) and dm in DEVICE_MAP_STRATEGIES:
        return {"parallelize": True}
    if isinstance(dm, int):
        return {"device": f"cuda:{dm}"}
    if isinstance(dm, str):
        return {"device": dm}
    raise ValueError(
        "mode 'merged'/'lora' hands the checkpoint to lm-eval's hf model, which takes a device "
        f"('cuda:0', 'cpu') or device_map='auto', not a per-module map {dm!r}; use mode='adapter'."
    )


def _subtask_n(res: dict, task: str) -> int:
    n_samples = res.get("n-samples", {})
    if task in n_samples:
        return int(n_samples[task]["effective"])
    subtasks = res.get("group_subtasks", {}).get(task, [])
    return sum(_subtask_n(res, t) for t in subtasks)


def _lm_eval_entry(res: dict, name: str, bench: HarnessBenchmark, task: str) -> dict:
    metrics = res["results"].get(task)
    if metrics is None:
        raise RuntimeError(
            f"lm-eval returned no results for task {task!r} (benchmark {name!r}); got {sorted(res['results'])}."
        )
    key = bench.metric_key
    if key not in metrics:
        have = sorted(k for k in metrics if "," in k and "_stderr" not in k)
        raise RuntimeError(f"lm-eval task {task!r} has no metric {key!r} (benchmark {name!r}); it reports {have}.")
    stderr = metrics.get(f"{bench.metric}_stderr,{bench.filter}")
    return {
        "accuracy": float(metrics[key]),
        "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
        "n": _subtask_n(res, task),
        "metric": key,
        "protocol": "lm_eval",
        "task": task,
        "all_metrics": {k: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float))},
    }


def _check_tasks_exist(task_names: list[str], include_path: str | None):
    from lm_eval.tasks import TaskManager

    if include_path:  # local tasks only: indexing lm-eval's own ~15k task files takes 10-40 s
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in task_names):
            return local
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    missing = [t for t in task_names if t not in manager.all_tasks]
    if missing:
        raise ValueError(
            f"lm-eval knows no task {missing}"
            + (f" (include_path={include_path!r})" if include_path else "")
            + "; check the tasks override / "
            "include_path, or `lm_eval ls tasks`."
        )
    return manager


# ---------------------------------------------------------------------------------------------------------- models
def _broadcast(obj, state):
    if state.num_processes <= 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _load_adapted(model_name_or_path, adapter_path, loading: dict):
    from .loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_name_or_path, **loading)
    if adapter_path is not None:
        from peft import PeftModel

        import roma_peft  # noqa: F401  (registers the ROMA PEFT type)

        with quiet_peft_wrapping():
            model = PeftModel.from_pretrained(model, os.fspath(adapter_path))
    return model.eval(), tokenizer


def _hflm_args(loading: dict, batch_size: int) -> dict:
    """Arguments of lm-eval's stock ``hf`` model (``HFLM(pretrained=<str>, ...)``) from roma_peft's loading options."""
    from .loading import normalize_dtype

    args: dict[str, Any] = {
        "batch_size": batch_size,
        "trust_remote_code": bool(loading.get("trust_remote_code")),
        "dtype": normalize_dtype(loading.get("dtype", "auto")),  # lm-eval takes "auto" or a torch dtype
        **_device_args(loading.get("device_map")),
    }
    if loading.get("attn_implementation"):
        args["attn_implementation"] = loading["attn_implementation"]
    return args


def _export(model_name_or_path, adapter_path, mode, loading: dict, export_dir, state):
    """Write the merged checkpoint (+ tokenizer) or the LoRA export; rank 0 only, on the CPU. Returns
    ``(export_dir, cleanup)``; without ``export_dir`` a temporary directory (its name broadcast to every rank)."""
    tmp = None
    if export_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"roma-eval-{mode}-") if state.is_main_process else None
        export_dir = _broadcast(tmp.name if tmp else None, state)
    export_dir = os.fspath(export_dir)
    if state.is_main_process:
        from .export import export_merged, export_to_lora

        cpu_loading = {k: v for k, v in loading.items() if k != "device_map"}
        model, tokenizer = _load_adapted(model_name_or_path, adapter_path, cpu_loading)
        if mode == "merged":
            export_merged(model, export_dir, overwrite=True)
            tokenizer.save_pretrained(export_dir)
        else:
            export_to_lora(model, export_dir, overwrite=True)
        del model
        gc.collect()
    state.wait_for_everyone()
    return export_dir, (tmp.cleanup if tmp else (lambda: None))


def _build_model(
    model_name_or_path, adapter_path, mode, *, loading: dict, batch_size: int, export_dir, state, with_lm_eval: bool
):
    """``(model, tokenizer, lm, cleanup)`` for ``mode``: ``lm`` is lm-eval's ``HFLM`` (``None`` without
    ``with_lm_eval``; the letter protocol alone needs no lm-eval) and ``model`` the model both protocols score."""
    from .distributed import place_model
    from .loading import default_device_map

    if mode == "adapter":
        if loading.get("device_map") is None:
            loading = {**loading, "device_map": default_device_map()}
        model, tokenizer = _load_adapted(model_name_or_path, adapter_path, loading)
        place_model(model, state)
        if not with_lm_eval:
            return model, tokenizer, None, lambda: None
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        if state.num_processes > 1:  # HFLM does not split a model object's requests by itself
            from accelerate import Accelerator

            lm.accelerator = Accelerator(cpu=state.device.type == "cpu")
            lm._rank, lm._world_size = state.process_index, state.num_processes
        return model, tokenizer, lm, lambda: None

    export_dir, cleanup = _export(model_name_or_path, adapter_path, mode, loading, export_dir, state)
    tokenizer_path = loading.get("tokenizer_name_or_path")
    if with_lm_eval:  # lm-eval's stock hf model loads the export, as a tool without roma_peft does
        from lm_eval.models.huggingface import HFLM

        args = _hflm_args(loading, batch_size)
        if mode == "merged":
            lm = HFLM(pretrained=export_dir, tokenizer=tokenizer_path or export_dir, **args)
        else:
            if loading.get("revision"):
                args["revision"] = loading["revision"]
            lm = HFLM(pretrained=os.fspath(model_name_or_path), tokenizer=tokenizer_path, peft=export_dir, **args)
        return lm.model, lm.tokenizer, lm, cleanup
    # letter protocol only: stock transformers / PEFT load the export
    from .loading import load_model_and_tokenizer

    if loading.get("device_map") is None:
        loading = {**loading, "device_map": default_device_map()}
    if mode == "merged":
        opts = {k: v for k, v in loading.items() if k not in ("revision", "tokenizer_name_or_path")}
        model, tokenizer = load_model_and_tokenizer(export_dir, tokenizer_name_or_path=tokenizer_path, **opts)
    else:
        from peft import PeftModel

        model, tokenizer = load_model_and_tokenizer(model_name_or_path, **loading)
        with quiet_peft_wrapping():
            model = PeftModel.from_pretrained(model, export_dir)
    place_model(model, state)
    return model.eval(), tokenizer, None, cleanup


# ---------------------------------------------------------------------------------------------------------- API
def evaluate_protocols(
    model_name_or_path: str,
    benchmarks: str | Sequence[str] | None = None,
    *,
    adapter_path: str | None = None,
    mode: str = "adapter",
    protocols: str | Sequence[str] = ("lm_eval", "letter"),
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    include_path: str | None = None,
    tasks: Mapping[str, str] | None = None,
    data_loader: Loader | None = None,
    letters: Sequence[str] = DEFAULT_LETTERS,
    seed: int = 1234,
    export_dir: str | None = None,
    tokenizer_name_or_path: str | None = None,
    dtype: Any = "auto",
    device_map: Any = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    loading_kwargs: Mapping[str, Any] | None = None,
    use_chat_template: bool = False,
    system_prompt: str | None = None,
    verbose: bool = True,
) -> dict[str, dict[str, dict]]:
    """Evaluate one model on ``benchmarks`` under each of ``protocols`` from one model load.

    Args:
        model_name_or_path: The base model (hub id or directory).
        benchmarks: Names from :data:`PAPER_BENCHMARKS` (default: all eight).
        adapter_path: A saved RoMA adapter; ``None`` evaluates the base model.
        mode: ``"adapter"`` (in-process), ``"merged"`` or ``"lora"`` (exported, then lm-eval's stock ``hf`` model).
        protocols: ``"lm_eval"`` and/or ``"letter"``.
        limit: Rows per task (int) or fraction (float), as lm-eval's ``limit`` (per subject for MMLU); the letter
            protocol takes the same first rows. ``None``: every row (the number to report).
        batch_size: lm-eval's batch size and the letter scorer's (sequences per forward).
        num_fewshot: Shots for lm-eval (default 0: zero-shot, as the paper). The letter protocol is always zero-shot.
        include_path: A folder of extra lm-eval task YAMLs (local tasks).
        tasks: ``{benchmark: lm-eval task}`` overriding :attr:`HarnessBenchmark.task` (local stand-ins); the
            metric and filter stay those of the benchmark.
        data_loader: ``loader(source, split) -> samples`` for the letter protocol's rows (default: the hub through
            :func:`roma_peft.data.load_samples`; see :func:`roma_peft.recipe_data.load_benchmark`).
        letters: Option labels of the letter protocol.
        seed: lm-eval's random, numpy, torch and few-shot seeds.
        export_dir: Where ``merged`` / ``lora`` write the export (default: a temporary directory, deleted after).
        tokenizer_name_or_path, dtype, device_map, attn_implementation, revision, trust_remote_code: model loading,
            as :func:`roma_peft.loading.load_model_and_tokenizer` (``device_map=None``: the GPU when there is one).
        loading_kwargs: More keyword arguments of :func:`~roma_peft.loading.load_model_and_tokenizer` for mode
            ``"adapter"`` (``load_in_4bit``, ``quantization_config``, ``model_kwargs`` ...); refused for ``merged`` /
            ``lora``, whose exports are loaded by lm-eval (merging into a quantized base is not exact).
        use_chat_template: Wrap each prompt in the tokenizer's chat template, as the model was trained and S was built
            for an instruct model (lm-eval's ``apply_chat_template``; the letter protocol through
            :class:`roma_peft.prompts.PromptEncoding`). Refused before loading for a tokenizer without one.
        system_prompt: With ``use_chat_template``: a system turn (lm-eval's ``system_instruction``).
        verbose: Print the results table (rank 0 only).

    Returns:
        ``{protocol: {benchmark: {"accuracy", "stderr", "n", "metric", "protocol", "task", ...}}}``, the same on
        every rank. ``accuracy`` is a fraction in [0, 1]; for a pair that does not apply (GSM8K, letter) it is
        ``None`` and ``metric`` is :data:`NOT_APPLICABLE`.
    """
    names, protos = check_evaluation_request(
        benchmarks,
        adapter_path=adapter_path,
        mode=mode,
        protocols=protocols,
        tasks=tasks,
        include_path=include_path,
        limit=limit,
        letters=letters,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
    )
    extra = dict(loading_kwargs or {})
    bad = sorted(set(extra) - set(_EXTRA_LOADING_OPTIONS))
    if bad:
        raise ValueError(
            f"loading_kwargs {bad} are not options of load_model_and_tokenizer (or have their own argument here); "
            f"accepted: {list(_EXTRA_LOADING_OPTIONS)}."
        )
    if extra and mode != "adapter":
        raise ValueError(
            f"loading_kwargs {sorted(extra)} apply to mode='adapter' only: mode={mode!r} hands an exported checkpoint "
            "to lm-eval's hf model (a merge into a quantized base is not exact)."
        )
    from .loading import check_loading_options

    checked = set(inspect.signature(check_loading_options).parameters)
    check_loading_options(
        dtype=dtype,
        device_map=device_map,
        attn_implementation=attn_implementation,
        model_name_or_path=model_name_or_path,
        tokenizer_name_or_path=tokenizer_name_or_path,
        **{k: v for k, v in extra.items() if k in checked},
    )
    if mode != "adapter":
        _device_args(device_map)  # a per-module map is refused before the export
    task_of = {b: (tasks or {}).get(b, PAPER_BENCHMARKS[b].task) for b in names}
    manager = _check_tasks_exist([task_of[b] for b in names], include_path) if "lm_eval" in protos else None

    from .distributed import distributed_state

    # the letter protocol's prompt options (raises for a system prompt without the chat template)
    encoding = PromptEncoding(chat_template=use_chat_template, system_prompt=system_prompt)
    if use_chat_template:  # the tokenizer must have a template: checked before the model loads
        from transformers import AutoTokenizer

        encoding.check_tokenizer(
            AutoTokenizer.from_pretrained(
                tokenizer_name_or_path or model_name_or_path, revision=revision, trust_remote_code=trust_remote_code
            )
        )
    state = distributed_state()
    loading = {
        "tokenizer_name_or_path": tokenizer_name_or_path,
        "dtype": dtype,
        "device_map": device_map,
        "attn_implementation": attn_implementation,
        "revision": revision,
        "trust_remote_code": trust_remote_code,
        **extra,
    }
    model, tokenizer, lm, cleanup = _build_model(
        model_name_or_path,
        adapter_path,
        mode,
        loading=loading,
        batch_size=batch_size,
        export_dir=export_dir,
        state=state,
        with_lm_eval="lm_eval" in protos,
    )
    out: dict[str, dict[str, dict]] = {}
    try:
        if "lm_eval" in protos:
            import lm_eval

            res = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task_of[b] for b in names],
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                log_samples=False,
                batch_size=batch_size,
                apply_chat_template=use_chat_template,
                system_instruction=system_prompt,
            )
            res = _broadcast(res, state)
            out["lm_eval"] = {b: _lm_eval_entry(res, b, PAPER_BENCHMARKS[b], task_of[b]) for b in names}
        if "letter" in protos:
            out["letter"] = {
                b: _letter_entry(
                    model,
                    tokenizer,
                    PAPER_BENCHMARKS[b],
                    limit=limit,
                    data_loader=data_loader,
                    letters=letters,
                    batch_size=batch_size,
                    state=state,
                    encoding=encoding,
                )
                for b in names
            }
    finally:
        del lm, model
        gc.collect()
        import torch

        if torch.cuda.is_available():  # the next variant loads another copy
            torch.cuda.empty_cache()
        cleanup()
    if verbose and state.is_main_process:
        label = "base" if adapter_path is None else f"{mode}: {adapter_path}"
        print(format_results(out, title=f"{model_name_or_path} ({label})"))
    return {p: out[p] for p in protos}


def evaluate_benchmarks(
    model_name_or_path: str,
    benchmarks: str | Sequence[str] | None = None,
    *,
    adapter_path: str | None = None,
    mode: str = "adapter",
    protocol: str = "lm_eval",
    **kwargs,
) -> dict[str, dict]:
    """One protocol: ``{benchmark: {"accuracy", "stderr", "n", "metric", "protocol", ...}}``.

    ``protocol`` is ``"lm_eval"`` or ``"letter"``; every other argument is :func:`evaluate_protocols`'s (``limit``,
    ``batch_size``, ``num_fewshot``, ``include_path``, ``tasks``, ``data_loader``, ``seed``, ``dtype``,
    ``device_map``, ``revision``, ``trust_remote_code``, ``attn_implementation`` ...). For both protocols call
    :func:`evaluate_protocols` (one model load).
    """
    if not isinstance(protocol, str) or protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS} (both: evaluate_protocols).")
    return evaluate_protocols(
        model_name_or_path, benchmarks, adapter_path=adapter_path, mode=mode, protocols=(protocol,), **kwargs
    )[protocol]


def to_records(results: Mapping[str, Mapping[str, Mapping]], *, variant: str, seed: Any = 0) -> list[dict]:
    """Flatten :func:`evaluate_protocols`' result (or ``{protocol: evaluate_benchmarks(...)}``) into the records of
    :func:`roma_peft.results_table.table1_report`: ``{variant, seed, benchmark, protocol, accuracy, stderr, n,
    metric}``, one per (protocol, benchmark)."""
    return [
        {
            "variant": variant,
            "seed": seed,
            "benchmark": b,
            "protocol": p,
            "accuracy": e["accuracy"],
            "stderr": e["stderr"],
            "n": e["n"],
            "metric": e["metric"],
        }
        for p, per in results.items()
        for b, e in per.items()
    ]


def format_results(results: Mapping[str, Mapping[str, Mapping]], title: str = "") -> str:
    """A plain markdown table of one evaluation: a row per benchmark, a column per protocol (accuracy ± stderr, n)."""
    protos = list(results)
    names = list(dict.fromkeys(b for p in protos for b in results[p]))
    lines = [f"### {title}"] if title else []
    lines += [
        "| benchmark | " + " | ".join(f"{p} (metric, %, ± stderr, n)" for p in protos) + " |",
        "|---" * (len(protos) + 1) + "|",
    ]
    for b in names:
        cells = []
        for p in protos:
            e = results[p].get(b)
            if e is None or e["accuracy"] is None:
                cells.append(NOT_APPLICABLE)
            else:
                err = f" ± {100 * e['stderr']:.1f}" if e.get("stderr") is not None else ""
                cells.append(f"{e['metric']} {100 * e['accuracy']:.1f}{err} (n={e['n']})")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
