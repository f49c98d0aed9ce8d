"""numoe: Numba-compiled Mixture-of-Experts kernels for NumPy (CPU) and CUDA arrays."""
from ._types import DispatchPlan, Routing
from ._backend import backends
from .routing import route, router_probs
from .dispatch import capacity, dispatch_plan, permute, unpermute
from .experts import expert_ffn
from .losses import (expert_counts, load_balancing_loss, router_z_loss, routing_stats,
                     update_bias)
from .config import MoEConfig
from .layer import MoELayer, moe, moe_expert_computation, moe_gating_forward
from . import reference

__version__ = "0.1.0"

__all__ = [
    "Routing", "DispatchPlan", "backends", "route", "router_probs", "capacity",
    "dispatch_plan", "permute", "unpermute", "expert_ffn", "expert_counts",
    "load_balancing_loss", "router_z_loss", "routing_stats", "update_bias",
    "MoEConfig", "MoELayer", "moe", "moe_expert_computation", "moe_gating_forward",
    "reference",
]
