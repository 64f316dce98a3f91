"""Benchmark (not a test): scoring throughput and neighbourhood build time.

    python benchmarks/bench_scoring_neighbours.py            # full run, writes docs/benchmarks-scoring.md
    python benchmarks/bench_scoring_neighbours.py --n 5000   # smaller neighbourhood set

1. Multiple-choice scoring throughput vs a plain batched forward of the same model on the same
   padded (prompt, option) sequences (target >= 0.9x): the difference is tokenisation, the
   continuation gather/log-softmax and bookkeeping. Plain and scored runs alternate so that load
   from other jobs hits both alike; medians over ``--repeats``.
2. Embedding + neighbourhood build for 49,000 synthetic samples (the paper's training-set size),
   split into embedding time (all-MiniLM-L6-v2) and search time (target <= 5 s on CPU): exact
   sklearn brute force (the default) and approximate faiss HNSW (``search_algorithm="hnsw"``),
   with 1 and 2 threads, and the recall@k of HNSW against the exact result.

Embedding time is measured on the first ``--embed-sample`` (5,000) texts. If that extrapolates to
more than ``--embed-limit`` seconds (10 min) for all of them, the full time is reported as a
linear extrapolation (said so in the output), and the vectors for the search benchmark come from
an embedding cache (``--emb-cache``; filled by an earlier run of this script: the same texts,
model and ``embed_texts`` call) or are computed untimed. Every number in the report is measured
by this run unless the report says otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np
import torch
from threadpoolctl import threadpool_limits

DEFAULT_TORCH_THREADS = torch.get_num_threads()  # read before roma_peft's imports can change it

from roma_peft.devices import describe_machine  # noqa: E402
from roma_peft.embeddings import embed_texts  # noqa: E402
from roma_peft.neighbours import NeighbourhoodConfig, _Search, build_neighbourhood  # noqa: E402
from roma_peft.scoring import build_requests, score_multiple_choice  # noqa: E402

WORDS = (
    "water fire stone tree leaf river cloud metal glass plant animal cell energy force light "
    "sound heat cold person friend teacher doctor city market school house road car bird fish "
    "grows falls moves breaks helps makes needs wants finds keeps big small fast slow old new "
    "red green blue bright dark heavy light soft hard"
).split()
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
        q = TEMPLATES[t].format(a=rng.choice(WORDS), b=rng.choice(WORDS), c=rng.choice(WORDS), v=rng.choice(WORDS))
        opts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(n_options)]
        out.append({"id": f"s{i}", "question": q, "options": opts, "label": rng.randrange(n_options), "task": t})
    return out


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "Question", "Answer", ":", "?", ".", "'", ","]
    vocab += sorted(
        set(WORDS)
        | set(
            " ".join(TEMPLATES.values()).replace("?", " ").replace(".", " ").replace("'", " ").replace(",", " ").split()
        )
    )
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(vocab))}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def bench_model(vocab: int):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    cfg = OlmoeConfig(
        vocab_size=max(vocab, 4096),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
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
        chunk = inputs[b : b + batch_size]
        ids = torch.zeros((len(chunk), len(chunk[0])), dtype=torch.long)
        for r, x in enumerate(chunk):
            ids[r, : len(x)] = torch.tensor(x)
        batches.append(ids)

    def plain():
        with torch.inference_mode():
            for ids in batches:
                _ = model(input_ids=ids).logits

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
    return {
        "threads": threads,
        "n_samples": n_samples,
        "n_sequences": len(inputs),
        "batch_size": batch_size,
        "plain_s": t_plain,
        "score_s": t_score,
        "ratio": ratio,
        "seq_per_s": len(inputs) / t_score,
    }


def set_threads(threads: int) -> None:
    """torch intra-op threads and faiss' OpenMP threads (BLAS is limited with threadpool_limits)."""
    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def embed_all(texts: list[str], emb_batch: int, sample: int, limit_s: float, cache: str | None) -> dict:
    """Time embedding (1 thread) and return the (N, 384) vectors for the search benchmark."""
    n = len(texts)
    sample = min(sample, n)
    set_threads(1)
    with threadpool_limits(1):
        t = time.perf_counter()
        head = embed_texts(texts[:sample], batch_size=emb_batch, progress=False)
        t_head = time.perf_counter() - t
        est = t_head * n / sample
        info = {
            "embed_sample_n": sample,
            "embed_sample_s": t_head,
            "embed_est_s": est,
            "embed_load": load_avg(),
            "embed_cache": None,
        }
        key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
        path = os.path.join(cache, f"emb_{n}_{key}.npy") if cache else None
        if sample == n:
            info.update(embed_s=t_head, embed_measured=True)
            return {**info, "emb": head}
        if est <= limit_s:
            t = time.perf_counter()
            rest = embed_texts(texts[sample:], batch_size=emb_batch, progress=True)
            info.update(embed_s=t_head + time.perf_counter() - t, embed_measured=True)
            emb = np.concatenate([head, rest])
        else:
            info.update(embed_s=est, embed_measured=False)
            if path and os.path.isfile(path):
                emb = np.load(path)
                ok = emb.shape == (n, head.shape[1]) and np.allclose(emb[:sample], head, atol=1e-4)
                if not ok:
                    raise SystemExit(f"embedding cache {path} does not match the texts; delete it")
                info["embed_cache"] = path
            else:
                print(
                    f"embedding: {sample} texts took {t_head:.1f} s -> all {n} ~{est:.0f} s (> "
                    f"{limit_s:.0f} s): extrapolating the time; computing the rest untimed",
                    flush=True,
                )
                rest = embed_texts(texts[sample:], batch_size=emb_batch, progress=True)
                emb = np.concatenate([head, rest])
        if path and not os.path.isfile(path):
            os.makedirs(cache, exist_ok=True)
            np.save(path, emb)
    return {**info, "emb": emb}


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """recall@k: fraction of the exact neighbours that the approximate search returned."""
    hits = sum(len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) for a, e in zip(approx, exact))
    return hits / max(1, int((exact >= 0).sum()))


def bench_neighbours(
    n: int,
    repeats: int,
    frac_success: float,
    emb_batch: int,
    embed_sample: int,
    embed_limit: float,
    cache: str | None,
    hnsw_grid: list[tuple[int, int, int]],
) -> dict:
    samples = synthetic_samples(n, seed=2)
    texts = [s["question"] for s in samples]
    ok = np.random.default_rng(0).random(n) < frac_success
    e = embed_all(texts, emb_batch, embed_sample, embed_limit, cache)
    emb = e.pop("emb")
    print("embedding:", e, flush=True)
    res = {"n": n, "n_successful": int(ok.sum()), "dim": int(emb.shape[1]), **e, "search": []}

    exact_cfg = NeighbourhoodConfig()  # brute force, k=3, sigma from data
    hnsw_cfg = NeighbourhoodConfig(search_algorithm="hnsw")
    built = {}
    for threads in (1, 2):
        set_threads(threads)
        with threadpool_limits(threads):
            for name, cfg, reps in (
                ("exact (sklearn brute)", exact_cfg, 1),
                (
                    f"hnsw M={hnsw_cfg.hnsw_m} efC={hnsw_cfg.hnsw_ef_construction} efS={hnsw_cfg.hnsw_ef_search}",
                    hnsw_cfg,
                    repeats,
                ),
            ):
                ts = []
                for _ in range(reps):
                    t = time.perf_counter()
                    nb = build_neighbourhood(samples, ok, emb, cfg, progress=False)
                    ts.append(time.perf_counter() - t)
                built[(name, threads)] = nb
                row = {
                    "name": name,
                    "threads": threads,
                    "runs": reps,
                    "s": statistics.median(ts),
                    "load": load_avg(),
                    "sigma": nb.sigma,
                }
                res["search"].append(row)
                print("search:", row, flush=True)
    ex = built[("exact (sklearn brute)", 1)].neighbour_index.numpy()
    for row in res["search"]:
        nbi = built[(row["name"], row["threads"])].neighbour_index.numpy()
        row["recall"] = recall(nbi, ex)
        row["rows_identical"] = float((nbi == ex).all(1).mean())
    hnsw_names = [r["name"] for r in res["search"] if r["name"].startswith("hnsw")]
    a, b = (built[(hnsw_names[0], t)].neighbour_index for t in (1, 2))
    res["hnsw_1v2_identical"] = float((a == b).all(1).float().mean())

    # HNSW parameter grid (1 thread): index build and query time, recall@3 of the raw k-NN query
    set_threads(1)
    s_idx = np.flatnonzero(ok)
    pos = np.full(n, -1)
    pos[s_idx] = np.arange(len(s_idx))
    from roma_peft.neighbours import _drop_self

    exact_s = np.where(ex >= 0, pos[np.clip(ex, 0, None)], -1)
    res["grid"] = []
    with threadpool_limits(1):
        for m, efc, ef in hnsw_grid:
            cfg = NeighbourhoodConfig(search_algorithm="hnsw", hnsw_m=m, hnsw_ef_construction=efc, hnsw_ef_search=ef)
            t = time.perf_counter()
            srch = _Search(cfg, emb[s_idx])
            t_build = time.perf_counter() - t
            t = time.perf_counter()
            d, i = srch.kneighbors(emb, cfg.k + 1)
            t_query = time.perf_counter() - t
            i, _ = _drop_self(i, d, pos, cfg.k)
            row = {
                "M": m,
                "efC": cfg.hnsw_ef_construction,
                "efS": ef,
                "build_s": t_build,
                "query_s": t_query,
                "recall": recall(i, exact_s),
            }
            res["grid"].append(row)
            print("hnsw grid:", row, flush=True)
    return res


def machine() -> str:
    return describe_machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=49_000, help="samples for the neighbourhood benchmark")
    ap.add_argument("--score-samples", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--emb-batch", type=int, default=128)
    ap.add_argument(
        "--embed-sample",
        type=int,
        default=5000,
        help="texts whose embedding is timed (extrapolated to --n if the estimate is > --embed-limit)",
    )
    ap.add_argument("--embed-limit", type=float, default=600.0)
    ap.add_argument(
        "--emb-cache",
        default=os.path.join(os.path.expanduser("~"), ".cache", "roma_peft_bench"),
        help="directory for the embedding cache ('' = none)",
    )
    ap.add_argument("--skip-scoring", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks-scoring.md"))
    args = ap.parse_args()
    command = "python benchmarks/bench_scoring_neighbours.py" + "".join(f" {a}" for a in sys.argv[1:])

    start_machine = machine()
    print("machine:", start_machine, flush=True)
    sc = []
    if not args.skip_scoring:
        sc1 = bench_scoring(args.score_samples, args.batch_size, args.repeats, threads=1)
        sc1["load"] = load_avg()
        print("scoring 1 thread:", sc1, flush=True)
        sc2 = bench_scoring(args.score_samples, args.batch_size, args.repeats, threads=2)
        sc2["load"] = load_avg()
        print("scoring 2 threads:", sc2, flush=True)
        sc = [sc1, sc2]
    d = NeighbourhoodConfig()
    grid = [
        (16, 40, 16),
        (d.hnsw_m, d.hnsw_ef_construction, d.hnsw_ef_search),
        (16, 40, 64),
        (32, 40, 32),
        (32, 80, 32),
    ]
    nb = bench_neighbours(
        args.n, args.repeats, 0.6, args.emb_batch, args.embed_sample, args.embed_limit, args.emb_cache or None, grid
    )

    lines = [
        "# Scoring and neighbourhood benchmark",
        "",
        f"Generated by `{command}`.",
        "",
        f"* machine at start: {start_machine}",
        f"* machine at end: {machine()}",
        f"* torch threads: set per row (`torch.set_num_threads`; BLAS via `threadpoolctl`, faiss via "
        f"`faiss.omp_set_num_threads`); `torch.get_num_threads()` default here: {DEFAULT_TORCH_THREADS}, "
        f"{os.cpu_count()} logical CPUs",
        "* load average = 1/5/15-minute averages when the row finished. The machine is shared with "
        "other jobs (load above the core count means they compete for the CPUs), so absolute times "
        "are noisy; ratios of interleaved runs are more reliable.",
        "",
    ]
    if sc:
        lines += [
            "## Multiple-choice scoring vs plain batched forward",
            "",
            f"Tiny OLMoE (hidden 256, 4 layers, 8 experts, top-2), {sc[0]['n_samples']} samples x 4 options = "
            f"{sc[0]['n_sequences']} sequences, batch {sc[0]['batch_size']}. `plain` = `model(input_ids).logits` on "
            "the same pre-tokenised, sorted, right-padded batches; `score` = `score_multiple_choice` end to end "
            "(tokenisation, gather, log-softmax, bookkeeping included). Plain and scored runs alternate; "
            f"medians over {args.repeats} pairs. Target: ratio >= 0.9.",
            "",
            "| threads | plain forward (s) | score_multiple_choice (s) | ratio plain/score (median of paired runs) | sequences/s | load avg |",
            "|---|---|---|---|---|---|",
        ]
        for r in sc:
            lines.append(
                f"| {r['threads']} | {r['plain_s']:.3f} | {r['score_s']:.3f} | {r['ratio']:.3f} | "
                f"{r['seq_per_s']:.1f} | {r['load']} |"
            )
        lines.append("")
    n = nb["n"]
    if nb["embed_measured"]:
        emb_line = f"**{nb['embed_s']:.1f} s measured** for all {n:,} texts (1 thread)."
    else:
        emb_line = (
            f"**~{nb['embed_s']:.0f} s, EXTRAPOLATED linearly** from {nb['embed_sample_s']:.1f} s measured for "
            f"the first {nb['embed_sample_n']:,} texts (1 thread; x {n / nb['embed_sample_n']:.1f}), because "
            f"the full run would exceed {args.embed_limit:.0f} s here. "
            + (
                f"The vectors for the search come from the cache `{nb['embed_cache']}` (same texts, model and "
                "call; its first rows were checked against this run's)."
                if nb["embed_cache"]
                else "The remaining vectors for the search were computed untimed."
            )
        )
    lines += [
        f"## Embedding + neighbourhoods for {n:,} synthetic samples",
        "",
        f"Texts: the synthetic questions of `synthetic_samples({n}, seed=2)`; all-MiniLM-L6-v2 "
        f"(dim {nb['dim']}, unit vectors), batch {args.emb_batch}.",
        "",
        f"Embedding time: {emb_line} Load average: {nb['embed_load']}.",
        "",
        f"Search = `build_neighbourhood` end to end (k=3, sigma from data, weights), all {n:,} samples "
        f"queried against |S| = {nb['n_successful']:,} (60% successful). recall@3 = fraction of the exact "
        "neighbours that the row's search returned; 'rows identical' = samples whose 3 neighbours are "
        "exactly the exact ones, in order. Exact rows are single runs (each costs N x |S| x 384 "
        f"multiply-adds); HNSW rows are medians of {args.repeats}. Target: search <= 5 s.",
        "",
        "| search | threads | time (s) | recall@3 vs exact | rows identical | sigma | load avg |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in nb["search"]:
        runs = "" if r["runs"] == 1 else f" (median of {r['runs']})"
        lines.append(
            f"| {r['name']} | {r['threads']} | {r['s']:.2f}{runs} | {r['recall']:.4f} | "
            f"{r['rows_identical']:.4f} | {r['sigma']:.4f} | {r['load']} |"
        )
    lines += [
        "",
        f"HNSW with 1 vs 2 threads: {nb['hnsw_1v2_identical']:.4f} of the rows have the same neighbours "
        "(faiss builds the graph in parallel; 1.0 means the build was reproducible here).",
        "",
        "HNSW parameters (1 thread, one run each; `_Search` only: graph build over S + k-NN query of all "
        f"{n:,} samples, recall@3 against the exact neighbours). The default is the row with "
        f"M={NeighbourhoodConfig.hnsw_m}, efC={NeighbourhoodConfig.hnsw_ef_construction}, "
        f"efS={NeighbourhoodConfig.hnsw_ef_search}.",
        "",
        "| M | efConstruction | efSearch | build (s) | query (s) | total (s) | recall@3 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in nb["grid"]:
        lines.append(
            f"| {r['M']} | {r['efC']} | {r['efS']} | {r['build_s']:.2f} | {r['query_s']:.2f} | "
            f"{r['build_s'] + r['query_s']:.2f} | {r['recall']:.4f} |"
        )
    lines.append("")
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
