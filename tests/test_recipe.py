"""The paper's recipe as files: shipped recipes load and plan offline, bad recipes fail clearly, and the tiny-offline
recipe runs end to end (mix -> S -> train -> lm-eval + letter evaluation -> report) on the shipped tiny model."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from roma_peft.recipe import (
    RecipeError,
    cmd_recipe,
    estimate_parameters,
    load_recipe,
    plan_recipe,
    run_recipe,
    shipped_recipes,
)

PAPER_RECIPES = ("olmoe-1b-7b-0125-instruct", "qwen3-30b-a3b", "deepseek-moe-16b")
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")


def test_the_three_paper_recipes_and_the_tiny_one_are_shipped():
    assert set(PAPER_RECIPES) | {"tiny-offline"} <= set(shipped_recipes())


@pytest.mark.parametrize("name", PAPER_RECIPES + ("tiny-offline",))
def test_every_shipped_recipe_loads_and_its_dry_run_prints_a_plan(name, capsys):
    out = cmd_recipe([name, "--dry_run"])
    printed = capsys.readouterr().out
    recipe = load_recipe(name)
    assert printed.startswith(f"recipe {name}: ")
    for section in (
        "training mix:",
        "S: base scoring",
        "optimizer steps",
        "GPU memory",
        "time (estimate)",
        "assumptions:",
        "an assumption, not a measurement",
    ):
        assert section in printed
    assert out["plan"]["mix_size"] == recipe.data.size
    assert set(out["plan"]["evaluation"]) == set(recipe.evaluation.benchmarks)


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_follow_the_paper(name):
    recipe = load_recipe(name)
    from roma_peft.recipe_data import PAPER_COUNTS

    assert recipe.data.sources == PAPER_COUNTS and recipe.data.size == 49_000
    assert (recipe.neighbourhood.k, recipe.adapter.num_layers, recipe.adapter.layer_selection) == (3, 5, "last")
    assert recipe.evaluation.benchmarks == [
        "mmlu",
        "hellaswag",
        "piqa",
        "arc_challenge",
        "arc_easy",
        "winogrande",
        "boolq",
        "gsm8k",
    ]
    assert {"base", "router_tuning", "roma"} <= set(recipe.variants)
    assert recipe.training.per_device_train_batch_size * recipe.training.gradient_accumulation_steps == 32
    assert recipe.model.trust_remote_code == (name == "deepseek-moe-16b")


def test_plan_numbers_match_hand_computation():
    recipe = load_recipe("olmoe-1b-7b-0125-instruct")
    plan = plan_recipe(recipe)
    assert plan.mix_size == 49_000
    assert plan.steps_per_run == math.ceil(49_000 / 32) * 3 == 4_596
    assert len(plan.runs) == 5 * 3  # router_tuning, roma, random, self, l2 x seeds 0-2; base is not trained
    # one forward row per option: bigbench 4 (estimated mean), super_glue 2.03, csqa 5, siqa 3, obqa 4, sciq 4,
    # multirc 4 (estimated mean), knowref 2
    assert plan.passes["base_scoring"]["forward_rows"] == (
        10_000 * 4 + 10_000 * 2.03 + 8_000 * 5 + 8_000 * 3 + 3_000 * 4 + 3_000 * 4 + 4_000 * 4 + 3_000 * 2
    )
    assert plan.passes["routing_capture"]["forward_rows"] == 49_000
    assert plan.passes["training"]["forward_backward_rows"] == 15 * 49_000 * 3
    assert plan.evaluation["mmlu"]["items"] == 14_042 and plan.evaluation["gsm8k"]["items"] == 1_000
    assert plan.evaluation["mmlu"]["per_model"] == {
        "lm_eval": {"forward_rows": 4 * 14_042},
        "letter": {"forward_rows": 14_042},
    }
    assert plan.evaluation["mmlu"]["models"] == 16  # base + 15 trained runs
    assert plan.memory["weights"] == 6_919_161_856 * 2  # bf16
    assert plan.memory["router_delta_params"] == 5 * 64 * 2048
    assert plan.memory["optimizer"] == 5 * 64 * 2048 * 16
    # activations: 32 rows x 1024 tokens x 5 layers x (attention 2h+3h+3h + MoE 2h+2E+8(h+3I)) x 2 bytes
    assert plan.memory["activations"] == 32 * 1024 * 5 * (8 * 2048 + 2 * 2048 + 2 * 64 + 8 * (2048 + 3 * 1024)) * 2
    on_eight = plan_recipe(recipe, world_size=8)
    assert on_eight.steps_per_run == math.ceil(49_000 / (32 * 8)) * 3 == 576
    assert on_eight.time_s["total"] == pytest.approx(plan.time_s["total"] / 8)
    # Qwen3 and DeepSeekMoE keep the global batch of 32 with gradient accumulation: the same number of steps
    for name in ("qwen3-30b-a3b", "deepseek-moe-16b"):
        assert plan_recipe(load_recipe(name)).steps_per_run == 4_596
    # DeepSeekMoE's layer 0 is dense: its last 5 MoE layers are decoder layers 23-27
    assert plan_recipe(load_recipe("deepseek-moe-16b")).memory["router_delta_params"] == 5 * 64 * 2048


def _meta_count(config) -> int:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_architecture_facts_agree_with_transformers_classes():
    """The recipes' parameter counts: OLMoE and Qwen3-MoE built on the meta device from the recipe's facts (no
    download); every recipe within 0.02 % of the formula (which leaves out the norm weights)."""
    from transformers import OlmoeConfig, Qwen3MoeConfig

    facts = {name: load_recipe(name).architecture for name in PAPER_RECIPES}
    o = facts["olmoe-1b-7b-0125-instruct"]
    olmoe = OlmoeConfig(
        vocab_size=o.vocab_size,
        hidden_size=o.hidden_size,
        intermediate_size=o.moe_intermediate_size,
        num_hidden_layers=o.num_hidden_layers,
        num_attention_heads=o.num_attention_heads,
        num_key_value_heads=o.num_key_value_heads,
        num_experts=o.num_experts,
        num_experts_per_tok=o.experts_per_token,
        tie_word_embeddings=o.tie_word_embeddings,
    )
    assert _meta_count(olmoe) == o.params_total
    q = facts["qwen3-30b-a3b"]
    qwen = Qwen3MoeConfig(
        vocab_size=q.vocab_size,
        hidden_size=q.hidden_size,
        moe_intermediate_size=q.moe_intermediate_size,
        num_hidden_layers=q.num_hidden_layers,
        num_attention_heads=q.num_attention_heads,
        num_key_value_heads=q.num_key_value_heads,
        head_dim=q.head_dim,
        num_experts=q.num_experts,
        num_experts_per_tok=q.experts_per_token,
        tie_word_embeddings=q.tie_word_embeddings,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    assert _meta_count(qwen) == q.params_total
    for name, arch in facts.items():
        total, active = estimate_parameters(arch)
        assert total == pytest.approx(arch.params_total, rel=1e-4), name
        assert active == pytest.approx(arch.params_active, rel=2e-4), name
        unused = (
            arch.moe_layers
            * (arch.num_experts - arch.experts_per_token)
            * 3
            * arch.hidden_size
            * arch.moe_intermediate_size
        )
        assert arch.params_total - arch.params_active == unused, name
    # the paper's own figures (Sec. 5.1): OLMoE 6.9B / 1.3B, DeepSeekMoE 16.4B / 2.8B
    assert round(o.params_total / 1e9, 1) == 6.9 and round(o.params_active / 1e9, 1) == 1.3
    d = facts["deepseek-moe-16b"]
    assert round(d.params_total / 1e9, 1) == 16.4 and round(d.params_active / 1e9, 1) == 2.8


def test_tiny_plan_weights_are_the_real_parameter_bytes_of_the_shipped_model():
    from roma_peft.loading import load_model_and_tokenizer

    recipe = load_recipe("tiny-offline")
    model, _ = load_model_and_tokenizer(recipe.model.path(), dtype="float32", device_map="cpu")
    params = list(model.parameters())  # tied embeddings are counted once
    assert sum(p.numel() for p in params) == recipe.architecture.params_total
    assert plan_recipe(recipe).memory["weights"] == sum(p.numel() * p.element_size() for p in params)
    assert estimate_parameters(recipe.architecture)[0] == pytest.approx(recipe.architecture.params_total, rel=2e-3)


def test_activation_estimate_bounds_what_the_tiny_model_keeps_for_backward():
    """The memory formula against the tensors autograd really saves in a forward through the tiny model with the last
    2 of 4 routers tuned (everything else frozen): same order of magnitude, not below half of it."""
    from peft import get_peft_model

    import roma_peft
    from roma_peft.loading import load_model_and_tokenizer
    from roma_peft.recipe import activation_elements_per_token

    recipe = load_recipe("tiny-offline")
    model, _ = load_model_and_tokenizer(recipe.model.path(), dtype="float32", device_map="cpu")
    model = get_peft_model(model, roma_peft.RomaConfig(num_layers=2))
    batch, tokens = 8, 24
    ids = torch.randint(3, recipe.architecture.vocab_size, (batch, tokens))
    saved: dict[int, int] = {}

    def pack(t):  # one entry per storage: views of one tensor are kept once
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, logits_to_keep=1).logits.sum().backward()
    measured = sum(n for ptr, n in saved.items() if ptr not in weights)
    arch = recipe.architecture
    estimate = batch * tokens * 2 * activation_elements_per_token(arch) * 4
    assert 0.5 * estimate <= measured <= 2.0 * estimate, (measured, estimate)


# ---------------------------------------------------------------------------------------------- bad recipes
def _recipe_dict(**changes) -> dict:
    import yaml

    with open(Path(load_recipe("olmoe-1b-7b-0125-instruct").base_dir) / "olmoe-1b-7b-0125-instruct.yaml") as f:
        data = yaml.safe_load(f)
    for path, value in changes.items():
        node = data
        *parents, last = path.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return data


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"data__sources": {"comonsense_qa": 8000}}, "data.sources: unknown source 'comonsense_qa'"),
        (
            {"evaluation__benchmarks": ["mmlu", "hellaswag2"]},
            "evaluation.benchmarks: unknown benchmark(s) ['hellaswag2']",
        ),
        (
            {"variants": ["base", "roma", "lora"]},
            "variants: unknown variant(s) ['lora']; valid: ['base', 'router_tuning'",
        ),
        ({"training__learning_rate": "fast"}, "training.learning_rate must be float, got str 'fast'"),
        ({"training__per_device_train_batch_size": 3.5}, "training.per_device_train_batch_size must be int"),
        ({"training__lr": 1e-4}, "training: unknown field(s) ['lr']; valid: ["),
        ({"training__extra": {"lerning_rate": 1e-4}}, "training.extra.lerning_rate: not a RomaTrainingArguments field"),
        ({"evaluation__protocols": ["lm_eval", "letters"]}, "evaluation.protocols[1]: 'letters' is not one of"),
        ({"model__dtype": "fp8"}, "model.dtype: 'fp8' is not one of"),
        ({"adapter__num_layers": 17}, "adapter.num_layers (17) exceeds the model's MoE layers (16"),
        ({"data__sources": {"sciq": -1}}, "data.sources.sciq must be a sample count"),
        ({"seeds": [0, 0]}, "seeds must be a non-empty list of distinct integers"),
    ],
)
def test_bad_recipes_are_refused_naming_the_field(changes, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(_recipe_dict(**changes))
    assert message in str(err.value)


def test_bad_recipe_files_and_command_lines(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="cannot be parsed"):
        load_recipe(str(bad))
    with pytest.raises(RecipeError, match=r"no recipe 'olmoe-7b'.*shipped recipe \(\["):
        load_recipe("olmoe-7b")
    with pytest.raises(RecipeError, match="needs a recipe first"):
        cmd_recipe(["--dry_run"])
    with pytest.raises(RecipeError, match="--output_dir is required"):
        cmd_recipe(["tiny-offline"])
    with pytest.raises(RecipeError, match=r"stages: unknown stage\(s\) \['trian'\]"):
        run_recipe(load_recipe("tiny-offline"), str(tmp_path / "out"), stages=["trian"])
    as_json = tmp_path / "r.json"
    as_json.write_text(json.dumps(_recipe_dict(data__local_copies={"sciq": "missing/sciq.jsonl"})))
    recipe = load_recipe(str(as_json))  # JSON works; a missing local file is refused before anything runs
    with pytest.raises(FileNotFoundError, match=r"data.local_copies.sciq '.*missing/sciq.jsonl' does not exist"):
        run_recipe(recipe, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- end to end
def test_tiny_offline_recipe_runs_end_to_end_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "run")
    result = cmd_recipe(["tiny-offline", "--output_dir", out])
    printed = capsys.readouterr()
    assert result["stages"]["train"] == {"router_tuning-seed0": "done", "roma-seed0": "done"}
    assert result["records"] == 3 * 8 * 2  # base, router_tuning, roma x 8 benchmarks x 2 protocols

    mix = json.loads(Path(out, "data", "mix.json").read_text())
    assert mix["drawn"] == {"openbookqa": 16, "sciq": 16, "bigbench": 16}
    assert Path(out, "neighbourhood", "neighbourhood.json").is_file()
    # the stage configs are plain `roma-peft train --config` files: the variant decides the regulariser
    import yaml

    roma = yaml.safe_load(Path(out, "stages", "train-roma-seed0.yaml").read_text())
    tuning = yaml.safe_load(Path(out, "stages", "train-router_tuning-seed0.yaml").read_text())
    assert (roma["regularizer"], roma["roma_lambda"]) == ("manifold", 0.8)
    assert (tuning["regularizer"], tuning["roma_lambda"]) == ("none", 0.0)
    from safetensors.torch import load_file

    deltas = load_file(os.path.join(out, "train", "roma-seed0", "adapter_model.safetensors"))
    assert deltas and all(t.abs().max() > 0 for t in deltas.values())  # three steps moved every tuned router

    results = json.loads(Path(out, "report", "results.json").read_text())["records"]
    assert {(r["variant"], r["protocol"]) for r in results} == {
        (v, p) for v in ("base", "router_tuning", "roma") for p in ("lm_eval", "letter")
    }
    letter_gsm8k = [r for r in results if r["benchmark"] == "gsm8k" and r["protocol"] == "letter"]
    assert all(r["accuracy"] is None for r in letter_gsm8k)  # not applicable: no options
    assert all(r["n"] == 20 for r in results if r["benchmark"] == "mmlu")
    report = Path(out, "report", "report.md").read_text()
    assert "| variant | seeds | MMLU | HellaSwag | ARC-C | ARC-E | PIQA | WinoGrande | BoolQ | GSM8K | avg |" in report
    assert "| roma | 1 |" in report and report in printed.out
    assert "Plan" not in printed.err and "stage train roma-seed0: roma-peft train --config" in printed.err
    assert Path(out, "plan.txt").read_text().startswith("recipe tiny-offline:")

    # a second run finds every stage on disk and only rewrites the report
    again = cmd_recipe(["tiny-offline", "--output_dir", out])
    err = capsys.readouterr().err
    assert again["stages"]["mix"] == again["stages"]["neighbours"] == "skipped"
    assert again["stages"]["train"] == {"router_tuning-seed0": "skipped", "roma-seed0": "skipped"}
    assert "stage evaluate roma-seed0: skipped" in err and again["records"] == 48
    # other training settings in the same output_dir are refused, naming what changed
    changed = load_recipe(
        "tiny-offline", {"training": {**load_recipe("tiny-offline").training.__dict__, "learning_rate": 0.5}}
    )
    with pytest.raises(FileExistsError, match=r"other settings \(training.learning_rate\)"):
        run_recipe(changed, out)
