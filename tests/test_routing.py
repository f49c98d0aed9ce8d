"""numoe.route / numoe.router_probs against the float64 reference, plus properties."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import numoe
from numoe import reference as R
from numoe._jit import threads

from conftest import ATOL, RTOL, SIM, to_backend, to_host
from strategies import (biases, dtypes, group_sizes, logits_arrays, make_bias, make_logits,
                        route_problems, seeds, sizes)

SCORES = ["softmax", "sigmoid"]


def run_route(backend, logits, k, **kw):
    """``numoe.route`` on the backend, results as host arrays."""
    bias = kw.pop("bias", None)
    r = numoe.route(to_backend(backend, logits), k, bias=to_backend(backend, bias), **kw)
    return to_host(r.weights), to_host(r.experts)


def tols(dtype):
    """``dict(rtol=, atol=)`` for comparing a ``dtype`` result with the float64 reference."""
    t = np.dtype(dtype).type
    return dict(rtol=RTOL[t], atol=ATOL[t])


def assert_weights(w, ref, dtype):
    assert w.dtype == dtype
    np.testing.assert_allclose(w, ref, **tols(dtype))


# -------------------------------------------------------------- vs the oracle
@given(route_problems(), st.sampled_from(SCORES), st.booleans(),
       st.sampled_from([1.0, 2.5, 0.3]))
def test_route_matches_reference(problem, score, renormalize, scale):
    """No bias, no groups: the experts match exactly (selection is on the logits)."""
    z, k = problem
    if score == "softmax" and z.size and np.isneginf(z).all(axis=1).any():
        return
    w, ex = numoe.route(z, k, score=score, renormalize=renormalize, scale=scale)
    ref = R.route(z, k, score=score, renormalize=renormalize, scale=scale)
    assert ex.dtype == np.int32 and ex.shape == ref.experts.shape
    np.testing.assert_array_equal(ex, ref.experts)
    assert_weights(w, ref.weights, z.dtype)


@given(sizes(max_T=200, max_E=40), dtypes, seeds, st.sampled_from(SCORES), st.booleans())
def test_router_probs_matches_reference(size, dtype, seed, score, norm):
    T, E, _ = size
    z = make_logits(np.random.default_rng(seed), (T, E), dtype, "masked")
    p = numoe.router_probs(z, score, normalize=norm)
    assert p.dtype == dtype and p.shape == (T, E)
    np.testing.assert_allclose(p, R.router_probs(z, score, normalize=norm), **tols(dtype))
    if norm and T:
        np.testing.assert_allclose(p.sum(axis=1), 1.0, **tols(dtype))


def _ref_pieces(z, bias, score, n_groups, topk_groups, group_score):
    """float64 scores, selection scores, group scores (or None) and the reference group mask."""
    s = R.router_probs(z, score)
    sel = z.astype(np.float64) if bias is None else s + np.asarray(bias, dtype=np.float64)
    T, E = z.shape
    if n_groups == 1 or topk_groups >= n_groups:
        return s, sel, None, np.ones((T, E), dtype=bool)
    g = (s if bias is None else sel).reshape(T, n_groups, E // n_groups)
    gs = (np.sort(g, axis=-1)[..., ::-1][..., :2].sum(-1) if group_score == "top2"
          else g.max(-1))
    keep = np.zeros((T, n_groups), dtype=bool)
    np.put_along_axis(keep, np.argsort(-gs, axis=1, kind="stable")[:, :topk_groups], True, 1)
    return s, sel, gs, np.repeat(keep, E // n_groups, axis=1)


def assert_route_valid(z, k, w, ex, *, score, renormalize, bias, n_groups, topk_groups,
                       group_score, scale, tol=1e-12):
    """Compare with the reference, accepting other valid choices only at near-ties.

    With a bias or groups, selection runs on float64 scores that our kernel
    and the reference compute with different roundings (sum order, exp), so
    where the reference's own decision is within ``tol`` of a tie -- two
    group scores at the group cut, or two selection scores at the top-k cut
    or next to each other in the order -- any valid top-k is accepted: our
    experts must be distinct, allowed by a group that is within ``tol`` of
    the cut, ordered by descending selection score (within ``tol``), and
    our weights must be the reference formula for *our* experts. Every other
    row must match the reference exactly.
    """
    ref = R.route(z, k, score=score, renormalize=renormalize, bias=bias, n_groups=n_groups,
                  topk_groups=topk_groups, group_score=group_score, scale=scale)
    differ = np.flatnonzero((ex != ref.experts).any(axis=1))
    same = np.setdiff1d(np.arange(z.shape[0]), differ)
    np.testing.assert_allclose(w[same], ref.weights[same], **tols(z.dtype))
    if differ.size == 0:
        return
    s, sel, gs, allowed = _ref_pieces(z, bias, score, n_groups, topk_groups, group_score)
    for t in differ:
        row_sel = np.where(allowed[t], sel[t], -np.inf)
        srt = np.sort(row_sel)[::-1][:k + 1]
        expert_tie = np.any(srt[:-1] <= srt[1:] + tol)      # (-inf == -inf is a tie too)
        group_tie = False
        if gs is not None:
            gsrt = np.sort(gs[t])[::-1]
            group_tie = abs(gsrt[topk_groups - 1] - gsrt[topk_groups]) <= tol
        assert expert_tie or group_tie, (
            f"row {t}: experts {ex[t]} differ from the reference {ref.experts[t]} "
            "without a near-tie")
        mine = ex[t]
        assert len(set(mine.tolist())) == k
        if gs is not None:
            cut = np.sort(gs[t])[::-1][topk_groups - 1]
            size = z.shape[1] // n_groups
            assert np.all(gs[t][mine // size] >= cut - tol)
        assert np.all(sel[t][mine][:-1] + tol >= sel[t][mine][1:])
        if not group_tie:
            np.testing.assert_allclose(np.sort(sel[t][mine]), np.sort(sel[t][ref.experts[t]]),
                                       atol=tol)
        wt = s[t][mine]
        if renormalize:
            wt = wt / (wt.sum() + 1e-20)
        np.testing.assert_allclose(w[t], wt * scale, **tols(z.dtype))


@given(group_sizes(), st.data(), st.sampled_from(SCORES), st.booleans(),
       st.sampled_from(["top2", "max"]), st.sampled_from([1.0, 2.5]), st.booleans())
def test_route_bias_and_groups_match_reference(gsize, data, score, renormalize, group_score,
                                               scale, with_bias):
    T, E, k, n_groups, topk_groups = gsize
    kinds = ("normal", "uniform", "grid", "binary", "equal", "drawn")
    z = data.draw(logits_arrays(T, E, kinds=kinds))
    bias = data.draw(biases(E)) if with_bias else None
    kw = dict(score=score, renormalize=renormalize, bias=bias, n_groups=n_groups,
              topk_groups=topk_groups, group_score=group_score, scale=scale)
    w, ex = numoe.route(z, k, **kw)
    assert w.dtype == z.dtype and ex.dtype == np.int32 and ex.shape == (T, k)
    assert_route_valid(z, k, w, ex, **kw)


@given(sizes(max_T=300, max_E=64), dtypes, seeds, st.sampled_from(SCORES), st.booleans())
def test_route_bias_with_masked_experts(size, dtype, seed, score, grouped):
    """-inf logits with a selection bias: the masked expert's score is 0, its selection 0 + bias."""
    T, E, k = size
    rng = np.random.default_rng(seed)
    z = make_logits(rng, (T, E), dtype, "masked")
    bias = make_bias(rng, E)
    n_groups = 1
    if grouped and E % 2 == 0 and k <= E // 2:
        n_groups = 2
    kw = dict(score=score, renormalize=True, bias=bias, n_groups=n_groups,
              topk_groups=1 if n_groups == 2 else None, group_score="top2", scale=1.0)
    w, ex = numoe.route(z, k, **kw)
    assert_route_valid(z, k, w, ex, **kw)


# ---------------------------------------------------------------- properties
@given(route_problems(max_T=500, max_E=80), st.sampled_from(SCORES))
def test_route_properties(problem, score):
    z, k = problem
    if score == "softmax" and z.size and np.isneginf(z).all(axis=1).any():
        return
    w, ex = numoe.route(z, k, score=score)
    T, E = z.shape
    assert np.all(w >= 0)
    if T:
        sums = w.astype(np.float64).sum(axis=1)
        chosen = R.router_probs(z, score)[np.arange(T)[:, None], ex].sum(axis=1)
        # sum to 1, up to the contract's 1e-20 guard (visible when sigmoid scores are tiny)
        np.testing.assert_allclose(sums, chosen / (chosen + 1e-20),
                                   rtol=1e-5 if z.dtype == np.float32 else 1e-12)
        assert all(len(set(row)) == k for row in ex.tolist())
        assert np.all((ex >= 0) & (ex < E))
        # descending logits; equal logits in ascending id
        zc = np.take_along_axis(z, ex, axis=1)
        assert np.all(zc[:, :-1] >= zc[:, 1:])
        assert np.all((zc[:, :-1] > zc[:, 1:]) | (ex[:, :-1] < ex[:, 1:]))


@given(route_problems(max_T=300, max_E=64))
def test_route_token_independent(problem):
    """A token's routing does not depend on the other tokens in the batch."""
    z, k = problem
    if z.shape[0] < 2 or np.isneginf(z).all(axis=1).any():
        return
    full = numoe.route(z, k)
    half = numoe.route(z[1::2], k)
    np.testing.assert_array_equal(full.experts[1::2], half.experts)
    np.testing.assert_array_equal(full.weights[1::2], half.weights)


@pytest.mark.parametrize("general", [False, True])
def test_route_identical_at_any_thread_count(general):
    rng = np.random.default_rng(5)
    z = make_logits(rng, (3000, 48), np.float32, "grid")
    kw = dict(bias=make_bias(rng, 48), n_groups=4, topk_groups=2) if general else {}
    with threads(1):
        a = numoe.route(z, 6, **kw)
    with threads(2):
        b = numoe.route(z, 6, **kw)
    np.testing.assert_array_equal(a.experts, b.experts)
    assert a.weights.tobytes() == b.weights.tobytes()


# ---------------------------------------------------------------- edge cases
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("score", SCORES)
def test_all_equal_rows_choose_the_lowest_ids(backend, dtype, score):
    z = np.full((5, 7), 1.25, dtype=dtype)
    w, ex = run_route(backend, z, 3, score=score)
    assert ex.tolist() == [[0, 1, 2]] * 5
    assert_weights(w, np.full((5, 3), 1 / 3), dtype)


def test_ties_resolve_to_lower_id_in_every_path(backend):
    z = np.array([[1.0, 2.0, 1.0, 2.0, 0.0, 2.0]])
    _, ex = run_route(backend, z, 4)
    assert ex.tolist() == [[1, 3, 5, 0]]
    # general path (zero bias, trivial groups): same answer
    _, ex = run_route(backend, z, 4, bias=np.zeros(6))
    assert ex.tolist() == [[1, 3, 5, 0]]
    _, ex = run_route(backend, z, 4, n_groups=3, topk_groups=3)
    assert ex.tolist() == [[1, 3, 5, 0]]


@pytest.mark.parametrize("score", SCORES)
def test_k_equals_e_is_a_full_descending_sort(backend, score):
    rng = np.random.default_rng(0)
    z = make_logits(rng, (20, 9), np.float64, "grid")
    w, ex = run_route(backend, z, 9, score=score)
    ref = R.route(z, 9, score=score)
    np.testing.assert_array_equal(ex, ref.experts)
    assert_weights(w, ref.weights, np.float64)
    assert sorted(ex[0].tolist()) == list(range(9))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_expert(backend, dtype):
    z = np.array([[3.0], [-2.0], [-np.inf]], dtype=dtype)
    w, ex = run_route(backend, z, 1, score="sigmoid")
    assert ex.tolist() == [[0], [0], [0]]
    np.testing.assert_allclose(w, [[1.0], [1.0], [0.0]])
    w, ex = run_route(backend, z[:2], 1)
    assert w.tolist() == [[1.0], [1.0]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_tokens(backend, dtype):
    z = np.zeros((0, 6), dtype=dtype)
    w, ex = run_route(backend, z, 2)
    assert w.shape == (0, 2) and w.dtype == dtype
    assert ex.shape == (0, 2) and ex.dtype == np.int32
    w, ex = run_route(backend, z, 2, bias=np.zeros(6), n_groups=3, topk_groups=1)
    assert w.shape == (0, 2) and ex.shape == (0, 2)
    assert to_host(numoe.router_probs(to_backend(backend, z))).shape == (0, 6)


def test_masked_experts(backend):
    z = np.array([[0.0, -np.inf, 0.0, -np.inf], [-np.inf, -np.inf, 5.0, -np.inf]])
    w, ex = run_route(backend, z, 3)
    assert ex.tolist() == [[0, 2, 1], [2, 0, 1]]
    np.testing.assert_allclose(w, [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    # sigmoid: a row of -inf is fine (all scores 0, weights 0 by the guard)
    w, ex = run_route(backend, np.full((1, 4), -np.inf), 2, score="sigmoid")
    assert ex.tolist() == [[0, 1]] and w.tolist() == [[0.0, 0.0]]


def test_masked_experts_in_groups(backend):
    """An allowed masked expert ties with excluded ones at -inf: the lower id wins."""
    z = np.array([[-np.inf, -np.inf, -np.inf, 0.0]])
    kw = dict(score="sigmoid", n_groups=2, topk_groups=1)
    w, ex = run_route(backend, z, 2, **kw)
    np.testing.assert_array_equal(ex, R.route(z, 2, **kw).experts)
    assert ex.tolist() == [[3, 0]]


def test_leading_dims_are_flattened_and_restored(backend):
    rng = np.random.default_rng(1)
    z = make_logits(rng, (2, 3, 5, 8), np.float32, "normal")
    w, ex = run_route(backend, z, 2)
    assert w.shape == (2, 3, 5, 2) and ex.shape == (2, 3, 5, 2)
    ref = R.route(z.reshape(-1, 8), 2)
    np.testing.assert_array_equal(ex.reshape(-1, 2), ref.experts)
    w1, ex1 = run_route(backend, z[0, 0, 0], 2)        # one token, no batch dims
    assert ex1.shape == (2,) and ex1.tolist() == ex[0, 0, 0].tolist()
    p = to_host(numoe.router_probs(to_backend(backend, z)))
    assert p.shape == z.shape


def test_dtype_is_kept(backend):
    for dt in (np.float32, np.float64):
        w, ex = run_route(backend, np.zeros((3, 4), dtype=dt), 2)
        assert w.dtype == dt and ex.dtype == np.int32
        w, _ = run_route(backend, np.zeros((3, 4), dtype=dt), 2, bias=np.zeros(4, np.float64))
        assert w.dtype == dt


def test_float32_selection_uses_exact_values():
    """Distinct float32 logits one ulp apart never tie."""
    a = np.float32(1.0)
    z = np.array([[a, np.nextafter(a, np.float32(2)), a]], dtype=np.float32)
    assert numoe.route(z, 1).experts.tolist() == [[1]]
    assert numoe.route(z, 1, score="sigmoid").experts.tolist() == [[1]]


def test_large_k_and_many_experts():
    """k > 16 and E near 300 exercise the other selection paths."""
    rng = np.random.default_rng(3)
    for kind in ("normal", "grid", "masked"):
        z = make_logits(rng, (200, 300), np.float64, kind)
        for k in (1, 7, 16, 17, 40, 150, 299, 300):
            r = numoe.route(z, k)
            np.testing.assert_array_equal(r.experts, R.route(z, k).experts)


# ---------------------------------------------------------- inputs untouched
def test_inputs_not_modified_and_odd_layouts_work():
    rng = np.random.default_rng(2)
    big = make_logits(rng, (40, 24), np.float64, "grid")
    bias = make_bias(rng, 12)
    for z in (big[::2, ::2], big.T[:12, :20].T, np.asfortranarray(big[:, :12])):
        assert not z.flags.c_contiguous
        before, bias_before = z.copy(), bias.copy()
        r = numoe.route(z, 3, bias=bias, n_groups=3, topk_groups=2)
        np.testing.assert_array_equal(z, before)
        np.testing.assert_array_equal(bias, bias_before)
        np.testing.assert_array_equal(
            r.experts, R.route(z, 3, bias=bias, n_groups=3, topk_groups=2).experts)
        r = numoe.route(z, 3)
        np.testing.assert_array_equal(r.experts, R.route(z, 3).experts)
        np.testing.assert_array_equal(z, before)


def test_read_only_inputs_work():
    rng = np.random.default_rng(4)
    z = make_logits(rng, (30, 10), np.float32, "normal")
    bias = make_bias(rng, 10)
    z.setflags(write=False)
    bias.setflags(write=False)
    r = numoe.route(z, 2)
    np.testing.assert_array_equal(r.experts, R.route(z, 2).experts)
    r = numoe.route(z, 2, bias=bias, n_groups=2, topk_groups=1)
    np.testing.assert_array_equal(
        r.experts, R.route(z, 2, bias=bias, n_groups=2, topk_groups=1).experts)
    np.testing.assert_allclose(numoe.router_probs(z), R.router_probs(z), rtol=2e-5, atol=2e-6)


def test_lists_are_accepted():
    r = numoe.route([[1.0, 3.0, 2.0]], 2)
    assert r.experts.tolist() == [[1, 2]]


# ---------------------------------------------------------------- bad inputs
Z = np.zeros((4, 8))
BAD = [
    # (id, call, error type, text the message must name)
    ("int logits", lambda: numoe.route(np.zeros((4, 8), dtype=np.int64), 2), TypeError, "logits"),
    ("bool logits", lambda: numoe.route(np.zeros((4, 8), dtype=bool), 2), TypeError, "logits"),
    ("complex logits", lambda: numoe.route(np.zeros((4, 8), dtype=complex), 2), TypeError,
     "logits"),
    ("None logits", lambda: numoe.route(None, 2), TypeError, "logits"),
    ("scalar logits", lambda: numoe.route(np.float64(1.0), 1), ValueError, "logits"),
    ("no experts", lambda: numoe.route(np.zeros((4, 0)), 1), ValueError, "logits"),
    ("nan logits", lambda: numoe.route(np.where(np.eye(4, 8) > 0, np.nan, 0.0), 2), ValueError,
     "logits"),
    ("+inf logits", lambda: numoe.route(np.where(np.eye(4, 8) > 0, np.inf, 0.0), 2), ValueError,
     "logits"),
    ("nan logits general", lambda: numoe.route(np.full((4, 8), np.nan), 2, bias=np.zeros(8)),
     ValueError, "logits"),
    ("all -inf softmax row", lambda: numoe.route(np.full((2, 8), -np.inf), 2), ValueError,
     "logits"),
    ("all -inf softmax row general",
     lambda: numoe.route(np.full((2, 8), -np.inf), 2, n_groups=2, topk_groups=1), ValueError,
     "logits"),
    ("k = 0", lambda: numoe.route(Z, 0), ValueError, "k"),
    ("k > E", lambda: numoe.route(Z, 9), ValueError, "k"),
    ("float k", lambda: numoe.route(Z, 2.0), TypeError, "k"),
    ("bool k", lambda: numoe.route(Z, True), TypeError, "k"),
    ("bias length", lambda: numoe.route(Z, 2, bias=np.zeros(7)), ValueError, "bias"),
    ("bias 2-D", lambda: numoe.route(Z, 2, bias=np.zeros((1, 8))), ValueError, "bias"),
    ("bias nan", lambda: numoe.route(Z, 2, bias=np.full(8, np.nan)), ValueError, "bias"),
    ("bias inf", lambda: numoe.route(Z, 2, bias=np.full(8, -np.inf)), ValueError, "bias"),
    ("bias int", lambda: numoe.route(Z, 2, bias=np.zeros(8, dtype=int)), TypeError, "bias"),
    ("n_groups not dividing E", lambda: numoe.route(Z, 2, n_groups=3), ValueError, "n_groups"),
    ("n_groups = 0", lambda: numoe.route(Z, 2, n_groups=0), ValueError, "n_groups"),
    ("topk_groups = 0", lambda: numoe.route(Z, 2, n_groups=4, topk_groups=0), ValueError,
     "topk_groups"),
    ("topk_groups > n_groups", lambda: numoe.route(Z, 2, n_groups=4, topk_groups=5), ValueError,
     "topk_groups"),
    ("too few experts in kept groups", lambda: numoe.route(Z, 3, n_groups=4, topk_groups=1),
     ValueError, "topk_groups"),
    ("unknown score", lambda: numoe.route(Z, 2, score="relu"), ValueError, "score"),
    ("unknown group_score", lambda: numoe.route(Z, 2, group_score="sum"), ValueError,
     "group_score"),
    ("nan scale", lambda: numoe.route(Z, 2, scale=float("nan")), ValueError, "scale"),
    ("inf scale", lambda: numoe.route(Z, 2, scale=float("inf")), ValueError, "scale"),
    ("str scale", lambda: numoe.route(Z, 2, scale="2"), TypeError, "scale"),
    ("renormalize not bool", lambda: numoe.route(Z, 2, renormalize="yes"), TypeError,
     "renormalize"),
    ("router_probs int", lambda: numoe.router_probs(np.zeros((2, 3), dtype=np.int32)), TypeError,
     "logits"),
    ("router_probs nan", lambda: numoe.router_probs(np.full((2, 3), np.nan)), ValueError,
     "logits"),
    ("router_probs all -inf", lambda: numoe.router_probs(np.full((2, 3), -np.inf)), ValueError,
     "logits"),
    ("router_probs score", lambda: numoe.router_probs(Z, "tanh"), ValueError, "score"),
    ("router_probs normalize", lambda: numoe.router_probs(Z, normalize="yes"), TypeError,
     "normalize"),
]


@pytest.mark.parametrize("call, exc, name", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def test_sigmoid_allows_rows_of_masked_experts():
    assert numoe.router_probs(np.full((2, 3), -np.inf), "sigmoid").tolist() == [[0.0] * 3] * 2
    for norm in (False, True):
        z = np.full((2, 3), -np.inf)
        assert numoe.router_probs(z, "sigmoid", normalize=norm).tolist() == [[0.0] * 3] * 2
        assert numoe.router_probs_backward(z, np.ones((2, 3)), score="sigmoid",
                                           normalize=norm).tolist() == [[0.0] * 3] * 2


@pytest.mark.skipif(SIM, reason="simulator: tiny sizes only")
def test_status_reports_first_bad_row():
    z = np.zeros((1000, 16))
    z[700, 3] = np.nan
    with pytest.raises(ValueError, match="row 700"):
        numoe.route(z, 2)


# ------------------------------------------------------ scalar math kernels
def test_exp_neg_and_sigmoid_kernels_are_accurate():
    """The inlined exp (x <= 0) is within 1 ulp of libm, exact at 0 and -inf."""
    from scipy import special

    from numoe._cpu.routing import exp_neg, sigmoid

    rng = np.random.default_rng(0)
    x = np.concatenate([-rng.exponential(5.0, 1500), -rng.uniform(0, 746, 300),
                        [0.0, -0.0, -np.inf, -1e-300, -0.34657359, -708.39, -708.4,
                         -745.13, -745.2, -745.3, -800.0]])
    got = np.array([exp_neg(v) for v in x])
    want = np.exp(x)
    normal = want >= np.finfo(np.float64).tiny
    assert np.all(np.abs(got - want)[normal] <= np.spacing(want[normal]))
    assert np.all(np.abs(got - want)[~normal] <= 5e-324)       # one subnormal step
    assert exp_neg(0.0) == 1.0 and exp_neg(-np.inf) == 0.0
    y = np.concatenate([rng.normal(0, 20, 1500), [0.0, -np.inf, 800.0, -800.0, 36.0, -36.0]])
    s = np.array([sigmoid(v) for v in y])
    np.testing.assert_allclose(s, special.expit(y), rtol=1e-15, atol=0)
