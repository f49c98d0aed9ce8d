"""Balancing losses, aux-loss-free bias updates and routing telemetry (public wrappers)."""
from __future__ import annotations

import numpy as np

from . import _validate as V
from ._backend import backend_of, cuda_module
from ._cpu import losses as cpu
from ._dtypes import FLOATS, native, widened
from .routing import _expert_rows

_TOKEN_CHUNK = 1024    # tokens per partial-sum slab (fixed: results never depend on threads)
_ID_CHUNK = 16384      # assignments per histogram slab


def _n_chunks(n, chunk):
    return max(1, -(-n // chunk))


def _token_mask(mask, lead, T):
    """``mask`` as a C-contiguous bool ``[T]`` (None: every token counts)."""
    if mask is None:
        return np.ones(T, dtype=bool)
    m = V._as_ndarray("mask", mask)
    if m.dtype != np.bool_ and m.dtype.kind not in "iu":
        raise TypeError(f"mask must be a bool (or integer 0/1) array, got dtype {m.dtype}")
    if m.shape != tuple(lead) and m.shape != (T,):
        raise ValueError(f"mask must have shape {tuple(lead)} (one entry per token), "
                         f"got {m.shape}")
    return np.ascontiguousarray(m.reshape(T) != 0)


def _experts_for(name, experts, lead, num_experts):
    """Expert ids ``[..., k]`` matching the token shape ``lead``, as ``[T, k]``."""
    ex = V.index_array(name, experts, upper=num_experts)
    if ex.ndim != len(lead) + 1 or ex.shape[:-1] != tuple(lead) or ex.shape[-1] < 1:
        raise ValueError(f"{name} must have shape {tuple(lead) + ('k',)} with k >= 1 "
                         f"(one row per token), got {ex.shape}")
    return ex.reshape(-1, ex.shape[-1])


def load_balancing_loss(probs, experts, *, mask=None):
    """Switch-Transformer load-balancing loss.

    Parameters
    ----------
    probs : [..., E] float16, bfloat16, float32 or float64
        Router probabilities per token (e.g. :func:`numoe.router_probs`),
        any byte order; 16-bit values are widened to float32 (exactly).
    experts : [..., k] int
        Chosen experts per token (ids in ``[0, E)``).
    mask : [...] bool, optional
        True for tokens that count (padding: False).

    Returns
    -------
    float
        ``E * sum_i f_i * P_i`` with ``f_i`` the share of the counted
        ``T*k`` assignments that went to expert ``i`` and ``P_i`` the mean
        of ``probs[:, i]`` over the counted tokens; 1.0 at perfect balance,
        0.0 when no token counts.

    Notes
    -----
    Fedus et al. (2021), Switch Transformers, eq. 4 (with ``alpha = 1``).
    HF transformers' Mixtral-family ``load_balancing_loss_func`` counts
    assignments per token instead of per assignment: its value is ``k``
    times this one.

    Examples
    --------
    >>> import numpy as np, numoe
    >>> numoe.load_balancing_loss(np.full((4, 2), 0.5), np.array([[0], [1], [0], [1]]))
    1.0
    """
    if backend_of(probs=probs, experts=experts, mask=mask) == "cuda":
        return cuda_module("losses").load_balancing_loss(probs, experts, mask=mask)
    p, lead = _expert_rows("probs", probs)
    p = widened(p)[0]
    T, E = p.shape
    ex = _experts_for("experts", experts, lead, E)
    m = _token_mask(mask, lead, T)
    nc = _n_chunks(T, _TOKEN_CHUNK)
    prob_sums = np.empty((nc, E))
    hist = np.empty((nc, E), dtype=np.int64)
    ntok = np.zeros(nc, dtype=np.int64)
    bad = np.zeros(nc, dtype=np.int64)
    if T:
        cpu.balance_sums(p, ex, m, _TOKEN_CHUNK, prob_sums, hist, ntok, bad)
    if bad.any():
        raise ValueError("probs holds NaN or inf in a counted token; all values must be finite")
    n = int(ntok.sum())
    if n == 0:
        return 0.0
    P = np.empty(E)
    cnt = np.empty(E, dtype=np.int64)
    cpu.merge_rows(prob_sums, P)
    cpu.merge_rows(hist, cnt)
    f = cnt / (n * ex.shape[1])
    return float(E * np.sum(f * (P / n)))


def router_z_loss(logits, *, mask=None):
    """Router z-loss: mean over tokens of ``logsumexp(logits[t]) ** 2``.

    Parameters
    ----------
    logits : [..., E] float16, bfloat16, float32 or float64
        Router logits, any byte order (``-inf`` allowed, but not a whole
        counted row; NaN/``+inf`` rejected in counted rows).
    mask : [...] bool, optional
        True for tokens that count.

    Returns
    -------
    float
        The mean over counted tokens (0.0 when none), accumulated in float64.

    Notes
    -----
    Zoph et al. (2022), ST-MoE, eq. 5 (without the ``1/B`` batch factor
    folded into a coefficient).

    Examples
    --------
    >>> import numpy as np, numoe
    >>> round(numoe.router_z_loss(np.zeros((3, 4))), 6)   # (log 4)**2
    1.921812
    """
    if backend_of(logits=logits, mask=mask) == "cuda":
        return cuda_module("losses").router_z_loss(logits, mask=mask)
    z, lead = _expert_rows("logits", logits)
    z = widened(z)[0]
    T = z.shape[0]
    m = _token_mask(mask, lead, T)
    nc = _n_chunks(T, _TOKEN_CHUNK)
    sums = np.zeros(nc)
    ntok = np.zeros(nc, dtype=np.int64)
    bad = np.zeros(nc, dtype=np.int64)
    if T:
        cpu.z_loss_sums(z, m, _TOKEN_CHUNK, sums, ntok, bad)
    if bad.any():
        raise ValueError("logits holds NaN or +inf, or a counted row that is -inf for every "
                         "expert; logsumexp would not be finite")
    n = int(ntok.sum())
    if n == 0:
        return 0.0
    total = 0.0
    for s in sums:              # serial merge in chunk order
        total += float(s)
    return total / n


def _expert_histogram(experts, num_experts, weights=None):
    """``(counts [E] int64, mass [E] float64 or None)`` over the flat expert ids."""
    ids = experts.reshape(-1)
    N = ids.shape[0]
    nc = _n_chunks(N, _ID_CHUNK)
    hist = np.zeros((nc, num_experts), dtype=np.int64)
    with_w = weights is not None
    w = weights.reshape(-1) if with_w else np.zeros(0)
    mass = np.zeros((nc if with_w else 1, num_experts))
    if N:
        cpu.histogram(ids, w, with_w, num_experts, _ID_CHUNK, hist, mass)
    counts = np.empty(num_experts, dtype=np.int64)
    cpu.merge_rows(hist, counts)
    if not with_w:
        return counts, None
    out = np.empty(num_experts)
    cpu.merge_rows(mass, out)
    return counts, out


def expert_counts(experts, num_experts):
    """Assignments per expert.

    Parameters
    ----------
    experts : [...] int
        Expert ids in ``[0, num_experts)`` (any shape, e.g. ``[T, k]``).
    num_experts : int
        E, >= 1.

    Returns
    -------
    [E] int64

    Examples
    --------
    >>> import numpy as np, numoe
    >>> numoe.expert_counts(np.array([[0, 2], [2, 1]]), 4)
    array([1, 1, 2, 0])
    """
    if backend_of(experts=experts) == "cuda":
        return cuda_module("losses").expert_counts(experts, num_experts)
    E = V.integer("num_experts", num_experts, lo=1)
    ex = V.index_array("experts", experts, upper=E)
    return _expert_histogram(ex, E)[0]


def _check_update_bias(bias, counts, rate):
    """Host checks of :func:`update_bias`; returns ``(bias, counts float64, rate)``."""
    b = widened(V.float_array("bias", bias, ndim=1))[0]
    if b.shape[0] == 0:
        raise ValueError("bias must have one entry per expert (E >= 1), got shape (0,)")
    V.check_finite("bias", b)
    c = V._as_ndarray("counts", counts)
    if c.dtype == np.bool_ or (c.dtype.kind not in "iu" and native(c.dtype) not in FLOATS):
        raise TypeError(f"counts must be an integer or float array, got dtype {c.dtype}")
    V.shape("counts", c, b.shape)
    c = np.ascontiguousarray(c, dtype=np.float64)
    V.check_finite("counts", c)
    if (c < 0).any():
        raise ValueError("counts must be >= 0 (assignments per expert)")
    rate = V.real("rate", rate, lo=0.0)
    return b, c, rate


def update_bias(bias, counts, rate):
    """Auxiliary-loss-free balancing step (DeepSeek-V3).

    Parameters
    ----------
    bias : [E] float16, bfloat16, float32 or float64
        Current selection bias (see :func:`numoe.route`'s ``bias``), any
        byte order.
    counts : [E] int or float (any byte order)
        Load per expert in the last step (e.g. :func:`expert_counts`).
    rate : float
        Update speed ``gamma`` (finite, >= 0).

    Returns
    -------
    [E] float32
        ``bias + rate * sign(mean(counts) - counts)``: overloaded experts go
        down, underloaded ones up. Computed in float64, stored as float32
        (the optimizer state's dtype, whatever the input dtype: a 16-bit
        state would round small steps away). The input is not modified.

    Notes
    -----
    DeepSeek-AI (2024), DeepSeek-V3 technical report, section 2.1.2
    (auxiliary-loss-free load balancing).

    Examples
    --------
    >>> import numpy as np, numoe
    >>> numoe.update_bias(np.zeros(3), np.array([5, 1, 3]), 0.1)
    array([-0.1,  0.1,  0. ], dtype=float32)
    """
    if backend_of(bias=bias, counts=counts) == "cuda":
        return cuda_module("losses").update_bias(bias, counts, rate)
    b, c, rate = _check_update_bias(bias, counts, rate)
    out = np.empty(b.shape[0], dtype=np.float32)
    cpu.bias_step(b, c, float(c.mean()), rate, out)
    return out


def _stats_from_counts(counts):
    """The load statistics of :func:`routing_stats` from the per-expert counts."""
    mean = counts.mean() if counts.size else 0.0
    mx = counts.max() if counts.size else 0
    return {
        "counts": counts,
        "cv": float(counts.std() / mean) if mean > 0 else 0.0,
        "max_over_mean": float(mx / mean) if mean > 0 else 0.0,
        "balancedness": float(mean / mx) if mx > 0 else 0.0,
        "dead_experts": int((counts == 0).sum()),
        "drop_rate": 0.0,
    }


def routing_stats(experts, num_experts, *, weights=None, plan=None):
    """Load statistics of one routing decision.

    Parameters
    ----------
    experts : [..., k] int
        Chosen experts (ids in ``[0, num_experts)``).
    num_experts : int
        E, >= 1.
    weights : [..., k] float (any of the four dtypes), optional
        Routing weights (same shape as ``experts``): adds ``weight_mass``.
    plan : DispatchPlan, optional
        The dispatch plan of this routing: adds ``kept_counts`` and sets
        ``drop_rate`` (only ``plan.counts`` and ``plan.dropped`` are read).

    Returns
    -------
    dict
        ``counts`` ([E] int64 assignments), ``cv`` (std/mean of counts),
        ``max_over_mean``, ``balancedness`` (mean/max), ``dead_experts``
        (experts with no assignment), ``drop_rate`` (share of dropped
        assignments; 0.0 without a plan), plus ``weight_mass`` ([E]
        float64, summed weights) and ``kept_counts`` ([E] int64) when
        ``weights`` / ``plan`` are given.

    Examples
    --------
    >>> import numpy as np, numoe
    >>> s = numoe.routing_stats(np.array([[0, 1], [0, 2]]), 4)
    >>> s["counts"], s["dead_experts"], s["balancedness"]
    (array([2, 1, 1, 0]), 1, 0.5)
    """
    arrays = dict(experts=experts, weights=weights)
    if plan is not None:
        arrays.update(plan_counts=getattr(plan, "counts", None),
                      plan_dropped=getattr(plan, "dropped", None))
    if backend_of(**arrays) == "cuda":
        return cuda_module("losses").routing_stats(experts, num_experts, weights=weights,
                                                   plan=plan)
    E = V.integer("num_experts", num_experts, lo=1)
    ex = V.index_array("experts", experts, upper=E)
    w = None
    if weights is not None:
        w = widened(V.float_array("weights", weights))[0]
        V.shape("weights", w, ex.shape)
        V.check_finite("weights", w)
    if plan is not None:
        kept, dropped = _check_plan(plan, ex.shape, E)
    counts, mass = _expert_histogram(ex, E, w)
    out = _stats_from_counts(counts)
    if mass is not None:
        out["weight_mass"] = mass
    if plan is not None:
        out["kept_counts"] = kept
        out["drop_rate"] = float(dropped.mean()) if dropped.size else 0.0
    return out


def _check_plan(plan, experts_shape, num_experts):
    """``(plan.counts as int64 [E], plan.dropped as bool)`` after shape checks."""
    if not hasattr(plan, "counts") or not hasattr(plan, "dropped"):
        raise TypeError(f"plan must be a DispatchPlan (with counts and dropped), "
                        f"got {type(plan).__name__}")
    kept = V._as_ndarray("plan.counts", plan.counts)
    if kept.dtype.kind not in "iu":
        raise TypeError(f"plan.counts must be an integer array, got dtype {kept.dtype}")
    V.shape("plan.counts", kept, (num_experts,))
    dropped = V._as_ndarray("plan.dropped", plan.dropped)
    if dropped.dtype != np.bool_:
        raise TypeError(f"plan.dropped must be a bool array, got dtype {dropped.dtype}")
    if dropped.size != int(np.prod(experts_shape)):
        raise ValueError(f"plan.dropped must have one entry per assignment "
                         f"({tuple(experts_shape)}), got shape {dropped.shape}")
    return np.asarray(kept, dtype=np.int64), dropped


# ---------------------------------------------------------------- backward
def load_balancing_loss_backward(probs, experts, *, mask=None, d_loss=1.0):
    """Vector-Jacobian product of :func:`load_balancing_loss` with respect to ``probs``.

    Parameters
    ----------
    probs : [..., E] float
    experts : [..., k] int
    mask : [...] bool, optional
        As given to :func:`load_balancing_loss`.
    d_loss : float
        Gradient of the final loss with respect to this loss (its coefficient).

    Returns
    -------
    d_probs : [..., E] float, dtype of ``probs``
        ``d_loss * E * f_i / n`` for every counted token (``n`` of them),
        0 for masked tokens. The load shares ``f_i`` come from a selection
        and are constants (as in every framework).

    Examples
    --------
    >>> import numpy as np, numoe
    >>> numoe.load_balancing_loss_backward(np.full((2, 2), 0.5), np.array([[0], [0]]))
    array([[1., 0.],
           [1., 0.]])
    """
    if backend_of(probs=probs, experts=experts, mask=mask) == "cuda":
        return cuda_module("losses").load_balancing_loss_backward(
            probs, experts, mask=mask, d_loss=d_loss)
    from ._dtypes import widened

    p_, dt = widened(probs)
    p, lead = _expert_rows("probs", p_)
    T, E = p.shape
    ex = _experts_for("experts", experts, lead, E)
    m = _token_mask(mask, lead, T)
    d_loss = V.real("d_loss", d_loss)
    nc = _n_chunks(T, _TOKEN_CHUNK)
    prob_sums = np.empty((nc, E))
    hist = np.empty((nc, E), dtype=np.int64)
    ntok = np.zeros(nc, dtype=np.int64)
    bad = np.zeros(nc, dtype=np.int64)
    if T:
        cpu.balance_sums(p, ex, m, _TOKEN_CHUNK, prob_sums, hist, ntok, bad)
    if bad.any():
        raise ValueError("probs holds NaN or inf in a counted token; all values must be finite")
    out = np.zeros((T, E), dtype=p.dtype)
    n = int(ntok.sum())
    if n:
        cnt = np.empty(E, dtype=np.int64)
        cpu.merge_rows(hist, cnt)
        row = d_loss * E * (cnt / (n * ex.shape[1])) / n
        out[m] = row
    return out.astype(dt, copy=False).reshape(lead + (E,))


def router_z_loss_backward(logits, *, mask=None, d_loss=1.0):
    """Vector-Jacobian product of :func:`router_z_loss`.

    Parameters
    ----------
    logits : [..., E] float
    mask : [...] bool, optional
    d_loss : float
        Gradient of the final loss with respect to the z-loss (its coefficient).

    Returns
    -------
    d_logits : [..., E] float, dtype of ``logits``
        ``d_loss * 2 * lse(z_t) * softmax(z_t) / n`` for each of the ``n``
        counted tokens, 0 for masked ones (float64 inside).

    Examples
    --------
    >>> import numpy as np, numoe
    >>> numoe.router_z_loss_backward(np.zeros((1, 2)))   # 2 * log(2) * 0.5
    array([[0.69314718, 0.69314718]])
    """
    if backend_of(logits=logits, mask=mask) == "cuda":
        return cuda_module("losses").router_z_loss_backward(logits, mask=mask, d_loss=d_loss)
    from ._dtypes import widened

    z_, dt = widened(logits)
    z, lead = _expert_rows("logits", z_)
    T, E = z.shape
    m = _token_mask(mask, lead, T)
    d_loss = V.real("d_loss", d_loss)
    n = int(np.count_nonzero(m))
    out = np.empty((T, E), dtype=z.dtype)
    bad = np.zeros(_n_chunks(T, _TOKEN_CHUNK), dtype=np.int64)
    if T:
        if bad.shape[0] > 1:
            cpu.z_loss_backward(z, m, 2.0 * d_loss / max(n, 1), _TOKEN_CHUNK, out, bad)
        else:       # one chunk: no parallel start-up
            bad[0] = cpu.z_loss_backward_chunk(z, m, 2.0 * d_loss / max(n, 1), 0, T, out)
    if bad.any():
        raise ValueError("logits holds NaN or +inf, or a counted row that is -inf for every "
                         "expert; logsumexp would not be finite")
    return out.astype(dt, copy=False).reshape(lead + (E,))
