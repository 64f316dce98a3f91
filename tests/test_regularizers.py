"""Each regulariser option gives its documented value on a hand-computed example."""

import math

import pytest
import torch

from roma_peft import regularizers as R
from roma_peft.neighbours import Neighbourhood

# three samples, 2-dim routing; sample 1 has one real neighbour and a padded slot holding garbage (NaN)
R_LIVE = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
TARGETS = [[[0.0, 0.0], [1.0, 1.0]], [[0.0, 3.0], [float("nan"), 9.0]], [[7.0, 7.0], [7.0, 7.0]]]
WEIGHTS = [[0.25, 0.75], [1.0, 0.0], [0.0, 0.0]]
MASK = [[True, True], [True, False], [False, False]]


def manifold_example():
    r = torch.tensor(R_LIVE, requires_grad=True)
    return r, R.manifold_loss(r, torch.tensor(TARGETS), torch.tensor(WEIGHTS), torch.tensor(MASK))


def small_neighbourhood(successful=(True, True, True, False)):
    """Four samples; rows 0-2 have 2, 1 and 0 real neighbours; routing row i = (i, 10 i)."""
    return Neighbourhood(
        ids=["a", "b", "c", "d"],
        neighbour_index=torch.tensor([[1, 2], [0, -1], [-1, -1], [1, 0]]),
        weights=torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.0, 0.0], [0.5, 0.5]]),
        successful=torch.tensor(successful),
        routing=torch.tensor([[0.0, 0.0], [1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]),
    )


def test_manifold_loss_is_the_weighted_squared_distance():
    """R(i) = sum_j W_ij ||r_i - r_j||^2 on a hand example; a sample without neighbours gets exactly 0."""
    _, value = manifold_example()
    assert torch.allclose(value, torch.tensor([0.25 * 1 + 0.75 * 1, 4.0, 0.0]))


def test_manifold_loss_gradient_ignores_padding_slots():
    """The gradient is the hand derivative; the NaN in a padded slot and a sample without neighbours add nothing."""
    r, value = manifold_example()
    value.mean().backward()
    assert torch.isfinite(r.grad).all()
    # d/dr_1 of ||r - (0, 3)||^2 / 3 = 2 (r - (0, 3)) / 3 = (0, -4/3)
    assert torch.allclose(r.grad[1], torch.tensor([0.0, -4.0 / 3]))
    assert torch.equal(r.grad[2], torch.zeros(2))


def test_manifold_shape_error_is_clear():
    """Targets of another routing width are refused with a hint at the routing spec."""
    with pytest.raises(ValueError, match="routing spec"):
        R.manifold_loss(torch.zeros(2, 3), torch.zeros(2, 1, 4), torch.ones(2, 1), torch.ones(2, 1, dtype=torch.bool))


def test_self_control_is_the_squared_distance_to_the_own_routing():
    """``self``: the manifold formula with the sample's own stored routing as its one neighbour, weight 1."""
    nb = small_neighbourhood()
    r = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    value = R.manifold_loss(r, *nb.self_control().lookup(torch.tensor([0, 1])))
    assert torch.allclose(value, torch.tensor([1.0 + 4.0, 1.0 + 100.0]))


def test_random_control_keeps_counts_and_weights():
    """``random``: every sample keeps its number of neighbours and their (renormalised) weights."""
    nb = small_neighbourhood()
    control = nb.random_control(seed=3)
    assert torch.equal(control.mask, nb.mask)
    assert torch.allclose(control.weights, nb.weights)


def test_random_control_draws_successful_samples_other_than_itself():
    """Random neighbours are members of S and never the sample itself."""
    control = small_neighbourhood().random_control(seed=3)
    for i in range(4):
        drawn = control.neighbour_index[i][control.neighbour_index[i] >= 0].tolist()
        assert i not in drawn and set(drawn) <= {0, 1, 2}


def test_random_control_is_a_fixed_draw_of_its_seed():
    """The same seed gives the same draw (a resume redraws it), another seed another one."""
    nb = small_neighbourhood(successful=(True,) * 4)
    draws = {seed: nb.random_control(seed).neighbour_index for seed in range(6)}
    assert torch.equal(nb.random_control(3).neighbour_index, draws[3])
    assert any(not torch.equal(draws[0], other) for other in draws.values())


def test_random_control_shares_the_routing_targets():
    """The control looks up the same stored routing r_j as the real neighbourhood (no copy)."""
    nb = small_neighbourhood()
    assert nb.random_control(0).routing is nb.routing and nb.self_control().routing is nb.routing


def test_l1_sums_absolute_deltas():
    """``l1``: sum |Delta| over every router delta."""
    deltas = [torch.tensor([[1.0, -2.0]]), torch.tensor([[-0.5], [0.5]])]
    assert R.l1_loss(deltas).item() == pytest.approx(1 + 2 + 0.5 + 0.5)


def test_l2_sums_squared_deltas():
    """``l2``: sum Delta^2 over every router delta."""
    deltas = [torch.tensor([[1.0, -2.0]]), torch.tensor([[-0.5], [0.5]])]
    assert R.l2_loss(deltas).item() == pytest.approx(1 + 4 + 0.25 + 0.25)


def test_routing_entropy_is_the_mean_over_layers():
    """``entropy``: two layers of 2 experts, uniform -> log 2, one-hot -> 0, averaged over the layers."""
    r = torch.tensor([[0.5, 0.5, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    assert torch.allclose(R.routing_entropy(r, [2, 2]), torch.tensor([math.log(2) / 2, 0.0]), atol=1e-6)


def test_routing_entropy_of_logits_takes_a_softmax_first():
    """With the ``logits`` representation, equal logits are a uniform distribution."""
    assert torch.allclose(R.routing_entropy(torch.zeros(1, 4), [4], "logits"), torch.tensor([math.log(4)]))


def test_expert_balance_is_the_normalised_entropy_of_the_mean_routing():
    """Layer 1's mean routing (0.75, 0.25) and layer 2's (1, 0) give H/log 2 and 0, averaged."""
    r = torch.tensor([[0.5, 0.5, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert R.expert_balance(r, [2, 2]).item() == pytest.approx((h + 0.0) / 2, abs=1e-6)


def test_neighbour_cosine_averages_over_samples_with_neighbours():
    """A sample without a neighbour does not dilute the mean cosine similarity."""
    cos = R.neighbour_cosine(
        torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
        torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]]),
        torch.tensor([[1.0], [0.0]]),
        torch.tensor([[True], [False]]),
    )
    assert cos.item() == pytest.approx(1.0)
