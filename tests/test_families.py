"""RoMA across MoE families: wrap, train, save/reload, merge, disable, and routing capture, on tiny random models.

The expected router paths, scoring and bias of each family are written down by hand in ``families.py`` (not read
from the registry), so a wrong registry entry makes these tests fail.
"""

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import roma_peft
from roma_peft.capture import RoutingRecorder

NAMES = list(FAMILIES)


def batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 90, (3, 7))
    return ids


def masks():
    right = torch.ones(3, 7, dtype=torch.long)
    right[1, 5:] = 0
    right[2, 3:] = 0
    left = torch.ones(3, 7, dtype=torch.long)
    left[1, :2] = 0
    left[2, :4] = 0
    return {"right": right, "left": left}


def wrap(family, **kwargs):
    return get_peft_model(family.build(), roma_peft.RomaConfig(num_layers=family.num_layers, **kwargs))


def randomize(model, seed=3, std=0.5):
    torch.manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.data.normal_(std=std)


def expected_trainable(family):
    names = [f"base_model.model.{r}.roma_delta.default" for r in family.tuned]
    if family.bias:
        names += [f"base_model.model.{r}.roma_bias_delta.default" for r in family.tuned]
    return sorted(names)


def base_snapshot(model):
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return state


@pytest.mark.parametrize("name", NAMES)
def test_wrap_save_reload_merge_disable(name, tmp_path):
    """Per family: wrapping changes nothing, and save/reload, merge and disable give the expected logits."""
    family = FAMILIES[name]
    ids = batch()
    base = family.build()
    reference = base(input_ids=ids).logits
    model = get_peft_model(base, roma_peft.RomaConfig(num_layers=family.num_layers))

    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == expected_trainable(family)
    wrapped = {
        n.replace("base_model.model.", "", 1) for n, m in model.named_modules() if isinstance(m, roma_peft.RomaLayer)
    }
    assert wrapped == set(family.tuned)
    for gate in family.never_targeted:
        assert not isinstance(model.base_model.model.get_submodule(gate), roma_peft.RomaLayer), gate
    assert torch.equal(model(input_ids=ids).logits, reference), "zero-initialised deltas must not change the model"

    randomize(model)
    adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, reference)

    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    expected = {f"base_model.model.{r}.roma_delta": (family.experts, 32) for r in family.tuned}
    if family.bias:
        expected.update({f"base_model.model.{r}.roma_bias_delta": (family.experts,) for r in family.tuned})
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert all(v.dtype == torch.float32 for v in tensors.values())

    reloaded = PeftModel.from_pretrained(family.build(), tmp_path)
    assert torch.equal(reloaded(input_ids=ids).logits, adapted)
    with reloaded.disable_adapter():
        assert torch.equal(reloaded(input_ids=ids).logits, reference)
    assert torch.equal(reloaded(input_ids=ids).logits, adapted)

    stock_type = type(family.build())
    merged = reloaded.merge_and_unload()
    assert type(merged) is stock_type
    assert not any(isinstance(m, roma_peft.RomaLayer) for m in merged.modules())
    assert not any("roma_" in n for n, _ in merged.named_parameters())
    assert torch.equal(merged(input_ids=ids).logits, adapted)


@pytest.mark.parametrize("name", NAMES)
def test_training_changes_only_the_deltas(name):
    """Per family: an optimizer step moves the router deltas and nothing else."""
    family = FAMILIES[name]
    ids = batch()
    model = wrap(family)
    before = base_snapshot(model.get_base_model())
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.05, weight_decay=0.0)
    for _ in range(3):
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    after = base_snapshot(model.get_base_model())
    for key, value in before.items():
        if "roma_" in key:
            continue
        assert torch.equal(after[key], value), f"base tensor {key} changed"
    layers = model.base_model.roma_layers()
    for router in family.tuned:
        assert layers[router].roma_delta["default"].abs().sum() > 0, f"delta of {router} was not trained"
        assert layers[router].get_base_layer().weight.requires_grad is False
    if name == "deepseek_v3":
        biases = [n for n in before if n.endswith("e_score_correction_bias")]
        assert biases, "DeepSeek-V3 routers carry e_score_correction_bias"
        assert not any("e_score_correction_bias" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("name", NAMES)
def test_capture_matches_hand_reference(name, padding):
    """Per family and padding side: captured routing equals a hand computation from the router inputs."""
    family = FAMILIES[name]
    ids = batch()
    mask = masks()[padding]
    model = wrap(family)
    randomize(model, std=0.3)
    layers = model.base_model.roma_layers()

    # The router's input, captured by hand with a pre-hook on the router module (the module that owns the weight,
    # or its parent for routers that wrap an nn.Linear).
    inputs = {}
    routers = {r.projection_name: r for r in roma_peft.find_routers(model)}
    handles = [
        routers[p].module.register_forward_pre_hook(lambda mod, args, p=p: inputs.__setitem__(p, args[0]))
        for p in family.tuned
    ]
    recorder = RoutingRecorder(model)
    with recorder:
        model(input_ids=ids, attention_mask=mask)
    routing = recorder.routing(mask)
    recorder.remove()
    for h in handles:
        h.remove()

    batch_size, length = ids.shape
    last = mask.sum(1) - 1 if padding == "right" else torch.full((batch_size,), length - 1)
    reference = []
    for router in family.tuned:
        layer = layers[router]
        weight = layer.get_base_layer().weight.detach().double() + layer.roma_delta["default"].detach().double()
        hidden = inputs[router].detach().reshape(batch_size, length, -1).double()
        logits = hidden[torch.arange(batch_size), last] @ weight.T
        if family.bias:
            logits = logits + layer.get_base_layer().bias.detach().double()
            logits = logits + layer.roma_bias_delta["default"].detach().double()
        probs = {
            "softmax": lambda x: torch.softmax(x, -1),
            "sigmoid": torch.sigmoid,
            "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
        }[family.scoring](logits)
        reference.append(probs)
    reference = torch.cat(reference, -1).float()
    assert routing.shape == (batch_size, family.experts * family.num_layers)
    torch.testing.assert_close(routing, reference, rtol=1e-5, atol=1e-6)

    # A loss that is not the sum of probabilities (that sum is constant for softmax families: zero gradient).
    torch.manual_seed(5)
    (routing * torch.randn_like(routing)).sum().backward()
    for router in family.tuned:
        grad = layers[router].roma_delta["default"].grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reached the delta of {router}"
