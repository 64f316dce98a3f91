"""The sample schema shared by scoring, neighbours, the trainer and the benchmark.

A *sample* is a plain dict (see ``docs/design.md``)::

    {"id": "arc-17",                      # optional, defaults to the row index as a string
     "question": "Which gas do plants take in?",  # required, the task text WITHOUT the options
     "options": ["oxygen", "carbon dioxide"],     # multiple choice
     "label": 1,                                  # multiple choice: index of the gold option
     "answer": "carbon dioxide",                  # generative tasks (used when there are no options)
     "task": "arc_easy",                          # optional task/skill label
     "embed_text": "..."}                         # optional text to embed for neighbours

Why a dict and not a class: every consumer (scorer, neighbour builder, collator, benchmark) only
needs a handful of keys, users already hold their data as JSON rows, and a dict round-trips
through JSONL and ``datasets`` without conversion code.

Sources accepted by :func:`load_samples`: a list of dicts, a JSONL path, a ``datasets.Dataset``
or a hub dataset name (loaded with ``datasets.load_dataset``). Hub rows are mapped onto the schema
by the functions in :data:`HUB_COLUMN_MAPS` (CommonsenseQA, SocialIQA, OpenBookQA, SciQ, ARC,
BoolQ, PIQA), by a user callable, or by a ``{schema_key: column}`` dict.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

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
            raise ValueError(
                f"embed field {field!r} is missing or empty in sample {sample.get('id')!r}"
            )
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
                raise ValueError(
                    f"{where}: 'label' must be the integer index of the gold option, got {lab!r}"
                )
            lab = int(lab)
            if not 0 <= lab < len(opts):
                raise ValueError(
                    f"{where}: gold index label={lab} is out of range for {len(opts)} options"
                )
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
        rec = [str(s.get("id")), s.get("question"), s.get("options"), s.get("label"),
               s.get("answer"), s.get("embed_text")]
        h.update(json.dumps(rec, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# hub datasets


@dataclass(frozen=True)
class HubDataset:
    """Where a common dataset lives on the hub and how one row maps onto the schema."""

    path: str
    name: str | None
    convert: Callable[[Mapping[str, Any]], dict]
    default_split: str = "train"


def _letter_choices(row, question: str, task: str) -> dict:
    labels = list(row["choices"]["label"])
    return {"question": question, "options": list(row["choices"]["text"]),
            "label": labels.index(row["answerKey"]), "task": task}


def _commonsense_qa(row):
    return {"id": row.get("id"), **_letter_choices(row, row["question"], "commonsense_qa")}


def _openbookqa(row):
    return {"id": row.get("id"), **_letter_choices(row, row["question_stem"], "openbookqa")}


def _arc(task):
    def conv(row):
        return {"id": row.get("id"), **_letter_choices(row, row["question"], task)}
    return conv


def _social_i_qa(row):
    return {"question": f"{row['context']} {row['question']}",
            "options": [row["answerA"], row["answerB"], row["answerC"]],
            "label": int(row["label"]) - 1, "task": "social_i_qa",
            "embed_text": f"{row['context']} {row['question']}"}


def _sciq(row):
    # lm-eval's order: the three distractors, then the correct answer (gold index 3)
    return {"question": row["question"],
            "options": [row["distractor1"], row["distractor2"], row["distractor3"],
                        row["correct_answer"]],
            "label": 3, "task": "sciq"}


def _boolq(row):
    # the passage is context for the model; the question alone describes the task
    return {"question": f"{row['passage']}\nQuestion: {row['question']}?",
            "options": ["no", "yes"], "label": int(bool(row["answer"])), "task": "boolq",
            "embed_text": row["question"]}


def _piqa(row):
    return {"question": row["goal"], "options": [row["sol1"], row["sol2"]],
            "label": int(row["label"]), "task": "piqa"}


HUB_COLUMN_MAPS: dict[str, HubDataset] = {
    "commonsense_qa": HubDataset("tau/commonsense_qa", None, _commonsense_qa),
    "social_i_qa": HubDataset("allenai/social_i_qa", None, _social_i_qa),
    "openbookqa": HubDataset("allenai/openbookqa", "main", _openbookqa),
    "sciq": HubDataset("allenai/sciq", None, _sciq),
    "arc_easy": HubDataset("allenai/ai2_arc", "ARC-Easy", _arc("arc_easy")),
    "arc_challenge": HubDataset("allenai/ai2_arc", "ARC-Challenge", _arc("arc_challenge")),
    "boolq": HubDataset("google/boolq", None, _boolq),
    "piqa": HubDataset("ybisk/piqa", None, _piqa),
}
"""Short name -> hub location and row converter. ``load_samples("arc_easy", split="train")``
loads and maps in one call; ``load_samples(ds, column_map="arc_easy")`` maps a dataset the user
already loaded (e.g. from a local mirror)."""


def _resolve_column_map(column_map) -> Callable[[Mapping[str, Any]], dict] | None:
    if column_map is None:
        return None
    if callable(column_map):
        return column_map
    if isinstance(column_map, str):
        if column_map not in HUB_COLUMN_MAPS:
            raise ValueError(
                f"unknown column map {column_map!r}; known: {sorted(HUB_COLUMN_MAPS)} "
                "(or pass a callable row -> sample, or a {schema_key: column} dict)"
            )
        return HUB_COLUMN_MAPS[column_map].convert
    if isinstance(column_map, Mapping):
        bad = [k for k in column_map if k not in SCHEMA_KEYS]
        if bad:
            raise ValueError(f"column_map keys must be schema keys {SCHEMA_KEYS}, got {bad}")
        mapping = dict(column_map)

        def conv(row):
            out = dict(row)
            for key, col in mapping.items():
                if col not in row:
                    raise ValueError(f"column_map: column {col!r} (for {key!r}) not in row keys {sorted(row)}")
                out[key] = row[col]
            return out
        return conv
    raise ValueError(f"column_map must be None, a name, a callable or a dict, got {type(column_map).__name__}")


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


def load_samples(source, column_map=None, split: str | None = None) -> list[dict]:
    """Load samples from a list of dicts, a JSONL file, a ``datasets.Dataset`` or the hub.

    ``source``:
      * ``list[dict]`` - used as is;
      * ``str`` path to an existing ``.jsonl``/``.json`` file (one JSON object per line);
      * ``datasets.Dataset`` (or a ``DatasetDict`` together with ``split``);
      * ``str`` naming a hub dataset: a key of :data:`HUB_COLUMN_MAPS` (its path, config and
        converter are used) or any ``datasets.load_dataset`` path (then pass ``column_map``).
    ``column_map``: a :data:`HUB_COLUMN_MAPS` key, a callable ``row -> sample`` or a
    ``{schema_key: column}`` dict. The result is validated (see :func:`validate_samples`).
    """
    convert = _resolve_column_map(column_map)
    if isinstance(source, (list, tuple)):
        rows = list(source)
    elif isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        rows = _read_jsonl(os.fspath(source))
    elif isinstance(source, str):
        import datasets

        if source in HUB_COLUMN_MAPS:
            spec = HUB_COLUMN_MAPS[source]
            convert = convert or spec.convert
            ds = datasets.load_dataset(spec.path, spec.name, split=split or spec.default_split)
        else:
            if source.endswith((".jsonl", ".json")):
                raise ValueError(f"file not found: {source!r}")
            ds = datasets.load_dataset(source, split=split or "train")
        rows = list(ds)
    else:
        try:
            import datasets
        except ImportError:  # pragma: no cover
            datasets = None
        if datasets is not None and isinstance(source, datasets.DatasetDict):
            if split is None:
                raise ValueError(f"a DatasetDict needs split=..., one of {list(source)}")
            source = source[split]
        if datasets is not None and isinstance(source, datasets.Dataset):
            rows = list(source)
        else:
            raise ValueError(
                f"unsupported source type {type(source).__name__}; pass a list of dicts, a JSONL "
                "path, a datasets.Dataset or a hub dataset name"
            )
    if convert is not None:
        rows = [convert(r) for r in rows]
    return validate_samples(rows)


def save_jsonl(samples: Iterable[Mapping[str, Any]], path: str) -> None:
    """Write samples as JSONL (the format :func:`load_samples` reads)."""
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(dict(s), ensure_ascii=False) + "\n")
