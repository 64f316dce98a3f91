"""Scoring: multiple-choice log-likelihood (acc, acc_norm), generative exact match, the set S.

RoMA imitates only *successful* neighbours: S = {j : f(x_j) = y_j} (paper, eq. 2), the training
samples the base model already answers correctly. How "answers correctly" is judged matters, so
the multiple-choice scorer reproduces lm-eval-harness' HF log-likelihood exactly:

* prompt and option tokens come from :func:`roma_peft.prompts.encode_samples` (context =
  ``format_prompt(sample)``, continuation = ``" " + option``, trailing whitespace of the context
  moved to the continuation, lm-eval ``_encode_pair``), the same function that gives training
  and routing capture their prompt tokens;
* the model input is ``(ctx + cont)[-(max_length + 1):][:-1]`` and the option's score is the
  sum of the log-probabilities of the continuation tokens;
* ``acc`` = argmax of the sums, ``acc_norm`` = argmax of sum / ``len(option)`` in characters;
  ties go to the first option (``np.argmax``).

Efficiency: every (prompt, option) pair is one sequence; pairs are sorted by length (less
padding), right-padded and scored with *one* forward per batch (the prompt is never run on its
own). When the model takes ``logits_to_keep`` (transformers' causal LMs), only the trailing
positions that hold continuation tokens go through the LM head; log-softmax is taken only at
the continuation positions, not over the whole sequence.
No attention mask is passed, exactly as lm-eval does for causal models: with right padding and
causal attention, pad tokens come after every real token and cannot change its logits.
"""

from __future__ import annotations

import inspect
import json
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import DEFAULT_PROMPT_TEMPLATE, data_hash, validate_samples
from .devices import input_device
from .prompts import PromptEncoding, encode_samples, generation_prompts, padding_token_id

__all__ = [
    "ScoreResult",
    "score_multiple_choice",
    "score_generative",
    "successful_ids",
    "normalize_answer",
    "accepts_logits_to_keep",
]


@dataclass
class ScoreResult:
    """Per-sample predictions of one scoring run, persisted as JSON.

    Multiple choice: ``pred``/``pred_norm`` are option indices, ``loglikelihoods[i][j]`` the
    summed log-probability of option j. Generative: ``pred`` is the generated text (cut at the
    stop strings), ``pred_norm`` its normalised form, ``correct_norm == correct`` and
    ``loglikelihoods`` is ``None``.
    """

    ids: list[str]
    kind: str
    pred: list
    pred_norm: list
    correct: list[bool]
    correct_norm: list[bool]
    loglikelihoods: list[list[float]] | None = None
    greedy: list[list[bool]] | None = None
    data_hash: str = ""
    metadata: dict = field(default_factory=dict)

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """:func:`accuracy_metrics` with ``prefix`` (``eval_accuracy``, ``eval_accuracy_stderr`` ...)."""
        return {
            f"{prefix}_{k}" if prefix else k: v for k, v in accuracy_metrics(self.correct, self.correct_norm).items()
        }

    @property
    def acc(self) -> float:
        return float(np.mean(self.correct)) if self.correct else float("nan")

    @property
    def acc_norm(self) -> float:
        return float(np.mean(self.correct_norm)) if self.correct_norm else float("nan")

    def correct_mask(self, metric: str = "acc") -> np.ndarray:
        """Boolean array aligned with ``ids``: which samples count as successful."""
        if metric == "acc":
            return np.asarray(self.correct, dtype=bool)
        if metric == "acc_norm":
            return np.asarray(self.correct_norm, dtype=bool)
        raise ValueError(f"metric must be 'acc' or 'acc_norm', got {metric!r}")

    def save(self, path: str) -> None:
        d = asdict(self)
        d["acc"], d["acc_norm"] = self.acc, self.acc_norm
        with open(path, "w", encoding="utf-8") as f:
            json.dump(d, f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str, samples: Sequence[Mapping[str, Any]] | None = None) -> ScoreResult:
        """Load predictions; with ``samples``, refuse them if the data changed since scoring."""
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        d.pop("acc", None)
        d.pop("acc_norm", None)
        res = cls(**d)
        if samples is not None:
            h = data_hash(validate_samples(samples))
            if h != res.data_hash:
                raise ValueError(
                    f"predictions in {path} were computed on different data (hash "
                    f"{res.data_hash[:12]} != current {h[:12]}); re-run the scorer"
                )
        return res


def pick_options(loglikelihoods, option_chars) -> tuple[np.ndarray, np.ndarray]:
    """lm-eval's multiple-choice rule on ``(N, K)`` arrays: ``acc`` picks the largest summed log-likelihood,
    ``acc_norm`` the largest log-likelihood per character of the option; ties go to the first option
    (``np.argmax``). Options a sample lacks have ``option_chars < 0``. The scorer and the Trainer's evaluation loop
    both decide with this function."""
    ll = np.asarray(loglikelihoods, dtype=np.float64)
    chars = np.asarray(option_chars, dtype=np.float64)
    valid = chars >= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        normed = ll / chars
    return (np.argmax(np.where(valid, ll, -np.inf), axis=1), np.argmax(np.where(valid, normed, -np.inf), axis=1))


def mean_stderr(p: float, n: int) -> float:
    """lm-eval's ``mean_stderr`` of a 0/1 metric: sample standard deviation / sqrt(n) = sqrt(p(1-p)/(n-1))."""
    return float(np.sqrt(p * (1.0 - p) / (n - 1))) if n > 1 else float("nan")


def accuracy_metrics(correct, correct_norm) -> dict[str, float]:
    """The one metric vocabulary of every command: ``accuracy``, ``accuracy_stderr``, ``accuracy_norm``,
    ``accuracy_norm_stderr``, ``samples`` (the Trainer and ``roma-peft evaluate`` prefix them with ``eval_``)."""
    correct, correct_norm = np.asarray(correct, dtype=bool), np.asarray(correct_norm, dtype=bool)
    n = int(correct.shape[0])
    acc = float(correct.mean()) if n else float("nan")
    acc_norm = float(correct_norm.mean()) if n else float("nan")
    return {
        "accuracy": acc,
        "accuracy_stderr": mean_stderr(acc, n),
        "accuracy_norm": acc_norm,
        "accuracy_norm_stderr": mean_stderr(acc_norm, n),
        "samples": n,
    }


def successful_ids(result: ScoreResult, metric: str = "acc") -> list[str]:
    """Ids of S: the samples the scored model got right (``metric`` 'acc' or 'acc_norm')."""
    mask = result.correct_mask(metric)
    return [i for i, ok in zip(result.ids, mask) if ok]


# --------------------------------------------------------------------------------------------
# multiple choice


def _model_max_length(model, tokenizer) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 1_000_000:
        return v
    return 2048


def build_requests(
    tokenizer,
    samples: list[dict],
    template: str = DEFAULT_PROMPT_TEMPLATE,
    add_special_tokens: bool | None = None,
    encoding: PromptEncoding | None = None,
):
    """Tokenise every (prompt, option) pair with :func:`roma_peft.prompts.encode_samples` (lm-eval rules).

    Returns a list of ``(sample_index, option_index, context_tokens, continuation_tokens)``.
    """
    encoding = encoding or PromptEncoding(template=template, add_special_tokens=add_special_tokens)
    reqs = []
    for i, e in enumerate(encode_samples(tokenizer, samples, encoding)):
        for j, cont in enumerate(e.continuations):
            reqs.append((i, j, e.prompt, cont))
    return reqs


def _resolve_encoding(encoding: PromptEncoding | None, template: str, add_special_tokens: bool | None):
    """``encoding`` as given (the trainer's / CLI's, chat template included), else one from the shortcut arguments."""
    if encoding is None:
        return PromptEncoding(template=template, add_special_tokens=add_special_tokens)
    if template != DEFAULT_PROMPT_TEMPLATE and template != encoding.template:
        raise ValueError(f"got template={template!r} and an encoding with template {encoding.template!r}; pass one.")
    return encoding


def accepts_logits_to_keep(model) -> bool:
    """Whether the (base) causal LM's forward takes ``logits_to_keep`` (transformers' CausalLMs do;
    a ``PeftModel`` passes it through to its base model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - uninspectable forward
        return False


def _score_rows(model, rows: list[tuple[list[int], list[int]]], pad: int, device, keep_ok: bool):
    """One forward over right-padded ``(input, continuation)`` rows, longest first: per row the summed
    log-probability of the continuation (float64) and the number of its tokens that are not the greedy choice."""
    width = len(rows[0][0])
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    row_of, pos, tgt = [], [], []
    for b, (inp, cont) in enumerate(rows):
        ids[b, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        row_of += [b] * len(cont)
        pos += range(len(inp) - len(cont), len(inp))
        tgt += cont
    # only the last positions that hold a continuation token need logits: skip the LM head
    # on the rest of the prompt (same values; lm_head is a per-position projection)
    kw = {}
    if keep_ok:
        keep = width - max(0, min(len(inp) - len(cont) for inp, cont in rows))
        if keep < width:
            kw["logits_to_keep"] = keep
    logits = model(input_ids=ids.to(device), **kw).logits
    offset = width - logits.shape[1]
    sel = logits[torch.tensor(row_of, device=device), torch.tensor(pos, device=device) - offset]
    logp = torch.log_softmax(sel.float(), dim=-1)
    tgt_t = torch.tensor(tgt, device=device)
    tok_ll = logp.gather(1, tgt_t[:, None])[:, 0]
    is_greedy = logp.argmax(-1) == tgt_t
    seg_t = torch.tensor(row_of, device=device)
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device)
    sums.index_add_(0, seg_t, tok_ll.double())
    misses = torch.zeros(len(rows), dtype=torch.long, device=device)
    misses.index_add_(0, seg_t, (~is_greedy).long())
    return sums, misses


@torch.inference_mode()
def score_multiple_choice(
    model,
    tokenizer,
    samples,
    batch_size: int = 16,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    progress: bool = True,
    max_length: int | None = None,
    add_special_tokens: bool | None = None,
    encoding: PromptEncoding | None = None,
) -> ScoreResult:
    """Score multiple-choice samples by option log-likelihood (lm-eval ``hf`` semantics).

    ``model`` is any causal LM returning ``.logits`` (a ``PeftModel`` is passed through as is);
    ``samples`` a list of schema dicts (validated; every sample needs ``options`` and
    ``label``). ``batch_size`` counts (prompt, option) sequences per forward. ``add_special_tokens``
    None uses the tokenizer's default, as lm-eval does unless ``add_bos_token`` is set.
    ``encoding`` (a :class:`~roma_peft.prompts.PromptEncoding`: template, chat template, truncation)
    replaces ``template``/``add_special_tokens``; pass the trainer's so that S is scored on the
    prompts training and routing capture use.
    """
    samples = validate_samples(samples)
    missing = [s["id"] for s in samples if s.get("options") is None]
    if missing:
        raise ValueError(
            f"{len(missing)} sample(s) have no options (first: {missing[0]!r}); multiple-choice "
            "scoring needs 'options' and 'label' (use score_generative for 'answer' samples)"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_length = max_length or _model_max_length(model, tokenizer)
    device = input_device(model)
    pad = padding_token_id(tokenizer)

    encoding = _resolve_encoding(encoding, template, add_special_tokens)
    reqs = build_requests(tokenizer, samples, encoding=encoding)
    # model input: (ctx + cont)[-(max_length+1):][:-1]; logits of the last len(cont) positions
    inputs = [(c + t)[-(max_length + 1) :][:-1] for _, _, c, t in reqs]
    order = sorted(range(len(reqs)), key=lambda r: -len(inputs[r]))  # longest first, as lm-eval

    ll = [[0.0] * len(s["options"]) for s in samples]
    greedy = [[False] * len(s["options"]) for s in samples]
    keep_ok = accepts_logits_to_keep(model)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="scoring options", disable=not progress):
            rows = [(inputs[r], reqs[r][3]) for r in batch]
            sums, misses = _score_rows(model, rows, pad, device, keep_ok)
            for r, sm, ms in zip(batch, sums.tolist(), misses.tolist()):
                i, j = reqs[r][0], reqs[r][1]
                ll[i][j] = sm
                greedy[i][j] = ms == 0
    finally:
        if was_training:
            model.train()

    width = max(len(x) for x in ll) if ll else 0
    padded_ll = np.full((len(samples), width), -np.inf)
    chars = np.full((len(samples), width), -1.0)
    for i, (sample, lls) in enumerate(zip(samples, ll)):
        padded_ll[i, : len(lls)] = lls
        chars[i, : len(lls)] = [float(len(o)) for o in sample["options"]]
    pred_arr, pred_norm_arr = pick_options(padded_ll, chars)
    pred, pred_norm = pred_arr.tolist(), pred_norm_arr.tolist()
    correct = [p == s["label"] for p, s in zip(pred, samples)]
    correct_norm = [p == s["label"] for p, s in zip(pred_norm, samples)]
    return ScoreResult(
        ids=[s["id"] for s in samples],
        kind="multiple_choice",
        pred=pred,
        pred_norm=pred_norm,
        correct=correct,
        correct_norm=correct_norm,
        loglikelihoods=ll,
        greedy=greedy,
        data_hash=data_hash(samples),
        metadata={
            "template": encoding.template,
            "encoding": encoding.describe(tokenizer),
            "max_length": max_length,
            "model": getattr(getattr(model, "config", None), "_name_or_path", None),
        },
    )


# --------------------------------------------------------------------------------------------
# generative

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, drop punctuation and articles, squash spaces."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


@torch.inference_mode()
def score_generative(
    model,
    tokenizer,
    samples,
    batch_size: int = 8,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    max_new_tokens: int = 32,
    stop: Sequence[str] = ("\n",),
    progress: bool = True,
    encoding: PromptEncoding | None = None,
) -> ScoreResult:
    """Greedy generation judged by exact match of the normalised answer (:func:`normalize_answer`).

    For data that is not multiple choice: each sample needs ``answer``. The generation is cut
    at the first ``stop`` string (default newline, so "Answer: Paris\\nQuestion: ..." counts as
    "Paris"). Prompts are left-padded so every row continues from its own last token.
    """
    samples = validate_samples(samples)
    bad = [s["id"] for s in samples if not s.get("answer")]
    if bad:
        raise ValueError(
            f"{len(bad)} sample(s) have no 'answer' (first: {bad[0]!r}); generative scoring compares against 'answer'"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = input_device(model)
    pad = padding_token_id(tokenizer)
    encoding = _resolve_encoding(encoding, template, None)
    enc = generation_prompts(tokenizer, samples, encoding)
    gens: list[str] = [""] * len(samples)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        order = sorted(range(len(samples)), key=lambda i: -len(enc[i]))
        batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="generating", disable=not progress):
            width = max(len(enc[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, i in enumerate(batch):
                ids[b, width - len(enc[i]) :] = torch.tensor(enc[i])
                mask[b, width - len(enc[i]) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            for b, i in enumerate(batch):
                text = tokenizer.decode(out[b, width:], skip_special_tokens=True)
                for st in stop:
                    if st and st in text:
                        text = text[: text.index(st)]
                gens[i] = text.strip()
    finally:
        if was_training:
            model.train()
    norm = [normalize_answer(g) for g in gens]
    correct = [n == normalize_answer(s["answer"]) for n, s in zip(norm, samples)]
    return ScoreResult(
        ids=[s["id"] for s in samples],
        kind="generative",
        pred=gens,
        pred_norm=norm,
        correct=correct,
        correct_norm=list(correct),
        data_hash=data_hash(samples),
        metadata={
            "template": encoding.template,
            "encoding": encoding.describe(tokenizer),
            "max_new_tokens": max_new_tokens,
            "stop": list(stop),
        },
    )
