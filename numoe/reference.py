"""float64 NumPy/SciPy oracle of every public numoe op.

Short and obviously right, not fast: this module is the ground truth the
compiled kernels are tested against and a readable statement of the maths.
It does no argument validation beyond what the maths needs; call it with
the same arguments you would give the public function. All floating-point
results are float64; index results follow the public dtypes.

Equations follow the papers cited by the public docstrings: Shazeer et al.
2017 (top-k gating), Lepikhin et al. 2020 (GShard capacity), Fedus et al.
2021 (Switch load-balancing loss, eq. 4), Zoph et al. 2022 (ST-MoE
router z-loss, eq. 5), DeepSeek-AI 2024 (DeepSeek-V3 group-limited sigmoid
routing and auxiliary-loss-free bias update).
"""
from __future__ import annotations

import math
import numpy as np
from scipy import special

from ._types import DispatchPlan, Routing


# ----------------------------------------------------------------- routing
def router_probs(logits, score="softmax", normalize=False):
    """Full scores ``[T, E]``: softmax over experts or elementwise sigmoid
    (``normalize``: sigmoid rows divided by their sum)."""
    z = np.asarray(logits, dtype=np.float64)
    if score == "softmax":
        return special.softmax(z, axis=-1)
    if score == "sigmoid":
        s = special.expit(z)
        if normalize:
            total = s.sum(axis=-1, keepdims=True)
            s = np.where(total > 0, s / np.where(total > 0, total, 1.0), 0.0)
        return s
    raise ValueError(score)


def _topk_desc(sel, k):
    """Indices of the k largest per row, descending, ties to the lower id."""
    return np.argsort(-sel, axis=-1, kind="stable")[..., :k]


def route(logits, k, *, score="softmax", renormalize=True, bias=None,
          n_groups=1, topk_groups=None, group_score="top2", scale=1.0):
    """Top-k routing. See :func:`numoe.route` for the contract."""
    z = np.asarray(logits, dtype=np.float64)
    T, E = z.shape
    s = router_probs(z, score)
    if bias is None:
        # s is a strictly increasing function of the logit in each row, so the
        # k largest s are exactly the k largest logits (ties = equal logits).
        sel = z.copy()
    else:
        sel = s + np.asarray(bias, dtype=np.float64)
    if n_groups > 1 and topk_groups is not None and topk_groups < n_groups:
        gsel = (s if bias is None else sel).reshape(T, n_groups, E // n_groups)
        if group_score == "top2":
            gs = np.sort(gsel, axis=-1)[..., ::-1][..., :2].sum(-1)
        else:
            gs = gsel.max(-1)
        keep = _topk_desc(gs, topk_groups)
        mask = np.zeros((T, n_groups), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=1)
        sel = np.where(np.repeat(mask, E // n_groups, axis=1), sel, -np.inf)
    experts = _topk_desc(sel, k).astype(np.int32)
    w = np.take_along_axis(s, experts, axis=1)
    if renormalize:
        w = w / (w.sum(axis=1, keepdims=True) + 1e-20)
    return Routing(w * scale, experts)


# ---------------------------------------------------------------- dispatch
def capacity(num_tokens, num_experts, k, capacity_factor):
    """``ceil(capacity_factor * T * k / E)`` clamped to ``[1, T]``."""
    c = math.ceil(capacity_factor * num_tokens * k / num_experts)
    return int(min(max(c, 1), max(num_tokens, 1)))


def dispatch_plan(experts, num_experts, *, capacity=None, weights=None, drop_policy="slot"):
    """Stable grouping of the T*k assignments by expert, with optional capacity."""
    ex = np.asarray(experts)
    T, k = ex.shape
    flat = ex.reshape(-1).astype(np.int64)
    ids = np.arange(T * k, dtype=np.int64)
    keep = np.ones(T * k, dtype=bool)
    if capacity is not None:
        if drop_policy == "slot":       # all first choices, then second, ...
            prio = np.lexsort((ids // k, ids % k))
        elif drop_policy == "position":  # token order over all slots
            prio = ids
        elif drop_policy == "score":     # highest weight first, ties lower flat id
            prio = np.lexsort((ids, -np.asarray(weights, dtype=np.float64).reshape(-1)))
        else:
            raise ValueError(drop_policy)
        seen = np.zeros(num_experts, dtype=np.int64)
        for i in prio:
            e = flat[i]
            keep[i] = seen[e] < capacity
            seen[e] += 1
    kept = ids[keep]
    order = kept[np.argsort(flat[keep], kind="stable")]
    counts = np.bincount(flat[keep], minlength=num_experts).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    idx_dtype = np.int64 if T * k > np.iinfo(np.int32).max else np.int32
    return DispatchPlan(order.astype(idx_dtype), offsets, counts,
                        (~keep).reshape(T, k), capacity)


def permute(x, plan):
    """``xs[i] = x[order[i] // k]``."""
    k = plan.dropped.shape[1]
    return np.asarray(x, dtype=np.float64)[np.asarray(plan.order) // k]


def unpermute(ys, plan, weights):
    """``y[t] = sum_j weights[t, j] * ys[pos(t, j)]`` over kept slots, j ascending."""
    T, k = plan.dropped.shape
    ys = np.asarray(ys, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    pos = np.full(T * k, -1, dtype=np.int64)
    pos[np.asarray(plan.order, dtype=np.int64)] = np.arange(len(plan.order))
    pos = pos.reshape(T, k)
    y = np.zeros((T, ys.shape[1]))
    for j in range(k):
        m = pos[:, j] >= 0
        y[m] += w[m, j, None] * ys[pos[m, j]]
    return y


# ----------------------------------------------------------------- experts
def activation(name, x):
    """Elementwise activations used by the expert FFNs."""
    if name == "silu":
        return x * special.expit(x)
    if name == "gelu":
        return 0.5 * x * (1.0 + special.erf(x / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "relu":
        return np.maximum(x, 0.0)
    raise ValueError(name)


def expert_ffn(xs, offsets, w_gate, w_up, w_down, *, activation="silu", b_gate=None,
               b_up=None, b_down=None, limit=None, alpha=1.702):
    """Run rows ``offsets[e]:offsets[e+1]`` of ``xs`` through expert ``e``."""
    act = activation
    xs = np.asarray(xs, dtype=np.float64)
    E = np.asarray(w_gate).shape[0]
    H = np.asarray(w_down).shape[2]
    ys = np.zeros((xs.shape[0], H))
    f64 = lambda a, e: 0.0 if a is None else np.asarray(a, dtype=np.float64)[e]  # noqa: E731
    for e in range(E):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi == lo:
            continue
        x = xs[lo:hi]
        g = x @ np.asarray(w_gate[e], dtype=np.float64) + f64(b_gate, e)
        if w_up is None:
            h = globals()["activation"](act, g)
        else:
            u = x @ np.asarray(w_up[e], dtype=np.float64) + f64(b_up, e)
            if act == "swiglu_oai":
                if limit is not None:
                    g = np.minimum(g, limit)
                    u = np.clip(u, -limit, limit)
                h = (u + 1.0) * g * special.expit(alpha * g)
            else:
                h = globals()["activation"](act, g) * u
        ys[lo:hi] = h @ np.asarray(w_down[e], dtype=np.float64) + f64(b_down, e)
    return ys


# ------------------------------------------------------------------ losses
def expert_counts(experts, num_experts):
    return np.bincount(np.asarray(experts).reshape(-1), minlength=num_experts).astype(np.int64)


def load_balancing_loss(probs, experts, *, mask=None):
    """Switch eq. 4: ``E * sum_i f_i P_i`` over the (unmasked) tokens."""
    p = np.asarray(probs, dtype=np.float64)
    ex = np.asarray(experts)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        p, ex = p[m], ex[m]
    T, E = p.shape
    if T == 0:
        return 0.0
    f = expert_counts(ex, E) / ex.size
    P = p.mean(axis=0)
    return float(E * np.dot(f, P))


def router_z_loss(logits, *, mask=None):
    """ST-MoE eq. 5: mean over tokens of ``logsumexp(logits[t]) ** 2``."""
    z = np.asarray(logits, dtype=np.float64)
    if mask is not None:
        z = z[np.asarray(mask, dtype=bool)]
    if z.shape[0] == 0:
        return 0.0
    return float(np.mean(special.logsumexp(z, axis=1) ** 2))


def update_bias(bias, counts, rate):
    """Aux-loss-free balancing: ``bias + rate * sign(mean(counts) - counts)`` (float32)."""
    c = np.asarray(counts, dtype=np.float64)
    return (np.asarray(bias, dtype=np.float64) + rate * np.sign(c.mean() - c)).astype(np.float32)


def routing_stats(experts, num_experts, *, weights=None, plan=None):
    """Load statistics of one routing decision (see :func:`numoe.routing_stats`)."""
    counts = expert_counts(experts, num_experts)
    mean = counts.mean() if num_experts else 0.0
    mx = counts.max() if counts.size else 0
    out = {
        "counts": counts,
        "cv": float(counts.std() / mean) if mean > 0 else 0.0,
        "max_over_mean": float(mx / mean) if mean > 0 else 0.0,
        "balancedness": float(mean / mx) if mx > 0 else 0.0,
        "dead_experts": int((counts == 0).sum()),
        "drop_rate": 0.0,
    }
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        out["weight_mass"] = np.bincount(np.asarray(experts).reshape(-1), weights=w,
                                         minlength=num_experts)
    if plan is not None:
        out["kept_counts"] = np.asarray(plan.counts, dtype=np.int64)
        d = np.asarray(plan.dropped)
        out["drop_rate"] = float(d.mean()) if d.size else 0.0
    return out


# ------------------------------------------------------------------- layer
def moe_forward(x, *, router, w_gate, w_up, w_down, top_k, score="softmax",
                renormalize=True, n_groups=1, topk_groups=None, group_score="top2",
                scale=1.0, activation="silu", capacity_factor=None, drop_policy="slot",
                router_bias=None, selection_bias=None, b_gate=None, b_up=None, b_down=None,
                shared_gate_proj=None, shared_up_proj=None, shared_down_proj=None,
                shared_gate_weight=None, limit=None, alpha=1.702):
    """Whole MoE layer: router, top-k, dispatch, experts, combine, shared expert."""
    x = np.asarray(x, dtype=np.float64)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    T = x2.shape[0]
    E = np.asarray(router).shape[1]
    logits = x2 @ np.asarray(router, dtype=np.float64)
    if router_bias is not None:
        logits = logits + np.asarray(router_bias, dtype=np.float64)
    r = route(logits, top_k, score=score, renormalize=renormalize, bias=selection_bias,
              n_groups=n_groups, topk_groups=topk_groups, group_score=group_score, scale=scale)
    cap = None if capacity_factor is None else capacity(T, E, top_k, capacity_factor)
    plan = dispatch_plan(r.experts, E, capacity=cap, weights=r.weights, drop_policy=drop_policy)
    ys = expert_ffn(permute(x2, plan), plan.offsets, w_gate, w_up, w_down,
                    activation=activation, b_gate=b_gate, b_up=b_up, b_down=b_down,
                    limit=limit, alpha=alpha)
    y = unpermute(ys, plan, r.weights)
    if shared_gate_proj is not None:
        sg = x2 @ np.asarray(shared_gate_proj, dtype=np.float64)
        su = x2 @ np.asarray(shared_up_proj, dtype=np.float64)
        sh = (sg * special.expit(sg) * su) @ np.asarray(shared_down_proj, dtype=np.float64)
        if shared_gate_weight is not None:
            sh = sh * special.expit(x2 @ np.asarray(shared_gate_weight, dtype=np.float64))[:, None]
        y = y + sh
    return y.reshape(*lead, y.shape[-1])


# --------------------------------------------------------- backward (VJPs)
# Each function returns the vector-Jacobian product of the forward above it,
# in float64, with every selection (top-k, groups, selection bias, capacity
# drops) held fixed. They are checked against finite differences in
# tests/test_backward.py.
def router_probs_backward(logits, d_probs, score="softmax", normalize=False):
    """``d_logits`` of :func:`router_probs` given ``d_probs``."""
    s = router_probs(logits, score)
    g = np.asarray(d_probs, dtype=np.float64)
    if normalize and score == "sigmoid":      # through p = s / S
        total = s.sum(axis=-1, keepdims=True)
        p = router_probs(logits, score, normalize=True)
        g = np.where(total > 0, (g - np.sum(g * p, axis=-1, keepdims=True))
                     / np.where(total > 0, total, 1.0), 0.0)
    if score == "softmax":
        return s * (g - np.sum(g * s, axis=-1, keepdims=True))
    return g * s * (1.0 - s)


def route_backward(logits, routing, d_weights, *, score="softmax", renormalize=True, scale=1.0):
    """``d_logits`` of :func:`route`'s weights, the chosen experts held fixed."""
    s = router_probs(logits, score)
    ex = np.asarray(routing[1], dtype=np.int64)
    dw = np.asarray(d_weights, dtype=np.float64) * scale
    sc = np.take_along_axis(s, ex, axis=1)                  # chosen scores [T, k]
    if renormalize:
        tot = sc.sum(axis=1, keepdims=True) + 1e-20
        # w_j = sc_j / tot: d sc_i = dw_i / tot - sum_j dw_j sc_j / tot**2
        d_sc = dw / tot - np.sum(dw * sc, axis=1, keepdims=True) / tot ** 2
    else:
        d_sc = dw
    d_s = np.zeros_like(s)
    rows = np.arange(s.shape[0])
    for j in range(ex.shape[1]):                            # repeated ids add up
        np.add.at(d_s, (rows, ex[:, j]), d_sc[:, j])
    return router_probs_backward(logits, d_s, score)


def _positions(plan):
    """``pos [T, k]``: row of ``xs`` holding assignment ``(t, j)``, -1 where dropped."""
    T, k = plan.dropped.shape
    pos = np.full(T * k, -1, dtype=np.int64)
    pos[np.asarray(plan.order, dtype=np.int64)] = np.arange(len(plan.order))
    return pos.reshape(T, k)


def permute_backward(d_xs, plan):
    """``d_x[t] = sum over kept slots j (in order) of d_xs[pos(t, j)]``."""
    T, k = plan.dropped.shape
    d_xs = np.asarray(d_xs, dtype=np.float64)
    pos = _positions(plan)
    d_x = np.zeros((T, d_xs.shape[1]))
    for j in range(k):
        m = pos[:, j] >= 0
        d_x[m] += d_xs[pos[m, j]]
    return d_x


def unpermute_backward(d_y, ys, plan, weights):
    """``(d_ys, d_weights)`` of :func:`unpermute`."""
    T, k = plan.dropped.shape
    d_y = np.asarray(d_y, dtype=np.float64)
    ys = np.asarray(ys, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    pos = _positions(plan)
    d_ys = np.zeros_like(ys)
    d_w = np.zeros((T, k))
    for j in range(k):
        m = pos[:, j] >= 0
        d_ys[pos[m, j]] = w[m, j, None] * d_y[m]
        d_w[m, j] = np.sum(d_y[m] * ys[pos[m, j]], axis=1)
    return d_ys, d_w


def activation_grad(name, x):
    """Derivative of :func:`activation` (relu: 1 where ``x > 0``)."""
    if name == "silu":
        s = special.expit(x)
        return s * (1.0 + x * (1.0 - s))
    if name == "gelu":
        return 0.5 * (1.0 + special.erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(
            2.0 * math.pi)
    if name == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        t = np.tanh(c * (x + 0.044715 * x ** 3))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
    if name == "relu":
        return (x > 0).astype(np.float64)
    raise ValueError(name)


def expert_ffn_backward(xs, offsets, w_gate, w_up, w_down, d_ys, *, activation="silu",
                        b_gate=None, b_up=None, b_down=None, limit=None, alpha=1.702):
    """Gradients of :func:`expert_ffn`: a dict with ``d_xs``, ``d_w_gate``, ``d_w_up``,
    ``d_w_down``, ``d_b_gate``, ``d_b_up``, ``d_b_down`` (None where not given).

    A clamped swiglu_oai input gets no gradient beyond its limit (as
    ``torch.clamp``: the gradient passes where ``-limit <= v <= limit``).
    """
    f64 = lambda a: None if a is None else np.asarray(a, dtype=np.float64)  # noqa: E731
    xs, d_ys = f64(xs), f64(d_ys)
    wg, wu, wd, bg, bu, bd = map(f64, (w_gate, w_up, w_down, b_gate, b_up, b_down))
    zero = lambda a: None if a is None else np.zeros_like(a)  # noqa: E731
    out = dict(d_xs=np.zeros_like(xs), d_w_gate=zero(wg), d_w_up=zero(wu), d_w_down=zero(wd),
               d_b_gate=zero(bg), d_b_up=zero(bu), d_b_down=zero(bd))
    for e in range(wg.shape[0]):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi == lo:
            continue
        x, dy = xs[lo:hi], d_ys[lo:hi]
        g = x @ wg[e] + (0.0 if bg is None else bg[e])
        if wu is None:
            h, dg_of = globals()["activation"](activation, g), None
        else:
            u = x @ wu[e] + (0.0 if bu is None else bu[e])
            if activation == "swiglu_oai":
                lim = np.inf if limit is None else limit
                gc, uc = np.minimum(g, lim), np.clip(u, -lim, lim)
                sg = special.expit(alpha * gc)
                h = (uc + 1.0) * gc * sg
                dh_dg = (uc + 1.0) * (sg + alpha * gc * sg * (1.0 - sg)) * (g <= lim)
                dh_du = gc * sg * (np.abs(u) <= lim)
            else:
                a = globals()["activation"](activation, g)
                h = a * u
                dh_dg = activation_grad(activation, g) * u
                dh_du = a
        dh = dy @ wd[e].T
        out["d_w_down"][e] = h.T @ dy
        if bd is not None:
            out["d_b_down"][e] = dy.sum(0)
        if wu is None:
            dg = dh * activation_grad(activation, g)
            out["d_xs"][lo:hi] = dg @ wg[e].T
        else:
            dg, du = dh * dh_dg, dh * dh_du
            out["d_xs"][lo:hi] = dg @ wg[e].T + du @ wu[e].T
            out["d_w_up"][e] = x.T @ du
            if bu is not None:
                out["d_b_up"][e] = du.sum(0)
        out["d_w_gate"][e] = x.T @ dg
        if bg is not None:
            out["d_b_gate"][e] = dg.sum(0)
    return out


def load_balancing_loss_backward(probs, experts, *, mask=None, d_loss=1.0):
    """``d_probs`` of :func:`load_balancing_loss` (the shares ``f_i`` held constant)."""
    p = np.asarray(probs, dtype=np.float64)
    ex = np.asarray(experts)
    T, E = p.shape
    m = np.ones(T, bool) if mask is None else np.asarray(mask, dtype=bool)
    n = int(m.sum())
    d = np.zeros((T, E))
    if n == 0:
        return d
    f = expert_counts(ex[m], E) / (n * ex.shape[1])
    d[m] = d_loss * E * f / n
    return d


def router_z_loss_backward(logits, *, mask=None, d_loss=1.0):
    """``d_logits`` of :func:`router_z_loss`: ``2 * lse_t * softmax(z_t) / n`` per counted row."""
    z = np.asarray(logits, dtype=np.float64)
    T = z.shape[0]
    m = np.ones(T, bool) if mask is None else np.asarray(mask, dtype=bool)
    n = int(m.sum())
    d = np.zeros_like(z)
    if n == 0:
        return d
    lse = special.logsumexp(z[m], axis=1, keepdims=True)
    d[m] = d_loss * 2.0 * lse * special.softmax(z[m], axis=1) / n
    return d
