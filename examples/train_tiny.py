"""Worked example: RoMA on a tiny random OLMoE, end to end through the `roma-peft` CLI, offline, < 1 minute on CPU.

    python examples/train_tiny.py [workdir]

Steps (each is one CLI command; the Python API equivalents are in docs/training.md):
1. write a tiny model + word-level tokenizer + a 3-skill multiple-choice data set to `workdir`;
2. `roma-peft neighbours`: score the base model (S = samples it gets right), embed the questions
   (all-MiniLM-L6-v2, offline), build k=3 neighbourhoods among S, store the base routing targets;
3. `roma-peft train`: router post-training with the manifold regulariser (and the `self` control);
4. `roma-peft evaluate` and `roma-peft export-lora`.
The model is random, so accuracies are near chance; the point is the mechanics and the logged terms.
The test suite runs this script (tests/test_examples.py), so it cannot rot.
"""

import json
import os
import random
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

from roma_peft.cli import run as roma_peft  # returns the command's result (main() returns the exit status)

TOPICS = {
    "colour": (["sky", "grass", "snow", "sun"], ["blue", "green", "white", "yellow"]),
    "animal": (["dog", "cat", "bird", "fish"], ["barks", "meows", "flies", "swims"]),
    "number": (["one", "two", "three", "four"], ["two", "three", "four", "five"]),
}
FILLER = ["the", "a", "of", "is", "what", "which"]


def make_data(n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = sorted(TOPICS)[i % 3]
        keys, answers = TOPICS[topic]
        j = rng.randrange(4)
        options = [answers[j]] + rng.sample([a for a in answers if a != answers[j]], 2)
        rng.shuffle(options)
        question = " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 3))) + f" {keys[j]} ?"
        rows.append(
            {
                "id": f"{topic}-{seed}-{i}",
                "question": question,
                "options": options,
                "label": options.index(answers[j]),
                "task": topic,
            }
        )
    return rows


def write_model(path):
    words = sorted({w for k, a in TOPICS.values() for w in k + a} | set(FILLER))
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", ":", "?", "Question", "Answer"] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    torch.manual_seed(0)
    config = OlmoeConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        max_position_embeddings=64,
    )
    model = OlmoeForCausalLM(config)
    with torch.no_grad():  # a random model routes almost uniformly; sharper routers make the example informative
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(std=1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def run(workdir):
    model_dir, data_dir = os.path.join(workdir, "model"), os.path.join(workdir, "data")
    os.makedirs(data_dir, exist_ok=True)
    write_model(model_dir)
    for name, n, seed in (("train", 48, 0), ("test", 24, 1)):
        with open(os.path.join(data_dir, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in make_data(n, seed))
    common = ["--model_name_or_path", model_dir, "--train_file", os.path.join(data_dir, "train.jsonl")]
    nb_dir = os.path.join(workdir, "neighbours")
    # the layer selection is given once: `train` reads it (and the prompt/routing options) back from the neighbourhood
    roma_peft(["neighbours", *common, "--num_layers", "3", "--output_dir", nb_dir, "--k", "3"])
    results = {}
    for regularizer in ("manifold", "self", "none"):
        out = os.path.join(workdir, f"roma-{regularizer}")
        metrics = roma_peft(
            [
                "train",
                *common,
                "--neighbourhood_dir",
                nb_dir,
                "--output_dir",
                out,
                "--eval_file",
                os.path.join(data_dir, "test.jsonl"),
                "--regularizer",
                regularizer,
                "--per_device_train_batch_size",
                "8",
                "--learning_rate",
                "0.05",
                "--num_train_epochs",
                "3",
                "--logging_steps",
                "6",
                "--report_to",
                "none",
                "--save_strategy",
                "no",
                "--use_cpu",
                "true",
                "--seed",
                "0",
            ]
        )
        results[regularizer] = metrics["eval_accuracy"]
    roma_peft(
        [
            "evaluate",
            "--model_name_or_path",
            model_dir,
            "--adapter_path",
            os.path.join(workdir, "roma-manifold"),
            "--eval_file",
            os.path.join(data_dir, "test.jsonl"),
        ]
    )
    roma_peft(
        [
            "export-lora",
            "--model_name_or_path",
            model_dir,
            "--adapter_path",
            os.path.join(workdir, "roma-manifold"),
            "--output_dir",
            os.path.join(workdir, "lora"),
        ]
    )
    print("test accuracy by regulariser:", json.dumps(results))
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    if len(sys.argv) > 1:
        run(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(tmp)
