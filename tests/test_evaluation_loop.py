"""Evaluation through the Trainer's own loop: eval loss, accuracy equal to the scorer, stderr, best model, ranks.

The file is also the worker of the two-process check: ``python -m torch.distributed.run ... tests/test_evaluation_loop.py
OUT`` evaluates on every rank and writes rank 0's metrics.
"""

import json
import math
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from helpers_launch import run_two_processes  # noqa: E402
from helpers_training import (  # noqa: E402
    build_test_neighbourhood,
    fresh,
    tiny_peft_model,
    tiny_tokenizer,
    tiny_training_setup,
    train_samples,
    training_args,
)

from roma_peft.trainer import RomaTrainer, roma_parameters  # noqa: E402


def eval_samples(n: int = 13, seed: int = 7) -> list[dict]:
    """Held-out multiple-choice samples with 2, 3 and 4 options (the loop pads the per-option tables)."""
    out = []
    for i, s in enumerate(train_samples(n, seed=seed)):
        s = dict(s, id=f"eval-{i}")
        options = list(s["options"])
        if i % 3 == 1:  # drop a wrong option
            wrong = next(j for j in range(len(options)) if j != s["label"])
            gold = options[s["label"]]
            options.pop(wrong)
            s["label"] = options.index(gold)
        elif i % 3 == 2:
            options.append("maybe")
        s["options"] = options
        out.append(s)
    return out


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    return tiny_training_setup()


def make_trainer(setup, tmp_path, evals=None, **kw):
    tok, samples, model, nb = fresh(setup)
    args = training_args(
        tmp_path / "out",
        **{"num_train_epochs": 1, "train_sampling_strategy": "sequential", "per_device_eval_batch_size": 4, **kw},
    )
    return RomaTrainer(
        model=model,
        args=args,
        train_dataset=samples,
        neighbourhood=nb,
        processing_class=tok,
        eval_dataset=eval_samples() if evals is None else evals,
    )


def test_accuracy_from_the_loop_equals_the_scorer_and_lm_eval_stderr(setup, tmp_path):
    """evaluate()'s accuracy equals score_multiple_choice's, with lm-eval's standard error."""
    from roma_peft.scoring import score_multiple_choice

    trainer = make_trainer(setup, tmp_path, max_steps=2)
    trainer.train()
    evals = eval_samples()
    metrics = trainer.evaluate()
    model = trainer.model
    result = score_multiple_choice(model, trainer.processing_class, evals, progress=False)
    assert metrics["eval_samples"] == len(evals) == 13  # 13 = 3 batches of 4 + 1: the last batch is partial
    assert metrics["eval_accuracy"] == pytest.approx(result.acc, abs=1e-12)
    assert metrics["eval_accuracy_norm"] == pytest.approx(result.acc_norm, abs=1e-12)
    n = len(evals)
    for key, p in (("eval_accuracy_stderr", result.acc), ("eval_accuracy_norm_stderr", result.acc_norm)):
        assert metrics[key] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    try:  # lm-eval's own standard error of a mean (sample std / sqrt(n))
        from lm_eval.api.metrics import mean_stderr

        assert metrics["eval_accuracy_stderr"] == pytest.approx(mean_stderr([float(c) for c in result.correct]))
    except ImportError:  # pragma: no cover - lm-eval is a dev dependency
        pass
    # the per-option log-likelihoods the loop gathered are the scorer's (predict() returns them)
    out = trainer.predict(evals)
    ll, chars = out.predictions
    for i, s in enumerate(evals):
        k = len(s["options"])
        assert ll[i, :k].tolist() == pytest.approx(result.loglikelihoods[i], abs=1e-4)
        assert chars[i, :k].tolist() == [len(o) for o in s["options"]] and (chars[i, k:] < 0).all()
    assert out.label_ids.tolist() == [s["label"] for s in evals]
    assert out.metrics["test_accuracy"] == pytest.approx(result.acc)
    # the eval loss is the task loss here: manifold targets do not exist for held-out samples
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_roma/task_loss"], rel=2e-2)
    assert "eval_roma/manifold_loss" not in metrics
    assert 0 < metrics["eval_roma/expert_balance"] <= 1 and metrics["eval_roma/routing_entropy"] > 0
    # the same metric names reach the log history (what the curves and the model card read)
    assert any("eval_accuracy" in h and "eval_loss" in h for h in trainer.state.log_history)


def test_eval_loss_is_the_training_objective_on_eval_samples(setup, tmp_path):
    """With l2 (defined on any sample) the eval loss is the causal_lm task loss + lambda * R, as in training."""
    from roma_peft.collator import RomaDataCollator

    evals = eval_samples()
    # l2: defined on any sample, so the eval loss is task + lambda * R
    trainer = make_trainer(setup, tmp_path / "l2", regularizer="l2", roma_lambda=3.0, max_steps=2)
    trainer.train()
    metrics = trainer.evaluate()
    l2 = sum(float(p.detach().pow(2).sum()) for p in roma_parameters(trainer.model).values())
    assert l2 > 0 and metrics["eval_roma/l2_loss"] == pytest.approx(l2, rel=1e-5)
    # causal_lm task loss: the per-sample mean CE of the gold continuation, as compute_loss gives it in training
    collate = RomaDataCollator(trainer.processing_class, encoding=trainer.prompt_encoding)
    trainer.args.regularizer = "none"
    with torch.no_grad():
        trainer.model.eval()
        task = float(trainer.compute_loss(trainer.model, collate(evals)))
    trainer.args.regularizer = "l2"
    assert metrics["eval_roma/task_loss"] == pytest.approx(task, rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_roma/task_loss"] + 3.0 * l2, rel=2e-2)


def test_multiple_choice_eval_task_loss_is_the_options_cross_entropy(setup, tmp_path):
    """loss_type="multiple_choice": the eval task loss is the CE over the options' summed log-likelihoods."""
    evals = eval_samples()
    trainer = make_trainer(setup, tmp_path / "mc", regularizer="none", loss_type="multiple_choice")
    metrics = trainer.evaluate()
    ll, _ = trainer.predict(evals).predictions
    ce = [-(torch.tensor(ll[i, : len(s["options"])]).log_softmax(0)[s["label"]]).item() for i, s in enumerate(evals)]
    assert metrics["eval_roma/task_loss"] == pytest.approx(sum(ce) / len(ce), rel=1e-4)
    assert metrics["eval_roma/none_loss"] == 0.0


def test_answer_only_eval_samples_give_a_loss_and_no_accuracy(setup, tmp_path):
    """Eval samples without options are scored by the loss of their gold answers; no accuracy is reported."""
    evals = eval_samples()
    trainer = make_trainer(setup, tmp_path / "mc", regularizer="none", loss_type="multiple_choice")
    answers = [
        {"id": f"a{i}", "question": s["question"], "answer": s["options"][s["label"]]} for i, s in enumerate(evals)
    ]
    metrics = trainer.evaluate(answers)
    assert metrics["eval_loss"] > 0 and metrics["eval_samples"] == len(answers) and "eval_accuracy" not in metrics


@pytest.mark.parametrize("metric", [None, "accuracy"])
def test_load_best_model_at_end(setup, tmp_path, metric):
    """load_best_model_at_end picks the best eval (loss or accuracy) and the live deltas are its checkpoint's."""
    kw = {"metric_for_best_model": metric} if metric else {}
    trainer = make_trainer(
        setup,
        tmp_path,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        learning_rate=0.3,
        **kw,
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    key = "eval_loss" if metric is None else "eval_accuracy"
    pick = min if metric is None else max
    best = pick(evals, key=lambda h: h[key])
    assert trainer.state.best_metric == pytest.approx(best[key])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    from safetensors.torch import load_file

    saved = load_file(os.path.join(trainer.state.best_model_checkpoint, "adapter_model.safetensors"))
    live = {n.replace(".default", ""): p for n, p in roma_parameters(trainer.model).items()}
    assert saved and all(torch.equal(saved[n], live[n].detach().cpu()) for n in saved)


def _worker(out_path: str, work_dir: str) -> None:
    tok = tiny_tokenizer()
    samples = train_samples(24)
    model = tiny_peft_model()
    nb = build_test_neighbourhood(model, tok, samples)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = training_args(
        work_dir,
        max_steps=2,
        per_device_train_batch_size=8 // world,
        per_device_eval_batch_size=4,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=False,
    )
    trainer = RomaTrainer(
        model=model,
        args=args,
        train_dataset=samples,
        neighbourhood=nb,
        processing_class=tok,
        eval_dataset=eval_samples(),
    )
    trainer.train()
    metrics = trainer.evaluate()
    metrics["world_size"] = args.world_size
    metrics["deltas"] = {k: v.detach().tolist() for k, v in roma_parameters(model).items()}
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out_path, "w") as f:
            json.dump(metrics, f)


def test_two_processes_split_the_eval_set_and_report_what_one_does(tmp_path):
    """Two processes split the eval set and report the metrics one process computes."""
    out = tmp_path / "ddp.json"
    proc = run_two_processes(__file__, out, tmp_path / "ddp", PYTHONWARNINGS="always")
    ddp = json.loads(out.read_text())
    assert ddp["world_size"] == 2
    # every deltas takes part in every step: DDP runs without find_unused_parameters and says nothing about it
    assert "find_unused_parameters" not in proc.stderr
    single_out = tmp_path / "single.json"
    _worker(str(single_out), str(tmp_path / "single"))  # one process, the same global batch of 8
    single = json.loads(single_out.read_text())
    for name, value in single["deltas"].items():
        assert torch.allclose(torch.tensor(ddp["deltas"][name]), torch.tensor(value), atol=1e-6), name
    # the loop split 13 samples over two ranks (the sampler pads the last batch) and gathered exactly 13 back
    assert ddp["eval_samples"] == single["eval_samples"] == 13
    for key in ("eval_accuracy", "eval_accuracy_norm", "eval_accuracy_stderr", "eval_accuracy_norm_stderr"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-12), key
    for key in ("eval_roma/task_loss", "eval_roma/routing_entropy", "eval_roma/expert_balance"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-5), key  # means over the same 13 samples


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
