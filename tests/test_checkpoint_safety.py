"""Checkpoint safety (issue 9, items 4 and 5): nothing is written from a non-finite state, and a resume reproduces the
uninterrupted run bit for bit in every refresh mode, or refuses."""

import copy
import os
import shutil

import pytest
import torch
import transformers
from helpers_training import (
    build_test_neighbourhood,
    tiny_base_model,
    tiny_tokenizer,
    tiny_training_setup,
    train_samples,
    training_args,
)
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

import roma_peft
from roma_peft.layer import NonFiniteAdapterError
from roma_peft.trainer import (
    NEIGHBOURHOOD_DIR,
    TARGETS_FILE,
    NonFiniteLossError,
    RomaTrainer,
    roma_parameters,
)


def make_args(out, **kw):
    return training_args(out, **{"train_sampling_strategy": "random", **kw})


@pytest.fixture(scope="module")
def setup():
    tok, samples, model, nb = tiny_training_setup()
    embeddings = torch.randn(len(samples), 8, generator=torch.Generator().manual_seed(0)).numpy()
    return tok, samples, model, nb, embeddings


# ---------------------------------------------------------------------------------------------- item 4: NaN state
@pytest.fixture(scope="module")
def fp16_setup():
    """An fp16 base model: the float32 deltas stay finite long after W + Δ overflows in fp16 (max 65504)."""
    tok = tiny_tokenizer()
    samples = train_samples(24)
    model = get_peft_model(tiny_base_model().half(), roma_peft.RomaConfig(num_layers=2))
    nb = build_test_neighbourhood(model, tok, samples)
    return tok, samples, model, nb


class SetLearningRate(transformers.TrainerCallback):
    """From optimizer step ``at`` on, use learning rate ``lr`` (a bad update in the middle of a run)."""

    def __init__(self, at, lr):
        self.at, self.lr = at, lr

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        if state.global_step >= self.at:
            for group in optimizer.param_groups:
                group["lr"] = self.lr


def test_fp16_overflow_at_the_first_update_writes_no_checkpoint(fp16_setup, tmp_path):
    """The issue's case: fp16, lr=1e4, save_steps=1. The deltas (~1e4) and W + Δ are finite in fp16, but the router
    logits overflow: checkpoint-1 used to hold that state and reload with NaN logits."""
    tok, samples, model, nb = fp16_setup
    model, nb = copy.deepcopy(model), copy.deepcopy(nb)
    args = make_args(tmp_path / "out", learning_rate=1e4, save_strategy="steps", save_steps=1, max_steps=3)
    trainer = RomaTrainer(model=model, args=args, train_dataset=samples, neighbourhood=nb, processing_class=tok)
    with pytest.raises(NonFiniteLossError, match=r"checkpoint-1.*step 1 is not finite.*No checkpoint was written"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in roma_parameters(model).values()), "deltas alone look fine"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(NonFiniteLossError, match="Refusing to save"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()


def test_bad_update_mid_run_stops_at_once_and_names_the_last_good_checkpoint(fp16_setup, tmp_path):
    """A finite delta whose W + Δ overflows in fp16: caught right after the optimizer step, before any save; the
    message names checkpoint-1, which reloads with finite logits; no save path writes the bad adapter."""
    tok, samples, model, nb = fp16_setup
    model, nb = copy.deepcopy(model), copy.deepcopy(nb)
    args = make_args(tmp_path / "out", learning_rate=1e-2, save_strategy="steps", save_steps=1, max_steps=4)
    trainer = RomaTrainer(
        model=model,
        args=args,
        train_dataset=samples,
        neighbourhood=nb,
        processing_class=tok,
        callbacks=[SetLearningRate(at=1, lr=1e5)],
    )
    last_good = os.path.join(str(tmp_path / "out"), "checkpoint-1")
    with pytest.raises(
        NonFiniteLossError,
        match=r"after the optimizer update of step 2.*W \+ Δ.*float16.*"
        rf"The last good checkpoint is {last_good}\.",
    ):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-1"]
    assert all(torch.isfinite(p).all() for p in roma_parameters(model).values()), "the deltas themselves are finite"

    with pytest.raises(NonFiniteLossError, match=r"Refusing to save.*W \+ Δ"):
        trainer.save_model(str(tmp_path / "final"))
    with pytest.raises(NonFiniteAdapterError, match=r"Refusing to save RoMA adapter 'default'.*W \+ Δ.*float16"):
        model.save_pretrained(str(tmp_path / "peft"))
    assert not (tmp_path / "peft").exists(), "a refused save_pretrained must not leave a half-written folder"
    with pytest.raises(NonFiniteAdapterError):
        get_peft_model_state_dict(model)

    reloaded = PeftModel.from_pretrained(tiny_base_model().half(), last_good)
    batch = trainer.data_collator(samples[:8])
    logits = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.isfinite(logits).all()


def test_nan_loss_names_the_last_good_checkpoint(setup, tmp_path):
    """A NaN loss after checkpoints were written names the last good one."""
    tok, samples, model, nb, _ = setup
    model, nb = copy.deepcopy(model), copy.deepcopy(nb)
    args = make_args(tmp_path / "out", save_strategy="steps", save_steps=1, max_steps=4)
    trainer = RomaTrainer(model=model, args=args, train_dataset=samples, neighbourhood=nb, processing_class=tok)

    class Poison(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                nb.routing[:] = float("nan")  # corrupt the stored targets after two good steps

    trainer.add_callback(Poison())
    last_good = os.path.join(str(tmp_path / "out"), "checkpoint-2")
    with pytest.raises(NonFiniteLossError, match=rf"step 2 .*regulariser.*The last good checkpoint is {last_good}\."):
        trainer.train()


def test_save_pretrained_refuses_nan_delta_and_never_writes_a_pickle(setup, tmp_path):
    """save_pretrained writes safetensors only and refuses a NaN delta."""
    model = copy.deepcopy(setup[2])
    with pytest.warns(UserWarning, match="safetensors"):
        model.save_pretrained(str(tmp_path / "a"), safe_serialization=False)
    assert sorted(os.listdir(tmp_path / "a")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    reloaded = PeftModel.from_pretrained(tiny_base_model(), str(tmp_path / "a"))  # what was written reads back
    for name, value in roma_parameters(model).items():
        assert torch.equal(dict(reloaded.named_parameters())[name], value)

    next(iter(roma_parameters(model).values())).data[0, 0] = float("nan")
    with pytest.raises(NonFiniteAdapterError, match=r"router 'model\.layers\.\d\.mlp\.gate'.*NaN"):
        model.save_pretrained(str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def test_train_on_a_merged_adapter_says_it_is_merged(setup, tmp_path):
    """Training a merged adapter is refused with the unmerge advice; unmerged, it trains."""
    tok, samples, model, nb, _ = setup
    model = copy.deepcopy(model)
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"merged into the base weights.*unmerge_adapter\(\)"):
        RomaTrainer(
            model=model, args=make_args(tmp_path), train_dataset=samples, neighbourhood=nb, processing_class=tok
        )
    model.unmerge_adapter()
    trainer = RomaTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=1),
        train_dataset=samples,
        neighbourhood=nb,
        processing_class=tok,
    )
    model.merge_adapter()  # merged after the trainer was built
    with pytest.raises(ValueError, match=r"merged into the base weights.*unmerge_adapter\(\)"):
        trainer.train()


# ---------------------------------------------------------------------------------------------- item 5: resume
MODES = {
    "refresh_targets": dict(refresh_targets_steps=2),
    "refresh_successful_set": dict(refresh_targets_steps=2, refresh_successful_set=True),
    "random_refresh_successful_set": dict(refresh_targets_steps=2, refresh_successful_set=True, regularizer="random"),
}


class Killed(BaseException):
    pass


def run(setup, out, mode, resume=None, kill_at=None, max_steps=6, save_steps=3):
    """Train a fresh copy; ``kill_at``: die right after transformers wrote trainer_state.json of that checkpoint."""
    tok, samples, model, nb, embeddings = setup
    model, nb = copy.deepcopy(model), copy.deepcopy(nb)
    args = make_args(out, max_steps=max_steps, save_strategy="steps", save_steps=save_steps, **MODES[mode])
    trainer = RomaTrainer(
        model=model, args=args, train_dataset=samples, neighbourhood=nb, processing_class=tok, embeddings=embeddings
    )
    if kill_at is not None:
        original = transformers.TrainerState.save_to_json

        def save_then_die(state, path):
            original(state, path)
            if state.global_step == kill_at and os.path.basename(os.path.dirname(path)) == f"checkpoint-{kill_at}":
                raise Killed  # the checkpoint now looks complete to transformers

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(transformers.TrainerState, "save_to_json", save_then_die)
            with pytest.raises(Killed):
                trainer.train()
    else:
        trainer.train(resume_from_checkpoint=resume)
    return trainer, model


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    cache = {}

    def get(mode):
        if mode not in cache:
            cache[mode] = run(setup, tmp_path_factory.mktemp(mode), mode)
        return cache[mode]

    return get


@pytest.mark.parametrize("mode", list(MODES))
def test_resume_after_a_kill_reproduces_the_uninterrupted_run_bitwise(setup, uninterrupted, tmp_path, mode):
    """Killed right after trainer_state.json of checkpoint-3 (the RoMA state used to be written after it): resuming
    from checkpoint-3 (targets refreshed at step 2, next refresh at step 4) ends with the same router deltas,
    targets, neighbourhood and random table as the uninterrupted run, bit for bit."""
    ref_trainer, ref_model = uninterrupted(mode)
    assert ref_trainer._last_refresh_step == 4 and ref_trainer._targets_refreshed
    out = tmp_path / "out"
    run(setup, out, mode, kill_at=3)
    checkpoint = out / "checkpoint-3"
    assert (checkpoint / TARGETS_FILE).exists(), "the RoMA state must be in the checkpoint before it looks complete"
    assert (checkpoint / NEIGHBOURHOOD_DIR).exists() == ("successful" in mode)
    trainer, model = run(setup, out, mode, resume=str(checkpoint))

    want = roma_parameters(ref_model)
    for name, value in roma_parameters(model).items():
        assert torch.equal(value, want[name]), (mode, name, (value - want[name]).abs().max())
    for attr in ("routing", "neighbour_index", "weights", "successful"):
        assert torch.equal(getattr(trainer.neighbourhood, attr), getattr(ref_trainer.neighbourhood, attr)), attr
    if "random" in mode:
        for attr in ("neighbour_index", "weights"):
            got, ref = (getattr(t.regularizer_neighbourhood, attr) for t in (trainer, ref_trainer))
            assert torch.equal(got, ref), attr


def test_random_control_is_redrawn_from_the_refreshed_neighbourhood(setup, uninterrupted):
    """After refresh_successful_set rebuilt S, the random control is the seeded draw from the new neighbourhood."""
    trainer, _ = uninterrupted("random_refresh_successful_set")
    nb = trainer.neighbourhood
    assert not torch.equal(nb.successful, setup[3].successful), "the refresh should have changed S"
    control, want = trainer.regularizer_neighbourhood, nb.random_control(seed=0)
    assert torch.equal(control.neighbour_index, want.neighbour_index) and torch.equal(control.weights, want.weights)
    index = control.neighbour_index
    assert bool(nb.successful[index[index >= 0]].all()), "a random neighbour outside the refreshed S"


@pytest.mark.parametrize("mode", ["refresh_targets", "refresh_successful_set"])
def test_resume_refuses_a_checkpoint_without_the_roma_state(setup, uninterrupted, tmp_path, mode):
    """A checkpoint that lost roma_targets.safetensors (or the neighbourhood) after a refresh is refused, not resumed
    silently against other targets; so is a resume with other refresh settings."""
    ref_trainer, _ = uninterrupted(mode)
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(os.path.join(ref_trainer.args.output_dir, "checkpoint-3"), checkpoint)
    tok, samples, model, nb, embeddings = setup
    with pytest.raises(ValueError, match="refresh settings"):
        RomaTrainer(
            model=copy.deepcopy(model),
            args=make_args(tmp_path / "o", max_steps=6),
            train_dataset=samples,
            neighbourhood=copy.deepcopy(nb),
            processing_class=tok,
        ).train(resume_from_checkpoint=str(checkpoint))
    if "successful" in mode:
        shutil.rmtree(checkpoint / NEIGHBOURHOOD_DIR)
        missing = NEIGHBOURHOOD_DIR
    else:
        os.remove(checkpoint / TARGETS_FILE)
        missing = TARGETS_FILE
    args = make_args(tmp_path / "o", max_steps=6, **MODES[mode])
    trainer = RomaTrainer(
        model=copy.deepcopy(model),
        args=args,
        train_dataset=samples,
        neighbourhood=copy.deepcopy(nb),
        processing_class=tok,
        embeddings=embeddings,
    )
    with pytest.raises(ValueError, match=rf"Cannot resume from {checkpoint}: it has no {missing}"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
