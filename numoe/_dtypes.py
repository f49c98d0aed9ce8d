"""The float dtypes numoe accepts, named in one place (host side).

Numba knows neither ``ml_dtypes.bfloat16`` nor (fully) float16: 16-bit
arrays reach the CPU kernels as ``uint16`` views (:func:`bits`) and are
widened to float32 by the one CPU helper in :mod:`numoe._cpu._narrow`.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT16 = np.dtype(np.float16)
FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)
FLOATS = (FLOAT16, BFLOAT16, FLOAT32, FLOAT64)   # every float dtype accepted, native order
NARROW = (FLOAT16, BFLOAT16)                      # stored in 16 bits, computed in float32
NAMES = {"float16": FLOAT16, "bfloat16": BFLOAT16, "float32": FLOAT32, "float64": FLOAT64}


def native(dt):
    """``dt`` in the machine's byte order (``>f4`` -> ``<f4`` on x86)."""
    dt = np.dtype(dt)
    return dt if dt.isnative else dt.newbyteorder("=")


def as_float_dtype(name, dt):
    """A dtype argument (``np.float32``, ``"bfloat16"``, ...) as one of :data:`FLOATS`."""
    try:
        d = NAMES[dt] if isinstance(dt, str) and dt in NAMES else native(np.dtype(dt))
    except TypeError:
        raise TypeError(f"{name} must be a float dtype (float16, bfloat16, float32, float64), "
                        f"got {dt!r}") from None
    if d not in FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {d}")
    return d


def compute_dtype(dt):
    """The dtype arithmetic runs in: float32 for 16-bit storage, else ``dt`` itself."""
    dt = np.dtype(dt)
    return FLOAT32 if dt in NARROW else dt


def bits(a):
    """A 16-bit float array as its ``uint16`` view (what Numba kernels take); others as is."""
    return a.view(np.uint16) if a.dtype in NARROW else a


def widened(a):
    """``(array, storage dtype)``: a host array with 16-bit floats widened to float32.

    For ops that compute in float32 and hand back the storage dtype (the
    backward ops' 16-bit path); other arrays pass through ``np.asarray``.
    Any byte order: the storage dtype returned is the native one, and a
    byte-swapped 16-bit array is widened like a native one.
    """
    arr = np.asarray(a)
    dt = native(arr.dtype) if arr.dtype.kind in "fV" else arr.dtype
    if dt in NARROW:
        return arr.astype(FLOAT32), dt
    return arr, dt
