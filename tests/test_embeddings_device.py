"""The embedder: GPU when there is one, hub downloads when online (offline mode respected, never forced), and errors
that say whether a load failed because of offline mode / a cache miss or because of the model."""

import types

import numpy as np
import pytest
import sentence_transformers
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from roma_peft import embeddings
from roma_peft.embeddings import (
    DEFAULT_EMBEDDING_MODEL,
    embed_samples,
    load_embedding_model,
)


@pytest.fixture
def fake_st(monkeypatch):
    """A SentenceTransformer that records (target, kwargs, HF_HUB_OFFLINE at call time); ``fake_st.error`` is raised."""
    import os

    class Fake:
        calls = []
        error = None

        def __init__(self, target, **kwargs):
            Fake.calls.append((target, kwargs, os.environ.get("HF_HUB_OFFLINE")))
            if Fake.error is not None:
                raise Fake.error
            self.device = kwargs.get("device")

        def encode(self, texts, **kwargs):
            return np.ones((len(texts), 3), dtype=np.float64)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", Fake)
    monkeypatch.setattr(embeddings, "_CACHE", {})
    return Fake


@pytest.fixture
def online(monkeypatch):
    """A user who did not ask for offline mode (the test session itself runs with HF_HUB_OFFLINE=1)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)


def test_gpu_is_picked_when_there_is_one(fake_st, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = load_embedding_model("someone/embedder")
    assert model.device == "cuda" and fake_st.calls[-1][1]["device"] == "cuda"
    assert ("someone/embedder", "cuda") in embeddings._CACHE
    load_embedding_model(None)  # the packaged default too
    assert fake_st.calls[-1][1]["device"] == "cuda"
    assert load_embedding_model("someone/embedder", device="cpu").device == "cpu"  # an explicit device wins
    assert load_embedding_model("someone/embedder") is model  # cached per (model, device)
    assert len(fake_st.calls) == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_embedding_model("someone/other").device == "cpu"  # no GPU: the CPU


def test_hub_name_downloads_when_online(fake_st, online):
    load_embedding_model("sentence-transformers/all-mpnet-base-v2", device="cpu")
    target, kwargs, offline_env = fake_st.calls[-1]
    assert target == "sentence-transformers/all-mpnet-base-v2"
    assert offline_env is None, "HF_HUB_OFFLINE must not be forced on"
    assert kwargs.get("local_files_only") is False


def test_offline_mode_is_respected_and_named_in_the_error(fake_st, online, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_st.error = OSError("couldn't find them in the cached files")
    fake_st.error.__cause__ = LocalEntryNotFoundError("Cannot find the requested files in the disk cache")
    with pytest.raises(
        ValueError,
        match=r"offline mode is on \(HF_HUB_OFFLINE\) and it is not in the local hub "
        r"cache. Unset HF_HUB_OFFLINE to download it",
    ):
        load_embedding_model("someone/embedder", device="cpu")
    assert fake_st.calls[-1][1]["local_files_only"] is True and fake_st.calls[-1][2] == "1"


def test_online_errors_say_what_failed(fake_st, online):
    fake_st.error = OSError("We couldn't connect to 'https://huggingface.co'")
    fake_st.error.__cause__ = LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
    with pytest.raises(ValueError, match="the hub could not be reached and it is not in the local hub cache"):
        load_embedding_model("someone/embedder", device="cpu")
    fake_st.error = RepositoryNotFoundError(
        "404 Repository Not Found", response=types.SimpleNamespace(headers={}, status_code=404, request=None)
    )
    with pytest.raises(ValueError, match="no such model on the hub, or it is gated/private"):
        load_embedding_model("someone/typo", device="cpu")
    fake_st.error = RuntimeError("size mismatch for embeddings.word_embeddings.weight")
    with pytest.raises(ValueError) as info:
        load_embedding_model("someone/broken", device="cpu")
    assert "RuntimeError: size mismatch" in str(info.value) and "offline" not in str(info.value)
    assert "could not be reached" not in str(info.value)


def test_missing_local_path_is_not_looked_up_on_the_hub(fake_st, tmp_path):
    with pytest.raises(ValueError, match=f"tried '{tmp_path / 'nope'}': not a local directory"):
        load_embedding_model(str(tmp_path / "nope"), device="cpu")
    assert fake_st.calls == []


def test_embed_samples_passes_the_device(fake_st, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    samples = [{"question": "a?", "options": ["x", "y"], "label": 0}]
    assert embed_samples(samples, "someone/embedder", progress=False).shape == (1, 3)
    assert fake_st.calls[-1][1]["device"] == "cuda"
    embed_samples(samples, DEFAULT_EMBEDDING_MODEL, progress=False, device="cpu")
    assert fake_st.calls[-1][1]["device"] == "cpu"
