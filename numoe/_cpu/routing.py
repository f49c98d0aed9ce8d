"""CPU kernels behind :mod:`numoe.routing`.

One pass per token row inside a ``prange`` over tokens (owner computes: a
row writes only its own outputs, so results do not depend on the thread
count). Selection is a partial top-k, never a full sort: one branch-free
pass finds a lower bound on the k-th largest score (:func:`lane_bound`),
the few entries at or above it are kept in id order, and those are
ranked (or, when there are many, inserted into a k-long sorted buffer).
Ties go to the lower id: an entry only moves ahead of an equal one that
comes later. A plain insertion over all E entries was measured 3x slower
(its branches mispredict on random scores).

The drivers also check the values they read and record a per-row status
(``OK``, ``BAD_VALUE`` for NaN/+inf, ``ALL_MASKED`` for a softmax row that
is entirely ``-inf``); the public wrapper turns a non-zero status into a
``ValueError`` before anything is returned. Jitted code never raises.

Scores, weights and sums are computed in float64 whatever the input dtype,
with an inlined exp (:func:`exp_neg`, within 1 ulp of libm) so the loops
over experts vectorise; hot divisions use ``np.true_divide``, which has no
Python zero-division check (that check alone stops LLVM vectorising).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from .._jit import driver, kernel

# Row status codes. Kernels use the literals (no module globals inside jitted code).
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
        return 1                         # BAD_VALUE
    if softmax and finite == 0:
        return 2                         # ALL_MASKED
    return 0                             # OK


@intrinsic
def _f64_bits(typingctx, x):
    """The bits of a float64 as an int64 (a bitcast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(types.float64), codegen


@intrinsic
def _bits_f64(typingctx, x):
    """An int64 bit pattern as a float64 (a bitcast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


@kernel
def exp_neg(x):
    """``exp(x)`` for float64 ``x <= 0`` (``-inf`` gives 0), within 1 ulp, branch-free.

    Without SVML, Numba's ``math.exp`` is a scalar libm call; this inlines
    and vectorises (about 3x faster measured here). Cody-Waite reduction
    ``x = n ln2 + r``, ``|r| <= ln2/2``; Taylor polynomial to degree 13
    (truncation < 1e-17); ``2**n`` built from exponent bits in two halves
    so subnormal results come out right.
    """
    xc = max(x, -746.0)
    t = xc * 1.4426950408889634 + 6755399441055744.0      # + 1.5 * 2**52 rounds n into the bits
    n = t - 6755399441055744.0
    r = (xc - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10
    p = 1.0 + r * (1.0 + r * (0.5 + r * (1.6666666666666666e-01 + r * (
        4.1666666666666664e-02 + r * (8.3333333333333332e-03 + r * (
            1.3888888888888889e-03 + r * (1.9841269841269841e-04 + r * (
                2.4801587301587302e-05 + r * (2.7557319223985893e-06 + r * (
                    2.7557319223985888e-07 + r * (2.5052108385441720e-08 + r * (
                        2.0876756987868100e-09 + r * 1.6059043836821613e-10))))))))))))
    ni = _f64_bits(t) - 4843621399236968448                # n as an integer
    n1 = ni >> 1
    y = p * _bits_f64((n1 + 1023) << 52) * _bits_f64((ni - n1 + 1023) << 52)
    return y if x >= -745.2 else 0.0


@kernel
def sigmoid(x):
    """Logistic function of a float64, accurate on both tails (0 at -inf), branch-free."""
    e = exp_neg(-abs(x))
    num = 1.0 if x >= 0.0 else e
    # np.true_divide: no Python zero-division check, so loops over this vectorise
    return np.true_divide(num, 1.0 + e)


@kernel
def sum4(a):
    """Sum of a float64 vector with four interleaved accumulators (a fixed order)."""
    n = a.shape[0]
    s0 = s1 = s2 = s3 = 0.0
    i = 0
    while i + 4 <= n:
        s0 += a[i]
        s1 += a[i + 1]
        s2 += a[i + 2]
        s3 += a[i + 3]
        i += 4
    while i < n:
        s0 += a[i]
        i += 1
    return (s0 + s1) + (s2 + s3)


@kernel
def exp_shifted(z, m, out):
    """``out[e] = exp(z[e] - m)`` in float64 (``m`` >= every entry); returns their sum."""
    for e in range(z.shape[0]):
        out[e] = exp_neg(np.float64(z[e]) - m)
    return sum4(out)


@kernel
def _sort8_into(buf, o, x0, x1, x2, x3, x4, x5, x6, x7):
    """Write the 8 values in descending order to ``buf[o:o+8]`` (19-comparator network)."""
    h = max(x0, x2); x2 = min(x0, x2); x0 = h
    h = max(x1, x3); x3 = min(x1, x3); x1 = h
    h = max(x4, x6); x6 = min(x4, x6); x4 = h
    h = max(x5, x7); x7 = min(x5, x7); x5 = h
    h = max(x0, x4); x4 = min(x0, x4); x0 = h
    h = max(x1, x5); x5 = min(x1, x5); x1 = h
    h = max(x2, x6); x6 = min(x2, x6); x2 = h
    h = max(x3, x7); x7 = min(x3, x7); x3 = h
    h = max(x0, x1); x1 = min(x0, x1); x0 = h
    h = max(x2, x3); x3 = min(x2, x3); x2 = h
    h = max(x4, x5); x5 = min(x4, x5); x4 = h
    h = max(x6, x7); x7 = min(x6, x7); x6 = h
    h = max(x2, x4); x4 = min(x2, x4); x2 = h
    h = max(x3, x5); x5 = min(x3, x5); x3 = h
    h = max(x1, x4); x4 = min(x1, x4); x1 = h
    h = max(x3, x6); x6 = min(x3, x6); x3 = h
    h = max(x1, x2); x2 = min(x1, x2); x1 = h
    h = max(x3, x4); x4 = min(x3, x4); x3 = h
    h = max(x5, x6); x6 = min(x5, x6); x5 = h
    buf[o] = x0
    buf[o + 1] = x1
    buf[o + 2] = x2
    buf[o + 3] = x3
    buf[o + 4] = x4
    buf[o + 5] = x5
    buf[o + 6] = x6
    buf[o + 7] = x7


@kernel
def lane_bound(sel, k, buf):
    """A lower bound on the k-th largest entry of ``sel`` (``k <= 16``).

    The entries are dealt into 8 interleaved lanes; each lane keeps its two
    largest (missing ones count as -inf). Those 16 are distinct entries (or
    -inf), so their k-th largest is <= the k-th largest of the row. One
    branch-free pass over the row; ``buf`` (``[16]``, the row's dtype) is
    scratch.
    """
    E = sel.shape[0]
    buf[0] = -np.inf
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = buf[0]
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = buf[0]
    base = 0
    while base + 8 <= E:
        v = sel[base]
        b0 = max(b0, min(a0, v)); a0 = max(a0, v)
        v = sel[base + 1]
        b1 = max(b1, min(a1, v)); a1 = max(a1, v)
        v = sel[base + 2]
        b2 = max(b2, min(a2, v)); a2 = max(a2, v)
        v = sel[base + 3]
        b3 = max(b3, min(a3, v)); a3 = max(a3, v)
        v = sel[base + 4]
        b4 = max(b4, min(a4, v)); a4 = max(a4, v)
        v = sel[base + 5]
        b5 = max(b5, min(a5, v)); a5 = max(a5, v)
        v = sel[base + 6]
        b6 = max(b6, min(a6, v)); a6 = max(a6, v)
        v = sel[base + 7]
        b7 = max(b7, min(a7, v)); a7 = max(a7, v)
        base += 8
    _sort8_into(buf, 0, a0, a1, a2, a3, a4, a5, a6, a7)
    _sort8_into(buf, 8, b0, b1, b2, b3, b4, b5, b6, b7)
    # A = buf[:8], B = buf[8:], both descending. The tail (< 8 entries, in no lane yet)
    # is inserted into B, dropping B's smallest: still 16 distinct entries (or -inf).
    for e in range(base, E):
        v = sel[e]
        if v > buf[15]:
            i = 15
            while i > 8 and buf[i - 1] < v:
                buf[i] = buf[i - 1]
                i -= 1
            buf[i] = v
    # k-th largest of two descending lists: max over i (taken from A) of min(A[i-1], B[k-i-1])
    lo = max(0, k - 8)
    thr = buf[0]
    for i in range(lo, min(k, 8) + 1):
        x = buf[i - 1] if i > 0 else buf[8 + k - 1]
        y = buf[8 + k - i - 1] if i < k else buf[k - 1]
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
    """Candidate of rank r < k (ties: earlier first) to ``top_i[r]``; the rest to ``top_i[k]``."""
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
    """``out = softmax(z)`` in float64 (``z`` has at least one finite entry; ``out`` float64)."""
    m = -np.inf
    for e in range(z.shape[0]):
        m = max(m, z[e])
    total = exp_shifted(z, np.float64(m), out)
    for e in range(z.shape[0]):
        out[e] = np.true_divide(out[e], total)      # (vectorises; see sigmoid)


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
        for e in range(g * size, (g + 1) * size):    # branch-free running top two
            v = src[e]
            b = max(b, min(a, v))
            a = max(a, v)
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
        row = np.empty(E)
        for t in range(c * chunk, min(T, (c + 1) * chunk)):
            z = logits[t]
            st = row_status(z, not use_sigmoid)
            status[t] = st
            if st != 0:
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
                    top[j] = exp_neg(top[j] - m)
                if not renormalize:
                    total = exp_shifted(z, m, row)
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
            if st != 0:
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
def probs(logits, use_sigmoid, chunk, out, status):
    """Full scores per row (softmax or sigmoid) in float64, stored in ``out``'s dtype."""
    T, E = logits.shape
    n_chunks = (T + chunk - 1) // chunk
    for c in prange(n_chunks):
        s = np.empty(E)
        for t in range(c * chunk, min(T, (c + 1) * chunk)):
            z = logits[t]
            st = row_status(z, not use_sigmoid)
            status[t] = st
            if st != 0:
                continue
            if use_sigmoid:
                sigmoid_row(z, s)
            else:
                softmax_row(z, s)
            o = out[t]
            for e in range(E):
                o[e] = s[e]


# ------------------------------------------------------------------ backward
@kernel
def probs_backward_row(s, use_sigmoid, g, out):
    """``out = d logits`` of one row from its scores ``s`` and ``g = d scores`` (float64)."""
    E = s.shape[0]
    if use_sigmoid:
        for e in range(E):
            out[e] = g[e] * s[e] * (1.0 - s[e])
        return
    dot = 0.0
    for e in range(E):
        dot += g[e] * s[e]
    for e in range(E):
        out[e] = s[e] * (g[e] - dot)


@kernel
def probs_backward_chunk(logits, d_probs, use_sigmoid, lo, hi, out, status):
    """Rows ``lo:hi`` of :func:`probs_backward` (serial)."""
    E = logits.shape[1]
    s = np.empty(E)
    g = np.empty(E)
    d = np.empty(E)
    for t in range(lo, hi):
        z = logits[t]
        st = row_status(z, not use_sigmoid)
        status[t] = st
        if st != 0:
            continue
        if use_sigmoid:
            sigmoid_row(z, s)
        else:
            softmax_row(z, s)
        for e in range(E):
            g[e] = np.float64(d_probs[t, e])
        probs_backward_row(s, use_sigmoid, g, d)
        o = out[t]
        for e in range(E):
            o[e] = d[e]


@driver
def probs_backward(logits, d_probs, use_sigmoid, chunk, out, status):
    """``out[t] = d logits`` of :func:`probs` given ``d_probs``; per-row ``status`` as
    :func:`probs`. Scores and products in float64, stored in ``out``'s dtype.
    Parallel over chunks of ``chunk`` rows (each owns its rows)."""
    T = logits.shape[0]
    n_chunks = (T + chunk - 1) // chunk
    for c in prange(n_chunks):
        probs_backward_chunk(logits, d_probs, use_sigmoid, c * chunk, min(T, (c + 1) * chunk),
                             out, status)


@kernel
def route_backward_chunk(logits, experts, d_weights, use_sigmoid, renormalize, scale, lo, hi,
                         out, status):
    """Rows ``lo:hi`` of :func:`route_backward` (serial)."""
    E = logits.shape[1]
    k = experts.shape[1]
    s = np.empty(E)
    g = np.empty(E)
    d = np.empty(E)
    for t in range(lo, hi):
        z = logits[t]
        st = row_status(z, not use_sigmoid)
        status[t] = st
        if st != 0:
            continue
        if use_sigmoid:
            sigmoid_row(z, s)
        else:
            softmax_row(z, s)
        g[:] = 0.0
        if renormalize:
            tot = 0.0
            dot = 0.0
            for j in range(k):
                sc = s[experts[t, j]]
                tot += sc
                dot += np.float64(d_weights[t, j]) * scale * sc
            tot += 1e-20
            corr = dot / (tot * tot)
            for j in range(k):
                g[experts[t, j]] += np.float64(d_weights[t, j]) * scale / tot - corr
        else:
            for j in range(k):
                g[experts[t, j]] += np.float64(d_weights[t, j]) * scale
        probs_backward_row(s, use_sigmoid, g, d)
        o = out[t]
        for e in range(E):
            o[e] = d[e]


@driver
def route_backward(logits, experts, d_weights, use_sigmoid, renormalize, scale, chunk, out,
                   status):
    """``out[t] = d logits`` of the routing weights of row ``t`` (chosen experts fixed).

    ``w_j = scale * s[c_j] / (sum_i s[c_i] + 1e-20)`` (renormalised) or
    ``scale * s[c_j]``; the score gradient is scattered to the chosen
    experts in slot order, then through the softmax/sigmoid. float64 inside;
    parallel over chunks of ``chunk`` rows (each owns its rows).
    """
    T = logits.shape[0]
    n_chunks = (T + chunk - 1) // chunk
    for c in prange(n_chunks):
        route_backward_chunk(logits, experts, d_weights, use_sigmoid, renormalize, scale,
                             c * chunk, min(T, (c + 1) * chunk), out, status)
