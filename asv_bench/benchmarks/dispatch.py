"""Dispatch: ``numoe.dispatch_plan`` dropless and with capacity (three drop policies)."""
import numpy as np

from . import _helpers as H


class DispatchPlan(H.Bench):
    """Counting sort of the T*k assignments by expert; capacity factor 1.0 overflows."""

    params = ([8192], [8, 64], [2, 8])
    param_names = ["tokens", "experts", "k"]

    def setup(self, T, E, k):
        self.dispatch_plan = H.api("dispatch_plan")
        self.weights, self.experts = H.topk(H.logits(T, E, np.float32), k)
        self.E = E
        # capacity(): ceil(1.0 * T * k / E), clamped to [1, T]
        self.cap = int(min(max(-(-T * k // E), 1), T))
        for policy in ("slot", "position", "score"):
            self._capacity(policy)
        self.time_dropless(T, E, k)

    def time_dropless(self, T, E, k):
        self.dispatch_plan(self.experts, self.E)

    def _capacity(self, policy):
        self.dispatch_plan(self.experts, self.E, capacity=self.cap, weights=self.weights,
                           drop_policy=policy)

    def time_capacity_slot(self, T, E, k):
        self._capacity("slot")

    def time_capacity_position(self, T, E, k):
        self._capacity("position")

    def time_capacity_score(self, T, E, k):
        self._capacity("score")

    def time_reference_dropless(self, T, E, k):
        H.reference().dispatch_plan(self.experts, self.E)


class Capacity(H.Bench):
    """Host-side capacity arithmetic (should stay in the microseconds)."""

    def setup(self):
        self.capacity = H.api("capacity")
        self.capacity(4096, 64, 8, 1.25)

    def time_capacity(self):
        self.capacity(4096, 64, 8, 1.25)
