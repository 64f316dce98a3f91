"""Saving and sharing: adapter files, model card, push_to_hub (offline), and the two exports for tools without RoMA."""

import json
import os
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from helpers_models import make_tiny_olmoe
from huggingface_hub import HfApi, RepoUrl
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import roma_peft
from roma_peft.export import LoraExportError, export_merged, export_to_lora

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    make_tiny_olmoe().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(3, 128, (2, 9))


def adapted(base_dir, seed=3):
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir).eval(), roma_peft.RomaConfig(num_layers=2, task_type="CAUSAL_LM")
    )
    torch.manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.data.normal_(std=0.5)
    return model


def check_card(text, base_dir):
    assert "library_name: peft" in text
    assert "ROMA" in text and "roma" in text
    assert f"base_model: {base_dir}" in text
    assert "`model.layers.4.mlp.gate`" in text and "`model.layers.5.mlp.gate`" in text
    assert "Tuned decoder layers: [4, 5]" in text


def test_saved_files_and_model_card(base_dir, tmp_path):
    model = adapted(base_dir)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        f"base_model.model.model.layers.{i}.mlp.gate.roma_delta": (8, 32) for i in (4, 5)
    }
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ROMA" and config["resolved_routers"] == {
        f"model.layers.{i}.mlp.gate": [8, 32] for i in (4, 5)
    }
    check_card((tmp_path / "README.md").read_text(), base_dir)
    model.save_pretrained(tmp_path)  # saving again does not duplicate the RoMA section
    assert (tmp_path / "README.md").read_text().count("# RoMA router adapter for") == 1


def test_push_to_hub_keeps_peft_metadata(base_dir):
    model = adapted(base_dir)
    uploaded, calls = {}, []

    def create_commit(self, repo_id, operations, **kwargs):
        calls.append(("commit", repo_id, kwargs.get("revision")))
        for op in operations:  # read now: the temporary directory is deleted after the push
            with open(op.path_or_fileobj, "rb") as f:
                uploaded[op.path_in_repo] = f.read()
        return mock.MagicMock()

    with (
        mock.patch.object(
            HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}")
        ),
        mock.patch.object(HfApi, "create_commit", create_commit),
        mock.patch.object(
            HfApi, "create_branch", lambda self, repo_id, **kw: calls.append(("branch", repo_id, kw.get("branch")))
        ),
    ):
        model.push_to_hub("user/roma-test", revision="dev")

    assert ("branch", "user/roma-test", "dev") in calls and ("commit", "user/roma-test", "dev") in calls
    assert sorted(uploaded) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = uploaded["README.md"].decode()
    check_card(card, base_dir)
    assert "library_name: transformers" not in card
    assert 'PeftModel.from_pretrained(base, "user/roma-test")' in card  # the snippet names the repository pushed to
    assert json.loads(uploaded["adapter_config.json"])["peft_type"] == "ROMA"
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"roma_push_{os.getpid()}.safetensors")
    try:
        with open(path, "wb") as f:
            f.write(uploaded["adapter_model.safetensors"])
        assert sorted(load_file(path)) == [f"base_model.model.model.layers.{i}.mlp.gate.roma_delta" for i in (4, 5)]
    finally:
        os.remove(path)


def test_import_leaves_peft_model_alone_until_a_roma_adapter_exists(base_dir, tmp_path):
    """`import roma_peft` patches no PeftModel method; once a RoMA adapter exists, a LoRA model still gets PEFT's card."""
    script = textwrap.dedent(
        f"""
        import torch
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM
        stock = {{n: PeftModel.__dict__.get(n) for n in ("save_pretrained", "create_or_update_model_card",
                                                          "_upload_modified_files")}}
        import roma_peft
        assert {{n: PeftModel.__dict__.get(n) for n in stock}} == stock, "import roma_peft patched PeftModel"
        get_peft_model(AutoModelForCausalLM.from_pretrained({base_dir!r}), roma_peft.RomaConfig(num_layers=2))
        assert PeftModel.__dict__["save_pretrained"] is not stock["save_pretrained"]
        lora = get_peft_model(AutoModelForCausalLM.from_pretrained({base_dir!r}),
                              LoraConfig(target_modules=["q_proj"], r=2))
        lora.save_pretrained("lora")
        card = open("lora/README.md").read()
        assert "library_name: peft" in card and "roma" not in card.lower(), card
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_lora_and_merged_exports_load_without_roma_peft(base_dir, ids, tmp_path):
    model = adapted(base_dir)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    lora_dir = export_to_lora(model, str(tmp_path / "lora"))
    config = json.loads(open(os.path.join(lora_dir, "adapter_config.json")).read())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 8
    assert config["target_modules"] in ([], None) or set(config["target_modules"]) == set()
    assert sorted(config["target_parameters"]) == [f"model.layers.{i}.mlp.gate.weight" for i in (4, 5)]
    export_merged(model, str(tmp_path / "merged"))
    save_file({"ids": ids.contiguous()}, str(tmp_path / "ids.safetensors"))
    script = textwrap.dedent(
        f"""
        import sys, torch
        from peft import PeftModel
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(1)
        ids = load_file("ids.safetensors")["ids"]
        lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_dir!r}).eval(), "lora")
        merged = AutoModelForCausalLM.from_pretrained("merged").eval()
        with torch.no_grad():
            out = {{"lora": lora(input_ids=ids).logits, "merged": merged(input_ids=ids).logits}}
        save_file({{k: v.contiguous() for k, v in out.items()}}, "out.safetensors")
        assert "roma_peft" not in sys.modules, "roma_peft was imported"
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=str(tmp_path), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    out = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(out["lora"], logits), "the LoRA export must reproduce the RoMA logits bitwise (fp32)"
    assert torch.equal(out["merged"], logits)


def test_lora_export_refuses_to_overwrite(base_dir, tmp_path):
    model = adapted(base_dir)
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        export_to_lora(model, str(tmp_path))
    assert (tmp_path / "mine.txt").read_text() == "user data"
    export_to_lora(model, str(tmp_path), overwrite=True)
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_lora_export_of_a_router_bias_delta_is_an_error(tmp_path):
    from families import FAMILIES

    model = get_peft_model(FAMILIES["gpt_oss"].build(), roma_peft.RomaConfig(num_layers=2))
    export_to_lora(model, str(tmp_path / "zero"))  # a zero bias delta is exactly representable
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "roma_bias_delta" in name:
            param.data.normal_(std=0.1)
    with pytest.raises(LoraExportError, match="bias delta is not representable"):
        export_to_lora(model, str(tmp_path / "bias"))
    assert not (tmp_path / "bias").exists()
