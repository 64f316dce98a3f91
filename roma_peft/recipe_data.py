"""The paper's data recipe: the 49k-sample training mix and the eight evaluation benchmarks.

The paper (RoMA, Appendix A.1/A.2) trains routers on 49,000 samples::

    BIG-Bench 10k, SuperGLUE 10k, CommonsenseQA 8k, SocialIQA 8k,
    OpenBookQA 3k, SciQ 3k, MultiRC 4k, KnowRef 3k

and evaluates on MMLU, HellaSwag, PIQA, ARC-Challenge, ARC-Easy, WinoGrande, BoolQ and GSM8K.
It does not say which rows, which BIG-Bench/SuperGLUE tasks, or how the counts were drawn; the
choices made here are listed in ``docs/data.md``. Every source is loaded through
:func:`roma_peft.data.load_samples` and the registry :data:`roma_peft.data.HUB_COLUMN_MAPS`.

:func:`paper_training_mix` draws each source's count with its own seeded permutation, so the same
seed gives the same ids, another seed another sample, a smaller count a subset of a larger one
(nested data fractions), and changing one source's count leaves the others' rows unchanged.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .data import hub_dataset, load_samples

logger = logging.getLogger(__name__)

PAPER_COUNTS: dict[str, int] = {
    "bigbench": 10_000,
    "super_glue": 10_000,
    "commonsense_qa": 8_000,
    "social_i_qa": 8_000,
    "openbookqa": 3_000,
    "sciq": 3_000,
    "multirc": 4_000,
    "knowref": 3_000,
}
"""Samples per training source (paper Figure 4 / 11): 49,000 in all."""

BIGBENCH_EXCLUDED: dict[str, str] = {
    "cifar10_classification": "image pixels as text (thousands of tokens per row)",
    "mnist_ascii": "ASCII-art digits (thousands of tokens per row)",
    "social_iqa": "a copy of SocialIQA, already its own source",
    "arithmetic": "math (the paper keeps math out of training: GSM8K is its OOD benchmark)",
    "elementary_math_qa": "math word problems (GSM8K is the paper's OOD benchmark)",
    "mathematical_induction": "math",
    "identify_math_theorems": "math",
    "unit_conversion": "arithmetic on units (math)",
    "unit_interpretation": "arithmetic on units (math)",
    "intersect_geometry": "computing geometric intersections (math)",
}
"""lm-eval multiple-choice BIG-Bench tasks left out of the default mix, with the reason."""

_LM_EVAL_BIGBENCH_MC = (
    "abstract_narrative_understanding",
    "anachronisms",
    "analogical_similarity",
    "analytic_entailment",
    "arithmetic",
    "authorship_verification",
    "bbq_lite_json",
    "causal_judgment",
    "cause_and_effect",
    "checkmate_in_one",
    "cifar10_classification",
    "code_line_description",
    "color",
    "common_morpheme",
    "conceptual_combinations",
    "contextual_parametric_knowledge_conflicts",
    "crash_blossom",
    "crass_ai",
    "cryobiology_spanish",
    "cs_algorithms",
    "dark_humor_detection",
    "date_understanding",
    "disambiguation_qa",
    "discourse_marker_prediction",
    "dyck_languages",
    "elementary_math_qa",
    "emoji_movie",
    "emojis_emotion_prediction",
    "empirical_judgments",
    "english_proverbs",
    "english_russian_proverbs",
    "entailed_polarity",
    "entailed_polarity_hindi",
    "epistemic_reasoning",
    "evaluating_information_essentiality",
    "fact_checker",
    "fantasy_reasoning",
    "figure_of_speech_detection",
    "formal_fallacies_syllogisms_negation",
    "general_knowledge",
    "geometric_shapes",
    "goal_step_wikihow",
    "gre_reading_comprehension",
    "hhh_alignment",
    "hindu_knowledge",
    "hinglish_toxicity",
    "human_organs_senses",
    "hyperbaton",
    "identify_math_theorems",
    "identify_odd_metaphor",
    "implicatures",
    "implicit_relations",
    "intent_recognition",
    "international_phonetic_alphabet_nli",
    "intersect_geometry",
    "irony_identification",
    "kanji_ascii",
    "kannada",
    "key_value_maps",
    "known_unknowns",
    "language_identification",
    "logic_grid_puzzle",
    "logical_args",
    "logical_deduction",
    "logical_fallacy_detection",
    "logical_sequence",
    "mathematical_induction",
    "metaphor_boolean",
    "metaphor_understanding",
    "misconceptions",
    "misconceptions_russian",
    "mnist_ascii",
    "moral_permissibility",
    "movie_dialog_same_or_different",
    "movie_recommendation",
    "multiemo",
    "navigate",
    "nonsense_words_grammar",
    "novel_concepts",
    "odd_one_out",
    "parsinlu_qa",
    "penguins_in_a_table",
    "periodic_elements",
    "persian_idioms",
    "phrase_relatedness",
    "physical_intuition",
    "physics",
    "play_dialog_same_or_different",
    "presuppositions_as_nli",
    "question_selection",
    "real_or_fake_text",
    "reasoning_about_colored_objects",
    "riddle_sense",
    "ruin_names",
    "salient_translation_error_detection",
    "sentence_ambiguity",
    "similarities_abstraction",
    "simple_ethical_questions",
    "snarks",
    "social_iqa",
    "social_support",
    "sports_understanding",
    "strange_stories",
    "strategyqa",
    "suicide_risk",
    "swahili_english_proverbs",
    "swedish_to_german_proverbs",
    "symbol_interpretation",
    "temporal_sequences",
    "timedial",
    "tracking_shuffled_objects",
    "understanding_fables",
    "undo_permutation",
    "unit_conversion",
    "unit_interpretation",
    "vitaminc_fact_verification",
    "what_is_the_tao",
    "which_wiki_edit",
    "winowhy",
)
"""The 119 BIG-Bench tasks lm-eval (0.4.x, ``tasks/bigbench/multiple_choice``) runs as multiple choice."""

BIGBENCH_TASKS: tuple[str, ...] = tuple(t for t in _LM_EVAL_BIGBENCH_MC if t not in BIGBENCH_EXCLUDED)
"""Default BIG-Bench tasks of the mix: lm-eval's multiple-choice list minus :data:`BIGBENCH_EXCLUDED`."""

SUPERGLUE_TASKS: tuple[str, ...] = ("boolq", "cb", "copa", "rte", "wic", "wsc")
"""Default SuperGLUE tasks of the mix. MultiRC is left out (the paper lists it as its own 4k source;
drawing it twice would double its weight and could repeat questions); ReCoRD is left out (a whole
news article per row and 10+ entity-filled options each: one row costs as much to score as dozens of
others, and its answers come in several spellings). Both stay loadable as ``multirc`` and
``super_glue:record``."""


@dataclass(frozen=True)
class Benchmark:
    """One of the paper's evaluation benchmarks: registry name, split, and the size the paper reports."""

    source: str
    split: str
    paper_size: int
    note: str = ""


PAPER_BENCHMARKS: dict[str, Benchmark] = {
    "mmlu": Benchmark("mmlu", "test", 14_042, "cais/mmlu 'all'; cloze form (lm-eval mmlu_continuation)"),
    "hellaswag": Benchmark("hellaswag", "validation", 10_042, "the test split is unlabelled"),
    "piqa": Benchmark("piqa", "validation", 1_838, "the test split is unlabelled"),
    "arc_challenge": Benchmark("arc_challenge", "test", 1_172),
    "arc_easy": Benchmark("arc_easy", "test", 2_376),
    "winogrande": Benchmark("winogrande", "validation", 1_267, "winogrande_xl; the test split is unlabelled"),
    "boolq": Benchmark(
        "boolq", "validation", 3_227, "the validation split has 3,270 rows; the paper's 3,227 is not explained"
    ),
    "gsm8k": Benchmark(
        "gsm8k", "test", 1_000, "the test split has 1,319 rows; the paper's 1,000-row subset is not specified"
    ),
}
"""The eight benchmarks (paper Figure 12 / Appendix A.2), reserved for evaluation."""

Loader = Callable[[str, str], list]
"""``loader(name, split) -> samples`` for one registry name (``"commonsense_qa"``, ``"bigbench:navigate"``)."""


def hub_loader(name: str, split: str) -> list[dict]:
    """The default loader: the hub, through the registry."""
    return load_samples(name, split=split)


def load_benchmark(name: str, loader: Loader | None = None) -> list[dict]:
    """Samples of one of :data:`PAPER_BENCHMARKS` on its evaluation split."""
    if name not in PAPER_BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; the paper's eight: {list(PAPER_BENCHMARKS)}")
    b = PAPER_BENCHMARKS[name]
    return (loader or hub_loader)(b.source, b.split)


def source_members(source: str, bigbench_tasks=None, superglue_tasks=None) -> tuple[str, ...]:
    """The registry names one mix source is drawn from (a family has several)."""
    if source == "bigbench":
        tasks = BIGBENCH_TASKS if bigbench_tasks is None else tuple(bigbench_tasks)
        return tuple(f"bigbench:{t}" for t in tasks)
    if source == "super_glue":
        tasks = SUPERGLUE_TASKS if superglue_tasks is None else tuple(superglue_tasks)
        for t in tasks:
            hub_dataset(f"super_glue:{t}")  # unknown task -> error listing the known names
        return tuple(f"super_glue:{t}" for t in tasks)
    hub_dataset(source)
    return (source,)


def allocate(count: int, sizes: Mapping[str, int]) -> dict[str, int]:
    """Split ``count`` over members as evenly as their sizes allow (water-filling).

    A member smaller than its share gives all its rows and the rest is spread over the others, so
    a family of tasks of very different sizes (SuperGLUE's CB has 250 rows, BoolQ 9,427) is balanced
    instead of dominated by its largest task. Remainders go to members in the given order. The
    total is ``min(count, sum(sizes))``.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count >= sum(sizes.values()):
        return dict(sizes)
    lo, hi = 0, max(sizes.values())  # the largest level L with sum(min(size, L)) <= count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in sizes.values()) <= count:
            lo = mid
        else:
            hi = mid - 1
    alloc = {m: min(n, lo) for m, n in sizes.items()}
    rest = count - sum(alloc.values())  # fewer than the members above the level: one more each
    for m, n in sizes.items():
        if rest and n > lo:
            alloc[m] += 1
            rest -= 1
    return alloc


class MixShortfallWarning(UserWarning):
    """A mix source has fewer labelled rows than the count asked for."""


def _permutation(n: int, seed: int, member: str) -> list[int]:
    # a string seed is hashed with sha512 by ``random``: stable across runs and Python versions
    order = list(range(n))
    random.Random(f"roma-mix|{seed}|{member}").shuffle(order)
    return order


def paper_training_mix(
    seed: int = 0,
    counts: Mapping[str, int] | None = None,
    loader: Loader | None = None,
    *,
    split: str = "train",
    bigbench_tasks=None,
    superglue_tasks=None,
    strict: bool = False,
    shuffle: bool = True,
) -> list[dict]:
    """The paper's training mix: ``counts[source]`` samples from each source (default :data:`PAPER_COUNTS`).

    ``loader(name, split)`` returns the samples of one registry name (default: the hub via
    :func:`load_samples`; tests pass local copies). Families (``bigbench``, ``super_glue``) are
    split over their tasks with :func:`allocate`. Each member is drawn with its own permutation
    seeded by ``(seed, member)``. Every sample gets ``id = "<member>-<original id>"``,
    ``task = <member>`` (e.g. ``bigbench:navigate``, ``super_glue:cb``, ``sciq``) and
    ``source = <source>``. A source with fewer labelled rows than asked gives all it has and a
    :class:`MixShortfallWarning` with the numbers (``strict=True``: a ``ValueError`` instead).
    ``shuffle``: interleave the sources (seeded); otherwise they come in ``counts`` order.
    """
    counts = dict(PAPER_COUNTS if counts is None else counts)
    loader = loader or hub_loader
    out: list[dict] = []
    for source, count in counts.items():
        members = source_members(source, bigbench_tasks, superglue_tasks)
        if count <= 0:
            continue
        pools = {m: loader(m, split) for m in members}
        alloc = allocate(count, {m: len(p) for m, p in pools.items()})
        got = sum(alloc.values())
        if got < count:
            sizes = ", ".join(f"{m}: {len(p)}" for m, p in pools.items()) if len(pools) > 1 else ""
            msg = (
                f"{source}: asked for {count} samples but only {got} labelled rows are available "
                f"in split {split!r}" + (f" ({sizes})" if sizes else "") + f"; using all {got}"
            )
            if strict:
                raise ValueError(msg)
            warnings.warn(msg, MixShortfallWarning, stacklevel=2)
            logger.warning(msg)
        for m, pool in pools.items():
            for i in sorted(_permutation(len(pool), seed, m)[: alloc[m]]):
                s = dict(pool[i])
                s["id"] = f"{m}-{s['id']}"
                s["task"] = m
                s["source"] = source
                out.append(s)
    if shuffle:
        random.Random(f"roma-mix|{seed}|order").shuffle(out)
    seen: set = set()
    for s in out:
        if s["id"] in seen:
            raise ValueError(f"duplicate sample id {s['id']!r} in the mix: the source has non-unique ids")
        seen.add(s["id"])
    return out
