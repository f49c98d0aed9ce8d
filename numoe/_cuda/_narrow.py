"""The one widening helper of the CUDA backend (16-bit floats <-> float32).

numba knows neither ``ml_dtypes.bfloat16`` nor (in the simulator) float16
arithmetic, so 16-bit device arrays reach the kernels as ``uint16`` views
(:func:`numoe._cuda._arrays.bits`) together with a *kind* code:

* ``NATIVE`` (0): a float32/float64 array, read as it is;
* ``BF16`` (1): bfloat16 bits, widened exactly by ``bits << 16``;
* ``FP16`` (2): IEEE half bits, widened exactly (subnormals, inf, NaN).

:func:`widen` and :func:`narrow` are the only device functions that touch
16-bit bits; every kernel that reads or writes 16-bit data calls them (or
the loaders built from them by :func:`loader`/:func:`storer`). Narrowing
rounds to nearest even, as ``ml_dtypes``/NumPy do, so a device result
narrowed here equals ``x.astype(dtype)`` on the host for the same float32
``x``. The float32 bit casts go through libdevice on a GPU and through
NumPy under the simulator (whose libdevice stubs return NaN); the rounding
logic itself is the same code on both.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, float32, int32, uint32

from .._dtypes import BFLOAT16, FLOAT16

NATIVE = 0
BF16 = 1
FP16 = 2

SIM = bool(__import__("numba").config.ENABLE_CUDASIM)


def kind_of(dtype) -> int:
    """The kind code of a (native byte order) float dtype."""
    dtype = np.dtype(dtype)
    if dtype == BFLOAT16:
        return BF16
    if dtype == FLOAT16:
        return FP16
    return NATIVE


# ----------------------------------------------------------- bit casts
if SIM:  # pragma: no cover - simulator only
    @cuda.jit(device=True)
    def _f32_from_u32(u):
        return np.array([u], dtype=np.uint64).astype(np.uint32).view(np.float32)[0]

    @cuda.jit(device=True)
    def _u32_from_f32(v):
        return int(np.array([v], dtype=np.float32).view(np.uint32)[0])

    @cuda.jit(device=True)
    def _rint(v):
        return float(np.rint(np.float32(v)))
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def _f32_from_u32(u):
        return libdevice.int_as_float(int32(uint32(u)))

    @cuda.jit(device=True)
    def _u32_from_f32(v):
        return uint32(libdevice.float_as_int(float32(v)))

    @cuda.jit(device=True)
    def _rint(v):
        return libdevice.rintf(float32(v))


# ------------------------------------------------------------- helpers
@cuda.jit(device=True)
def widen(b, kind):
    """float32 value of the 16-bit pattern ``b`` (``kind`` BF16 or FP16)."""
    u = uint32(b) & uint32(0xFFFF)
    if kind == BF16:
        return float32(_f32_from_u32(u << uint32(16)))
    s = (u >> uint32(15)) << uint32(31)
    e = (u >> uint32(10)) & uint32(31)
    m = u & uint32(1023)
    if e == 0:                                   # zero / subnormal: m * 2**-24, exact
        v = float32(m) * float32(5.9604644775390625e-08)
        return -v if s else v
    if e == 31:                                  # inf / NaN
        return float32(_f32_from_u32(s | uint32(0x7F800000) | (m << uint32(13))))
    return float32(_f32_from_u32(s | ((e + uint32(112)) << uint32(23)) | (m << uint32(13))))


@cuda.jit(device=True)
def narrow(v, kind):
    """16-bit pattern (as uint32) of float ``v`` rounded to nearest even."""
    x = _u32_from_f32(float32(v))
    if kind == BF16:
        if (x & uint32(0x7FFFFFFF)) > uint32(0x7F800000):          # NaN: keep it quiet
            return ((x >> uint32(16)) | uint32(0x40)) & uint32(0xFFFF)
        x = x + uint32(0x7FFF) + ((x >> uint32(16)) & uint32(1))
        return (x >> uint32(16)) & uint32(0xFFFF)
    sign = (x >> uint32(16)) & uint32(0x8000)
    a = x & uint32(0x7FFFFFFF)
    if a > uint32(0x7F800000):                                     # NaN
        return sign | uint32(0x7E00)
    if a >= uint32(0x477FF000):                                    # >= 65520: inf
        return sign | uint32(0x7C00)
    if a < uint32(0x38800000):                                     # half subnormal / 0
        r = _rint(float32(_f32_from_u32(a)) * float32(16777216.0))
        return sign | uint32(r)
    odd = (a >> uint32(13)) & uint32(1)
    a = a - uint32(0x38000000) + uint32(0xFFF) + odd               # rebias (127 -> 15), round
    return sign | ((a >> uint32(13)) & uint32(0x7FFF))


def loader(kind):
    """A device function turning an array element of ``kind`` into a float."""
    if kind == NATIVE:
        @cuda.jit(device=True)
        def ld(v):
            return v
    else:
        @cuda.jit(device=True)
        def ld(v):
            return widen(v, kind)
    return ld


def storer(kind, ftype):
    """A device function turning a float into an element of ``kind`` (``ftype`` for native)."""
    if kind == NATIVE:
        @cuda.jit(device=True)
        def st(v):
            return ftype(v)
    else:
        @cuda.jit(device=True)
        def st(v):
            return narrow(v, kind)
    return st
