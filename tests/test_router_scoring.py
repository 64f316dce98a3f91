"""The routing RoMA captures is the routing the model uses: the scoring comes from the model, never a silent default.

DeepSeek-V4 and Inkling2 score with the router's own ``score_fn`` (config ``scoring_func``: ``sqrtsoftplus`` /
``sigmoid``); Cohere2 declares ``expert_selection_fn``. A router class the registry does not know gets its scoring
proven from its outputs, or a ``ScoringAssumptionWarning`` that names what was assumed and how to override it.
"""

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from peft import get_peft_model
from torch import nn

import roma_peft
from roma_peft import routers as registry
from roma_peft.capture import RoutingRecorder, RoutingSpec
from roma_peft.routers import ScoringAssumptionWarning, find_routers

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=32,
    moe_intermediate_size=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    pad_token_id=0,
    sliding_window=64,
    num_experts_per_tok=2,
)


def deepseek_v4(**kwargs):
    cfg = T.DeepseekV4Config(
        **COMMON,
        num_hidden_layers=4,
        n_routed_experts=8,
        n_shared_experts=1,
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        **kwargs,
    )
    torch.manual_seed(0)
    return T.DeepseekV4ForCausalLM(cfg).eval()


def inkling2():
    torch.manual_seed(0)
    return T.Inkling2ForCausalLM(T.Inkling2TextConfig(**COMMON, num_hidden_layers=3, num_local_experts=8)).eval()


def inkling2_loop():
    torch.manual_seed(0)
    return T.Inkling2LoopForCausalLM(
        T.Inkling2LoopTextConfig(**COMMON, num_hidden_layers=3, num_local_experts=8)
    ).eval()


def inkling():
    """Matrix rows = 8 routed + 1 shared expert; the logits (and the routing vector) cover the 8 routed experts."""
    torch.manual_seed(0)
    cfg = T.InklingTextConfig(**COMMON, num_hidden_layers=3, n_routed_experts=8, n_shared_experts=1)
    return T.InklingForCausalLM(cfg).eval()


def cohere2_sigmoid():
    cfg = T.Cohere2MoeConfig(
        **COMMON, num_hidden_layers=3, num_experts=8, expert_selection_fn="sigmoid", norm_topk_prob=True
    )
    torch.manual_seed(0)
    return T.Cohere2MoeForCausalLM(cfg).eval()


HAND = {  # written out here, independent of the registry
    "softmax": lambda x: torch.softmax(x.float(), -1),
    "sigmoid": lambda x: torch.sigmoid(x.float()),
    "sqrtsoftplus": lambda x: F.softplus(x.float()).sqrt(),
}

MODELS = {
    "deepseek_v4": (deepseek_v4, "sqrtsoftplus"),
    "deepseek_v4_scoring_func_sigmoid": (lambda: deepseek_v4(scoring_func="sigmoid"), "sigmoid"),
    "inkling2": (inkling2, "sigmoid"),
    "inkling2_loop": (inkling2_loop, "sigmoid"),
    "cohere2_expert_selection_fn_sigmoid": (cohere2_sigmoid, "sigmoid"),
    "inkling_shared_expert_rows": (inkling, "sigmoid"),
}


def own_routing(model, recorder_routers, ids, mask, spec):
    """(captured routing at the last token, the routers' own outputs of that forward)."""
    outputs = {}
    handles = [
        r.module.register_forward_hook(lambda m, a, out, i=i: outputs.setdefault(i, out))
        for i, r in enumerate(recorder_routers)
    ]
    recorder = RoutingRecorder(model, routers=recorder_routers, spec=spec)
    with torch.no_grad(), recorder:
        model(input_ids=ids, attention_mask=mask)
    routing = recorder.routing(mask)
    recorder.remove()
    for h in handles:
        h.remove()
    return routing, outputs


@pytest.mark.parametrize("name", list(MODELS))
def test_captured_routing_is_what_the_model_routes_with(name):
    build, scoring = MODELS[name]
    model = get_peft_model(build(), roma_peft.RomaConfig(num_layers=2))
    torch.manual_seed(3)
    for param in model.parameters():
        if param.requires_grad:
            param.data.normal_(std=0.5)
    tuned = RoutingRecorder(model).routers
    torch.manual_seed(1)
    ids = torch.randint(3, 90, (3, 7))
    mask = torch.ones_like(ids)
    last = torch.arange(3) * 7 + 6  # row of each sequence's last token in the routers' (B*T, E) outputs

    probs, outputs = own_routing(model, tuned, ids, mask, RoutingSpec(representation="probs"))
    topk, _ = own_routing(model, tuned, ids, mask, RoutingSpec(representation="topk"))
    widths = RoutingRecorder(model, routers=tuned)
    assert probs.shape == (3, 16) and widths.dims == [8, 8]  # one entry per logit, not per matrix row
    widths.remove()
    for i, router in enumerate(tuned):
        logits, weights, index = (t.reshape(21, -1)[last] for t in outputs[i][:3])
        block = slice(i * 8, (i + 1) * 8)
        # the dense scores the model computes: its own function where it has one, and the hand formula
        own_fn = getattr(router.module, "score_fn", None)
        if own_fn is not None:
            torch.testing.assert_close(probs[:, block], own_fn(logits).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probs[:, block], HAND[scoring](logits), rtol=1e-5, atol=1e-6)
        # the experts' weights are those scores at the selected experts, up to one factor per token
        selected = probs[:, block].gather(1, index)
        torch.testing.assert_close(
            selected / selected.sum(1, keepdim=True), weights / weights.sum(1, keepdim=True), rtol=1e-5, atol=1e-6
        )
        dense = torch.zeros(3, 8).scatter(1, index, weights.float())
        torch.testing.assert_close(topk[:, block], dense, rtol=1e-5, atol=1e-6)
    assert {(r.family.scoring, r.family.scoring_source.startswith(("assumed", "proven"))) for r in tuned} == {
        (scoring, False)
    }  # declared by the model, not guessed


# ------------------------------------------------------------------------------------------------ unknown routers
@pytest.fixture(autouse=True)
def fresh_warnings():
    registry._WARNED.clear()
    yield
    registry._WARNED.clear()


class ToyLogitsGate(nn.Module):
    """A router class the registry does not know, returning logits only (nothing to prove its scoring from)."""

    def __init__(self, hidden=16, experts=6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, hidden))

    def forward(self, x):
        return F.linear(x.reshape(-1, self.weight.shape[1]), self.weight)


class ToySigmoidGate(ToyLogitsGate):
    """Unknown class returning (logits, renormalised top-2 sigmoid weights x 2.5, index): its scoring is provable."""

    def forward(self, x):
        logits = super().forward(x)
        weights, index = torch.sigmoid(logits).topk(2, dim=-1)
        return logits, 2.5 * weights / weights.sum(-1, keepdim=True), index


class ToyModel(nn.Module):
    def __init__(self, gate_cls, layers=2, hidden=16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, hidden)
        self.layers = nn.ModuleList(nn.Module() for _ in range(layers))
        for layer in self.layers:
            layer.mlp = nn.Module()
            layer.mlp.gate = gate_cls(hidden)
            layer.mlp.up = nn.Linear(6, hidden)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            out = layer.mlp.gate(h)
            logits = out[0] if isinstance(out, tuple) else out
            h = h + layer.mlp.up(logits.reshape(*h.shape[:-1], -1))
        return h


def scoring_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, ScoringAssumptionWarning)]


def captured_probs(model, found):
    ids = torch.randint(0, 32, (2, 5))
    mask = torch.ones_like(ids)
    recorder = RoutingRecorder(model, routers=found)
    with torch.no_grad(), recorder:
        model(ids, mask)
    probs = recorder.routing(mask)
    recorder.remove()
    with torch.no_grad():
        h = model.embed(ids)[:, -1]
        logits = model.layers[0].mlp.gate(h)
        logits = logits[0] if isinstance(logits, tuple) else logits
    return probs[:, :6], logits


def test_unknown_router_scoring_is_proven_from_its_outputs():
    model = ToyModel(ToySigmoidGate)
    found, warned = scoring_warnings(lambda: find_routers(model))
    assert len(found) == 2 and not warned
    assert {r.family.scoring for r in found} == {"sigmoid"}
    assert found[0].family.scoring_source.startswith("proven")
    probs, logits = captured_probs(model, found)
    torch.testing.assert_close(probs, torch.sigmoid(logits))


def test_unknown_router_that_cannot_be_proven_warns_naming_the_assumption():
    model = ToyModel(ToyLogitsGate)
    found, warned = scoring_warnings(lambda: find_routers(model))
    assert len(found) == 2 and len(warned) == 1, warned  # once per class, not once per router
    message = warned[0]
    assert "ToyLogitsGate" in message and "assumes scoring 'softmax'" in message
    assert "scoring_func" in message and "register_router_class('ToyLogitsGate'" in message  # how to override
    assert found[0].family.scoring == "softmax" and found[0].family.scoring_source.startswith("assumed")
    _, again = scoring_warnings(lambda: find_routers(model))
    assert again == []  # the same assumption is not repeated on every call


def test_unknown_router_declared_scoring_func_wins():
    model = ToyModel(ToyLogitsGate)
    for layer in model.layers:
        layer.mlp.gate.scoring_func = "sqrtsoftplus"
    found, warned = scoring_warnings(lambda: find_routers(model))
    assert not warned
    assert {r.family.scoring for r in found} == {"sqrtsoftplus"}
    probs, logits = captured_probs(model, found)
    torch.testing.assert_close(probs, F.softplus(logits).sqrt())


def test_unknown_router_with_config_scoring_func_warns_that_it_is_unverified():
    model = ToyModel(ToyLogitsGate)
    model.config = types.SimpleNamespace(scoring_func="sigmoid")
    found, warned = scoring_warnings(lambda: find_routers(model))
    assert {r.family.scoring for r in found} == {"sigmoid"}
    assert (
        len(warned) == 1 and "config.scoring_func='sigmoid'" in warned[0] and "assumes scoring 'sigmoid'" in warned[0]
    )


def test_register_router_class_overrides_the_assumption():
    model = ToyModel(ToyLogitsGate)
    try:
        registry.register_router_class("ToyLogitsGate", "sigmoid")
        found, warned = scoring_warnings(lambda: find_routers(model))
    finally:
        registry.ROUTER_CLASS_TO_FAMILY.pop("ToyLogitsGate", None)
    assert not warned and {r.family.scoring for r in found} == {"sigmoid"}
    with pytest.raises(ValueError, match="Unknown router family"):
        registry.register_router_class("ToyLogitsGate", "tanh")


def test_phimoe_probs_capture_warns_that_only_topk_is_exact():
    """PhiMoE's sparsemixer weights are no dense distribution: capturing 'probs' must say so, 'topk' is exact."""
    import warnings

    import transformers as T

    from roma_peft.capture import RoutingRecorder, RoutingSpec

    cfg = T.PhimoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = T.PhimoeForCausalLM(cfg).eval()
    with pytest.warns(UserWarning, match="only approximate.*representation='topk'"):
        RoutingRecorder(model, spec=RoutingSpec(representation="probs"), config=roma_peft.RomaConfig(num_layers=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RoutingRecorder(model, spec=RoutingSpec(representation="topk"), config=roma_peft.RomaConfig(num_layers=1))
