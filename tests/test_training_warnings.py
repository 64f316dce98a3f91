"""A short `roma-peft train` run prints none of the upstream deprecation / no-op warnings, and the reason one of them
can be switched off (every trainable router delta gets a gradient in every step, so DDP needs no unused-parameter
search) holds for every regulariser."""

import copy
import warnings

import pytest
import torch
from helpers_training import (
    build_test_neighbourhood,
    saved_model_and_data,
    tiny_base_model,
    tiny_peft_model,
    tiny_tokenizer,
    train_samples,
    training_args,
)

from roma_peft.trainer import RomaTrainer, RomaTrainingArguments, roma_parameters

NOISE = ("is_gradient_checkpointing", "pin_memory", "find_unused_parameters")


def test_a_short_cli_train_run_prints_no_upstream_noise(tmp_path):
    """A short `roma-peft train` run emits none of the known upstream noise warnings."""
    from roma_peft.cli import run

    common = saved_model_and_data(tmp_path, n=12) + ["--num_layers", "2"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # no --use_cpu: on a machine without an accelerator the Trainer would pin memory for nothing
        metrics = run(
            [
                "train",
                *common,
                "--regularizer",
                "none",
                "--output_dir",
                str(tmp_path / "out"),
                "--max_steps",
                "2",
                "--per_device_train_batch_size",
                "4",
                "--report_to",
                "none",
                "--save_strategy",
                "no",
                "--disable_tqdm",
                "true",
            ]
        )
    assert metrics["train_loss"] > 0
    noisy = [f"{w.category.__name__}: {w.message}" for w in caught if any(n in str(w.message) for n in NOISE)]
    assert not noisy, noisy


def test_warnings_that_tell_the_user_something_are_kept(tmp_path):
    """The lambda warm-up warning still reaches the user."""
    tok, samples, model = tiny_tokenizer(), train_samples(8), tiny_peft_model()
    with pytest.warns(UserWarning, match="exceeds"):
        RomaTrainer(
            model=model,
            args=training_args(tmp_path, regularizer="none", lambda_warmup_steps=50, max_steps=1),
            train_dataset=samples,
            processing_class=tok,
        ).train()


def test_ddp_defaults(nb_setup, tmp_path):
    """RomaTrainingArguments turns off DDP's unused-parameter search and pinning without an accelerator."""
    from transformers import TrainingArguments

    args = RomaTrainingArguments(output_dir=str(tmp_path / "x"), report_to="none")
    assert args.ddp_find_unused_parameters is False
    if not torch.cuda.is_available():
        assert args.dataloader_pin_memory is False  # nothing to pin memory for
    assert (
        RomaTrainingArguments(
            output_dir=str(tmp_path / "x"), report_to="none", ddp_find_unused_parameters=True
        ).ddp_find_unused_parameters
        is True
    )  # still the user's choice
    # a plain TrainingArguments (find_unused_parameters None: "True for a PeftModel") is converted by RomaTrainer
    plain = TrainingArguments(
        output_dir=str(tmp_path / "x"), report_to="none", use_cpu=True, remove_unused_columns=False
    )
    tok, samples, model, nb = nb_setup
    trainer = RomaTrainer(
        model=copy.deepcopy(model),
        args=plain,
        train_dataset=samples,
        neighbourhood=copy.deepcopy(nb),
        processing_class=tok,
    )
    assert trainer.args.ddp_find_unused_parameters is False
    assert trainer.accelerator.ddp_handler.find_unused_parameters is False


@pytest.mark.parametrize(
    "regularizer,loss_type,lam",
    [
        ("manifold", "causal_lm", 0.8),
        ("random", "causal_lm", 0.8),
        ("self", "causal_lm", 0.8),
        ("l1", "causal_lm", 0.8),
        ("l2", "causal_lm", 0.8),
        ("entropy", "causal_lm", 0.8),
        ("none", "causal_lm", 0.8),
        ("manifold", "causal_lm", 0.0),
        ("none", "multiple_choice", 0.0),
    ],
)
def test_every_router_delta_gets_a_gradient_every_step(tmp_path, regularizer, loss_type, lam, nb_setup):
    """What ddp_find_unused_parameters=False needs: no trainable parameter may be left out of a step's graph."""
    tok, samples, model, nb = nb_setup
    model = copy.deepcopy(model)
    args = training_args(
        tmp_path,
        regularizer=regularizer,
        loss_type=loss_type,
        roma_lambda=lam,
        max_steps=1,
        per_device_train_batch_size=2,
        train_sampling_strategy="sequential",
    )
    trainer = RomaTrainer(
        model=model, args=args, train_dataset=samples, neighbourhood=copy.deepcopy(nb), processing_class=tok
    )
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    trainer.compute_loss(model, batch).backward()
    missing = [n for n, p in roma_parameters(model).items() if p.grad is None]
    assert not missing, missing


@pytest.fixture(scope="module")
def nb_setup():
    tok, samples = tiny_tokenizer(), train_samples(12)
    model = tiny_peft_model()
    return tok, samples, model, build_test_neighbourhood(model, tok, samples)


def test_wrapping_a_model_is_quiet_but_other_warnings_still_reach_the_user():
    """PEFT's read of the deprecated is_gradient_checkpointing is silenced where roma_peft wraps a model, nothing else."""
    from peft import get_peft_model

    import roma_peft
    from roma_peft.loading import quiet_peft_wrapping

    with warnings.catch_warnings(record=True) as loud:
        warnings.simplefilter("always")
        get_peft_model(tiny_base_model(), roma_peft.RomaConfig(num_layers=1))
    assert any("is_gradient_checkpointing" in str(w.message) for w in loud), "upstream no longer warns: drop the filter"
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        with quiet_peft_wrapping():
            get_peft_model(tiny_base_model(), roma_peft.RomaConfig(num_layers=1))
            warnings.warn("something the user should see", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in quiet]
    assert not any("is_gradient_checkpointing" in m for m in messages)
    assert "something the user should see" in messages
