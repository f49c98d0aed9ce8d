"""Balancing losses, counts, telemetry and the aux-loss-free bias update."""
import numpy as np

from . import _helpers as H


class Losses(H.Bench):
    """Losses and statistics of one routing decision (top-2 of the logits)."""

    params = ([16384], [8, 64], H.DTYPES)
    param_names = ["tokens", "experts", "dtype"]
    k = 2

    def setup(self, T, E, dtype):
        self.lb = H.api("load_balancing_loss")
        self.z = H.api("router_z_loss")
        self.stats = H.api("routing_stats")
        self.counts = H.api("expert_counts")
        self.logits = H.logits(T, E, dtype)
        lg = self.logits.astype(np.float64)
        p = np.exp(lg - lg.max(axis=1, keepdims=True))
        self.probs = (p / p.sum(axis=1, keepdims=True)).astype(dtype)
        self.weights, self.experts = H.topk(self.logits, self.k)
        self.mask = np.arange(T) % 8 != 7     # one padding token in eight
        self.E = E
        self.time_load_balancing_loss(T, E, dtype)
        self.time_load_balancing_loss_masked(T, E, dtype)
        self.time_router_z_loss(T, E, dtype)
        self.time_routing_stats(T, E, dtype)
        self.time_expert_counts(T, E, dtype)

    def time_load_balancing_loss(self, T, E, dtype):
        self.lb(self.probs, self.experts)

    def time_load_balancing_loss_masked(self, T, E, dtype):
        self.lb(self.probs, self.experts, mask=self.mask)

    def time_router_z_loss(self, T, E, dtype):
        self.z(self.logits)

    def time_routing_stats(self, T, E, dtype):
        self.stats(self.experts, self.E, weights=self.weights)

    def time_expert_counts(self, T, E, dtype):
        self.counts(self.experts, self.E)

    def time_reference_load_balancing_loss(self, T, E, dtype):
        H.reference().load_balancing_loss(self.probs, self.experts)

    def time_reference_router_z_loss(self, T, E, dtype):
        H.reference().router_z_loss(self.logits)


class UpdateBias(H.Bench):
    """One aux-loss-free balancing step on the float32 bias state."""

    params = ([8, 256],)
    param_names = ["experts"]

    def setup(self, E):
        self.update_bias = H.api("update_bias")
        self.bias = np.zeros(E, dtype=np.float32)
        self.counts = np.arange(E, dtype=np.int64) * 3
        self.update_bias(self.bias, self.counts, 1e-3)

    def time_update_bias(self, E):
        self.update_bias(self.bias, self.counts, 1e-3)
