"""Run a test script under ``torchrun`` with two CPU processes (gloo): the one launcher every multi-process test uses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run_two_processes(script: str, *args, timeout: int = 240, **env_overrides) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2 SCRIPT ARGS...`` offline, on the CPU, one torch thread per
    process, with ``tests/`` and the repository on the path; skips the test where torch has no launcher. Fails the test
    (with the end of stderr) when the launch fails, and returns the finished process otherwise."""
    if shutil.which("torchrun") is None and not hasattr(torch.distributed, "run"):
        pytest.skip("torch.distributed.run is not available")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([TESTS_DIR, os.path.dirname(TESTS_DIR)]),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        **env_overrides,
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0"]
    cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", os.path.abspath(script), *map(str, args)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
