"""RomaConfig fails when it is built, and a saved adapter_config.json is read no more often than stock PEFT reads it."""

import builtins
import typing
from unittest import mock

import pytest
from helpers_models import make_tiny_olmoe
from peft import PeftModel, get_peft_model

import roma_peft
from roma_peft.routers import LAYER_SELECTIONS


def test_layer_selection_is_a_literal_of_the_selections_the_registry_knows():
    """The type of RomaConfig.layer_selection lists exactly the values select_moe_layers accepts."""
    hint = typing.get_type_hints(roma_peft.RomaConfig)["layer_selection"]
    assert typing.get_origin(hint) is typing.Literal and typing.get_args(hint) == LAYER_SELECTIONS


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"layer_selection": "top"}, r"layer_selection must be one of \('last', 'first', 'middle', 'all', 'indices'\)"),
        ({"layer_selection": 3}, r"field 'layer_selection' must be one of"),
        ({"layer_selection": "indices"}, r"needs moe_layer_indices"),
        ({"num_layers": 0}, r"num_layers must be a positive integer"),
    ],
)
def test_a_bad_config_fails_when_built(kwargs, message):
    """Each bad field raises a ValueError naming the field when RomaConfig is built, before any model is touched."""
    with pytest.raises(ValueError, match=message):
        roma_peft.RomaConfig(**kwargs)


def test_loading_reads_adapter_config_twice_like_stock_peft(tmp_path):
    """PeftModel.from_pretrained opens adapter_config.json twice (PEFT's peft-type lookup and the config itself), with
    every RoMA check applied."""
    get_peft_model(make_tiny_olmoe(), roma_peft.RomaConfig(num_layers=2)).save_pretrained(tmp_path)
    real_open, opened = builtins.open, []

    def counting_open(file, *args, **kwargs):
        if str(file).endswith("adapter_config.json"):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    with mock.patch("builtins.open", counting_open):
        model = PeftModel.from_pretrained(make_tiny_olmoe(), tmp_path)
    assert len(opened) == 2, opened
    assert sorted(model.base_model.roma_layers()) == ["model.layers.4.mlp.gate", "model.layers.5.mlp.gate"]
