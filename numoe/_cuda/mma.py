"""Tensor-core (``mma.sync``) grouped GEMM for 16-bit experts, linked from ``mma.cu``.

numba-cuda has no matrix-unit API, but it links CUDA C++ device functions
compiled by NVRTC into ``@cuda.jit`` kernels (:func:`numba.cuda.declare_device`
with a :class:`numba.cuda.CUSource`). ``mma.cu`` beside this file holds two
such functions, each running whole grouped-GEMM tiles with cp.async,
ldmatrix and ``mma.sync.m16n8k16`` (bfloat16 or float16 in, float32
accumulation), and the two thin numba kernels below hand them the arrays as
raw pointers (``cffi``'s ``from_buffer``, which numba-cuda lowers).

Used by :func:`numoe._cuda.experts.run_ffn` for the experts with many rows
(the tiled part of the work list) when activations and expert weights share
one 16-bit dtype, on a GPU of compute capability >= 8.0, with ``cffi``
importable, 16-byte rows (``H`` and ``F`` multiples of 8) and 16-byte
aligned arrays. Anything else -- and any failure to compile or link, which
is remembered in :data:`ERROR` -- keeps the pure-numba kernels.
``NUMOE_CUDA_MMA=0`` turns the path off.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import _arrays as A
from ._launch import launch

BN_GLU = 64                  # output columns per block: GLU stage (gate and up each)
BN_PLAIN = 128               # plain stage
THREADS = 128
STAGES = 4                   # cp.async pipeline depth (mma.cu: NUMOE_STAGES)
LDA = 40                     # u16 per staged A row (mma.cu: NUMOE_LDA)
B_ELEMS = 4608               # u16 of one stage's weight tile (mma.cu: NUMOE_B_ELEMS)


def tile_rows(n_rows, n_experts):
    """Rows per tile (the work list's tile height): 64 when the experts average at
    least 64 rows, else 32 (less padding in each expert's last tile; decode batches).
    ``NUMOE_CUDA_MMA_BM=32|64`` forces one. (128-row tiles with 4 warps of 64 x 64 were
    measured slower at OLMoE T=4096 on an H200: 2.81 vs 2.65 ms for the GEMMs.)"""
    forced = os.environ.get("NUMOE_CUDA_MMA_BM", "")
    if forced in ("32", "64"):
        return int(forced)
    return 64 if n_rows >= 64 * n_experts else 32


def smem_bytes(bm):
    """Dynamic shared memory of one block: STAGES x (A tile + weight tile), 16-bit."""
    return STAGES * (bm * LDA + B_ELEMS) * 2

#: why the tensor-core path is off (None while it is usable or untried)
ERROR = None
_KERNELS = None


def _source():
    return (Path(__file__).with_name("mma.cu")).read_text()


def _build():
    """Declare the C++ functions and build the two wrapper kernels (once)."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import cffi
    from numba import cuda, types

    ffi = cffi.FFI()
    P = types.CPointer
    u16, i64, f32, f64 = types.uint16, types.int64, types.float32, types.float64
    src = cuda.CUSource(_source())
    glu_fn = cuda.declare_device(
        "numoe_mma_glu",
        types.int32(P(u16), P(i64), i64, i64, P(u16), P(u16), i64, P(f32), i64, P(f32), i64,
                    i64, f64, f64, P(u16), P(i64), P(i64), i64, i64, i64),
        link=src)
    plain_fn = cuda.declare_device(
        "numoe_mma_plain",
        types.int32(P(u16), P(i64), i64, i64, P(u16), i64, P(f32), i64, i64, P(i64), P(f32),
                    i64, P(u16), P(f32), i64, P(i64), P(i64), i64, i64, i64),
        link=src)

    @cuda.jit
    def glu_kernel(a, gidx, kdiv, K, w1, w2, NO, b1, use_b1, b2, use_b2, code, limit, alpha,
                   out, tiles, tcount, which, is_bf16, mi):
        glu_fn(ffi.from_buffer(a), ffi.from_buffer(gidx), kdiv, K, ffi.from_buffer(w1),
               ffi.from_buffer(w2), NO, ffi.from_buffer(b1), use_b1, ffi.from_buffer(b2),
               use_b2, code, limit, alpha, ffi.from_buffer(out), ffi.from_buffer(tiles),
               ffi.from_buffer(tcount), which, is_bf16, mi)

    @cuda.jit
    def plain_kernel(a, gidx, kdiv, K, w1, NO, b1, use_b1, code, sidx, sval, use_scale, out16,
                     out32, out_f32, tiles, tcount, which, is_bf16, mi):
        plain_fn(ffi.from_buffer(a), ffi.from_buffer(gidx), kdiv, K, ffi.from_buffer(w1), NO,
                 ffi.from_buffer(b1), use_b1, code, ffi.from_buffer(sidx),
                 ffi.from_buffer(sval), use_scale, ffi.from_buffer(out16),
                 ffi.from_buffer(out32), out_f32, ffi.from_buffer(tiles),
                 ffi.from_buffer(tcount), which, is_bf16, mi)

    _KERNELS = (glu_kernel, plain_kernel)
    return _KERNELS


def _aligned(*arrays):
    return all(a is None or a.size == 0 or a.device_ctypes_pointer.value % 16 == 0
               for a in arrays)


def usable(a, wg, wu, wd):
    """Whether the tensor-core path can run this problem (no device work)."""
    global ERROR
    if A.SIM or ERROR is not None or os.environ.get("NUMOE_CUDA_MMA", "1") == "0":
        return False
    if a.dtype not in A.NARROW or wg.dtype != a.dtype:
        return False
    E, H, F = tuple(wg.shape)
    if H % 8 or F % 8:
        return False
    try:
        from numba import cuda

        if cuda.get_current_device().compute_capability < (8, 0):
            ERROR = "compute capability < 8.0"
            return False
        import cffi  # noqa: F401
    except ImportError as exc:
        ERROR = f"cffi is not importable ({exc})"
        return False
    if not Path(__file__).with_name("mma.cu").exists():
        ERROR = "mma.cu is missing from the install"
        return False
    return _aligned(a, wg, wu, wd)


def _f32(b):
    """A bias as the flat float32 array the C++ reads (16-bit biases widened), or a
    stand-in when absent."""
    if b is None:
        return A.dummy(np.float32)
    return A.reshape(A.astype(b, np.float32), (b.size,))


def _i64(idx):
    return idx if idx.dtype == np.int64 else A.astype(idx, np.int64)


def glu(a, gidx, kdiv, wg, wu, bg, bu, code, limit, alpha, h, tiles, tcount, cap_b, bm):
    """``h = glu(a_r @ wg[e] + bg, a_r @ wu[e] + bu)`` over the tiled part of the work
    list (tiles of ``bm`` rows), 16-bit ``h``. Returns False (nothing launched) if the
    kernels cannot be built."""
    kern = _kernel(0)
    if kern is None:
        return False
    K, NO = a.shape[1], h.shape[1]
    grid = (-(-NO // BN_GLU), min(cap_b, 65535))
    return _try(0, kern, grid, bm, A.reshape(A.bits(a), (a.size,)),
           _i64(gidx), int(kdiv), int(K), A.reshape(A.bits(wg), (wg.size,)),
           A.reshape(A.bits(wu), (wu.size,)), int(NO),
           _f32(bg), int(bg is not None),
           _f32(bu), int(bu is not None),
           int(code), float(limit), float(alpha), A.reshape(A.bits(h), (h.size,)),
           A.reshape(tiles, (tiles.size,)), tcount, 1, int(a.dtype == A.BFLOAT16),
           bm // 32)


def plain(a, gidx, kdiv, w, b, code, sidx, sval, out, tiles, tcount, cap_b, bm):
    """``out = act(a_r @ w[e] + b) * sval[sidx[r]]`` over the tiled part of the work list
    (tiles of ``bm`` rows; ``out`` 16-bit like ``a``, or float32). Returns False if the
    kernels cannot be built."""
    kern = _kernel(1)
    if kern is None:
        return False
    f32 = A.dummy(np.float32)
    i64 = A.dummy(np.int64)
    K, NO = a.shape[1], out.shape[1]
    out_f32 = out.dtype == np.float32
    grid = (-(-NO // BN_PLAIN), min(cap_b, 65535))
    return _try(1, kern, grid, bm, A.reshape(A.bits(a), (a.size,)),
           _i64(gidx), int(kdiv), int(K), A.reshape(A.bits(w), (w.size,)), int(NO),
           _f32(b), int(b is not None), int(code),
           i64 if sidx is None else _i64(sidx), f32 if sval is None else sval,
           int(sidx is not None),
           A.dummy(np.uint16) if out_f32 else A.reshape(A.bits(out), (out.size,)),
           A.reshape(out, (out.size,)) if out_f32 else f32, int(out_f32),
           A.reshape(tiles, (tiles.size,)), tcount, 1, int(a.dtype == A.BFLOAT16),
           bm // 32)


_COMPILED = [False, False]


def _try(i, kern, grid, bm, *args):
    """Launch; the first launch of each kernel compiles and links it (and raises its
    dynamic shared memory limit), and a failure there turns the path off (returns
    False: the caller runs the numba kernels)."""
    global ERROR
    try:
        if not _COMPILED[i]:
            _allow_smem(kern, args)
        launch(kern, grid, THREADS, smem_bytes(bm), *args)
    except Exception as exc:  # noqa: BLE001 - NVRTC or the linker refused the C++
        if _COMPILED[i]:
            raise
        ERROR = f"{type(exc).__name__}: {exc}"
        return False
    _COMPILED[i] = True
    return True


def _allow_smem(kern, args):
    """Compile ``kern`` for these arguments and let it use ``smem_bytes(64)`` of dynamic
    shared memory (the default limit is 48 KB). The argument types never change: every
    array is a 1-D C-contiguous view and every scalar a Python int or float."""
    from cuda.bindings import driver

    argtypes = tuple(kern.typeof_pyval(a) for a in args)
    cufunc = kern.compile(argtypes)._codelibrary.get_cufunc()
    attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    try:                     # numba-cuda on cuda.core: the handle is a CUkernel
        err, = driver.cuKernelSetAttribute(attr, smem_bytes(64), cufunc.handle,
                                           cufunc.device.id)
    except TypeError:        # older numba-cuda: a CUfunction
        err, = driver.cuFuncSetAttribute(cufunc.handle, attr, smem_bytes(64))
    if int(err) != 0:
        raise RuntimeError(f"cannot raise the dynamic shared memory limit: {err}")


def _kernel(i):
    global ERROR
    try:
        return _build()[i]
    except Exception as exc:  # noqa: BLE001 - no cffi / NVRTC / linker: numba kernels
        ERROR = f"{type(exc).__name__}: {exc}"
        return None
