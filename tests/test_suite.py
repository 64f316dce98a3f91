"""The benchmark suite generator, the shipped world-0 checkpoint and the world cache of the runner."""

import json

import pytest

from roma_peft.benchmark import pretrain
from roma_peft.benchmark.suite import (
    ANSWERS,
    CUE_WORDS,
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
    assert len(suite["test"]) >= 1500
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
            assert set(it["options"]) <= set(ANSWERS[it["task"]])  # options come from the skill's own answers
    for it in suite["pretrain"]:
        assert it["text"] == format_prompt(it["question"]) + " " + it["answer"]
        assert not it["shift"]


def test_shift_swaps_the_jargon_only(suite):
    """A shifted item asks its own skill in plain words, with jargon words of ANOTHER skill; in pretraining (and in
    the in-distribution training items) jargon always belongs to the item's own skill."""
    all_jargon = {w for words in CUE_WORDS.values() for w in words}
    for it in suite["test"] + suite["dev"]:
        cues = [w for w in it["question"].split() if w in all_jargon]
        assert it["cue_skill"] != it["task"] and cues and set(cues) <= set(CUE_WORDS[it["cue_skill"]])
    for it in suite["pretrain"]:
        jargon = {w for w in it["question"].split() for s in SKILLS if w in CUE_WORDS[s]}
        assert jargon <= set(CUE_WORDS[it["task"]])
    # every other skill lends its jargon to every skill's test items
    pairs = {(it["task"], it["cue_skill"]) for it in suite["test"]}
    assert len(pairs) == len(SKILLS) * (len(SKILLS) - 1)


def test_splits_disjoint(suite):
    test_q = {it["question"] for it in suite["test"]}
    for split in ("pretrain", "train", "dev"):
        assert not test_q & {it["question"] for it in suite[split]}
    dev_q = {it["question"] for it in suite["dev"]}
    assert not dev_q & {it["question"] for it in suite["train"]}
    assert not any(it["style"] in SHIFT_STYLES for it in suite["pretrain"])
    # the facts asked about come from disjoint per-split pools ...
    facts = {s: {(it["task"], it["fact"]) for it in suite[s]} for s in ("train", "dev", "test")}
    assert not facts["test"] & facts["train"] and not facts["test"] & facts["dev"]
    assert not facts["dev"] & facts["train"]
    # ... while every fact is pretrained (jargon always of the item's own skill)
    pre_facts = {(it["task"], it["fact"]) for it in suite["pretrain"]}
    assert facts["train"] | facts["dev"] | facts["test"] <= pre_facts


def test_shipped_checkpoint_loads_and_covers_vocab(suite):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shipped_model_path()
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert sum(p.stat().st_size for p in path.iterdir()) <= 20 * 2**20
    info = json.loads((path / "training_info.json").read_text())
    assert info["seed"] == 0 and "base_accuracy" in info
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = model.config
    assert cfg.model_type == "olmoe" and cfg.num_hidden_layers >= 8 and cfg.num_experts >= 16
    assert cfg.num_experts_per_tok >= 2
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
    assert out.logits.shape[-1] == cfg.vocab_size


def test_world_zero_ships_and_other_worlds_are_cached_per_code_version(tmp_path, monkeypatch):
    assert pretrain.world_model_path(0, cache_dir=tmp_path) == shipped_model_path()
    with pytest.raises(FileNotFoundError, match="python -m roma_peft.benchmark.pretrain --out .* --seed 1"):
        pretrain.world_model_path(1, cache_dir=tmp_path, pretrain_missing=False)
    calls = []

    def fake_main(argv):  # what pretraining leaves behind, without the minutes of pretraining
        out = argv[argv.index("--out") + 1]
        calls.append(argv)
        (tmp_path / out).mkdir(parents=True)
        (tmp_path / out / "training_info.json").write_text(json.dumps({"seed": int(argv[-1])}))

    monkeypatch.setattr(pretrain, "main", fake_main)
    first = pretrain.world_model_path(1, cache_dir=tmp_path)
    assert (first / "training_info.json").is_file() and len(calls) == 1
    assert pretrain.world_model_path(1, cache_dir=tmp_path) == first and len(calls) == 1  # cached
    assert pretrain.world_model_path(2, cache_dir=tmp_path) != first and len(calls) == 2  # one model per world
    # another code version (an edit of the suite or of the recipe) is another directory: pretrained afresh
    monkeypatch.setattr(pretrain, "world_key", lambda seed: "f" * 64)
    assert pretrain.world_model_path(1, cache_dir=tmp_path) != first and len(calls) == 3
