"""The paper's training mix and benchmarks, on local copies in each dataset's real layout."""

import warnings
from collections import Counter

import pytest
from fixtures.hub_rows import build, dataset

from roma_peft.data import load_samples
from roma_peft.recipe_data import (
    BIGBENCH_EXCLUDED,
    BIGBENCH_TASKS,
    PAPER_BENCHMARKS,
    PAPER_COUNTS,
    SUPERGLUE_TASKS,
    MixShortfallWarning,
    allocate,
    load_benchmark,
    paper_training_mix,
    source_members,
)

BB = ("navigate", "snarks", "hyperbaton")
SG = ("boolq", "cb", "copa", "rte", "wic", "wsc")
# pool sizes of the local copies; super_glue:cb is small on purpose (250 rows on the hub)
SIZES = {
    "commonsense_qa": 30,
    "social_i_qa": 30,
    "openbookqa": 20,
    "sciq": 20,
    "multirc": 20,
    "knowref": 20,
    **{f"bigbench:{t}": 15 for t in BB},
    **{f"super_glue:{t}": 12 for t in SG},
    "super_glue:cb": 2,
}
SMALL = {
    "bigbench": 12,
    "super_glue": 18,
    "commonsense_qa": 8,
    "social_i_qa": 8,
    "openbookqa": 3,
    "sciq": 3,
    "multirc": 4,
    "knowref": 3,
}  # the paper's counts / 1000 (BIG-Bench, SuperGLUE larger to spread)


@pytest.fixture(scope="module")
def local_copies(tmp_path_factory):
    """One save_to_disk folder per registry name, with one unlabelled row appended where the hub has them."""
    root = tmp_path_factory.mktemp("hub")
    paths = {}
    for name, n in SIZES.items():
        ds, _ = build(name, n)
        if name == "commonsense_qa":  # an unlabelled row must never be drawn
            ds = dataset(name, list(ds) + [{**ds[0], "id": "blank", "answerKey": ""}])
        paths[name] = str(root / name.replace(":", "_"))
        ds.save_to_disk(paths[name])
    return paths


@pytest.fixture
def loader(local_copies):
    calls = []

    def load(name, split):
        calls.append((name, split))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_samples(local_copies[name], column_map=name)

    load.calls = calls
    return load


def mix(loader, seed=0, counts=SMALL, **kw):
    return paper_training_mix(seed, counts, loader, bigbench_tasks=BB, superglue_tasks=SG, **kw)


def test_paper_counts_and_defaults():
    assert PAPER_COUNTS == {
        "bigbench": 10_000,
        "super_glue": 10_000,
        "commonsense_qa": 8_000,
        "social_i_qa": 8_000,
        "openbookqa": 3_000,
        "sciq": 3_000,
        "multirc": 4_000,
        "knowref": 3_000,
    }
    assert sum(PAPER_COUNTS.values()) == 49_000
    assert set(PAPER_BENCHMARKS) == {
        "mmlu",
        "hellaswag",
        "piqa",
        "arc_challenge",
        "arc_easy",
        "winogrande",
        "boolq",
        "gsm8k",
    }
    assert not set(BIGBENCH_TASKS) & set(BIGBENCH_EXCLUDED) and len(BIGBENCH_TASKS) == 109
    assert "multirc" not in SUPERGLUE_TASKS and "record" not in SUPERGLUE_TASKS
    assert source_members("super_glue") == tuple(f"super_glue:{t}" for t in SUPERGLUE_TASKS)
    with pytest.raises(ValueError, match="unknown source 'super_glue:axb'"):
        source_members("super_glue", superglue_tasks=["axb"])
    with pytest.raises(ValueError, match="unknown source 'trivia'"):
        source_members("trivia")


def test_allocate_balances_and_redistributes():
    assert allocate(10, {"a": 100, "b": 100, "c": 100}) == {"a": 4, "b": 3, "c": 3}
    assert allocate(10, {"a": 1, "b": 100, "c": 100}) == {"a": 1, "b": 5, "c": 4}  # a's shortfall moves on
    assert allocate(10, {"a": 2, "b": 3}) == {"a": 2, "b": 3}  # fewer rows than asked: all of them
    # the paper's SuperGLUE 10k over the train sizes of the six default tasks
    sg = allocate(10_000, {"boolq": 9427, "cb": 250, "copa": 400, "rte": 2490, "wic": 5428, "wsc": 554})
    assert sg == {"boolq": 3153, "cb": 250, "copa": 400, "rte": 2490, "wic": 3153, "wsc": 554}
    sizes = {"a": 3, "b": 9, "c": 9, "d": 1}
    prev = allocate(0, sizes)
    for count in range(1, 25):  # monotone, so a smaller mix nests in a larger one; never above a size
        cur = allocate(count, sizes)
        assert all(prev[m] <= cur[m] <= sizes[m] for m in sizes) and sum(cur.values()) == min(count, 22)
        uncapped = [v for m, v in cur.items() if v < sizes[m]]
        assert not uncapped or max(uncapped) - min(uncapped) <= 1  # balanced below the caps
        prev = cur


def test_mix_counts_ids_and_tasks(loader):
    s = mix(loader)
    assert len(s) == sum(SMALL.values())
    assert Counter(x["source"] for x in s) == Counter(SMALL)
    per_task = Counter(x["task"] for x in s)
    assert [per_task[f"bigbench:{t}"] for t in BB] == [4, 4, 4]
    assert per_task["super_glue:cb"] == 2 and sum(per_task[f"super_glue:{t}"] for t in SG) == 18
    assert all(x["id"].startswith(x["task"] + "-") for x in s)
    assert len({x["id"] for x in s}) == len(s)
    assert "commonsense_qa-blank" not in {x["id"] for x in s}
    assert all(x["options"][x["label"]] for x in s)
    assert {c[1] for c in loader.calls} == {"train"} and len(loader.calls) == len(SIZES)
    assert len({x["source"] for x in s[:20]}) > 3  # interleaved, not one source after another


def test_mix_is_reproducible_and_seeded(loader):
    a, b, c = mix(loader, 0), mix(loader, 0), mix(loader, 1)
    assert [x["id"] for x in a] == [x["id"] for x in b] and a == b
    assert {x["id"] for x in a} != {x["id"] for x in c}
    # another sample within (almost) every source, not just another order
    assert (
        sum({x["id"] for x in a if x["source"] == src} != {x["id"] for x in c if x["source"] == src} for src in SMALL)
        >= 6
    )


def test_mix_nests_and_sources_are_independent(loader):
    full = {x["id"] for x in mix(loader)}
    half = {x["id"] for x in mix(loader, counts={k: v // 2 for k, v in SMALL.items()})}
    assert half < full  # a smaller data fraction is a subset of the larger one
    more_sciq = mix(loader, counts={**SMALL, "sciq": 10})
    same = [x for x in more_sciq if x["source"] != "sciq"]
    assert {x["id"] for x in same} == {x["id"] for x in mix(loader) if x["source"] != "sciq"}
    unshuffled = mix(loader, shuffle=False)
    assert [x["source"] for x in unshuffled] == sorted((x["source"] for x in unshuffled), key=list(SMALL).index)


def test_mix_shortfall_warns_with_numbers_or_refuses(loader):
    with pytest.warns(
        MixShortfallWarning,
        match=r"sciq: asked for 25 samples but only 20 labelled rows are "
        r"available in split 'train'; using all 20",
    ):
        s = mix(loader, counts={"sciq": 25})
    assert len(s) == 20
    with pytest.warns(MixShortfallWarning, match=r"super_glue: asked for 80 samples but only 62 .*super_glue:cb: 2"):
        mix(loader, counts={"super_glue": 80})
    with pytest.raises(ValueError, match="sciq: asked for 25 samples but only 20"):
        mix(loader, counts={"sciq": 25}, strict=True)


def test_load_benchmark_uses_the_evaluation_split():
    calls = []

    def fake(name, split):
        calls.append((name, split))
        return [{"id": "0", "question": "q", "options": ["a", "b"], "label": 0}]

    for name in PAPER_BENCHMARKS:
        load_benchmark(name, loader=fake)
    assert dict(calls) == {
        "mmlu": "test",
        "hellaswag": "validation",
        "piqa": "validation",
        "arc_challenge": "test",
        "arc_easy": "test",
        "winogrande": "validation",
        "boolq": "validation",
        "gsm8k": "test",
    }
    with pytest.raises(ValueError, match="unknown benchmark 'arc'; the paper's eight"):
        load_benchmark("arc", loader=fake)
