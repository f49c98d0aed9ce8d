"""numoe losses, balancing and telemetry against the float64 reference, plus properties."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import numoe
from numoe import reference as R
from numoe._jit import threads
from numoe._types import DispatchPlan

from conftest import to_backend, to_host
from strategies import (dtypes, experts_arrays, make_experts, make_logits, masks, routings,
                        seeds, sizes, softmax)

REL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def _call(backend, fn, *args, **kw):
    """``fn`` with its array arguments moved to the backend; array results back on the host."""
    move = lambda v: to_backend(backend, v) if isinstance(v, np.ndarray) else v  # noqa: E731
    out = fn(*map(move, args), **{n: move(v) for n, v in kw.items()})
    return out if isinstance(out, (float, dict)) else to_host(out)


@st.composite
def balance_problems(draw, max_T=3000, max_E=300):
    """``(probs [T, E], experts [T, k], mask [T] or None)``."""
    T, E, k = draw(sizes(max_T, max_E))
    dtype = draw(dtypes)
    rng = np.random.default_rng(draw(seeds))
    kind = draw(st.sampled_from(["normal", "grid", "masked", "equal"]))
    probs = softmax(make_logits(rng, (T, E), np.float64, kind)).astype(dtype)
    experts = draw(experts_arrays(T, k, E))
    mask = draw(st.one_of(st.none(), masks(T)))
    return probs, experts, mask


# -------------------------------------------------------------- vs the oracle
@given(balance_problems())
def test_load_balancing_loss_matches_reference(problem):
    probs, experts, mask = problem
    got = numoe.load_balancing_loss(probs, experts, mask=mask)
    assert isinstance(got, float)
    assert got == pytest.approx(R.load_balancing_loss(probs, experts, mask=mask),
                                rel=REL[probs.dtype], abs=1e-12)


@given(sizes(), dtypes, seeds, st.sampled_from(["normal", "uniform", "grid", "masked"]),
       st.data())
def test_router_z_loss_matches_reference(size, dtype, seed, kind, data):
    T, E, _ = size
    z = make_logits(np.random.default_rng(seed), (T, E), dtype, kind)
    mask = data.draw(st.one_of(st.none(), masks(T)))
    got = numoe.router_z_loss(z, mask=mask)
    assert isinstance(got, float)
    assert got == pytest.approx(R.router_z_loss(z, mask=mask), rel=REL[np.dtype(dtype)],
                                abs=1e-12)


@given(sizes(), seeds, st.data())
def test_expert_counts_matches_reference(size, seed, data):
    T, E, k = size
    experts = data.draw(experts_arrays(T, k, E))
    got = numoe.expert_counts(experts, E)
    assert got.dtype == np.int64 and got.shape == (E,)
    np.testing.assert_array_equal(got, R.expert_counts(experts, E))
    assert got.sum() == T * k


@given(st.integers(1, 300), seeds, st.sampled_from(["int", "grid", "float"]),
       st.sampled_from([0.0, 1e-3, 0.25]), dtypes)
def test_update_bias_matches_reference(E, seed, kind, rate, dtype):
    rng = np.random.default_rng(seed)
    bias = rng.normal(0, 0.1, E).astype(dtype)
    if kind == "int":
        counts = rng.integers(0, 50, E)
    elif kind == "grid":
        counts = rng.integers(0, 4, E) * 0.5
    else:
        counts = rng.random(E) * 10
    got = numoe.update_bias(bias, counts, rate)
    assert got.dtype == np.float32 and got.shape == (E,)
    np.testing.assert_array_equal(got, R.update_bias(bias, counts, rate))


def _assert_stats_equal(got, ref):
    assert set(got) == set(ref)
    for key, v in ref.items():
        if key == "weight_mass":
            np.testing.assert_allclose(got[key], v, rtol=1e-12, atol=1e-12)
        elif isinstance(v, np.ndarray):
            assert got[key].dtype == v.dtype
            np.testing.assert_array_equal(got[key], v)
        else:
            assert type(got[key]) is type(v), key
            assert got[key] == v, key


def _plan_for(experts, E, rng):
    """A DispatchPlan-shaped stand-in (only counts and dropped are read)."""
    dropped = rng.random(experts.shape) < 0.2
    counts = np.bincount(experts[~dropped].reshape(-1), minlength=E).astype(np.int64)
    return DispatchPlan(None, None, counts, dropped, 1)


@given(routings(), st.booleans(), st.booleans(), seeds)
def test_routing_stats_matches_reference(routing, with_weights, with_plan, seed):
    weights, experts, E = routing
    w = weights if with_weights else None
    plan = _plan_for(experts, E, np.random.default_rng(seed)) if with_plan else None
    _assert_stats_equal(numoe.routing_stats(experts, E, weights=w, plan=plan),
                        R.routing_stats(experts, E, weights=w, plan=plan))


# ---------------------------------------------------------------- properties
@given(balance_problems(max_T=500, max_E=64), seeds)
def test_aux_loss_invariant_under_relabelling_experts(problem, seed):
    probs, experts, mask = problem
    E = probs.shape[1]
    perm = np.random.default_rng(seed).permutation(E)       # expert e is now called perm[e]
    inv = np.argsort(perm)
    a = numoe.load_balancing_loss(probs, experts, mask=mask)
    b = numoe.load_balancing_loss(probs[:, inv], perm[experts], mask=mask)
    assert b == pytest.approx(a, rel=1e-5 if probs.dtype == np.float32 else 1e-12, abs=1e-12)


def test_aux_loss_is_one_at_perfect_balance_and_e_at_collapse(backend):
    T, E, k = 64, 8, 2
    probs = np.full((T, E), 1 / E)
    experts = np.stack([np.arange(T) % E, (np.arange(T) + 3) % E], axis=1).astype(np.int32)
    assert _call(backend, numoe.load_balancing_loss, probs, experts) == pytest.approx(1.0)
    one_hot = np.zeros((T, E))
    one_hot[:, 0] = 1
    collapsed = np.zeros((T, 1), dtype=np.int32)
    assert _call(backend, numoe.load_balancing_loss, one_hot, collapsed) == pytest.approx(E)


def test_losses_from_route(backend):
    """The intended pipeline: route -> loss, with leading dims and a padding mask."""
    rng = np.random.default_rng(0)
    z = make_logits(rng, (2, 16, 8), np.float32, "normal")
    mask = rng.random((2, 16)) < 0.7
    r = numoe.route(z, 2)
    probs = numoe.router_probs(z)
    got = _call(backend, numoe.load_balancing_loss, probs, r.experts, mask=mask)
    ref = R.load_balancing_loss(R.router_probs(z.reshape(-1, 8)), r.experts.reshape(-1, 2),
                                mask=mask.reshape(-1))
    assert got == pytest.approx(ref, rel=1e-5)
    got = _call(backend, numoe.router_z_loss, z, mask=mask)
    assert got == pytest.approx(R.router_z_loss(z.reshape(-1, 8), mask=mask.reshape(-1)),
                                rel=1e-5)


def test_zero_tokens_and_all_masked(backend):
    probs = np.zeros((0, 4))
    experts = np.zeros((0, 2), dtype=np.int32)
    assert _call(backend, numoe.load_balancing_loss, probs, experts) == 0.0
    assert _call(backend, numoe.router_z_loss, np.zeros((0, 4))) == 0.0
    assert _call(backend, numoe.expert_counts, experts, 4).tolist() == [0, 0, 0, 0]
    z = np.zeros((3, 4))
    none = np.zeros(3, dtype=bool)
    assert _call(backend, numoe.router_z_loss, z, mask=none) == 0.0
    assert _call(backend, numoe.load_balancing_loss, np.full((3, 4), 0.25),
                 np.zeros((3, 1), np.int32), mask=none) == 0.0
    s = numoe.routing_stats(experts, 4)
    _assert_stats_equal(s, R.routing_stats(experts, 4))


def test_masked_rows_may_hold_anything():
    """Padding rows are skipped: an all -inf or NaN row there is not an error."""
    z = np.zeros((3, 4))
    z[1] = -np.inf
    z[2, 0] = np.nan
    m = np.array([True, False, False])
    assert numoe.router_z_loss(z, mask=m) == pytest.approx(np.log(4.0) ** 2)
    p = np.full((3, 4), 0.25)
    p[2] = np.nan
    assert numoe.load_balancing_loss(p, np.zeros((3, 1), np.int64), mask=m) == pytest.approx(1.0)
    # -inf entries in a counted row are fine for the z-loss
    z2 = np.array([[0.0, -np.inf]])
    assert numoe.router_z_loss(z2) == 0.0


def test_integer_mask_and_leading_dims():
    z = np.zeros((2, 3, 4))
    m = np.array([[1, 0, 1], [0, 0, 1]])
    assert numoe.router_z_loss(z, mask=m) == pytest.approx(np.log(4.0) ** 2)
    assert numoe.router_z_loss(z, mask=m.reshape(-1)) == pytest.approx(np.log(4.0) ** 2)


@pytest.mark.parametrize("fn", ["balance", "z", "counts", "stats"])
def test_identical_at_any_thread_count(fn):
    rng = np.random.default_rng(9)
    T, E, k = 5000, 32, 4
    z = make_logits(rng, (T, E), np.float32, "normal")
    probs = softmax(z).astype(np.float32)
    experts = make_experts(rng, T, k, E)
    weights = rng.random((T, k)).astype(np.float32)
    mask = rng.random(T) < 0.9
    call = {
        "balance": lambda: numoe.load_balancing_loss(probs, experts, mask=mask),
        "z": lambda: numoe.router_z_loss(z, mask=mask),
        "counts": lambda: numoe.expert_counts(experts, E).tolist(),
        "stats": lambda: numoe.routing_stats(experts, E, weights=weights)["weight_mass"].tobytes(),
    }[fn]
    with threads(1):
        a = call()
    with threads(2):
        b = call()
    assert a == b


def test_inputs_not_modified_and_odd_layouts_work():
    rng = np.random.default_rng(1)
    z = make_logits(rng, (50, 12), np.float64, "normal")
    probs = softmax(z)[::2, :]                   # non-contiguous
    experts = np.asfortranarray(make_experts(rng, 25, 3, 12))
    mask = (rng.random(50) < 0.5)[::2]
    copies = [a.copy() for a in (probs, experts, mask)]
    for a in (probs, experts, mask):
        a.setflags(write=False)
    got = numoe.load_balancing_loss(probs, experts, mask=mask)
    assert got == pytest.approx(R.load_balancing_loss(probs, experts, mask=mask), rel=1e-12)
    assert numoe.router_z_loss(z.T.copy().T, mask=None) == pytest.approx(R.router_z_loss(z))
    np.testing.assert_array_equal(numoe.expert_counts(experts, 12), R.expert_counts(experts, 12))
    bias = np.zeros(12, dtype=np.float32)
    counts = numoe.expert_counts(experts, 12)
    bias.setflags(write=False)
    new = numoe.update_bias(bias, counts, 0.01)
    assert new is not bias and np.all(bias == 0)
    for a, c in zip((probs, experts, mask), copies):
        np.testing.assert_array_equal(a, c)


def test_update_bias_examples(backend):
    out = _call(backend, numoe.update_bias, np.array([0.5, 0.0, -0.5, 0.0]),
                np.array([4, 0, 2, 2]), 0.25)
    assert out.dtype == np.float32 and out.tolist() == [0.25, 0.25, -0.5, 0.0]


# ---------------------------------------------------------------- bad inputs
P = np.full((4, 3), 1 / 3)
EX = np.zeros((4, 2), dtype=np.int32)
BAD = [
    ("probs int", lambda: numoe.load_balancing_loss(np.ones((4, 3), int), EX), TypeError,
     "probs"),
    ("probs nan", lambda: numoe.load_balancing_loss(np.full((4, 3), np.nan), EX), ValueError,
     "probs"),
    ("probs no experts", lambda: numoe.load_balancing_loss(np.zeros((4, 0)), EX), ValueError,
     "probs"),
    ("experts float", lambda: numoe.load_balancing_loss(P, EX.astype(float)), TypeError,
     "experts"),
    ("experts out of range", lambda: numoe.load_balancing_loss(P, EX + 3), ValueError, "experts"),
    ("experts negative", lambda: numoe.load_balancing_loss(P, EX - 1), ValueError, "experts"),
    ("experts wrong T", lambda: numoe.load_balancing_loss(P, EX[:3]), ValueError, "experts"),
    ("experts k = 0", lambda: numoe.load_balancing_loss(P, EX[:, :0]), ValueError, "experts"),
    ("mask float", lambda: numoe.load_balancing_loss(P, EX, mask=np.ones(4)), TypeError, "mask"),
    ("mask shape", lambda: numoe.load_balancing_loss(P, EX, mask=np.ones(5, bool)), ValueError,
     "mask"),
    ("z logits int", lambda: numoe.router_z_loss(np.zeros((2, 3), int)), TypeError, "logits"),
    ("z logits nan", lambda: numoe.router_z_loss(np.full((2, 3), np.nan)), ValueError, "logits"),
    ("z logits +inf", lambda: numoe.router_z_loss(np.full((2, 3), np.inf)), ValueError,
     "logits"),
    ("z logits all -inf row", lambda: numoe.router_z_loss(np.full((2, 3), -np.inf)), ValueError,
     "logits"),
    ("z mask shape", lambda: numoe.router_z_loss(np.zeros((2, 3)), mask=np.ones(3, bool)),
     ValueError, "mask"),
    ("counts ids float", lambda: numoe.expert_counts(np.zeros(3), 4), TypeError, "experts"),
    ("counts id too big", lambda: numoe.expert_counts(np.array([0, 4]), 4), ValueError,
     "experts"),
    ("counts num_experts 0", lambda: numoe.expert_counts(EX, 0), ValueError, "num_experts"),
    ("counts num_experts float", lambda: numoe.expert_counts(EX, 4.0), TypeError,
     "num_experts"),
    ("bias int", lambda: numoe.update_bias(np.zeros(3, int), np.zeros(3), 0.1), TypeError,
     "bias"),
    ("bias 2-D", lambda: numoe.update_bias(np.zeros((1, 3)), np.zeros(3), 0.1), ValueError,
     "bias"),
    ("bias empty", lambda: numoe.update_bias(np.zeros(0), np.zeros(0), 0.1), ValueError, "bias"),
    ("bias nan", lambda: numoe.update_bias(np.full(3, np.nan), np.zeros(3), 0.1), ValueError,
     "bias"),
    ("counts shape", lambda: numoe.update_bias(np.zeros(3), np.zeros(4), 0.1), ValueError,
     "counts"),
    ("counts negative", lambda: numoe.update_bias(np.zeros(3), -np.ones(3), 0.1), ValueError,
     "counts"),
    ("counts nan", lambda: numoe.update_bias(np.zeros(3), np.full(3, np.nan), 0.1), ValueError,
     "counts"),
    ("counts bool", lambda: numoe.update_bias(np.zeros(3), np.ones(3, bool), 0.1), TypeError,
     "counts"),
    ("rate nan", lambda: numoe.update_bias(np.zeros(3), np.zeros(3), float("nan")), ValueError,
     "rate"),
    ("rate negative", lambda: numoe.update_bias(np.zeros(3), np.zeros(3), -0.1), ValueError,
     "rate"),
    ("stats weights shape", lambda: numoe.routing_stats(EX, 3, weights=np.ones((4, 3))),
     ValueError, "weights"),
    ("stats weights nan", lambda: numoe.routing_stats(EX, 3, weights=np.full((4, 2), np.nan)),
     ValueError, "weights"),
    ("stats ids", lambda: numoe.routing_stats(EX + 3, 3), ValueError, "experts"),
    ("stats plan type", lambda: numoe.routing_stats(EX, 3, plan=object()), TypeError, "plan"),
    ("stats plan counts", lambda: numoe.routing_stats(
        EX, 3, plan=DispatchPlan(None, None, np.zeros(2, int), np.zeros((4, 2), bool), None)),
     ValueError, "plan.counts"),
    ("stats plan dropped", lambda: numoe.routing_stats(
        EX, 3, plan=DispatchPlan(None, None, np.zeros(3, int), np.zeros((4, 3), bool), None)),
     ValueError, "plan.dropped"),
]


@pytest.mark.parametrize("call, exc, name", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(call, exc, name):
    with pytest.raises(exc, match=name):
        call()
