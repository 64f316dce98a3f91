"""Training-step benchmark of RomaTrainer (not a test). Prints a table and writes JSON.

    python benchmarks/bench_training.py [--models tiny,olmoe100m] [--repeats N] [--out results.json]

Per model (random weights, 16 layers, RoMA on the last 5 MoE layers, 1 torch thread):
* forward: ``model(input_ids, attention_mask)`` under no_grad (full logits, as a user's inference forward);
* step[none] / step[manifold]: ``RomaTrainer.training_step`` (forward with routing capture, task CE, regulariser,
  backward) with ``regularizer="none"`` and ``"manifold"``;
* step[manifold+ckpt]: the same with non-reentrant activation checkpointing as RomaTrainer sets it up (the embedding
  ``enable_input_require_grads`` hook removed) and step[manifold+ckpt+input-grads] with the hook kept (stock
  Trainer/PEFT behaviour), which drags the backward through all 16 layers;
* memory: the peak resident memory of the step above the resident memory before it (Linux VmHWM after resetting it
  through /proc/self/clear_refs), and the bytes autograd saved for backward (saved_tensors_hooks).
Variants run interleaved (round robin) and each figure is the median over the repeats.

Targets (issue 5): step[manifold] <= 1.03 x step[none]; memory <= 1.05 x; step / forward <= 1.15 x (1 + 2 x 5/16).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

MODELS = {
    # name: (OlmoeConfig overrides, batch size, question words)
    "tiny": (
        dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4),
        8,
        24,
    ),
    "olmoe100m": (
        dict(vocab_size=32000, hidden_size=512, intermediate_size=256, num_attention_heads=8, num_key_value_heads=8),
        4,
        40,
    ),
}


def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class SavedBytes:
    def __init__(self):
        self.total = 0

    def __enter__(self):
        seen = set()

        def pack(t):
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                self.total += t.untyped_storage().nbytes()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def build(name):
    from peft import get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

    import roma_peft

    overrides, batch, words = MODELS[name]
    vocab_words = [f"w{i}" for i in range(overrides["vocab_size"] - 8)]
    vocab = {
        t: i for i, t in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", ":", "?", "Question", "Answer"] + vocab_words)
    }
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    config = OlmoeConfig(
        num_hidden_layers=16,
        num_experts=8,
        num_experts_per_tok=2,
        pad_token_id=0,
        eos_token_id=3,
        bos_token_id=2,
        max_position_embeddings=256,
        **overrides,
    )
    model = OlmoeForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, roma_peft.RomaConfig(num_layers=5))
    import random

    rng = random.Random(0)
    samples = [
        {
            "id": str(i),
            "question": " ".join(rng.choice(vocab_words) for _ in range(words)),
            "options": [rng.choice(vocab_words), rng.choice(vocab_words)],
            "label": 0,
        }
        for i in range(4 * batch)
    ]
    return model, tokenizer, samples, batch, n_params


def make_trainer(model, tok, samples, nb, batch, regularizer, ckpt, tmp):
    from roma_peft.trainer import RomaTrainer, RomaTrainingArguments

    args = RomaTrainingArguments(
        output_dir=tmp,
        per_device_train_batch_size=batch,
        regularizer=regularizer,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        activation_checkpointing=ckpt,
        logging_steps=10**6,
    )
    return RomaTrainer(model=model, args=args, train_dataset=samples, neighbourhood=nb, processing_class=tok)


def bench(name, repeats):
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from helpers_training import build_test_neighbourhood  # noqa: F401  (same helper as the tests)

    from roma_peft.capture import collect_routing
    from roma_peft.neighbours import NeighbourhoodConfig, build_neighbourhood
    from roma_peft.trainer import routing_spec_string

    model, tok, samples, batch, n_params = build(name)
    from roma_peft.capture import RoutingRecorder, RoutingSpec

    rec = RoutingRecorder(model)
    tag = routing_spec_string(RoutingSpec(), rec.routers)
    rec.remove()
    routing = collect_routing(model, tok, samples, progress=False)
    emb = torch.randn(len(samples), 16, generator=torch.Generator().manual_seed(0))
    nb = build_neighbourhood(
        samples,
        [i % 2 == 0 for i in range(len(samples))],
        emb.numpy(),
        NeighbourhoodConfig(k=3),
        routing=routing,
        routing_spec=tag,
        progress=False,
    )
    tmp = tempfile.mkdtemp()
    base = model.get_base_model()
    variants = {}
    for key, reg, ckpt in (
        ("none", "none", False),
        ("manifold", "manifold", False),
        ("manifold+ckpt", "manifold", True),
        ("manifold+ckpt+input-grads", "manifold", True),
    ):
        variants[key] = make_trainer(model, tok, samples, nb, batch, reg, ckpt, tmp)
        variants[key].current_gradient_accumulation_steps = 1  # normally set by the training loop
    collate = variants["none"].data_collator
    batches = [collate(samples[i * batch : (i + 1) * batch]) for i in range(4)]

    def set_mode(key):
        trainer = variants[key]
        if "ckpt" in key:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            if "input-grads" not in key:
                base.disable_input_require_grads()
        else:
            if getattr(base, "is_gradient_checkpointing", False):
                base.gradient_checkpointing_disable()
            if getattr(base, "_require_grads_hook", None) is not None:
                base.disable_input_require_grads()
        return trainer

    times = {k: [] for k in ["forward", *variants]}
    mem = {k: [] for k in variants}
    saved = {}
    can_peak = _reset_peak()
    for rep in range(repeats + 1):  # first round is warm-up
        for key in times:
            b = batches[rep % len(batches)]
            if key == "forward":
                set_mode("none")
                model.eval()
                t0 = time.perf_counter()
                with torch.no_grad():
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                dt = time.perf_counter() - t0
            else:
                trainer = set_mode(key)
                model.zero_grad(set_to_none=True)
                before = _rss_kb("VmRSS")
                _reset_peak()
                t0 = time.perf_counter()
                with SavedBytes() as sb:
                    trainer.training_step(model, dict(b))
                dt = time.perf_counter() - t0
                peak = _rss_kb("VmHWM") - before
                if rep:
                    mem[key].append(peak)
                    saved[key] = sb.total
            if rep:
                times[key].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": name,
        "params": n_params,
        "batch": batch,
        "seq_len": int(batches[0]["input_ids"].shape[1]),
        "repeats": repeats,
        "median_s": med,
        "peak_rss_delta_kb": {k: statistics.median(v) for k, v in mem.items()} if can_peak else None,
        "saved_for_backward_bytes": saved,
        "ratio_step_manifold_over_none": med["manifold"] / med["none"],
        "ratio_step_over_forward": med["manifold"] / med["forward"],
        "bound_step_over_forward": 1.15 * (1 + 2 * 5 / 16),
        "ratio_ckpt_input_grads_over_ckpt": med["manifold+ckpt+input-grads"] / med["manifold+ckpt"],
    }
    if can_peak:
        p = result["peak_rss_delta_kb"]
        result["ratio_peak_manifold_over_none"] = p["manifold"] / max(p["none"], 1)
    result["ratio_saved_manifold_over_none"] = saved["manifold"] / max(saved["none"], 1)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,olmoe100m")
    parser.add_argument("--repeats", type=int, default=0, help="default: 30 (tiny), 7 (olmoe100m)")
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for name in opts.models.split(","):
        repeats = opts.repeats or (30 if name == "tiny" else 7)
        r = bench(name, repeats)
        results.append(r)
        print(json.dumps(r, indent=1))
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(machine))
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
