"""CUDA twins of :mod:`numoe.routing`: fused top-k routing, one thread per token row.

Each block stages a tile of ``block`` logits rows in shared memory with
coalesced loads (row stride ``E + 1``: no bank conflicts when every thread
then walks its own row), and each thread does the whole row: value check,
scores, top-k by insertion into a k-long register buffer (only a strictly
larger value moves ahead, candidates in ascending id: ties to the lower
id), group limiting, weights. The arithmetic is that of
:mod:`numoe._cpu.routing` (float64 scores, same formulas), so the experts
are identical and the weights agree to rounding. 16-bit logits are widened
to float32 on the device first (exactly) and the weights/probabilities are
narrowed back to the logits' dtype at the end (round to nearest even).

Bad rows (NaN/+inf; softmax rows that are all ``-inf``) are recorded in a
two-word status buffer (first bad row and its kind via an atomic max of
``BIG - (4 t + status)``, and the number of bad rows): order-free, so the
result is deterministic. The wrapper reads it back once and raises the
same ValueError as the CPU path.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, float64, int32, int64

from .. import _validate as V
from .._types import Routing
from . import _arrays as A
from ._launch import launch
from ._checks import BIG, Checks

OK = 0
BAD_VALUE = 1
ALL_MASKED = 2
MAX_GROUPS = 64          # group keep-mask is one int64 bit set
_SMEM_BYTES = 48 * 1024  # static limit for the staged tile
_BLOCK = 128


def _check_logits(logits):
    z = A.as_device("logits", logits)
    A.check_float("logits", z)
    if z.ndim < 1 or tuple(z.shape)[-1] == 0:
        raise ValueError(f"logits must have shape [..., E] with E >= 1 experts, "
                         f"got {tuple(z.shape)}")
    return A.tokens_2d("logits", z, min_ndim=1)


def _raise_status(name, res):
    first, nbad = int(res[0]), int(res[1])
    if nbad == 0:
        return
    key = int(BIG - first)
    t, st = key // 4, key % 4
    if st == BAD_VALUE:
        raise ValueError(f"{name} holds NaN or +inf (first in token row {t}); only finite "
                         "values and -inf (masked expert) are allowed")
    raise ValueError(f"{name} row {t} is -inf for every expert, so its softmax is undefined "
                     f"({nbad} bad rows)")


def _tile(E, itemsize):
    """Rows per block tile, and whether the tile fits in shared memory."""
    bs = A.block(_BLOCK)
    while bs > 32 and bs * (E + 1) * itemsize > _SMEM_BYTES:
        bs //= 2
    staged = bs * (E + 1) * itemsize <= _SMEM_BYTES
    return bs, staged


# ------------------------------------------------------------------- public
def route(logits, k, *, score="softmax", renormalize=True, bias=None, n_groups=1,
          topk_groups=None, group_score="top2", scale=1.0):
    """Device twin of :func:`numoe.route` (same arguments, device arrays in and out)."""
    r, res = route_async(logits, k, score=score, renormalize=renormalize, bias=bias,
                         n_groups=n_groups, topk_groups=topk_groups, group_score=group_score,
                         scale=scale)
    if res is not None:
        check_status(res)
    return r


def check_status(res):
    """Raise the ValueError that a route status buffer records (one synchronising copy)."""
    _raise_status("logits", res.copy_to_host())


def route_async(logits, k, *, score="softmax", renormalize=True, bias=None, n_groups=1,
                topk_groups=None, group_score="top2", scale=1.0):
    """:func:`route` without reading the row status back: returns ``(Routing, status)``.

    The caller must pass ``status`` (None when there are no tokens) to
    :func:`check_status` before trusting the routing -- the fused layer does
    so once, at the end of its forward.
    """
    from ..routing import _check_route_options

    z, lead = _check_logits(logits)
    out_dtype = z.dtype
    z = A.compute(z)                 # 16-bit logits: routed on their float32 values
    T, E = z.shape
    b = None
    if bias is not None:
        b = A.as_device("bias", bias)
        A.check_float("bias", b)
    opt = _check_route_options(E, k, score, renormalize, None if b is None else tuple(b.shape),
                               n_groups, topk_groups, group_score, scale)
    if opt.grouped and opt.n_groups > MAX_GROUPS:
        raise ValueError(f"n_groups must be <= {MAX_GROUPS} on the CUDA backend, "
                         f"got {opt.n_groups}")
    checks = Checks()
    if b is not None:
        b = A.astype(b, np.float64)
        checks.finite("bias", b)
    checks.run()
    k = opt.k
    weights = A.empty((T, k), z.dtype)
    experts = A.empty((T, k), np.int32)
    res = None
    if T:
        res = A.zeros((2,), np.int64)
        bs, staged = _tile(E, z.dtype.itemsize)
        general = b is not None or opt.grouped
        if staged and not general:      # the common case: top-k of the logits
            launch(_plain_kernel(str(z.dtype), k, E, bs), A.grid(T, bs, 16), bs,
                   bs * (E + 1) * z.dtype.itemsize, z, opt.sigmoid, opt.renormalize,
                   opt.scale, weights, experts, res)
            weights = A.astype(weights, out_dtype)
            return Routing(A.reshape(weights, lead + (k,)),
                           A.reshape(experts, lead + (k,))), res
        kern = _route_kernel(str(z.dtype), k, staged, general)
        shmem = bs * (E + 1) * z.dtype.itemsize if staged else 0
        nt = -(-T // bs)
        g = A.grid(nt * bs, bs, 4)
        bias_arr = b if b is not None else A.dummy(np.float64)
        launch(kern, g, bs, shmem, z, bias_arr, b is not None, opt.sigmoid, opt.renormalize,
               opt.n_groups, opt.topk_groups, opt.group_max, opt.grouped, opt.scale, weights,
               experts, res)
    weights = A.astype(weights, out_dtype)
    return Routing(A.reshape(weights, lead + (k,)), A.reshape(experts, lead + (k,))), res


def router_probs(logits, score="softmax", *, normalize=False):
    """Device twin of :func:`numoe.router_probs`."""
    from ..routing import SCORES

    V.choice("score", score, SCORES)
    z, lead = _check_logits(logits)
    out_dtype = z.dtype
    z = A.compute(z)
    T, E = z.shape
    norm = normalize and score == "sigmoid"
    out = A.empty((T, E), np.float64 if norm else z.dtype)
    if z.size:
        res = A.zeros((2,), np.int64)
        bs = A.block(128)
        launch(_probs_kernel, A.grid(T, bs, 8), bs, 0, z, score == "sigmoid", out, res)
        _raise_status("logits", res.copy_to_host())
        if norm:
            launch(_normalize_rows_kernel, A.grid(T, bs, 8), bs, 0, out)
    return A.reshape(A.astype(out, out_dtype), lead + (E,))


@cuda.jit
def _normalize_rows_kernel(s):
    """``s[t] /= sum(s[t])`` in place (float64; a row of zeros stays zero)."""
    for t in range(cuda.grid(1), s.shape[0], cuda.gridsize(1)):
        total = 0.0
        for e in range(s.shape[1]):
            total += s[t, e]
        for e in range(s.shape[1]):
            s[t, e] = s[t, e] / total if total > 0.0 else 0.0


# ------------------------------------------------------------ device helpers
@cuda.jit(device=True)
def _sigmoid(x):
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@cuda.jit(device=True)
def _row_status(row, E, softmax):
    bad = False
    finite = False
    for e in range(E):
        v = row[e]
        if not (v < np.inf):
            bad = True
        elif v > -np.inf:
            finite = True
    if bad:
        return BAD_VALUE
    if softmax and not finite:
        return ALL_MASKED
    return OK


@cuda.jit(device=True)
def _record(res, t, st):
    cuda.atomic.max(res, 0, (int64(1) << 62) - (int64(t) * 4 + st))
    cuda.atomic.add(res, 1, 1)


@cuda.jit(device=True)
def _score(row, e, sigm, m, total):
    """Full score of expert ``e`` (softmax needs the row max ``m`` and sum ``total``)."""
    z = float64(row[e])
    if sigm:
        return _sigmoid(z)
    return math.exp(z - m) / total


@cuda.jit(device=True)
def _write_weights(top, K, renorm, scale, weights, t):
    if renorm:
        total = 0.0
        for j in range(K):
            total += top[j]
        d = total + 1e-20
        for j in range(K):
            weights[t, j] = top[j] / d * scale
    else:
        for j in range(K):
            weights[t, j] = top[j] * scale


@cuda.jit(device=True)
def _write_top_weights(top, K, row, E, sigm, renorm, scale, weights, t):
    """Weights of a plain route from its top-``K`` logits ``top`` (float64, descending;
    overwritten): sigmoid, or softmax (over the whole ``row`` when not renormalised)."""
    if sigm:
        for j in range(K):
            top[j] = _sigmoid(top[j])
    else:
        m = top[0]
        for j in range(K):
            top[j] = math.exp(top[j] - m)
        if not renorm:
            total = 0.0
            for e in range(E):
                total += math.exp(float64(row[e]) - m)
            for j in range(K):
                top[j] = top[j] / total
    _write_weights(top, K, renorm, scale, weights, t)


@functools.lru_cache(maxsize=None)
def _plain_kernel(dtype, K, E, BS):
    """Top-``K`` of the logits (no bias, no groups) with ``E`` and the block ``BS``
    compile-time constants: every loop unrolls and the top-k buffer lives in registers.
    A block stages ``BS`` rows (coalesced, row stride ``E + 1``); each thread checks its
    row (:func:`_row_status`), sorts its first ``K`` entries (stable) and lets a later
    entry in only when strictly larger than the ``K``-th (ties keep the lower id); the
    weights as in :func:`_route_kernel` (:func:`_write_top_weights`)."""
    sm_t = float32 if dtype == "float32" else float64
    ld = E + 1
    NB = 8

    @cuda.jit
    def kern(z, sigm, renorm, scale, weights, experts, res):
        T = z.shape[0]
        tid = cuda.threadIdx.x
        # BS * (E + 1) staged entries in dynamic shared memory (the simulator allocates a
        # static shared array on the first thread's call without a lock: a race)
        sm = cuda.shared.array(0, sm_t)
        tv = cuda.local.array(K, sm_t)
        ti = cuda.local.array(K, int32)
        w = cuda.local.array(K, float64)
        vals = cuda.local.array(NB, sm_t)
        for tile in range(cuda.blockIdx.x, (T + BS - 1) // BS, cuda.gridDim.x):
            t0 = tile * BS
            cuda.syncthreads()
            for it0 in range(0, E, NB):          # NB loads in flight, then NB stores
                for u in range(NB):
                    idx = (it0 + u) * BS + tid
                    r = idx // E
                    vals[u] = 0
                    if it0 + u < E and t0 + r < T:
                        vals[u] = z[t0 + r, idx - r * E]
                for u in range(NB):
                    idx = (it0 + u) * BS + tid
                    r = idx // E
                    if it0 + u < E and t0 + r < T:
                        sm[r * ld + idx - r * E] = vals[u]
            cuda.syncthreads()
            t = t0 + tid
            if t >= T:
                continue
            row = sm[tid * ld:tid * ld + E]
            st = _row_status(row, E, not sigm)
            if st != OK:
                _record(res, t, st)
                continue
            for j in range(K):
                tv[j] = row[j]
                ti[j] = j
            for i in range(1, K):                 # stable sort of the first K
                for j in range(i, 0, -1):
                    if tv[j] > tv[j - 1]:
                        tv[j], tv[j - 1] = tv[j - 1], tv[j]
                        ti[j], ti[j - 1] = ti[j - 1], ti[j]
            for e in range(K, E):
                v = row[e]
                if v > tv[K - 1]:
                    tv[K - 1] = v
                    ti[K - 1] = e
                    for j in range(K - 1, 0, -1):
                        if tv[j] > tv[j - 1]:
                            tv[j], tv[j - 1] = tv[j - 1], tv[j]
                            ti[j], ti[j - 1] = ti[j - 1], ti[j]
            for j in range(K):
                experts[t, j] = ti[j]
                w[j] = float64(tv[j])
            _write_top_weights(w, K, row, E, sigm, renorm, scale, weights, t)

    return kern


@functools.lru_cache(maxsize=None)
def _route_kernel(dtype, K, staged, general):
    """Route kernel for float ``dtype``, ``K`` experts per token (a constant: the
    top-k buffer lives in registers), rows staged in shared memory or read in place,
    plain (top-k of the logits) or general (bias and/or groups)."""
    sm_t = float32 if dtype == "float32" else float64

    @cuda.jit(device=True)
    def insert(tv, ti, n, v, e):
        # Stable insertion into the descending buffer tv[:n]; returns the new n.
        if n == K and not (v > tv[K - 1]):
            return n
        cv = v
        ci = e
        carry = False
        for j in range(K):
            if j < n:
                if carry or cv > tv[j]:
                    ov = tv[j]
                    oi = ti[j]
                    tv[j] = cv
                    ti[j] = ci
                    cv = ov
                    ci = oi
                    carry = True
            elif j == n:
                tv[j] = cv
                ti[j] = ci
        return n + 1 if n < K else n

    @cuda.jit(device=True)
    def plain_row(row, E, sigm, renorm, scale, t, weights, experts, tv, ti):
        n = 0
        for e in range(E):
            n = insert(tv, ti, n, float64(row[e]), e)
        for j in range(K):
            experts[t, j] = ti[j]
        _write_top_weights(tv, K, row, E, sigm, renorm, scale, weights, t)

    @cuda.jit(device=True)
    def general_row(row, E, bias, use_bias, sigm, renorm, n_groups, topk_groups, group_max,
                    grouped, scale, t, weights, experts, tv, ti, gs):
        m = 0.0
        total = 1.0
        if not sigm:
            m = -np.inf
            for e in range(E):
                v = float64(row[e])
                if v > m:
                    m = v
            total = 0.0
            for e in range(E):
                total += math.exp(float64(row[e]) - m)
        size = E // n_groups
        keep = int64(-1)
        if grouped:
            for g in range(n_groups):
                a = -np.inf
                b = -np.inf
                for e in range(g * size, (g + 1) * size):
                    v = _score(row, e, sigm, m, total)
                    if use_bias:
                        v = v + bias[e]
                    if v > a:
                        b = a
                        a = v
                    elif v > b:
                        b = v
                if group_max or size == 1:
                    gs[g] = a
                else:
                    gs[g] = a + b
            keep = int64(0)
            for g in range(n_groups):
                rank = 0
                for h in range(n_groups):
                    if gs[h] > gs[g] or (gs[h] == gs[g] and h < g):
                        rank += 1
                if rank < topk_groups:
                    keep |= int64(1) << g
        n = 0
        for e in range(E):
            if use_bias:
                v = _score(row, e, sigm, m, total) + bias[e]
            else:
                v = float64(row[e])
            if grouped and ((keep >> (e // size)) & 1) == 0:
                v = -np.inf
            n = insert(tv, ti, n, v, e)
        for j in range(K):
            experts[t, j] = ti[j]
            tv[j] = _score(row, ti[j], sigm, m, total)
        _write_weights(tv, K, renorm, scale, weights, t)

    @cuda.jit(device=True)
    def do_row(row, E, t, bias, use_bias, sigm, renorm, n_groups, topk_groups, group_max,
               grouped, scale, weights, experts, res, tv, ti, gs):
        st = _row_status(row, E, not sigm)
        if st != OK:
            _record(res, t, st)
        elif general:
            general_row(row, E, bias, use_bias, sigm, renorm, n_groups, topk_groups,
                        group_max, grouped, scale, t, weights, experts, tv, ti, gs)
        else:
            plain_row(row, E, sigm, renorm, scale, t, weights, experts, tv, ti)

    n_gs = MAX_GROUPS if general else 1

    @cuda.jit
    def kern(z, bias, use_bias, sigm, renorm, n_groups, topk_groups, group_max, grouped,
             scale, weights, experts, res):
        T = z.shape[0]
        E = z.shape[1]
        tid = cuda.threadIdx.x
        bs = cuda.blockDim.x
        tv = cuda.local.array(K, float64)
        ti = cuda.local.array(K, int32)
        gs = cuda.local.array(n_gs, float64)
        ntiles = (T + bs - 1) // bs
        if staged:
            sm = cuda.shared.array(0, sm_t)
            ld = E + 1
            dq = bs // E
            dr = bs - dq * E
            for tile in range(cuda.blockIdx.x, ntiles, cuda.gridDim.x):
                t0 = tile * bs
                rows = min(bs, T - t0)
                cuda.syncthreads()
                r = tid // E
                c = tid - r * E
                for _ in range(tid, rows * E, bs):
                    sm[r * ld + c] = z[t0 + r, c]
                    r += dq
                    c += dr
                    if c >= E:
                        c -= E
                        r += 1
                cuda.syncthreads()
                t = t0 + tid
                if t < T:
                    do_row(sm[tid * ld:tid * ld + E], E, t, bias, use_bias, sigm, renorm,
                           n_groups, topk_groups, group_max, grouped, scale, weights,
                           experts, res, tv, ti, gs)
        else:
            for t in range(cuda.grid(1), T, cuda.gridsize(1)):
                do_row(z[t], E, t, bias, use_bias, sigm, renorm, n_groups, topk_groups,
                       group_max, grouped, scale, weights, experts, res, tv, ti, gs)

    return kern


@cuda.jit
def _probs_kernel(z, sigm, out, res):
    T = z.shape[0]
    E = z.shape[1]
    for t in range(cuda.grid(1), T, cuda.gridsize(1)):
        row = z[t]
        st = _row_status(row, E, not sigm)
        if st != OK:
            _record(res, t, st)
            continue
        if sigm:
            for e in range(E):
                out[t, e] = _sigmoid(float64(row[e]))
        else:
            m = -np.inf
            for e in range(E):
                v = float64(row[e])
                if v > m:
                    m = v
            total = 0.0
            for e in range(E):
                x = math.exp(float64(row[e]) - m)
                out[t, e] = x
                total += x
            for e in range(E):        # as the CPU: the stored exp, divided in float64
                out[t, e] = float64(out[t, e]) / total


# ------------------------------------------------------------------ backward
# Device twins of :func:`numoe.router_probs_backward` and
# :func:`numoe.route_backward`: one thread per token row, float64 inside, the
# same formulas and summation orders as :mod:`numoe._cpu.routing` (scores
# recomputed from the logits; the score gradient of a repeated expert id is
# summed in slot order). Bad rows are reported through the status buffer of
# the forward (same messages).
def _grad_rows(name, a, lead, E):
    """A device float array of shape ``lead + (E,)`` as a contiguous ``[T, E]`` array in
    its compute dtype (16-bit widened to float32)."""
    d = A.as_device(name, a)
    A.check_float(name, d)
    if tuple(d.shape) != tuple(lead) + (E,):
        raise ValueError(f"{name} must have the shape of logits {tuple(lead) + (E,)}, "
                         f"got {tuple(d.shape)}")
    d = A.compute(d)
    T = int(np.prod(lead)) if lead else 1
    return A.reshape(d, (T, E))


def router_probs_backward(logits, d_probs, *, score="softmax", normalize=False):
    """Device twin of :func:`numoe.router_probs_backward`."""
    from ..routing import SCORES

    V.choice("score", score, SCORES)
    z, lead = _check_logits(logits)
    out_dtype = z.dtype
    z = A.compute(z)
    T, E = tuple(z.shape)
    g = _grad_rows("d_probs", d_probs, lead, E)
    Checks().finite("d_probs", g).run()
    out = A.empty((T, E), z.dtype)
    if T:
        res = A.zeros((2,), np.int64)
        bs = A.block(128)
        if normalize and score == "sigmoid":     # through p = s / sum(s) first
            g2 = A.empty((T, E), np.float64)
            launch(_normalize_backward_kernel, A.grid(T, bs, 8), bs, 0, z, g, g2)
            g = g2
        launch(_probs_backward_kernel, A.grid(T, bs, 8), bs, 0, z, g, score == "sigmoid",
               out, res)
        _raise_status("logits", res.copy_to_host())
    return A.reshape(A.astype(out, out_dtype), lead + (E,))


def route_backward(logits, routing, d_weights, *, score="softmax", renormalize=True,
                   scale=1.0):
    """Device twin of :func:`numoe.route_backward`."""
    from ..routing import SCORES

    if not isinstance(routing, tuple) or len(routing) != 2:
        raise TypeError("routing must be a numoe.Routing (weights, experts) from route(), "
                        f"got {type(routing).__name__}")
    V.choice("score", score, SCORES)
    V.flag("renormalize", renormalize)
    scale = V.real("scale", scale)
    z, lead = _check_logits(logits)
    out_dtype = z.dtype
    z = A.compute(z)
    T, E = tuple(z.shape)
    ex = A.int_arg("routing.experts", routing[1])
    shp = tuple(ex.shape)
    if len(shp) != len(lead) + 1 or shp[:-1] != tuple(lead) or shp[-1] < 1:
        raise ValueError(f"routing.experts must have shape {tuple(lead) + ('k',)} with "
                         f"k >= 1, got {shp}")
    k = shp[-1]
    ex = A.reshape(ex, (T, k))
    dw = A.as_device("d_weights", d_weights)
    A.check_float("d_weights", dw)
    if tuple(dw.shape) != tuple(lead) + (k,):
        raise ValueError(f"d_weights must have shape {tuple(lead) + (k,)} (that of "
                         f"routing.experts), got {tuple(dw.shape)}")
    dw = A.reshape(A.astype(dw, np.float64), (T, k))
    Checks().ids("routing.experts", ex, E).finite("d_weights", dw).run()
    out = A.empty((T, E), z.dtype)
    if T:
        res = A.zeros((2,), np.int64)
        bs = A.block(128)
        launch(_route_backward_kernel, A.grid(T, bs, 8), bs, 0, z, ex, dw, score == "sigmoid",
               bool(renormalize), scale, out, res)
        _raise_status("logits", res.copy_to_host())
    return A.reshape(A.astype(out, out_dtype), lead + (E,))


@cuda.jit(device=True)
def _row_max_sum(row, E):
    """``(max, sum of exp(z - max))`` of a softmax row (float64; the row has a finite entry)."""
    m = -np.inf
    for e in range(E):
        v = float64(row[e])
        if v > m:
            m = v
    total = 0.0
    for e in range(E):
        total += math.exp(float64(row[e]) - m)
    return m, total


@cuda.jit
def _probs_backward_kernel(z, g, sigm, out, res):
    """``out[t] = s * (g - g.s)`` (softmax) or ``g * s * (1 - s)`` (sigmoid), float64."""
    T = z.shape[0]
    E = z.shape[1]
    for t in range(cuda.grid(1), T, cuda.gridsize(1)):
        row = z[t]
        st = _row_status(row, E, not sigm)
        if st != OK:
            _record(res, t, st)
            continue
        if sigm:
            for e in range(E):
                s = _sigmoid(float64(row[e]))
                out[t, e] = float64(g[t, e]) * s * (1.0 - s)
            continue
        m, total = _row_max_sum(row, E)
        dot = 0.0
        for e in range(E):
            dot += float64(g[t, e]) * (math.exp(float64(row[e]) - m) / total)
        for e in range(E):
            s = math.exp(float64(row[e]) - m) / total
            out[t, e] = s * (float64(g[t, e]) - dot)


@cuda.jit
def _normalize_backward_kernel(z, g, out):
    """``out[t] = (g - sum(g * p)) / S``: ``d s`` of ``p = s / S``, ``s = sigmoid(z[t])``."""
    E = z.shape[1]
    for t in range(cuda.grid(1), z.shape[0], cuda.gridsize(1)):
        total = 0.0
        for e in range(E):
            total += _sigmoid(float64(z[t, e]))
        dot = 0.0
        if total > 0.0:
            for e in range(E):
                dot += float64(g[t, e]) * (_sigmoid(float64(z[t, e])) / total)
        for e in range(E):
            out[t, e] = (float64(g[t, e]) - dot) / total if total > 0.0 else 0.0


@cuda.jit
def _route_backward_kernel(z, experts, dw, sigm, renorm, scale, out, res):
    """``out[t]`` = d logits of row ``t``'s routing weights (chosen experts fixed)."""
    T = z.shape[0]
    E = z.shape[1]
    K = experts.shape[1]
    for t in range(cuda.grid(1), T, cuda.gridsize(1)):
        row = z[t]
        st = _row_status(row, E, not sigm)
        if st != OK:
            _record(res, t, st)
            continue
        m = 0.0
        total = 1.0
        if not sigm:
            m, total = _row_max_sum(row, E)
        tot = 0.0
        corr = 0.0
        if renorm:
            dot = 0.0
            for j in range(K):
                sc = _score(row, experts[t, j], sigm, m, total)
                tot += sc
                dot += dw[t, j] * scale * sc
            tot += 1e-20
            corr = dot / (tot * tot)
        # g_e = sum over the slots j choosing e (in slot order) of the score gradient
        gs = 0.0
        for e in range(E):
            ge = 0.0
            for j in range(K):
                if experts[t, j] == e:
                    if renorm:
                        ge += dw[t, j] * scale / tot - corr
                    else:
                        ge += dw[t, j] * scale
            if sigm:
                s = _sigmoid(float64(row[e]))
                out[t, e] = ge * s * (1.0 - s)
            else:
                gs += ge * _score(row, e, sigm, m, total)
        if not sigm:
            for e in range(E):
                ge = 0.0
                for j in range(K):
                    if experts[t, j] == e:
                        if renorm:
                            ge += dw[t, j] * scale / tot - corr
                        else:
                            ge += dw[t, j] * scale
                s = _score(row, e, sigm, m, total)
                out[t, e] = s * (ge - gs)
