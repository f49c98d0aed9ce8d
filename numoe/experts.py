"""Expert feed-forward networks over grouped rows: :func:`expert_ffn`."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _validate as V
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
    """A float weight of ``shape`` and exactly ``dtype`` (no silent copies of big weights)."""
    w = V.float_array(name, a)
    if w.dtype != dtype:
        raise TypeError(f"{name} has dtype {w.dtype} but xs is {np.dtype(dtype).name}; "
                        f"cast the weights once (e.g. {name}.astype(np.{np.dtype(dtype).name}))"
                        " -- a per-call cast would copy every expert")
    return V.shape(name, w, shape)


def _check_expert_arrays(xs, offsets, w_gate, w_up, w_down, b_gate, b_up, b_down):
    """Validate and normalise the arrays of :func:`expert_ffn` (host arrays)."""
    xs = V.float_array("xs", xs, ndim=2)
    N, H = xs.shape
    wg = V.float_array("w_gate", w_gate, ndim=3)
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
    bg = None if b_gate is None else _weight("b_gate", b_gate, xs.dtype, (E, F))
    bu = None if b_up is None else _weight("b_up", b_up, xs.dtype, (E, F))
    bd = None if b_down is None else _weight("b_down", b_down, xs.dtype, (E, H))
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
    xs : (N, H) float32 or float64 array
        Rows grouped by expert (e.g. :func:`numoe.permute`).
    offsets : (E+1,) int array
        Expert ``e`` owns rows ``offsets[e]:offsets[e+1]``; nondecreasing
        from 0 to ``N`` (a :class:`numoe.DispatchPlan`'s ``offsets``).
    w_gate, w_up : (E, H, F) float array, same dtype as ``xs``
        Gate and up projections ("x @ W" layout); ``w_up=None`` for plain
        FFN experts. Weights are not cast: a dtype other than ``xs``'s is a
        ``TypeError`` (a per-call cast would copy every expert).
    w_down : (E, F, H) float array, same dtype as ``xs``
    activation : {"silu", "gelu", "gelu_tanh", "relu", "swiglu_oai"}
        ``"gelu"`` is exact (erf), ``"gelu_tanh"`` the tanh approximation.
        ``"swiglu_oai"`` (gpt-oss, GLU only): ``g = min(gate, limit)``,
        ``u = clip(up, -limit, limit)``, ``h = (u + 1) * g * sigmoid(alpha * g)``.
    b_gate, b_up : (E, F) float array, optional
    b_down : (E, H) float array, optional
    limit : float, optional
        Clamp of ``"swiglu_oai"`` (gpt-oss uses 7.0); ``None``: no clamp.
    alpha : float
        Sigmoid slope of ``"swiglu_oai"`` (gpt-oss: 1.702).

    Returns
    -------
    ys : (N, H) array, dtype of ``xs``
        A NumPy array for host inputs, a numba device array for device inputs.

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

    ys = np.empty((xs.shape[0], wd.shape[2]), dtype=xs.dtype)
    if xs.shape[0] == 0:
        return ys
    cpu.run_jobs([cpu.Job(xs, None, 1, off, wg, wu, False, wd, bg, bu, bd, opts.code,
                          opts.limit, opts.alpha, ys)])
    return ys
