"""Inputs and shared settings for the numoe asv benchmarks.

Everything here is plain NumPy and seeded, so every commit in the history is
timed on the same data, and nothing here depends on numoe functions that an
older commit may lack. :func:`api` turns a missing or placeholder function
into ``NotImplementedError``, which asv reports as "skipped" when a
``setup`` raises it.
"""
import numpy as np

try:
    # Imported here, so that asv's forkserver imports numoe and numba once rather
    # than once per benchmark process; the trivial serial function starts Numba's
    # JIT machinery (about 0.5 s) in the server too. Nothing parallel runs before
    # the fork, so no thread pool is copied into the children.
    import numba
    import numoe

    numba.njit(lambda a: a + 1)(1)
except Exception:  # noqa: BLE001 - a broken commit fails its benchmarks, not discovery
    numoe = None

DTYPES = ["float32", "float64"]

# The `numoe bench` layer shapes, scaled down so that one forward pass takes
# milliseconds on a laptop core: (experts, top_k, hidden, expert_dim, extra config).
LAYER_SHAPES = {
    # Mixtral family: 8 wide experts, top-2 softmax, renormalised.
    "mixtral": (8, 2, 256, 512, {}),
    # DeepSeek-V3 family: many narrow experts, sigmoid scores, 8 groups keep 4,
    # a selection bias and one shared expert.
    "deepseek": (64, 8, 256, 128, dict(score="sigmoid", n_groups=8, topk_groups=4,
                                       scale=2.5, num_shared_experts=1,
                                       shared_expert_dim=256, selection_bias=True)),
}


class Bench:
    """Sampling settings for a 2-core machine: one round, few repeats."""

    rounds = 1
    repeat = (3, 10, 2.0)      # (min, max, seconds) samples per benchmark
    warmup_time = 0.05
    timeout = 120


def api(name):
    """The public numoe function ``name``; ``NotImplementedError`` if this commit lacks it."""
    fn = getattr(numoe, name, None)
    if fn is None:
        raise NotImplementedError(f"numoe.{name} does not exist at this commit")
    return fn


def reference():
    """The float64 NumPy oracle module (the baseline variant)."""
    return numoe.reference


def rng(seed=0):
    return np.random.default_rng(seed)


def tokens(T, H, dtype, seed=1):
    """Activations ``x [T, H]``."""
    return rng(seed).standard_normal((T, H)).astype(dtype)


def logits(T, E, dtype, seed=2):
    """Router logits ``[T, E]``: unit normal plus a mild per-expert skew."""
    r = rng(seed)
    skew = np.linspace(-0.5, 0.5, E)
    return (r.standard_normal((T, E)) + skew).astype(dtype)


def selection_bias(E, dtype, seed=3):
    """A small aux-loss-free balancing bias ``[E]``."""
    return (0.01 * rng(seed).standard_normal(E)).astype(dtype)


def topk(lg, k):
    """Softmax top-k routing in NumPy: ``(weights [T, k], experts [T, k] int32)``."""
    experts = np.argsort(-lg, axis=1, kind="stable")[:, :k].astype(np.int32)
    chosen = np.take_along_axis(lg, experts, axis=1).astype(np.float64)
    w = np.exp(chosen - chosen.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(lg.dtype), experts


def plan(experts, E):
    """A dropless ``numoe.DispatchPlan`` built with NumPy (stable sort by expert)."""
    T, k = experts.shape
    flat = experts.reshape(-1)
    order = np.argsort(flat, kind="stable").astype(np.int32)
    counts = np.bincount(flat, minlength=E).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return numoe.DispatchPlan(order, offsets, counts, np.zeros((T, k), dtype=bool), None)


def expert_weights(E, H, F, dtype, glu=True, seed=4):
    """``(w_gate [E, H, F], w_up [E, H, F] or None, w_down [E, F, H])``, scaled by fan-in."""
    r = rng(seed)
    w_gate = (r.standard_normal((E, H, F)) / np.sqrt(H)).astype(dtype)
    w_up = (r.standard_normal((E, H, F)) / np.sqrt(H)).astype(dtype) if glu else None
    w_down = (r.standard_normal((E, F, H)) / np.sqrt(F)).astype(dtype)
    return w_gate, w_up, w_down


def layer_arrays(name, dtype, seed=5):
    """Config keywords and weights (api.md names) of one scaled `numoe bench` shape."""
    E, k, H, F, extra = LAYER_SHAPES[name]
    r = rng(seed)
    w_gate, w_up, w_down = expert_weights(E, H, F, dtype, seed=seed + 1)
    weights = dict(router=(r.standard_normal((H, E)) / np.sqrt(H)).astype(dtype),
                   w_gate=w_gate, w_up=w_up, w_down=w_down)
    if extra.get("selection_bias"):
        weights["selection_bias"] = selection_bias(E, dtype, seed=seed + 2)
    S = extra.get("shared_expert_dim")
    if S:
        weights["shared_gate_proj"] = (r.standard_normal((H, S)) / np.sqrt(H)).astype(dtype)
        weights["shared_up_proj"] = (r.standard_normal((H, S)) / np.sqrt(H)).astype(dtype)
        weights["shared_down_proj"] = (r.standard_normal((S, H)) / np.sqrt(S)).astype(dtype)
    config = dict(num_experts=E, top_k=k, hidden_dim=H, expert_dim=F, **extra)
    return config, weights
