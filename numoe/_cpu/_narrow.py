"""The one CPU widening helper: 16-bit and int8 storage to float32, and back.

Numba knows neither ``ml_dtypes.bfloat16`` nor (on the CPU) float16, so
16-bit arrays reach the kernels as ``uint16`` views (:func:`numoe._dtypes.bits`)
plus a small int *storage kind*, and are widened here, in registers:

* bfloat16: the float32 with those 16 bits on top (``bits << 16``): exact;
* float16: an LLVM ``fpext half -> float`` (one ``vcvtph2ps`` with F16C): exact;
* int8 (weight-only quantisation): ``float32(q)``; the per-column scale is
  applied by the caller (after a dot product, or in :func:`widen_cols`).

Narrowing (float32 -> 16-bit bits) rounds to nearest, ties to even, as
NumPy / ml_dtypes do (NaN stays NaN, overflow goes to inf).

Storage kinds (kernels compare with the literals; no module globals in jitted code):
``FLOAT = 0`` (float32/float64 as is), ``BF16 = 1``, ``F16 = 2``, ``INT8 = 3``.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .. import _dtypes as D
from .._jit import kernel

FLOAT, BF16, F16, INT8 = 0, 1, 2, 3


def kind_of(dtype):
    """The storage kind of a host dtype (``int8`` for quantised values)."""
    dt = np.dtype(dtype)
    if dt == D.BFLOAT16:
        return BF16
    if dt == D.FLOAT16:
        return F16
    if dt == np.int8:
        return INT8
    return FLOAT


# ------------------------------------------------------------- intrinsics
@intrinsic
def bf16_to_f32(typingctx, b):
    """bfloat16 bits (``uint16``) to float32: ``bits << 16`` (exact)."""
    if b != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        v = builder.zext(args[0], ir.IntType(32))
        v = builder.shl(v, ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def f16_to_f32(typingctx, b):
    """float16 bits (``uint16``) to float32 (exact; subnormals, inf and NaN kept)."""
    if b != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        h = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(h, ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def f32_to_f16(typingctx, f):
    """float32 to float16 bits (round to nearest even; LLVM ``fptrunc``)."""
    if f != types.float32:
        return None

    def codegen(context, builder, signature, args):
        h = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(h, ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _f32_bits(typingctx, f):
    """The ``uint32`` bits of a float32."""
    if f != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@kernel
def f32_to_bf16(f):
    """float32 to bfloat16 bits, round to nearest even (NaN stays a quiet NaN)."""
    u = _f32_bits(f)
    if f != f:
        return np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
    u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return np.uint16(u >> np.uint32(16))


# ------------------------------------------------------- generic widening
def widen(v, kind):
    """Scalar ``v`` of a weight array as a float: ``uint16`` by ``kind`` (1 bf16,
    2 f16), ``int8`` as float32 (unscaled), float32/float64 unchanged. Jitted only."""
    raise NotImplementedError("numoe._cpu._narrow.widen runs inside jitted code only")


@overload(widen, inline="always")
def _widen_impl(v, kind):
    if v == types.uint16:
        def impl(v, kind):
            if kind == 2:
                return f16_to_f32(v)
            return bf16_to_f32(v)
        return impl
    if isinstance(v, types.Integer):
        return lambda v, kind: np.float32(v)
    if isinstance(v, types.Float):
        return lambda v, kind: v
    return None


@kernel
def widen_cols(w, kind, scale, c0, c1, out, o0):
    """``out[:, o0 + j] = widen(w[:, c0 + j]) * scale[c0 + j]`` for ``j < c1 - c0``
    (``w [K, N]``; ``scale`` empty unless int8; the product in ``out``'s
    dtype). A weight tile for BLAS."""
    K = w.shape[0]
    n = c1 - c0
    T = out.dtype.type
    hs = scale.shape[0] > 0
    for r in range(K):
        src = w[r, c0:c1]
        dst = out[r, o0:o0 + n]
        if hs:
            sc = scale[c0:c1]
            for j in range(n):
                dst[j] = T(widen(src[j], kind)) * T(sc[j])
        else:
            for j in range(n):
                dst[j] = widen(src[j], kind)


@kernel
def widen_flat(src, kind, out):
    """``out[i] = widen(src[i])`` over 1-D arrays (16-bit bits to float32)."""
    for i in range(src.shape[0]):
        out[i] = widen(src[i], kind)


@kernel
def narrow_flat(src, kind, out):
    """``out[i]`` = bits of ``src[i]`` (float32) as bfloat16 (kind 1) or float16 (2), RNE."""
    if kind == 2:
        for i in range(src.shape[0]):
            out[i] = f32_to_f16(np.float32(src[i]))
    else:
        for i in range(src.shape[0]):
            out[i] = f32_to_bf16(np.float32(src[i]))


# ------------------------------------------------------------------ host side
def to_float32(a):
    """A host 16-bit float array widened to a new C-contiguous float32 array."""
    a = np.ascontiguousarray(a)
    out = np.empty(a.shape, np.float32)
    widen_flat(D.bits(a).reshape(-1), kind_of(a.dtype), out.reshape(-1))
    return out


def from_float32(a, dtype):
    """A float32 (or float64, rounded to float32 first) array as ``dtype`` (bfloat16 or
    float16), round to nearest even."""
    dt = np.dtype(dtype)
    a = np.ascontiguousarray(a, dtype=np.float32)
    out = np.empty(a.shape, dt)
    narrow_flat(a.reshape(-1), kind_of(dt), out.view(np.uint16).reshape(-1))
    return out
