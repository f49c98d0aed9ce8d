"""Decode-time grouped GEMV for 16-bit expert weights (few rows per expert).

Opt-in (``NUMOE_CUDA_DECODE=1``, see :func:`numoe._cuda.experts._decode_ok`):
correct on an H200 but, in its one measurement, no faster than the numba
skinny kernel at decode sizes, where launch overhead dominates.

Memory-bound: the cost is reading each touched expert's weights, so a block
owns one row tile of one expert (at most ``BMS`` rows, staged in shared
memory as float32), ``4 * NT`` output columns and one ``KS``-long slice of
``K`` (split-K: enough blocks to keep every SM streaming even for one
token). Each thread reads four adjacent 16-bit weights per load (one 64-bit
word of a ``uint64`` view), widens them in registers with the widening helper
and accumulates ``BMS x 4`` float32 sums (two sets for gate and up). Every
weight is read once per row tile.

Partial sums go to a float32 ``[n_split, tile slots x BMS, W]`` buffer (each
element written by one thread); a second kernel sums the slices in order and applies the
epilogue (biases, activation or GLU, routing-weight scale, rounding to the
output's storage). No atomics: results are deterministic, and identical to
run with any grid.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda, float32, float64

from . import _arrays as A
from . import _narrow
from ._launch import launch
from .experts import act_value, glu_value

VEC = 4            # 16-bit weights per 64-bit load


def _cfg():
    """(NT threads per block, KS rows of K per block)."""
    if A.SIM:
        return 4, 8
    return 64, 256


def usable(w, NO):
    """16-bit weights whose rows split into 64-bit words (and a real or simulated GPU)."""
    return (w.dtype in A.NARROW and NO % VEC == 0
            and (A.SIM or w.device_ctypes_pointer.value % 8 == 0))


def stage(glu, a, gidx, kdiv, w1, w2, b1, b2, code, limit, alpha, sidx, sval, out, ts, cnt,
          cap_s, BMS):
    """One layer over the skinny tiles ``ts`` (count ``cnt[0]``, at most ``BMS`` rows
    each): ``out = glu(a w1 + b1, a w2 + b2)`` or ``out = act(a w1 + b1) * sval[sidx[r]]``."""
    NT, KS = _cfg()
    N, K = int(out.shape[0]), int(a.shape[1])
    NO = int(out.shape[1])
    W = NO * (2 if glu else 1)
    nsplit = -(-K // KS)
    slots = min(int(ts.shape[0]), 65535) * BMS      # rows of the tile slots, not of all N
    part = A.empty((nsplit * slots * W,), np.float32)
    ct = A.compute_dtype(a.dtype)
    kinds = (_narrow.kind_of(a.dtype), _narrow.kind_of(w1.dtype), _narrow.kind_of(out.dtype))
    kern = _gemv(glu, kinds[0], kinds[1], BMS, NT, KS)
    flat = lambda x: A.reshape(x, (x.size,))  # noqa: E731
    w64 = lambda x: flat(A.bits(x)).view(np.uint64)  # noqa: E731
    grid = (min(cap_s, 65535), -(-(NO // VEC) // NT), nsplit)
    launch(kern, grid, NT, BMS * KS * 4, flat(A.bits(a)), gidx, kdiv, K, w64(w1),
           w64(w2 if w2 is not None else w1), NO, W, slots, part, ts, cnt)
    d = A.dummy(ct)
    di = A.dummy(np.int64)
    epi = _epilogue(glu, kinds[2], str(ct), BMS)
    bs = A.block(256)
    launch(epi, min(cap_s, 65535), bs, 0, part, nsplit, slots, NO, W,
           flat(b1) if b1 is not None else d, b1 is not None,
           flat(b2) if b2 is not None else d, b2 is not None, code, limit, alpha,
           sidx if sidx is not None else di, sval if sval is not None else d,
           sidx is not None, flat(A.bits(out)), ts, cnt)
    return out


@functools.lru_cache(maxsize=None)
def _gemv(glu, ka, kw, BMS, NT, KS):
    lda = _narrow.loader(ka)
    U = np.uint64
    uVEC = U(VEC)

    @cuda.jit
    def kern(a, gidx, kdiv, K, w1, w2, NO, W, S, part, tiles, tcount):
        sm = cuda.shared.array(0, float32)
        ntiles = tcount[0]
        tid = cuda.threadIdx.x
        c4 = U(cuda.blockIdx.y) * U(NT) + U(tid)          # 64-bit word: columns 4*c4..
        ks = cuda.blockIdx.z
        uK = U(K)
        uNO = U(NO)
        nw = uNO // uVEC
        k0 = U(ks) * U(KS)
        kn = min(U(KS), uK - k0)
        acc1 = cuda.local.array((BMS, VEC), float32)
        acc2 = cuda.local.array((BMS, VEC), float32)
        wv1 = cuda.local.array(VEC, float32)
        wv2 = cuda.local.array(VEC, float32)
        for t in range(cuda.blockIdx.x, ntiles, cuda.gridDim.x):
            e = U(tiles[t, 0])
            r0 = U(tiles[t, 1])
            rend = U(tiles[t, 2])
            cuda.syncthreads()
            for idx in range(tid, BMS * KS, NT):
                i = U(idx) // U(KS)
                kk = U(idx) % U(KS)
                r = r0 + i
                v = float32(0)
                if r < rend and kk < kn:
                    src = r
                    if kdiv > 0:
                        src = U(gidx[r]) // U(kdiv)
                    v = float32(lda(a[src * uK + k0 + kk]))
                sm[idx] = v
            cuda.syncthreads()
            if c4 < nw:
                for i in range(BMS):
                    for j in range(VEC):
                        acc1[i, j] = float32(0)
                        acc2[i, j] = float32(0)
                p = (e * uK + k0) * nw + c4
                for kk in range(kn):
                    q1 = w1[p]
                    q2 = q1
                    if glu:
                        q2 = w2[p]
                    p += nw
                    for j in range(VEC):
                        wv1[j] = _narrow.widen((q1 >> U(16 * j)) & U(0xFFFF), kw)
                        if glu:
                            wv2[j] = _narrow.widen((q2 >> U(16 * j)) & U(0xFFFF), kw)
                    for i in range(BMS):
                        x = sm[i * KS + kk]
                        for j in range(VEC):
                            acc1[i, j] += x * wv1[j]
                            if glu:
                                acc2[i, j] += x * wv2[j]
                for i in range(BMS):
                    r = r0 + U(i)
                    if r < rend:
                        base = (U(ks) * U(S) + U(t) * U(BMS) + U(i)) * U(W) + c4 * uVEC
                        for j in range(VEC):
                            part[base + U(j)] = acc1[i, j]
                            if glu:
                                part[base + uNO + U(j)] = acc2[i, j]

    return kern


@functools.lru_cache(maxsize=None)
def _epilogue(glu, ko, ct, BMS):
    ft = float64 if ct == "float64" else float32
    sto = _narrow.storer(ko, ft)

    @cuda.jit
    def epi(part, nsplit, S, NO, W, b1, use_b1, b2, use_b2, code, limit, alpha, sidx, sval,
            use_scale, out, tiles, tcount):
        # only rows that belong to a skinny tile: walk the tiles, one thread per element
        ntiles = tcount[0]
        for t in range(cuda.blockIdx.x, ntiles, cuda.gridDim.x):
            e = tiles[t, 0]
            r0 = tiles[t, 1]
            r1 = tiles[t, 2]
            for idx in range(cuda.threadIdx.x, (r1 - r0) * NO, cuda.blockDim.x):
                i = idx // NO
                r = r0 + i
                c = idx % NO
                slot = t * BMS + i
                v = 0.0
                u = 0.0
                for s in range(nsplit):
                    v += float64(part[(s * S + slot) * W + c])
                    if glu:
                        u += float64(part[(s * S + slot) * W + NO + c])
                if use_b1:
                    v += float64(b1[e * NO + c])
                if glu:
                    if use_b2:
                        u += float64(b2[e * NO + c])
                    v = glu_value(v, u, code, limit, alpha)
                else:
                    if code >= 0:
                        v = act_value(v, code)
                    if use_scale:
                        v = v * float64(sval[sidx[r]])
                out[r * NO + c] = sto(v)

    return epi

