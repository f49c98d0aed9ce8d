"""Hand-computed checks that the float64 oracle (numoe.reference) itself is right.

Everything else is tested against numoe.reference, so these small cases
pin down its maths: tie rules, group-limited routing, renormalisation,
the bias that only selects, and the losses at known points.
"""
import math

import numpy as np
import pytest

from numoe import reference as R


def test_router_probs_hand_values():
    p = R.router_probs([[0.0, math.log(3.0)]])
    np.testing.assert_allclose(p, [[0.25, 0.75]], rtol=1e-15)
    np.testing.assert_allclose(R.router_probs([[0.0, -np.inf, 2.0]], "sigmoid"),
                               [[0.5, 0.0, 1 / (1 + math.exp(-2.0))]], rtol=1e-15)
    # a -inf logit is a masked expert: softmax gives it exactly 0
    assert R.router_probs([[1.0, -np.inf]])[0, 1] == 0.0


def test_route_orders_by_descending_score_and_renormalises():
    r = R.route(np.array([[1.0, 3.0, 2.0]]), 2)
    assert r.experts.tolist() == [[1, 2]]
    assert r.experts.dtype == np.int32
    e3, e2 = math.exp(3.0), math.exp(2.0)
    np.testing.assert_allclose(r.weights, [[e3 / (e3 + e2), e2 / (e3 + e2)]], rtol=1e-15)


def test_route_without_renormalise_keeps_full_softmax_scores():
    z = np.array([[0.0, math.log(2.0), math.log(5.0)]])      # softmax = [1, 2, 5] / 8
    r = R.route(z, 2, renormalize=False)
    assert r.experts.tolist() == [[2, 1]]
    np.testing.assert_allclose(r.weights, [[5 / 8, 2 / 8]], rtol=1e-15)


def test_route_ties_go_to_the_lower_id():
    r = R.route(np.zeros((2, 5)), 3)
    assert r.experts.tolist() == [[0, 1, 2], [0, 1, 2]]
    np.testing.assert_allclose(r.weights, 1 / 3, rtol=1e-15)
    r = R.route(np.array([[1.0, 2.0, 1.0, 2.0]]), 3)
    assert r.experts.tolist() == [[1, 3, 0]]


def test_route_selects_on_logits_when_scores_round_to_a_tie():
    # exp(1e-17) == 1.0 in float64: the softmax scores tie, the logits do not
    z = np.array([[0.0, 1e-17]])
    assert R.router_probs(z)[0, 0] == R.router_probs(z)[0, 1]
    assert R.route(z, 1).experts.tolist() == [[1]]


def test_route_masked_experts_have_zero_weight():
    r = R.route(np.array([[0.0, -np.inf, 0.0]]), 3)
    assert r.experts.tolist() == [[0, 2, 1]]
    np.testing.assert_allclose(r.weights, [[0.5, 0.5, 0.0]], rtol=1e-15)


def test_route_sigmoid_and_scale():
    r = R.route(np.array([[0.0, 2.0, -1.0]]), 2, score="sigmoid", renormalize=False, scale=2.5)
    s = 1 / (1 + np.exp(-np.array([2.0, 0.0])))
    assert r.experts.tolist() == [[1, 0]]
    np.testing.assert_allclose(r.weights, [2.5 * s], rtol=1e-15)
    r = R.route(np.array([[0.0, 2.0, -1.0]]), 2, score="sigmoid", scale=2.5)
    np.testing.assert_allclose(r.weights, [2.5 * s / s.sum()], rtol=1e-15)


def test_route_renormalise_guard_when_chosen_scores_are_zero():
    r = R.route(np.full((1, 3), -np.inf), 2, score="sigmoid")
    assert r.experts.tolist() == [[0, 1]]
    assert r.weights.tolist() == [[0.0, 0.0]]      # 0 / (0 + 1e-20), not NaN


def test_route_bias_selects_but_does_not_weight():
    z = np.zeros((1, 4))
    r = R.route(z, 1, score="sigmoid", renormalize=False, bias=np.array([0, 0, 1.0, 0]))
    assert r.experts.tolist() == [[2]]
    assert r.weights.tolist() == [[0.5]]            # sigmoid(0), not 0.5 + 1
    r = R.route(z, 2, score="sigmoid", bias=np.array([0, 0.5, 1.0, 0]))
    assert r.experts.tolist() == [[2, 1]]
    np.testing.assert_allclose(r.weights, [[0.5, 0.5]], rtol=1e-15)


def _logit(p):
    return math.log(p / (1 - p))


def test_route_groups_top2_and_max():
    # sigmoid scores [0.9, 0.1 | 0.6, 0.6]: group sums 1.0 vs 1.2, group maxima 0.9 vs 0.6
    z = np.array([[_logit(0.9), _logit(0.1), _logit(0.6), _logit(0.6)]])
    kw = dict(score="sigmoid", renormalize=False, n_groups=2, topk_groups=1)
    r = R.route(z, 2, group_score="top2", **kw)
    assert r.experts.tolist() == [[2, 3]]
    np.testing.assert_allclose(r.weights, [[0.6, 0.6]], rtol=1e-12)
    r = R.route(z, 2, group_score="max", **kw)
    assert r.experts.tolist() == [[0, 1]]
    np.testing.assert_allclose(r.weights, [[0.9, 0.1]], rtol=1e-12)
    # without the group limit the two best experts overall win
    assert R.route(z, 2, score="sigmoid").experts.tolist() == [[0, 2]]
    # topk_groups == n_groups (or None) restricts nothing
    assert R.route(z, 2, score="sigmoid", n_groups=2, topk_groups=2).experts.tolist() == [[0, 2]]


def test_route_group_ties_go_to_the_lower_group_and_use_the_bias():
    z = np.zeros((1, 6))
    r = R.route(z, 2, score="sigmoid", n_groups=3, topk_groups=1)
    assert r.experts.tolist() == [[0, 1]]
    # the bias moves the group choice too: group 2 = experts 4, 5
    bias = np.array([0, 0, 0, 0, 0.1, 0.1])
    r = R.route(z, 2, score="sigmoid", bias=bias, n_groups=3, topk_groups=1)
    assert r.experts.tolist() == [[4, 5]]
    np.testing.assert_allclose(r.weights, [[0.5, 0.5]], rtol=1e-15)


def test_route_group_of_one_expert_scores_that_expert():
    # group size 1: "top2" is the single score; two groups of the four are kept
    z = np.array([[_logit(0.2), _logit(0.7), _logit(0.4), _logit(0.9)]])
    r = R.route(z, 2, score="sigmoid", n_groups=4, topk_groups=2, renormalize=False)
    assert r.experts.tolist() == [[3, 1]]


def test_load_balancing_loss_is_one_at_perfect_balance():
    T, E, k = 8, 4, 2
    probs = np.full((T, E), 1 / E)
    experts = np.array([[t % E, (t + 1) % E] for t in range(T)])
    assert R.load_balancing_loss(probs, experts) == pytest.approx(1.0, rel=1e-15)


def test_load_balancing_loss_collapse_and_hand_value():
    E = 4
    probs = np.zeros((3, E))
    probs[:, 0] = 1.0
    assert R.load_balancing_loss(probs, np.zeros((3, 1), dtype=int)) == pytest.approx(E)
    # f = [2/4, 1/4, 1/4, 0], P = [.5, .25, .25, 0] -> 4 * (.25 + 1/16 + 1/16) = 1.5
    probs = np.array([[0.5, 0.5, 0, 0], [0.5, 0, 0.5, 0]])
    experts = np.array([[0, 1], [0, 2]])
    assert R.load_balancing_loss(probs, experts) == pytest.approx(1.5, rel=1e-15)
    # masking the second token: f = [.5, .5, 0, 0], P = [.5, .5, 0, 0] -> 4 * .5 = 2
    assert R.load_balancing_loss(probs, experts, mask=[True, False]) == pytest.approx(2.0)
    assert R.load_balancing_loss(probs, experts, mask=[False, False]) == 0.0


def test_router_z_loss_hand_values():
    assert R.router_z_loss(np.zeros((3, 4))) == pytest.approx(math.log(4.0) ** 2, rel=1e-15)
    z = np.array([[0.0, 0.0], [math.log(3.0), -np.inf]])     # lse = log 2, log 3
    assert R.router_z_loss(z) == pytest.approx((math.log(2) ** 2 + math.log(3) ** 2) / 2)
    assert R.router_z_loss(z, mask=[False, True]) == pytest.approx(math.log(3) ** 2)
    assert R.router_z_loss(z, mask=[False, False]) == 0.0


def test_update_bias_hand_values():
    out = R.update_bias(np.array([0.5, 0.0, -0.5, 0.0]), np.array([4, 0, 2, 2]), 0.25)
    # mean 2: overloaded expert 0 goes down, idle expert 1 up, the others stay
    assert out.dtype == np.float32
    assert out.tolist() == [0.25, 0.25, -0.5, 0.0]


def test_expert_counts_and_routing_stats_hand_values():
    experts = np.array([[0, 1], [0, 2], [0, 1]])
    assert R.expert_counts(experts, 4).tolist() == [3, 2, 1, 0]
    s = R.routing_stats(experts, 4, weights=np.full((3, 2), 0.5))
    assert s["counts"].tolist() == [3, 2, 1, 0]
    assert s["cv"] == pytest.approx(np.std([3, 2, 1, 0]) / 1.5)
    assert s["max_over_mean"] == pytest.approx(2.0)
    assert s["balancedness"] == pytest.approx(0.5)
    assert s["dead_experts"] == 1
    assert s["drop_rate"] == 0.0
    assert s["weight_mass"].tolist() == [1.5, 1.0, 0.5, 0.0]
