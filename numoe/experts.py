"""Expert feed-forward networks over grouped rows: :func:`expert_ffn`."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import _dtypes as D, _validate as V
from ._backend import backend_of, cuda_module

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")
_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}


class ExpertOptions(NamedTuple):
    """Validated scalar options of :func:`expert_ffn` (from :func:`_check_expert_options`)."""

    activation: str
    code: int          # index into ACTIVATIONS
    limit: float       # +inf when no clamp
    alpha: float


def _check_expert_options(activation, limit, alpha, glu):
    """Validate ``activation``, ``limit`` and ``alpha`` (shared with the CUDA module).

    ``glu`` says whether up-projection weights are given.
    """
    activation = V.choice("activation", activation, ACTIVATIONS)
    if activation == "swiglu_oai" and not glu:
        raise ValueError("activation='swiglu_oai' needs w_up (a GLU expert); got w_up=None")
    if limit is not None:
        if activation != "swiglu_oai":
            raise ValueError(f"limit applies only to activation='swiglu_oai'; got "
                             f"limit={limit!r} with activation={activation!r}")
        limit = V.real("limit", limit, lo=0.0)
    alpha = V.real("alpha", alpha)
    return ExpertOptions(activation, _CODES[activation],
                         float("inf") if limit is None else limit, alpha)


def _check_offsets(offsets, num_experts, num_rows):
    """``offsets [E+1]`` int, nondecreasing from 0 to ``num_rows``; returns int64."""
    arr = np.asarray(offsets) if offsets is not None else None
    if arr is None:
        raise TypeError("offsets must be an integer array, got None")
    if arr.dtype == object or arr.dtype.kind not in "iu":
        raise TypeError(f"offsets must be an integer array, got dtype {arr.dtype}")
    V.shape("offsets", arr, (num_experts + 1,))
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr[0] != 0 or arr[-1] != num_rows:
        raise ValueError(f"offsets must start at 0 and end at the number of rows of xs "
                         f"({num_rows}); got {int(arr[0])} .. {int(arr[-1])}")
    if np.any(np.diff(arr) < 0):
        raise ValueError("offsets must be nondecreasing")
    return arr


def _weight(name, a, dtype, shape):
    """An expert weight of ``shape`` whose storage is ``dtype``'s compute dtype or narrower.

    Float16/bfloat16/float32/float64 arrays (any byte order) or a
    :class:`numoe.QuantizedArray` (int8, scales along the input axis ``-2``)
    are read as stored by the kernels: nothing is cast per call. A weight
    *wider* than ``xs`` (float64 weights with float32 ``xs``) is a
    ``TypeError``: a per-call cast would copy every expert.
    """
    from .quant import QuantizedArray

    if isinstance(a, QuantizedArray):
        if a.ndim != len(shape) or a.axis != len(shape) - 2:
            raise ValueError(f"{name} must be quantized along its input axis "
                             f"(numoe.quantize({name}, axis=-2)), got axis {a.axis} of a "
                             f"{a.ndim}-D array")
        return V.shape(name, a, shape)
    w = V.float_array(name, a)
    if D.compute_dtype(w.dtype).itemsize > D.compute_dtype(dtype).itemsize:
        raise TypeError(f"{name} has dtype {w.dtype}, wider than xs ({np.dtype(dtype).name}); "
                        f"cast the weights once (e.g. {name}.astype(np.{np.dtype(dtype).name}))"
                        " -- a per-call cast would copy every expert")
    return V.shape(name, w, shape)


def _bias(name, a, dtype, shape):
    """A bias of ``shape`` in the compute dtype of ``dtype`` (small: converted)."""
    b = V.float_array(name, a)
    if D.compute_dtype(b.dtype).itemsize > D.compute_dtype(dtype).itemsize:
        raise TypeError(f"{name} has dtype {b.dtype}, wider than xs ({np.dtype(dtype).name})")
    return V.shape(name, b, shape).astype(D.compute_dtype(dtype), copy=False)


def _check_expert_arrays(xs, offsets, w_gate, w_up, w_down, b_gate, b_up, b_down):
    """Validate and normalise the arrays of :func:`expert_ffn` (host arrays).

    ``xs`` comes back in its own (native) dtype; weights as stored.
    """
    from .quant import QuantizedArray

    xs = V.float_array("xs", xs, ndim=2)
    N, H = xs.shape
    wg = w_gate if isinstance(w_gate, QuantizedArray) else V.float_array("w_gate", w_gate)
    if wg.ndim != 3:
        raise ValueError(f"w_gate must be 3-D, got shape {wg.shape}")
    E, Hg, F = wg.shape
    if E < 1:
        raise ValueError(f"w_gate must hold at least one expert, got shape {wg.shape}")
    if Hg != H:
        raise ValueError(f"w_gate must have shape (E, {H}, F) to match xs [N, {H}], "
                         f"got {wg.shape}")
    wg = _weight("w_gate", wg, xs.dtype, (E, H, F))
    wu = None if w_up is None else _weight("w_up", w_up, xs.dtype, (E, H, F))
    wd = _weight("w_down", w_down, xs.dtype, (E, F, H))
    if w_up is None and b_up is not None:
        raise ValueError("b_up was given but w_up is None (plain FFN experts have no up bias)")
    bg = None if b_gate is None else _bias("b_gate", b_gate, xs.dtype, (E, F))
    bu = None if b_up is None else _bias("b_up", b_up, xs.dtype, (E, F))
    bd = None if b_down is None else _bias("b_down", b_down, xs.dtype, (E, H))
    off = _check_offsets(offsets, E, N)
    return xs, off, wg, wu, wd, bg, bu, bd


def expert_ffn(xs, offsets, w_gate, w_up, w_down, *, activation="silu", b_gate=None,
               b_up=None, b_down=None, limit=None, alpha=1.702):
    """Run each expert's block of rows through that expert's feed-forward network.

    Rows ``offsets[e]:offsets[e+1]`` of ``xs`` go through expert ``e``
    (a grouped GEMM). GLU experts (``w_up`` given)::

        h  = act(xs @ w_gate[e] + b_gate[e]) * (xs @ w_up[e] + b_up[e])
        ys = h @ w_down[e] + b_down[e]

    Plain experts (``w_up=None``, Switch/GShard): ``h = act(xs @ w_gate[e]
    + b_gate[e])``.

    Parameters
    ----------
    xs : (N, H) float16, bfloat16, float32 or float64 array
        Rows grouped by expert (e.g. :func:`numoe.permute`); any byte order.
        16-bit rows are computed in float32 (and the result rounded back).
        bfloat16 rows with bfloat16 weights may run on the CPU's AMX-BF16
        tiles at prefill sizes, which round the hidden layer to bfloat16
        before the down product (as PyTorch's bf16 does).
    offsets : (E+1,) int array
        Expert ``e`` owns rows ``offsets[e]:offsets[e+1]``; nondecreasing
        from 0 to ``N`` (a :class:`numoe.DispatchPlan`'s ``offsets``).
    w_gate, w_up : (E, H, F) float array or QuantizedArray
        Gate and up projections ("x @ W" layout); ``w_up=None`` for plain
        FFN experts. Stored as ``xs`` or narrower: float16/bfloat16 (any
        ``xs``), float32 (float32/float64 ``xs``; also 16-bit ``xs``, which
        compute in float32), or int8 from :func:`numoe.quantize` (``axis=-2``).
        The kernels read the stored bytes and widen them in registers (or
        per column tile for BLAS): nothing is copied per call. Weights wider
        than ``xs``'s compute dtype are a ``TypeError`` (a per-call cast would
        copy every expert).
    w_down : (E, F, H) float array or QuantizedArray, as ``w_gate``
    activation : {"silu", "gelu", "gelu_tanh", "relu", "swiglu_oai"}
        ``"gelu"`` is exact (erf), ``"gelu_tanh"`` the tanh approximation.
        ``"swiglu_oai"`` (gpt-oss, GLU only): ``g = min(gate, limit)``,
        ``u = clip(up, -limit, limit)``, ``h = (u + 1) * g * sigmoid(alpha * g)``.
    b_gate, b_up : (E, F) float array, optional
    b_down : (E, H) float array, optional
        Biases (any float dtype no wider than ``xs``'s compute dtype).
    limit : float, optional
        Clamp of ``"swiglu_oai"`` (gpt-oss uses 7.0); ``None``: no clamp.
    alpha : float
        Sigmoid slope of ``"swiglu_oai"`` (gpt-oss: 1.702).

    Returns
    -------
    ys : (N, H) array, dtype of ``xs``
        A NumPy array for host inputs, a numba device array for device inputs.
        16-bit ``xs``: accumulated in float32, rounded to ``xs``'s dtype once.

    Notes
    -----
    The GLU form is Shazeer 2020 ("GLU Variants Improve Transformer",
    eq. 5-6); the plain form the Switch Transformer FFN (Fedus et al.
    2021). On the CPU each product is a single-threaded BLAS call of a
    fixed shape (or, for blocks of fewer than 8 rows, a fixed-order Numba
    loop that reads each weight once), spread over
    ``numba.get_num_threads()`` threads: results are bit-identical for any
    thread count. Rows with no expert work (empty blocks) cost nothing.

    Examples
    --------
    >>> import numpy as np, numoe
    >>> rng = np.random.default_rng(0)
    >>> E, H, F = 2, 4, 3
    >>> wg, wu = rng.standard_normal((2, E, H, F))
    >>> wd = rng.standard_normal((E, F, H))
    >>> xs = rng.standard_normal((5, H))
    >>> ys = numoe.expert_ffn(xs, [0, 2, 5], wg, wu, wd)
    >>> ys.shape
    (5, 4)
    >>> ref = numoe.reference.expert_ffn(xs, [0, 2, 5], wg, wu, wd)
    >>> bool(np.allclose(ys, ref))
    True
    """
    if backend_of(xs=xs, offsets=offsets, w_gate=w_gate, w_up=w_up, w_down=w_down,
                  b_gate=b_gate, b_up=b_up, b_down=b_down) == "cuda":
        return cuda_module("experts").expert_ffn(
            xs, offsets, w_gate, w_up, w_down, activation=activation, b_gate=b_gate,
            b_up=b_up, b_down=b_down, limit=limit, alpha=alpha)
    opts = _check_expert_options(activation, limit, alpha, w_up is not None)
    xs, off, wg, wu, wd, bg, bu, bd = _check_expert_arrays(
        xs, offsets, w_gate, w_up, w_down, b_gate, b_up, b_down)
    from ._cpu import experts as cpu

    cd = D.compute_dtype(xs.dtype)
    xc = xs if xs.dtype == cd else cpu.widen_weight(xs, cd)
    ys = np.empty((xs.shape[0], wd.shape[2]), dtype=cd)
    if xs.shape[0]:
        cpu.run_jobs([cpu.Job(xc, None, 1, off, wg, wu, False, wd, bg, bu, bd, opts.code,
                              opts.limit, opts.alpha, ys,
                              bf16_inputs=xs.dtype == D.BFLOAT16)])
    return ys if ys.dtype == xs.dtype else ys.astype(xs.dtype)


# ---------------------------------------------------------------- backward
class ExpertGrads(NamedTuple):
    """Result of :func:`expert_ffn_backward`: the gradient of each input of
    :func:`expert_ffn` (None where the forward had no such input)."""

    d_xs: Any
    d_w_gate: Any
    d_w_up: Any
    d_w_down: Any
    d_b_gate: Any
    d_b_up: Any
    d_b_down: Any


def _grad_operand(name, a, dtype, shape):
    """A host operand of the backward as a C-contiguous ``dtype`` array of ``shape``
    (16-bit and quantized weights widened: the backward may copy), and its
    storage dtype (float32 for int8 weights)."""
    if a is None:
        return None, None
    arr = np.asarray(a)                     # (dequantizes a QuantizedArray)
    store = D.native(arr.dtype) if D.native(arr.dtype) in D.FLOATS else D.FLOAT32
    arr = V.float_array(name, arr, dtype=dtype)
    return V.shape(name, arr, shape), store


def expert_ffn_backward(xs, offsets, w_gate, w_up, w_down, d_ys, *, activation="silu",
                        b_gate=None, b_up=None, b_down=None, limit=None, alpha=1.702):
    """Vector-Jacobian product of :func:`expert_ffn`.

    Parameters
    ----------
    xs, offsets, w_gate, w_up, w_down, activation, b_gate, b_up, b_down, limit, alpha
        Exactly as given to :func:`expert_ffn`.
    d_ys : (N, H) float array
        Gradient of the loss with respect to the expert outputs ``ys``.

    Returns
    -------
    ExpertGrads
        ``d_xs [N, H]`` (dtype of ``xs``), ``d_w_gate``, ``d_w_up``,
        ``d_w_down``, ``d_b_gate``, ``d_b_up``, ``d_b_down``, each the shape
        and float dtype of its input (float32 for int8 weights; None where
        the input was None).

    Notes
    -----
    Per expert, with ``G``/``U`` the gate/up pre-activations recomputed from
    ``xs`` and ``dH = d_ys @ w_down^T``: ``d_w_down = h^T d_ys``,
    ``dG = dH * dh/dG``, ``dU = dH * dh/dU``, ``d_w_gate = xs^T dG``,
    ``d_w_up = xs^T dU``, ``d_xs = dG w_gate^T + dU w_up^T``, biases the
    column sums. swiglu_oai's clamps pass no gradient beyond the limit.
    Every product is one single-threaded BLAS call of a fixed shape (row
    blocks for ``d_xs``, column chunks over all of an expert's rows for the
    weights): bit-identical for any thread count. Computed in float64 for
    float64 ``xs``, else float32.

    Examples
    --------
    >>> import numpy as np, numoe
    >>> rng = np.random.default_rng(0)
    >>> xs, dys = rng.standard_normal((2, 5, 4))
    >>> wg, wu = rng.standard_normal((2, 2, 4, 3))
    >>> wd = rng.standard_normal((2, 3, 4))
    >>> g = numoe.expert_ffn_backward(xs, [0, 2, 5], wg, wu, wd, dys)
    >>> ref = numoe.reference.expert_ffn_backward(xs, [0, 2, 5], wg, wu, wd, dys)
    >>> bool(np.allclose(g.d_w_up, ref["d_w_up"]))
    True
    """
    if backend_of(xs=xs, offsets=offsets, w_gate=w_gate, w_up=w_up, w_down=w_down,
                  d_ys=d_ys, b_gate=b_gate, b_up=b_up, b_down=b_down) == "cuda":
        return cuda_module("experts").expert_ffn_backward(
            xs, offsets, w_gate, w_up, w_down, d_ys, activation=activation, b_gate=b_gate,
            b_up=b_up, b_down=b_down, limit=limit, alpha=alpha)
    opts = _check_expert_options(activation, limit, alpha, w_up is not None)
    xs_in = np.asarray(xs)
    xdt = xs_in.dtype
    cdt = np.dtype(np.float64) if xdt == np.float64 else np.dtype(np.float32)
    x = V.float_array("xs", xs_in, ndim=2, dtype=cdt)
    N, H = x.shape
    wg_shape = np.shape(w_gate)
    if len(wg_shape) != 3 or wg_shape[0] < 1 or wg_shape[1] != H:
        raise ValueError(f"w_gate must have shape (E, {H}, F) with E >= 1 to match xs "
                         f"[N, {H}], got {wg_shape}")
    E, _, F = wg_shape
    wg, sg = _grad_operand("w_gate", w_gate, cdt, (E, H, F))
    wu, su = _grad_operand("w_up", w_up, cdt, (E, H, F))
    wd, sd = _grad_operand("w_down", w_down, cdt, (E, F, H))
    if w_up is None and b_up is not None:
        raise ValueError("b_up was given but w_up is None (plain FFN experts have no up bias)")
    bg, sbg = _grad_operand("b_gate", b_gate, cdt, (E, F))
    bu, sbu = _grad_operand("b_up", b_up, cdt, (E, F))
    bd, sbd = _grad_operand("b_down", b_down, cdt, (E, H))
    dy = V.float_array("d_ys", np.asarray(d_ys), ndim=2, dtype=cdt)
    V.shape("d_ys", dy, (N, H))
    V.check_finite("d_ys", dy)
    off = _check_offsets(offsets, E, N)
    from ._cpu import experts as cpu

    new = lambda a: None if a is None else np.zeros_like(a)  # noqa: E731
    job = cpu.BackwardJob(x, off, wg, wu, False, wd, bg, bu, bd, opts.code, opts.limit,
                          opts.alpha, dy, None, np.empty_like(x), new(wg), new(wu), new(wd),
                          new(bg), new(bu), new(bd), None, zeroed=True)
    cpu.run_backward(job)
    cast = lambda a, dt: None if a is None else a.astype(dt, copy=False)  # noqa: E731
    return ExpertGrads(cast(job.d_xs, xdt), cast(job.d_w1, sg), cast(job.d_w_up, su),
                       cast(job.d_w_down, sd), cast(job.d_b_gate, sbg),
                       cast(job.d_b_up, sbu), cast(job.d_b_down, sbd))
