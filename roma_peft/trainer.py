"""**Where the RoMA loss is added**: :class:`RomaTrainer` (a ``transformers.Trainer``) and its arguments.

Per training sample i (paper Eq. 7-9)::

    L(i) = CE(answer_i | prompt_i) + lambda_eff * R(i)
    R(i) = sum_{j in N(i)} W_ij ||r_i - r_j||^2          (regularizer="manifold", the default)

* ``CE``: mean token cross-entropy of the gold continuation given the prompt (prompt tokens masked), computed here
  from the logits (``out.loss`` is never used: with ``output_router_logits`` many families add the load-balancing
  loss to it). ``loss_type="multiple_choice"`` uses instead the cross-entropy over the options' summed
  log-likelihoods (lm-eval's scoring rule).
* ``r_i``: the *live* routing of the model being trained, captured by :class:`~roma_peft.capture.RoutingRecorder`
  (with gradient to the router deltas) at the configured prompt position, concatenated over the tuned layers.
  This is what makes the manifold term train; the authors' released script read r_i from a file, so its
  regulariser had zero gradient.
* ``r_j``, ``W_ij``: stored in the :class:`~roma_peft.neighbours.Neighbourhood` (base-model routing by default,
  fixed; optionally refreshed every ``refresh_targets_steps``).
* The batch loss is ``mean_i L(i)``: per-sample means make the loss independent of how a global batch is split
  across devices or accumulation steps, so DDP and gradient accumulation give the same updates as one big batch.

Options of the regulariser (``manifold``, ``random``, ``self``, ``l1``, ``l2``, ``entropy``, ``none``) are the
functions of :mod:`roma_peft.regularizers`. ``docs/training.md`` lists every option and its source.

**Evaluation** goes through the Trainer's own ``evaluate``/``evaluation_loop`` (rank split, gathering, progress bar,
``load_best_model_at_end``): the eval collator gives one row per (sample, option), :meth:`RomaTrainer.prediction_step`
returns the eval loss and the per-option summed log-likelihoods, and :func:`multiple_choice_metrics` turns them into
``eval_accuracy``/``eval_accuracy_norm`` (lm-eval's rule, equal to :func:`~roma_peft.scoring.score_multiple_choice`)
with their standard errors. The eval loss is the training objective on the eval samples: the task loss (of
``loss_type``) plus ``lambda * R`` for the regularisers defined on any sample (``l1``, ``l2``, ``entropy``; ``none`` is
0). ``manifold``/``random``/``self`` have no targets for samples outside the training set, so there the eval loss is
the task loss and no eval regulariser is logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from . import regularizers as regs
from .capture import POSITIONS, REPRESENTATIONS, RoutingRecorder, RoutingSpec, collect_routing
from .collator import LOSS_TYPES, LossType, RomaDataCollator
from .conditions import check_conditions, routing_conditions
from .constants import ADAPTER_PREFIX, roma_peft_type
from .data import DEFAULT_PROMPT_TEMPLATE, data_hash, validate_samples
from .distributed import launched_world_size
from .export import TRAINING_INFO_ATTRIBUTE, update_model_card
from .layer import nonfinite_routers
from .neighbours import Neighbourhood, NeighbourhoodConfig, build_neighbourhood
from .plots import routing_statistics, save_training_plots
from .prompts import PromptEncoding
from .scoring import accepts_logits_to_keep, accuracy_metrics, pick_options, score_multiple_choice
from .zero3 import prepare_deepspeed_zero3

logger = logging.getLogger(__name__)

__all__ = [
    "RomaTrainingArguments",
    "RomaTrainer",
    "NonFiniteLossError",
    "routing_spec_string",
    "roma_parameters",
    "multiple_choice_metrics",
]

TARGETS_FILE = "roma_targets.safetensors"
# With refresh_successful_set: the rebuilt neighbourhood (S, N(i), W, routing), a Neighbourhood.save() folder.
NEIGHBOURHOOD_DIR = "roma_neighbourhood"


class NonFiniteLossError(FloatingPointError):
    """A loss component or the trained router weights became NaN/inf; training stops and nothing is saved from it.

    Raised before the optimizer step for a non-finite loss, right after it when ``W + Δ`` (in the model's dtype) is not
    finite, and instead of writing a checkpoint or adapter from a non-finite state. The message names the last good
    checkpoint.
    """


@dataclass
class RomaTrainingArguments(TrainingArguments):
    r"""Configuration of :class:`RomaTrainer`: ``transformers.TrainingArguments`` plus RoMA's options.

    Only the RoMA parameters are listed here; every other field is ``TrainingArguments``'. Some of its defaults differ
    (listed last). ``HfArgumentParser`` turns the class into the ``roma-peft train`` options, and every value is
    checked when the object is built.

    Parameters:
        > Parameters of the objective (paper Eq. 7-9)

        roma_lambda (`float`, defaults to `0.8`):
            Weight lambda of the regulariser, >= 0 (the released script used 0.8).
        lambda_warmup_steps (`int`, defaults to `0`):
            Linear warm-up of lambda over this many optimizer steps (0 = off).
        regularizer (`str`, defaults to `"manifold"`):
            One of `"manifold"` (RoMA), `"random"`, `"self"` (controls), `"l1"`, `"l2"`, `"entropy"`, `"none"`.
        random_neighbours_seed (`int` or `None`, defaults to `None`):
            Seed of the fixed random draw of `regularizer="random"` (`None`: `seed`).
        loss_type (`str`, defaults to `"causal_lm"`):
            Task loss: `"causal_lm"` (CE of the gold answer) or `"multiple_choice"` (CE over the options).

        > Parameters of the routing vector r_i

        routing_position (`str`, defaults to `"last"`), routing_num_tokens (`int`, defaults to `1`):
            Prompt tokens whose routing is r_i (paper ablation: Last1 best).
        routing_representation (`str`, defaults to `"probs"`):
            What r_i holds: the routing weights, the router logits or the top-k weights.
        refresh_targets_steps (`int`, defaults to `0`), refresh_successful_set (`bool`, defaults to `False`):
            Recompute r_j (and S and the neighbourhoods) with the current routers every N steps (0 = fixed).

        > Parameters of the prompts (shared by S, the targets r_j and training)

        prompt_template (`str`), use_chat_template (`bool`), system_prompt (`str` or `None`),
        max_length (`int` or `None`):
            How a sample becomes tokens, see :class:`~roma_peft.prompts.PromptEncoding`.

        > Parameters of the figures

        routing_plot_samples (`int`, defaults to `512`):
            Training samples whose routing :meth:`RomaTrainer.save_plots` draws (0 = no heatmaps).

        > ``TrainingArguments`` defaults changed here (sources: the released training script's flags)

        learning_rate (`float`, defaults to `7e-5`), weight_decay (`float`, defaults to `0.01`),
        num_train_epochs (`float`, defaults to `3`), per_device_train_batch_size (`int`, defaults to `32`):
            The released script's values.
        logging_steps (`float`, defaults to `10`):
            Log every 10 steps.
        remove_unused_columns (`bool`, defaults to `False`):
            Always False: the collator needs the raw sample columns (True is reset with a warning).
        ddp_find_unused_parameters (`bool`, defaults to `False`):
            Every trainable router delta takes part in every forward, so DDP needs no unused-parameter search.
        dataloader_pin_memory (`bool`):
            Set to False when torch sees no accelerator (nothing to pin for; torch would warn on every iterator).
    """

    roma_lambda: float = field(
        default=0.8,
        metadata={"help": "lambda, weight of the regulariser (paper Eq. 9; the released script used 0.8). >= 0."},
    )
    lambda_warmup_steps: int = field(
        default=0,
        metadata={
            "help": (
                "Linear warm-up of lambda over this many optimizer steps (0 = off): lambda_eff = lambda * "
                "min(1, (step + 1) / lambda_warmup_steps). A warning is given when it exceeds the planned steps "
                "(the released script's 2000-step warm-up never completed in its ~465-step run)."
            )
        },
    )
    regularizer: regs.Regularizer = field(
        default="manifold",
        metadata={
            "help": (
                f"One of {regs.REGULARIZERS}: 'manifold' (RoMA), 'random' (random successful neighbours, same "
                "weights), 'self' (pull toward the sample's own base routing; a control not in the paper), "
                "'l1'/'l2' (on the router deltas), 'entropy' (of the routing distribution), 'none' (plain router "
                "tuning)."
            )
        },
    )
    routing_position: Literal[POSITIONS] = field(
        default="last",
        metadata={"help": f"Prompt tokens whose routing is r_i, one of {POSITIONS} (paper ablation: Last1 best)."},
    )
    routing_num_tokens: int = field(default=1, metadata={"help": "N of last/first/middle-N positions (paper: 1)."})
    routing_representation: Literal[REPRESENTATIONS] = field(
        default="probs",
        metadata={"help": f"What r_i holds, one of {REPRESENTATIONS} (default: the family's routing weights)."},
    )
    refresh_targets_steps: int = field(
        default=0,
        metadata={
            "help": (
                "Recompute the stored routing targets r_j with the current routers every N optimizer steps "
                "(0 = fixed base-model targets, the default: a prototype here measured fixed targets 2-4 points "
                "better and 4-6x cheaper than per-step recomputation)."
            )
        },
    )
    refresh_successful_set: bool = field(
        default=False,
        metadata={
            "help": (
                "With refresh_targets_steps: also re-score the training set with the current model and rebuild S "
                "and the neighbourhoods (RomaTrainer needs `embeddings`; `roma-peft train` embeds the samples as the "
                "neighbourhood was built)."
            )
        },
    )
    loss_type: LossType = field(
        default="causal_lm",
        metadata={
            "help": (
                f"Task loss, one of {LOSS_TYPES}: 'causal_lm' = CE of the gold answer continuation given the "
                "prompt, prompt tokens masked (paper Eq. 8); 'multiple_choice' = CE over the options' summed "
                "log-likelihoods."
            )
        },
    )
    prompt_template: str = field(
        default=DEFAULT_PROMPT_TEMPLATE, metadata={"help": "Prompt template (str.format over the sample's keys)."}
    )
    use_chat_template: bool = field(
        default=False,
        metadata={
            "help": "Wrap each prompt (prompt_template, e.g. '{question}') in the tokenizer's chat template as a "
            "user turn with the generation prompt (instruct models); used for S, targets and training."
        },
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "With use_chat_template: a system turn before the user turn."}
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Longest training row in tokens (None: no truncation); the prompt keeps max_length minus "
            "its sample's longest answer, on the tokenizer's truncation side."
        },
    )
    random_neighbours_seed: int | None = field(
        default=None, metadata={"help": "Seed of the fixed random draw of regularizer='random' (default: seed)."}
    )
    routing_plot_samples: int = field(
        default=512,
        metadata={
            "help": "Training samples (evenly spread) whose routing RomaTrainer.save_plots / `roma-peft train` "
            "draws in routing_heatmaps.png, base vs tuned: 4 forward passes over their prompts "
            "(0 = no heatmaps, the training curves only)."
        },
    )
    # changed defaults of TrainingArguments (sources in docs/training.md)
    learning_rate: float = field(default=7e-5, metadata={"help": "AdamW learning rate (released script: 7e-5)."})
    weight_decay: float = field(default=0.01, metadata={"help": "Weight decay (released script: 0.01)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs (released script: 3)."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size (released script: 32)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: RomaDataCollator needs the sample columns."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP's find_unused_parameters (Trainer's default for a PeftModel: True). False: every "
            "trainable router delta takes part in every forward (each regulariser is tested), so DDP "
            "needs no extra graph traversal and prints no warning on every step."
        },
    )

    def __post_init__(self):
        if not self.use_cpu and launched_world_size() > 1 and not _accelerator_available():
            # Several CPU processes: without use_cpu, TrainingArguments makes accelerate's state a single process and
            # every rank would silently train alone on its own copy; use_cpu joins them with gloo, as the user meant.
            self.use_cpu = True
        super().__post_init__()
        if self.deepspeed and self.use_cpu and self.world_size > 1:
            # accelerate joined the CPU ranks (gloo) but, unlike on accelerators (where its PartialState calls
            # deepspeed.comm.init_distributed), left DeepSpeed's communication uninitialised. A model loaded next under
            # deepspeed.zero.Init (ZeRO-3, `roma-peft train --deepspeed`) then reads the world size as 1 and rejects
            # the batch sizes. DeepSpeed adopts the existing process group here.
            from deepspeed import comm as ds_comm

            ds_comm.init_distributed(dist_backend=self.distributed_state.backend, auto_mpi_discovery=False)
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False
        if self.dataloader_pin_memory and not _accelerator_available():
            # nothing to pin for: torch would warn on every DataLoader iterator ("no accelerator is found")
            self.dataloader_pin_memory = False
        if self.roma_lambda is None or not math.isfinite(float(self.roma_lambda)) or self.roma_lambda < 0:
            raise ValueError(f"roma_lambda must be a finite number >= 0, got {self.roma_lambda!r}.")
        if self.lambda_warmup_steps < 0:
            raise ValueError(f"lambda_warmup_steps must be >= 0, got {self.lambda_warmup_steps}.")
        if self.routing_plot_samples < 0:
            raise ValueError(f"routing_plot_samples must be >= 0, got {self.routing_plot_samples}.")
        if self.refresh_targets_steps < 0:
            raise ValueError(f"refresh_targets_steps must be >= 0, got {self.refresh_targets_steps}.")
        if self.regularizer not in regs.REGULARIZERS:
            raise ValueError(f"regularizer must be one of {regs.REGULARIZERS}, got {self.regularizer!r}.")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}.")
        self.routing_spec()  # validates position / num_tokens / representation
        self.prompt_encoding()  # validates template / max_length / chat template options
        if self.remove_unused_columns:
            warnings.warn(
                "remove_unused_columns=True would drop the sample columns RomaDataCollator needs; RomaTrainer ignores "
                "it (the collator passes only input_ids/attention_mask to the model).",
                stacklevel=2,
            )
            self.remove_unused_columns = False

    def prompt_encoding(self, tokenizer=None) -> PromptEncoding:
        """The :class:`~roma_peft.prompts.PromptEncoding` (template, max_length, truncation side) of training rows.

        The same object goes to the collator and to every routing capture, so ``r_i`` and ``r_j`` are read at the same
        token. The truncation side is the tokenizer's, fixed here so that it is recorded with the targets.
        """
        return PromptEncoding.for_tokenizer(
            tokenizer,
            self.prompt_template,
            self.max_length,
            chat_template=self.use_chat_template,
            system_prompt=self.system_prompt,
        )

    @property
    def random_control_seed(self) -> int:
        """Seed of the fixed random draw of ``regularizer="random"``: ``random_neighbours_seed``, else ``seed``."""
        return self.seed if self.random_neighbours_seed is None else self.random_neighbours_seed

    def routing_spec(self) -> RoutingSpec:
        """The :class:`~roma_peft.capture.RoutingSpec` these arguments describe."""
        return RoutingSpec(
            position=self.routing_position,
            num_tokens=int(self.routing_num_tokens),
            representation=self.routing_representation,
        )


def _accelerator_available() -> bool:
    """Whether torch sees an accelerator that pinned memory can serve (what its DataLoader checks)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def roma_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Trainable RoMA deltas of ``model`` by name."""
    return {n: p for n, p in model.named_parameters() if ADAPTER_PREFIX in n and p.requires_grad}


def routing_spec_string(spec: RoutingSpec, routers: Sequence) -> str:
    """Tag stored with routing targets: token spec plus the tuned routers, e.g. ``last1:probs@model.layers.4.mlp.gate``.

    Pass it as ``build_neighbourhood(..., routing_spec=...)`` so that the trainer can refuse targets captured at
    another position, with another representation or on other layers.
    """
    return f"{spec.describe()}@{','.join(r.name for r in routers)}"  # RouterInfo names: the stock model's paths


class _SampleDataset(Dataset):
    """The validated training samples; items are copies of the sample dicts (ids included)."""

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return dict(self.samples[i])


class _EvalCollator(RomaDataCollator):
    """Evaluation batches: a ``multiple_choice`` collator (every option of every sample, so that the loop sees the
    per-option log-likelihoods) that also gives each option's length in characters (``option_chars``, the
    ``acc_norm`` divisor); with ``loss_type="causal_lm"`` (eval samples without options) the gold rows only."""

    def __call__(self, features):
        features = list(features)
        batch = super().__call__(features)
        if self.loss_type == "multiple_choice":
            batch["option_chars"] = torch.tensor(
                [float(len(o)) for s in features for o in s["options"]], dtype=torch.float32
            )
        return batch


def _is_multiple_choice(samples: Sequence[dict]) -> bool:
    return bool(samples) and all(s.get("options") and s.get("label") is not None for s in samples)


def multiple_choice_metrics(eval_pred) -> dict[str, float]:
    """``compute_metrics`` of :class:`RomaTrainer`: accuracy from the per-option log-likelihoods of the eval loop.

    ``eval_pred.predictions`` is ``(loglikelihoods, option_chars)``, both ``(N, K)`` (options a sample lacks have
    ``option_chars < 0``), ``eval_pred.label_ids`` the gold options ``(N,)``. lm-eval's rule, as
    :func:`~roma_peft.scoring.score_multiple_choice`: ``acc`` = argmax of the summed log-likelihoods, ``acc_norm`` =
    argmax of sum / len(option) in characters, ties to the first option. Returns ``accuracy``, ``accuracy_stderr``,
    ``accuracy_norm``, ``accuracy_norm_stderr`` (sqrt(p(1-p)/(n-1)), lm-eval's) and ``samples`` (the Trainer adds the
    ``eval_`` prefix).
    """
    preds, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(preds, tuple) and len(preds) == 2 and not isinstance(preds[0], tuple):
        batches = [(preds[0], preds[1], labels)]
    else:  # eval_do_concat_batches=False: one entry per batch
        batches = [(p[0], p[1], y) for p, y in zip(preds, labels)]
    correct, correct_norm = [], []
    for ll, chars, gold in batches:
        pred, pred_norm = pick_options(ll, chars)
        correct.append(pred == np.asarray(gold))
        correct_norm.append(pred_norm == np.asarray(gold))
    return accuracy_metrics(np.concatenate(correct), np.concatenate(correct_norm))


def _as_samples(dataset, what: str) -> list[dict]:
    if dataset is None:
        raise ValueError(f"RomaTrainer needs a {what} (a list of schema samples or a datasets.Dataset).")
    if isinstance(dataset, _SampleDataset):
        return dataset.samples
    try:
        rows = list(dataset)
    except TypeError:
        raise ValueError(
            f"{what} must be a list of samples or a datasets.Dataset, got {type(dataset).__name__}."
        ) from None
    return validate_samples(rows)


def _regularizer_neighbourhood(args, neighbourhood):
    """The neighbourhood whose :meth:`~roma_peft.neighbours.Neighbourhood.lookup` gives the regulariser's targets:
    ``neighbourhood`` itself (``manifold``), its fixed random draw (``random``) or each sample's own routing
    (``self``); None for the options without neighbours. All three then go through one ``manifold_loss``.

    A function of the neighbourhood and the seed only, so a resumed run redraws exactly the random control of the
    uninterrupted run from the checkpointed neighbourhood (also after ``refresh_successful_set`` rebuilt it).
    """
    if neighbourhood is None or args.regularizer not in regs.NEIGHBOUR_REGULARIZERS:
        return None
    if args.regularizer == "random":
        return neighbourhood.random_control(args.random_control_seed)
    if args.regularizer == "self":
        return neighbourhood.self_control()
    return neighbourhood


def _first_rows(owner: torch.Tensor, n: int) -> torch.Tensor:
    """Index of each sample's first row in a multiple-choice batch (``owner`` = the sample of every row). Causal
    routers see the same prompt on every option row, so that row's routing is the sample's."""
    first = torch.full((n,), owner.shape[0], device=owner.device, dtype=torch.long)
    return first.scatter_reduce(0, owner, torch.arange(owner.shape[0], device=owner.device), "amin")


def _token_loglikelihoods(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None):
    """``(token_ll, valid)``, both ``(rows, positions)``: log p of each label token (0 where the label is -100) and
    where there is one. ``keep``: the positions the model was asked for with ``logits_to_keep`` (None: all)."""
    targets = labels[:, keep + 1] if keep is not None else labels[:, 1:]
    logits = logits if keep is not None else logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = targets != -100
    return logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid, valid


def _roma_arguments(args) -> RomaTrainingArguments:
    """``args`` as :class:`RomaTrainingArguments` (defaults for None; a plain ``TrainingArguments`` is converted, the
    RoMA fields defaulted), lambda re-checked: arguments are mutable after ``__post_init__``."""
    if args is None:
        args = RomaTrainingArguments(output_dir="roma-output")
    elif not isinstance(args, RomaTrainingArguments):
        values = {f.name: getattr(args, f.name) for f in fields(args) if f.init and hasattr(args, f.name)}
        args = RomaTrainingArguments(**values)
    if args.roma_lambda < 0:
        raise ValueError(f"roma_lambda must be >= 0, got {args.roma_lambda}.")
    return args


def _check_roma_model(model) -> None:
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"RomaTrainer trains a model wrapped with a RoMA adapter, got {type(model).__name__}. Wrap it first: "
            "`model = peft.get_peft_model(model, roma_peft.RomaConfig())` (after `import roma_peft`)."
        )
    active = model.active_adapter
    config = model.peft_config.get(active)
    if config is None or config.peft_type != roma_peft_type():
        kind = getattr(config, "peft_type", None)
        raise TypeError(
            f"The active adapter {active!r} of this PeftModel is {kind}, not ROMA. Create it with "
            "roma_peft.RomaConfig()."
        )
    if not roma_parameters(model):
        raise ValueError(
            f"The RoMA adapter {active!r} has no trainable router delta (every roma_delta has requires_grad=False; "
            "was it loaded with is_trainable=False, or frozen?). Load it with "
            "PeftModel.from_pretrained(..., is_trainable=True)."
        )
    _check_not_merged(model)


def _check_not_merged(model) -> None:
    merged = [name for name, module in model.base_model.roma_layers().items() if module.merged]
    if merged:
        raise ValueError(
            f"The RoMA adapter is merged into the base weights ({len(merged)} router(s), first: "
            f"{merged[0]!r}): a merged router runs with the fixed W + Δ, so the "
            "deltas get no gradient and training would do nothing. Unmerge it first (model.unmerge_adapter()), then "
            "train; merge again afterwards (or use merge_and_unload() on the trained model)."
        )


class RomaTrainer(Trainer):
    """``transformers.Trainer`` for RoMA router post-training (see the module docstring for the loss).

    Args:
        model: A ``PeftModel`` with an active ROMA adapter that has at least one trainable router delta.
        args: :class:`RomaTrainingArguments` (a plain ``TrainingArguments`` is converted, RoMA fields defaulted).
        train_dataset: Schema samples (list of dicts or ``datasets.Dataset``), in the row order of the neighbourhood.
        neighbourhood: :class:`~roma_peft.neighbours.Neighbourhood` built for exactly these samples; needed by
            ``manifold``, ``random`` and ``self`` (and used for the neighbour-similarity log of every option). Its
            routing targets are computed from the base model (adapter disabled) if it has none.
        eval_dataset: Schema samples (or a dict of named sets) evaluated by the Trainer's ``evaluate`` loop: eval loss,
            and for multiple-choice samples ``eval_accuracy``/``eval_accuracy_norm`` (lm-eval's rule, equal to
            :func:`~roma_peft.scoring.score_multiple_choice`) with ``_stderr``, and ``eval_samples``. Samples with
            only an ``answer`` give the eval loss alone.
        compute_metrics: Default :func:`multiple_choice_metrics`.
        processing_class / tokenizer: The tokenizer.
        embeddings: (N, d) task embeddings of the training samples, only for ``refresh_successful_set``.
        data_collator: Default :class:`~roma_peft.collator.RomaDataCollator` from the arguments.

    Attributes:
        neighbourhood: The successful neighbourhoods N(i), W and targets r_j (rebuilt by ``refresh_successful_set``).
        regularizer_neighbourhood: The neighbourhood the regulariser looks its targets up in: ``neighbourhood``
            (``manifold``), its fixed random draw (``random``,
            :meth:`~roma_peft.neighbours.Neighbourhood.random_control`) or each sample's own routing (``self``,
            :meth:`~roma_peft.neighbours.Neighbourhood.self_control`); None for the other options.
    """

    _tag_names = ["roma", "roma_peft"]
    # checkpoint safety (see the "checkpoints" section)
    _last_good_checkpoint: str | None = None  # newest checkpoint written (or resumed from) with a finite state
    _last_inputs = None  # last training micro-batch: the probe of the save-time finiteness check
    _verified_step: int | None = None  # global step whose outputs the probe found finite

    def __init__(
        self,
        model=None,
        args: TrainingArguments | None = None,
        train_dataset=None,
        neighbourhood=None,
        eval_dataset=None,
        processing_class=None,
        tokenizer=None,
        data_collator=None,
        embeddings=None,
        callbacks=None,
        optimizers=(None, None),
        **kwargs,
    ):
        processing_class = processing_class if processing_class is not None else tokenizer
        if processing_class is None:
            raise ValueError("RomaTrainer needs the tokenizer (processing_class=...).")
        _check_roma_model(model)
        args = _roma_arguments(args)
        _check_checkpointing(args, model)

        self._samples = _as_samples(train_dataset, "train_dataset")
        self._index_of = {s["id"]: i for i, s in enumerate(self._samples)}
        if isinstance(eval_dataset, dict):  # several eval sets: Trainer.evaluate prefixes each one's metrics
            self._eval_samples = {name: _as_samples(d, f"eval_dataset[{name!r}]") for name, d in eval_dataset.items()}
        else:
            self._eval_samples = _as_samples(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.roma_spec = args.routing_spec()
        self.prompt_encoding = args.prompt_encoding(processing_class)
        self.recorder = RoutingRecorder(model, spec=self.roma_spec)
        self.routing_spec_string = routing_spec_string(self.roma_spec, self.recorder.routers)
        self._routing_dim = sum(self.recorder.dims)
        self.embeddings = embeddings
        self._prepare_neighbourhood(neighbourhood, model, processing_class, args)
        data_collator = self._training_collator(data_collator, processing_class, args)

        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._last_refresh_step = 0
        self._targets_refreshed = False
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = multiple_choice_metrics
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=_SampleDataset(self._samples),
            eval_dataset=self._prepare_evaluation(processing_class),
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        # The loss is a per-sample mean of this micro-batch: Trainer divides it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._logits_to_keep = accepts_logits_to_keep(model)
        if is_deepspeed_zero3_enabled():  # before the engine is created (docs/distributed.md, "DeepSpeed")
            prepare_deepspeed_zero3(self.model)

    def _prepare_neighbourhood(self, neighbourhood, model, tokenizer, args) -> None:
        """Check the neighbourhood against this trainer (data, routing spec, conditions; its targets are computed from
        the base model if it has none) and derive the one the regulariser looks its targets up in."""
        if neighbourhood is None and args.regularizer in regs.NEIGHBOUR_REGULARIZERS and args.roma_lambda > 0:
            raise ValueError(
                f"regularizer={args.regularizer!r} needs a neighbourhood (roma_peft.neighbours.build_neighbourhood "
                "or `roma-peft neighbours`); pass neighbourhood=..."
            )
        if neighbourhood is not None:
            self._check_neighbourhood(neighbourhood, model, tokenizer, args)
        self._use_neighbourhood(neighbourhood, args)
        if args.refresh_successful_set and (args.refresh_targets_steps <= 0 or self.embeddings is None):
            raise ValueError("refresh_successful_set needs refresh_targets_steps > 0 and embeddings=... .")

    def _prepare_evaluation(self, tokenizer):
        """The eval collators and the eval set(s) for ``Trainer``. Evaluation reads the training prompts (template, chat
        template) without the training rows' max_length, as score_multiple_choice reads them; one row per option
        (multiple choice) or the gold row (answer-only samples)."""
        eval_encoding = dataclasses.replace(self.prompt_encoding, max_length=None)
        self._eval_collators = {
            kind: _EvalCollator(tokenizer, loss_type=kind, encoding=eval_encoding) for kind in LOSS_TYPES
        }
        self._active_eval_collator = None
        self._eval_sums: torch.Tensor | None = None
        self._eval_count = 0
        if isinstance(self._eval_samples, dict):
            return {name: _SampleDataset(s) for name, s in self._eval_samples.items()}
        return _SampleDataset(self._eval_samples) if self._eval_samples is not None else None

    def _use_neighbourhood(self, neighbourhood, args=None) -> None:
        """Train against ``neighbourhood`` (at start, after ``refresh_successful_set`` rebuilt it, on resume)."""
        self.neighbourhood = neighbourhood
        self.regularizer_neighbourhood = _regularizer_neighbourhood(args or self.args, neighbourhood)

    def _set_routing(self, routing: torch.Tensor) -> None:
        """Replace the routing targets r_j (refresh, resume) in the neighbourhood and in the regulariser's control."""
        self.neighbourhood.set_routing(routing, spec=self.routing_spec_string)
        control = self.regularizer_neighbourhood
        if control is not None and control is not self.neighbourhood:
            control.set_routing(self.neighbourhood.routing, spec=self.routing_spec_string)

    def _training_collator(self, data_collator, tokenizer, args):
        """``data_collator``, or a :class:`~roma_peft.collator.RomaDataCollator` from the arguments; a RoMA collator
        that encodes prompts otherwise than the arguments is refused (r_i would be read at other tokens than r_j)."""
        if data_collator is None:
            return RomaDataCollator(
                tokenizer, index_of=self._index_of, loss_type=args.loss_type, encoding=self.prompt_encoding
            )
        if isinstance(data_collator, RomaDataCollator) and data_collator.encoding.describe(
            tokenizer
        ) != self.prompt_encoding.describe(tokenizer):
            raise ValueError(
                f"The data collator encodes prompts as {data_collator.encoding.describe(tokenizer)} but the "
                f"arguments say {self.prompt_encoding.describe(tokenizer)}: the live routing r_i would be read "
                "at other tokens than the targets r_j. Build it with "
                "RomaDataCollator(tokenizer, encoding=args.prompt_encoding(tokenizer), ...) or drop data_collator."
            )
        return data_collator

    # ------------------------------------------------------------------ validation
    def _check_neighbourhood(self, nb, model, tokenizer, args) -> None:
        meta = getattr(nb, "metadata", {}) or {}
        ids = list(getattr(nb, "ids", []))
        if ids != [s["id"] for s in self._samples]:
            raise ValueError(
                f"The neighbourhood was built for other data: it has {len(ids)} sample ids, the training set "
                f"{len(self._samples)}; the first difference is at row "
                f"{next((i for i, (a, b) in enumerate(zip(ids, self._index_of)) if a != b), min(len(ids), len(self._samples)))}. "
                "Rebuild it for this training set (same samples, same order)."
            )
        stored = meta.get("data_hash")
        if stored is not None and stored != data_hash(self._samples):
            raise ValueError(
                f"The neighbourhood was built for other data (data hash {str(stored)[:12]} != "
                f"{data_hash(self._samples)[:12]}: questions, options or labels changed). Rebuild it."
            )
        spec = meta.get("routing_spec")
        if spec:
            token_part = str(spec).split("@", 1)[0]
            if token_part != self.roma_spec.describe() or ("@" in str(spec) and spec != self.routing_spec_string):
                raise ValueError(
                    f"The neighbourhood's routing targets were captured as {spec!r} but this trainer captures "
                    f"{self.routing_spec_string!r} (routing position/representation or tuned layers differ). "
                    "Rebuild the targets with the same routing spec and adapter, or change the arguments."
                )
        # S and r_j belong to one prompt, one base model and one layer selection: refuse other conditions
        conditions = routing_conditions(
            model,
            tokenizer,
            self._samples,
            self.prompt_encoding,
            routing_spec=self.routing_spec_string,
            spec=self.roma_spec,
        )
        stored = meta.get("conditions") or {}
        check_conditions(
            stored,
            conditions,
            what="neighbourhood (its successful set S and routing targets r_j)",
            hint="Rebuild it with the trainer's settings (`roma-peft neighbours` with the same template, "
            "max_length, model and layer options), or train with the settings it was built with.",
        )
        if getattr(nb, "routing", None) is None:
            logger.info("The neighbourhood has no routing targets: computing them from the base model.")
            with model.disable_adapter():
                routing = collect_routing(
                    model,
                    tokenizer,
                    self._samples,
                    spec=self.roma_spec,
                    encoding=self.prompt_encoding,
                    progress=not args.disable_tqdm,
                )
            nb.set_routing(routing, spec=self.routing_spec_string)
            nb.metadata["conditions"] = {**conditions, "scored_template": stored.get("scored_template")}
        if nb.routing.shape[-1] != self._routing_dim:
            raise ValueError(
                f"The neighbourhood's routing vectors have {nb.routing.shape[-1]} dims but the tuned routers give "
                f"{self._routing_dim} ({self.recorder.dims}): built for another model, layer selection or "
                "representation."
            )
        if not torch.isfinite(nb.routing).all():
            raise ValueError("The neighbourhood's routing targets contain NaN or inf.")

    # ------------------------------------------------------------------ data
    def _remove_unused_columns(self, dataset, description=None):
        return dataset  # the collator reads the sample columns and passes only model inputs to the model

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        if description != "Training" and self._active_eval_collator is not None:
            return self._active_eval_collator  # evaluation / prediction rows (see get_eval_dataloader)
        return data_collator

    def _eval_data(self, dataset, what: str):
        """``dataset`` as a :class:`_SampleDataset` (a list of samples or a datasets.Dataset is validated), and pick
        the eval collator for it: every option of multiple-choice samples, the gold row of answer-only ones."""
        if dataset is not None and not isinstance(dataset, (str, _SampleDataset)):
            dataset = _SampleDataset(_as_samples(dataset, what))
        resolved = self.eval_dataset[dataset] if isinstance(dataset, str) else dataset
        if resolved is None:
            resolved = self.eval_dataset
        if isinstance(resolved, _SampleDataset):
            kind = "multiple_choice" if _is_multiple_choice(resolved.samples) else "causal_lm"
            self._active_eval_collator = self._eval_collators[kind]
        return dataset

    def get_eval_dataloader(self, eval_dataset=None):
        return super().get_eval_dataloader(self._eval_data(eval_dataset, "eval_dataset"))

    def get_test_dataloader(self, test_dataset):
        return super().get_test_dataloader(self._eval_data(test_dataset, "test_dataset"))

    def _get_eval_sampler(self, eval_dataset):
        if self.args.train_sampling_strategy == "group_by_length" and eval_dataset is not None:
            # the Trainer's length grouping reads input_ids from the dataset, which holds raw samples here; the order
            # of evaluation does not change its result
            return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None
        return super()._get_eval_sampler(eval_dataset)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy == "group_by_length":
            lengths = self.data_collator.lengths(self._samples) if hasattr(self.data_collator, "lengths") else None
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                dataset=self.train_dataset,
                lengths=lengths,
            )
        return super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------ training loop hooks
    def _inner_training_loop(self, *args, **kwargs):
        # Trainer has just enabled activation checkpointing, which also makes the embedding output require grad
        # (enable_input_require_grads) and so drags the backward through every frozen layer below the first tuned
        # router. Non-reentrant checkpointing does not need it: remove the hook so autograd stops at the first
        # tuned layer (numbers in docs/benchmarks-training.md).
        base = self.accelerator.unwrap_model(self.model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        if getattr(base, "_require_grads_hook", None) is not None:
            base.disable_input_require_grads()
        self._warn_warmup(kwargs.get("args", self.args))
        return super()._inner_training_loop(*args, **kwargs)

    def _warn_warmup(self, args) -> None:
        if args.lambda_warmup_steps <= 0:
            return
        if args.max_steps and args.max_steps > 0:
            planned = args.max_steps
        else:
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
            planned = math.ceil(len(self._samples) / per_step) * math.ceil(args.num_train_epochs)
        if args.lambda_warmup_steps > planned:
            warnings.warn(
                f"lambda_warmup_steps={args.lambda_warmup_steps} exceeds the ~{planned} planned optimizer steps: "
                f"lambda never reaches {args.roma_lambda} (it ends near "
                f"{args.roma_lambda * planned / args.lambda_warmup_steps:.3g}). The released RoMA script had this "
                "problem (2000 warm-up steps in a ~465-step run).",
                stacklevel=3,
            )

    def effective_lambda(self, step: int | None = None) -> float:
        """lambda * min(1, (step + 1) / lambda_warmup_steps), or lambda without warm-up."""
        step = self.state.global_step if step is None else step
        lam, warm = float(self.args.roma_lambda), int(self.args.lambda_warmup_steps)
        if warm <= 0:
            return lam
        return lam * min(1.0, (step + 1) / warm)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if (
            self.args.refresh_targets_steps > 0
            and self.neighbourhood is not None
            and self.state.global_step > 0
            and self.state.global_step % self.args.refresh_targets_steps == 0
            and self.state.global_step != self._last_refresh_step
        ):
            self.refresh_targets()
        self._last_inputs = inputs  # the probe batch of the save-time finiteness check (_nonfinite_outputs)
        return super().training_step(model, inputs, num_items_in_batch)

    @torch.no_grad()
    def refresh_targets(self) -> None:
        """Recompute r_j (and with ``refresh_successful_set`` S and the neighbourhoods) with the current routers."""
        model = self.accelerator.unwrap_model(self.model)
        routing = collect_routing(
            model,
            self.processing_class,
            self._samples,
            spec=self.roma_spec,
            encoding=self.prompt_encoding,
            progress=False,
            batch_size=self.args.per_device_eval_batch_size,
        )
        if self.args.refresh_successful_set:
            scores = score_multiple_choice(
                model,
                self.processing_class,
                self._samples,
                progress=False,
                encoding=self.prompt_encoding,
                batch_size=self.args.per_device_eval_batch_size,
            )
            config = NeighbourhoodConfig.from_dict(self.neighbourhood.metadata.get("config", {}))
            # the random control draws from the refreshed S and neighbour counts, as the real neighbours do
            self._use_neighbourhood(
                build_neighbourhood(
                    self._samples,
                    scores,
                    self.embeddings,
                    config,
                    routing=routing,
                    routing_spec=self.routing_spec_string,
                    progress=False,
                    conditions=self.neighbourhood.metadata.get("conditions"),
                )
            )
        else:
            self._set_routing(routing)
        self._last_refresh_step = self.state.global_step
        self._targets_refreshed = True

    # ------------------------------------------------------------------ loss
    def _forward(self, model, inputs):
        """Run the batch with the routing recorder on: ``(outputs, r, keep)``, ``r`` the live routing ``(rows, D)`` at
        the prompt positions, ``keep`` the positions given to ``logits_to_keep`` (None: the model takes no such
        argument, all logits were computed)."""
        keep = self._positions_to_keep(inputs["labels"])
        kwargs = {} if keep is None else {"logits_to_keep": keep}
        with self.recorder:
            outputs = model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False, **kwargs
            )
        return outputs, self.recorder.routing(inputs["attention_mask"], inputs["prompt_last_index"]), keep

    def _positions_to_keep(self, labels: torch.Tensor) -> torch.Tensor | None:
        """The positions whose logits predict an answer token, for ``logits_to_keep`` (saves the vocabulary projection
        elsewhere); None when the model takes no such argument."""
        return torch.nonzero((labels[:, 1:] != -100).any(0)).flatten() if self._logits_to_keep else None

    def _task_loss(self, logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None, inputs):
        """Per-sample task loss, (B,)."""
        token_ll, valid = _token_loglikelihoods(logits, labels, keep)
        if self.args.loss_type == "causal_lm":
            return -(token_ll.sum(-1) / valid.sum(-1).clamp_min(1))
        # multiple choice: rows are (sample, option) pairs
        owner, option, gold = inputs["option_sample"], inputs["option_index"], inputs["mc_label"]
        scores = torch.full((gold.shape[0], int(option.max()) + 1), float("-inf"), device=logits.device)
        scores = scores.index_put((owner, option), token_ll.sum(-1))
        return F.cross_entropy(scores, gold, reduction="none")

    def _neighbours(self, neighbourhood, sample_index: torch.Tensor, device):
        """``(targets, weights, mask)`` of the batch's rows in ``neighbourhood`` on ``device``, or None when there is
        no neighbourhood, it has no routing yet, or the batch has no sample_index."""
        if neighbourhood is None or neighbourhood.routing is None or not bool((sample_index >= 0).all()):
            return None
        return tuple(t.to(device) for t in neighbourhood.lookup(sample_index.cpu()))

    def _regularizer(self, r: torch.Tensor, sample_index: torch.Tensor, model, neighbours=None) -> torch.Tensor:
        """Per-sample R(i), (B,). The neighbour options (``manifold``, ``random``, ``self``) are one path: the lookup
        of the regulariser's neighbourhood, then :func:`~roma_peft.regularizers.manifold_loss`; ``neighbours`` is the
        batch's lookup in the real neighbourhood when the caller has it (reused by ``manifold``)."""
        name = self.args.regularizer
        if name == "none":
            return torch.zeros(r.shape[0], device=r.device)
        if name in ("l1", "l2"):
            deltas = roma_parameters(self.accelerator.unwrap_model(model)).values()
            value = regs.l1_loss(deltas) if name == "l1" else regs.l2_loss(deltas)
            return value.expand(r.shape[0])
        if name == "entropy":
            return regs.routing_entropy(r, self.recorder.dims, self.roma_spec.representation)
        if self.regularizer_neighbourhood is None:
            return torch.zeros(r.shape[0], device=r.device)
        if (sample_index < 0).any():
            raise ValueError(
                "The batch has no sample_index (the data collator was built without index_of): the neighbourhood "
                "lookup needs each sample's row in the training set."
            )
        if neighbours is None or self.regularizer_neighbourhood is not self.neighbourhood:
            neighbours = self._neighbours(self.regularizer_neighbourhood, sample_index, r.device)
        return regs.manifold_loss(r, *neighbours)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        prompt_last, sample_index, length = (
            inputs["prompt_last_index"],
            inputs["sample_index"],
            inputs["input_ids"].shape[1],
        )
        if (prompt_last >= length).any() or (prompt_last < 0).any():
            raise ValueError(
                f"prompt_last_index {prompt_last.tolist()} lies beyond the sequence length {length}: "
                "truncation cut the prompt. Increase max_length."
            )
        outputs, r, keep = self._forward(model, inputs)
        if self.args.loss_type == "multiple_choice":
            r = r[_first_rows(inputs["option_sample"], sample_index.shape[0])]
        task = self._task_loss(outputs.logits, inputs["labels"], keep, inputs)
        lam = self.effective_lambda()
        neighbours = self._neighbours(self.neighbourhood, sample_index, r.device)  # the loss's and the metrics'
        reg = self._regularizer(r, sample_index, model, neighbours)
        task_mean, reg_mean = task.mean(), reg.mean()
        loss = task_mean if lam == 0 else task_mean + lam * reg_mean
        self._check_finite(task_mean, reg_mean, loss)
        if torch.is_grad_enabled():
            self._record_metrics(r, neighbours, task_mean, reg, lam, "train" if model.training else "eval")
        return (loss, outputs) if return_outputs else loss

    def _check_finite(self, task, reg, loss) -> None:
        values = torch.stack([task.detach(), reg.detach().float(), loss.detach().float()])
        if bool(torch.isfinite(values).all()):
            return
        bad = []
        if not torch.isfinite(values[0]):
            bad.append(f"task loss ({self.args.loss_type} cross-entropy) = {values[0].item()}")
        if not torch.isfinite(values[1]):
            bad.append(f"regulariser ({self.args.regularizer}) = {values[1].item()}")
        if not bad:
            bad.append(f"total loss = {values[2].item()} (lambda * regulariser overflowed)")
        nonfinite_delta = [
            n
            for n, p in roma_parameters(self.accelerator.unwrap_model(self.model)).items()
            if not torch.isfinite(p).all()
        ]
        hint = f" Router deltas with NaN/inf: {nonfinite_delta[:3]}." if nonfinite_delta else ""
        advice = "Lower the learning rate or lambda, or check the neighbourhood's routing targets,"
        raise NonFiniteLossError(
            f"Non-finite loss at optimizer step {self.state.global_step} (epoch {self.state.epoch}): "
            f"{'; '.join(bad)}.{hint} Training stopped before the update; no adapter was saved from this state. "
            f"{self._last_good_message(advice)}"
        )

    @torch.no_grad()
    def _record_metrics(self, r, neighbours, task, reg, lam, mode) -> None:
        """Log the step's terms from the tensors of its loss: the task loss, R (per sample), the routing and, with a
        neighbourhood, the similarity and distance of r_i to its real neighbours (their lookup is the loss's)."""
        metrics = {
            "task_loss": task.detach().float(),
            f"{self.args.regularizer}_loss": reg.mean().detach().float(),
            "lambda": torch.tensor(float(lam)),
            "routing_entropy": regs.routing_entropy(
                r.detach(), self.recorder.dims, self.roma_spec.representation
            ).mean(),
            "expert_balance": regs.expert_balance(r, self.recorder.dims, self.roma_spec.representation),
        }
        if neighbours is not None:
            metrics["neighbour_similarity"] = regs.neighbour_cosine(r, *neighbours)
            if self.args.regularizer == "manifold" and reg.dtype == torch.float32:
                metrics["neighbour_distance"] = reg.detach().mean()  # the manifold term is this distance
            else:
                metrics["neighbour_distance"] = regs.manifold_loss(r.detach().float(), *neighbours).mean()
        device = self.args.device
        stacked = torch.stack([v.to(device).float() for v in metrics.values()])
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.gather(stacked[None]).mean(0)
        for key, value in zip(metrics, stacked.tolist()):
            self._metrics[mode][key].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._metrics[mode].items():
            if values:
                logs[f"{prefix}roma/{key}"] = sum(values) / len(values)
        self._metrics[mode].clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation
    # Trainer.evaluate -> evaluation_loop (rank split, gather, progress bar, best-model tracking) -> prediction_step.
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The eval loss of the batch and, for multiple-choice rows, ``(loglikelihoods, option_chars)`` per sample
        with the gold options as labels (turned into accuracies by :func:`multiple_choice_metrics`)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, predictions, gold = self._eval_step(model, inputs)
        if prediction_loss_only or predictions is None:
            return loss, None, None
        return loss, predictions, gold

    def _eval_regularizer(self, r: torch.Tensor, model) -> torch.Tensor | None:
        """Per-sample regulariser of eval samples, or None where it is not defined (neighbour-based options: eval
        samples are not rows of the neighbourhood, so they have no targets)."""
        if self.args.regularizer in regs.NEIGHBOUR_REGULARIZERS:
            return None
        return self._regularizer(r, torch.full((r.shape[0],), -1, dtype=torch.long), model).float()

    def _eval_step(self, model, inputs):
        outputs, r, keep = self._forward(model, inputs)
        token_ll, valid = _token_loglikelihoods(outputs.logits, inputs["labels"], keep)
        row_nll = -(token_ll.sum(-1) / valid.sum(-1).clamp_min(1))  # the causal_lm task loss of each row
        predictions = gold = None
        if "option_sample" in inputs:
            owner, option, gold = inputs["option_sample"], inputs["option_index"], inputs["mc_label"]
            n, k = gold.shape[0], int(option.max()) + 1
            r = r[_first_rows(owner, n)]
            # summed option log-likelihoods in float64, as score_multiple_choice sums them
            wide = torch.float32 if token_ll.device.type == "mps" else torch.float64
            ll = torch.zeros((n, k), dtype=wide, device=token_ll.device)
            ll = ll.index_put((owner, option), token_ll.to(wide).sum(-1))
            chars = torch.full((n, k), -1.0, device=token_ll.device)
            chars = chars.index_put((owner, option), inputs["option_chars"].to(token_ll.device).float())
            predictions = (ll, chars)
            if self.args.loss_type == "multiple_choice":  # CE over the options' summed log-likelihoods
                scores = torch.full((n, k), float("-inf"), device=token_ll.device)
                scores = scores.index_put((owner, option), token_ll.sum(-1))
                task = F.cross_entropy(scores, gold, reduction="none")
            else:  # CE of the gold continuation, the row the training collator would have built
                is_gold = option == gold[owner]
                task = torch.zeros(n, device=token_ll.device).index_put((owner[is_gold],), row_nll[is_gold])
        else:
            task = row_nll
        lam = self.effective_lambda()
        reg = self._eval_regularizer(r, model)
        loss = task.mean() if reg is None or lam == 0 else task.mean() + lam * reg.mean()
        self._accumulate_eval(r, task, reg)
        return loss.detach(), predictions, gold

    @torch.no_grad()
    def _accumulate_eval(self, r, task, reg) -> None:
        """Sums over eval samples (all ranks, the sampler's padding duplicates dropped) of the logged eval terms."""
        dims, rep = self.recorder.dims, self.roma_spec.representation
        entropy = regs.routing_entropy(r.detach(), dims, rep)
        columns = [
            task.float(),
            (reg if reg is not None else torch.zeros_like(task)).float().to(task.device),
            entropy.to(task.device),
        ] + [b.to(task.device) for b in regs.layer_blocks(r.detach(), dims, rep)]
        rows = torch.cat([c if c.dim() == 2 else c[:, None] for c in columns], dim=1)
        rows = self.accelerator.gather_for_metrics(rows)
        sums = rows.double().sum(0).cpu()
        self._eval_sums = sums if self._eval_sums is None else self._eval_sums + sums
        self._eval_count += int(rows.shape[0])

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ):
        self._eval_sums, self._eval_count = None, 0
        try:
            output = super().evaluation_loop(
                dataloader,
                description,
                prediction_loss_only=prediction_loss_only,
                ignore_keys=ignore_keys,
                metric_key_prefix=metric_key_prefix,
            )
        finally:
            self._active_eval_collator = None
        metrics = output.metrics
        metrics.setdefault(f"{metric_key_prefix}_samples", output.num_samples)
        if self._eval_sums is not None and self._eval_count:
            mean = self._eval_sums / self._eval_count
            prefix = f"{metric_key_prefix}_roma/"
            metrics[prefix + "task_loss"] = float(mean[0])
            if self.args.regularizer not in regs.NEIGHBOUR_REGULARIZERS:
                metrics[prefix + f"{self.args.regularizer}_loss"] = float(mean[1])
            metrics[prefix + "lambda"] = self.effective_lambda()
            metrics[prefix + "routing_entropy"] = float(mean[2])
            # balance of the whole eval set's mean routing distribution, per layer, averaged
            metrics[prefix + "expert_balance"] = float(regs.expert_balance(mean[None, 3:], self.recorder.dims))
        self._eval_sums, self._eval_count = None, 0
        return output

    # ------------------------------------------------------------------ figures and model card
    def save_plots(self, output_dir: str | None = None, samples=None, max_samples: int | None = None) -> dict:
        """Write the run's figures into ``output_dir`` (default ``args.output_dir``), see :mod:`roma_peft.plots`:
        ``training_curves.png`` from ``state.log_history``, ``routing_heatmaps.png`` and ``routing_stats.json``:
        per-layer expert utilisation, routing entropy and balance with the adapter disabled vs enabled on
        ``samples`` (default: the training samples), at most ``max_samples`` of them evenly spread (default
        ``args.routing_plot_samples``; 0 = no heatmaps).

        Call it on every process: each runs the routing capture (a sharded model's forward is collective); the
        process that saves writes the files. Returns ``{what: path}`` of the files written (empty elsewhere)."""
        output_dir = output_dir or self.args.output_dir
        max_samples = self.args.routing_plot_samples if max_samples is None else max_samples
        stats = None
        if max_samples > 0:
            model = self.accelerator.unwrap_model(self.model)
            stats = routing_statistics(
                model,
                self.processing_class,
                self._samples if samples is None else _as_samples(samples, "samples"),
                encoding=self.prompt_encoding,
                spec=self.roma_spec,
                max_samples=max_samples,
                batch_size=self.args.per_device_eval_batch_size,
            )
        if not self.args.should_save:
            return {}
        title = f"RoMA: regularizer={self.args.regularizer}, lambda={self.args.roma_lambda:g}"
        return save_training_plots(output_dir, self.state.log_history, stats=stats, title=title)

    def roma_card_info(self) -> dict[str, dict]:
        """What the model card says about this run: ``{section: {setting: value}}`` (objective, prompts,
        neighbourhood, data, optimisation, results). Attached to the model when it is saved, so that the README.md
        that ``save_model``/``save_pretrained`` writes lists every setting (:func:`roma_peft.export.update_model_card`).
        """
        args = self.args
        objective = {
            "regularizer": args.regularizer,
            "lambda (`roma_lambda`)": float(args.roma_lambda),
            "lambda warm-up steps": int(args.lambda_warmup_steps),
            "task loss (`loss_type`)": args.loss_type,
            "routing spec (r_i: position, representation @ routers)": self.routing_spec_string,
            "routing position / tokens / representation": f"{args.routing_position} / {args.routing_num_tokens} / {args.routing_representation}",
            "refresh targets every N steps (0 = fixed base targets)": int(args.refresh_targets_steps),
            "refresh successful set": bool(args.refresh_successful_set),
        }
        if args.regularizer == "random":
            objective["random neighbours seed"] = args.random_control_seed
        prompts = {
            "prompt template": args.prompt_template,
            "chat template": bool(args.use_chat_template),
            "system prompt": args.system_prompt,
            "max_length": args.max_length,
        }
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        optimisation = {
            "optimizer steps": int(self.state.global_step),
            "epochs": round(float(self.state.epoch or 0.0), 3),
            "learning rate": float(args.learning_rate),
            "weight decay": float(args.weight_decay),
            "lr scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "batch size per device x accumulation x processes": f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps} x {max(args.world_size, 1)}",
            "optimizer": str(getattr(args.optim, "value", args.optim)),
            "mixed precision": precision,
            "seed": int(args.seed),
        }
        return {
            "objective": objective,
            "prompts": prompts,
            "neighbourhood": _card_neighbourhood(self.neighbourhood),
            "data": self._card_data(),
            "optimisation": optimisation,
            "results": _card_results(self.state.log_history),
        }

    def _card_data(self) -> dict:
        """The card's data section: sample counts, the data hash and where the data came from."""
        if getattr(self, "_data_hash", None) is None:
            self._data_hash = data_hash(self._samples)  # once: the card is refreshed at every save
        data = {"training samples": len(self._samples), "data hash (questions, options, labels)": self._data_hash}
        source = getattr(self, "roma_data_source", None) or {}
        if source.get("train"):
            data["training data"] = source["train"]
        evals = self._eval_samples
        if evals is not None:
            data["evaluation samples"] = (
                ", ".join(f"{k}: {len(v)}" for k, v in evals.items()) if isinstance(evals, dict) else len(evals)
            )
        if source.get("eval"):
            data["evaluation data"] = source["eval"]
        return data

    def _attach_card_info(self) -> None:
        try:
            info = self.roma_card_info()
        except Exception as exc:  # the card is documentation: never the reason a save fails
            logger.warning("RoMA: could not describe the run in the model card (%s).", exc)
            return
        setattr(self.accelerator.unwrap_model(self.model), TRAINING_INFO_ATTRIBUTE, info)

    def create_model_card(
        self,
        language=None,
        license=None,
        tags=None,
        model_name=None,
        finetuned_from=None,
        tasks=None,
        dataset_tags=None,
        dataset=None,
        dataset_args=None,
    ) -> None:
        """The RoMA model card in ``output_dir/README.md`` (called by ``push_to_hub``) instead of the Trainer's generic
        draft (whose "trained from scratch on an unknown dataset" misdescribes a router adapter): PEFT metadata, how
        to load the adapter, the tuned routers, every RoMA setting, the final metrics and the citation."""
        if not self.is_world_process_zero():
            return
        self._attach_card_info()
        metadata = {
            "license": license,
            "language": language,
            "datasets": dataset_tags or dataset,
            "tags": [tags] if isinstance(tags, str) else list(tags or []),
        }
        adapter_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id
        update_model_card(
            self.accelerator.unwrap_model(self.model), self.args.output_dir, adapter_id=adapter_id, metadata=metadata
        )

    # ------------------------------------------------------------------ checkpoints
    # Nothing is written from a non-finite state: the router weights the model computes with (W + Δ in its dtype)
    # are checked after every optimizer step, and before a checkpoint or adapter is written the last training batch
    # is run once more (finite weights can still overflow in the router's fp16 matmul). The RoMA state a resume needs
    # (refreshed targets / neighbourhood) is written into the checkpoint folder *before* transformers writes
    # trainer_state.json, rotates old checkpoints or uploads it, and a resume refuses a checkpoint that lacks it.
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        _check_not_merged(self.accelerator.unwrap_model(self.model))  # e.g. merged after the trainer was built
        self._last_good_checkpoint = self._verified_step = None  # a new run (a resume sets the checkpoint below)
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            resume_from_checkpoint = last if last is not None else resume_from_checkpoint
        if resume_from_checkpoint is not None and not isinstance(resume_from_checkpoint, bool):
            self._load_roma_state(str(resume_from_checkpoint))
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def _last_good_message(self, advice: str = "Lower the learning rate (or lambda)") -> str:
        if self._last_good_checkpoint:
            return f"The last good checkpoint is {self._last_good_checkpoint}. {advice} and resume from it."
        return f"No checkpoint was written by this run. {advice} and start again."

    def _any_process(self, flag: bool) -> bool:
        """``flag`` of any process (all ranks must then raise together, or the others hang in a collective)."""
        if self.accelerator.num_processes <= 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.args.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def _nonfinite_weights(self) -> str | None:
        """The first router whose effective weight (W + Δ in the model's dtype, or Δ) is NaN/inf, described."""
        bad = nonfinite_routers(self.accelerator.unwrap_model(self.model))
        if not bad:
            return None
        more = f" (and {len(bad) - 1} more router(s))" if len(bad) > 1 else ""
        return f"at router {bad[0][0]!r}, {bad[0][1]}{more}"

    @torch.no_grad()
    def _nonfinite_outputs(self, model) -> str | None:
        """Run the last training micro-batch through ``model`` (eval mode, RNG untouched): NaN/inf router outputs or
        logits, described, else None. Finite ``W + Δ`` can still overflow in an fp16 router matmul."""
        if self._last_inputs is None:
            return None
        layers = self.accelerator.unwrap_model(self.model).base_model.roma_layers()
        names = {module: name for name, module in layers.items()}
        bad: list[str] = []

        def hook(module, args, output):
            for tensor in output if isinstance(output, (tuple, list)) else (output,):
                if (
                    not bad
                    and isinstance(tensor, torch.Tensor)
                    and tensor.is_floating_point()
                    and not bool(torch.isfinite(tensor).all())
                ):
                    bad.append(names[module])

        handles = [module.register_forward_hook(hook) for module in names]
        was_training = model.training
        devices = [self.args.device] if self.args.device.type == "cuda" else []
        try:
            inputs = self._prepare_inputs(self._last_inputs)
            keep = self._positions_to_keep(inputs["labels"])
            kwargs = {} if keep is None else {"logits_to_keep": keep}
            model.eval()
            with torch.random.fork_rng(devices=devices), self.compute_loss_context_manager():
                logits = model(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False, **kwargs
                ).logits
        except Exception as exc:  # the probe must never be what stops a save
            logger.warning("RoMA: could not re-run the last batch to check the outputs before saving (%s).", exc)
            return None
        finally:
            model.train(was_training)
            for handle in handles:
                handle.remove()
        if bad:
            return f"router {bad[0]!r} outputs NaN/inf on the last training batch (its logits overflow with this W + Δ)"
        if not bool(torch.isfinite(logits).all()):
            return "the logits of the last training batch are NaN/inf"
        return None

    def _refuse_nonfinite(self, what: str, model=None, sync: bool = False) -> None:
        """Raise before ``what`` is written if the current state is not finite (weights, then the probe batch)."""
        reason = self._nonfinite_weights()
        step = self.state.global_step
        if model is not None and self._verified_step != step and (sync or reason is None):
            probe = self._nonfinite_outputs(model)  # with sync: on every rank (a sharded forward is collective)
            reason = reason or probe
        bad = self._any_process(reason is not None) if sync else reason is not None
        if bad:
            raise NonFiniteLossError(
                f"Refusing to save {what}: the model state after optimizer step {step} is not finite "
                f"({reason or 'on another process'}). Nothing was written. {self._last_good_message()}"
            )
        if model is not None:
            self._verified_step = step

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        # runs right after every optimizer step (and at epoch end), before anything is logged, evaluated or saved
        reason = self._nonfinite_weights()
        if self._any_process(reason is not None):
            raise NonFiniteLossError(
                f"Non-finite router weights after the optimizer update of step {self.state.global_step} (epoch "
                f"{self.state.epoch}): {reason or 'on another process'}. Training stopped; nothing was saved from this "
                f"state. {self._last_good_message()}"
            )
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # the probe forward only in a single process: save_model() may legitimately be called on one rank only
        probe = self.model if self.accelerator.num_processes == 1 else None
        self._refuse_nonfinite(f"an adapter to {output_dir or self.args.output_dir}", model=probe)
        self._attach_card_info()  # the model card PEFT's save writes (roma_peft.export hook) lists the RoMA settings
        super()._save(output_dir, state_dict)

    def _save_checkpoint(self, model, trial) -> None:
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self._refuse_nonfinite(f"checkpoint {folder}", model=model, sync=True)
        if self.args.should_save:
            self._save_roma_state(folder)  # before transformers marks the checkpoint complete (trainer_state.json)
        super()._save_checkpoint(model, trial)
        self._last_good_checkpoint = folder

    def _save_roma_state(self, folder: str) -> None:
        """Write what a resume needs besides transformers' files: with ``refresh_targets_steps`` the current routing
        targets (``roma_targets.safetensors``, with the refresh bookkeeping), with ``refresh_successful_set`` also the
        rebuilt neighbourhood (``roma_neighbourhood/``). The random control's table is a function of the neighbourhood
        and the seed and is redrawn from it on resume. Each file is written under a temporary name and renamed."""
        if self.args.refresh_targets_steps <= 0 or self.neighbourhood is None or self.neighbourhood.routing is None:
            return  # fixed targets: the neighbourhood passed to the trainer is the whole RoMA state
        os.makedirs(folder, exist_ok=True)
        if self.args.refresh_successful_set:
            final = os.path.join(folder, NEIGHBOURHOOD_DIR)
            tmp = final + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.neighbourhood.save(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        metadata = {
            "format": "1",
            "global_step": str(self.state.global_step),
            "last_refresh_step": str(self._last_refresh_step),
            "refresh_targets_steps": str(self.args.refresh_targets_steps),
            "refresh_successful_set": str(bool(self.args.refresh_successful_set)).lower(),
            "routing_spec": self.routing_spec_string,
        }
        path = os.path.join(folder, TARGETS_FILE)
        save_file({"routing": self.neighbourhood.routing.detach().contiguous().cpu()}, path + ".tmp", metadata=metadata)
        os.replace(path + ".tmp", path)

    def _load_roma_state(self, checkpoint: str) -> None:
        """Restore the RoMA state of ``checkpoint``, or refuse a resume that cannot reproduce the uninterrupted run."""
        self._last_good_checkpoint = checkpoint
        if self.neighbourhood is None:
            return  # no neighbourhood, no targets: nothing of RoMA's own to restore
        every = int(self.args.refresh_targets_steps)
        rss = bool(self.args.refresh_successful_set)
        step = _checkpoint_step(checkpoint)
        # a refresh runs at the start of step s (s % every == 0, s > 0); checkpoint `step` was written after update
        # `step`, so it holds refreshed state iff some s <= step - 1
        refreshed = every > 0 and (step is None or step > every)
        what = (
            "the refreshed successful set, neighbourhoods and routing targets"
            if rss
            else "the refreshed routing targets"
        )

        def refuse_missing(name: str, why: str) -> None:
            if refreshed:  # without a refresh yet, the trainer's own neighbourhood is the checkpoint's RoMA state
                raise ValueError(f"Cannot resume from {checkpoint}: it has no {name}, but {why}")

        path = os.path.join(checkpoint, TARGETS_FILE)
        if not os.path.isfile(path):
            refuse_missing(
                TARGETS_FILE,
                f"with refresh_targets_steps={every} the run had replaced the routing targets by step {step}, so "
                f"{what} would be lost and the resumed run would silently train against other targets. The "
                "checkpoint is incomplete (probably interrupted while it was being written, or written by an "
                "older roma_peft): resume from an earlier checkpoint that has the file, or start again.",
            )
            return
        routing, meta = self._read_targets(checkpoint, path, every, rss)
        if rss:
            folder = os.path.join(checkpoint, NEIGHBOURHOOD_DIR)
            if not os.path.isdir(folder):
                refuse_missing(
                    f"{NEIGHBOURHOOD_DIR}/",
                    f"with refresh_successful_set the run had rebuilt S and the neighbourhoods by step {step}; {what} "
                    "would be lost. Resume from an earlier complete checkpoint, or start again.",
                )
                return
            neighbourhood = Neighbourhood.load(folder, samples=self._samples)
            if list(neighbourhood.ids) != [s["id"] for s in self._samples]:
                raise ValueError(f"Cannot resume from {checkpoint}: its {NEIGHBOURHOOD_DIR}/ was built for other data.")
            self._use_neighbourhood(neighbourhood)
        else:
            self._set_routing(routing)
        self._last_refresh_step = int(meta.get("last_refresh_step", 0))
        self._targets_refreshed = True

    def _read_targets(self, checkpoint: str, path: str, every: int, rss: bool):
        """``(routing, metadata)`` of a checkpoint's targets file, refused when it was written with other refresh
        settings or does not fit this trainer (samples, routing dims, spec)."""
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            routing = f.get_tensor("routing")
        stored_every = meta.get("refresh_targets_steps")
        stored_rss = meta.get("refresh_successful_set")
        if (
            (stored_every is not None and int(stored_every) != every)
            or every <= 0
            or (stored_rss is not None and (stored_rss == "true") != rss)
        ):
            raise ValueError(
                f"Cannot resume from {checkpoint}: its {TARGETS_FILE} was written with refresh_targets_steps="
                f"{stored_every if stored_every is not None else '>0'}, refresh_successful_set={stored_rss or '?'}, "
                f"but this run has refresh_targets_steps={every}, refresh_successful_set={str(rss).lower()}. A "
                "resume with other refresh settings cannot reproduce the interrupted run; resume with the same "
                "arguments."
            )
        spec = meta.get("routing_spec")
        if (spec is not None and spec != self.routing_spec_string) or tuple(routing.shape) != (
            len(self._samples),
            self._routing_dim,
        ):
            raise ValueError(
                f"Cannot resume from {checkpoint}: its routing targets ({TARGETS_FILE}, shape {tuple(routing.shape)}, "
                f"spec {spec!r}) do not fit this trainer ({len(self._samples)} samples x {self._routing_dim} dims, "
                f"spec {self.routing_spec_string!r}). Resume with the same model, adapter, data and routing options."
            )
        return routing, meta


def _card_neighbourhood(nb) -> dict:
    """The card's neighbourhood section: how N(i) was built (method, k/eps, sigma, embeddings, search) and |S|."""
    if nb is None:
        return {}
    meta = getattr(nb, "metadata", {}) or {}
    config = meta.get("config") or {}
    summary = nb.summary() if hasattr(nb, "summary") else {}
    neighbourhood = {"method": config.get("method"), "k": config.get("k")}
    if config.get("method") == "eps":
        neighbourhood["eps"] = config.get("eps")
    neighbourhood.update(
        {
            "sigma (Gaussian bandwidth) configured": config.get("sigma")
            if config.get("sigma") is not None
            else "None: from the data",
            "sigma used": getattr(nb, "sigma", None),
            "embedding model": meta.get("embedding_model") or config.get("embedding_model"),
            "success metric (defines S)": config.get("success_metric"),
            "neighbour search": (meta.get("search") or {}).get("algorithm", config.get("search_algorithm")),
            "|S| (successful training samples)": summary.get("n_successful", meta.get("n_successful")),
            "samples without a successful neighbour": summary.get("n_empty"),
            "neighbourhood config hash": meta.get("config_hash"),
        }
    )
    return neighbourhood


def _card_results(log_history: list[dict]) -> dict:
    """The card's results section: the run's mean and last training losses and the last evaluation (± stderr)."""
    results: dict[str, object] = {}
    for entry in log_history:
        if "train_loss" in entry:
            results["train_loss (mean over the run)"] = entry["train_loss"]
        elif "loss" in entry:
            results["loss (last logged)"] = entry["loss"]
            if "roma/task_loss" in entry:
                results["roma/task_loss (last logged)"] = entry["roma/task_loss"]
    last_eval = {}
    for entry in log_history:
        if any(k.startswith("eval_") for k in entry):
            last_eval = entry
    for key in sorted(k for k in last_eval if k.startswith("eval_") and not k.endswith("_stderr")):
        if key.endswith(("_runtime", "_per_second", "_model_preparation_time", "roma/lambda")):
            continue
        value = last_eval[key]
        stderr = last_eval.get(f"{key}_stderr")
        results[key] = f"{value:.4f} ± {stderr:.4f}" if isinstance(stderr, float) and math.isfinite(stderr) else value
    return results


def _checkpoint_step(checkpoint: str) -> int | None:
    """The global step of a checkpoint folder (trainer_state.json, else the folder name), or None."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        match = re.search(r"checkpoint-(\d+)$", os.path.normpath(checkpoint))
        return int(match.group(1)) if match else None


def _check_checkpointing(args, model) -> None:
    kwargs = dict(getattr(args, "activation_checkpointing_kwargs", None) or {})
    if getattr(args, "activation_checkpointing", False) and kwargs.get("use_reentrant", False):
        raise ValueError(
            "Reentrant activation checkpointing (use_reentrant=True) runs the layers under no_grad, so the captured "
            "routing has no gradient and the RoMA regulariser would silently do nothing. Use "
            "activation_checkpointing_kwargs={'use_reentrant': False} (the default)."
        )
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and getattr(func, "keywords", {}).get("use_reentrant"):
            raise ValueError(
                "The model has reentrant gradient checkpointing enabled (use_reentrant=True): the RoMA regulariser "
                "would get no gradient. Re-enable it with gradient_checkpointing_kwargs={'use_reentrant': False}."
            )
