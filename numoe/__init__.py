"""numoe: Numba-compiled Mixture-of-Experts kernels for NumPy (CPU) and CUDA arrays."""
from ._types import DispatchPlan, Routing
from ._backend import backends
from .routing import route, router_probs
from .dispatch import capacity, dispatch_plan, permute, unpermute
from .experts import expert_ffn
from .quant import QuantizedArray, quantize
from .losses import (expert_counts, load_balancing_loss, router_z_loss, routing_stats,
                     update_bias)
from .config import MoEConfig
from .layer import MoELayer, moe, moe_expert_computation, moe_gating_forward
from . import reference
from . import loading, distributed      # (mpi4py is imported only when a communicator is used)
from .routing import route_backward, router_probs_backward
from .dispatch import permute_backward, unpermute_backward
from .experts import ExpertGrads, expert_ffn_backward
from .losses import load_balancing_loss_backward, router_z_loss_backward

__version__ = "0.1.0"


def info():
    """Versions, CPU (model and 16-bit GEMM path), threads, backends and BLAS, as a dict.

    The same facts ``numoe info`` prints (see :func:`numoe.bench.info` for the keys).
    """
    from .bench import info as _info   # imported on use: keeps `import numoe` light
    return _info()


__all__ = [
    "Routing", "DispatchPlan", "backends", "route", "router_probs", "capacity",
    "dispatch_plan", "permute", "unpermute", "expert_ffn", "QuantizedArray", "quantize",
    "expert_counts",
    "load_balancing_loss", "router_z_loss", "routing_stats", "update_bias",
    "MoEConfig", "MoELayer", "moe", "moe_expert_computation", "moe_gating_forward",
    "reference", "loading", "distributed",
    "route_backward", "router_probs_backward", "permute_backward", "unpermute_backward",
    "ExpertGrads", "expert_ffn_backward", "load_balancing_loss_backward",
    "router_z_loss_backward", "info",
]
