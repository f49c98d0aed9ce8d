"""CUDA twins of the backward ops (``numoe._cuda.*.*_backward``) behind the public calls.

Run on a GPU, or on the CPU under numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, set by ``conftest.py`` when there is no driver):
sizes are tiny (T <= 12, E <= 8, H <= 16). Every device result is compared
with the host backward op on the same inputs and with the float64 reference
VJP of :mod:`numoe.reference` by a max-norm check (error scaled by the
reference's largest entry); ``MoELayer.backward`` of a device layer with the
host layer's. The full-size comparison on a real GPU is
``tools/gpu_backward_check.py``.
"""
import ml_dtypes
import numpy as np
import pytest

import numoe
from numoe import reference as ref

from conftest import CUDA, to_host

pytestmark = pytest.mark.skipif(
    not CUDA, reason="no CUDA device (set NUMBA_ENABLE_CUDASIM=1 for the simulator)")

DTYPES = (np.float32, np.float64)
BF16 = np.dtype(ml_dtypes.bfloat16)
NARROW = (np.dtype(np.float16), BF16)
# max-norm relative tolerances (scaled by max(1, |reference|max))
TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12,
       np.dtype(np.float16): 4e-3, BF16: 2e-2}


def dev(a):
    """A host array on the device (None passes through)."""
    if a is None:
        return None
    from numoe._cuda import _arrays as A     # bfloat16 too (numba's own copy refuses it)
    return A.to_device(np.ascontiguousarray(a))


def is_device(a):
    from numoe._cuda import _arrays as A
    return A.is_device_array(a)


def close(got, want, dtype, *, factor=1.0):
    got = to_host(got)
    assert got.dtype == np.dtype(dtype), (got.dtype, dtype)
    a = got.astype(np.float64)
    b = np.asarray(want, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if not b.size:
        return
    scale = max(1.0, float(np.abs(b).max()))
    err = float(np.abs(a - b).max())
    assert err <= TOL[np.dtype(dtype)] * factor * scale, (err, scale)


def dev_plan(plan):
    return numoe.DispatchPlan(dev(plan.order), dev(plan.offsets), dev(plan.counts),
                              dev(plan.dropped), plan.capacity)


def logits(rng, T, E, dtype):
    z = rng.standard_normal((T, E)) * 2
    if T > 2:
        z[0] = 0.5                       # all equal
        z[1, : E // 2] = -np.inf         # masked experts
    return z.astype(dtype)


# ------------------------------------------------------------------ routing
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_router_probs_backward(dtype, score):
    rng = np.random.default_rng(1)
    z = logits(rng, 7, 5, dtype)
    g = rng.standard_normal((7, 5)).astype(dtype)
    got = numoe.router_probs_backward(dev(z), dev(g), score=score)
    assert is_device(got)
    close(got, ref.router_probs_backward(z.astype(np.float64), g, score), dtype)
    close(got, numoe.router_probs_backward(z, g, score=score), dtype)
    gn = numoe.router_probs_backward(dev(z), dev(g), score=score, normalize=True)
    close(gn, ref.router_probs_backward(z.astype(np.float64), g, score, normalize=True), dtype)
    close(numoe.router_probs(dev(z), score, normalize=True),
          ref.router_probs(z.astype(np.float64), score, normalize=True), dtype)
    # leading dims are kept
    got3 = numoe.router_probs_backward(dev(z[:6].reshape(2, 3, 5)),
                                       dev(g[:6].reshape(2, 3, 5)), score=score)
    assert to_host(got3).shape == (2, 3, 5)
    close(to_host(got3).reshape(6, 5), to_host(got)[:6], dtype)


ROUTE_CASES = [
    (8, 6, 2, {}),
    (8, 6, 3, dict(score="sigmoid", scale=2.5)),
    (6, 4, 4, dict(renormalize=False)),                       # k == E
    (5, 1, 1, {}),                                            # one expert
    (0, 4, 2, {}),                                            # no tokens
    (8, 6, 2, dict(score="sigmoid", renormalize=False, scale=0.5)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k,kw", ROUTE_CASES)
def test_route_backward(dtype, T, E, k, kw):
    rng = np.random.default_rng(T + E + k)
    z = logits(rng, T, E, dtype)
    r = numoe.route(z, k, **{key: v for key, v in kw.items()})
    dw = rng.standard_normal((T, k)).astype(dtype)
    want = ref.route_backward(z.astype(np.float64), r, dw, **kw)
    got = numoe.route_backward(dev(z), (dev(r.weights), dev(r.experts)), dev(dw), **kw)
    assert is_device(got) and to_host(got).shape == (T, E)
    close(got, want, dtype)
    close(got, numoe.route_backward(z, r, dw, **kw), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_route_backward_grouped_and_repeated_ids(dtype):
    """The selection (groups, selection bias) carries no gradient; repeated ids add up."""
    rng = np.random.default_rng(3)
    z = rng.standard_normal((6, 8)).astype(dtype)
    kw = dict(score="sigmoid", renormalize=True, scale=2.0)
    r = numoe.route(z, 3, bias=rng.standard_normal(8) * 0.1, n_groups=4, topk_groups=2, **kw)
    dw = rng.standard_normal((6, 3)).astype(dtype)
    got = numoe.route_backward(dev(z), numoe.Routing(dev(r.weights), dev(r.experts)), dev(dw),
                               **kw)
    close(got, ref.route_backward(z.astype(np.float64), r, dw, **kw), dtype)
    ex = np.array([[1, 1], [0, 2], [3, 3], [2, 2], [0, 1], [3, 0]], np.int32)
    dw2 = rng.standard_normal((6, 2)).astype(dtype)
    want = ref.route_backward(z[:, :4].astype(np.float64), (None, ex), dw2)
    got = numoe.route_backward(dev(np.ascontiguousarray(z[:, :4])), (None, dev(ex)), dev(dw2))
    close(got, want, dtype)


# ----------------------------------------------------------------- dispatch
PLAN_CASES = [(9, 2, 4, None, "slot"), (9, 3, 4, 3, "slot"), (8, 2, 3, 2, "position"),
              (0, 2, 3, None, "slot")]


def _plan(rng, T, k, E, cap, policy):
    ex = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32)   # distinct ids
    w = rng.random((T, k))
    return numoe.dispatch_plan(ex, E, capacity=cap, weights=w, drop_policy=policy)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,k,E,cap,policy", PLAN_CASES)
def test_permute_backward(dtype, T, k, E, cap, policy):
    rng = np.random.default_rng(T * 7 + k)
    plan = _plan(rng, T, k, E, cap, policy)
    assert cap is None or plan.dropped.any()      # drops are exercised
    d_xs = rng.standard_normal((len(plan.order), 5)).astype(dtype)
    got = numoe.permute_backward(dev(d_xs), dev_plan(plan))
    assert is_device(got)
    want = numoe.permute_backward(d_xs, plan)
    close(got, ref.permute_backward(d_xs, plan), dtype)
    np.testing.assert_array_equal(to_host(got), want)     # the same slot-order sums


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,k,E,cap,policy", PLAN_CASES)
def test_unpermute_backward(dtype, T, k, E, cap, policy):
    rng = np.random.default_rng(T * 11 + k)
    plan = _plan(rng, T, k, E, cap, policy)
    N, H = len(plan.order), 6
    d_y = rng.standard_normal((T, H)).astype(dtype)
    ys = rng.standard_normal((N, H)).astype(dtype)
    w = rng.random((T, k)).astype(dtype)
    d_ys, d_w = numoe.unpermute_backward(dev(d_y), dev(ys), dev_plan(plan), dev(w))
    assert is_device(d_ys) and is_device(d_w)
    r_ys, r_w = ref.unpermute_backward(d_y, ys, plan, w)
    close(d_ys, r_ys, dtype)
    close(d_w, r_w, dtype)
    h_ys, h_w = numoe.unpermute_backward(d_y, ys, plan, w)
    close(d_ys, h_ys, dtype)
    close(d_w, h_w, dtype)
    if cap is not None:
        assert (to_host(d_w)[plan.dropped] == 0).all()


# ------------------------------------------------------------------ experts
FFN_CASES = [   # activation, glu, bias, limit
    ("silu", True, True, None),
    ("gelu", True, False, None),
    ("gelu_tanh", False, True, None),
    ("relu", False, False, None),
    ("swiglu_oai", True, True, 0.6),
]


def _ffn_inputs(rng, dtype, glu, bias, counts=(5, 0, 7)):
    E, H, F = len(counts), 6, 4
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    xs = rng.standard_normal((int(off[-1]), H)).astype(dtype)
    wg = (rng.standard_normal((E, H, F)) * 0.5).astype(dtype)
    wu = (rng.standard_normal((E, H, F)) * 0.5).astype(dtype) if glu else None
    wd = (rng.standard_normal((E, F, H)) * 0.5).astype(dtype)
    b = (lambda *s: (rng.standard_normal(s) * 0.2).astype(dtype)) if bias else \
        (lambda *s: None)
    bg, bu, bd = b(E, F), (b(E, F) if glu else None), b(E, H)
    d_ys = rng.standard_normal(xs.shape).astype(dtype)
    return off, xs, wg, wu, wd, bg, bu, bd, d_ys


FIELDS = ("d_xs", "d_w_gate", "d_w_up", "d_w_down", "d_b_gate", "d_b_up", "d_b_down")


def _check_grads(got, want, dtype, factor=1.0):
    for f in FIELDS:
        g, w = getattr(got, f), (want[f] if isinstance(want, dict) else getattr(want, f))
        if w is None:
            assert g is None, f
            continue
        assert is_device(g), f
        close(g, w, dtype, factor=factor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act,glu,bias,limit", FFN_CASES)
def test_expert_ffn_backward(dtype, act, glu, bias, limit, monkeypatch):
    from numoe._cuda import experts as X
    monkeypatch.setattr(X, "SKINNY_MAX_ROWS", 6)     # expert 0 skinny, expert 2 tiled
    rng = np.random.default_rng(len(act) + glu)
    off, xs, wg, wu, wd, bg, bu, bd, d_ys = _ffn_inputs(rng, dtype, glu, bias)
    kw = dict(activation=act, limit=limit)
    got = numoe.expert_ffn_backward(dev(xs), dev(off), dev(wg), dev(wu), dev(wd), dev(d_ys),
                                    b_gate=dev(bg), b_up=dev(bu), b_down=dev(bd), **kw)
    assert isinstance(got, numoe.ExpertGrads)
    f64 = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
    want = ref.expert_ffn_backward(f64(xs), off, f64(wg), f64(wu), f64(wd), f64(d_ys),
                                   b_gate=f64(bg), b_up=f64(bu), b_down=f64(bd), **kw)
    _check_grads(got, want, dtype, factor=10.0)
    host = numoe.expert_ffn_backward(xs, off, wg, wu, wd, d_ys, b_gate=bg, b_up=bu,
                                     b_down=bd, **kw)
    _check_grads(got, host, dtype, factor=10.0)
    assert not to_host(got.d_w_gate)[1].any()         # the expert without rows


def test_expert_ffn_backward_no_rows_and_determinism():
    rng = np.random.default_rng(5)
    off, xs, wg, wu, wd, bg, bu, bd, d_ys = _ffn_inputs(rng, np.float32, True, True,
                                                        counts=(0, 0))
    got = numoe.expert_ffn_backward(dev(xs), dev(off), dev(wg), dev(wu), dev(wd), dev(d_ys),
                                    b_gate=dev(bg), b_up=dev(bu), b_down=dev(bd))
    assert to_host(got.d_xs).shape == (0, 6)
    for f in FIELDS[1:]:
        assert not to_host(getattr(got, f)).any(), f
    off, xs, wg, wu, wd, bg, bu, bd, d_ys = _ffn_inputs(rng, np.float32, True, True)
    args = [dev(a) for a in (xs, off, wg, wu, wd, d_ys)]
    a = numoe.expert_ffn_backward(*args, b_gate=dev(bg), b_up=dev(bu), b_down=dev(bd))
    b = numoe.expert_ffn_backward(*args, b_gate=dev(bg), b_up=dev(bu), b_down=dev(bd))
    for f in FIELDS:
        np.testing.assert_array_equal(to_host(getattr(a, f)), to_host(getattr(b, f)), f)


def test_grouped_atb_is_independent_of_the_tiles(monkeypatch):
    """Weight gradients are one fixed-order sum per element: any tile shape gives the
    same bits."""
    from numoe._cuda import experts as X
    rng = np.random.default_rng(6)
    off = np.array([0, 5, 5, 12], np.int64)
    a = rng.standard_normal((12, 7)).astype(np.float32)
    b = rng.standard_normal((12, 9)).astype(np.float32)
    outs = []
    for cfg in ((4, 4, 4, 2, 2), (2, 4, 3, 1, 2), (8, 2, 1, 4, 1)):
        monkeypatch.setitem(X.TILE_OVERRIDE, "atb", cfg)
        out = dev(np.full((3, 5, 9), np.nan, np.float32))
        X._atb(dev(a), 2, dev(b), 0, dev(off), out)
        outs.append(to_host(out))
    want = np.stack([a[lo:hi, 2:].astype(np.float64).T @ b[lo:hi]
                     for lo, hi in zip(off[:-1], off[1:])])
    np.testing.assert_allclose(outs[0], want, rtol=1e-5, atol=1e-5)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


# ------------------------------------------------------------------- losses
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_backwards(dtype):
    rng = np.random.default_rng(7)
    T, E, k = 9, 5, 2
    z = logits(rng, T, E, dtype)
    p = numoe.router_probs(z)
    ex = numoe.route(z, k).experts
    mask = rng.random(T) < 0.6
    for m, d_loss in ((None, 1.0), (mask, 0.3), (np.zeros(T, bool), 2.0)):
        got = numoe.load_balancing_loss_backward(dev(p), dev(ex), mask=dev(m), d_loss=d_loss)
        assert is_device(got)
        close(got, ref.load_balancing_loss_backward(p, ex, mask=m, d_loss=d_loss), dtype)
        close(got, numoe.load_balancing_loss_backward(p, ex, mask=m, d_loss=d_loss), dtype)
        got = numoe.router_z_loss_backward(dev(z), mask=dev(m), d_loss=d_loss)
        assert is_device(got)
        close(got, ref.router_z_loss_backward(z.astype(np.float64), mask=m, d_loss=d_loss),
              dtype)
        close(got, numoe.router_z_loss_backward(z, mask=m, d_loss=d_loss), dtype)
    # a masked-out row may be anything, a counted one may not be -inf everywhere
    bad = z.copy()
    bad[2] = -np.inf
    m = np.ones(T, bool)
    m[2] = False
    close(numoe.router_z_loss_backward(dev(bad), mask=dev(m)),
          numoe.router_z_loss_backward(bad, mask=m), dtype)
    with pytest.raises(ValueError, match="logsumexp"):
        numoe.router_z_loss_backward(dev(bad))


# ------------------------------------------------------------------- 16-bit
@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_backward_ops_16bit(dtype):
    """16-bit inputs: widened to float32 on the device, results narrowed once; they
    match the host ops on the same 16-bit inputs."""
    rng = np.random.default_rng(8)
    T, E, k, H = 8, 4, 2, 6
    z = logits(rng, T, E, dtype)
    g = rng.standard_normal((T, E)).astype(dtype)
    close(numoe.router_probs_backward(dev(z), dev(g)), numoe.router_probs_backward(z, g),
          dtype)
    r = numoe.route(z, k)
    dw = rng.standard_normal((T, k)).astype(dtype)
    close(numoe.route_backward(dev(z), (dev(r.weights), dev(r.experts)), dev(dw)),
          numoe.route_backward(z, r, dw), dtype)
    plan = numoe.dispatch_plan(r.experts, E, capacity=5)
    N = len(plan.order)
    d_xs = rng.standard_normal((N, H)).astype(dtype)
    close(numoe.permute_backward(dev(d_xs), dev_plan(plan)),
          numoe.permute_backward(d_xs, plan), dtype)
    d_y = rng.standard_normal((T, H)).astype(dtype)
    ys = rng.standard_normal((N, H)).astype(dtype)
    got = numoe.unpermute_backward(dev(d_y), dev(ys), dev_plan(plan), dev(r.weights))
    want = numoe.unpermute_backward(d_y, ys, plan, r.weights)
    close(got[0], want[0], dtype)
    close(got[1], want[1], dtype)
    p = numoe.router_probs(z)
    close(numoe.load_balancing_loss_backward(dev(p), dev(r.experts)),
          numoe.load_balancing_loss_backward(p, r.experts), dtype)
    close(numoe.router_z_loss_backward(dev(z)), numoe.router_z_loss_backward(z), dtype)
    off, xs, wg, wu, wd, bg, bu, bd, dys = _ffn_inputs(rng, dtype, True, True)
    got = numoe.expert_ffn_backward(dev(xs), dev(off), dev(wg), dev(wu), dev(wd), dev(dys),
                                    b_gate=dev(bg), b_up=dev(bu), b_down=dev(bd))
    want = numoe.expert_ffn_backward(xs, off, wg, wu, wd, dys, b_gate=bg, b_up=bu, b_down=bd)
    _check_grads(got, want, dtype)


# --------------------------------------------------------------- bad input
def test_mixing_host_and_device_is_type_error():
    rng = np.random.default_rng(9)
    T, E, k, H = 4, 3, 2, 5
    z = rng.standard_normal((T, E))
    r = numoe.route(z, k)
    plan = numoe.dispatch_plan(r.experts, E)
    N = len(plan.order)
    with pytest.raises(TypeError, match="mix"):
        numoe.router_probs_backward(dev(z), np.ones((T, E)))
    with pytest.raises(TypeError, match="mix"):
        numoe.route_backward(dev(z), r, dev(np.ones((T, k))))
    with pytest.raises(TypeError, match="mix"):
        numoe.permute_backward(dev(np.ones((N, H))), plan)
    with pytest.raises(TypeError, match="mix"):
        numoe.unpermute_backward(dev(np.ones((T, H))), np.ones((N, H)), dev_plan(plan),
                                 dev(r.weights))
    wg = np.ones((E, H, 2))
    with pytest.raises(TypeError, match="mix"):
        numoe.expert_ffn_backward(dev(np.ones((N, H))), plan.offsets, dev(wg), None,
                                  dev(np.ones((E, 2, H))), dev(np.ones((N, H))))
    with pytest.raises(TypeError, match="mix"):
        numoe.load_balancing_loss_backward(dev(z), r.experts)
    with pytest.raises(TypeError, match="mix"):
        numoe.router_z_loss_backward(dev(z), mask=np.ones(T, bool))


def test_bad_values_and_shapes():
    rng = np.random.default_rng(10)
    T, E, k, H = 4, 3, 2, 5
    z = rng.standard_normal((T, E))
    r = numoe.route(z, k)
    dr = (dev(r.weights), dev(r.experts))
    with pytest.raises(ValueError, match="d_probs"):
        numoe.router_probs_backward(dev(z), dev(np.ones((T, E + 1))))
    nan = np.ones((T, E))
    nan[1, 1] = np.nan
    with pytest.raises(ValueError, match="d_probs"):
        numoe.router_probs_backward(dev(z), dev(nan))
    with pytest.raises(ValueError, match="d_weights"):
        numoe.route_backward(dev(z), dr, dev(np.ones((T, k + 1))))
    with pytest.raises(ValueError, match="d_weights"):
        numoe.route_backward(dev(z), dr, dev(nan[:, :k]))
    with pytest.raises(ValueError, match="routing.experts"):
        numoe.route_backward(dev(z), (None, dev(r.experts + E)), dev(np.ones((T, k))))
    with pytest.raises(ValueError, match="score"):
        numoe.route_backward(dev(z), dr, dev(np.ones((T, k))), score="tanh")
    masked = z.copy()
    masked[3] = -np.inf
    with pytest.raises(ValueError, match="row 3"):
        numoe.route_backward(dev(masked), dr, dev(np.ones((T, k))))
    plan = dev_plan(numoe.dispatch_plan(r.experts, E))
    N = T * k
    with pytest.raises(ValueError, match="d_xs"):
        numoe.permute_backward(dev(np.ones((N + 1, H))), plan)
    with pytest.raises(TypeError, match="plan"):
        numoe.permute_backward(dev(np.ones((N, H))), "plan")
    with pytest.raises(ValueError, match="d_y"):
        numoe.unpermute_backward(dev(np.ones((T, H + 1))), dev(np.ones((N, H))), plan,
                                 dr[0])
    with pytest.raises(ValueError, match="weights"):
        numoe.unpermute_backward(dev(np.ones((T, H))), dev(np.ones((N, H))), plan,
                                 dev(nan[:, :k]))
    off = dev(np.array([0, 3, 5, 8]))
    xs, wg, wd = dev(np.ones((N, H))), dev(np.ones((E, H, 2))), dev(np.ones((E, 2, H)))
    with pytest.raises(ValueError, match="d_ys"):
        numoe.expert_ffn_backward(xs, off, wg, None, wd, dev(np.ones((N, H + 1))))
    with pytest.raises(ValueError, match="offsets"):
        numoe.expert_ffn_backward(xs, dev(np.array([0, 3, 2, 8])), wg, None, wd,
                                  dev(np.ones((N, H))))
    with pytest.raises(ValueError, match="w_down"):
        numoe.expert_ffn_backward(xs, off, wg, None, dev(np.ones((E, 3, H))),
                                  dev(np.ones((N, H))))
    with pytest.raises(ValueError, match="swiglu_oai"):
        numoe.expert_ffn_backward(xs, off, wg, None, wd, dev(np.ones((N, H))),
                                  activation="swiglu_oai")
    with pytest.raises(ValueError, match="experts"):
        numoe.load_balancing_loss_backward(dev(z), dev(r.experts + E))
    with pytest.raises(ValueError, match="mask"):
        numoe.router_z_loss_backward(dev(z), mask=dev(np.ones(T + 1, bool)))


# -------------------------------------------------------------------- layer
LAYER_CASES = [   # preset, k, dtype, weight dtype, options
    ("mixtral", 2, np.float32, None, {}),
    ("qwen2_moe", 2, np.float64, None, dict(num_shared_experts=1, shared_expert_dim=8,
                                            router_bias=True)),
    ("switch", 1, np.float64, None, dict(capacity_factor=1.0)),
    ("gpt_oss", 2, np.float32, None, {}),
    ("deepseek_v3", 2, np.float64, None, dict(n_groups=4, topk_groups=2,
                                              num_shared_experts=1, shared_expert_dim=8)),
    ("mixtral", 2, np.float32, BF16, {}),
    ("olmoe", 2, BF16, None, {}),
]


@pytest.mark.parametrize("preset,k,dtype,wdt,kw", LAYER_CASES,
                         ids=[f"{c[0]}-{np.dtype(c[2]).name}-{c[3] is not None}"
                              for c in LAYER_CASES])
def test_device_layer_backward_matches_host(preset, k, dtype, wdt, kw):
    cfg = getattr(numoe.MoEConfig, preset)(num_experts=8, top_k=k, hidden_dim=16,
                                           expert_dim=12, **kw)
    opts = {} if wdt is None else dict(weight_dtype=wdt)
    layer = numoe.MoELayer.random(cfg, seed=2, dtype=dtype, **opts)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3, 16)).astype(dtype)
    d_y = rng.standard_normal(x.shape).astype(dtype)
    coefs = dict(aux_loss_coef=0.1, z_loss_coef=0.01)
    y, info = layer.forward(x, return_info=True)
    want = layer.backward(x, info, d_y, **coefs)
    dl = layer.to_device()
    yd, infod = dl.forward(dev(x), return_info=True)
    got = dl.backward(dev(x), infod, dev(d_y), **coefs)
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert is_device(got[name]), name
        assert to_host(got[name]).shape == w.shape, name
        close(got[name], w, w.dtype, factor=10.0)


def test_device_layer_backward_no_tokens_and_errors():
    cfg = numoe.MoEConfig.mixtral(num_experts=4, top_k=2, hidden_dim=8, expert_dim=6)
    layer = numoe.MoELayer.random(cfg, seed=3)
    dl = layer.to_device()
    x0 = np.zeros((0, 8), np.float32)
    _, info = dl.forward(dev(x0), return_info=True)
    got = dl.backward(dev(x0), info, dev(x0))
    assert to_host(got["x"]).shape == (0, 8)
    assert not to_host(got["w_gate"]).any()
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(3, 8)
    _, info = dl.forward(dev(x), return_info=True)
    a = dl.backward(dev(x), info, dev(x), aux_loss_coef=0.1, z_loss_coef=0.1)
    b = dl.backward(dev(x), info, dev(x), aux_loss_coef=0.1, z_loss_coef=0.1)
    for name in a:                                  # the same bits, run after run
        np.testing.assert_array_equal(to_host(a[name]), to_host(b[name]), name)
    with pytest.raises(TypeError):
        dl.backward(x, info, x)                     # host x, device layer
    with pytest.raises(TypeError):
        layer.backward(dev(x), info, dev(x))        # device x, host layer
    with pytest.raises(ValueError, match="d_y"):
        dl.backward(dev(x), info, dev(np.ones((3, 9), np.float32)))
    with pytest.raises(TypeError, match="info"):
        dl.backward(dev(x), {}, dev(x))


@pytest.mark.parametrize("preset,kw", [("mixtral", {}), ("qwen2_moe", dict(
    num_shared_experts=1, shared_expert_dim=10))], ids=["mixtral", "qwen2_moe"])
def test_device_layer_parameters_are_live(preset, kw):
    """A device layer's parameters() are the device arrays its forward reads, keyed and
    shaped as the host layer's: an SGD step written into them in place gives the
    forward of the host layer updated the same way."""
    from numoe._cuda import _arrays as A
    cfg = getattr(numoe.MoEConfig, preset)(num_experts=4, top_k=2, hidden_dim=8,
                                           expert_dim=6, **kw)
    layer = numoe.MoELayer.random(cfg, seed=5)
    dl = layer.to_device()
    rng = np.random.default_rng(13)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    d_y = rng.standard_normal((5, 8)).astype(np.float32)
    hp, dp = layer.parameters(), dl.parameters()
    assert sorted(hp) == sorted(dp)
    _, info = dl.forward(dev(x), return_info=True)
    g = dl.backward(dev(x), info, dev(d_y))
    for name, p in dp.items():
        assert is_device(p) and tuple(p.shape) == hp[name].shape, name
        new = (to_host(p) - 0.5 * to_host(g[name])).astype(p.dtype)
        p.copy_to_device(A.to_device(new))
        hp[name][...] = new                       # the same step on the host layer
    close(dl(dev(x)), layer(x), np.float32)


def test_device_layer_backward_out():
    """``out=`` on a device layer: the gradients copied into the earlier result's
    device arrays (the same objects returned, equal to a fresh call); a wrong
    ``out`` raises naming it, before anything is written."""
    cfg = numoe.MoEConfig.qwen2_moe(num_experts=4, top_k=2, hidden_dim=8, expert_dim=6,
                                    num_shared_experts=1, shared_expert_dim=10)
    dl = numoe.MoELayer.random(cfg, seed=6).to_device()
    rng = np.random.default_rng(14)
    x = dev(rng.standard_normal((5, 8)).astype(np.float32))
    d_y = dev(rng.standard_normal((5, 8)).astype(np.float32))
    _, info = dl.forward(x, return_info=True)
    g = dl.backward(x, info, d_y)
    x2 = dev(rng.standard_normal((5, 8)).astype(np.float32))
    _, info2 = dl.forward(x2, return_info=True)
    want = dl.backward(x2, info2, d_y, aux_loss_coef=0.1)
    ids = {n: id(a) for n, a in g.items()}
    got = dl.backward(x2, info2, d_y, aux_loss_coef=0.1, out=g)
    assert got is g and {n: id(a) for n, a in got.items()} == ids
    for name in want:
        np.testing.assert_array_equal(to_host(got[name]), to_host(want[name]), name)
    with pytest.raises(TypeError, match="out"):
        dl.backward(x2, info2, d_y, out=[])
    with pytest.raises(ValueError, match="out"):
        dl.backward(x2, info2, d_y, out={k: v for k, v in g.items() if k != "router"})
    with pytest.raises(TypeError, match=r"out\['router'\]"):
        dl.backward(x2, info2, d_y, out=dict(g, router=to_host(g["router"])))
    with pytest.raises(ValueError, match=r"out\['w_down'\]"):
        dl.backward(x2, info2, d_y, out=dict(g, w_down=dev(np.zeros((4, 6, 9), np.float32))))
    with pytest.raises(ValueError, match="share memory"):
        dl.backward(x2, info2, d_y, out=dict(g, router=dl.parameters()["router"]))
    np.testing.assert_array_equal(to_host(g["w_gate"]), to_host(want["w_gate"]))
