"""r_i and r_j are read at the same token: scoring, the training collator and routing capture share one prompt.

A user builds routing targets with ``collect_routing`` (what ``roma-peft neighbours`` does), then trains with the
``self`` control, which pulls each sample's live routing towards its own stored routing. With zero deltas at step 0
the two are the same vector, so the regulariser must be exactly 0 -- for templates that end in whitespace (chat
templates do), with a byte-level BPE tokenizer (where the whitespace is a token of its own), and with left truncation.
"""

import pytest
import torch
from helpers_scoring import tiny_bpe_tokenizer
from helpers_training import tiny_peft_model, train_samples

from roma_peft.capture import RoutingRecorder, RoutingSpec, collect_routing
from roma_peft.collator import RomaDataCollator
from roma_peft.neighbours import NeighbourhoodConfig, build_neighbourhood
from roma_peft.prompts import PromptEncoding, PromptTruncatedError, encode_samples
from roma_peft.scoring import build_requests
from roma_peft.trainer import RomaTrainer, RomaTrainingArguments, routing_spec_string

TEMPLATES = [
    "Question: {question}\nAnswer:",
    "Question: {question}\nAnswer: ",
    "Question: {question}\nAnswer:\n",
    "<|user|>\n{question}\n<|assistant|>\n",
]


def _neighbourhood(model, tok, samples, encoding):
    spec = RoutingSpec()
    recorder = RoutingRecorder(model, spec=spec)
    tag = routing_spec_string(spec, recorder.routers)
    recorder.remove()
    routing = collect_routing(model, tok, samples, spec=spec, encoding=encoding, progress=False, batch_size=5)
    embeddings = torch.randn(len(samples), 4, generator=torch.Generator().manual_seed(0)).numpy()
    correct = [i % 2 == 0 for i in range(len(samples))]
    return build_neighbourhood(
        samples, correct, embeddings, NeighbourhoodConfig(k=2), routing=routing, routing_spec=tag, progress=False
    )


def _self_loss_at_step_zero(tmp_path, template, truncation_side="right", tok=None, **training_args):
    """The `self` regulariser logged at step 0 (zero deltas), targets captured as `roma-peft neighbours` does."""
    tok = tok or tiny_bpe_tokenizer()
    tok.truncation_side = truncation_side
    samples = train_samples(12)
    model = tiny_peft_model(vocab_size=len(tok))
    args = RomaTrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=12,
        max_steps=1,
        learning_rate=0.0,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        regularizer="self",
        prompt_template=template,
        train_sampling_strategy="sequential",
        **training_args,
    )
    nb = _neighbourhood(model, tok, samples, args.prompt_encoding(tok))
    trainer = RomaTrainer(model=model, args=args, train_dataset=samples, neighbourhood=nb, processing_class=tok)
    trainer.train()
    logged = [row["roma/self_loss"] for row in trainer.state.log_history if "roma/self_loss" in row]
    return logged[0]


@pytest.mark.parametrize("template", TEMPLATES)
def test_self_regulariser_is_zero_at_step_zero_whatever_the_template_ends_with(tmp_path, template):
    """r_i and r_j are read at the same token whatever the template ends with: self is 0 at step 0."""
    # before the fix: 0 for "...Answer:", 2.6-3.7 (of at most 4) for templates ending in " " or "\n"
    assert _self_loss_at_step_zero(tmp_path, template) < 1e-10


@pytest.mark.parametrize("loss_type", ["causal_lm", "multiple_choice"])
def test_left_truncation_does_not_move_r_i_away_from_r_j(tmp_path, loss_type):
    """Left truncation cuts capture and training prompts alike: self is 0 at step 0."""
    tok = tiny_bpe_tokenizer()
    tok.truncation_side = "left"
    lengths = [len(e.prompt) for e in encode_samples(tok, train_samples(12), PromptEncoding(TEMPLATES[1]))]
    max_length = min(lengths) + 1  # every prompt loses its beginning
    loss = _self_loss_at_step_zero(
        tmp_path, TEMPLATES[1], max_length=max_length, truncation_side="left", loss_type=loss_type
    )
    assert loss < 1e-10


def test_scorer_collator_and_capture_use_the_same_prompt_tokens():
    """Scorer, collator and routing capture see the same prompt tokens for every template."""
    tok = tiny_bpe_tokenizer()
    samples = train_samples(6)
    for template in TEMPLATES:
        encoding = PromptEncoding(template)
        prompts = [e.prompt for e in encode_samples(tok, samples, encoding)]
        assert all(tok.decode(p) == tok.decode(p).rstrip() for p in prompts)  # whitespace went to the answer
        scored = {}
        for i, _, ctx, _ in build_requests(tok, samples, template):
            scored.setdefault(i, ctx)
        assert [scored[i] for i in range(len(samples))] == prompts
        for loss_type in ("causal_lm", "multiple_choice"):
            batch = RomaDataCollator(tok, encoding=encoding, loss_type=loss_type)(samples)
            owner = batch.get("option_sample", torch.arange(len(samples)))
            for row, sample in enumerate(owner.tolist()):
                last = int(batch["prompt_last_index"][row])
                assert batch["input_ids"][row, : last + 1].tolist() == prompts[sample]


def test_every_row_of_a_truncated_sample_keeps_the_same_prompt():
    """Every option row of a truncated sample keeps one prompt, the end of the full one."""
    tok = tiny_bpe_tokenizer()
    tok.truncation_side = "left"
    sample = dict(train_samples(1)[0], options=["blue", "green white red", "sun"], label=0)
    full = encode_samples(tok, [sample], PromptEncoding())[0]
    max_length = len(full.prompt) + 1
    batch = RomaDataCollator(tok, max_length=max_length, loss_type="multiple_choice")([sample])
    prompts = {tuple(batch["input_ids"][r, : int(batch["prompt_last_index"][r]) + 1].tolist()) for r in range(3)}
    assert len(prompts) == 1
    (prompt,) = prompts
    assert list(prompt) == full.prompt[-len(prompt) :]  # the end of the prompt is kept
    with pytest.raises(PromptTruncatedError, match="whole prompt"):
        encode_samples(tok, [sample], PromptEncoding(max_length=len(full.continuations[1])))


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_wraps_every_prompt_the_same_way(tmp_path):
    """With the chat template, every prompt is the rendered system + user turn (final newline to the answer), as scored."""
    tok = tiny_bpe_tokenizer()
    tok.chat_template = CHATML
    samples = train_samples(4)
    encoding = PromptEncoding("{question}", chat_template=True, system_prompt="Be brief.")
    prompts = [tok.decode(e.prompt) for e in encode_samples(tok, samples, encoding)]
    expected = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": samples[0]["question"]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompts[0] == expected.rstrip()  # the final "\n" belongs to the answer, as in lm-eval
    scored = [ctx for i, j, ctx, _ in build_requests(tok, samples, encoding=encoding) if j == 0]
    assert [tok.decode(c) for c in scored] == prompts


def test_chat_template_training_reads_r_i_where_the_targets_were_read(tmp_path):
    """With the chat template, training reads r_i at the targets' token: self is 0 at step 0."""
    tok = tiny_bpe_tokenizer()
    tok.chat_template = CHATML
    assert _self_loss_at_step_zero(tmp_path, "{question}", tok=tok, use_chat_template=True) < 1e-10


def test_chat_template_without_one_in_the_tokenizer_is_refused_clearly():
    """use_chat_template with a tokenizer that has none is refused before model work."""
    tok = tiny_bpe_tokenizer()
    with pytest.raises(ValueError, match="has no chat template"):
        encode_samples(tok, train_samples(2), PromptEncoding("{question}", chat_template=True))
    with pytest.raises(ValueError, match="only used with the chat template"):
        PromptEncoding(system_prompt="hi")


def test_a_prompt_that_already_starts_with_bos_gets_no_second_one():
    """A prompt that starts with the BOS text (chat templates) gets no second BOS."""
    from tokenizers.processors import TemplateProcessing

    tok = tiny_bpe_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", tok.bos_token_id)])
    sample = train_samples(1)[0]
    plain = encode_samples(tok, [sample], PromptEncoding("{question}"))[0].prompt
    chat_like = encode_samples(tok, [sample], PromptEncoding("[BOS]{question}"))[0].prompt
    assert plain[0] == tok.bos_token_id and plain[1] != tok.bos_token_id
    assert chat_like == plain  # lm-eval's rule: the text's own BOS, none added
