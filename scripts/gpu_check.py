"""GPU check: the RoMA pipeline on tiny random MoE models, on an accelerator, in a few minutes.

    python scripts/gpu_check.py [--device cuda] [--dtype bfloat16] [--out gpu_check.json]

Anyone with a GPU runs this; it needs no download (tiny models built from transformers configs, a word-level
tokenizer built in memory, the packaged MiniLM embedder). For each family (OLMoE, Qwen3-MoE, Mixtral, DeepSeek-V3)
it checks, on ``--device`` in ``--dtype``:

* placement: every base weight on the device in the requested dtype, every RoMA delta on the device in float32;
* base scoring, routing capture (``collect_routing``) and embedding run on the device; S is non-empty;
* a few ``RomaTrainer`` steps (manifold regulariser, bf16 autocast when the dtype is bfloat16): the loss is finite,
  only router deltas change;
* merge exactness: ``merge_and_unload`` gives the same logits as the unmerged adapter (bitwise), zero overhead;
* save -> reload on a fresh stock model reproduces the logits (bitwise);
* memory: peak allocated memory of one router-only training step vs one plain forward of the same batch (CUDA only).

Exit status 0 when every check passes; the JSON lists each check and the measured numbers. ``--device cpu`` runs the
same checks on the CPU (the test suite does that, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

FAMILIES = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=64, num_experts=8, num_experts_per_tok=2)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            intermediate_size=64,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            decoder_sparse_step=1,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            intermediate_size=64,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            num_key_value_heads=4,
        ),
    ),
}
WORDS = (
    "sky grass snow sun blue green white yellow dog cat bird fish barks meows flies swims one two three four "
    "five the a of is what which"
).split()


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", ":", "?", "Question", "Answer"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def samples(n: int = 48) -> list[dict]:
    import random

    rng = random.Random(0)
    topics = {
        "colour": (["sky", "grass", "snow", "sun"], ["blue", "green", "white", "yellow"]),
        "animal": (["dog", "cat", "bird", "fish"], ["barks", "meows", "flies", "swims"]),
    }
    out = []
    for i in range(n):
        topic = sorted(topics)[i % 2]
        keys, answers = topics[topic]
        j = rng.randrange(4)
        options = [answers[j]] + [a for a in answers if a != answers[j]][:2]
        rng.shuffle(options)
        out.append(
            {
                "id": f"{topic}-{i}",
                "question": f"what {keys[j]} ?",
                "options": options,
                "label": options.index(answers[j]),
                "task": topic,
            }
        )
    return out


def build(family: str, vocab: int, device: str, dtype: torch.dtype, seed: int = 0):
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        **{"num_key_value_heads": 2, **extra},
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).to(device=device, dtype=dtype).eval()


def check_family(family: str, device: str, dtype: torch.dtype, workdir: str) -> dict:
    from peft import PeftModel, get_peft_model

    import roma_peft
    from roma_peft.capture import collect_routing
    from roma_peft.conditions import routing_conditions
    from roma_peft.embeddings import embed_samples
    from roma_peft.neighbours import NeighbourhoodConfig, build_neighbourhood
    from roma_peft.scoring import score_multiple_choice
    from roma_peft.trainer import RomaTrainer, RomaTrainingArguments, routing_spec_string

    result: dict = {"family": family, "checks": {}}
    checks = result["checks"]
    tok = tokenizer()
    data = samples()
    model = get_peft_model(build(family, len(tok), device, dtype), roma_peft.RomaConfig(num_layers=2))
    deltas = {n: p for n, p in model.named_parameters() if "roma_" in n}
    base = {n: p for n, p in model.named_parameters() if "roma_" not in n}
    checks["placement"] = (
        all(p.device.type == torch.device(device).type and p.dtype == dtype for p in base.values())
        and all(p.device.type == torch.device(device).type and p.dtype == torch.float32 for p in deltas.values())
        and len(deltas) > 0
    )

    args = RomaTrainingArguments(
        output_dir=os.path.join(workdir, family),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=5e-2,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        use_cpu=device == "cpu",
        bf16=dtype == torch.bfloat16 and device != "cpu",
        seed=0,
    )
    spec, encoding = args.routing_spec(), args.prompt_encoding(tok)
    start = time.perf_counter()
    with model.disable_adapter():
        scores = score_multiple_choice(model, tok, data, encoding=encoding, progress=False)
        routing = collect_routing(model, tok, data, spec=spec, encoding=encoding, progress=False)
    embeddings = embed_samples(data, progress=False)
    result["s_stage_seconds"] = round(time.perf_counter() - start, 3)
    correct = scores if sum(scores.correct) >= 4 else [i % 2 == 0 for i in range(len(data))]
    recorder_tag = routing_spec_string(spec, roma_peft.RoutingRecorder(model, spec=spec).routers)
    nb = build_neighbourhood(
        data,
        correct,
        embeddings,
        NeighbourhoodConfig(k=3),
        routing=routing,
        routing_spec=recorder_tag,
        progress=False,
        conditions=routing_conditions(model, tok, data, encoding, routing_spec=recorder_tag, spec=spec),
    )
    checks["scoring_and_capture_finite"] = bool(torch.isfinite(routing).all()) and routing.shape[0] == len(data)

    frozen = {n: p.detach().clone() for n, p in base.items()}
    before = {n: p.detach().clone() for n, p in deltas.items()}
    trainer = RomaTrainer(model=model, args=args, train_dataset=data, neighbourhood=nb, processing_class=tok)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    output = trainer.train()
    result["train_seconds"] = round(time.perf_counter() - start, 3)
    checks["training_finite"] = bool(torch.isfinite(torch.tensor(output.training_loss)))
    checks["only_deltas_changed"] = all(torch.equal(frozen[n], p) for n, p in base.items()) and any(
        not torch.equal(before[n], p) for n, p in deltas.items()
    )

    batch = trainer.data_collator(data[:8])
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids, attention_mask=mask).logits
    adapter_dir = os.path.join(workdir, f"{family}-adapter")
    model.save_pretrained(adapter_dir)
    fresh = PeftModel.from_pretrained(build(family, len(tok), device, dtype), adapter_dir).eval()
    with torch.no_grad():
        reloaded = fresh(input_ids=ids, attention_mask=mask).logits
        merged = fresh.merge_and_unload()(input_ids=ids, attention_mask=mask).logits
    checks["reload_bitwise"] = bool(torch.equal(unmerged, reloaded))
    checks["merge_bitwise"] = bool(torch.equal(unmerged, merged))

    if device.startswith("cuda"):
        model.train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        forward_peak = torch.cuda.max_memory_allocated() - start_mem
        torch.cuda.reset_peak_memory_stats()
        trainer.training_step(model, {k: v.to(device) for k, v in batch.items()})
        step_peak = torch.cuda.max_memory_allocated() - start_mem
        result["memory_bytes"] = {
            "forward": int(forward_peak),
            "router_only_step": int(step_peak),
            "ratio": round(step_peak / max(forward_peak, 1), 3),
        }
    result["ok"] = all(checks.values())
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device (torch {torch.__version__}).")
    unknown = [f for f in args.families.split(",") if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {sorted(FAMILIES)}")
    dtype = getattr(torch, args.dtype)
    report = {
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        "families": [],
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for family in args.families.split(","):
            try:
                entry = check_family(family, args.device, dtype, workdir)
            except Exception as exc:  # noqa: BLE001 - a check script reports every family, then fails
                entry = {"family": family, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            report["families"].append(entry)
            print(json.dumps(entry), flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["ok"] = all(f["ok"] for f in report["families"])
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(
        f"{'PASS' if report['ok'] else 'FAIL'}: {sum(f['ok'] for f in report['families'])}/"
        f"{len(report['families'])} families on {args.device} ({args.dtype}) in {report['seconds']} s -> {args.out}"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
