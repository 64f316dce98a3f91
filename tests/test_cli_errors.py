"""``roma-peft`` refuses what cannot work in one line (exit status 2), before a model loads or a file is written."""

import json

import pytest
from helpers_cli import one_line_error, run_cli
from helpers_training import tiny_base_model, tiny_tokenizer, train_samples

from roma_peft import cli


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A user's directory: a tiny saved MoE model and a JSONL training file."""
    root = tmp_path_factory.mktemp("cli")
    tiny_base_model(num_layers=3).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "train.jsonl").write_text("".join(json.dumps(s) + "\n" for s in train_samples(24)))
    return root


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_model", refuse)


def common(ws):
    return ["--model_name_or_path", ws / "model", "--train_file", ws / "train.jsonl", "--num_layers", "2"]


def train_args(ws, out, *extra):
    return [
        "train",
        *common(ws),
        "--output_dir",
        out,
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "8",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--use_cpu",
        "true",
        *extra,
    ]


def saved_neighbourhood(directory):
    import torch

    from roma_peft.neighbours import Neighbourhood

    n = 24
    Neighbourhood(
        ids=[f"s{i}" for i in range(n)],
        neighbour_index=torch.zeros(n, 2, dtype=torch.long),
        weights=torch.full((n, 2), 0.5),
        successful=torch.ones(n, dtype=torch.bool),
        routing=torch.rand(n, 4),
        sigma=1.0,
    ).save(str(directory))
    return directory


# ---------------------------------------------------------------- model, dtype, paths
def test_model_directory_that_does_not_exist(capsys, workspace, no_model_load):
    missing = workspace / "models" / "olmoe-tiny"  # was: "Repo id must be in the form 'repo_name' or ..."
    status, err = run_cli(capsys, "evaluate", "--model_name_or_path", missing, "--eval_file", workspace / "train.jsonl")
    assert status == 2
    assert f"--model_name_or_path '{missing}': no such directory" in one_line_error(err, "evaluate")


def test_unsupported_dtype(capsys, workspace, no_model_load):
    status, err = run_cli(
        capsys,
        "evaluate",
        "--model_name_or_path",
        workspace / "model",
        "--eval_file",
        workspace / "train.jsonl",
        "--dtype",
        "fp8",
    )  # was AttributeError: torch has no 'fp8'
    assert status == 2
    line = one_line_error(err, "evaluate")
    assert "--dtype 'fp8' is not supported; use one of auto, float32, bfloat16, float16" in line


def test_train_file_that_does_not_exist(capsys, workspace, no_model_load):
    status, err = run_cli(
        capsys,
        "train",
        "--model_name_or_path",
        workspace / "model",
        "--train_file",
        workspace / "data" / "train.csv",
        "--output_dir",
        workspace / "o",
        "--regularizer",
        "none",
    )
    assert status == 2
    assert "--train_file" in one_line_error(err, "train") and "no such file" in err


def test_adapter_path_that_does_not_exist_or_is_corrupt(capsys, workspace, no_model_load, tmp_path):
    status, err = run_cli(
        capsys,
        "merge",
        "--model_name_or_path",
        workspace / "model",
        "--adapter_path",
        tmp_path / "adapter",
        "--output_dir",
        tmp_path / "merged",
    )
    assert status == 2 and "--adapter_path" in one_line_error(err, "merge") and "no such directory" in err
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "ROMA", "num_moe_layers": "3"}')
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    status, err = run_cli(
        capsys,
        "evaluate",
        "--model_name_or_path",
        workspace / "model",
        "--adapter_path",
        tmp_path / "adapter",
        "--eval_file",
        workspace / "train.jsonl",
    )
    assert status == 2 and "field 'num_moe_layers' must be" in one_line_error(err, "evaluate")


def test_merge_into_a_non_empty_directory(capsys, workspace, no_model_load, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    adapter = tmp_path / "adapter"
    _adapter(adapter)
    for command in ("merge", "export-lora"):  # used to load and merge the model first, then refuse
        status, err = run_cli(
            capsys, command, "--model_name_or_path", workspace / "model", "--adapter_path", adapter, "--output_dir", out
        )
        assert status == 2
        assert "already holds files (notes.txt)" in one_line_error(err, command) and "--overwrite" in err
    assert (out / "notes.txt").read_text() == "mine"


def _adapter(directory):
    from peft import get_peft_model

    import roma_peft as rp

    get_peft_model(tiny_base_model(num_layers=3), rp.RomaConfig(num_layers=2)).save_pretrained(directory)


# ---------------------------------------------------------------- neighbours
def test_neighbours_bad_k_is_refused_before_scoring(capsys, workspace, no_model_load, tmp_path):
    out = tmp_path / "nb"
    status, err = run_cli(capsys, "neighbours", *common(workspace), "--output_dir", out, "--k", "0")
    assert status == 2 and "k must be a positive integer, got 0" in one_line_error(err, "neighbours")
    assert not out.exists(), "nothing may be written for arguments that cannot work"


def test_neighbours_refuses_to_replace_a_neighbourhood(capsys, workspace, no_model_load, tmp_path):
    out = saved_neighbourhood(tmp_path / "nb")
    before = (out / "neighbourhood.safetensors").read_bytes()
    status, err = run_cli(capsys, "neighbours", *common(workspace), "--output_dir", out, "--k", "2")
    assert status == 2
    assert "already holds a neighbourhood" in one_line_error(err, "neighbours") and "--overwrite" in err
    assert (out / "neighbourhood.safetensors").read_bytes() == before


# ---------------------------------------------------------------- train
def test_train_needs_a_neighbourhood_dir(capsys, workspace, no_model_load, tmp_path):
    status, err = run_cli(capsys, *train_args(workspace, tmp_path / "out"))  # default regulariser: manifold
    assert status == 2 and "--regularizer manifold needs --neighbourhood_dir" in one_line_error(err, "train")
    status, err = run_cli(capsys, *train_args(workspace, tmp_path / "out", "--neighbourhood_dir", tmp_path / "nb"))
    assert status == 2 and "no such directory" in one_line_error(err, "train")
    assert not (tmp_path / "out").exists()


def test_train_with_a_truncated_neighbourhood(capsys, workspace, no_model_load, tmp_path):
    nb = saved_neighbourhood(tmp_path / "nb")
    data = (nb / "neighbourhood.safetensors").read_bytes()
    (nb / "neighbourhood.safetensors").write_bytes(data[: len(data) // 2])  # was a SafetensorError traceback
    status, err = run_cli(capsys, *train_args(workspace, tmp_path / "out", "--neighbourhood_dir", nb))
    assert status == 2
    assert "neighbourhood.safetensors is corrupt or truncated" in one_line_error(err, "train")


def test_train_does_not_overwrite_a_trained_adapter(capsys, workspace, tmp_path):
    out = tmp_path / "out"
    assert run_cli(capsys, *train_args(workspace, out, "--regularizer", "none"))[0] == 0
    trained = (out / "adapter_model.safetensors").read_bytes()
    status, err = run_cli(capsys, *train_args(workspace, out, "--regularizer", "none", "--learning_rate", "1"))
    assert status == 2  # used to train again and replace the adapter silently
    assert "already holds a trained adapter" in one_line_error(err, "train") and "--overwrite" in err
    assert (out / "adapter_model.safetensors").read_bytes() == trained
    assert (
        run_cli(
            capsys, *train_args(workspace, out, "--regularizer", "none", "--overwrite", "true", "--learning_rate", "1")
        )[0]
        == 0
    )
    assert (out / "adapter_model.safetensors").read_bytes() != trained


def test_train_checkpoints_are_kept_and_resuming_is_allowed(capsys, workspace, tmp_path):
    out = tmp_path / "run"
    args = train_args(workspace, out, "--regularizer", "none")
    args[args.index("--save_strategy") + 1] = "steps"
    assert run_cli(capsys, *args, "--save_steps", "1")[0] == 0
    (out / "adapter_model.safetensors").unlink()
    (out / "adapter_config.json").unlink()  # only checkpoint-1 is left
    status, err = run_cli(capsys, *args)
    assert status == 2 and "checkpoint-1" in one_line_error(err, "train")
    args[args.index("--max_steps") + 1] = "2"
    assert run_cli(capsys, *args, "--resume_from_checkpoint", out / "checkpoint-1")[0] == 0
    assert (out / "adapter_model.safetensors").exists()


def test_non_finite_loss_is_one_line_and_exit_2(capsys, workspace, tmp_path):
    args = train_args(workspace, tmp_path / "nan", "--regularizer", "none", "--learning_rate", "1e38")
    args[args.index("--max_steps") + 1] = "3"
    status, err = run_cli(capsys, *args)  # was a NonFiniteLossError traceback, exit status 1
    assert status == 2
    assert "Non-finite" in one_line_error(err, "train")
    assert not (tmp_path / "nan" / "adapter_model.safetensors").exists()
