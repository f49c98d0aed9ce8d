"""Tests for numoe.MoELayer, numoe.moe and the seed-compatible wrappers."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, strategies as st

import numoe
from numoe import MoEConfig, MoELayer
from numoe import reference as ref
from numoe._jit import threads

from conftest import ATOL, RTOL, SIM, to_backend, to_host
from strategies import dtypes, seeds

PRESETS = {
    "mixtral": dict(num_experts=8, top_k=2, hidden_dim=32, expert_dim=48),
    "qwen2_moe": dict(num_experts=8, top_k=4, hidden_dim=32, expert_dim=16),
    "qwen3_moe": dict(num_experts=16, top_k=4, hidden_dim=32, expert_dim=24),
    "olmoe": dict(num_experts=16, top_k=4, hidden_dim=32, expert_dim=24),
    "deepseek_v3": dict(num_experts=32, top_k=4, hidden_dim=32, expert_dim=16),
    "gpt_oss": dict(num_experts=8, top_k=2, hidden_dim=32, expert_dim=32),
    "switch": dict(num_experts=8, top_k=1, hidden_dim=32, expert_dim=64),
}
TINY = dict(hidden_dim=8, expert_dim=6)           # simulator-sized


def config(name, **over):
    sizes = dict(PRESETS[name])
    sizes.update(over)
    return getattr(MoEConfig, name)(**sizes)


def expected(layer, x):
    return ref.moe_forward(x, top_k=layer.config.top_k, **layer.weights())


def assert_close(y, r, dtype):
    np.testing.assert_allclose(y, r, rtol=RTOL[dtype] * 5, atol=ATOL[dtype] * 10)


def run(backend, layer, x, **kw):
    if backend == "cuda":
        out = layer.to_device().forward(to_backend(backend, x), **kw)
        if kw.get("return_info"):
            return to_host(out[0]), out[1]
        return to_host(out)
    return layer.forward(x, **kw)


# ---------------------------------------------------------- vs reference
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_match_reference(backend, name, dtype):
    sim = backend == "cuda" and SIM
    cfg = config(name, **(TINY if sim else {}))
    layer = MoELayer.random(cfg, seed=1, dtype=dtype)
    x = np.random.default_rng(2).standard_normal((2, 4 if sim else 37, cfg.hidden_dim))
    x = x.astype(dtype)
    y = run(backend, layer, x)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, expected(layer, x), dtype)


@pytest.mark.parametrize("T", [1, 2, 5, 8, 200])
def test_token_counts(T):
    """Decode-sized and prefill-sized batches (streaming and BLAS expert paths)."""
    layer = MoELayer.random(config("olmoe", hidden_dim=64, expert_dim=80), seed=3)
    x = np.random.default_rng(T).standard_normal((T, 64)).astype(np.float32)
    assert_close(layer(x), expected(layer, x), np.float32)


def test_zero_tokens():
    layer = MoELayer.random(config("qwen2_moe"), seed=0)
    x = np.zeros((0, 32), np.float32)
    y, info = layer.forward(x, return_info=True)
    assert y.shape == (0, 32)
    assert info["logits"].shape == (0, 8) and info["routing"].experts.shape == (0, 4)
    assert info["aux_loss"] == 0.0 and info["z_loss"] == 0.0
    assert layer(np.zeros((3, 0, 32), np.float32)).shape == (3, 0, 32)


def test_one_expert_and_k_equals_e():
    for E, k in ((1, 1), (4, 4)):
        cfg = MoEConfig(E, k, 16, 8)
        layer = MoELayer.random(cfg, seed=4, dtype=np.float64)
        x = np.random.default_rng(5).standard_normal((9, 16))
        assert_close(layer(x), expected(layer, x), np.float64)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("glu", [True, False])
def test_activations_and_expert_bias(activation, glu):
    cfg = MoEConfig(6, 2, 16, 12, activation=activation, glu=glu, expert_bias=True,
                    router_bias=True)
    layer = MoELayer.random(cfg, seed=6, dtype=np.float64)
    x = np.random.default_rng(7).standard_normal((20, 16))
    assert_close(layer(x), expected(layer, x), np.float64)


@pytest.mark.parametrize("policy", ["slot", "position", "score"])
def test_capacity_drops(policy):
    cfg = config("mixtral", capacity_factor=0.5, drop_policy=policy)
    layer = MoELayer.random(cfg, seed=8, dtype=np.float64)
    x = np.random.default_rng(9).standard_normal((64, 32))
    y, info = layer.forward(x, return_info=True)
    plan = info["plan"]
    assert plan.capacity == numoe.capacity(64, 8, 2, 0.5)
    assert plan.dropped.any() and (plan.counts <= plan.capacity).all()
    assert_close(y, expected(layer, x), np.float64)
    assert info["stats"]["drop_rate"] == pytest.approx(plan.dropped.mean())


def test_switch_dropped_tokens_get_zero():
    cfg = config("switch", capacity_factor=0.25)
    layer = MoELayer.random(cfg, seed=10, dtype=np.float64)
    x = np.random.default_rng(11).standard_normal((40, 32))
    y, info = layer.forward(x, return_info=True)
    dropped = info["plan"].dropped[:, 0]
    assert dropped.any()
    assert np.all(y[dropped] == 0.0)


@given(st.data(), dtypes, seeds)
def test_hypothesis_configs_match_reference(data, dtype, seed):
    E = data.draw(st.integers(1, 12))
    k = data.draw(st.integers(1, E))
    groups = [g for g in range(1, E + 1) if E % g == 0]
    n_groups = data.draw(st.sampled_from(groups))
    topk_groups = data.draw(st.integers(-(-k // (E // n_groups)), n_groups))
    glu = data.draw(st.booleans())
    acts = ["silu", "gelu", "gelu_tanh", "relu"] + (["swiglu_oai"] if glu else [])
    act = data.draw(st.sampled_from(acts))
    shared = data.draw(st.integers(0, 2))
    cfg = MoEConfig(
        E, k, data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12)),
        score=data.draw(st.sampled_from(["softmax", "sigmoid"])),
        renormalize=data.draw(st.booleans()), n_groups=n_groups, topk_groups=topk_groups,
        scale=data.draw(st.sampled_from([1.0, 2.5])), activation=act, glu=glu,
        capacity_factor=data.draw(st.sampled_from([None, 0.5, 1.0, 2.0])),
        drop_policy=data.draw(st.sampled_from(["slot", "position", "score"])),
        num_shared_experts=shared, shared_gate=bool(shared) and data.draw(st.booleans()),
        router_bias=data.draw(st.booleans()), expert_bias=data.draw(st.booleans()),
        selection_bias=data.draw(st.booleans()),
        limit=data.draw(st.sampled_from([None, 1.0])) if act == "swiglu_oai" else None)
    layer = MoELayer.random(cfg, seed=seed % 1000, dtype=dtype)
    if layer.selection_bias is not None:
        layer.selection_bias = np.random.default_rng(seed).normal(0, 0.3, E).astype(dtype)
    T = data.draw(st.integers(0, 40))
    x = np.random.default_rng(seed + 1).uniform(-3, 3, (T, cfg.hidden_dim)).astype(dtype)
    y = layer(x)
    r = expected(layer, x)
    # float32 logits can order near-ties differently from the float64 oracle
    if dtype == np.float32:
        same = np.array_equal(layer.forward(x, return_info=True)[1]["routing"].experts,
                              ref.route(x.astype(np.float64) @ layer.router.astype(np.float64)
                                        + (0 if layer.router_bias is None else layer.router_bias),
                                        k, score=cfg.score, bias=layer.selection_bias,
                                        n_groups=n_groups, topk_groups=topk_groups).experts)
        if not same:
            return
    assert_close(y, r, dtype)


# ------------------------------------------------------------------ info
def test_info_contents():
    cfg = config("olmoe")
    layer = MoELayer.random(cfg, seed=12)
    x = np.random.default_rng(13).standard_normal((3, 10, 32)).astype(np.float32)
    y, info = layer.forward(x, return_info=True)
    assert set(info) == {"logits", "routing", "plan", "aux_loss", "z_loss", "stats"}
    T, E, k = 30, cfg.num_experts, cfg.top_k
    logits = info["logits"]
    assert logits.shape == (T, E) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, x.reshape(T, 32) @ layer.router, rtol=1e-5, atol=1e-5)
    r = info["routing"]
    assert isinstance(r, numoe.Routing) and r.weights.shape == (T, k)
    assert isinstance(info["plan"], numoe.DispatchPlan)
    assert np.array_equal(info["plan"].counts, np.bincount(r.experts.ravel(), minlength=E))
    assert info["aux_loss"] == pytest.approx(
        ref.load_balancing_loss(ref.router_probs(logits), r.experts), rel=1e-5)
    assert info["z_loss"] == pytest.approx(ref.router_z_loss(logits), rel=1e-5)
    assert np.array_equal(info["stats"]["counts"], info["plan"].counts)
    assert np.array_equal(layer(x), y)


# ------------------------------------------------------------ determinism
@pytest.mark.parametrize("name,T", [("olmoe", 3), ("olmoe", 300), ("qwen2_moe", 130),
                                    ("gpt_oss", 50)])
def test_bit_identical_across_thread_counts(name, T):
    layer = MoELayer.random(config(name, hidden_dim=96, expert_dim=64), seed=14)
    x = np.random.default_rng(15).standard_normal((T, 96)).astype(np.float32)
    outs = []
    for n in (1, 2):
        with threads(n):
            outs.append(layer.forward(x, return_info=True))
    assert np.array_equal(outs[0][0], outs[1][0])
    assert np.array_equal(outs[0][1]["logits"], outs[1][1]["logits"])
    assert np.array_equal(outs[0][1]["routing"].experts, outs[1][1]["routing"].experts)


def test_input_not_modified():
    layer = MoELayer.random(config("gpt_oss"), seed=16)
    x = np.random.default_rng(17).standard_normal((7, 32)).astype(np.float32)
    x0 = x.copy()
    w = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in layer.weights().items()}
    layer(x)
    assert np.array_equal(x, x0)
    for k, v in layer.weights().items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(v, w[k])


# ---------------------------------------------------------- construction
def test_random_is_deterministic_and_dtype():
    cfg = config("qwen2_moe")
    a, b = MoELayer.random(cfg, seed=5), MoELayer.random(cfg, seed=5)
    for name, v in a.weights().items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(v, getattr(b, name)), name
            assert v.dtype == np.float32
    assert MoELayer.random(cfg, dtype=np.float64).w_down.dtype == np.float64
    assert not np.array_equal(MoELayer.random(cfg, seed=6).router, a.router)
    with pytest.raises(TypeError, match="dtype"):
        MoELayer.random(cfg, dtype=np.int32)
    with pytest.raises(TypeError, match="config"):
        MoELayer.random(dict(num_experts=2))


def test_gate_up_are_fused_views_and_layers_share_them():
    layer = MoELayer.random(config("mixtral"), seed=7)
    F = layer.config.expert_dim
    assert layer.w_gate.base is not None and layer.w_gate.base is layer.w_up.base
    assert layer.w_gate.shape == layer.w_up.shape == (8, 32, F)
    again = MoELayer(layer.config, **{k: v for k, v in layer.weights().items()
                                      if k in _WEIGHT_NAMES})
    assert np.shares_memory(again.w_gate, layer.w_gate)       # no copy of the experts
    x = np.random.default_rng(1).standard_normal((5, 32)).astype(np.float32)
    assert np.array_equal(again(x), layer(x))


_WEIGHT_NAMES = ("router", "w_gate", "w_up", "w_down", "router_bias", "selection_bias",
                 "b_gate", "b_up", "b_down", "shared_gate_proj", "shared_up_proj",
                 "shared_down_proj", "shared_gate_weight")


def test_constructor_converts_dtypes_and_layouts():
    cfg = MoEConfig(3, 2, 5, 4)
    rng = np.random.default_rng(0)
    w = dict(router=rng.standard_normal((5, 3)).tolist(),
             w_gate=rng.standard_normal((3, 5, 4)),
             w_up=np.asfortranarray(rng.standard_normal((3, 5, 4)).astype(np.float32)),
             w_down=rng.standard_normal((3, 4, 5)))
    layer = MoELayer(cfg, **w)
    assert layer.dtype == np.float64 and layer.router.dtype == np.float64
    x = rng.standard_normal((4, 5))
    assert_close(layer(x), expected(layer, x), np.float64)


def _weights(name="qwen2_moe"):
    layer = MoELayer.random(config(name), seed=0)
    return layer.config, {k: v for k, v in layer.weights().items() if k in _WEIGHT_NAMES}


@pytest.mark.parametrize("change,exc,match", [
    (dict(router=np.zeros((32, 7), np.float32)), ValueError, "router"),
    (dict(w_gate=np.zeros((8, 32, 5), np.float32)), ValueError, "w_gate"),
    (dict(w_up=None), ValueError, "w_up"),
    (dict(w_down=np.zeros((8, 32, 16), np.float32)), ValueError, "w_down"),
    (dict(shared_gate_proj=None), ValueError, "shared_gate_proj"),
    (dict(shared_down_proj=np.zeros((32, 32), np.float32)), ValueError, "shared_down_proj"),
    (dict(shared_gate_weight=None), ValueError, "shared_gate_weight"),
    (dict(shared_gate_weight=np.zeros(31, np.float32)), ValueError, "shared_gate_weight"),
    (dict(router_bias=np.zeros(8, np.float32)), ValueError, "router_bias"),
    (dict(b_down=np.zeros((8, 32), np.float32)), ValueError, "b_down"),
    (dict(w_gate=np.zeros((8, 32, 16), np.int32)), TypeError, "w_gate"),
    (dict(router="abc"), TypeError, "router"),
])
def test_constructor_validation(change, exc, match):
    cfg, w = _weights()
    w.update(change)
    with pytest.raises(exc, match=match):
        MoELayer(cfg, **w)
    with pytest.raises(TypeError, match="config"):
        MoELayer(None, **_weights()[1])


def test_plain_layer_rejects_w_up_and_bias_flags():
    cfg, w = _weights("switch")
    assert w["w_up"] is None
    with pytest.raises(ValueError, match="w_up"):
        MoELayer(cfg, **dict(w, w_up=w["w_gate"]))
    cfg2, w2 = _weights("gpt_oss")
    with pytest.raises(ValueError, match="b_gate"):
        MoELayer(cfg2, **dict(w2, b_gate=None))
    with pytest.raises(ValueError, match="selection_bias"):
        MoELayer(cfg2, **dict(w2, selection_bias=np.zeros(8, np.float32)))


def test_forward_validation():
    layer = MoELayer.random(config("olmoe"), seed=0)
    with pytest.raises(ValueError, match="x"):
        layer(np.zeros((4, 31), np.float32))
    with pytest.raises(ValueError, match="x"):
        layer(np.zeros(31, np.float32))
    with pytest.raises(ValueError, match="x"):
        layer(np.float32(1.0))
    with pytest.raises(TypeError, match="x"):
        layer(np.zeros((4, 32), np.float64))
    with pytest.raises(TypeError, match="x"):
        layer([["a"] * 32])
    with pytest.raises(TypeError, match="x"):
        layer(np.zeros((4, 32), np.int64))
    bad = np.zeros((4, 32), np.float32)
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="x"):
        layer(bad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_token_and_nested_lists(dtype):
    """A 1-D x is one token; a nested list is read in the layer's dtype."""
    layer = MoELayer.random(config("olmoe"), seed=0, dtype=dtype)
    x = np.random.default_rng(1).standard_normal((3, 32)).astype(dtype)
    y = layer(x)
    y1 = layer(x[1])
    assert y1.shape == (32,) and y1.dtype == dtype
    np.testing.assert_array_equal(y1, layer(x[1:2])[0])
    yl = layer(x.tolist())
    assert yl.dtype == dtype
    np.testing.assert_array_equal(yl, y)
    np.testing.assert_array_equal(layer(tuple(x[0].tolist())), layer(x[0]))
    g = layer.backward(x[0], layer.forward(x[0], return_info=True)[1], np.ones(32, dtype))
    assert g["x"].shape == (32,)


def test_torch_tensor_that_requires_grad_says_detach():
    torch = pytest.importorskip("torch")
    layer = MoELayer.random(config("olmoe"), seed=0)
    with pytest.raises(TypeError, match=r"x\.detach\(\)"):
        layer(torch.zeros(2, 32, requires_grad=True))
    y = layer(torch.ones(2, 32))           # a plain CPU tensor is read like an array
    np.testing.assert_array_equal(y, layer(np.ones((2, 32), np.float32)))


@pytest.mark.parametrize("name", ["deepseek_v3", "mixtral"])
def test_aux_loss_is_one_when_balanced(name):
    """Sigmoid scores are normalised per token before the balance term (as DeepSeek-V3
    does), so 1.0 means balanced for every router; exactly 1 for uniform scores and an
    even split, near 1 for a random layer, and the value of the reference's formula."""
    cfg = config(name)
    E, k = cfg.num_experts, cfg.top_k
    T = 4 * E
    experts = (np.arange(T * k).reshape(T, k) % E).astype(np.int32)
    p = numoe.router_probs(np.zeros((T, E)), cfg.score, normalize=True)
    assert numoe.load_balancing_loss(p, experts) == pytest.approx(1.0, rel=1e-12)
    layer = MoELayer.random(cfg, seed=0, dtype=np.float64)
    x = np.random.default_rng(1).standard_normal((512, 32))
    _, info = layer.forward(x, return_info=True)
    assert 0.9 < info["aux_loss"] < 2.0
    want = ref.load_balancing_loss(ref.router_probs(info["logits"], cfg.score, normalize=True),
                                   info["routing"].experts)
    assert info["aux_loss"] == pytest.approx(want, rel=1e-12)


def test_selection_bias_is_updatable():
    cfg = config("deepseek_v3")
    layer = MoELayer.random(cfg, seed=0)
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    _, info = layer.forward(x, return_info=True)
    layer.selection_bias = numoe.update_bias(layer.selection_bias, info["plan"].counts, 0.01)
    y2, info2 = layer.forward(x, return_info=True)
    assert_close(y2, expected(layer, x), np.float32)


# ------------------------------------------------------------ functional
def test_moe_functional():
    layer = MoELayer.random(config("gpt_oss"), seed=0)
    x = np.random.default_rng(0).standard_normal((6, 32)).astype(np.float32)
    y = layer(x)
    assert np.array_equal(numoe.moe(x, layer), y)
    assert np.array_equal(numoe.moe(x, layer, layer.config), y)
    w = {k: v for k, v in layer.weights().items() if k in _WEIGHT_NAMES}
    assert np.array_equal(numoe.moe(x, w, layer.config), y)
    with pytest.raises(ValueError, match="config"):
        numoe.moe(x, layer, dataclasses.replace(layer.config, top_k=1))
    with pytest.raises(TypeError, match="config"):
        numoe.moe(x, w)
    with pytest.raises(TypeError, match="layer_or_weights"):
        numoe.moe(x, [1, 2])


def test_seed_wrappers_compose_to_the_layer():
    cfg = config("qwen2_moe")
    layer = MoELayer.random(cfg, seed=3)
    x = np.random.default_rng(4).standard_normal((2, 9, 32)).astype(np.float32)
    w, idx, loss = numoe.moe_gating_forward(x, layer.router, cfg)
    y_layer, info = layer.forward(x, return_info=True)
    assert w.shape == idx.shape == (18, 4) and idx.dtype == np.int32
    assert np.array_equal(idx, info["routing"].experts)
    assert np.array_equal(w, info["routing"].weights)
    assert loss == pytest.approx(info["aux_loss"])
    params = {k: getattr(layer, k) for k in ("w_gate", "w_up", "w_down", "shared_gate_proj",
                                              "shared_up_proj", "shared_down_proj",
                                              "shared_gate_weight")}
    for p in (layer, params):
        y = numoe.moe_expert_computation(x, w, idx, p, cfg)
        assert y.shape == x.shape
        assert_close(y, y_layer, np.float32)


def test_seed_expert_params_forms():
    cfg = MoEConfig(3, 2, 6, 5)
    layer = MoELayer.random(cfg, seed=0, dtype=np.float64)
    x = np.random.default_rng(1).standard_normal((7, 6))
    w, idx, _ = numoe.moe_gating_forward(x, layer.router, cfg)
    want = layer(x)
    stacked = (layer.w_gate, layer.w_up, layer.w_down)
    per_expert = [(layer.w_gate[e], layer.w_up[e], layer.w_down[e]) for e in range(3)]
    for p in (stacked, per_expert, dict(zip(("w_gate", "w_up", "w_down"), stacked))):
        assert_close(numoe.moe_expert_computation(x, w, idx, p, cfg), want, np.float64)
    with pytest.raises(ValueError, match="expert_params"):
        numoe.moe_expert_computation(x, w, idx, stacked[:2], cfg)
    with pytest.raises(ValueError, match="unknown"):
        numoe.moe_expert_computation(x, w, idx, dict(w_gate=1, w_down=2, bogus=3), cfg)
    with pytest.raises(TypeError, match="expert_params"):
        numoe.moe_expert_computation(x, w, idx, 3.0, cfg)


def test_seed_gating_validation():
    cfg = MoEConfig(4, 2, 6, 5)
    with pytest.raises(ValueError, match="gate_weights"):
        numoe.moe_gating_forward(np.zeros((3, 6)), np.zeros((6, 3)), cfg)
    with pytest.raises(ValueError, match="x"):
        numoe.moe_gating_forward(np.zeros((3, 5)), np.zeros((6, 4)), cfg)
    with pytest.raises(TypeError, match="config"):
        numoe.moe_gating_forward(np.zeros((3, 6)), np.zeros((6, 4)), None)
