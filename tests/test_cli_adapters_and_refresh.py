"""``merge`` / ``export-lora --adapter_name`` pick one adapter of a multi-adapter directory, and
``train --refresh_successful_set`` rebuilds S from the command line, as a user types them."""

import json

import torch
from helpers_cli import one_line_error, run_cli
from helpers_training import saved_model_and_data
from peft import get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import roma_peft


def _two_adapter_directory(model_dir, directory):
    """A RoMA model with two adapters of random deltas, saved the PEFT way ('default' at the top, 'sharp/' below);
    returns {adapter: {router weight key of the stock model: expected merged weight}}."""
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), roma_peft.RomaConfig(num_layers=2, init_weights=False)
    )
    model.add_adapter("sharp", roma_peft.RomaConfig(num_layers=2, init_weights=False))
    model.save_pretrained(directory)
    expected = {"default": {}, "sharp": {}}
    for name, module in model.named_modules():
        if isinstance(module, roma_peft.RomaLayer):
            key = name.removeprefix("base_model.model.") + ".weight"
            for adapter in expected:
                expected[adapter][key] = module.get_base_layer().weight.detach() + module.roma_delta[adapter].detach()
    assert (directory / "sharp" / "adapter_config.json").is_file()
    return expected


def _merged_routers(directory, keys):
    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(load_file(path))
    return {key: state[key] for key in keys}


def test_merge_and_export_the_named_adapter_of_a_multi_adapter_directory(tmp_path, capsys):
    common = saved_model_and_data(tmp_path, num_layers=3, n=8)
    adapters = tmp_path / "adapters"
    expected = _two_adapter_directory(common[1], adapters)
    for adapter in ("sharp", "default"):
        out = tmp_path / f"merged-{adapter}"
        status, err = run_cli(
            capsys,
            "merge",
            "--model_name_or_path",
            common[1],
            "--adapter_path",
            adapters,
            "--adapter_name",
            adapter,
            "--output_dir",
            out,
        )
        assert status == 0, err
        merged = _merged_routers(out, expected[adapter])
        for key, weight in expected[adapter].items():
            torch.testing.assert_close(merged[key].float(), weight.float(), rtol=0, atol=1e-6)
    status, err = run_cli(
        capsys,
        "export-lora",
        "--model_name_or_path",
        common[1],
        "--adapter_path",
        adapters,
        "--adapter_name",
        "sharp",
        "--output_dir",
        tmp_path / "lora",
    )
    assert status == 0, err
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    status, err = run_cli(
        capsys,
        "merge",
        "--model_name_or_path",
        common[1],
        "--adapter_path",
        adapters,
        "--adapter_name",
        "shrap",
        "--output_dir",
        tmp_path / "typo",
    )
    assert status == 2
    assert "has no adapter of that name" in one_line_error(err, "merge") and "'default', 'sharp'" in err


def test_train_refreshes_the_successful_set_from_the_command_line(tmp_path, capsys):
    common = saved_model_and_data(tmp_path, num_layers=3, n=16)
    nb = tmp_path / "nb"
    assert run_cli(capsys, "neighbours", *common, "--output_dir", nb, "--k", "2", "--num_layers", "2")[0] == 0
    out = tmp_path / "out"
    # learning rate 0: the routers stay the base model's, so the neighbourhood rebuilt at step 1 (re-scored S,
    # re-embedded samples) must be the one `neighbours` saved; other embeddings would give other neighbours
    status, err = run_cli(
        capsys,
        "train",
        *common,
        "--neighbourhood_dir",
        nb,
        "--output_dir",
        out,
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "0",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--routing_plot_samples",
        "0",
        "--refresh_targets_steps",
        "1",
        "--refresh_successful_set",
        "true",
    )
    assert status == 0, err
    checkpoint = out / "checkpoint-2"
    with safe_open(str(checkpoint / "roma_targets.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["refresh_successful_set"] == "true" and meta["last_refresh_step"] == "1"
    rebuilt = load_file(checkpoint / "roma_neighbourhood" / "neighbourhood.safetensors")
    saved = load_file(nb / "neighbourhood.safetensors")
    assert torch.equal(rebuilt["successful"], saved["successful"])
    assert torch.equal(rebuilt["neighbour_index"], saved["neighbour_index"])
    torch.testing.assert_close(rebuilt["weights"], saved["weights"])


def test_refresh_successful_set_needs_a_neighbourhood_and_a_refresh_interval(tmp_path, capsys):
    common = saved_model_and_data(tmp_path, num_layers=3, n=8)
    argv = [
        "train",
        *common,
        "--output_dir",
        tmp_path / "out",
        "--regularizer",
        "none",
        "--refresh_successful_set",
        "true",
    ]
    status, err = run_cli(capsys, *argv)
    assert status == 2
    line = one_line_error(err, "train")
    assert "--neighbourhood_dir" in line and "--refresh_targets_steps N > 0 (got 0)" in line
    assert not (tmp_path / "out").exists()
