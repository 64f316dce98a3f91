"""RomaDataCollator: labels, prompt ends, sample ids under both padding sides, workers, truncation."""

import pytest
import torch
from helpers_training import tiny_tokenizer, train_samples
from torch.utils.data import DataLoader

from roma_peft.collator import PromptTruncatedError, RomaDataCollator
from roma_peft.data import format_prompt
from roma_peft.prompts import encode_pair


@pytest.mark.parametrize("side", ["left", "right"])
def test_labels_prompt_end_and_ids(side):
    """Rows hold prompt + gold answer; labels mark the answer only; prompt_last_index is the prompt's last token."""
    tok = tiny_tokenizer()
    samples = train_samples(6)
    index_of = {s["id"]: i for i, s in enumerate(samples)}
    collate = RomaDataCollator(tok, index_of=index_of, padding_side=side)
    batch_samples = [samples[4], samples[1], samples[2]]
    batch = collate(batch_samples)
    assert batch["sample_index"].tolist() == [4, 1, 2]
    for b, s in enumerate(batch_samples):
        ctx, cont = encode_pair(tok, format_prompt(s), " " + s["options"][s["label"]])
        real = batch["attention_mask"][b].bool()
        assert batch["input_ids"][b][real].tolist() == ctx + cont
        pos = torch.nonzero(real).flatten()
        start = int(pos[0])
        if side == "left":
            assert int(pos[-1]) == batch["input_ids"].shape[1] - 1
        else:
            assert start == 0
        assert int(batch["prompt_last_index"][b]) == start + len(ctx) - 1
        assert tok.convert_ids_to_tokens(int(batch["input_ids"][b, batch["prompt_last_index"][b]])) == ":"
        labels = batch["labels"][b]
        supervised = torch.nonzero(labels != -100).flatten()
        assert labels[supervised].tolist() == cont
        assert int(supervised[0]) == int(batch["prompt_last_index"][b]) + 1
        assert (labels[~real] == -100).all()


def test_workers_and_shuffle_keep_ids():
    """Shuffled batches from 2 loader workers keep each sample's row index and tokens."""
    tok = tiny_tokenizer()
    samples = train_samples(12)
    collate = RomaDataCollator(tok, index_of={s["id"]: i for i, s in enumerate(samples)})
    loader = DataLoader(
        samples,
        batch_size=4,
        shuffle=True,
        num_workers=2,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
    seen = []
    for batch in loader:
        for b, i in enumerate(batch["sample_index"].tolist()):
            ctx, cont = encode_pair(tok, format_prompt(samples[i]), " " + samples[i]["options"][samples[i]["label"]])
            assert batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist() == ctx + cont
            seen.append(i)
    assert sorted(seen) == list(range(12))


def _sample_and_prompt():
    tok = tiny_tokenizer()
    s = train_samples(1)[0]
    ctx, cont = encode_pair(tok, format_prompt(s), " " + s["options"][s["label"]])
    return tok, s, ctx


def test_max_length_that_cuts_the_prompt_end_is_refused():
    """Right truncation that would remove every answer token (the row ends at the prompt) is refused."""
    tok, s, ctx = _sample_and_prompt()
    with pytest.raises(PromptTruncatedError, match="prompt end"):
        RomaDataCollator(tok, max_length=len(ctx))([s])


def test_right_truncation_cuts_the_answer():
    """One token over the prompt keeps the whole prompt and one answer token."""
    tok, s, ctx = _sample_and_prompt()
    batch = RomaDataCollator(tok, max_length=len(ctx) + 1)([s])
    assert batch["input_ids"].shape[1] == len(ctx) + 1 and int((batch["labels"] != -100).sum()) == 1


def test_left_truncation_that_leaves_no_prompt_is_refused():
    """A max_length shorter than the answer leaves no prompt token: refused naming the whole prompt."""
    tok, s, _ = _sample_and_prompt()
    tok.truncation_side = "left"
    two = dict(s, options=["blue green", "red"], label=0)  # a two-token answer
    with pytest.raises(PromptTruncatedError, match="whole prompt"):
        RomaDataCollator(tok, max_length=2)([two])


def test_left_truncation_keeps_the_prompt_end():
    """With truncation_side="left" the prompt loses its beginning, so its last token stays."""
    tok, s, ctx = _sample_and_prompt()
    tok.truncation_side = "left"
    batch = RomaDataCollator(tok, max_length=len(ctx))([s])
    assert int(batch["prompt_last_index"][0]) == len(ctx) - 2


def test_sample_outside_the_training_set_is_refused():
    """A sample id missing from index_of raises, naming the training set."""
    tok, s, _ = _sample_and_prompt()
    with pytest.raises(KeyError, match="not in the training set"):
        RomaDataCollator(tok, index_of={"other": 0})([s])


def test_tokenised_rows_point_at_remove_unused_columns():
    """Rows without the sample columns (a Trainer removed them) get advice about remove_unused_columns."""
    with pytest.raises(ValueError, match="remove_unused_columns"):
        RomaDataCollator(tiny_tokenizer())([{"input_ids": [1, 2]}])


def test_tokenizer_without_pad_and_eos_is_refused():
    """A tokenizer with neither a pad nor an eos token cannot pad a batch: refused when the collator is built."""
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token = None
    with pytest.raises(ValueError, match="neither a pad_token_id nor an eos_token_id"):
        RomaDataCollator(tok)


def test_multiple_choice_rows():
    """loss_type="multiple_choice" gives one row per option, the owning sample and the gold option."""
    tok = tiny_tokenizer()
    samples = train_samples(2)
    batch = RomaDataCollator(tok, loss_type="multiple_choice")(samples)
    n = sum(len(s["options"]) for s in samples)
    assert batch["input_ids"].shape[0] == n and batch["option_sample"].tolist() == [0] * 3 + [1] * 3
    assert batch["mc_label"].tolist() == [s["label"] for s in samples]
    assert batch["sample_index"].tolist() == [-1, -1]
