"""CPU expert FFNs: grouped GEMMs over expert blocks (driver and kernels).

Everything here trusts its arguments: :func:`numoe.expert_ffn` and
:class:`numoe.MoELayer` have validated shapes and dtypes and hand over
C-contiguous arrays. Nothing here raises on bad data.

How the work is split
---------------------
The FLOPs are in the expert GEMMs. One *job* is one grouped FFN: rows
``offsets[e]:offsets[e+1]`` (optionally gathered from ``x`` through a
dispatch plan's ``order``) through expert ``e``. A job is cut into tasks
that depend on the sizes alone, never on the thread count:

* an expert block of at least ``SMALL_ROWS`` rows goes to BLAS, in row
  blocks of at most ``rows_per_task`` rows: one product for gate and up
  together (pre-fused ``[H, 2F]`` weights) or two (separate weights), the
  activation in one pass, one product for down;
* a smaller block (decoding) runs in a Numba kernel that streams each
  weight matrix once, split into fixed column chunks of ``CHUNK_COLS``
  columns (gate/up chunks, then down chunks).

The tasks run on ``numba.get_num_threads()`` Python threads with BLAS held
at one thread: measured on a 2-core machine, two threads each running
whole experts with single-threaded BLAS beat one multi-threaded BLAS call
per expert (115 vs 107 GFLOP/s at 64 rows per expert), and OpenBLAS gives
different bits at 1 and 2 threads for most shapes (checked: 2048x2048
products of 8 to 512 rows) while single-threaded calls of a fixed shape
are reproducible. So every product here is a fixed-shape single-threaded
BLAS call or a fixed-order Numba loop, and results are bit-identical for
any thread count.
"""
from __future__ import annotations

import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional

import numba
import numpy as np
from numba import prange

from .._jit import driver, kernel

# Task shapes. Results depend on these (and on the sizes), never on threads.
SMALL_ROWS = 8          # expert blocks with fewer rows use the streaming kernel
CHUNK_COLS = 256        # column chunk of the streaming kernel
TASK_FLOPS = 2.0e9      # target FLOPs of one BLAS task (bounds row blocks)
MIN_TASK_ROWS = 64
MAX_TASK_ROWS = 512


# ------------------------------------------------------------- serial kernels
@kernel
def _act(v, code):
    """Scalar activation (float64 in and out); codes index ``numoe.experts.ACTIVATIONS``."""
    if code == 0:                                   # silu
        return v / (1.0 + math.exp(-v))
    if code == 1:                                   # gelu (erf)
        return 0.5 * v * (1.0 + math.erf(v * 0.7071067811865476))
    if code == 2:                                   # gelu, tanh approximation
        return 0.5 * v * (1.0 + math.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
    return 0.0 if v < 0.0 else v                    # relu (NaN passes through)


@kernel
def _glu_value(g, u, code, limit, alpha):
    """``act(g) * u`` (GLU) or the gpt-oss clamped SwiGLU, in float64."""
    if code == 4:
        if g > limit:
            g = limit
        if u > limit:
            u = limit
        elif u < -limit:
            u = -limit
        return (u + 1.0) * g / (1.0 + math.exp(-alpha * g))
    return _act(g, code) * u


@kernel
def glu_rows(a, ua, uoff, glu, bg, bu, code, limit, alpha, h):
    """``h[m, j] = act(a[m, j] + bg[j]) * (ua[m, uoff + j] + bu[j])`` (GLU), or
    ``act(a[m, j] + bg[j])`` (plain). Empty ``bg`` / ``bu`` mean no bias.

    ``a`` / ``ua`` are ``[M, >= F]`` product buffers (the same array with
    ``uoff = F`` when gate and up were computed by one fused product).
    """
    M, F = h.shape
    hasg = bg.shape[0] > 0
    hasu = bu.shape[0] > 0
    for m in range(M):
        for j in range(F):
            g = np.float64(a[m, j])
            if hasg:
                g += bg[j]
            if glu:
                u = np.float64(ua[m, uoff + j])
                if hasu:
                    u += bu[j]
                h[m, j] = _glu_value(g, u, code, limit, alpha)
            else:
                h[m, j] = _act(g, code)


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


@kernel(fastmath=True)
def _stream_matmul(x, w, c0, c1, acc):
    """``acc[:, :c1-c0] = x @ w[:, c0:c1]``, reading each weight row once.

    The sum over the inner dimension runs in a fixed order (four rows at a
    time), so a row's result depends neither on the other rows nor on the
    thread that runs it. Used for blocks of a few rows, where BLAS packing
    costs more than the arithmetic.
    """
    M, K = x.shape
    n = c1 - c0
    for m in range(M):
        for j in range(n):
            acc[m, j] = 0.0
    k4 = K - K % 4
    for kk in range(0, k4, 4):
        w0 = w[kk, c0:c1]
        w1 = w[kk + 1, c0:c1]
        w2 = w[kk + 2, c0:c1]
        w3 = w[kk + 3, c0:c1]
        for m in range(M):
            a0 = x[m, kk]
            a1 = x[m, kk + 1]
            a2 = x[m, kk + 2]
            a3 = x[m, kk + 3]
            am = acc[m]
            for j in range(n):
                am[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j]
    for kk in range(k4, K):
        wr = w[kk, c0:c1]
        for m in range(M):
            a = x[m, kk]
            am = acc[m]
            for j in range(n):
                am[j] += a * wr[j]


@kernel
def stream_glu_chunk(x, wg, og, wu, ou, glu, c0, c1, bg, bu, code, limit, alpha, h):
    """Columns ``c0:c1`` of the activated hidden ``h`` for a few rows ``x``.

    Gate columns are ``wg[:, og + c0 : og + c1]``, up columns
    ``wu[:, ou + c0 : ou + c1]`` (the fused ``[H, 2F]`` matrix twice with
    ``og = 0, ou = F``, or two ``[H, F]`` matrices with zero offsets).
    """
    M = x.shape[0]
    n = c1 - c0
    accg = np.empty((M, n), dtype=h.dtype)
    _stream_matmul(x, wg, og + c0, og + c1, accg)
    accu = accg
    if glu:
        accu = np.empty((M, n), dtype=h.dtype)
        _stream_matmul(x, wu, ou + c0, ou + c1, accu)
    hasg = bg.shape[0] > 0
    hasu = bu.shape[0] > 0
    for m in range(M):
        for j in range(n):
            g = np.float64(accg[m, j])
            if hasg:
                g += bg[c0 + j]
            if glu:
                u = np.float64(accu[m, j])
                if hasu:
                    u += bu[c0 + j]
                h[m, c0 + j] = _glu_value(g, u, code, limit, alpha)
            else:
                h[m, c0 + j] = _act(g, code)


@kernel
def stream_down_chunk(h, wd, c0, c1, bd, out):
    """``out[:, c0:c1] = h @ wd[:, c0:c1] + bd[c0:c1]`` for a few rows."""
    M = h.shape[0]
    n = c1 - c0
    acc = np.empty((M, n), dtype=out.dtype)
    _stream_matmul(h, wd, c0, c1, acc)
    hasb = bd.shape[0] > 0
    for m in range(M):
        for j in range(n):
            v = acc[m, j]
            if hasb:
                v += bd[c0 + j]
            out[m, c0 + j] = v


# ------------------------------------------------------------ numba driver
@kernel
def _blas_block(src, order, k, gather, e, a, b, w1, wu, fused, glu, wd, bg, bu, bd,
                has_bg, has_bu, has_bd, code, limit, alpha, none, out):
    """Rows ``a:b`` through expert ``e``: BLAS products, activation, bias."""
    H = src.shape[1]
    F = wd.shape[1]
    m = b - a
    if gather:
        xe = np.empty((m, H), dtype=out.dtype)
        gather_rows(src, order, k, a, b, xe)
    else:
        xe = src[a:b]
    h = np.empty((m, F), dtype=out.dtype)
    bge = bg[e] if has_bg else none
    bue = bu[e] if has_bu else none
    if fused:
        gu = np.empty((m, 2 * F), dtype=out.dtype)
        np.dot(xe, w1[e], gu)
        glu_rows(gu, gu, F, glu, bge, bue, code, limit, alpha, h)
    else:
        g = np.empty((m, F), dtype=out.dtype)
        np.dot(xe, w1[e], g)
        if glu:
            u = np.empty((m, F), dtype=out.dtype)
            np.dot(xe, wu[e], u)
            glu_rows(g, u, 0, glu, bge, bue, code, limit, alpha, h)
        else:
            glu_rows(g, g, 0, glu, bge, bue, code, limit, alpha, h)
    o = out[a:b]
    np.dot(h, wd[e], o)
    if has_bd:
        add_row_bias(o, bd[e])


@driver
def _experts_driver(src, order, k, gather, w1, wu, fused, glu, wd, bg, bu, bd, has_bg,
                    has_bu, has_bd, code, limit, alpha, none, out, b_e, b_a, b_b,
                    s_e, s_r0, s_r1, s_c0, s_c1, xsm, hsm, d_e, d_r0, d_r1, d_lo, d_c0, d_c1):
    """All tasks of one job (see :func:`job_arrays`).

    Stage 1: BLAS row blocks (``b_*``) and the gate/up column chunks of the
    few-row experts (``s_*``, rows ``xsm[r0:r1]`` -> ``hsm[r0:r1]``);
    stage 2: their down column chunks (``d_*``). Every task writes only its
    own rows/columns and is computed the same way on any thread.
    """
    F = wd.shape[1]
    nb = b_e.shape[0]
    ns = s_e.shape[0]
    for i in prange(nb + ns):
        if i < nb:
            _blas_block(src, order, k, gather, b_e[i], b_a[i], b_b[i], w1, wu, fused, glu, wd,
                        bg, bu, bd, has_bg, has_bu, has_bd, code, limit, alpha, none, out)
        else:
            j = i - nb
            e = s_e[j]
            xv = xsm[s_r0[j]:s_r1[j]]
            hv = hsm[s_r0[j]:s_r1[j]]
            bge = bg[e] if has_bg else none
            bue = bu[e] if has_bu else none
            if fused:
                stream_glu_chunk(xv, w1[e], 0, w1[e], F, glu, s_c0[j], s_c1[j], bge, bue,
                                 code, limit, alpha, hv)
            elif glu:
                stream_glu_chunk(xv, w1[e], 0, wu[e], 0, glu, s_c0[j], s_c1[j], bge, bue,
                                 code, limit, alpha, hv)
            else:
                stream_glu_chunk(xv, w1[e], 0, w1[e], 0, glu, s_c0[j], s_c1[j], bge, bue,
                                 code, limit, alpha, hv)
    for i in prange(d_e.shape[0]):
        e = d_e[i]
        r0 = d_r0[i]
        r1 = d_r1[i]
        lo = d_lo[i]
        bde = bd[e] if has_bd else none
        stream_down_chunk(hsm[r0:r1], wd[e], d_c0[i], d_c1[i], bde, out[lo:lo + r1 - r0])


# ------------------------------------------------------------------ the pool
_LOCK = threading.RLock()
_POOL = [None, 0]            # [executor, workers]
_BLAS = [None]               # threadpoolctl controller, made on first use


def _blas_controller():
    if _BLAS[0] is None:
        from threadpoolctl import ThreadpoolController
        _BLAS[0] = ThreadpoolController()
    return _BLAS[0]


def _executor(n):
    pool, size = _POOL
    if pool is None or size != n:
        if pool is not None:
            pool.shutdown(wait=True)
        pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="numoe-experts")
        _POOL[0], _POOL[1] = pool, n
    return pool


def _run_stage(tasks, nthreads):
    """Run callables (any order; each writes only what it owns) on ``nthreads``."""
    if not tasks:
        return
    n = min(nthreads, len(tasks))
    if n <= 1:
        for t in tasks:
            t()
        return
    counter = itertools.count()

    def worker():
        while True:
            i = next(counter)          # atomic under the GIL
            if i >= len(tasks):
                return
            tasks[i]()

    pool = _executor(nthreads)
    futures = [pool.submit(worker) for _ in range(n)]
    for f in futures:
        f.result()


def run_stages(stages):
    """Run a list of stages (lists of tasks) in order, BLAS at one thread.

    Serialised by a module lock: the BLAS thread setting is process-wide.
    """
    stages = [s for s in stages if s]
    if not stages:
        return
    nthreads = max(1, numba.get_num_threads())
    with _LOCK, _blas_controller().limit(limits=1, user_api="blas"):
        for s in stages:
            _run_stage(s, nthreads)


# --------------------------------------------------------------------- jobs
class Job(NamedTuple):
    """One grouped FFN (see the module docstring).

    ``src`` rows feed the experts: directly (``order is None``: rows
    ``offsets[e]:offsets[e+1]`` of ``src``) or gathered (``src[order[i] //
    k]``). ``w1`` is ``[E, H, 2F]`` (fused gate|up, ``fused=True``), or
    ``w_gate [E, H, F]`` with ``w_up`` separate or ``None`` (plain FFN).
    Biases are ``[E, F]`` / ``[E, H]`` or ``None``. ``out`` is ``[N, H]``.
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


def _rows_per_task(H, F, glu):
    per_row = 2.0 * H * F * (3 if glu else 2)
    return int(min(MAX_TASK_ROWS, max(MIN_TASK_ROWS, TASK_FLOPS // per_row)))


def _blocks(lo, hi, step):
    """Split ``lo..hi`` into ``ceil(n / step)`` nearly equal blocks."""
    n = hi - lo
    nb = -(-n // step)
    size = -(-n // nb)
    return [(a, min(hi, a + size)) for a in range(lo, hi, size)]


def _empty(dtype):
    return np.empty(0, dtype=dtype)


def job_tasks(job):
    """Tasks of one job: ``(stage1, stage2)`` lists of callables."""
    E = job.w1.shape[0]
    H = job.w1.shape[1]
    F = job.w_down.shape[1]
    glu = job.fused or job.w_up is not None
    dt = job.out.dtype
    none = _empty(dt)
    offsets = [int(v) for v in job.offsets]
    step = _rows_per_task(H, F, glu)
    stage1, stage2, big = [], [], []
    small = []
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        if hi - lo >= SMALL_ROWS:
            for a, b in _blocks(lo, hi, step):
                big.append((b - a, e, a, b))
        elif hi > lo:
            small.append((e, lo, hi))
    big.sort(key=lambda t: (-t[0], t[1], t[2]))      # largest first (any order is exact)
    for _, e, a, b in big:
        stage1.append(_blas_task(job, e, a, b, F, glu, none))
    if small:
        s1, s2 = _stream_tasks(job, small, H, F, glu, none)
        stage1.extend(s1)
        stage2.extend(s2)
    return stage1, stage2


def _bias(b, e, none):
    return none if b is None else b[e]


def _blas_task(job, e, a, b, F, glu, none):
    def task():
        dt = job.out.dtype
        if job.order is None:
            xe = job.src[a:b]
        else:
            xe = np.empty((b - a, job.src.shape[1]), dtype=dt)
            gather_rows(job.src, job.order, job.k, a, b, xe)
        m = b - a
        if job.fused:
            gu = np.matmul(xe, job.w1[e])
            ua, uoff = gu, F
        else:
            gu = np.matmul(xe, job.w1[e])
            ua, uoff = (np.matmul(xe, job.w_up[e]), 0) if glu else (gu, 0)
        h = np.empty((m, F), dtype=dt)
        glu_rows(gu, ua, uoff, glu, _bias(job.b_gate, e, none), _bias(job.b_up, e, none),
                 job.code, job.limit, job.alpha, h)
        out = job.out[a:b]
        np.matmul(h, job.w_down[e], out=out)
        if job.b_down is not None:
            add_row_bias(out, job.b_down[e])
    return task


def _stream_tasks(job, small, H, F, glu, none):
    """Column-chunk tasks for the few-row experts: gate/up chunks, then down chunks."""
    dt = job.out.dtype
    rows = sum(hi - lo for _, lo, hi in small)
    xsm = np.empty((rows, job.src.shape[1]), dtype=dt)
    hsm = np.empty((rows, F), dtype=dt)
    views = []
    r = 0
    for e, lo, hi in small:
        xv = xsm[r:r + hi - lo]
        if job.order is None:
            xv[...] = job.src[lo:hi]
        else:
            gather_rows(job.src, job.order, job.k, lo, hi, xv)
        views.append((e, lo, hi, xv, hsm[r:r + hi - lo]))
        r += hi - lo
    Hout = job.w_down.shape[2]
    s1, s2 = [], []
    for e, lo, hi, xv, hv in views:
        if job.fused:
            wg, og, wu, ou = job.w1[e], 0, job.w1[e], F
        else:
            wg, og = job.w1[e], 0
            wu, ou = (job.w_up[e], 0) if glu else (job.w1[e], 0)
        bg, bu = _bias(job.b_gate, e, none), _bias(job.b_up, e, none)
        for c0 in range(0, F, CHUNK_COLS):
            c1 = min(F, c0 + CHUNK_COLS)
            s1.append(lambda xv=xv, wg=wg, og=og, wu=wu, ou=ou, c0=c0, c1=c1, bg=bg, bu=bu, hv=hv:
                      stream_glu_chunk(xv, wg, og, wu, ou, glu, c0, c1, bg, bu, job.code,
                                       job.limit, job.alpha, hv))
        wd, bd, out = job.w_down[e], _bias(job.b_down, e, none), job.out[lo:hi]
        for c0 in range(0, Hout, CHUNK_COLS):
            c1 = min(Hout, c0 + CHUNK_COLS)
            s2.append(lambda hv=hv, wd=wd, c0=c0, c1=c1, bd=bd, out=out:
                      stream_down_chunk(hv, wd, c0, c1, bd, out))
    return s1, s2


MODE = "numba"


def _job_arrays(job):
    """Task arrays of one job for :func:`_experts_driver`."""
    E = job.w1.shape[0]
    H = job.w1.shape[1]
    F = job.w_down.shape[1]
    Hout = job.w_down.shape[2]
    glu = job.fused or job.w_up is not None
    dt = job.out.dtype
    offsets = [int(v) for v in job.offsets]
    step = _rows_per_task(H, F, glu)
    big, small = [], []
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        if hi - lo >= SMALL_ROWS:
            big += [(b - a, e, a, b) for a, b in _blocks(lo, hi, step)]
        elif hi > lo:
            small.append((e, lo, hi))
    big.sort(key=lambda t: (-t[0], t[1], t[2]))      # largest first (any order is exact)
    rows = sum(hi - lo for _, lo, hi in small)
    xsm = np.empty((rows, job.src.shape[1]), dtype=dt)
    hsm = np.empty((rows, F), dtype=dt)
    s_t, d_t = [], []
    r = 0
    for e, lo, hi in small:
        n = hi - lo
        if job.order is None:
            xsm[r:r + n] = job.src[lo:hi]
        else:
            gather_rows(job.src, job.order, job.k, lo, hi, xsm[r:r + n])
        s_t += [(e, r, r + n, c0, min(F, c0 + CHUNK_COLS)) for c0 in range(0, F, CHUNK_COLS)]
        d_t += [(e, r, r + n, lo, c0, min(Hout, c0 + CHUNK_COLS))
                for c0 in range(0, Hout, CHUNK_COLS)]
        r += n
    col = lambda rows_, i: np.array([t[i] for t in rows_], dtype=np.int64)  # noqa: E731
    b = [col(big, i) for i in (1, 2, 3)]
    st = [col(s_t, i) for i in range(5)]
    dd = [col(d_t, i) for i in range(6)]
    return b, st, dd, xsm, hsm


def _run_job_numba(job):
    dt = job.out.dtype
    glu = job.fused or job.w_up is not None
    dummy = np.zeros((1, 1), dtype=dt)
    none = np.empty(0, dtype=dt)
    b, st, dd, xsm, hsm = _job_arrays(job)
    gather = job.order is not None
    order = job.order if gather else np.empty(0, np.int64)
    wu = job.w_up if job.w_up is not None else job.w1
    _experts_driver(job.src, order, job.k, gather, job.w1, wu, job.fused, glu, job.w_down,
                    dummy if job.b_gate is None else job.b_gate,
                    dummy if job.b_up is None else job.b_up,
                    dummy if job.b_down is None else job.b_down,
                    job.b_gate is not None, job.b_up is not None, job.b_down is not None,
                    job.code, job.limit, job.alpha, none, job.out, *b, *st, xsm, hsm, *dd)


CHUNKSIZE = 1


def run_jobs(jobs):
    """Run several jobs (each job's tasks spread over the threads)."""
    if MODE == "numba":
        with _LOCK, _blas_controller().limit(limits=1, user_api="blas"), \
                numba.parallel_chunksize(CHUNKSIZE):
            for job in jobs:
                _run_job_numba(job)
        return
    run_jobs_pool(jobs)


def run_jobs_pool(jobs):
    """Run several jobs together (their tasks share the threads)."""
    s1, s2 = [], []
    for job in jobs:
        a, b = job_tasks(job)
        s1.extend(a)
        s2.extend(b)
    run_stages([s1, s2])


def matmul(a, b, out=None):
    """``a @ b`` (``[T, K] @ [K, N]``), bit-identical for any thread count.

    Fixed row blocks of 256, each a single-threaded BLAS call, spread over
    the threads. Used for the router logits.
    """
    T = a.shape[0]
    if out is None:
        out = np.empty((T, b.shape[1]), dtype=np.result_type(a, b))
    tasks = [(lambda lo=lo, hi=hi: np.matmul(a[lo:hi], b, out=out[lo:hi]))
             for lo, hi in ((s, min(T, s + 256)) for s in range(0, T, 256))]
    run_stages([tasks])
    return out


@kernel
def _add_gated(y, sh, gate):
    """``y[t] += sigmoid(gate[t]) * sh[t]``."""
    T, H = y.shape
    for t in range(T):
        g = 1.0 / (1.0 + math.exp(-np.float64(gate[t])))
        for j in range(H):
            y[t, j] += g * sh[t, j]


def add_shared(y, sh, gate):
    """Add the shared experts' output ``sh`` to ``y`` (gated by ``sigmoid(gate)``)."""
    if gate is None:
        y += sh
    else:
        _add_gated(y, sh, gate)
