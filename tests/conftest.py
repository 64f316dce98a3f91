"""Shared fixtures (the helpers themselves live in ``helpers_*.py`` modules, imported by name)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from helpers_models import make_tiny_olmoe

import roma_peft  # noqa: F401  (registers ROMA)

torch.set_num_threads(1)


@pytest.fixture
def tiny_olmoe():
    return make_tiny_olmoe()


@pytest.fixture
def input_ids():
    torch.manual_seed(1)
    return torch.randint(3, 128, (2, 9))
