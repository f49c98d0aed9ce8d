"""CPU kernels behind :mod:`numoe.routing`.

One pass per token row inside a ``prange`` over tokens (owner computes: a
row writes only its own outputs, so results do not depend on the thread
count). Selection is a partial top-k: each candidate is inserted into a
k-long buffer kept sorted by descending score; candidates are visited in
ascending expert id and only a strictly larger score moves ahead of an
equal one, so ties go to the lower id.

The drivers also check the values they read and record a per-row status
(``OK``, ``BAD_VALUE`` for NaN/+inf, ``ALL_MASKED`` for a softmax row that
is entirely ``-inf``); the public wrapper turns a non-zero status into a
``ValueError`` before anything is returned. Jitted code never raises.

Scores, weights and sums are computed in float64 whatever the input dtype.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from .._jit import driver, kernel

OK = 0
BAD_VALUE = 1
ALL_MASKED = 2


@kernel
def row_status(z, softmax):
    """Status of one logits row: NaN/+inf present, or (softmax) every entry -inf."""
    bad = 0
    finite = 0
    for e in range(z.shape[0]):         # branch-free counts (vectorisable)
        v = z[e]
        bad += not (v < np.inf)          # NaN or +inf
        finite += v > -np.inf
    if bad:
        return BAD_VALUE
    if softmax and finite == 0:
        return ALL_MASKED
    return OK


@kernel
def sigmoid(x):
    """Logistic function of a float64, accurate on both tails (0 at -inf)."""
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@kernel
def _ce(a, b):
    """Compare-exchange: ``(max, min)`` (branch-free)."""
    return max(a, b), min(a, b)


@kernel
def _top2(a, b, v):
    """A lane's two largest values ``a >= b`` after seeing ``v``."""
    return max(a, v), max(b, min(a, v))


@kernel
def _sort8(x0, x1, x2, x3, x4, x5, x6, x7):
    """The 8 values in descending order (19-comparator sorting network)."""
    x0, x2 = _ce(x0, x2); x1, x3 = _ce(x1, x3); x4, x6 = _ce(x4, x6); x5, x7 = _ce(x5, x7)
    x0, x4 = _ce(x0, x4); x1, x5 = _ce(x1, x5); x2, x6 = _ce(x2, x6); x3, x7 = _ce(x3, x7)
    x0, x1 = _ce(x0, x1); x2, x3 = _ce(x2, x3); x4, x5 = _ce(x4, x5); x6, x7 = _ce(x6, x7)
    x2, x4 = _ce(x2, x4); x3, x5 = _ce(x3, x5)
    x1, x4 = _ce(x1, x4); x3, x6 = _ce(x3, x6)
    x1, x2 = _ce(x1, x2); x3, x4 = _ce(x3, x4); x5, x6 = _ce(x5, x6)
    return (x0, x1, x2, x3, x4, x5, x6, x7)


@kernel
def lane_bound(sel, k, buf):
    """A lower bound on the k-th largest entry of ``sel`` (``k <= 16``).

    The entries are dealt into 8 interleaved lanes; each lane keeps its two
    largest (missing ones count as -inf). Those 16 are distinct entries (or
    -inf), so their k-th largest is <= the k-th largest of the row. One
    branch-free pass; ``buf`` only supplies a -inf of the row's dtype.
    """
    E = sel.shape[0]
    buf[0] = -np.inf
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = buf[0]
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = buf[0]
    base = 0
    while base + 8 <= E:
        a0, b0 = _top2(a0, b0, sel[base])
        a1, b1 = _top2(a1, b1, sel[base + 1])
        a2, b2 = _top2(a2, b2, sel[base + 2])
        a3, b3 = _top2(a3, b3, sel[base + 3])
        a4, b4 = _top2(a4, b4, sel[base + 4])
        a5, b5 = _top2(a5, b5, sel[base + 5])
        a6, b6 = _top2(a6, b6, sel[base + 6])
        a7, b7 = _top2(a7, b7, sel[base + 7])
        base += 8
    r = E - base
    if r > 0:
        a0, b0 = _top2(a0, b0, sel[base])
    if r > 1:
        a1, b1 = _top2(a1, b1, sel[base + 1])
    if r > 2:
        a2, b2 = _top2(a2, b2, sel[base + 2])
    if r > 3:
        a3, b3 = _top2(a3, b3, sel[base + 3])
    if r > 4:
        a4, b4 = _top2(a4, b4, sel[base + 4])
    if r > 5:
        a5, b5 = _top2(a5, b5, sel[base + 5])
    if r > 6:
        a6, b6 = _top2(a6, b6, sel[base + 6])
    A = _sort8(a0, a1, a2, a3, a4, a5, a6, a7)
    B = _sort8(b0, b1, b2, b3, b4, b5, b6, b7)
    # k-th largest of two descending lists: max over i (taken from A) of min(A[i-1], B[k-i-1])
    lo = max(0, k - 8)
    thr = buf[0]
    for i in range(lo, min(k, 8) + 1):
        x = A[i - 1] if i > 0 else B[k - 1]
        y = B[k - i - 1] if i < k else A[k - 1]
        m = min(x, y)
        thr = m if (i == lo or m > thr) else thr
    return thr


@kernel
def block_bound(sel, k, buf):
    """A lower bound on the k-th largest entry (``2k <= len(sel)``): the min of k block maxima."""
    E = sel.shape[0]
    for b in range(k):
        buf[b] = sel[b]
    base = k
    while base + k <= E:
        for b in range(k):
            buf[b] = max(buf[b], sel[base + b])
        base += k
    for b in range(E - base):
        buf[b] = max(buf[b], sel[base + b])
    thr = buf[0]
    for b in range(1, k):
        thr = min(thr, buf[b])
    return thr


@kernel
def rank_select(cand_i, cand_v, n, k, top_i):
    """Place the candidates of rank < k (ties: earlier first) at ``top_i[rank]``; others at ``top_i[k]``."""
    for i in range(n):
        vi = cand_v[i]
        r = 0
        for j in range(i):
            r += cand_v[j] >= vi
        for j in range(i + 1, n):
            r += cand_v[j] > vi
        top_i[min(r, k)] = cand_i[i]


@kernel
def insert_select(cand_i, cand_v, n, k, top_v, top_i):
    """Insertion of the candidates into a k-long buffer sorted descending (ties: earlier first)."""
    m = 0
    for c in range(n):
        v = cand_v[c]
        if m < k:
            j = m
            m += 1
        elif v > top_v[k - 1]:
            j = k - 1
        else:
            continue
        while j > 0 and top_v[j - 1] < v:
            top_v[j] = top_v[j - 1]
            top_i[j] = top_i[j - 1]
            j -= 1
        top_v[j] = v
        top_i[j] = cand_i[c]


@kernel
def topk_row(sel, k, top_i, cand_i, cand_v, buf, rank_max):
    """Indices of the ``k`` largest entries of ``sel`` into ``top_i[:k]``.

    Descending value, ties to the lower index; ``-inf`` entries take part
    like any other value (``k <= len(sel)``). A cheap lower bound on the
    k-th largest value first keeps only the entries that can be chosen
    (every entry >= the bound, in index order: at least k of them, and
    usually few more); those are ranked (up to ``rank_max`` of them) or
    inserted into a k-long sorted buffer. Scratch: ``top_i`` ``[k+1]``,
    ``cand_i``/``cand_v`` ``[len(sel)]`` (``cand_v`` and ``buf`` of
    ``sel``'s dtype), ``buf`` ``[max(16, k)]``.
    """
    E = sel.shape[0]
    if k <= 16:
        thr = lane_bound(sel, k, buf)
    elif 2 * k <= E:
        thr = block_bound(sel, k, buf)
    else:
        buf[0] = -np.inf
        thr = buf[0]
    n = 0
    for e in range(E):
        v = sel[e]
        cand_i[n] = e
        cand_v[n] = v
        n += v >= thr
    if n <= rank_max:
        rank_select(cand_i, cand_v, n, k, top_i)
    else:
        insert_select(cand_i, cand_v, n, k, buf, top_i)


@kernel
def softmax_row(z, out):
    """``out = softmax(z)`` in float64 (``z`` has at least one finite entry)."""
    m = -np.inf
    for e in range(z.shape[0]):
        if z[e] > m:
            m = z[e]
    m = np.float64(m)
    total = 0.0
    for e in range(z.shape[0]):
        x = math.exp(np.float64(z[e]) - m)
        out[e] = x
        total += x
    for e in range(z.shape[0]):
        out[e] = np.float64(out[e]) / total


@kernel
def sigmoid_row(z, out):
    """``out = sigmoid(z)`` elementwise, computed in float64."""
    for e in range(z.shape[0]):
        out[e] = sigmoid(np.float64(z[e]))


@kernel
def group_scores_row(src, n_groups, group_max, gs):
    """Per-group score of ``src``: the max, or the sum of the top two (one if a group has one)."""
    size = src.shape[0] // n_groups
    for g in range(n_groups):
        a = -np.inf
        b = -np.inf
        for e in range(g * size, (g + 1) * size):
            v = src[e]
            if v > a:
                b = a
                a = v
            elif v > b:
                b = v
        if group_max or size == 1:
            gs[g] = a
        else:
            gs[g] = a + b


@kernel
def write_weights(s_top, renormalize, scale, w):
    """``w = s_top / (sum(s_top) + 1e-20) * scale`` (renormalised) or ``s_top * scale``."""
    k = s_top.shape[0]
    if renormalize:
        total = 0.0
        for j in range(k):
            total += s_top[j]
        d = total + 1e-20
        for j in range(k):
            w[j] = s_top[j] / d * scale
    else:
        for j in range(k):
            w[j] = s_top[j] * scale


@driver
def route_plain(logits, k, use_sigmoid, renormalize, scale, chunk, rank_max,
                weights, experts, status):
    """Top-k of the raw logits per row, then weights from the chosen entries.

    Selecting on the logits is exact: softmax and sigmoid are increasing in
    the logit, so the order (and the ties) are those of the scores. Only
    the k chosen scores are evaluated, except for softmax without
    renormalisation, which needs the full row sum. For renormalised softmax
    the chosen ``exp(z - max)`` are used directly: their sum is >= 1 (the
    max contributes ``exp(0)``), so this equals the chosen softmax scores
    divided by their sum, and the ``1e-20`` guard cannot change a bit.
    Rows are processed in chunks of ``chunk`` (scratch per chunk).
    """
    T, E = logits.shape
    n_chunks = (T + chunk - 1) // chunk
    for c in prange(n_chunks):
        top = np.empty(k)
        top_i = np.empty(k + 1, dtype=np.int64)
        cand_i = np.empty(E, dtype=np.int64)
        cand_v = np.empty(E, dtype=logits.dtype)
        buf = np.empty(max(16, k), dtype=logits.dtype)
        for t in range(c * chunk, min(T, (c + 1) * chunk)):
            z = logits[t]
            st = row_status(z, not use_sigmoid)
            status[t] = st
            if st != OK:
                continue
            topk_row(z, k, top_i, cand_i, cand_v, buf, rank_max)
            for j in range(k):
                experts[t, j] = top_i[j]
                top[j] = z[top_i[j]]
            if use_sigmoid:
                for j in range(k):
                    top[j] = sigmoid(top[j])
            else:
                m = top[0]                        # the row max: chosen first
                for j in range(k):
                    top[j] = math.exp(top[j] - m)
                if not renormalize:
                    total = 0.0
                    for e in range(E):
                        total += math.exp(np.float64(z[e]) - m)
                    for j in range(k):
                        top[j] = top[j] / total
            write_weights(top, renormalize, scale, weights[t])


@driver
def route_general(logits, k, use_sigmoid, renormalize, bias, use_bias, n_groups, topk_groups,
                  group_max, scale, chunk, rank_max, weights, experts, status):
    """Top-k with a selection bias and/or group-limited routing (DeepSeek-V3).

    Per row: full scores ``s`` (float64); selection scores ``s + bias`` (or
    the logits when there is no bias); when ``topk_groups < n_groups`` the
    group scores (computed on ``s + bias``, or on ``s`` without a bias)
    keep the best ``topk_groups`` groups and every other expert's selection
    score becomes ``-inf``; top-k; weights from ``s``. Rows are processed
    in chunks of ``chunk`` so the float64 scratch is allocated per chunk.
    """
    T, E = logits.shape
    grouped = n_groups > 1 and topk_groups < n_groups
    size = E // n_groups
    n_chunks = (T + chunk - 1) // chunk
    for c in prange(n_chunks):
        s = np.empty(E)
        sel = np.empty(E)
        top = np.empty(k)
        top_i = np.empty(max(k, topk_groups) + 1, dtype=np.int64)
        cand_i = np.empty(E, dtype=np.int64)
        cand_v = np.empty(E)
        buf = np.empty(max(16, k, topk_groups))
        gs = np.empty(n_groups)
        keep = np.empty(n_groups, dtype=np.bool_)
        for t in range(c * chunk, min(T, (c + 1) * chunk)):
            z = logits[t]
            st = row_status(z, not use_sigmoid)
            status[t] = st
            if st != OK:
                continue
            if use_sigmoid:
                sigmoid_row(z, s)
            else:
                softmax_row(z, s)
            for e in range(E):
                sel[e] = s[e] + bias[e] if use_bias else np.float64(z[e])
            if grouped:
                group_scores_row(sel if use_bias else s, n_groups, group_max, gs)
                topk_row(gs, topk_groups, top_i, cand_i, cand_v, buf, rank_max)
                keep[:] = False
                for j in range(topk_groups):
                    keep[top_i[j]] = True
                for g in range(n_groups):
                    if not keep[g]:
                        for e in range(g * size, (g + 1) * size):
                            sel[e] = -np.inf
            topk_row(sel, k, top_i, cand_i, cand_v, buf, rank_max)
            for j in range(k):
                experts[t, j] = top_i[j]
                top[j] = s[top_i[j]]
            write_weights(top, renormalize, scale, weights[t])


@driver
def probs(logits, use_sigmoid, out, status):
    """Full scores per row (softmax or sigmoid), float64 arithmetic, stored in ``out``'s dtype."""
    T, E = logits.shape
    for t in prange(T):
        z = logits[t]
        st = row_status(z, not use_sigmoid)
        status[t] = st
        if st != OK:
            continue
        if use_sigmoid:
            sigmoid_row(z, out[t])
        else:
            softmax_row(z, out[t])
