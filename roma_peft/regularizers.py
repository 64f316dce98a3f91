"""The regulariser options of :class:`~roma_peft.trainer.RomaTrainer`, one small function each.

Every function returns a tensor the trainer multiplies by the effective lambda and adds to the task loss:

* per-sample terms (``manifold``, ``random``, ``self``, ``entropy``) return a ``(B,)`` vector; the trainer takes its
  batch mean, the same reduction as the per-sample task loss, so that the loss of a batch is
  ``mean_i [CE(i) + lambda * R(i)]``, the paper's Eq. 9 averaged over the batch;
* parameter terms (``l1``, ``l2``) return a scalar (they do not depend on the batch).

Notation: ``r`` is ``(B, D)``, the live routing vectors of the batch (concatenated over the tuned layers, with
gradient); ``targets`` is ``(B, k, D)``, the stored routing vectors ``r_j`` of each sample's neighbours;
``weights`` is ``(B, k)`` (rows normalised to sum 1 over the real neighbours); ``mask`` is ``(B, k)`` True where a
neighbour exists (padding slots are False).

Formulas (hand-checkable; see ``tests/test_regularizers.py``):

=============  =======================================================================================================
``manifold``   ``R(i) = sum_j W_ij ||r_i - r_j||^2`` over the successful neighbours j of i (paper, Eq. 7). A sample
               with no neighbour contributes exactly 0 (never NaN).
``random``     the same formula with each sample's neighbours replaced by random successful samples (same number of
               neighbours, same weights; :meth:`~roma_peft.neighbours.Neighbourhood.random_control`); a control for
               "any pull toward successful routing helps".
``self``       ``R(i) = ||r_i - r_i^base||^2``: the same formula with the sample's own base-model routing as its one
               neighbour, weight 1 (:meth:`~roma_peft.neighbours.Neighbourhood.self_control`). Not in the paper; a
               control (a prototype showed it matches RoMA's gain on a naive miniature).
``l1``         ``R = sum over tuned routers of sum |Delta|`` (the router deltas; the base weights are frozen).
``l2``         ``R = sum over tuned routers of sum Delta^2``.
``entropy``    ``R(i) = (1/L) sum_l H(p_il)``, ``H(p) = -sum_e p_e log p_e``, the entropy of the routing distribution
               of sample i in each tuned layer l (each layer's block renormalised to sum 1; for ``logits``
               representation a softmax is taken first). Positive lambda sharpens routing.
``none``       ``R = 0``: plain router tuning (the paper's baseline).
=============  =======================================================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, get_args

import torch

__all__ = [
    "REGULARIZERS",
    "NEIGHBOUR_REGULARIZERS",
    "manifold_loss",
    "l1_loss",
    "l2_loss",
    "layer_blocks",
    "routing_entropy",
    "expert_balance",
    "neighbour_cosine",
]

Regularizer = Literal["manifold", "random", "self", "l1", "l2", "entropy", "none"]
REGULARIZERS = get_args(Regularizer)
"""Every value of ``RomaTrainingArguments.regularizer``."""

NEIGHBOUR_REGULARIZERS = ("manifold", "random", "self")
"""Options that need a neighbourhood (stored neighbour or base routing targets)."""

_EPS = 1e-12


def manifold_loss(r: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``R(i) = sum_j W_ij ||r_i - r_j||^2`` per sample, ``(B,)``; 0 for samples without neighbours.

    The one formula of every neighbour option: ``manifold``, ``random`` and ``self`` differ only in the
    :class:`~roma_peft.neighbours.Neighbourhood` whose ``lookup`` gives ``targets``, ``weights`` and ``mask``.
    """
    if r.dim() != 2 or targets.dim() != 3 or targets.shape[0] != r.shape[0] or targets.shape[2] != r.shape[1]:
        raise ValueError(
            f"manifold_loss needs r (B, D) and targets (B, k, D); got r {tuple(r.shape)}, targets "
            f"{tuple(targets.shape)}. Was the neighbourhood built with another routing spec or other tuned layers?"
        )
    targets = targets.to(device=r.device, dtype=r.dtype)
    w = torch.where(
        mask.to(r.device), weights.to(device=r.device, dtype=r.dtype), torch.zeros((), dtype=r.dtype, device=r.device)
    )
    # Padded slots may hold garbage targets (even NaN): zero their difference instead of multiplying NaN by 0.
    diff = torch.where(
        mask.to(r.device)[..., None], r[:, None, :] - targets, torch.zeros((), dtype=r.dtype, device=r.device)
    )
    return (w * diff.pow(2).sum(-1)).sum(-1)


def l1_loss(deltas: Iterable[torch.Tensor]) -> torch.Tensor:
    """``R = sum |Delta|`` over every router delta (a scalar)."""
    deltas = list(deltas)
    if not deltas:
        raise ValueError("l1_loss got no router delta.")
    return torch.stack([d.float().abs().sum() for d in deltas]).sum()


def l2_loss(deltas: Iterable[torch.Tensor]) -> torch.Tensor:
    """``R = sum Delta^2`` over every router delta (a scalar)."""
    deltas = list(deltas)
    if not deltas:
        raise ValueError("l2_loss got no router delta.")
    return torch.stack([d.float().pow(2).sum() for d in deltas]).sum()


def layer_blocks(r: torch.Tensor, dims: Sequence[int], representation: str = "probs") -> list[torch.Tensor]:
    """Split ``(B, D)`` routing into per-layer ``(B, E_l)`` probability distributions (rows sum to 1)."""
    if sum(dims) != r.shape[-1]:
        raise ValueError(f"routing width {r.shape[-1]} does not match the layer widths {list(dims)}.")
    blocks = torch.split(r.float(), list(dims), dim=-1)
    if representation == "logits":
        return [torch.softmax(b, dim=-1) for b in blocks]
    return [b.clamp_min(0) / b.clamp_min(0).sum(-1, keepdim=True).clamp_min(_EPS) for b in blocks]


def routing_entropy(r: torch.Tensor, dims: Sequence[int], representation: str = "probs") -> torch.Tensor:
    """``(1/L) sum_l H(p_il)`` per sample, ``(B,)`` (natural log): the ``entropy`` regulariser, also logged for every
    option."""
    per_layer = [-(p * torch.log(p.clamp_min(_EPS))).sum(-1) for p in layer_blocks(r, dims, representation)]
    return torch.stack(per_layer, dim=0).mean(0)


def expert_balance(r: torch.Tensor, dims: Sequence[int], representation: str = "probs") -> torch.Tensor:
    """Expert-utilisation balance of a batch, a scalar in [0, 1] (1 = every expert used equally).

    Per layer: ``u = mean_i p_il`` (the batch's mean routing distribution), balance = ``H(u) / log(E_l)``; averaged
    over layers. A collapse of routing onto few experts drives it toward 0.
    """
    values = []
    for p in layer_blocks(r.detach(), dims, representation):
        u = p.mean(0)
        h = -(u * torch.log(u.clamp_min(_EPS))).sum()
        values.append(h / torch.log(torch.tensor(float(max(p.shape[-1], 2)))))
    return torch.stack(values).mean()


def neighbour_cosine(r: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weighted mean cosine similarity between each r_i and its neighbours' targets, over samples that have one.

    A scalar (NaN-free: 0 when no sample of the batch has a neighbour). Used for logging.
    """
    r = r.detach().float()
    targets = targets.to(device=r.device, dtype=r.dtype)
    mask = mask.to(r.device)
    cos = torch.nn.functional.cosine_similarity(r[:, None, :], targets, dim=-1, eps=1e-8)
    cos = torch.where(mask, cos, torch.zeros_like(cos))
    w = torch.where(mask, weights.to(device=r.device, dtype=r.dtype), torch.zeros_like(cos))
    per_sample = (w * cos).sum(-1)
    has = mask.any(-1)
    if not has.any():
        return torch.zeros((), device=r.device)
    return per_sample[has].mean()
