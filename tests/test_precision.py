"""16-bit and byte-swapped inputs for the host ops (api.md: conventions and "Precision").

Every op here (route, router_probs, dispatch_plan, permute, unpermute,
load_balancing_loss, router_z_loss, update_bias, routing_stats) takes
float16, bfloat16 (``ml_dtypes``), float32 and float64 in either byte order
(non-native input is converted on the way in), and index arrays in either
byte order. (A byte-swapped bfloat16 prints as ``>V2`` but keeps its type;
a plain void ``V2`` is rejected.)

How 16-bit results are checked, and why these tolerances
--------------------------------------------------------
A 16-bit input widens to float32 exactly, runs the float32 path and the
result is rounded once (to nearest, ties to even) to the input dtype. So:

* bit for bit, a 16-bit result equals the float32 path's result on the
  widened inputs, rounded by NumPy / ml_dtypes (``_check_float32_then_round``);
* against the float64 reference run on the same rounded inputs: the float32
  tolerance plus one rounding, ``rtol = u + RTOL[float32]`` with the unit
  roundoff ``u = 2**-8`` (bfloat16, 8 significant bits) or ``2**-11``
  (float16, 11 bits), ``atol = ATOL[float32]`` (+ ``2**-25`` for float16,
  whose results below ``2**-14`` are subnormal) -- ``conftest.RTOL/ATOL``;
* unpermute's sums can cancel, so it is bounded per element instead:
  ``u |ref| + (1 + u) * 2 (k + 1) eps32 * sum_j |w_j| |ys_j|``, one
  rounding of the output plus the forward error bound of a k-term float32
  recursive sum (``eps32 = 2**-23``, margin 2), as test_dispatch.py does;
* routing choices: exactly the reference's when selection runs on the
  logits (no bias, no groups), since the widened 16-bit logits are the
  reference's values, ties included (and 16-bit rounding makes many ties).
  With a bias or groups the selection scores are float64 values computed in
  another order, so a row may differ only where the reference's own top
  scores are within 1e-12 of a tie (``test_routing.assert_route_valid``);
* losses and telemetry sum the exactly widened values in float64: they
  match the reference to float64 rounding and are Python floats.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

import numoe
from numoe import reference as R
from numoe._cpu import dispatch as cpu_dispatch

from conftest import ATOL, RTOL
from strategies import group_sizes, logits_arrays, make_experts, make_logits, seeds, sizes
from test_routing import assert_route_valid

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
NARROW = (F16, BF16)
FLOATS = (F16, BF16, np.dtype(np.float32), np.dtype(np.float64))
# (dtype, byte-swapped?)
CASES = [(dt, sw) for dt in FLOATS for sw in (False, True)]
CASE_IDS = [f"{dt.name}-{'swapped' if sw else 'native'}" for dt, sw in CASES]
SCORES = ("softmax", "sigmoid")
U = {F16: 2.0**-11, BF16: 2.0**-8}       # unit roundoff of one rounding to 16 bits

cases = pytest.mark.parametrize("dt, swapped", CASES, ids=CASE_IDS)


def stored(a, dt, swapped=False):
    """``(rounded, passed)``: ``a`` rounded to ``dt`` (native order), and the array handed
    to numoe -- the same values in the non-native byte order when ``swapped``."""
    r = np.ascontiguousarray(np.asarray(a).astype(dt))
    if swapped:
        p = r.astype(r.dtype.newbyteorder())
        assert not p.dtype.isnative
        return r, p
    return r, r


def tols(dt):
    t = np.dtype(dt).type
    return dict(rtol=RTOL[t], atol=ATOL[t])


def assert_close(got, want, dt):
    """``got`` has the native dtype ``dt`` and is within the dtype's tolerance of ``want``."""
    assert got.dtype == np.dtype(dt) and got.dtype.isnative
    np.testing.assert_allclose(got.astype(np.float64), want, **tols(dt))


def same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def _check_float32_then_round(got, f32_result, dt):
    """A 16-bit result is the float32 path's result rounded once to ``dt``."""
    if np.dtype(dt) in NARROW:
        same_bits(got, np.asarray(f32_result, dtype=np.float32).astype(dt))


def sample_logits(rng, T=40, E=12):
    """Bounded logits with exact ties, equal rows and -inf entries (one finite per row)."""
    parts = [make_logits(rng, (T // 4, E), np.float64, kind)
             for kind in ("normal", "grid", "equal", "masked")]
    return np.concatenate(parts)




def widen(a):
    return np.asarray(a).astype(np.float32) if a.dtype in NARROW else a


# ------------------------------------------------------------------ routing
@cases
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("k", [1, 3, 12])           # 12 == E: a full descending sort
def test_route(dt, swapped, score, k):
    z, zp = stored(sample_logits(np.random.default_rng(1)), dt, swapped)
    before = zp.copy()
    for renormalize, scale in ((True, 1.0), (False, 2.5)):
        w, ex = numoe.route(zp, k, score=score, renormalize=renormalize, scale=scale)
        ref = R.route(z, k, score=score, renormalize=renormalize, scale=scale)
        np.testing.assert_array_equal(ex, ref.experts)
        assert ex.dtype == np.int32
        assert_close(w, ref.weights, dt)
        f32 = numoe.route(widen(z), k, score=score, renormalize=renormalize, scale=scale)
        np.testing.assert_array_equal(f32.experts, ex)
        _check_float32_then_round(w, f32.weights, dt)
    same_bits(zp, before)                           # input untouched


@cases
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("group_score", ["top2", "max"])
def test_route_bias_and_groups(dt, swapped, score, group_score):
    rng = np.random.default_rng(2)
    z, zp = stored(sample_logits(rng, E=16), dt, swapped)
    bias, bp = stored(rng.integers(-2, 3, 16) * 0.25, dt, swapped)    # grid: ties
    for kw in (dict(bias=bp), dict(n_groups=4, topk_groups=2),
               dict(bias=bp, n_groups=4, topk_groups=3)):
        w, ex = numoe.route(zp, 4, score=score, group_score=group_score, **kw)
        kw["bias"] = bias if "bias" in kw else None
        kw.setdefault("n_groups", 1)
        kw.setdefault("topk_groups", kw["n_groups"])
        assert w.dtype == dt and w.dtype.isnative
        assert_route_valid(z, 4, w, ex, score=score, renormalize=True,
                           group_score=group_score, scale=1.0, **kw)


@cases
@pytest.mark.parametrize("score", SCORES)
def test_router_probs(dt, swapped, score):
    z, zp = stored(sample_logits(np.random.default_rng(3)), dt, swapped)
    p = numoe.router_probs(zp, score)
    assert_close(p, R.router_probs(z, score), dt)
    assert (p.astype(np.float64)[np.isneginf(z.astype(np.float64))] == 0).all()
    _check_float32_then_round(p, numoe.router_probs(widen(z), score), dt)


@cases
def test_all_equal_and_masked_rows(dt, swapped):
    """Ties go to the lower id; sigmoid allows an all -inf row, softmax rejects it."""
    z, zp = stored(np.array([[1.5] * 6, [-np.inf, 2.0, -np.inf, 2.0, 0.5, -np.inf]]),
                   dt, swapped)
    w, ex = numoe.route(zp, 3)
    assert ex.tolist() == [[0, 1, 2], [1, 3, 4]]
    assert_close(w, R.route(z, 3).weights, dt)
    _, masked = stored(np.full((2, 6), -np.inf), dt, swapped)
    w, ex = numoe.route(masked, 2, score="sigmoid", renormalize=False)
    assert ex.tolist() == [[0, 1]] * 2 and (w.astype(np.float64) == 0).all()
    with pytest.raises(ValueError, match="logits"):
        numoe.route(masked, 2)
    with pytest.raises(ValueError, match="logits"):
        numoe.router_probs(masked)


@given(sizes(max_T=600, max_E=64), st.sampled_from(NARROW), st.data(),
       st.sampled_from(SCORES), st.booleans())
def test_route_16bit_matches_reference(size, dt, data, score, renormalize):
    """Plain routing on 16-bit logits: the reference's experts exactly (16-bit
    rounding makes ties common), weights the float32 path's rounded once."""
    T, E, k = size
    kinds = ("normal", "uniform", "grid", "binary", "equal", "masked")
    z = data.draw(logits_arrays(T, E, dtype=np.float64, kinds=kinds)).astype(dt)
    w, ex = numoe.route(z, k, score=score, renormalize=renormalize)
    ref = R.route(z, k, score=score, renormalize=renormalize)
    np.testing.assert_array_equal(ex, ref.experts)
    assert_close(w, ref.weights, dt)
    _check_float32_then_round(w, numoe.route(widen(z), k, score=score,
                                             renormalize=renormalize).weights, dt)


@given(group_sizes(max_T=300), st.sampled_from(NARROW), st.data(), st.sampled_from(SCORES),
       st.booleans(), st.sampled_from(["top2", "max"]))
def test_route_16bit_bias_and_groups(gsize, dt, data, score, with_bias, group_score):
    T, E, k, n_groups, topk_groups = gsize
    kinds = ("normal", "uniform", "grid", "binary", "equal")
    z = data.draw(logits_arrays(T, E, dtype=np.float64, kinds=kinds)).astype(dt)
    rng = np.random.default_rng(data.draw(seeds))
    bias = rng.normal(0.0, 0.5, E).astype(dt) if with_bias else None
    w, ex = numoe.route(z, k, score=score, bias=bias, n_groups=n_groups,
                        topk_groups=topk_groups, group_score=group_score)
    assert w.dtype == dt
    assert_route_valid(z, k, w, ex, score=score, renormalize=True, bias=bias,
                       n_groups=n_groups, topk_groups=topk_groups, group_score=group_score,
                       scale=1.0)


# ----------------------------------------------------------------- dispatch
def _plan_inputs(rng, T=30, k=3, E=5):
    ex = make_experts(rng, T, k, E, distinct=False)
    w = rng.integers(1, 5, (T, k)) * 0.25                   # many exact ties
    return ex, w, E


@cases
def test_dispatch_plan_score_weights(dt, swapped):
    ex, w, E = _plan_inputs(np.random.default_rng(4))
    w[0, 0] = 1.0 + 2.0**-12          # rounds to 1.0 in both 16-bit formats: a tie there
    w16, wp = stored(w, dt, swapped)
    exp = ex.astype(np.dtype(np.int64).newbyteorder()) if swapped else ex
    plan = numoe.dispatch_plan(exp, E, capacity=4, weights=wp, drop_policy="score")
    want = R.dispatch_plan(ex, E, capacity=4, weights=w16, drop_policy="score")
    for name in ("order", "offsets", "counts", "dropped"):
        np.testing.assert_array_equal(getattr(plan, name), getattr(want, name), err_msg=name)
    assert plan.order.dtype == np.int32 and plan.order.dtype.isnative


def _combine_bound(y, ref, w, ys_abs, plan, dt):
    """Per-element bound on a 16-bit (or float32/64) unpermute result; see the module doc."""
    k = plan.dropped.shape[1]
    acc = np.dtype(np.float32) if dt in NARROW else np.dtype(dt)
    u = U.get(np.dtype(dt), 0.0)
    wabs = np.where(plan.dropped, 0.0, np.abs(w.astype(np.float64))).sum(1, keepdims=True)
    bound = (u * np.abs(ref) + (1 + u) * 2 * (k + 1) * np.finfo(acc).eps * wabs * ys_abs
             + (2.0**-25 if np.dtype(dt) == F16 else 0.0) + np.finfo(acc).tiny)
    err = np.abs(y.astype(np.float64) - ref)
    assert (err <= bound).all(), float((err - bound).max())


@cases
def test_permute_unpermute(dt, swapped):
    rng = np.random.default_rng(5)
    ex, w, E = _plan_inputs(rng, T=64)
    plan = numoe.dispatch_plan(ex, E, capacity=40)
    if swapped:                                     # index arrays in the other byte order too
        plan = plan._replace(**{f: getattr(plan, f).astype(getattr(plan, f).dtype
                                                           .newbyteorder())
                                for f in ("order", "offsets", "counts")})
        assert not plan.order.dtype.isnative
    T, k = ex.shape
    x, xp = stored(rng.uniform(-30, 30, (T, 33)), dt, swapped)
    xs = numoe.permute(xp, plan)
    assert xs.dtype == dt and xs.dtype.isnative
    np.testing.assert_array_equal(xs.astype(np.float64), R.permute(x, plan))   # a copy
    ys, ysp = stored(rng.uniform(-30, 30, xs.shape), dt, swapped)
    for wdt in (np.float64, dt):                    # weights of another dtype, or the same
        w_, wp = stored(w * rng.random((T, k)), wdt, swapped)
        y = numoe.unpermute(ysp, plan, wp)
        assert y.dtype == dt and y.dtype.isnative and y.shape == (T, 33)
        ref = R.unpermute(ys, plan, w_.astype(np.float32) if dt in NARROW else w_)
        _combine_bound(y, ref, w_, 30.0, plan, dt)
        _check_float32_then_round(
            y, numoe.unpermute(widen(ys), plan, w_.astype(np.float32)), dt)
    # out= takes the native dtype of the input
    out = np.full((T, 33), 7, dt)
    assert numoe.unpermute(ysp, plan, wp, out=out) is out
    same_bits(out, y)
    out = np.full(xs.shape, 7, dt)
    assert numoe.permute(xp, plan, out=out) is out
    same_bits(out, xs)
    with pytest.raises(TypeError, match="out"):
        numoe.permute(xp, plan, out=np.empty(xs.shape, np.float32 if dt != np.float32
                                             else np.float64))


@pytest.mark.parametrize("dt", NARROW, ids=lambda d: d.name)
def test_narrow_unpermute_modes_bit_identical(dt):
    """Serial and parallel 16-bit combine, any tokens per task, give the same bits;
    a token whose slots were all dropped gets +0.0."""
    rng = np.random.default_rng(6)
    ex, w, E = _plan_inputs(rng, T=50)
    plan = numoe.dispatch_plan(ex, E, capacity=9)
    assert plan.dropped.all(axis=1).any()           # some token lost every slot
    T, k = ex.shape
    ys = rng.normal(0, 3, (len(plan.order), 19)).astype(dt)
    w32 = w.astype(np.float32)
    want = numoe.unpermute(ys, plan, w32)
    assert (want[plan.dropped.all(axis=1)].view(np.uint16) == 0).all()
    pos, bad = cpu_dispatch.inverse_positions(plan.order, plan.dropped.reshape(-1))
    assert bad == 0
    kind = 1 if dt == BF16 else 2
    old = cpu_dispatch.NARROW_ROWS_PER_TASK
    try:
        for rows, mode in ((1, "parallel"), (7, "parallel"), (16, "serial")):
            cpu_dispatch.NARROW_ROWS_PER_TASK = rows
            out = np.full((T, 19), 1, np.uint16)
            cpu_dispatch.unpermute_narrow(ys.view(np.uint16), pos, w32, k, out, kind,
                                          mode=mode)
            assert out.tobytes() == want.tobytes(), (rows, mode)
    finally:
        cpu_dispatch.NARROW_ROWS_PER_TASK = old


@pytest.mark.parametrize("dt", NARROW, ids=lambda d: d.name)
def test_narrow_permute_streaming_stores(dt):
    """The streaming-store permute copies 16-bit rows as uint16 bits, also into
    destinations whose rows are not 32-byte aligned."""
    rng = np.random.default_rng(7)
    ex, _, E = _plan_inputs(rng, T=40)
    plan = numoe.dispatch_plan(ex, E)
    x = rng.normal(0, 3, (40, 37)).astype(dt)
    want = R.permute(x, plan).astype(dt).view(np.uint16)
    for mode in ("serial", "parallel", "stream"):
        xs = np.zeros(want.shape, np.uint16)
        cpu_dispatch.permute(x.view(np.uint16), plan.order, 3, xs, mode=mode)
        np.testing.assert_array_equal(xs, want)
    big = np.zeros(want.size + 3, np.uint16)
    xs = big[3:].reshape(want.shape)
    cpu_dispatch._permute_stream(x.view(np.uint16), plan.order, 3, xs, 4)
    np.testing.assert_array_equal(xs, want)
    assert (big[:3] == 0).all()


@st.composite
def combine_16bit(draw):
    T, E, k = draw(sizes(max_T=400, max_E=32))
    dt = draw(st.sampled_from(NARROW))
    rng = np.random.default_rng(draw(seeds))
    ex = make_experts(rng, T, k, E, distinct=draw(st.booleans()))
    cap = draw(st.one_of(st.none(), st.integers(1, max(1, T))))
    w = (rng.random((T, k)) * draw(st.sampled_from([1.0, 4.0]))).astype(dt)
    H = draw(st.integers(1, 40))
    return ex, E, cap, w, rng.uniform(-30, 30, (T, H)).astype(dt)


@given(combine_16bit(), st.sampled_from(["slot", "position", "score"]))
def test_combine_16bit_matches_reference(problem, policy):
    ex, E, cap, w, x = problem
    dt = x.dtype
    plan = numoe.dispatch_plan(ex, E, capacity=cap, weights=w, drop_policy=policy)
    want = R.dispatch_plan(ex, E, capacity=cap, weights=w, drop_policy=policy)
    np.testing.assert_array_equal(plan.order, want.order)
    xs = numoe.permute(x, plan)
    same_bits(xs, x[plan.order // ex.shape[1]])
    ys = (xs.astype(np.float32) * np.float32(0.75)).astype(dt)
    y = numoe.unpermute(ys, plan, w)
    _combine_bound(y, R.unpermute(ys, plan, w), w, 30.0, plan, dt)
    _check_float32_then_round(y, numoe.unpermute(widen(ys), plan, widen(w)), dt)


# ------------------------------------------------------------------- losses
@cases
def test_losses_and_stats(dt, swapped):
    rng = np.random.default_rng(8)
    z, zp = stored(sample_logits(rng), dt, swapped)
    T, E = z.shape
    p, pp = stored(R.router_probs(z), dt, swapped)
    ex = R.route(z, 3).experts
    exp = ex.astype(np.dtype(np.int32).newbyteorder()) if swapped else ex
    mask = (np.arange(T) % 3 != 0).astype(np.dtype(np.int32).newbyteorder()
                                          if swapped else np.int32)
    for m in (None, mask):
        got = numoe.load_balancing_loss(pp, exp, mask=m)
        assert type(got) is float
        assert got == pytest.approx(R.load_balancing_loss(p, ex, mask=m), rel=1e-12)
        got = numoe.router_z_loss(zp, mask=m)
        assert type(got) is float
        assert got == pytest.approx(R.router_z_loss(z, mask=m), rel=1e-12)
    b, bp = stored(rng.normal(0, 0.5, E), dt, swapped)
    counts = numoe.expert_counts(exp, E)
    cp = counts.astype(counts.dtype.newbyteorder()) if swapped else counts
    nb = numoe.update_bias(bp, cp, 1e-3)
    assert nb.dtype == np.float32                 # the optimizer state's dtype, always
    same_bits(nb, R.update_bias(b, counts, 1e-3))
    nb = numoe.update_bias(bp, stored(counts, dt, swapped)[1], 1e-3)   # float counts too
    same_bits(nb, R.update_bias(b, counts, 1e-3))
    w, wp = stored(R.route(z, 3).weights, dt, swapped)
    plan = numoe.dispatch_plan(ex, E, capacity=8)
    s = numoe.routing_stats(exp, E, weights=wp, plan=plan)
    want = R.routing_stats(ex, E, weights=w, plan=plan)
    np.testing.assert_array_equal(s["counts"], want["counts"])
    np.testing.assert_allclose(s["weight_mass"], want["weight_mass"], rtol=1e-12)
    assert s["drop_rate"] == want["drop_rate"]


# --------------------------------------------------------------- edge cases
@cases
def test_zero_tokens(dt, swapped):
    _, z = stored(np.zeros((0, 6)), dt, swapped)
    w, ex = numoe.route(z, 6)
    assert w.shape == (0, 6) and w.dtype == dt and ex.shape == (0, 6)
    assert numoe.router_probs(z).dtype == dt
    plan = numoe.dispatch_plan(np.zeros((0, 2), np.int32), 6, capacity=1, weights=w[:, :2],
                               drop_policy="score")
    _, x = stored(np.zeros((0, 5)), dt, swapped)
    xs = numoe.permute(x, plan)
    assert xs.shape == (0, 5) and xs.dtype == dt
    y = numoe.unpermute(xs, plan, w[:, :2])
    assert y.shape == (0, 5) and y.dtype == dt
    assert numoe.load_balancing_loss(z, ex) == 0.0
    assert numoe.router_z_loss(z) == 0.0
    assert numoe.routing_stats(ex, 6, weights=w)["weight_mass"].tolist() == [0.0] * 6


@pytest.mark.parametrize("dt", NARROW, ids=lambda d: d.name)
def test_leading_dims_kept(dt):
    z = np.random.default_rng(9).normal(0, 2, (2, 3, 8)).astype(dt)
    w, ex = numoe.route(z, 2)
    assert w.shape == (2, 3, 2) and w.dtype == dt
    same_bits(w.reshape(6, 2), numoe.route(z.reshape(6, 8), 2).weights)
    assert numoe.router_probs(z).shape == (2, 3, 8)


BAD = [
    ("int logits", lambda: numoe.route(np.zeros((2, 4), np.int32), 1), TypeError,
     "logits must be float16, bfloat16, float32 or float64, got dtype int32"),
    ("void logits", lambda: numoe.route(np.zeros((2, 4), "V2"), 1), TypeError,
     "logits must be float16, bfloat16, float32 or float64, got dtype \\|V2"),
    ("nan bf16 logits", lambda: numoe.route(np.full((2, 4), np.nan, BF16), 1), ValueError,
     "logits"),
    ("+inf f16 logits", lambda: numoe.router_probs(np.full((2, 4), np.inf, F16)), ValueError,
     "logits"),
    ("nan bf16 bias", lambda: numoe.route(np.zeros((2, 4)), 1, bias=np.full(4, np.nan, BF16)),
     ValueError, "bias"),
    ("inf f16 weights", lambda: numoe.dispatch_plan(
        np.zeros((2, 1), np.int32), 2, capacity=1, weights=np.full((2, 1), np.inf, F16),
        drop_policy="score"), ValueError, "weights"),
    ("int ys", lambda: numoe.unpermute(np.zeros((2, 3), np.int16),
                                       numoe.dispatch_plan(np.zeros((2, 1), np.int32), 1),
                                       np.ones((2, 1), BF16)), TypeError, "ys"),
    ("nan bf16 weights", lambda: numoe.unpermute(
        np.zeros((2, 3), BF16), numoe.dispatch_plan(np.zeros((2, 1), np.int32), 1),
        np.full((2, 1), np.nan, BF16)), ValueError, "weights"),
    ("bf16 out for f32 ys", lambda: numoe.unpermute(
        np.zeros((2, 3), np.float32), numoe.dispatch_plan(np.zeros((2, 1), np.int32), 1),
        np.ones((2, 1)), out=np.zeros((2, 3), BF16)), TypeError, "out"),
    ("swapped out", lambda: numoe.permute(
        np.zeros((2, 3), F16), numoe.dispatch_plan(np.zeros((2, 1), np.int32), 1),
        out=np.zeros((2, 3), F16.newbyteorder())), TypeError, "out"),
    ("nan bf16 probs", lambda: numoe.load_balancing_loss(
        np.full((2, 4), np.nan, BF16), np.zeros((2, 1), np.int32)), ValueError, "probs"),
    ("all -inf f16 z-loss row", lambda: numoe.router_z_loss(np.full((2, 4), -np.inf, F16)),
     ValueError, "logits"),
    ("nan bf16 bias update", lambda: numoe.update_bias(
        np.full(3, np.nan, BF16), np.ones(3), 0.1), ValueError, "bias"),
    ("int8 bias update", lambda: numoe.update_bias(np.zeros(3, np.int8), np.ones(3), 0.1),
     TypeError, "bias"),
    ("nan f16 stats weights", lambda: numoe.routing_stats(
        np.zeros((2, 1), np.int32), 2, weights=np.full((2, 1), np.nan, F16)), ValueError,
     "weights"),
]


@pytest.mark.parametrize("call, exc, text", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(call, exc, text):
    with pytest.raises(exc, match=text):
        call()
