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

:func:`score_with_routing` is the other intervention at the same place: it *forces* given routing weights at the last
prompt token (e.g. the kernel-regression estimate of what RoMA aims for, ``sum_j W_ij r_j``) and scores the options.
There the router input of that one token is replaced by ``h + W^+ (l* - (W h + b))``, where ``l*`` are the logits
whose scoring gives the target weights (the registry's inverse scoring, :meth:`RouterFamily.logits_for`: ``log p``
for softmax families, ``logit(p)`` for sigmoid ones) and ``W^+`` the pseudo-inverse of the router matrix, so the router
computes exactly ``l*`` (``W W^+ = I`` for ``E <= H``) and makes its own top-k choice from it; the experts, every
other token and every other layer see the unchanged hidden state. The routing actually obtained is recorded and its
largest deviation from the target is returned, so a router that is not linear in its input is detected, not trusted.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..capture import RoutingRecorder, RoutingSpec
from ..data import DEFAULT_PROMPT_TEMPLATE
from ..devices import input_device
from ..prompts import PromptEncoding
from ..routers import RouterInfo
from ..scoring import build_requests

__all__ = ["OracleResult", "oracle_routing", "RoutingSwapResult", "score_with_routing"]


@dataclass
class OracleResult:
    """Accuracy with per-sample optimised routing, and that routing (last prompt token, for figures)."""

    target: str
    accuracy: float
    correct: list[bool]
    routing: torch.Tensor
    pred: list[int] = field(default_factory=list)  # predicted option per sample after optimisation
    goal: list[int] = field(default_factory=list)  # the option each sample's routing was optimised toward


class _RouterInputHooks:
    """Forward pre-hooks that rewrite each router's input, seen as ``(rows, length, hidden)``; a subclass says when
    they are active (:meth:`_active`) and what they do (:meth:`_edit`)."""

    def __init__(self, routers: Sequence[RouterInfo]):
        self.routers = list(routers)
        self.rows = self.length = 0
        self._handles = [r.module.register_forward_pre_hook(self._hook(k)) for k, r in enumerate(self.routers)]

    def _active(self) -> bool:
        raise NotImplementedError

    def _edit(self, k: int, shaped: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _hook(self, k: int):
        def hook(module, args):
            if not self._active():
                return None
            hidden = args[0]
            shaped = hidden.reshape(self.rows, self.length, hidden.shape[-1])
            return (self._edit(k, shaped).reshape(hidden.shape), *args[1:])

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _RouterInputOffsets(_RouterInputHooks):
    """Adds ``offsets[k][row]`` to every token of each row at router ``k``'s input (a forward pre-hook)."""

    def __init__(self, routers: Sequence[RouterInfo]):
        self.offsets: list[torch.Tensor] | None = None
        super().__init__(routers)

    def _active(self) -> bool:
        return self.offsets is not None

    def _edit(self, k: int, shaped: torch.Tensor) -> torch.Tensor:
        return shaped + self.offsets[k][:, None, :].to(device=shaped.device, dtype=shaped.dtype)


def _batch_tensors(requests, pad_id: int, device: torch.device):
    """Padded input ids, attention mask, continuation targets (-100 elsewhere) and prompt-last index, built on the
    CPU and moved to ``device`` (the model's) in one copy each."""
    inputs = [(c + t)[:-1] for _, _, c, t in requests]
    width = max(len(x) for x in inputs)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros_like(ids)
    targets = torch.full_like(ids, -100)
    for row, ((_, _, _ctx, cont), inp) in enumerate(zip(requests, inputs)):
        ids[row, : len(inp)] = torch.tensor(inp, dtype=torch.long, device="cpu")
        mask[row, : len(inp)] = 1
        targets[row, len(inp) - len(cont) : len(inp)] = torch.tensor(cont, dtype=torch.long, device="cpu")
    prompt_last = torch.tensor([len(ctx) - 1 for _, _, ctx, _ in requests], dtype=torch.long, device="cpu")
    return tuple(t.to(device) for t in (ids, mask, targets, prompt_last))


def _row_loglik(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    targets = targets.to(logp.device)  # a model split over devices returns its logits on the last one
    valid = targets != -100
    picked = logp.gather(2, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * valid).sum(dim=1)


def _score_options(
    model, requests, n_samples: int, pad_id: int, device, before_forward=None, recorder: RoutingRecorder | None = None
):
    """Option log-likelihoods of every request in one forward: ``(n_samples, max options)`` (``-inf`` padding) on the
    CPU, plus the recorded routing of each row's last prompt token when a recorder is given.

    ``before_forward(shape, row_sample, prompt_last)`` sets up the per-row router intervention for this forward.
    """
    ids, mask, targets, prompt_last = _batch_tensors(requests, pad_id, device)
    row_sample = torch.tensor([i for i, _, _, _ in requests], dtype=torch.long, device=device)
    if before_forward is not None:
        before_forward(ids.shape, row_sample, prompt_last)
    routing = None
    if recorder is not None:
        with recorder:
            logits = model(input_ids=ids, attention_mask=mask).logits
        routing = recorder.routing(mask, prompt_last).float()
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits
    ll = _row_loglik(logits, targets).cpu()
    width = max(j for _, j, _, _ in requests) + 1
    scores = torch.full((n_samples, width), float("-inf"), device="cpu")
    for row, (i, j, _, _) in enumerate(requests):
        scores[i, j] = ll[row]
    return scores, routing, row_sample


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
    encoding: PromptEncoding | None = None,
    goals: Sequence[int] | None = None,
) -> OracleResult:
    """Optimise each sample's routing toward its gold (or a random wrong) option, then score it.

    Args:
        model: A causal MoE LM (its parameters are not changed).
        routers: The routers whose routing is optimised (e.g. the ones RoMA tunes).
        target: ``"gold"`` or ``"wrong"`` (a random wrong option per sample, drawn with ``seed``).
        encoding: The prompt encoding (template, truncation, chat template) of scoring and training; ``template``
            alone is a shortcut for ``PromptEncoding(template=template)``.
        goals: The option each sample is optimised toward, given explicitly (e.g. a wrong option other than the one
            the base model already predicts); ``target`` then only names the run.

    Runs on the model's device (:func:`roma_peft.devices.input_device`): inputs, offsets and scores are all created
    there, whatever the default device is. The offsets are optimised in float32 and cast to the router input's dtype
    in the hook. The returned ``routing`` is on the CPU (it is meant for figures / numpy); ``pred`` and ``goal`` are
    the predicted and the targeted option of each sample.
    """
    if target not in ("gold", "wrong"):
        raise ValueError(f"target must be 'gold' or 'wrong', got {target!r}.")
    encoding = encoding or PromptEncoding(template=template)
    if goals is not None:
        goals = [int(g) for g in goals]
        if len(goals) != len(samples):
            raise ValueError(f"goals must give one option per sample ({len(samples)}), got {len(goals)}.")
        bad = [s["id"] for s, g in zip(samples, goals) if not 0 <= g < len(s["options"])]
        if bad:
            raise ValueError(f"goals name an option that sample {bad[0]!r} does not have.")
    rng = random.Random(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    hidden = int(routers[0].hidden_size)
    device = input_device(model)
    offsets = _RouterInputOffsets(routers)
    recorder = RoutingRecorder(model, routers=routers, spec=RoutingSpec())
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters()]
    grad_flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    correct: list[bool] = []
    preds: list[int] = []
    all_goals: list[int] = []
    routing: list[torch.Tensor] = []
    try:
        for start in tqdm(range(0, len(samples), batch_size), desc=f"oracle ({target})", disable=not progress):
            batch = list(samples[start : start + batch_size])
            batch_goals = []
            for offset, s in enumerate(batch):
                if goals is not None:
                    batch_goals.append(goals[start + offset])
                elif target == "gold":
                    batch_goals.append(s["label"])
                else:
                    batch_goals.append(rng.choice([j for j in range(len(s["options"])) if j != s["label"]]))
            requests = build_requests(tokenizer, batch, encoding=encoding)
            by_sample = {(i, j): r for r, (i, j, _, _) in enumerate(requests)}
            goal_rows = [requests[by_sample[(i, g)]] for i, g in enumerate(batch_goals)]
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

                def per_row_offsets(shape, row_sample, _prompt_last, delta=delta):  # each row: its sample's offsets
                    offsets.rows, offsets.length = shape
                    offsets.offsets = [d[row_sample] for d in delta]

                scores, _, _ = _score_options(model, requests, len(batch), pad_id, device, per_row_offsets)
                batch_preds = scores.argmax(dim=1).tolist()
                preds.extend(batch_preds)
                all_goals.extend(batch_goals)
                correct.extend(p == s["label"] for p, s in zip(batch_preds, batch))
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
        pred=preds,
        goal=all_goals,
    )


# ---------------------------------------------------------------------------------------------- forced routing


@dataclass
class RoutingSwapResult:
    """Predictions with forced routing weights at the last prompt token (:func:`score_with_routing`).

    ``max_error`` is the largest absolute difference between the routing weights the routers actually produced at
    the forced token and the target (0 up to float rounding when the swap is exact).
    """

    accuracy: float
    correct: list[bool]
    pred: list[int]
    max_error: float


def _projection_owner(router: RouterInfo):
    """The module that owns the router matrix (and its bias, if any), looked through a PEFT wrapper."""
    owner = router.module
    if router.projection_name != router.name:
        owner = router.module.get_submodule(router.projection_name[len(router.name) + 1 :])
    get_base_layer = getattr(owner, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) and hasattr(owner, "base_layer") else owner


class _ForcedRouterLogits(_RouterInputHooks):
    """Forward pre-hooks that make each router compute given logits at one token per row (see the module docstring).

    ``logits[k]`` is ``(rows, E_k)``: the logits router ``k`` must produce at ``positions[row]``; the router input of
    that token becomes ``h + W^+ (l* - (W h + b))``; other tokens are untouched.
    """

    def __init__(self, routers: Sequence[RouterInfo]):
        self.logits: list[torch.Tensor] | None = None
        self.positions: torch.Tensor | None = None
        self._matrices: dict = {}
        super().__init__(routers)

    def _matrix(self, k: int, device):
        key = (k, str(device))
        if key not in self._matrices:
            router = self.routers[k]
            owner = _projection_owner(router)
            weight = owner.weight.detach().to(device=device, dtype=torch.float32)[: router.num_experts]
            bias = getattr(owner, "bias", None) if router.has_bias else None
            if bias is not None:
                bias = bias.detach().to(device=device, dtype=torch.float32)[: router.num_experts]
            self._matrices[key] = (weight, bias, torch.linalg.pinv(weight))
        return self._matrices[key]

    def _active(self) -> bool:
        return self.logits is not None

    def _edit(self, k: int, shaped: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(self.rows, device=shaped.device)
        positions = self.positions.to(shaped.device)
        weight, bias, pinv = self._matrix(k, shaped.device)
        h = shaped[rows, positions].float()
        current = h @ weight.T + (bias if bias is not None else 0.0)
        target = self.logits[k].to(device=shaped.device, dtype=torch.float32)
        forced = shaped.clone()
        forced[rows, positions] = (h + (target - current) @ pinv.T).to(shaped.dtype)
        return forced


def score_with_routing(
    model,
    tokenizer,
    samples: Sequence[dict],
    routers: Sequence[RouterInfo],
    routing: torch.Tensor,
    batch_size: int = 32,
    encoding: PromptEncoding | None = None,
    progress: bool = True,
) -> RoutingSwapResult:
    """Score ``samples`` with their routing weights at the last prompt token forced to ``routing``.

    Args:
        routers: The routers whose routing is forced (e.g. the ones RoMA tunes), in the order of ``routing``'s blocks.
        routing: ``(N, sum of experts)`` dense routing weights (representation ``probs``, as
            :func:`roma_peft.capture.collect_routing` returns them for these routers), one row per sample.

    Every router's family must have an inverse scoring (:attr:`RouterFamily.invertible`: softmax, sigmoid,
    sqrtsoftplus); otherwise ``NotImplementedError`` is raised before any model work. Runs on the model's device;
    the model is not changed.
    """
    # (a tensor made here without a device would land on the *default* device, not the CPU or the model's)
    routing = (routing.detach() if isinstance(routing, torch.Tensor) else torch.as_tensor(routing, device="cpu")).to(
        dtype=torch.float32
    )
    dims = [int(r.num_experts) for r in routers]
    if routing.ndim != 2 or routing.shape != (len(samples), sum(dims)):
        raise ValueError(
            f"routing must have shape (N={len(samples)}, {sum(dims)}) for these routers, got {tuple(routing.shape)}"
        )
    for router in routers:
        if not router.family.invertible:  # before any forward pass: logits_for says why
            router.family.logits_for(torch.zeros(1, 1))
    encoding = encoding or PromptEncoding()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = input_device(model)
    forced = _ForcedRouterLogits(routers)
    recorder = RoutingRecorder(model, routers=routers, spec=RoutingSpec())
    was_training = model.training
    model.eval()
    correct: list[bool] = []
    preds: list[int] = []
    max_error = 0.0
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(samples), batch_size), desc="forced routing", disable=not progress):
                batch = list(samples[start : start + batch_size])
                target = routing[start : start + len(batch)].to(device)
                blocks = list(torch.split(target, dims, dim=1))
                logits = [r.family.logits_for(b) for r, b in zip(routers, blocks)]
                requests = build_requests(tokenizer, batch, encoding=encoding)

                def per_row_logits(shape, row_sample, prompt_last, logits=logits):
                    forced.rows, forced.length = shape
                    forced.positions = prompt_last
                    forced.logits = [lg[row_sample] for lg in logits]

                scores, got, row_sample = _score_options(
                    model, requests, len(batch), pad_id, device, per_row_logits, recorder
                )
                forced.logits = None
                max_error = max(max_error, float((got - target[row_sample]).abs().max()))
                batch_preds = scores.argmax(dim=1).tolist()
                preds.extend(batch_preds)
                correct.extend(p == s["label"] for p, s in zip(batch_preds, batch))
    finally:
        forced.logits = None
        forced.remove()
        recorder.remove()
        model.train(was_training)
    return RoutingSwapResult(
        accuracy=sum(correct) / max(len(correct), 1), correct=correct, pred=preds, max_error=max_error
    )
