"""Expert FFN: the grouped GEMMs where the FLOPs live.

Work per call: three [tokens*k, 256] x [256, 256] products (gate, up, down),
i.e. ``3 * 2 * tokens * k * 256 * 256`` FLOP.
"""
import numpy as np

from . import _helpers as H

HIDDEN = EXPERT_DIM = 256


def _inputs(T, E, k, dtype):
    """``(xs [T*k, H], offsets [E+1], (w_gate, w_up, w_down))`` for a routed batch."""
    _, experts = H.topk(H.logits(T, E, dtype), k)
    counts = np.bincount(experts.reshape(-1), minlength=E)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    xs = H.tokens(T * k, HIDDEN, dtype)
    return xs, offsets, H.expert_weights(E, HIDDEN, EXPERT_DIM, dtype)


class ExpertFFN(H.Bench):
    """SwiGLU experts (hidden 256, expert width 256) over a routed batch."""

    params = ([256], [8, 64], [2, 8], H.DTYPES)
    param_names = ["tokens", "experts", "k", "dtype"]

    def setup(self, T, E, k, dtype):
        self.expert_ffn = H.api("expert_ffn")
        self.xs, self.offsets, self.w = _inputs(T, E, k, dtype)
        self.time_swiglu(T, E, k, dtype)

    def time_swiglu(self, T, E, k, dtype):
        self.expert_ffn(self.xs, self.offsets, *self.w)


class ExpertFFNReference(H.Bench):
    """The float64 NumPy oracle, small batch only (it loops over experts in Python).

    Compare with ``ExpertFFN.time_swiglu`` at k=2.
    """

    params = ([256], [8, 64], [2], H.DTYPES)
    param_names = ["tokens", "experts", "k", "dtype"]

    def setup(self, T, E, k, dtype):
        self.xs, self.offsets, self.w = _inputs(T, E, k, dtype)

    def time_reference_swiglu(self, T, E, k, dtype):
        H.reference().expert_ffn(self.xs, self.offsets, *self.w)
