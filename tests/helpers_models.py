"""Tiny random MoE models built from transformers configs (no hub access), shared by the test modules."""

import torch


def tiny_olmoe_config(num_hidden_layers: int = 6, **overrides):
    """An OLMoE config small enough for CPU tests: 8 experts, top-2, hidden size 32, vocabulary 128."""
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
    """A randomly initialised tiny OLMoE (seeded), in eval mode."""
    from transformers import OlmoeForCausalLM

    torch.manual_seed(seed)
    return OlmoeForCausalLM(tiny_olmoe_config(**overrides)).eval()
