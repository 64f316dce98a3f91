"""Benchmark (not a test): scoring throughput and neighbourhood build time.

    python benchmarks/bench_scoring_neighbours.py            # full run, writes docs/benchmarks-scoring.md
    python benchmarks/bench_scoring_neighbours.py --n 5000   # smaller neighbourhood set

1. Multiple-choice scoring throughput vs a plain batched forward of the same model on the same
   padded (prompt, option) sequences (target >= 0.9x): the difference is tokenisation, the
   continuation gather/log-softmax and bookkeeping.
2. Embedding + neighbourhood build for 49,000 synthetic samples (the paper's training-set size),
   split into embedding time (all-MiniLM-L6-v2) and search time (sklearn exact k-NN over S,
   target <= 5 s on CPU).

All timings use 1 torch/BLAS thread unless stated; 1 vs 2 threads is measured once. Medians over
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from roma_peft.data import format_prompt, option_continuation
from roma_peft.embeddings import embed_texts
from roma_peft.neighbours import NeighbourhoodConfig, build_neighbourhood
from roma_peft.scoring import build_requests, score_multiple_choice

WORDS = ("water fire stone tree leaf river cloud metal glass plant animal cell energy force light "
         "sound heat cold person friend teacher doctor city market school house road car bird fish "
         "grows falls moves breaks helps makes needs wants finds keeps big small fast slow old new "
         "red green blue bright dark heavy light soft hard").split()
TASKS = ["science", "commonsense", "social", "reading", "coreference"]
TEMPLATES = {
    "science": "Which {a} {v} when the {b} is {c}?",
    "commonsense": "Where would you usually find a {c} {a} that {v} a {b}?",
    "social": "The {a} {v} the {b} because it was {c}. How would the {b} feel?",
    "reading": "According to the passage, why does the {c} {a} {v} near the {b}?",
    "coreference": "The {a} {v} the {b} since it was {c}. What does 'it' refer to?",
}


def synthetic_samples(n: int, seed: int = 0, n_options: int = 4) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = TASKS[i % len(TASKS)]
        q = TEMPLATES[t].format(a=rng.choice(WORDS), b=rng.choice(WORDS), c=rng.choice(WORDS),
                                v=rng.choice(WORDS))
        opts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(n_options)]
        out.append({"id": f"s{i}", "question": q, "options": opts, "label": rng.randrange(n_options),
                    "task": t})
    return out


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "Question", "Answer", ":", "?", ".", "'", ","]
    vocab += sorted(set(WORDS) | set(" ".join(TEMPLATES.values()).replace("?", " ").replace(".", " ")
                                       .replace("'", " ").replace(",", " ").split()))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(vocab))}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def bench_model(vocab: int):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    cfg = OlmoeConfig(vocab_size=max(vocab, 4096), hidden_size=256, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      num_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
                      pad_token_id=0)
    return OlmoeForCausalLM(cfg).eval()


def median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_scoring(n_samples: int, batch_size: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    tok = word_tokenizer()
    model = bench_model(len(tok))
    samples = synthetic_samples(n_samples, seed=1)
    # the plain forward gets the very same sequences, sorted and batched the same way, pre-tokenised
    reqs = build_requests(tok, samples, "Question: {question}\nAnswer:")
    inputs = [(c + t)[:-1] for _, _, c, t in reqs]
    inputs.sort(key=len, reverse=True)
    batches = []
    for b in range(0, len(inputs), batch_size):
        chunk = inputs[b:b + batch_size]
        ids = torch.zeros((len(chunk), len(chunk[0])), dtype=torch.long)
        for r, x in enumerate(chunk):
            ids[r, :len(x)] = torch.tensor(x)
        batches.append(ids)

    def plain():
        with torch.inference_mode():
            for ids in batches:
                model(input_ids=ids).logits

    def scored():
        score_multiple_choice(model, tok, samples, batch_size=batch_size, progress=False)

    plain()  # warm-up
    scored()
    # interleave the two so that load changes on a shared machine hit both alike
    tp, ts = [], []
    for _ in range(repeats):
        tp.append(median_time(plain, 1))
        ts.append(median_time(scored, 1))
    t_plain, t_score = statistics.median(tp), statistics.median(ts)
    ratio = statistics.median(a / b for a, b in zip(tp, ts))
    return {"threads": threads, "n_samples": n_samples, "n_sequences": len(inputs),
            "batch_size": batch_size, "plain_s": t_plain, "score_s": t_score,
            "ratio": ratio, "seq_per_s": len(inputs) / t_score}


def bench_neighbours(n: int, repeats: int, frac_success: float, emb_batch: int) -> list[dict]:
    """Embed once with 1 thread, then time the search with 1 thread (median) and 2 threads (once)."""
    samples = synthetic_samples(n, seed=2)
    texts = [s["question"] for s in samples]
    ok = np.random.default_rng(0).random(n) < frac_success
    rows = []
    emb = None
    for threads, reps in ((1, repeats), (2, 1)):
        torch.set_num_threads(threads)
        with threadpool_limits(threads):
            t_embed = float("nan")
            if emb is None:
                t = time.perf_counter()
                emb = embed_texts(texts, batch_size=emb_batch, progress=True)
                t_embed = time.perf_counter() - t
            out = {}
            for method in ("knn", "random"):
                cfg = NeighbourhoodConfig(method=method)
                out[method] = median_time(
                    lambda: build_neighbourhood(samples, ok, emb, cfg, progress=False), reps)
        rows.append({"n": n, "n_successful": int(ok.sum()), "dim": int(emb.shape[1]),
                     "threads": threads, "embed_s": t_embed, "search_knn_s": out["knn"],
                     "search_random_s": out["random"]})
        print("neighbours:", rows[-1], flush=True)
    return rows


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.node()} | {cpu} | {os.cpu_count()} logical CPUs | load avg(1m) {load:.2f} | "
            f"Python {platform.python_version()} | torch {torch.__version__}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=49_000, help="samples for the neighbourhood benchmark")
    ap.add_argument("--score-samples", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--emb-batch", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks-scoring.md"))
    args = ap.parse_args()

    print("machine:", machine(), flush=True)
    sc1 = bench_scoring(args.score_samples, args.batch_size, args.repeats, threads=1)
    print("scoring 1 thread:", sc1, flush=True)
    sc2 = bench_scoring(args.score_samples, args.batch_size, 1, threads=2)
    print("scoring 2 threads (1 run):", sc2, flush=True)
    nb1, nb2 = bench_neighbours(args.n, args.repeats, 0.6, emb_batch=args.emb_batch)

    lines = [
        "# Scoring and neighbourhood benchmark",
        "",
        f"Generated by `python benchmarks/bench_scoring_neighbours.py` on: {machine()}.",
        f"Medians over {args.repeats} repeats (the 2-thread rows are single runs). The machine is "
        "shared with other jobs, so absolute times are noisy; compare ratios.",
        "",
        "## Multiple-choice scoring vs plain batched forward",
        "",
        f"Tiny OLMoE (hidden 256, 4 layers, 8 experts, top-2), {sc1['n_samples']} samples x 4 options = "
        f"{sc1['n_sequences']} sequences, batch {sc1['batch_size']}. `plain` = `model(input_ids).logits` on the "
        "same pre-tokenised, sorted, right-padded batches; `score` = `score_multiple_choice` end to end "
        "(tokenisation included). Target: ratio >= 0.9.",
        "",
        "| threads | plain forward (s) | score_multiple_choice (s) | ratio plain/score (median of paired runs) | sequences/s |",
        "|---|---|---|---|---|",
    ]
    for r in (sc1, sc2):
        lines.append(f"| {r['threads']} | {r['plain_s']:.3f} | {r['score_s']:.3f} | {r['ratio']:.3f} | {r['seq_per_s']:.1f} |")
    lines += [
        "",
        f"## Embedding + neighbourhoods for {nb1['n']:,} synthetic samples",
        "",
        f"all-MiniLM-L6-v2 (dim {nb1['dim']}), |S| = {nb1['n_successful']:,} (60% successful). Search = "
        "`build_neighbourhood` end to end (sklearn exact brute-force k-NN over S for all samples, "
        "sigma from data, weights). Target: search <= 5 s.",
        "",
        "| threads | embedding, 1 thread (s) | k-NN search, k=3 (s) | random control (s) |",
        "|---|---|---|---|",
    ]
    for r in (nb1, nb2):
        emb_s = "(same embeddings)" if r["embed_s"] != r["embed_s"] else f"{r['embed_s']:.1f}"
        lines.append(f"| {r['threads']} | {emb_s} | {r['search_knn_s']:.2f} | {r['search_random_s']:.2f} |")
    lines.append("")
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
