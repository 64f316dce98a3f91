import os

import numpy as np
import pytest
from helpers_scoring import (
    mc_samples,
    preferring_model,
    tiny_bpe_tokenizer,
    tiny_model,
    tiny_tokenizer,
    write_jsonl,
)

from roma_peft.data import format_prompt, option_continuation
from roma_peft.prompts import encode_pair
from roma_peft.scoring import ScoreResult, normalize_answer, score_generative, score_multiple_choice, successful_ids


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok))


def _lm_eval_reference(tmp_path, model, tok, samples, batch_size=5):
    """lm-eval's HFLM + simple_evaluate on a local JSONL task with our prompt format."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    write_jsonl(samples, tmp_path / "data.jsonl")
    (tmp_path / "roma_xcheck.yaml").write_text(
        "task: roma_xcheck\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{options}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["roma_xcheck"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        verbosity="ERROR",
    )
    return lm, out


def _assert_same_as_lm_eval(ours, out, samples):
    ref = out["results"]["roma_xcheck"]
    assert ours.acc == pytest.approx(ref["acc,none"], abs=1e-12)
    assert ours.acc_norm == pytest.approx(ref["acc_norm,none"], abs=1e-12)
    # per item: same prompts, same log-likelihoods, same per-item acc/acc_norm
    for rec in out["samples"]["roma_xcheck"]:
        i = rec["doc_id"]
        args = [tuple(a) for a in rec["arguments"]]
        assert args == [(format_prompt(samples[i]), option_continuation(o)) for o in samples[i]["options"]]
        ref_ll = [r[0][0] for r in rec["resps"]]
        np.testing.assert_allclose(ours.loglikelihoods[i], ref_ll, atol=1e-4, rtol=0)
        assert ours.greedy[i] == [bool(r[0][1]) for r in rec["resps"]]
        assert float(ours.correct[i]) == rec["acc"] and float(ours.correct_norm[i]) == rec["acc_norm"]
    assert 0 < ours.acc < 1  # a non-degenerate check: some right, some wrong


def test_matches_lm_eval_simple_evaluate(tmp_path, tok, model):
    """Reference no one here wrote: lm-eval's HFLM on a local JSONL task, same prompt format."""
    samples = mc_samples(24, seed=3)
    _, out = _lm_eval_reference(tmp_path, model, tok, samples)
    ours = score_multiple_choice(model, tok, samples, batch_size=7, progress=False)
    _assert_same_as_lm_eval(ours, out, samples)


def test_matches_lm_eval_with_byte_level_bpe(tmp_path):
    """Same cross-check with a byte-level BPE that merges the leading space into the option
    (" blue" -> "Ġblue"): a wrong split of the space between prompt and option changes the
    continuation tokens and therefore the log-likelihoods (the word-level test cannot see it)."""
    bpe = tiny_bpe_tokenizer()
    assert bpe.convert_ids_to_tokens(bpe(" blue")["input_ids"]) == ["\u0120blue"]  # the merge exists
    m = tiny_model(len(bpe), seed=1)
    samples = mc_samples(24, seed=5)
    lm, out = _lm_eval_reference(tmp_path, m, bpe, samples)
    # the token split itself equals lm-eval's, for every (prompt, option) and a trailing-space prompt
    for s in samples:
        for o in s["options"]:
            for ctx, cont in ((format_prompt(s), option_continuation(o)), (format_prompt(s) + " ", o)):
                assert encode_pair(bpe, ctx, cont) == tuple(lm._encode_pair(ctx, cont))
    ours = score_multiple_choice(m, bpe, samples, batch_size=7, progress=False)
    _assert_same_as_lm_eval(ours, out, samples)


def test_known_preference_is_not_a_constant_prediction(tok):
    """The model always predicts 'blue': it must pick 'blue' wherever it is, not option 0."""
    m = preferring_model(tok, "blue")
    samples = [
        {"id": "right_at_1", "question": "what colour ?", "options": ["red", "blue"], "label": 1},
        {"id": "right_at_2", "question": "sky ?", "options": ["green", "red", "blue"], "label": 2},
        {"id": "wrong", "question": "grass ?", "options": ["blue", "green"], "label": 1},
        {"id": "wrong_2", "question": "snow ?", "options": ["white", "blue", "red"], "label": 0},
    ]
    res = score_multiple_choice(m, tok, samples, batch_size=3, progress=False)
    assert res.pred == [1, 2, 0, 1]
    assert res.correct == [True, True, False, False]
    assert successful_ids(res) == ["right_at_1", "right_at_2"]
    assert res.acc == 0.5


def test_acc_norm_uses_characters():
    """'blue blue' has twice blue's log-lik but 9 vs 4 characters: acc and acc_norm disagree."""
    tok = tiny_tokenizer()
    m = preferring_model(tok, "blue")
    s = [{"question": "sky ?", "options": ["red", "blue blue"], "label": 1}]
    r = score_multiple_choice(m, tok, s, progress=False)
    ll = np.array(r.loglikelihoods[0])
    assert r.pred[0] == int(np.argmax(ll))
    assert r.pred_norm[0] == int(np.argmax(ll / np.array([3.0, 9.0])))


def test_batch_size_does_not_change_the_scores(tok, model):
    """Scoring one row at a time or 64 at once gives the same log-likelihoods."""
    s = mc_samples(10, seed=1)
    a = score_multiple_choice(model, tok, s, batch_size=1, progress=False)
    b = score_multiple_choice(model, tok, s, batch_size=64, progress=False)
    for x, y in zip(a.loglikelihoods, b.loglikelihoods):
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_peft_model_is_scored_as_its_function(tok, model):
    """A PeftModel (a fresh LoRA, B=0: the same function) is scored like its base model."""
    import copy

    from peft import LoraConfig, get_peft_model

    s = mc_samples(10, seed=1)
    a = score_multiple_choice(model, tok, s, batch_size=1, progress=False)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    c = score_multiple_choice(pm, tok, s, batch_size=4, progress=False)
    for x, y in zip(a.loglikelihoods, c.loglikelihoods):
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_encode_pair_moves_trailing_space(tok):
    """A trailing space of the prompt moves to the continuation (lm-eval's _encode_pair)."""
    ctx, cont = encode_pair(tok, "Question: sky ?\nAnswer: ", "blue")
    ctx2, cont2 = encode_pair(tok, "Question: sky ?\nAnswer:", " blue")
    assert (ctx, cont) == (ctx2, cont2) and cont == [tok.convert_tokens_to_ids("blue")]


@pytest.fixture
def saved_scores(tmp_path, tok, model):
    """(result, samples, path) of 6 scored samples saved as JSON."""
    s = mc_samples(6)
    r = score_multiple_choice(model, tok, s, progress=False)
    p = tmp_path / "preds.json"
    r.save(str(p))
    return r, s, p


def test_score_result_save_load_round_trip(saved_scores):
    """A saved ScoreResult loads back equal, with the same accuracy."""
    r, s, p = saved_scores
    r2 = ScoreResult.load(str(p), samples=s)
    assert r2 == r and r2.acc == r.acc


def test_score_result_for_other_data_is_refused(saved_scores):
    """Loading scores for samples whose label changed is refused as different data."""
    _, s, p = saved_scores
    s[0] = dict(s[0], label=(s[0]["label"] + 1) % len(s[0]["options"]))
    with pytest.raises(ValueError, match="different data"):
        ScoreResult.load(str(p), samples=s)


def test_successful_ids_refuses_an_unknown_metric(saved_scores):
    """successful_ids only knows acc and acc_norm."""
    with pytest.raises(ValueError, match="metric"):
        successful_ids(saved_scores[0], metric="f1")


@pytest.mark.parametrize(
    "samples, kwargs, message",
    [
        ([{"question": "q", "answer": "a"}], {}, "no options"),
        ([{"question": "q", "options": ["a", "b"], "label": 5}], {}, "out of range"),
        (mc_samples(2), {"batch_size": 0}, "batch_size"),
    ],
)
def test_scorer_refuses_bad_input(tok, model, samples, kwargs, message):
    """Samples without options, a label out of range or batch_size 0 are refused before scoring."""
    with pytest.raises(ValueError, match=message):
        score_multiple_choice(model, tok, samples, progress=False, **kwargs)


def test_normalize_answer():
    """SQuAD normalisation: lower case, no punctuation or articles, single spaces."""
    assert normalize_answer("  The Blue,  sky! ") == "blue sky"
    assert normalize_answer("An apple.") == "apple"


def test_generative_exact_match(tok):
    """Greedy generation is judged by normalised exact match against 'answer'."""
    m = preferring_model(tok, "blue")  # greedy output: "blue blue ..."
    samples = [
        {"id": "g1", "question": "sky ?", "answer": "The blue."},
        {"id": "g2", "question": "grass ?", "answer": "green"},
    ]
    r = score_generative(m, tok, samples, max_new_tokens=1, batch_size=2, progress=False)
    assert r.pred == ["blue", "blue"] and r.correct == [True, False]
    assert successful_ids(r) == ["g1"]


def test_generative_scoring_needs_an_answer(tok):
    """Samples without 'answer' are refused by the generative scorer."""
    with pytest.raises(ValueError, match="no 'answer'"):
        score_generative(
            preferring_model(tok, "blue"), tok, [{"question": "q", "options": ["a", "b"], "label": 0}], progress=False
        )
