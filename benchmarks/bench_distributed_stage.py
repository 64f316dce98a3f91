"""Benchmark (not a test): the sharded S stage on 1 and 2 CPU processes (torchrun, gloo).

    python benchmarks/bench_distributed_stage.py                # 1024 training samples, writes docs/benchmarks-distributed.*
    python benchmarks/bench_distributed_stage.py --n 256 --no-write

On the shipped tiny MoE (``roma_peft/benchmark/assets/roma-mini-olmoe``, loaded offline as the demo does) and the
suite's training items, each run launches ``torch.distributed.run --nproc_per_node P`` (P = 1, then 2; one torch
thread per process) on this file in worker mode. Every rank runs the three passes of the S stage through
:mod:`roma_peft.distributed` (scoring -> S, routing capture -> r_j, task embeddings), timing its own blocks; the main
process builds and saves the neighbourhood. The script then asserts that S (and every score), the routing targets,
the embeddings and the saved neighbourhood files are bitwise equal for 1 and 2 processes, and reports per phase the
wall time and the throughput of each rank (samples it computed / seconds it spent computing them).

The machine is the project's 2-core box, shared with other jobs: 2 processes cannot be more than 2x faster, and load
from other jobs during a run shows up as lower per-rank throughput (the load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

PHASES = ("scoring", "routing", "embedding")


# ----------------------------------------------------------------------------------------------------- worker
def worker(out: str, n: int, block: int, batch: int) -> None:
    import numpy as np
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer

    import roma_peft
    from roma_peft.benchmark.runner import load_base_model
    from roma_peft.benchmark.suite import generate_suite, shipped_model_path
    from roma_peft.capture import RoutingRecorder, RoutingSpec, collect_routing
    from roma_peft.conditions import routing_conditions
    from roma_peft.data import validate_samples
    from roma_peft.distributed import (
        distributed_state,
        merge_score_results,
        run_sharded,
    )
    from roma_peft.embeddings import embed_samples, load_embedding_model
    from roma_peft.neighbours import NeighbourhoodConfig, build_neighbourhood
    from roma_peft.prompts import PromptEncoding
    from roma_peft.scoring import score_multiple_choice
    from roma_peft.trainer import routing_spec_string

    torch.set_num_threads(1)
    state = distributed_state()
    path = str(shipped_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(load_base_model(path), roma_peft.RomaConfig(layer_selection="all"))
    train = generate_suite(seed=0)["train"]  # a seeded subset, as the benchmark runner draws it: S is a mix
    samples = validate_samples(sorted(random.Random(0).sample(train, min(n, len(train))), key=lambda s: s["id"]))
    encoding = PromptEncoding.for_tokenizer(tok)
    spec = RoutingSpec()
    load_embedding_model()  # loading is not part of the measured embedding throughput

    busy = {phase: 0.0 for phase in PHASES}
    done = {phase: 0 for phase in PHASES}

    def timed(phase, fn):
        def run(block_samples):
            start = time.perf_counter()
            result = fn(block_samples)
            busy[phase] += time.perf_counter() - start
            done[phase] += len(block_samples)
            return result

        return run

    wall = {}
    state.wait_for_everyone()
    start = time.perf_counter()
    with model.disable_adapter():
        scores = run_sharded(
            timed(
                "scoring",
                lambda b: score_multiple_choice(model, tok, b, batch_size=batch, encoding=encoding, progress=False),
            ),
            samples,
            lambda parts: merge_score_results(parts, samples),
            block_size=block,
        )
    wall["scoring"] = time.perf_counter() - start
    start = time.perf_counter()
    routing_block = -(-block // batch) * batch  # as collect_routing_sharded: whole capture batches
    with model.disable_adapter():
        routing = run_sharded(
            timed(
                "routing",
                lambda b: collect_routing(
                    model, tok, b, spec=spec, batch_size=batch, encoding=encoding, progress=False
                ),
            ),
            samples,
            torch.cat,
            block_size=routing_block,
        )
    wall["routing"] = time.perf_counter() - start
    start = time.perf_counter()
    embeddings = run_sharded(
        timed("embedding", lambda b: embed_samples(b, progress=False)),
        samples,
        lambda parts: np.concatenate(parts),
        block_size=block,
    )
    wall["embedding"] = time.perf_counter() - start

    per_rank = run_sharded(
        lambda _: {"rank": state.process_index, "busy": dict(busy), "done": dict(done)},
        list(range(state.num_processes)),
        block_size=1,
    )
    if state.is_main_process:
        recorder = RoutingRecorder(model, spec=spec)
        tag = routing_spec_string(spec, recorder.routers)
        recorder.remove()
        nb = build_neighbourhood(
            samples,
            scores,
            embeddings,
            NeighbourhoodConfig(k=3),
            routing=routing,
            routing_spec=tag,
            progress=False,
            conditions=routing_conditions(model, tok, samples, encoding, routing_spec=tag, spec=spec),
        )
        nb.save(os.path.join(out, "nb"))
        scores.save(os.path.join(out, "scores.json"))
        torch.save({"routing": routing, "embeddings": torch.from_numpy(embeddings)}, os.path.join(out, "tensors.pt"))
        with open(os.path.join(out, "timing.json"), "w") as f:
            json.dump(
                {
                    "world_size": state.num_processes,
                    "wall": wall,
                    "ranks": per_rank,
                    "n_successful": int(sum(scores.correct)),
                    "n": len(samples),
                },
                f,
            )
    state.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------- driver
def machine() -> dict:
    from roma_peft.devices import machine_info

    return {**machine_info(), "threads_per_process": 1}


def launch(nproc: int, out: str, args) -> float:
    os.makedirs(out, exist_ok=True)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        "0",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "localhost:0",
        os.path.abspath(__file__),
        "worker",
        out,
        str(args.n),
        str(args.block),
        str(args.batch),
    ]  # positional: torchrun would take "--n" as its own
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{nproc}-process run failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def open_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def check_equal(one: str, two: str) -> list[str]:
    """Bitwise comparisons of the two runs' outputs (raises on the first difference)."""
    import torch

    checked = []
    a, b = (json.loads(open_text(os.path.join(run, "scores.json"))) for run in (one, two))
    for key in ("ids", "correct", "correct_norm", "pred", "pred_norm", "loglikelihoods", "greedy", "data_hash"):
        assert a[key] == b[key], f"scores differ in {key}"
    checked.append("S and every score (loglikelihoods, greedy, pred, correct) equal")
    ta, tb = torch.load(os.path.join(one, "tensors.pt")), torch.load(os.path.join(two, "tensors.pt"))
    for key in ("routing", "embeddings"):
        assert torch.equal(ta[key], tb[key]), f"{key} differ"
        checked.append(f"{key} {tuple(ta[key].shape)} bitwise equal")
    for name in ("neighbourhood.safetensors", "neighbourhood.json"):
        with open(os.path.join(one, "nb", name), "rb") as f, open(os.path.join(two, "nb", name), "rb") as g:
            assert f.read() == g.read(), f"{name} differs"
        checked.append(f"nb/{name} byte-identical")
    return checked


def summarise(timings: dict) -> list[dict]:
    rows = []
    for world, t in sorted(timings.items()):
        for phase in PHASES:
            ranks = [(r["rank"], r["done"][phase], r["busy"][phase]) for r in t["ranks"]]
            rows.append(
                {
                    "processes": world,
                    "phase": phase,
                    "wall_s": round(t["wall"][phase], 3),
                    "samples_per_s_total": round(t["n"] / t["wall"][phase], 1),
                    "per_rank": [
                        {
                            "rank": r,
                            "samples": d,
                            "busy_s": round(b, 3),
                            "samples_per_s": round(d / b, 1) if b else None,
                        }
                        for r, d, b in ranks
                    ],
                }
            )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1024, help="training samples of the suite")
    parser.add_argument("--block", type=int, default=128, help="samples per block (shard_block_size)")
    parser.add_argument("--batch", type=int, default=16, help="batch size of scoring and capture")
    parser.add_argument("--out", default="/tmp/roma-bench-distributed")
    parser.add_argument("--no-write", action="store_true", help="do not write docs/benchmarks-distributed.*")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["worker"]:
        return worker(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
    args = parser.parse_args(argv)

    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    info = machine()
    timings, launch_s = {}, {}
    for nproc in (1, 2):
        out = os.path.join(args.out, f"p{nproc}")
        launch_s[nproc] = round(launch(nproc, out, args), 1)
        timings[nproc] = json.loads(open_text(os.path.join(out, "timing.json")))
        print(f"{nproc} process(es): {launch_s[nproc]} s including start-up", flush=True)
    checked = check_equal(os.path.join(args.out, "p1"), os.path.join(args.out, "p2"))
    rows = summarise(timings)
    result = {
        "n_samples": args.n,
        "block_size": args.block,
        "batch_size": args.batch,
        "n_successful": timings[1]["n_successful"],
        "machine": info,
        "launch_s": launch_s,
        "bitwise_checks": checked,
        "phases": rows,
    }
    lines = [
        "# Sharded S stage: 1 vs 2 CPU processes",
        "",
        "Measured by `python benchmarks/bench_distributed_stage.py` (not a test) on the shipped tiny MoE "
        f"(roma-mini-olmoe), {args.n} suite training samples, blocks of {args.block} samples, batch {args.batch}, "
        "one torch thread per process, torchrun + gloo. Throughput per rank = samples the rank computed / seconds it "
        "spent computing them; total = all samples / wall time of the phase (gather included).",
        "",
        f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs (shared with other jobs; load average "
        f"{info['load_avg_1m']} when the run ended), Python {info['python']}, torch {info['torch']}.",
        "",
        "| processes | phase | wall s | total samples/s | per rank: samples, samples/s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        ranks = "; ".join(f"rank {r['rank']}: {r['samples']}, {r['samples_per_s']}" for r in row["per_rank"])
        lines.append(
            f"| {row['processes']} | {row['phase']} | {row['wall_s']} | {row['samples_per_s_total']} | {ranks} |"
        )
    lines += ["", f"S: {timings[1]['n_successful']} of {args.n} samples. Checked, 1 vs 2 processes:", ""]
    lines += [f"- {c}" for c in checked]
    lines += [
        "",
        f"Whole runs including process start-up, model and embedding-model loading: {launch_s[1]} s (1 "
        f"process), {launch_s[2]} s (2 processes).",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        with open(os.path.join(ROOT, "docs", "benchmarks-distributed.md"), "w") as f:
            f.write(report)
        with open(os.path.join(ROOT, "docs", "benchmarks-distributed.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
