"""torchrun --nproc_per_node 2 (CPU, gloo) gives the same losses and router deltas as one process, same global batch.

The file is also the worker script: ``python -m torch.distributed.run ... tests/test_distributed.py OUT``.
"""

import json
import os
import sys

import pytest
import torch
from helpers_launch import run_two_processes

HERE = os.path.dirname(os.path.abspath(__file__))
GLOBAL_BATCH = 8
STEPS = 3


def run_training(out_dir: str, per_device: int) -> dict:
    sys.path.insert(0, HERE)
    from helpers_training import build_test_neighbourhood, tiny_peft_model, tiny_tokenizer, train_samples, training_args

    from roma_peft.trainer import RomaTrainer, roma_parameters

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    samples = train_samples(24)
    model = tiny_peft_model()
    nb = build_test_neighbourhood(model, tok, samples)  # every rank holds the full neighbourhood tables
    args = training_args(
        out_dir,
        per_device_train_batch_size=per_device,
        max_steps=STEPS,
        roma_lambda=5.0,
        use_cpu=False,  # under torchrun on a CPU machine RomaTrainingArguments joins the ranks with gloo by itself
        train_sampling_strategy="random",
    )
    trainer = RomaTrainer(model=model, args=args, train_dataset=samples, neighbourhood=nb, processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "world_size": args.world_size,
        "loss": [h["loss"] for h in logs],
        "manifold": [h["roma/manifold_loss"] for h in logs],
        "deltas": {k: v.detach().tolist() for k, v in roma_parameters(model).items()},
    }


def test_two_process_ddp_matches_single_process(tmp_path):
    out = tmp_path / "ddp.json"
    run_two_processes(__file__, out, tmp_path / "ddp", timeout=120)
    ddp = json.loads(out.read_text())
    single = run_training(str(tmp_path / "single"), GLOBAL_BATCH)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert len(ddp["loss"]) == STEPS
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert ddp["manifold"] == pytest.approx(single["manifold"], rel=1e-4)
    assert max(single["manifold"]) > 0
    for name, value in single["deltas"].items():
        assert torch.allclose(torch.tensor(ddp["deltas"][name]), torch.tensor(value), atol=1e-6), name


if __name__ == "__main__":
    result = run_training(sys.argv[2], GLOBAL_BATCH // int(os.environ.get("WORLD_SIZE", "1")))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
