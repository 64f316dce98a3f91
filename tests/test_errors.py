"""Bad input gets a clear, specific error (what was wrong and what to do)."""

import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import roma_peft
from conftest import make_tiny_olmoe


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return LlamaForCausalLM(cfg)


@pytest.fixture
def adapter_dir(tmp_path):
    model = get_peft_model(make_tiny_olmoe(), roma_peft.RomaConfig(num_layers=2))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_dense_model_has_no_routers():
    with pytest.raises(roma_peft.NoRoutersFoundError, match="No MoE router found in this llama model") as err:
        get_peft_model(tiny_llama(), roma_peft.RomaConfig())
    assert "_can_record_outputs" in str(err.value) and "target_modules" in str(err.value)


def test_target_modules_matching_nothing():
    with pytest.raises(roma_peft.NoRoutersFoundError, match=r"matched none of the 6 routers found: model.layers.0.mlp.gate"):
        get_peft_model(make_tiny_olmoe(), roma_peft.RomaConfig(target_modules=["mlp.router"]))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(moe_layer_indices=[6]), "MoE-layer index 6 is out of range: the model has 6 MoE layers"),
        (dict(moe_layer_indices=[-7]), "out of range"),
        (dict(num_layers=7), "num_layers=7 but the model has only 6 MoE layers"),
        (dict(layer_selection="first", num_layers=9), "only 6 MoE layers"),
    ],
)
def test_layer_selection_out_of_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(make_tiny_olmoe(), roma_peft.RomaConfig(**kwargs))


def test_layer_selection_counts_moe_layers_only():
    from families import FAMILIES

    # DeepSeek-V3 tiny: 4 decoder layers, the first dense -> 3 MoE layers; index 3 points past them.
    with pytest.raises(ValueError, match="the model has 3 MoE layers.*dense layers have no router"):
        get_peft_model(FAMILIES["deepseek_v3"].build(), roma_peft.RomaConfig(moe_layer_indices=[3]))


def test_bad_config_values():
    with pytest.raises(ValueError, match="layer_selection must be one of"):
        roma_peft.RomaConfig(layer_selection="last5")
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        roma_peft.RomaConfig(num_layers=0)
    with pytest.raises(ValueError, match="use moe_layer_indices|moe_layer_indices, which count MoE layers only"):
        roma_peft.RomaConfig(layers_to_transform=[1, 3])


def test_router_shape_mismatch_names_router_and_shapes(adapter_dir):
    with pytest.raises(ValueError, match=r"Router shape mismatch at 'model.layers.4.mlp.gate'.*\(8, 32\).*\(4, 32\)"):
        PeftModel.from_pretrained(make_tiny_olmoe(num_experts=4), adapter_dir)


def test_layer_count_mismatch(adapter_dir):
    with pytest.raises(ValueError, match="made for a base model with 6 MoE layers, but this OlmoeForCausalLM has 8"):
        PeftModel.from_pretrained(make_tiny_olmoe(num_hidden_layers=8), adapter_dir)
    with pytest.raises(ValueError, match=r"adapts router 'model.layers.4.mlp.gate', which does not exist.*6 MoE layers; this one has 4"):
        PeftModel.from_pretrained(make_tiny_olmoe(num_hidden_layers=4), adapter_dir)


def test_adapter_on_dense_model(adapter_dir):
    with pytest.raises(roma_peft.NoRoutersFoundError, match="has no MoE router"):
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)


def test_partial_checkpoint_is_refused(adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors.pop("base_model.model.model.layers.5.mlp.gate.roma_delta")
    save_file(tensors, path)
    with pytest.raises(ValueError, match="no delta for router 'base_model.model.model.layers.5.mlp.gate'|no delta for router 'model.layers.5.mlp.gate'"):
        PeftModel.from_pretrained(make_tiny_olmoe(), adapter_dir)


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        PeftModel.from_pretrained(make_tiny_olmoe(), str(tmp_path / "does-not-exist"))


def test_missing_weights(adapter_dir):
    os.remove(adapter_dir / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors.*weights are missing"):
        PeftModel.from_pretrained(make_tiny_olmoe(), adapter_dir)


def test_corrupt_weights(adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        PeftModel.from_pretrained(make_tiny_olmoe(), adapter_dir)


def test_corrupt_config(adapter_dir):
    (adapter_dir / "adapter_config.json").write_text('{"peft_type": "ROMA", ')
    with pytest.raises(ValueError, match="adapter_config.json is corrupt"):
        roma_peft.RomaConfig.from_pretrained(str(adapter_dir))


def test_pickled_weights_are_never_loaded(adapter_dir, monkeypatch):
    os.rename(adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match="safetensors only; pickled weights are never unpickled"):
        PeftModel.from_pretrained(make_tiny_olmoe(), adapter_dir)


def test_tied_routers_are_refused_with_a_clear_error():
    # Two routers sharing one tensor (as DiffusionGemma's encoder/decoder routers do) would each get their own delta
    # and merging would write both into the shared tensor: refuse instead of merging inexactly.
    from conftest import make_tiny_olmoe

    model = make_tiny_olmoe()
    layers = model.model.layers
    layers[4].mlp.gate.weight = layers[5].mlp.gate.weight
    with pytest.raises(ValueError, match=r"share one weight tensor \(tied routers\).*exclude_modules"):
        get_peft_model(model, roma_peft.RomaConfig(num_layers=2))
    # excluding the tied pair, as the message says, works: the last 2 remaining MoE layers are adapted
    config = roma_peft.RomaConfig(num_layers=2, exclude_modules=["model.layers.4.mlp.gate", "model.layers.5.mlp.gate"])
    ok = get_peft_model(model, config)
    assert sorted(ok.base_model.roma_layers()) == ["model.layers.2.mlp.gate", "model.layers.3.mlp.gate"]
