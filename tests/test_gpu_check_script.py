"""scripts/gpu_check.py is what a user with an accelerator runs; here it runs on the CPU so that it cannot rot."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import gpu_check  # noqa: E402


def test_gpu_check_passes_on_cpu_in_bf16(tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--dtype", "bfloat16", "--families", "olmoe", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (family,) = report["families"]
    assert family["ok"] and set(family["checks"]) == {
        "placement",
        "scoring_and_capture_finite",
        "training_finite",
        "only_deltas_changed",
        "reload_bitwise",
        "merge_bitwise",
    }


def test_gpu_check_fails_when_a_check_fails(tmp_path, monkeypatch):
    # an inexact merge must turn the script red (exit status 1), not be reported as a pass
    from roma_peft.layer import RomaLayer

    monkeypatch.setattr(RomaLayer, "merge", lambda self, *a, **k: None)  # merging silently does nothing
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--dtype", "float32", "--families", "olmoe", "--out", str(out)]) == 1
    assert json.loads(out.read_text())["families"][0]["checks"]["merge_bitwise"] is False


def test_gpu_check_refuses_a_missing_cuda_device(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cuda"])
    assert "torch sees no CUDA device" in capsys.readouterr().err
