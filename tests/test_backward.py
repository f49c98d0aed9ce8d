"""Backward ops and MoELayer.backward: references, finite differences, determinism, training.

Every backward op is compared with its float64 reference VJP in
:mod:`numoe.reference`, and every reference VJP (and the layer) with
central finite differences of the float64 forward. Selections (top-k,
groups, selection bias, capacity drops) carry no gradient: finite-difference
checks perturb by 1e-6 and reject (``assume``) the rare draws where such a
step would change a selection.
"""
import json
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import numoe
from numoe import MoEConfig, MoELayer, reference as ref

from strategies import seeds

EPS = 1e-6
ACTS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")


def close(a, b, rtol=1e-10, atol=1e-12):
    """Max-norm relative check (scaled by the reference's largest entry)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    scale = max(1.0, float(np.abs(b).max())) if b.size else 1.0
    err = float(np.abs(a - b).max()) if a.size else 0.0
    assert err <= atol + rtol * scale, (err, scale)


def fd_grad(f, a, eps=EPS):
    """Central finite differences of the scalar ``f(a)`` for every entry of ``a``."""
    g = np.zeros_like(a, dtype=np.float64)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + eps
        fp = f(a)
        a[i] = old - eps
        fm = f(a)
        a[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


# ------------------------------------------------------------------ routing
@st.composite
def route_cases(draw):
    n_groups = draw(st.sampled_from([1, 2, 4]))
    gsize = draw(st.integers(1, 4))
    E = n_groups * gsize
    topk_groups = draw(st.integers(1, n_groups))
    k = draw(st.integers(1, topk_groups * gsize))
    T = draw(st.integers(0, 6))
    rng = np.random.default_rng(draw(seeds))
    z = rng.normal(0, 2, (T, E))
    if draw(st.booleans()) and T:
        z[rng.random((T, E)) < 0.2] = -np.inf
        z[:, 0] = rng.normal(0, 2, T)
    opts = dict(score=draw(st.sampled_from(["softmax", "sigmoid"])),
                renormalize=draw(st.booleans()), scale=draw(st.sampled_from([1.0, 2.5])))
    sel = dict(n_groups=n_groups, topk_groups=topk_groups,
               bias=rng.normal(0, 0.3, E) if draw(st.booleans()) else None)
    return z, k, opts, sel, rng


@given(route_cases())
def test_route_backward_matches_reference_and_finite_differences(case):
    z, k, opts, sel, rng = case
    r = numoe.route(z, k, **opts, **sel)
    dw = rng.normal(size=r.weights.shape)
    got = numoe.route_backward(z, r, dw, **opts)
    want = ref.route_backward(z, r, dw, **opts)
    close(got, want, rtol=1e-12)
    finite = np.isfinite(z)
    assert np.all(got[~finite] == 0)

    def f(zz):
        rr = ref.route(zz, k, **opts, **sel)
        assert np.array_equal(rr.experts, r.experts)
        return float(np.sum(rr.weights * dw))

    zf = np.where(finite, z, -1e300)         # masked entries stay out of reach
    try:
        num = fd_grad(f, zf.copy())
    except AssertionError:
        assume(False)                        # a step of 1e-6 changed a selection
    close(want[finite], num[finite], rtol=1e-6, atol=1e-7)


@given(st.integers(0, 5), st.integers(1, 6), st.sampled_from(["softmax", "sigmoid"]),
       st.booleans(), seeds)
def test_router_probs_backward(T, E, score, norm, seed):
    rng = np.random.default_rng(seed)
    z, g = rng.normal(0, 2, (2, T, E))
    got = numoe.router_probs_backward(z, g, score=score, normalize=norm)
    want = ref.router_probs_backward(z, g, score, normalize=norm)
    close(got, want, rtol=1e-12, atol=1e-15)
    num = fd_grad(lambda zz: float(np.sum(ref.router_probs(zz, score, normalize=norm) * g)),
                  z.copy())
    close(want, num, rtol=1e-6, atol=1e-8)
    got32 = numoe.router_probs_backward(z.astype(np.float32), g.astype(np.float32), score=score,
                                        normalize=norm)
    assert got32.dtype == np.float32
    close(got32, want, rtol=1e-5, atol=1e-6)


def test_route_backward_validation():
    z = np.zeros((2, 4))
    r = numoe.route(z, 2)
    with pytest.raises(ValueError, match="d_weights"):
        numoe.route_backward(z, r, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="d_weights"):
        numoe.route_backward(z, r, np.full((2, 2), np.nan))
    with pytest.raises(TypeError, match="routing"):
        numoe.route_backward(z, None, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="routing.experts"):
        numoe.route_backward(z, numoe.Routing(r.weights, r.experts + 3), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="score"):
        numoe.router_probs_backward(z, z, score="tanh")
    with pytest.raises(ValueError, match="logits"):
        numoe.router_probs_backward(np.full((1, 2), np.nan), np.zeros((1, 2)))


def test_route_backward_16bit_returns_input_dtype():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 8)).astype(ml_dtypes.bfloat16)
    r = numoe.route(z.astype(np.float32), 2)
    d = numoe.route_backward(z, r, np.ones((5, 2), np.float32))
    assert d.dtype == z.dtype
    close(d.astype(np.float64), ref.route_backward(z.astype(np.float64), r, np.ones((5, 2))),
          rtol=2e-2, atol=1e-2)


# ----------------------------------------------------------------- dispatch
@st.composite
def plans(draw):
    T = draw(st.integers(0, 12))
    E = draw(st.integers(1, 5))
    k = draw(st.integers(1, E))
    rng = np.random.default_rng(draw(seeds))
    ex = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32)
    w = rng.random((T, k))
    cap = draw(st.one_of(st.none(), st.integers(1, max(1, T))))
    policy = draw(st.sampled_from(["slot", "position", "score"]))
    return numoe.dispatch_plan(ex, E, capacity=cap, weights=w, drop_policy=policy), w, rng


@given(plans(), st.integers(1, 5))
def test_permute_and_unpermute_backward(case, H):
    plan, w, rng = case
    T, k = plan.dropped.shape
    N = len(plan.order)
    x, d_y = rng.normal(size=(2, T, H))
    d_xs, ys = rng.normal(size=(2, N, H))
    d_x = numoe.permute_backward(d_xs, plan)
    close(d_x, ref.permute_backward(d_xs, plan), rtol=0, atol=0)
    # the adjoint of a linear map: <permute(x), d_xs> == <x, permute_backward(d_xs)>
    assert np.isclose(np.sum(numoe.permute(x, plan) * d_xs), np.sum(x * d_x))
    d_ys, d_w = numoe.unpermute_backward(d_y, ys, plan, w)
    r_ys, r_w = ref.unpermute_backward(d_y, ys, plan, w)
    close(d_ys, r_ys, rtol=0, atol=0)
    close(d_w, r_w, rtol=1e-14)
    assert np.all(d_w[plan.dropped] == 0)
    assert np.isclose(np.sum(numoe.unpermute(ys, plan, w) * d_y), np.sum(ys * d_ys))
    # d_weights by finite differences (linear in w: exact up to rounding)
    num = fd_grad(lambda ww: float(np.sum(ref.unpermute(ys, plan, ww) * d_y)), w.copy(), 1e-3)
    close(r_w, num, rtol=1e-8, atol=1e-9)
    f32 = numoe.unpermute_backward(d_y.astype(np.float32), ys.astype(np.float32), plan,
                                   w.astype(np.float32))
    assert f32[0].dtype == f32[1].dtype == np.float32
    close(f32[1], r_w, rtol=1e-5, atol=1e-5)


def test_dispatch_backward_validation():
    plan = numoe.dispatch_plan(np.array([[0, 1]]), 2)
    with pytest.raises(ValueError, match="d_xs"):
        numoe.permute_backward(np.zeros((3, 2)), plan)
    with pytest.raises(TypeError, match="plan"):
        numoe.permute_backward(np.zeros((2, 2)), None)
    with pytest.raises(ValueError, match="d_y"):
        numoe.unpermute_backward(np.zeros((2, 2)), np.zeros((2, 2)), plan, np.ones((1, 2)))
    with pytest.raises(ValueError, match="weights"):
        numoe.unpermute_backward(np.zeros((1, 2)), np.zeros((2, 2)), plan, np.ones((1, 3)))


# ------------------------------------------------------------------ experts
@st.composite
def expert_cases(draw, max_rows=9):
    E = draw(st.integers(1, 3))
    H = draw(st.integers(1, 4))
    F = draw(st.integers(1, 4))
    act = draw(st.sampled_from(ACTS))
    glu = act == "swiglu_oai" or draw(st.booleans())
    rng = np.random.default_rng(draw(seeds))
    counts = rng.integers(0, max_rows // E + 2, E)
    if draw(st.booleans()):
        counts[rng.integers(0, E)] = 0               # an expert without rows
    off = np.concatenate([[0], np.cumsum(counts)])
    N = int(off[-1])
    n = lambda *s: rng.normal(size=s)  # noqa: E731
    args = dict(xs=n(N, H) * 1.5, w_gate=n(E, H, F), w_up=n(E, H, F) if glu else None,
                w_down=n(E, F, H))
    bias = draw(st.booleans())
    opts = dict(activation=act, b_gate=n(E, F) if bias else None,
                b_up=n(E, F) if bias and glu else None, b_down=n(E, H) if bias else None,
                limit=(draw(st.sampled_from([None, 0.7, 2.0])) if act == "swiglu_oai" else None))
    return off, args, opts, n(N, H)


def _expert_loss(off, args, opts, d_ys):
    return float(np.sum(ref.expert_ffn(args["xs"], off, args["w_gate"], args["w_up"],
                                       args["w_down"], **opts) * d_ys))


@given(expert_cases())
def test_expert_ffn_backward_matches_reference_and_finite_differences(case):
    off, args, opts, d_ys = case
    got = numoe.expert_ffn_backward(args["xs"], off, args["w_gate"], args["w_up"],
                                    args["w_down"], d_ys, **opts)
    want = ref.expert_ffn_backward(args["xs"], off, args["w_gate"], args["w_up"],
                                   args["w_down"], d_ys, **opts)
    assert isinstance(got, numoe.ExpertGrads)
    for name in got._fields:
        if want[name] is None:
            assert getattr(got, name) is None
        else:
            close(getattr(got, name), want[name], rtol=1e-11)
    # the reference by finite differences: inputs, weights, biases
    wrt = {**args, **{n: opts[n] for n in ("b_gate", "b_up", "b_down")}}
    for name, a in wrt.items():
        if a is None:
            continue

        def f(v, name=name):
            a2 = dict(args)
            o2 = dict(opts)
            (a2 if name in a2 else o2)[name] = v
            return _expert_loss(off, a2, o2, d_ys)

        num = fd_grad(f, a.copy())
        close(want["d_" + name], num, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("act", ACTS)
def test_expert_ffn_backward_float32(act):
    rng = np.random.default_rng(1)
    E, H, F, N = 3, 16, 24, 50
    off = [0, 20, 20, N]
    xs, d_ys = rng.normal(size=(2, N, H)).astype(np.float32)
    wg, wu = (rng.normal(size=(2, E, H, F)) / 4).astype(np.float32)
    wd = (rng.normal(size=(E, F, H)) / 5).astype(np.float32)
    bg, bu = (rng.normal(size=(2, E, F)) / 10).astype(np.float32)
    lim = 0.5 if act == "swiglu_oai" else None
    got = numoe.expert_ffn_backward(xs, off, wg, wu, wd, d_ys, activation=act, b_gate=bg,
                                    b_up=bu, limit=lim)
    want = ref.expert_ffn_backward(xs, off, wg, wu, wd, d_ys, activation=act, b_gate=bg,
                                   b_up=bu, limit=lim)
    for name in got._fields:
        g = getattr(got, name)
        if want[name] is None:
            assert g is None
            continue
        assert g.dtype == np.float32
        close(g, want[name], rtol=1e-5, atol=1e-5)
    assert np.all(got.d_w_gate[1] == 0) and np.all(got.d_b_up[1] == 0)   # empty expert


def test_swiglu_oai_clamped_entries_get_no_gradient():
    # one row, one hidden unit: gate far above the limit, up far below -limit
    xs = np.array([[1.0]])
    g = numoe.expert_ffn_backward(xs, [0, 1], np.array([[[10.0]]]), np.array([[[-10.0]]]),
                                  np.array([[[1.0]]]), np.array([[1.0]]),
                                  activation="swiglu_oai", limit=7.0)
    assert g.d_w_gate[0, 0, 0] == 0 and g.d_w_up[0, 0, 0] == 0 and g.d_xs[0, 0] == 0
    assert g.d_w_down[0, 0, 0] != 0


def test_expert_ffn_backward_validation():
    xs = np.zeros((3, 2))
    w = np.zeros((1, 2, 2))
    with pytest.raises(ValueError, match="d_ys"):
        numoe.expert_ffn_backward(xs, [0, 3], w, w, w, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="offsets"):
        numoe.expert_ffn_backward(xs, [0, 2], w, w, w, xs)
    with pytest.raises(ValueError, match="activation"):
        numoe.expert_ffn_backward(xs, [0, 3], w, w, w, xs, activation="tanh")
    with pytest.raises(ValueError, match="w_gate"):
        numoe.expert_ffn_backward(xs, [0, 3], np.zeros((1, 3, 2)), w, w, xs)


# ------------------------------------------------------------------- losses
@given(st.integers(0, 8), st.integers(1, 6), st.booleans(), seeds)
def test_loss_backwards(T, E, use_mask, seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, E + 1))
    z = rng.normal(0, 2, (T, E))
    p = ref.router_probs(z)
    ex = np.argsort(rng.random((T, E)), axis=1)[:, :k]
    mask = rng.random(T) < 0.6 if use_mask else None
    c = float(rng.uniform(0.1, 2.0))
    got = numoe.load_balancing_loss_backward(p, ex, mask=mask, d_loss=c)
    want = ref.load_balancing_loss_backward(p, ex, mask=mask, d_loss=c)
    close(got, want, rtol=1e-14)
    num = fd_grad(lambda pp: c * ref.load_balancing_loss(pp, ex, mask=mask), p.copy())
    close(want, num, rtol=1e-7, atol=1e-8)
    got = numoe.router_z_loss_backward(z, mask=mask, d_loss=c)
    want = ref.router_z_loss_backward(z, mask=mask, d_loss=c)
    close(got, want, rtol=1e-12)
    num = fd_grad(lambda zz: c * ref.router_z_loss(zz, mask=mask), z.copy())
    close(want, num, rtol=1e-6, atol=1e-8)


def test_loss_backward_validation():
    with pytest.raises(ValueError, match="logits"):
        numoe.router_z_loss_backward(np.full((1, 2), -np.inf))
    with pytest.raises(ValueError, match="probs"):
        numoe.load_balancing_loss_backward(np.full((1, 2), np.nan), np.array([[0]]))
    with pytest.raises(TypeError, match="d_loss"):
        numoe.router_z_loss_backward(np.zeros((1, 2)), d_loss="1")


# -------------------------------------------------------------------- layer
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "switch",
            "plain_gelu", "sigmoid_norenorm")


def make_config(family, E, k, H, F):
    if family == "mixtral":
        return MoEConfig.mixtral(num_experts=E, top_k=k, hidden_dim=H, expert_dim=F)
    if family == "qwen2_moe":
        return MoEConfig.qwen2_moe(num_experts=E, top_k=k, hidden_dim=H, expert_dim=F,
                                   shared_expert_dim=F + 1)
    if family == "qwen3_moe":
        return MoEConfig.qwen3_moe(num_experts=E, top_k=k, hidden_dim=H, expert_dim=F)
    if family == "olmoe":
        return MoEConfig.olmoe(num_experts=E, top_k=k, hidden_dim=H, expert_dim=F)
    if family == "deepseek_v3":
        return MoEConfig.deepseek_v3(num_experts=2 * E, top_k=k, hidden_dim=H, expert_dim=F,
                                     n_groups=2, topk_groups=1)
    if family == "gpt_oss":
        return MoEConfig.gpt_oss(num_experts=E, top_k=k, hidden_dim=H, expert_dim=F,
                                 limit=1.0)
    if family == "switch":
        return MoEConfig.switch(num_experts=E, hidden_dim=H, expert_dim=F,
                                capacity_factor=0.75)
    if family == "plain_gelu":
        return MoEConfig(E, k, H, F, glu=False, activation="gelu", expert_bias=True,
                         router_bias=True, capacity_factor=1.0, drop_policy="score")
    return MoEConfig(E, k, H, F, score="sigmoid", renormalize=False, scale=1.5,
                     activation="gelu_tanh", num_shared_experts=1, shared_expert_dim=3,
                     shared_gate=True)


def layer_loss_ref(layer, x, d_y, params, aux, zc, fixed):
    """The float64 reference of ``layer.backward``'s loss at ``params``; asserts the
    selections equal ``fixed`` (experts, dropped)."""
    cfg = layer.config
    kw = layer.weights()
    kw.update(params)
    lg = x @ kw["router"] + (0.0 if kw["router_bias"] is None else kw["router_bias"])
    r = ref.route(lg, cfg.top_k, score=cfg.score, renormalize=cfg.renormalize,
                  bias=kw["selection_bias"], n_groups=cfg.n_groups,
                  topk_groups=cfg.topk_groups, group_score=cfg.group_score, scale=cfg.scale)
    cap = None if cfg.capacity_factor is None else ref.capacity(
        x.shape[0], cfg.num_experts, cfg.top_k, cfg.capacity_factor)
    plan = ref.dispatch_plan(r.experts, cfg.num_experts, capacity=cap, weights=r.weights,
                             drop_policy=cfg.drop_policy)
    assert np.array_equal(r.experts, fixed[0]) and np.array_equal(plan.dropped, fixed[1])
    y = ref.moe_forward(x, top_k=cfg.top_k, **kw)
    aux_v = ref.load_balancing_loss(ref.router_probs(lg, cfg.score, normalize=True),
                                    r.experts) if len(x) else 0
    z_v = ref.router_z_loss(lg) if len(x) else 0
    return float(np.sum(y * d_y) + aux * aux_v + zc * z_v)


@settings(max_examples=25)
@given(st.sampled_from(FAMILIES), st.integers(2, 4), st.integers(1, 2), st.integers(2, 5),
       st.integers(1, 4), st.integers(1, 7), st.sampled_from([0.0, 0.5]),
       st.sampled_from([0.0, 0.3]), seeds)
def test_layer_backward_directional_finite_differences(family, E, k, H, F, T, aux, zc, seed):
    cfg = make_config(family, E, min(k, E), H, F)
    rng = np.random.default_rng(seed)
    kw = {}
    if cfg.selection_bias:
        kw["selection_bias"] = rng.normal(0, 0.3, cfg.num_experts)
    base = MoELayer.random(cfg, seed=seed % 1000, dtype=np.float64)
    layer = MoELayer(cfg, **{**{n: a for n, a in base.parameters().items()}, **kw})
    x = rng.normal(size=(T, H))
    y, info = layer.forward(x, return_info=True)
    d_y = rng.normal(size=y.shape)
    g = layer.backward(x, info, d_y, aux_loss_coef=aux, z_loss_coef=zc)
    params = {n: p.copy() for n, p in layer.parameters().items()}
    assert set(g) == {"x"} | set(params)
    fixed = (info["routing"].experts, info["plan"].dropped)
    for name in ["x", *params]:
        a = x if name == "x" else params[name]
        assert g[name].shape == a.shape and g[name].dtype == a.dtype
        v = rng.normal(size=a.shape)

        def f(t, name=name, a=a, v=v):
            p2 = dict(params)
            xx = x
            if name == "x":
                xx = x + t * v
            else:
                p2[name] = a + t * v
            return layer_loss_ref(layer, xx, d_y, p2, aux, zc, fixed)

        try:
            num = (f(EPS) - f(-EPS)) / (2 * EPS)
        except AssertionError:
            assume(False)
        got = float(np.sum(g[name] * v))
        assert abs(got - num) <= 1e-6 * (1 + abs(num)), (name, got, num)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss", "switch",
                                    "plain_gelu", "sigmoid_norenorm"])
def test_layer_backward_every_coordinate(family):
    cfg = make_config(family, 4, 2, 4, 3)
    layer = MoELayer.random(cfg, seed=3, dtype=np.float64)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(7, 4))
    y, info = layer.forward(x, return_info=True)
    if cfg.capacity_factor is not None:
        assert info["plan"].dropped.any()
    d_y = rng.normal(size=y.shape)
    g = layer.backward(x, info, d_y, aux_loss_coef=0.4, z_loss_coef=0.2)
    fixed = (info["routing"].experts, info["plan"].dropped)
    params = {n: p.copy() for n, p in layer.parameters().items()}
    for name in ["x", *params]:
        if name == "x":
            num = fd_grad(lambda xx: layer_loss_ref(layer, xx, d_y, params, 0.4, 0.2, fixed),
                          x.copy())
        else:
            num = fd_grad(lambda a, name=name: layer_loss_ref(
                layer, x, d_y, {**params, name: a}, 0.4, 0.2, fixed), params[name].copy())
        close(g[name], num, rtol=1e-6, atol=1e-7)


def test_layer_backward_float32_matches_float64():
    cfg = make_config("qwen2_moe", 8, 2, 16, 24)
    l64 = MoELayer.random(cfg, seed=1, dtype=np.float64)
    l32 = MoELayer(cfg, **{n: a.astype(np.float32) for n, a in l64.parameters().items()})
    x = np.random.default_rng(2).normal(size=(2, 20, 16))
    d_y = np.random.default_rng(3).normal(size=x.shape)
    y64, i64 = l64.forward(x, return_info=True)
    y32, i32 = l32.forward(x.astype(np.float32), return_info=True)
    assert np.array_equal(i64["routing"].experts, i32["routing"].experts)
    g64 = l64.backward(x, i64, d_y, aux_loss_coef=0.1, z_loss_coef=0.01)
    g32 = l32.backward(x.astype(np.float32), i32, d_y.astype(np.float32), aux_loss_coef=0.1,
                       z_loss_coef=0.01)
    for name in g64:
        assert g32[name].dtype == np.float32 and g32[name].shape == g64[name].shape
        close(g32[name], g64[name], rtol=2e-5, atol=2e-5)


def test_parameters_are_live():
    cfg = make_config("qwen2_moe", 4, 2, 8, 6)
    layer = MoELayer.random(cfg, seed=0)
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    y0 = layer(x)
    params = layer.parameters()
    assert set(params) == {"router", "w_gate", "w_up", "w_down", "shared_gate_proj",
                           "shared_up_proj", "shared_down_proj", "shared_gate_weight"}
    for name in ("w_up", "shared_gate_proj", "w_down", "router"):
        before = layer(x)
        params[name] *= np.float32(0.5)              # an in-place optimizer step
        assert not np.array_equal(layer(x), before), name
    assert not np.array_equal(layer(x), y0)


def test_backward_validation():
    layer = MoELayer.random(make_config("mixtral", 4, 2, 8, 6), seed=0)
    x = np.ones((3, 8), np.float32)
    y, info = layer.forward(x, return_info=True)
    with pytest.raises(ValueError, match="d_y"):
        layer.backward(x, info, np.ones((3, 7), np.float32))
    with pytest.raises(TypeError, match="info"):
        layer.backward(x, {"logits": info["logits"]}, y)
    with pytest.raises(ValueError, match="info"):
        layer.backward(x[:2], info, y[:2])
    with pytest.raises(TypeError, match="aux_loss_coef"):
        layer.backward(x, info, y, aux_loss_coef="0.1")


def test_zero_tokens():
    layer = MoELayer.random(make_config("qwen2_moe", 4, 2, 8, 6), seed=0)
    x = np.zeros((0, 8), np.float32)
    y, info = layer.forward(x, return_info=True)
    g = layer.backward(x, info, y, aux_loss_coef=1.0, z_loss_coef=1.0)
    assert g["x"].shape == (0, 8)
    assert all(not g[n].any() for n in layer.parameters())



# ------------------------------------------------------------ out= buffers
OUT_CASES = [("mixtral", {}), ("qwen2_moe", {}), ("plain_gelu", {}), ("switch", {}),
             ("sigmoid_norenorm", {}), ("gpt_oss", {}),
             ("qwen2_moe", dict(weight_dtype="bfloat16")),
             ("qwen2_moe", dict(dtype="bfloat16")), ("mixtral", dict(dtype=np.float64)),
             ("qwen2_moe", dict(weight_dtype="int8"))]


def _step(layer, x, d_y, **kw):
    y, info = layer.forward(x, return_info=True)
    return layer.backward(x, info, d_y, aux_loss_coef=0.1, z_loss_coef=0.01, **kw)


@pytest.mark.parametrize("family,opts", OUT_CASES, ids=lambda v: str(v))
def test_backward_out_bit_identical_and_reused(family, opts):
    layer = MoELayer.random(make_config(family, 8, 2, 16, 12), seed=1, **opts)
    rng = np.random.default_rng(2)
    x1, x2, d_y = (rng.standard_normal((2, 11, 16)).astype(layer.dtype) for _ in range(3))
    params = {n: (p.copy() if isinstance(p, np.ndarray) else p.values.copy())
              for n, p in layer.parameters().items()}
    inputs = (x1.copy(), x2.copy(), d_y.copy())
    g1, g2 = _step(layer, x1, d_y), _step(layer, x2, d_y)
    buf = _step(layer, x1, d_y)
    before = {n: id(a) for n, a in buf.items()}
    got = _step(layer, x2, d_y, out=buf)
    assert got is buf and {n: id(a) for n, a in got.items()} == before
    assert set(got) == set(g2)
    for n in g2:       # overwritten, not accumulated; same values as out=None
        assert got[n].dtype == g2[n].dtype and np.array_equal(got[n], g2[n]), n
    if layer.config.glu and got["w_gate"].itemsize >= 4:   # fused halves (not 16-bit)
        assert got["w_gate"].base is got["w_up"].base is not None
    # any arrays of the right shapes and dtypes (filled with garbage) will do
    other = {n: np.full_like(a, 7) for n, a in g1.items()}
    other["w_gate"] = np.asfortranarray(other["w_gate"])
    _step(layer, x1, d_y, out=other)
    for n in g1:
        assert np.array_equal(other[n], g1[n]), n
    for n, p in layer.parameters().items():
        assert np.array_equal(p if isinstance(p, np.ndarray) else p.values, params[n]), n
    assert all(np.array_equal(a, b) for a, b in zip((x1, x2, d_y), inputs))


def test_backward_out_zeroes_experts_without_rows():
    cfg = make_config("plain_gelu", 8, 1, 16, 12)       # expert bias, router bias
    layer = MoELayer.random(cfg, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    d_y = np.ones_like(x)
    y, info = layer.forward(x, return_info=True)
    unused = np.flatnonzero(np.diff(info["plan"].offsets) == 0)
    assert unused.size >= 5
    ref_g = layer.backward(x, info, d_y)
    out = {n: np.full_like(a, np.nan) for n, a in ref_g.items()}
    layer.backward(x, info, d_y, out=out)
    for n in ("w_gate", "w_down", "b_gate", "b_down"):
        assert not out[n][unused].any(), n
        assert np.array_equal(out[n], ref_g[n]), n


def test_backward_out_validation():
    layer = MoELayer.random(make_config("qwen2_moe", 4, 2, 8, 6), seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    d_y = rng.standard_normal((5, 8)).astype(np.float32)
    y, info = layer.forward(x, return_info=True)
    good = layer.backward(x, info, d_y)
    params = {n: p.copy() for n, p in layer.parameters().items()}
    x0, dy0 = x.copy(), d_y.copy()

    def bad(exc, match, **change):
        out = {n: a.copy() for n, a in good.items()}
        for n, v in change.items():
            if v is None:
                del out[n]
            else:
                out[n] = v
        snap = {n: a.copy() for n, a in out.items()}
        with pytest.raises(exc, match=match):
            layer.backward(x, info, d_y, out=out)
        for n, a in snap.items():        # nothing written before the error
            assert np.array_equal(out[n], a), n

    with pytest.raises(TypeError, match="out"):
        layer.backward(x, info, d_y, out=list(good.values()))
    bad(ValueError, r"out.*missing \['router'\]", router=None)
    with pytest.raises(ValueError, match=r"out.*extra \['bogus'\]"):
        layer.backward(x, info, d_y, out={**good, "bogus": np.zeros(1)})
    bad(TypeError, r"out\['w_down'\].*NumPy array", w_down=good["w_down"].tolist())
    bad(TypeError, r"out\['router'\].*dtype float32", router=good["router"].astype(np.float64))
    bad(TypeError, r"out\['x'\].*dtype", x=good["x"].astype(">f4"))
    bad(ValueError, r"out\['w_up'\].*shape", w_up=good["w_up"][:, :, :-1].copy())
    bad(ValueError, r"out\['x'\].*shape", x=good["x"].reshape(1, 5, 8))
    ro = good["w_down"].copy()
    ro.flags.writeable = False
    bad(ValueError, r"out\['w_down'\].*writeable", w_down=ro)
    bad(ValueError, r"out\['x'\].*share memory with x", x=x)
    bad(ValueError, r"out\['x'\].*share memory with d_y", x=d_y)
    bad(ValueError, r"out\['w_up'\].*share memory with w_gate", w_up=layer.w_gate)
    bad(ValueError, r"out\['router'\].*share memory with router", router=layer.router)
    bad(ValueError, r"out\['w_up'\].*out\['w_gate'\].*share memory",
        w_gate=good["w_gate"], w_up=good["w_gate"])
    for n, p in layer.parameters().items():
        assert np.array_equal(p, params[n]), n
    assert np.array_equal(x, x0) and np.array_equal(d_y, dy0)


def test_backward_out_training_loop_matches_fresh():
    """SGD with reused gradient buffers follows the out=None run bit for bit."""
    cfg = MoEConfig.qwen3_moe(num_experts=4, top_k=2, hidden_dim=8, expert_dim=16)
    a, b = MoELayer.random(cfg, seed=2), MoELayer.random(cfg, seed=2)
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    target = np.sin(x)
    g_b = None
    for _ in range(5):
        for layer, reuse in ((a, False), (b, True)):
            y, info = layer.forward(x, return_info=True)
            kw = {"out": g_b} if reuse and g_b is not None else {}
            g = layer.backward(x, info, 2 * (y - target) / y.size, aux_loss_coef=0.01, **kw)
            if reuse:
                g_b = g
            for name, p in layer.parameters().items():
                p -= np.float32(0.5) * g[name]
    for name, p in a.parameters().items():
        assert np.array_equal(p, b.parameters()[name]), name


# ---------------------------------------------------------------- threads
SCRIPT = textwrap.dedent(r'''
    import json, sys
    import numba, numpy as np, numoe
    out = {}
    rng = np.random.default_rng(7)
    for fam, kw in [("mixtral", {}), ("deepseek", dict(score="sigmoid", n_groups=4,
                    topk_groups=2, num_shared_experts=1, shared_expert_dim=96,
                    shared_gate=True, expert_bias=True, router_bias=True)),
                    ("switch", dict(top_k=1, glu=False, activation="relu",
                    capacity_factor=1.0))]:
        k = kw.pop("top_k", 2)
        cfg = numoe.MoEConfig(8, k, 64, 96, **kw)
        layer = numoe.MoELayer.random(cfg, seed=1)
        x = rng.standard_normal((1500, 64)).astype(np.float32)
        y, info = layer.forward(x, return_info=True)
        g = layer.backward(x, info, np.cos(y), aux_loss_coef=0.01, z_loss_coef=0.001)
        for name, a in g.items():
            out[f"{fam}.{name}"] = a
    xs = rng.standard_normal((3000, 128))
    off = np.array([0, 10, 1200, 1200, 3000])
    w = rng.standard_normal((3, 4, 128, 256)) * 0.05
    grads = numoe.expert_ffn_backward(xs, off, w[0], w[1], w[2].transpose(0, 2, 1),
                                      np.sin(xs), activation="gelu")
    for name in grads._fields:
        if getattr(grads, name) is not None:
            out[f"expert_ffn.{name}"] = getattr(grads, name)
    np.savez(sys.argv[1], **out)
    print(json.dumps({"threads": numba.get_num_threads()}))
''')


def test_gradients_bit_identical_at_one_and_two_threads(tmp_path):
    res = {}
    for n in (1, 2):
        env = dict(os.environ, NUMBA_NUM_THREADS=str(n))
        path = tmp_path / f"g{n}.npz"
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1])["threads"] == n
        with np.load(path) as f:
            res[n] = {name: f[name] for name in f.files}
    assert sorted(res[1]) == sorted(res[2]) and len(res[1]) > 20
    differ = [n for n in res[1] if res[1][n].tobytes() != res[2][n].tobytes()]
    assert not differ, differ


# ---------------------------------------------------------------- training
def test_short_training_run_lowers_the_loss():
    """Teacher-student regression: 40 SGD steps on a fresh student lower the MSE."""
    cfg = MoEConfig.qwen3_moe(num_experts=4, top_k=2, hidden_dim=8, expert_dim=16)
    teacher = MoELayer.random(cfg, seed=1, dtype=np.float64)
    student = MoELayer.random(cfg, seed=2, dtype=np.float64)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8))
    target = teacher(x)
    losses = []
    for _ in range(40):
        y, info = student.forward(x, return_info=True)
        err = y - target
        losses.append(float(np.mean(err ** 2)))
        g = student.backward(x, info, 2 * err / err.size, aux_loss_coef=0.01)
        for name, p in student.parameters().items():
            p -= 0.5 * g[name]
    assert losses[-1] < 0.5 * losses[0], losses
