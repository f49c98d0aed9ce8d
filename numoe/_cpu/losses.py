"""CPU kernels behind :mod:`numoe.losses`.

Reductions are deterministic: the work is cut into fixed-size chunks (the
chunk size is an argument, never the thread count), each chunk writes its
own slab of partial sums (float64) or histogram (int64), and the slabs are
merged serially in chunk order. The result is bit-identical for any
number of threads.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from .._jit import driver, kernel
from .routing import exp_shifted, row_status


@kernel
def logsumexp_row(z, scratch):
    """``log(sum(exp(z)))`` in float64 (``z`` has a finite entry; ``scratch`` float64 ``[E]``)."""
    m = -np.inf
    for e in range(z.shape[0]):
        m = max(m, z[e])
    m = np.float64(m)
    return m + math.log(exp_shifted(z, m, scratch))


@driver
def balance_sums(probs, experts, mask, chunk, prob_sums, hist, ntok, bad):
    """Per-chunk sums for the load-balancing loss.

    For chunk ``c`` of ``chunk`` tokens: ``prob_sums[c, e]`` = sum of
    ``probs[t, e]`` over its unmasked tokens (float64), ``hist[c, e]`` =
    assignments of those tokens to expert ``e``, ``ntok[c]`` = unmasked
    tokens, ``bad[c]`` = non-finite ``probs`` entries seen in the chunk.
    """
    T, E = probs.shape
    k = experts.shape[1]
    n_chunks = prob_sums.shape[0]
    for c in prange(n_chunks):
        ps = prob_sums[c]
        h = hist[c]
        ps[:] = 0.0
        h[:] = 0
        n = 0
        nb = 0
        for t in range(c * chunk, min(T, (c + 1) * chunk)):
            if not mask[t]:
                continue
            n += 1
            p = probs[t]
            for e in range(E):
                v = np.float64(p[e])
                nb += not (abs(v) < np.inf)
                ps[e] += v
            for j in range(k):
                h[experts[t, j]] += 1
        ntok[c] = n
        bad[c] = nb


@driver
def z_loss_sums(logits, mask, chunk, sums, ntok, bad):
    """Per-chunk ``sum(logsumexp(row)**2)`` over unmasked rows, their count, and bad rows.

    A row is bad if it holds NaN or +inf, or is -inf everywhere; bad rows
    add nothing to the sums (the wrapper raises on any).
    """
    T = logits.shape[0]
    n_chunks = sums.shape[0]
    for c in prange(n_chunks):
        scratch = np.empty(logits.shape[1])
        s = 0.0
        n = 0
        nb = 0
        for t in range(c * chunk, min(T, (c + 1) * chunk)):
            if not mask[t]:
                continue
            z = logits[t]
            if row_status(z, True) != 0:        # NaN/+inf, or -inf everywhere
                nb += 1
                continue
            x = logsumexp_row(z, scratch)
            s += x * x
            n += 1
        sums[c] = s
        ntok[c] = n
        bad[c] = nb


@driver
def histogram(ids, weights, with_weights, num_experts, chunk, hist, mass):
    """Per-chunk expert histograms of flat ``ids`` (and weight mass when asked).

    ``hist[c, e]`` counts ids ``== e`` in chunk ``c`` (int64); with
    ``with_weights``, ``mass[c, e]`` sums the matching ``weights`` (float64).
    Ids must lie in ``[0, num_experts)``.
    """
    N = ids.shape[0]
    n_chunks = hist.shape[0]
    for c in prange(n_chunks):
        h = hist[c]
        h[:] = 0
        lo = c * chunk
        hi = min(N, lo + chunk)
        for i in range(lo, hi):
            h[ids[i]] += 1
        if with_weights:
            m = mass[c]
            m[:] = 0.0
            for i in range(lo, hi):
                m[ids[i]] += np.float64(weights[i])


@kernel
def merge_rows(slab, out):
    """``out[e] = sum over c of slab[c, e]``, summed serially in chunk order."""
    out[:] = 0
    for c in range(slab.shape[0]):
        for e in range(slab.shape[1]):
            out[e] += slab[c, e]


@kernel
def bias_step(bias, counts, mean, rate, out):
    """``out = bias + rate * sign(mean - counts)`` in float64, stored in ``out``'s dtype."""
    for e in range(counts.shape[0]):
        d = mean - counts[e]
        s = 1.0 if d > 0 else (-1.0 if d < 0 else 0.0)
        out[e] = np.float64(bias[e]) + rate * s


# ------------------------------------------------------------------ backward
@kernel
def z_loss_backward_chunk(logits, mask, coef, lo, hi, out):
    """Rows ``lo:hi`` of :func:`z_loss_backward` (serial); returns the bad-row count."""
    E = logits.shape[1]
    s = np.empty(E)
    nb = 0
    for t in range(lo, hi):
        o = out[t]
        z = logits[t]
        if not mask[t] or row_status(z, True) != 0:
            nb += mask[t]
            for e in range(E):
                o[e] = 0.0
            continue
        m = -np.inf
        for e in range(E):
            m = max(m, z[e])
        m = np.float64(m)
        tot = exp_shifted(z, m, s)
        f = coef * (m + math.log(tot)) / tot
        for e in range(E):
            o[e] = f * s[e]
    return nb


@driver
def z_loss_backward(logits, mask, coef, chunk, out, bad):
    """``out[t] = coef * lse(z_t) * softmax(z_t)`` on counted rows (0 elsewhere),
    float64 inside; ``bad[c]`` counts chunk ``c``'s counted rows that hold NaN/+inf
    or are -inf everywhere."""
    T = logits.shape[0]
    for c in prange(bad.shape[0]):
        bad[c] = z_loss_backward_chunk(logits, mask, coef, c * chunk, min(T, (c + 1) * chunk),
                                       out)
