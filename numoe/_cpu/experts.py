"""CPU expert FFNs: grouped GEMMs over expert blocks (driver and kernels).

Everything here trusts its arguments: :func:`numoe.expert_ffn` and
:class:`numoe.MoELayer` have validated shapes and dtypes and hand over
C-contiguous arrays. Nothing here raises on bad data.

How the work is split
---------------------
The FLOPs are in the expert GEMMs. One *job* is one grouped FFN: rows
``offsets[e]:offsets[e+1]`` (optionally gathered from ``x`` through a
dispatch plan's ``order``, which saves the permuted copy) through expert
``e``. A job is cut into *tasks* by rules that read the sizes only, never
the thread count:

* an expert block of at least ``SMALL_ROWS`` rows (``NARROW_SMALL_ROWS``
  for 16-bit or int8 weights widened for wider rows) is a BLAS task, in row
  blocks of at most ``rows_per_task`` rows: one product for gate and up
  together (pre-fused ``[H, 2F]`` weights) or two (separate weights), the
  activation in one pass, one product for down (+ bias);
* a smaller block (decoding) is a streaming task: a Numba loop that reads
  each weight row once, in order (BLAS packs the whole weight for a few
  rows, which triples the memory traffic); when a job has fewer than
  ``MIN_TASKS`` tasks, its streaming experts are also cut into column
  chunks (gate/up chunks, then down chunks) so that all threads read.

Weight storage
--------------
Expert weights reach the kernels as stored: float32/float64, ``uint16``
bits of bfloat16/float16, or int8 values with per-output-column float32
scales (:class:`ExpertWeights`, one storage-kind code per array). Streaming
tasks widen each weight element in registers (:mod:`numoe._cpu._narrow`):
one pass over the stored bytes, so a bf16 expert streams half the bytes of
a float32 one. BLAS tasks with narrow weights widen one column tile of at
most ``BLAS_TILE`` columns at a time into a per-thread float scratch and
call sgemm (or, for bf16 rows and weights on a CPU with AMX-BF16 tiles or
AVX512-BF16, :mod:`numoe._cpu.bf16gemm`, from ``BF16_SMALL_ROWS`` rows per
expert); never a float32 copy of the experts. Rows are
float32 (16-bit activations are widened once by the caller) or float64.

Batch-invariant mode (``Job.stream_all``): every block, whatever its rows,
is a streaming task (row blocks of ``STREAM_ROWS``), whose per-element
arithmetic is one fixed ``fma`` chain: a row's result is then the same in
any batch.

The tasks, largest estimated cost first, form a queue that
``numba.get_num_threads()`` threads drain through a shared counter (a
greedy longest-first schedule that also adapts when a core is busy with
something else), each with single-threaded BLAS. Jobs with BLAS tasks run
on Python threads (this one and a pool) calling NumPy's BLAS, which
releases the GIL: at 16-128 rows it is markedly faster than SciPy's, the
one Numba's ``np.dot`` calls (35 vs 23 and 59 vs 49 GFLOP/s per core at 16
and 64 rows, measured here). Jobs that only stream (decoding) run in the
Numba driver (one ``prange`` iteration per thread, an atomic counter).

Measured on this project's 2-core machine, two threads each running whole
experts with single-threaded BLAS beat one multi-threaded BLAS call per
expert (115 vs 107 GFLOP/s at 64 rows per expert); and OpenBLAS gives
different bits at 1 and 2 threads for most shapes (checked: 2048x2048
products of 8 to 512 rows), while a single-threaded call of a fixed shape
is reproducible. Every product here is such a call, or a fixed-order Numba
loop whose per-element arithmetic does not depend on the column range or
the other rows, and each task writes only its own rows/columns: results
are bit-identical for any thread count.
"""
from __future__ import annotations

import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import _dtypes as D
from .._jit import driver, kernel
from ._narrow import BF16, FLOAT, INT8, kind_of, widen, widen_cols

# Task rules. Results depend on these (and on the sizes), never on threads.
SMALL_ROWS = 48         # expert blocks with fewer rows stream their weights (measured,
                        # Zen 4, 2 threads, 2026-12-02: a layer with 7-21 rows per expert
                        # 22 -> 17 ms, neutral from 26 to 91 rows per expert)
NARROW_SMALL_ROWS = 256  # the same for 16-bit/int8 weights widened for wider rows (BLAS
                        # widens tiles first: streaming measured faster up to ~256 rows)
BF16_SMALL_ROWS = 4     # the same on the bf16 dot-product GEMM (bf16 rows and weights)
MIN_TASKS = 4           # below this many tasks, streaming experts split by columns
SPLIT_COLS = 256        # column chunks are multiples of this
TASK_FLOPS = 2.0e9      # target FLOPs of one BLAS task (bounds its row block)
MIN_TASK_ROWS = 64
MAX_TASK_ROWS = 512
MATMUL_ROWS = 256       # row block of the router-logits product
SERIAL_COST = 1.0e-4    # jobs estimated under this many seconds skip the threads
STREAM_ROWS = 64        # row block of a streaming task in batch-invariant mode
BLAS_TILE = 2048        # columns of a widened weight tile (narrow/int8 BLAS tasks)

# task kinds (literal in the kernels, which read no module globals)
BLAS, STREAM, SPLIT_GLU, SPLIT_DOWN = 0, 1, 2, 3


# ------------------------------------------------------------- serial kernels
@kernel
def _act(v, code, one, half, rs2, k1, k3):
    """Scalar activation in the dtype of ``v`` (constants passed in that dtype);
    codes index ``numoe.experts.ACTIVATIONS``."""
    if code == 0:                                   # silu
        return v / (one + math.exp(-v))
    if code == 1:                                   # gelu (erf)
        return half * v * (one + math.erf(v * rs2))
    if code == 2:                                   # gelu, tanh approximation
        return half * v * (one + math.tanh(k1 * (v + k3 * v * v * v)))
    return v if not v < 0 else one - one            # relu (NaN passes through)


@kernel
def glu_rows(a, ga, ua, uoff, glu, bg, bu, code, limit, alpha, h, h0, n):
    """``h[m, h0 + j] = act(a[m, ga + j] + bg[j]) * (ua[m, uoff + j] + bu[j])`` (GLU)
    or ``act(a[m, ga + j] + bg[j])`` (plain), for ``j < n``. Empty ``bg`` /
    ``bu`` mean no bias. ``code == 4`` is gpt-oss's clamped SwiGLU:
    ``g = min(g, limit)``, ``u = clip(u, -limit, limit)``,
    ``(u + 1) * g * sigmoid(alpha * g)``.

    The arithmetic runs in the dtype of ``h`` (float32 math is half the cost
    and a few ulp from the float64 oracle).
    """
    M = h.shape[0]
    T = h.dtype.type
    one, half = T(1.0), T(0.5)
    rs2, k1, k3 = T(0.7071067811865476), T(0.7978845608028654), T(0.044715)
    lim, alp = T(limit), T(alpha)
    hasg = bg.shape[0] > 0
    hasu = bu.shape[0] > 0
    for m in range(M):
        for j in range(n):
            g = T(a[m, ga + j])
            if hasg:
                g += bg[j]
            if not glu:
                h[m, h0 + j] = _act(g, code, one, half, rs2, k1, k3)
                continue
            u = T(ua[m, uoff + j])
            if hasu:
                u += bu[j]
            if code == 4:
                if g > lim:
                    g = lim
                if u > lim:
                    u = lim
                elif u < -lim:
                    u = -lim
                h[m, h0 + j] = (u + one) * g / (one + math.exp(-alp * g))
            else:
                h[m, h0 + j] = _act(g, code, one, half, rs2, k1, k3) * u


@kernel
def add_row_bias(out, b):
    """``out[m] += b`` for every row."""
    M, H = out.shape
    for m in range(M):
        for j in range(H):
            out[m, j] += b[j]


@kernel
def gather_rows(x, order, k, lo, hi, out):
    """``out[i - lo] = x[order[i] // k]`` for ``i`` in ``lo..hi-1``."""
    H = x.shape[1]
    for i in range(lo, hi):
        src = order[i] // k
        for j in range(H):
            out[i - lo, j] = x[src, j]


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (``llvm.fma``: one ``vfmadd`` per lane)."""
    if not (isinstance(a, types.Float) and a == b and b == c):
        return None

    def codegen(context, builder, signature, args):
        t = args[0].type
        name = "llvm.fma.f32" if t == ir.FloatType() else "llvm.fma.f64"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(t, [t, t, t]),
                                            name)
        return builder.call(fn, args)

    return a(a, a, a), codegen


@kernel
def stream_matmul(x, w, wkind, scale, c0, c1, acc, o0):
    """``acc[:, o0:o0+c1-c0] = x @ w[:, c0:c1]``, reading the weight rows once, in order.

    ``w`` is a float array or narrow storage of kind ``wkind`` (``uint16``
    bits of bfloat16/float16, or int8 values whose per-column ``scale``
    multiplies each finished column; ``scale`` is empty otherwise), widened
    in registers by :func:`numoe._cpu._narrow.widen`.

    Every output element is one chain of fused multiply-adds over the inner
    dimension in order, ``acc = fma(x[k], w[k, j], acc)`` (explicit
    ``llvm.fma``, no fastmath: the compiler may not reorder or contract it
    differently in different loops). One row streams whole weight rows
    (sequential reads); several rows work in column blocks of 512 that stay
    in L1, four rows of ``x`` at a time so that each loaded weight vector
    feeds several accumulators (the last ``M % 4`` rows, and a lone decode
    row, one at a time over eight weight rows). The per-element arithmetic is
    the same on every path, so a row's result depends neither on the other
    rows nor on the column range (the batch-invariant mode rests on this).
    """
    M, K = x.shape
    T = acc.dtype.type
    n = c1 - c0
    jb = max(n, 1) if M == 1 else 512
    for m in range(M):
        for j in range(n):
            acc[m, o0 + j] = T(0.0)
    M4 = M - M % 4
    k4 = K - K % 4
    for kk in range(0, k4 if M4 > 0 else 0, 4):       # rows four at a time
        for j0 in range(c0, c1, jb):
            j1 = min(c1, j0 + jb)
            w0 = w[kk, j0:j1]
            w1 = w[kk + 1, j0:j1]
            w2 = w[kk + 2, j0:j1]
            w3 = w[kk + 3, j0:j1]
            for m in range(0, M4, 4):
                a0, a1, a2, a3 = x[m, kk], x[m, kk + 1], x[m, kk + 2], x[m, kk + 3]
                b0, b1, b2, b3 = x[m + 1, kk], x[m + 1, kk + 1], x[m + 1, kk + 2], x[m + 1, kk + 3]
                q0, q1, q2, q3 = x[m + 2, kk], x[m + 2, kk + 1], x[m + 2, kk + 2], x[m + 2, kk + 3]
                d0, d1, d2, d3 = x[m + 3, kk], x[m + 3, kk + 1], x[m + 3, kk + 2], x[m + 3, kk + 3]
                am = acc[m, o0 + j0 - c0:o0 + j1 - c0]
                bm = acc[m + 1, o0 + j0 - c0:o0 + j1 - c0]
                cm = acc[m + 2, o0 + j0 - c0:o0 + j1 - c0]
                dm = acc[m + 3, o0 + j0 - c0:o0 + j1 - c0]
                for j in range(j1 - j0):
                    v0, v1 = T(widen(w0[j], wkind)), T(widen(w1[j], wkind))
                    v2, v3 = T(widen(w2[j], wkind)), T(widen(w3[j], wkind))
                    am[j] = fma(a3, v3, fma(a2, v2, fma(a1, v1, fma(a0, v0, am[j]))))
                    bm[j] = fma(b3, v3, fma(b2, v2, fma(b1, v1, fma(b0, v0, bm[j]))))
                    cm[j] = fma(q3, v3, fma(q2, v2, fma(q1, v1, fma(q0, v0, cm[j]))))
                    dm[j] = fma(d3, v3, fma(d2, v2, fma(d1, v1, fma(d0, v0, dm[j]))))
    for kk in range(k4 if M4 > 0 else K, K):
        wr = w[kk, c0:c1]
        for m in range(M4):
            a = x[m, kk]
            am = acc[m, o0:o0 + n]
            for j in range(n):
                am[j] = fma(a, T(widen(wr[j], wkind)), am[j])
    # the other rows one at a time, eight weight rows per step (fewer passes
    # over the accumulator: decode is one row); the same chain per element
    k8 = K - K % 8
    for kk in range(0, k8 if M > M4 else 0, 8):
        for j0 in range(c0, c1, jb):
            j1 = min(c1, j0 + jb)
            w0 = w[kk, j0:j1]
            w1 = w[kk + 1, j0:j1]
            w2 = w[kk + 2, j0:j1]
            w3 = w[kk + 3, j0:j1]
            w4 = w[kk + 4, j0:j1]
            w5 = w[kk + 5, j0:j1]
            w6 = w[kk + 6, j0:j1]
            w7 = w[kk + 7, j0:j1]
            for m in range(M4, M):
                a0, a1, a2, a3 = x[m, kk], x[m, kk + 1], x[m, kk + 2], x[m, kk + 3]
                a4, a5, a6, a7 = x[m, kk + 4], x[m, kk + 5], x[m, kk + 6], x[m, kk + 7]
                am = acc[m, o0 + j0 - c0:o0 + j1 - c0]
                for j in range(j1 - j0):
                    v0, v1 = T(widen(w0[j], wkind)), T(widen(w1[j], wkind))
                    v2, v3 = T(widen(w2[j], wkind)), T(widen(w3[j], wkind))
                    v4, v5 = T(widen(w4[j], wkind)), T(widen(w5[j], wkind))
                    v6, v7 = T(widen(w6[j], wkind)), T(widen(w7[j], wkind))
                    r = fma(a3, v3, fma(a2, v2, fma(a1, v1, fma(a0, v0, am[j]))))
                    am[j] = fma(a7, v7, fma(a6, v6, fma(a5, v5, fma(a4, v4, r))))
    for kk in range(k8 if M > M4 else K, K):
        wr = w[kk, c0:c1]
        for m in range(M4, M):
            a = x[m, kk]
            am = acc[m, o0:o0 + n]
            for j in range(n):
                am[j] = fma(a, T(widen(wr[j], wkind)), am[j])
    if scale.shape[0] > 0:
        sc = scale[c0:c1]
        for m in range(M):
            am = acc[m, o0:o0 + n]
            for j in range(n):
                am[j] *= sc[j]


@kernel
def stream_glu(x, ew, e, fused, glu, F, c0, c1, code, limit, alpha, h):
    """Columns ``c0:c1`` of the activated hidden layer ``h`` for a few rows ``x``
    through expert ``e`` of the weights ``ew`` (:class:`ExpertWeights`).

    ``ew.w1[e]`` is the fused ``[H, 2F]`` gate|up matrix (``fused``) or the
    ``[H, F]`` gate; ``ew.wu[e]`` the ``[H, F]`` up matrix when not fused. A
    fused full-width call streams each weight row once for gate and up.
    Biases are full ``[F]`` rows (or empty).
    """
    M = x.shape[0]
    n = c1 - c0
    bg = ew.bg[e]
    bu = ew.bu[e]
    bgc = bg[c0:c1] if bg.shape[0] > 0 else bg
    buc = bu[c0:c1] if bu.shape[0] > 0 else bu
    whole = fused and c0 == 0 and c1 == F          # one pass over [gate | up] rows
    parts = 1 if whole or not glu else 2
    acc = np.empty((M, 2 * n if glu else n), dtype=h.dtype)
    for part in range(parts):
        lo = c0 + (F if part == 1 and fused else 0)
        hi = lo + (2 * n if whole else n)
        if part == 1 and not fused:
            stream_matmul(x, ew.wu[e], ew.ku, ew.su[e], lo, hi, acc, part * n)
        else:
            stream_matmul(x, ew.w1[e], ew.k1, ew.s1[e], lo, hi, acc, part * n)
    glu_rows(acc, 0, acc, n, glu, bgc, buc, code, limit, alpha, h, c0, n)


@kernel
def stream_down(h, ew, e, c0, c1, out):
    """``out[:, c0:c1] = h @ wd[e][:, c0:c1] + bd[e][c0:c1]`` for a few rows."""
    M = h.shape[0]
    n = c1 - c0
    acc = np.empty((M, n), dtype=out.dtype)
    stream_matmul(h, ew.wd[e], ew.kd, ew.sd[e], c0, c1, acc, 0)
    bd = ew.bd[e]
    hasb = bd.shape[0] > 0
    for m in range(M):
        for j in range(n):
            v = acc[m, j]
            if hasb:
                v += bd[c0 + j]
            out[m, c0 + j] = v


@kernel
def _rows(src, order, k, gather, a, b, out):
    """Rows ``a:b`` of a job's input: a view, or a copy gathered through ``order``."""
    if gather:
        xe = np.empty((b - a, src.shape[1]), dtype=out.dtype)
        gather_rows(src, order, k, a, b, xe)
        return xe
    return src[a:b]


# ------------------------------------------------------------ work queue
@intrinsic
def _next_task(typingctx, counter):
    """Atomically ``counter[0] += 1``; returns the old value (a shared work queue).

    Which thread takes which task never changes a result: every task is
    computed the same way on any thread and writes only its own outputs.
    """
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64
            and counter.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        arr_t = signature.args[0]
        ary = context.make_array(arr_t)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, arr_t, ary,
                                       [context.get_constant(types.intp, 0)])
        return builder.atomic_rmw("add", ptr, context.get_constant(types.int64, 1), "seq_cst")

    return types.int64(counter), codegen


# --------------------------------------------------------------------- driver
class ExpertWeights(NamedTuple):
    """The weights of one streaming job, as the kernels take them (one argument).

    ``w1 [E, H, 2F or F]``, ``wu [E, H, F]`` (``w1`` again when fused or
    plain), ``wd [E, F, H]``: float arrays, ``uint16`` bits (bfloat16 or
    float16) or int8 values; ``k1``/``ku``/``kd`` their storage kinds
    (:mod:`numoe._cpu._narrow`); ``s1``/``su``/``sd`` the int8 per-column
    scales ``[E, columns]`` float32 (``[E, 0]`` otherwise); biases ``[E, F]``
    / ``[E, H]`` in the compute dtype, or ``[E, 0]`` for none.
    """

    w1: np.ndarray
    k1: int
    s1: np.ndarray
    wu: np.ndarray
    ku: int
    su: np.ndarray
    wd: np.ndarray
    kd: int
    sd: np.ndarray
    bg: np.ndarray
    bu: np.ndarray
    bd: np.ndarray


class TaskTable(NamedTuple):
    """Columns of :func:`plan_tasks` as int64 arrays (one argument of the kernels)."""

    kind: np.ndarray
    te: np.ndarray
    ta: np.ndarray
    tb: np.ndarray
    tc0: np.ndarray
    tc1: np.ndarray
    tr0: np.ndarray


@kernel
def _task(t, src, order, k, gather, ew, fused, glu, code, limit, alpha, out, hsplit, tt):
    """Streaming task ``t`` of :func:`plan_tasks`: a whole expert (kind 1), or a
    gate/up (kind 2) then down (kind 3) column chunk of a split expert, the
    two stages passing through ``hsplit``."""
    kd = tt.kind[t]
    e = tt.te[t]
    a = tt.ta[t]
    b = tt.tb[t]
    F = ew.wd.shape[1]
    d0, d1 = tt.tc0[t], tt.tc1[t]
    if kd == 1:
        hv = np.empty((b - a, F), dtype=out.dtype)
    else:
        hv = hsplit[tt.tr0[t]:tt.tr0[t] + b - a]
    if kd != 3:
        xe = _rows(src, order, k, gather, a, b, out)
        g0, g1 = (0, F) if kd == 1 else (d0, d1)
        stream_glu(xe, ew, e, fused, glu, F, g0, g1, code, limit, alpha, hv)
        if kd == 2:
            return
        d0, d1 = 0, ew.wd.shape[2]
    stream_down(hv, ew, e, d0, d1, out[a:b])


@kernel
def _run_queue(queue, counter, src, order, k, gather, ew, fused, glu, code, limit, alpha, out,
               hsplit, tt):
    """Take tasks ``queue[i]`` off the shared counter until none are left."""
    n = queue.shape[0]
    while True:
        i = _next_task(counter)
        if i >= n:
            return
        _task(queue[i], src, order, k, gather, ew, fused, glu, code, limit, alpha, out, hsplit,
              tt)


@driver
def _experts_driver(nthreads, queue, counter, src, order, k, gather, ew, fused, glu, code,
                    limit, alpha, out, hsplit, tt):
    """Run one stage of a streaming job on ``nthreads`` threads sharing one queue
    (tasks largest first; stage 1: whole experts and gate/up column chunks;
    stage 2: down column chunks). Every task writes only its own output
    rows/columns (``out``, or ``hsplit`` rows ``tr0`` for gate/up chunks)."""
    for _ in prange(nthreads):
        _run_queue(queue, counter, src, order, k, gather, ew, fused, glu, code, limit, alpha,
                   out, hsplit, tt)


@kernel
def _stream_rows(x, w, wkind, scale, rows, out):
    """``out = x @ w`` in row blocks of ``rows`` with :func:`stream_matmul`
    (each row's result independent of the others)."""
    T = x.shape[0]
    for lo in range(0, T, rows):
        hi = min(T, lo + rows)
        stream_matmul(x[lo:hi], w, wkind, scale, 0, w.shape[1], out[lo:hi], 0)


@driver
def _stream_rows_driver(x, w, wkind, scale, rows, out):
    """:func:`_stream_rows` with the row blocks spread over the threads."""
    T = x.shape[0]
    nb = (T + rows - 1) // rows
    for i in prange(nb):
        lo = i * rows
        hi = min(T, lo + rows)
        stream_matmul(x[lo:hi], w, wkind, scale, 0, w.shape[1], out[lo:hi], 0)


@kernel
def _add_gated(y, sh, gate):
    """``y[t] += sigmoid(gate[t]) * sh[t]``."""
    T, H = y.shape
    for t in range(T):
        g = 1.0 / (1.0 + math.exp(-np.float64(gate[t])))
        for j in range(H):
            y[t, j] += g * sh[t, j]


# ------------------------------------------------------------ threads, BLAS
_LOCK = threading.RLock()
_STATE = {"pool": None, "workers": 0, "blas": None}


def _single_threaded_blas():
    """Context holding the loaded BLAS libraries at one thread (process-wide)."""
    if _STATE["blas"] is None:
        from threadpoolctl import ThreadpoolController
        _STATE["blas"] = ThreadpoolController()
    return _STATE["blas"].limit(limits=1, user_api="blas")


def _run_tasks(tasks, nthreads):
    """Run callables on ``nthreads`` threads (this one and pool workers) that
    take them in list order from a shared counter; returns when all are done.

    Each task writes only what it owns, so the order and the thread that runs
    a task never change a result.
    """
    n = min(nthreads, len(tasks))
    if n <= 1:
        for t in tasks:
            t()
        return
    if _STATE["workers"] < n - 1:
        if _STATE["pool"] is not None:
            _STATE["pool"].shutdown(wait=True)
        _STATE["pool"] = ThreadPoolExecutor(max_workers=n - 1,
                                            thread_name_prefix="numoe-experts")
        _STATE["workers"] = n - 1
    counter = itertools.count()            # next() is atomic under the GIL

    def work():
        for i in iter(counter.__next__, None):
            if i >= len(tasks):
                return
            tasks[i]()

    futures = [_STATE["pool"].submit(work) for _ in range(n - 1)]
    try:
        work()
    finally:
        for f in futures:
            f.result()


# --------------------------------------------------------------------- jobs
class Job(NamedTuple):
    """One grouped FFN (see the module docstring).

    ``src`` rows feed the experts: directly (``order is None``: rows
    ``offsets[e]:offsets[e+1]`` of ``src``) or gathered (``src[order[i] //
    k]``). ``w1`` is ``[E, H, 2F]`` (fused gate|up, ``fused=True``), or
    ``w_gate [E, H, F]`` with ``w_up`` separate or ``None`` (plain FFN).
    Weights are float arrays of ``src``'s dtype or narrower (bfloat16,
    float16, float32 under float64) or :class:`numoe.QuantizedArray` (int8,
    scales along the input axis). ``src``/``out`` (``[N, H]``) are float32
    or float64; biases are ``[E, F]`` / ``[E, H]`` or ``None`` (any float
    dtype, converted to the compute dtype here: they are small).
    ``stream_all``: every block runs through the row-independent streaming
    kernel (batch-invariant mode), none through BLAS. ``bf16_inputs``: the
    activations are bfloat16 values (a bf16 layer), so BLAS tasks with bf16
    weights may use the CPU's bf16 matrix instructions, which also round the
    hidden layer to bfloat16 before the down product (as PyTorch bf16 does).
    """

    src: np.ndarray
    order: Optional[np.ndarray]
    k: int
    offsets: np.ndarray
    w1: np.ndarray
    w_up: Optional[np.ndarray]
    fused: bool
    w_down: np.ndarray
    b_gate: Optional[np.ndarray]
    b_up: Optional[np.ndarray]
    b_down: Optional[np.ndarray]
    code: int
    limit: float
    alpha: float
    out: np.ndarray
    stream_all: bool = False
    bf16_inputs: bool = False


def _rows_per_task(H, F, glu):
    per_row = 2.0 * H * F * (3 if glu else 2)
    return int(min(MAX_TASK_ROWS, max(MIN_TASK_ROWS, TASK_FLOPS // per_row)))


def _blocks(lo, hi, step):
    """Split ``lo..hi`` into ``ceil(n / step)`` nearly equal blocks."""
    n = hi - lo
    nb = -(-n // step)
    size = -(-n // nb)
    return [(a, min(hi, a + size)) for a in range(lo, hi, size)]


def _chunks(n, parts):
    """``0..n`` in ``parts`` column chunks, multiples of SPLIT_COLS (last one shorter)."""
    width = -(-n // parts)
    width = -(-width // SPLIT_COLS) * SPLIT_COLS
    return [(c, min(n, c + width)) for c in range(0, n, width)]


def plan_tasks(offsets, H, F, Hout, glu, stream_all=False, small_rows=SMALL_ROWS):
    """Tasks of a job: a list of ``(kind, e, a, b, c0, c1, r0, cost)``.

    Depends on the sizes only. ``r0`` is the task's first row in the split
    buffer (gate/up and down chunks of split experts); ``cost`` a rough
    estimate used to run the largest tasks first. ``stream_all``: blocks of
    ``SMALL_ROWS`` rows or more become streaming tasks of at most
    ``STREAM_ROWS`` rows instead of BLAS tasks. ``small_rows``: the BLAS
    threshold (``BF16_SMALL_ROWS`` for jobs on the bf16 GEMM, which beats
    streaming from a few rows on: measured, 2048x2048 weight, Zen 4).
    """
    E = len(offsets) - 1
    step = _rows_per_task(H, F, glu)
    w_elems = H * F * (2 if glu else 1) + F * Hout
    tasks, small = [], []
    for e in range(E):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi - lo >= small_rows and stream_all:
            small.extend((e, a, b) for a, b in _blocks(lo, hi, STREAM_ROWS))
        elif hi - lo >= small_rows:
            for a, b in _blocks(lo, hi, step):
                tasks.append((BLAS, e, a, b, 0, 0, 0, _cost(b - a, w_elems, True)))
        elif hi > lo:
            small.append((e, lo, hi))
    if small and len(tasks) + len(small) < MIN_TASKS:
        parts = -(-MIN_TASKS // len(small))
        r0 = 0
        for e, lo, hi in small:
            m = hi - lo
            for c0, c1 in _chunks(F, parts):
                tasks.append((SPLIT_GLU, e, lo, hi, c0, c1, r0,
                              _cost(m, (c1 - c0) * H * (2 if glu else 1), False)))
            for c0, c1 in _chunks(Hout, parts):
                tasks.append((SPLIT_DOWN, e, lo, hi, c0, c1, r0,
                              _cost(m, (c1 - c0) * F, False)))
            r0 += m
    else:
        for e, lo, hi in small:
            tasks.append((STREAM, e, lo, hi, 0, 0, 0, _cost(hi - lo, w_elems, False)))
    return tasks


def _cost(m, w_elems, blas):
    """Rough seconds of ``m`` rows through ``w_elems`` weights (1 core, measured
    shapes: BLAS ~60 GFLOP/s from 64 rows, less below; the streaming loop
    ~25 GFLOP/s or the memory bandwidth). Only orders the work queue."""
    flops = 2.0 * m * w_elems
    if blas:
        return flops * (m + 16) / (60e9 * max(m, 1))
    return max(flops / 25e9, 4.0 * w_elems / 12e9)


def storage(w, E):
    """``(array, kind, scales)`` of an expert weight for the kernels: a float
    array as is (16-bit ones as ``uint16`` bits), a QuantizedArray as its int8
    values and ``[E, columns]`` float32 scales (``[E, 0]`` otherwise)."""
    from ..quant import QuantizedArray

    if isinstance(w, QuantizedArray):
        return (np.ascontiguousarray(w.values), INT8,
                np.ascontiguousarray(w.scales, dtype=np.float32).reshape(E, -1))
    return D.bits(w), kind_of(w.dtype), np.zeros((E, 0), np.float32)


_SCRATCH = threading.local()


def _scratch(name, shape, dt):
    """A per-thread reusable buffer (weight tiles of the BLAS tasks, the backward's
    row intermediates); kept, at the largest size asked, for the thread's life."""
    buf = getattr(_SCRATCH, name, None)
    size = int(np.prod(shape))
    if buf is None or buf.dtype != dt or buf.size < size:
        buf = np.empty(size, dtype=dt)
        setattr(_SCRATCH, name, buf)
    return buf[:size].reshape(shape)


def scratch_bytes():
    """Bytes of the reusable buffers (:func:`_scratch`) the calling thread holds."""
    return sum(v.nbytes for v in vars(_SCRATCH).values() if isinstance(v, np.ndarray))


def _blas_task(job, e, a, b, glu, none, ew):
    """Rows ``a:b`` through expert ``e`` with NumPy's BLAS: gate and up (one
    product when fused), the activation, down, the down bias.

    Float weights of the job's dtype go to BLAS as they are. Narrow or int8
    weights (``ew``, :class:`ExpertWeights`) are widened one column tile of
    at most ``BLAS_TILE`` columns at a time into a per-thread float scratch
    (bounded, never a whole expert) and multiplied with BLAS; the tiles are
    fixed by the sizes, so results do not depend on the threads.
    """
    F = job.w_down.shape[1]
    dt = job.out.dtype
    if job.order is None:
        xe = job.src[a:b]
    else:
        xe = np.empty((b - a, job.src.shape[1]), dtype=dt)
        gather_rows(job.src, job.order, job.k, a, b, xe)
    bg = none if job.b_gate is None else ew.bg[e]
    bu = none if job.b_up is None else ew.bu[e]
    out = job.out[a:b]
    if job.bf16_inputs and _bf16_gemm(ew, job.fused or job.w_up is None):
        from .bf16gemm import bf16_matmul

        gu = bf16_matmul(xe, ew.w1[e])
        u, uoff = gu, (F if job.fused else 0)
        if glu and not job.fused:
            u = bf16_matmul(xe, ew.wu[e])
        h = np.empty((b - a, F), dtype=dt)
        glu_rows(gu, 0, u, uoff, glu, bg, bu, job.code, job.limit, job.alpha, h, 0, F)
        bf16_matmul(h, ew.wd[e], out)
    elif ew.k1 == FLOAT and ew.kd == FLOAT and ew.w1.dtype == dt and ew.wd.dtype == dt \
            and (job.fused or job.w_up is None or (ew.ku == FLOAT and ew.wu.dtype == dt)):
        gu = np.matmul(xe, ew.w1[e])
        u, uoff = gu, (F if job.fused else 0)
        if glu and not job.fused:
            u = np.matmul(xe, ew.wu[e])
        h = np.empty((b - a, F), dtype=dt)
        glu_rows(gu, 0, u, uoff, glu, bg, bu, job.code, job.limit, job.alpha, h, 0, F)
        np.matmul(h, ew.wd[e], out=out)
    else:
        H, Hout = xe.shape[1], out.shape[1]
        h = np.empty((b - a, F), dtype=dt)
        for c0 in range(0, F, BLAS_TILE):
            c1 = min(F, c0 + BLAS_TILE)
            n = c1 - c0
            tile = _scratch("w1", (H, 2 * n if glu else n), dt)
            widen_cols(ew.w1[e], ew.k1, ew.s1[e], c0, c1, tile, 0)
            if glu and job.fused:
                widen_cols(ew.w1[e], ew.k1, ew.s1[e], F + c0, F + c1, tile, n)
            elif glu:
                widen_cols(ew.wu[e], ew.ku, ew.su[e], c0, c1, tile, n)
            gu = np.matmul(xe, tile)
            glu_rows(gu, 0, gu, n, glu, bg[c0:c1] if bg.shape[0] else bg,
                     bu[c0:c1] if bu.shape[0] else bu, job.code, job.limit, job.alpha, h, c0, n)
        for c0 in range(0, Hout, BLAS_TILE):
            c1 = min(Hout, c0 + BLAS_TILE)
            tile = _scratch("wd", (F, c1 - c0), dt)
            widen_cols(ew.wd[e], ew.kd, ew.sd[e], c0, c1, tile, 0)
            out[:, c0:c1] = np.matmul(h, tile)
    if job.b_down is not None:
        add_row_bias(out, ew.bd[e])


def _bf16_gemm(ew, single):
    """Whether a BLAS task with these weights runs on :mod:`numoe._cpu.bf16gemm`:
    all bf16 and the CPU has AMX-BF16 tiles or AVX512-BF16. Measured on one
    core, 2048x2048 bf16 weight, 64 rows: AMX (Xeon, weight packed per call)
    1.3x sgemm on widened tiles, 2.1x at 256 rows; AVX512-BF16 (Zen 4, packed
    panel by panel inside the product) 150 GFLOP/s against 77 for sgemm. Not
    the fallback, the widened tiles' twin.
    """
    if ew.k1 != BF16 or ew.kd != BF16 or not (single or ew.ku == BF16):
        return False
    from . import bf16gemm

    return bf16gemm.isa_path() in (bf16gemm.AMX, bf16gemm.AVX512)


def _bias(b, E, dt):
    """A bias as a C-contiguous compute-dtype array, ``[E, 0]`` for None."""
    return np.zeros((E, 0), dtype=dt) if b is None else np.ascontiguousarray(b, dtype=dt)


def _job_stages(job, nthreads):
    """``(stages, args, serial)`` for one job, or None when it has no rows.

    A job with BLAS tasks becomes two lists of callables for
    :func:`_run_tasks` (``args`` None); a streaming-only job (decoding) two
    arrays of task ids for the Numba driver, whose arguments are ``args``.
    """
    dt = job.out.dtype
    E, H = job.w1.shape[0], job.w1.shape[1]
    F, Hout = job.w_down.shape[1], job.w_down.shape[2]
    glu = job.fused or job.w_up is not None
    w1 = storage(job.w1, E)
    wu = w1 if job.w_up is None else storage(job.w_up, E)
    ew = ExpertWeights(*w1, *wu, *storage(job.w_down, E), _bias(job.b_gate, E, dt),
                       _bias(job.b_up, E, dt), _bias(job.b_down, E, dt))
    if job.bf16_inputs and _bf16_gemm(ew, job.fused or job.w_up is None):
        small = BF16_SMALL_ROWS
    elif FLOAT not in (ew.k1, ew.kd):
        small = NARROW_SMALL_ROWS
    else:
        small = SMALL_ROWS
    tasks = plan_tasks(job.offsets, H, F, Hout, glu, job.stream_all, small)
    if not tasks:
        return None
    cols = list(zip(*tasks))
    tt = TaskTable(np.array(cols[0], dtype=np.int64),
                   *(np.array(c, dtype=np.int64) for c in cols[1:7]))
    costs = cols[7]
    order = sorted(range(len(tasks)), key=lambda t: (-costs[t], t))     # largest first
    stage1 = [t for t in order if cols[0][t] != SPLIT_DOWN]
    stage2 = [t for t in order if cols[0][t] == SPLIT_DOWN]
    split_rows = int(max((tt.tr0[t] + tt.tb[t] - tt.ta[t] for t in stage2), default=0))
    hsplit = np.empty((split_rows, F), dtype=dt)
    gather = job.order is not None
    args = (job.src, job.order if gather else np.empty(0, np.int32), job.k, gather, ew,
            job.fused, glu, job.code, job.limit, job.alpha, job.out, hsplit, tt)
    serial = sum(costs) < SERIAL_COST or nthreads == 1
    if BLAS not in cols[0]:
        return [np.array(stage1, np.int64), np.array(stage2, np.int64)], args, serial
    none = np.zeros(0, dtype=dt)

    def call(t):
        if cols[0][t] == BLAS:
            return lambda: _blas_task(job, cols[1][t], cols[2][t], cols[3][t], glu, none, ew)
        return lambda: _task(t, *args)
    return [[call(t) for t in stage1], [call(t) for t in stage2]], None, serial


def run_jobs(jobs):
    """Run jobs one after the other, each spread over ``numba.get_num_threads()``.

    Serialised by a module lock: the BLAS thread setting is process-wide.
    """
    nthreads = max(1, numba.get_num_threads())
    with _LOCK, _single_threaded_blas():
        for job in jobs:
            planned = _job_stages(job, nthreads)
            if planned is None:
                continue
            stages, args, serial = planned
            for stage in stages:
                if len(stage) == 0:
                    continue
                if args is None:
                    _run_tasks(stage, 1 if serial else nthreads)
                elif serial:
                    _run_queue(stage, np.zeros(1, np.int64), *args)
                else:
                    _experts_driver(min(nthreads, len(stage)), stage, np.zeros(1, np.int64),
                                    *args)


def matmul(a, b, out=None):
    """``a @ b`` (``[T, K] @ [K, N]``), bit-identical for any thread count.

    Fixed row blocks of ``MATMUL_ROWS``, each a single-threaded BLAS call,
    spread over the threads. Used for the router logits.
    """
    T = a.shape[0]
    if out is None:
        out = np.empty((T, b.shape[1]), dtype=a.dtype)
    blocks = [(lo, min(T, lo + MATMUL_ROWS)) for lo in range(0, T, MATMUL_ROWS)]
    tasks = [lambda lo=lo, hi=hi: np.matmul(a[lo:hi], b, out=out[lo:hi]) for lo, hi in blocks]
    serial = _cost(T, a.shape[1] * b.shape[1], True) < SERIAL_COST
    with _LOCK, _single_threaded_blas():
        _run_tasks(tasks, 1 if serial else max(1, numba.get_num_threads()))
    return out


def linear(a, w, rowwise=False):
    """``a @ w`` for ``a [T, K]`` float32/float64 and a float weight ``w [K, N]``
    of that dtype or narrower (bfloat16, float16; float32 under float64).

    ``rowwise`` (batch-invariant mode), or narrow weights and fewer than
    ``SMALL_ROWS`` rows: the streaming kernel, which reads the weight once in
    its storage and gives every row a result independent of the other rows.
    Otherwise :func:`matmul` (narrow weights widened once per call: router
    sized, ``K * N`` elements).
    """
    T = a.shape[0]
    out = np.empty((T, w.shape[1]), dtype=a.dtype)
    if rowwise or (w.dtype != a.dtype and T < SMALL_ROWS):
        wb = D.bits(np.ascontiguousarray(w))
        none = np.zeros(0, np.float32)
        if T * w.shape[0] * w.shape[1] < 1 << 20 or numba.get_num_threads() == 1:
            _stream_rows(a, wb, kind_of(w.dtype), none, STREAM_ROWS, out)
        else:
            _stream_rows_driver(a, wb, kind_of(w.dtype), none, STREAM_ROWS, out)
        return out
    if w.dtype != a.dtype:
        w = widen_weight(w, a.dtype)
    return matmul(a, w, out)


def widen_weight(w, dt):
    """A (small) float weight as a new C-contiguous ``dt`` array."""
    if w.dtype in D.NARROW:
        from ._narrow import to_float32
        return to_float32(w).astype(dt, copy=False)
    return np.ascontiguousarray(w, dtype=dt)


def add_shared(y, sh, gate):
    """Add the shared experts' output ``sh`` to ``y`` (gated by ``sigmoid(gate)``)."""
    if gate is None:
        y += sh
    else:
        _add_gated(y, sh, gate)


# ------------------------------------------------------------------ backward
# Gradients of a grouped FFN in two stages of single-threaded BLAS tasks
# (fixed shapes, set by the sizes only) on the threads of :func:`_run_tasks`:
#   1. per expert row block: recompute gate/up from the rows (cheaper in
#      memory than saving them), ``q = d_ys @ w_down^T``, the activation's
#      backward (:func:`glu_backward_rows`), ``d_xs = [dG | dU] @ w1^T``;
#   2. per expert and column chunk: ``d_w1 = xs^T [dG | dU]``,
#      ``d_w_down = h^T d_ys`` over all the expert's rows in one product,
#      and the bias sums in a fixed row order.
# No partial sums are merged across tasks: each gradient element is made
# by one call of a fixed shape, so the bits do not depend on the threads.
@kernel
def act_grad(v, code, one, half, rs2, k1, k3, rs2pi):
    """``(act(v), act'(v))`` in the dtype of ``v`` (codes as :func:`_act`; relu'(0) = 0)."""
    if code == 0:                                   # silu
        s = one / (one + math.exp(-v))
        return v * s, s * (one + v * (one - s))
    if code == 1:                                   # gelu (erf)
        c = half * (one + math.erf(v * rs2))
        return v * c, c + v * math.exp(-half * v * v) * rs2pi
    if code == 2:                                   # gelu, tanh approximation
        t = math.tanh(k1 * (v + k3 * v * v * v))
        return (half * v * (one + t),
                half * (one + t) + half * v * (one - t * t) * k1 * (one + 3 * k3 * v * v))
    if v > 0:                                       # relu
        return v, one
    return one - one, one - one


@kernel
def glu_backward_rows(a, ua, uoff, glu, bg, bu, code, limit, alpha, q, rs, h, dgu, dsc):
    """Backward of :func:`glu_rows` for a row block.

    ``a[:, :F]`` holds the gate pre-activations (``ua[:, uoff:uoff+F]`` the
    up ones) without bias; ``q = d_ys @ w_down^T``; ``rs`` optional row
    scales (empty: 1) that multiply each row's output. Writes ``h = rs *
    hidden`` (for ``d_w_down``), ``dgu[:, :F]`` / ``dgu[:, F:]`` the
    gradients of the gate / up pre-activations, and (when ``dsc`` is not
    empty) ``dsc[m] = q[m] . hidden[m]`` (float64), the gradient of the row
    scale short of the down bias. swiglu_oai's clamps pass the gradient
    where ``-limit <= v <= limit`` (as ``torch.clamp``), 0 beyond.
    """
    M, F = q.shape
    T = h.dtype.type
    one, half = T(1.0), T(0.5)
    rs2, k1, k3 = T(0.7071067811865476), T(0.7978845608028654), T(0.044715)
    rs2pi = T(0.3989422804014327)
    lim, alp = T(limit), T(alpha)
    hasg = bg.shape[0] > 0
    hasu = bu.shape[0] > 0
    hasr = rs.shape[0] > 0
    hasd = dsc.shape[0] > 0
    for m in range(M):
        r = T(rs[m]) if hasr else one
        acc = 0.0
        for j in range(F):
            g = T(a[m, j])
            if hasg:
                g += bg[j]
            qj = T(q[m, j])
            if not glu:
                av, dav = act_grad(g, code, one, half, rs2, k1, k3, rs2pi)
                h[m, j] = r * av
                dgu[m, j] = r * qj * dav
                acc += np.float64(qj) * np.float64(av)
                continue
            u = T(ua[m, uoff + j])
            if hasu:
                u += bu[j]
            if code == 4:
                gc = g if g <= lim else lim
                uc = u if u <= lim else lim
                uc = uc if uc >= -lim else -lim
                sg = one / (one + math.exp(-alp * gc))
                hv = (uc + one) * gc * sg
                dg = (uc + one) * (sg + alp * gc * sg * (one - sg)) if g <= lim else one - one
                du = gc * sg if (u <= lim and u >= -lim) else one - one
            else:
                av, dav = act_grad(g, code, one, half, rs2, k1, k3, rs2pi)
                hv = av * u
                dg = dav * u
                du = av
            dh = r * qj
            h[m, j] = r * hv
            dgu[m, j] = dh * dg
            dgu[m, F + j] = dh * du
            acc += np.float64(qj) * np.float64(hv)
        if hasd:
            dsc[m] = acc


@kernel
def add_row_dots(dsc, dy, b):
    """``dsc[m] += dy[m] . b`` (float64, fixed order)."""
    for m in range(dy.shape[0]):
        acc = 0.0
        for j in range(dy.shape[1]):
            acc += np.float64(dy[m, j]) * np.float64(b[j])
        dsc[m] += acc


@kernel
def column_sums(a, rs, out):
    """``out[j] = sum_m rs[m] * a[m, j]`` (``rs`` empty: 1), rows in order, float64."""
    M, n = a.shape
    acc = np.zeros(n)
    hasr = rs.shape[0] > 0
    for m in range(M):
        r = np.float64(rs[m]) if hasr else 1.0
        for j in range(n):
            acc[j] += r * np.float64(a[m, j])
    for j in range(n):
        out[j] = acc[j]


class BackwardJob(NamedTuple):
    """The gradients of one grouped FFN (see the section comment above).

    Inputs: ``xs [N, H]`` grouped by ``offsets``; ``w1`` fused ``[E, H, 2F]``
    (``fused``) or the gate ``[E, H, F]`` with ``w_up`` separate (None:
    plain FFN); ``d_ys [N, H]``; ``row_scale [N]`` or None (the rows'
    outputs were multiplied by it: the routing weights of a combine, or a
    shared expert's gate). Outputs, all written: ``d_xs [N, H]``, ``d_w1``
    (shape of ``w1``), ``d_w_up``, ``d_w_down``, bias gradients (None where
    no bias) and ``d_scale [N]`` float64 (``d_ys . ys_unscaled``; None:
    not wanted). ``zeroed``: the weight and bias gradients are already zero
    (then experts without rows cost nothing).
    """

    xs: np.ndarray
    offsets: np.ndarray
    w1: np.ndarray
    w_up: Optional[np.ndarray]
    fused: bool
    w_down: np.ndarray
    b_gate: Optional[np.ndarray]
    b_up: Optional[np.ndarray]
    b_down: Optional[np.ndarray]
    code: int
    limit: float
    alpha: float
    d_ys: np.ndarray
    row_scale: Optional[np.ndarray]
    d_xs: np.ndarray
    d_w1: np.ndarray
    d_w_up: Optional[np.ndarray]
    d_w_down: np.ndarray
    d_b_gate: Optional[np.ndarray]
    d_b_up: Optional[np.ndarray]
    d_b_down: Optional[np.ndarray]
    d_scale: Optional[np.ndarray]
    zeroed: bool = False    # weight/bias gradients arrive zero-filled (np.zeros: untouched
                            # pages of experts without rows are never written)


def _col_chunks(m, K, n):
    """Column chunks of an ``[K, m] @ [m, n]`` weight-gradient product: about
    ``TASK_FLOPS`` each, multiples of SPLIT_COLS (sizes only, never threads)."""
    parts = max(1, min(-(-n // SPLIT_COLS), int(2.0 * m * K * n // TASK_FLOPS)))
    return _chunks(n, parts) if n else []


def _backward_rows_task(job, h, dgu, e, a, b, glu, F, none, empty64):
    """Stage 1 for rows ``a:b`` of expert ``e``: recompute, activation backward, ``d_xs``."""
    xe = job.xs[a:b]
    dye = job.d_ys[a:b]
    gu = np.matmul(xe, job.w1[e])
    u, uoff = gu, (F if job.fused else 0)
    if glu and not job.fused:
        u = np.matmul(xe, job.w_up[e])
    q = np.matmul(dye, job.w_down[e].T)
    dg = dgu[a:b]
    dsc = empty64 if job.d_scale is None else job.d_scale[a:b]
    glu_backward_rows(gu, u, uoff, glu, none if job.b_gate is None else job.b_gate[e],
                      none if job.b_up is None else job.b_up[e], job.code, job.limit,
                      job.alpha, q, none if job.row_scale is None else job.row_scale[a:b],
                      h[a:b], dg, dsc)
    if job.d_scale is not None and job.b_down is not None:
        add_row_dots(dsc, dye, job.b_down[e])
    out = job.d_xs[a:b]
    if not glu or job.fused:
        np.matmul(dg, job.w1[e].T, out=out)
    else:
        np.matmul(dg[:, :F], job.w1[e].T, out=out)
        out += np.matmul(dg[:, F:], job.w_up[e].T)


def _matmul_tn(a, b, out):
    """``out = a^T @ b`` (one single-threaded BLAS call; ``out`` may be a strided view)."""
    if out.flags.c_contiguous:
        np.matmul(a.T, b, out=out)
    else:
        out[...] = np.matmul(a.T, b)


def _weight_tasks(job, h, dgu, e, lo, hi, glu, F):
    """Stage 2 tasks of expert ``e`` (rows ``lo:hi``): weight gradients by column
    chunk, bias sums; zeros for an expert without rows."""
    none = np.zeros(0, dtype=job.d_xs.dtype)
    # (gradient [K, n], left operand rows [m, K], right operand [m, n])
    mats = []
    xe, he, dge, dye = job.xs[lo:hi], h[lo:hi], dgu[lo:hi], job.d_ys[lo:hi]
    if not glu or job.fused:
        mats.append((job.d_w1[e], xe, dge))
    else:
        mats.append((job.d_w1[e], xe, dge[:, :F]))
        mats.append((job.d_w_up[e], xe, dge[:, F:]))
    mats.append((job.d_w_down[e], he, dye))
    if hi == lo:
        if job.zeroed:
            return []

        def zero():
            for g, _, _ in mats:
                g[...] = 0
            for g in (job.d_b_gate, job.d_b_up, job.d_b_down):
                if g is not None:
                    g[e] = 0
        return [zero]
    tasks = []
    for g, left, right in mats:
        for c0, c1 in _col_chunks(hi - lo, left.shape[1], right.shape[1]):
            tasks.append(lambda g=g, left=left, right=right, c0=c0, c1=c1:
                         _matmul_tn(left, right[:, c0:c1], g[:, c0:c1]))

    def biases():
        if job.d_b_gate is not None:
            column_sums(dge[:, :F], none, job.d_b_gate[e])
        if job.d_b_up is not None:
            column_sums(dge[:, F:], none, job.d_b_up[e])
        if job.d_b_down is not None:
            column_sums(dye, none if job.row_scale is None else job.row_scale[lo:hi],
                        job.d_b_down[e])
    tasks.append(biases)
    return tasks


def run_backward(job):
    """Fill every output of ``job`` (:class:`BackwardJob`) on
    ``numba.get_num_threads()`` threads; bit-identical for any thread count."""
    E, H = job.w1.shape[0], job.w1.shape[1]
    F = job.w_down.shape[1]
    glu = job.fused or job.w_up is not None
    dt = job.d_xs.dtype
    N = job.xs.shape[0]
    # per-thread scratch kept between calls (N x 3F for GLU): no fresh pages per step
    h = _scratch("bw_h", (N, F), dt)                    # row-scaled hidden activations
    dgu = _scratch("bw_dgu", (N, 2 * F if glu else F), dt)  # d gate | d up pre-activations
    none = np.zeros(0, dtype=dt)
    empty64 = np.zeros(0)
    off = job.offsets
    step = _rows_per_task(H, F, glu)
    stage1, stage2 = [], []
    for e in range(E):
        lo, hi = int(off[e]), int(off[e + 1])
        for a, b in (_blocks(lo, hi, step) if hi > lo else []):
            stage1.append(lambda e=e, a=a, b=b: _backward_rows_task(
                job, h, dgu, e, a, b, glu, F, none, empty64))
        stage2.extend(_weight_tasks(job, h, dgu, e, lo, hi, glu, F))
    serial = _cost(N, H * F * (3 if glu else 2), True) < SERIAL_COST
    nthreads = 1 if serial else max(1, numba.get_num_threads())
    with _LOCK, _single_threaded_blas():
        _run_tasks(stage1, nthreads)
        _run_tasks(stage2, nthreads)


def matmul_tn(a, b, out=None):
    """``a^T @ b`` (``[T, K]^T @ [T, N]``) as float arrays, bit-identical for any
    thread count: one single-threaded BLAS call per fixed column chunk. ``out``:
    a ``[K, N]`` array of the result dtype to write (else a new one)."""
    if out is None:
        out = np.empty((a.shape[1], b.shape[1]), dtype=np.result_type(a, b))
    tasks = [lambda c0=c0, c1=c1: _matmul_tn(a, b[:, c0:c1], out[:, c0:c1])
             for c0, c1 in _col_chunks(a.shape[0], a.shape[1], b.shape[1])]
    if not tasks:
        out[...] = 0
        return out
    serial = _cost(a.shape[0], a.shape[1] * b.shape[1], True) < SERIAL_COST
    with _LOCK, _single_threaded_blas():
        _run_tasks(tasks, 1 if serial else max(1, numba.get_num_threads()))
    return out
