"""A neighbourhood made under other conditions (template, tokenizer, truncation, base model, tuned layers) is refused.

S and the routing targets r_j belong to the prompt, the base model and the layer selection they were made with;
used under other ones, training would run and silently pull towards the routing of other tokens or another model.
"""

import json

import pytest
from helpers_scoring import tiny_bpe_tokenizer
from helpers_training import saved_model_and_data, tiny_peft_model, tiny_tokenizer, train_samples

from roma_peft.capture import RoutingRecorder, RoutingSpec, collect_routing
from roma_peft.conditions import ConditionsMismatchError, routing_conditions
from roma_peft.neighbours import NeighbourhoodConfig, build_neighbourhood
from roma_peft.prompts import PromptEncoding
from roma_peft.scoring import score_multiple_choice
from roma_peft.trainer import RomaTrainer, RomaTrainingArguments, routing_spec_string

CHAT = "<|user|>\n{question}\n<|assistant|>\n"


def _args(tmp_path, **kw):
    return RomaTrainingArguments(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        max_steps=1,
        per_device_train_batch_size=8,
        save_strategy="no",
        disable_tqdm=True,
        **kw,
    )


def _neighbourhood(model, tok, samples, template="Question: {question}\nAnswer:", max_length=None):
    """What `roma-peft neighbours` does: score S, capture r_j, record the conditions."""
    spec = RoutingSpec()
    recorder = RoutingRecorder(model, spec=spec)
    tag = routing_spec_string(spec, recorder.routers)
    recorder.remove()
    encoding = PromptEncoding.for_tokenizer(tok, template, max_length)
    with model.disable_adapter():
        scores = score_multiple_choice(model, tok, samples, template=template, progress=False)
        routing = collect_routing(model, tok, samples, spec=spec, encoding=encoding, progress=False)
    conditions = routing_conditions(model, tok, samples, encoding, routing_spec=tag, spec=spec)
    correct = [i % 2 == 0 for i in range(len(samples))] if not any(scores.correct) else scores
    import torch

    emb = torch.randn(len(samples), 4, generator=torch.Generator().manual_seed(0)).numpy()
    return build_neighbourhood(
        samples,
        correct,
        emb,
        NeighbourhoodConfig(k=2),
        routing=routing,
        routing_spec=tag,
        conditions=conditions,
        progress=False,
    )


@pytest.fixture(scope="module")
def built():
    tok = tiny_tokenizer()
    samples = train_samples(12)
    model = tiny_peft_model()
    return tok, samples, model, _neighbourhood(model, tok, samples)


def test_same_conditions_train(built, tmp_path):
    """A neighbourhood used under the conditions it was built with is accepted."""
    tok, samples, model, nb = built
    RomaTrainer(model=model, args=_args(tmp_path), train_dataset=samples, neighbourhood=nb, processing_class=tok)


def test_another_template_is_refused_naming_both(built, tmp_path):
    """Another prompt template is refused, naming the stored and the current one."""
    tok, samples, model, nb = built
    with pytest.raises(
        ConditionsMismatchError,
        match=r"template: 'Question: \{question\}\\nAnswer:' \(stored\) vs "
        r"'<\|user\|>",
    ):
        RomaTrainer(
            model=model,
            args=_args(tmp_path, prompt_template=CHAT),
            train_dataset=samples,
            neighbourhood=nb,
            processing_class=tok,
        )


def test_template_that_only_adds_trailing_whitespace_is_the_same_prompt_for_routing(built, tmp_path):
    """A template that only adds trailing whitespace keeps the prompt tokens, but S's scoring template is named."""
    # the prompt's tokens are the same (whitespace belongs to the answer), so r_j still fits; S was scored with the
    # other template, though, and that is named
    tok, samples, model, nb = built
    with pytest.raises(ConditionsMismatchError, match="S was scored with the template"):
        RomaTrainer(
            model=model,
            args=_args(tmp_path, prompt_template="Question: {question}\nAnswer: "),
            train_dataset=samples,
            neighbourhood=nb,
            processing_class=tok,
        )


def test_another_tokenizer_is_refused(tmp_path):
    """A tokenizer that tokenises the prompts differently is refused."""
    tok = tiny_tokenizer()
    bpe = tiny_bpe_tokenizer(vocab_size=len(tok))
    samples = train_samples(12)
    model = tiny_peft_model()
    nb = _neighbourhood(model, tok, samples)
    with pytest.raises(ConditionsMismatchError, match="tokenise differently"):
        RomaTrainer(model=model, args=_args(tmp_path), train_dataset=samples, neighbourhood=nb, processing_class=bpe)


def test_harmless_max_length_is_accepted(built, tmp_path):
    """A max_length that cuts no prompt is not a different condition."""
    tok, samples, model, nb = built
    RomaTrainer(
        model=model, args=_args(tmp_path, max_length=512), train_dataset=samples, neighbourhood=nb, processing_class=tok
    )


def test_max_length_that_cuts_prompts_is_refused(built, tmp_path):
    """A max_length that cuts prompts is refused naming both values."""
    tok, samples, model, nb = built
    tok.truncation_side = "left"
    try:
        with pytest.raises(ConditionsMismatchError, match="max_length: None \\(stored\\) vs 6 \\(now\\)"):
            RomaTrainer(
                model=model,
                args=_args(tmp_path, max_length=6),
                train_dataset=samples,
                neighbourhood=nb,
                processing_class=tok,
            )
    finally:
        tok.truncation_side = "right"


def test_another_base_model_is_refused(built, tmp_path):
    """A base model with other router weights (same shapes) is refused by its fingerprint."""
    tok, samples, _, nb = built
    other = tiny_peft_model(seed=5)  # same shapes, other router weights
    with pytest.raises(ConditionsMismatchError, match="base model differs: router weights fingerprint"):
        RomaTrainer(model=other, args=_args(tmp_path), train_dataset=samples, neighbourhood=nb, processing_class=tok)


def test_another_layer_selection_is_refused(built, tmp_path):
    """Targets captured on other tuned layers are refused."""
    tok, samples, _, nb = built
    wider = tiny_peft_model(tuned=3)
    with pytest.raises(ValueError, match="tuned routers|other routers|captured as"):
        RomaTrainer(model=wider, args=_args(tmp_path), train_dataset=samples, neighbourhood=nb, processing_class=tok)


def test_conditions_survive_save_and_load(built, tmp_path):
    """The recorded conditions are saved and loaded with the neighbourhood."""
    from roma_peft.neighbours import Neighbourhood

    tok, samples, model, nb = built
    nb.save(str(tmp_path / "nb"))
    loaded = Neighbourhood.load(str(tmp_path / "nb"), samples=samples)
    assert loaded.metadata["conditions"] == json.loads(json.dumps(nb.metadata["conditions"]))
    with pytest.raises(ConditionsMismatchError):
        RomaTrainer(
            model=model,
            args=_args(tmp_path, prompt_template=CHAT),
            train_dataset=samples,
            neighbourhood=loaded,
            processing_class=tok,
        )


def test_cli_train_reads_layers_and_prompt_back_from_the_neighbourhood(tmp_path):
    """`roma-peft train` reads the layers and prompt options recorded by `roma-peft neighbours`."""
    from roma_peft.cli import main, run

    common = saved_model_and_data(tmp_path, n=16)
    run(
        [
            "neighbours",
            *common,
            "--output_dir",
            str(tmp_path / "nb"),
            "--k",
            "2",
            "--num_layers",
            "2",
            "--prompt_template",
            CHAT,
            "--routing_position",
            "mean",
        ]
    )
    train = [
        "train",
        *common,
        "--neighbourhood_dir",
        str(tmp_path / "nb"),
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "8",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--use_cpu",
        "true",
    ]
    run([*train, "--output_dir", str(tmp_path / "out")])  # no layer, template or routing flags repeated
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["num_layers"] == 2 and len(config["resolved_routers"]) == 2
    # an explicit, different value is refused before the model loads, naming both values
    assert main([*train, "--output_dir", str(tmp_path / "other"), "--prompt_template", "Q: {question}\nA:"]) == 2
    with pytest.raises(ValueError, match=r"--routing_position 'last' \(the neighbourhood was built with 'mean'\)"):
        run([*train, "--output_dir", str(tmp_path / "other"), "--routing_position", "last"])
    assert not (tmp_path / "other").exists()


def test_router_fingerprint_identifies_the_base_checkpoint_with_or_without_a_merged_adapter():
    """The router fingerprint is the base checkpoint's, with or without an adapter, merged or not."""
    import torch
    from helpers_training import tiny_base_model

    from roma_peft.conditions import router_fingerprint

    stock = router_fingerprint(tiny_base_model())
    model = tiny_peft_model()
    for p in (p for n, p in model.named_parameters() if "roma_delta" in n):
        torch.nn.init.normal_(p, std=0.5)
    assert router_fingerprint(model) == stock  # the adapter's deltas are not the base model
    model.merge_adapter()
    assert router_fingerprint(model) == stock  # merged: the pre-merge weights still identify the checkpoint
    assert router_fingerprint(tiny_base_model(seed=5)) != stock
