"""Dense ``a @ b`` for device arrays (router logits, shared-expert gate).

The product runs through the grouped kernels of :mod:`numoe._cuda.experts`
as a single group (one "expert" whose weight is ``b``): the skinny kernel
for few rows, the tiled one otherwise -- or, for at most 64 rows and a
16-bit ``b`` (a 16-bit layer's router), the split-K GEMV of
:mod:`numoe._cuda.decode`; for more rows with ``a`` and ``b`` of one 16-bit
dtype, the tensor-core tiles of :mod:`numoe._cuda.mma`. Deterministic (one
thread per output element, fixed summation order).
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from . import _arrays as A
from ._launch import launch
from . import experts as X


_OFFSETS: dict = {}


def _range_offsets(M):
    """Device ``[0, M]`` (cached: decoding calls with the same ``M`` again and again)."""
    if M not in _OFFSETS:
        if len(_OFFSETS) > 64:
            _OFFSETS.clear()
        _OFFSETS[M] = cuda.to_device(np.array([0, M], dtype=np.int64))
    return _OFFSETS[M]


def matmul(a, b, out=None, out_dtype=None):
    """``a [..., K] @ b [K, N] -> [..., N]`` on the device (dtype of ``a``, or
    ``out_dtype``).

    ``b`` must have ``a``'s float dtype or be 16-bit (bfloat16/float16
    weights are widened in registers); anything else is a TypeError (no
    silent copies of weights). 16-bit operands accumulate in float32.
    ``out`` (optional) is a C-contiguous device array of the result's shape
    and dtype.
    """
    a2, lead = A.tokens_2d("a", a, min_ndim=1)
    bd = A.as_device("b", b)
    A.check_float("b", bd, ndim=2)
    if bd.dtype != a2.dtype and bd.dtype not in A.NARROW:
        raise TypeError(f"b has dtype {bd.dtype} but a is {a2.dtype}")
    odt = a2.dtype if out_dtype is None else np.dtype(out_dtype)
    M, K = tuple(a2.shape)
    if bd.shape[0] != K:
        raise ValueError(f"b must have shape ({K}, N) to match a [..., {K}], "
                         f"got {tuple(bd.shape)}")
    N = bd.shape[1]
    bd = A.contiguous(bd)
    shape = (M, N)
    if out is None:
        res = A.empty(shape, odt)
    else:
        res = A.as_device("out", out)
        if res.dtype != odt:
            raise TypeError(f"out must have dtype {odt}, got {res.dtype}")
        if tuple(res.shape) != lead + (N,) and tuple(res.shape) != shape:
            raise ValueError(f"out must have shape {lead + (N,)}, got {tuple(res.shape)}")
        if not res.is_c_contiguous():
            raise ValueError("out must be C-contiguous")
        res = A.reshape(res, shape)
    if M and N:
        if K == 0:
            bs = A.block(256)
            launch(A._fill, A.grid(M * N, bs), bs, 0, A.reshape(A.bits(res), (M * N,)), 0)
        else:
            w3 = A.reshape(bd, (1, K, N))
            didx = A.dummy(np.int64)
            if M <= X.DECODE_MAX_ROWS and X._decode_ok(a2, w3, None, w3):
                # few rows, 16-bit b (a 16-bit layer's router): the split-K GEMV
                work = X._Work(_range_offsets(M), M, "skinny")
                X._decode_layer(False, a2, didx, 0, w3, None, None, None, X.ACT_NONE, 0.0,
                                0.0, None, None, res, work, M)
            elif not _tensor_cores(a2, w3, res):
                work = X._Work(_range_offsets(M), M)
                dummy = A.dummy(A.compute_dtype(a2.dtype))
                X.grouped_plain(a2, didx, 0, w3, dummy, False, X.ACT_NONE,
                                0.0, didx, dummy, False, res, work)
    return A.reshape(res, lead + (N,))


def _tensor_cores(a2, w3, res):
    """More rows, ``a`` and ``b`` of one 16-bit dtype (a 16-bit layer's router at
    prefill): the tensor-core tiles of :mod:`numoe._cuda.mma`. False when they cannot
    run here (nothing launched)."""
    from . import mma

    M = a2.shape[0]
    if res.dtype not in (np.dtype(np.float32), a2.dtype) or not mma.usable(a2, w3, None, w3):
        return False
    bm = mma.tile_rows(M, 1)
    tb, cnt = _row_tiles(M, bm)
    return mma.plain(a2, A.dummy(np.int64), 0, w3, None, X.ACT_NONE, None, None, res, tb,
                     cnt, tb.shape[0], bm)


_TILES: dict = {}


def _row_tiles(M, bm):
    """The tile table of one ``M``-row group in ``bm``-row tiles, as the work list's
    ``(tiles, counts)``: built on the host and cached (the router's product at prefill
    then costs no table kernel; a captured graph builds it on the device)."""
    key = (M, bm)
    if key in _TILES:
        return _TILES[key]
    if A.KEEP is not None:                 # capturing: no host copies
        work = X._Work(_range_offsets(M), M, "tiled")
        _ts, tb, cnt, _cs, _cap = work.tables(X._skinny_cfg()[0], bm)
        return tb, cnt
    r0 = np.arange(0, M, bm, dtype=np.int64)
    tiles = np.stack([np.zeros_like(r0), r0, np.minimum(r0 + bm, M)], axis=1)
    if len(_TILES) > 64:
        _TILES.clear()
    _TILES[key] = (cuda.to_device(tiles), cuda.to_device(np.array([0, len(r0)], np.int64)))
    return _TILES[key]
