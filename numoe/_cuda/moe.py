"""Fused device forward of a :class:`numoe.MoELayer` (weights on the GPU).

The same maths as the layer's public-op chain, with the shortcuts that only
a whole-layer driver may take:

* the plan is built straight from the routing (already validated), with no
  second check of the ids;
* expert rows are read from ``x`` through the plan (no ``[N, H]`` permuted
  copy) and the down projection multiplies each row by its routing weight
  in its epilogue, so the combine is a plain fixed-order sum per token;
* the GEMM work list is built on the device, and the routing status is read
  back once at the end: one host synchronisation per (dropless) call;
* 16-bit ``x`` and weights: logits, routing weights, expert outputs and the
  combine are float32 (weights and ``x`` widened in registers), and ``y`` is
  narrowed to ``x``'s dtype once at the end (by the combine itself when there
  is no shared expert to add).

Used by ``numoe._cuda.bench`` and available to the layer as
``numoe._cuda.moe.forward(layer, x)``.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float64

from .._types import DispatchPlan
from . import _arrays as A
from ._launch import launch
from . import dispatch as D
from . import experts as X
from . import gemm as G
from . import routing as R


def _layer_code(cfg):
    from ..experts import _check_expert_options

    return _check_expert_options(cfg.activation, cfg.limit, cfg.alpha, cfg.glu)


def forward(layer, x, *, gemm=None, return_parts=False, graph=True):
    """``y = layer(x)`` for a device layer (``layer.to_device()``) and device ``x [..., H]``.

    ``gemm``: ``None``/"numba" (numba kernels) or "cublas" (CuPy's cuBLAS for
    experts with many rows). ``return_parts``: also return ``(logits, routing,
    plan)``. Without a capacity the whole forward is queued without a host
    synchronisation; the routing status is read back once at the end.
    ``graph``: decode-sized calls (see :mod:`numoe._cuda.graph`) replay this
    forward as a captured CUDA graph from their second call on.
    """
    if graph and gemm is None and not return_parts:
        from . import graph as Gr

        y = Gr.forward(layer, x)
        if y is not None:
            return y
    y, status = queue(layer, x, gemm=gemm, return_parts=return_parts)
    if status is not None:
        R.check_status(status)           # the one synchronisation of the dropless forward
    return y


def queue(layer, x, *, gemm=None, return_parts=False):
    """The forward's work queued on the device: ``(y, status)``; the caller passes
    ``status`` (None when there is nothing to check) to ``routing.check_status``."""
    cfg = layer.config
    x2, lead = A.tokens_2d("x", x)
    T, H = tuple(x2.shape)
    E, k = cfg.num_experts, cfg.top_k
    ct = A.compute_dtype(x2.dtype)     # 16-bit x: logits, routing, sums in float32
    logits = G.matmul(x2, layer.router, out_dtype=ct)
    if layer.router_bias is not None and T:
        bs = A.block(256)
        launch(_add_row, A.grid(T * E, bs), bs, 0, logits, A.astype(layer.router_bias, ct))
    routing, status = R.route_async(logits, k, score=cfg.score, renormalize=cfg.renormalize,
                                    bias=layer.selection_bias, n_groups=cfg.n_groups,
                                    topk_groups=cfg.topk_groups, group_score=cfg.group_score,
                                    scale=cfg.scale)
    m = T * k
    flat = A.reshape(routing.experts, (m,))
    cap = None
    dropped = None
    if cfg.capacity_factor is None:
        pos = A.empty((m,), np.int64)        # int64 order: what the tensor cores read
        order, offsets, counts = D.multisplit(flat, E, order=A.empty((m,), np.int64), pos=pos)
    else:
        from ..dispatch import capacity

        cap = capacity(T, E, k, cfg.capacity_factor)
        order, offsets, counts = D.multisplit(flat, E)
        dropped = A.zeros((m,), np.bool_)
        if m:
            order, offsets, counts = D._apply_capacity(order, offsets, counts, k, cap,
                                                       cfg.drop_policy, routing.weights,
                                                       dropped, E)
        pos = D.inverse_positions(order, dropped)
    N = int(order.shape[0])
    shared = layer._dev.get("shared") if hasattr(layer, "_dev") else None
    # without a shared expert the combine narrows its float32 sums straight into y
    y = A.empty((T, H), ct if shared is not None else x2.dtype)
    opts = _layer_code(cfg)
    if N:
        ys = A.empty((N, H), ct)
        wflat = A.reshape(routing.weights, (m,))
        X.run_ffn(x2, order, k, offsets, N, layer.w_gate, layer.w_up, layer.w_down,
                  layer.b_gate, layer.b_up, layer.b_down, opts.code, opts.limit, opts.alpha,
                  ys, order, wflat, gemm=gemm)
        D.combine(ys, pos, wflat, k, y, weighted=False)
    elif T:
        launch(A._fill, A.grid(T * H, A.block(256)), A.block(256), 0,
               A.reshape(A.bits(y), (T * H,)), 0)
    if shared is not None and T:
        sg, su, sd = shared
        sh = A.empty((T, H), ct)
        X.run_ffn(x2, None, 0, G._range_offsets(T), T, sg, su, sd, None, None, None,
                  0, math.inf, 1.702, sh, None, None, gemm=gemm)
        gw = layer.shared_gate_weight
        gate = None if gw is None else G.matmul(x2, A.reshape(gw, (H, 1)), out_dtype=ct)
        add_shared(y, sh, gate)
    y = A.reshape(A.astype(y, x2.dtype), lead + (H,))
    if return_parts:
        if dropped is None:
            dropped = A.zeros((m,), np.bool_)
        plan = DispatchPlan(order, offsets, counts, A.reshape(dropped, (T, k)), cap)
        return (y, (logits, routing, plan)), status
    return y, status


@cuda.jit
def _add_row(a, b):
    n = a.shape[0] * a.shape[1]
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        e = i % a.shape[1]
        a[i // a.shape[1], e] += b[e]


def add_shared(y, sh, gate):
    """``y += sigmoid(gate) * sh`` (or ``y += sh`` when ``gate`` is None), on the device."""
    if y.shape[0] * y.shape[1]:
        bs = A.block(256)
        launch(_add_shared, A.grid(y.shape[0] * y.shape[1], bs), bs, 0, y, sh,
               gate if gate is not None else sh, gate is not None)


@cuda.jit
def _add_shared(y, sh, gate, gated):
    """``y[t] += sigmoid(gate[t]) * sh[t]`` (or ``+= sh[t]``), gate in float64."""
    H = y.shape[1]
    n = y.shape[0] * H
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        t = i // H
        j = i - t * H
        if gated:
            g = 1.0 / (1.0 + math.exp(-float64(gate[t, 0])))
            y[t, j] += g * sh[t, j]
        else:
            y[t, j] += sh[t, j]
