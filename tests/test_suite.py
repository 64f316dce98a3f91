"""The benchmark suite generator and the shipped tiny OLMoE checkpoint."""

import json

import pytest

from roma_peft.benchmark.suite import (
    ID_STYLES,
    N_OPTIONS,
    SHIFT_STYLES,
    SKILLS,
    format_prompt,
    generate_suite,
    shipped_model_path,
)


@pytest.fixture(scope="module")
def suite():
    return generate_suite(0)


def test_deterministic_per_seed(suite):
    assert generate_suite(0) == suite
    other = generate_suite(1)
    assert other["test"] != suite["test"]
    assert other["pretrain"] != suite["pretrain"]  # the seed decides the world (facts)


def test_sizes_and_shift_flags(suite):
    assert set(suite) == {"pretrain", "train", "dev", "test"}
    assert len(suite["test"]) >= 2000
    assert 1000 <= len(suite["train"]) <= 5000
    assert all(it["shift"] and it["style"] in SHIFT_STYLES for s in ("dev", "test") for it in suite[s])
    train_styles = {it["style"] for it in suite["train"]}
    assert train_styles == set(ID_STYLES) | set(SHIFT_STYLES)  # train has ID and shifted items
    for split in ("train", "dev", "test"):
        assert {it["task"] for it in suite[split]} == set(SKILLS)


def test_ids_unique_across_splits(suite):
    ids = [it["id"] for items in suite.values() for it in items]
    assert len(ids) == len(set(ids))


def test_schema(suite):
    for split in ("train", "dev", "test"):
        for it in suite[split]:
            assert isinstance(it["question"], str) and it["question"]
            assert len(it["options"]) == N_OPTIONS and len(set(it["options"])) == N_OPTIONS
            assert isinstance(it["label"], int) and 0 <= it["label"] < N_OPTIONS
            assert it["task"] in SKILLS and isinstance(it["shift"], bool)
    for it in suite["pretrain"]:
        assert it["text"] == format_prompt(it["question"]) + " " + it["answer"]
        assert it["style"] in ID_STYLES and not it["shift"]


def test_splits_disjoint(suite):
    test_q = {it["question"] for it in suite["test"]}
    for split in ("pretrain", "train", "dev"):
        assert not test_q & {it["question"] for it in suite[split]}
    dev_q = {it["question"] for it in suite["dev"]}
    assert not dev_q & {it["question"] for it in suite["train"]}
    # shifted styles never in pretraining; shifted phrasings never appear in the pretraining text
    assert all(it["style"] in ID_STYLES for it in suite["pretrain"])
    pre_q = {it["question"] for it in suite["pretrain"]}
    assert not any(it["question"] in pre_q for s in ("train", "dev", "test") for it in suite[s] if it["shift"])
    # the facts asked about (and borrowed) come from disjoint per-split pools
    facts = {s: {tf for it in suite[s] for tf in
                 [(it["task"], it["fact"])] + list(zip(it.get("borrowed", []), it.get("borrowed_facts", [])))}
             for s in ("train", "dev", "test")}
    assert not facts["test"] & facts["train"] and not facts["test"] & facts["dev"]
    assert not facts["dev"] & facts["train"]
    # ... while every fact is pretrained (in-distribution styles only)
    pre_facts = {(it["task"], it["fact"]) for it in suite["pretrain"]}
    assert facts["train"] | facts["dev"] | facts["test"] <= pre_facts


def test_shift_borrows_other_skills(suite):
    for it in suite["test"]:
        assert it["task"] not in it["borrowed"]
        assert len(it["borrowed"]) == (2 if it["style"] == "after_two" else 1)



def test_shipped_checkpoint_loads_and_covers_vocab(suite):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shipped_model_path()
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    info = json.loads((path / "training_info.json").read_text())
    assert info["seed"] == 0 and "base_accuracy" in info
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type in ("olmoe", "qwen3_moe")
    assert model.config.num_experts_per_tok >= 2
    assert tok.padding_side == "right" and tok.pad_token and tok.eos_token and tok.unk_token
    unk = tok.unk_token_id
    for split in ("train", "dev", "test"):
        for it in suite[split]:
            ids = tok(format_prompt(it["question"]), add_special_tokens=False)["input_ids"]
            assert unk not in ids
            for opt in it["options"]:
                assert unk not in tok(" " + opt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        enc = tok([format_prompt(suite["test"][0]["question"])], return_tensors="pt")
        out = model(**enc)
    assert out.logits.shape[-1] == model.config.vocab_size
