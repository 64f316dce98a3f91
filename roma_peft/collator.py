"""``RomaDataCollator``: samples of the shared schema -> model inputs, labels, prompt ends and sample ids.

Tokenisation follows lm-eval (and :mod:`roma_peft.scoring`, so that training and scoring see the same tokens): the
prompt is ``format_prompt(sample)``, the gold continuation is ``" " + option`` (or ``" " + answer``); trailing
spaces of the prompt move to the continuation; ``whole = encode(context + continuation)``, ``ctx = encode(context)``
and the continuation tokens are ``whole[len(ctx):]``; the model input is ``ctx + continuation``.

The collator works on raw sample dicts, so it needs no pre-tokenised dataset and survives everything that reorders or
splits the data (shuffling, ``group_by_length``, the distributed sampler, ``dataloader_num_workers > 0``, gradient
accumulation): the row of a sample in the training set travels with it as ``sample_index``, looked up from its ``id``
(``index_of``), not from its position in the batch.

Output of a ``causal_lm`` batch (B samples, T = longest row):

* ``input_ids``, ``attention_mask``: ``(B, T)``, padded on the tokenizer's ``padding_side`` (or ``padding_side``);
* ``labels``: ``(B, T)``, the input ids on continuation tokens and ``-100`` on prompt and padding tokens (the usual
  Hugging Face alignment: the model's logits at ``t`` predict ``labels[t + 1]``);
* ``prompt_last_index``: ``(B,)``, position of the last prompt token in the padded row (correct for both padding
  sides); the routing of that token is the paper's Last1 ``r_i``;
* ``sample_index``: ``(B,)``, the sample's row in the training set (``-1`` when the collator has no ``index_of``).

``multiple_choice`` batches hold one row per (sample, option) pair: the tensors above are ``(R, T)`` / ``(R,)`` with
``R = sum of option counts``, plus ``option_sample`` ``(R,)`` (which sample of the batch a row belongs to),
``option_index`` ``(R,)`` and ``mc_label`` ``(B,)`` (gold option), while ``sample_index`` stays ``(B,)``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

from .data import DEFAULT_PROMPT_TEMPLATE, format_prompt, option_continuation

__all__ = ["RomaDataCollator", "PromptTruncatedError", "LOSS_TYPES"]

LOSS_TYPES = ("causal_lm", "multiple_choice")


class PromptTruncatedError(ValueError):
    """A sample's prompt (or its whole answer) does not fit ``max_length``."""


def gold_continuation(sample: Mapping[str, Any]) -> str:
    """The continuation the task loss trains on: the gold option, or the ``answer`` of a generative sample."""
    options = sample.get("options")
    if options:
        label = sample.get("label")
        if label is None:
            raise ValueError(f"sample {sample.get('id')!r} has options but no 'label' (index of the gold option).")
        return option_continuation(options[int(label)])
    answer = sample.get("answer")
    if not answer:
        raise ValueError(f"sample {sample.get('id')!r} has neither options+label nor an 'answer' to train on.")
    return option_continuation(answer)


class RomaDataCollator:
    """Collate schema samples for :class:`~roma_peft.trainer.RomaTrainer` (see the module docstring).

    Args:
        tokenizer: A Hugging Face tokenizer (its ``pad_token_id`` or, failing that, ``eos_token_id`` pads).
        template: Prompt template (default ``"Question: {question}\\nAnswer:"``).
        max_length: Longest row in tokens; rows are cut on the tokenizer's ``truncation_side``. A cut that removes
            the prompt's last token (or every answer token) raises :class:`PromptTruncatedError`.
        index_of: ``{sample id: row in the training set}``; fills ``sample_index``.
        padding_side: ``"left"`` or ``"right"``; default: the tokenizer's.
        loss_type: ``"causal_lm"`` (gold continuation only) or ``"multiple_choice"`` (every option).
        add_special_tokens: Passed to the tokenizer; None uses its default (as the scorer does).
        pad_to_multiple_of: Round T up to a multiple of this.
    """

    def __init__(
        self,
        tokenizer,
        template: str = DEFAULT_PROMPT_TEMPLATE,
        max_length: Optional[int] = None,
        index_of: Optional[Mapping[str, int]] = None,
        padding_side: Optional[str] = None,
        loss_type: str = "causal_lm",
        add_special_tokens: Optional[bool] = None,
        pad_to_multiple_of: Optional[int] = None,
    ):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
        side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}.")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt token and an answer token), got {max_length}.")
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.index_of = dict(index_of) if index_of is not None else None
        self.padding_side = side
        self.truncation_side = getattr(tokenizer, "truncation_side", "right") or "right"
        self.loss_type = loss_type
        self.add_special_tokens = add_special_tokens
        self.pad_to_multiple_of = pad_to_multiple_of
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        if pad is None:
            raise ValueError("The tokenizer has neither a pad_token_id nor an eos_token_id to pad with.")
        self.pad_token_id = int(pad)

    # ------------------------------------------------------------------ tokenisation
    def _encode(self, texts: list[str]) -> list[list[int]]:
        kwargs = {} if self.add_special_tokens is None else {"add_special_tokens": self.add_special_tokens}
        return [list(ids) for ids in self.tokenizer(texts, **kwargs)["input_ids"]]

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """lm-eval ``_encode_pair`` for a list of (prompt, continuation) pairs, batched: (ctx tokens, cont tokens)."""
        contexts, wholes = [], []
        for context, continuation in pairs:
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                continuation = context[-n_spaces:] + continuation
                context = context[:-n_spaces]
            contexts.append(context)
            wholes.append(context + continuation)
        encoded = self._encode(contexts + wholes)
        ctx_enc, whole_enc = encoded[: len(pairs)], encoded[len(pairs):]
        return [(ctx, whole[len(ctx):]) for ctx, whole in zip(ctx_enc, whole_enc)]

    def _truncate(self, ctx: list[int], cont: list[int], sample_id) -> tuple[list[int], list[int]]:
        """Cut ``ctx + cont`` to ``max_length``; refuse if the prompt's last token or every answer token is lost."""
        if not cont:
            raise ValueError(f"sample {sample_id!r}: the answer continuation tokenises to no token.")
        if self.max_length is None or len(ctx) + len(cont) <= self.max_length:
            return ctx, cont
        if self.truncation_side == "left":
            cut = len(ctx) + len(cont) - self.max_length
            if cut >= len(ctx):
                raise PromptTruncatedError(
                    f"sample {sample_id!r}: prompt ({len(ctx)} tokens) + answer ({len(cont)} tokens) exceed "
                    f"max_length={self.max_length}; left truncation would remove the whole prompt, so the prompt end "
                    "lies beyond the sequence. Increase max_length or shorten the prompt."
                )
            return ctx[cut:], cont
        if len(ctx) >= self.max_length:
            raise PromptTruncatedError(
                f"sample {sample_id!r}: the prompt has {len(ctx)} tokens but max_length={self.max_length}: the prompt "
                f"end (position {len(ctx) - 1}) lies beyond the truncated sequence and no answer token is left. "
                "Increase max_length or shorten the prompt."
            )
        return ctx, cont[: self.max_length - len(ctx)]

    # ------------------------------------------------------------------ collation
    def _index(self, sample: Mapping[str, Any], position: int) -> int:
        if self.index_of is None:
            return -1
        sid = sample.get("id")
        key = str(sid) if sid is not None else None
        if key not in self.index_of:
            raise KeyError(
                f"sample id {sid!r} (batch position {position}) is not in the training set the neighbourhood was "
                "built for (index_of). Samples need the same 'id' as when the neighbourhood was built."
            )
        return int(self.index_of[key])

    def _pad(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(c) + len(a) for c, a in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        prompt_last = torch.empty(n, dtype=torch.long)
        for b, (ctx, cont) in enumerate(rows):
            length = len(ctx) + len(cont)
            offset = width - length if self.padding_side == "left" else 0
            input_ids[b, offset : offset + length] = torch.tensor(ctx + cont, dtype=torch.long)
            attention_mask[b, offset : offset + length] = 1
            labels[b, offset + len(ctx) : offset + length] = torch.tensor(cont, dtype=torch.long)
            prompt_last[b] = offset + len(ctx) - 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "prompt_last_index": prompt_last}

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        features = list(features)
        if not features:
            raise ValueError("RomaDataCollator got an empty batch.")
        for position, sample in enumerate(features):
            if not isinstance(sample, Mapping) or "question" not in sample:
                raise ValueError(
                    f"RomaDataCollator expects schema samples (dicts with 'question', 'options'/'label' or 'answer'); "
                    f"batch position {position} has keys {sorted(sample) if isinstance(sample, Mapping) else sample!r}."
                    " If a Trainer removed the columns, set remove_unused_columns=False."
                )
        sample_index = torch.tensor([self._index(s, p) for p, s in enumerate(features)], dtype=torch.long)
        if self.loss_type == "causal_lm":
            pairs = [(format_prompt(s, self.template), gold_continuation(s)) for s in features]
            encoded = self.encode_pairs(pairs)
            rows = [self._truncate(c, a, s.get("id")) for (c, a), s in zip(encoded, features)]
            batch = self._pad(rows)
            batch["sample_index"] = sample_index
            return batch
        # multiple choice: one row per option
        pairs, owner, option, gold = [], [], [], []
        for b, s in enumerate(features):
            options = s.get("options")
            if not options or s.get("label") is None:
                raise ValueError(f"sample {s.get('id')!r}: loss_type='multiple_choice' needs 'options' and 'label'.")
            prompt = format_prompt(s, self.template)
            for j, opt in enumerate(options):
                pairs.append((prompt, option_continuation(opt)))
                owner.append(b)
                option.append(j)
            gold.append(int(s["label"]))
        encoded = self.encode_pairs(pairs)
        rows = [self._truncate(c, a, features[o].get("id")) for (c, a), o in zip(encoded, owner)]
        batch = self._pad(rows)
        batch["sample_index"] = sample_index
        batch["option_sample"] = torch.tensor(owner, dtype=torch.long)
        batch["option_index"] = torch.tensor(option, dtype=torch.long)
        batch["mc_label"] = torch.tensor(gold, dtype=torch.long)
        return batch

    def lengths(self, samples: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token length of each sample's training row (for ``group_by_length``)."""
        pairs = [(format_prompt(s, self.template), gold_continuation(s)) for s in samples]
        return [min(len(c) + len(a), self.max_length or 10**9) for c, a in self.encode_pairs(pairs)]
