"""The whole MoE layer (router GEMM, route, dispatch, experts, combine, shared expert).

Shapes are the `numoe bench` families scaled to run in milliseconds
(``_helpers.LAYER_SHAPES``): "mixtral" = 8 experts top-2, hidden 256,
expert width 512; "deepseek" = 64 experts top-8 in 8 groups (keep 4),
sigmoid scores with a selection bias, expert width 128, one shared expert.
"""
from . import _helpers as H

_REF_KEYS = ("score", "renormalize", "n_groups", "topk_groups", "scale")


class Layer(H.Bench):
    """``MoELayer(x)`` at decode-like (64) and prefill-like (1024) token counts."""

    params = ([64, 1024], list(H.LAYER_SHAPES), H.DTYPES)
    param_names = ["tokens", "shape", "dtype"]
    timeout = 300      # a setup that finds no JIT cache compiles the whole layer

    def setup(self, T, shape, dtype):
        MoEConfig, MoELayer = H.api("MoEConfig"), H.api("MoELayer")
        config, weights = H.layer_arrays(shape, dtype)
        self.layer = MoELayer(MoEConfig(**config), **weights)
        self.x = H.tokens(T, config["hidden_dim"], dtype)
        self.layer(self.x)

    def time_forward(self, T, shape, dtype):
        self.layer(self.x)

    def time_forward_info(self, T, shape, dtype):
        """Forward plus the aux loss, z-loss and routing statistics."""
        self.layer.forward(self.x, return_info=True)

    def peakmem_forward(self, T, shape, dtype):
        self.layer(self.x)


class LayerReference(H.Bench):
    """The float64 NumPy oracle of the same layers (``numoe.reference.moe_forward``)."""

    params = Layer.params
    param_names = Layer.param_names

    def setup(self, T, shape, dtype):
        config, self.weights = H.layer_arrays(shape, dtype)
        self.kw = dict(top_k=config["top_k"],
                       **{key: config[key] for key in _REF_KEYS if key in config})
        self.x = H.tokens(T, config["hidden_dim"], dtype)

    def time_reference_forward(self, T, shape, dtype):
        H.reference().moe_forward(self.x, **self.weights, **self.kw)
