"""Routing-manifold figures (like the paper's Figure 3) and a number for manifold alignment.

* :func:`knn_overlap` -- how aligned two spaces are: for each sample, the overlap between its k nearest neighbours
  in space A (task embeddings) and in space B (routing weights), averaged. 1.0 = identical neighbourhoods; a random
  space gives about ``k / (n - 1)``.
* :func:`plot_manifolds` -- 2-D projections (UMAP if installed, else t-SNE from scikit-learn) of several spaces side
  by side, coloured by skill.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["knn_overlap", "project_2d", "plot_manifolds"]


def knn_overlap(space_a: np.ndarray, space_b: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each sample's k nearest neighbours in ``space_a`` that are also among its k in ``space_b``."""
    from ..neighbours import nearest_neighbours

    space_a, space_b = np.asarray(space_a, dtype=np.float32), np.asarray(space_b, dtype=np.float32)
    if len(space_a) != len(space_b):
        raise ValueError(f"Both spaces need the same samples, got {len(space_a)} and {len(space_b)} rows.")
    if len(space_a) <= k:
        raise ValueError(f"knn_overlap needs more than k={k} samples, got {len(space_a)}.")
    neighbours = [[set(row) for row in nearest_neighbours(space, k)] for space in (space_a, space_b)]
    return float(np.mean([len(a & b) / k for a, b in zip(*neighbours)]))


def project_2d(points: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D projection: UMAP when the ``umap-learn`` package is installed, else t-SNE (scikit-learn)."""
    points = np.asarray(points, dtype=np.float32)
    try:
        import umap  # type: ignore

        return umap.UMAP(random_state=seed).fit_transform(points), "UMAP"
    except ImportError:
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(5, (len(points) - 1) // 3)))
        return TSNE(n_components=2, random_state=seed, init="pca", perplexity=perplexity).fit_transform(points), "t-SNE"


def plot_manifolds(
    panels: dict[str, np.ndarray], labels: Sequence[str], path: str, title: str = "", seed: int = 0
) -> str:
    """Save a row of 2-D projections (one per space in ``panels``) coloured by ``labels`` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(set(labels))
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    axes = np.atleast_1d(axes)
    method = ""
    for ax, (name, points) in zip(axes, panels.items()):
        xy, method = project_2d(points, seed=seed)
        for label in names:
            rows = [i for i, lab in enumerate(labels) if lab == label]
            ax.scatter(xy[rows, 0], xy[rows, 1], s=6, color=colours[label], label=label)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2)
    fig.suptitle(f"{title} ({method})" if title else method)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
