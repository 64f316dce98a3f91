"""The benchmark's --quick paths, as a user runs them: the runner's protocol and the README's demo; and the
protocol's promise that every choice is made on dev, never on test."""

import json
from types import SimpleNamespace

import pytest

from roma_peft.benchmark import demo, oracle, runner
from roma_peft.benchmark.report import render_report
from roma_peft.benchmark.suite import shipped_model_path


def _record_protocol(monkeypatch, fake: bool):
    """Instrument the runner: every scoring of a split, every oracle call (on which split's items, at which lr) and
    the moment the hyper-parameters are fixed (``select_on_dev`` returns) go into one ordered event list. With
    ``fake``, training and scoring are replaced by numbers on which dev and test DISAGREE: dev prefers the middle
    value of every grid, test the last one. (Patch ``runner.prepare`` before calling this, if at all.)"""
    events, contexts = [], []
    real_prepare, real_evaluate, real_select = runner.prepare, runner.evaluate, runner.select_on_dev
    real_oracle = oracle.oracle_routing

    def prepare(config):
        contexts.append(real_prepare(config))
        return contexts[-1]

    def evaluate(ctx, model, split):
        events.append(("score", split))
        if not fake:
            return real_evaluate(ctx, model, split)
        lr_grid, grid = ctx.config.lr_grid, ctx.config.lambda_grid.get(model.regularizer, (0.0,))
        wanted = (lr_grid[len(lr_grid) // 2], grid[len(grid) // 2]) if split == "dev" else (lr_grid[-1], grid[-1])
        return 0.5 + 0.2 * (model.learning_rate == wanted[0]) + 0.1 * (model.roma_lambda in (0.0, wanted[1]))

    def select_on_dev(ctx, base_variant):
        chosen = real_select(ctx, base_variant)
        events.append(("chosen", chosen))
        return chosen

    def oracle_routing(model, tokenizer, samples, routers, target="gold", steps=30, lr=0.05, **kwargs):
        ids = {s["id"] for s in samples}
        splits = {name for name, items in contexts[-1].splits.items() if ids & {s["id"] for s in items}}
        events.append(("oracle", splits, lr))
        if not fake:
            return real_oracle(model, tokenizer, samples, routers, target, steps, lr, **kwargs)
        grid = contexts[-1].config.oracle_lr_grid
        best = grid[len(grid) // 2] if splits == {"dev"} else grid[-1]
        return SimpleNamespace(accuracy=0.9 if lr == best else 0.1)

    monkeypatch.setattr(runner, "prepare", prepare)
    monkeypatch.setattr(runner, "evaluate", evaluate)
    monkeypatch.setattr(runner, "select_on_dev", select_on_dev)
    monkeypatch.setattr(oracle, "oracle_routing", oracle_routing)
    if fake:
        monkeypatch.setattr(runner, "train_variant", lambda ctx, variant, seed, output_dir=None: (variant, {}))
    return events


def _check_dev_only(events):
    """Nothing was computed on test before the hyper-parameters (and the oracle's step size) were fixed."""
    fixed = next(i for i, e in enumerate(events) if e[0] == "chosen")
    before = events[:fixed]
    assert all(e[0] in ("score", "oracle") for e in before)
    assert [e for e in before if e[0] == "score"], "no dev scores before the choice"
    assert all(e == ("score", "dev") or (e[0] == "oracle" and e[1] == {"dev"}) for e in before), (
        f"consulted before the choice: {before}"
    )
    test_oracle = {e[2] for e in events[fixed:] if e[0] == "oracle" and "test" in e[1]}
    assert len(test_oracle) <= 1, "the oracle's lr changed while scoring test"
    return events[fixed][1]


def test_every_choice_follows_dev_when_dev_and_test_disagree(tmp_path, monkeypatch):
    """The whole protocol with fake training and scoring: dev and test prefer different settings, and every
    choice (lr, each lambda, the oracle's lr) must follow dev; test is scored only after the choice is fixed."""
    splits = {
        name: [{"id": f"{name}-{i}", "options": ["a", "b"], "label": 0} for i in range(4)]
        for name in ("train", "dev", "test")
    }
    config = runner.BenchmarkConfig(
        out=str(tmp_path),
        seeds=(0, 1),
        ablation_seeds=(0,),
        figures=False,
        progress=False,
        premises=False,
        lr_grid=(3e-3, 1e-2, 3e-2),
        oracle_lr_grid=(0.05, 0.1, 0.2),
        lambda_grid={m: (0.1, 1.0, 10.0) for m in ("manifold", "self", "random", "l2", "l1", "entropy")},
    )
    base = {name: SimpleNamespace(acc=0.5, correct=[True] * 4) for name in splits}
    ctx = runner.Context(config, str(shipped_model_path()), None, splits, base, embeddings={})
    monkeypatch.setattr(runner, "prepare", lambda cfg: ctx)
    monkeypatch.setattr(runner, "_routers", lambda model, variant: [])
    events = _record_protocol(monkeypatch, fake=True)
    results = runner.run_benchmark(config)

    chosen = _check_dev_only(events)
    assert chosen["none"].learning_rate == 1e-2
    for method, grid in config.lambda_grid.items():
        assert (chosen[method].learning_rate, chosen[method].roma_lambda) == (1e-2, grid[1]), method
    assert results["oracle_lr"] == 0.1
    assert {k: (v["learning_rate"], v["roma_lambda"]) for k, v in results["chosen"].items()} == {
        "none": (1e-2, 0.0),
        **{m: (1e-2, g[1]) for m, g in config.lambda_grid.items()},
    }
    # the final table is made of the chosen variants, scored on test (after the choice)
    for name, entry in results["final"].items():
        assert entry["variant"] == runner.asdict(chosen[name])
        assert {run["seed"] for run in entry["runs"]} == {0, 1}
    assert ("score", "test") in events and results["ablations"]


@pytest.mark.slow
def test_runner_quick_runs_the_whole_protocol(tmp_path, monkeypatch):
    events = _record_protocol(monkeypatch, fake=False)
    # the source is hashed once: an edit of the working tree while this test runs must not make the resume below
    # start afresh (tests/test_benchmark_cache.py checks that a code change does)
    source = runner._source_hash()
    monkeypatch.setattr(runner, "_source_hash", lambda: source)
    combined = runner.main(["--out", str(tmp_path), "--quick"])
    assert set(combined["worlds"]) == {"0"}  # --quick runs the shipped world only
    results = combined["worlds"]["0"]
    saved = json.loads((tmp_path / "world-0" / "results.json").read_text())
    assert saved["final"].keys() == {"none", "manifold", "self", "random", "l2"}
    assert {"gold", "wrong"} <= set(saved["oracle"])
    premises = saved["premises"]
    for key in (
        "oracle_gold_gain",
        "swap_baseline_gain",
        "router_tuning_train_move",
        "embedding_purity",
        "routing_purity",
    ):
        assert isinstance(premises[key], float), key
    assert (tmp_path / "world-0" / "diagnose-test" / "diagnose.json").is_file()
    assert 0.0 <= saved["swap_baseline"]["accuracy"] <= 1.0
    # selection happened on dev only: nothing was scored on test before the choice was fixed, and every chosen
    # setting is the best dev row of the selection log
    chosen = _check_dev_only(events)
    for method, variant in chosen.items():
        rows = [r for r in saved["selection"] if r["method"] == method]
        best = max(rows, key=lambda r: r["dev"])
        assert (variant.learning_rate, variant.roma_lambda) == (best["lr"], best["lambda"])
    for entry in saved["final"].values():
        for run in entry["runs"]:
            assert 0.0 <= run["test"] <= 1.0 and 0.0 <= run["dev"] <= 1.0
    report = (tmp_path / "benchmarks.md").read_text()
    assert "| base |" in report and "oracle (wrong)" in report and "| neighbour swap |" in report
    assert report.index("## Premises") < report.index("### Main table")  # the premise table comes first
    assert (tmp_path / "world-0" / "routing_manifolds.png").stat().st_size > 10_000
    assert results["base"]["test"] == saved["base"]["test"]
    # a second run resumes from the recorded scores instead of training again (only the figure's model is trained)
    trained = []
    real_train = runner.train_variant
    monkeypatch.setattr(runner, "train_variant", lambda *a, **k: trained.append(a[1].name) or real_train(*a, **k))
    again = runner.main(["--out", str(tmp_path), "--quick"])["worlds"]["0"]
    assert again["final"] == saved["final"]
    assert trained == ["manifold"], trained
    assert again["cache_key"] == saved["cache_key"]


@pytest.mark.slow
def test_demo_quick_reloaded_adapter_reproduces_accuracy(tmp_path, capsys):
    out = demo.main(["--out", str(tmp_path), "--quick", "--seeds", "2"])
    assert out["reproduced"] is True
    assert out["reloaded_test_acc"] == out["rows"]["manifold"]["test"][0]  # the first seed's adapter
    files = {p.name for p in (tmp_path / "roma-adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    assert set(out["rows"]) == {"base", "swap", "none", "manifold", "self"}
    assert all(len(out["rows"][m]["test"]) == 2 for m in ("none", "manifold", "self"))
    printed = capsys.readouterr().out
    assert "| RoMA |" in printed and "±" in printed and "seed noise" in printed
    assert "neighbour-routing swap" in printed


def _world(tests_manifold, tests_self, premises=None):
    return {
        "machine": "m",
        "wall_seconds": 60,
        "splits": {"train": 1, "dev": 1, "test": 1},
        "successful_train": 1,
        "base": {"train": 0.5, "dev": 0.5, "test": 0.5},
        "num_moe_layers": 8,
        "config": {"seeds": [0, 1, 2], "suite_seed": 0, "ablation_seeds": [0], "epochs": 2.0, "batch_size": 32},
        "chosen": {
            name: {"num_layers": 5, "learning_rate": 0.01, "roma_lambda": 10.0} for name in ("none", "manifold")
        },
        "premises": premises or {},
        "final": {
            "manifold": {"runs": [{"seed": i, "dev": 0.6, "test": t} for i, t in enumerate(tests_manifold)]},
            "self": {"runs": [{"seed": i, "dev": 0.6, "test": t} for i, t in enumerate(tests_self)]},
        },
        "oracle": {"gold": {"accuracy": 0.7}, "wrong": {"accuracy": 0.3}, "base_on_oracle_items": 0.5, "n_items": 10},
    }


def test_report_states_plainly_when_roma_does_not_beat_self():
    results = {"command": "x", "worlds": {"0": _world((0.60, 0.61, 0.59), (0.61, 0.62, 0.60))}}
    text = render_report(results)
    assert "RoMA did **not** beat the `self` anchor" in text
    assert "| manifold − self | -1.00 |" in text


def test_report_calls_a_significant_loss_worse_not_insignificant():
    """A significant difference is named by its sign: RoMA clearly below the controls is 'worse', never 'not
    significant'."""
    world = _world((0.60, 0.61, 0.59, 0.60), (0.63, 0.645, 0.62, 0.635))
    world["final"]["none"] = {
        "runs": [{"seed": i, "dev": 0.6, "test": t} for i, t in enumerate((0.64, 0.64, 0.63, 0.64))]
    }
    text = render_report({"command": "x", "worlds": {"0": world}})
    assert "RoMA was significantly **worse** than the `self` anchor" in text
    assert "manifold − none = -3.75 points" in text and "significantly **worse**)" in text
    assert "not significant at 5%" not in text


def test_report_puts_the_premises_first_and_pools_worlds_pairwise():
    good = {
        "oracle_gold_gain": 0.20,
        "swap_baseline_gain": 0.06,
        "router_tuning_train_move": 0.12,
        "embedding_purity": 0.95,
        "routing_purity": 0.40,
    }
    bad = {**good, "oracle_gold_gain": 0.10, "routing_purity": 0.95}
    results = {
        "command": "x",
        "worlds": {
            "0": _world((0.60, 0.62, 0.61), (0.59, 0.60, 0.60), good),
            "1": _world((0.70, 0.71, 0.72), (0.69, 0.70, 0.70), bad),
        },
    }
    text = render_report(results)
    assert text.index("## Premises") < text.index("## World 0") < text.index("## Pooled over worlds")
    oracle_row = next(line for line in text.splitlines() if line.startswith("| 1. oracle toward gold"))
    assert "+20.00 (holds)" in oracle_row and "+10.00 (**fails**)" in oracle_row
    purity_row = next(line for line in text.splitlines() if "base-routing neighbours" in line)
    assert "40.00 (holds)" in purity_row and "95.00 (**fails**)" in purity_row
    pooled = text[text.index("## Pooled over worlds") :]
    assert "n = 6" in pooled and "| manifold − self | +1.33 |" in pooled


def test_runner_does_not_import_the_demo():
    """Imports run one way (demo -> runner -> variants): loading the runner must not load the demo."""
    import subprocess
    import sys

    code = "import sys, roma_peft.benchmark.runner; print('roma_peft.benchmark.demo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_runner_refuses_a_suite_seed_the_model_was_not_pretrained_on(tmp_path, capsys):
    shipped = str(shipped_model_path())
    with pytest.raises(SystemExit):
        runner.main(["--out", str(tmp_path), "--quick", "--model", shipped, "--worlds", "3"])
    err = capsys.readouterr().err
    assert "pretrained on the world of suite seed 0" in err and "--suite-seed 0" in err
    with pytest.raises(ValueError, match="suite seed 3"):
        runner.prepare(runner.BenchmarkConfig(out=str(tmp_path), suite_seed=3, model_path=shipped))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--worlds", "0,x"], "comma-separated integers"),
        (["--worlds", "1,1"], "each once"),
        (["--worlds", "0,1", "--model", "somewhere"], "single suite seed"),
    ],
)
def test_runner_refuses_bad_worlds_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        runner.main(["--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
