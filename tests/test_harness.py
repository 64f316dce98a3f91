"""Evaluating base / RoMA adapter / merged / LoRA export on the paper's eight benchmarks, and the Table-1 report.

Runs offline on the shipped tiny model with local lm-eval stand-in tasks (``tests/fixtures/lm_eval_tasks``, pointed
at by ``helpers_harness.local_eval_kwargs``).
"""

import importlib.util
import json
import math
import sys

import pytest
import torch
from helpers_harness import local_eval_kwargs, local_loader, tiny_letters
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import roma_peft
from roma_peft.benchmark.suite import CUE_WORDS, shipped_model_path
from roma_peft.data import format_prompt
from roma_peft.harness import PAPER_BENCHMARKS, evaluate_benchmarks, evaluate_protocols, letter_samples, to_records
from roma_peft.recipe_data import load_benchmark
from roma_peft.results_table import table1_report, write_report
from roma_peft.scoring import score_multiple_choice

BASE = str(shipped_model_path())
MC = [b for b, spec in PAPER_BENCHMARKS.items() if spec.letter]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A RoMA adapter on every MoE layer with large random deltas (so that it changes predictions: on the shipped model
    the last layers' routing alone barely moves an answer, see docs/benchmarks.md)."""
    model = AutoModelForCausalLM.from_pretrained(BASE).eval()
    peft_model = get_peft_model(model, roma_peft.RomaConfig(num_layers=8, task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data.normal_(std=3.0)
    path = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def adapter_results(adapter_dir):
    return evaluate_protocols(BASE, adapter_path=adapter_dir, mode="adapter", verbose=False, **local_eval_kwargs())


@pytest.fixture(scope="module")
def adapted_model(adapter_dir):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), adapter_dir).eval()


def test_lm_eval_numbers_are_the_adapter_models(adapter_results, adapted_model):
    """lm-eval evaluated the adapted model: each multiple-choice number equals roma_peft's own log-likelihood scorer
    on the same rows and prompt (lm-eval's metric acc / acc_norm), for the adapted model loaded independently."""
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    results = adapter_results["lm_eval"]
    assert set(results) == set(PAPER_BENCHMARKS)
    for name in MC:
        rows = load_benchmark(name, local_loader)
        scored = score_multiple_choice(adapted_model, tokenizer, rows, progress=False)
        entry = results[name]
        expected = scored.acc if PAPER_BENCHMARKS[name].metric == "acc" else scored.acc_norm
        assert entry["n"] == len(rows), name
        assert entry["accuracy"] == pytest.approx(expected, abs=1e-12), name
        if name != "mmlu":  # a group's stderr is lm-eval's pooled one over its subtasks
            assert entry["stderr"] == pytest.approx(math.sqrt(expected * (1 - expected) / (len(rows) - 1))), name
    assert results["mmlu"]["n"] == 20  # the group's two subtasks
    assert results["gsm8k"]["metric"] == "exact_match,flexible-extract" and results["gsm8k"]["n"] == 10


def test_base_differs_from_adapter(adapter_results):
    base = evaluate_benchmarks(BASE, protocol="lm_eval", verbose=False, **local_eval_kwargs())
    assert set(base) == set(PAPER_BENCHMARKS)
    diffs = [b for b in MC if base[b]["all_metrics"] != adapter_results["lm_eval"][b]["all_metrics"]]
    assert diffs, "the adapter changed no benchmark's numbers"


@pytest.mark.parametrize("mode", ["merged", "lora"])
def test_exports_agree_with_adapter(mode, adapter_dir, adapter_results, tmp_path):
    """The merged checkpoint and the LoRA export, loaded by lm-eval's stock hf model, give the adapter's numbers."""
    got = evaluate_protocols(
        BASE,
        adapter_path=adapter_dir,
        mode=mode,
        export_dir=str(tmp_path / mode),
        dtype="fp32",
        verbose=False,
        **local_eval_kwargs(),
    )
    for protocol in ("lm_eval", "letter"):
        for name, entry in adapter_results[protocol].items():
            other = got[protocol][name]
            assert (other["accuracy"], other["n"]) == (entry["accuracy"], entry["n"]), (mode, protocol, name)
            for key, value in entry.get("all_metrics", {}).items():
                assert other["all_metrics"][key] == pytest.approx(value, abs=1e-9), (mode, name, key)
    files = sorted(p.name for p in (tmp_path / mode).iterdir())
    assert ("adapter_config.json" in files) == (mode == "lora") and ("config.json" in files) == (mode == "merged")


def test_letter_protocol_alone_needs_no_lm_eval(adapter_dir, adapter_results, monkeypatch):
    """protocol='letter' on the LoRA export, as on a machine without lm-eval: stock PEFT loads the export."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a)
    )
    for module in ("lm_eval", "lm_eval.models.huggingface", "lm_eval.tasks"):
        monkeypatch.setitem(sys.modules, module, None)  # any import of lm-eval now fails
    kwargs = local_eval_kwargs()
    kwargs.pop("include_path"), kwargs.pop("tasks")
    got = evaluate_benchmarks(
        BASE, ["boolq", "gsm8k"], adapter_path=adapter_dir, mode="lora", protocol="letter", verbose=False, **kwargs
    )
    assert got == {b: adapter_results["letter"][b] for b in ("boolq", "gsm8k")}


def test_letter_protocol_equals_a_direct_forward(adapter_results, adapted_model):
    """Letter protocol = argmax over the letter tokens' log-probabilities after the listed options, computed here by
    hand (one forward per question, no roma_peft scoring code)."""
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    letters = tiny_letters()
    letter_ids = [tokenizer.convert_tokens_to_ids(x) for x in letters]
    for name in MC:
        rows = load_benchmark(name, local_loader)
        correct = 0
        for row in rows:
            listed = "\n".join(f"{letters[j]}. {o}" for j, o in enumerate(row["options"]))
            ids = tokenizer(f"Question: {row['question']}\n{listed}\nAnswer:", return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(adapted_model(input_ids=ids).logits[0, -1].double(), -1)
            scores = logp[letter_ids[: len(row["options"])]]
            correct += int(scores.argmax()) == row["label"]
        entry = adapter_results["letter"][name]
        assert (entry["accuracy"], entry["n"], entry["metric"]) == (correct / len(rows), len(rows), "acc"), name
    sample = {"id": "x", "question": "what color is the sky ?", "options": ["blue", "red"], "label": 0}
    assert format_prompt(letter_samples([sample])[0]) == "Question: what color is the sky ?\nA. blue\nB. red\nAnswer:"
    assert letter_samples([sample])[0]["options"] == ["A", "B"]
    gsm8k = adapter_results["letter"]["gsm8k"]
    assert gsm8k["accuracy"] is None and gsm8k["metric"] == "—"


def test_limit_takes_the_first_rows_per_subtask():
    got = evaluate_protocols(BASE, ["mmlu", "boolq"], limit=3, verbose=False, **local_eval_kwargs())
    assert got["lm_eval"]["mmlu"]["n"] == got["letter"]["mmlu"]["n"] == 6  # 3 per subject, as lm-eval
    assert got["lm_eval"]["boolq"]["n"] == got["letter"]["boolq"]["n"] == 3


# ------------------------------------------------------------------------------------------------- report
def _records():
    recs = []
    for seed, accs in enumerate([(0.5, 0.8, 0.3), (0.6, 0.8, 0.4), (0.7, 0.8, 0.2)]):
        for bench, acc in zip(("mmlu", "boolq", "gsm8k"), accs):
            recs.append(
                {
                    "variant": "roma",
                    "seed": seed,
                    "benchmark": bench,
                    "protocol": "lm_eval",
                    "accuracy": acc,
                    "stderr": 0.05,
                    "n": 100,
                }
            )
    for bench, acc in zip(("mmlu", "boolq", "gsm8k"), (0.5, 0.7, 0.3)):
        recs.append(
            {
                "variant": "base",
                "seed": 0,
                "benchmark": bench,
                "protocol": "lm_eval",
                "accuracy": acc,
                "stderr": 0.05,
                "n": 100,
            }
        )
    results = {
        "letter": {
            "mmlu": {"accuracy": 0.25, "stderr": 0.04, "n": 100, "metric": "acc"},
            "gsm8k": {"accuracy": None, "stderr": None, "n": 0, "metric": "—"},
        }
    }
    return recs + to_records(results, variant="base", seed=0)


def test_report_layout_and_intervals(tmp_path):
    text = table1_report(_records(), paper_model="olmoe")
    lines = text.splitlines()
    lm_eval_header = next(line for line in lines if line.startswith("| variant"))
    assert lm_eval_header == "| variant | seeds | MMLU | BoolQ | GSM8K | avg |"  # paper column order, then avg
    base_row, roma_row = [line for line in lines if line.startswith(("| base |", "| roma |"))][:2]
    # one seed: ± 1.96 * stderr; avg = mean of (50, 70, 30) with stderr sqrt(3 * 0.05^2) / 3
    assert (
        base_row == f"| base | 1 | 50.0 ± 9.8 | 70.0 ± 9.8 | 30.0 ± 9.8 | 50.0 ± {196 * math.sqrt(3) * 0.05 / 3:.1f} |"
    )
    # three seeds: t(0.975, 2) = 4.302653 times sd / sqrt(3); MMLU sd = 0.1, BoolQ sd = 0; per-seed averages
    # (0.5333, 0.6, 0.5667) -> mean 0.5667, sd 0.03333
    t = 4.302653
    assert roma_row == (
        f"| roma | 3 | 60.0 ± {100 * t * 0.1 / math.sqrt(3):.1f} | 80.0 ± 0.0 | "
        f"30.0 ± {100 * t * 0.1 / math.sqrt(3):.1f} | 56.7 ± {100 * t * (0.1 / 3) / math.sqrt(3):.1f} |"
    )
    letter = text[text.index("letter protocol") :]
    assert "| variant | seeds | MMLU | GSM8K | avg (1 benchmarks) |" in letter
    assert "| base | 1 | 25.0 ± 7.8 | — | 25.0 ± 7.8 |" in letter
    assert "| RoMA | 69.0 | 86.7 | 67.2 | 88.0 | 85.8 | 81.8 | 81.7 | 49.4 |" in text  # the paper's OLMoE row
    paths = write_report(_records(), str(tmp_path), paper_model="olmoe")
    assert open(paths["report"]).read() == text
    assert len(json.load(open(paths["results"]))["records"]) == len(_records())


def test_report_refuses_duplicates_and_unknown_paper_model():
    recs = _records()
    with pytest.raises(ValueError, match="two records for variant 'roma', seed 0"):
        table1_report(recs + [recs[0]])
    with pytest.raises(ValueError, match="paper_model must be one of"):
        table1_report(recs, paper_model="mixtral")


# ------------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the errors below must come first."""
    import roma_peft.loading

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(roma_peft.loading, "load_model_and_tokenizer", boom)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)


def test_bad_inputs_are_refused_before_loading(no_loading, adapter_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown benchmark\(s\) \['mmlu_pro'\]; the paper's eight are: mmlu, "):
        evaluate_benchmarks(BASE, ["mmlu_pro"])
    with pytest.raises(ValueError, match="unknown mode 'gguf'"):
        evaluate_benchmarks(BASE, ["boolq"], adapter_path=adapter_dir, mode="gguf")
    with pytest.raises(ValueError, match="unknown protocol 'cloze'"):
        evaluate_benchmarks(BASE, ["boolq"], protocol="cloze")
    with pytest.raises(ValueError, match="mode='merged' exports an adapter but adapter_path is None"):
        evaluate_benchmarks(BASE, ["boolq"], mode="merged")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_benchmarks(BASE, ["boolq"], adapter_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        evaluate_benchmarks(BASE, ["boolq"], adapter_path=str(tmp_path))
    with pytest.raises(ValueError, match="tasks override for unknown benchmark 'piqa2'"):
        evaluate_benchmarks(BASE, ["boolq"], tasks={"piqa2": "tiny_piqa"})
    with pytest.raises(ValueError, match=r"loading_kwargs \['load_in_3bit'\] are not options"):
        evaluate_benchmarks(BASE, ["boolq"], loading_kwargs={"load_in_3bit": True})
    with pytest.raises(ValueError, match="apply to mode='adapter' only"):
        evaluate_benchmarks(
            BASE, ["boolq"], adapter_path=adapter_dir, mode="lora", loading_kwargs={"load_in_8bit": True}
        )
    with pytest.raises(ValueError, match="dtype 'int4' is not supported"):
        evaluate_benchmarks(BASE, ["boolq"], dtype="int4")
    with pytest.raises(ValueError, match="limit must be None"):
        evaluate_benchmarks(BASE, ["boolq"], limit=0)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install 'roma-peft\[eval\]'"):
        evaluate_benchmarks(BASE, ["boolq"])


# The user turn is preceded by six jargon words of the miniature's `color` skill, so that wrapping moves the tiny
# model's letter answers enough to change accuracy (checked: arc_challenge 0.6 vs 0.3 plain, mmlu 0.35 vs 0.3).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }} . {% endif %}"
    "{% if m['role'] == 'user' %}" + " ".join(CUE_WORDS["color"][:6]) + " . {{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} answer :{% endif %}"
)


def test_chat_template_is_refused_before_loading_for_a_tokenizer_without_one(monkeypatch):
    """use_chat_template on a tokenizer with no chat template is refused before any model loads."""
    import roma_peft.harness as harness

    monkeypatch.setattr(harness, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match="has no chat template"):
        evaluate_protocols(BASE, ["boolq"], use_chat_template=True, verbose=False, **local_eval_kwargs())
    with pytest.raises(ValueError, match="system_prompt"):
        evaluate_protocols(BASE, ["boolq"], system_prompt="be brief", verbose=False, **local_eval_kwargs())


def test_chat_template_wraps_both_protocols_as_training_does(tmp_path):
    """With use_chat_template, the letter protocol scores the chat-wrapped prompts the trainer and S use, and lm-eval
    evaluates with its apply_chat_template."""
    from roma_peft.prompts import PromptEncoding

    benches = ("arc_challenge", "mmlu")

    model_dir = tmp_path / "chat-model"
    AutoModelForCausalLM.from_pretrained(BASE).save_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    got = evaluate_protocols(str(model_dir), benches, use_chat_template=True, verbose=False, **local_eval_kwargs())
    plain = evaluate_protocols(str(model_dir), benches, verbose=False, **local_eval_kwargs())
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    encoding = PromptEncoding(chat_template=True)
    for name in benches:
        rows = letter_samples(load_benchmark(name, local_loader), tiny_letters())
        expected = score_multiple_choice(model, tokenizer, rows, encoding=encoding, progress=False).acc
        assert got["letter"][name]["accuracy"] == pytest.approx(expected, abs=1e-12), name
        assert got["lm_eval"][name]["n"] == plain["lm_eval"][name]["n"]
    # on these two stand-ins the chat-wrapped letter prompts give other accuracies than the plain ones (checked), so
    # the equality above can tell an unwrapped letter protocol apart
    assert all(got["letter"][b]["accuracy"] != plain["letter"][b]["accuracy"] for b in benches)
    changed = [
        (p, b)
        for p in ("lm_eval", "letter")
        for b in benches
        if got[p][b]["all_metrics" if p == "lm_eval" else "accuracy"]
        != plain[p][b]["all_metrics" if p == "lm_eval" else "accuracy"]
    ]
    assert changed, "the chat template changed no number: it was not applied"
