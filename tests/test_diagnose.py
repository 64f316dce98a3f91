"""``roma-peft diagnose`` (roma_peft.diagnose): the measures, the forced-routing swap-in, the verdict, the CLI.

Offline and on CPU: the measures and the verdict run on hand-made numbers, the swap-in on tiny random models of
several router families, the end-to-end runs on the tiny pretrained OLMoE shipped with the package.
"""

import json
import os
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from families import FAMILIES
from helpers_scoring import write_jsonl
from helpers_training import tiny_base_model, tiny_tokenizer, train_samples

from roma_peft import cli
from roma_peft.benchmark.figures import knn_overlap
from roma_peft.benchmark.oracle import oracle_routing, score_with_routing
from roma_peft.capture import collect_routing, routers_for
from roma_peft.config import RomaConfig
from roma_peft.diagnose import (
    DiagnoseConfig,
    Thresholds,
    diagnose,
    expert_utilisation,
    mcnemar_p_value,
    neighbour_routing,
    parse_layer_selections,
    routing_entropy,
    task_purity,
    verdict,
    wrong_goals,
)
from roma_peft.routers import ROUTER_FAMILIES
from roma_peft.scoring import score_multiple_choice

# ---------------------------------------------------------------------------------------------- parsing


def test_layer_selections_parse():
    got = parse_layer_selections("last1, last2,first3,middle2,all,indices:-4/-1/0")
    assert [(s.name, s.layer_selection, s.num_layers, s.indices) for s in got] == [
        ("last1", "last", 1, None),
        ("last2", "last", 2, None),
        ("first3", "first", 3, None),
        ("middle2", "middle", 2, None),
        ("all", "all", 5, None),
        ("indices:-4/-1/0", "indices", 5, (-4, -1, 0)),
    ]
    assert got[-1].to_config().moe_layer_indices == [-4, -1, 0]
    assert got[1].to_config().num_layers == 2


@pytest.mark.parametrize(
    "bad",
    ["last0", "lastx", "last", "last1,,last2", "", "indices:", "indices:1/1", "last1,last1", "top2", "indices:a/b"],
)
def test_bad_layer_selection_syntax_is_refused(bad):
    with pytest.raises(ValueError, match="layer selection"):
        parse_layer_selections(bad)


# ---------------------------------------------------------------------------------------------- measures


def _clustered(n_per_task=60, tasks=("a", "b", "c"), seed=0):
    rng = np.random.default_rng(seed)
    emb = np.concatenate([rng.normal(size=(n_per_task, 8)) * 0.1 + 10 * np.eye(8)[i] for i in range(len(tasks))])
    labels = [t for t in tasks for _ in range(n_per_task)]
    return emb.astype(np.float32), labels


def test_purity_is_one_for_perfect_clusters_and_chance_when_shuffled():
    emb, labels = _clustered()
    perfect = task_purity(emb, labels, k=3)
    assert perfect["value"] == 1.0 and perfect["lift"] == 1.0 and perfect["n_tasks"] == 3
    assert perfect["chance"] == pytest.approx(59 / 179)
    shuffled = list(labels)
    random.Random(0).shuffle(shuffled)
    noise = task_purity(emb, shuffled, k=3)
    assert abs(noise["value"] - noise["chance"]) < 0.08
    assert abs(noise["lift"]) < 0.12
    # no task labels (or a single task): not measurable, not a number
    assert task_purity(emb, [None] * len(labels)) is None
    assert task_purity(emb, ["a"] * len(labels)) is None


def test_knn_overlap_is_one_when_routing_space_is_the_embedding_space():
    emb, _ = _clustered()
    assert knn_overlap(emb, emb.copy(), k=3) == 1.0
    assert knn_overlap(emb, emb * 2.0 + 1.0, k=3) == 1.0  # same neighbourhoods up to scale/shift
    rng = np.random.default_rng(1)
    unrelated = knn_overlap(emb, rng.normal(size=emb.shape), k=3)
    assert unrelated < 0.1  # chance is 3 / 179


def test_entropy_and_utilisation():
    uniform = np.full((5, 4), 0.25)
    one_hot = np.eye(4)[[0, 0, 1, 1, 0]]
    np.testing.assert_allclose(routing_entropy(uniform), 1.0)
    np.testing.assert_allclose(routing_entropy(one_hot), 0.0, atol=1e-9)
    np.testing.assert_allclose(routing_entropy(uniform * 0.3), 1.0)  # sigmoid weights: normalised first
    used = expert_utilisation(one_hot)
    assert used["frequency"] == [0.6, 0.4, 0.0, 0.0] and used["dead_experts"] == 2
    assert used["max_share"] == pytest.approx(0.6)
    assert expert_utilisation(np.ones((3, 4)))["effective_experts"] == pytest.approx(4.0)


def test_mcnemar_p_value():
    assert mcnemar_p_value(0, 0) == 1.0
    assert mcnemar_p_value(5, 0) == pytest.approx(1 / 32)
    assert mcnemar_p_value(0, 5) == 1.0
    assert mcnemar_p_value(8, 2) == pytest.approx(56 / 1024)


def test_wrong_goals_avoid_gold_and_the_base_prediction():
    samples = [{"options": ["a", "b", "c", "d"], "label": 1}] * 50 + [{"options": ["a", "b"], "label": 0}] * 5
    preds = [2] * 50 + [1] * 5
    goals = wrong_goals(samples, preds, seed=0)
    assert all(g not in (1, 2) for g in goals[:50]) and set(goals[:50]) == {0, 3}
    assert goals[50:] == [1] * 5  # two options: the only wrong one is the prediction


def test_neighbour_routing_is_the_weighted_average_of_successful_neighbours():
    from roma_peft.neighbours import NeighbourhoodConfig, build_neighbourhood

    samples = [{"id": str(i), "question": f"q{i}", "options": ["a", "b"], "label": 0} for i in range(6)]
    emb = np.array([[0.0], [1.0], [3.0], [10.0], [11.0], [13.0]], dtype=np.float32)
    correct = [True, True, False, True, True, False]  # S = {0, 1, 3, 4}
    nb = build_neighbourhood(samples, correct, emb, NeighbourhoodConfig(k=2, sigma=1.0), progress=False)
    routing = torch.eye(6)
    got = neighbour_routing(nb, [2, 5], routing)
    # sample 2 (at 3.0): neighbours 1 (d=2) and 0 (d=3); W ~ exp(-d^2/2), normalised
    w1, w0 = np.exp(-2.0), np.exp(-4.5)
    expected = torch.zeros(2, 6)
    expected[0, 1], expected[0, 0] = w1 / (w1 + w0), w0 / (w1 + w0)
    expected[1, 4], expected[1, 3] = w1 / (w1 + w0), w0 / (w1 + w0)
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------- verdict


def _numbers(
    gain=0.2,
    fix=0.6,
    steer=0.2,
    repair_p=0.001,
    purity_lift=0.8,
    swap_margin=0.2,
    swap_p=0.001,
    overlap_lift=0.1,
    purity=True,
    swap=True,
):
    return {
        "purity": {"value": 0.1 + 0.9 * purity_lift, "chance": 0.1, "lift": purity_lift, "n_tasks": 3}
        if purity
        else None,
        "selections": {
            "last2": {
                "oracle": {
                    "n_items": 100,
                    "n_base_wrong": 40,
                    "repair_margin": fix - steer,
                    "repair_p_value": repair_p,
                    "gold": {"gain": gain, "fixed": int(40 * fix), "broken": 0, "fix_rate": fix},
                    "wrong": {"steer_rate": steer, "steered": int(40 * steer), "n_failed_not_at_target": 40},
                },
                "swap_in": (
                    {
                        "available": True,
                        "n_items": 40,
                        "neighbours": {"fixed": 12},
                        "random": {"fixed": 4},
                        "margin": swap_margin,
                        "p_value": swap_p,
                    }
                    if swap
                    else {"available": False, "reason": "router family 'probabilities' has no inverse"}
                ),
                "knn_overlap": {"value": 0.02 + 0.98 * overlap_lift, "chance": 0.02, "lift": overlap_lift},
            }
        },
    }


@pytest.mark.parametrize(
    "changes, key",
    [
        ({}, "all"),
        ({"gain": 0.049}, "no_headroom"),
        ({"fix": 0.29, "steer": 0.2}, "steering"),  # margin 0.09 < 0.10
        ({"fix": 0.31, "steer": 0.2}, "all"),  # margin 0.11
        ({"repair_p": 0.2}, "unknown"),  # a large margin that could be chance: inconclusive
        ({"purity_lift": 0.49}, "purity"),
        ({"purity_lift": 0.51}, "all"),
        ({"swap_margin": 0.04}, "swap_in"),
        ({"swap_margin": 0.3, "swap_p": 0.2}, "unknown"),
        ({"overlap_lift": 0.51}, "aligned"),
        ({"overlap_lift": 0.49}, "all"),
        ({"purity": False}, "all"),  # no task labels: the swap-in alone decides premise 2
        ({"swap": False}, "unknown"),
        ({"gain": 0.0, "purity_lift": 0.0}, "no_headroom"),  # premise 1 is named first
    ],
)
def test_verdict_follows_the_thresholds(changes, key):
    v = verdict(_numbers(**changes))
    headlines = {
        "all": "RoMA has headroom here.",
        "no_headroom": "Routing has little headroom here.",
        "steering": "The oracle gain is steering, not repair.",
        "purity": "The embedding does not separate your tasks.",
        "swap_in": "The embedding's neighbours do not carry a routing that fixes failures.",
        "aligned": "The router already follows the embedding.",
        "unknown": "Inconclusive: part of RoMA's premise could not be measured, or needs more items.",
    }
    assert v["key"] == key and v["headline"] == headlines[key]
    assert v["text"].startswith(v["headline"]) and v["selection"] == "last2"


def test_verdict_text_carries_the_numbers_and_custom_thresholds_apply():
    v = verdict(_numbers())
    assert "fixes 60% of the base model's failures (24/40" in v["text"] and "12 of 40 failed items" in v["text"]
    assert v["premises"]["1_fixable_by_routing"] == "holds"
    strict = verdict(_numbers(), Thresholds(min_repair_margin=0.5))
    assert strict["key"] == "steering" and "steering, not repair" in strict["text"]


def test_verdict_reports_the_most_favourable_selection():
    numbers = _numbers(gain=0.0)
    numbers["selections"]["last5"] = _numbers()["selections"]["last2"]
    v = verdict(numbers)
    assert v["selection"] == "last5" and v["key"] == "all"
    assert v["per_selection"]["last2"]["key"] == "no_headroom"
    assert verdict({"selections": {}})["key"] == "unknown"


# ---------------------------------------------------------------------------------------------- forced routing


def test_swap_in_of_own_routing_changes_nothing_and_other_routing_changes_predictions():
    tok, model, samples = tiny_tokenizer(), tiny_base_model(), train_samples(24)
    routers = routers_for(model, config=RomaConfig(num_layers=2))
    own = collect_routing(model, tok, samples, routers=routers, progress=False)
    base = score_multiple_choice(model, tok, samples, progress=False)
    same = score_with_routing(model, tok, samples, routers, own, progress=False)
    assert same.pred == base.pred and same.max_error < 1e-4
    # the constructed case: all routing weight on one expert per layer, far from what the model does
    peaked = torch.cat(
        [torch.softmax(12.0 * torch.eye(r.num_experts)[[i % r.num_experts for i in range(24)]], 1) for r in routers],
        dim=1,
    )
    swapped = score_with_routing(model, tok, samples, routers, peaked, batch_size=5, progress=False)
    assert swapped.max_error < 1e-3  # the routers really produced the forced weights ...
    assert sum(a != b for a, b in zip(swapped.pred, base.pred)) >= 3  # ... and the answers follow them
    assert collect_routing(model, tok, samples, routers=routers, progress=False).equal(own)  # model untouched


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "gpt_oss", "deepseek_v4"])
def test_swap_in_forces_the_target_routing_for_softmax_and_sigmoid_families(family):
    fam = FAMILIES[family]
    model = fam.build()

    class Tok:  # word-level ids, no vocabulary needed
        pad_token_id = 0

        def __call__(self, texts, **_):
            return {"input_ids": [[sum(map(ord, w)) * 7 % 90 + 1 for w in t.split()] for t in texts]}

    samples = [
        {
            "id": str(i),
            "question": " ".join(["q", "rs", "tuv"][: i % 3 + 1] * (i + 1)),
            "options": ["a", "bb"],
            "label": 0,
        }
        for i in range(6)
    ]
    routers = routers_for(model, config=RomaConfig(num_layers=2))
    assert routers[0].family.scoring == fam.scoring
    own = collect_routing(model, Tok(), samples, routers=routers, progress=False)
    target = own.roll(1, dims=0)
    assert (target - own).abs().max() > 1e-3
    out = score_with_routing(model, Tok(), samples, routers, target, progress=False)
    assert out.max_error < 1e-4


def test_swap_in_creates_every_tensor_on_the_models_device():
    """As tests/test_oracle.py: the default device is switched to ``meta``, so a tensor made without naming the
    model's device (the bug that breaks a GPU run) has no data and the result differs or the run fails."""
    from torch.overrides import TorchFunctionMode

    class Devices(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.seen.add(t.device.type)
            return out

    tok, model, samples = tiny_tokenizer(), tiny_base_model(), train_samples(10)
    routers = routers_for(model, config=RomaConfig(num_layers=2))
    target = collect_routing(model, tok, samples, routers=routers, progress=False).roll(1, dims=0)
    expected = score_with_routing(model, tok, samples, routers, target, batch_size=4, progress=False)
    devices = Devices()
    with torch.device("meta"), devices:
        got = score_with_routing(model, tok, samples, routers, target, batch_size=4, progress=False)
    assert devices.seen == {"cpu"}, f"tensors made on {devices.seen - {'cpu'}}, not on the model's device"
    assert got.pred == expected.pred and got.max_error == pytest.approx(expected.max_error)


def test_swap_in_refuses_a_family_without_inverse_scoring():
    tok, model, samples = tiny_tokenizer(), tiny_base_model(), train_samples(6)
    routers = routers_for(model, config=RomaConfig(num_layers=1))
    fake = [replace(routers[0], family=ROUTER_FAMILIES["probabilities"])]
    with pytest.raises(NotImplementedError, match="no inverse"):
        score_with_routing(model, tok, samples, fake, torch.full((6, routers[0].num_experts), 0.125), progress=False)


def test_diagnose_refuses_a_model_with_an_adapter_and_bad_settings():
    from peft import get_peft_model

    tok, samples = tiny_tokenizer(), train_samples(12)
    peft_model = get_peft_model(tiny_base_model(), RomaConfig(num_layers=2))
    with pytest.raises(ValueError, match="merge_and_unload"):
        diagnose(peft_model, tok, samples, progress=False)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        diagnose(tiny_base_model(), tok, samples, DiagnoseConfig(k=0), progress=False)
    with pytest.raises(ValueError, match="needs more than k"):
        diagnose(tiny_base_model(), tok, samples[:4], DiagnoseConfig(k=3), progress=False)


# ---------------------------------------------------------------------------------------------- on the shipped model


@pytest.fixture(scope="module")
def mini():
    from transformers import AutoTokenizer

    from roma_peft.benchmark import runner
    from roma_peft.benchmark.suite import generate_suite, shipped_model_path

    path = str(shipped_model_path())
    suite = generate_suite(seed=0, n_train_shift_per_skill=4, n_dev_per_skill=1, n_test_per_skill=8)
    items = random.Random(0).sample(suite["test"], 48)
    return path, runner.load_base_model(path), AutoTokenizer.from_pretrained(path), items


def test_oracle_toward_gold_is_at_least_the_wrong_option_control(mini):
    _, model, tok, items = mini
    items = items[:16]
    routers = routers_for(model, config=RomaConfig(layer_selection="all"))
    base = score_multiple_choice(model, tok, items, progress=False)
    goals = wrong_goals(items, base.pred, seed=0)
    kwargs = dict(steps=8, lr=0.2, batch_size=8, progress=False)
    gold = oracle_routing(model, tok, items, routers, "gold", **kwargs)
    wrong = oracle_routing(model, tok, items, routers, "wrong", goals=goals, **kwargs)
    assert wrong.goal == goals and gold.goal == [s["label"] for s in items]
    assert gold.accuracy > base.acc  # the oracle repairs something ...
    assert gold.accuracy >= wrong.accuracy  # ... and the control does not beat it toward gold
    hits = sum(p == g for p, g in zip(wrong.pred, goals))
    assert hits > sum(p == g for p, g in zip(base.pred, goals))  # the control really steers toward its target


_FIELDS = {
    "": [
        "format_version",
        "model",
        "model_type",
        "data",
        "settings",
        "thresholds",
        "base",
        "items",
        "moe_layers",
        "purity",
        "layers",
        "selections",
        "skipped_selections",
        "verdict",
        "run",
        "figures",
    ],
    "data": ["source", "n_samples", "data_hash", "has_tasks", "n_tasks"],
    "base": ["accuracy", "metric", "n", "n_successful", "n_failed"],
    "purity": ["value", "chance", "lift", "k", "n_tasks", "per_task"],
    "verdict": ["selection", "key", "headline", "text", "premises", "per_selection"],
    "run": ["seconds", "machine"],
    "layer": [
        "router",
        "layer",
        "family",
        "scoring",
        "num_experts",
        "knn_overlap",
        "entropy",
        "entropy_by_group",
        "utilisation",
    ],
    "utilisation": ["frequency", "effective_experts", "dead_experts", "max_share"],
    "selection": ["layers", "routers", "knn_overlap", "oracle", "swap_in"],
    "oracle": [
        "n_items",
        "base_accuracy",
        "base_correct",
        "n_base_wrong",
        "gold",
        "wrong",
        "gain_difference",
        "repair_margin",
        "repair_wins",
        "repair_losses",
        "repair_p_value",
        "fixed_ids",
    ],
    "gold": ["accuracy", "correct", "gain", "fixed", "broken", "fix_rate"],
    "wrong": [
        "accuracy",
        "correct",
        "target_hits",
        "base_target_hits",
        "gain",
        "steered",
        "n_failed_not_at_target",
        "steer_rate",
        "steered_all",
        "steer_rate_all",
    ],
    "swap_in": ["available", "n_items", "neighbours", "random", "margin", "wins", "losses", "p_value"],
    "swap": ["fixed", "fix_rate", "changed", "max_routing_error", "fixed_ids"],
    "overlap": ["value", "chance", "lift"],
}


def _missing(d: dict, name: str) -> list[str]:
    return [f"{name}.{k}" for k in _FIELDS[name] if k not in d]


def test_diagnose_writes_every_field(mini, tmp_path):
    _, model, tok, items = mini
    rng = np.random.default_rng(0)
    skills = sorted({s["task"] for s in items})
    emb = np.stack([np.eye(16)[skills.index(s["task"])] * 10 + rng.normal(size=16) for s in items]).astype(np.float32)
    config = DiagnoseConfig(
        num_items=24,
        layer_selections="last1,all,last9",
        oracle_steps=2,
        oracle_lr=0.2,
        oracle_batch_size=12,
        batch_size=32,
        max_figure_points=24,
    )
    out = str(tmp_path / "diag")
    result = diagnose(model, tok, items, config, embeddings=emb, output_dir=out, progress=False, source="suite")
    missing = _missing(result, "")
    for name in ("data", "base", "purity", "verdict", "run"):
        missing += _missing(result[name], name)
    assert result["layers"] and len(result["layers"]) == 8  # the shipped miniature has 8 MoE layers
    for layer in result["layers"]:
        missing += _missing(layer, "layer") + _missing(layer["utilisation"], "utilisation")
        missing += _missing(layer["knn_overlap"], "overlap")
    assert set(result["selections"]) == {"last1", "all"} and "last9" in result["skipped_selections"]
    for sel in result["selections"].values():
        missing += _missing(sel, "selection") + _missing(sel["oracle"], "oracle")
        missing += _missing(sel["knn_overlap"], "overlap")
        missing += _missing(sel["oracle"]["gold"], "gold") + _missing(sel["oracle"]["wrong"], "wrong")
        missing += _missing(sel["swap_in"], "swap_in")
        missing += _missing(sel["swap_in"]["neighbours"], "swap") + _missing(sel["swap_in"]["random"], "swap")
        assert sel["swap_in"]["neighbours"]["max_routing_error"] < 1e-4
    assert not missing, missing
    assert result["selections"]["all"]["layers"] == list(range(8)) and result["selections"]["last1"]["layers"] == [7]
    assert result["base"]["n"] == 48 and result["purity"]["value"] > 0.9  # the embeddings were made to cluster
    assert result["selections"]["all"]["oracle"]["n_items"] == 24
    assert result["base"]["n_failed"] >= result["selections"]["all"]["swap_in"]["n_items"] > 0
    # the stored verdict is the verdict of the stored numbers, and the files are there
    assert verdict(result)["text"] == result["verdict"]["text"]
    with open(os.path.join(out, "diagnose.json")) as f:
        on_disk = json.load(f)
    assert on_disk == result
    assert sorted(result["figures"]) == ["layers.png", "manifolds.png", "premises.png"]
    for name in result["figures"] + ["report.md"]:
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    assert result["verdict"]["text"] in report and "| last1 |" in report and "Skipped `last9`" in report
    with pytest.raises(FileExistsError, match="already holds a diagnosis"):
        diagnose(model, tok, items, config, embeddings=emb, output_dir=out, progress=False)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_writes_the_files_and_prints_the_verdict(mini, tmp_path, capsys):
    path, _, _, items = mini
    data = tmp_path / "data.jsonl"
    write_jsonl(items[:32], data)
    out = tmp_path / "diag"
    argv = [
        "diagnose",
        "--model_name_or_path",
        path,
        "--train_file",
        str(data),
        "--output_dir",
        str(out),
        "--num_items",
        "12",
        "--layer_selections",
        "last1,last2",
        "--oracle_steps",
        "1",
        "--batch_size",
        "32",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "diagnose.json").read_text())
    assert result["verdict"]["text"] in printed and "diagnose.json" in printed
    assert result["data"]["n_samples"] == 32 and set(result["selections"]) == {"last1", "last2"}
    assert result["settings"]["embedding_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (out / "report.md").exists() and {p.name for p in out.glob("*.png")} >= {"layers.png", "premises.png"}
    # a second run into the same directory is refused without --overwrite
    assert cli.main(argv) == 2
    assert "already holds a diagnosis" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_file", "no such file"),
        ("existing", "already holds a diagnosis"),
        ("syntax", "layer selection 'last0' is not valid"),
        ("no_file", "--train_file is required"),
        ("num_items", "num_items must be a positive integer"),
    ],
)
def test_cli_refuses_bad_input_before_the_model_loads(case, message, tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_load_model", no_model)
    data = tmp_path / "data.jsonl"
    write_jsonl(train_samples(8), data)
    out = tmp_path / "diag"
    argv = ["diagnose", "--model_name_or_path", str(tmp_path), "--train_file", str(data), "--output_dir", str(out)]
    if case == "missing_file":
        argv[4] = str(tmp_path / "nope.jsonl")
    elif case == "existing":
        out.mkdir()
        (out / "diagnose.json").write_text("{}")
    elif case == "syntax":
        argv += ["--layer_selections", "last1,last0"]
    elif case == "no_file":
        del argv[3:5]
    elif case == "num_items":
        argv += ["--num_items", "0"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("roma-peft diagnose: error:") and message in err
    if case == "existing":
        assert (out / "diagnose.json").read_text() == "{}"


def test_paired_comparison_counts_both_directions():
    from roma_peft.diagnose import paired_comparison

    wins, losses, p = paired_comparison([True, True, False, True, False], [False, True, True, False, False])
    assert (wins, losses) == (2, 1) and p == pytest.approx(mcnemar_p_value(2, 1))
