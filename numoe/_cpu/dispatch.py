"""CPU kernels for :mod:`numoe.dispatch`: counting-sort dispatch, permute, unpermute.

Everything here trusts its arguments: the public wrappers in
:mod:`numoe.dispatch` have validated shapes, dtypes and index ranges and
hand over C-contiguous arrays. Nothing here raises.

Determinism: every parallel loop either writes only what its iteration
owns (a chunk's histogram row and its own output slots, an expert's own
segment, a token's own output row) or is an integer reduction, so results
are bit-identical for any number of threads.

Speed: permute and unpermute move whole rows and are bound by memory
traffic. Small inputs run serial twins of the drivers (no task start-up);
permute outputs of ``STREAM_MIN_BYTES`` and more are written with
non-temporal vector stores (no read-for-ownership of the destination)
while the next source row is prefetched. Every variant computes the same
bits.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .._jit import driver, kernel
from ._narrow import f32_to_bf16, f32_to_f16, widen

# Drop-policy codes shared with the public wrapper.
POLICY_SLOT = 0
POLICY_POSITION = 1
POLICY_SCORE = 2

# Chunking of the counting sort. The result never depends on the chunking
# (the sort is stable); these only bound the work per task and the size of
# the (chunks x experts) histogram. Independent of the thread count.
CHUNK = 4096
MAX_HIST_CELLS = 1 << 22
# Below this many output elements permute/unpermute run serially (same bits).
PARALLEL_MIN_ELEMENTS = 1 << 16
# From this many output bytes on, permute writes with non-temporal
# (streaming) stores: the output is far larger than the caches, so skipping
# the read-for-ownership of each destination line saves a third of the
# memory traffic. Smaller outputs stay in cache for the next op. Same bits.
STREAM_MIN_BYTES = 32 << 20
ROWS_PER_TASK = 16          # rows per streaming task (one store fence each)
NARROW_ROWS_PER_TASK = 16   # tokens per 16-bit unpermute task (one float32 scratch row)


def chunk_size(m, num_experts):
    """Assignments per chunk for ``m`` assignments and ``num_experts`` experts.

    At least :data:`CHUNK`; larger when needed to keep the histogram under
    ``MAX_HIST_CELLS`` cells (many experts). Depends on sizes only.
    """
    max_chunks = max(1, MAX_HIST_CELLS // max(num_experts, 1))
    return max(CHUNK, -(-m // max_chunks))


# ------------------------------------------------------ streaming-store helpers
@intrinsic
def _stream32(typingctx, dst, di, src, si):
    """Copy the 32 bytes at ``src[si:]`` to ``dst[di:]`` with one non-temporal
    vector store. ``dst[di]`` must be 32-byte aligned; ``src`` may be unaligned."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array)
            and dst.dtype == src.dtype
            and dst.dtype in (types.float32, types.float64, types.uint16)):
        return None
    sig = types.void(dst, di, src, si)

    def codegen(context, builder, signature, args):
        dty, dity, sty, sity = signature.args
        darr = context.make_array(dty)(context, builder, args[0])
        sarr = context.make_array(sty)(context, builder, args[2])
        di_ = context.cast(builder, args[1], dity, types.intp)
        si_ = context.cast(builder, args[3], sity, types.intp)
        elt = context.get_data_type(dty.dtype)
        size = context.get_abi_sizeof(elt)
        vec = ir.VectorType(elt, 32 // size)
        sptr = builder.bitcast(builder.gep(sarr.data, [si_]), vec.as_pointer())
        dptr = builder.bitcast(builder.gep(darr.data, [di_]), vec.as_pointer())
        value = builder.load(sptr, align=size)
        store = builder.store(value, dptr, align=32)
        store.set_metadata("nontemporal",
                           builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _store_fence(typingctx):
    """A full memory fence: orders the weakly-ordered streaming stores before
    anything this thread does next (x86: ``mfence``)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the cache to fetch the line holding ``arr[idx]`` (never faults)."""
    if not isinstance(arr, types.Array):
        return None
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aty, ity = signature.args
        a = context.make_array(aty)(context, builder, args[0])
        i = context.cast(builder, args[1], ity, types.intp)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        ptr = builder.bitcast(builder.gep(a.data, [i]), i8p)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch")
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])   # read, keep, data cache
        return context.get_dummy_value()

    return sig, codegen


@kernel
def _stream_row(src, dst, nxt):
    """``dst[:] = src`` with streaming stores (scalar head/tail up to 32-byte
    alignment), prefetching the row ``nxt`` (same length) to copy next."""
    n = dst.shape[0]
    size = dst.itemsize
    vec = 32 // size
    head = ((32 - dst.ctypes.data % 32) % 32) // size
    if head > n:
        head = n
    for h in range(head):
        dst[h] = src[h]
    h = head
    while h + 2 * vec <= n:             # one 64-byte line per step
        _prefetch(nxt, h)
        _stream32(dst, h, src, h)
        _stream32(dst, h + vec, src, h + vec)
        h += 2 * vec
    while h + vec <= n:
        _stream32(dst, h, src, h)
        h += vec
    for r in range(h, n):
        dst[r] = src[r]


# ------------------------------------------------------------- serial kernels
@kernel
def _chunk_histogram(ex, lo, hi, row):
    """``row[e]`` += number of ``ex[lo:hi]`` equal to ``e``."""
    for i in range(lo, hi):
        row[ex[i]] += 1


@kernel
def _chunk_starts(hist, offsets):
    """Exclusive prefix over (expert, chunk), in place; fills ``offsets [E+1]``.

    Afterwards ``hist[c, e]`` is the first slot of ``order`` that chunk ``c``
    writes for expert ``e``.
    """
    nch, num_experts = hist.shape
    run = 0
    for e in range(num_experts):
        offsets[e] = run
        for c in range(nch):
            h = hist[c, e]
            hist[c, e] = run
            run += h
    offsets[num_experts] = run


@kernel
def _chunk_scatter(ex, lo, hi, cursor, order):
    """Write flat ids ``lo..hi-1`` to their slots; ``cursor`` is this chunk's row."""
    for i in range(lo, hi):
        e = ex[i]
        order[cursor[e]] = i
        cursor[e] += 1


@kernel
def _drop_slot(order, lo, hi, k, cap, dropped):
    """Keep the first ``cap`` of one expert's segment by (slot, token)."""
    per_slot = np.zeros(k, np.int64)
    for r in range(lo, hi):
        per_slot[order[r] % k] += 1
    jstar = k
    quota = 0
    cum = 0
    for j in range(k):
        if cum + per_slot[j] > cap:
            jstar = j
            quota = cap - cum
            break
        cum += per_slot[j]
    taken = 0
    for r in range(lo, hi):
        i = order[r]
        j = i % k
        if j > jstar:
            dropped[i] = True
        elif j == jstar:
            if taken >= quota:
                dropped[i] = True
            taken += 1


@kernel
def _drop_score(order, lo, hi, cap, w, dropped):
    """Keep the ``cap`` highest weights of one expert's segment (ties: lower flat id).

    Linear time: find the ``cap``-th largest weight, keep everything above
    it, and of the entries equal to it the first ones in segment order (the
    segment is in ascending flat id).
    """
    n = hi - lo
    key = np.empty(n, np.float64)
    for r in range(n):
        key[r] = -np.float64(w[order[lo + r]])
    cut = np.partition(key, cap - 1)[cap - 1]
    quota = cap
    for r in range(n):
        if key[r] < cut:
            quota -= 1
    for r in range(n):
        if key[r] > cut:
            dropped[order[lo + r]] = True
        elif key[r] == cut:
            if quota <= 0:
                dropped[order[lo + r]] = True
            quota -= 1


@kernel
def _combine_row(ys, pos, wt, base, k, zero, row):
    """``row = ((0 + w0*y0) + w1*y1) + ...`` over the kept slots of one token.

    The first kept slot writes ``zero + w*y`` (the same bits as zero-filling
    then adding, without the extra pass); no kept slot leaves zeros.
    """
    width = row.shape[0]
    first = True
    for j in range(k):
        p = pos[base + j]
        if p >= 0:
            wj = wt[j]
            src = ys[p]
            if first:
                for h in range(width):
                    row[h] = zero + wj * src[h]
                first = False
            else:
                for h in range(width):
                    row[h] += wj * src[h]
    if first:
        for h in range(width):
            row[h] = zero


@kernel
def _row_copy(src, dst):
    """``dst[:] = src``."""
    for h in range(src.shape[0]):
        dst[h] = src[h]


# Per-item kernels that the drivers below loop over.
@kernel
def _cap_expert(e, order, offsets, k, cap, policy, w, dropped, counts):
    """Trim expert ``e``'s segment to ``cap`` by the policy; ``counts[e]`` = kept."""
    lo = offsets[e]
    hi = offsets[e + 1]
    if hi - lo <= cap:
        counts[e] = hi - lo
        return
    counts[e] = cap
    if policy == 0:
        _drop_slot(order, lo, hi, k, cap, dropped)
    elif policy == 1:
        for r in range(lo + cap, hi):
            dropped[order[r]] = True
    else:
        _drop_score(order, lo, hi, cap, w, dropped)


@kernel
def _compact_expert(e, order, offsets, dropped, new_offsets, new_order):
    """Copy the kept ids of expert ``e``'s segment, in order, to its new slots."""
    dst = new_offsets[e]
    for r in range(offsets[e], offsets[e + 1]):
        i = order[r]
        if not dropped[i]:
            new_order[dst] = i
            dst += 1


# ------------------------------------------------------------ parallel drivers
# Each has a serial twin (``*_serial``, same per-item kernels, same bits) that
# the host helpers use for small inputs, where starting the thread pool's
# tasks costs more than the work.
@driver
def _counting_sort(ex, num_experts, chunk, order, offsets):
    """Stable sort of flat ids ``0..M-1`` by ``ex``; fills ``order [M]`` and ``offsets [E+1]``."""
    m = ex.shape[0]
    nch = (m + chunk - 1) // chunk
    hist = np.zeros((nch, num_experts), np.int64)
    for c in prange(nch):
        _chunk_histogram(ex, c * chunk, min(c * chunk + chunk, m), hist[c])
    _chunk_starts(hist, offsets)
    for c in prange(nch):
        _chunk_scatter(ex, c * chunk, min(c * chunk + chunk, m), hist[c], order)


@kernel
def _counting_sort_serial(ex, num_experts, order, offsets):
    """:func:`_counting_sort` with a single chunk."""
    m = ex.shape[0]
    hist = np.zeros((1, num_experts), np.int64)
    _chunk_histogram(ex, 0, m, hist[0])
    _chunk_starts(hist, offsets)
    _chunk_scatter(ex, 0, m, hist[0], order)


@driver
def _apply_capacity(order, offsets, k, cap, policy, w, dropped, counts):
    """Mark assignments beyond ``cap`` per expert in ``dropped [M]``; ``counts`` = kept.

    ``order``/``offsets`` are the dropless sort. Each expert owns its segment.
    """
    for e in prange(offsets.shape[0] - 1):
        _cap_expert(e, order, offsets, k, cap, policy, w, dropped, counts)


@kernel
def _apply_capacity_serial(order, offsets, k, cap, policy, w, dropped, counts):
    for e in range(offsets.shape[0] - 1):
        _cap_expert(e, order, offsets, k, cap, policy, w, dropped, counts)


@driver
def _compact(order, offsets, dropped, new_offsets, new_order):
    """Copy the kept ids of each expert's segment, in order, to ``new_order``."""
    for e in prange(offsets.shape[0] - 1):
        _compact_expert(e, order, offsets, dropped, new_offsets, new_order)


@kernel
def _compact_serial(order, offsets, dropped, new_offsets, new_order):
    for e in range(offsets.shape[0] - 1):
        _compact_expert(e, order, offsets, dropped, new_offsets, new_order)


@driver
def _permute(x, order, k, xs):
    """``xs[i] = x[order[i] // k]``; parallel over output rows."""
    for i in prange(order.shape[0]):
        _row_copy(x[order[i] // k], xs[i])


@driver
def _permute_stream(x, order, k, xs, rows):
    """:func:`_permute` with streaming stores; tasks of ``rows`` rows, fenced."""
    n = order.shape[0]
    for b in prange((n + rows - 1) // rows):
        for i in range(b * rows, min(n, b * rows + rows)):
            nxt = min(np.int64(i) + 1, n - 1)
            _stream_row(x[order[i] // k], xs[i], x[order[nxt] // k])
        _store_fence()


@kernel
def _permute_serial(x, order, k, xs):
    for i in range(order.shape[0]):
        _row_copy(x[order[i] // k], xs[i])


@driver
def _inverse_positions(order, dropped, pos):
    """``pos[order[n]] = n`` (``pos`` pre-filled with -1); returns the number of
    entries of ``order`` that repeat an id or point at a dropped slot (0 for a
    valid plan; the wrapper raises otherwise). For a valid plan every write
    goes to a distinct slot; for a bad one the count is still exact."""
    n = order.shape[0]
    for i in prange(n):
        pos[order[i]] = i
    bad = 0
    for i in prange(n):
        a = order[i]
        if pos[a] != i or dropped[a]:
            bad += 1
    return bad


@kernel
def _inverse_positions_serial(order, dropped, pos):
    n = order.shape[0]
    for i in range(n):
        pos[order[i]] = i
    bad = 0
    for i in range(n):
        a = order[i]
        if pos[a] != i or dropped[a]:
            bad += 1
    return bad


@driver
def _unpermute(ys, pos, w, k, zero, out):
    """``out[t] = sum_j w[t, j] * ys[pos[t*k + j]]`` over kept slots, j ascending.

    Accumulates in ``out``'s dtype (``w`` and ``zero`` already have it);
    parallel over tokens, each task owns one output row.
    """
    for t in prange(out.shape[0]):
        _combine_row(ys, pos, w[t], t * k, k, zero, out[t])


@kernel
def _unpermute_serial(ys, pos, w, k, zero, out):
    for t in range(out.shape[0]):
        _combine_row(ys, pos, w[t], t * k, k, zero, out[t])


# 16-bit ys/out (uint16 bits; ``kind`` 1 bfloat16, 2 float16, as in ``_narrow``):
# each token's row is summed in a float32 scratch row, in the same order as
# ``_combine_row``, and rounded once (nearest even) into the output bits.
@kernel
def _combine_row_narrow(ys, pos, wt, base, k, kind, acc, row):
    """``row = narrow(((0 + w0*y0) + w1*y1) + ...)``, float32 sum, one rounding."""
    width = row.shape[0]
    first = True
    for j in range(k):
        p = pos[base + j]
        if p >= 0:
            wj = wt[j]
            src = ys[p]
            if first:
                for h in range(width):
                    acc[h] = np.float32(0.0) + wj * widen(src[h], kind)
                first = False
            else:
                for h in range(width):
                    acc[h] += wj * widen(src[h], kind)
    if first:
        for h in range(width):
            row[h] = 0                  # +0.0 in both 16-bit formats
    elif kind == 2:
        for h in range(width):
            row[h] = f32_to_f16(acc[h])
    else:
        for h in range(width):
            row[h] = f32_to_bf16(acc[h])


@driver
def _unpermute_narrow(ys, pos, w, k, kind, rows, out):
    """:func:`_unpermute` for 16-bit ``ys``/``out`` (float32 ``w``); tasks of
    ``rows`` tokens share one float32 scratch row (any ``rows``: same bits)."""
    T, H = out.shape
    for b in prange((T + rows - 1) // rows):
        acc = np.empty(H, np.float32)
        for t in range(b * rows, min(T, b * rows + rows)):
            _combine_row_narrow(ys, pos, w[t], t * k, k, kind, acc, out[t])


@kernel
def _unpermute_narrow_serial(ys, pos, w, k, kind, out):
    acc = np.empty(out.shape[1], np.float32)
    for t in range(out.shape[0]):
        _combine_row_narrow(ys, pos, w[t], t * k, k, kind, acc, out[t])


# -------------------------------------------------------------- host helpers
def dispatch_plan(ex, num_experts, k, cap, policy, w, idx_dtype, *, chunk=None):
    """Build a plan from validated inputs.

    ``ex [M]`` int32/int64 flat expert ids in range; ``cap`` an int or None;
    ``policy`` a ``POLICY_*`` code; ``w [M]`` float (any float when unused).
    ``chunk`` overrides the chunk size (tests). Returns ``(order, offsets,
    counts, dropped_flat)``.
    """
    m = ex.shape[0]
    if chunk is None:
        chunk = chunk_size(m, num_experts)
    par = m > chunk
    order = np.empty(m, idx_dtype)
    offsets = np.empty(num_experts + 1, np.int64)
    if par:
        _counting_sort(ex, num_experts, chunk, order, offsets)
    else:
        _counting_sort_serial(ex, num_experts, order, offsets)
    counts = np.diff(offsets)
    dropped = np.zeros(m, np.bool_)
    if cap is None or m == 0 or int(counts.max()) <= cap:
        return order, offsets, counts, dropped
    kept = np.empty(num_experts, np.int64)
    (_apply_capacity if par else _apply_capacity_serial)(order, offsets, k, cap, policy, w,
                                                        dropped, kept)
    new_offsets = np.zeros(num_experts + 1, np.int64)
    np.cumsum(kept, out=new_offsets[1:])
    new_order = np.empty(int(new_offsets[-1]), idx_dtype)
    (_compact if par else _compact_serial)(order, offsets, dropped, new_offsets, new_order)
    return new_order, new_offsets, kept, dropped


def permute(x, order, k, xs, *, mode=None):
    """Fill ``xs [N, H]`` from ``x [T, H]`` (both C-contiguous, same float dtype).

    ``mode``: ``"serial"``, ``"parallel"`` or ``"stream"`` (None: by size).
    """
    mode = _mode(xs, xs.size, mode)
    if mode == "stream":
        _permute_stream(x, order, k, xs, ROWS_PER_TASK)
    else:
        (_permute if mode == "parallel" else _permute_serial)(x, order, k, xs)
    return xs


def _mode(out, elements, mode):
    """The driver for an output array: streaming stores only for large,
    element-aligned outputs; serial below ``PARALLEL_MIN_ELEMENTS``."""
    if mode is None:
        if out.nbytes >= STREAM_MIN_BYTES:
            mode = "stream"
        else:
            mode = "parallel" if elements > PARALLEL_MIN_ELEMENTS else "serial"
    if mode == "stream" and not out.flags.aligned:
        mode = "parallel"       # the vector stores need element-aligned rows
    return mode


def inverse_positions(order, dropped_flat, *, parallel=None):
    """``pos [M]`` int64 (``-1`` for dropped) and the number of inconsistent entries."""
    if parallel is None:
        parallel = order.shape[0] > CHUNK
    pos = np.full(dropped_flat.shape[0], -1, np.int64)
    bad = (_inverse_positions if parallel else _inverse_positions_serial)(
        order, dropped_flat, pos)
    return pos, int(bad)


def unpermute(ys, pos, w, k, out, *, mode=None):
    """Fill ``out [T, H]`` (C-contiguous, ys dtype); ``w [T, k]`` in out's dtype.

    ``mode``: ``"serial"`` or ``"parallel"`` (None: by size). No streaming
    variant: summing into a scratch row and streaming it out measured ~20%
    slower here than accumulating in the (cached) output row.
    """
    if mode is None:
        mode = "parallel" if ys.size + out.size > PARALLEL_MIN_ELEMENTS else "serial"
    (_unpermute if mode == "parallel" else _unpermute_serial)(
        ys, pos, w, k, out.dtype.type(0), out)
    return out


# ------------------------------------------------------------------ backward
@kernel
def _unpermute_backward_row(d_y, ys, pos, w, base, k, d_ys, d_w):
    """One token: ``d_ys[p] = w[j] * d_y`` and ``d_w[j] = d_y . ys[p]`` (float64 sum,
    fixed order) for each kept slot ``j`` (``p = pos[base + j]``); 0 where dropped."""
    H = d_y.shape[0]
    for j in range(k):
        p = pos[base + j]
        if p < 0:
            d_w[j] = 0.0
            continue
        wj = w[j]
        src = ys[p]
        dst = d_ys[p]
        acc = 0.0
        for h in range(H):
            dst[h] = wj * d_y[h]
            acc += np.float64(d_y[h]) * np.float64(src[h])
        d_w[j] = acc


@driver
def _unpermute_backward(d_y, ys, pos, w, k, d_ys, d_w):
    """:func:`_unpermute_backward_row` for every token (each owns its rows)."""
    for t in prange(d_y.shape[0]):
        _unpermute_backward_row(d_y[t], ys, pos, w[t], t * k, k, d_ys, d_w[t])


@kernel
def _unpermute_backward_serial(d_y, ys, pos, w, k, d_ys, d_w):
    for t in range(d_y.shape[0]):
        _unpermute_backward_row(d_y[t], ys, pos, w[t], t * k, k, d_ys, d_w[t])


def unpermute_backward(d_y, ys, pos, w, k, d_ys, d_w, *, mode=None):
    """Fill ``d_ys [N, H]`` (dtype of ``d_y``) and ``d_w [T, k]`` float64 from
    ``d_y [T, H]``, ``ys [N, H]``, ``w [T, k]`` (``d_y``'s dtype) and ``pos``."""
    if mode is None:
        mode = "parallel" if ys.size + d_y.size > PARALLEL_MIN_ELEMENTS else "serial"
    (_unpermute_backward if mode == "parallel" else _unpermute_backward_serial)(
        d_y, ys, pos, w, k, d_ys, d_w)
    return d_ys, d_w


def permute_backward(d_xs, pos, k, out, *, mode=None):
    """``out[t] = sum over kept slots j (ascending) of d_xs[pos[t*k + j]]``: the
    combine of :func:`unpermute` with unit weights (``1 * v`` is exact)."""
    ones = np.ones((out.shape[0], k), dtype=out.dtype)
    return unpermute(d_xs, pos, ones, k, out, mode=mode)


def unpermute_narrow(ys, pos, w, k, out, kind, *, mode=None):
    """:func:`unpermute` for 16-bit storage: ``ys [N, H]`` and ``out [T, H]`` as
    ``uint16`` bits of ``kind`` (1 bfloat16, 2 float16), ``w [T, k]`` float32.

    Accumulates in float32 and rounds each output element once.
    """
    if mode is None:
        mode = "parallel" if ys.size + out.size > PARALLEL_MIN_ELEMENTS else "serial"
    if mode == "parallel":
        _unpermute_narrow(ys, pos, w, k, kind, NARROW_ROWS_PER_TASK, out)
    else:
        _unpermute_narrow_serial(ys, pos, w, k, kind, out)
    return out
