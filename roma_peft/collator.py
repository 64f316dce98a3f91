"""``RomaDataCollator``: samples of the shared schema -> model inputs, labels, prompt ends and sample ids.

Tokenisation is :func:`roma_peft.prompts.encode_samples`, the one function that also gives the scorer and routing
capture their prompt tokens (lm-eval ``_encode_pair`` rules; trailing whitespace of the prompt moves to the
continuation; truncation is decided per sample so every row of a sample shares one prompt). The model input is
``prompt + continuation`` and the routing ``r_i`` is read at the prompt's last token, the same token whose routing
:func:`~roma_peft.capture.collect_routing` stores as ``r_j``.

The collator works on raw sample dicts, so it needs no pre-tokenised dataset and survives everything that reorders or
splits the data (shuffling, ``group_by_length``, the distributed sampler, ``dataloader_num_workers > 0``, gradient
accumulation): the row of a sample in the training set travels with it as ``sample_index``, looked up from its ``id``
(``index_of``), not from its position in the batch.

Output of a ``causal_lm`` batch (B samples, T = longest row):

* ``input_ids``, ``attention_mask``: ``(B, T)``, right-padded unless ``padding_side="left"``;
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

from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch

from .data import DEFAULT_PROMPT_TEMPLATE
from .prompts import PromptEncoding, PromptTruncatedError, encode_samples, padding_token_id

__all__ = ["RomaDataCollator", "PromptTruncatedError", "LOSS_TYPES"]

LossType = Literal["causal_lm", "multiple_choice"]
LOSS_TYPES = get_args(LossType)


class RomaDataCollator:
    """Collate schema samples for :class:`~roma_peft.trainer.RomaTrainer` (see the module docstring).

    Args:
        tokenizer: A Hugging Face tokenizer (its ``pad_token_id`` or, failing that, ``eos_token_id`` pads).
        template: Prompt template (default :data:`~roma_peft.data.DEFAULT_PROMPT_TEMPLATE`); ignored when ``encoding``
            is given.
        max_length: Longest row in tokens, see :mod:`roma_peft.prompts` (the prompt is cut on the tokenizer's
            ``truncation_side``). A cut that removes the prompt's last token (or every answer token) raises
            :class:`PromptTruncatedError`. Ignored when ``encoding`` is given.
        index_of: ``{sample id: row in the training set}``; fills ``sample_index``.
        padding_side: ``"left"`` or ``"right"`` (default ``"right"``, not the tokenizer's: see ``__init__``).
        loss_type: ``"causal_lm"`` (gold continuation only) or ``"multiple_choice"`` (every option).
        add_special_tokens: Passed to the tokenizer; None uses its default (as the scorer does).
        pad_to_multiple_of: Round T up to a multiple of this.
        encoding: A :class:`~roma_peft.prompts.PromptEncoding` (template, max_length, truncation side, special
            tokens) to use as is; what the trainer passes so that capture and training share it.
    """

    def __init__(
        self,
        tokenizer,
        template: str = DEFAULT_PROMPT_TEMPLATE,
        max_length: int | None = None,
        index_of: Mapping[str, int] | None = None,
        padding_side: str | None = None,
        loss_type: LossType = "causal_lm",
        add_special_tokens: bool | None = None,
        pad_to_multiple_of: int | None = None,
        encoding: PromptEncoding | None = None,
    ):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
        # Right padding by default, whatever the tokenizer says: many models derive position ids from the sequence,
        # not the mask, so left padding would shift the prompt's positions away from those of the (unpadded, or
        # right-padded) forward that captured the routing targets r_j.
        side = padding_side or "right"
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}.")
        if encoding is None:
            encoding = PromptEncoding(template=template, max_length=max_length, add_special_tokens=add_special_tokens)
        self.tokenizer = tokenizer
        self.encoding = encoding
        self.index_of = dict(index_of) if index_of is not None else None
        self.padding_side = side
        self.loss_type = loss_type
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = padding_token_id(tokenizer)

    @property
    def template(self) -> str:
        return self.encoding.template

    @property
    def max_length(self) -> int | None:
        return self.encoding.max_length

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
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "prompt_last_index": prompt_last,
        }

    def _encoded(self, samples: Sequence[Mapping[str, Any]]):
        encoded = encode_samples(self.tokenizer, samples, self.encoding, require_continuations=True)
        for s, e in zip(samples, encoded):
            if e.gold is None:
                raise ValueError(f"sample {s.get('id')!r} has options but no 'label' (index of the gold option).")
        return encoded

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
        if self.loss_type == "multiple_choice":
            missing = [s.get("id") for s in features if not s.get("options") or s.get("label") is None]
            if missing:
                raise ValueError(f"sample {missing[0]!r}: loss_type='multiple_choice' needs 'options' and 'label'.")
        encoded = self._encoded(features)
        if self.loss_type == "causal_lm":
            batch = self._pad([(e.prompt, e.continuations[e.gold]) for e in encoded])
            batch["sample_index"] = sample_index
            return batch
        # multiple choice: one row per option, every row of a sample with the same prompt tokens
        rows, owner, option = [], [], []
        for b, e in enumerate(encoded):
            for j, cont in enumerate(e.continuations):
                rows.append((e.prompt, cont))
                owner.append(b)
                option.append(j)
        batch = self._pad(rows)
        batch["sample_index"] = sample_index
        batch["option_sample"] = torch.tensor(owner, dtype=torch.long)
        batch["option_index"] = torch.tensor(option, dtype=torch.long)
        batch["mc_label"] = torch.tensor([e.gold for e in encoded], dtype=torch.long)
        return batch

    def lengths(self, samples: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token length of each sample's training row (for ``group_by_length``)."""
        return [len(e.prompt) + len(e.continuations[e.gold]) for e in self._encoded(samples)]
