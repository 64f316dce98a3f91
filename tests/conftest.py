"""Shared fixtures: tiny random MoE models built from transformers configs (no hub access)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

import roma_peft  # noqa: F401  (registers ROMA)

torch.set_num_threads(1)


def tiny_olmoe_config(num_hidden_layers: int = 6, **overrides):
    from transformers import OlmoeConfig

    kwargs = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    kwargs.update(overrides)
    return OlmoeConfig(**kwargs)


def make_tiny_olmoe(seed: int = 0, **overrides):
    from transformers import OlmoeForCausalLM

    torch.manual_seed(seed)
    return OlmoeForCausalLM(tiny_olmoe_config(**overrides)).eval()


@pytest.fixture
def tiny_olmoe():
    return make_tiny_olmoe()


@pytest.fixture
def input_ids():
    torch.manual_seed(1)
    return torch.randint(3, 128, (2, 9))
