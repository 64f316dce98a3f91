"""**Where a sample becomes tokens**: the one definition of "the prompt's tokens and the position of its last token".

RoMA compares the live routing ``r_i`` of a training row with stored routing ``r_j`` of other samples, and S is
decided by scoring. All three read the model at "the last prompt token", so they must agree on what the prompt's
tokens *are*; when they do not, the regulariser pulls towards the routing of a different token and nothing says so
(a template ending in ``" "`` or ``"\\n"`` moved the live ``r_i`` one token away from the stored ``r_j``: the ``self``
control measured 2.6-3.7 out of a maximum of 4 at step 0 instead of 0). So the scorer
(:mod:`roma_peft.scoring`), the training collator (:mod:`roma_peft.collator`) and routing capture
(:func:`roma_peft.capture.collect_routing`) all call :func:`encode_samples` and nothing else.

The rules, lm-eval-harness' ``_encode_pair`` for causal models:

* context = ``format_prompt(sample, template)``; a continuation is ``" " + option`` (or ``" " + answer``);
* trailing whitespace of the context moves to the front of the continuation, then
  ``whole = encode(context + continuation)``, ``prompt = encode(context)`` and the continuation's tokens are
  ``whole[len(prompt):]`` (encoding the whole keeps the merge a BPE tokenizer makes across the space);
* so the prompt's last token is the last token *before* any trailing whitespace, for scoring, training and capture.

Truncation (``max_length``) is decided per *sample*, not per row, so that every row of a sample (the gold answer for
``causal_lm``, each option for ``multiple_choice``) and the routing capture share one prompt: the prompt keeps
``max_length - longest continuation`` tokens (cut on the truncation side: ``left`` drops its beginning; ``right``
keeps the whole prompt and cuts continuations instead). A cut that leaves no prompt token or no answer token raises
:class:`PromptTruncatedError` naming the sample, before any model work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from .data import DEFAULT_PROMPT_TEMPLATE, format_prompt, option_continuation

__all__ = [
    "PromptEncoding",
    "EncodedSample",
    "PromptTruncatedError",
    "encode_pair",
    "encode_pairs",
    "encode_samples",
    "generation_prompts",
    "prompt_tokens_hash",
    "split_trailing_whitespace",
    "padding_token_id",
]

TruncationSide = Literal["left", "right"]
TRUNCATION_SIDES = get_args(TruncationSide)


class PromptTruncatedError(ValueError):
    """A sample's prompt (or its whole answer) does not fit ``max_length``."""


@dataclass(frozen=True)
class PromptEncoding:
    """How samples become prompts and tokens. Everything that decides the prompt's tokens is a field here."""

    template: str = field(
        default=DEFAULT_PROMPT_TEMPLATE,
        metadata={"help": "str.format template over the sample's keys (default lm-eval style 'Question: ...')."},
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Longest row (prompt + answer) in tokens; None: no truncation."}
    )
    truncation_side: TruncationSide | None = field(
        default=None, metadata={"help": "'left' or 'right'; None: the tokenizer's truncation_side."}
    )
    add_special_tokens: bool | None = field(
        default=None,
        metadata={
            "help": "Passed to the tokenizer; None: its default, except that a prompt that already starts with "
            "the BOS token's text gets none added (lm-eval's rule; chat templates write the BOS)."
        },
    )
    chat_template: bool = field(
        default=False,
        metadata={
            "help": "Wrap the formatted template in the tokenizer's chat template as one user turn, with the "
            "generation prompt appended (instruct models). Use a template such as '{question}'."
        },
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "With chat_template: a system turn placed before the user turn."}
    )

    def __post_init__(self):
        if not isinstance(self.template, str) or not self.template:
            raise ValueError(f"prompt template must be a non-empty string, got {self.template!r}.")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise ValueError(
                f"max_length must be an integer >= 2 (a prompt token and an answer token) or None, got "
                f"{self.max_length!r}."
            )
        if self.truncation_side is not None and self.truncation_side not in TRUNCATION_SIDES:
            raise ValueError(f"truncation_side must be one of {TRUNCATION_SIDES}, got {self.truncation_side!r}.")
        if self.system_prompt is not None and not self.chat_template:
            raise ValueError(
                "system_prompt is only used with the chat template (use_chat_template / "
                "--use_chat_template); set both or neither."
            )

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse, before any model work, a chat-template encoding for a tokenizer without a chat template."""
        if self.chat_template and not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
            raise ValueError(
                f"chat_template=True but the tokenizer {name!r} has no chat template (tokenizer.chat_template is "
                "empty). Use the instruct model's tokenizer (--tokenizer_name_or_path), set tokenizer.chat_template, "
                "or turn chat_template off."
            )

    @classmethod
    def for_tokenizer(
        cls,
        tokenizer,
        template: str = DEFAULT_PROMPT_TEMPLATE,
        max_length: int | None = None,
        add_special_tokens: bool | None = None,
        chat_template: bool = False,
        system_prompt: str | None = None,
    ) -> PromptEncoding:
        """The encoding with the tokenizer's truncation side fixed (so that it is recorded with routing targets)."""
        side = getattr(tokenizer, "truncation_side", None)
        encoding = cls(
            template=template,
            max_length=max_length,
            add_special_tokens=add_special_tokens,
            truncation_side=side if side in TRUNCATION_SIDES else None,
            chat_template=chat_template,
            system_prompt=system_prompt,
        )
        if tokenizer is not None:
            encoding.check_tokenizer(tokenizer)
        return encoding

    def prompt_text(self, sample: Mapping[str, Any], tokenizer=None) -> str:
        """The context string of ``sample``: the template, wrapped in the chat template when asked.

        The single place a prompt string is built; :func:`encode_samples` and :func:`generation_prompts` call it.
        """
        text = format_prompt(sample, self.template)
        if not self.chat_template:
            return text
        self.check_tokenizer(tokenizer)
        messages = [{"role": "user", "content": text}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def side(self, tokenizer) -> str:
        """The truncation side in force: the explicit one, else the tokenizer's, else ``right``."""
        side = self.truncation_side or getattr(tokenizer, "truncation_side", None) or "right"
        return side if side in TRUNCATION_SIDES else "right"

    def describe(self, tokenizer=None) -> dict:
        """What a human needs to see to tell two encodings apart (stored with routing targets)."""
        out = asdict(self)
        if tokenizer is not None:
            out["truncation_side"] = self.side(tokenizer)
            out["tokenizer"] = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        return out


@dataclass
class EncodedSample:
    """One sample's tokens: ``prompt`` (its last token is where ``r`` is read) and one continuation per option.

    ``continuations[j]`` belongs to option j (or, for a generative sample, the single ``answer``); ``gold`` is the
    index of the gold continuation (``None`` when the sample has neither a label nor an answer).
    """

    prompt: list[int]
    continuations: list[list[int]]
    gold: int | None


def split_trailing_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval: trailing whitespace of the context becomes leading whitespace of the continuation."""
    stripped = context.rstrip()
    n = len(context) - len(stripped)
    if n:
        return stripped, context[-n:] + continuation
    return context, continuation


def _encode(tokenizer, texts: list[str], add_special_tokens: bool | None) -> list[list[int]]:
    """Token ids of ``texts``. ``add_special_tokens=None``: the tokenizer's default, except for a text that already
    starts with the BOS token's text (a rendered chat template), which gets none added (lm-eval's ``tok_encode``)."""
    if not texts:
        return []
    if add_special_tokens is not None:
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]
    bos = getattr(tokenizer, "bos_token", None)
    has_bos = [bool(bos) and t.startswith(bos) for t in texts]
    out: list = [None] * len(texts)
    for flag in (False, True):
        idx = [i for i, h in enumerate(has_bos) if h == flag]
        if idx:
            kwargs = {"add_special_tokens": False} if flag else {}
            for i, ids in zip(idx, tokenizer([texts[i] for i in idx], **kwargs)["input_ids"]):
                out[i] = list(ids)
    return out


def encode_pairs(
    tokenizer, pairs: Sequence[tuple[str, str]], add_special_tokens: bool | None = None
) -> list[tuple[list[int], list[int]]]:
    """lm-eval's ``_encode_pair`` for causal models, batched: ``(prompt tokens, continuation tokens)`` per pair.

    Each distinct context is encoded once.
    """
    split = [split_trailing_whitespace(c, t) for c, t in pairs]
    contexts = list(dict.fromkeys(c for c, _ in split))
    ctx_enc = dict(zip(contexts, _encode(tokenizer, contexts, add_special_tokens)))
    whole_enc = _encode(tokenizer, [c + t for c, t in split], add_special_tokens)
    return [(ctx_enc[c], whole[len(ctx_enc[c]) :]) for (c, _), whole in zip(split, whole_enc)]


def encode_pair(
    tokenizer, context: str, continuation: str, add_special_tokens: bool | None = None
) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair`` for one ``(context, continuation)`` (see :func:`encode_pairs`)."""
    return encode_pairs(tokenizer, [(context, continuation)], add_special_tokens)[0]


def padding_token_id(tokenizer) -> int:
    """The id that pads a batch of encoded rows: the tokenizer's ``pad_token_id``, else its ``eos_token_id`` (the usual
    choice for causal LMs without a pad token). Padding is masked or follows every real token, so the id never changes
    a result; a tokenizer with neither is refused."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError(
        f"The tokenizer ({type(tokenizer).__name__}) has neither a pad_token_id nor an eos_token_id to pad with. Set "
        "one, e.g. tokenizer.pad_token = tokenizer.eos_token after adding an end-of-sequence token."
    )


def _continuations(sample: Mapping[str, Any]) -> tuple[list[str], int | None]:
    options = sample.get("options")
    if options:
        label = sample.get("label")
        return [option_continuation(o) for o in options], (None if label is None else int(label))
    answer = sample.get("answer")
    if answer not in (None, ""):
        return [option_continuation(answer)], 0
    return [], None


def _truncate(sample_id, prompt: list[int], conts: list[list[int]], max_length: int | None, side: str):
    empty = [j for j, c in enumerate(conts) if not c]
    if empty:
        raise ValueError(
            f"sample {sample_id!r}: continuation {empty[0]} tokenises to no token (an empty option or answer?)."
        )
    if not prompt:
        raise ValueError(f"sample {sample_id!r}: the prompt tokenises to no token; check the template.")
    longest = max((len(c) for c in conts), default=0)
    if max_length is None or len(prompt) + longest <= max_length:
        return prompt, conts
    if side == "left":
        keep = max_length - longest
        if keep < 1:
            raise PromptTruncatedError(
                f"sample {sample_id!r}: its longest answer has {longest} tokens and max_length={max_length}: left "
                "truncation would remove the whole prompt, so the prompt's last token lies beyond the sequence. "
                "Increase max_length or shorten the answers."
            )
        return prompt[len(prompt) - keep :], conts
    if len(prompt) >= max_length:
        raise PromptTruncatedError(
            f"sample {sample_id!r}: the prompt has {len(prompt)} tokens but max_length={max_length}: the prompt end "
            f"(its last token, position {len(prompt) - 1}) lies beyond the truncated sequence and no answer token is "
            "left. Increase max_length, shorten the prompt or truncate on the left."
        )
    room = max_length - len(prompt)
    return prompt, [c[:room] for c in conts]


def encode_samples(
    tokenizer,
    samples: Sequence[Mapping[str, Any]],
    encoding: PromptEncoding | None = None,
    require_continuations: bool = False,
) -> list[EncodedSample]:
    """Tokenise ``samples`` under ``encoding`` (see the module docstring): the single source of prompt tokens.

    Args:
        tokenizer: A Hugging Face tokenizer.
        samples: Schema samples (``question`` plus ``options``/``label`` or ``answer``).
        encoding: Template, truncation and special-token rules (default :class:`PromptEncoding`).
        require_continuations: Raise for a sample with neither options nor an answer (training needs one).
    """
    encoding = encoding or PromptEncoding()
    side = encoding.side(tokenizer)
    prompts, conts_text, golds = [], [], []
    encoding.check_tokenizer(tokenizer)
    for s in samples:
        prompt = encoding.prompt_text(s, tokenizer)
        if not prompt.strip():
            raise ValueError(f"sample {s.get('id')!r}: the template {encoding.template!r} produced an empty prompt.")
        conts, gold = _continuations(s)
        if require_continuations and not conts:
            raise ValueError(f"sample {s.get('id')!r} has neither options+label nor an 'answer' to train on.")
        prompts.append(prompt)
        conts_text.append(conts)
        golds.append(gold)
    pairs = [(p, c) for p, conts in zip(prompts, conts_text) for c in conts]
    # samples without continuations still need their prompt: encode (prompt, "") so trailing whitespace is
    # handled exactly as for the others
    lonely = [p for p, conts in zip(prompts, conts_text) if not conts]
    encoded = encode_pairs(tokenizer, pairs + [(p, "") for p in lonely], encoding.add_special_tokens)
    out, at, lonely_at = [], 0, len(pairs)
    for s, conts, gold in zip(samples, conts_text, golds):
        if conts:
            rows = encoded[at : at + len(conts)]
            at += len(conts)
            prompt_ids, cont_ids = rows[0][0], [c for _, c in rows]
        else:
            prompt_ids, cont_ids = encoded[lonely_at][0], []
            lonely_at += 1
        prompt_ids, cont_ids = _truncate(s.get("id"), list(prompt_ids), cont_ids, encoding.max_length, side)
        out.append(EncodedSample(prompt=prompt_ids, continuations=cont_ids, gold=gold))
    return out


def generation_prompts(tokenizer, samples: Sequence[Mapping[str, Any]], encoding: PromptEncoding | None = None):
    """Token ids to *generate* from: the whole formatted prompt, trailing whitespace included (lm-eval
    ``generate_until``). Unlike log-likelihood scoring there is no continuation to move the whitespace into: a template
    ending in ``"\\n"`` with the stop string ``"\\n"`` would otherwise make the model emit the newline first and stop.
    No routing is read from these tokens."""
    encoding = encoding or PromptEncoding()
    return _encode(tokenizer, [encoding.prompt_text(s, tokenizer) for s in samples], encoding.add_special_tokens)


def prompt_tokens_hash(encoded: Sequence[EncodedSample]) -> str:
    """sha256 of every sample's prompt tokens, in order: equal hashes mean ``r`` is read at the same tokens."""
    h = hashlib.sha256()
    for e in encoded:
        h.update(len(e.prompt).to_bytes(4, "little"))
        h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in e.prompt))
    return h.hexdigest()
