"""The model card of a trained RoMA adapter: base model, tuned routers, every RoMA setting, data, final metrics, how
to load it with and without roma_peft, the citation; never the Trainer's "unknown dataset" draft."""

import pytest
import torch
from helpers_training import build_test_neighbourhood, tiny_peft_model, tiny_tokenizer, train_samples, training_args

from roma_peft.data import data_hash
from roma_peft.trainer import RomaTrainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("card")
    tok, samples = tiny_tokenizer(), train_samples(24)
    model = tiny_peft_model()
    nb = build_test_neighbourhood(model, tok, samples, k=2)
    args = training_args(
        out / "run",
        max_steps=3,
        roma_lambda=0.5,
        lambda_warmup_steps=2,
        routing_representation="probs",
        eval_strategy="steps",
        eval_steps=3,
    )
    trainer = RomaTrainer(
        model=model,
        args=args,
        train_dataset=samples,
        neighbourhood=nb,
        processing_class=tok,
        eval_dataset=train_samples(9, seed=3),
    )
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    return trainer, nb, samples, (out / "adapter" / "README.md").read_text()


def test_saved_card_lists_every_setting_and_the_final_metrics(trained):
    trainer, nb, samples, card = trained
    assert "unknown dataset" not in card and "trained from scratch" not in card
    assert "[More Information Needed]" not in card  # PEFT's unfilled template is dropped
    assert "library_name: peft" in card and "ROMA" in card
    # base model and tuned routers
    assert "Tuned routers (2): `model.layers.2.mlp.gate`, `model.layers.3.mlp.gate`" in card
    assert "Tuned decoder layers: [2, 3]" in card
    # every RoMA setting
    for row in (
        "| regularizer | `manifold` |",
        "| lambda (`roma_lambda`) | 0.5 |",
        "| lambda warm-up steps | 2 |",
        f"| routing spec (r_i: position, representation @ routers) | `{trainer.routing_spec_string}` |",
        "| routing position / tokens / representation | `last / 1 / probs` |",
        "| task loss (`loss_type`) | `causal_lm` |",
        "| method | `knn` |",
        "| k | 2 |",
        f"| sigma used | {nb.sigma:.4g} |",
        "| embedding model |",
        f"| \\|S\\| (successful training samples) | {int(nb.successful.sum())} |",
        "| training samples | 24 |",
        f"`{data_hash(samples)}`",
        "| evaluation samples | 9 |",
        "| optimizer steps | 3 |",
    ):
        assert row in card, row
    # final metrics, with the names `roma-peft train` / `evaluate` report
    last_eval = [h for h in trainer.state.log_history if "eval_accuracy" in h][-1]
    assert f"| eval_accuracy | {last_eval['eval_accuracy']:.4f} ± {last_eval['eval_accuracy_stderr']:.4f} |" in card
    assert "| eval_loss |" in card and "| train_loss (mean over the run) |" in card
    # how to load it, with and without roma_peft, and the paper
    assert "import roma_peft" in card and "PeftModel.from_pretrained(base," in card
    assert "roma-peft export-lora" in card and "roma-peft merge" in card and "docs/export.md" in card
    assert "Routing Manifold Alignment Improves Generalization of Mixture-of-Experts LLMs" in card
    assert "arXiv:2511.07419" in card and "Zhongyang Li" in card


def test_create_model_card_is_the_roma_card(trained, tmp_path):
    """Trainer.create_model_card (what push_to_hub writes) gives the RoMA card, not the generic Trainer draft."""
    trainer = trained[0]
    trainer.args.output_dir = str(tmp_path)
    trainer.save_model()
    trainer.create_model_card(license="apache-2.0", tags=["my-tag"], dataset_tags=["my/data"])
    card = (tmp_path / "README.md").read_text()
    assert "unknown dataset" not in card and "generated_from_trainer" not in card
    assert "license: apache-2.0" in card and "my-tag" in card and "my/data" in card
    assert card.count("<!-- roma_peft:begin -->") == 1 and "| regularizer | `manifold` |" in card
    trainer.create_model_card()  # idempotent
    assert (tmp_path / "README.md").read_text().count("# RoMA router adapter for") == 1


def test_card_of_an_untrained_adapter_has_no_training_section(tmp_path):
    model = tiny_peft_model()
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "## Training" not in card and "## How to load it" in card and "## Citation" in card
    assert "base_model: ''" not in card and "'base_model:adapter:'" not in card  # a base without a name
