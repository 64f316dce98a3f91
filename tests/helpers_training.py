"""Offline fixtures for the trainer tests: a word-level tokenizer, learnable MC samples, a tiny MoE, a neighbourhood
built with :func:`roma_peft.neighbours.build_neighbourhood`."""

from __future__ import annotations

import random

import torch
from helpers_scoring import WORDS, tiny_tokenizer  # noqa: F401  (re-exported)
from peft import get_peft_model

import roma_peft

TOPICS = {
    "colour": (["sky", "grass", "snow", "sun"], ["blue", "green", "white", "yellow"]),
    "animal": (["dog", "cat", "bird", "fish"], ["barks", "meows", "flies", "swims"]),
    "number": (["one", "two", "three", "four"], ["two", "three", "four", "five"]),
}


def train_samples(n: int = 24, seed: int = 0) -> list[dict]:
    """Multiple-choice samples from three skills; the answer is a fixed function of the question's key word."""
    rng = random.Random(seed)
    out = []
    names = sorted(TOPICS)
    for i in range(n):
        topic = names[i % 3]
        keys, answers = TOPICS[topic]
        j = rng.randrange(4)
        filler = " ".join(rng.choice(["the", "a", "of", "is", "what", "which"]) for _ in range(rng.randint(1, 3)))
        question = f"{filler} {keys[j]} ?"
        wrong = [a for a in answers if a != answers[j]]
        rng.shuffle(wrong)
        options = [answers[j]] + wrong[:2]
        rng.shuffle(options)
        out.append(
            {
                "id": f"{topic}-{i}",
                "question": question,
                "options": options,
                "label": options.index(answers[j]),
                "task": topic,
            }
        )
    return out


def tiny_base_model(num_layers: int = 4, seed: int = 0, vocab_size: int | None = None, router_std: float = 1.0, **cfg):
    """Tiny random OLMoE whose routers are scaled up (std ``router_std``) so that routing differs across prompts."""
    from helpers_models import make_tiny_olmoe

    vocab = vocab_size or len(tiny_tokenizer())
    base = make_tiny_olmoe(
        seed=seed, num_hidden_layers=num_layers, vocab_size=vocab, pad_token_id=0, bos_token_id=2, eos_token_id=3, **cfg
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in base.model.layers:
            layer.mlp.gate.weight.copy_(torch.randn(layer.mlp.gate.weight.shape, generator=gen) * router_std)
    return base


def tiny_peft_model(num_layers: int = 4, tuned: int = 2, seed: int = 0, **kwargs):
    return get_peft_model(tiny_base_model(num_layers, seed, **kwargs), roma_peft.RomaConfig(num_layers=tuned))


def build_test_neighbourhood(model, tokenizer, samples, k: int = 3, seed: int = 0, spec=None):
    """Neighbourhood over all samples of the same task (S = every even-numbered sample), Gaussian-ish weights."""
    from roma_peft.capture import RoutingRecorder, RoutingSpec, collect_routing
    from roma_peft.trainer import routing_spec_string

    spec = spec or RoutingSpec()
    recorder = RoutingRecorder(model, spec=spec)
    tag = routing_spec_string(spec, recorder.routers)
    recorder.remove()
    routing = collect_routing(model, tokenizer, samples, spec=spec, progress=False)
    correct = [i % 2 == 0 for i in range(len(samples))]
    gen = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(len(samples), 8, generator=gen)
    for i, s in enumerate(samples):  # same task -> close embeddings
        embeddings[i, ["colour", "animal", "number"].index(s["task"])] += 4.0
    from roma_peft.neighbours import NeighbourhoodConfig, build_neighbourhood

    return build_neighbourhood(
        samples,
        correct,
        embeddings.numpy(),
        NeighbourhoodConfig(k=k),
        routing=routing,
        routing_spec=tag,
        progress=False,
    )


def training_args(output_dir, **overrides):
    """RomaTrainingArguments for a few CPU steps on the tiny models (no reports, no saving unless asked)."""
    from roma_peft.trainer import RomaTrainingArguments

    base = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=5e-2,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
        optim="adamw_torch",
    )
    base.update(overrides)
    return RomaTrainingArguments(**base)


def saved_model_and_data(tmp_path, num_layers: int = 3, n: int = 24) -> list[str]:
    """A tiny base model + tokenizer saved as a local checkpoint and a JSONL training file, as a CLI user has them.

    Returns the common CLI flags ``--model_name_or_path DIR --train_file FILE``.
    """
    import json

    tok = tiny_tokenizer()
    model_dir = tmp_path / "model"
    tiny_base_model(num_layers=num_layers).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in train_samples(n)))
    return ["--model_name_or_path", str(model_dir), "--train_file", str(data)]


def tiny_training_setup(n: int = 24):
    """(tokenizer, samples, RoMA model, neighbourhood): what most trainer tests start from (module-scoped fixtures)."""
    tok = tiny_tokenizer()
    samples = train_samples(n)
    model = tiny_peft_model()
    return tok, samples, model, build_test_neighbourhood(model, tok, samples)


def fresh(setup):
    """Independent copies of a module fixture's model and neighbourhood (tests train them)."""
    import copy

    tok, samples, model, nb, *rest = setup
    return (tok, samples, copy.deepcopy(model), copy.deepcopy(nb), *rest)
