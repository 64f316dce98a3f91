import json

import pytest

from roma_peft.data import (
    DEFAULT_PROMPT_TEMPLATE,
    HUB_COLUMN_MAPS,
    data_hash,
    embed_text,
    format_prompt,
    load_samples,
    option_continuation,
)

ROWS = [
    {"id": "a", "question": "What colour is the sky?", "options": ["blue", "green"], "label": 0},
    {"question": "Capital of France?", "answer": "Paris", "task": "geo", "embed_text": "capitals"},
]


def test_list_jsonl_and_dataset_give_same_samples(tmp_path):
    import datasets

    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    a = load_samples(ROWS)
    b = load_samples(str(p))
    c = load_samples(datasets.Dataset.from_list([ROWS[0]]))
    assert a == b
    assert a[0] == c[0] and a[1]["id"] == "1"  # default id = row index


def test_prompt_format_and_embed_text():
    s = load_samples(ROWS)
    assert DEFAULT_PROMPT_TEMPLATE == "Question: {question}\nAnswer:"
    assert format_prompt(s[0]) == "Question: What colour is the sky?\nAnswer:"
    assert option_continuation("blue") == " blue"
    assert embed_text(s[0]) == "What colour is the sky?"  # question, not options
    assert embed_text(s[1]) == "capitals"
    assert embed_text(s[1], field="task") == "geo"
    with pytest.raises(ValueError, match="embed field 'task'"):
        embed_text(s[0], field="task")


@pytest.mark.parametrize(
    "row, msg",
    [
        ({"question": "q"}, "options missing"),
        ({"question": "q", "options": ["x", "y"], "label": 2}, "out of range"),
        ({"question": "q", "options": ["x", "y"], "label": -1}, "out of range"),
        ({"question": "q", "options": ["x", "y"], "label": "b"}, "integer index"),
        ({"question": "q", "options": ["x", "y"]}, "integer index"),
        ({"question": "   ", "options": ["x", "y"], "label": 0}, "empty or missing 'question'"),
        ({"options": ["x", "y"], "label": 0}, "empty or missing 'question'"),
        ({"question": "q", "options": ["x"], "label": 0}, "at least 2 options"),
        ({"question": "q", "options": "xy", "label": 0}, "list of strings"),
        ({"question": "q", "options": ["x", ""], "label": 0}, "non-empty string"),
    ],
)
def test_bad_rows(row, msg):
    with pytest.raises(ValueError, match=msg):
        load_samples([row])


def test_duplicate_ids_and_empty():
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        load_samples([ROWS[0], dict(ROWS[0])])
    with pytest.raises(ValueError, match="duplicate id '1'"):  # explicit id clashing with a row index
        load_samples([{"id": "1", **{k: v for k, v in ROWS[0].items() if k != "id"}}, ROWS[1]])
    with pytest.raises(ValueError, match="no samples"):
        load_samples([])


def test_bad_jsonl_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "q", "answer": "a"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_samples(str(p))


def test_column_maps():
    rows = [{"q": "Why?", "opts": ["because", "no"], "gold": 1}]
    s = load_samples(rows, column_map={"question": "q", "options": "opts", "label": "gold"})
    assert s[0]["question"] == "Why?" and s[0]["label"] == 1
    s = load_samples(rows, column_map=lambda r: {"question": r["q"], "answer": r["opts"][0]})
    assert s[0]["answer"] == "because"
    with pytest.raises(ValueError, match="unknown column map"):
        load_samples(rows, column_map="nope")
    with pytest.raises(ValueError, match="column 'zz'"):
        load_samples(rows, column_map={"question": "zz"})


# one local row per supported hub dataset, in the hub's own column layout
HUB_ROWS = {
    "commonsense_qa": {
        "id": "c1",
        "question": "Where?",
        "answerKey": "B",
        "choices": {"label": ["A", "B", "C"], "text": ["x", "y", "z"]},
    },
    "openbookqa": {
        "id": "o1",
        "question_stem": "Sun is?",
        "answerKey": "A",
        "choices": {"label": ["A", "B"], "text": ["star", "moon"]},
    },
    "arc_easy": {
        "id": "e1",
        "question": "Q?",
        "answerKey": "2",
        "choices": {"label": ["1", "2", "3"], "text": ["a", "b", "c"]},
    },
    "arc_challenge": {
        "id": "h1",
        "question": "Q?",
        "answerKey": "C",
        "choices": {"label": ["A", "B", "C", "D"], "text": ["a", "b", "c", "d"]},
    },
    "social_i_qa": {
        "context": "Tom fell.",
        "question": "How does Tom feel?",
        "answerA": "hurt",
        "answerB": "happy",
        "answerC": "bored",
        "label": "1",
    },
    "sciq": {
        "question": "H2O is?",
        "distractor1": "salt",
        "distractor2": "air",
        "distractor3": "iron",
        "correct_answer": "water",
        "support": "",
    },
    "boolq": {"question": "is the sky blue", "passage": "The sky is blue.", "answer": True},
    "piqa": {"goal": "Open a jar", "sol1": "twist lid", "sol2": "eat lid", "label": 0},
}
EXPECTED_GOLD = {
    "commonsense_qa": "y",
    "openbookqa": "star",
    "arc_easy": "b",
    "arc_challenge": "c",
    "social_i_qa": "hurt",
    "sciq": "water",
    "boolq": "yes",
    "piqa": "twist lid",
}


@pytest.mark.parametrize("name", sorted(HUB_ROWS))  # every registry entry: tests/test_hub_loaders.py
def test_hub_column_maps_on_local_rows(name):
    import datasets

    ds = datasets.Dataset.from_list([HUB_ROWS[name]])
    (s,) = load_samples(ds, column_map=name)
    assert s["options"][s["label"]] == EXPECTED_GOLD[name]
    assert s["task"] in name or name.startswith(s["task"])
    assert HUB_COLUMN_MAPS[name].path  # the real hub location stays in the code
    if name == "boolq":
        assert s["embed_text"] == "is the sky blue" and "The sky is blue." in s["question"]


def test_data_hash_changes_with_labels_and_order():
    s = load_samples([ROWS[0], {"question": "q2", "options": ["a", "b"], "label": 0}])
    h = data_hash(s)
    s2 = [dict(x) for x in s]
    s2[1]["label"] = 1
    assert data_hash(s2) != h
    assert data_hash(list(reversed(s))) != h
    assert data_hash([dict(x) for x in s]) == h
