"""Optional cuBLAS path (through CuPy) for experts with many rows.

Used by :func:`numoe._cuda.experts.run_ffn` when ``gemm="cublas"`` (or
``NUMOE_CUDA_GEMM=cublas``) and CuPy is importable. Experts with more than
``SKINNY_MAX_ROWS`` rows run as cuBLAS SGEMM/DGEMM calls on zero-copy CuPy
views (gate, up and down: three calls per expert, TF32 off unless CuPy is
told otherwise), with the bias/activation and bias/row-scale epilogues as
numba kernels over the same tile table; experts with few rows keep the
numba skinny kernels. cuBLAS needs contiguous rows, so rows read through a
plan are gathered first. Each cuBLAS product is deterministic for a fixed
shape on a fixed GPU and library version.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, float64

from . import _arrays as A
from ._launch import launch
from .experts import act_value, glu_value


def run_ffn(a, gidx, kdiv, off, wg, wu, wd, bg, bu, bd, code, limit, alpha, out, sidx, sval,
            work, hbuf):
    import cupy as cp

    from . import dispatch as D
    from . import experts as X

    off_h = off.copy_to_host().astype(np.int64)
    N = int(off_h[-1])
    E, H, F = tuple(wg.shape)
    glu = wu is not None
    dt = a.dtype
    if gidx is not None:
        xs = A.empty((N, H), dt)
        D.gather_rows(a, gidx, kdiv, xs)
    else:
        xs = a
    dummy = A.dummy(dt)
    didx = A.dummy(np.int64)
    counts = np.diff(off_h)
    big = [e for e in range(E) if counts[e] > work.max_small]
    small = any(0 < c <= work.max_small for c in counts)
    if small:        # few-row experts: the numba skinny kernels
        if glu:
            X.grouped_glu(xs, didx, 0, wg, wu, bg if bg is not None else dummy, bg is not None,
                          bu if bu is not None else dummy, bu is not None, code, limit, alpha,
                          hbuf, work, only="skinny")
        else:
            X.grouped_plain(xs, didx, 0, wg, bg if bg is not None else dummy, bg is not None,
                            code, alpha, didx, dummy, False, hbuf, work, only="skinny")
        X.grouped_plain(hbuf, didx, 0, wd, bd if bd is not None else dummy, bd is not None,
                        X.ACT_NONE, alpha, sidx if sidx is not None else didx,
                        sval if sval is not None else dummy, sidx is not None, out, work,
                        only="skinny")
    if big:
        cx, cwg, cwd, ch, cout = (cp.asarray(v) for v in (xs, wg, wd, hbuf, out))
        cwu = cp.asarray(wu) if glu else None
        g = cp.empty((N, F), dtype=dt)
        u = cp.empty((N, F), dtype=dt) if glu else None
        for e in big:
            lo, hi = int(off_h[e]), int(off_h[e + 1])
            cp.matmul(cx[lo:hi], cwg[e], out=g[lo:hi])
            if glu:
                cp.matmul(cx[lo:hi], cwu[e], out=u[lo:hi])
        _ts, tb, cnt, _cs, cap_b = work.tables(X._skinny_cfg()[0], X._tiled_cfg(glu)[0])
        bs = A.block(256)
        gd = A.as_device("g", g)
        ud = A.as_device("u", u) if glu else gd
        launch(_act_epilogue, min(cap_b, 65535), bs, 0, gd, ud, glu,
               bg if bg is not None else A.dummy(dt, 2), bg is not None,
               bu if bu is not None else A.dummy(dt, 2), bu is not None, code, limit,
               alpha, hbuf, tb, cnt, 1)
        for e in big:
            lo, hi = int(off_h[e]), int(off_h[e + 1])
            cp.matmul(ch[lo:hi], cwd[e], out=cout[lo:hi])
        if bd is not None or sidx is not None:
            launch(_down_epilogue, min(cap_b, 65535), bs, 0, out,
                   bd if bd is not None else A.dummy(dt, 2), bd is not None,
                   sidx if sidx is not None else didx, sval if sval is not None else dummy,
                   sidx is not None, tb, cnt, 1)
    parts = (["cublas"] if big else []) + (["skinny"] if small else [])
    return {"up": "+".join(parts), "down": "+".join(parts), "gemm": "cublas"}


@cuda.jit
def _act_epilogue(g, u, glu, bg, use_bg, bu, use_bu, code, limit, alpha, h, tiles, tcount,
                  which):
    ntiles = tcount[which]
    F = h.shape[1]
    for t in range(cuda.blockIdx.x, ntiles, cuda.gridDim.x):
        e = tiles[t, 0]
        r0 = tiles[t, 1]
        r1 = tiles[t, 2]
        for idx in range(cuda.threadIdx.x, (r1 - r0) * F, cuda.blockDim.x):
            r = r0 + idx // F
            c = idx % F
            v = float64(g[r, c])
            if use_bg:
                v += float64(bg[e, c])
            if glu:
                w = float64(u[r, c])
                if use_bu:
                    w += float64(bu[e, c])
                h[r, c] = glu_value(v, w, code, limit, alpha)
            else:
                h[r, c] = act_value(v, code)


@cuda.jit
def _down_epilogue(out, bd, use_bd, sidx, sval, use_scale, tiles, tcount, which):
    ntiles = tcount[which]
    H = out.shape[1]
    for t in range(cuda.blockIdx.x, ntiles, cuda.gridDim.x):
        e = tiles[t, 0]
        r0 = tiles[t, 1]
        r1 = tiles[t, 2]
        for idx in range(cuda.threadIdx.x, (r1 - r0) * H, cuda.blockDim.x):
            r = r0 + idx // H
            c = idx % H
            v = float64(out[r, c])
            if use_bd:
                v += float64(bd[e, c])
            if use_scale:
                v = v * float64(sval[sidx[r]])
            out[r, c] = v
