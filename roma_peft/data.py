"""The sample schema shared by scoring, neighbours, the trainer and the benchmark.

A *sample* is a plain dict (see ``docs/design.md``)::

    {"id": "arc-17",                      # optional, defaults to the row index as a string
     "question": "Which gas do plants take in?",  # required, the task text WITHOUT the options
     "options": ["oxygen", "carbon dioxide"],     # multiple choice
     "label": 1,                                  # multiple choice: index of the gold option
     "answer": "carbon dioxide",                  # generative tasks (used when there are no options)
     "task": "arc_easy",                          # optional task/skill label
     "embed_text": "..."}                         # optional text to embed for neighbours

Sources accepted by :func:`load_samples`: a list of dicts, a JSONL path, a parquet file, a
``save_to_disk`` folder, a ``datasets.Dataset`` or a hub dataset name. Hub rows are mapped onto the
schema by the registry :data:`HUB_COLUMN_MAPS` (repo, config, splits, expected columns and row
converter of every training source and evaluation benchmark of the paper: BIG-Bench, SuperGLUE,
CommonsenseQA, SocialIQA, OpenBookQA, SciQ, MultiRC, KnowRef; MMLU, HellaSwag, PIQA, ARC,
WinoGrande, BoolQ, GSM8K), by a user callable, or by a ``{schema_key: column}`` dict. The paper's
seeded 49k training mix is built in :mod:`roma_peft.recipe_data`; see ``docs/data.md``. Reading anything but a
list, JSON or JSONL needs the ``data`` extra (``pip install "roma-peft[data]"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ._optional import require

DEFAULT_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
"""lm-eval style prompt; each option is scored as the continuation ``" " + option``."""

SCHEMA_KEYS = ("id", "question", "options", "label", "answer", "task", "embed_text")


def format_prompt(sample: Mapping[str, Any], template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """The context string the model is conditioned on (options are *not* part of it).

    ``template`` is a ``str.format`` template; it receives every key of the sample, so a
    template may use ``{question}``, ``{task}`` or any extra column the user kept.
    """
    try:
        return template.format(**sample)
    except KeyError as exc:  # pragma: no cover - message path tested via ValueError
        raise ValueError(
            f"prompt template {template!r} uses the key {exc.args[0]!r}, which sample "
            f"{sample.get('id')!r} does not have (keys: {sorted(sample)})"
        ) from None


def option_continuation(option: str) -> str:
    """The continuation scored for one option: a leading space, as lm-eval's target delimiter."""
    return " " + str(option)


def embed_text(sample: Mapping[str, Any], field: str | None = None) -> str:
    """Text that represents the *task* of a sample in the embedding space.

    The paper embeds the task description/instruction, not the answer options (options would
    pull samples with similar answers together, not samples asking for the same skill).
    Default: ``sample["embed_text"]`` when present, else ``sample["question"]``. ``field``
    names another key to use instead (e.g. ``"task"`` or a raw column kept by the user).
    """
    if field is not None:
        if field not in sample or sample[field] in (None, ""):
            raise ValueError(f"embed field {field!r} is missing or empty in sample {sample.get('id')!r}")
        return str(sample[field])
    text = sample.get("embed_text")
    if text:
        return str(text)
    return str(sample["question"])


# --------------------------------------------------------------------------------------------
# validation


def validate_samples(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Check rows against the schema and return normalised copies (``id`` as ``str``).

    Every problem is a ``ValueError`` that names the offending sample, because a bad row found
    deep inside scoring or neighbour building is much harder to trace back.
    """
    out: list[dict] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"sample {i} is a {type(row).__name__}, expected a dict")
        s = dict(row)
        sid = s.get("id")
        s["id"] = str(i) if sid is None or sid == "" else str(sid)
        where = f"sample {i} (id {s['id']!r})"
        if s["id"] in seen:
            raise ValueError(
                f"duplicate id {s['id']!r}: samples {seen[s['id']]} and {i} share it; ids must be "
                "unique because neighbourhoods and predictions refer to samples by id"
            )
        seen[s["id"]] = i
        q = s.get("question")
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{where}: empty or missing 'question' (the prompt text)")
        opts = s.get("options")
        if opts is not None:
            if isinstance(opts, str) or not isinstance(opts, (list, tuple)):
                raise ValueError(f"{where}: 'options' must be a list of strings, got {type(opts).__name__}")
            if len(opts) < 2:
                raise ValueError(f"{where}: multiple choice needs at least 2 options, got {len(opts)}")
            if any(not isinstance(o, str) or o == "" for o in opts):
                raise ValueError(f"{where}: every option must be a non-empty string, got {list(opts)!r}")
            s["options"] = list(opts)
            lab = s.get("label")
            if isinstance(lab, str) and lab.strip().lstrip("-").isdigit():
                lab = int(lab)
            if isinstance(lab, bool) or not hasattr(lab, "__index__"):
                raise ValueError(f"{where}: 'label' must be the integer index of the gold option, got {lab!r}")
            lab = int(lab)
            if not 0 <= lab < len(opts):
                raise ValueError(f"{where}: gold index label={lab} is out of range for {len(opts)} options")
            s["label"] = lab
        else:
            ans = s.get("answer")
            if not isinstance(ans, str) or not ans.strip():
                raise ValueError(
                    f"{where}: options missing and no 'answer' either; a sample needs 'options' + "
                    "'label' (multiple choice) or 'answer' (generative)"
                )
        out.append(s)
    if not out:
        raise ValueError("no samples: the source is empty")
    return out


def data_hash(samples: list[Mapping[str, Any]]) -> str:
    """sha256 over ids, questions, options, labels/answers and embed texts, in order.

    Used to invalidate stored neighbourhoods/predictions when the data they were built from
    changed (any change of order, text, option or label changes the hash).
    """
    h = hashlib.sha256()
    for s in samples:
        rec = [
            str(s.get("id")),
            s.get("question"),
            s.get("options"),
            s.get("label"),
            s.get("answer"),
            s.get("embed_text"),
        ]
        h.update(json.dumps(rec, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# hub datasets
#
# One table (HUB_COLUMN_MAPS, plus the parametric families in HUB_FAMILIES) holds everything known
# about a hub dataset: repo, config, revision, splits, expected columns, an optional dataset-level
# ``prepare`` step and the row converter. ``load_samples("<name>")`` and
# ``load_samples(local_copy, column_map="<name>")`` go through the same code (:func:`_convert_rows`),
# so tests exercise the hub path offline on local copies in the hub's own column layout.

logger = logging.getLogger(__name__)

UNLABELLED = "unlabelled (hidden test label)"
"""Skip reason of a row whose gold label is withheld ("" / -1 / None): hub test splits."""


class SkipRow(Exception):
    """Raised by a converter for a row that cannot become a sample.

    Reasons: no gold label (:data:`UNLABELLED`), a free-form BIG-Bench row, a MultiRC question with
    no wrong candidate. :func:`load_samples` counts skips per reason and reports them in one
    :class:`SkippedRowsWarning`; a malformed row (a label that is not among the choices, a missing
    column) is an error instead, never a skip.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SkippedRowsWarning(UserWarning):
    """Some rows of a hub source were skipped (counted per reason in the message)."""


@dataclass(frozen=True)
class HubDataset:
    """Where a hub dataset lives and how its rows map onto the sample schema.

    ``columns``: the columns the converter reads; an entry may be a tuple of alternative spellings.
    They are checked before converting, so a wrong dataset or layout fails with the available
    columns listed instead of a ``KeyError`` deep inside a converter.
    ``prepare``: an optional dataset-level step run before the row converter (MultiRC groups its
    one-row-per-candidate layout into one row per question).
    ``default_split``: the split used when ``split`` is not given (``None``: a split is required).
    ``aliases``: other hub names that resolve to this entry (e.g. the script-based repos that
    ``datasets`` >= 4 refuses to load).
    """

    path: str
    name: str | None
    convert: Callable[[Mapping[str, Any]], dict]
    default_split: str | None = "train"
    revision: str | None = None
    columns: tuple = ()
    prepare: Callable[[list], list] | None = None
    splits: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    note: str = ""
    config_hint: str = ""  # set when ``name`` must be chosen by the caller (BIG-Bench tasks)


# ---- label conventions


def _gold_index(value, n: int, *, base: int = 0, what: str = "label") -> int:
    """A gold label in any of the hub's conventions -> 0-based option index.

    ``base``: the number the first option has (SocialIQA and WinoGrande count from 1). Ints, digit
    strings ("2") and bools are accepted. ``""``, ``None`` and ``-1`` mean "unlabelled" (hub test
    splits) and raise :class:`SkipRow`; anything else out of range is an error.
    """
    if value is None:
        raise SkipRow(UNLABELLED)
    if isinstance(value, bool):
        idx = int(value)
    elif isinstance(value, str):
        v = value.strip()
        if v == "":
            raise SkipRow(UNLABELLED)
        if not v.lstrip("-").isdigit():
            raise ValueError(f"{what} {value!r} is not an integer")
        idx = int(v)
    elif hasattr(value, "__index__"):
        idx = int(value)
    else:
        raise ValueError(f"{what} {value!r} ({type(value).__name__}) is not an integer")
    if idx == -1:
        raise SkipRow(UNLABELLED)
    if not base <= idx < base + n:
        raise ValueError(f"{what}={value!r} is out of range for {n} options (labels count from {base})")
    return idx - base


def _choice_gold(labels, key) -> int:
    """Index of ``key`` among the choice labels (CommonsenseQA, OpenBookQA, ARC: "A".."E" or "1".."5")."""
    key = "" if key is None else str(key).strip()
    if key == "":
        raise SkipRow(UNLABELLED)
    labels = [str(x).strip() for x in labels]
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not one of the choice labels {labels}")
    return labels.index(key)


def _choices(row) -> tuple[list, list]:
    ch = row["choices"]
    if isinstance(ch, Mapping):  # {"label": [...], "text": [...]} in either key order
        return list(ch["text"]), list(ch["label"])
    return [c["text"] for c in ch], [c["label"] for c in ch]  # list of {"label", "text"} dicts


# ---- training sources and benchmarks


def _letter_choices(row, question: str, task: str) -> dict:
    texts, labels = _choices(row)
    return {"question": question, "options": texts, "label": _choice_gold(labels, row["answerKey"]), "task": task}


def _commonsense_qa(row):
    return {"id": row.get("id"), **_letter_choices(row, row["question"], "commonsense_qa")}


def _openbookqa(row):
    return {"id": row.get("id"), **_letter_choices(row, row["question_stem"], "openbookqa")}


def _arc(task):
    def conv(row):
        return {"id": row.get("id"), **_letter_choices(row, row["question"], task)}

    return conv


def _social_i_qa(row):
    text = f"{row['context']} {row['question']}"
    return {
        "question": text,
        "options": [row["answerA"], row["answerB"], row["answerC"]],
        "label": _gold_index(row["label"], 3, base=1),
        "task": "social_i_qa",
        "embed_text": text,
    }


def _sciq(row):
    # lm-eval's order: the three distractors, then the correct answer (gold index 3)
    return {
        "question": row["question"],
        "options": [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]],
        "label": 3,
        "task": "sciq",
    }


def _boolq(task):
    def conv(row):
        # SuperGLUE's copy has an int ``label`` (-1 on test), google/boolq a bool ``answer``
        gold = _gold_index(row["label"] if "label" in row else row["answer"], 2)
        # the passage is context for the model; the question alone describes the task
        return {
            "id": row.get("idx"),
            "question": f"{row['passage']}\nQuestion: {row['question']}?",
            "options": ["no", "yes"],
            "label": gold,
            "task": task,
            "embed_text": row["question"],
        }

    return conv


def _piqa(row):
    return {
        "question": row["goal"],
        "options": [row["sol1"], row["sol2"]],
        "label": _gold_index(row["label"], 2),
        "task": "piqa",
    }


def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag preprocessing (brackets are WikiHow artefacts)
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row):
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    endings = list(row["endings"])
    # no id: ``ind`` is not documented as unique within a split, the row position is
    return {
        "question": _hellaswag_clean(row["activity_label"] + ": " + ctx),
        "options": [_hellaswag_clean(e) for e in endings],
        "label": _gold_index(row["label"], len(endings)),
        "task": "hellaswag",
    }


def _winogrande(row):
    sentence = row["sentence"]
    gold = _gold_index(row["answer"], 2, base=1)
    opts = [row["option1"], row["option2"]]
    if "_" not in sentence:
        raise ValueError(f"winogrande sentence has no blank '_': {sentence!r}")
    i = sentence.index("_")
    before, after = sentence[:i].strip(), sentence[i + 1 :]
    if before:
        # cloze: the text before the blank is the prompt, option + rest of the sentence the continuation
        return {
            "question": before,
            "options": [o + after for o in opts],
            "label": gold,
            "task": "winogrande",
            "embed_text": sentence,
        }
    # blank at the start of the sentence: nothing to condition on, ask instead
    return {
        "question": f"{sentence}\nWhat does the blank _ stand for?",
        "options": opts,
        "label": gold,
        "task": "winogrande",
        "embed_text": sentence,
    }


MMLU_SUBJECTS = (
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_medicine",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "global_facts",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_european_history",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_mathematics",
    "high_school_microeconomics",
    "high_school_physics",
    "high_school_psychology",
    "high_school_statistics",
    "high_school_us_history",
    "high_school_world_history",
    "human_aging",
    "human_sexuality",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "machine_learning",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "moral_disputes",
    "moral_scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional_accounting",
    "professional_law",
    "professional_medicine",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
    "virology",
    "world_religions",
)
"""The 57 configs of ``cais/mmlu`` (besides ``all`` and ``auxiliary_train``)."""


def _mmlu(row):
    if "question" not in row and isinstance(row.get("train"), Mapping):
        row = row["train"]  # the auxiliary_train config nests each row in a ``train`` struct
    choices = list(row["choices"])
    ans = row["answer"]
    if isinstance(ans, str) and len(ans.strip()) == 1 and ans.strip().upper() in "ABCDEFGH":
        ans = "ABCDEFGH".index(ans.strip().upper())  # some copies store the letter
    subject = row.get("subject") or ""
    # cloze form (lm-eval's mmlu_continuation): the options are continuations, not letters in the prompt
    return {
        "question": row["question"].strip(),
        "options": choices,
        "label": _gold_index(ans, len(choices), what="answer"),
        "task": f"mmlu:{subject}" if subject else "mmlu",
    }


def _gsm8k(row):
    solution = row["answer"]
    if "####" not in solution:
        raise ValueError(f"GSM8K answer has no '#### <final answer>' line: {solution[-80:]!r}")
    final = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise ValueError(f"GSM8K answer has an empty final answer after '####': {solution[-80:]!r}")
    return {"question": row["question"], "answer": final, "solution": solution, "task": "gsm8k"}


# ---- SuperGLUE (aps/super_glue, lm-eval's prompts)


def _cb(row):
    return {
        "id": row.get("idx"),
        "question": f"{row['premise']}\nQuestion: {row['hypothesis']}. True, False, or Neither?",
        "options": ["True", "False", "Neither"],  # entailment, contradiction, neutral
        "label": _gold_index(row["label"], 3),
        "task": "super_glue:cb",
    }


def _rte(row):
    return {
        "id": row.get("idx"),
        "question": f"{row['premise']}\nQuestion: {row['hypothesis']} True or False?",
        "options": ["True", "False"],  # 0 = entailment, 1 = not_entailment
        "label": _gold_index(row["label"], 2),
        "task": "super_glue:rte",
    }


def _copa(row):
    connectors = {"cause": "because", "effect": "therefore"}
    if row["question"] not in connectors:
        raise ValueError(f"COPA question must be 'cause' or 'effect', got {row['question']!r}")
    connector = connectors[row["question"]]
    premise = row["premise"].strip()
    premise = premise[:-1] if premise.endswith((".", "!", "?")) else premise

    def lower_first(s):
        return s[:1].lower() + s[1:]

    return {
        "id": row.get("idx"),
        "question": f"{premise} {connector}",
        "options": [lower_first(row["choice1"]), lower_first(row["choice2"])],
        "label": _gold_index(row["label"], 2),
        "task": "super_glue:copa",
    }


def _wic(row):
    word = row["sentence1"][row["start1"] : row["end1"]] or row["word"]
    return {
        "id": row.get("idx"),
        "question": f"Sentence 1: {row['sentence1']}\nSentence 2: {row['sentence2']}\nQuestion: Is "
        f"the word '{word}' used in the same way in the two sentences above?",
        "options": ["no", "yes"],
        "label": _gold_index(row["label"], 2),
        "task": "super_glue:wic",
    }


def _wsc(row):
    text, pron, noun = row["text"], row["span2_text"], row["span1_text"]
    words, span = text.split(), pron.split()
    k = row["span2_index"]  # span indices count words (lm-eval's rule)
    if words[k : k + len(span)] != span:  # a stale index: mark the pronoun's first occurrence instead
        k = next((j for j in range(len(words)) if words[j : j + len(span)] == span), -1)
    if k >= 0:
        words[k : k + len(span)] = [f"*{pron}*"]
    passage = " ".join(words)
    return {
        "id": row.get("idx"),
        "question": f'{passage}\nIn the passage above, does the pronoun "*{pron}*" refer to "*{noun}*"?',
        "options": ["no", "yes"],
        "label": _gold_index(row["label"], 2),
        "task": "super_glue:wsc",
    }


def _record(row):
    answers = sorted(set(row["answers"]))
    if not answers:
        raise SkipRow(UNLABELLED)
    gold = answers[0]
    # other spellings of a correct entity would be correct options too: keep one gold only
    entities = [e for e in sorted(set(row["entities"])) if e == gold or e not in answers]
    if gold not in entities:
        raise ValueError(f"ReCoRD answer {gold!r} is not among the entities {entities}")
    if len(entities) < 2:
        raise SkipRow("fewer than two candidate entities")
    first, *highlights = row["passage"].strip().split("\n@highlight\n")
    passage = first + "".join(f"\n  - {h}." for h in highlights)
    return {
        "id": f"{row['idx']['passage']}-{row['idx']['query']}" if isinstance(row.get("idx"), Mapping) else None,
        "question": passage,
        "options": [row["query"].replace("@placeholder", e) for e in entities],
        "label": entities.index(gold),
        "task": "super_glue:record",
        "embed_text": row["query"],
    }


# ---- MultiRC: one row per (question, candidate answer) -> one sample per question


_MULTIRC_SENT = re.compile(r"<b>\s*Sent\s*\d+\s*:\s*</b>", re.IGNORECASE)


def clean_multirc_paragraph(text: str) -> str:
    """Drop MultiRC's ``<b>Sent N: </b>`` markers and ``<br>`` tags; one space between sentences."""
    text = _MULTIRC_SENT.sub(" ", text)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"</?[a-zA-Z][^>]*>", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _group_multirc(rows: list) -> list:
    """Group MultiRC's candidate rows by (paragraph, question) id, first-appearance order."""
    groups: dict = {}
    for r in rows:
        idx = r["idx"]
        key = (idx["paragraph"], idx["question"]) if isinstance(idx, Mapping) else (r["paragraph"], r["question"])
        g = groups.get(key)
        if g is None:
            g = groups[key] = {
                "id": f"{key[0]}-{key[1]}",
                "paragraph": r["paragraph"],
                "question": r["question"],
                "answers": [],
                "labels": [],
            }
        g["answers"].append(r["answer"])
        g["labels"].append(r["label"])
    return list(groups.values())


def _multirc(row):
    labels = [int(x) for x in row["labels"]]
    if all(x == -1 for x in labels):
        raise SkipRow(UNLABELLED)
    true = [i for i, x in enumerate(labels) if x == 1]
    if not true:
        raise SkipRow("no correct candidate answer")
    if not any(x == 0 for x in labels):
        raise SkipRow("no wrong candidate answer")
    # one gold per sample: the first correct candidate; the other correct ones are dropped, the wrong
    # ones are the distractors, in the dataset's order
    keep = [i for i, x in enumerate(labels) if x == 0 or i == true[0]]
    return {
        "id": row.get("id"),
        "question": f"{clean_multirc_paragraph(row['paragraph'])}\nQuestion: {row['question']}",
        "options": [row["answers"][i] for i in keep],
        "label": keep.index(true[0]),
        "task": "multirc",
        "embed_text": row["question"],
    }


# ---- KnowRef (KnowRef-60K, coref-data/knowref_60k_raw)


KNOWREF_NOTE = (
    "KnowRef columns are taken from the coref-data/knowref_60k_raw dataset card (candidate_0, "
    "candidate_1) and its conversion script (candidate0, candidate1), both accepted, plus "
    "swapped_sentence and correct_candidate ('candidate_0'/'candidate_1'); they could not be checked "
    "against the hub offline. For another layout pass column_map=knowref_converter(sentence=..., "
    "candidates=(..., ...), answer=...)."
)


def knowref_converter(
    sentence: str = "swapped_sentence", candidates=None, answer: str = "correct_candidate", task: str = "knowref"
):
    """Row converter for KnowRef-style rows (one pronoun, two candidate antecedents).

    ``sentence``: the column holding the sentence, with the pronoun in square brackets
    (``"... because [he] was ..."``); ``candidates``: the two candidate columns (default: whichever
    of ``candidate0``/``candidate_0`` exists, same for 1); ``answer``: the column naming the correct
    candidate, as ``"candidate_0"``/``"candidate_1"``, ``0``/``1`` or the candidate's own text.
    """

    def pick(row, names):
        for n in names:
            if n in row:
                return row[n]
        raise KeyError(names[0])

    def conv(row):
        c0 = row[candidates[0]] if candidates else pick(row, ("candidate0", "candidate_0"))
        c1 = row[candidates[1]] if candidates else pick(row, ("candidate1", "candidate_1"))
        words = str(row[sentence]).split(" ")
        marked = [i for i, w in enumerate(words) if len(w) > 2 and w[0] == "[" and w[-1] == "]"]
        if len(marked) == 1:
            pron = words[marked[0]][1:-1]
            words[marked[0]] = f"*{pron}*"
            ask = f'In the sentence above, who does "{pron}" refer to?'
        else:
            ask = "In the sentence above, who does the pronoun refer to?"
        gold = row[answer]
        g = str(gold).strip().replace("_", "").lower()
        if g in ("candidate0", "0"):
            label = 0
        elif g in ("candidate1", "1"):
            label = 1
        elif gold in (c0, c1):
            label = [c0, c1].index(gold)
        elif g in ("", "-1", "none"):
            raise SkipRow(UNLABELLED)
        else:
            raise ValueError(f"{answer}={gold!r} names neither candidate ({c0!r}, {c1!r})")
        return {"question": f"{' '.join(words)}\n{ask}", "options": [str(c0), str(c1)], "label": label, "task": task}

    return conv


# ---- BIG-Bench (hails/bigbench, configs "<task>_zero_shot")


def _bigbench(task: str):
    def conv(row):
        choices = list(row["multiple_choice_targets"] or [])
        if not choices:
            raise SkipRow("free-form (no multiple_choice_targets)")
        scores = list(row.get("multiple_choice_scores") or [])
        if 1 in scores:
            gold = scores.index(1)
        else:
            targets = list(row.get("targets") or [])
            if not targets or targets[0] not in choices:
                raise SkipRow("no gold among the multiple_choice_targets")
            gold = choices.index(targets[0])
        # other correct choices (several scores of 1) would also be right: keep one gold only
        keep = [i for i in range(len(choices)) if i == gold or not (i < len(scores) and scores[i] == 1)]
        options = [choices[i] for i in keep]
        if len(options) < 2:
            raise SkipRow("fewer than two choices")
        if any(not isinstance(o, str) or not o.strip() for o in options):
            raise SkipRow("an empty choice")
        question = re.sub(r"\n\s*A:\s*$", "", row["inputs"].rstrip())  # the template adds "Answer:"
        # no id: ``idx`` is not documented as unique within a split, the row position is
        return {"question": question, "options": options, "label": keep.index(gold), "task": task}

    return conv


_BB_COLUMNS = ("inputs", "targets", "multiple_choice_targets", "multiple_choice_scores")
_SG = "aps/super_glue"
_SG_SPLITS = ("train", "validation", "test")

HUB_COLUMN_MAPS: dict[str, HubDataset] = {
    # the paper's training sources
    "commonsense_qa": HubDataset(
        "tau/commonsense_qa", None, _commonsense_qa, columns=("question", "choices", "answerKey"), splits=_SG_SPLITS
    ),
    "social_i_qa": HubDataset(
        "lighteval/siqa",
        None,
        _social_i_qa,
        columns=("context", "question", "answerA", "answerB", "answerC", "label"),
        splits=("train", "validation"),
        aliases=("allenai/social_i_qa", "social_iqa", "siqa"),
    ),
    "openbookqa": HubDataset(
        "allenai/openbookqa", "main", _openbookqa, columns=("question_stem", "choices", "answerKey"), splits=_SG_SPLITS
    ),
    "sciq": HubDataset(
        "allenai/sciq",
        None,
        _sciq,
        columns=("question", "distractor1", "distractor2", "distractor3", "correct_answer"),
        splits=_SG_SPLITS,
    ),
    "multirc": HubDataset(
        _SG,
        "multirc",
        _multirc,
        prepare=_group_multirc,
        columns=("paragraph", "question", "answer", "idx", "label"),
        splits=_SG_SPLITS,
        aliases=("super_glue:multirc",),
    ),
    "knowref": HubDataset(
        "coref-data/knowref_60k_raw",
        None,
        knowref_converter(),
        columns=("swapped_sentence", ("candidate0", "candidate_0"), ("candidate1", "candidate_1"), "correct_candidate"),
        splits=_SG_SPLITS,
        aliases=("knowref_60k",),
        note=KNOWREF_NOTE,
    ),
    "bigbench": HubDataset(
        "hails/bigbench",
        None,
        _bigbench("bigbench"),
        columns=_BB_COLUMNS,
        splits=("default", "train", "validation"),
        aliases=("google/bigbench", "tasksource/bigbench"),
        config_hint="BIG-Bench needs a task: load 'bigbench:<task>' (config "
        "'<task>_zero_shot' of hails/bigbench); the paper mix uses "
        "roma_peft.recipe_data.BIGBENCH_TASKS",
    ),
    # SuperGLUE tasks that fit prompt + options + label (MultiRC above, grouped per question)
    "super_glue:boolq": HubDataset(
        _SG, "boolq", _boolq("super_glue:boolq"), columns=("passage", "question", "label"), splits=_SG_SPLITS
    ),
    "super_glue:cb": HubDataset(_SG, "cb", _cb, columns=("premise", "hypothesis", "label"), splits=_SG_SPLITS),
    "super_glue:copa": HubDataset(
        _SG, "copa", _copa, columns=("premise", "choice1", "choice2", "question", "label"), splits=_SG_SPLITS
    ),
    "super_glue:rte": HubDataset(_SG, "rte", _rte, columns=("premise", "hypothesis", "label"), splits=_SG_SPLITS),
    "super_glue:wic": HubDataset(
        _SG, "wic", _wic, columns=("sentence1", "sentence2", "start1", "end1", "word", "label"), splits=_SG_SPLITS
    ),
    "super_glue:wsc": HubDataset(
        _SG, "wsc.fixed", _wsc, columns=("text", "span1_text", "span2_text", "span2_index", "label"), splits=_SG_SPLITS
    ),
    "super_glue:record": HubDataset(
        _SG, "record", _record, columns=("passage", "query", "entities", "answers"), splits=_SG_SPLITS
    ),
    # the paper's evaluation benchmarks
    "mmlu": HubDataset(
        "cais/mmlu",
        "all",
        _mmlu,
        default_split=None,
        columns=(("question", "train"), ("choices", "train"), ("answer", "train")),
        splits=("auxiliary_train", "dev", "validation", "test"),
    ),
    "hellaswag": HubDataset(
        "Rowan/hellaswag",
        None,
        _hellaswag,
        columns=("activity_label", "ctx_a", "ctx_b", "endings", "label"),
        splits=_SG_SPLITS,
    ),
    "piqa": HubDataset(
        "baber/piqa",
        None,
        _piqa,
        columns=("goal", "sol1", "sol2", "label"),
        splits=("train", "validation"),
        aliases=("ybisk/piqa",),
    ),
    "arc_easy": HubDataset(
        "allenai/ai2_arc", "ARC-Easy", _arc("arc_easy"), columns=("question", "choices", "answerKey"), splits=_SG_SPLITS
    ),
    "arc_challenge": HubDataset(
        "allenai/ai2_arc",
        "ARC-Challenge",
        _arc("arc_challenge"),
        columns=("question", "choices", "answerKey"),
        splits=_SG_SPLITS,
    ),
    "winogrande": HubDataset(
        "allenai/winogrande",
        "winogrande_xl",
        _winogrande,
        columns=("sentence", "option1", "option2", "answer"),
        splits=_SG_SPLITS,
    ),
    "boolq": HubDataset(
        _SG, "boolq", _boolq("boolq"), columns=("passage", "question", ("label", "answer")), splits=_SG_SPLITS
    ),
    "google_boolq": HubDataset(
        "google/boolq", None, _boolq("boolq"), columns=("passage", "question", "answer"), splits=("train", "validation")
    ),
    "gsm8k": HubDataset("openai/gsm8k", "main", _gsm8k, columns=("question", "answer"), splits=("train", "test")),
}
"""Name -> hub location, splits and row converter: the one table of hub knowledge.

``load_samples("arc_easy", split="train")`` loads and maps in one call;
``load_samples(ds_or_local_path, column_map="arc_easy")`` maps a copy the user already has (a
``datasets.Dataset``, a ``save_to_disk`` folder, a parquet file) through the same converter.
Parametric names (``bigbench:<task>``, ``mmlu:<subject>``) are resolved by :data:`HUB_FAMILIES`.
Every repo here is a parquet repo that ``datasets`` >= 4 loads (no loading scripts): lm-eval's own
parquet copies replace ``allenai/social_i_qa`` and ``ybisk/piqa``; see ``docs/data.md``."""


def _bigbench_task(task: str) -> HubDataset:
    base = HUB_COLUMN_MAPS["bigbench"]
    return replace(base, name=f"{task}_zero_shot", convert=_bigbench(f"bigbench:{task}"), aliases=(), config_hint="")


def _mmlu_subject(subject: str) -> HubDataset:
    if subject not in MMLU_SUBJECTS:
        raise ValueError(f"unknown MMLU subject {subject!r}; known: {list(MMLU_SUBJECTS)}")
    return replace(HUB_COLUMN_MAPS["mmlu"], name=subject, splits=("dev", "validation", "test"))


HUB_FAMILIES: dict[str, Callable[[str], HubDataset]] = {"bigbench": _bigbench_task, "mmlu": _mmlu_subject}
"""``"<family>:<member>"`` names: ``bigbench:<task>`` (config ``<task>_zero_shot`` of
``hails/bigbench``) and ``mmlu:<subject>`` (one ``cais/mmlu`` config)."""


def known_sources() -> list[str]:
    """Every name :func:`load_samples` resolves: registry keys, families and aliases."""
    names = set(HUB_COLUMN_MAPS) | {f"{f}:<...>" for f in HUB_FAMILIES}
    for spec in HUB_COLUMN_MAPS.values():
        names.update(spec.aliases)
    return sorted(names)


def _path_index() -> dict[str, list[str]]:
    by_path: dict[str, list[str]] = {}
    for key, spec in HUB_COLUMN_MAPS.items():
        for name in (spec.path, *spec.aliases):
            if key not in by_path.setdefault(name, []):
                by_path[name].append(key)
    return by_path


def hub_dataset(name: str, *, strict: bool = True) -> HubDataset | None:
    """The registry entry for ``name``: a key, an alias, a repo path held by exactly one entry, or
    ``"<family>:<member>"``. Unknown: ``ValueError`` listing the known names (``None`` when not
    ``strict``). A repo path shared by several entries (``allenai/ai2_arc``, ``aps/super_glue``) is
    an error that lists the entries to choose from."""
    if name in HUB_COLUMN_MAPS:
        return HUB_COLUMN_MAPS[name]
    family, sep, member = name.partition(":")
    if sep and family in HUB_FAMILIES and name not in _path_index():
        if not member:
            raise ValueError(f"{name!r} needs a member after ':', e.g. 'bigbench:logical_deduction' or 'mmlu:anatomy'")
        return HUB_FAMILIES[family](member)
    keys = _path_index().get(name)
    if keys and len(keys) == 1:
        return HUB_COLUMN_MAPS[keys[0]]
    if keys:
        raise ValueError(f"{name!r} holds several sources; name one of {sorted(keys)}")
    if strict:
        raise ValueError(
            f"unknown source {name!r}; known: {known_sources()} (or a local file/folder, or a "
            "hub repo id 'owner/name' with column_map=...)"
        )
    return None


def _resolve_column_map(column_map) -> tuple[Callable | None, HubDataset | None]:
    if column_map is None:
        return None, None
    if isinstance(column_map, str):
        try:
            spec = hub_dataset(column_map)
        except ValueError as exc:
            raise ValueError(
                f"unknown column map {column_map!r}: {exc} (or pass a callable row -> sample, or a "
                "{schema_key: column} dict)"
            ) from None
        return spec.convert, spec
    if callable(column_map):
        return column_map, None
    if isinstance(column_map, Mapping):
        bad = [k for k in column_map if k not in SCHEMA_KEYS]
        if bad:
            raise ValueError(f"column_map keys must be schema keys {SCHEMA_KEYS}, got {bad}")
        mapping = dict(column_map)

        def conv(row):
            out = dict(row)
            for key, col in mapping.items():
                cols = list(col) if isinstance(col, (list, tuple)) else [col]
                missing = [c for c in cols if c not in row]
                if missing:
                    raise ValueError(f"column_map: column {missing[0]!r} (for {key!r}) not in row keys {sorted(row)}")
                # a list of columns gathers them into one list (options spread over columns, e.g. a CSV)
                out[key] = [row[c] for c in cols] if isinstance(col, (list, tuple)) else row[col]
            return out

        return conv, None
    raise ValueError(f"column_map must be None, a name, a callable or a dict, got {type(column_map).__name__}")


_LOCAL_BUILDERS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def _read_json_rows(path: str) -> list[dict]:
    """Rows of a ``.json``/``.jsonl`` file: one JSON array of objects, or one object per line."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not all(isinstance(row, Mapping) for row in data):
            raise ValueError(f"{path}: a JSON array of samples must hold objects only (one per sample).")
        return list(data)
    return _read_jsonl(path)


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    return rows


def _pick_split(ds, split, spec: HubDataset | None, where: str):
    """A ``DatasetDict`` -> one split (``split``, else the entry's default split)."""
    split = split or (spec.default_split if spec else None)
    if split is None:
        raise ValueError(f"{where} has splits {list(ds)}: pass split=...")
    if split not in ds:
        raise ValueError(f"{where} has no split {split!r}; available: {list(ds)}")
    return ds[split], split


def _load_local_dir(path: str, split, spec):
    datasets = require("datasets", f"Loading the dataset directory {path!r}")

    if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
        ds = datasets.load_from_disk(path)  # Dataset.save_to_disk / DatasetDict.save_to_disk
        if isinstance(ds, datasets.DatasetDict):
            ds, split = _pick_split(ds, split, spec, repr(path))
        return ds, split
    # a folder of data files (e.g. a hub snapshot of parquet files): ``datasets`` infers the splits
    dd = datasets.load_dataset(path)
    return _pick_split(dd, split, spec, repr(path))


def _load_hub(spec: HubDataset, key: str, split):
    datasets = require("datasets", f"Loading the hub dataset {key!r}")

    if spec.config_hint and spec.name is None:
        raise ValueError(spec.config_hint)
    split = split or spec.default_split
    if split is None:
        raise ValueError(f"{key} ({spec.path}) needs split=..., one of {list(spec.splits)}")
    kwargs = {"revision": spec.revision} if spec.revision else {}
    try:
        ds = datasets.load_dataset(spec.path, spec.name, split=split, **kwargs)
    except RuntimeError as exc:
        if "scripts are no longer supported" in str(exc):
            raise RuntimeError(
                f"{spec.path} ships a loading script, which datasets>=4 refuses ({exc}). Load its parquet "
                f"export with datasets.load_dataset({spec.path!r}, revision='refs/convert/parquet') and pass "
                f"the result with column_map={key!r}"
            ) from exc
        raise
    return ds, split


def _columns_of(source_rows, ds) -> list[str]:
    if ds is not None:
        return list(ds.column_names)
    return sorted(source_rows[0]) if source_rows and isinstance(source_rows[0], Mapping) else []


def _check_columns(spec: HubDataset, key: str, available: list[str]) -> None:
    missing = []
    for col in spec.columns:
        alts = col if isinstance(col, tuple) else (col,)
        if not any(a in available for a in alts):
            missing.append(" or ".join(alts))
    if missing:
        raise ValueError(
            f"{key}: expected column(s) {missing} are missing; available columns: {sorted(available)}"
            + (f". {spec.note}" if spec.note else "")
        )


def _convert_rows(
    rows: list, convert: Callable, spec: HubDataset | None, key: str, split=None, columns: list[str] | None = None
) -> list[dict]:
    """Run the (registry or user) converter over ``rows``, counting skipped rows per reason."""
    if spec is not None and convert is spec.convert:
        if columns is not None and rows:
            _check_columns(spec, key, columns)
        if spec.prepare is not None:
            rows = spec.prepare(rows)
    out, skipped = [], Counter()
    for i, row in enumerate(rows):
        try:
            sample = convert(row)
        except SkipRow as skip:
            skipped[skip.reason] += 1
            continue
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            rid = row.get("id", row.get("idx")) if isinstance(row, Mapping) else None
            cols = sorted(row) if isinstance(row, Mapping) else type(row).__name__
            detail = f"no column/key {exc.args[0]!r}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            raise ValueError(
                f"{key}: row {i} (id {rid!r}) could not be converted ({detail}); row columns: {cols}"
            ) from exc
        if isinstance(sample, dict) and sample.get("id") in (None, ""):
            sample["id"] = str(i)  # the row's position, stable whether or not other rows were skipped
        out.append(sample)
    if skipped:
        where = f"{key}" + (f" split {split!r}" if split else "")
        detail = ", ".join(f"{reason}: {n}" for reason, n in skipped.most_common())
        msg = f"{where}: skipped {sum(skipped.values())} of {len(rows)} rows ({detail})"
        if not out and set(skipped) == {UNLABELLED}:
            labelled = [s for s in (spec.splits if spec else ()) if s != "test"]
            raise ValueError(
                f"{where}: all {len(rows)} rows are unlabelled (a hidden test split has no gold labels); "
                f"use a labelled split" + (f", e.g. {labelled}" if labelled else "")
            )
        warnings.warn(msg, SkippedRowsWarning, stacklevel=3)
        logger.warning(msg)
    return out


def load_samples(source, column_map=None, split: str | None = None, config: str | None = None) -> list[dict]:
    """Load samples from a list of dicts, a JSONL file, a local dataset, a ``datasets.Dataset`` or the hub.

    ``source``:
      * ``list[dict]`` - used as is;
      * ``str`` path to an existing ``.jsonl``/``.json`` file (one JSON object per line), a
        ``.parquet`` file, or a folder written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``
        (or holding data files, e.g. a parquet snapshot of a hub repo);
      * ``datasets.Dataset`` (or a ``DatasetDict`` together with ``split``);
      * ``str`` naming a hub source: a key of :data:`HUB_COLUMN_MAPS`, an alias, a repo path held by
        one entry, or ``bigbench:<task>`` / ``mmlu:<subject>`` (repo, config and converter come from
        the registry), or any other ``owner/name`` repo (then pass ``column_map``).
    ``column_map``: a registry name (its converter, column checks and skip rules apply to a local
    copy exactly as to the hub), a callable ``row -> sample`` or a ``{schema_key: column}`` dict.
    ``split``: for hub sources and ``DatasetDict``s; default: the entry's default split (``train``).
    ``config``: the dataset configuration of a hub repo that is not in the registry (registry entries know theirs).
    Local files: ``.jsonl``, ``.json`` (JSON lines or one array of objects), ``.csv``, ``.tsv``, ``.parquet`` and
    ``.arrow`` (the last four read by ``datasets``); a ``{schema_key: column}`` map may give ``options`` as a list of
    columns (e.g. ``{"options": ["A", "B", "C", "D"]}`` for a CSV with one column per option).

    Rows without a gold label (hub test splits: ``""``/``-1``) and rows a converter cannot use
    (free-form BIG-Bench rows, ...) are skipped and counted in one :class:`SkippedRowsWarning`; a
    split with no labelled row at all is an error. The result is validated (see :func:`validate_samples`).
    """
    convert, spec = _resolve_column_map(column_map)
    key = column_map if isinstance(column_map, str) else None
    ds = None
    if isinstance(source, (list, tuple)):
        rows = list(source)
    elif isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        path = os.fspath(source)
        builder = _LOCAL_BUILDERS.get(os.path.splitext(path)[1].lower())
        if builder is not None:  # csv / tsv / parquet / arrow: read by `datasets`, as load_dataset would
            datasets = require("datasets", f"Reading {path!r}")

            kwargs = {"delimiter": "\t"} if path.lower().endswith(".tsv") else {}
            ds = datasets.load_dataset(builder, data_files=path, split="train", **kwargs)
        else:
            rows = _read_json_rows(path)
    elif isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        ds, split = _load_local_dir(os.fspath(source), split, spec)
    elif isinstance(source, str):
        if source.endswith((".jsonl", ".json", *_LOCAL_BUILDERS)):
            raise ValueError(f"file not found: {source!r}")
        src_spec = hub_dataset(source, strict="/" not in source)
        if src_spec is not None:
            if source not in HUB_COLUMN_MAPS and ":" not in source:
                logger.info("%s resolves to the registry entry at %s (config %s)", source, src_spec.path, src_spec.name)
            if spec is None and convert is None:
                convert, spec = src_spec.convert, src_spec
            key = key or source
            ds, split = _load_hub(src_spec, source, split)
        else:
            datasets = require("datasets", f"Loading the hub dataset {source!r}")
            split = split or (spec.default_split if spec else None) or "train"
            ds = datasets.load_dataset(source, config, split=split)
    else:
        try:
            import datasets
        except ImportError:  # pragma: no cover
            datasets = None
        if datasets is not None and isinstance(source, datasets.DatasetDict):
            source, split = _pick_split(source, split, spec, "a DatasetDict")
        if datasets is not None and isinstance(source, datasets.Dataset):
            ds = source
        else:
            raise ValueError(
                f"unsupported source type {type(source).__name__}; pass a list of dicts, a JSONL "
                "path, a datasets.Dataset or a hub dataset name"
            )
    if ds is not None:
        rows = list(ds)
    if convert is not None:
        rows = _convert_rows(rows, convert, spec, key or "column_map", split, columns=_columns_of(rows, ds))
    return validate_samples(rows)


def save_jsonl(samples: Iterable[Mapping[str, Any]], path: str) -> None:
    """Write samples as JSONL (the format :func:`load_samples` reads)."""
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(dict(s), ensure_ascii=False) + "\n")
