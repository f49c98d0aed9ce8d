"""Device-side value checks (NaN/inf, id ranges, plan consistency).

A :class:`Checks` collects the checks one public call needs, launches one
small reduction kernel per array (block reduction in shared memory, one
atomic per block, so the counts are exact and deterministic), reads every
result back in a single synchronising copy, and raises the first failure
in argument order with the same message as the host checks in
:mod:`numoe._validate`. Nothing is written to the inputs.

All kernels of the CUDA backend use dynamic shared memory only (size given
at launch): the simulator creates a static ``cuda.shared.array`` lazily per
thread without a lock, which can hand two threads different arrays.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, int64

from . import _arrays as A
from ._launch import launch

BIG = np.int64(1) << 62
_NSLOT = 4          # int64 words of result per check
_BS = 256           # threads per block of the reductions


class Checks:
    """Value checks of one call; ``run()`` launches them and raises on the first failure."""

    def __init__(self):
        self._items = []

    # -- registration -------------------------------------------------------
    def finite(self, name, a, *, allow_neg_inf=False):
        """NaN or +/-inf in a float array (``-inf`` allowed on request)."""
        self._items.append(("finite", name, a, allow_neg_inf))
        return self

    def ids(self, name, a, upper):
        """Integer values in ``[0, upper)``."""
        self._items.append(("ids", name, a, upper))
        return self

    def plan(self, order, offsets, counts, dropped, capacity):
        """Consistency of a device :class:`~numoe.DispatchPlan` (see :func:`check_plan`)."""
        self._items.append(("plan", "plan", (order, offsets, counts, dropped), capacity))
        return self

    # -- execution ----------------------------------------------------------
    def run(self):
        """Launch every check, read the results back once, raise the first failure."""
        items = [it for it in self._items if _size(it) > 0]
        if not items:
            return
        res = A.zeros((len(items) * _NSLOT,), np.int64)
        for i, (kind, _name, a, _p) in enumerate(items):
            out = res[i * _NSLOT:(i + 1) * _NSLOT]
            if kind == "finite":
                flat = _flat(a)
                bs = A.block(_BS)
                launch(_finite_kernel, A.grid(flat.size, bs, 8), bs, bs * 8, flat, out)
            elif kind == "ids":
                flat = _flat(a)
                bs = A.block(_BS)
                launch(_minmax_kernel, A.grid(flat.size, bs, 8), bs, bs * 8, flat, out)
            else:
                order, offsets, counts, dropped = a
                _launch_plan_checks(order, offsets, counts, dropped, _p, out)
        host = res.copy_to_host().reshape(len(items), _NSLOT)
        for (kind, name, a, p), r in zip(items, host):
            if kind == "finite":
                _raise_finite(name, r, p)
            elif kind == "ids":
                _raise_ids(name, r, p)
            else:
                _raise_plan(r, a, p)


def _size(item):
    kind, _n, a, _p = item
    if kind == "plan":
        return 1
    return a.size


def _flat(a):
    a = A.compute(a)                 # 16-bit floats checked on their float32 values
    return a.reshape(a.size)


# ------------------------------------------------------------ interpretation
def _raise_finite(name, r, allow_neg_inf):
    nan, pinf, ninf = int(r[0]), int(r[1]), int(r[2])
    if allow_neg_inf:
        if nan or pinf:
            raise ValueError(f"{name} holds NaN or +inf; only finite values and -inf "
                             "(masked) are allowed")
    elif nan or pinf or ninf:
        raise ValueError(f"{name} holds NaN or inf; all values must be finite")


def _raise_ids(name, r, upper):
    lo = int(BIG - r[0]) if r[0] else 0      # stored as BIG - min
    hi = int(r[1] - BIG) if r[1] else 0      # stored as max + BIG
    if lo < 0:
        raise ValueError(f"{name} holds a negative id ({lo}); ids must be in [0, {upper})")
    if upper is not None and hi >= upper:
        raise ValueError(f"{name} holds id {hi}, out of range [0, {upper})")


def _raise_plan(r, arrays, capacity):
    bad_order, bad_offsets, bad_counts, n_dropped = (int(v) for v in r)
    order, offsets, counts, dropped = arrays
    n = order.shape[0]
    m = dropped.size
    if bad_order:
        raise ValueError(f"plan.order holds ids out of range [0, {m}) "
                         f"({bad_order} entries)")
    if bad_offsets:
        raise ValueError("plan.offsets must be non-decreasing from 0 to len(plan.order) "
                         f"= {n}")
    if bad_counts & 1:
        raise ValueError("plan.counts must equal np.diff(plan.offsets)")
    if bad_counts & 2:
        raise ValueError(f"plan.counts exceeds plan.capacity ({capacity})")
    kept = m - n_dropped
    if kept != n:
        raise ValueError(f"plan.dropped marks {kept} assignments kept but plan.order "
                         f"holds {n}")


def _launch_plan_checks(order, offsets, counts, dropped, capacity, out):
    n = order.shape[0]
    m = dropped.size
    bs = A.block(_BS)
    if n:
        launch(_range_count_kernel, A.grid(n, bs, 8), bs, bs * 8, order, m, out[0:1])
    E = counts.shape[0]
    cap = -1 if capacity is None else capacity
    launch(_offsets_kernel, 1, bs, bs * 8, offsets, counts, n, E, cap, out[1:3])
    if m:
        flat = _flat(dropped)
        launch(_true_count_kernel, A.grid(m, bs, 8), bs, bs * 8, flat, out[3:4])


# ------------------------------------------------------------------ kernels
@cuda.jit(device=True)
def _block_sum(sh, tid, nthreads, v):
    """Sum of ``v`` over the block (tree in shared memory); valid in thread 0."""
    sh[tid] = v
    cuda.syncthreads()
    s = 1
    while s < nthreads:
        s *= 2
    s //= 2
    while s > 0:
        if tid < s and tid + s < nthreads:
            sh[tid] += sh[tid + s]
        cuda.syncthreads()
        s //= 2
    r = sh[0]
    cuda.syncthreads()
    return r


@cuda.jit(device=True)
def _block_max(sh, tid, nthreads, v):
    """Max of ``v`` over the block; the same value in every thread."""
    sh[tid] = v
    cuda.syncthreads()
    s = 1
    while s < nthreads:
        s *= 2
    s //= 2
    while s > 0:
        if tid < s and tid + s < nthreads:
            if sh[tid + s] > sh[tid]:
                sh[tid] = sh[tid + s]
        cuda.syncthreads()
        s //= 2
    r = sh[0]
    cuda.syncthreads()
    return r


@cuda.jit
def _finite_kernel(a, out):
    sh = cuda.shared.array(0, int64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    nan = 0
    pinf = 0
    ninf = 0
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        v = a[i]
        if v != v:
            nan += 1
        elif v == np.inf:
            pinf += 1
        elif v == -np.inf:
            ninf += 1
    nan = _block_sum(sh, tid, nt, nan)
    pinf = _block_sum(sh, tid, nt, pinf)
    ninf = _block_sum(sh, tid, nt, ninf)
    if tid == 0:
        if nan:
            cuda.atomic.add(out, 0, nan)
        if pinf:
            cuda.atomic.add(out, 1, pinf)
        if ninf:
            cuda.atomic.add(out, 2, ninf)


@cuda.jit
def _minmax_kernel(a, out):
    """out[0] = max(BIG - a) (i.e. BIG - min), out[1] = max(a + BIG); 0 = no element."""
    sh = cuda.shared.array(0, int64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    big = int64(1) << 62
    lo = int64(0)
    hi = int64(0)
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        v = int64(a[i])
        x = big - v
        if x > lo:
            lo = x
        y = v + big
        if y > hi:
            hi = y
    lo = _block_max(sh, tid, nt, lo)
    hi = _block_max(sh, tid, nt, hi)
    if tid == 0:
        cuda.atomic.max(out, 0, lo)
        cuda.atomic.max(out, 1, hi)


@cuda.jit
def _range_count_kernel(a, upper, out):
    """out[0] += number of entries outside [0, upper)."""
    sh = cuda.shared.array(0, int64)
    tid = cuda.threadIdx.x
    c = 0
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        v = a[i]
        if v < 0 or v >= upper:
            c += 1
    c = _block_sum(sh, tid, cuda.blockDim.x, c)
    if tid == 0 and c:
        cuda.atomic.add(out, 0, c)


@cuda.jit
def _true_count_kernel(a, out):
    sh = cuda.shared.array(0, int64)
    tid = cuda.threadIdx.x
    c = 0
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        if a[i]:
            c += 1
    c = _block_sum(sh, tid, cuda.blockDim.x, c)
    if tid == 0 and c:
        cuda.atomic.add(out, 0, c)


@cuda.jit
def _offsets_kernel(offsets, counts, n, E, cap, out):
    """One block: out[0] = 1 if offsets are not 0..n non-decreasing; out[1] bit 0:
    counts != diff(offsets), bit 1: a count over ``cap`` (``cap < 0``: no capacity)."""
    sh = cuda.shared.array(0, int64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    bad = 0
    badc = 0
    badcap = 0
    for e in range(tid, E, nt):
        d = offsets[e + 1] - offsets[e]
        if d < 0:
            bad = 1
        if counts[e] != d:
            badc = 1
        if cap >= 0 and d > cap:
            badcap = 1
    if tid == 0:
        if offsets[0] != 0 or offsets[E] != n:
            bad = 1
    bad = _block_max(sh, tid, nt, bad)
    badc = _block_max(sh, tid, nt, badc)
    badcap = _block_max(sh, tid, nt, badcap)
    if tid == 0:
        out[0] = bad
        out[1] = badc + 2 * badcap
