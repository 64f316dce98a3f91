"""The seeded suite of the offline RoMA miniature: eight attribute skills over one set of creatures, and a cue shift.

The world is a bestiary: 16 nonce creatures (``zefi``, ``tomu``, ...) and eight *skills*, each an attribute of a
creature (its colour, its food, its home, ...). The seed decides every creature's attributes. A question names the
skill in plain English (``what color is the zefi ?``) and the creature; the answer is one word of the skill's own
answer space (disjoint across skills). Because every skill asks about the *same* creatures, the creature word alone
does not say what to answer: the model has to apply the right skill, and pretraining puts each skill's knowledge in
its own experts (routing supervision, then released; :mod:`roma_peft.benchmark.pretrain`).

**Cue words.** Every skill also has twelve nonce *jargon* words. In pretraining a question is often preceded by two
jargon words of its own skill (``mabo tuka . what color is the zefi ?``), and *bare* questions name no skill at all
(``mabo tuka . tell me about the zefi .``): there the jargon is the only way to know the skill, so the router learns
to read it. Jargon and wording always agree in pretraining.

**The shift** (``swap_cue``, the only style of ``dev`` / ``test``): six jargon words (``N_SHIFT_CUES``; two until v3)
of *another* skill. The question still says plainly what is asked (``kelo rine ... . what color is the zefi ?``:
colour, gold = the zefi's colour)
and its sentence embedding is dominated by that English wording, while the router gets conflicting evidence. Items
record ``cue_skill``. Whether the errors this causes are routing errors that routing can fix, whether the sentence
embedding knows the task and whether a router can learn the repair is measured, not assumed (``roma-peft diagnose``;
``docs/benchmarks.md``, premise table).

``generate_suite(seed)`` returns ``{"pretrain", "train", "dev", "test"}``. Everything except ``"pretrain"`` follows
the shared sample schema (``id``, ``question``, ``options`` (4), ``label``, ``task``) plus ``style``, ``shift``,
``fact`` (the creature), ``cue_skill``. Pretraining items carry ``text`` = ``format_prompt(question) + " " + gold``,
exactly the scoring format.

Disjointness (asserted at generation time, tested in ``tests/test_suite.py``): every skill's creatures are split once
into pools ``train`` / ``dev`` / ``test`` (6 / 3 / 7); all facts are pretrained (a model must know a fact to be
asked about it), but the items of a split only ask about facts of that split's pool; ``swap_cue`` never occurs in
pretraining; no ``test`` question string occurs in ``pretrain``, ``train`` or ``dev``; ids are unique across splits.
"""

from __future__ import annotations

import random
from pathlib import Path

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"

SKILLS = ("color", "food", "home", "material", "sound", "legs", "language", "capital")
ID_STYLES = ("s0", "s1", "s2", "s3", "s4")
BARE_STYLES = ("b0", "b1", "b2")
SHIFT_STYLES = ("swap_cue",)
N_OPTIONS = 4
N_CUES = 2  # jargon words in front of a pretraining / in-distribution question
N_SHIFT_CUES = 6  # jargon words of another skill in front of a shifted question (2 until v3: docs/benchmark-suite.md)
SUITE_VERSION = 2

# ----------------------------------------------------------------------------------------------------
# fixed lexicon (independent of the seed, so one tokenizer covers every seed's suite)
# ----------------------------------------------------------------------------------------------------
_LEXICON_SEED = 20241201
_N_CREATURES = 16
_N_CUE_WORDS = 12

ANSWERS: dict[str, tuple[str, ...]] = {
    "color": (
        "red",
        "blue",
        "green",
        "yellow",
        "black",
        "white",
        "brown",
        "purple",
        "orange",
        "pink",
        "grey",
        "silver",
    ),
    "food": ("bread", "rice", "fish", "grass", "seeds", "honey", "fruit", "meat", "corn", "leaves", "milk", "nuts"),
    "home": (
        "forest",
        "river",
        "desert",
        "mountain",
        "cave",
        "island",
        "lake",
        "swamp",
        "valley",
        "meadow",
        "ocean",
        "jungle",
    ),
    "material": ("wood", "stone", "iron", "glass", "clay", "paper", "wool", "silk", "copper", "bone", "sand", "ice"),
    "sound": ("bark", "hiss", "roar", "chirp", "hum", "buzz", "click", "growl", "howl", "whistle", "croak", "squeak"),
    "legs": tuple(str(i) for i in range(12)),
    "language": (),  # nonce language names, from the lexicon
    "capital": (),  # nonce city names, from the lexicon
}

TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": (
        "what color is the {x} ?",
        "which color does the {x} have ?",
        "the color of the {x} is ?",
        "name the color of the {x} .",
        "a {x} is usually which color ?",
    ),
    "food": (
        "what does the {x} eat ?",
        "which food does the {x} like to eat ?",
        "the favourite meal of the {x} is ?",
        "name the food that the {x} eats .",
        "a hungry {x} will eat what ?",
    ),
    "home": (
        "where does the {x} live ?",
        "in which place does the {x} make its home ?",
        "the home of the {x} is where ?",
        "name the place where the {x} lives .",
        "you can find a wild {x} living where ?",
    ),
    "material": (
        "what is the nest of the {x} made of ?",
        "which material does the {x} build with ?",
        "the {x} builds its nest from what ?",
        "name the material of the nest of the {x} .",
        "a {x} makes its nest out of which material ?",
    ),
    "sound": (
        "what sound does the {x} make ?",
        "which noise does the {x} make ?",
        "the call of the {x} sounds like ?",
        "name the sound of the {x} .",
        "when a {x} is angry , what sound does it make ?",
    ),
    "legs": (
        "how many legs does the {x} have ?",
        "count the legs of the {x} .",
        "the number of legs of the {x} is ?",
        "how many feet does a {x} walk on ?",
        "a {x} has how many legs ?",
    ),
    "language": (
        "what language does the {x} speak ?",
        "in which language does the {x} talk ?",
        "the language spoken by the {x} is ?",
        "name the language of the {x} .",
        "when a {x} talks , which language does it use ?",
    ),
    "capital": (
        "in which city does the {x} have its capital ?",
        "what is the capital city of the {x} kingdom ?",
        "the capital of the {x} kingdom is which city ?",
        "name the capital of the land of the {x} .",
        "the {x} people rule from which capital city ?",
    ),
}

BARE_TEMPLATES = ("tell me about the {x} .", "and what about the {x} ?", "the {x} ?")


def _template_words() -> set[str]:
    words: set[str] = set()
    for ts in list(TEMPLATES.values()) + [BARE_TEMPLATES]:
        for t in ts:
            words.update(w for w in t.split() if not w.startswith("{"))
    return words


def _make_lexicon() -> dict[str, list[str]]:
    """Pronounceable nonce words, fixed forever (seeded by a constant), disjoint from all other words."""
    rng = random.Random(_LEXICON_SEED)
    cons, vows = "bdfgklmnprstvz", "aeiou"
    taken = _template_words() | {w for ws in ANSWERS.values() for w in ws} | {"Question", "Answer"}
    sizes = {"creature": 60, "language": 12, "capital": 12}
    sizes.update({f"cue_{s}": _N_CUE_WORDS for s in SKILLS})
    out: dict[str, list[str]] = {}
    for kind, n in sizes.items():
        words: list[str] = []
        while len(words) < n:
            w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(2 if kind != "capital" else 3))
            if w not in taken:
                taken.add(w)
                words.append(w)
        out[kind] = words
    return out


LEXICON = _make_lexicon()
ANSWERS["language"] = tuple(LEXICON["language"])
ANSWERS["capital"] = tuple(LEXICON["capital"])
CUE_WORDS: dict[str, tuple[str, ...]] = {s: tuple(LEXICON[f"cue_{s}"]) for s in SKILLS}


def vocabulary() -> list[str]:
    """Every word any seed's suite can produce (used to build the word-level tokenizer)."""
    words = set(_template_words()) | {"Question", "Answer", ":", ".", ",", "?"}
    for ws in list(ANSWERS.values()) + [LEXICON["creature"]] + list(CUE_WORDS.values()):
        words.update(ws)
    return sorted(words)


def format_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


def shipped_model_path() -> Path:
    """Directory of the shipped tiny OLMoE (8 MoE layers, 16 experts, top-2; + tokenizer): world 0 of the benchmark,
    pretrained on this suite with seed 0 (``roma_peft.benchmark.pretrain``). The other worlds are pretrained on demand
    and cached (``pretrain.world_model_path``)."""
    return Path(__file__).resolve().parent / "assets" / "roma-mini-olmoe"


# ----------------------------------------------------------------------------------------------------
# the seeded world: each creature's attribute per skill
# ----------------------------------------------------------------------------------------------------
def _creatures(skill: str) -> list[str]:
    """The creatures every skill asks about (the same for all skills)."""
    return LEXICON["creature"][:_N_CREATURES]


def _build_world(rng: random.Random) -> dict[str, dict[str, str]]:
    """``world[skill][creature] = gold answer``; answers spread evenly over each skill's answer space."""
    world = {}
    for skill in SKILLS:
        space = list(ANSWERS[skill])
        golds = [space[i % len(space)] for i in range(_N_CREATURES)]
        rng.shuffle(golds)
        world[skill] = dict(zip(_creatures(skill), golds))
    return world


def _cues(rng: random.Random, skill: str, n: int = N_CUES) -> str:
    return " ".join(rng.sample(CUE_WORDS[skill], n)) + " ."


def _with_cues(question: str, cues: str) -> str:
    """Jargon goes in front of the question (behind it, right before ``Answer:``, it hardly disturbed the model:
    see the design history in ``docs/benchmark-suite.md``)."""
    return f"{cues} {question}"


def _options(rng: random.Random, skill: str, gold: str) -> tuple[list[str], int]:
    opts = rng.sample([w for w in ANSWERS[skill] if w != gold], N_OPTIONS - 1) + [gold]
    rng.shuffle(opts)
    return opts, opts.index(gold)


def _split_pools(rng: random.Random) -> dict[str, dict[str, list[str]]]:
    pools: dict[str, dict[str, list[str]]] = {"train": {}, "dev": {}, "test": {}}
    for skill in SKILLS:
        creatures = list(_creatures(skill))
        rng.shuffle(creatures)
        n_tr, n_dev = int(0.4 * len(creatures)), int(0.2 * len(creatures))
        parts = {"train": creatures[:n_tr], "dev": creatures[n_tr : n_tr + n_dev], "test": creatures[n_tr + n_dev :]}
        for split, cs in parts.items():
            pools[split][skill] = sorted(cs)
    return pools


def _item(rng: random.Random, world, skill: str, creature: str, style_idx: int, cue_skill) -> dict:
    question = TEMPLATES[skill][style_idx].format(x=creature)
    shift = cue_skill is not None and cue_skill != skill
    if cue_skill is not None:
        question = _with_cues(question, _cues(rng, cue_skill, N_SHIFT_CUES if shift else N_CUES))
    options, label = _options(rng, skill, world[skill][creature])
    return {
        "question": question,
        "options": options,
        "label": label,
        "task": skill,
        "style": SHIFT_STYLES[0] if shift else ID_STYLES[style_idx],
        "shift": shift,
        "fact": creature,
        "cue_skill": cue_skill,
    }


def generate_suite(
    seed: int = 0,
    n_train_shift_per_skill: int = 120,
    n_dev_per_skill: int = 60,
    n_test_per_skill: int = 200,
    pretrain_cue_copies: int = 2,
) -> dict[str, list[dict]]:
    """Deterministic suite for ``seed``: ``{"pretrain", "train", "dev", "test"}`` (see the module docstring).

    ``pretrain``: every fact in the 5 in-distribution styles, plain and ``pretrain_cue_copies`` times with its own
    skill's jargon, and in the bare styles with its own jargon. ``train``: the train-pool facts in the 5 styles
    (alternately plain and with own jargon) + ``n_train_shift_per_skill`` shifted items per skill; ``dev`` /
    ``test``: shifted items on the dev / test pools.
    """
    rng = random.Random(f"roma-suite-v{SUITE_VERSION}-{seed}")
    world = _build_world(rng)
    pools = _split_pools(rng)

    out: dict[str, list[dict]] = {"pretrain": [], "train": [], "dev": [], "test": []}

    def pre(question: str, skill: str, creature: str, style: str) -> None:
        gold = world[skill][creature]
        out["pretrain"].append(
            {
                "text": f"{format_prompt(question)} {gold}",
                "question": question,
                "answer": gold,
                "task": skill,
                "style": style,
                "shift": False,
                "fact": creature,
            }
        )

    for skill in SKILLS:
        for creature in _creatures(skill):
            for si, style in enumerate(ID_STYLES):
                q = TEMPLATES[skill][si].format(x=creature)
                pre(q, skill, creature, style)
                for _ in range(pretrain_cue_copies):
                    pre(_with_cues(q, _cues(rng, skill)), skill, creature, style)
            for bi, style in enumerate(BARE_STYLES):
                pre(_with_cues(BARE_TEMPLATES[bi].format(x=creature), _cues(rng, skill)), skill, creature, style)

    for skill in SKILLS:
        for creature in pools["train"][skill]:
            for si in range(len(ID_STYLES)):
                cue = skill if si % 2 else None
                out["train"].append(_item(rng, world, skill, creature, si, cue))

    seen = {it["question"] for it in out["pretrain"]} | {it["question"] for it in out["train"]}
    for split, n in (("train", n_train_shift_per_skill), ("dev", n_dev_per_skill), ("test", n_test_per_skill)):
        for skill in SKILLS:
            others = [s for s in SKILLS if s != skill]
            made, tries = 0, 0
            while made < n:
                tries += 1
                if tries > 200 * n:
                    raise RuntimeError(f"cannot draw {n} distinct shifted {skill} items for {split}")
                item = _item(
                    rng,
                    world,
                    skill,
                    rng.choice(pools[split][skill]),
                    rng.randrange(len(ID_STYLES)),
                    others[made % len(others)],
                )
                if item["question"] in seen:
                    continue
                seen.add(item["question"])
                out[split].append(item)
                made += 1

    for split, items in out.items():
        prefix = {"pretrain": "pre", "train": "tr", "dev": "dev", "test": "te"}[split]
        for i, it in enumerate(items):
            it["id"] = f"{prefix}-{seed}-{i:05d}"
    _check(out)
    return out


def _check(suite: dict[str, list[dict]]) -> None:
    ids = [it["id"] for items in suite.values() for it in items]
    assert len(ids) == len(set(ids)), "ids not unique"
    test_q = {it["question"] for it in suite["test"]}
    for split in ("pretrain", "train", "dev"):
        assert not test_q & {it["question"] for it in suite[split]}, f"test questions leak into {split}"
    assert not any(it["style"] in SHIFT_STYLES for it in suite["pretrain"]), "shifted style in pretraining"
    facts = {s: {(it["task"], it["fact"]) for it in suite[s]} for s in ("train", "dev", "test")}
    assert not (facts["test"] & facts["train"] or facts["test"] & facts["dev"] or facts["dev"] & facts["train"])
    for split in ("train", "dev", "test"):
        for it in suite[split]:
            assert len(it["options"]) == N_OPTIONS and len(set(it["options"])) == N_OPTIONS
            assert 0 <= it["label"] < N_OPTIONS


def summary(suite: dict[str, list[dict]]) -> dict[str, dict[str, int]]:
    """Counts per split: total / shifted."""
    return {s: {"n": len(v), "shift": sum(bool(it.get("shift")) for it in v)} for s, v in suite.items()}


if __name__ == "__main__":  # pragma: no cover
    import json

    s = generate_suite(0)
    print(json.dumps(summary(s)))
    for split in ("train", "dev", "test"):
        print(split, json.dumps(s[split][-1]))
