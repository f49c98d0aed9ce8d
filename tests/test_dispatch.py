"""Tests for numoe.dispatch: dispatch_plan, capacity, permute, unpermute."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import numoe
from numoe import reference as ref
from numoe._cpu import dispatch as cpu_dispatch

from conftest import ATOL, RTOL, to_backend, to_host
from strategies import dtypes, experts_arrays, seeds, sizes

POLICIES = ("slot", "position", "score")
MAX_CELLS = 1 << 17          # keeps T*k (and the Python-loop reference) cheap


# ------------------------------------------------------------------ helpers
def make_weights(rng, shape, kind):
    """Weights with exact ties ("grid"), continuous, or all equal; finite."""
    if kind == "grid":
        w = rng.integers(-2, 5, shape) * 0.25
        w[w == 0] = -0.0 if rng.random() < 0.5 else 0.0
    elif kind == "equal":
        w = np.full(shape, 0.5)
    else:
        w = rng.random(shape)
    return w


@st.composite
def plan_problems(draw, max_cells=MAX_CELLS, policy=None):
    """``(experts [T, k], E, capacity, weights [T, k], policy)``; overflow is common."""
    _, E, k = draw(sizes(max_T=3000, max_E=300, max_cells=max_cells))
    T = draw(st.one_of(st.integers(0, 8), st.integers(1, 200), st.integers(1, 3000)))
    T = min(T, max_cells // k, (1 << 19) // E)
    distinct = draw(st.booleans())
    ex = draw(experts_arrays(T, k, E, distinct=distinct))
    rng = np.random.default_rng(draw(seeds))
    w = make_weights(rng, (T, k), draw(st.sampled_from(["grid", "equal", "cont"])))
    w = w.astype(draw(dtypes))
    if policy is None:
        policy = draw(st.sampled_from(POLICIES))
    counts = np.bincount(ex.reshape(-1), minlength=E)
    top = int(counts.max()) if counts.size and T else 1
    mode = draw(st.sampled_from(["below", "any", "none"]))
    if mode == "below":                                   # overflows when top >= 2
        cap = draw(st.integers(1, max(1, top - 1)))
    else:
        cap = draw(st.integers(1, top + 2)) if mode == "any" else None
    return ex, E, cap, w, policy


def check_plan_properties(plan, ex, E, cap):
    """Invariants every plan must satisfy (style.md)."""
    T, k = ex.shape
    order, offsets, counts, dropped = plan.order, plan.offsets, plan.counts, plan.dropped
    assert order.dtype == np.int32 and order.ndim == 1
    assert offsets.dtype == np.int64 and offsets.shape == (E + 1,)
    assert counts.dtype == np.int64 and counts.shape == (E,)
    assert dropped.dtype == np.bool_ and dropped.shape == (T, k)
    assert plan.capacity == cap
    assert offsets[0] == 0 and offsets[-1] == len(order)
    np.testing.assert_array_equal(np.diff(offsets), counts)
    flat = ex.reshape(-1)
    full = np.bincount(flat, minlength=E)
    if cap is not None:
        assert (counts <= cap).all()                      # no expert over capacity
        np.testing.assert_array_equal(counts, np.minimum(full, cap))
    else:
        assert not dropped.any()
        np.testing.assert_array_equal(counts, full)
    for e in range(E):                                    # grouped, ascending inside
        seg = order[offsets[e]:offsets[e + 1]]
        assert (flat[seg] == e).all()
        assert (np.diff(seg) > 0).all()
    kept = np.zeros(T * k, bool)
    kept[order] = True
    np.testing.assert_array_equal(kept, ~dropped.reshape(-1))


def assert_plan_equal(got, want):
    for name in ("order", "offsets", "counts", "dropped"):
        g, w = np.asarray(getattr(got, name)), np.asarray(getattr(want, name))
        assert g.dtype == w.dtype, name
        np.testing.assert_array_equal(g, w, err_msg=name)
    assert got.capacity == want.capacity


def tol(dtype):
    return dict(rtol=RTOL[dtype], atol=ATOL[dtype])


def assert_weighted_sum_close(y, want, w, ys_abs, plan):
    """``y`` (sequential sum of k products in y.dtype) vs a float64 ``want``.

    Forward error bound of a k-term recursive sum: ``(k + 1) * u * sum_j
    |w_j| * |ys_j|`` per element (u = unit roundoff); checked with margin 2.
    """
    k = plan.dropped.shape[1]
    u = np.finfo(y.dtype).eps
    wabs = np.where(plan.dropped, 0.0, np.abs(w.astype(np.float64))).sum(1, keepdims=True)
    bound = 2 * (k + 1) * u * wabs * ys_abs + np.finfo(y.dtype).tiny
    err = np.abs(y.astype(np.float64) - want)
    assert (err <= bound).all(), float((err - bound).max())


# ----------------------------------------------------------- dispatch_plan
@pytest.mark.parametrize("policy", POLICIES)
@given(data=st.data())
def test_dispatch_plan_matches_reference(policy, data):
    ex, E, cap, w, policy = data.draw(plan_problems(policy=policy))
    plan = numoe.dispatch_plan(ex, E, capacity=cap, weights=w, drop_policy=policy)
    assert_plan_equal(plan, ref.dispatch_plan(ex, E, capacity=cap, weights=w,
                                              drop_policy=policy))
    check_plan_properties(plan, ex, E, cap)


@given(plan_problems(max_cells=1 << 14), st.integers(1, 50))
def test_dispatch_plan_independent_of_chunking(problem, chunk):
    """The counting sort's chunk size never shows in the result."""
    ex, E, cap, w, policy = problem
    want = numoe.dispatch_plan(ex, E, capacity=cap, weights=w, drop_policy=policy)
    code = {"slot": cpu_dispatch.POLICY_SLOT, "position": cpu_dispatch.POLICY_POSITION,
            "score": cpu_dispatch.POLICY_SCORE}[policy]
    got = cpu_dispatch.dispatch_plan(ex.reshape(-1), E, ex.shape[1], cap, code,
                                     w.reshape(-1), np.int32, chunk=chunk)
    for g, name in zip(got, ("order", "offsets", "counts", "dropped")):
        np.testing.assert_array_equal(g, np.asarray(getattr(want, name)).reshape(-1),
                                      err_msg=name)


def test_dispatch_plan_many_chunks_all_policies():
    """Several default-size chunks (T*k > 4 * 4096), skewed load, every policy."""
    rng = np.random.default_rng(7)
    T, E, k = 9000, 24, 3
    p = rng.dirichlet(np.full(E, 0.3))
    ex = rng.choice(E, size=(T, k), p=p).astype(np.int32)
    w = make_weights(rng, (T, k), "grid")
    for policy in POLICIES:
        for cap in (None, 1, 500, numoe.capacity(T, E, k, 1.0), T * k):
            plan = numoe.dispatch_plan(ex, E, capacity=cap, weights=w, drop_policy=policy)
            assert_plan_equal(plan, ref.dispatch_plan(ex, E, capacity=cap, weights=w,
                                                      drop_policy=policy))
            check_plan_properties(plan, ex, E, cap)


@pytest.mark.parametrize("policy", POLICIES)
def test_dispatch_plan_edge_cases(backend, policy):
    cases = [
        (np.zeros((0, 2), np.int32), 4, None),                  # zero tokens
        (np.zeros((0, 2), np.int32), 4, 3),
        (np.zeros((5, 1), np.int32), 1, None),                  # one expert
        (np.zeros((5, 1), np.int32), 1, 2),
        (np.tile(np.arange(4, dtype=np.int32), (6, 1)), 4, 2),  # k == E
        (np.full((6, 3), 2, np.int32), 5, 4),                   # all on one expert, repeated
        (np.array([[1, 1], [1, 0], [0, 1]], np.int32), 2, 1),   # repeats in a row
        (np.array([[3, 0]], np.int64), 4, 1),                   # int64 ids in
    ]
    rng = np.random.default_rng(1)
    for ex, E, cap in cases:
        w = make_weights(rng, ex.shape, "grid")
        plan = numoe.dispatch_plan(to_backend(backend, ex), E, capacity=cap,
                                   weights=to_backend(backend, w), drop_policy=policy)
        plan = numoe.DispatchPlan(*(to_host(a) for a in plan[:4]), plan.capacity)
        assert_plan_equal(plan, ref.dispatch_plan(ex, E, capacity=cap, weights=w,
                                                  drop_policy=policy))
        check_plan_properties(plan, ex, E, cap)


def test_drop_policies_known_values():
    # expert 0 gets (t0,j1) (t1,j0) (t2,j1) (t3,j0); capacity 2
    ex = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])
    w = np.array([[0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.9, 0.1]])
    slot = numoe.dispatch_plan(ex, 2, capacity=2, drop_policy="slot")
    pos = numoe.dispatch_plan(ex, 2, capacity=2, drop_policy="position")
    score = numoe.dispatch_plan(ex, 2, capacity=2, weights=w, drop_policy="score")
    # flat ids of expert 0: 1 (slot 1), 2 (slot 0), 5 (slot 1), 6 (slot 0)
    assert slot.order[:2].tolist() == [2, 6]          # first choices win
    assert pos.order[:2].tolist() == [1, 2]           # token order
    assert score.order[:2].tolist() == [5, 6]         # weights 0.8, 0.9
    for p in (slot, pos, score):
        assert p.counts.tolist() == [2, 2] and p.dropped.sum() == 4


def test_score_ties_go_to_lower_flat_id():
    ex = np.zeros((4, 1), np.int32)
    w = np.array([[0.5], [-0.0], [0.5], [0.0]])
    p = numoe.dispatch_plan(ex, 1, capacity=3, weights=w, drop_policy="score")
    assert p.order.tolist() == [0, 1, 2]              # -0.0 == 0.0: lower id kept
    p = numoe.dispatch_plan(ex, 1, capacity=1, weights=np.full((4, 1), 0.25),
                            drop_policy="score")
    assert p.order.tolist() == [0]


def test_index_dtype_choice():
    from numoe.dispatch import _index_dtype
    assert _index_dtype(0) == np.int32
    assert _index_dtype(2**31 - 1) == np.int32        # same rule as the reference
    assert _index_dtype(2**31) == np.int64


# ---------------------------------------------------------------- capacity
@pytest.mark.parametrize("T,E,k,cf", [
    (1024, 8, 2, 1.25), (4, 64, 1, 1.0), (0, 8, 2, 1.0), (10, 3, 3, 100.0),
    (1000, 7, 2, 0.01), (65536, 256, 8, 1.0), (5, 5, 1, 1e-9), (7, 2, 1, 2),
    (np.int64(12), np.int32(4), 2, np.float32(1.5))])
def test_capacity_matches_reference(T, E, k, cf):
    c = numoe.capacity(T, E, k, cf)
    assert isinstance(c, int) and c == ref.capacity(T, E, k, cf)
    assert 1 <= c <= max(T, 1)


@given(st.integers(0, 10**6), st.integers(1, 1024), st.integers(1, 16),
       st.floats(1e-3, 64.0))
def test_capacity_property(T, E, k, cf):
    assert numoe.capacity(T, E, k, cf) == ref.capacity(T, E, k, cf)


def test_capacity_huge_factor():
    assert numoe.capacity(10, 4, 2, 1e308) == 10          # no overflow error


# ------------------------------------------------------- permute/unpermute
@st.composite
def combine_problems(draw):
    ex, E, cap, w, policy = draw(plan_problems(max_cells=1 << 15))
    T, k = ex.shape
    dtype = draw(dtypes)
    H = draw(st.integers(1, 17))
    rng = np.random.default_rng(draw(seeds))
    x = rng.uniform(-30, 30, (T, H)).astype(dtype)
    return ex, E, cap, w.astype(dtype), policy, x


@given(combine_problems())
def test_permute_unpermute_match_reference(problem):
    ex, E, cap, w, policy, x = problem
    dtype = x.dtype.type
    plan = numoe.dispatch_plan(ex, E, capacity=cap, weights=w, drop_policy=policy)
    xs = numoe.permute(x, plan)
    assert xs.dtype == x.dtype and xs.shape == (len(plan.order), x.shape[1])
    np.testing.assert_array_equal(xs, ref.permute(x, plan))        # a pure copy
    rng = np.random.default_rng(0)
    ys = rng.uniform(-30, 30, xs.shape).astype(dtype)
    y = numoe.unpermute(ys, plan, w)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_weighted_sum_close(y, ref.unpermute(ys, plan, w), w, 30.0, plan)


@given(combine_problems())
def test_roundtrip_identity_experts(problem):
    """permute -> identity experts -> unpermute == x * (sum of kept weights)."""
    ex, E, cap, w, policy, x = problem
    plan = numoe.dispatch_plan(ex, E, capacity=cap, weights=w, drop_policy=policy)
    y = numoe.unpermute(numoe.permute(x, plan), plan, w)
    wsum = np.where(plan.dropped, 0.0, w.astype(np.float64)).sum(1, keepdims=True)
    assert_weighted_sum_close(y, x * wsum, w, np.abs(x), plan)


@given(combine_problems(), st.integers(1, 5))
def test_cpu_modes_bit_identical(problem, rows):
    """Serial, parallel and (permute) streaming-store drivers give the same bits
    (the streaming path otherwise runs only for outputs of 32 MiB and more)."""
    ex, E, cap, w, policy, x = problem
    plan = numoe.dispatch_plan(ex, E, capacity=cap, weights=w, drop_policy=policy)
    T, k = ex.shape
    want = ref.permute(x, plan)
    pos, bad = cpu_dispatch.inverse_positions(plan.order, plan.dropped.reshape(-1),
                                              parallel=bool(rows % 2))
    assert bad == 0
    ys = want[:, ::-1].copy() * x.dtype.type(0.5)
    ys = ys.astype(x.dtype)
    y_ref = numoe.unpermute(ys, plan, w)
    old = cpu_dispatch.ROWS_PER_TASK
    for mode in ("serial", "parallel", "stream"):
        xs = np.full(want.shape, np.nan, x.dtype)
        cpu_dispatch.permute(x, plan.order, k, xs, mode=mode)
        np.testing.assert_array_equal(xs, want)
    for mode in ("serial", "parallel"):
        y = np.full((T, x.shape[1]), np.nan, x.dtype)
        cpu_dispatch.unpermute(ys, pos, w, k, y, mode=mode)
        assert y.tobytes() == y_ref.tobytes(), mode
    # odd row offsets: a destination whose rows are not 32-byte aligned
    if len(plan.order):
        big = np.full((want.size + 3,), np.nan, x.dtype)
        xs = big[3:].reshape(want.shape)
        cpu_dispatch._permute_stream(x, plan.order, k, xs, rows)
        np.testing.assert_array_equal(xs, want)
        assert np.isnan(big[:3]).all()                 # nothing written before it


def test_unpermute_accumulates_in_slot_order():
    """float32 sum in ascending j from 0: (0 + 1e8) + 1 - 1e8 == 0 exactly."""
    ex = np.array([[0, 1, 2]])
    plan = numoe.dispatch_plan(ex, 3)
    ys = np.array([[1e8], [1.0], [-1e8]], np.float32)
    y = numoe.unpermute(ys, plan, np.ones((1, 3), np.float32))
    assert y[0, 0] == np.float32(0.0)
    y = numoe.unpermute(ys, plan, np.ones((1, 3)))   # float64 weights: out stays float32
    assert y.dtype == np.float32


def test_permute_leading_dims(backend):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    ex = rng.integers(0, 6, (30, 2)).astype(np.int32)
    plan = numoe.dispatch_plan(to_backend(backend, ex), 6)
    xs = to_host(numoe.permute(to_backend(backend, x), plan))
    hplan = ref.dispatch_plan(ex, 6)
    np.testing.assert_array_equal(xs, ref.permute(x.reshape(30, 4), hplan))


def test_zero_tokens(backend):
    ex = np.zeros((0, 3), np.int32)
    plan = numoe.dispatch_plan(to_backend(backend, ex), 5, capacity=2)
    assert to_host(plan.order).shape == (0,)
    assert to_host(plan.offsets).tolist() == [0] * 6
    for dt in (np.float32, np.float64):
        xs = numoe.permute(to_backend(backend, np.zeros((0, 8), dt)), plan)
        assert xs.shape == (0, 8) and xs.dtype == dt
        y = numoe.unpermute(xs, plan, to_backend(backend, np.zeros((0, 3), dt)))
        assert y.shape == (0, 8) and y.dtype == dt


def test_all_dropped_token_gets_zeros():
    ex = np.array([[0], [0], [0]])
    plan = numoe.dispatch_plan(ex, 1, capacity=1)
    ys = np.full((1, 2), 7.0)
    y = numoe.unpermute(ys, plan, np.ones((3, 1)))
    assert y.tolist() == [[7.0, 7.0], [0.0, 0.0], [0.0, 0.0]]


def test_example_based_backend(backend):
    rng = np.random.default_rng(5)
    T, E, k, H = 40, 8, 2, 16
    ex = np.argsort(rng.random((T, E)), 1)[:, :k].astype(np.int32)
    w = rng.random((T, k)).astype(np.float32)
    x = rng.standard_normal((T, H)).astype(np.float32)
    for cap in (None, 6):
        plan = numoe.dispatch_plan(to_backend(backend, ex), E, capacity=cap,
                                   weights=to_backend(backend, w))
        xs = numoe.permute(to_backend(backend, x), plan)
        y = to_host(numoe.unpermute(xs, plan, to_backend(backend, w)))
        hplan = ref.dispatch_plan(ex, E, capacity=cap, weights=w)
        np.testing.assert_allclose(y, ref.unpermute(ref.permute(x, hplan), hplan, w),
                                   **tol(np.float32))


# ---------------------------------------------------------------- out=
def test_out_argument():
    rng = np.random.default_rng(2)
    ex = rng.integers(0, 4, (10, 2))
    plan = numoe.dispatch_plan(ex, 4, capacity=4)
    x = rng.standard_normal((10, 3))
    w = rng.random((10, 2))
    buf = np.full((len(plan.order), 3), np.nan)
    xs = numoe.permute(x, plan, out=buf)
    assert xs is buf
    np.testing.assert_array_equal(buf, ref.permute(x, plan))
    out = np.full((10, 3), np.nan)
    y = numoe.unpermute(xs, plan, w, out=out)
    assert y is out
    np.testing.assert_allclose(out, ref.unpermute(xs, plan, w), **tol(np.float64))


def test_unaligned_out_works():
    """An element-misaligned ``out`` (legal in NumPy) never reaches the aligned
    streaming stores."""
    rng = np.random.default_rng(8)
    ex = rng.integers(0, 3, (20, 2))
    plan = numoe.dispatch_plan(ex, 3)
    x = rng.standard_normal((20, 9)).astype(np.float32)
    buf = bytearray(40 * 9 * 4 + 1)
    xs = np.frombuffer(buf, np.float32, count=40 * 9, offset=1).reshape(40, 9)
    assert not xs.flags.aligned and xs.flags.writeable
    for mode in ("serial", "parallel", "stream"):
        xs[...] = 0
        cpu_dispatch.permute(x, plan.order, 2, xs, mode=mode)
        np.testing.assert_array_equal(xs, ref.permute(x, plan))
    numoe.permute(x, plan, out=xs)
    np.testing.assert_array_equal(xs, ref.permute(x, plan))
    buf2 = bytearray(20 * 9 * 4 + 1)
    y = np.frombuffer(buf2, np.float32, count=20 * 9, offset=1).reshape(20, 9)
    w = rng.random((20, 2)).astype(np.float32)
    numoe.unpermute(np.ascontiguousarray(xs), plan, w, out=y)
    assert y.tobytes() == numoe.unpermute(np.ascontiguousarray(xs), plan, w).tobytes()


def test_bad_out_rejected():
    ex = np.array([[0, 1], [1, 0], [0, 0]])
    plan = numoe.dispatch_plan(ex, 2)
    x = np.ones((3, 4))
    ys = np.ones((6, 4))
    w = np.ones((3, 2))
    ro = np.zeros((3, 4))
    ro.flags.writeable = False
    bad = [
        ([[0.0] * 4] * 3, TypeError),                     # not an ndarray
        (np.zeros((3, 4), np.float32), TypeError),        # wrong dtype
        (np.zeros((4, 4)), ValueError),                   # wrong shape
        (np.zeros((4, 3)).T, ValueError),                 # not C-contiguous
        (ro, ValueError),                                 # read-only
        (ys[:3], ValueError),                             # overlaps ys
    ]
    for out, exc in bad:
        with pytest.raises(exc, match="out"):
            numoe.unpermute(ys, plan, w, out=out)
    base = np.ones(24)
    bad_perm = [(np.zeros((6, 4), np.float32), TypeError), (np.zeros((3, 4)), ValueError),
                (np.zeros((12, 4))[::2], ValueError), (x, ValueError)]
    for out, exc in bad_perm:
        with pytest.raises(exc, match="out"):
            numoe.permute(x, plan, out=out)
    with pytest.raises(ValueError, match="out must not overlap x"):   # aliases x
        numoe.permute(base[:12].reshape(3, 4), plan, out=base.reshape(6, 4))


# ----------------------------------------------------- inputs, contiguity
def test_inputs_not_modified_and_views_work():
    rng = np.random.default_rng(4)
    T, E, k, H = 50, 6, 3, 5
    ex = np.asfortranarray(np.argsort(rng.random((T, E)), 1)[:, :k].astype(np.int64))
    w = rng.random((2 * T, k))[::2]                       # strided view
    x = np.asfortranarray(rng.standard_normal((T, H)))
    for a in (ex, w, x):
        a.flags.writeable = False
    copies = [a.copy() for a in (ex, w, x)]
    for policy in POLICIES:
        plan = numoe.dispatch_plan(ex, E, capacity=20, weights=w, drop_policy=policy)
        want = ref.dispatch_plan(np.ascontiguousarray(ex), E, capacity=20,
                                 weights=np.ascontiguousarray(w), drop_policy=policy)
        assert_plan_equal(plan, want)
        for a in plan[:4]:
            a.flags.writeable = False
        plan_copy = [a.copy() for a in plan[:4]]
        xs = numoe.permute(x, plan)
        ys = xs[::-1][::-1]                               # a view
        ys.flags.writeable = False
        y = numoe.unpermute(ys, plan, w)
        np.testing.assert_allclose(y, ref.unpermute(ref.permute(x, want), want, w),
                                   **tol(np.float64))
        for a, b in zip(plan[:4], plan_copy):
            np.testing.assert_array_equal(a, b)
    for a, b in zip((ex, w, x), copies):
        np.testing.assert_array_equal(a, b)


def test_python_lists_accepted():
    plan = numoe.dispatch_plan([[0, 1], [1, 1]], 2, capacity=5)
    assert plan.order.tolist() == [0, 1, 2, 3]
    assert numoe.permute([[1.0], [2.0]], plan).tolist() == [[1.0], [1.0], [2.0], [2.0]]


# ---------------------------------------------------------------- bad input
EX = np.array([[0, 1], [1, 2]], np.int32)
W = np.array([[0.5, 0.5], [0.25, 0.75]])
GOOD_PLAN = ref.dispatch_plan(EX, 3)
X = np.ones((2, 4))
YS = np.ones((4, 4))


def _plan(**kw):
    fields = GOOD_PLAN._asdict()
    fields.update(kw)
    return numoe.DispatchPlan(**fields)


BAD_CALLS = [
    # dispatch_plan
    ("dispatch_plan", (EX.astype(float), 3), {}, TypeError, "experts"),
    ("dispatch_plan", (EX.astype(bool), 3), {}, TypeError, "experts"),
    ("dispatch_plan", (EX[0], 3), {}, ValueError, "experts"),
    ("dispatch_plan", (EX[None], 3), {}, ValueError, "experts"),
    ("dispatch_plan", (np.zeros((2, 0), np.int32), 3), {}, ValueError, "experts"),
    ("dispatch_plan", (-EX - 1, 3), {}, ValueError, "experts"),
    ("dispatch_plan", (EX, 2), {}, ValueError, "experts"),
    ("dispatch_plan", (None, 3), {}, TypeError, "experts"),
    ("dispatch_plan", (EX, 0), {}, ValueError, "num_experts"),
    ("dispatch_plan", (EX, 3.0), {}, TypeError, "num_experts"),
    ("dispatch_plan", (EX, True), {}, TypeError, "num_experts"),
    ("dispatch_plan", (EX, 3), {"capacity": 0}, ValueError, "capacity"),
    ("dispatch_plan", (EX, 3), {"capacity": -2}, ValueError, "capacity"),
    ("dispatch_plan", (EX, 3), {"capacity": True}, TypeError, "capacity"),
    ("dispatch_plan", (EX, 3), {"capacity": 1.5}, TypeError, "capacity"),
    ("dispatch_plan", (EX, 3), {"drop_policy": "random"}, ValueError, "drop_policy"),
    ("dispatch_plan", (EX, 3), {"drop_policy": None}, ValueError, "drop_policy"),
    ("dispatch_plan", (EX, 3), {"drop_policy": "score", "capacity": 1}, ValueError, "weights"),
    ("dispatch_plan", (EX, 3), {"drop_policy": "score"}, ValueError, "weights"),
    ("dispatch_plan", (EX, 3), {"weights": W[:1]}, ValueError, "weights"),
    ("dispatch_plan", (EX, 3), {"weights": np.ones((2, 3))}, ValueError, "weights"),
    ("dispatch_plan", (EX, 3), {"weights": W.astype(np.int64)}, TypeError, "weights"),
    ("dispatch_plan", (EX, 3), {"weights": np.where(W > 0.6, np.nan, W)}, ValueError, "weights"),
    ("dispatch_plan", (EX, 3), {"weights": np.where(W > 0.6, -np.inf, W)}, ValueError,
     "weights"),
    # capacity
    ("capacity", (-1, 8, 2, 1.0), {}, ValueError, "num_tokens"),
    ("capacity", (10, 0, 2, 1.0), {}, ValueError, "num_experts"),
    ("capacity", (10, 8, 0, 1.0), {}, ValueError, "k"),
    ("capacity", (10, 8, 2.0, 1.0), {}, TypeError, "k"),
    ("capacity", (10, 8, 2, 0.0), {}, ValueError, "capacity_factor"),
    ("capacity", (10, 8, 2, -1.0), {}, ValueError, "capacity_factor"),
    ("capacity", (10, 8, 2, float("inf")), {}, ValueError, "capacity_factor"),
    ("capacity", (10, 8, 2, float("nan")), {}, ValueError, "capacity_factor"),
    ("capacity", (10, 8, 2, "1"), {}, TypeError, "capacity_factor"),
    # permute
    ("permute", (X.astype(np.int64), GOOD_PLAN), {}, TypeError, "x"),
    ("permute", (np.ones(4), GOOD_PLAN), {}, ValueError, "x"),
    ("permute", (np.ones((3, 4)), GOOD_PLAN), {}, ValueError, "x"),
    ("permute", (X, tuple(GOOD_PLAN)), {}, TypeError, "plan"),
    ("permute", (X, None), {}, TypeError, "plan"),
    ("permute", (X, _plan(order=np.array([0, 1, 2, 4]))), {}, ValueError, "plan.order"),
    ("permute", (X, _plan(order=np.array([0, -1, 2, 3]))), {}, ValueError, "plan.order"),
    ("permute", (X, _plan(order=np.array([0, 1, 2]))), {}, ValueError, "plan.offsets"),
    ("permute", (X, _plan(order=GOOD_PLAN.order.astype(float))), {}, TypeError, "plan.order"),
    ("permute", (X, _plan(order=GOOD_PLAN.order[None])), {}, ValueError, "plan.order"),
    ("permute", (X, _plan(offsets=np.array([0, 1, 3, 5]))), {}, ValueError, "plan.offsets"),
    ("permute", (X, _plan(offsets=np.array([0, 3, 1, 4]))), {}, ValueError, "plan.offsets"),
    ("permute", (X, _plan(offsets=np.array([4]))), {}, ValueError, "plan.offsets"),
    ("permute", (X, _plan(offsets=np.array([1, 1, 3, 4]))), {}, ValueError, "plan.offsets"),
    ("permute", (X, _plan(counts=np.array([1, 2, 2]))), {}, ValueError, "plan.counts"),
    ("permute", (X, _plan(counts=np.array([1, 2]))), {}, ValueError, "plan.counts"),
    ("permute", (X, _plan(counts=np.array([1.0, 2, 1]))), {}, TypeError, "plan.counts"),
    ("permute", (X, _plan(dropped=np.zeros((2, 2), np.int8))), {}, TypeError, "plan.dropped"),
    ("permute", (X, _plan(dropped=np.zeros(4, bool))), {}, ValueError, "plan.dropped"),
    ("permute", (X, _plan(dropped=np.array([[True, False], [False, False]]))), {},
     ValueError, "plan.dropped"),
    ("permute", (X, _plan(capacity=1)), {}, ValueError, "plan.capacity"),
    ("permute", (X, _plan(capacity=0)), {}, ValueError, "plan.capacity"),
    ("permute", (X, _plan(capacity=2.0)), {}, TypeError, "plan.capacity"),
    # unpermute
    ("unpermute", (YS.astype(np.int32), GOOD_PLAN, W), {}, TypeError, "ys"),
    ("unpermute", (YS[:3], GOOD_PLAN, W), {}, ValueError, "ys"),
    ("unpermute", (YS[None], GOOD_PLAN, W), {}, ValueError, "ys"),
    ("unpermute", (YS, GOOD_PLAN, W[:1]), {}, ValueError, "weights"),
    ("unpermute", (YS, GOOD_PLAN, W.astype(np.int32)), {}, TypeError, "weights"),
    ("unpermute", (YS, GOOD_PLAN, None), {}, TypeError, "weights"),
    ("unpermute", (YS, GOOD_PLAN, np.where(W > 0.6, np.nan, W)), {}, ValueError, "weights"),
    ("unpermute", (YS, GOOD_PLAN, np.where(W > 0.6, np.inf, W)), {}, ValueError, "weights"),
    ("unpermute", (YS, "plan", W), {}, TypeError, "plan"),
    ("unpermute", (YS, _plan(order=np.array([0, 1, 1, 3]))), {}, ValueError, "plan.order"),
    ("unpermute", (YS, _plan(order=np.array([0, 1, 2, 7]))), {}, ValueError, "plan.order"),
]


@pytest.mark.parametrize("fn,args,kwargs,exc,name", BAD_CALLS,
                         ids=[f"{c[0]}-{i}-{c[4]}" for i, c in enumerate(BAD_CALLS)])
def test_bad_input(fn, args, kwargs, exc, name):
    if fn == "unpermute" and len(args) == 2:
        args = args + (W,)
    with pytest.raises(exc) as info:
        getattr(numoe, fn)(*args, **kwargs)
    assert name in str(info.value)


def test_bad_plan_never_reads_out_of_bounds():
    """A plan whose order points at a dropped slot, or repeats, is rejected by unpermute."""
    ex = np.array([[0, 1], [1, 0]])
    plan = numoe.dispatch_plan(ex, 2, capacity=1)          # keeps flat ids 0, 2
    kept = np.flatnonzero(~plan.dropped.reshape(-1))
    gone = np.flatnonzero(plan.dropped.reshape(-1))
    bad_order = plan.order.copy()
    bad_order[0] = gone[0]
    bad = plan._replace(order=bad_order)
    with pytest.raises(ValueError, match="plan.order"):
        numoe.unpermute(np.ones((len(kept), 2)), bad, np.ones((2, 2)))
