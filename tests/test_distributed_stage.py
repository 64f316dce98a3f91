"""The S stage (scoring, routing capture, embeddings) and `roma-peft neighbours`/`evaluate` on 2 processes (torchrun,
CPU, gloo) give bitwise the results of 1 process; each rank computes its own contiguous blocks; the CLI prints once.

The file is also the worker script: ``python -m torch.distributed.run --nproc_per_node 2 tests/test_distributed_stage.py
OUT MODEL_DIR DATA_FILE``.
"""

import json
import os
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from helpers_launch import run_two_processes

HERE = os.path.dirname(os.path.abspath(__file__))
N_SAMPLES = 40
BLOCK = 8  # 5 blocks: rank 0 takes blocks 0-2, rank 1 blocks 3-4
BATCH = 4


def _fixtures():
    sys.path.insert(0, HERE)
    from helpers_scoring import mc_samples
    from helpers_training import tiny_peft_model, tiny_tokenizer

    return tiny_tokenizer(), mc_samples(N_SAMPLES), tiny_peft_model(num_layers=3, tuned=2)


def cli_args(model_dir: str, data: str) -> list[str]:
    return ["--model_name_or_path", model_dir, "--batch_size", str(BATCH), "--shard_block_size", str(BLOCK)]


def run_stage(out_dir: str, model_dir: str, data: str) -> dict:
    """The sharded S stage through the API and the CLI; every rank writes what it got."""
    from roma_peft.cli import main
    from roma_peft.distributed import (
        collect_routing_sharded,
        distributed_state,
        embed_sharded,
        run_sharded,
        score_sharded,
    )

    torch.set_num_threads(1)
    state = distributed_state()
    tok, samples, model = _fixtures()
    # who computed which block (the split itself), gathered like every result
    owners = run_sharded(
        lambda block: (state.process_index, [s["id"] for s in block]), samples, block_size=BLOCK, state=state
    )
    scores = score_sharded(model, tok, samples, batch_size=BATCH, block_size=BLOCK, progress=False)
    routing = collect_routing_sharded(model, tok, samples, batch_size=BATCH, block_size=BLOCK - 2, progress=False)
    embeddings = embed_sharded(samples, block_size=BLOCK, progress=False)
    result = {
        "world_size": state.num_processes,
        "owners": owners,
        "scores": asdict(scores),
        "routing": routing,
        "embeddings": torch.from_numpy(embeddings),
    }
    torch.save(result, os.path.join(out_dir, f"stage-rank{state.process_index}.pt"))
    common = cli_args(model_dir, data)
    assert (
        main(
            [
                "neighbours",
                *common,
                "--train_file",
                data,
                "--num_layers",
                "2",
                "--k",
                "2",
                "--output_dir",
                os.path.join(out_dir, "nb"),
            ]
        )
        == 0
    )
    assert main(["evaluate", *common, "--eval_file", data, "--output_file", os.path.join(out_dir, "eval.json")]) == 0
    return result


def _launch(tmp_path, model_dir, data):
    out = tmp_path / "two"
    out.mkdir()
    proc = run_two_processes(__file__, out, model_dir, data)
    return out, proc.stdout


@pytest.mark.slow
def test_two_process_s_stage_and_cli_match_one_process(tmp_path):
    tok, samples, model = _fixtures()
    model_dir = tmp_path / "model"
    from helpers_training import tiny_base_model

    tiny_base_model(num_layers=3).save_pretrained(model_dir)  # the base of the fixtures' model
    tok.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in samples))
    del model

    two, stdout = _launch(tmp_path, model_dir, data)
    one = tmp_path / "one"
    one.mkdir()
    single = run_stage(str(one), str(model_dir), str(data))
    assert single["world_size"] == 1

    ids = [s["id"] for s in samples]
    for rank in (0, 1):  # every rank holds the gathered results, in sample order
        got = torch.load(two / f"stage-rank{rank}.pt", weights_only=False)
        assert got["world_size"] == 2
        # contiguous blocks: rank 0 the first three, rank 1 the last two
        assert [o[0] for o in got["owners"]] == [0, 0, 0, 1, 1]
        assert [i for o in got["owners"] for i in o[1]] == ids
        assert got["scores"]["ids"] == ids
        for key, value in single["scores"].items():  # loglikelihoods, greedy, pred, correct ... bitwise
            assert got["scores"][key] == value, key
        assert torch.equal(got["routing"], single["routing"])
        assert torch.equal(got["embeddings"], single["embeddings"])

    # routing blocks are whole capture batches: also bitwise the plain collect_routing over all samples
    from roma_peft.capture import collect_routing

    _, _, model = _fixtures()
    assert torch.equal(single["routing"], collect_routing(model, tok, samples, batch_size=BATCH, progress=False))

    # `roma-peft neighbours` on 2 processes writes the same files, bitwise
    for name in ("neighbourhood.safetensors", "neighbourhood.json", "base_scores.json"):
        assert (two / "nb" / name).read_bytes() == (one / "nb" / name).read_bytes(), name
    assert (two / "eval.json").read_bytes() == (one / "eval.json").read_bytes()
    # the main process alone prints (one summary, one metrics object) and writes
    assert stdout.count('"n_successful"') == 1 and stdout.count('"eval_accuracy_norm"') == 1, stdout[-2000:]
    evaluated = json.loads(stdout[stdout.rindex("{") :])
    assert evaluated["eval_samples"] == N_SAMPLES
    assert evaluated["eval_accuracy"] == pytest.approx(np.mean(single["scores"]["correct"]))


def test_block_bounds_and_single_process_run_sharded():
    from roma_peft.distributed import block_bounds, run_sharded

    assert block_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert block_bounds(0, 4) == []
    with pytest.raises(ValueError, match="block_size"):
        block_bounds(3, 0)
    assert run_sharded(lambda block: sum(block), list(range(10)), block_size=4) == [6, 22, 17]
    assert run_sharded(len, [], merge=lambda parts: parts) == [0]


if __name__ == "__main__":
    run_stage(sys.argv[1], sys.argv[2], sys.argv[3])
