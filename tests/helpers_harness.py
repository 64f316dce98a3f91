"""Point the paper's eight benchmark names at local lm-eval tasks on the shipped tiny model (offline, seconds).

Use in a test (the recipe's end-to-end test reuses it)::

    from helpers_harness import local_eval_kwargs
    from roma_peft.harness import evaluate_protocols
    evaluate_protocols(str(shipped_model_path()), adapter_path=..., **local_eval_kwargs())

``local_eval_kwargs()`` gives ``include_path`` (the task YAMLs in ``tests/fixtures/lm_eval_tasks``), ``tasks`` (each
benchmark -> its ``tiny_<benchmark>`` stand-in; ``mmlu`` -> the ``tiny_mmlu`` group of two subtasks, ``gsm8k`` -> a
``generate_until`` task with GSM8K's filters), ``data_loader`` (the same rows for the letter protocol) and ``letters``
(option labels the word-level tokenizer knows: it has no ``A``/``B``).
"""

import importlib.util
from pathlib import Path

from roma_peft.benchmark.suite import shipped_model_path
from roma_peft.data import load_samples
from roma_peft.harness import PAPER_BENCHMARKS

TASKS_DIR = Path(__file__).resolve().parent / "fixtures" / "lm_eval_tasks"
LOCAL_TASKS = {name: f"tiny_{name}" for name in PAPER_BENCHMARKS}
"""benchmark -> local lm-eval task (``tiny_mmlu`` is a group, as ``mmlu``)."""

_spec = importlib.util.spec_from_file_location("tiny_lm_eval_loaders", TASKS_DIR / "loaders.py")
task_rows = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task_rows)


def local_loader(source: str, split: str) -> list[dict]:
    """``loader(source, split)`` for :func:`roma_peft.recipe_data.load_benchmark`: the stand-in rows of ``source``
    (the split is ignored: each stand-in has one), through :func:`roma_peft.data.load_samples`."""
    return load_samples([dict(r) for r in task_rows.rows(source)])


def tiny_letters(n: int = 4) -> list[str]:
    """``n`` option labels that are single tokens of the shipped tokenizer (digits if it has them)."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(shipped_model_path()).get_vocab()
    digits = [str(i) for i in range(1, n + 1)]
    if all(d in vocab for d in digits):
        return digits
    words = sorted(w for w in vocab if w.isalpha() and w.islower())
    return words[:n]


def local_eval_kwargs(**overrides) -> dict:
    """Keyword arguments of :func:`roma_peft.harness.evaluate_protocols` for the local stand-in tasks."""
    kwargs = {
        "include_path": str(TASKS_DIR),
        "tasks": dict(LOCAL_TASKS),
        "data_loader": local_loader,
        "letters": tiny_letters(),
        "batch_size": 16,
    }
    kwargs.update(overrides)
    return kwargs
