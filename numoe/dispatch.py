"""Dispatch and combine: group token-expert assignments by expert and back.

``dispatch_plan`` is a stable counting sort of the ``T*k`` assignments by
expert (optionally capped per expert), ``permute`` gathers token rows into
expert-grouped order, ``unpermute`` sums each token's expert outputs with
its routing weights in a fixed order (bit-reproducible, no atomics).
"""
from __future__ import annotations

import math

import numpy as np

from . import _validate as V
from ._backend import backend_of, cuda_module
from ._cpu import dispatch as _cpu
from ._cpu._narrow import kind_of
from ._dtypes import NARROW, bits, widened
from ._types import DispatchPlan

__all__ = ["capacity", "dispatch_plan", "permute", "unpermute"]

DROP_POLICIES = ("slot", "position", "score")
_POLICY_CODE = {"slot": _cpu.POLICY_SLOT, "position": _cpu.POLICY_POSITION,
                "score": _cpu.POLICY_SCORE}
_INT32_MAX = np.iinfo(np.int32).max


# ------------------------------------------------------------ shared checks
def _check_dispatch_options(num_experts, capacity, drop_policy, has_weights):
    """Validate the scalar options of :func:`dispatch_plan` (shared with CUDA).

    Returns ``(num_experts, capacity)`` as Python ints (capacity may be None).
    """
    num_experts = V.integer("num_experts", num_experts, lo=1)
    if capacity is not None:
        capacity = V.integer("capacity", capacity, lo=1)
    V.choice("drop_policy", drop_policy, DROP_POLICIES)
    if drop_policy == "score" and not has_weights:
        raise ValueError('drop_policy="score" needs weights [T, k] (the routing weights); '
                         "got weights=None")
    return num_experts, capacity


def _index_dtype(m):
    """int32 unless there are more than ``2**31 - 1`` flat ids (as the reference)."""
    return np.int64 if m > _INT32_MAX else np.int32


def _plan_arrays(plan):
    """The plan's arrays by name, for backend choice (empty if not a DispatchPlan)."""
    if not isinstance(plan, DispatchPlan):
        return {}
    return {"plan.order": plan.order, "plan.offsets": plan.offsets,
            "plan.counts": plan.counts, "plan.dropped": plan.dropped}


def _check_plan(plan):
    """Validate a host :class:`DispatchPlan`; return canonical arrays.

    Returns ``(order, offsets, dropped, T, k)`` with ``order`` C-contiguous
    int32/int64 and every value of it in ``[0, T*k)``.
    """
    if not isinstance(plan, DispatchPlan):
        raise TypeError(f"plan must be a numoe.DispatchPlan (from dispatch_plan), "
                        f"got {type(plan).__name__}")
    dropped = V._as_ndarray("plan.dropped", plan.dropped)
    if dropped.dtype != np.bool_:
        raise TypeError(f"plan.dropped must be a bool array, got dtype {dropped.dtype}")
    if dropped.ndim != 2 or dropped.shape[1] < 1:
        raise ValueError(f"plan.dropped must be 2-D [T, k] with k >= 1, got shape {dropped.shape}")
    T, k = dropped.shape
    m = T * k
    order = V.index_array("plan.order", plan.order, ndim=1, upper=m)
    n = order.shape[0]
    offsets = V.index_array("plan.offsets", plan.offsets, ndim=1, upper=n + 1)
    if offsets.shape[0] < 2:
        raise ValueError(f"plan.offsets must have E+1 >= 2 entries, got shape {offsets.shape}")
    offsets = offsets.astype(np.int64)
    d = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != n or (d < 0).any():
        raise ValueError("plan.offsets must be non-decreasing from 0 to len(plan.order) "
                         f"= {n}, got {offsets[0]} .. {offsets[-1]}")
    num_experts = offsets.shape[0] - 1
    counts = V._as_ndarray("plan.counts", plan.counts)
    if counts.dtype.kind not in "iu":
        raise TypeError(f"plan.counts must be an integer array, got dtype {counts.dtype}")
    V.shape("plan.counts", counts, (num_experts,))
    if not np.array_equal(counts, d):
        raise ValueError("plan.counts must equal np.diff(plan.offsets)")
    cap = plan.capacity
    if cap is not None:
        cap = V.integer("plan.capacity", cap, lo=1)
        if num_experts and d.size and int(d.max()) > cap:
            raise ValueError(f"plan.counts exceeds plan.capacity ({cap})")
    kept = m - int(np.count_nonzero(dropped))
    if kept != n:
        raise ValueError(f"plan.dropped marks {kept} assignments kept but plan.order "
                         f"holds {n}")
    return order, offsets, np.ascontiguousarray(dropped), T, k


# ---------------------------------------------------------------- capacity
def capacity(num_tokens, num_experts, k, capacity_factor):
    """Per-expert capacity for a capacity factor (GShard / Switch).

    Parameters
    ----------
    num_tokens : int
        Number of tokens T (>= 0).
    num_experts : int
        Number of experts E (>= 1).
    k : int
        Experts per token (>= 1).
    capacity_factor : float
        Finite, > 0; 1.0 means exactly the balanced share.

    Returns
    -------
    int
        ``ceil(capacity_factor * T * k / E)`` clamped to ``[1, max(T, 1)]``.

    Examples
    --------
    >>> import numoe
    >>> numoe.capacity(1024, 8, 2, 1.25)
    320
    >>> numoe.capacity(4, 64, 1, 1.0)
    1
    """
    num_tokens = V.integer("num_tokens", num_tokens, lo=0)
    num_experts = V.integer("num_experts", num_experts, lo=1)
    k = V.integer("k", k, lo=1)
    capacity_factor = V.real("capacity_factor", capacity_factor)
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    share = capacity_factor * num_tokens * k / num_experts
    if not share < num_tokens:          # also catches an overflow to inf
        return max(num_tokens, 1)
    return int(min(max(math.ceil(share), 1), max(num_tokens, 1)))


# ------------------------------------------------------------ dispatch_plan
def dispatch_plan(experts, num_experts, *, capacity=None, weights=None, drop_policy="slot"):
    """Group the ``T*k`` token-expert assignments by expert (stable counting sort).

    Parameters
    ----------
    experts : [T, k] int array
        Chosen expert ids, each in ``[0, num_experts)``. Repeated ids in a
        row are allowed (each is its own assignment).
    num_experts : int
        Number of experts E (>= 1).
    capacity : int or None, optional
        At most this many assignments per expert (>= 1); None: dropless.
    weights : [T, k] float16, bfloat16, float32 or float64, optional
        Routing weights, finite, any byte order; required by
        ``drop_policy="score"`` (16-bit weights are compared as their exact
        float32 values).
    drop_policy : {"slot", "position", "score"}, optional
        Which assignments survive when an expert overflows: ``"slot"``
        keeps all first choices before any second choice, then token order
        (GShard, Tutel); ``"position"`` keeps token order over all slots
        jointly; ``"score"`` keeps the highest weights (ties: lower flat id).

    Returns
    -------
    DispatchPlan
        ``order [N]`` int32 (int64 if ``T*k`` needs it): flat ids ``t*k + j``
        of the kept assignments, ascending expert, ascending flat id inside
        an expert; ``offsets [E+1]`` int64; ``counts [E]`` int64 (kept per
        expert); ``dropped [T, k]`` bool; ``capacity`` as given.

    Notes
    -----
    A counting sort: per-chunk histograms (fixed chunk size), one exclusive
    prefix over (expert, chunk), then each chunk scatters into its own
    slots. With a capacity, the overflowing experts' segments are trimmed
    by the policy's priority and compacted. No atomics: the plan is
    identical for any thread count. Capacity as in Lepikhin et al. 2020
    (GShard, Sec. 2.2).

    Examples
    --------
    >>> import numpy as np, numoe
    >>> p = numoe.dispatch_plan(np.array([[1, 0], [1, 2]]), 3)
    >>> p.order.tolist(), p.offsets.tolist()
    ([1, 0, 2, 3], [0, 1, 3, 4])
    >>> numoe.dispatch_plan(np.array([[1, 0], [1, 2]]), 3, capacity=1).dropped.tolist()
    [[False, False], [True, False]]
    """
    if backend_of(experts=experts, weights=weights) == "cuda":
        return cuda_module("dispatch").dispatch_plan(
            experts, num_experts, capacity=capacity, weights=weights, drop_policy=drop_policy)
    num_experts, capacity = _check_dispatch_options(num_experts, capacity, drop_policy,
                                                    weights is not None)
    ex = V.index_array("experts", experts, ndim=2, upper=num_experts)
    T, k = ex.shape
    if k < 1:
        raise ValueError(f"experts must have at least one column ([T, k], k >= 1), "
                         f"got shape {ex.shape}")
    w = None
    if weights is not None:
        w = V.float_array("weights", weights, ndim=2)
        V.shape("weights", w, (T, k))
        V.check_finite("weights", w)
    m = T * k
    need_w = capacity is not None and drop_policy == "score"
    w_flat = widened(w)[0].reshape(-1) if need_w else np.empty(0, np.float64)
    order, offsets, counts, dropped = _cpu.dispatch_plan(
        ex.reshape(-1), num_experts, k, capacity, _POLICY_CODE[drop_policy], w_flat,
        _index_dtype(m))
    return DispatchPlan(order, offsets, counts, dropped.reshape(T, k), capacity)


# ----------------------------------------------------------------- permute
def permute(x, plan, *, out=None):
    """Gather token rows into expert-grouped order.

    Parameters
    ----------
    x : [..., H] float16, bfloat16, float32 or float64
        Token activations (any byte order: non-native input is converted
        first); leading dims are flattened to ``T`` tokens, which must match
        ``plan.dropped.shape[0]``.
    plan : DispatchPlan
        From :func:`dispatch_plan`.
    out : [N, H] ndarray, optional
        C-contiguous, writeable, dtype of ``x`` (native byte order), not
        overlapping ``x``;
        receives the result (and is returned). Saves the allocation (and
        its page faults) when the buffer is reused.

    Returns
    -------
    xs : [N, H] float, dtype of ``x``
        ``xs[i] = x[plan.order[i] // k]``; rows ``offsets[e]:offsets[e+1]``
        belong to expert ``e``.

    Notes
    -----
    Parallel over output rows (row copies). Outputs of 32 MiB and more are
    written with non-temporal stores, since they cannot stay in cache.
    16-bit rows are copied as their ``uint16`` bits (no conversion).

    Examples
    --------
    >>> import numpy as np, numoe
    >>> p = numoe.dispatch_plan(np.array([[1, 0], [1, 2]]), 3)
    >>> numoe.permute(np.array([[10.0], [20.0]]), p)[:, 0].tolist()
    [10.0, 10.0, 20.0, 20.0]
    """
    if backend_of(x=x, out=out, **_plan_arrays(plan)) == "cuda":
        return cuda_module("dispatch").permute(x, plan, out=out)
    order, _, _, T, k = _check_plan(plan)
    x2, _ = V.tokens_2d("x", x)
    if x2.shape[0] != T:
        raise ValueError(f"x must hold T = {T} tokens (plan.dropped.shape[0]), "
                         f"got {x2.shape[0]} (x shape {np.shape(x)})")
    shape = (order.shape[0], x2.shape[1])
    if out is None:
        out = np.empty(shape, x2.dtype)
    else:
        _check_out(out, shape, x2.dtype, "x", x=x)
    _cpu.permute(bits(x2), order, k, bits(out))
    return out


# --------------------------------------------------------------- unpermute
def unpermute(ys, plan, weights, *, out=None):
    """Combine expert outputs back to tokens with the routing weights.

    Parameters
    ----------
    ys : [N, H] float16, bfloat16, float32 or float64
        Expert outputs in plan order (e.g. from :func:`numoe.expert_ffn`),
        any byte order.
    plan : DispatchPlan
        The plan that produced the permuted rows.
    weights : [T, k] float (any of the four dtypes, any byte order)
        Routing weights (finite). Converted to the dtype the sum is
        accumulated in: that of ``ys``, float32 for 16-bit ``ys``.
    out : [T, H] ndarray, optional
        C-contiguous, writeable, dtype of ``ys`` (native byte order), not
        overlapping the inputs;
        receives the result (and is returned).

    Returns
    -------
    y : [T, H] float, dtype of ``ys``
        ``y[t] = sum_{j=0..k-1} weights[t, j] * ys[pos(t, j)]`` over the kept
        slots; a token whose slots were all dropped gets zeros.

    Notes
    -----
    Each token's row is accumulated in the output dtype (float32 for
    16-bit ``ys``, rounded once to the output dtype at the end), starting
    from 0 and adding the kept slots in ascending ``j``; one token per
    task, no atomics, so ``y`` is bit-identical for any thread count and
    each row depends only on that token's inputs.

    Examples
    --------
    >>> import numpy as np, numoe
    >>> p = numoe.dispatch_plan(np.array([[1, 0], [1, 2]]), 3)
    >>> xs = numoe.permute(np.array([[10.0], [20.0]]), p)
    >>> numoe.unpermute(xs, p, np.array([[0.5, 0.25], [1.0, 1.0]]))[:, 0].tolist()
    [7.5, 40.0]
    """
    if backend_of(ys=ys, weights=weights, out=out, **_plan_arrays(plan)) == "cuda":
        return cuda_module("dispatch").unpermute(ys, plan, weights, out=out)
    order, _, dropped, T, k = _check_plan(plan)
    ys = V.float_array("ys", ys, ndim=2)
    if ys.shape[0] != order.shape[0]:
        raise ValueError(f"ys must have N = {order.shape[0]} rows (len(plan.order)), "
                         f"got shape {ys.shape}")
    w = V.float_array("weights", weights, ndim=2)
    V.shape("weights", w, (T, k))
    V.check_finite("weights", w)
    narrow = ys.dtype in NARROW
    w = np.ascontiguousarray(w, dtype=np.float32 if narrow else ys.dtype)
    H = ys.shape[1]
    if out is None:
        out = np.empty((T, H), ys.dtype)
    else:
        _check_out(out, (T, H), ys.dtype, "ys", ys=ys, weights=weights)
    pos, bad = _cpu.inverse_positions(order, dropped.reshape(-1))
    if bad:
        raise ValueError(f"plan.order repeats ids or lists dropped assignments "
                         f"({bad} inconsistent entries); not a valid plan")
    if narrow:
        _cpu.unpermute_narrow(bits(ys), pos, w, k, bits(out), kind_of(ys.dtype))
        return out
    return _cpu.unpermute(ys, pos, w, k, out)


def _check_out(out, shape, dtype, like, **inputs):
    """``out`` must be a writeable C-contiguous ndarray of ``shape``/``dtype``
    that shares no memory with ``inputs``."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out must have dtype {np.dtype(dtype)} (that of {like}, native "
                        f"byte order), got {out.dtype}")
    V.shape("out", out, shape)
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError("out must be writeable")
    for name, a in inputs.items():
        if isinstance(a, np.ndarray) and np.may_share_memory(out, a):
            raise ValueError(f"out must not overlap {name}")


# ---------------------------------------------------------------- backward
def _plan_positions(order, dropped):
    """``pos [T*k]`` int64 from a checked plan's ``order`` and ``dropped`` (raises if
    they disagree)."""
    pos, bad = _cpu.inverse_positions(order, dropped.reshape(-1))
    if bad:
        raise ValueError(f"plan.order repeats ids or lists dropped assignments "
                         f"({bad} inconsistent entries); not a valid plan")
    return pos


def permute_backward(d_xs, plan):
    """Vector-Jacobian product of :func:`permute`.

    Parameters
    ----------
    d_xs : [N, H] float
        Gradient with respect to the permuted rows.
    plan : DispatchPlan
        The plan given to :func:`permute`.

    Returns
    -------
    d_x : [T, H] float, dtype of ``d_xs``
        ``d_x[t]`` = sum over the kept slots ``j`` of token ``t``, in slot
        order, of ``d_xs[pos(t, j)]`` (zeros for a token with no kept slot).

    Notes
    -----
    One token per task, a fixed sum order: bit-identical for any thread count.

    Examples
    --------
    >>> import numpy as np, numoe
    >>> p = numoe.dispatch_plan(np.array([[1, 0], [1, 2]]), 3)
    >>> numoe.permute_backward(np.array([[1.0], [2.0], [4.0], [8.0]]), p)[:, 0].tolist()
    [3.0, 12.0]
    """
    if backend_of(d_xs=d_xs, **_plan_arrays(plan)) == "cuda":
        return cuda_module("dispatch").permute_backward(d_xs, plan)
    from ._dtypes import widened

    order, _, dropped, T, k = _check_plan(plan)
    g, dt = widened(d_xs)
    g = V.float_array("d_xs", g, ndim=2)
    if g.shape[0] != order.shape[0]:
        raise ValueError(f"d_xs must have N = {order.shape[0]} rows (len(plan.order)), "
                         f"got shape {g.shape}")
    pos = _plan_positions(order, dropped)
    out = np.empty((T, g.shape[1]), g.dtype)
    _cpu.permute_backward(g, pos, k, out)
    return out.astype(dt, copy=False)


def unpermute_backward(d_y, ys, plan, weights):
    """Vector-Jacobian product of :func:`unpermute`.

    Parameters
    ----------
    d_y : [T, H] float
        Gradient with respect to the combined output.
    ys : [N, H] float
        The expert outputs given to :func:`unpermute`.
    plan : DispatchPlan
    weights : [T, k] float
        The routing weights given to :func:`unpermute`.

    Returns
    -------
    d_ys : [N, H] float, dtype of ``ys``
        ``d_ys[pos(t, j)] = weights[t, j] * d_y[t]``.
    d_weights : [T, k] float, dtype of ``weights``
        ``d_weights[t, j] = d_y[t] . ys[pos(t, j)]`` (summed in float64),
        0 where the slot was dropped.

    Examples
    --------
    >>> import numpy as np, numoe
    >>> p = numoe.dispatch_plan(np.array([[0]]), 1)
    >>> d_ys, d_w = numoe.unpermute_backward(np.array([[1.0, 2.0]]), np.array([[3.0, 4.0]]),
    ...                                      p, np.array([[0.5]]))
    >>> d_ys.tolist(), d_w.tolist()
    ([[0.5, 1.0]], [[11.0]])
    """
    if backend_of(d_y=d_y, ys=ys, weights=weights, **_plan_arrays(plan)) == "cuda":
        return cuda_module("dispatch").unpermute_backward(d_y, ys, plan, weights)
    from ._dtypes import widened

    order, _, dropped, T, k = _check_plan(plan)
    ys_, ys_dt = widened(ys)
    ys_ = V.float_array("ys", ys_, ndim=2)
    if ys_.shape[0] != order.shape[0]:
        raise ValueError(f"ys must have N = {order.shape[0]} rows (len(plan.order)), "
                         f"got shape {ys_.shape}")
    H = ys_.shape[1]
    g, _ = widened(d_y)
    g = V.float_array("d_y", g, ndim=2, dtype=ys_.dtype)
    V.shape("d_y", g, (T, H))
    V.check_finite("d_y", g)
    w, w_dt = widened(weights)
    w = V.float_array("weights", w, ndim=2)
    V.shape("weights", w, (T, k))
    V.check_finite("weights", w)
    w = np.ascontiguousarray(w, dtype=ys_.dtype)
    pos = _plan_positions(order, dropped)
    d_ys = np.empty_like(ys_)
    d_w = np.empty((T, k))
    _cpu.unpermute_backward(g, ys_, pos, w, k, d_ys, d_w)
    return d_ys.astype(ys_dt, copy=False), d_w.astype(w_dt, copy=False)
