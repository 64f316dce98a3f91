"""Pretrain the tiny OLMoE of the offline RoMA miniature from scratch (CPU, one thread).

    python -m roma_peft.benchmark.pretrain --out DIR --seed 0

1. trains a word-level tokenizer (``tokenizers`` WordLevel + Whitespace pre-tokenizer) over the suite's
   fixed vocabulary and saves it as a ``PreTrainedTokenizerFast`` ([PAD]/[UNK]/[EOS], right padding);
2. pretrains ``OlmoeForCausalLM`` (8 layers, 16 experts, top-2) on the suite's ``pretrain`` split (in-distribution
   and bare styles; jargon always agrees with the skill) with the causal LM loss plus an *expert-specialisation*
   loss: cross-entropy of every trained MoE router's softmax towards the pair of experts owned by the item's skill
   (skill i -> experts 2i and 2i+1, half the target mass each) on every token after ``Question :``. Its weight is
   ``--route-weight`` annealed linearly to zero over the first ``--route-frac`` of the steps plus a constant
   ``--route-final`` (v3 default 1: the routers stay skill-specialised to the end; v2 released them, and their
   last-token routing drifted away from the skills). The first ``--frozen-layers`` MoE blocks (v3 default 3; v2: 0)
   keep their random initialisation, so no skill or fact lives there. Together this makes a skill's facts live in its
   own experts *in the last five layers*, where RoMA tunes the routers, so that their routing decides which skill is
   applied (v2's errors were made in the first three layers: docs/benchmark-suite.md);
3. scores every split by summed option log-likelihood (lm-eval style, argmax), measures routing
   specialisation at the last prompt token, and saves model (safetensors) + tokenizer + training_info.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from roma_peft.benchmark.suite import SKILLS, format_prompt, generate_suite, vocabulary

from ..devices import describe_machine

SPECIALS = ("[PAD]", "[UNK]", "[EOS]")


# ----------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------
def build_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # plain space-joined decoding
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIALS), min_frequency=1)
    # the fixed suite vocabulary (every word any seed can produce) + the pretraining corpus
    tok.train_from_iterator([" ".join(vocabulary())] + corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="[EOS]",
        padding_side="right",
        model_max_length=128,
    )


# ----------------------------------------------------------------------------------------------------
# scoring (self-contained lm-eval style multiple choice) and routing probes
# ----------------------------------------------------------------------------------------------------
def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def score_mc(model, tokenizer, items: list[dict], batch_size: int = 256) -> list[int]:
    """Predicted option index per item: argmax of summed log p(" " + option | prompt) (the project's lm-eval-exact
    scorer, :func:`roma_peft.scoring.score_multiple_choice`, so pretraining reports what the benchmark measures)."""
    from roma_peft.scoring import score_multiple_choice

    return score_multiple_choice(model, tokenizer, items, batch_size=batch_size, progress=False).pred


def accuracy(model, tokenizer, items: list[dict]) -> float:
    if not items:
        return float("nan")
    preds = score_mc(model, tokenizer, items)
    return sum(int(p == it["label"]) for p, it in zip(preds, items)) / len(items)


def _gates(model):
    return [layer.mlp.gate for layer in model.model.layers]


@torch.no_grad()
def last_token_top_experts(model, tokenizer, items: list[dict], batch_size: int = 256) -> torch.Tensor:
    """(n_items, n_layers) top-1 expert at the last prompt token."""
    model.eval()
    gates = _gates(model)
    out = torch.empty(len(items), len(gates), dtype=torch.long)
    for b in range(0, len(items), batch_size):
        chunk = items[b : b + batch_size]
        enc = [_encode(tokenizer, format_prompt(it["question"])) for it in chunk]
        T = max(map(len, enc))
        ids = torch.full((len(enc), T), tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for r, e in enumerate(enc):
            ids[r, : len(e)] = torch.tensor(e)
            att[r, : len(e)] = 1
        last = att.sum(1) - 1
        captured = []
        hooks = [g.register_forward_hook(lambda m, i, o, c=captured: c.append(o[0])) for g in gates]
        try:
            model(input_ids=ids, attention_mask=att)
        finally:
            for h in hooks:
                h.remove()
        for li, logits in enumerate(captured):
            logits = logits.view(len(enc), T, -1)
            out[b : b + len(chunk), li] = logits[torch.arange(len(enc)), last].argmax(-1)
    return out


def routing_report(model, tokenizer, suite: dict[str, list[dict]]) -> dict:
    """Per layer: dominant expert of each skill on in-distribution train items (last prompt token), the
    share of ID items routed to their skill's dominant expert, and for shifted train/dev items the share
    routed to their own skill's dominant expert vs. the dominant expert of the skill whose jargon they carry."""
    id_items = [it for it in suite["train"] if not it["shift"]]
    top_id = last_token_top_experts(model, tokenizer, id_items)
    n_layers = top_id.shape[1]
    dominant = {}
    rep: dict = {"layers": {}}
    for li in range(n_layers):
        dom = {}
        for s in SKILLS:
            c = Counter(int(top_id[j, li]) for j, it in enumerate(id_items) if it["task"] == s)
            dom[s] = c.most_common(1)[0][0]
        dominant[li] = dom
        id_match = sum(int(top_id[j, li]) == dom[it["task"]] for j, it in enumerate(id_items)) / len(id_items)
        rep["layers"][li] = {
            "dominant_expert": dom,
            "n_distinct_dominant": len(set(dom.values())),
            "id_train_top1_is_own_skill_expert": round(id_match, 4),
        }
    for split in ("train", "dev"):
        sh = [it for it in suite[split] if it["shift"]]
        top = last_token_top_experts(model, tokenizer, sh)
        for li in range(n_layers):
            dom = dominant[li]
            own = cue = 0
            for j, it in enumerate(sh):
                e = int(top[j, li])
                if e == dom[it["task"]]:
                    own += 1
                elif e == dom[it["cue_skill"]]:
                    cue += 1
            rep["layers"][li][f"{split}_shift_top1_own_skill_expert"] = round(own / len(sh), 4)
            rep["layers"][li][f"{split}_shift_top1_cue_skill_expert"] = round(cue / len(sh), 4)
    return rep


# ----------------------------------------------------------------------------------------------------
# model + training
# ----------------------------------------------------------------------------------------------------
def make_model(vocab_size: int, tokenizer, args):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        num_experts=len(SKILLS) * args.experts_per_skill,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=False,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        router_aux_loss_coef=0.0,
        output_router_logits=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return OlmoeForCausalLM(cfg)


def pretrain(args) -> dict:
    torch.set_num_threads(1)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()
    suite = generate_suite(args.seed)
    corpus = [it["text"] for it in suite["pretrain"]]
    tokenizer = build_tokenizer(corpus)
    model = make_model(len(tokenizer), tokenizer, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M vocab {len(tokenizer)} pretrain texts {len(corpus)}", flush=True)

    eos = tokenizer.eos_token_id
    data = []
    for it in suite["pretrain"]:
        ids = _encode(tokenizer, it["text"]) + [eos]
        n_prompt = len(_encode(tokenizer, format_prompt(it["question"])))
        data.append((ids, n_prompt, SKILLS.index(it["task"])))

    # Skill-agnostic early layers: the first ``frozen_layers`` MoE blocks (router and experts) keep their random
    # initialisation, so no skill-specific computation (and no fact) can live there; the routing decision that picks
    # a skill's experts is made in the later layers, where RoMA tunes the routers.
    for layer in model.model.layers[: args.frozen_layers]:
        layer.mlp.requires_grad_(False)
    gates = _gates(model)[args.frozen_layers :]
    captured: list[torch.Tensor] = []
    hooks = [g.register_forward_hook(lambda m, i, o, c=captured: c.append(o[0])) for g in gates]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, args.steps // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    )
    route_steps = int(args.route_frac * args.steps)
    rng = random.Random(args.seed)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(range(args.steps), desc="pretrain", mininterval=5, file=sys.stdout) if tqdm else range(args.steps)
    model.train()
    for step in bar:
        batch = [data[rng.randrange(len(data))] for _ in range(args.batch)]
        T = max(len(b[0]) for b in batch)
        ids = torch.full((len(batch), T), tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        ans = torch.zeros(len(batch), T, dtype=torch.bool)
        skill = torch.tensor([b[2] for b in batch])
        for r, (seq, n_prompt, _) in enumerate(batch):
            ids[r, : len(seq)] = torch.tensor(seq)
            att[r, : len(seq)] = 1
            ans[r, n_prompt : len(seq) - 1] = True  # the gold answer token(s)
        captured.clear()
        logits = model(input_ids=ids, attention_mask=att).logits
        tgt = ids[:, 1:].masked_fill(att[:, 1:] == 0, -100)
        lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        # extra weight on the answer tokens (what multiple-choice scoring reads)
        ans_t = ids[:, 1:].masked_fill(~ans[:, 1:], -100)
        lm_ans = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ans_t.reshape(-1))
        loss = args.lm_weight * lm + args.answer_weight * lm_ans
        w_route = args.route_weight * max(0.0, 1.0 - step / max(1, route_steps))
        if w_route > 0 or args.route_final > 0:
            # per-token weight of the routing supervision: the annealed part on every token after "Question :" (which
            # carries no skill information), plus the constant final part (on every such token, or only on the last
            # prompt token with --route-final-last-only)
            weight = torch.zeros(len(batch), T)
            weight[:, 2:] = w_route
            final = torch.zeros(len(batch), T)
            if args.route_final_last_only:
                final[torch.arange(len(batch)), torch.tensor([b[1] - 1 for b in batch])] = args.route_final
            else:
                final[:, 2:] = args.route_final
            weight = (weight + final) * att
            # the skill's experts share the target mass: CE towards each of them, averaged over experts and layers
            owned = skill[:, None] * args.experts_per_skill
            r_loss = 0.0
            for j in range(args.experts_per_skill):
                rt = (owned + j).expand(-1, T).reshape(-1)
                for lg in captured:
                    r_loss = r_loss + (F.cross_entropy(lg.float(), rt, reduction="none") * weight.reshape(-1)).sum()
            r_loss = r_loss / (args.experts_per_skill * len(captured) * max(1, int((att[:, 2:] > 0).sum())))
            loss = loss + r_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        if tqdm and step % 50 == 0:
            bar.set_postfix(lm=f"{lm.item():.3f}", ans=f"{lm_ans.item():.3f}", wr=f"{w_route:.2f}")
    for h in hooks:
        h.remove()
    train_time = time.time() - t0

    model.eval()
    splits = {
        "train_id": [it for it in suite["train"] if not it["shift"]],
        "train_shift": [it for it in suite["train"] if it["shift"]],
        "dev": suite["dev"],
    }
    if args.eval_test:
        splits["test"] = suite["test"]
    acc = {k: round(accuracy(model, tokenizer, v), 4) for k, v in splits.items()}
    for k in ("dev",) + (("test",) if args.eval_test else ()):
        from roma_peft.benchmark.suite import SHIFT_STYLES

        for st in SHIFT_STYLES:
            acc[f"{k}/{st}"] = round(accuracy(model, tokenizer, [it for it in suite[k] if it["style"] == st]), 4)
    routing = routing_report(model, tokenizer, suite)
    total_time = time.time() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info = {
        "seed": args.seed,
        "command": "python -m roma_peft.benchmark.pretrain " + " ".join(sys.argv[1:]),
        "machine": describe_machine(),
        "load_average_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()],
        "params": n_params,
        "vocab_size": len(tokenizer),
        "hparams": {k: v for k, v in vars(args).items() if k != "out"},
        "pretrain_seconds": round(train_time, 1),
        "total_seconds": round(total_time, 1),
        "base_accuracy": acc,
        "routing": routing,
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(
        json.dumps(
            {
                "routing": {
                    li: {k: v for k, v in r.items() if k != "dominant_expert"} for li, r in routing["layers"].items()
                }
            }
        )
    )
    print(f"done in {total_time:.0f}s (pretraining {train_time:.0f}s); base accuracy {json.dumps(acc)}", flush=True)
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m roma_peft.benchmark.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="suite seed = the world (its facts) the model learns")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--experts-per-skill", type=int, default=2, help="experts owned by each skill (16 = 8 x 2)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=64)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument(
        "--frozen-layers",
        type=int,
        default=3,
        help="the first N MoE blocks (routers and experts) stay at their random initialisation: skill-agnostic early "
        "layers, so skills are told apart where the tuned routers act (the last layers)",
    )
    p.add_argument("--route-weight", type=float, default=1.0)
    p.add_argument("--route-frac", type=float, default=0.5, help="the routing supervision anneals to 0 over this share")
    p.add_argument(
        "--route-final",
        type=float,
        default=1.0,
        help="a constant routing supervision weight kept after (and besides) the annealed part",
    )
    p.add_argument(
        "--route-final-last-only",
        action="store_true",
        help="the constant part supervises only the last prompt token's routing",
    )
    p.add_argument("--answer-weight", type=float, default=3.0)
    p.add_argument("--lm-weight", type=float, default=0.3, help="weight of the LM loss over the whole text")
    p.add_argument(
        "--no-eval-test",
        dest="eval_test",
        action="store_false",
        help="skip test accuracy (use while designing: decide on train/dev only)",
    )
    return p


def main(argv=None):
    return pretrain(build_parser().parse_args(argv))


# ----------------------------------------------------------------------------------------------------
# the worlds of the benchmark: world 0 ships, the others are pretrained on demand and cached
# ----------------------------------------------------------------------------------------------------
def world_cache_dir() -> Path:
    """Where pretrained worlds are cached: ``$ROMA_PEFT_CACHE/benchmark-worlds`` (default ``~/.cache/roma_peft``)."""
    root = os.environ.get("ROMA_PEFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "roma_peft")
    return Path(root) / "benchmark-worlds"


def world_key(seed: int) -> str:
    """What decides a pretrained world: the suite and pretraining code (this file and ``suite.py``), the default
    recipe, the seed and the versions of torch / transformers / tokenizers. A change of any of them is a new
    world directory, so a cached model made by other code is never used."""
    import hashlib
    from importlib.metadata import version

    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in ("suite.py", "pretrain.py"):
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    recipe = {
        k: v for k, v in vars(build_parser().parse_args(["--out", "-", "--seed", str(seed)])).items() if k != "out"
    }
    libs = {lib: version(lib) for lib in ("torch", "transformers", "tokenizers")}
    h.update(json.dumps({"recipe": recipe, "libraries": libs}, sort_keys=True).encode())
    return h.hexdigest()


def world_model_path(seed: int, cache_dir=None, pretrain_missing: bool = True) -> Path:
    """The pretrained model of world ``seed``: the shipped checkpoint for seed 0; for another seed the cached
    model under ``cache_dir`` (default :func:`world_cache_dir`), pretrained first (about 5-10 minutes on one core)
    when it is not there yet. The directory name carries :func:`world_key`, so code versions never mix."""
    from roma_peft.benchmark.suite import shipped_model_path

    if seed == 0:
        return shipped_model_path()
    target = Path(cache_dir or world_cache_dir()) / f"world-{seed}-{world_key(seed)[:16]}"
    if (target / "training_info.json").is_file():
        return target
    if not pretrain_missing:
        raise FileNotFoundError(
            f"World {seed} has not been pretrained by this code version yet (no {target}); run "
            f"python -m roma_peft.benchmark.pretrain --out {target} --seed {seed}, or let the runner do it."
        )
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    print(f"[roma-benchmark] pretraining world {seed} into {target} (cached for later runs)", flush=True)
    main(["--out", str(tmp), "--seed", str(seed)])
    tmp.replace(target)
    return target


if __name__ == "__main__":
    main()
