"""MoE layer configuration: :class:`MoEConfig` and model-family presets."""
from __future__ import annotations

import dataclasses
from typing import Optional

from . import _validate as V
from .experts import ACTIVATIONS

SCORES = ("softmax", "sigmoid")
GROUP_SCORES = ("top2", "max")
DROP_POLICIES = ("slot", "position", "score")


def _flag(name, v):
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {v!r}")
    return v


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Sizes and options of one MoE layer (validated, immutable).

    Parameters
    ----------
    num_experts, top_k, hidden_dim, expert_dim : int
        ``E`` routed experts, ``k`` chosen per token (``1 <= k <= E``),
        model width ``H`` and expert width ``F``.
    score : {"softmax", "sigmoid"}
        Router score (see :func:`numoe.route`).
    renormalize : bool
        Divide the k chosen weights by their sum.
    n_groups, topk_groups : int
        Group-limited routing (DeepSeek-V3): ``E`` split into ``n_groups``
        equal groups, only the ``topk_groups`` best may be chosen
        (``topk_groups=None``: all groups).
    group_score : {"top2", "max"}
        How a group is scored (sum of its two best scores, or its best).
    scale : float
        Multiplier on the routing weights (DeepSeek routed scaling).
    activation : {"silu", "gelu", "gelu_tanh", "relu", "swiglu_oai"}
    glu : bool
        Gated experts (gate, up, down) or plain FFN experts (in, out).
    capacity_factor : float, optional
        Per-expert capacity ``ceil(capacity_factor * T * k / E)``
        (:func:`numoe.capacity`); ``None``: dropless.
    drop_policy : {"slot", "position", "score"}
        Which assignments survive the capacity (:func:`numoe.dispatch_plan`).
    num_shared_experts : int
        Shared experts every token goes through; they are merged into one
        SwiGLU MLP of width ``shared_expert_dim``.
    shared_expert_dim : int, optional
        Width of the shared MLP; default ``num_shared_experts * expert_dim``.
    shared_gate : bool
        Multiply the shared output by ``sigmoid(x @ shared_gate_weight)``
        (Qwen2-MoE).
    router_bias : bool
        The router has a bias added to the logits (gpt-oss).
    selection_bias : bool
        A per-expert bias used only to choose experts (DeepSeek-V3's
        ``e_score_correction_bias``; see :func:`numoe.update_bias`).
    expert_bias : bool
        Experts have biases ``b_gate``, ``b_up``, ``b_down`` (gpt-oss).
    limit, alpha : float
        Clamp and slope of ``activation="swiglu_oai"`` (``limit=None``: no clamp).

    Examples
    --------
    >>> import numoe
    >>> cfg = numoe.MoEConfig.olmoe(hidden_dim=64, expert_dim=32)
    >>> (cfg.num_experts, cfg.top_k, cfg.renormalize)
    (64, 8, False)
    """

    num_experts: int
    top_k: int
    hidden_dim: int
    expert_dim: int
    score: str = "softmax"
    renormalize: bool = True
    n_groups: int = 1
    topk_groups: Optional[int] = None
    group_score: str = "top2"
    scale: float = 1.0
    activation: str = "silu"
    glu: bool = True
    capacity_factor: Optional[float] = None
    drop_policy: str = "slot"
    num_shared_experts: int = 0
    shared_expert_dim: Optional[int] = None
    shared_gate: bool = False
    router_bias: bool = False
    selection_bias: bool = False
    expert_bias: bool = False
    limit: Optional[float] = None
    alpha: float = 1.702

    def __post_init__(self):
        put = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731 (frozen)
        E = V.integer("num_experts", self.num_experts, lo=1)
        put("num_experts", E)
        put("top_k", V.integer("top_k", self.top_k, lo=1, hi=E))
        put("hidden_dim", V.integer("hidden_dim", self.hidden_dim, lo=1))
        put("expert_dim", V.integer("expert_dim", self.expert_dim, lo=1))
        V.choice("score", self.score, SCORES)
        _flag("renormalize", self.renormalize)
        g = V.integer("n_groups", self.n_groups, lo=1, hi=E)
        if E % g:
            raise ValueError(f"n_groups ({g}) must divide num_experts ({E})")
        put("n_groups", g)
        if self.topk_groups is not None:
            tg = V.integer("topk_groups", self.topk_groups, lo=1, hi=g)
            if self.top_k > tg * (E // g):
                raise ValueError(f"top_k ({self.top_k}) exceeds the experts in the "
                                 f"topk_groups={tg} kept groups of {E // g}")
            put("topk_groups", tg)
        V.choice("group_score", self.group_score, GROUP_SCORES)
        put("scale", V.real("scale", self.scale, lo=0.0))
        V.choice("activation", self.activation, ACTIVATIONS)
        _flag("glu", self.glu)
        if self.activation == "swiglu_oai" and not self.glu:
            raise ValueError("activation='swiglu_oai' needs glu=True")
        if self.capacity_factor is not None:
            cf = V.real("capacity_factor", self.capacity_factor)
            if cf <= 0:
                raise ValueError(f"capacity_factor must be > 0, got {cf}")
            put("capacity_factor", cf)
        V.choice("drop_policy", self.drop_policy, DROP_POLICIES)
        ns = V.integer("num_shared_experts", self.num_shared_experts, lo=0)
        put("num_shared_experts", ns)
        if self.shared_expert_dim is not None:
            if ns == 0:
                raise ValueError("shared_expert_dim is set but num_shared_experts is 0")
            put("shared_expert_dim", V.integer("shared_expert_dim", self.shared_expert_dim, lo=1))
        elif ns:
            put("shared_expert_dim", ns * self.expert_dim)
        _flag("shared_gate", self.shared_gate)
        if self.shared_gate and ns == 0:
            raise ValueError("shared_gate=True needs num_shared_experts >= 1")
        for name in ("router_bias", "selection_bias", "expert_bias"):
            _flag(name, getattr(self, name))
        if self.limit is not None:
            if self.activation != "swiglu_oai":
                raise ValueError("limit applies only to activation='swiglu_oai'")
            put("limit", V.real("limit", self.limit, lo=0.0))
        put("alpha", V.real("alpha", self.alpha))

    # ------------------------------------------------------------- presets
    @classmethod
    def mixtral(cls, num_experts=8, top_k=2, hidden_dim=4096, expert_dim=14336, **options):
        """Mixtral: softmax top-2, renormalised, SwiGLU experts (sizes: 8x7B)."""
        return cls(num_experts, top_k, hidden_dim, expert_dim, **options)

    @classmethod
    def qwen2_moe(cls, num_experts=60, top_k=4, hidden_dim=2048, expert_dim=1408, **options):
        """Qwen2-MoE: softmax top-k, not renormalised, one shared SwiGLU expert
        (width ``4 * expert_dim`` unless given) behind a sigmoid gate
        (sizes: Qwen1.5-MoE-A2.7B)."""
        kw = dict(renormalize=False, num_shared_experts=1, shared_expert_dim=4 * expert_dim,
                  shared_gate=True)
        kw.update(options)
        return cls(num_experts, top_k, hidden_dim, expert_dim, **kw)

    @classmethod
    def qwen3_moe(cls, num_experts=128, top_k=8, hidden_dim=2048, expert_dim=768, **options):
        """Qwen3-MoE: softmax top-8, renormalised (``norm_topk_prob: true`` in the
        released checkpoints), no shared expert (sizes: Qwen3-30B-A3B)."""
        return cls(num_experts, top_k, hidden_dim, expert_dim, **options)

    @classmethod
    def olmoe(cls, num_experts=64, top_k=8, hidden_dim=2048, expert_dim=1024, **options):
        """OLMoE: softmax top-8, not renormalised (sizes: OLMoE-1B-7B)."""
        kw = dict(renormalize=False)
        kw.update(options)
        return cls(num_experts, top_k, hidden_dim, expert_dim, **kw)

    @classmethod
    def deepseek_v3(cls, num_experts=256, top_k=8, hidden_dim=7168, expert_dim=2048,
                    **options):
        """DeepSeek-V3: sigmoid scores, group-limited (8 groups, best 4 by the sum
        of their top-2 biased scores), selection bias, renormalised, scaled by
        2.5, one shared expert of width ``expert_dim``."""
        kw = dict(score="sigmoid", renormalize=True, n_groups=8, topk_groups=4,
                  group_score="top2", scale=2.5, num_shared_experts=1, selection_bias=True)
        kw.update(options)
        return cls(num_experts, top_k, hidden_dim, expert_dim, **kw)

    @classmethod
    def gpt_oss(cls, num_experts=32, top_k=4, hidden_dim=2880, expert_dim=2880, **options):
        """gpt-oss: router bias, softmax over the top-4 logits (= renormalised
        softmax), expert biases, clamped SwiGLU ``swiglu_oai`` with limit 7.0
        and alpha 1.702 (sizes: gpt-oss-20b)."""
        kw = dict(router_bias=True, expert_bias=True, activation="swiglu_oai", limit=7.0,
                  alpha=1.702)
        kw.update(options)
        return cls(num_experts, top_k, hidden_dim, expert_dim, **kw)

    @classmethod
    def switch(cls, num_experts=8, top_k=1, hidden_dim=768, expert_dim=2048, **options):
        """Switch Transformer: softmax top-1 (weight = the chosen probability),
        plain ReLU FFN experts, capacity factor 1.25 (sizes: switch-base-8)."""
        kw = dict(renormalize=False, glu=False, activation="relu", capacity_factor=1.25)
        kw.update(options)
        return cls(num_experts, top_k, hidden_dim, expert_dim, **kw)
