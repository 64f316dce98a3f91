"""The stock PEFT / transformers entry points on RoMA adapters: named adapters, config/auto loading, bf16, subprocess."""

import contextlib
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers_models import make_tiny_olmoe
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import roma_peft

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randomize(model, adapter=None, seed=3, std=0.5):
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "roma_" in name and (adapter is None or name.endswith(f".{adapter}")):
            param.data.normal_(std=std)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    make_tiny_olmoe().save_pretrained(path)
    return str(path)


def load_base(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


@pytest.fixture(scope="module")
def saved_adapter(base_dir, tmp_path_factory, ids):
    model = get_peft_model(load_base(base_dir), roma_peft.RomaConfig(num_layers=2, task_type="CAUSAL_LM"))
    randomize(model)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return str(path), logits


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(3, 128, (2, 9))


def test_multiple_named_adapters(base_dir, tmp_path, ids):
    """Two named RoMA adapters switch, disable and save/load independently."""
    base_logits = load_base(base_dir)(input_ids=ids).logits
    model = get_peft_model(load_base(base_dir), roma_peft.RomaConfig(num_layers=2), adapter_name="a")
    model.add_adapter("b", roma_peft.RomaConfig(layer_selection="first", num_layers=1))
    assert model.peft_config["b"].resolved_routers == {"model.layers.0.mlp.gate": [8, 32]}
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    logits_a = model(input_ids=ids).logits
    model.set_adapter("b")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.model.layers.0.mlp.gate.roma_delta.b"
    ]
    logits_b = model(input_ids=ids).logits
    assert not torch.equal(logits_a, logits_b) and not torch.equal(logits_b, base_logits)

    model.save_pretrained(tmp_path)  # adapters not called "default" go to subfolders
    assert os.path.isfile(tmp_path / "a" / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "b" / "adapter_model.safetensors")
    reloaded = PeftModel.from_pretrained(load_base(base_dir), str(tmp_path / "a"), adapter_name="a")
    reloaded.load_adapter(str(tmp_path / "b"), adapter_name="b")
    assert torch.equal(reloaded(input_ids=ids).logits, logits_a)
    reloaded.set_adapter("b")
    assert torch.equal(reloaded(input_ids=ids).logits, logits_b)

    reloaded.set_adapter("a")
    reloaded.delete_adapter("b")
    assert list(reloaded.peft_config) == ["a"]
    assert not any(n.endswith(".b") for n, _ in reloaded.named_parameters())
    assert torch.equal(reloaded(input_ids=ids).logits, logits_a)


def test_peft_config_and_auto_peft_model(saved_adapter, base_dir, ids):
    """PeftConfig and AutoPeftModelForCausalLM load a saved RoMA adapter with its exact routers."""
    path, logits = saved_adapter
    config = PeftConfig.from_pretrained(path)
    assert isinstance(config, roma_peft.RomaConfig)
    assert config.peft_type.value == "ROMA" and config.base_model_name_or_path == base_dir
    assert config.resolved_routers == {f"model.layers.{i}.mlp.gate": [8, 32] for i in (4, 5)}
    assert config.num_moe_layers == 6

    auto = AutoPeftModelForCausalLM.from_pretrained(path)
    assert isinstance(auto, PeftModel)
    assert torch.equal(auto(input_ids=ids).logits, logits)


def test_transformers_native_load_adapter(saved_adapter, base_dir, ids):
    """transformers' own model.load_adapter reproduces the adapter's logits."""
    path, logits = saved_adapter
    model = load_base(base_dir)
    model.load_adapter(path)
    assert torch.equal(model(input_ids=ids).logits, logits)


def test_print_trainable_parameters(base_dir):
    """print_trainable_parameters counts the router deltas only."""
    model = get_peft_model(load_base(base_dir), roma_peft.RomaConfig(num_layers=2))
    total = sum(p.numel() for p in model.parameters())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model.print_trainable_parameters()
    assert f"trainable params: {2 * 8 * 32:,} || all params: {total:,}" in out.getvalue()


def test_bf16_base_keeps_fp32_deltas_and_exact_merge(ids):
    """A bf16 base keeps float32 deltas, and merge/unmerge are exact."""
    base = make_tiny_olmoe().to(torch.bfloat16)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, roma_peft.RomaConfig(num_layers=2))
    deltas = [p for n, p in model.named_parameters() if "roma_delta" in n]
    assert deltas and all(p.dtype == torch.float32 for p in deltas)
    assert model.get_base_model().model.layers[5].mlp.gate.get_base_layer().weight.dtype == torch.bfloat16
    randomize(model, std=0.05)
    unmerged = model(input_ids=ids).logits
    model.merge_adapter()
    assert torch.equal(model(input_ids=ids).logits, unmerged)
    gate = model.get_base_model().model.layers[5].mlp.gate.get_base_layer().weight
    assert not torch.equal(gate, original["model.layers.5.mlp.gate.weight"])
    model.unmerge_adapter()
    for name, param in model.get_base_model().named_parameters():
        if "roma_" not in name:
            assert torch.equal(param, original[name.replace(".base_layer", "")]), name
    assert torch.equal(model(input_ids=ids).logits, unmerged)


def test_fresh_process_with_only_import_roma_peft_reproduces_logits(saved_adapter, base_dir, ids, tmp_path):
    """A fresh Python process that only imports roma_peft reloads the adapter with the same logits."""
    path, logits = saved_adapter
    script = textwrap.dedent(
        f"""
        import torch
        import roma_peft
        from peft import PeftModel
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(1)
        ids = load_file({str(tmp_path / "ids.safetensors")!r})["ids"]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_dir!r}).eval(), {path!r})
        with torch.no_grad():
            save_file({{"logits": model(input_ids=ids).logits.contiguous()}}, {str(tmp_path / "out.safetensors")!r})
        """
    )
    from safetensors.torch import save_file

    save_file({"ids": ids.contiguous()}, str(tmp_path / "ids.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO_ROOT}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=str(tmp_path), capture_output=True)
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["logits"], logits)
