"""Weight-only int8 quantisation: :func:`quantize` and :class:`QuantizedArray`."""
from __future__ import annotations

import numbers

import numpy as np

from . import _validate as V

__all__ = ["QuantizedArray", "quantize"]

QMAX = 127          # symmetric: values in [-127, 127] (-128 unused)


class QuantizedArray:
    """int8 values with float32 symmetric scales: ``w ~= values * scales``.

    Parameters
    ----------
    values : int8 array
    scales : float32 array
        The shape of ``values`` with size 1 along ``axis`` (one scale per
        vector along ``axis``: for an ``[E, H, F]`` expert weight and
        ``axis=-2``, one scale per expert and output column).
    axis : int
        The reduced (input) axis, the one the scales are shared along.

    Notes
    -----
    ``numpy.asarray(q)`` dequantizes (float32; ``np.asarray(q, np.float64)``
    for float64). ``q[e]`` and slices along the other axes are views
    (``QuantizedArray`` again); indexing along ``axis`` is an ``IndexError``.
    """

    __array_priority__ = 10

    def __init__(self, values, scales, axis=-2):
        values = np.asarray(values)
        scales = np.asarray(scales)
        if values.dtype != np.int8:
            raise TypeError(f"values must be an int8 array, got dtype {values.dtype}")
        if scales.dtype != np.float32:
            raise TypeError(f"scales must be a float32 array, got dtype {scales.dtype}")
        if values.ndim < 1:
            raise ValueError("values must have at least one dimension")
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) \
                or not -values.ndim <= axis < values.ndim:
            raise ValueError(f"axis must be an integer in [{-values.ndim}, {values.ndim}), "
                             f"got {axis!r}")
        axis = int(axis) % values.ndim
        want = values.shape[:axis] + (1,) + values.shape[axis + 1:]
        if scales.shape != want:
            raise ValueError(f"scales must have shape {want} (values' shape with 1 along "
                             f"axis {axis}), got {scales.shape}")
        self.values = values
        self.scales = scales
        self.axis = axis

    # ------------------------------------------------------------ array-like
    shape = property(lambda self: self.values.shape, doc="Shape of the (dequantized) array.")
    ndim = property(lambda self: self.values.ndim)
    size = property(lambda self: self.values.size)
    dtype = property(lambda self: np.dtype(np.int8), doc="Storage dtype: int8.")
    nbytes = property(lambda self: self.values.nbytes + self.scales.nbytes,
                      doc="Bytes held: values plus scales.")

    def __len__(self):
        return self.values.shape[0]

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("a QuantizedArray cannot be viewed as floats without a copy")
        out = self.values.astype(np.float32) * self.scales
        return out if dtype is None else out.astype(dtype, copy=False)

    def dequantize(self, dtype=np.float32):
        """``values * scales`` as a new ``dtype`` array (float32 by default)."""
        if np.dtype(dtype) == np.float64:
            return self.values.astype(np.float64) * self.scales.astype(np.float64)
        return np.asarray(self, dtype=dtype)

    def __getitem__(self, key):
        nd = self.ndim
        key = key if isinstance(key, tuple) else (key,)
        if sum(k is Ellipsis for k in key) > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (nd - len(key) + 1) + key[i + 1:]
        if len(key) > nd:
            raise IndexError(f"too many indices for a {nd}-D QuantizedArray")
        key = key + (slice(None),) * (nd - len(key))
        for k in key:
            if not isinstance(k, (slice, numbers.Integral)) or isinstance(k, bool):
                raise IndexError("QuantizedArray supports integers and slices only")
        if key[self.axis] != slice(None):
            raise IndexError(f"cannot index a QuantizedArray along its scale axis "
                             f"({self.axis}); dequantize it first (np.asarray)")
        axis = self.axis - sum(isinstance(k, numbers.Integral) for k in key[:self.axis])
        return QuantizedArray(self.values[key], self.scales[key], axis)

    def __repr__(self):
        return f"QuantizedArray(shape={self.shape}, axis={self.axis}, int8 + float32 scales)"


def quantize(w, axis=-2):
    """Symmetric int8 weight-only quantisation with one float32 scale per vector along ``axis``.

    ``scales = max(|w|) / 127`` over ``axis`` (float32), ``values =
    round(w / scales)`` to the nearest integer, ties to even (0 where the
    whole vector is 0). So ``|w - values * scales| <= scales / 2``.

    Parameters
    ----------
    w : float array (float16, bfloat16, float32 or float64; any byte order)
        E.g. an expert weight ``[E, H, F]`` ("x @ W" layout).
    axis : int
        The input (reduced) axis: ``-2`` gives one scale per output column
        of every expert, the layout :func:`numoe.expert_ffn` and
        :class:`numoe.MoELayer` take.

    Returns
    -------
    QuantizedArray
        ``np.asarray`` of it dequantizes.

    Examples
    --------
    >>> import numpy as np, numoe
    >>> q = numoe.quantize(np.array([[1.0, -0.5], [0.25, 2.0]]))
    >>> q.values.tolist(), q.scales.ravel().tolist()
    ([[127, -32], [32, 127]], [0.007874015718698502, 0.015748031437397003])
    """
    if isinstance(w, QuantizedArray):
        raise TypeError("w is already a QuantizedArray")
    a = V.float_array("w", w)
    if a.ndim < 1:
        raise ValueError("w must have at least one dimension")
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) \
            or not -a.ndim <= axis < a.ndim:
        raise ValueError(f"axis must be an integer in [{-a.ndim}, {a.ndim}), got {axis!r}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError("w holds NaN or inf; only finite weights can be quantized")
    amax = np.max(np.abs(a), axis=axis, keepdims=True) if a.shape[axis] else \
        np.zeros(a.shape[:axis % a.ndim] + (1,) + a.shape[axis % a.ndim + 1:])
    scales = (amax / QMAX).astype(np.float32)
    s64 = scales.astype(np.float64)
    q = np.rint(np.divide(a, s64, out=np.zeros_like(a), where=s64 > 0))
    values = np.clip(q, -QMAX, QMAX).astype(np.int8)
    return QuantizedArray(values, scales, axis)
