"""Tiny offline fixtures for the scoring / neighbour tests (no network, seconds to build)."""

from __future__ import annotations

import json
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "question answer what which is the a of colour color sky grass sun snow blue green red "
    "white black yellow cat dog bird fish animal barks meows flies swims big small hot cold "
    "water fire ice stone tree leaf day night up down left right yes no one two three four five"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + [":", "?", ".", ","] + WORDS + ["Question", "Answer"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins tokens with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def tiny_model(vocab_size: int, seed: int = 0) -> OlmoeForCausalLM:
    torch.manual_seed(seed)
    cfg = OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    model = OlmoeForCausalLM(cfg)
    # larger init so that option log-likelihoods are well separated (no near-ties)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    return model.eval()


def mc_samples(n: int = 24, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) + " ?"
        nopt = rng.choice([2, 3, 4])
        opts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(nopt)]
        out.append({"id": f"s{i}", "question": q, "options": opts, "label": rng.randrange(nopt), "task": f"t{i % 3}"})
    return out


def write_jsonl(rows, path):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


class ConstHead(torch.nn.Module):
    """lm_head replacement: every position predicts ``token_id`` with a large margin.

    A model with a known preference: it assigns high likelihood to continuations made of that
    token and low likelihood to everything else.
    """

    def __init__(self, vocab_size: int, token_id: int):
        super().__init__()
        self.vocab_size, self.token_id = vocab_size, token_id

    def forward(self, h):
        out = torch.zeros(*h.shape[:-1], self.vocab_size, dtype=h.dtype, device=h.device)
        out[..., self.token_id] = 10.0
        return out + 0.0 * h.sum(-1, keepdim=True)


def preferring_model(tok, word: str):
    model = tiny_model(len(tok))
    model.lm_head = ConstHead(len(tok), tok.convert_tokens_to_ids(word))
    return model


def tiny_bpe_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained offline in well under a second on a few hundred
    prompt-formatted words, so that " blue" is ONE token with the space merged in ("Ġblue").

    Unlike :func:`tiny_tokenizer` (word level, spaces dropped), a wrong split of the space between
    prompt and option changes the token ids here.
    """
    from tokenizers import trainers

    rng = random.Random(0)
    corpus = []
    for _ in range(300):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        corpus.append(f"Question: {q} ?\nAnswer: {a}")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
