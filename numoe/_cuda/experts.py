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

16-bit storage: activations and weights arrive as bits (``uint16`` views) and
are widened in registers by :mod:`numoe._cuda._narrow` (each kernel is
compiled per storage kind), accumulation is float32, results are narrowed
once on store; bfloat16/float16 weights may serve float32 activations.
When activations and weights share one 16-bit dtype, experts with more than
``SKINNY_MAX_ROWS`` rows -- and every expert of a batch of at most
``DECODE_MAX_ROWS`` tokens -- run on the tensor cores (:mod:`numoe._cuda.mma`,
``mma.sync`` from linked CUDA C++), with these numba kernels and the 16-bit GEMV
(:mod:`numoe._cuda.decode`) as the fallback.

When CuPy is installed, float32/float64 experts with more than
``SKINNY_MAX_ROWS`` rows go to cuBLAS through CuPy by default (measured faster on an H200: 15.1 vs
20.1 ms for the OLMoE-shaped T=4096 expert stage); ``NUMOE_CUDA_GEMM=numba``
or ``gemm="numba"`` keeps everything in the numba kernels. :data:`last_path`
records which path ran.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
from numba import cuda, float32, float64, int64

from . import _arrays as A
from . import _narrow
from ._launch import launch

#: which kernels the last call used, e.g. {"glu": "tiled+skinny", "down": "tiled"}
last_path: dict = {}

ACT_NONE = -1
SKINNY_MAX_ROWS = 48        # experts with at most this many rows use the skinny kernel
# With the 16-bit GEMV on and at most this many tokens, every expert goes through it,
# or from MMA_DECODE_FROM tokens on through the tensor cores (32-row tiles) when they run
# here: faster at every T measured (H200, 2026-12-02, OLMoE bf16 graph wall, T = 1, 4,
# 8, 16, 64: 0.225, 0.313, 0.467, 0.442, 0.471 ms vs 0.254, 0.448, 0.487, 0.612, 0.751).
DECODE_MAX_ROWS = 64
MMA_DECODE_FROM = 1


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
class _Work:
    """The work list of one grouped problem: (expert, row0, row1) tiles, built on the device.

    ``offsets`` is a device int array ``[E+1]`` and ``n_rows`` its last value
    (known on the host). One one-block kernel walks the experts and
    appends each expert's row tiles to the skinny table (experts with at most
    ``max_small`` rows) or to the tiled one; the GEMM kernels read the tile
    counts from the device, so nothing is copied back to the host. A table
    is built per tile height (the skinny and the tiled kernels' ``BM``).
    Launch grids use host upper bounds; blocks without a tile exit at once.
    """

    def __init__(self, offsets, n_rows, force=None, max_small=SKINNY_MAX_ROWS):
        self.offsets = offsets
        self.n_rows = int(n_rows)
        self.E = offsets.shape[0] - 1
        if force == "tiled":
            self.max_small = -1
        elif force == "skinny":
            self.max_small = self.n_rows + 1
        else:
            self.max_small = max_small
        self.force = force
        self._tabs = {}

    def has(self, which):
        """Whether kernels of this family can have tiles (host bound, no sync)."""
        if which == "skinny":
            return self.max_small >= 1
        return self.n_rows > self.max_small

    def tables(self, bm_small, bm_big):
        """Device ``(tiles_small, tiles_big, counts[2])`` for these tile heights."""
        key = (bm_small, bm_big)
        if key not in self._tabs:
            cap_s = max(1, min(-(-self.n_rows // bm_small) + self.E,
                               self.E * max(1, -(-max(self.max_small, 1) // bm_small))))
            cap_b = max(1, -(-self.n_rows // bm_big) + self.E)
            ts = A.empty((cap_s, 3), np.int64)
            tb = A.empty((cap_b, 3), np.int64)
            cnt = A.empty((2,), np.int64)
            nt = A.block(256)
            launch(_build_tiles, 1, nt, 2 * nt * 8, self.offsets, self.max_small, bm_small,
                   bm_big, ts, tb, cnt)
            self._tabs[key] = (ts, tb, cnt, cap_s, cap_b)
        return self._tabs[key]

    def describe(self):
        parts = [w for w in ("tiled", "skinny") if self.has(w)]
        return "+".join(parts) or "none"


@cuda.jit
def _build_tiles(off, max_small, bm_small, bm_big, ts, tb, cnt):
    """One block: split each expert's rows into tiles of the small or the big kind.

    Experts are taken ``blockDim`` at a time: each thread counts its expert's
    tiles, a block scan (Hillis-Steele over both kinds in shared memory) gives each
    expert its first slot, then the whole block writes the experts' tiles one expert
    after another -- the tables a serial walk over the experts would write.
    """
    sh = cuda.shared.array(0, int64)          # [2 * blockDim]: small, big
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    E = off.shape[0] - 1
    base_s = int64(0)
    base_b = int64(0)
    for e0 in range(0, E, nt):
        e = e0 + tid
        ns = int64(0)
        nb = int64(0)
        if e < E:
            c = int64(off[e + 1]) - int64(off[e])
            if c > 0:
                if c <= max_small:
                    ns = (c + bm_small - 1) // bm_small
                else:
                    nb = (c + bm_big - 1) // bm_big
        sh[tid] = ns
        sh[nt + tid] = nb
        cuda.syncthreads()
        d = 1
        while d < nt:
            a = sh[tid - d] if tid >= d else 0
            b = sh[nt + tid - d] if tid >= d else 0
            cuda.syncthreads()
            sh[tid] += a
            sh[nt + tid] += b
            cuda.syncthreads()
            d *= 2
        for j in range(min(nt, E - e0)):      # inclusive sums: slot = base + sum - own
            lo = int64(off[e0 + j])
            hi = int64(off[e0 + j + 1])
            c = hi - lo
            if c <= 0:
                continue
            small = c <= max_small
            bm = bm_small if small else bm_big
            tab = ts if small else tb
            n = (c + bm - 1) // bm
            first = (base_s + sh[j] if small else base_b + sh[nt + j]) - n
            for i in range(tid, n, nt):
                if first + i < tab.shape[0]:
                    r = lo + i * bm
                    tab[first + i, 0] = e0 + j
                    tab[first + i, 1] = r
                    tab[first + i, 2] = min(hi, r + bm)
        base_s += sh[nt - 1]
        base_b += sh[2 * nt - 1]
        cuda.syncthreads()
    if tid == 0:
        cnt[0] = min(base_s, ts.shape[0])
        cnt[1] = min(base_b, tb.shape[0])


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
    off = _offsets_checked(offsets, E, N)
    ys = A.empty((N, H), xs.dtype)
    if N == 0:
        return ys
    run_ffn(xs, None, 0, off, N, wg, wu, wd, bg, bu, bd, opts.code, opts.limit, opts.alpha,
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
    trusted (the layer made them); ``offsets`` is the plan's device array.
    """
    from ..experts import _check_expert_options

    opts = _check_expert_options(activation, limit, alpha, w_up is not None)
    T, H = tuple(x.shape)
    wg, wu, wd, bg, bu, bd, E, F = _check_weights(x.dtype, H, w_gate, w_up, w_down,
                                                  b_gate, b_up, b_down)
    off = A.as_device("offsets", offsets)
    N = int(plan_order.shape[0])
    ys = A.empty((N, H), x.dtype)
    if N == 0:
        return ys
    wflat = None if weights is None else A.reshape(
        A.astype(weights, A.compute_dtype(x.dtype)), (weights.size,))
    run_ffn(x, plan_order, k, off, N, wg, wu, wd, bg, bu, bd, opts.code, opts.limit,
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
    for name, w in (("w_up", wu), ("w_down", wd)):
        if w is not None and w.dtype != wg.dtype:
            raise TypeError(f"{name} has dtype {w.dtype} but w_gate is {wg.dtype}; all "
                            "expert weights must share one dtype")
    if w_up is None and b_up is not None:
        raise ValueError("b_up was given but w_up is None (plain FFN experts have no up bias)")
    ct = A.compute_dtype(dtype)          # biases are small: cast to the compute dtype
    bg = None if b_gate is None else _bias("b_gate", b_gate, ct, (E, F))
    bu = None if b_up is None else _bias("b_up", b_up, ct, (E, F))
    bd = None if b_down is None else _bias("b_down", b_down, ct, (E, H))
    return wg, wu, wd, bg, bu, bd, E, F


def _weight(name, a, dtype, shape):
    """An expert weight: ``xs``'s dtype, or 16-bit storage (bfloat16/float16 weights
    with wider activations are widened in registers, never copied)."""
    w = A.as_device(name, a)
    A.check_float(name, w)
    if w.dtype != dtype and w.dtype not in A.NARROW:
        raise TypeError(f"{name} has dtype {w.dtype} but xs is {np.dtype(dtype).name}; "
                        f"cast the weights once (e.g. {name}.astype(np.{np.dtype(dtype).name}))"
                        " -- a per-call cast would copy every expert")
    A.check_shape(name, w, shape)
    return A.contiguous(w)


def _bias(name, a, ct, shape):
    b = A.as_device(name, a)
    A.check_float(name, b)
    A.check_shape(name, b, shape)
    return A.astype(b, ct)


def _offsets_checked(offsets, E, N):
    """Device offsets, validated through a small synchronising copy to the host."""
    o = A.as_device("offsets", offsets)
    if o.dtype.kind not in "iu":
        raise TypeError(f"offsets must be an integer array, got dtype {o.dtype}")
    A.check_shape("offsets", o, (E + 1,))
    o = A.int_arg("offsets", o)
    arr = np.ascontiguousarray(o.copy_to_host(), dtype=np.int64)
    if arr[0] != 0 or arr[-1] != N:
        raise ValueError(f"offsets must start at 0 and end at the number of rows of xs "
                         f"({N}); got {int(arr[0])} .. {int(arr[-1])}")
    if np.any(np.diff(arr) < 0):
        raise ValueError("offsets must be nondecreasing")
    return o


# -------------------------------------------------------------- the driver
def _gemm_mode(gemm):
    """"numba" or "cublas": ``gemm`` if given, else ``NUMOE_CUDA_GEMM``, else "auto"
    (cuBLAS through CuPy when CuPy imports -- measured faster for experts with many
    rows -- otherwise the numba kernels). ``gemm="graph"`` (a CUDA-graph capture,
    :mod:`numoe._cuda.graph`): the numba kernels, with the 16-bit decode GEMV and the
    tensor cores allowed, never cuBLAS (its host read-back cannot be captured)."""
    mode = gemm or os.environ.get("NUMOE_CUDA_GEMM", "auto")
    if mode in ("cublas", "auto") and not A.SIM:
        try:
            import cupy  # noqa: F401
            return "cublas"
        except ImportError:
            return "numba"
    return "numba"


def run_ffn(a, gidx, kdiv, off, N, wg, wu, wd, bg, bu, bd, code, limit, alpha, out,
            sidx, sval, *, gemm=None, force=None):
    """Grouped FFN over validated device arrays.

    ``off`` is the device ``[E+1]`` offsets array and ``N`` its last value.
    ``a`` is ``xs [N, H]`` (``gidx`` None) or the token matrix read through
    ``gidx``/``kdiv``; ``sidx``/``sval`` give the optional per-row scale
    ``sval[sidx[r]]`` of the output. No host synchronisation on the numba
    path.
    """
    N = int(N)
    E, H, F = tuple(wg.shape)
    glu = wu is not None
    dt = A.compute_dtype(a.dtype)     # float32 for 16-bit activations
    narrow = a.dtype in A.NARROW or wg.dtype in A.NARROW or out.dtype in A.NARROW
    if sval is not None:
        sval = A.compute(sval)
    mode = "numba" if (force or narrow) else _gemm_mode(gemm)   # forcing a family: numba
    kd = kdiv if gidx is not None else 0
    rb = _rows_bound(a, gidx, kd, N)
    dec = gemm != "numba" and not force and _decode_ok(a, wg, wu, wd)
    # 16-bit experts run on the tensor cores at every size where they can: every expert
    # of the call there (a rare expert with few rows costs one part-empty tile; a GEMV or
    # numba kernel beside it would cost launches and their host time on every call), in
    # 32-row tiles at decode sizes (each weight tile read once per expert). Decode-sized
    # batches where they cannot, or below NUMOE_CUDA_MMA_DECODE_FROM tokens (tuning), go
    # through the split-K GEMV (row tiles of <= 8, weights re-read per tile).
    gemv = dec and rb <= DECODE_MAX_ROWS
    mma = (narrow and not force and gemm != "numba"
           and not (gemv and rb < _mma_decode_from()) and _mma_module().usable(a, wg, wu, wd))
    work = _Work(off, N, "tiled" if mma else "skinny" if gemv else force,
                 _cublas_min_rows() if mode == "cublas" else SKINNY_MAX_ROWS)
    dummy = A.dummy(dt)               # stand-ins of the right types for absent arrays
    didx = A.dummy(np.int64)
    g_idx = gidx if gidx is not None else didx
    s_idx = sidx if sidx is not None else didx
    s_val = sval if sval is not None else dummy
    if mode == "cublas" and work.has("tiled"):
        from . import _cublas

        path = _cublas.run_ffn(a, gidx, kdiv, off, wg, wu, wd, bg, bu, bd, code, limit,
                               alpha, out, sidx, sval, work, A.empty((N, F), dt))
        last_path.clear()
        last_path.update(path)
        return out
    if mma and _run_mma(a, gidx, kdiv, wg, wu, wd, bg, bu, bd, code, limit,
                                          alpha, out, sidx, sval, work, N, F):
        return out
    only = "tiled" if dec else None
    hbuf = A.empty((N, F), dt)
    # layer 1: gate (+up) with the activation
    if glu:
        grouped_glu(a, g_idx, kd, wg, wu,
                    bg if bg is not None else dummy, bg is not None,
                    bu if bu is not None else dummy, bu is not None,
                    code, limit, alpha, hbuf, work, only)
    else:
        grouped_plain(a, g_idx, kd, wg,
                      bg if bg is not None else dummy, bg is not None, code, alpha,
                      didx, dummy, False, hbuf, work, only)
    if dec:
        _decode_layer(True, a, g_idx, kd, wg, wu, bg, bu, code, limit, alpha, None, None,
                      hbuf, work, rb)
    # layer 2: down projection (+bias, x routing weight)
    grouped_plain(hbuf, didx, 0, wd, bd if bd is not None else dummy, bd is not None,
                  ACT_NONE, alpha, s_idx, s_val, sidx is not None, out, work, only)
    if dec:
        _decode_layer(False, hbuf, didx, 0, wd, None, bd, None, ACT_NONE, 0.0, alpha, sidx,
                      sval, out, work, rb)
    desc = work.describe().replace("skinny", "gemv16") if dec else work.describe()
    last_path.clear()
    last_path.update({"up": desc, "down": desc, "gemm": "numba", "work": work})
    return out


def _cublas_min_rows():
    """Experts with more rows than this go to cuBLAS on the cuBLAS path
    (``NUMOE_CUDA_CUBLAS_MIN_ROWS``, for tuning; default ``SKINNY_MAX_ROWS``)."""
    return int(os.environ.get("NUMOE_CUDA_CUBLAS_MIN_ROWS", SKINNY_MAX_ROWS))


def _rows_bound(a, gidx, kdiv, N):
    """Host bound on any expert's rows: the tokens when rows are read through a routing
    (top-k picks an expert once per token; a larger count only costs speed), else ``N``."""
    return min(N, int(a.shape[0])) if gidx is not None and kdiv > 0 else N


def _mma_decode_from():
    """Tokens from which a decode-sized 16-bit batch runs every expert on the tensor
    cores (32-row tiles, weights read once per tile) instead of the GEMV
    (``NUMOE_CUDA_MMA_DECODE_FROM`` overrides it, for tuning)."""
    return int(os.environ.get("NUMOE_CUDA_MMA_DECODE_FROM", MMA_DECODE_FROM))


def _decode_ok(a, wg, wu, wd):
    """The 16-bit split-K GEMV (:mod:`numoe._cuda.decode`) for the few-row experts?

    On by default for 16-bit weights and float32/16-bit activations (it sums in
    float32; float64 ``a`` keeps the float64 kernels); ``NUMOE_CUDA_DECODE=0`` turns
    it off. It streams the touched experts' weights with every SM busy, where the
    skinny kernel has one block per tile and 128 columns."""
    if (os.environ.get("NUMOE_CUDA_DECODE", "1") == "0"
            or A.compute_dtype(a.dtype) != np.float32):
        return False
    from . import decode

    E, H, F = tuple(wg.shape)
    return (decode.usable(wg, F) and (wu is None or decode.usable(wu, F))
            and decode.usable(wd, H))


def _decode_layer(first, a, gidx, kdiv, w1, w2, b1, b2, code, limit, alpha, sidx, sval, out,
                  work, rows_bound):
    """One layer of the few-row experts through the 16-bit GEMV. ``first``: the gate
    (+up) layer (GLU when ``w2`` is given), else the down projection with the scale.
    ``rows_bound``: a host bound on any expert's rows (sizes the GEMV's row tiles)."""
    from . import decode

    bms = decode.tile_rows(rows_bound)
    ts, _tb, cnt, cap_s, _cb = work.tables(bms, _tiled_cfg(True)[0])
    glu = first and w2 is not None
    decode.stage(glu, a, gidx, kdiv, w1, w2, b1, b2, code, limit, alpha, sidx, sval, out, ts,
                 cnt, cap_s, bms, min(work.E, work.n_rows))


def _mma_module():
    from . import mma

    return mma


def _run_mma(a, gidx, kdiv, wg, wu, wd, bg, bu, bd, code, limit, alpha, out, sidx, sval,
             work, N, F):
    """Every expert of the work list (all "tiled") on the tensor cores
    (:mod:`numoe._cuda.mma`), 16-bit ``h`` between the two layers. Returns False when
    the tensor-core kernels cannot be built (nothing is final then: the caller
    recomputes everything with the numba kernels)."""
    mma = _mma_module()
    glu = wu is not None
    h = A.empty((N, F), a.dtype)
    didx = A.dummy(np.int64)
    if gidx is not None and gidx.dtype != np.int64:     # the C++ reads int64 indices:
        g64 = A.astype(gidx, np.int64)                   # widen once (the layer passes
        sidx = g64 if sidx is gidx else sidx             # its plan order as both)
        gidx = g64
    g_idx = gidx if gidx is not None else didx
    kd = kdiv if gidx is not None else 0
    bm = mma.tile_rows(N, work.E)
    _ts, tb, cnt, _cs, cap_b = work.tables(_skinny_cfg()[0], bm)
    if glu:
        ok = mma.glu(a, g_idx, kd, wg, wu, bg, bu, code, limit, alpha, h, tb, cnt, cap_b, bm)
    else:
        ok = mma.plain(a, g_idx, kd, wg, bg, code, None, None, h, tb, cnt, cap_b, bm)
    if not ok or not mma.plain(h, didx, 0, wd, bd, ACT_NONE, sidx, sval, out, tb, cnt, cap_b,
                               bm):
        return False
    last_path.clear()
    last_path.update({"up": "mma", "down": "mma", "gemm": "mma", "work": work})
    return True


def grouped_glu(a, gidx, kdiv, wg, wu, bg, use_bg, bu, use_bu, code, limit, alpha, h, work,
                only=None):
    """``h[r] = glu(a_r @ wg[e] + bg[e], a_r @ wu[e] + bu[e])`` over the work's tiles."""
    _launch(True, a, gidx, kdiv, wg, wu, bg, use_bg, bu, use_bu, code, limit, alpha,
            gidx, A.dummy(A.compute_dtype(a.dtype)), False, h, work, only)


def grouped_plain(a, gidx, kdiv, w, b, use_b, code, alpha, sidx, sval, use_scale, out, work,
                  only=None):
    """``out[r] = act(a_r @ w[e] + b[e]) * sval[sidx[r]]`` over the work's tiles."""
    _launch(False, a, gidx, kdiv, w, w, b, use_b, b, False, code, 0.0, alpha,
            sidx, sval, use_scale, out, work, only)


def _flat(x):
    return A.reshape(x, (x.size,))


def _launch(glu, a, gidx, kdiv, w1, w2, b1, use_b1, b2, use_b2, code, limit, alpha,
            sidx, sval, use_scale, out, work, only=None):
    K = a.shape[1]
    NO = out.shape[1]
    dt = str(A.compute_dtype(a.dtype))
    kinds = (_narrow.kind_of(a.dtype), _narrow.kind_of(w1.dtype), _narrow.kind_of(out.dtype))
    args = (_flat(A.bits(a)), gidx, kdiv, K, _flat(A.bits(w1)), _flat(A.bits(w2)), NO,
            _flat(b1), use_b1, _flat(b2), use_b2, code, limit, alpha, sidx, sval, use_scale,
            _flat(A.bits(out)))
    cfg_t = _tiled_cfg(glu)
    cfg_s = _skinny_cfg()
    ts, tb, cnt, cap_s, cap_b = work.tables(cfg_s[0], cfg_t[0])
    if work.has("tiled") and only in (None, "tiled"):
        kern, nthreads, smem = _tiled(dt, kinds, glu, *cfg_t)
        grid = (min(cap_b, 65535), -(-NO // cfg_t[1]))
        launch(kern, grid, nthreads, smem, *args, tb, cnt, 1)
    if work.has("skinny") and only in (None, "skinny"):
        BMS, NT, KC, UN = cfg_s
        kern, smem = _skinny(dt, kinds, glu, BMS, NT, KC, UN)
        grid = (min(cap_s, 65535), -(-NO // NT))
        launch(kern, grid, NT, smem, *args, ts, cnt, 0)


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
def _tiled(dtype, kinds, glu, BM, BN, BK, TM, TN):
    """Tiled grouped GEMM; returns (kernel, threads, dynamic shared bytes).

    ``dtype`` is the compute dtype; ``kinds`` the storage kinds of A, the
    weights and the output (:mod:`numoe._cuda._narrow`: 16-bit arrays come as
    bits and are widened on load / narrowed on store).

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
    lda = _narrow.loader(kinds[0])
    ldw = _narrow.loader(kinds[1])
    sto = _narrow.storer(kinds[2], ft)
    smem = 2 * STAGE * np.dtype(dtype).itemsize

    @cuda.jit
    def kern(a, gidx, kdiv, K, w1, w2, NO, b1, use_b1, b2, use_b2, code, limit, alpha,
             sidx, sval, use_scale, out, tiles, tcount, which):
        sm = cuda.shared.array(0, ft)
        ntiles = tcount[which]
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
            for q in range(LA):
                r = r0 + amm + U(q) * uSA
                if r < rend:
                    if kdiv > 0:
                        arow[q] = (U(gidx[r]) // U(kdiv)) * uK
                    else:
                        arow[q] = r * uK
                else:
                    arow[q] = _SENT
            for i in range(TM):
                for j in range(TN):
                    acc1[i, j] = zero
                    acc2[i, j] = zero
            for q in range(LA):       # prologue: k-slice 0 into registers
                ra[q] = lda(a[arow[q] + akk]) if (arow[q] != _SENT and akk < uK) else zero
            for q in range(LB):
                kq = bkk + U(q) * uSB
                ok = col_ok and kq < uK
                r1b[q] = ldw(w1[wbase + kq * uNO]) if ok else zero
                if glu:
                    r2b[q] = ldw(w2[wbase + kq * uNO]) if ok else zero
            for kt in range(nk):
                base = (U(kt) % U(2)) * uSTAGE
                for q in range(LA):
                    sm[base + akk * uLDA + amm + U(q) * uSA] = ra[q]
                for q in range(LB):
                    o = base + uASZ + (bkk + U(q) * uSB) * uBN + bnn
                    sm[o] = r1b[q]
                    if glu:
                        sm[o + uBSZ] = r2b[q]
                cuda.syncthreads()
                if U(kt) + U(1) < nk:   # next slice's global loads overlap the maths
                    k0 = (U(kt) + U(1)) * uBK
                    for q in range(LA):
                        kq = k0 + akk
                        ra[q] = lda(a[arow[q] + kq]) if (arow[q] != _SENT and kq < uK) \
                            else zero
                    for q in range(LB):
                        kq = k0 + bkk + U(q) * uSB
                        ok = col_ok and kq < uK
                        r1b[q] = ldw(w1[wbase + kq * uNO]) if ok else zero
                        if glu:
                            r2b[q] = ldw(w2[wbase + kq * uNO]) if ok else zero
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
                            out[r * uNO + c] = sto(v)
            cuda.syncthreads()

    return kern, NT, smem


# ---------------------------------------------------------- skinny kernels
@functools.lru_cache(maxsize=None)
def _skinny(dtype, kinds, glu, BMS, NT, KC, UN):
    """Skinny grouped GEMM (few rows per expert): ``BMS`` rows per tile staged in
    shared memory ``KC`` columns at a time, one output column per thread, the
    weights streamed from global memory ``UN`` rows per step. Same arguments and
    epilogues as :func:`_tiled`; returns (kernel, dynamic shared bytes)."""
    ft = _ftype(dtype)
    U = np.uint64
    uNT, uKC, uUN = U(NT), U(KC), U(UN)
    zero = ft(0)
    lda = _narrow.loader(kinds[0])
    ldw = _narrow.loader(kinds[1])
    sto = _narrow.storer(kinds[2], ft)
    smem = BMS * KC * np.dtype(dtype).itemsize

    @cuda.jit
    def kern(a, gidx, kdiv, K, w1, w2, NO, b1, use_b1, b2, use_b2, code, limit, alpha,
             sidx, sval, use_scale, out, tiles, tcount, which):
        sm = cuda.shared.array(0, ft)
        ntiles = tcount[which]
        tid = U(cuda.threadIdx.x)
        uK = U(K)
        uNO = U(NO)
        c = U(cuda.blockIdx.y) * uNT + tid
        acc1 = cuda.local.array(BMS, ft)
        acc2 = cuda.local.array(BMS, ft)
        v1 = cuda.local.array(UN, ft)
        v2 = cuda.local.array(UN, ft)
        n1 = cuda.local.array(UN, ft)
        n2 = cuda.local.array(UN, ft)
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
                        v = lda(a[src * uK + k0 + kk])
                    sm[idx] = v
                cuda.syncthreads()
                if c < uNO:
                    wp = (e * uK + k0) * uNO + c
                    kk = U(0)
                    # software pipeline: the next UN weight rows are loaded before
                    # the current ones are multiplied (twice the loads in flight)
                    if uUN <= kc:
                        for u in range(UN):
                            v1[u] = ldw(w1[wp + U(u) * uNO])
                            if glu:
                                v2[u] = ldw(w2[wp + U(u) * uNO])
                    while kk + uUN <= kc:
                        nk = kk + uUN
                        if nk + uUN <= kc:
                            for u in range(UN):
                                n1[u] = ldw(w1[wp + (nk + U(u)) * uNO])
                                if glu:
                                    n2[u] = ldw(w2[wp + (nk + U(u)) * uNO])
                        for u in range(UN):
                            for i in range(BMS):
                                x = sm[U(i) * uKC + kk + U(u)]
                                acc1[i] += x * v1[u]
                                if glu:
                                    acc2[i] += x * v2[u]
                        for u in range(UN):
                            v1[u] = n1[u]
                            if glu:
                                v2[u] = n2[u]
                        kk = nk
                    while kk < kc:
                        g1 = ldw(w1[wp + kk * uNO])
                        g2 = g1
                        if glu:
                            g2 = ldw(w2[wp + kk * uNO])
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
                        out[r * uNO + c] = sto(v)

    return kern, smem


# ------------------------------------------------------------------ backward
# Device twin of :func:`numoe.expert_ffn_backward`. Per expert, with the gate/up
# pre-activations ``G``/``U`` recomputed from ``xs`` and ``Q = d_ys @ w_down^T``:
#   h, dG, dU      one elementwise pass (float64 inside);
#   d_xs           = [dG | dU] @ [w_gate^T ; w_up^T]   (the grouped kernels above,
#                    on transposed copies of the weights);
#   d_w_down[e]    = h_e^T d_ys_e,  d_w_gate[e] = xs_e^T dG_e,  d_w_up[e] = xs_e^T dU_e
#                    (:func:`_atb_kernel`: every element summed by one thread over the
#                    expert's rows in ascending order -- no atomics, no split sums);
#   bias gradients the column sums of dG, dU, d_ys per expert (float64, rows in order).
# 16-bit operands are widened to float32 first (one copy each, through the
# widening helper) and the gradients narrowed back at the end, as on the CPU.
def expert_ffn_backward(xs, offsets, w_gate, w_up, w_down, d_ys, *, activation="silu",
                        b_gate=None, b_up=None, b_down=None, limit=None, alpha=1.702):
    """Device twin of :func:`numoe.expert_ffn_backward` (numba device arrays out)."""
    from ..experts import ExpertGrads, _check_expert_options
    from ._checks import Checks

    opts = _check_expert_options(activation, limit, alpha, w_up is not None)
    xs_d = A.float_arg("xs", xs, ndim=2)
    xdt = xs_d.dtype
    cdt = np.dtype(np.float64) if xdt == np.float64 else np.dtype(np.float32)
    N, H = tuple(xs_d.shape)
    wg_d = A.as_device("w_gate", w_gate)
    A.check_float("w_gate", wg_d)
    wshape = tuple(wg_d.shape)
    if len(wshape) != 3 or wshape[0] < 1 or wshape[1] != H:
        raise ValueError(f"w_gate must have shape (E, {H}, F) with E >= 1 to match xs "
                         f"[N, {H}], got {wshape}")
    E, _, F = wshape
    wg, sg = _grad_operand("w_gate", wg_d, cdt, (E, H, F))
    wu, su = _grad_operand("w_up", w_up, cdt, (E, H, F))
    wd, sd = _grad_operand("w_down", w_down, cdt, (E, F, H))
    if w_up is None and b_up is not None:
        raise ValueError("b_up was given but w_up is None (plain FFN experts have no up bias)")
    bg, sbg = _grad_operand("b_gate", b_gate, cdt, (E, F))
    bu, sbu = _grad_operand("b_up", b_up, cdt, (E, F))
    bd, sbd = _grad_operand("b_down", b_down, cdt, (E, H))
    dy = A.float_arg("d_ys", d_ys, ndim=2)
    A.check_shape("d_ys", dy, (N, H))
    dy = A.astype(dy, cdt)
    Checks().finite("d_ys", dy).run()
    off = _offsets_checked(offsets, E, N)
    x = A.astype(xs_d, cdt)
    g = backward_ffn(x, off, N, wg, wu, wd, bg, bu, bd, opts.code, opts.limit, opts.alpha,
                     dy)
    cast = lambda a, dt: None if a is None else A.astype(a, dt)  # noqa: E731
    return ExpertGrads(cast(g[0], xdt), cast(g[1], sg), cast(g[2], su), cast(g[3], sd),
                       cast(g[4], sbg), cast(g[5], sbu), cast(g[6], sbd))


def _grad_operand(name, a, dtype, shape):
    """A device operand of the backward as a contiguous ``dtype`` array of ``shape``
    (16-bit widened: the backward may copy) and its storage dtype; (None, None) for None."""
    if a is None:
        return None, None
    d = A.as_device(name, a)
    A.check_float(name, d)
    A.check_shape(name, d, shape)
    return A.astype(d, dtype), d.dtype


def backward_ffn(x, off, N, wg, wu, wd, bg, bu, bd, code, limit, alpha, dy):
    """Gradients of a grouped FFN over validated device arrays, all in ``x``'s dtype
    (float32 or float64). ``off`` is the device ``[E+1]`` offsets and ``N`` its last
    value. Returns ``(d_xs, d_w_gate, d_w_up, d_w_down, d_b_gate, d_b_up, d_b_down)``
    (None where the forward had no such input)."""
    E, H, F = tuple(wg.shape)
    glu = wu is not None
    dt = x.dtype
    F2 = 2 * F if glu else F
    new = lambda a, shape: None if a is None else A.empty(shape, dt)  # noqa: E731
    d_xs = A.empty((N, H), dt)
    d_wg = A.empty((E, H, F), dt)
    d_wu = new(wu, (E, H, F))
    d_wd = A.empty((E, F, H), dt)
    d_bg, d_bu, d_bd = new(bg, (E, F)), new(bu, (E, F)), new(bd, (E, H))
    dummy = A.dummy(dt)
    didx = A.dummy(np.int64)
    hbuf = A.empty((N, F), dt)
    dgu = A.empty((N, F2), dt)
    if N:
        work = _Work(off, N)
        pre_g = A.empty((N, F), dt)
        grouped_plain(x, didx, 0, wg, bg if bg is not None else dummy, bg is not None,
                      ACT_NONE, alpha, didx, dummy, False, pre_g, work)
        pre_u = pre_g
        if glu:
            pre_u = A.empty((N, F), dt)
            grouped_plain(x, didx, 0, wu, bu if bu is not None else dummy, bu is not None,
                          ACT_NONE, alpha, didx, dummy, False, pre_u, work)
        wdt = A.empty((E, H, F), dt)
        _transpose_into(wd, wdt, 0)
        q = A.empty((N, F), dt)
        grouped_plain(dy, didx, 0, wdt, dummy, False, ACT_NONE, alpha, didx, dummy, False,
                      q, work)
        del wdt
        bs = A.block(256)
        launch(_glu_backward_kernel, A.grid(N * F, bs, 16), bs, 0, pre_g, pre_u, glu, q,
               code, limit, alpha, hbuf, dgu)
        del pre_g, pre_u, q
        wcat = A.empty((E, F2, H), dt)
        _transpose_into(wg, wcat, 0)
        if glu:
            _transpose_into(wu, wcat, F)
        grouped_plain(dgu, didx, 0, wcat, dummy, False, ACT_NONE, alpha, didx, dummy, False,
                      d_xs, work)
        del wcat
    _atb(hbuf, 0, dy, 0, off, d_wd)
    _atb(x, 0, dgu, 0, off, d_wg)
    if glu:
        _atb(x, 0, dgu, F, off, d_wu)
    for grad, src, col in ((d_bg, dgu, 0), (d_bu, dgu, F), (d_bd, dy, 0)):
        if grad is not None:
            bs = A.block(128)
            launch(_expert_colsums, A.grid(grad.size, bs, 8), bs, 0, src, col, off, grad)
    return d_xs, d_wg, d_wu, d_wd, d_bg, d_bu, d_bd


def _transpose_into(w, out, c_off):
    """``out[e, c_off + c, r] = w[e, r, c]`` for ``w [E, R, C]`` (contiguous)."""
    if w.size:
        bs = A.block(256)
        launch(_transpose_kernel, A.grid(w.size, bs, 16), bs, 0, w, c_off, out)


def _atb_cfg():
    """(BI, BJ, BR, TI, TJ) of :func:`_atb_kernel`."""
    if "atb" in TILE_OVERRIDE:
        return TILE_OVERRIDE["atb"]
    if A.SIM:
        return (4, 4, 4, 2, 2)
    return (64, 64, 16, 4, 4)


def _atb(a, acol, b, bcol, off, out):
    """``out[e] = a[rows of e, acol:acol+KI]^T @ b[rows of e, bcol:bcol+KJ]`` for
    ``out [E, KI, KJ]`` (zeros for an expert without rows)."""
    if out.size == 0:
        return out
    BI, BJ, BR, TI, TJ = _atb_cfg()
    kern, nt, smem = _atb_kernel(str(out.dtype), BI, BJ, BR, TI, TJ)
    E, KI, KJ = tuple(out.shape)
    ntask = E * (-(-KI // BI)) * (-(-KJ // BJ))
    launch(kern, A.grid(ntask * nt, nt, 8), nt, smem, a, acol, b, bcol, off, out)
    return out


@functools.lru_cache(maxsize=None)
def _atb_kernel(dtype, BI, BJ, BR, TI, TJ):
    """Grouped ``A^T B`` (weight gradients); returns (kernel, threads, shared bytes).

    A block owns one ``BI x BJ`` output tile of one expert and walks the
    expert's rows ``BR`` at a time through shared memory; each thread keeps a
    ``TI x TJ`` register block and adds the rows in ascending order, so every
    element is one fixed-order sum (independent of the tile sizes and the grid).
    """
    ft = _ftype(dtype)
    NTX = BJ // TJ
    NTY = BI // TI
    NT = NTX * NTY
    SA = BR * BI
    SB = BR * BJ
    zero = ft(0)
    smem = (SA + SB) * np.dtype(dtype).itemsize

    @cuda.jit
    def kern(a, acol, b, bcol, off, out):
        sm = cuda.shared.array(0, ft)
        E = out.shape[0]
        KI = out.shape[1]
        KJ = out.shape[2]
        tid = cuda.threadIdx.x
        tx = tid % NTX
        ty = tid // NTX
        acc = cuda.local.array((TI, TJ), ft)
        ni = (KI + BI - 1) // BI
        nj = (KJ + BJ - 1) // BJ
        for task in range(cuda.blockIdx.x, E * ni * nj, cuda.gridDim.x):
            e = task // (ni * nj)
            rem = task - e * (ni * nj)
            i0 = (rem // nj) * BI
            j0 = (rem - (rem // nj) * nj) * BJ
            lo = off[e]
            hi = off[e + 1]
            for p in range(TI):
                for q in range(TJ):
                    acc[p, q] = zero
            for r0 in range(lo, hi, BR):
                cuda.syncthreads()            # the previous slice has been consumed
                for idx in range(tid, SA, NT):
                    rr = idx // BI
                    i = i0 + idx - rr * BI
                    r = r0 + rr
                    v = zero
                    if r < hi and i < KI:
                        v = a[r, acol + i]
                    sm[idx] = v
                for idx in range(tid, SB, NT):
                    rr = idx // BJ
                    j = j0 + idx - rr * BJ
                    r = r0 + rr
                    v = zero
                    if r < hi and j < KJ:
                        v = b[r, bcol + j]
                    sm[SA + idx] = v
                cuda.syncthreads()
                nr = min(BR, hi - r0)
                for rr in range(nr):
                    for p in range(TI):
                        av = sm[rr * BI + ty + p * NTY]
                        for q in range(TJ):
                            acc[p, q] += av * sm[SA + rr * BJ + tx + q * NTX]
            for p in range(TI):
                i = i0 + ty + p * NTY
                if i < KI:
                    for q in range(TJ):
                        j = j0 + tx + q * NTX
                        if j < KJ:
                            out[e, i, j] = acc[p, q]
            cuda.syncthreads()

    return kern, NT, smem


@cuda.jit(device=True)
def act_grad(v, code):
    """``(act(v), act'(v))`` of a float64 (codes of ``numoe.experts.ACTIVATIONS`` 0-3;
    relu'(0) = 0)."""
    if code == 0:
        s = 1.0 / (1.0 + math.exp(-v))
        return v * s, s * (1.0 + v * (1.0 - s))
    if code == 1:
        c = 0.5 * (1.0 + math.erf(v * 0.7071067811865476))
        return v * c, c + v * math.exp(-0.5 * v * v) * 0.3989422804014327
    if code == 2:
        t = math.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))
        return (0.5 * v * (1.0 + t),
                0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * 0.7978845608028654
                * (1.0 + 3.0 * 0.044715 * v * v))
    if v > 0.0:
        return v, 1.0
    return 0.0, 0.0


@cuda.jit
def _glu_backward_kernel(pre_g, pre_u, glu, q, code, limit, alpha, h, dgu):
    """From the pre-activations and ``q = d_ys @ w_down^T``: ``h`` (the hidden
    activations) and ``dgu[:, :F]`` / ``dgu[:, F:]`` (gradients of the gate / up
    pre-activations). swiglu_oai's clamps pass the gradient only inside the limits."""
    N = q.shape[0]
    F = q.shape[1]
    for i in range(cuda.grid(1), N * F, cuda.gridsize(1)):
        r = i // F
        j = i - r * F
        g = float64(pre_g[r, j])
        qj = float64(q[r, j])
        if not glu:
            av, dav = act_grad(g, code)
            h[r, j] = av
            dgu[r, j] = qj * dav
            continue
        u = float64(pre_u[r, j])
        if code == 4:
            gc = g if g <= limit else limit
            uc = u if u <= limit else limit
            uc = uc if uc >= -limit else -limit
            sg = 1.0 / (1.0 + math.exp(-alpha * gc))
            hv = (uc + 1.0) * gc * sg
            dg = (uc + 1.0) * (sg + alpha * gc * sg * (1.0 - sg)) if g <= limit else 0.0
            du = gc * sg if (u <= limit and u >= -limit) else 0.0
        else:
            av, dav = act_grad(g, code)
            hv = av * u
            dg = dav * u
            du = av
        h[r, j] = hv
        dgu[r, j] = qj * dg
        dgu[r, F + j] = qj * du


@cuda.jit
def _transpose_kernel(w, c_off, out):
    E = w.shape[0]
    R = w.shape[1]
    C = w.shape[2]
    for i in range(cuda.grid(1), E * R * C, cuda.gridsize(1)):
        c = i % C
        t = i // C
        r = t % R
        e = t // R
        out[e, c_off + c, r] = w[e, r, c]


@cuda.jit
def _expert_colsums(a, acol, off, out):
    """``out[e, j] = sum over the rows of expert e (ascending) of a[r, acol + j]``, float64."""
    E = out.shape[0]
    n = out.shape[1]
    for i in range(cuda.grid(1), E * n, cuda.gridsize(1)):
        e = i // n
        j = i - e * n
        acc = 0.0
        for r in range(off[e], off[e + 1]):
            acc += float64(a[r, acol + j])
        out[e, j] = acc
