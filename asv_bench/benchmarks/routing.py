"""Routing: ``numoe.route`` (score kinds, selection bias, group-limited) vs the NumPy oracle."""
from . import _helpers as H


class Route(H.Bench):
    """Top-k routing over all experts: softmax (Mixtral) and sigmoid + bias (DeepSeek)."""

    params = ([8192], [8, 64], [2, 8], H.DTYPES)
    param_names = ["tokens", "experts", "k", "dtype"]

    def setup(self, T, E, k, dtype):
        self.route = H.api("route")
        self.ref = H.reference().route
        self.logits = H.logits(T, E, dtype)
        self.bias = H.selection_bias(E, dtype)
        # compile every specialisation timed below
        self.time_softmax(T, E, k, dtype)
        self.time_sigmoid_bias(T, E, k, dtype)

    def time_softmax(self, T, E, k, dtype):
        self.route(self.logits, k)

    def time_sigmoid_bias(self, T, E, k, dtype):
        self.route(self.logits, k, score="sigmoid", bias=self.bias)

    def time_reference_softmax(self, T, E, k, dtype):
        self.ref(self.logits, k)


class RouteGrouped(H.Bench):
    """Group-limited routing (DeepSeek-V3, scaled): 64 experts in 8 groups, keep 4, top-8."""

    params = ([8192], ["top2", "max"], H.DTYPES)
    param_names = ["tokens", "group_score", "dtype"]
    E, k, n_groups, topk_groups = 64, 8, 8, 4

    def setup(self, T, group_score, dtype):
        self.route = H.api("route")
        self.ref = H.reference().route
        self.logits = H.logits(T, self.E, dtype)
        self.bias = H.selection_bias(self.E, dtype)
        self.kw = dict(score="sigmoid", bias=self.bias, n_groups=self.n_groups,
                       topk_groups=self.topk_groups, group_score=group_score, scale=2.5)
        self.time_grouped(T, group_score, dtype)

    def time_grouped(self, T, group_score, dtype):
        self.route(self.logits, self.k, **self.kw)

    def time_reference_grouped(self, T, group_score, dtype):
        self.ref(self.logits, self.k, **self.kw)


class RouterProbs(H.Bench):
    """Full ``[T, E]`` scores (what the load-balancing loss reads)."""

    params = ([8192], [64], ["softmax", "sigmoid"], ["float32"])
    param_names = ["tokens", "experts", "score", "dtype"]

    def setup(self, T, E, score, dtype):
        self.router_probs = H.api("router_probs")
        self.logits = H.logits(T, E, dtype)
        self.time_router_probs(T, E, score, dtype)

    def time_router_probs(self, T, E, score, dtype):
        self.router_probs(self.logits, score)

    def time_reference_router_probs(self, T, E, score, dtype):
        H.reference().router_probs(self.logits, score)
