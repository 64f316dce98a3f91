"""Inference cost of a RoMA adapter: base model vs unmerged adapter vs merged adapter (not a test).

Measures, in one run and on the same machine, the forward-pass time of a random OLMoE in three states:

* ``base``      -- the stock transformers model;
* ``unmerged``  -- ``get_peft_model(base, RomaConfig())`` with non-zero deltas (``W + Δ`` computed in the forward);
* ``merged``    -- the same adapter after ``merge_and_unload()``: a stock model with ``W + Δ`` in its router weights
  (what one deploys);
* ``merged_wrapped`` -- ``merge_adapter()`` on the PeftModel (still wrapped, adapter switchable).

The states are timed round-robin (base, unmerged, merged, base, ...) so that machine load drifts hit all of
them alike; each reported time is the median over repeats; ratios are relative to the base median of the same run.

Usage::

    python benchmarks/bench_inference.py                      # tiny + ~100M OLMoE, 1 torch thread
    python benchmarks/bench_inference.py --threads 2 --sizes 100m
    python benchmarks/bench_inference.py --markdown docs/benchmarks-inference.md
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

SIZES = {
    # name: (OlmoeConfig kwargs, batch, seq_len)
    "tiny": (
        dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=4, num_experts=8, num_experts_per_tok=2),
        2, 32,
    ),
    "100m": (
        dict(vocab_size=16384, hidden_size=512, intermediate_size=64, num_hidden_layers=12, num_attention_heads=8,
             num_key_value_heads=8, num_experts=64, num_experts_per_tok=8),
        1, 128,
    ),
}


def build(size: str, seed: int = 0):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    kwargs, batch, seq = SIZES[size]
    torch.manual_seed(seed)
    model = OlmoeForCausalLM(OlmoeConfig(pad_token_id=0, eos_token_id=1, bos_token_id=2, **kwargs)).eval()
    ids = torch.randint(3, kwargs["vocab_size"], (batch, seq))
    return model, ids


def time_states(states: dict, ids: torch.Tensor, repeats: int, warmup: int) -> dict[str, list[float]]:
    times = {name: [] for name in states}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in states.values():
                fn(ids)
        for _ in range(repeats):
            for name, fn in states.items():
                start = time.perf_counter()
                fn(ids)
                times[name].append(time.perf_counter() - start)
    return times


def run(size: str, threads: int, repeats: int, warmup: int) -> dict:
    import roma_peft
    from peft import get_peft_model

    torch.set_num_threads(threads)
    base, ids = build(size)
    n_params = sum(p.numel() for p in base.parameters())
    adapted = get_peft_model(copy.deepcopy(base), roma_peft.RomaConfig())
    torch.manual_seed(1)
    for name, param in adapted.named_parameters():
        if "roma_delta" in name:
            param.data.normal_(std=0.05)
    wrapped = copy.deepcopy(adapted)
    wrapped.merge_adapter()
    merged = copy.deepcopy(adapted).merge_and_unload()
    with torch.inference_mode():  # the states must compute what they claim
        ref = adapted(ids).logits
        assert torch.equal(merged(ids).logits, ref), "merge_and_unload != unmerged"
        assert torch.equal(wrapped(ids).logits, ref), "merge_adapter != unmerged"
        assert not torch.equal(base(ids).logits, ref), "the deltas changed nothing"
    states = {
        "base": lambda x: base(input_ids=x, use_cache=False),
        "unmerged": lambda x: adapted(input_ids=x, use_cache=False),
        "merged": lambda x: merged(input_ids=x, use_cache=False),
        "merged_wrapped": lambda x: wrapped(input_ids=x, use_cache=False),
    }
    times = time_states(states, ids, repeats, warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "size": size,
        "params": n_params,
        "threads": threads,
        "shape": tuple(ids.shape),
        "repeats": repeats,
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        "ratio": {k: med[k] / med["base"] for k in med},
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import peft
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} logical CPUs visible (shared with other jobs), Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    )


def to_markdown(results: list[dict], command: str) -> str:
    lines = [
        "# Inference cost of a RoMA adapter",
        "",
        "Generated by `benchmarks/bench_inference.py` (a benchmark, not a test).",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine()}",
        "- Method: forward pass (`use_cache=False`, `torch.inference_mode()`), random OLMoE, RoMA on the last 5 MoE "
        "layers with non-zero deltas; base / unmerged / merged timed round-robin in one run; median over repeats; "
        "ratio = median / base median of the same run. Targets: merged = 1.00x, unmerged <= 1.05x.",
        "",
        "| model | params | threads | input (B, T) | repeats | base ms | unmerged ms | merged ms | unmerged / base | "
        "merged / base | merge_adapter (wrapped) / base |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, q = r["median_ms"], r["ratio"]
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['threads']} | {r['shape']} | {r['repeats']} | "
            f"{m['base']:.2f} | {m['unmerged']:.2f} | {m['merged']:.2f} | {q['unmerged']:.3f}x | {q['merged']:.3f}x | "
            f"{q['merged_wrapped']:.3f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "100m"], choices=sorted(SIZES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1])
    parser.add_argument("--repeats", type=int, default=None, help="default: 200 for tiny, 20 for 100m")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--markdown", default=None, help="write the results table to this file")
    args = parser.parse_args(argv)
    results = []
    for size in args.sizes:
        for threads in args.threads:
            repeats = args.repeats or (200 if size == "tiny" else 20)
            r = run(size, threads, repeats, args.warmup)
            results.append(r)
            print(
                f"{size:>5} ({r['params'] / 1e6:.1f}M params, {threads} thread(s)): "
                + ", ".join(f"{k} {v:.2f} ms ({r['ratio'][k]:.3f}x)" for k, v in r["median_ms"].items()),
                flush=True,
            )
    if args.markdown:
        command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
        with open(args.markdown, "w") as f:
            f.write(to_markdown(results, command))
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
