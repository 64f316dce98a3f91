"""Oracle routing (roma_peft.benchmark.oracle) runs on the model's device, not on the default device.

There is no accelerator here, so the model stays on the CPU and the *default* device is switched to ``meta``: any
tensor the oracle creates without naming the model's device then lands on ``meta`` (no data), and the run fails or
differs. That is the same bug as creating tensors on the CPU for a model on a GPU.
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from roma_peft.benchmark import runner
from roma_peft.benchmark.oracle import oracle_routing
from roma_peft.benchmark.suite import generate_suite, shipped_model_path
from roma_peft.capture import routers_for
from roma_peft.config import RomaConfig


class _DevicesOfResults(TorchFunctionMode):
    """Records the device of every tensor any torch function returns while active."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.devices.add(t.device.type)
        return out


@pytest.fixture(scope="module")
def mini():
    from transformers import AutoTokenizer

    path = str(shipped_model_path())
    model = runner.load_base_model(path)
    routers = routers_for(model, config=RomaConfig(num_layers=2))
    samples = generate_suite(seed=0)["dev"][:6]
    return model, AutoTokenizer.from_pretrained(path), samples, routers


@pytest.mark.parametrize("target", ["gold", "wrong"])
def test_oracle_creates_every_tensor_on_the_models_device(mini, target):
    model, tokenizer, samples, routers = mini
    kwargs = {"target": target, "steps": 2, "lr": 0.2, "batch_size": 4, "progress": False}
    expected = oracle_routing(model, tokenizer, samples, routers, **kwargs)
    assert next(model.parameters()).device.type == "cpu"
    seen = _DevicesOfResults()
    with torch.device("meta"), seen:  # the default device is not the model's
        got = oracle_routing(model, tokenizer, samples, routers, **kwargs)
    assert seen.devices == {"cpu"}, f"the oracle made tensors on {seen.devices - {'cpu'}}, not on the model's device"
    assert got.correct == expected.correct and got.accuracy == expected.accuracy
    assert got.routing.device.type == "cpu"
    torch.testing.assert_close(got.routing, expected.routing)
    # the model is left as it was
    assert not model.training and all(p.device.type == "cpu" for p in model.parameters())


def test_explicit_goals_are_checked_before_any_forward(mini):
    model, tokenizer, samples, routers = mini
    with pytest.raises(ValueError, match="one option per sample"):
        oracle_routing(model, tokenizer, samples, routers, goals=[0] * (len(samples) - 1), progress=False)
    too_far = [0] * (len(samples) - 1) + [len(samples[-1]["options"])]
    with pytest.raises(ValueError, match=f"sample {samples[-1]['id']!r} does not have"):
        oracle_routing(model, tokenizer, samples, routers, goals=too_far, progress=False)
    got = oracle_routing(model, tokenizer, samples, routers, goals=[1] * len(samples), steps=1, progress=False)
    assert list(got.goal) == [1] * len(samples)
