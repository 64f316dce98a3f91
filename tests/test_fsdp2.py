"""RomaTrainer under FSDP2 (the Trainer's own integration: ``fsdp=True``, ``fsdp_config={"version": 2}``), 2 CPU
processes with gloo: the same router deltas as one process, and the adapter/checkpoints it saves hold them whole.

accelerate 1.15 turns the Trainer's FSDP plugin on only for accelerators (MULTI_GPU, MULTI_XPU, NPU ...): on CPU its
``AcceleratorState`` keeps ``DistributedType.MULTI_CPU`` and the Trainer silently trains with DDP. So that the
FSDP2 path itself (accelerate's ``fsdp2_prepare_model`` -> ``torch.distributed.fsdp.fully_shard``, DTensor
parameters) runs here, the worker lifts that one gate (:func:`_allow_fsdp_on_cpu`); nothing else is patched. The
traps covered: router weight and deltas are DTensor shards outside the forward (RomaLayer substitutes ``W + Δ`` on
the unsharded weight inside the FSDP unit's forward, and capture reads the router's output); tuned layers whose
inputs do not require grad (frozen layers below, input-require-grads disabled with activation checkpointing) still
get their gradients reduced; the checkpoint-safety probe forward runs on every rank before a sharded save.

Not bitwise: under FSDP each rank backpropagates half the batch and the gradients are reduce-scattered (summed across
ranks), one process sums them in one backward; the float sums run in another order (measured: |Δ| <= 6e-7 on deltas
of size 0.1 after 3 steps, the same as DDP).

The file is also the worker script: ``python -m torch.distributed.run --nproc_per_node 2 tests/test_fsdp2.py OUT``.
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
ROMA = {"refresh_targets_steps": 2}  # r_j recaptured at step 2: collect_routing on the sharded model, on every rank
FSDP = {
    "fsdp": True,
    "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["OlmoeDecoderLayer"]},
    "gradient_checkpointing": True,
    "save_strategy": "steps",
    "save_steps": 2,
    **ROMA,
}


def _allow_fsdp_on_cpu() -> dict:
    """Let accelerate select FSDP for a CPU process group (it does for accelerators only); returns what it chose."""
    import accelerate.state as accelerate_state
    from accelerate.utils import DistributedType

    chosen = {}
    original = accelerate_state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        chosen.setdefault("distributed_type", str(self.distributed_type))
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            accelerate_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    accelerate_state.AcceleratorState.__init__ = init
    return chosen


def run_training(out_dir: str, per_device: int, extra: dict) -> dict:
    sys.path.insert(0, HERE)
    from helpers_training import (
        build_test_neighbourhood,
        tiny_peft_model,
        tiny_tokenizer,
        train_samples,
    )
    from transformers import TrainerCallback

    from roma_peft.trainer import RomaTrainer, RomaTrainingArguments, roma_parameters

    torch.set_num_threads(1)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    chosen = _allow_fsdp_on_cpu() if distributed and extra.get("fsdp") else {}
    tok = tiny_tokenizer()
    samples = train_samples(24)
    model = tiny_peft_model()  # 4 MoE layers, the last 2 tuned: the tuned layers' inputs do not require grad
    nb = build_test_neighbourhood(model, tok, samples)
    kwargs = dict(
        output_dir=out_dir,
        per_device_train_batch_size=per_device,
        max_steps=STEPS,
        learning_rate=5e-2,
        roma_lambda=5.0,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
        ddp_backend="gloo" if distributed else None,
        optim="adamw_torch",
        train_sampling_strategy="random",
    )
    kwargs.update(extra)
    trainer = RomaTrainer(
        model=model,
        args=RomaTrainingArguments(**kwargs),
        train_dataset=samples,
        neighbourhood=nb,
        eval_dataset=samples[:8],
        processing_class=tok,
    )
    sharding = {}

    class Probe(TrainerCallback):  # parameters as the optimizer sees them, between steps
        def on_step_end(self, args, state, control, **kw):
            for name, param in trainer.model.named_parameters():
                if "roma_delta" in name or "gate.base_layer.weight" in name:
                    local = param.to_local() if hasattr(param, "to_local") else param
                    sharding[name] = [type(param).__name__, list(local.shape)]

    trainer.add_callback(Probe())
    trainer.train()
    trainer.save_model(os.path.join(out_dir, "adapter"))
    evaluation = trainer.evaluate()  # every rank scores every eval sample (a sharded forward is collective)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    deltas = {}
    for name, value in roma_parameters(trainer.model).items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value  # a collective under FSDP
        deltas[name] = value.detach().tolist()
    return {
        "world_size": trainer.args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__,
        "accelerate_chose": chosen.get("distributed_type"),
        "sharding": sharding,
        "loss": [h["loss"] for h in logs],
        "eval_accuracy": evaluation["eval_accuracy"],
        "targets": trainer.neighbourhood.routing.tolist(),
        "manifold": [h["roma/manifold_loss"] for h in logs],
        "deltas": deltas,
    }


@pytest.mark.slow
def test_fsdp2_two_processes_match_single_process(tmp_path):
    if not hasattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard"):
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    out = tmp_path / "fsdp"
    out.mkdir()
    proc = run_two_processes(__file__, out)
    assert "could not re-run the last batch" not in proc.stderr  # the save-time probe forward ran under FSDP
    fsdp = json.loads((out / "result.json").read_text())
    single = run_training(str(tmp_path / "single"), GLOBAL_BATCH, ROMA)

    # FSDP2 really ran: the Trainer wrapped the model with fully_shard, router weights and deltas are DTensor shards
    assert fsdp["world_size"] == 2 and fsdp["wrapped"].startswith("FSDP"), fsdp["wrapped"]
    assert fsdp["accelerate_chose"] in ("DistributedType.MULTI_CPU", "DistributedType.FSDP")
    assert fsdp["sharding"] and all(kind == "DTensor" and shape == [4, 32] for kind, shape in fsdp["sharding"].values())
    # the same training as one process on the whole batch (not bitwise: see the module docstring)
    assert fsdp["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert fsdp["manifold"] == pytest.approx(single["manifold"], rel=1e-4)
    assert set(fsdp["deltas"]) == set(single["deltas"]) and len(single["deltas"]) == 2
    for name, value in single["deltas"].items():
        expected, got = torch.tensor(value), torch.tensor(fsdp["deltas"][name])
        assert expected.abs().min() > 0, f"{name}: a delta entry never moved in the single-process run"
        assert torch.allclose(got, expected, atol=1e-6, rtol=0), (name, (got - expected).abs().max())
    # the refreshed targets (captured on the sharded model at step 2) and the evaluation agree with one process
    assert torch.allclose(torch.tensor(fsdp["targets"]), torch.tensor(single["targets"]), atol=1e-6)
    assert fsdp["eval_accuracy"] == single["eval_accuracy"]
    # the adapter and the checkpoints written under FSDP hold the whole (gathered) deltas
    from safetensors.torch import load_file

    assert (out / "checkpoint-2" / "trainer_state.json").exists()
    assert (out / "checkpoint-3" / "roma_targets.safetensors").exists()  # the RoMA state a resume needs
    for folder in ("adapter", "checkpoint-3"):
        saved = load_file(str(out / folder / "adapter_model.safetensors"))
        for name, value in fsdp["deltas"].items():
            assert torch.equal(saved[name.replace(".default", "")], torch.tensor(value)), (folder, name)


def test_zero3_partitioned_router_is_refused_with_a_clear_error():
    """DeepSpeed ZeRO-3 replaces every parameter by a partitioned one (``ds_id``, ``ds_status`` ...); substituting
    W + Δ for it breaks ZeRO-3's fetch hooks (``'Tensor' object has no attribute 'ds_status'``), so RomaLayer refuses
    it, naming what works instead. (Measured with deepspeed 0.19.8 on CPU: docs/distributed.md.)"""
    sys.path.insert(0, HERE)
    from helpers_training import tiny_peft_model

    from roma_peft.layer import RomaLayer

    model = tiny_peft_model()
    layer = next(m for m in model.modules() if isinstance(m, RomaLayer))
    layer.get_base_layer().weight.ds_id = 0  # what deepspeed.zero.Init / the ZeRO-3 engine attach
    with pytest.raises(NotImplementedError, match="DeepSpeed ZeRO-3.*FSDP2"):
        model(input_ids=torch.tensor([[2, 5, 6]]))


DEEPSPEED_ZERO2 = {
    "deepspeed": {
        "zero_optimization": {"stage": 2},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
}


@pytest.mark.slow
def test_deepspeed_zero2_two_processes_match_single_process(tmp_path):
    """Only where deepspeed is installed (not a dependency): ZeRO-2 on CPU (DS_ACCELERATOR=cpu, gloo)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero2"
    out.mkdir()
    run_two_processes(__file__, out, "zero2", timeout=300, DS_ACCELERATOR="cpu")
    zero2 = json.loads((out / "result.json").read_text())
    single = run_training(str(tmp_path / "single"), GLOBAL_BATCH, {})
    assert zero2["wrapped"] == "DeepSpeedEngine"
    assert zero2["loss"] == pytest.approx(single["loss"], rel=1e-5)
    for name, value in single["deltas"].items():
        assert torch.allclose(torch.tensor(zero2["deltas"][name]), torch.tensor(value), atol=1e-6, rtol=0), name


if __name__ == "__main__":
    mode = sys.argv[2] if len(sys.argv) > 2 else "fsdp2"
    extra = {"fsdp2": FSDP, "zero2": {**DEEPSPEED_ZERO2, "save_strategy": "no"}}[mode]
    result = run_training(sys.argv[1], GLOBAL_BATCH // int(os.environ.get("WORLD_SIZE", "1")), extra)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(sys.argv[1], "result.json"), "w") as f:
            json.dump(result, f)
