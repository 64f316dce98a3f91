"""The benchmark's --quick paths, as a user runs them: the runner's protocol and the README's demo."""

import json

import pytest

from roma_peft.benchmark import demo, runner
from roma_peft.benchmark.report import render_report


@pytest.mark.slow
def test_runner_quick_runs_the_whole_protocol(tmp_path):
    results = runner.main(["--out", str(tmp_path), "--quick"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["final"].keys() == {"none", "manifold", "self", "random", "l2"}
    assert set(saved["oracle"]) == {"gold", "wrong"}
    # selection happened on dev only: every selection row is a dev score
    assert all(set(row) == {"method", "lr", "lambda", "dev"} for row in saved["selection"])
    for entry in saved["final"].values():
        for run in entry["runs"]:
            assert 0.0 <= run["test"] <= 1.0 and 0.0 <= run["dev"] <= 1.0
    report = (tmp_path / "benchmarks.md").read_text()
    assert "| base |" in report and "oracle (wrong)" in report
    assert (tmp_path / "routing_manifolds.png").stat().st_size > 10_000
    assert results["base"]["test"] == saved["base"]["test"]
    # a second run resumes from the recorded scores instead of training again
    again = runner.main(["--out", str(tmp_path), "--quick"])
    assert again["final"] == saved["final"]


@pytest.mark.slow
def test_demo_quick_reloaded_adapter_reproduces_accuracy(tmp_path):
    out = demo.main(["--out", str(tmp_path), "--quick"])
    assert out["reproduced"] is True
    assert out["reloaded_test_acc"] == out["rows"]["manifold"]["test"]
    files = {p.name for p in (tmp_path / "roma-adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    assert set(out["rows"]) == {"base", "none", "manifold", "self"}


def test_report_states_plainly_when_roma_does_not_beat_self():
    results = {
        "command": "x", "machine": "m", "wall_seconds": 60, "splits": {"train": 1, "dev": 1, "test": 1},
        "successful_train": 1, "base": {"train": 0.5, "dev": 0.5, "test": 0.5}, "num_moe_layers": 4,
        "config": {"seeds": [0, 1, 2], "suite_seed": 0, "ablation_seeds": [0]},
        "chosen": {"manifold": {"num_layers": 2, "learning_rate": 0.01, "roma_lambda": 10.0}},
        "final": {
            "manifold": {"runs": [{"dev": 0.6, "test": t} for t in (0.60, 0.61, 0.59)]},
            "self": {"runs": [{"dev": 0.6, "test": t} for t in (0.61, 0.62, 0.60)]},
        },
        "oracle": {"gold": {"accuracy": 0.7}, "wrong": {"accuracy": 0.3}},
    }
    text = render_report(results)
    assert "RoMA did **not** beat the `self` anchor" in text
    assert "| manifold − self | -1.00 |" in text


def test_runner_refuses_a_suite_seed_the_model_was_not_pretrained_on(tmp_path, capsys):
    with pytest.raises(SystemExit):
        runner.main(["--out", str(tmp_path), "--quick", "--suite-seed", "3"])
    err = capsys.readouterr().err
    assert "pretrained on the world of suite seed 0" in err and "--suite-seed 0" in err
    with pytest.raises(ValueError, match="suite seed 3"):
        runner.prepare(runner.BenchmarkConfig(out=str(tmp_path), suite_seed=3))
