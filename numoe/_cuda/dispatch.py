"""CUDA twins of :mod:`numoe.dispatch`: counting-sort plan, permute, unpermute.

``dispatch_plan`` is a stable multisplit in four kernels:

1. per-tile histograms (shared-memory counters; counts do not depend on the
   order of the atomic increments), stored expert-major ``hist[e, tile]``;
2. exclusive prefixes: of each expert's row of that table (a block per
   expert, coalesced chunks) -- every (expert, tile) its first slot inside
   the expert, and ``counts`` -- then of ``counts`` (one block): ``offsets``;
3. a scatter in which each tile is cut into contiguous sub-tiles of 32 rows
   per group of 32 threads; a group walks its sub-tile in rounds of 32,
   ranks each element among the equal keys of lower lanes (a 32-wide
   compare through shared memory, no warp intrinsics: simulator-safe) and
   advances per-(group, expert) cursors. The position of every assignment
   is therefore a pure function of the input: ``order`` is exactly the CPU
   one (ascending expert, ascending flat id inside an expert).

With a capacity, each overflowing expert's segment is trimmed by one block
(owner computes) following the CPU policies -- ``slot`` (per-slot counts,
then the first ``quota`` of the boundary slot in token order), ``position``
(the first ``C``), ``score`` (an 8-pass radix select of the ``C``-th largest
weight on order-preserving int64 keys, ties to the lower flat id) -- and
compacted with block scans.

``unpermute`` builds the inverse positions (each slot written once), checks
them, and sums each token's slots in ascending ``j`` with the accumulator in
the output's compute dtype (float32 for 16-bit rows, narrowed once at the
end): no atomics, bit-reproducible. ``permute`` copies 16-bit rows as bits.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda, float32, float64, int32, int64

from .. import _validate as V
from .._types import DispatchPlan
from . import _arrays as A
from . import _narrow
from ._launch import launch
from ._checks import Checks

_TILE_ROUNDS = 8          # rounds of 32 per group and tile in the scatter
_GROUPS = 4               # groups of 32 threads per scatter block
_MAX_TABLE = 1 << 20      # cap on the (expert x tile) histogram cells
_SMEM = 48 * 1024


# ------------------------------------------------------------------ helpers
def _index_dtype(m):
    return np.int64 if m - 1 > A.INT32_MAX else np.int32


def _geometry(m, E):
    """(lanes, groups, rounds, tile, ntiles) of the multisplit for ``m`` keys, ``E`` experts.

    A scatter block is ``groups`` groups of ``lanes`` threads (32 on a GPU; the
    simulator uses smaller blocks); a tile is ``groups * lanes * rounds`` keys.
    """
    lanes = A.block(32)
    groups = 1 if A.SIM else _GROUPS
    while groups > 1 and (groups * E + groups * lanes) * 4 > _SMEM:
        groups //= 2
    rounds = 2 if A.SIM else _TILE_ROUNDS
    tile = groups * lanes * rounds
    ntiles = max(1, -(-m // tile))
    while ntiles * E > _MAX_TABLE and ntiles > 1:
        rounds *= 2
        tile = groups * lanes * rounds
        ntiles = max(1, -(-m // tile))
    return lanes, groups, rounds, tile, ntiles


def max_experts():
    """Largest expert count the scatter's shared memory allows."""
    return _SMEM // 4 - 32


def multisplit(keys, E, order=None, pos=None):
    """Stable counting sort of ``keys [m]`` (ints in ``[0, E)``, validated).

    Returns ``(order [m], offsets [E+1] int64, counts [E] int64)`` on the device.
    ``pos [m]`` (optional, int64) also receives the inverse: ``pos[order[p]] = p``.
    """
    m = keys.shape[0]
    if E > max_experts():
        raise ValueError(f"num_experts must be <= {max_experts()} on the CUDA backend, got {E}")
    if order is None:
        order = A.empty((m,), _index_dtype(m))
    offsets = A.empty((E + 1,), np.int64)
    counts = A.empty((E,), np.int64)
    lanes, groups, rounds, tile, ntiles = _geometry(m, E)
    hist = A.empty((E * ntiles,), np.int32)
    base = A.empty((E * ntiles,), np.int64)
    bs = groups * lanes
    g = A.grid(ntiles * bs, bs, 8)
    if m:
        launch(_ms_hist, g, bs, E * 4, keys, E, tile, ntiles, hist)
    else:
        launch(A._fill, 1, A.block(128), 0, hist, 0)
    sbs = A.block(256)
    launch(_ms_scan_rows, min(E, 65535), sbs, sbs * 8, hist, E, ntiles, base, counts)
    obs = A.block(1024)
    launch(_ms_offsets, 1, obs, obs * 8, counts, E, offsets)
    if m:
        write_pos = pos is not None
        launch(_ms_scatter, g, bs, (groups * E + bs) * 4, keys, E, tile, ntiles, rounds,
               lanes, offsets, base, order, pos if write_pos else base, write_pos)
    return order, offsets, counts


# ------------------------------------------------------------------- public
def dispatch_plan(experts, num_experts, *, capacity=None, weights=None, drop_policy="slot"):
    """Device twin of :func:`numoe.dispatch_plan`."""
    from ..dispatch import _check_dispatch_options

    num_experts, capacity = _check_dispatch_options(num_experts, capacity, drop_policy,
                                                    weights is not None)
    ex = A.int_arg("experts", experts, ndim=2)
    T, k = tuple(ex.shape)
    if k < 1:
        raise ValueError(f"experts must have at least one column ([T, k], k >= 1), "
                         f"got shape {(T, k)}")
    checks = Checks().ids("experts", ex, num_experts)
    w = None
    if weights is not None:
        w = A.compute(A.float_arg("weights", weights, ndim=2))
        A.check_shape("weights", w, (T, k))
        checks.finite("weights", w)
    checks.run()
    m = T * k
    flat = A.reshape(ex, (m,))
    order, offsets, counts = multisplit(flat, num_experts)
    dropped = A.zeros((m,), np.bool_)
    if capacity is not None and m:
        order, offsets, counts = _apply_capacity(order, offsets, counts, k, capacity,
                                                 drop_policy, w, dropped, num_experts)
    return DispatchPlan(order, offsets, counts, A.reshape(dropped, (T, k)), capacity)


def _apply_capacity(order, offsets, counts, k, cap, policy, w, dropped, E):
    bs = A.block(256)
    g = A.grid(E * bs, bs, 4)
    if policy == "slot":
        launch(_cap_slot, g, bs, (k + bs + 4) * 8, order, offsets, k, cap, dropped)
    elif policy == "position":
        launch(_cap_position, g, bs, 0, order, offsets, cap, dropped)
    else:
        bits = A.empty((w.size,), np.float64)
        wf = A.reshape(w, (w.size,))
        launch(_score_values, A.grid(w.size, bs, 8), bs, 0, wf, bits)
        keys = bits.view(np.int64)
        launch(_cap_score, g, bs, (256 + bs + 4) * 8, order, offsets, cap, keys, dropped)
    new_offsets = A.empty((E + 1,), np.int64)
    new_counts = A.empty((E,), np.int64)
    launch(_cap_offsets, 1, 1, 0, offsets, cap, new_offsets, new_counts)
    n_kept = int(new_offsets[E:].copy_to_host()[0])
    new_order = A.empty((n_kept,), order.dtype)
    if n_kept:
        launch(_cap_compact, g, bs, (bs + 4) * 8, order, offsets, dropped, new_offsets, new_order)
    return new_order, new_offsets, new_counts


def _plan_arrays(plan):
    """Device views of a plan's arrays, with dtype/shape checks (no value checks)."""
    if not isinstance(plan, DispatchPlan):
        raise TypeError(f"plan must be a numoe.DispatchPlan (from dispatch_plan), "
                        f"got {type(plan).__name__}")
    dropped = A.as_device("plan.dropped", plan.dropped)
    if dropped.dtype != np.bool_:
        raise TypeError(f"plan.dropped must be a bool array, got dtype {dropped.dtype}")
    shp = tuple(dropped.shape)
    if len(shp) != 2 or shp[1] < 1:
        raise ValueError(f"plan.dropped must be 2-D [T, k] with k >= 1, got shape {shp}")
    dropped = A.contiguous(dropped)
    order = A.int_arg("plan.order", plan.order, ndim=1)
    offsets = A.int_arg("plan.offsets", plan.offsets, ndim=1)
    if offsets.shape[0] < 2:
        raise ValueError(f"plan.offsets must have E+1 >= 2 entries, got shape "
                         f"{tuple(offsets.shape)}")
    counts = A.int_arg("plan.counts", plan.counts)
    A.check_shape("plan.counts", counts, (offsets.shape[0] - 1,))
    cap = plan.capacity
    if cap is not None:
        cap = V.integer("plan.capacity", cap, lo=1)
    return order, offsets, counts, dropped, cap


def check_plan(plan, checks=None):
    """Validate a device plan (one synchronising read); returns its arrays and T, k."""
    order, offsets, counts, dropped, cap = _plan_arrays(plan)
    own = checks is None
    checks = Checks() if own else checks
    checks.plan(order, offsets, counts, dropped, cap)
    if own:
        checks.run()
    T, k = tuple(dropped.shape)
    return order, offsets, counts, dropped, T, k


def _check_out(out, shape, dtype, like):
    d = A.as_device("out", out)
    if d.dtype != dtype:
        raise TypeError(f"out must have dtype {np.dtype(dtype)} (that of {like}), "
                        f"got {d.dtype}")
    A.check_shape("out", d, shape)
    if not d.is_c_contiguous():
        raise ValueError("out must be C-contiguous")
    return d


def permute(x, plan, *, out=None):
    """Device twin of :func:`numoe.permute`."""
    order, _off, _cnt, _drop, T, k = check_plan(plan)
    x2, _ = A.tokens_2d("x", x)
    if x2.shape[0] != T:
        raise ValueError(f"x must hold T = {T} tokens (plan.dropped.shape[0]), "
                         f"got {x2.shape[0]} (x shape {tuple(A.as_device('x', x).shape)})")
    shape = (order.shape[0], x2.shape[1])
    out = A.empty(shape, x2.dtype) if out is None else _check_out(out, shape, x2.dtype, "x")
    gather_rows(x2, order, k, out)
    return out


def gather_rows(x2, order, k, out):
    """``out[i] = x2[order[i] // k]`` (validated inputs). Rows are copied as bits, eight
    bytes at a time when both arrays allow it (C-contiguous, rows a whole number of
    aligned 64-bit words)."""
    n, H = tuple(out.shape)
    if n and H:
        src, dst = _words(A.bits(x2)), _words(A.bits(out))
        if src is None or dst is None:
            src, dst = A.bits(x2), A.bits(out)
        bs = A.block(_row_block(dst.shape[1]))
        launch(_permute_kernel, A.grid(n * bs, bs, 16), bs, 0, src, order, k, dst)
    return out


def _words(a):
    """A 2-D array's ``uint64`` view (rows of whole words), or None."""
    if a.dtype.itemsize >= 8 or (a.shape[1] * a.dtype.itemsize) % 8 or not a.is_c_contiguous():
        return None
    if not A.SIM and a.device_ctypes_pointer.value % 8:
        return None
    try:
        return a.view(np.uint64)
    except (ValueError, NotImplementedError, AttributeError):
        return None


def _row_block(H):
    return 256 if H >= 1024 else (128 if H >= 256 else 64)


def unpermute(ys, plan, weights, *, out=None):
    """Device twin of :func:`numoe.unpermute`."""
    order, _off, _cnt, dropped, T, k = check_plan(plan)
    ys = A.float_arg("ys", ys, ndim=2)
    if ys.shape[0] != order.shape[0]:
        raise ValueError(f"ys must have N = {order.shape[0]} rows (len(plan.order)), "
                         f"got shape {tuple(ys.shape)}")
    w = A.compute(A.float_arg("weights", weights, ndim=2))
    A.check_shape("weights", w, (T, k))
    Checks().finite("weights", w).run()
    w = A.astype(w, A.compute_dtype(ys.dtype))
    H = ys.shape[1]
    shape = (T, H)
    out = A.empty(shape, ys.dtype) if out is None else _check_out(out, shape, ys.dtype, "ys")
    pos = inverse_positions(order, dropped, check=True)
    combine(ys, pos, w, k, out)
    return out


def inverse_positions(order, dropped, check=False):
    """``pos [T*k]`` int64: slot of each assignment in ``order`` (``-1``: dropped)."""
    m = dropped.size
    n = order.shape[0]
    pos = A.full((m,), np.int64, -1)
    bs = A.block(256)
    if n:
        launch(_inverse_kernel, A.grid(n, bs, 8), bs, 0, order, pos)
        if check:
            bad = A.zeros((1,), np.int64)
            flat = A.reshape(dropped, (m,))
            launch(_inverse_check_kernel, A.grid(n, bs, 8), bs, 0, order, pos, flat, bad)
            nbad = int(bad.copy_to_host()[0])
            if nbad:
                raise ValueError(f"plan.order repeats ids or lists dropped assignments "
                                 f"({nbad} inconsistent entries); not a valid plan")
    return pos


def combine(ys, pos, w, k, out, *, weighted=True):
    """``out[t] = sum_j w[t, j] * ys[pos[t*k+j]]`` (kept slots, ascending j). ``out`` has
    ``ys``'s dtype, or is 16-bit with float32 ``ys`` (the float32 sum narrowed once, as
    ``astype`` would)."""
    T, H = tuple(out.shape)
    if T and H:
        bs = A.block(_row_block(H))
        kern = _combine_kernel(str(out.dtype), weighted, str(ys.dtype))
        launch(kern, A.grid(T * bs, bs, 16), bs, 0, A.bits(ys), pos, w, k, A.bits(out))
    return out


# ------------------------------------------------------------------ kernels
@cuda.jit(device=True)
def _block_excl_scan(sh, tid, nt, v):
    """Exclusive prefix sum of ``v`` over the block (Hillis-Steele in ``sh[:nt]``).

    Returns (exclusive value, block total). Every thread must call it.
    """
    sh[tid] = v
    cuda.syncthreads()
    off = 1
    while off < nt:
        x = sh[tid - off] if tid >= off else 0
        cuda.syncthreads()
        sh[tid] += x
        cuda.syncthreads()
        off *= 2
    incl = sh[tid]
    total = sh[nt - 1]
    cuda.syncthreads()
    return incl - v, total


@cuda.jit
def _ms_hist(keys, E, tile, ntiles, hist):
    sh = cuda.shared.array(0, int32)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    m = keys.shape[0]
    for tl in range(cuda.blockIdx.x, ntiles, cuda.gridDim.x):
        for e in range(tid, E, nt):
            sh[e] = 0
        cuda.syncthreads()
        hi = min(m, (tl + 1) * tile)
        for i in range(tl * tile + tid, hi, nt):
            cuda.atomic.add(sh, keys[i], 1)
        cuda.syncthreads()
        for e in range(tid, E, nt):
            hist[e * ntiles + tl] = sh[e]
        cuda.syncthreads()


@cuda.jit
def _ms_scan_rows(hist, E, ntiles, base, counts):
    """A block per expert: ``base[e, :]`` = exclusive prefix of ``hist[e, :]`` (read in
    block-wide coalesced chunks), ``counts[e]`` its total."""
    sh = cuda.shared.array(0, int64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for e in range(cuda.blockIdx.x, E, cuda.gridDim.x):
        row = e * ntiles
        carry = int64(0)
        for c0 in range(0, ntiles, nt):
            i = c0 + tid
            v = int64(hist[row + i]) if i < ntiles else int64(0)
            excl, total = _block_excl_scan(sh, tid, nt, v)
            if i < ntiles:
                base[row + i] = carry + excl
            carry += total
        if tid == 0:
            counts[e] = carry


@cuda.jit
def _ms_offsets(counts, E, offsets):
    """Single block: ``offsets`` = exclusive prefix of ``counts`` (``offsets[E]`` the total)."""
    sh = cuda.shared.array(0, int64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    per = (E + nt - 1) // nt
    lo = min(E, tid * per)
    hi = min(E, lo + per)
    s = int64(0)
    for i in range(lo, hi):
        s += counts[i]
    excl, total = _block_excl_scan(sh, tid, nt, s)
    for i in range(lo, hi):
        offsets[i] = excl
        excl += counts[i]
    if tid == 0:
        offsets[E] = total


@cuda.jit
def _ms_scatter(keys, E, tile, ntiles, rounds, lanes, offsets, base, order, pos, write_pos):
    sh = cuda.shared.array(0, int32)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    groups = nt // lanes
    g = tid // lanes
    lane = tid - g * lanes
    m = keys.shape[0]
    cbase = g * E                     # this group's cursors: sh[cbase + e]
    kbase = groups * E + g * lanes    # this group's round keys: sh[kbase + lane]
    for tl in range(cuda.blockIdx.x, ntiles, cuda.gridDim.x):
        t0 = tl * tile
        hi = min(m, t0 + tile)
        for i in range(tid, groups * E, nt):
            sh[i] = 0
        cuda.syncthreads()
        sub0 = t0 + g * lanes * rounds
        for r in range(rounds):
            i = sub0 + r * lanes + lane
            if i < hi:
                cuda.atomic.add(sh, cbase + keys[i], 1)
        cuda.syncthreads()
        for e in range(tid, E, nt):   # exclusive prefix over groups, per expert
            run = 0
            for gg in range(groups):
                c = sh[gg * E + e]
                sh[gg * E + e] = run
                run += c
        cuda.syncthreads()
        for r in range(rounds):
            i = sub0 + r * lanes + lane
            key = -1
            if i < hi:
                key = int32(keys[i])
            sh[kbase + lane] = key
            cuda.syncthreads()
            rank = 0
            last = True
            for j in range(lanes):
                if sh[kbase + j] == key:
                    if j < lane:
                        rank += 1
                    elif j > lane:
                        last = False
            if key >= 0:
                p = offsets[key] + base[key * ntiles + tl] + sh[cbase + key] + rank
                order[p] = i
                if write_pos:
                    pos[i] = p
            cuda.syncthreads()
            if key >= 0 and last:
                sh[cbase + key] += rank + 1
            cuda.syncthreads()


@cuda.jit
def _cap_position(order, offsets, cap, dropped):
    E = offsets.shape[0] - 1
    for e in range(cuda.blockIdx.x, E, cuda.gridDim.x):
        lo = offsets[e] + cap
        for r in range(lo + cuda.threadIdx.x, offsets[e + 1], cuda.blockDim.x):
            dropped[order[r]] = True


@cuda.jit
def _cap_slot(order, offsets, k, cap, dropped):
    """GShard priority: per-slot counts of the segment, then the boundary slot in token order."""
    sh = cuda.shared.array(0, int64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    per_slot = sh[0:k]
    scan = sh[k:k + nt]
    var = sh[k + nt:k + nt + 4]
    E = offsets.shape[0] - 1
    for e in range(cuda.blockIdx.x, E, cuda.gridDim.x):
        lo = offsets[e]
        hi = offsets[e + 1]
        if hi - lo <= cap:
            continue
        for j in range(tid, k, nt):
            per_slot[j] = 0
        cuda.syncthreads()
        for r in range(lo + tid, hi, nt):
            cuda.atomic.add(per_slot, order[r] % k, 1)
        cuda.syncthreads()
        if tid == 0:
            jstar = k
            quota = 0
            cum = 0
            for j in range(k):
                if cum + per_slot[j] > cap:
                    jstar = j
                    quota = cap - cum
                    break
                cum += per_slot[j]
            var[0] = jstar
            var[1] = quota
        cuda.syncthreads()
        jstar = var[0]
        quota = var[1]
        run = int64(0)
        for b0 in range(lo, hi, nt):
            r = b0 + tid
            j = -1
            i = 0
            if r < hi:
                i = order[r]
                j = i % k
            excl, tot = _block_excl_scan(scan, tid, nt, 1 if j == jstar else 0)
            if r < hi:
                if j > jstar or (j == jstar and run + excl >= quota):
                    dropped[i] = True
            run += tot
        cuda.syncthreads()


@cuda.jit
def _score_values(w, out):
    """float64 weights with -0.0 turned into +0.0 (equal weights must give equal keys)."""
    for i in range(cuda.grid(1), w.shape[0], cuda.gridsize(1)):
        out[i] = float64(w[i]) + 0.0


@cuda.jit(device=True)
def _okey(bits):
    """Order-preserving int64 key of float64 bits (larger float -> larger key)."""
    if bits < 0:
        return bits ^ int64(0x7FFFFFFFFFFFFFFF)
    return bits


@cuda.jit
def _cap_score(order, offsets, cap, bits, dropped):
    """Keep the ``cap`` largest weights per segment (radix select, ties to lower flat id)."""
    sh = cuda.shared.array(0, int64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    hist = sh[0:256]
    scan = sh[256:256 + nt]
    var = sh[256 + nt:256 + nt + 4]
    E = offsets.shape[0] - 1
    for e in range(cuda.blockIdx.x, E, cuda.gridDim.x):
        lo = offsets[e]
        hi = offsets[e + 1]
        if hi - lo <= cap:
            continue
        prefix = int64(0)
        remaining = int64(cap)
        for p in range(8):
            shift = 56 - 8 * p
            for d in range(tid, 256, nt):
                hist[d] = 0
            cuda.syncthreads()
            for r in range(lo + tid, hi, nt):
                kk = _okey(bits[order[r]])
                if p == 0 or (kk >> (shift + 8)) == (prefix >> (shift + 8)):
                    d = (kk >> shift) & 255
                    if p == 0:
                        d = d ^ 128
                    cuda.atomic.add(hist, d, 1)
            cuda.syncthreads()
            if tid == 0:
                rem = remaining
                d = 255
                while d > 0 and hist[d] < rem:
                    rem -= hist[d]
                    d -= 1
                var[0] = d
                var[1] = rem
            cuda.syncthreads()
            d = var[0]
            remaining = var[1]
            if p == 0:
                d = d ^ 128
            prefix = prefix | (int64(d) << shift)
            cuda.syncthreads()
        run = int64(0)
        for b0 in range(lo, hi, nt):
            r = b0 + tid
            kk = int64(0)
            i = 0
            flag = 0
            if r < hi:
                i = order[r]
                kk = _okey(bits[i])
                if kk == prefix:
                    flag = 1
            excl, tot = _block_excl_scan(scan, tid, nt, flag)
            if r < hi:
                if kk < prefix or (kk == prefix and run + excl >= remaining):
                    dropped[i] = True
            run += tot
        cuda.syncthreads()


@cuda.jit
def _cap_offsets(offsets, cap, new_offsets, counts):
    E = offsets.shape[0] - 1
    if cuda.grid(1) == 0:
        run = int64(0)
        for e in range(E):
            c = min(offsets[e + 1] - offsets[e], cap)
            new_offsets[e] = run
            counts[e] = c
            run += c
        new_offsets[E] = run


@cuda.jit
def _cap_compact(order, offsets, dropped, new_offsets, new_order):
    sh = cuda.shared.array(0, int64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    E = offsets.shape[0] - 1
    for e in range(cuda.blockIdx.x, E, cuda.gridDim.x):
        lo = offsets[e]
        hi = offsets[e + 1]
        dst = new_offsets[e]
        run = int64(0)
        for b0 in range(lo, hi, nt):
            r = b0 + tid
            keep = 0
            i = 0
            if r < hi:
                i = order[r]
                if not dropped[i]:
                    keep = 1
            excl, tot = _block_excl_scan(sh, tid, nt, keep)
            if keep:
                new_order[dst + run + excl] = i
            run += tot
        cuda.syncthreads()


@cuda.jit
def _permute_kernel(x, order, k, xs):
    n = xs.shape[0]
    H = xs.shape[1]
    tid = cuda.threadIdx.x
    bs = cuda.blockDim.x
    for i in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        src = x[order[i] // k]
        dst = xs[i]
        h = tid
        while h + 3 * bs < H:
            a0 = src[h]
            a1 = src[h + bs]
            a2 = src[h + 2 * bs]
            a3 = src[h + 3 * bs]
            dst[h] = a0
            dst[h + bs] = a1
            dst[h + 2 * bs] = a2
            dst[h + 3 * bs] = a3
            h += 4 * bs
        while h < H:
            dst[h] = src[h]
            h += bs


@cuda.jit
def _inverse_kernel(order, pos):
    for i in range(cuda.grid(1), order.shape[0], cuda.gridsize(1)):
        pos[order[i]] = i


@cuda.jit
def _inverse_check_kernel(order, pos, dropped, bad):
    c = 0
    for i in range(cuda.grid(1), order.shape[0], cuda.gridsize(1)):
        a = order[i]
        if pos[a] != i or dropped[a]:
            c += 1
    if c:
        cuda.atomic.add(bad, 0, c)


@functools.lru_cache(maxsize=None)
def _combine_kernel(dtype, weighted, ys_dtype):
    """``out[t] = sum_j w[t, j] * ys[pos[t*k + j]]``; accumulator in ``dtype``'s
    compute dtype (float32 for 16-bit ``ys``/``out``, passed as bits; ``w`` is in
    the compute dtype). ``ys_dtype`` is ``dtype`` or, for a 16-bit ``out``, float32.

    ``weighted=False``: the rows already carry their weights (plain sum).
    """
    ft = float64 if dtype == "float64" else float32
    zero = ft(0)
    ld = _narrow.loader(_narrow.kind_of(np.dtype(ys_dtype)))
    st = _narrow.storer(_narrow.kind_of(np.dtype(dtype)), ft)

    @cuda.jit
    def kern(ys, pos, w, k, out):
        T = out.shape[0]
        H = out.shape[1]
        tid = cuda.threadIdx.x
        bs = cuda.blockDim.x
        for t in range(cuda.blockIdx.x, T, cuda.gridDim.x):
            dst = out[t]
            h = tid
            while h + bs < H:
                a0 = zero
                a1 = zero
                for j in range(k):
                    p = pos[t * k + j]
                    if p >= 0:
                        src = ys[p]
                        if weighted:
                            wj = w[t, j]
                            a0 += wj * ld(src[h])
                            a1 += wj * ld(src[h + bs])
                        else:
                            a0 += ld(src[h])
                            a1 += ld(src[h + bs])
                dst[h] = st(a0)
                dst[h + bs] = st(a1)
                h += 2 * bs
            while h < H:
                a0 = zero
                for j in range(k):
                    p = pos[t * k + j]
                    if p >= 0:
                        if weighted:
                            a0 += w[t, j] * ld(ys[p, h])
                        else:
                            a0 += ld(ys[p, h])
                dst[h] = st(a0)
                h += bs

    return kern


# ------------------------------------------------------------------ backward
# Device twins of :func:`numoe.permute_backward` and
# :func:`numoe.unpermute_backward`. No atomics: ``permute_backward`` is the
# combine above with unit weights (each token sums its kept slots in slot
# order); ``unpermute_backward`` writes each kept slot's row once and takes
# each ``d_weights[t, j]`` as one thread's float64 dot product in ascending
# ``h`` (the order of the CPU kernel).
def permute_backward(d_xs, plan):
    """Device twin of :func:`numoe.permute_backward`."""
    order, _off, _cnt, dropped, T, k = check_plan(plan)
    g = A.float_arg("d_xs", d_xs, ndim=2)
    if g.shape[0] != order.shape[0]:
        raise ValueError(f"d_xs must have N = {order.shape[0]} rows (len(plan.order)), "
                         f"got shape {tuple(g.shape)}")
    out = A.empty((T, g.shape[1]), g.dtype)
    pos = inverse_positions(order, dropped, check=True)
    combine(g, pos, A.dummy(A.compute_dtype(g.dtype), ndim=2), k, out, weighted=False)
    return out


def unpermute_backward(d_y, ys, plan, weights):
    """Device twin of :func:`numoe.unpermute_backward`."""
    order, _off, _cnt, dropped, T, k = check_plan(plan)
    ys = A.float_arg("ys", ys, ndim=2)
    if ys.shape[0] != order.shape[0]:
        raise ValueError(f"ys must have N = {order.shape[0]} rows (len(plan.order)), "
                         f"got shape {tuple(ys.shape)}")
    H = ys.shape[1]
    ct = A.compute_dtype(ys.dtype)
    g = A.float_arg("d_y", d_y, ndim=2)
    A.check_shape("d_y", g, (T, H))
    g = A.astype(A.compute(g), ct)
    wd = A.float_arg("weights", weights, ndim=2)
    A.check_shape("weights", wd, (T, k))
    w_dt = wd.dtype
    w = A.astype(A.compute(wd), ct)
    Checks().finite("d_y", g).finite("weights", w).run()
    pos = inverse_positions(order, dropped, check=True)
    n = order.shape[0]
    d_ys = A.empty((n, H), ys.dtype)
    d_w = A.empty((T, k), np.float64)
    if n and H:
        bs = A.block(_row_block(H))
        kern = _unpermute_backward_rows(str(ys.dtype))
        launch(kern, A.grid(T * bs, bs, 16), bs, 0, g, pos, w, k, A.bits(d_ys))
    if T:
        bs = A.block(128)
        kern = _unpermute_backward_dots(str(ys.dtype))
        launch(kern, A.grid(T * k, bs, 8), bs, 0, g, A.bits(ys), pos, k, d_w)
    return d_ys, A.astype(d_w, w_dt)


@functools.lru_cache(maxsize=None)
def _unpermute_backward_rows(dtype):
    """``d_ys[pos[t*k + j]] = w[t, j] * d_y[t]`` for the kept slots (one block per token);
    ``d_y``/``w`` in the compute dtype, ``d_ys`` stored as ``dtype`` (16-bit as bits)."""
    ft = float64 if dtype == "float64" else float32
    st = _narrow.storer(_narrow.kind_of(np.dtype(dtype)), ft)

    @cuda.jit
    def kern(d_y, pos, w, k, d_ys):
        T = d_y.shape[0]
        H = d_y.shape[1]
        for t in range(cuda.blockIdx.x, T, cuda.gridDim.x):
            for j in range(k):
                p = pos[t * k + j]
                if p >= 0:
                    wj = w[t, j]
                    for h in range(cuda.threadIdx.x, H, cuda.blockDim.x):
                        d_ys[p, h] = st(wj * d_y[t, h])

    return kern


@functools.lru_cache(maxsize=None)
def _unpermute_backward_dots(dtype):
    """``d_w[t, j] = d_y[t] . ys[pos[t*k + j]]`` (float64, ascending h; 0 where dropped)."""
    ld = _narrow.loader(_narrow.kind_of(np.dtype(dtype)))

    @cuda.jit
    def kern(d_y, ys, pos, k, d_w):
        H = d_y.shape[1]
        m = d_w.shape[0] * k
        for i in range(cuda.grid(1), m, cuda.gridsize(1)):
            t = i // k
            j = i - t * k
            p = pos[i]
            acc = 0.0
            if p >= 0:
                for h in range(H):
                    acc += float64(d_y[t, h]) * float64(ld(ys[p, h]))
            d_w[t, j] = acc

    return kern
