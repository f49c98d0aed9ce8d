"""``batch_invariant=True``: a token's output is bit-identical whatever else is in the batch.

In the default mode a token's result may drift with the batch (expert
products of different row counts go to BLAS or the streaming kernel and
round differently); in batch-invariant mode the router product, every
expert block, the shared MLP and its gate use the row-independent streaming
kernel, so the only thing the rest of the batch changes is which rows share
a block. Dropless configs only: capacity drops depend on the batch by
definition.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from numoe import MoEConfig, MoELayer
from numoe import reference as ref
from numoe._cpu import experts as cpu_experts
from numoe._jit import threads

from strategies import seeds

BF16 = np.dtype(ml_dtypes.bfloat16)
CONFIGS = {
    "qwen2_moe": MoEConfig.qwen2_moe(num_experts=4, top_k=2, hidden_dim=48, expert_dim=40,
                                     shared_expert_dim=24),
    "gpt_oss": MoEConfig.gpt_oss(num_experts=4, top_k=2, hidden_dim=48, expert_dim=40),
    "deepseek_v3": MoEConfig.deepseek_v3(num_experts=8, top_k=2, hidden_dim=48, expert_dim=24,
                                         n_groups=2, topk_groups=1),
}
STORAGE = [(np.float32, None), (BF16, None), (np.float32, BF16), (np.float32, "int8"),
           (np.float16, None)]


def layer_for(name, dtype, weight_dtype, seed=0):
    return MoELayer.random(CONFIGS[name], seed=seed, dtype=dtype, weight_dtype=weight_dtype,
                           batch_invariant=True)


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype,wdt", STORAGE, ids=str)
def test_token_alone_equals_token_in_batches(name, dtype, wdt):
    """Batch sizes from 1 to past STREAM_ROWS rows per expert (several row blocks)."""
    layer = layer_for(name, dtype, wdt)
    H = layer.config.hidden_dim
    rng = np.random.default_rng(1)
    probe = rng.standard_normal((3, H)).astype(dtype)
    alone = [layer(probe[i:i + 1])[0] for i in range(3)]
    for T in (3, 5, cpu_experts.SMALL_ROWS + 3, 90, 2 * cpu_experts.STREAM_ROWS + 70):
        x = rng.standard_normal((T, H)).astype(dtype)
        pos = rng.choice(T, 3, replace=False)
        x[pos] = probe
        y = layer(x)
        for i, p in enumerate(pos):
            assert np.array_equal(bits(y[p]), bits(alone[i])), (T, p)


@given(seeds, st.integers(1, 160), st.sampled_from(["qwen2_moe", "gpt_oss"]),
       st.sampled_from([np.float32, BF16]))
def test_hypothesis_batch_invariance(seed, T, name, dtype):
    layer = layer_for(name, dtype, None, seed=seed % 7)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, layer.config.hidden_dim)).astype(dtype)
    y = layer(x)
    i = int(rng.integers(T))
    assert np.array_equal(bits(layer(x[i:i + 1])[0]), bits(y[i]))
    # and a different batch around the same token
    other = rng.standard_normal((max(1, T // 2), layer.config.hidden_dim)).astype(dtype)
    other[-1] = x[i]
    assert np.array_equal(bits(layer(other)[-1]), bits(y[i]))


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_thread_counts_and_reference(dtype):
    layer = layer_for("qwen2_moe", dtype, None)
    x = np.random.default_rng(2).standard_normal((150, 48)).astype(dtype)
    outs = []
    for n in (1, 2):
        with threads(n):
            outs.append(bits(layer(x)))
    assert np.array_equal(outs[0], outs[1])
    r = ref.moe_forward(np.asarray(x, np.float64), top_k=2, **layer.weights())
    y = layer(x).astype(np.float64)
    tol = 2.0 ** -8 if dtype == BF16 else 1e-4
    np.testing.assert_allclose(y, r, rtol=tol, atol=1e-4)


def test_same_results_as_default_mode_within_rounding():
    cfg = CONFIGS["gpt_oss"]
    inv = MoELayer.random(cfg, seed=3, batch_invariant=True)
    std = MoELayer.random(cfg, seed=3)
    assert inv.batch_invariant and not std.batch_invariant
    x = np.random.default_rng(3).standard_normal((120, 48)).astype(np.float32)
    np.testing.assert_allclose(inv(x), std(x), rtol=1e-4, atol=1e-5)
    assert inv.astype(weight_dtype=BF16).batch_invariant
    with pytest.raises(TypeError, match="batch_invariant"):
        MoELayer.random(cfg, batch_invariant="yes")
