"""Backward of a device :class:`numoe.MoELayer` (``layer.to_device()``): the device
twins of the backward ops chained as :meth:`numoe.MoELayer.backward` chains the
host ones.

The routed experts' outputs are recomputed (one grouped forward) for the
routing-weight gradient ``d_y . ys``; the host layer folds that into its
expert backward instead. Everything runs in the compute dtype of ``x``
(float32 for 16-bit ``x``; 16-bit weights are widened to float32 copies),
the router's logit gradient is summed in float64 as on the host, and each
gradient is returned in its parameter's dtype. No atomics in any float
reduction: the result is the same bits run after run.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from numba import cuda, float64

from .. import _validate as V
from . import _arrays as A
from . import dispatch as D
from . import experts as X
from . import gemm as G
from . import losses as L
from . import routing as R
from ._checks import Checks
from ._launch import launch


def backward(layer, x, info, d_y, *, aux_loss_coef=0.0, z_loss_coef=0.0):
    """Device twin of :meth:`numoe.MoELayer.backward` (device ``x``, ``info``, ``d_y``)."""
    from ..layer import _PARAM_NAMES

    if not getattr(layer, "_device", False):
        raise TypeError("x is a device array but this layer's weights are on the host; "
                        "use layer.to_device()")
    cfg = layer.config
    xd = A.as_device("x", x)
    shape = tuple(xd.shape)
    H = cfg.hidden_dim
    if not shape or shape[-1] != H:
        raise ValueError(f"x must have last dim hidden_dim = {H}, got shape {shape}")
    if np.dtype(xd.dtype) != layer.dtype:
        raise TypeError(f"x has dtype {xd.dtype} but the layer is {layer.dtype}")
    x2, lead = A.tokens_2d("x", xd)
    T = x2.shape[0]
    E, k = cfg.num_experts, cfg.top_k
    if not isinstance(info, Mapping) or not {"logits", "routing", "plan"} <= set(info):
        raise TypeError("info must be the dict from layer.forward(x, return_info=True)")
    logits, routing, plan = info["logits"], info["routing"], info["plan"]
    if tuple(logits.shape) != (T, E) or tuple(plan.dropped.shape) != (T, k):
        raise ValueError(f"info does not belong to this x: logits {tuple(logits.shape)}, "
                         f"expected {(T, E)}")
    aux_loss_coef = V.real("aux_loss_coef", aux_loss_coef)
    z_loss_coef = V.real("z_loss_coef", z_loss_coef)
    ct = A.compute_dtype(x2.dtype)
    xc = A.astype(x2, ct)
    dyd = A.as_device("d_y", d_y)
    A.check_float("d_y", dyd)
    if tuple(dyd.shape) != shape:
        raise ValueError(f"d_y must have the shape of x {shape}, got {tuple(dyd.shape)}")
    dy = A.reshape(A.astype(A.contiguous(dyd), ct), (T, H))
    Checks().finite("d_y", dy).run()
    wide = lambda a: None if a is None else A.astype(a, ct)  # noqa: E731
    params = {n: getattr(layer, n) for n in _PARAM_NAMES if getattr(layer, n) is not None}
    grads = {}
    act = dict(activation=cfg.activation, limit=cfg.limit, alpha=cfg.alpha)

    # routed experts: recompute ys, then the combine, the FFN and the permute backward
    wg, wu, wd = wide(layer.w_gate), wide(layer.w_up), wide(layer.w_down)
    bg, bu, bd = wide(layer.b_gate), wide(layer.b_up), wide(layer.b_down)
    xs = D.permute(xc, plan)
    ys = X.expert_ffn(xs, plan.offsets, wg, wu, wd, b_gate=bg, b_up=bu, b_down=bd, **act)
    d_ys, d_w = D.unpermute_backward(dy, ys, plan, routing.weights)
    del ys
    g = X.expert_ffn_backward(xs, plan.offsets, wg, wu, wd, d_ys, b_gate=bg, b_up=bu,
                              b_down=bd, **act)
    del xs, d_ys
    d_x = D.permute_backward(g.d_xs, plan)
    grads.update(w_gate=g.d_w_gate, w_up=g.d_w_up, w_down=g.d_w_down, b_gate=g.d_b_gate,
                 b_up=g.d_b_up, b_down=g.d_b_down)

    # router: routing weights, aux loss, z-loss (summed in float64), the logits' product
    d_logits = A.astype(R.route_backward(logits, routing, d_w, score=cfg.score,
                                         renormalize=cfg.renormalize, scale=cfg.scale),
                        np.float64)
    if aux_loss_coef and T:
        d_p = L.load_balancing_loss_backward(R.router_probs(logits, cfg.score, normalize=True),
                                             routing.experts, d_loss=aux_loss_coef)
        _add_into(d_logits, R.router_probs_backward(logits, d_p, score=cfg.score,
                                                     normalize=True))
    if z_loss_coef and T:
        _add_into(d_logits, L.router_z_loss_backward(logits, d_loss=z_loss_coef))
    d_logits = A.astype(d_logits, ct)
    one = cuda.to_device(np.array([0, T], np.int64))
    router = wide(layer.router)
    grads["router"] = A.reshape(_tn(xc, d_logits, one), (H, E))
    if layer.router_bias is not None:
        grads["router_bias"] = A.reshape(_colsums(d_logits, one), (E,))
    _add_into(d_x, G.matmul(d_logits, _transposed(router)))

    # shared SwiGLU MLP, its sigmoid gate as a row scale
    if layer.shared_gate_proj is not None:
        S = cfg.shared_expert_dim
        sg = A.reshape(wide(layer.shared_gate_proj), (1, H, S))
        su = A.reshape(wide(layer.shared_up_proj), (1, H, S))
        sd = A.reshape(wide(layer.shared_down_proj), (1, S, H))
        gw = wide(layer.shared_gate_weight)
        d_sh = dy
        if gw is not None:
            a = G.matmul(xc, A.reshape(gw, (H, 1)))
            sh = X.expert_ffn(xc, one, sg, su, sd)
            d_sh = A.empty((T, H), ct)
            d_a = A.empty((T, 1), ct)
            if T:
                bs = A.block(128)
                launch(_gate_backward_kernel, A.grid(T, bs, 8), bs, 0, a, dy, sh, d_sh, d_a)
            del sh
        sgr = X.expert_ffn_backward(xc, one, sg, su, sd, d_sh)
        _add_into(d_x, sgr.d_xs)
        grads.update(shared_gate_proj=A.reshape(sgr.d_w_gate, (H, S)),
                     shared_up_proj=A.reshape(sgr.d_w_up, (H, S)),
                     shared_down_proj=A.reshape(sgr.d_w_down, (S, H)))
        if gw is not None:
            grads["shared_gate_weight"] = A.reshape(_tn(xc, d_a, one), (H,))
            if T:
                bs = A.block(256)
                launch(_add_outer_kernel, A.grid(T * H, bs, 16), bs, 0, d_x, d_a, gw)

    out = {"x": A.reshape(A.astype(d_x, x2.dtype), lead + (H,))}
    for name, p in params.items():
        out[name] = A.astype(grads[name], p.dtype)
    return out


def _tn(a, b, one):
    """``a^T @ b`` for ``a [T, I]``, ``b [T, J]`` as ``[1, I, J]`` (fixed-order sums)."""
    out = A.empty((1, a.shape[1], b.shape[1]), a.dtype)
    return X._atb(a, 0, b, 0, one, out)


def _colsums(a, one):
    out = A.empty((1, a.shape[1]), a.dtype)
    if out.size:
        bs = A.block(128)
        launch(X._expert_colsums, A.grid(out.size, bs, 8), bs, 0, a, 0, one, out)
    return out


def _transposed(w):
    """``w [R, C]`` transposed into a new ``[C, R]`` device array."""
    R_, C = tuple(w.shape)
    out = A.empty((1, C, R_), w.dtype)
    X._transpose_into(A.reshape(w, (1, R_, C)), out, 0)
    return A.reshape(out, (C, R_))


def _add_into(a, b):
    """``a += b`` elementwise (same shape; ``b`` converted on the fly)."""
    n = a.size
    if n:
        bs = A.block(256)
        launch(_add_kernel, A.grid(n, bs, 16), bs, 0, A.reshape(a, (n,)),
               A.reshape(A.contiguous(b), (n,)))


@cuda.jit
def _add_kernel(a, b):
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        a[i] += b[i]


@cuda.jit
def _gate_backward_kernel(a, dy, sh, d_sh, d_a):
    """Shared-expert gate ``s = sigmoid(a)``: ``d_sh = s * dy`` and
    ``d_a = s (1 - s) (dy . sh)`` (the dot in float64, ascending h)."""
    H = dy.shape[1]
    for t in range(cuda.grid(1), dy.shape[0], cuda.gridsize(1)):
        s = 1.0 / (1.0 + math.exp(-float64(a[t, 0])))
        acc = 0.0
        for h in range(H):
            acc += float64(dy[t, h]) * float64(sh[t, h])
            d_sh[t, h] = s * dy[t, h]
        d_a[t, 0] = s * (1.0 - s) * acc


@cuda.jit
def _add_outer_kernel(d_x, d_a, gw):
    """``d_x[t, h] += d_a[t] * gw[h]``."""
    H = d_x.shape[1]
    for i in range(cuda.grid(1), d_x.shape[0] * H, cuda.gridsize(1)):
        t = i // H
        h = i - t * H
        d_x[t, h] += d_a[t, 0] * gw[h]


def write_into(out, grads, inputs):
    """``layer.backward(..., out=out)`` of a device layer: ``grads`` (this call's
    device results) copied into ``out``'s device arrays, which must have the same
    keys, shapes and dtypes, be C-contiguous and share no memory with ``inputs``
    (name -> device array or None) nor with each other. Returns ``out``."""
    from ..layer import check_out_keys

    check_out_keys(out, grads)
    dst = {}
    for name, g in grads.items():
        try:
            a = A.as_device(f"out[{name!r}]", out[name])
        except TypeError:
            raise TypeError(f"out[{name!r}] must be a device array (the layer is on the "
                            f"GPU), got {type(out[name]).__name__}") from None
        if a.dtype != g.dtype:
            raise TypeError(f"out[{name!r}] must have dtype {g.dtype}, got {a.dtype}")
        if tuple(a.shape) != tuple(g.shape):
            raise ValueError(f"out[{name!r}] must have shape {tuple(g.shape)}, "
                             f"got {tuple(a.shape)}")
        if not a.is_c_contiguous():
            raise ValueError(f"out[{name!r}] must be C-contiguous")
        dst[name] = a
    spans = []
    for n, v in inputs.items():
        try:
            spans.append((n, _span(A.as_device(n, v))))
        except TypeError:       # None, or not one device array (nothing to overlap)
            pass
    for name, a in dst.items():
        s = _span(a)
        for other, t in spans:
            if _meet(s, t):
                raise ValueError(f"out[{name!r}] must not share memory with {other}")
        spans.append((f"out[{name!r}]", s))
    for name, a in dst.items():
        if a.size:
            A.bits(a).copy_to_device(A.bits(grads[name]))
    return out


def _span(a):
    """``[lo, hi)`` device addresses of ``a``'s elements (None when empty)."""
    if not a.size:
        return None
    lo = a._ary.ctypes.data if A.SIM else (a.device_ctypes_pointer.value or 0)
    hi = lo + a.dtype.itemsize
    for n, st in zip(a.shape, a.strides):
        if st >= 0:
            hi += (n - 1) * st
        else:
            lo += (n - 1) * st
    return lo, hi


def _meet(s, t):
    return s is not None and t is not None and s[0] < t[1] and t[0] < s[1]
