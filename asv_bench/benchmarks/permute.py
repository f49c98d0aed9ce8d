"""Permute (gather token rows by expert) and unpermute (weighted combine back)."""
from . import _helpers as H


class Permute(H.Bench):
    """``xs = permute(x, plan)`` and ``y = unpermute(ys, plan, weights)``, hidden size 512."""

    params = ([4096], [64], [2, 8], H.DTYPES)
    param_names = ["tokens", "experts", "k", "dtype"]
    hidden = 512

    def setup(self, T, E, k, dtype):
        self.permute = H.api("permute")
        self.unpermute = H.api("unpermute")
        self.x = H.tokens(T, self.hidden, dtype)
        self.weights, experts = H.topk(H.logits(T, E, dtype), k)
        self.plan = H.plan(experts, E)
        self.xs = self.permute(self.x, self.plan)
        self.unpermute(self.xs, self.plan, self.weights)

    def time_permute(self, T, E, k, dtype):
        self.permute(self.x, self.plan)

    def time_unpermute(self, T, E, k, dtype):
        self.unpermute(self.xs, self.plan, self.weights)

    def time_reference_permute(self, T, E, k, dtype):
        H.reference().permute(self.x, self.plan)

    def time_reference_unpermute(self, T, E, k, dtype):
        H.reference().unpermute(self.xs, self.plan, self.weights)
