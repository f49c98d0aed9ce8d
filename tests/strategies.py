"""Shared Hypothesis strategies for the numoe tests.

Arrays are built by NumPy from a drawn seed (fast, even at thousands of
rows); Hypothesis draws the shapes, dtypes, the *kind* of values and the
seed, so failures still shrink to small shapes and simple kinds. Every
float is bounded (``|x| <= 30`` unless a kind says otherwise) and the
tie-heavy kinds make exact ties common on purpose.

Logit kinds (``LOGIT_KINDS``):

``normal``   N(0, 3) clipped to [-30, 30]
``uniform``  U(-30, 30)
``grid``     half-integers in [-2, 2]: many exact ties per row
``binary``   0.0 or 1.0 only: ties everywhere
``equal``    every entry of a row equal (a per-row constant)
``masked``   ``normal`` with some ``-inf`` entries; at least one finite per row
``drawn``    elements drawn by Hypothesis itself (small arrays only): hits
             0.0, -0.0, subnormals and the bounds

Other helpers may import anything here; keep the signatures stable.
"""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

BOUND = 30.0
DTYPES = (np.float32, np.float64)
LOGIT_KINDS = ("normal", "uniform", "grid", "binary", "equal", "masked", "drawn")
MAX_CELLS = 1 << 19          # cap on T * E so a drawn example stays cheap

dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**32 - 1)


def bounded_floats(dtype=np.float64, lo=-BOUND, hi=BOUND):
    """Finite floats in ``[lo, hi]`` representable in ``dtype``."""
    width = 32 if np.dtype(dtype) == np.float32 else 64
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=width)


def num_tokens(max_T=3000):
    """Token counts biased small (0 and 1 are common) with a tail up to ``max_T``."""
    return st.one_of(st.integers(0, 4), st.integers(0, 64), st.integers(0, max_T))


def num_experts(max_E=300, min_E=1):
    """Expert counts biased small with a tail up to ``max_E``."""
    return st.one_of(st.integers(min_E, max(min_E, 8)), st.integers(min_E, max(min_E, 64)),
                     st.integers(min_E, max_E))


@st.composite
def sizes(draw, max_T=3000, max_E=300, min_E=1, max_cells=MAX_CELLS):
    """``(T, E, k)`` with ``1 <= k <= E``; ``T * E`` capped at ``max_cells``."""
    E = draw(num_experts(max_E, min_E))
    T = min(draw(num_tokens(max_T)), max_cells // E)
    k = draw(st.one_of(st.integers(1, min(E, 8)), st.integers(1, E)))
    return T, E, k


@st.composite
def group_sizes(draw, max_T=3000, max_groups=16, max_group_size=24, max_cells=MAX_CELLS):
    """``(T, E, k, n_groups, topk_groups)`` valid for group-limited routing.

    ``E = n_groups * group_size``, ``1 <= topk_groups <= n_groups`` and
    ``1 <= k <= topk_groups * group_size``.
    """
    n_groups = draw(st.integers(1, max_groups))
    gsize = draw(st.integers(1, max_group_size))
    topk_groups = draw(st.integers(1, n_groups))
    E = n_groups * gsize
    k = draw(st.integers(1, topk_groups * gsize))
    T = min(draw(num_tokens(max_T)), max_cells // E)
    return T, E, k, n_groups, topk_groups


def make_logits(rng, shape, dtype, kind):
    """A bounded logits array of ``shape`` (last axis = experts) and ``kind``."""
    shape = tuple(shape)
    E = shape[-1] if shape else 1
    if kind == "normal":
        z = np.clip(rng.normal(0.0, 3.0, shape), -BOUND, BOUND)
    elif kind == "uniform":
        z = rng.uniform(-BOUND, BOUND, shape)
    elif kind == "grid":
        z = rng.integers(-4, 5, shape) * 0.5
    elif kind == "binary":
        z = rng.integers(0, 2, shape).astype(np.float64)
    elif kind == "equal":
        z = np.broadcast_to(rng.uniform(-BOUND, BOUND, shape[:-1] + (1,)), shape).copy()
    elif kind == "masked":
        z = np.clip(rng.normal(0.0, 3.0, shape), -BOUND, BOUND)
        z[rng.random(shape) < 0.3] = -np.inf
        if z.size:  # keep one finite entry per row
            rows = z.reshape(-1, E)
            keep = rng.integers(0, E, rows.shape[0])
            finite = np.clip(rng.normal(0, 3, rows.shape[0]), -BOUND, BOUND)
            rows[np.arange(rows.shape[0]), keep] = finite
    else:
        raise ValueError(f"unknown logits kind {kind!r}")
    return np.ascontiguousarray(z, dtype=dtype)


@st.composite
def logits_arrays(draw, T, E, dtype=None, kinds=LOGIT_KINDS):
    """A ``[T, E]`` logits array (``dtype`` drawn when None)."""
    dtype = draw(dtypes) if dtype is None else dtype
    kind = draw(st.sampled_from(kinds))
    if kind == "drawn":
        if T * E <= 256:
            return draw(hnp.arrays(dtype, (T, E), elements=bounded_floats(dtype)))
        kind = "grid"
    return make_logits(np.random.default_rng(draw(seeds)), (T, E), dtype, kind)


@st.composite
def route_problems(draw, max_T=3000, max_E=300, kinds=LOGIT_KINDS):
    """``(logits [T, E], k)`` for plain (ungrouped, unbiased) top-k routing."""
    T, E, k = draw(sizes(max_T, max_E))
    return draw(logits_arrays(T, E, kinds=kinds)), k


def make_bias(rng, E, kind="normal"):
    """A selection bias ``[E]`` (float64): small normal values, or on a coarse grid."""
    if kind == "grid":
        return rng.integers(-2, 3, E) * 0.25
    return rng.normal(0.0, 0.5, E)


@st.composite
def biases(draw, E):
    """A finite selection bias ``[E]`` (float32 or float64)."""
    kind = draw(st.sampled_from(["normal", "grid", "zero"]))
    dt = draw(dtypes)
    if kind == "zero":
        return np.zeros(E, dtype=dt)
    return make_bias(np.random.default_rng(draw(seeds)), E, kind).astype(dt)


def softmax(z):
    """Row softmax in float64 (``-inf`` entries give 0)."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def make_experts(rng, T, k, E, distinct=True):
    """``[T, k]`` int32 expert ids in ``[0, E)``; distinct per row when asked (needs k <= E)."""
    if distinct:
        if T == 0:
            return np.zeros((0, k), dtype=np.int32)
        return np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32)
    return rng.integers(0, E, (T, k)).astype(np.int32)


@st.composite
def experts_arrays(draw, T, k, E, distinct=None):
    """Expert ids ``[T, k]`` int32; rows distinct unless ``distinct=False`` (drawn when None)."""
    if distinct is None:
        distinct = draw(st.booleans()) if k <= E else False
    rng = np.random.default_rng(draw(seeds))
    skew = draw(st.sampled_from(["uniform", "skewed", "one"]))
    if skew == "one" and not distinct:
        return np.full((T, k), draw(st.integers(0, E - 1)), dtype=np.int32)
    if skew == "skewed" and not distinct:
        p = rng.dirichlet(np.full(E, 0.2))
        return rng.choice(E, size=(T, k), p=p).astype(np.int32)
    return make_experts(rng, T, k, E, distinct)


@st.composite
def routings(draw, max_T=3000, max_E=300, dtype=None):
    """``(weights [T, k] float, experts [T, k] int32 distinct per row, E)``."""
    T, E, k = draw(sizes(max_T, max_E))
    dtype = draw(dtypes) if dtype is None else dtype
    rng = np.random.default_rng(draw(seeds))
    experts = make_experts(rng, T, k, E, distinct=True)
    w = rng.random((T, k)) + 1e-3
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(dtype), experts, E


@st.composite
def masks(draw, T):
    """A token mask ``[T]`` bool: all True, all False, or random."""
    kind = draw(st.sampled_from(["all", "none", "random"]))
    if kind == "all":
        return np.ones(T, dtype=bool)
    if kind == "none":
        return np.zeros(T, dtype=bool)
    return np.random.default_rng(draw(seeds)).random(T) < 0.6
