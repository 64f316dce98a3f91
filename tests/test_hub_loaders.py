"""Hub loaders: every registry entry on local copies in the hub's real layout, the awkward rows,
the unlabelled-row policy, the hub code path (``datasets.load_dataset`` replaced, no network) and
the error messages."""

import warnings

import datasets
import pytest
from fixtures.hub_rows import build, dataset

from roma_peft import data as D
from roma_peft.data import (
    HUB_COLUMN_MAPS,
    SkippedRowsWarning,
    clean_multirc_paragraph,
    hub_dataset,
    knowref_converter,
    load_samples,
)


def one(name, row, **kw):
    (s,) = load_samples(dataset(name, [row]), column_map=name, **kw)
    return s


def gold(s):
    return s["options"][s["label"]]


# ---- every registry entry, through a save_to_disk copy (the offline stand-in for the hub)


@pytest.mark.parametrize("name", sorted(HUB_COLUMN_MAPS))
def test_every_entry_maps_a_local_copy(name, tmp_path):
    ds, golds = build(name, 5)
    ds.save_to_disk(str(tmp_path / name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # labelled rows only: nothing may be skipped
        s = load_samples(str(tmp_path / name), column_map=name)
    assert [x["options"][x["label"]] if "options" in x else x["answer"] for x in s] == golds
    assert len({x["id"] for x in s}) == len(s)
    assert all(x["task"].split(":")[0] in name or name.startswith(x["task"]) or name == "google_boolq" for x in s)


def test_registry_points_at_loadable_repos():
    # repos that ship a loading script, which datasets>=4 refuses
    scripted = {
        "allenai/social_i_qa",
        "ybisk/piqa",
        "google/bigbench",
        "tasksource/bigbench",
        "social_i_qa",
        "piqa",
        "super_glue",
        "bigbench",
    }
    for name, spec in HUB_COLUMN_MAPS.items():
        assert spec.path not in scripted, name
    assert HUB_COLUMN_MAPS["social_i_qa"].path == "lighteval/siqa"  # lm-eval's parquet copies
    assert HUB_COLUMN_MAPS["piqa"].path == "baber/piqa"
    assert HUB_COLUMN_MAPS["bigbench"].path == "hails/bigbench"
    assert hub_dataset("allenai/social_i_qa") is HUB_COLUMN_MAPS["social_i_qa"]  # old names redirect
    assert hub_dataset("ybisk/piqa") is HUB_COLUMN_MAPS["piqa"]
    assert hub_dataset("tau/commonsense_qa") is HUB_COLUMN_MAPS["commonsense_qa"]  # a repo held by one entry


# ---- label conventions


def test_social_iqa_string_labels_count_from_one():
    row = {
        "context": "Tom fell.",
        "question": "How does Tom feel?",
        "answerA": "hurt",
        "answerB": "happy",
        "answerC": "bored",
        "label": "3",
    }
    s = one("social_i_qa", row)
    assert s["label"] == 2 and gold(s) == "bored" and s["question"] == "Tom fell. How does Tom feel?"
    with pytest.raises(ValueError, match=r"label='4' is out of range for 3 options \(labels count from 1\)"):
        one("social_i_qa", {**row, "label": "4"})


def test_hellaswag_string_labels_and_lm_eval_cleaning():
    row = {
        "ind": 7,
        "activity_label": "Baking cookies",
        "ctx_a": "A woman mixes dough [step] .",
        "ctx_b": "she",
        "ctx": "",
        "endings": ["puts it in [title] the oven.", "eats the bowl.", "a", "b"],
        "source_id": "x",
        "split": "val",
        "split_type": "indomain",
        "label": "0",
    }
    s = one("hellaswag", row)
    assert s["question"] == "Baking cookies: A woman mixes dough . She"
    assert s["options"][0] == "puts it in. the oven." and s["label"] == 0 and s["id"] == "0"


def test_winogrande_cloze_and_blank_at_start():
    row = {
        "sentence": "The trophy did not fit the case because _ was too big.",
        "option1": "the trophy",
        "option2": "the case",
        "answer": "1",
    }
    s = one("winogrande", row)
    assert s["question"] == "The trophy did not fit the case because"
    assert s["options"] == ["the trophy was too big.", "the case was too big."] and s["label"] == 0
    assert s["embed_text"] == row["sentence"]
    s = one("winogrande", {**row, "sentence": "_ was too big for the case.", "answer": "2"})
    assert s["options"] == ["the trophy", "the case"] and s["label"] == 1 and "_ was too big" in s["question"]


def test_mmlu_classlabel_subjects_and_auxiliary_train():
    row = {
        "question": " What is 2+2? ",
        "subject": "elementary_mathematics",
        "choices": ["3", "4", "5", "6"],
        "answer": 1,
    }
    s = one("mmlu", row)
    assert s["question"] == "What is 2+2?" and gold(s) == "4" and s["task"] == "mmlu:elementary_mathematics"
    s = one("mmlu", {**row, "subject": ""})  # the 'all' config's auxiliary_train rows have no subject
    assert s["task"] == "mmlu"
    nested = [{"train": {"question": "Q?", "subject": "", "choices": ["a", "b"], "answer": 0}}]
    (s,) = load_samples(nested, column_map="mmlu")  # the auxiliary_train config nests rows in ``train``
    assert gold(s) == "a"
    (s,) = load_samples([{**row, "answer": "C"}], column_map="mmlu")  # a copy storing letters
    assert gold(s) == "5"
    assert hub_dataset("mmlu:anatomy").name == "anatomy"
    with pytest.raises(ValueError, match="unknown MMLU subject 'anatomyy'.*'anatomy'"):
        hub_dataset("mmlu:anatomyy")


def test_boolq_bool_answer_and_int_label():
    g = one("google_boolq", {"question": "is it", "passage": "P.", "answer": False})
    sg = one("boolq", {"question": "is it", "passage": "P.", "idx": 3, "label": 1})
    assert gold(g) == "no" and gold(sg) == "yes" and sg["id"] == "3"
    assert g["question"] == "P.\nQuestion: is it?" and g["embed_text"] == "is it"


def test_arc_numeric_keys_and_three_or_five_choices():
    row = {
        "id": "a1",
        "question": "Q?",
        "answerKey": "3",
        "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]},
    }
    s = one("arc_easy", row)
    assert s["options"] == ["x", "y", "z"] and s["label"] == 2
    five = {"id": "a2", "question": "Q?", "answerKey": "E", "choices": {"text": list("vwxyz"), "label": list("ABCDE")}}
    assert gold(one("arc_challenge", five)) == "z"
    with pytest.raises(
        ValueError,
        match=r"arc_easy: row 0 \(id 'a1'\).*answerKey 'D' is not one of the choice "
        r"labels \['1', '2', '3'\]",
    ):
        one("arc_easy", {**row, "answerKey": "D"})


def test_openbookqa_choices_text_first_and_padded_key():
    row = {
        "id": "o1",
        "question_stem": "Sun is?",
        "answerKey": " B",
        "choices": {"text": ["a moon", "a star"], "label": ["A", "B"]},
    }
    assert gold(one("openbookqa", row)) == "a star"


# ---- unlabelled rows: skipped and counted; a split with no label at all is an error


@pytest.mark.parametrize(
    "name, field, blank",
    [
        ("commonsense_qa", "answerKey", ""),
        ("hellaswag", "label", ""),
        ("winogrande", "answer", ""),
        ("piqa", "label", -1),
        ("super_glue:boolq", "label", -1),
        ("super_glue:cb", "label", -1),
        ("social_i_qa", "label", ""),
        ("knowref", "correct_candidate", ""),
    ],
)
def test_unlabelled_rows_are_skipped_with_a_count(name, field, blank):
    ds, golds = build(name, 3)
    rows = list(ds)
    rows[1][field] = blank
    with pytest.warns(SkippedRowsWarning, match=rf"{name}: skipped 1 of 3 rows \(unlabelled"):
        s = load_samples(dataset(name, rows), column_map=name)
    assert [gold(x) for x in s] == [golds[0], golds[2]]
    assert [x["id"] for x in s][-1] != "1"  # ids keep the row position / dataset id, not the list index


@pytest.mark.parametrize("name, field, blank", [("commonsense_qa", "answerKey", ""), ("piqa", "label", -1)])
def test_a_fully_unlabelled_split_is_refused(name, field, blank, tmp_path):
    ds, _ = build(name, 3)
    test = dataset(name, [{**r, field: blank} for r in ds])
    datasets.DatasetDict({"train": ds, "test": test}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=rf"{name} split 'test': all 3 rows are unlabelled.*use a labelled split"):
        load_samples(str(tmp_path / "dd"), column_map=name, split="test")
    assert len(load_samples(str(tmp_path / "dd"), column_map=name)) == 3  # default split: train


def test_multirc_test_split_and_grouping():
    para = "<b>Sent 1: </b>Ann ran.<br><b>Sent 2: </b>Bo  walked home.<br>"
    rows = []
    for q, answers in (
        (0, [("fast", 1), ("slow", 0), ("quickly", 1), ("never", 0)]),
        (1, [("yes", 1), ("sure", 1)]),  # no wrong candidate: skipped
        (2, [("a", -1), ("b", -1)]),
    ):  # test split: unlabelled
        for k, (a, lab) in enumerate(answers):
            rows.append(
                {
                    "paragraph": para,
                    "question": f"How did Ann run {q}?",
                    "answer": a,
                    "idx": {"paragraph": 5, "question": q, "answer": k},
                    "label": lab,
                }
            )
    ds = datasets.Dataset.from_list(rows)  # plain ints here: SuperGLUE's test split stores -1
    with pytest.warns(SkippedRowsWarning, match=r"multirc: skipped 2 of 3 rows \(.*no wrong candidate answer: 1"):
        (s,) = load_samples(ds, column_map="multirc")
    assert s["id"] == "5-0" and s["task"] == "multirc"
    assert s["options"] == ["fast", "slow", "never"] and s["label"] == 0  # the other correct one is dropped
    assert s["question"] == "Ann ran. Bo walked home.\nQuestion: How did Ann run 0?"
    assert s["embed_text"] == "How did Ann run 0?"
    # gold is not always first: a wrong candidate before the first correct one keeps its place
    rows2 = [{**r, "label": {"fast": 0, "slow": 1}.get(r["answer"], r["label"])} for r in rows[:4]]
    (s,) = load_samples(datasets.Dataset.from_list(rows2), column_map="multirc")
    assert s["options"] == ["fast", "slow", "never"] and s["label"] == 1
    assert clean_multirc_paragraph("<b>Sent 12: </b>X.<br><b>Sent 13:</b> Y<br/>") == "X. Y"


# ---- BIG-Bench


def test_bigbench_rows():
    row = {
        "idx": 0,
        "inputs": "Q: Is the sky blue?\n  A:",
        "targets": ["yes"],
        "multiple_choice_targets": ["no", "yes"],
        "multiple_choice_scores": [0, 1],
    }
    free = {
        "idx": 1,
        "inputs": "Write a poem.",
        "targets": ["roses"],
        "multiple_choice_targets": [],
        "multiple_choice_scores": [],
    }
    multi = {
        "idx": 2,
        "inputs": "Pick a prime.",
        "targets": ["2", "3"],
        "multiple_choice_targets": ["2", "4", "3"],
        "multiple_choice_scores": [1, 0, 1],
    }
    by_target = {
        "idx": 3,
        "inputs": "Odd one?",
        "targets": ["c"],
        "multiple_choice_targets": ["a", "c"],
        "multiple_choice_scores": [],
    }
    with pytest.warns(SkippedRowsWarning, match=r"bigbench:navigate: skipped 1 of 4 rows \(free-form"):
        s = load_samples(dataset("bigbench", [row, free, multi, by_target]), column_map="bigbench:navigate")
    assert [x["id"] for x in s] == ["0", "2", "3"]
    assert s[0]["question"] == "Q: Is the sky blue?" and gold(s[0]) == "yes" and s[0]["task"] == "bigbench:navigate"
    assert s[1]["options"] == ["2", "4"] and s[1]["label"] == 0  # the second correct choice is dropped
    assert gold(s[2]) == "c"
    spec = hub_dataset("bigbench:navigate")
    assert (spec.path, spec.name) == ("hails/bigbench", "navigate_zero_shot")


# ---- GSM8K, SuperGLUE, KnowRef


def test_gsm8k_answer_extraction():
    s = one("gsm8k", {"question": "How many?", "answer": "3 + 4 = <<3+4=7>>7 apples.\n#### 1,234 "})
    assert s["answer"] == "1234" and "options" not in s and s["solution"].startswith("3 + 4")
    with pytest.raises(ValueError, match=r"gsm8k: row 0.*no '#### <final answer>' line"):
        one("gsm8k", {"question": "How many?", "answer": "seven"})


def test_superglue_prompts():
    cb = one("super_glue:cb", {"premise": "It rains.", "hypothesis": "It is wet", "idx": 1, "label": 2})
    assert cb["options"] == ["True", "False", "Neither"] and cb["label"] == 2
    assert cb["question"] == "It rains.\nQuestion: It is wet. True, False, or Neither?"
    copa = one(
        "super_glue:copa",
        {
            "premise": "The man fell.",
            "choice1": "He slipped.",
            "choice2": "He sang.",
            "question": "cause",
            "idx": 0,
            "label": 0,
        },
    )
    assert copa["question"] == "The man fell because" and copa["options"] == ["he slipped.", "he sang."]
    rte = one("super_glue:rte", {"premise": "P.", "hypothesis": "H.", "idx": 0, "label": 1})
    assert gold(rte) == "False"  # 1 = not_entailment
    wic = one(
        "super_glue:wic",
        {
            "word": "bank",
            "sentence1": "The Bank opened.",
            "sentence2": "A river bank.",
            "start1": 4,
            "start2": 8,
            "end1": 8,
            "end2": 12,
            "idx": 0,
            "label": 0,
        },
    )
    assert "the word 'Bank' used in the same way" in wic["question"] and gold(wic) == "no"
    rec = one(
        "super_glue:record",
        {
            "passage": "Obama met Merkel.\n@highlight\nTalks held",
            "query": "@placeholder spoke first.",
            "entities": ["Obama", "Merkel", "Barack Obama", "Merkel"],
            "entity_spans": {"text": [], "start": [], "end": []},
            "answers": ["Obama", "Barack Obama"],
            "idx": {"passage": 4, "query": 9},
        },
    )
    assert rec["question"] == "Obama met Merkel.\n  - Talks held."
    assert rec["options"] == ["Barack Obama spoke first.", "Merkel spoke first."] and rec["label"] == 0
    assert rec["id"] == "4-9" and rec["embed_text"] == "@placeholder spoke first."


def test_knowref_schema_and_configurable_columns():
    row = {
        "annotation_strength": "4",
        "candidate0": "Ann",
        "candidate1": "Bo",
        "original_sentence": "Bo met Ann because she was late .",
        "swapped_sentence": "Ann met Bo because [she] was late .",
        "correct_candidate": "candidate_1",
    }
    s = one("knowref", row)
    assert s["options"] == ["Ann", "Bo"] and s["label"] == 1
    assert s["question"] == ('Ann met Bo because *she* was late .\nIn the sentence above, who does "she" refer to?')
    card = {k.replace("candidate0", "candidate_0").replace("candidate1", "candidate_1"): v for k, v in row.items()}
    (s2,) = load_samples([card], column_map="knowref")  # the dataset card's spelling
    assert s2["options"] == s["options"] and s2["label"] == 1
    other = [{"text": "X saw Y and [he] waved .", "a": "X", "b": "Y", "gold": "Y"}]
    conv = knowref_converter(sentence="text", candidates=("a", "b"), answer="gold")
    (s3,) = load_samples(other, column_map=conv)
    assert s3["label"] == 1 and s3["task"] == "knowref"
    with pytest.raises(
        ValueError,
        match=r"knowref: expected column\(s\) \['swapped_sentence', 'candidate0 or "
        r"candidate_0', 'candidate1 or candidate_1', 'correct_candidate'\] are "
        r"missing; available columns: \['a', 'b', 'gold', 'text'\].*knowref_converter",
    ):
        load_samples(other, column_map="knowref")


# ---- the hub code path, offline: datasets.load_dataset replaced by a recorder


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split, kw))
        if "script" in path:
            raise RuntimeError("Dataset scripts are no longer supported, but found script.py")
        key = {
            "lighteval/siqa": "social_i_qa",
            "hails/bigbench": "bigbench",
            "cais/mmlu": "mmlu",
            "baber/piqa": "piqa",
            "owner/custom": "sciq",
        }[path]
        return build(key, 3)[0]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_names_pick_repo_config_split_and_converter(fake_hub):
    s = load_samples("social_i_qa")
    assert fake_hub[-1][:3] == ("lighteval/siqa", None, "train") and s[0]["task"] == "social_i_qa"
    load_samples("allenai/social_i_qa", split="validation")  # the scripted repo's name redirects
    assert fake_hub[-1][:3] == ("lighteval/siqa", None, "validation")
    load_samples("ybisk/piqa")
    assert fake_hub[-1][:3] == ("baber/piqa", None, "train")
    s = load_samples("bigbench:navigate")
    assert fake_hub[-1][:3] == ("hails/bigbench", "navigate_zero_shot", "train") and s[0]["task"] == "bigbench:navigate"
    load_samples("mmlu", split="test")
    assert fake_hub[-1][:3] == ("cais/mmlu", "all", "test")
    load_samples("mmlu:anatomy", split="validation")
    assert fake_hub[-1][:3] == ("cais/mmlu", "anatomy", "validation")
    s = load_samples("owner/custom", column_map="sciq")  # any other repo: the named converter
    assert fake_hub[-1][:3] == ("owner/custom", None, "train") and gold(s[0]) == "right0"
    assert all(kw == {} for *_, kw in fake_hub)  # no revision: every entry is a parquet repo


def test_hub_name_errors(fake_hub, monkeypatch):
    with pytest.raises(ValueError, match=r"mmlu \(cais/mmlu\) needs split=..., one of \['auxiliary_train', 'dev'"):
        load_samples("mmlu")
    with pytest.raises(ValueError, match="BIG-Bench needs a task: load 'bigbench:<task>'"):
        load_samples("bigbench")
    with pytest.raises(
        ValueError,
        match=r"'allenai/ai2_arc' holds several sources; name one of \['arc_challenge', "
        r"'arc_easy'\]",
    ):
        load_samples("allenai/ai2_arc")
    with pytest.raises(
        ValueError,
        match=r"unknown source 'comonsense_qa'; known: \[.*'commonsense_qa'.*"
        r"'super_glue:wsc'",
    ):
        load_samples("comonsense_qa")
    with pytest.raises(ValueError, match=r"unknown column map 'nope'.*known:"):
        load_samples([{"question": "q", "answer": "a"}], column_map="nope")
    monkeypatch.setitem(HUB_COLUMN_MAPS, "scripted", D.HubDataset("owner/script", None, D._sciq))
    with pytest.raises(
        RuntimeError,
        match=r"owner/script ships a loading script.*refs/convert/parquet.*"
        r"column_map='scripted'",
    ):
        load_samples("scripted")
    assert [c[0] for c in fake_hub] == ["owner/script"]  # the other errors came before any download


def test_missing_columns_and_bad_rows_name_the_columns():
    with pytest.raises(
        ValueError,
        match=r"piqa: expected column\(s\) \['sol2'\] are missing; available columns: "
        r"\['goal', 'label', 'sol1'\]",
    ):
        load_samples([{"goal": "g", "sol1": "a", "label": 0}], column_map="piqa")
    bad = [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "g2", "sol1": "a", "label": 1}]
    with pytest.raises(
        ValueError,
        match=r"piqa: row 1 \(id None\) could not be converted \(no column/key 'sol2'\); "
        r"row columns: \['goal', 'label', 'sol1'\]",
    ):
        load_samples(bad, column_map="piqa")


# ---- local copies: DatasetDict folders, parquet files, parquet folders


def test_local_formats_share_the_converter(tmp_path):
    ds, golds = build("commonsense_qa", 4)
    dd = datasets.DatasetDict({"train": ds, "validation": build("commonsense_qa", 2, tag="val")[0]})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [gold(x) for x in load_samples(str(tmp_path / "dd"), column_map="commonsense_qa")] == golds
    assert len(load_samples(str(tmp_path / "dd"), column_map="commonsense_qa", split="validation")) == 2
    with pytest.raises(ValueError, match=r"has no split 'test'; available: \['train', 'validation'\]"):
        load_samples(str(tmp_path / "dd"), column_map="commonsense_qa", split="test")
    with pytest.raises(ValueError, match=r"has splits \['train', 'validation'\]: pass split="):
        load_samples(str(tmp_path / "dd"))
    ds.to_parquet(str(tmp_path / "cqa.parquet"))
    assert [gold(x) for x in load_samples(str(tmp_path / "cqa.parquet"), column_map="commonsense_qa")] == golds
    (tmp_path / "snap" / "data").mkdir(parents=True)  # a hub-style folder of parquet files
    ds.to_parquet(str(tmp_path / "snap" / "data" / "train-00000-of-00001.parquet"))
    dd["validation"].to_parquet(str(tmp_path / "snap" / "data" / "validation-00000-of-00001.parquet"))
    s = load_samples(str(tmp_path / "snap"), column_map="commonsense_qa", split="validation")
    assert len(s) == 2 and s[0]["id"] == "val0"
