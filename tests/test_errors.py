"""Bad input gets a clear, specific error (what was wrong and what to do)."""

import os

import pytest
import torch
from helpers_models import make_tiny_olmoe
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import roma_peft


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
    """A dense model gets NoRoutersFoundError naming the model type and how routers are found."""
    with pytest.raises(roma_peft.NoRoutersFoundError, match="No MoE router found in this llama model") as err:
        get_peft_model(tiny_llama(), roma_peft.RomaConfig())
    assert "_can_record_outputs" in str(err.value) and "target_modules" in str(err.value)


def test_target_modules_matching_nothing():
    """target_modules that match no router list the routers that were found."""
    with pytest.raises(
        roma_peft.NoRoutersFoundError, match=r"matched none of the 6 routers found: model.layers.0.mlp.gate"
    ):
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
    """MoE-layer indices and counts beyond the model's MoE layers are refused naming the count."""
    with pytest.raises(ValueError, match=message):
        get_peft_model(make_tiny_olmoe(), roma_peft.RomaConfig(**kwargs))


def test_layer_selection_counts_moe_layers_only():
    """moe_layer_indices count MoE layers only: a dense first layer is not counted."""
    from families import FAMILIES

    # DeepSeek-V3 tiny: 4 decoder layers, the first dense -> 3 MoE layers; index 3 points past them.
    with pytest.raises(ValueError, match="the model has 3 MoE layers.*dense layers have no router"):
        get_peft_model(FAMILIES["deepseek_v3"].build(), roma_peft.RomaConfig(moe_layer_indices=[3]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layer_selection="last5"), "layer_selection must be one of"),
        (dict(num_layers=0), "num_layers must be a positive integer"),
        (dict(layers_to_transform=[1, 3]), "use moe_layer_indices|moe_layer_indices, which count MoE layers only"),
    ],
)
def test_bad_config_value_fails_when_built(kwargs, message):
    """Each invalid RomaConfig value raises a ValueError naming it when the config is built."""
    with pytest.raises(ValueError, match=message):
        roma_peft.RomaConfig(**kwargs)


def test_router_shape_mismatch_names_router_and_shapes(adapter_dir):
    """Loading onto routers of another shape names the router and both shapes."""
    with pytest.raises(ValueError, match=r"Router shape mismatch at 'model.layers.4.mlp.gate'.*\(8, 32\).*\(4, 32\)"):
        PeftModel.from_pretrained(make_tiny_olmoe(num_experts=4), adapter_dir)


def test_adapter_for_more_moe_layers_is_refused(adapter_dir):
    """An adapter made for 6 MoE layers is refused on a model with 8."""
    with pytest.raises(ValueError, match="made for a base model with 6 MoE layers, but this OlmoeForCausalLM has 8"):
        PeftModel.from_pretrained(make_tiny_olmoe(num_hidden_layers=8), adapter_dir)


def test_adapter_router_missing_in_a_smaller_model_is_refused(adapter_dir):
    """An adapted router that does not exist in a smaller model is named."""
    with pytest.raises(
        ValueError, match=r"adapts router 'model.layers.4.mlp.gate', which does not exist.*6 MoE layers; this one has 4"
    ):
        PeftModel.from_pretrained(make_tiny_olmoe(num_hidden_layers=4), adapter_dir)


def test_adapter_on_dense_model(adapter_dir):
    """Loading a RoMA adapter onto a dense model says it has no MoE router."""
    with pytest.raises(roma_peft.NoRoutersFoundError, match="has no MoE router"):
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)


def test_partial_checkpoint_is_refused(adapter_dir):
    """A checkpoint that lacks one router's delta is refused naming the router."""
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors.pop("base_model.model.model.layers.5.mlp.gate.roma_delta")
    save_file(tensors, path)
    with pytest.raises(
        ValueError,
        match="no delta for router 'base_model.model.model.layers.5.mlp.gate'|no delta for router 'model.layers.5.mlp.gate'",
    ):
        PeftModel.from_pretrained(make_tiny_olmoe(), adapter_dir)


def test_missing_directory(tmp_path):
    """A missing adapter folder gives PEFT's clear 'Can't find adapter_config.json'."""
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        PeftModel.from_pretrained(make_tiny_olmoe(), str(tmp_path / "does-not-exist"))


def test_missing_weights(adapter_dir):
    """A folder without adapter_model.safetensors says the weights are missing."""
    os.remove(adapter_dir / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors.*weights are missing"):
        PeftModel.from_pretrained(make_tiny_olmoe(), adapter_dir)


def test_corrupt_weights(adapter_dir):
    """A truncated safetensors file is reported as corrupt or truncated."""
    path = adapter_dir / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        PeftModel.from_pretrained(make_tiny_olmoe(), adapter_dir)


def test_corrupt_config(adapter_dir):
    """An unparsable adapter_config.json is reported as corrupt."""
    (adapter_dir / "adapter_config.json").write_text('{"peft_type": "ROMA", ')
    with pytest.raises(ValueError, match="adapter_config.json is corrupt"):
        roma_peft.RomaConfig.from_pretrained(str(adapter_dir))


def test_pickled_weights_are_never_loaded(adapter_dir, monkeypatch):
    """A pickled adapter_model.bin is refused without ever calling torch.load."""
    os.rename(adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match="safetensors only; pickled weights are never unpickled"):
        PeftModel.from_pretrained(make_tiny_olmoe(), adapter_dir)


def test_tied_routers_are_refused_with_a_clear_error():
    """Two routers sharing one tensor are refused (merging would be inexact), pointing at exclude_modules."""
    # Two routers sharing one tensor (as DiffusionGemma's encoder/decoder routers do) would each get their own delta
    # and merging would write both into the shared tensor: refuse instead of merging inexactly.
    from helpers_models import make_tiny_olmoe

    model = make_tiny_olmoe()
    layers = model.model.layers
    layers[4].mlp.gate.weight = layers[5].mlp.gate.weight
    with pytest.raises(ValueError, match=r"share one weight tensor \(tied routers\).*exclude_modules"):
        get_peft_model(model, roma_peft.RomaConfig(num_layers=2))
    # excluding the tied pair, as the message says, works: the last 2 remaining MoE layers are adapted
    config = roma_peft.RomaConfig(num_layers=2, exclude_modules=["model.layers.4.mlp.gate", "model.layers.5.mlp.gate"])
    ok = get_peft_model(model, config)
    assert sorted(ok.base_model.roma_layers()) == ["model.layers.2.mlp.gate", "model.layers.3.mlp.gate"]


# ---------------------------------------------------------------- a bad adapter_config.json names the file and the field
def _edit_config(adapter_dir, **changes):
    import json

    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return path


_DELETE = object()


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"peft_type": "ROMA", ', r"adapter_config.json is corrupt \(not valid JSON"),
        ("[1, 2]", r"adapter_config.json is not an adapter config: it holds a JSON list"),
        ('"ROMA"', r"adapter_config.json is not an adapter config: it holds a JSON str"),
    ],
)
def test_unreadable_adapter_config_at_peft_from_pretrained(adapter_dir, text, message):
    """An unreadable adapter_config.json read by PEFT itself names the file and the problem."""
    # PEFT reads the file itself (PeftConfig._get_peft_type) before any RoMA code runs; it used to raise a raw
    # JSONDecodeError without the file name, or TypeError "list indices must be integers".
    (adapter_dir / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        PeftModel.from_pretrained(make_tiny_olmoe(), adapter_dir)
    assert str(adapter_dir) in str(err.value)


def test_adapter_config_without_peft_type(adapter_dir):
    """A config without 'peft_type' says the field is missing and what to write."""
    _edit_config(adapter_dir, peft_type=_DELETE)  # was KeyError: 'peft_type'
    with pytest.raises(ValueError, match=r"adapter_config.json has no 'peft_type' field.*\"peft_type\": \"ROMA\""):
        PeftModel.from_pretrained(make_tiny_olmoe(), adapter_dir)


def test_adapter_config_with_an_unknown_peft_type(adapter_dir):
    """A 'peft_type' that is not a PEFT method is named."""
    _edit_config(adapter_dir, peft_type="NOT_A_METHOD")
    with pytest.raises(ValueError, match=r"field 'peft_type' is 'NOT_A_METHOD', which is not a PEFT method"):
        PeftModel.from_pretrained(make_tiny_olmoe(), adapter_dir)


@pytest.mark.parametrize(
    "field,value",
    [
        ("resolved_routers", ["model.layers.5.mlp.gate"]),  # was AttributeError: 'list' object has no attribute 'items'
        ("resolved_routers", {"model.layers.5.mlp.gate": "8x32"}),
        ("num_moe_layers", "6"),  # was "made for a base model with 6 MoE layers, but this ... has 6"
        ("resolved_bias_routers", "model.layers.5.mlp.gate"),  # was AttributeError deep in get_submodule
        ("num_layers", "2"),
        ("train_router_bias", "yes"),
        ("moe_layer_indices", [-1, "x"]),
    ],
)
def test_adapter_config_field_of_the_wrong_type(adapter_dir, field, value):
    """A RoMA field of the wrong type is refused naming the file, the field and the value."""
    path = _edit_config(adapter_dir, **{field: value})
    with pytest.raises(roma_peft.config.InvalidAdapterConfigError, match=rf"field '{field}' must be") as err:
        PeftModel.from_pretrained(make_tiny_olmoe(), adapter_dir)
    assert str(err.value).startswith(f"{path}: field '{field}'")
    assert repr(value) in str(err.value)


def test_bias_router_not_among_the_adapted_routers(adapter_dir):
    """A bias router that is not an adapted router is refused."""
    _edit_config(adapter_dir, resolved_bias_routers=["model.layers.0.mlp.gate"])
    with pytest.raises(ValueError, match=r"'resolved_bias_routers' names 'model.layers.0.mlp.gate', which is not in"):
        PeftModel.from_pretrained(make_tiny_olmoe(), adapter_dir)


def test_bad_field_through_peft_own_config_paths(adapter_dir):
    """PeftConfig.from_pretrained and PEFT's from-dict path reach RomaConfig's field checks."""
    # transformers' load_adapter reads the file with PeftConfig.from_pretrained, and a config built from a dict goes
    # through PEFT's from_peft_type: both reach RomaConfig's own field checks, which name the field.
    from peft import PeftConfig

    path = _edit_config(adapter_dir, num_moe_layers="6")
    with pytest.raises(ValueError, match=rf"^{path}: field 'num_moe_layers' must be null or a positive integer"):
        PeftConfig.from_pretrained(str(adapter_dir))
    with pytest.raises(ValueError, match=r"^RomaConfig: field 'num_moe_layers' must be .* got '6' \(str\)"):
        PeftConfig.from_peft_type(peft_type="ROMA", num_moe_layers="6")
    with pytest.raises(ValueError, match=r"RomaConfig: field 'resolved_routers'"):
        roma_peft.RomaConfig(resolved_routers=[[8, 32]])


# ---------------------------------------------------------------- an adapter on a model of another family
def tiny_deepseek_v3_like_olmoe():
    """A DeepSeek-V3 (sigmoid router scoring) with the tiny OLMoE's router names and shapes: 6 MoE layers of 8x32."""
    from families import DEEPSEEK_MLA
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(
        vocab_size=128,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=6,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=0,
        n_group=1,
        topk_group=1,
        **DEEPSEEK_MLA,
    )
    return DeepseekV3ForCausalLM(config).eval()


def _family_warnings(record):
    return [str(w.message) for w in record if "made for another kind of model" in str(w.message)]


def test_adapter_records_model_type_and_router_family(adapter_dir):
    """adapter_config.json records the base model type and the router family."""
    import json

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_type"] == "olmoe" and config["router_family"] == "softmax"
    deepseek = get_peft_model(tiny_deepseek_v3_like_olmoe(), roma_peft.RomaConfig(num_layers=2))
    assert deepseek.peft_config["default"].router_family == "sigmoid"


def test_adapter_on_another_family_with_equal_shapes_warns(adapter_dir):
    """Loading onto another family with equal shapes warns naming both model types and families."""
    # names and shapes match, so this used to load silently; the deltas were trained for softmax routing
    with pytest.warns(
        UserWarning,
        match=r"model_type 'olmoe' \(adapter\) vs 'deepseek_v3' \(this model\); router "
        r"family 'softmax' \(adapter\) vs 'sigmoid' \(this model\)",
    ):
        PeftModel.from_pretrained(tiny_deepseek_v3_like_olmoe(), adapter_dir)


def test_adapter_on_its_own_family_or_older_adapter_does_not_warn(adapter_dir):
    """The same family, or an adapter saved before these fields existed, loads without a warning."""
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(make_tiny_olmoe(seed=3), adapter_dir)  # same family, other weights
    assert _family_warnings(record) == []
    _edit_config(adapter_dir, base_model_type=_DELETE, router_family=_DELETE)  # saved before these fields existed
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(tiny_deepseek_v3_like_olmoe(), adapter_dir)
    assert _family_warnings(record) == []


# ---------------------------------------------------------------- saved neighbourhoods: corrupt, never overwritten
def _small_neighbourhood(n=6):
    from roma_peft.neighbours import Neighbourhood

    return Neighbourhood(
        ids=[f"s{i}" for i in range(n)],
        neighbour_index=torch.zeros(n, 2, dtype=torch.long),
        weights=torch.full((n, 2), 0.5),
        successful=torch.ones(n, dtype=torch.bool),
        routing=torch.rand(n, 4),
        sigma=1.0,
        metadata={"data_hash": "x"},
    )


def test_truncated_or_corrupt_neighbourhood_names_the_file(tmp_path):
    """A truncated or corrupt saved neighbourhood names the file and says to rebuild it."""
    from roma_peft.neighbours import Neighbourhood

    _small_neighbourhood().save(str(tmp_path))
    tensors = tmp_path / "neighbourhood.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) * 2 // 3])  # was safetensors' SafetensorError, no file name
    with pytest.raises(ValueError, match=r"neighbourhood.safetensors is corrupt or truncated.*Rebuild it"):
        Neighbourhood.load(str(tmp_path))
    (tmp_path / "neighbourhood.json").write_text('{"ids": ["s0", ')  # was a raw JSONDecodeError
    with pytest.raises(ValueError, match=r"neighbourhood.json is corrupt \(not valid JSON"):
        Neighbourhood.load(str(tmp_path))


def test_neighbourhood_save_refuses_to_replace_another(tmp_path):
    """Saving over another neighbourhood is refused unless overwrite=True."""
    from roma_peft.neighbours import Neighbourhood

    first, second = _small_neighbourhood(6), _small_neighbourhood(8)
    first.save(str(tmp_path))
    with pytest.raises(FileExistsError, match=r"already holds a saved neighbourhood.*overwrite=True"):
        second.save(str(tmp_path))  # used to replace it silently
    assert len(Neighbourhood.load(str(tmp_path))) == 6
    second.save(str(tmp_path), overwrite=True)
    assert len(Neighbourhood.load(str(tmp_path))) == 8
