"""Each regulariser option gives its documented value on a hand-computed example."""

import math

import pytest
import torch

from roma_peft import regularizers as R


def test_manifold_hand_example_and_empty_rows():
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], requires_grad=True)
    targets = torch.tensor([
        [[0.0, 0.0], [1.0, 1.0]],          # ||(1,0)-(0,0)||^2 = 1 ; ||(1,0)-(1,1)||^2 = 1
        [[0.0, 3.0], [float("nan"), 9.0]],  # 4 ; padded slot holds garbage (NaN) and must not leak
        [[7.0, 7.0], [7.0, 7.0]],          # no neighbour at all
    ])
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    value = R.manifold_loss(r, targets, weights, mask)
    assert torch.allclose(value, torch.tensor([0.25 * 1 + 0.75 * 1, 4.0, 0.0]))
    value.mean().backward()
    assert torch.isfinite(r.grad).all()
    # d/dr_1 of 4 = ||r-(0,3)||^2 /3 -> 2*(r-(0,3))/3 = (0, -4/3)
    assert torch.allclose(r.grad[1], torch.tensor([0.0, -4.0 / 3]))
    assert torch.equal(r.grad[2], torch.zeros(2))


def test_manifold_shape_error_is_clear():
    with pytest.raises(ValueError, match="routing spec"):
        R.manifold_loss(torch.zeros(2, 3), torch.zeros(2, 1, 4), torch.ones(2, 1), torch.ones(2, 1, dtype=torch.bool))


def test_self_l1_l2():
    r = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    base = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert torch.allclose(R.self_loss(r, base), torch.tensor([5.0, 25.0]))
    deltas = [torch.tensor([[1.0, -2.0]]), torch.tensor([[-0.5], [0.5]])]
    assert R.l1_loss(deltas).item() == pytest.approx(1 + 2 + 0.5 + 0.5)
    assert R.l2_loss(deltas).item() == pytest.approx(1 + 4 + 0.25 + 0.25)


def test_entropy_balance_and_cosine():
    # two layers of 2 experts: uniform -> log 2 ; one-hot -> 0
    r = torch.tensor([[0.5, 0.5, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    ent = R.entropy_loss(r, [2, 2])
    assert torch.allclose(ent, torch.tensor([math.log(2) / 2, 0.0]), atol=1e-6)
    # logits representation: softmax first; equal logits -> uniform
    assert torch.allclose(R.entropy_loss(torch.zeros(1, 4), [4], "logits"), torch.tensor([math.log(4)]))
    # balance: layer 1 mean (0.75, 0.25), layer 2 mean (1, 0)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert R.expert_balance(r, [2, 2]).item() == pytest.approx((h + 0.0) / 2, abs=1e-6)
    cos = R.neighbour_cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]]),
                             torch.tensor([[1.0], [0.0]]), torch.tensor([[True], [False]]))
    assert cos.item() == pytest.approx(1.0)


def test_random_neighbours_keeps_shape_weights_and_excludes_self():
    index = torch.tensor([[1, 2], [0, -1], [-1, -1], [1, 0]])
    weights = torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
    new_index, new_weights = R.random_neighbours(index, weights, seed=3)
    assert torch.equal(new_index >= 0, index >= 0)
    for i in range(4):
        assert i not in new_index[i].tolist()
        assert set(new_index[i][new_index[i] >= 0].tolist()) <= {0, 1, 2}
    assert torch.allclose(new_weights, weights)
    again, _ = R.random_neighbours(index, weights, seed=3)
    assert torch.equal(again, new_index), "the random control must be a fixed draw"
