"""RomaTrainer: the manifold term trains, only router deltas move, lambda=0 is plain router tuning, bad input fails."""

import copy
import math
import os

import pytest
import torch
from helpers_training import fresh, saved_model_and_data, tiny_base_model, tiny_training_setup, training_args
from peft import get_peft_model

import roma_peft
from roma_peft import regularizers as R
from roma_peft.capture import collect_routing
from roma_peft.collator import PromptTruncatedError, RomaDataCollator
from roma_peft.trainer import NonFiniteLossError, RomaTrainer, roma_parameters


def make_args(tmp_path, **kw):
    return training_args(tmp_path / "out", **{"num_train_epochs": 1, "train_sampling_strategy": "sequential", **kw})


@pytest.fixture(scope="module")
def setup():
    return tiny_training_setup()


def mean_neighbour_distance(model, tok, samples, nb):
    r = collect_routing(model, tok, samples, progress=False)
    targets, weights, mask = nb.lookup(torch.arange(len(samples)))
    return float(R.manifold_loss(r, targets, weights, mask).mean())


def test_manifold_term_has_gradient_on_every_router_delta(setup, tmp_path):
    """The live routing the trainer captures carries the manifold term's gradient to every router delta."""
    tok, samples, model, nb = fresh(setup)
    trainer = RomaTrainer(
        model=model, args=make_args(tmp_path), train_dataset=samples, neighbourhood=nb, processing_class=tok
    )
    for p in roma_parameters(model).values():  # move away from the targets so the manifold term is non-zero
        p.data.normal_(std=0.5)
    batch = trainer.data_collator(samples[:8])
    with trainer.recorder:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    r = trainer.recorder.routing(batch["attention_mask"], batch["prompt_last_index"])
    loss = R.manifold_loss(r, *nb.lookup(batch["sample_index"])).mean()
    assert loss.item() > 0
    loss.backward()
    for name, p in roma_parameters(model).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_lambda_shrinks_neighbour_distance_and_only_deltas_change(setup, tmp_path):
    """Training with lambda=20 pulls routing toward the neighbours (vs base and lambda=0); only deltas move."""
    results = {}
    for lam in (0.0, 20.0):
        tok, samples, model, nb = fresh(setup)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        args = make_args(
            tmp_path, roma_lambda=lam, num_train_epochs=4, learning_rate=0.1, train_sampling_strategy="random"
        )
        RomaTrainer(model=model, args=args, train_dataset=samples, neighbourhood=nb, processing_class=tok).train()
        after = model.state_dict()
        for key, value in before.items():
            if "roma_delta" in key:
                assert not torch.equal(after[key], value), f"router delta {key} did not change"
            else:
                assert torch.equal(after[key], value), f"frozen parameter {key} changed"
        results[lam] = mean_neighbour_distance(model, tok, samples, nb)
    tok, samples, model, nb = fresh(setup)
    base = mean_neighbour_distance(model, tok, samples, nb)
    # measured: base 0.72, lambda=0 -> 1.22 (task loss alone drifts routing apart), lambda=20 -> 0.59
    assert results[20.0] < 0.9 * base, (results, base)
    assert results[20.0] < 0.7 * results[0.0], (results, base)


def test_lambda_zero_is_plain_router_tuning(setup, tmp_path):
    """lambda=0 gives the router deltas of a hand-written AdamW loop on the per-sample answer cross-entropy."""
    tok, samples, model, nb = fresh(setup)
    reference = copy.deepcopy(model)
    args = make_args(
        tmp_path,
        roma_lambda=0.0,
        num_train_epochs=2,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.01,
    )
    RomaTrainer(model=model, args=args, train_dataset=samples, neighbourhood=nb, processing_class=tok).train()

    # minimal hand-written loop over the same batches
    params = list(roma_parameters(reference).values())
    opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.01)
    collate = RomaDataCollator(tok)
    reference.train()
    for _ in range(2):
        for start in range(0, len(samples), 8):
            batch = collate(samples[start : start + 8])
            logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
            )
            per_sample = nll.sum(1) / (labels != -100).sum(1)
            per_sample.mean().backward()
            opt.step()
            opt.zero_grad()
    got, want = roma_parameters(model), roma_parameters(reference)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=0, atol=1e-6), (name, (got[name] - want[name]).abs().max())


def _first_batch_values(model, tok, samples, nb):
    """By hand, at zero deltas, on the first batch of 8: each option's mean regulariser value."""
    r0 = collect_routing(model, tok, samples[:8], progress=False)
    targets, weights, mask = nb.lookup(torch.arange(8))
    return {
        "manifold": float(
            sum(
                sum(
                    float(weights[i, j]) * float(((r0[i] - targets[i, j]) ** 2).sum())
                    for j in range(weights.shape[1])
                    if mask[i, j]
                )
                for i in range(8)
            )
            / 8
        ),
        "self": 0.0,
        "l1": 0.0,
        "l2": 0.0,
        "none": 0.0,
        "entropy": float(
            sum(-(p * p.log()).sum() for p in r0.split(8, dim=1)[0]) / 8 / 2
            + sum(-(p * p.log()).sum() for p in r0.split(8, dim=1)[1]) / 8 / 2
        ),
    }


def _logged_first_step(setup, tmp_path, regularizer, **kw):
    """Train one step at learning rate 0; return (trainer, the first log row)."""
    tok, samples, model, nb = fresh(setup)
    args = make_args(tmp_path, regularizer=regularizer, max_steps=1, learning_rate=0.0, **kw)
    trainer = RomaTrainer(model=model, args=args, train_dataset=samples, neighbourhood=nb, processing_class=tok)
    trainer.train()
    return trainer, trainer.state.log_history[0]


@pytest.mark.parametrize("name", ["manifold", "self", "l1", "l2", "none", "entropy"])
def test_logged_regularizer_matches_its_formula(setup, tmp_path, name):
    """At zero deltas: self/l1/l2/none are 0; manifold and entropy equal their hand values on the first batch."""
    tok, samples, model, nb = setup
    want = _first_batch_values(model, tok, samples, nb)[name]
    _, logged = _logged_first_step(setup, tmp_path, name)
    assert logged[f"roma/{name}_loss"] == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_random_regularizer_pulls_toward_a_fixed_random_draw(setup, tmp_path):
    """``random``: the manifold formula on the neighbourhood's random control (other neighbours, same weights)."""
    tok, samples, model, nb = setup
    trainer, logged = _logged_first_step(setup, tmp_path, "random", random_neighbours_seed=7)
    control = trainer.regularizer_neighbourhood
    assert not torch.equal(control.neighbour_index, nb.neighbour_index) and torch.allclose(control.weights, nb.weights)
    assert all(bool(nb.successful[j]) for j in control.neighbour_index[control.mask].tolist())
    r0 = collect_routing(model, tok, samples[:8], progress=False)
    want = R.manifold_loss(r0, *nb.random_control(seed=7).lookup(torch.arange(8))).mean()
    assert logged["roma/random_loss"] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("regularizer", ["random", "self"])
def test_controls_look_up_the_refreshed_targets(setup, tmp_path, regularizer):
    """With refresh_targets_steps, the random and self controls pull toward the refreshed r_j, not the base ones."""
    tok, samples, model, nb = fresh(setup)
    args = make_args(tmp_path, regularizer=regularizer, max_steps=3, refresh_targets_steps=2)
    trainer = RomaTrainer(model=model, args=args, train_dataset=samples, neighbourhood=nb, processing_class=tok)
    trainer.train()
    assert not torch.equal(trainer.neighbourhood.routing, setup[3].routing), "targets were not refreshed"
    assert torch.equal(trainer.regularizer_neighbourhood.routing, trainer.neighbourhood.routing)


def test_multiple_choice_loss_matches_scorer(setup, tmp_path):
    """loss_type="multiple_choice" logs the cross-entropy over the scorer's option log-likelihoods."""
    from roma_peft.scoring import score_multiple_choice

    tok, samples, model, nb = fresh(setup)
    args = make_args(tmp_path, loss_type="multiple_choice", max_steps=1, learning_rate=0.0, regularizer="none")
    trainer = RomaTrainer(model=model, args=args, train_dataset=samples, neighbourhood=nb, processing_class=tok)
    trainer.train()
    scores = score_multiple_choice(model, tok, samples[:8], progress=False)
    want = (
        sum(
            -torch.log_softmax(torch.tensor(ll, dtype=torch.float64), 0)[s["label"]].item()
            for ll, s in zip(scores.loglikelihoods, samples[:8])
        )
        / 8
    )
    assert trainer.state.log_history[0]["roma/task_loss"] == pytest.approx(want, rel=1e-4)


def test_accumulation_checkpointing_and_workers_match_one_big_batch(setup, tmp_path):
    """Micro-batches of 4 x 2 accumulation steps, activation checkpointing and 2 loader workers: the same deltas."""
    tok, samples, model, nb = fresh(setup)
    args = make_args(tmp_path, num_train_epochs=2)
    RomaTrainer(model=model, args=args, train_dataset=samples, neighbourhood=nb, processing_class=tok).train()
    want = roma_parameters(model)

    tok, samples, model2, nb2 = fresh(setup)
    args = make_args(
        tmp_path,
        num_train_epochs=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        activation_checkpointing=True,
        dataloader_num_workers=2,
    )
    trainer = RomaTrainer(model=model2, args=args, train_dataset=samples, neighbourhood=nb2, processing_class=tok)
    trainer.train()
    assert getattr(model2.get_base_model(), "_require_grads_hook", None) is None, (
        "enable_input_require_grads would pull the backward through every frozen layer"
    )
    for name, value in roma_parameters(model2).items():
        assert torch.allclose(value, want[name], atol=1e-5), name


def test_bf16_with_length_grouping_trains_finitely(setup, tmp_path):
    """bf16 autocast and group_by_length batches: finite losses and every router delta moves."""
    tok, samples, model3, nb3 = fresh(setup)
    args = make_args(tmp_path, bf16=True, train_sampling_strategy="group_by_length")
    trainer = RomaTrainer(model=model3, args=args, train_dataset=samples, neighbourhood=nb3, processing_class=tok)
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    assert all(p.abs().sum() > 0 for p in roma_parameters(model3).values())


@pytest.fixture(scope="module")
def refreshed_run(setup, tmp_path_factory):
    """Six steps with targets refreshed every 2, evaluation and checkpoints every 3: (args, trainer, model, nb)."""
    tmp_path = tmp_path_factory.mktemp("refresh")
    tok, samples, model, nb = fresh(setup)
    args = make_args(
        tmp_path,
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        refresh_targets_steps=2,
        eval_strategy="steps",
        eval_steps=3,
        train_sampling_strategy="random",
    )
    trainer = RomaTrainer(
        model=model, args=args, train_dataset=samples, neighbourhood=nb, processing_class=tok, eval_dataset=samples[:9]
    )
    trainer.train()
    return args, trainer, model, nb


def test_evaluation_runs_every_eval_steps(refreshed_run):
    """eval_strategy="steps" evaluates at steps 3 and 6 and logs an accuracy in [0, 1]."""
    _, trainer, _, _ = refreshed_run
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    assert [h["step"] for h in evals] == [3, 6] and all(0 <= h["eval_accuracy"] <= 1 for h in evals)


def test_refreshed_targets_are_replaced_and_checkpointed(setup, refreshed_run):
    """refresh_targets_steps replaces r_j during training and writes them into the checkpoint."""
    args, _, _, nb = refreshed_run
    assert not torch.equal(nb.routing, setup[3].routing), "targets were not refreshed"
    ckpt = os.path.join(args.output_dir, "checkpoint-3")
    assert os.path.exists(os.path.join(ckpt, "adapter_model.safetensors"))
    assert os.path.exists(os.path.join(ckpt, "roma_targets.safetensors"))


def test_resume_continues_like_the_uninterrupted_run(setup, refreshed_run):
    """Resuming from checkpoint-3 ends with the same deltas and targets and logs the same losses after step 3."""
    args, trainer, model, nb = refreshed_run
    tok, samples, model2, nb2 = fresh(setup)
    trainer2 = RomaTrainer(
        model=model2,
        args=args,
        train_dataset=samples,
        neighbourhood=nb2,
        processing_class=tok,
        eval_dataset=samples[:9],
    )
    trainer2.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-3"))
    for name, value in roma_parameters(model).items():
        assert torch.allclose(roma_parameters(model2)[name], value, atol=1e-6), name
    assert torch.allclose(nb2.routing, nb.routing, atol=1e-6)

    def after_step_3(history):
        return [(h["step"], h["loss"], h["roma/manifold_loss"]) for h in history if "loss" in h and h["step"] > 3]

    assert len(after_step_3(trainer.state.log_history)) == 3
    resumed, uninterrupted = after_step_3(trainer2.state.log_history), after_step_3(trainer.state.log_history)
    assert [row[0] for row in resumed] == [row[0] for row in uninterrupted]
    flat = [value for row in resumed for value in row[1:]]
    assert flat == pytest.approx([value for row in uninterrupted for value in row[1:]], rel=1e-5)


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _relabelled(samples):
    changed = [dict(s) for s in samples]
    changed[0]["label"] = (changed[0]["label"] + 1) % 3
    return changed


# each case: what the user passes differently (model / train_dataset / arguments / no neighbourhood), the error
BAD_INPUTS = {
    "base model without adapter": (dict(model=lambda m: tiny_base_model()), TypeError, "get_peft_model"),
    "frozen adapter": (dict(model=_frozen), ValueError, "no trainable router"),
    "fewer samples than the neighbourhood": (dict(train_dataset=lambda s: s[:20]), ValueError, "other data"),
    "changed label": (dict(train_dataset=_relabelled), ValueError, "other data"),
    "other routing position": (dict(args=dict(routing_position="first")), ValueError, "routing targets were captured"),
    "other tuned layers": (
        dict(model=lambda m: get_peft_model(tiny_base_model(), roma_peft.RomaConfig(num_layers=3))),
        ValueError,
        "routing targets were captured|dims",
    ),
    "reentrant checkpointing": (
        dict(args=dict(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})),
        ValueError,
        "use_reentrant",
    ),
    "no neighbourhood": (dict(neighbourhood=None), ValueError, "needs a neighbourhood"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_when_the_trainer_is_built(setup, tmp_path, case):
    """Each wrong model, data, argument or missing neighbourhood raises a specific error before training."""
    change, error, message = BAD_INPUTS[case]
    tok, samples, model, nb = fresh(setup)
    kwargs = dict(
        model=change.get("model", lambda m: m)(model),
        args=make_args(tmp_path, **change.get("args", {})),
        train_dataset=change.get("train_dataset", lambda s: s)(samples),
        neighbourhood=change.get("neighbourhood", nb),
        processing_class=tok,
    )
    with pytest.raises(error, match=message):
        RomaTrainer(**kwargs)


def test_negative_lambda_is_refused_by_the_arguments(tmp_path):
    """roma_lambda < 0 fails when the arguments are built."""
    with pytest.raises(ValueError, match="roma_lambda"):
        make_args(tmp_path, roma_lambda=-0.1)


def test_max_length_that_cuts_the_prompt_end_is_refused(setup, tmp_path):
    """A max_length too short for the prompt's last token raises PromptTruncatedError naming the prompt end."""
    tok, samples, model, nb = fresh(setup)
    with pytest.raises(PromptTruncatedError, match="prompt end"):
        RomaTrainer(
            model=model,
            args=make_args(tmp_path, max_length=3),
            train_dataset=samples,
            neighbourhood=nb,
            processing_class=tok,
        ).train()


def test_warmup_longer_than_the_run_warns(setup, tmp_path):
    """lambda_warmup_steps beyond the planned steps warns that lambda never reaches its value."""
    tok, samples, model, nb = fresh(setup)
    with pytest.warns(UserWarning, match="exceeds"):
        RomaTrainer(
            model=model,
            args=make_args(tmp_path, lambda_warmup_steps=100, max_steps=1),
            train_dataset=samples,
            neighbourhood=nb,
            processing_class=tok,
        ).train()


def test_nan_targets_stop_training_naming_the_step_and_component(setup, tmp_path):
    """Targets that turn NaN after two good steps stop step 2 naming the regulariser; only good checkpoints exist."""
    tok, samples, model, nb = fresh(setup)
    args = make_args(tmp_path, save_strategy="steps", save_steps=1, num_train_epochs=2)
    trainer = RomaTrainer(model=model, args=args, train_dataset=samples, neighbourhood=nb, processing_class=tok)

    class Poison(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                nb.routing[:] = float("nan")  # corrupt the stored targets after two good steps

    trainer.add_callback(Poison())
    with pytest.raises(NonFiniteLossError, match=r"step 2 .*regulariser \(manifold\)"):
        trainer.train()
    saved = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert saved == ["checkpoint-1", "checkpoint-2"]


@pytest.fixture
def nan_delta_trainer(setup, tmp_path):
    """A trainer whose first router delta holds a NaN."""
    tok, samples, model, nb = fresh(setup)
    next(iter(roma_parameters(model).values())).data[0, 0] = float("nan")
    return RomaTrainer(
        model=model, args=make_args(tmp_path / "b"), train_dataset=samples, neighbourhood=nb, processing_class=tok
    )


def test_nan_delta_stops_at_step_zero_naming_the_task_loss(nan_delta_trainer):
    """A NaN router delta makes the task loss NaN: training stops at step 0 and names the delta."""
    with pytest.raises(NonFiniteLossError, match=r"step 0 .*task loss .*Router deltas with NaN"):
        nan_delta_trainer.train()


def test_save_model_refuses_a_nan_delta(nan_delta_trainer, tmp_path):
    """save_model writes nothing from a non-finite adapter."""
    with pytest.raises(NonFiniteLossError, match="Refusing to save"):
        nan_delta_trainer.save_model(str(tmp_path / "nan-adapter"))
    assert not (tmp_path / "nan-adapter" / "adapter_model.safetensors").exists()


def test_cli_neighbours_train_evaluate_merge(tmp_path):
    """A CLI session: neighbours, train with evaluation, a refused layer mismatch, evaluate, merge, exit codes."""
    from roma_peft.cli import main, run

    common = saved_model_and_data(tmp_path) + ["--num_layers", "2"]
    model_dir, data = tmp_path / "model", tmp_path / "train.jsonl"
    summary = run(["neighbours", *common, "--output_dir", str(tmp_path / "nb"), "--k", "2"])
    assert summary["n_samples"] == 24 and summary["routing_spec"].startswith("last1:probs@")
    metrics = run(
        [
            "train",
            *common,
            "--neighbourhood_dir",
            str(tmp_path / "nb"),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--use_cpu",
            "true",
            "--eval_file",
            str(data),
        ]
    )
    assert 0 <= metrics["eval_accuracy"] <= 1 and (tmp_path / "out" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="--num_layers 3 .*built with 2"):  # layers differ from the neighbourhood's
        run(
            [
                "train",
                "--model_name_or_path",
                str(model_dir),
                "--train_file",
                str(data),
                "--num_layers",
                "3",
                "--neighbourhood_dir",
                str(tmp_path / "nb"),
                "--output_dir",
                str(tmp_path / "bad"),
                "--max_steps",
                "1",
                "--report_to",
                "none",
                "--use_cpu",
                "true",
            ]
        )
    evaluated = run(
        [
            "evaluate",
            "--model_name_or_path",
            str(model_dir),
            "--adapter_path",
            str(tmp_path / "out"),
            "--eval_file",
            str(data),
        ]
    )
    assert evaluated["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"])
    run(
        [
            "merge",
            "--model_name_or_path",
            str(model_dir),
            "--adapter_path",
            str(tmp_path / "out"),
            "--output_dir",
            str(tmp_path / "merged"),
        ]
    )
    assert (tmp_path / "merged" / "config.json").exists()
    with pytest.raises(SystemExit):
        run(["no-such-command"])
    # the console entry point: exit status, one clear line instead of a traceback
    assert (
        main(
            [
                "evaluate",
                "--model_name_or_path",
                str(model_dir),
                "--adapter_path",
                str(tmp_path / "out"),
                "--eval_file",
                str(data),
            ]
        )
        == 0
    )
    assert main(["evaluate", "--model_name_or_path", str(model_dir), "--eval_file", str(tmp_path / "none.jsonl")]) == 2


def test_refresh_successful_set_rebuilds_s_from_the_current_model(setup, tmp_path):
    """With refresh_successful_set, S, N(i) and r_j are rebuilt from what the current model answers correctly."""
    from roma_peft.scoring import score_multiple_choice

    tok, samples, model, nb = fresh(setup)
    embeddings = torch.randn(len(samples), 8, generator=torch.Generator().manual_seed(0)).numpy()
    args = make_args(tmp_path, max_steps=4, refresh_targets_steps=2, refresh_successful_set=True)
    trainer = RomaTrainer(
        model=model, args=args, train_dataset=samples, neighbourhood=nb, processing_class=tok, embeddings=embeddings
    )
    trainer.train()
    assert trainer.neighbourhood is not nb, "S and the neighbourhoods were not rebuilt during training"
    trainer.refresh_targets()  # once more, now that the model is fixed, to compare with a fresh scoring
    refreshed = trainer.neighbourhood
    correct = score_multiple_choice(model, tok, samples, progress=False).correct
    assert refreshed.successful.tolist() == correct, "S is not what the current model answers correctly"
    assert correct != nb.successful.tolist(), "the fixture's S (every even sample) should differ from the model's"
    valid = refreshed.neighbour_index[refreshed.neighbour_index >= 0]
    assert bool(refreshed.successful[valid].all()), "a neighbour outside the refreshed S"
    assert torch.allclose(refreshed.routing, collect_routing(model, tok, samples, progress=False))


def test_refresh_successful_set_without_embeddings_is_refused(setup, tmp_path):
    """refresh_successful_set needs the task embeddings to rebuild the neighbourhoods."""
    tok, samples, model, nb = fresh(setup)
    with pytest.raises(ValueError, match="refresh_successful_set needs"):
        RomaTrainer(
            model=model,
            args=make_args(tmp_path, refresh_successful_set=True, refresh_targets_steps=2),
            train_dataset=samples,
            neighbourhood=nb,
            processing_class=tok,
        )
