"""Routing capture (roma_peft.capture): positions, padding, prompt+answer rows, representations, checkpointing, hooks."""

import pytest
import torch
from helpers_models import make_tiny_olmoe
from peft import get_peft_model

import roma_peft
from roma_peft.capture import RoutingRecorder, RoutingSpec

T = 8
# Row 0: right padding, real tokens 0..5. Row 1: left padding, real tokens 3..7.
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]])
# Expected positions, written out by hand.
POSITIONS = {
    ("last", 1): ([5], [7]),
    ("last", 3): ([3, 4, 5], [5, 6, 7]),
    ("first", 2): ([0, 1], [3, 4]),
    ("middle", 1): ([2], [5]),
    ("middle", 3): ([1, 2, 3], [4, 5, 6]),
    ("mean", 1): ([0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7]),
}
# Prompt + answer rows: the prompt ends at 3 (row 0) and 5 (row 1); the rest of the real tokens are the answer.
PROMPT_LAST = torch.tensor([3, 5])
PROMPT_POSITIONS = {
    ("last", 1): ([3], [5]),
    ("last", 2): ([2, 3], [4, 5]),
    ("first", 1): ([0], [3]),
    ("mean", 1): ([0, 1, 2, 3], [3, 4, 5]),
}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = get_peft_model(make_tiny_olmoe(), roma_peft.RomaConfig(num_layers=2))
    torch.manual_seed(4)
    for param in model.parameters():
        if param.requires_grad:
            param.data.normal_(std=0.5)
    ids = torch.randint(3, 128, (2, T))
    # Reference: the router outputs, captured by hand with plain forward hooks on the tuned routers.
    outputs = {}
    routers = [r for r in roma_peft.find_routers(model) if r.name in model.peft_config["default"].resolved_routers]
    handles = [
        r.module.register_forward_hook(
            lambda mod, args, out, i=i: outputs.__setitem__(i, tuple(o.detach() for o in out))
        )
        for i, r in enumerate(routers)
    ]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=MASK)
    for h in handles:
        h.remove()
    return model, ids, [outputs[i] for i in range(len(routers))]


def expected(per_router, rows_positions, transform):
    blocks = []
    for logits, *_ in per_router:
        per_token = transform(logits.view(2, T, -1))
        blocks.append(torch.stack([per_token[b, pos].mean(0) for b, pos in enumerate(rows_positions)]))
    return torch.cat(blocks, -1)


def capture(model, ids, spec, prompt_last_index=None):
    recorder = RoutingRecorder(model, spec=spec)
    try:
        with recorder, torch.no_grad():
            model(input_ids=ids, attention_mask=MASK)
        return recorder.routing(MASK, prompt_last_index=prompt_last_index)
    finally:
        recorder.remove()


@pytest.mark.parametrize("position,n", list(POSITIONS))
def test_positions_with_left_and_right_padding(setup, position, n):
    """Each routing position averages the routers' softmax over the right real tokens, whatever the padding side."""
    model, ids, outs = setup
    got = capture(model, ids, RoutingSpec(position=position, num_tokens=n))
    want = expected(outs, POSITIONS[(position, n)], lambda x: torch.softmax(x.float(), -1))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("position,n", list(PROMPT_POSITIONS))
def test_prompt_plus_answer_rows(setup, position, n):
    """With prompt_last_index, positions are counted within the prompt, not the whole row."""
    model, ids, outs = setup
    got = capture(model, ids, RoutingSpec(position=position, num_tokens=n), prompt_last_index=PROMPT_LAST)
    want = expected(outs, PROMPT_POSITIONS[(position, n)], lambda x: torch.softmax(x.float(), -1))
    torch.testing.assert_close(got, want)


def test_prompt_last_index_outside_the_row_is_an_error(setup):
    """A prompt end beyond a row's real tokens is refused."""
    model, ids, _ = setup
    with pytest.raises(ValueError, match="outside the row's real tokens"):
        capture(model, ids, RoutingSpec(), prompt_last_index=torch.tensor([6, 5]))  # row 0 ends at 5


def test_logits_representation(setup):
    """representation="logits" captures the raw router logits."""
    model, ids, outs = setup
    got = capture(model, ids, RoutingSpec(representation="logits"))
    torch.testing.assert_close(got, expected(outs, POSITIONS[("last", 1)], lambda x: x.float()))


def test_topk_representation_is_the_routers_own_topk_weights(setup):
    """representation="topk" captures the router's own top-k weights, scattered to all experts."""
    model, ids, outs = setup
    got = capture(model, ids, RoutingSpec(representation="topk", position="mean"))

    def scatter(index_router):
        logits, weights, index = outs[index_router]
        dense = torch.zeros(logits.shape)
        return dense.scatter(1, index, weights.float()).view(2, T, -1)

    rows = POSITIONS[("mean", 1)]
    want = torch.cat(
        [torch.stack([scatter(i)[b, p].mean(0) for b, p in enumerate(rows)]) for i in range(len(outs))], -1
    )
    torch.testing.assert_close(got, want)
    # And, independently, for OLMoE (norm_topk_prob=False): the top-2 of the softmax, zeros elsewhere.
    probs = [torch.softmax(o[0].float(), -1) for o in outs]
    manual = []
    for p in probs:
        values, index = p.topk(2, dim=-1)
        manual.append(torch.zeros_like(p).scatter(1, index, values).view(2, T, -1))
    want2 = torch.cat([torch.stack([m[b, pos].mean(0) for b, pos in enumerate(rows)]) for m in manual], -1)
    torch.testing.assert_close(got, want2)
    assert ((got[:, :8] > 0).sum(-1) >= 2).all()


def test_hooks_fire_only_while_switched_on(setup):
    """The recorder captures only inside `with recorder:` and leaves no hook behind."""
    model, ids, _ = setup
    recorder = RoutingRecorder(model)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=MASK)  # not recording
        with pytest.raises(RuntimeError, match="No routing was recorded"):
            recorder.routing(MASK)
        with recorder, torch.no_grad():
            model(input_ids=ids, attention_mask=MASK)
        first = recorder.routing(MASK)
        with torch.no_grad():
            model(input_ids=torch.randint(3, 128, (2, T)), attention_mask=MASK)  # switched off again
        assert torch.equal(recorder.routing(MASK), first)
    finally:
        recorder.remove()
    with recorder, torch.no_grad():  # removed hooks never record, even when switched on
        model(input_ids=ids, attention_mask=MASK)
    with pytest.raises(RuntimeError, match="No routing was recorded"):
        recorder.routing(MASK)


def _routing_grads(model, ids, checkpointing):
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    model.zero_grad()
    recorder = RoutingRecorder(model)
    try:
        with recorder:
            model(input_ids=ids, attention_mask=MASK, use_cache=False)
        routing = recorder.routing(MASK)
        torch.manual_seed(9)
        (routing * torch.randn_like(routing)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        recorder.remove()
        if checkpointing is not None:
            model.gradient_checkpointing_disable()
        model.eval()


def test_non_reentrant_checkpointing_gives_the_same_gradient():
    """Non-reentrant activation checkpointing gives the routing the same gradient as no checkpointing."""
    torch.manual_seed(0)
    model = get_peft_model(make_tiny_olmoe(), roma_peft.RomaConfig(num_layers=2))
    ids = torch.randint(3, 128, (2, T))
    plain = _routing_grads(model, ids, None)
    checkpointed = _routing_grads(model, ids, False)
    assert plain.keys() == checkpointed.keys() and len(plain) == 2
    for name in plain:
        assert plain[name].abs().sum() > 0
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0)


def test_reentrant_checkpointing_is_detected():
    """Reentrant checkpointing (no gradient through the routing) is detected and named."""
    torch.manual_seed(0)
    model = get_peft_model(make_tiny_olmoe(), roma_peft.RomaConfig(num_layers=2))
    ids = torch.randint(3, 128, (2, T))
    with pytest.raises(RuntimeError, match="use_reentrant"):
        _routing_grads(model, ids, True)


def test_deepseek_v4_hash_routed_layers_are_left_out():
    """Hash-routed layers pick experts from a fixed token-id table: RoMA has no routing to change there, so the
    registry skips them (they are neither tuned nor counted as MoE layers); the ordinary MoE layers are tuned."""
    import transformers as T

    from roma_peft.routers import find_routers

    cfg = T.DeepseekV4Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        sliding_window=64,
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
    )
    torch.manual_seed(0)
    model = T.DeepseekV4ForCausalLM(cfg).eval()
    assert type(model.model.layers[0].mlp.gate).__name__ == "DeepseekV4HashRouter"
    assert [r.name for r in find_routers(model)] == [f"model.layers.{i}.mlp.gate" for i in (1, 2, 3)]
    peft_model = get_peft_model(model, roma_peft.RomaConfig(layer_selection="all"))
    assert sorted(peft_model.peft_config["default"].resolved_routers) == [
        f"model.layers.{i}.mlp.gate" for i in (1, 2, 3)
    ]
