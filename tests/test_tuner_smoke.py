"""A user's first session: wrap a tiny OLMoE, change the routers, save, reload on a fresh stock model."""

import torch
from helpers_models import make_tiny_olmoe
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import roma_peft


def test_wrap_train_save_reload_merge(tmp_path, input_ids):
    """A user's session: wrap (no change), train, save, reload (same logits), merge (same logits)."""
    base = make_tiny_olmoe()
    reference = base(input_ids).logits
    model = get_peft_model(base, roma_peft.RomaConfig())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"base_model.model.model.layers.{i}.mlp.gate.roma_delta.default" for i in range(1, 6)]
    assert torch.equal(model(input_ids).logits, reference), "zero-initialised deltas must not change the model"

    for param in model.parameters():
        if param.requires_grad:
            param.data.normal_(std=0.5)
    adapted = model(input_ids).logits
    assert not torch.allclose(adapted, reference)

    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        f"base_model.model.model.layers.{i}.mlp.gate.roma_delta": (8, 32) for i in range(1, 6)
    }

    reloaded = PeftModel.from_pretrained(make_tiny_olmoe(), tmp_path)
    assert torch.equal(reloaded(input_ids).logits, adapted)
    with reloaded.disable_adapter():
        assert torch.equal(reloaded(input_ids).logits, reference)
    merged = reloaded.merge_and_unload()
    assert not any("roma" in type(m).__name__.lower() for m in merged.modules())
    assert torch.equal(merged(input_ids).logits, adapted)
