"""CUDA twin of :mod:`numoe.experts`: grouped expert GEMMs.

Two kernel families, each compiled per float dtype and tile shape
(compile-time constants, so the accumulators live in registers):

* **tiled** (prefill, many rows per expert): a block computes a
  ``BM x BN`` output tile of one expert with a double-buffered shared
  memory pipeline (``BK``-deep slices of A, stored k-major and padded
  against bank conflicts, and of the weights), each thread a ``TM x TN``
  register block. The GLU variant carries two weight tiles (gate and up)
  and two accumulators and writes ``act(gate) * up`` -- gate, up and the
  activation fused, no ``[N, 2F]`` intermediate. The plain variant (down
  projection, plain FFN layer, :func:`numoe._cuda.gemm.matmul`) adds the
  bias, an optional activation and an optional per-row scale (the routing
  weight) in its epilogue.
* **skinny** (decode, a few rows per expert): a block owns ``BMS`` rows of
  one expert and ``NT`` output columns; it stages ``KC``-long slices of
  those rows in shared memory and streams the weight columns straight from
  global memory (coalesced, several loads in flight per thread), so each
  weight is read once per row tile: the memory-bound regime.

A-rows are read either from a grouped ``xs`` (row ``r``) or through the
plan from the token matrix (row ``order[r] // k``: no permuted copy). The
work list is a host-built table of (expert, first row, end row) tiles, one
per ``BM`` rows of an expert, so empty experts cost nothing; each expert
goes to the skinny or the tiled kernel by its row count.

Every output element is computed by one thread with a fixed summation
order: results are deterministic (bit-identical run to run).

Optionally (``NUMOE_CUDA_GEMM=cublas`` or ``gemm="cublas"``) large expert
blocks go to cuBLAS through CuPy; :data:`last_path` records which path ran.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
from numba import cuda, float32, float64, int64

from . import _arrays as A

#: which kernels the last call used, e.g. {"glu": "tiled+skinny", "down": "tiled"}
last_path: dict = {}

ACT_NONE = -1
SKINNY_MAX_ROWS = 48        # experts with at most this many rows use the skinny kernel


# ----------------------------------------------------------------- configs
#: host-side overrides of the tile shapes (benchmarks / tuning); keys "glu", "plain", "skinny"
TILE_OVERRIDE: dict = {}


def _tiled_cfg(glu):
    """(BM, BN, BK, TM, TN) for the tiled kernels."""
    key = "glu" if glu else "plain"
    if key in TILE_OVERRIDE:
        return TILE_OVERRIDE[key]
    if A.SIM:
        return (8, 8, 4, 2, 2)
    return (128, 64, 8, 8, 4) if glu else (128, 128, 8, 8, 8)


def _skinny_cfg():
    """(BMS, NT, KC, UNROLL): rows per tile, threads (= columns) per block, K chunk, unroll."""
    if "skinny" in TILE_OVERRIDE:
        return TILE_OVERRIDE["skinny"]
    if A.SIM:
        return (4, 8, 8, 2)
    return (8, 128, 256, 8)


# ------------------------------------------------------------- tile tables
def _tiles(off_host, bm, select):
    """Host table ``[n, 3]`` int64 of (expert, row0, row1) tiles of ``bm`` rows for the
    experts whose row count passes ``select``."""
    rows = []
    for e in range(off_host.shape[0] - 1):
        lo, hi = int(off_host[e]), int(off_host[e + 1])
        if hi > lo and select(hi - lo):
            for r in range(lo, hi, bm):
                rows.append((e, r, min(hi, r + bm)))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


class _Work:
    """The tile tables of one grouped problem (host offsets -> device tables)."""

    def __init__(self, off_host, glu, force=None):
        counts = np.diff(off_host)
        self.n_rows = int(off_host[-1])
        cfg_t = _tiled_cfg(glu)
        cfg_s = _skinny_cfg()
        if force == "tiled":
            small = lambda c: False  # noqa: E731
        elif force == "skinny":
            small = lambda c: True  # noqa: E731
        else:
            small = lambda c: c <= SKINNY_MAX_ROWS  # noqa: E731
        self.skinny = _tiles(off_host, cfg_s[0], small)
        self.tiled = _tiles(off_host, cfg_t[0], lambda c: not small(c))
        self.max_count = int(counts.max()) if counts.size else 0
        self._dev = {}

    def device(self, which):
        if which not in self._dev:
            tab = self.skinny if which == "skinny" else self.tiled
            self._dev[which] = cuda.to_device(tab) if tab.shape[0] else None
        return self._dev[which]

    def describe(self):
        parts = []
        if self.tiled.shape[0]:
            parts.append("tiled")
        if self.skinny.shape[0]:
            parts.append("skinny")
        return "+".join(parts) or "none"


# ------------------------------------------------------------------- public
def expert_ffn(xs, offsets, w_gate, w_up, w_down, *, activation="silu", b_gate=None,
               b_up=None, b_down=None, limit=None, alpha=1.702):
    """Device twin of :func:`numoe.expert_ffn` (numba device array out)."""
    from ..experts import _check_expert_options

    opts = _check_expert_options(activation, limit, alpha, w_up is not None)
    xs = A.float_arg("xs", xs, ndim=2)
    N, H = tuple(xs.shape)
    wg, wu, wd, bg, bu, bd, E, F = _check_weights(xs.dtype, H, w_gate, w_up, w_down,
                                                  b_gate, b_up, b_down)
    off = _offsets_host(offsets, E, N)
    ys = A.empty((N, H), xs.dtype)
    if N == 0:
        return ys
    run_ffn(xs, None, 0, off, wg, wu, wd, bg, bu, bd, opts.code, opts.limit, opts.alpha,
            ys, None, None)
    return ys


def moe_ffn(x, plan_order, k, offsets, w_gate, w_up, w_down, *, activation="silu",
            b_gate=None, b_up=None, b_down=None, limit=None, alpha=1.702, weights=None,
            gemm=None):
    """Fused expert stage of a layer: rows gathered through the plan, routing weight
    applied in the down-projection epilogue.

    Returns ``ys [N, H]`` with ``ys[i] = w_flat[order[i]] * ffn_e(x[order[i] // k])``
    (without the factor when ``weights`` is None); combine with
    :func:`numoe._cuda.dispatch.combine` (``weighted=False``). Arguments are
    trusted (the layer made them); ``offsets`` may be a host or device array.
    """
    from ..experts import _check_expert_options

    opts = _check_expert_options(activation, limit, alpha, w_up is not None)
    T, H = tuple(x.shape)
    wg, wu, wd, bg, bu, bd, E, F = _check_weights(x.dtype, H, w_gate, w_up, w_down,
                                                  b_gate, b_up, b_down)
    off = offsets if isinstance(offsets, np.ndarray) else A.as_device(
        "offsets", offsets).copy_to_host()
    off = np.asarray(off, dtype=np.int64)
    N = int(off[-1])
    ys = A.empty((N, H), x.dtype)
    if N == 0:
        return ys
    wflat = None if weights is None else A.reshape(A.astype(weights, x.dtype),
                                                   (weights.size,))
    run_ffn(x, plan_order, k, off, wg, wu, wd, bg, bu, bd, opts.code, opts.limit,
            opts.alpha, ys, plan_order if wflat is not None else None, wflat, gemm=gemm)
    return ys


def _check_weights(dtype, H, w_gate, w_up, w_down, b_gate, b_up, b_down):
    wg = A.as_device("w_gate", w_gate)
    A.check_float("w_gate", wg, ndim=3)
    E, Hg, F = tuple(wg.shape)
    if E < 1:
        raise ValueError(f"w_gate must hold at least one expert, got shape {(E, Hg, F)}")
    if Hg != H:
        raise ValueError(f"w_gate must have shape (E, {H}, F) to match xs [N, {H}], "
                         f"got {(E, Hg, F)}")
    wg = _weight("w_gate", wg, dtype, (E, H, F))
    wu = None if w_up is None else _weight("w_up", w_up, dtype, (E, H, F))
    wd = _weight("w_down", w_down, dtype, (E, F, H))
    if w_up is None and b_up is not None:
        raise ValueError("b_up was given but w_up is None (plain FFN experts have no up bias)")
    bg = None if b_gate is None else _weight("b_gate", b_gate, dtype, (E, F))
    bu = None if b_up is None else _weight("b_up", b_up, dtype, (E, F))
    bd = None if b_down is None else _weight("b_down", b_down, dtype, (E, H))
    return wg, wu, wd, bg, bu, bd, E, F


def _weight(name, a, dtype, shape):
    w = A.as_device(name, a)
    A.check_float(name, w)
    if w.dtype != dtype:
        raise TypeError(f"{name} has dtype {w.dtype} but xs is {np.dtype(dtype).name}; "
                        f"cast the weights once (e.g. {name}.astype(np.{np.dtype(dtype).name}))"
                        " -- a per-call cast would copy every expert")
    A.check_shape(name, w, shape)
    return A.contiguous(w)


def _offsets_host(offsets, E, N):
    """Offsets copied to the host (one small synchronising copy) and validated there."""
    o = A.as_device("offsets", offsets)
    if o.dtype.kind not in "iu":
        raise TypeError(f"offsets must be an integer array, got dtype {o.dtype}")
    A.check_shape("offsets", o, (E + 1,))
    arr = np.ascontiguousarray(o.copy_to_host(), dtype=np.int64)
    if arr[0] != 0 or arr[-1] != N:
        raise ValueError(f"offsets must start at 0 and end at the number of rows of xs "
                         f"({N}); got {int(arr[0])} .. {int(arr[-1])}")
    if np.any(np.diff(arr) < 0):
        raise ValueError("offsets must be nondecreasing")
    return arr


# -------------------------------------------------------------- the driver
def _gemm_mode(gemm):
    mode = gemm or os.environ.get("NUMOE_CUDA_GEMM", "numba")
    if mode == "cublas":
        try:
            import cupy  # noqa: F401
        except ImportError:
            mode = "numba"
    return mode


def run_ffn(a, gidx, kdiv, off, wg, wu, wd, bg, bu, bd, code, limit, alpha, out,
            sidx, sval, *, gemm=None, force=None):
    """Grouped FFN over validated device arrays; ``off`` is a host int64 array.

    ``a`` is ``xs [N, H]`` (``gidx`` None) or the token matrix read through
    ``gidx``/``kdiv``; ``sidx``/``sval`` give the optional per-row scale
    ``sval[sidx[r]]`` of the output.
    """
    N = int(off[-1])
    E, H, F = tuple(wg.shape)
    glu = wu is not None
    dt = a.dtype
    hbuf = A.empty((N, F), dt)
    mode = _gemm_mode(gemm)
    work = _Work(off, glu, force)
    dummy = A.empty((1,), dt)         # stand-ins of the right types for absent arrays
    dummy2 = A.empty((1, 1), dt)
    didx = A.empty((1,), np.int64)
    g_idx = gidx if gidx is not None else didx
    s_idx = sidx if sidx is not None else didx
    s_val = sval if sval is not None else dummy
    if mode == "cublas" and work.max_count > SKINNY_MAX_ROWS:
        from . import _cublas

        path = _cublas.run_ffn(a, gidx, kdiv, off, wg, wu, wd, bg, bu, bd, code, limit,
                               alpha, out, sidx, sval, work, hbuf)
        last_path.clear()
        last_path.update(path)
        return out
    # layer 1: gate (+up) with the activation
    if glu:
        grouped_glu(a, g_idx, kdiv if gidx is not None else 0, wg, wu,
                    bg if bg is not None else dummy2, bg is not None,
                    bu if bu is not None else dummy2, bu is not None,
                    code, limit, alpha, hbuf, work)
    else:
        grouped_plain(a, g_idx, kdiv if gidx is not None else 0, wg,
                      bg if bg is not None else dummy2, bg is not None, code, alpha,
                      didx, dummy, False, hbuf, work)
    # layer 2: down projection (+bias, x routing weight)
    grouped_plain(hbuf, didx, 0, wd, bd if bd is not None else dummy2, bd is not None,
                  ACT_NONE, alpha, s_idx, s_val, sidx is not None, out, work)
    last_path.clear()
    last_path.update({"up": work.describe(), "down": work.describe(), "gemm": "numba"})
    return out


def grouped_glu(a, gidx, kdiv, wg, wu, bg, use_bg, bu, use_bu, code, limit, alpha, h, work):
    """``h[r] = glu(a_r @ wg[e] + bg[e], a_r @ wu[e] + bu[e])`` over the work's tiles."""
    _launch(True, a, gidx, kdiv, wg, wu, bg, use_bg, bu, use_bu, code, limit, alpha,
            gidx, A.empty((1,), a.dtype), False, h, work)


def grouped_plain(a, gidx, kdiv, w, b, use_b, code, alpha, sidx, sval, use_scale, out, work):
    """``out[r] = act(a_r @ w[e] + b[e]) * sval[sidx[r]]`` over the work's tiles."""
    _launch(False, a, gidx, kdiv, w, w, b, use_b, b, False, code, 0.0, alpha,
            sidx, sval, use_scale, out, work)


def _flat(x):
    return A.reshape(x, (x.size,))


def _launch(glu, a, gidx, kdiv, w1, w2, b1, use_b1, b2, use_b2, code, limit, alpha,
            sidx, sval, use_scale, out, work):
    K = a.shape[1]
    NO = out.shape[1]
    dt = str(a.dtype)
    args = (_flat(a), gidx, kdiv, K, _flat(w1), _flat(w2), NO, _flat(b1), use_b1,
            _flat(b2), use_b2, code, limit, alpha, sidx, sval, use_scale, _flat(out))
    tab = work.device("tiled")
    if tab is not None:
        kern, nthreads, smem = _tiled(dt, glu, *_tiled_cfg(glu))
        ntiles = work.tiled.shape[0]
        BN = _tiled_cfg(glu)[1]
        grid = (min(ntiles, 65535), -(-NO // BN))
        kern[grid, nthreads, 0, smem](*args, tab, ntiles)
    tab = work.device("skinny")
    if tab is not None:
        BMS, NT, KC, UN = _skinny_cfg()
        kern, smem = _skinny(dt, glu, BMS, NT, KC, UN)
        ntiles = work.skinny.shape[0]
        grid = (min(ntiles, 65535), -(-NO // NT))
        kern[grid, NT, 0, smem](*args, tab, ntiles)


# ------------------------------------------------------------ device maths
@cuda.jit(device=True)
def act_value(v, code):
    """Activation of a float64 (codes of ``numoe.experts.ACTIVATIONS``; -1: identity)."""
    if code == 0:
        return v / (1.0 + math.exp(-v))
    if code == 1:
        return 0.5 * v * (1.0 + math.erf(v * 0.7071067811865476))
    if code == 2:
        return 0.5 * v * (1.0 + math.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
    if code == 3:
        return 0.0 if v < 0.0 else v
    return v


@cuda.jit(device=True)
def glu_value(g, u, code, limit, alpha):
    """``act(g) * u`` or the gpt-oss clamped SwiGLU (code 4), float64."""
    if code == 4:
        if g > limit:
            g = limit
        if u > limit:
            u = limit
        elif u < -limit:
            u = -limit
        return (u + 1.0) * g / (1.0 + math.exp(-alpha * g))
    return act_value(g, code) * u


def _ftype(dtype):
    return float32 if dtype == "float32" else float64


# ----------------------------------------------------------- tiled kernels
# Index arithmetic in the kernels below is unsigned (uint64): numba then emits
# no negative-index wraparound code, and the shared-memory addresses of the
# unrolled inner loops fold into one base plus immediate offsets.
_SENT = np.uint64(0xFFFFFFFFFFFFFFFF)     # "no row" marker


@functools.lru_cache(maxsize=None)
def _tiled(dtype, glu, BM, BN, BK, TM, TN):
    """Tiled grouped GEMM; returns (kernel, threads, dynamic shared bytes).

    ``glu``: ``out = glu(A @ W1[e] + b1, A @ W2[e] + b2)``; else
    ``out = act(A @ W1[e] + b1) * scale[row]`` (``code < 0``: no activation).
    All arrays are flat (1-D) views; ``K`` and ``NO`` give the row lengths.
    """
    ft = _ftype(dtype)
    U = np.uint64
    NTX = BN // TN
    NTY = BM // TM
    NT = NTX * NTY
    assert NT % BK == 0 and NT % BN == 0 and (BM * BK) % NT == 0 and (BK * BN) % NT == 0
    TMN = TM * TN
    LA = BM * BK // NT          # A elements per thread and k-slice
    LB = BK * BN // NT          # B elements per thread and k-slice
    LDA = BM + 4                # padded A row (k-major): conflict-free stores
    ASZ = BK * LDA
    BSZ = BK * BN
    NB = 2 if glu else 1
    STAGE = ASZ + NB * BSZ
    uNTX, uNTY, uBK, uBN, uLDA = U(NTX), U(NTY), U(BK), U(BN), U(LDA)
    uASZ, uBSZ, uSTAGE, uSA, uSB = U(ASZ), U(BSZ), U(STAGE), U(NT // BK), U(NT // BN)
    zero = ft(0)
    smem = 2 * STAGE * np.dtype(dtype).itemsize

    @cuda.jit
    def kern(a, gidx, kdiv, K, w1, w2, NO, b1, use_b1, b2, use_b2, code, limit, alpha,
             sidx, sval, use_scale, out, tiles, ntiles):
        sm = cuda.shared.array(0, ft)
        tid = U(cuda.threadIdx.x)
        tx = tid % uNTX
        ty = tid // uNTX
        uK = U(K)
        uNO = U(NO)
        n0 = U(cuda.blockIdx.y) * uBN
        akk = tid % uBK
        amm = tid // uBK
        bnn = tid % uBN
        bkk = tid // uBN
        acc1 = cuda.local.array((TM, TN), ft)
        acc2 = cuda.local.array((TM, TN), ft)
        tmp1 = cuda.local.array(TMN, ft)
        tmp2 = cuda.local.array(TMN, ft)
        af = cuda.local.array(TM, ft)
        f1 = cuda.local.array(TN, ft)
        f2 = cuda.local.array(TN, ft)
        ra = cuda.local.array(LA, ft)
        r1b = cuda.local.array(LB, ft)
        r2b = cuda.local.array(LB, ft)
        arow = cuda.local.array(LA, np.uint64)
        nk = (uK + uBK - U(1)) // uBK
        col = n0 + bnn
        col_ok = col < uNO
        for t in range(cuda.blockIdx.x, ntiles, cuda.gridDim.x):
            e = U(tiles[t, 0])
            r0 = U(tiles[t, 1])
            rend = U(tiles[t, 2])
            wbase = e * uK * uNO + col
            for l in range(LA):
                r = r0 + amm + U(l) * uSA
                if r < rend:
                    if kdiv > 0:
                        arow[l] = (U(gidx[r]) // U(kdiv)) * uK
                    else:
                        arow[l] = r * uK
                else:
                    arow[l] = _SENT
            for i in range(TM):
                for j in range(TN):
                    acc1[i, j] = zero
                    acc2[i, j] = zero
            for l in range(LA):       # prologue: k-slice 0 into registers
                ra[l] = a[arow[l] + akk] if (arow[l] != _SENT and akk < uK) else zero
            for l in range(LB):
                kq = bkk + U(l) * uSB
                ok = col_ok and kq < uK
                r1b[l] = w1[wbase + kq * uNO] if ok else zero
                if glu:
                    r2b[l] = w2[wbase + kq * uNO] if ok else zero
            for kt in range(nk):
                base = (U(kt) % U(2)) * uSTAGE
                for l in range(LA):
                    sm[base + akk * uLDA + amm + U(l) * uSA] = ra[l]
                for l in range(LB):
                    o = base + uASZ + (bkk + U(l) * uSB) * uBN + bnn
                    sm[o] = r1b[l]
                    if glu:
                        sm[o + uBSZ] = r2b[l]
                cuda.syncthreads()
                if U(kt) + U(1) < nk:   # next slice's global loads overlap the maths
                    k0 = (U(kt) + U(1)) * uBK
                    for l in range(LA):
                        kq = k0 + akk
                        ra[l] = a[arow[l] + kq] if (arow[l] != _SENT and kq < uK) else zero
                    for l in range(LB):
                        kq = k0 + bkk + U(l) * uSB
                        ok = col_ok and kq < uK
                        r1b[l] = w1[wbase + kq * uNO] if ok else zero
                        if glu:
                            r2b[l] = w2[wbase + kq * uNO] if ok else zero
                for kk in range(BK):
                    ab = base + U(kk) * uLDA + ty
                    bb = base + uASZ + U(kk) * uBN + tx
                    for i in range(TM):
                        af[i] = sm[ab + U(i) * uNTY]
                    for j in range(TN):
                        f1[j] = sm[bb + U(j) * uNTX]
                        if glu:
                            f2[j] = sm[bb + uBSZ + U(j) * uNTX]
                    for i in range(TM):
                        for j in range(TN):
                            acc1[i, j] += af[i] * f1[j]
                            if glu:
                                acc2[i, j] += af[i] * f2[j]
            # Copy the register tile out with constant indices (keeps the
            # accumulators in registers), then run the branchy epilogue.
            for i in range(TM):
                for j in range(TN):
                    tmp1[i * TN + j] = acc1[i, j]
                    if glu:
                        tmp2[i * TN + j] = acc2[i, j]
            for i in range(TM):
                r = r0 + ty + U(i) * uNTY
                if r < rend:
                    s = 1.0
                    if use_scale:
                        s = float64(sval[U(sidx[r])])
                    for j in range(TN):
                        c = n0 + tx + U(j) * uNTX
                        if c < uNO:
                            v = float64(tmp1[i * TN + j])
                            if use_b1:
                                v += float64(b1[e * uNO + c])
                            if glu:
                                u = float64(tmp2[i * TN + j])
                                if use_b2:
                                    u += float64(b2[e * uNO + c])
                                v = glu_value(v, u, code, limit, alpha)
                            else:
                                if code >= 0:
                                    v = act_value(v, code)
                                if use_scale:
                                    v = v * s
                            out[r * uNO + c] = v
            cuda.syncthreads()

    return kern, NT, smem


# ---------------------------------------------------------- skinny kernels
@functools.lru_cache(maxsize=None)
def _skinny(dtype, glu, BMS, NT, KC, UN):
    """Skinny grouped GEMM (few rows per expert): ``BMS`` rows per tile staged in
    shared memory ``KC`` columns at a time, one output column per thread, the
    weights streamed from global memory ``UN`` rows per step. Same arguments and
    epilogues as :func:`_tiled`; returns (kernel, dynamic shared bytes)."""
    ft = _ftype(dtype)
    U = np.uint64
    uNT, uKC, uUN = U(NT), U(KC), U(UN)
    zero = ft(0)
    smem = BMS * KC * np.dtype(dtype).itemsize

    @cuda.jit
    def kern(a, gidx, kdiv, K, w1, w2, NO, b1, use_b1, b2, use_b2, code, limit, alpha,
             sidx, sval, use_scale, out, tiles, ntiles):
        sm = cuda.shared.array(0, ft)
        tid = U(cuda.threadIdx.x)
        uK = U(K)
        uNO = U(NO)
        c = U(cuda.blockIdx.y) * uNT + tid
        acc1 = cuda.local.array(BMS, ft)
        acc2 = cuda.local.array(BMS, ft)
        v1 = cuda.local.array(UN, ft)
        v2 = cuda.local.array(UN, ft)
        for t in range(cuda.blockIdx.x, ntiles, cuda.gridDim.x):
            e = U(tiles[t, 0])
            r0 = U(tiles[t, 1])
            rend = U(tiles[t, 2])
            for i in range(BMS):
                acc1[i] = zero
                acc2[i] = zero
            k0 = U(0)
            while k0 < uK:
                kc = min(uKC, uK - k0)
                cuda.syncthreads()
                for idx in range(cuda.threadIdx.x, BMS * KC, NT):
                    ui = U(idx) // uKC
                    kk = U(idx) % uKC
                    r = r0 + ui
                    v = zero
                    if r < rend and kk < kc:
                        src = r
                        if kdiv > 0:
                            src = U(gidx[r]) // U(kdiv)
                        v = a[src * uK + k0 + kk]
                    sm[idx] = v
                cuda.syncthreads()
                if c < uNO:
                    wp = (e * uK + k0) * uNO + c
                    kk = U(0)
                    while kk + uUN <= kc:
                        for u in range(UN):
                            v1[u] = w1[wp + (kk + U(u)) * uNO]
                            if glu:
                                v2[u] = w2[wp + (kk + U(u)) * uNO]
                        for u in range(UN):
                            for i in range(BMS):
                                x = sm[U(i) * uKC + kk + U(u)]
                                acc1[i] += x * v1[u]
                                if glu:
                                    acc2[i] += x * v2[u]
                        kk += uUN
                    while kk < kc:
                        g1 = w1[wp + kk * uNO]
                        g2 = g1
                        if glu:
                            g2 = w2[wp + kk * uNO]
                        for i in range(BMS):
                            x = sm[U(i) * uKC + kk]
                            acc1[i] += x * g1
                            if glu:
                                acc2[i] += x * g2
                        kk += U(1)
                k0 += uKC
            if c < uNO:
                for i in range(BMS):
                    r = r0 + U(i)
                    if r < rend:
                        v = float64(acc1[i])
                        if use_b1:
                            v += float64(b1[e * uNO + c])
                        if glu:
                            u = float64(acc2[i])
                            if use_b2:
                                u += float64(b2[e * uNO + c])
                            v = glu_value(v, u, code, limit, alpha)
                        else:
                            if code >= 0:
                                v = act_value(v, code)
                            if use_scale:
                                v = v * float64(sval[U(sidx[r])])
                        out[r * uNO + c] = v

    return kern, smem
