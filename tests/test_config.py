"""Tests for numoe.MoEConfig: validation, immutability and the model presets."""
import dataclasses

import pytest

import numoe
from numoe import MoEConfig


def test_defaults_and_frozen():
    c = MoEConfig(8, 2, 16, 32)
    assert (c.num_experts, c.top_k, c.hidden_dim, c.expert_dim) == (8, 2, 16, 32)
    assert c.score == "softmax" and c.renormalize and c.glu and c.activation == "silu"
    assert c.capacity_factor is None and c.num_shared_experts == 0
    assert c.shared_expert_dim is None and c.limit is None and c.alpha == 1.702
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.top_k = 3
    assert c == MoEConfig(num_experts=8, top_k=2, hidden_dim=16, expert_dim=32)
    assert hash(c) == hash(MoEConfig(8, 2, 16, 32))


def test_replace_revalidates():
    c = MoEConfig(8, 2, 16, 32)
    assert dataclasses.replace(c, top_k=8).top_k == 8
    with pytest.raises(ValueError, match="top_k"):
        dataclasses.replace(c, top_k=9)


def test_shared_dim_defaults_to_count_times_width():
    c = MoEConfig(8, 2, 16, 32, num_shared_experts=2)
    assert c.shared_expert_dim == 64
    assert MoEConfig(8, 2, 16, 32, num_shared_experts=1, shared_expert_dim=7).shared_expert_dim == 7


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_experts=0), ValueError, "num_experts"),
    (dict(num_experts=2.5), TypeError, "num_experts"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=9), ValueError, "top_k"),
    (dict(top_k=True), TypeError, "top_k"),
    (dict(hidden_dim=0), ValueError, "hidden_dim"),
    (dict(expert_dim=-1), ValueError, "expert_dim"),
    (dict(score="relu"), ValueError, "score"),
    (dict(renormalize=1), TypeError, "renormalize"),
    (dict(n_groups=3), ValueError, "n_groups"),
    (dict(n_groups=0), ValueError, "n_groups"),
    (dict(n_groups=4, topk_groups=5), ValueError, "topk_groups"),
    (dict(n_groups=4, topk_groups=0), ValueError, "topk_groups"),
    (dict(top_k=4, n_groups=4, topk_groups=1), ValueError, "top_k"),
    (dict(group_score="mean"), ValueError, "group_score"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(activation="swiglu_oai", glu=False), ValueError, "swiglu_oai"),
    (dict(glu="yes"), TypeError, "glu"),
    (dict(capacity_factor=0.0), ValueError, "capacity_factor"),
    (dict(capacity_factor=float("inf")), ValueError, "capacity_factor"),
    (dict(drop_policy="random"), ValueError, "drop_policy"),
    (dict(num_shared_experts=-1), ValueError, "num_shared_experts"),
    (dict(shared_expert_dim=8), ValueError, "shared_expert_dim"),
    (dict(num_shared_experts=1, shared_expert_dim=0), ValueError, "shared_expert_dim"),
    (dict(shared_gate=True), ValueError, "shared_gate"),
    (dict(router_bias=None), TypeError, "router_bias"),
    (dict(selection_bias=0), TypeError, "selection_bias"),
    (dict(expert_bias="no"), TypeError, "expert_bias"),
    (dict(limit=7.0), ValueError, "limit"),
    (dict(activation="swiglu_oai", limit=-1.0), ValueError, "limit"),
    (dict(activation="swiglu_oai", limit=float("nan")), ValueError, "limit"),
    (dict(alpha=float("inf")), ValueError, "alpha"),
])
def test_validation(kwargs, exc, match):
    args = dict(num_experts=8, top_k=2, hidden_dim=16, expert_dim=32)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        MoEConfig(**args)


def test_numpy_integers_accepted():
    import numpy as np
    c = MoEConfig(np.int64(8), np.int32(2), 16, 32)
    assert type(c.num_experts) is int and c.top_k == 2


# ------------------------------------------------------------------ presets
def test_mixtral():
    c = MoEConfig.mixtral()
    assert (c.num_experts, c.top_k, c.hidden_dim, c.expert_dim) == (8, 2, 4096, 14336)
    assert c.score == "softmax" and c.renormalize and c.activation == "silu" and c.glu
    assert c.num_shared_experts == 0 and not c.router_bias


def test_qwen2_moe():
    c = MoEConfig.qwen2_moe()
    assert (c.num_experts, c.top_k, c.expert_dim) == (60, 4, 1408)
    assert not c.renormalize
    assert c.num_shared_experts == 1 and c.shared_expert_dim == 5632 and c.shared_gate
    assert MoEConfig.qwen2_moe(expert_dim=10).shared_expert_dim == 40
    assert MoEConfig.qwen2_moe(shared_expert_dim=12).shared_expert_dim == 12


def test_qwen3_moe():
    c = MoEConfig.qwen3_moe()
    assert (c.num_experts, c.top_k, c.expert_dim) == (128, 8, 768)
    assert c.renormalize and c.num_shared_experts == 0


def test_olmoe():
    c = MoEConfig.olmoe()
    assert (c.num_experts, c.top_k, c.hidden_dim, c.expert_dim) == (64, 8, 2048, 1024)
    assert not c.renormalize and c.score == "softmax"


def test_deepseek_v3():
    c = MoEConfig.deepseek_v3()
    assert (c.num_experts, c.top_k) == (256, 8)
    assert c.score == "sigmoid" and c.renormalize and c.scale == 2.5
    assert (c.n_groups, c.topk_groups, c.group_score) == (8, 4, "top2")
    assert c.selection_bias and c.num_shared_experts == 1
    assert c.shared_expert_dim == c.expert_dim and not c.shared_gate


def test_gpt_oss():
    c = MoEConfig.gpt_oss()
    assert (c.num_experts, c.top_k, c.hidden_dim, c.expert_dim) == (32, 4, 2880, 2880)
    assert c.router_bias and c.expert_bias and c.renormalize
    assert c.activation == "swiglu_oai" and c.limit == 7.0 and c.alpha == 1.702


def test_switch():
    c = MoEConfig.switch()
    assert c.top_k == 1 and not c.glu and c.activation == "relu"
    assert c.capacity_factor == 1.25 and not c.renormalize


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3",
                                  "gpt_oss", "switch"])
def test_presets_take_sizes_and_overrides(name):
    make = getattr(MoEConfig, name)
    c = make(num_experts=16, top_k=2, hidden_dim=8, expert_dim=4, capacity_factor=2.0)
    assert (c.num_experts, c.top_k, c.hidden_dim, c.expert_dim) == (16, 2, 8, 4)
    assert c.capacity_factor == 2.0
    assert isinstance(c, numoe.MoEConfig)
    with pytest.raises(ValueError, match="top_k"):
        make(num_experts=4, top_k=5)
