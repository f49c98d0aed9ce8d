"""Gradients: the backward ops and the whole layer's backward (training).

Same sizes as the forward benchmarks (``experts.py``, ``layer.py``), so each
backward can be read next to its forward: an expert FFN backward does about
twice the forward's products (recompute gate/up, ``d_xs``, the weight
gradients).
"""

from . import _helpers as H
from .experts import HIDDEN, _inputs


class RouteBackward(H.Bench):
    """``route_backward`` of renormalised softmax top-k and ``router_probs_backward``."""

    params = ([65536], [8, 64], [2, 8], H.DTYPES)
    param_names = ["tokens", "experts", "k", "dtype"]

    def setup(self, T, E, k, dtype):
        self.route, self.route_backward = H.api("route"), H.api("route_backward")
        self.probs_backward = H.api("router_probs_backward")
        self.logits = H.logits(T, E, dtype)
        self.routing = self.route(self.logits, k)
        self.d_w = H.rng(6).standard_normal((T, k)).astype(dtype)
        self.d_p = H.rng(7).standard_normal((T, E)).astype(dtype)
        self.time_route_backward(T, E, k, dtype)

    def time_route_backward(self, T, E, k, dtype):
        self.route_backward(self.logits, self.routing, self.d_w)

    def time_router_probs_backward(self, T, E, k, dtype):
        self.probs_backward(self.logits, self.d_p)


class ExpertFFNBackward(H.Bench):
    """``expert_ffn_backward``: SwiGLU experts (hidden 256, expert width 256)."""

    params = ([256], [8, 64], [2, 8], H.DTYPES)
    param_names = ["tokens", "experts", "k", "dtype"]

    def setup(self, T, E, k, dtype):
        self.backward = H.api("expert_ffn_backward")
        self.xs, self.offsets, self.w = _inputs(T, E, k, dtype)
        self.d_ys = H.tokens(T * k, HIDDEN, dtype, seed=8)
        self.time_swiglu_backward(T, E, k, dtype)

    def time_swiglu_backward(self, T, E, k, dtype):
        self.backward(self.xs, self.offsets, *self.w, self.d_ys)


class LayerBackward(H.Bench):
    """``layer.backward`` (with the aux and z losses) after ``forward(return_info=True)``."""

    params = ([64, 1024], list(H.LAYER_SHAPES), H.DTYPES)
    param_names = ["tokens", "shape", "dtype"]
    timeout = 300

    def setup(self, T, shape, dtype):
        MoEConfig, MoELayer = H.api("MoEConfig"), H.api("MoELayer")
        config, weights = H.layer_arrays(shape, dtype)
        self.layer = MoELayer(MoEConfig(**config), **weights)
        self.x = H.tokens(T, config["hidden_dim"], dtype)
        self.d_y = H.tokens(T, config["hidden_dim"], dtype, seed=9)
        _, self.info = self.layer.forward(self.x, return_info=True)
        self.grads = self.layer.backward(self.x, self.info, self.d_y)

    def time_backward(self, T, shape, dtype):
        self.layer.backward(self.x, self.info, self.d_y, aux_loss_coef=0.01, z_loss_coef=0.001)

    def time_backward_out(self, T, shape, dtype):
        """Into the previous gradients' arrays (``out=``), as a training loop runs it."""
        self.layer.backward(self.x, self.info, self.d_y, aux_loss_coef=0.01, z_loss_coef=0.001,
                            out=self.grads)

    def time_forward_backward(self, T, shape, dtype):
        _, info = self.layer.forward(self.x, return_info=True)
        self.layer.backward(self.x, info, self.d_y, aux_loss_coef=0.01, z_loss_coef=0.001)
