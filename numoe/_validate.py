"""Argument checks shared by every public wrapper (host arrays).

Each helper raises ``TypeError`` (wrong kind of thing) or ``ValueError``
(right kind, wrong value) with a message naming the argument, and returns a
C-contiguous array of a canonical dtype. Inputs are never written: anything
that needs changing is copied.
"""
from __future__ import annotations

import numbers
import operator

import numpy as np

from ._dtypes import FLOATS, native

FLOAT_NAMES = "float16, bfloat16, float32 or float64"


def _as_ndarray(name, a):
    if a is None:
        raise TypeError(f"{name} must be an array, got None")
    try:
        arr = np.asarray(a)
    except Exception as exc:  # noqa: BLE001
        hint = ""
        if hasattr(a, "detach"):     # a torch tensor that NumPy cannot read as it is
            hint = (f"; pass {name}.detach().cpu().numpy() (a bfloat16 tensor: "
                    f"{name}.detach().float().cpu().numpy())")
        raise TypeError(f"{name} must be array-like, got {type(a).__name__}{hint}") from exc
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got dtype object")
    return arr


def sequence_as(name, a, dtype):
    """A list or tuple (no dtype of its own) read as ``dtype``, as ``np.asarray`` would."""
    try:
        return np.asarray(a, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a nested list of numbers, got {exc}") from exc


def float_array(name, a, *, ndim=None, dtype=None):
    """A C-contiguous float16/bfloat16/float32/float64 array in native byte order.

    Any byte order is accepted (non-native input is converted, a copy);
    integer, bool, complex and other dtypes are a ``TypeError``. ``dtype``
    (if given) converts float inputs to that float dtype. 16-bit arrays are
    returned as they are stored: widening them is the caller's choice.
    """
    arr = _as_ndarray(name, a)
    dt = native(arr.dtype)
    if dt not in FLOATS:
        raise TypeError(f"{name} must be {FLOAT_NAMES}, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if dtype is not None:
        dt = np.dtype(dtype)
    if arr.dtype != dt:
        arr = arr.astype(dt)
    return np.ascontiguousarray(arr)


def tokens_2d(name, a, *, min_ndim=2):
    """Flatten leading batch dims: ``[..., X] -> [T, X]``; returns ``(arr2d, lead_shape)``."""
    arr = float_array(name, a)
    if arr.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims ([..., X]), "
                         f"got shape {arr.shape}")
    lead = arr.shape[:-1]
    return np.ascontiguousarray(arr.reshape(-1, arr.shape[-1])), lead


def index_array(name, a, *, ndim=None, upper=None):
    """A C-contiguous native int32 (int64 if values need it) array with values in
    ``[0, upper)``; any integer dtype and byte order is accepted (converted)."""
    arr = _as_ndarray(name, a)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise ValueError(f"{name} holds a negative id ({lo}); ids must be in [0, {upper})")
        if upper is not None and hi >= upper:
            raise ValueError(f"{name} holds id {hi}, out of range [0, {upper})")
        big = hi > np.iinfo(np.int32).max
    else:
        big = False
    return np.ascontiguousarray(arr, dtype=np.int64 if big else np.int32)


def check_finite(name, arr, *, allow_neg_inf=False):
    """ValueError if ``arr`` holds NaN or +/-inf (``-inf`` allowed on request)."""
    if arr.size == 0:
        return
    if allow_neg_inf:
        bad = np.isnan(arr) | (arr == np.inf)
        if bad.any():
            raise ValueError(f"{name} holds NaN or +inf; only finite values and -inf (masked) "
                             "are allowed")
    elif not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or inf; all values must be finite")


def integer(name, v, *, lo=None, hi=None):
    """A Python int in ``[lo, hi]`` (bools and non-integral numbers rejected)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        try:
            if isinstance(v, (bool, np.bool_)):
                raise TypeError
            v = operator.index(v)
        except TypeError:
            raise TypeError(f"{name} must be an integer, got {v!r}") from None
    v = int(v)
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v}")
    return v


def real(name, v, *, finite=True, lo=None):
    """A Python float (finite unless ``finite=False``; ``>= lo`` if given)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {v!r}")
    v = float(v)
    if finite and not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


def flag(name, v):
    """``v`` must be a bool (Python or NumPy); returns it as a Python bool."""
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {v!r}")
    return bool(v)


def choice(name, v, options):
    """``v`` must be one of ``options``."""
    if not isinstance(v, str) or v not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {v!r}")
    return v


def shape(name, arr, expected):
    """ValueError unless ``arr.shape == expected``."""
    if tuple(arr.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(arr.shape)}")
    return arr
