"""Decode-time grouped GEMV for 16-bit expert weights (few rows per expert).

Used where the tensor-core tiles (:mod:`numoe._cuda.mma`) cannot run: no linked C++
on this card or install, widths not multiples of 8, float32 activations with 16-bit
weights (and a 16-bit router's product at decode).

Memory-bound: the cost is reading each touched expert's weights, so a block
owns one row tile of one expert (at most ``BMS`` rows, staged in shared
memory as float32), ``4 * NT`` output columns and one ``KS``-long slice of
``K`` (split-K, ``KS`` chosen on the host so that even one token's eight
experts give every SM several blocks). Each thread reads four adjacent 16-bit
weights per load (one 64-bit word of a ``uint64`` view) and issues ``UN``
such loads per matrix before it uses any of them (loads in flight are what
a GEMV's speed is made of), widens them in registers with the widening
helper and accumulates ``BMS x 4`` float32 sums (two sets for gate and up).
Every weight is read once per row tile; ``BMS`` is the host's bound on the
rows per expert (the tokens in the batch, at most 8), so one token does not
pay for eight rows of arithmetic.

Partial sums go to a float32 ``[n_split, tile slots x BMS, W]`` buffer (each
element written by one thread); a second kernel sums the slices in order and
applies the epilogue (biases, activation or GLU, routing-weight scale,
rounding to the output's storage). No atomics: results are deterministic,
and identical for any grid.
"""
from __future__ import annotations

import functools
import os

import numpy as np
from numba import cuda, float32, float64

from . import _arrays as A
from . import _narrow
from ._launch import launch
from .experts import act_value, glu_value

VEC = 4            # 16-bit weights per 64-bit load
MAX_ROWS = 8       # rows per tile at most (BMS)


def _cfg():
    """(NT threads per block, UN loads in flight per matrix, target blocks per launch);
    ``NUMOE_CUDA_GEMV="NT,UN,TARGET"`` overrides (tuning)."""
    if A.SIM:
        return 4, 2, 64
    env = os.environ.get("NUMOE_CUDA_GEMV")
    if env:
        nt, un, target = (int(v) for v in env.split(","))
        return nt, un, target
    return 64, 8, 2048


def usable(w, NO):
    """16-bit weights whose rows split into 64-bit words (and a real or simulated GPU)."""
    return (w.dtype in A.NARROW and NO % VEC == 0
            and (A.SIM or w.device_ctypes_pointer.value % 8 == 0))


def tile_rows(rows_bound):
    """Rows per tile: the host's bound on any expert's rows, at most :data:`MAX_ROWS`."""
    return max(1, min(MAX_ROWS, int(rows_bound)))


MAX_SPLIT = 16     # slices of K at most (the epilogue sums them in order)


def split(K, tiles, col_blocks, UN, target):
    """``KS``, the rows of ``K`` per block: about ``target`` blocks in all (at most
    :data:`MAX_SPLIT` slices), a multiple of ``UN``."""
    nsplit = max(1, min(-(-K // UN), MAX_SPLIT, target // max(1, tiles * col_blocks)))
    ks = -(-K // nsplit)
    return -(-ks // UN) * UN


def stage(glu, a, gidx, kdiv, w1, w2, b1, b2, code, limit, alpha, sidx, sval, out, ts, cnt,
          cap_s, BMS, est_tiles):
    """One layer over the tiles ``ts`` (count ``cnt[0]``, at most ``BMS`` rows each):
    ``out = glu(a w1 + b1, a w2 + b2)`` or ``out = act(a w1 + b1) * sval[sidx[r]]``.
    ``est_tiles``: the host's guess of the tile count (sizes the split of ``K``)."""
    NT, UN, target = _cfg()
    K = int(a.shape[1])
    NO = int(out.shape[1])
    W = NO * (2 if glu else 1)
    col_blocks = -(-(NO // VEC) // NT)
    KS = split(K, min(cap_s, est_tiles), col_blocks, UN, target)
    nsplit = -(-K // KS)
    slots = min(int(ts.shape[0]), 65535) * BMS      # rows of the tile slots, not of all N
    part = A.empty((nsplit * slots * W,), np.float32)
    ct = A.compute_dtype(a.dtype)
    kinds = (_narrow.kind_of(a.dtype), _narrow.kind_of(w1.dtype), _narrow.kind_of(out.dtype))
    kern = _gemv(glu, kinds[0], kinds[1], BMS, NT, UN)
    flat = lambda x: A.reshape(x, (x.size,))  # noqa: E731
    w64 = lambda x: flat(A.bits(x)).view(np.uint64)  # noqa: E731
    grid = (min(cap_s, 65535), col_blocks, nsplit)
    launch(kern, grid, NT, BMS * KS * 4, flat(A.bits(a)), gidx, kdiv, K, KS, w64(w1),
           w64(w2 if w2 is not None else w1), NO, W, slots, part, ts, cnt)
    d = A.dummy(ct)
    di = A.dummy(np.int64)
    epi = _epilogue(glu, kinds[2], str(ct), BMS)
    bs = A.block(128)
    launch(epi, (min(cap_s, 65535), -(-NO // bs)), bs, 0, part, nsplit, slots, NO, W,
           flat(b1) if b1 is not None else d, b1 is not None,
           flat(b2) if b2 is not None else d, b2 is not None, code, limit, alpha,
           sidx if sidx is not None else di, sval if sval is not None else d,
           sidx is not None, flat(A.bits(out)), ts, cnt)
    return out


@functools.lru_cache(maxsize=None)
def _gemv(glu, ka, kw, BMS, NT, UN):
    lda = _narrow.loader(ka)
    U = np.uint64
    uVEC, uUN = U(VEC), U(UN)
    M16 = U(0xFFFF)
    NACC = BMS * VEC

    @cuda.jit
    def kern(a, gidx, kdiv, K, KS, w1, w2, NO, W, S, part, tiles, tcount):
        sm = cuda.shared.array(0, float32)
        ntiles = tcount[0]
        tid = cuda.threadIdx.x
        c4 = U(cuda.blockIdx.y) * U(NT) + U(tid)          # 64-bit word: columns 4*c4..
        ks = cuda.blockIdx.z
        uK = U(K)
        uKS = U(KS)
        nw = U(NO) // uVEC
        k0 = U(ks) * uKS
        kn = min(uKS, uK - k0)
        acc1 = cuda.local.array(NACC, float32)
        acc2 = cuda.local.array(NACC, float32)
        q1 = cuda.local.array(UN, np.uint64)
        q2 = cuda.local.array(UN, np.uint64)
        for t in range(cuda.blockIdx.x, ntiles, cuda.gridDim.x):
            e = U(tiles[t, 0])
            r0 = U(tiles[t, 1])
            rend = U(tiles[t, 2])
            cuda.syncthreads()
            # the tile's rows of a[:, k0:k0+KS] as float32 (zeros past the rows / past K)
            for idx in range(tid, BMS * KS, NT):
                i = U(idx) // uKS
                kk = U(idx) % uKS
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
                for i in range(NACC):
                    acc1[i] = float32(0)
                    acc2[i] = float32(0)
                p = (e * uK + k0) * nw + c4
                kk = U(0)
                while kk < kn:
                    # UN weight rows' words requested before any is used (KS is a
                    # multiple of UN, so kk + u < KS: the staged x is zero past kn)
                    for u in range(UN):
                        q1[u] = U(0)
                        q2[u] = U(0)
                        if kk + U(u) < kn:
                            q1[u] = w1[p + U(u) * nw]
                            if glu:
                                q2[u] = w2[p + U(u) * nw]
                    for u in range(UN):
                        for j in range(VEC):
                            g = _narrow.widen((q1[u] >> U(16 * j)) & M16, kw)
                            h = g
                            if glu:
                                h = _narrow.widen((q2[u] >> U(16 * j)) & M16, kw)
                            for i in range(BMS):
                                x = sm[U(i) * uKS + kk + U(u)]
                                acc1[i * VEC + j] += x * g
                                if glu:
                                    acc2[i * VEC + j] += x * h
                    p += uUN * nw
                    kk += uUN
                for i in range(BMS):
                    r = r0 + U(i)
                    if r < rend:
                        base = (U(ks) * U(S) + U(t) * U(BMS) + U(i)) * U(W) + c4 * uVEC
                        for j in range(VEC):
                            part[base + U(j)] = acc1[i * VEC + j]
                            if glu:
                                part[base + U(NO) + U(j)] = acc2[i * VEC + j]

    return kern


@functools.lru_cache(maxsize=None)
def _epilogue(glu, ko, ct, BMS):
    ft = float64 if ct == "float64" else float32
    sto = _narrow.storer(ko, ft)

    @cuda.jit
    def epi(part, nsplit, S, NO, W, b1, use_b1, b2, use_b2, code, limit, alpha, sidx, sval,
            use_scale, out, tiles, tcount):
        # one thread per output column of a tile: its rows' split sums in slice order
        ntiles = tcount[0]
        c = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        if c >= NO:
            return
        for t in range(cuda.blockIdx.x, ntiles, cuda.gridDim.x):
            e = tiles[t, 0]
            r0 = tiles[t, 1]
            r1 = tiles[t, 2]
            for r in range(r0, r1):
                p = (t * BMS + r - r0) * W + c
                step = S * W
                v = 0.0
                u = 0.0
                s = 0
                while s + 4 <= nsplit:       # four slices' loads in flight, summed in order
                    v0 = part[p]
                    v1 = part[p + step]
                    v2 = part[p + 2 * step]
                    v3 = part[p + 3 * step]
                    if glu:
                        u0 = part[p + NO]
                        u1 = part[p + step + NO]
                        u2 = part[p + 2 * step + NO]
                        u3 = part[p + 3 * step + NO]
                        u = u + float64(u0) + float64(u1) + float64(u2) + float64(u3)
                    v = v + float64(v0) + float64(v1) + float64(v2) + float64(v3)
                    p += 4 * step
                    s += 4
                while s < nsplit:
                    v += float64(part[p])
                    if glu:
                        u += float64(part[p + NO])
                    p += step
                    s += 1
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
