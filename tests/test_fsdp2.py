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

DeepSpeed ZeRO-2 and ZeRO-3 (where deepspeed is installed) run through the same worker; ZeRO-3 partitions router
weights and deltas too (docs/distributed.md, "DeepSpeed": MoE blocks as leaf modules, their inputs requiring grad).

The file is also the worker script: ``python -m torch.distributed.run --nproc_per_node 2 tests/test_fsdp2.py OUT [MODE]``,
or ``... tests/test_fsdp2.py cli ARGV...`` for ``roma-peft ARGV...`` (``torchrun -m roma_peft.cli ARGV...``).
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
        training_args,
    )
    from transformers import TrainerCallback

    from roma_peft.trainer import RomaTrainer, roma_parameters

    torch.set_num_threads(1)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    chosen = _allow_fsdp_on_cpu() if distributed and extra.get("fsdp") else {}
    tok = tiny_tokenizer()
    samples = train_samples(24)
    model = tiny_peft_model()  # 4 MoE layers, the last 2 tuned: the tuned layers' inputs do not require grad
    nb = build_test_neighbourhood(model, tok, samples)
    trainer = RomaTrainer(
        model=model,
        args=training_args(
            out_dir,
            **{
                "per_device_train_batch_size": per_device,
                "max_steps": STEPS,
                "roma_lambda": 5.0,
                "ddp_backend": "gloo" if distributed else None,
                "train_sampling_strategy": "random",
                **extra,
            },
        ),
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
                    if hasattr(param, "ds_id"):  # ZeRO-3: the data is empty between steps, the shard is ds_tensor
                        local = param.ds_tensor
                    sharding[name] = [type(param).__name__, list(local.shape), list(param.shape)]

    trainer.add_callback(Probe())
    trainer.train()
    trainer.save_model(os.path.join(out_dir, "adapter"))
    evaluation = trainer.evaluate()  # every rank scores every eval sample (a sharded forward is collective)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    deltas = {}
    params = roma_parameters(trainer.model)
    nonfinite_probe = None
    if any(hasattr(p, "ds_id") for p in params.values()):  # ZeRO-3 partitions: gather them (a collective)
        import deepspeed

        from roma_peft.layer import nonfinite_routers

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            deltas = {name: value.detach().clone().tolist() for name, value in params.items()}
        # the finiteness check reads each rank's shard (the data is empty between steps): a NaN in this rank's shard
        # of a delta is found, a finite state is not blamed
        shard = next(iter(params.values())).ds_tensor
        kept = shard.detach().clone()
        nonfinite_probe = [nonfinite_routers(trainer.model)]
        with torch.no_grad():
            shard[0] = float("nan")
        nonfinite_probe.append(nonfinite_routers(trainer.model))
        with torch.no_grad():
            shard.copy_(kept)
    for name, value in params.items():
        if name not in deltas:
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
        "nonfinite_probe": nonfinite_probe,
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
    assert fsdp["sharding"] and all(
        kind == "DTensor" and shape == [4, 32] for kind, shape, _ in fsdp["sharding"].values()
    )
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


def test_zero3_unprepared_router_is_refused_with_a_clear_error():
    """DeepSpeed ZeRO-3 replaces every parameter by a partitioned one (``ds_id``, ``ds_status`` ...); substituting
    W + Δ for it in a router that ZeRO-3 hooks itself breaks the fetch hook (``'Tensor' object has no attribute
    'ds_status'``), so RomaLayer refuses a model that was not prepared (prepare_deepspeed_zero3 makes the MoE blocks
    leaf modules; RomaTrainer calls it). (Measured with deepspeed 0.19.8 on CPU: docs/distributed.md.)"""
    sys.path.insert(0, HERE)
    from helpers_training import tiny_peft_model

    from roma_peft.layer import RomaLayer

    model = tiny_peft_model()
    layer = next(m for m in model.modules() if isinstance(m, RomaLayer))
    layer.get_base_layer().weight.ds_id = 0  # what deepspeed.zero.Init / the ZeRO-3 engine attach
    with pytest.raises(NotImplementedError, match="ZeRO-3.*prepare_deepspeed_zero3"):
        model(input_ids=torch.tensor([[2, 5, 6]]))


def test_zero3_partitioned_router_refuses_to_merge():
    """Outside the forward a ZeRO-3 router weight's data is empty: merging into it would silently write nothing."""
    sys.path.insert(0, HERE)
    from helpers_training import tiny_peft_model

    from roma_peft.layer import RomaLayer

    model = tiny_peft_model()
    layer = next(m for m in model.modules() if isinstance(m, RomaLayer))
    weight = layer.get_base_layer().weight
    weight.ds_id, weight.ds_shape = 0, weight.shape  # what deepspeed.zero.Init / the ZeRO-3 engine attach
    weight.data = torch.empty(0)  # ... and the data between forwards
    with pytest.raises(RuntimeError, match="merge a RoMA adapter into a ZeRO-3 partitioned router"):
        layer.merge()
    assert not layer.merged


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


@pytest.mark.slow
def test_deepspeed_zero3_two_processes_match_single_process(tmp_path):
    """Only where deepspeed is installed (not a dependency): ZeRO-3 on CPU (DS_ACCELERATOR=cpu, gloo), every
    parameter partitioned. RomaTrainer prepares the model (roma_peft.zero3.prepare_deepspeed_zero3: MoE blocks as
    ZeRO-3 leaf modules, their inputs requiring grad); the manifold regulariser captures routing from the router's
    output, targets are recaptured at step 2 on the partitioned model, checkpoints at steps 2 and 3."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero3"
    out.mkdir()
    proc = run_two_processes(__file__, out, "zero3", timeout=300, DS_ACCELERATOR="cpu")
    assert "could not re-run the last batch" not in proc.stderr  # the save-time probe forward ran under ZeRO-3
    zero3 = json.loads((out / "result.json").read_text())
    single = run_training(str(tmp_path / "single"), GLOBAL_BATCH, ROMA)

    # ZeRO-3 really partitioned the router weights and the deltas: empty between steps, a 128-of-256 shard per rank
    assert zero3["wrapped"] == "DeepSpeedEngine" and zero3["world_size"] == 2
    assert len(zero3["sharding"]) == 4 and all(v == ["Parameter", [128], [0]] for v in zero3["sharding"].values())
    # the same training as one process on the whole batch (not bitwise, as under DDP / FSDP2)
    assert zero3["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert zero3["manifold"] == pytest.approx(single["manifold"], rel=1e-4)
    assert set(zero3["deltas"]) == set(single["deltas"]) and len(single["deltas"]) == 2
    for name, value in single["deltas"].items():
        expected, got = torch.tensor(value), torch.tensor(zero3["deltas"][name])
        assert expected.abs().min() > 0, f"{name}: a delta entry never moved in the single-process run"
        assert torch.allclose(got, expected, atol=1e-6, rtol=0), (name, (got - expected).abs().max())
    assert torch.allclose(torch.tensor(zero3["targets"]), torch.tensor(single["targets"]), atol=1e-6)
    assert zero3["eval_accuracy"] == single["eval_accuracy"]
    # the finiteness check before saves reads the shards: finite -> nothing, a NaN in a shard -> named
    clean, poisoned = zero3["nonfinite_probe"]
    assert clean == [] and len(poisoned) == 1 and "layers.2.mlp.gate" in poisoned[0][0], poisoned
    # the adapter and the last checkpoint hold exactly the (gathered) deltas, nothing else, and load on a stock model
    from helpers_training import tiny_base_model
    from peft import PeftModel
    from safetensors.torch import load_file

    assert (out / "checkpoint-2" / "trainer_state.json").exists()
    assert (out / "checkpoint-3" / "roma_targets.safetensors").exists()
    for folder in ("adapter", "checkpoint-3"):
        saved = load_file(str(out / folder / "adapter_model.safetensors"))
        assert set(saved) == {name.replace(".default", "") for name in zero3["deltas"]}, (folder, sorted(saved))
        for name, value in zero3["deltas"].items():
            assert torch.equal(saved[name.replace(".default", "")], torch.tensor(value)), (folder, name)
    loaded = PeftModel.from_pretrained(tiny_base_model(), str(out / "adapter"))
    for name, param in loaded.named_parameters():
        if "roma_delta" in name:
            assert torch.equal(param.detach(), torch.tensor(zero3["deltas"][name])), name


DEEPSPEED_ZERO3 = {
    "deepspeed": {
        "zero_optimization": {
            "stage": 3,
            # partition every parameter, however small (the default keeps tensors under 1e5 elements whole, so the
            # tiny model's routers and deltas would never be partitioned; real routers, e.g. 64 x 2048, are)
            "stage3_param_persistence_threshold": 0,
            # no stage3_gather_16bit_weights_on_model_save: for a PEFT model Trainer.save_model gathers the
            # trainable parameters (the deltas) itself
        },
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    },
    "save_strategy": "steps",
    "save_steps": 2,
    **ROMA,
}


def _cli_train(common: list, nb, out, per_device: int, *extra) -> list[str]:
    """``roma-peft train`` arguments of the CLI ZeRO-3 test: 3 steps of the manifold regulariser on a saved tiny model."""
    return [
        "train",
        *common,
        "--neighbourhood_dir",
        str(nb),
        "--output_dir",
        str(out),
        "--max_steps",
        str(STEPS),
        "--per_device_train_batch_size",
        str(per_device),
        "--learning_rate",
        "5e-2",
        "--roma_lambda",
        "5",
        "--seed",
        "0",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--routing_plot_samples",
        "8",  # the base-vs-tuned routing figures: forwards of the partitioned model after training
        *extra,
    ]


@pytest.mark.slow
def test_deepspeed_zero3_cli_two_processes_match_single_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m roma_peft.cli train ... --deepspeed ds_zero3.json`` on CPU (DS_ACCELERATOR=cpu),
    where deepspeed is installed: the TrainingArguments exist before the model loads, so transformers loads it under
    ``deepspeed.zero.Init`` (every weight partitioned, its data empty) and RoMA finds the routers, records their shapes
    (roma_peft.zero3.full_shape) and checks the neighbourhood's router fingerprint (gathered) on that model. The saved
    adapter holds only the router deltas, equal to the same command in one process without DeepSpeed, and loads on a
    stock model."""
    pytest.importorskip("deepspeed")
    from helpers_training import saved_model_and_data
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from roma_peft.cli import main

    common = saved_model_and_data(tmp_path, num_layers=3, n=16)
    nb = tmp_path / "nb"
    assert main(["neighbours", *common, "--output_dir", str(nb), "--k", "2", "--num_layers", "2"]) == 0
    config = tmp_path / "ds_zero3.json"
    config.write_text(json.dumps(DEEPSPEED_ZERO3["deepspeed"]))
    zero3, single = tmp_path / "zero3", tmp_path / "single"
    argv = _cli_train(common, nb, zero3, GLOBAL_BATCH // 2, "--deepspeed", str(config))
    proc = run_two_processes(__file__, "cli", *argv, timeout=300, DS_ACCELERATOR="cpu")
    assert main(_cli_train(common, nb, single, GLOBAL_BATCH, "--use_cpu", "true")) == 0

    # DeepSpeed ZeRO-3 trained on 2 ranks (its own checkpoint: one model/optimizer partition per rank); one summary
    assert sorted(p.name for p in (zero3 / "checkpoint-3" / "global_step3").glob("zero_pp_rank_*_model_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
    ]
    assert proc.stdout.count('"train_loss"') == 1, proc.stdout[-2000:]
    # the adapter: only the router deltas, as one process on the whole batch trains them (not bitwise, as DDP)
    adapter_config = json.loads((zero3 / "adapter_config.json").read_text())
    assert adapter_config == json.loads((single / "adapter_config.json").read_text())
    assert adapter_config["resolved_routers"] == {f"model.layers.{i}.mlp.gate": [8, 32] for i in (1, 2)}
    got, expected = load_file(zero3 / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert set(got) == set(expected) == {f"base_model.model.model.layers.{i}.mlp.gate.roma_delta" for i in (1, 2)}
    for name, value in expected.items():
        assert value.abs().min() > 0, f"{name}: a delta entry never moved in the single-process run"
        assert torch.allclose(got[name], value, atol=1e-6, rtol=0), (name, (got[name] - value).abs().max())
    logs = [json.loads((run / "trainer_state.json").read_text())["log_history"] for run in (zero3, single)]
    losses = [[h["loss"] for h in log if "loss" in h] for log in logs]
    assert len(losses[1]) == STEPS and losses[0] == pytest.approx(losses[1], rel=1e-5)
    stats = [json.loads((run / "routing_stats.json").read_text()) for run in (zero3, single)]
    assert json.dumps(stats[0]).count(".") > 10 and _close(stats[0], stats[1], 1e-6)
    # ... which a stock model loads with PEFT
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(common[1]), str(zero3))
    deltas = {n: p for n, p in loaded.named_parameters() if "roma_delta" in n}
    assert len(deltas) == 2
    for name, param in deltas.items():
        assert torch.equal(param.detach(), got[name.replace(".default", "")]), name


def _close(a, b, atol: float) -> bool:
    """``a`` and ``b`` (JSON values) equal, their floats within ``atol``."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], atol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, atol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= atol
    return a == b


if __name__ == "__main__":
    if sys.argv[1] == "cli":  # `roma-peft ARGV...`, as `torchrun -m roma_peft.cli ARGV...` runs it
        from roma_peft.cli import main

        raise SystemExit(main(sys.argv[2:]))
    mode = sys.argv[2] if len(sys.argv) > 2 else "fsdp2"
    extra = {"fsdp2": FSDP, "zero2": {**DEEPSPEED_ZERO2, "save_strategy": "no"}, "zero3": DEEPSPEED_ZERO3}[mode]
    result = run_training(sys.argv[1], GLOBAL_BATCH // int(os.environ.get("WORLD_SIZE", "1")), extra)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(sys.argv[1], "result.json"), "w") as f:
            json.dump(result, f)
