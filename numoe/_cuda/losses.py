"""CUDA twins of :mod:`numoe.losses`: balancing losses, counts, bias update, stats.

Reductions are deterministic: counts are integer atomics (exact in any
order); float sums are taken over fixed chunks of rows (``_CHUNK`` rows,
independent of the grid), each chunk's partial written to its own slot,
and the partials summed in chunk order by one thread per column. All float
accumulation is in float64; 16-bit inputs are widened to float32 on the
device first (exactly). Scalar results come back as Python floats
(one synchronising copy per call).
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float64, int64

from .. import _validate as V
from . import _arrays as A
from ._launch import launch
from ._checks import Checks

_CHUNK = 1024     # rows per partial sum (fixed: results do not depend on the grid)


# ------------------------------------------------------------------ helpers
def _mask_arg(mask, T):
    """Device mask ``[T]`` as a contiguous bool-or-integer array (nonzero = keep)."""
    if mask is None:
        return None
    m = A.as_device("mask", mask)
    if m.dtype != np.bool_ and m.dtype.kind not in "iu":
        raise TypeError(f"mask must be a bool array, got dtype {m.dtype}")
    m = A.contiguous(m)
    if tuple(m.shape) != (T,):
        m_shape = tuple(m.shape)
        if int(np.prod(m_shape)) == T and len(m_shape) >= 1:
            m = A.reshape(m, (T,))
        else:
            raise ValueError(f"mask must have shape ({T},) (one entry per token), "
                             f"got {m_shape}")
    if m.dtype != np.bool_:
        out = A.empty((T,), np.bool_)
        if T:
            bs = A.block(256)
            launch(_to_bool, A.grid(T, bs), bs, 0, m, out)
        m = out
    return m


def _hist(flat, E, mask_rows=None, k=1):
    """Counts ``[E]`` int64 of the ids in ``flat`` (rows with a false mask skipped)."""
    counts = A.zeros((E,), np.int64)
    n = flat.shape[0]
    if n:
        bs = A.block(256)
        use_mask = mask_rows is not None
        mrows = mask_rows if use_mask else A.dummy(np.bool_)
        if E * 8 <= 48 * 1024:
            launch(_hist_shared, A.grid(n, bs, 4), bs, E * 8, flat, E, mrows, use_mask, k, counts)
        else:
            launch(_hist_global, A.grid(n, bs, 4), bs, 0, flat, mrows, use_mask, k, counts)
    return counts


def _column_sums(a, mask):
    """Deterministic column sums ``[E]`` float64 of ``a [T, E]`` over kept rows."""
    T, E = tuple(a.shape)
    nchunks = max(1, -(-T // _CHUNK))
    part = A.empty((nchunks, E), np.float64)
    use_mask = mask is not None
    m = mask if use_mask else A.dummy(np.bool_)
    bs = A.block(128)
    launch(_colsum_partial, A.grid(nchunks * max(E, 1), bs, 16), bs, 0, a, m, use_mask, _CHUNK,
           part)
    out = A.empty((E,), np.float64)
    launch(_colsum_final, A.grid(E, bs), bs, 0, part, out)
    return out


# ------------------------------------------------------------------- public
def expert_counts(experts, num_experts):
    """Device twin of :func:`numoe.expert_counts` (``[E]`` int64 device array)."""
    num_experts = V.integer("num_experts", num_experts, lo=1)
    ex = A.int_arg("experts", experts)
    Checks().ids("experts", ex, num_experts).run()
    return _hist(A.reshape(ex, (ex.size,)), num_experts)


def load_balancing_loss(probs, experts, *, mask=None):
    """Device twin of :func:`numoe.load_balancing_loss` (returns a Python float)."""
    p = A.as_device("probs", probs)
    A.check_float("probs", p)
    if p.ndim < 2:
        raise ValueError(f"probs must have shape [..., E], got {tuple(p.shape)}")
    p, _ = A.tokens_2d("probs", p)
    p = A.compute(p)                 # 16-bit probabilities: summed from their float32 values
    T, E = tuple(p.shape)
    ex = A.int_arg("experts", experts)
    shp = tuple(ex.shape)
    if ex.ndim < 1 or int(np.prod(shp[:-1])) != T or ex.ndim != len(shp):
        raise ValueError(f"experts must have shape [T, k] with T = {T} tokens, got {shp}")
    k = shp[-1] if ex.ndim >= 2 else 1
    if ex.ndim == 1:
        k = 1
    ex2 = A.reshape(ex, (T, k))
    m = _mask_arg(mask, T)
    Checks().finite("probs", p).ids("experts", ex2, E).run()
    counts = _hist(A.reshape(ex2, (T * k,)), E, m, k)
    csum = _column_sums(p, m)
    n_tok = T if m is None else _count_true(m)
    if n_tok == 0:
        return 0.0
    c = counts.copy_to_host().astype(np.float64)
    P = csum.copy_to_host() / n_tok
    f = c / (n_tok * k)
    return float(E * np.dot(f, P))


def router_z_loss(logits, *, mask=None):
    """Device twin of :func:`numoe.router_z_loss` (returns a Python float)."""
    z = A.as_device("logits", logits)
    A.check_float("logits", z)
    if z.ndim < 1 or tuple(z.shape)[-1] == 0:
        raise ValueError(f"logits must have shape [..., E] with E >= 1, got {tuple(z.shape)}")
    z, _ = A.tokens_2d("logits", z, min_ndim=1)
    z = A.compute(z)
    T, E = tuple(z.shape)
    m = _mask_arg(mask, T)
    Checks().finite("logits", z, allow_neg_inf=True).run()
    if T == 0:
        return 0.0
    nchunks = -(-T // _CHUNK)
    part = A.empty((nchunks, 2), np.float64)
    use_mask = m is not None
    mm = m if use_mask else A.dummy(np.bool_)
    bs = A.block(256)
    launch(_zloss_partial, A.grid(nchunks * bs, bs, 16), bs, bs * 16, z, mm, use_mask, _CHUNK,
           part)
    host = part.copy_to_host()
    total, n = 0.0, 0.0
    for c in range(nchunks):          # fixed order
        total += host[c, 0]
        n += host[c, 1]
    if n == 0:
        return 0.0
    return float(total / n)


def update_bias(bias, counts, rate):
    """Device twin of :func:`numoe.update_bias` (new float32 ``[E]`` device array)."""
    b = A.as_device("bias", bias)
    A.check_float("bias", b, ndim=1)
    c = A.int_arg("counts", counts, ndim=1) if A.as_device("counts", counts).dtype.kind in "iu" \
        else A.compute(A.float_arg("counts", counts, ndim=1))
    E = b.shape[0]
    A.check_shape("counts", c, (E,))
    rate = V.real("rate", rate)
    b = A.compute(b)
    chk = Checks().finite("bias", b)
    if c.dtype.kind == "f":
        chk.finite("counts", c)
    chk.run()
    out = A.empty((E,), np.float32)
    if E:
        bs = A.block(256)
        launch(_update_bias_kernel, 1, bs, bs * 8, b, c, rate, out)
    return out


def routing_stats(experts, num_experts, *, weights=None, plan=None):
    """Device twin of :func:`numoe.routing_stats`.

    Arrays in the result (``counts``, ``weight_mass``, ``kept_counts``) are
    device arrays; the scalar statistics are Python floats/ints.
    """
    num_experts = V.integer("num_experts", num_experts, lo=1)
    ex = A.int_arg("experts", experts)
    checks = Checks().ids("experts", ex, num_experts)
    w = None
    if weights is not None:
        w = A.compute(A.float_arg("weights", weights))
        A.check_shape("weights", w, tuple(ex.shape))
        checks.finite("weights", w)
    if plan is not None:
        from .dispatch import check_plan

        order, offsets, pcounts, dropped, _T, _k = check_plan(plan, checks)
    checks.run()
    flat = A.reshape(ex, (ex.size,))
    counts = _hist(flat, num_experts)
    c = counts.copy_to_host()
    E = num_experts
    mean = c.mean() if E else 0.0
    mx = c.max() if c.size else 0
    out = {
        "counts": counts,
        "cv": float(c.std() / mean) if mean > 0 else 0.0,
        "max_over_mean": float(mx / mean) if mean > 0 else 0.0,
        "balancedness": float(mean / mx) if mx > 0 else 0.0,
        "dead_experts": int((c == 0).sum()),
        "drop_rate": 0.0,
    }
    if w is not None:
        out["weight_mass"] = _weight_mass(flat, A.reshape(w, (w.size,)), E)
    if plan is not None:
        out["kept_counts"] = A.astype(pcounts, np.int64)
        m = dropped.size
        out["drop_rate"] = float(_count_true(A.reshape(dropped, (m,))) / m) if m else 0.0
    return out


def _weight_mass(flat, wflat, E):
    """Per-expert sum of weights (float64), each expert's assignments in flat order."""
    from .dispatch import multisplit

    order, offsets, _ = multisplit(flat, E)
    out = A.empty((E,), np.float64)
    bs = A.block(256)
    launch(_segment_sums, A.grid(E * bs, bs, 4), bs, bs * 8, order, offsets, wflat, out)
    return out


def _count_true(m):
    n = m.shape[0]
    if n == 0:
        return 0
    res = A.zeros((1,), np.int64)
    bs = A.block(256)
    launch(_count_kernel, A.grid(n, bs, 8), bs, 0, m, res)
    return int(res.copy_to_host()[0])


# ------------------------------------------------------------------ kernels
@cuda.jit
def _to_bool(src, dst):
    for i in range(cuda.grid(1), src.shape[0], cuda.gridsize(1)):
        dst[i] = src[i] != 0


@cuda.jit
def _count_kernel(m, res):
    c = 0
    for i in range(cuda.grid(1), m.shape[0], cuda.gridsize(1)):
        if m[i]:
            c += 1
    if c:
        cuda.atomic.add(res, 0, c)


@cuda.jit
def _hist_shared(flat, E, mask, use_mask, k, counts):
    sh = cuda.shared.array(0, int64)
    tid = cuda.threadIdx.x
    for e in range(tid, E, cuda.blockDim.x):
        sh[e] = 0
    cuda.syncthreads()
    for i in range(cuda.grid(1), flat.shape[0], cuda.gridsize(1)):
        if (not use_mask) or mask[i // k]:
            cuda.atomic.add(sh, flat[i], 1)
    cuda.syncthreads()
    for e in range(tid, E, cuda.blockDim.x):
        if sh[e]:
            cuda.atomic.add(counts, e, sh[e])


@cuda.jit
def _hist_global(flat, mask, use_mask, k, counts):
    for i in range(cuda.grid(1), flat.shape[0], cuda.gridsize(1)):
        if (not use_mask) or mask[i // k]:
            cuda.atomic.add(counts, flat[i], 1)


@cuda.jit
def _colsum_partial(a, mask, use_mask, chunk, part):
    """``part[c, e]`` = sum of ``a[t, e]`` over the kept rows t of chunk c (float64)."""
    T = a.shape[0]
    E = a.shape[1]
    nchunks = part.shape[0]
    for idx in range(cuda.grid(1), nchunks * E, cuda.gridsize(1)):
        c = idx // E
        e = idx - c * E
        s = 0.0
        for t in range(c * chunk, min(T, (c + 1) * chunk)):
            if (not use_mask) or mask[t]:
                s += float64(a[t, e])
        part[c, e] = s


@cuda.jit
def _colsum_final(part, out):
    for e in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        s = 0.0
        for c in range(part.shape[0]):
            s += part[c, e]
        out[e] = s


@cuda.jit
def _zloss_partial(z, mask, use_mask, chunk, part):
    """``part[c] = (sum of lse(z[t])**2, kept rows)`` over chunk c; one block per chunk,
    a fixed tree reduction over the block's strided partials."""
    sh = cuda.shared.array(0, float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    T = z.shape[0]
    E = z.shape[1]
    nchunks = part.shape[0]
    for c in range(cuda.blockIdx.x, nchunks, cuda.gridDim.x):
        s = 0.0
        n = 0.0
        for t in range(c * chunk + tid, min(T, (c + 1) * chunk), nt):
            if (not use_mask) or mask[t]:
                m = -math.inf
                for e in range(E):
                    v = float64(z[t, e])
                    if v > m:
                        m = v
                if m == -math.inf:
                    lse = -math.inf
                else:
                    tot = 0.0
                    for e in range(E):
                        tot += math.exp(float64(z[t, e]) - m)
                    lse = m + math.log(tot)
                s += lse * lse
                n += 1.0
        sh[tid] = s
        sh[nt + tid] = n
        cuda.syncthreads()
        step = 1
        while step < nt:
            step *= 2
        step //= 2
        while step > 0:
            if tid < step and tid + step < nt:
                sh[tid] += sh[tid + step]
                sh[nt + tid] += sh[nt + tid + step]
            cuda.syncthreads()
            step //= 2
        if tid == 0:
            part[c, 0] = sh[0]
            part[c, 1] = sh[nt]
        cuda.syncthreads()


@cuda.jit
def _update_bias_kernel(bias, counts, rate, out):
    """One block: mean of counts (fixed tree), then ``bias + rate * sign(mean - c)``."""
    sh = cuda.shared.array(0, float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    E = bias.shape[0]
    s = 0.0
    for e in range(tid, E, nt):
        s += float64(counts[e])
    sh[tid] = s
    cuda.syncthreads()
    step = 1
    while step < nt:
        step *= 2
    step //= 2
    while step > 0:
        if tid < step and tid + step < nt:
            sh[tid] += sh[tid + step]
        cuda.syncthreads()
        step //= 2
    mean = sh[0] / E
    for e in range(tid, E, nt):
        d = mean - float64(counts[e])
        sg = 0.0
        if d > 0:
            sg = 1.0
        elif d < 0:
            sg = -1.0
        out[e] = float64(bias[e]) + rate * sg


@cuda.jit
def _segment_sums(order, offsets, w, out):
    """One block per expert: sum of ``w[order[r]]`` over its segment (fixed tree)."""
    sh = cuda.shared.array(0, float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    E = offsets.shape[0] - 1
    for e in range(cuda.blockIdx.x, E, cuda.gridDim.x):
        s = 0.0
        for r in range(offsets[e] + tid, offsets[e + 1], nt):
            s += float64(w[order[r]])
        sh[tid] = s
        cuda.syncthreads()
        step = 1
        while step < nt:
            step *= 2
        step //= 2
        while step > 0:
            if tid < step and tid + step < nt:
                sh[tid] += sh[tid + step]
            cuda.syncthreads()
            step //= 2
        if tid == 0:
            out[e] = sh[0]
        cuda.syncthreads()


# ------------------------------------------------------------------ backward
# Device twins of :func:`numoe.load_balancing_loss_backward` and
# :func:`numoe.router_z_loss_backward`. The load shares come from the integer
# histogram above (exact); each output row is written by one thread, float64
# inside, stored in the compute dtype (16-bit: float32, narrowed at the end).
def load_balancing_loss_backward(probs, experts, *, mask=None, d_loss=1.0):
    """Device twin of :func:`numoe.load_balancing_loss_backward`."""
    p = A.as_device("probs", probs)
    A.check_float("probs", p)
    if p.ndim < 2:
        raise ValueError(f"probs must have shape [..., E], got {tuple(p.shape)}")
    out_dtype = p.dtype
    p, lead = A.tokens_2d("probs", p)
    p = A.compute(p)
    T, E = tuple(p.shape)
    ex = A.int_arg("experts", experts)
    shp = tuple(ex.shape)
    if len(shp) != len(lead) + 1 or shp[:-1] != tuple(lead) or shp[-1] < 1:
        raise ValueError(f"experts must have shape {tuple(lead) + ('k',)} with k >= 1 "
                         f"(one row per token), got {shp}")
    k = shp[-1]
    ex2 = A.reshape(ex, (T, k))
    m = _mask_arg(mask, T)
    d_loss = V.real("d_loss", d_loss)
    Checks().finite("probs", p).ids("experts", ex2, E).run()
    out = A.empty((T, E), p.dtype)
    n_tok = T if m is None else _count_true(m)
    if T and E:
        row = np.zeros(E)
        if n_tok:
            c = _hist(A.reshape(ex2, (T * k,)), E, m, k).copy_to_host()
            row = d_loss * E * (c / (n_tok * k)) / n_tok
        use_mask = m is not None
        bs = A.block(256)
        launch(_fill_rows_kernel, A.grid(T * E, bs, 8), bs, 0, cuda.to_device(row),
               m if use_mask else A.dummy(np.bool_), use_mask, A.reshape(out, (T * E,)))
    return A.reshape(A.astype(out, out_dtype), lead + (E,))


def router_z_loss_backward(logits, *, mask=None, d_loss=1.0):
    """Device twin of :func:`numoe.router_z_loss_backward`."""
    z = A.as_device("logits", logits)
    A.check_float("logits", z)
    if z.ndim < 1 or tuple(z.shape)[-1] == 0:
        raise ValueError(f"logits must have shape [..., E] with E >= 1, got {tuple(z.shape)}")
    out_dtype = z.dtype
    z, lead = A.tokens_2d("logits", z, min_ndim=1)
    z = A.compute(z)
    T, E = tuple(z.shape)
    m = _mask_arg(mask, T)
    d_loss = V.real("d_loss", d_loss)
    out = A.empty((T, E), z.dtype)
    if T:
        n = T if m is None else _count_true(m)
        coef = 2.0 * d_loss / max(n, 1)
        bad = A.zeros((1,), np.int64)
        use_mask = m is not None
        bs = A.block(128)
        launch(_z_loss_backward_kernel, A.grid(T, bs, 8), bs, 0, z,
               m if use_mask else A.dummy(np.bool_), use_mask, coef, out, bad)
        if int(bad.copy_to_host()[0]):
            raise ValueError("logits holds NaN or +inf, or a counted row that is -inf for "
                             "every expert; logsumexp would not be finite")
    return A.reshape(A.astype(out, out_dtype), lead + (E,))


@cuda.jit
def _fill_rows_kernel(row, mask, use_mask, out):
    """``out[t, :] = row`` where the token counts, else 0 (``out`` flat ``[T*E]``)."""
    E = row.shape[0]
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        t = i // E
        if use_mask and not mask[t]:
            out[i] = 0.0
        else:
            out[i] = row[i - t * E]


@cuda.jit
def _z_loss_backward_kernel(z, mask, use_mask, coef, out, bad):
    """``out[t] = coef * lse(z_t) * softmax(z_t)`` on counted rows (0 elsewhere); ``bad``
    counts the counted rows holding NaN/+inf or -inf everywhere (integer atomics)."""
    T = z.shape[0]
    E = z.shape[1]
    for t in range(cuda.grid(1), T, cuda.gridsize(1)):
        bad_row = False
        mx = -math.inf
        for e in range(E):
            v = float64(z[t, e])
            if not (v < math.inf):          # NaN or +inf
                bad_row = True
            elif v > mx:
                mx = v
        if mx == -math.inf:
            bad_row = True
        counted = (not use_mask) or mask[t]
        if bad_row or not counted:
            if counted:
                cuda.atomic.add(bad, 0, 1)
            for e in range(E):
                out[t, e] = 0.0
            continue
        tot = 0.0
        for e in range(E):
            tot += math.exp(float64(z[t, e]) - mx)
        f = coef * (mx + math.log(tot)) / tot
        for e in range(E):
            out[t, e] = f * math.exp(float64(z[t, e]) - mx)
