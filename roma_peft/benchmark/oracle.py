"""Oracle routing (paper Eq. 1): per-sample routing optimised toward a target answer, batched.

``r*_i = argmin_r CE(f(x_i, r), y_i)``: how much accuracy is available if each sample's routing alone were chosen
well. The paper reports a 10-20 point gap between base routing and this oracle, which motivates RoMA.

Implementation: each sample gets its own offset ``δ_i`` (one hidden-size vector per selected router) that a forward
pre-hook adds to the *router's input only* (the experts still see the unchanged hidden state), so the router logits
become ``W (h + δ_i) = W h + W δ_i``: a free per-sample shift of the routing logits (``W`` has full row rank, E <= H).
The offsets of a whole batch are optimised together with Adam on the CE of the target continuation, applied to every
token of the sample (prompt and answer); the sample is then scored on all its options with the same offsets. Nothing
but routing changes, and no router weight is touched.

The ``target="wrong"`` control optimises the same way toward a random *wrong* option: if that removes as much accuracy
as the gold oracle adds, the oracle gap shows only that routing can steer the answer, not that a better routing is
there to be learned (a prototype here measured exactly that: +8..+19 points toward gold, -30..-50 toward wrong).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..capture import RoutingRecorder, RoutingSpec
from ..data import DEFAULT_PROMPT_TEMPLATE
from ..routers import RouterInfo
from ..scoring import build_requests

__all__ = ["OracleResult", "oracle_routing"]


@dataclass
class OracleResult:
    """Accuracy with per-sample optimised routing, and that routing (last prompt token, for figures)."""

    target: str
    accuracy: float
    correct: list[bool]
    routing: torch.Tensor


class _RouterInputOffsets:
    """Adds ``offsets[k][row]`` to every token of each row at router ``k``'s input (a forward pre-hook)."""

    def __init__(self, routers: Sequence[RouterInfo]):
        self.routers = list(routers)
        self.offsets: Optional[list[torch.Tensor]] = None
        self.rows = self.length = 0
        self._handles = [r.module.register_forward_pre_hook(self._hook(k)) for k, r in enumerate(self.routers)]

    def _hook(self, k: int):
        def hook(module, args):
            if self.offsets is None:
                return None
            hidden = args[0]
            shaped = hidden.reshape(self.rows, self.length, hidden.shape[-1])
            shifted = shaped + self.offsets[k][:, None, :].to(device=hidden.device, dtype=hidden.dtype)
            return (shifted.reshape(hidden.shape), *args[1:])

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _batch_tensors(requests, pad_id: int, device: torch.device):
    """Padded input ids, attention mask, continuation targets (-100 elsewhere) and prompt-last index, built on the
    CPU and moved to ``device`` (the model's) in one copy each."""
    inputs = [(c + t)[:-1] for _, _, c, t in requests]
    width = max(len(x) for x in inputs)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros_like(ids)
    targets = torch.full_like(ids, -100)
    for row, ((_, _, ctx, cont), inp) in enumerate(zip(requests, inputs)):
        ids[row, : len(inp)] = torch.tensor(inp, dtype=torch.long, device="cpu")
        mask[row, : len(inp)] = 1
        targets[row, len(inp) - len(cont) : len(inp)] = torch.tensor(cont, dtype=torch.long, device="cpu")
    prompt_last = torch.tensor([len(ctx) - 1 for _, _, ctx, _ in requests], dtype=torch.long, device="cpu")
    return tuple(t.to(device) for t in (ids, mask, targets, prompt_last))


def _model_device(model) -> torch.device:
    """Where the model's (first) parameters live: every tensor the oracle makes is put there."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _row_loglik(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    targets = targets.to(logp.device)  # a model split over devices returns its logits on the last one
    valid = targets != -100
    picked = logp.gather(2, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * valid).sum(dim=1)


def oracle_routing(
    model,
    tokenizer,
    samples: Sequence[dict],
    routers: Sequence[RouterInfo],
    target: str = "gold",
    steps: int = 30,
    lr: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    progress: bool = True,
) -> OracleResult:
    """Optimise each sample's routing toward its gold (or a random wrong) option, then score it.

    Args:
        model: A causal MoE LM (its parameters are not changed).
        routers: The routers whose routing is optimised (e.g. the ones RoMA tunes).
        target: ``"gold"`` or ``"wrong"`` (a random wrong option per sample, drawn with ``seed``).

    Runs on the model's device (that of its first parameter): inputs, offsets and scores are all created there,
    whatever the default device is. The offsets are optimised in float32 and cast to the router input's dtype in the
    hook. The returned ``routing`` is on the CPU (it is meant for figures / numpy).
    """
    if target not in ("gold", "wrong"):
        raise ValueError(f"target must be 'gold' or 'wrong', got {target!r}.")
    rng = random.Random(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    hidden = int(routers[0].hidden_size)
    device = _model_device(model)
    offsets = _RouterInputOffsets(routers)
    recorder = RoutingRecorder(model, routers=routers, spec=RoutingSpec())
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters()]
    grad_flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    correct: list[bool] = []
    routing: list[torch.Tensor] = []
    try:
        for start in tqdm(range(0, len(samples), batch_size), desc=f"oracle ({target})", disable=not progress):
            batch = list(samples[start : start + batch_size])
            goals = []
            for s in batch:
                if target == "gold":
                    goals.append(s["label"])
                else:
                    goals.append(rng.choice([j for j in range(len(s["options"])) if j != s["label"]]))
            requests = build_requests(tokenizer, batch, template)
            by_sample = {(i, j): r for r, (i, j, _, _) in enumerate(requests)}
            goal_rows = [requests[by_sample[(i, g)]] for i, g in enumerate(goals)]
            ids, mask, targets, prompt_last = _batch_tensors(goal_rows, pad_id, device)
            delta = [
                torch.zeros(len(batch), hidden, dtype=torch.float32, device=device, requires_grad=True) for _ in routers
            ]
            optimiser = torch.optim.Adam(delta, lr=lr)
            offsets.rows, offsets.length = ids.shape
            for _ in range(steps):
                offsets.offsets = delta
                loss = -_row_loglik(model(input_ids=ids, attention_mask=mask).logits, targets).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            with torch.no_grad():
                offsets.offsets = delta
                with recorder:
                    model(input_ids=ids, attention_mask=mask)
                routing.append(recorder.routing(mask, prompt_last).float().cpu())
                # score every option of every sample with that sample's offsets
                all_ids, all_mask, all_targets, _ = _batch_tensors(requests, pad_id, device)
                row_sample = torch.tensor([i for i, _, _, _ in requests], dtype=torch.long, device=device)
                offsets.rows, offsets.length = all_ids.shape
                offsets.offsets = [d[row_sample] for d in delta]
                ll = _row_loglik(model(input_ids=all_ids, attention_mask=all_mask).logits, all_targets).cpu()
                scores = torch.full((len(batch), max(len(s["options"]) for s in batch)), float("-inf"), device="cpu")
                for row, (i, j, _, _) in enumerate(requests):
                    scores[i, j] = ll[row]
                preds = scores.argmax(dim=1).tolist()
                correct.extend(p == s["label"] for p, s in zip(preds, batch))
            offsets.offsets = None
    finally:
        offsets.offsets = None
        offsets.remove()
        recorder.remove()
        for p, flag in zip(params, grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return OracleResult(
        target=target,
        accuracy=sum(correct) / max(len(correct), 1),
        correct=correct,
        routing=torch.cat(routing) if routing else torch.zeros(0, device="cpu"),
    )
