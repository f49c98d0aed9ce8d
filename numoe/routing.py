"""Top-k routing: :func:`route` and :func:`router_probs` (public wrappers)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _validate as V
from ._backend import backend_of, cuda_module
from ._dtypes import widened
from ._cpu import routing as cpu
from ._types import Routing

SCORES = ("softmax", "sigmoid")
GROUP_SCORES = ("top2", "max")
_CHUNK = 256     # rows per scratch allocation in the CPU drivers (any value gives the same bits)
_RANK_MAX = 32   # top-k: rank up to this many candidates, insert beyond (same result either way)


class RouteOptions(NamedTuple):
    """Validated scalar options of :func:`route` (from :func:`_check_route_options`)."""

    k: int
    sigmoid: bool
    renormalize: bool
    n_groups: int
    topk_groups: int
    group_max: bool
    scale: float
    grouped: bool      # topk_groups < n_groups: groups restrict the choice


def _check_route_options(num_experts, k, score, renormalize, bias_shape, n_groups,
                         topk_groups, group_score, scale):
    """Check every scalar option of :func:`route` for ``num_experts`` experts.

    ``bias_shape`` is the shape of the selection bias (``None``: no bias);
    its values are checked by :func:`_check_bias`. Returns a
    :class:`RouteOptions` with ``topk_groups`` resolved (``None`` ->
    ``n_groups``) and ``grouped`` true when groups restrict the choice.
    Shared with the CUDA backend.
    """
    E = num_experts
    V.choice("score", score, SCORES)
    V.choice("group_score", group_score, GROUP_SCORES)
    V.flag("renormalize", renormalize)
    k = V.integer("k", k, lo=1)
    if k > E:
        raise ValueError(f"k must be <= the number of experts ({E}), got {k}")
    if bias_shape is not None and tuple(bias_shape) != (E,):
        raise ValueError(f"bias must have shape ({E},) (one entry per expert), "
                         f"got {tuple(bias_shape)}")
    n_groups = V.integer("n_groups", n_groups, lo=1)
    if E % n_groups:
        raise ValueError(f"n_groups must divide the number of experts ({E}), got {n_groups}")
    if topk_groups is None:
        topk_groups = n_groups
    topk_groups = V.integer("topk_groups", topk_groups, lo=1, hi=n_groups)
    if topk_groups * (E // n_groups) < k:
        raise ValueError(
            f"topk_groups={topk_groups} groups of {E // n_groups} experts leave fewer than "
            f"k={k} experts to choose from; need topk_groups * (E / n_groups) >= k")
    scale = V.real("scale", scale)
    return RouteOptions(k, score == "sigmoid", bool(renormalize), n_groups, topk_groups,
                        group_score == "max", scale, n_groups > 1 and topk_groups < n_groups)


def _check_bias(bias, num_experts):
    """The selection bias as a float64 ``[E]`` host array (finite), or None."""
    if bias is None:
        return None
    b = V.float_array("bias", bias, dtype=np.float64)
    V.shape("bias", b, (num_experts,))      # (also checked with the options; cheap)
    V.check_finite("bias", b)
    return b


def _expert_rows(name, a):
    """``a [..., E]`` (E >= 1) as a C-contiguous ``[T, E]`` float array, plus the leading shape."""
    arr = V.float_array(name, a)
    if np.ndim(a) < 1 or arr.shape[-1] == 0:     # (ascontiguousarray makes 0-d 1-d)
        raise ValueError(f"{name} must have shape [..., E] with E >= 1 experts, got {arr.shape}")
    return V.tokens_2d(name, arr, min_ndim=1)


def _raise_row_status(name, status):
    """Raise the ValueError that a non-zero per-row status from a CPU driver stands for."""
    bad = np.flatnonzero(status)
    if bad.size == 0:
        return
    t = int(bad[0])
    if status[t] == cpu.BAD_VALUE:
        raise ValueError(f"{name} holds NaN or +inf (first in token row {t}); only finite "
                         "values and -inf (masked expert) are allowed")
    raise ValueError(f"{name} row {t} is -inf for every expert, so its softmax is undefined "
                     f"({bad.size} bad rows)")


def route(logits, k, *, score="softmax", renormalize=True, bias=None, n_groups=1,
          topk_groups=None, group_score="top2", scale=1.0):
    """Top-k expert choice per token.

    Parameters
    ----------
    logits : [..., E] float16, bfloat16, float32 or float64
        Router logits (any byte order); leading dims are flattened to T
        tokens. 16-bit logits are widened to float32 (exactly). ``-inf``
        marks a masked expert (score 0); NaN and ``+inf`` are rejected, as
        is (for softmax) a row that is ``-inf`` everywhere.
    k : int
        Experts per token, ``1 <= k <= E``.
    score : {"softmax", "sigmoid"}
        Softmax over all E experts, or an elementwise sigmoid.
    renormalize : bool
        Divide the chosen scores by their sum (``+ 1e-20`` guard).
    bias : [E] float (any of the four dtypes), optional
        Selection-only bias: experts are chosen by ``s + bias`` while the
        weights come from the unbiased scores ``s`` (DeepSeek-V3).
    n_groups : int
        Split the experts into this many contiguous equal groups.
    topk_groups : int, optional
        Keep only the best ``topk_groups`` groups (default: all).
    group_score : {"top2", "max"}
        Group score: the sum of its two best selection scores, or the max.
    scale : float
        Final multiplier on the weights (routed scaling factor).

    Returns
    -------
    Routing
        ``weights [..., k]`` (input float dtype) and ``experts [..., k]``
        int32, ordered by descending selection score, ties to the lower id.
        For 16-bit logits the weights are computed as for float32 logits
        and rounded once to the input dtype.

    Notes
    -----
    Top-k gating after Shazeer et al. (2017), eq. 3-5; group-limited
    sigmoid routing with a balancing bias after DeepSeek-AI (2024),
    DeepSeek-V3 report eq. 12-16. Without a bias the choice is made on the
    logits themselves (the same order as the scores, free of rounding).
    With a bias, a masked (``-inf``) expert has score 0 and selection
    score ``bias[e]``, so it can still be chosen. Excluded groups' experts
    select as ``-inf``; where allowed experts are ``-inf`` too, the tie
    goes to the lower id like any other.

    Examples
    --------
    >>> import numpy as np, numoe
    >>> r = numoe.route(np.array([[1.0, 3.0, 2.0, 3.0]]), 2)
    >>> r.experts
    array([[1, 3]], dtype=int32)
    >>> r.weights
    array([[0.5, 0.5]])
    >>> import ml_dtypes                     # 16-bit in, 16-bit out
    >>> numoe.route(r.weights.astype(ml_dtypes.bfloat16), 1).weights
    array([[1]], dtype=bfloat16)
    """
    if backend_of(logits=logits, bias=bias) == "cuda":
        return cuda_module("routing").route(
            logits, k, score=score, renormalize=renormalize, bias=bias, n_groups=n_groups,
            topk_groups=topk_groups, group_score=group_score, scale=scale)
    z, lead = _expert_rows("logits", logits)
    z, dt = widened(z)          # 16-bit: float32 values, same order and ties
    E = z.shape[1]
    opt = _check_route_options(E, k, score, renormalize,
                               None if bias is None else np.shape(bias), n_groups,
                               topk_groups, group_score, scale)
    b = _check_bias(bias, E)

    T, k = z.shape[0], opt.k
    weights = np.empty((T, k), dtype=z.dtype)
    experts = np.empty((T, k), dtype=np.int32)
    status = np.empty(T, dtype=np.uint8)
    if T:
        if b is None and not opt.grouped:
            cpu.route_plain(z, k, opt.sigmoid, opt.renormalize, opt.scale, _CHUNK, _RANK_MAX,
                            weights, experts, status)
        else:
            use_bias = b is not None
            cpu.route_general(z, k, opt.sigmoid, opt.renormalize,
                              b if use_bias else np.zeros(E), use_bias, opt.n_groups,
                              opt.topk_groups, opt.group_max, opt.scale, _CHUNK, _RANK_MAX,
                              weights, experts, status)
        _raise_row_status("logits", status)
    weights = weights.astype(dt, copy=False)
    return Routing(weights.reshape(lead + (k,)), experts.reshape(lead + (k,)))


def router_probs(logits, score="softmax", *, normalize=False):
    """Full router scores.

    Parameters
    ----------
    logits : [..., E] float16, bfloat16, float32 or float64
        Router logits, any byte order (``-inf`` allowed: score 0;
        NaN/``+inf`` rejected; for softmax a row may not be ``-inf``
        everywhere).
    score : {"softmax", "sigmoid"}
        Softmax over the experts, or an elementwise sigmoid.
    normalize : bool
        Divide each row of sigmoid scores by its sum (a row of zeros stays
        zero), as DeepSeek-V3 does before its balance loss, so that
        :func:`numoe.load_balancing_loss` of them is 1.0 at perfect balance.
        Softmax rows already sum to 1 and are returned unchanged.

    Returns
    -------
    [..., E] float (input dtype)
        Scores computed in float64 and stored in the input dtype (16-bit
        inputs: stored as float32, then rounded to the input dtype).

    Examples
    --------
    >>> import numpy as np, numoe
    >>> numoe.router_probs(np.array([[0.0, 0.0]]))
    array([[0.5, 0.5]])
    """
    normalize = V.flag("normalize", normalize)
    if backend_of(logits=logits) == "cuda":
        return cuda_module("routing").router_probs(logits, score=score, normalize=normalize)
    V.choice("score", score, SCORES)
    z, lead = _expert_rows("logits", logits)
    z, dt = widened(z)
    use_sigmoid = score == "sigmoid"
    out = np.empty(z.shape, np.float64 if normalize and use_sigmoid else z.dtype)
    status = np.empty(z.shape[0], dtype=np.uint8)
    if z.size:
        cpu.probs(z, use_sigmoid, _CHUNK, out, status)
        _raise_row_status("logits", status)
        if normalize and use_sigmoid:
            out = _normalized_rows(out)
    return out.astype(dt, copy=False).reshape(lead + (z.shape[1],))


def _normalized_rows(s):
    """``s / sum(s)`` per row of a float64 ``[T, E]`` (rows of zeros stay zero)."""
    total = s.sum(axis=1, keepdims=True)
    return np.divide(s, total, out=np.zeros_like(s), where=total > 0)


# ------------------------------------------------------------------ backward
def _backward_rows(name, a):
    """A host ``[..., E]`` array as float32/float64 ``[T, E]`` (16-bit widened to
    float32), its leading shape and its storage dtype."""
    from ._dtypes import widened

    arr, dt = widened(a)
    z, lead = _expert_rows(name, arr)
    return z, lead, dt


def router_probs_backward(logits, d_probs, *, score="softmax", normalize=False):
    """Vector-Jacobian product of :func:`router_probs`.

    Parameters
    ----------
    logits : [..., E] float
        The logits the forward saw (``-inf``: masked expert, gets 0).
    d_probs : [..., E] float
        Gradient of the loss with respect to the scores (finite).
    score : {"softmax", "sigmoid"}
    normalize : bool
        As given to :func:`router_probs` (sigmoid rows divided by their sum).

    Returns
    -------
    d_logits : [..., E] float, dtype of ``logits``
        ``s * (d_probs - sum(d_probs * s))`` (softmax) or
        ``d_probs * s * (1 - s)`` (sigmoid), computed in float64 per row.
        With ``normalize`` (sigmoid), ``d_probs`` first goes through the
        row normalisation: ``(d_probs - sum(d_probs * p)) / sum(s)`` with
        ``p = s / sum(s)``.

    Examples
    --------
    >>> import numpy as np, numoe
    >>> numoe.router_probs_backward(np.zeros((1, 2)), np.array([[1.0, 0.0]]))
    array([[ 0.25, -0.25]])
    """
    normalize = V.flag("normalize", normalize)
    if backend_of(logits=logits, d_probs=d_probs) == "cuda":
        return cuda_module("routing").router_probs_backward(logits, d_probs, score=score,
                                                            normalize=normalize)
    V.choice("score", score, SCORES)
    z, lead, dt = _backward_rows("logits", logits)
    g, _ = _widened_float("d_probs", d_probs)
    if g.shape != tuple(lead) + (z.shape[1],):
        raise ValueError(f"d_probs must have the shape of logits {tuple(lead) + (z.shape[1],)}"
                         f", got {g.shape}")
    g = g.reshape(z.shape)
    V.check_finite("d_probs", g)
    if normalize and score == "sigmoid" and z.size:
        # through p = s / S: d_s = (d_p - sum(d_p * p)) / S, then the sigmoid's own
        s = np.asarray(router_probs(z.astype(np.float64), "sigmoid"))
        total = s.sum(axis=1, keepdims=True)
        p = _normalized_rows(s)
        g64 = g.astype(np.float64)
        g = np.divide(g64 - (g64 * p).sum(axis=1, keepdims=True), total,
                      out=np.zeros_like(s), where=total > 0)
    out = np.zeros_like(z)
    status = np.empty(z.shape[0], dtype=np.uint8)
    if z.size:
        if z.shape[0] > _CHUNK:
            cpu.probs_backward(z, g, score == "sigmoid", _CHUNK, out, status)
        else:       # one chunk: no parallel start-up
            cpu.probs_backward_chunk(z, g, score == "sigmoid", 0, z.shape[0], out, status)
        _raise_row_status("logits", status)
    return out.astype(dt, copy=False).reshape(lead + (z.shape[1],))


def route_backward(logits, routing, d_weights, *, score="softmax", renormalize=True,
                   scale=1.0):
    """Vector-Jacobian product of :func:`route`'s weights, the chosen experts held fixed.

    Parameters
    ----------
    logits : [..., E] float
        The logits given to :func:`route`.
    routing : Routing
        What :func:`route` returned (``experts [..., k]`` is read; the
        selection, groups and selection bias carry no gradient).
    d_weights : [..., k] float
        Gradient of the loss with respect to ``routing.weights`` (finite).
    score, renormalize, scale
        As given to :func:`route`.

    Returns
    -------
    d_logits : [..., E] float, dtype of ``logits``

    Notes
    -----
    With ``w_j = scale * s_j / S`` (``S`` the sum of the chosen scores plus
    ``1e-20``), ``d s_j = scale * (dw_j / S - sum_i dw_i s_i / S**2)``;
    then through the softmax (``s * (g - g.s)``) or sigmoid
    (``g * s * (1 - s)``). float64 inside, one pass per row.

    Examples
    --------
    >>> import numpy as np, numoe
    >>> z = np.array([[0.0, 1.0, 2.0]])
    >>> r = numoe.route(z, 2)
    >>> d = numoe.route_backward(z, r, np.array([[1.0, 0.0]]))
    >>> bool(np.allclose(d, numoe.reference.route_backward(z, r, [[1.0, 0.0]])))
    True
    """
    if not isinstance(routing, tuple) or len(routing) != 2:
        raise TypeError("routing must be a numoe.Routing (weights, experts) from route(), "
                        f"got {type(routing).__name__}")
    if backend_of(logits=logits, experts=routing[1], d_weights=d_weights) == "cuda":
        return cuda_module("routing").route_backward(
            logits, routing, d_weights, score=score, renormalize=renormalize, scale=scale)
    V.choice("score", score, SCORES)
    V.flag("renormalize", renormalize)
    scale = V.real("scale", scale)
    z, lead, dt = _backward_rows("logits", logits)
    T, E = z.shape
    ex = V.index_array("routing.experts", routing[1], upper=E)
    if ex.ndim != len(lead) + 1 or ex.shape[:-1] != tuple(lead) or ex.shape[-1] < 1:
        raise ValueError(f"routing.experts must have shape {tuple(lead) + ('k',)} with "
                         f"k >= 1, got {ex.shape}")
    k = ex.shape[-1]
    ex = ex.reshape(T, k)
    dwa, _ = _widened_float("d_weights", d_weights)
    if dwa.shape != tuple(lead) + (k,):
        raise ValueError(f"d_weights must have shape {tuple(lead) + (k,)} (that of "
                         f"routing.experts), got {dwa.shape}")
    dw = np.ascontiguousarray(dwa.reshape(T, k), dtype=np.float64)
    V.check_finite("d_weights", dw)
    out = np.zeros_like(z)
    status = np.empty(T, dtype=np.uint8)
    if T:
        args = (z, ex, dw, score == "sigmoid", bool(renormalize), scale)
        if T > _CHUNK:
            cpu.route_backward(*args, _CHUNK, out, status)
        else:       # one chunk: no parallel start-up
            cpu.route_backward_chunk(*args, 0, T, out, status)
        _raise_row_status("logits", status)
    return out.astype(dt, copy=False).reshape(lead + (E,))


def _widened_float(name, a):
    """A host float array (16-bit widened to float32) and its storage dtype (backward ops)."""
    from ._dtypes import widened

    arr, dt = widened(a)
    return V.float_array(name, arr), dt
