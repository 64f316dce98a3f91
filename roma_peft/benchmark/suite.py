"""The seeded multi-skill multiple-choice suite of the offline RoMA miniature.

Eight word-level skills over a synthetic world, each asked in five in-distribution paraphrase styles,
plus three *shifted* styles that borrow another skill's wording (one or two solved questions of other
skills placed around the real question). Shifted styles never occur in pretraining; they are what the
router post-training has to cope with.

``generate_suite(seed)`` returns ``{"pretrain", "train", "dev", "test"}``. Everything except
``"pretrain"`` follows the shared sample schema of ``docs/design.md`` (``id``, ``question``,
``options`` (4), ``label``, ``task``) plus ``style`` and ``shift``. Pretraining items carry ``text`` =
``format_prompt(question) + " " + gold`` so that pretraining and log-likelihood scoring see the same format.

Disjointness (asserted at generation time, tested in ``tests/test_suite.py``):

* the lexicon (all words) is fixed; the *seed* decides the world (which country has which capital, ...),
  the fact pools and every sampled item;
* every skill's facts are split once into disjoint pools ``train`` / ``dev`` / ``test`` (40/20/40 %).
  All facts are pretrained in the five in-distribution styles (a model must know them), but
  post-training and evaluation items of a split only ask about the facts of that split's pool
  (the solved "borrowed" questions inside a shifted item also come from that split's pools); items carry
  ``fact`` (and ``borrowed``/``borrowed_facts``) so this can be checked;
* shifted styles never appear in ``pretrain``; ``test`` and ``dev`` are entirely shifted;
  ``train`` holds in-distribution items and shifted items (so shifted samples have successful neighbours);
* no ``test`` question string occurs in ``pretrain``, ``train`` or ``dev``; ids are unique across splits.
"""

from __future__ import annotations

import random
from pathlib import Path

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"

SKILLS = ("capital", "antonym", "color", "category", "translate", "add_mod", "sequence", "compare")
ID_STYLES = ("s0", "s1", "s2", "s3", "s4")
SHIFT_STYLES = ("after_other", "before_other", "after_two")
N_OPTIONS = 4

# ----------------------------------------------------------------------------------------------------
# fixed lexicon (independent of the seed, so one tokenizer covers every seed's suite)
# ----------------------------------------------------------------------------------------------------
_LEXICON_SEED = 20240611
_N_ENT = 60

COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "purple")
GROUPS = ("fish", "bird", "tree", "tool", "fruit", "insect", "stone", "flower")
ENGLISH = (
    "house", "river", "apple", "window", "horse", "chair", "bread", "mountain", "cloud", "door",
    "garden", "candle", "bottle", "bridge", "mirror", "pencil", "basket", "ladder", "island", "forest",
    "hammer", "button", "kettle", "pillow", "rabbit", "castle", "wagon", "lantern", "anchor", "feather",
    "blanket", "tunnel", "harbor", "meadow", "saddle", "barrel", "needle", "jacket", "ribbon", "carpet",
    "violin", "compass", "market", "shadow", "valley", "engine", "helmet", "tower", "pocket", "rocket",
    "spoon", "camera", "letter", "garlic", "honey", "lemon", "planet", "statue", "temple", "thunder",
)
MAX_NUM = 40

TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": (
        "what is the capital of {x} ?",
        "which city is the capital of {x} ?",
        "the capital of {x} is which city ?",
        "name the capital city of {x} .",
        "{x} has its capital in which city ?",
    ),
    "antonym": (
        "what is the opposite of {x} ?",
        "which word means the opposite of {x} ?",
        "the antonym of {x} is ?",
        "give the antonym of the word {x} .",
        "{x} is the opposite of which word ?",
    ),
    "color": (
        "what color is a {x} ?",
        "which color does a {x} have ?",
        "the color of a {x} is ?",
        "name the color of the {x} .",
        "a {x} is usually which color ?",
    ),
    "category": (
        "what kind of thing is a {x} ?",
        "a {x} belongs to which group ?",
        "which group does the {x} belong to ?",
        "name the group of the {x} .",
        "the {x} is a kind of what ?",
    ),
    "translate": (
        "in zil , what does {x} mean ?",
        "translate the zil word {x} .",
        "what is the meaning of the zil word {x} ?",
        "the zil word {x} means what ?",
        "{x} in zil means which word ?",
    ),
    "add_mod": (
        "what is {a} plus {b} mod 10 ?",
        "add {a} and {b} , keep the last digit .",
        "{a} plus {b} modulo 10 equals ?",
        "compute {a} + {b} mod 10 .",
        "the sum of {a} and {b} mod 10 is ?",
    ),
    "sequence": (
        "what comes next : {a} {b} {c} ?",
        "continue the sequence {a} {b} {c} .",
        "{a} , {b} , {c} , then what ?",
        "the next number after {a} {b} {c} is ?",
        "which number follows {a} {b} {c} ?",
    ),
    "compare": (
        "which is the largest : {a} {b} {c} {d} ?",
        "find the biggest number among {a} {b} {c} {d} .",
        "of {a} {b} {c} {d} , which is the most ?",
        "pick the maximum of {a} {b} {c} {d} .",
        "the largest of {a} {b} {c} {d} is ?",
    ),
}


def _template_words() -> set[str]:
    words: set[str] = set()
    for ts in TEMPLATES.values():
        for t in ts:
            words.update(w for w in t.split() if not w.startswith("{"))
    return words


def _make_lexicon() -> dict[str, list[str]]:
    """Pronounceable nonce words, fixed forever (seeded by a constant), disjoint from all other words."""
    rng = random.Random(_LEXICON_SEED)
    cons, vows = "bdfgklmnprstvz", "aeiou"
    taken = _template_words() | set(COLORS) | set(GROUPS) | set(ENGLISH) | {"Question", "Answer", "zil"}
    out: dict[str, list[str]] = {}
    for kind in ("country", "city", "adjective", "object", "creature", "zilword"):
        words: list[str] = []
        while len(words) < _N_ENT:
            n_syl = 2 if kind != "zilword" else 3
            w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(n_syl))
            if w not in taken:
                taken.add(w)
                words.append(w)
        out[kind] = words
    return out


LEXICON = _make_lexicon()


def vocabulary() -> list[str]:
    """Every word any seed's suite can produce (used to build the word-level tokenizer)."""
    words = set(_template_words()) | {"Question", "Answer", "zil", ":", ".", ",", "?", "+"}
    words.update(COLORS, GROUPS, ENGLISH, (str(i) for i in range(MAX_NUM + 1)))
    for ws in LEXICON.values():
        words.update(ws)
    return sorted(words)


def format_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


def shipped_model_path() -> Path:
    """Directory of the shipped pretrained tiny OLMoE checkpoint (+ tokenizer)."""
    return Path(__file__).resolve().parent / "assets" / "roma-mini-olmoe"


# ----------------------------------------------------------------------------------------------------
# the seeded world: facts per skill. A fact = (slots for the template, gold answer, answer space)
# ----------------------------------------------------------------------------------------------------
def _build_world(rng: random.Random) -> dict[str, list[dict]]:
    L = LEXICON
    world: dict[str, list[dict]] = {}
    cities = L["city"][:]
    rng.shuffle(cities)
    world["capital"] = [{"x": c, "gold": cities[i], "space": L["city"]} for i, c in enumerate(L["country"])]
    adj = L["adjective"][:]
    rng.shuffle(adj)
    pairs = [(adj[2 * i], adj[2 * i + 1]) for i in range(len(adj) // 2)]
    ant = []
    for a, b in pairs:
        ant.append({"x": a, "gold": b, "space": L["adjective"]})
        ant.append({"x": b, "gold": a, "space": L["adjective"]})
    world["antonym"] = ant
    world["color"] = [{"x": o, "gold": rng.choice(COLORS), "space": list(COLORS)} for o in L["object"]]
    world["category"] = [{"x": o, "gold": rng.choice(GROUPS), "space": list(GROUPS)} for o in L["creature"]]
    eng = list(ENGLISH)
    rng.shuffle(eng)
    world["translate"] = [{"x": z, "gold": eng[i], "space": list(ENGLISH)} for i, z in enumerate(L["zilword"])]
    nums = [str(i) for i in range(MAX_NUM + 1)]
    digits = [str(i) for i in range(10)]
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    world["add_mod"] = [
        {"a": str(a), "b": str(b), "x": f"{a}+{b}", "gold": str((a + b) % 10), "space": digits}
        for a, b in pairs[:_N_ENT]
    ]
    seqs = [(a, d) for a in range(0, 16) for d in range(1, 9) if a + 3 * d <= MAX_NUM]
    rng.shuffle(seqs)
    world["sequence"] = [
        {"a": str(a), "b": str(a + d), "c": str(a + 2 * d), "x": f"{a},{d}", "gold": str(a + 3 * d), "space": nums}
        for a, d in seqs[:_N_ENT]
    ]
    cmp_facts, seen = [], set()
    while len(cmp_facts) < _N_ENT:
        q = tuple(rng.sample(range(MAX_NUM + 1), 4))
        if frozenset(q) in seen:
            continue
        seen.add(frozenset(q))
        a, b, c, d = (str(v) for v in q)
        cmp_facts.append(
            {"a": a, "b": b, "c": c, "d": d, "x": ",".join(sorted(map(str, q))), "gold": str(max(q)),
             "space": [a, b, c, d]}
        )
    world["compare"] = cmp_facts
    return world


def _question(skill: str, fact: dict, style_idx: int) -> str:
    return TEMPLATES[skill][style_idx].format(**{k: v for k, v in fact.items() if k in "xabcd"})


def _options(rng: random.Random, fact: dict, forbidden: set[str]) -> tuple[list[str], int]:
    gold = fact["gold"]
    if len(fact["space"]) == N_OPTIONS:  # compare: the options are the four numbers asked about
        opts = list(fact["space"])
        rng.shuffle(opts)
        return opts, opts.index(gold)
    pool = [w for w in dict.fromkeys(fact["space"]) if w != gold and w not in forbidden]
    opts = rng.sample(pool, N_OPTIONS - 1) + [gold]
    rng.shuffle(opts)
    return opts, opts.index(gold)


def _split_pools(rng: random.Random, world: dict[str, list[dict]]) -> dict[str, dict[str, list[dict]]]:
    pools: dict[str, dict[str, list[dict]]] = {"train": {}, "dev": {}, "test": {}}
    for skill, facts in world.items():
        idx = list(range(len(facts)))
        rng.shuffle(idx)
        n_tr, n_dev = int(0.4 * len(idx)), int(0.2 * len(idx))
        parts = {"train": idx[:n_tr], "dev": idx[n_tr:n_tr + n_dev], "test": idx[n_tr + n_dev:]}
        for split, ii in parts.items():
            pools[split][skill] = [facts[i] for i in sorted(ii)]
    return pools


def _shifted_item(rng: random.Random, skill: str, pool: dict[str, list[dict]], style: str) -> dict:
    fact = rng.choice(pool[skill])
    q_main = _question(skill, fact, rng.randrange(len(ID_STYLES)))
    others = [s for s in SKILLS if s != skill]
    n_other = 2 if style == "after_two" else 1
    borrowed = rng.sample(others, n_other)
    solved, forbidden, borrowed_facts = [], set(), []
    for b in borrowed:
        bf = rng.choice(pool[b])
        borrowed_facts.append(bf["x"])
        solved.append(f"{_question(b, bf, rng.randrange(len(ID_STYLES)))} {bf['gold']} .")
        forbidden.add(bf["gold"])
    if style == "before_other":
        question = f"{q_main} {solved[0]}"
    else:
        question = " ".join(solved + [q_main])
    if len(fact["space"]) == N_OPTIONS:
        forbidden = set()
    options, label = _options(rng, fact, forbidden)
    return {"question": question, "options": options, "label": label, "task": skill, "style": style,
            "shift": True, "fact": fact["x"], "borrowed": borrowed, "borrowed_facts": borrowed_facts}


def generate_suite(
    seed: int = 0,
    n_train_shift_per_skill: int = 200,
    n_dev_per_skill: int = 100,
    n_test_per_skill: int = 300,
    pretrain_repeats: int = 1,
) -> dict[str, list[dict]]:
    """Deterministic suite for ``seed``: ``{"pretrain", "train", "dev", "test"}`` (see module docstring).

    ``pretrain`` has every fact in every in-distribution style (``pretrain_repeats`` copies with fresh
    option draws are irrelevant for text, so repeats only duplicate; keep 1 and loop epochs instead).
    ``train`` = all train-pool facts in the 5 in-distribution styles + ``n_train_shift_per_skill``
    shifted items per skill; ``dev``/``test`` = shifted items on the dev/test pools.
    """
    rng = random.Random(f"roma-suite-{seed}")
    world = _build_world(rng)
    pools = _split_pools(rng, world)

    out: dict[str, list[dict]] = {"pretrain": [], "train": [], "dev": [], "test": []}
    for _ in range(pretrain_repeats):
        for skill in SKILLS:
            for fact in world[skill]:
                for si, style in enumerate(ID_STYLES):
                    q = _question(skill, fact, si)
                    out["pretrain"].append({"text": f"{format_prompt(q)} {fact['gold']}", "question": q,
                                            "answer": fact["gold"], "task": skill, "style": style,
                                            "shift": False, "fact": fact["x"]})

    for skill in SKILLS:
        for fact in pools["train"][skill]:
            for si, style in enumerate(ID_STYLES):
                options, label = _options(rng, fact, set())
                out["train"].append({"question": _question(skill, fact, si), "options": options,
                                     "label": label, "task": skill, "style": style, "shift": False,
                                     "fact": fact["x"]})

    seen = {it["question"] for it in out["pretrain"]} | {it["question"] for it in out["train"]}
    for split, n in (("train", n_train_shift_per_skill), ("dev", n_dev_per_skill), ("test", n_test_per_skill)):
        for skill in SKILLS:
            made, tries = 0, 0
            while made < n:
                tries += 1
                if tries > 200 * n:
                    raise RuntimeError(f"cannot draw {n} distinct shifted {skill} items for {split}")
                style = SHIFT_STYLES[made % len(SHIFT_STYLES)]
                item = _shifted_item(rng, skill, pools[split], style)
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
    facts = {s: {tf for it in suite[s] for tf in
                 [(it["task"], it["fact"])] + list(zip(it.get("borrowed", []), it.get("borrowed_facts", [])))}
             for s in ("train", "dev", "test")}
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
