"""Figures of a run: training curves from the log history, routing heatmaps base vs tuned, what `train` writes next
to the adapter, and training curves through report_to=tensorboard."""

import json
import os

import pytest
import torch
from helpers_training import (
    build_test_neighbourhood,
    saved_model_and_data,
    tiny_peft_model,
    tiny_tokenizer,
    train_samples,
    training_args,
)

from roma_peft.capture import RoutingSpec, collect_routing
from roma_peft.plots import plot_training_curves, routing_statistics
from roma_peft.trainer import RomaTrainer

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("plots")
    tok, samples = tiny_tokenizer(), train_samples(24)
    model = tiny_peft_model()
    nb = build_test_neighbourhood(model, tok, samples)
    trainer = RomaTrainer(
        model=model,
        args=training_args(out, max_steps=4, learning_rate=0.3, eval_strategy="steps", eval_steps=2),
        train_dataset=samples,
        neighbourhood=nb,
        processing_class=tok,
        eval_dataset=samples[:9],
    )
    trainer.train()
    return trainer, tok, samples, out


def test_training_curves_from_the_log_history(run, tmp_path):
    trainer = run[0]
    path = plot_training_curves(trainer.state.log_history, str(tmp_path / "curves.png"))
    with open(path, "rb") as f:
        assert f.read(8) == PNG and os.path.getsize(path) > 10_000
    with pytest.raises(ValueError, match="nothing|no loss"):
        plot_training_curves([{"train_runtime": 1.0, "step": 3}], str(tmp_path / "empty.png"))


def test_routing_statistics_base_vs_tuned(run):
    trainer, tok, samples, _ = run
    model = trainer.model
    stats = routing_statistics(model, tok, samples, encoding=trainer.prompt_encoding, spec=trainer.roma_spec)
    assert stats["layers"] == ["model.layers.2.mlp.gate", "model.layers.3.mlp.gate"]
    assert stats["experts"] == trainer.recorder.dims and stats["n_samples"] == 24
    for which in ("base", "tuned"):
        for row in stats["utilisation"][which]:
            assert sum(row) == pytest.approx(1.0, abs=1e-5) and len(row) == 8
        assert all(0 < b <= 1 for b in stats["balance"][which])
    # base = the adapter disabled, read directly
    with model.disable_adapter():
        topk = collect_routing(
            model,
            tok,
            samples,
            spec=RoutingSpec(position="mean", representation="topk"),
            encoding=trainer.prompt_encoding,
            progress=False,
        )
    block = topk[:, :8] / topk[:, :8].sum(-1, keepdim=True)  # each sample's share of the top-k weight
    assert stats["utilisation"]["base"][0] == pytest.approx(block.mean(0).tolist(), abs=1e-6)
    # the run (lr 0.3) moved the routers: tuned differs from base
    assert stats["entropy"]["tuned"] != pytest.approx(stats["entropy"]["base"], abs=1e-6)
    # the per-layer entropy at the training token averages to the logged roma/routing_entropy of the same model
    assert min(stats["entropy"]["tuned"]) > 0


def test_trainer_save_plots_writes_next_to_the_adapter(run, tmp_path):
    trainer = run[0]
    written = trainer.save_plots(str(tmp_path))
    assert sorted(os.path.basename(p) for p in written.values()) == [
        "routing_heatmaps.png",
        "routing_stats.json",
        "training_curves.png",
    ]
    for name in ("routing_heatmaps.png", "training_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert json.loads((tmp_path / "routing_stats.json").read_text())["layers"][0] == "model.layers.2.mlp.gate"
    trainer.args.routing_plot_samples = 0  # --routing_plot_samples 0: the curves only, no forward pass
    assert list(trainer.save_plots(str(tmp_path / "curves-only"))) == ["training_curves"]
    trainer.args.routing_plot_samples = 512


def test_cli_train_writes_figures_state_and_reports_the_metric_names(tmp_path):
    from roma_peft.cli import run as cli

    common = saved_model_and_data(tmp_path, n=12) + ["--num_layers", "2"]
    out = tmp_path / "out"
    metrics = cli(
        [
            "train",
            *common,
            "--regularizer",
            "entropy",
            "--roma_lambda",
            "0.1",
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--report_to",
            "none",
            "--use_cpu",
            "true",
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            "--eval_file",
            str(tmp_path / "train.jsonl"),
        ]
    )
    for key in (
        "eval_accuracy",
        "eval_accuracy_norm",
        "eval_accuracy_stderr",
        "eval_samples",
        "eval_loss",
        "eval_roma/entropy_loss",
        "train_loss",
    ):
        assert key in metrics, key
    assert metrics["eval_samples"] == 12
    for name in (
        "adapter_model.safetensors",
        "README.md",
        "trainer_state.json",
        "training_curves.png",
        "routing_heatmaps.png",
        "routing_stats.json",
    ):
        assert (out / name).exists(), name
    state = json.loads((out / "trainer_state.json").read_text())
    assert any("roma/task_loss" in h for h in state["log_history"])
    assert any("eval_accuracy" in h for h in state["log_history"])
    card = (out / "README.md").read_text()
    assert "![training curves](training_curves.png)" in card and "| regularizer | `entropy` |" in card


def test_report_to_tensorboard_keeps_the_curves(tmp_path):
    pytest.importorskip("tensorboard")  # pip install roma-peft[tensorboard] (also in [dev])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tok, samples = tiny_tokenizer(), train_samples(8)
    trainer = RomaTrainer(
        model=tiny_peft_model(),
        args=training_args(
            tmp_path, max_steps=2, regularizer="l2", report_to="tensorboard", per_device_train_batch_size=4
        ),
        train_dataset=samples,
        processing_class=tok,
    )
    trainer.train()
    runs = [
        os.path.join(root)
        for root, _, files in os.walk(tmp_path / "runs")
        if any(f.startswith("events.out.tfevents") for f in files)
    ]
    assert runs, "no tensorboard event file"
    events = EventAccumulator(runs[0])
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/roma/task_loss", "train/roma/l2_loss", "train/roma/lambda"} <= tags, tags
