"""Tests for numoe.quantize / QuantizedArray and int8 expert weights.

Tolerances: the int8 kernels are compared with the float64 reference run on
the *dequantized* weights (``values * scales`` in float64), so quantisation
error is not in the comparison: what is left is the arithmetic of the
compute dtype (float32: the dot products accumulate ``x * q`` in float32 and
scale each finished column, or multiply a float32-widened tile with sgemm),
checked with the float32 tolerances of the other expert tests.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

import numoe
from numoe import QuantizedArray, quantize
from numoe import reference as ref
from numoe._cpu import experts as cpu_experts

from conftest import ATOL, RTOL
from strategies import seeds

BF16 = np.dtype(ml_dtypes.bfloat16)
SMALL = cpu_experts.SMALL_ROWS


# ----------------------------------------------------------------- quantize
@given(seeds, st.integers(1, 4), st.integers(0, 3), st.sampled_from(
    [np.float64, np.float32, np.float16, BF16]), st.floats(1e-3, 1e3))
def test_round_trip_error_at_most_half_a_step(seed, ndim, axis_pick, dtype, scale):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 7, ndim))
    w = (rng.standard_normal(shape) * scale).astype(dtype)
    axis = axis_pick % ndim - ndim                # a negative axis
    q = quantize(w, axis=axis)
    assert q.values.dtype == np.int8 and q.scales.dtype == np.float32
    assert q.shape == w.shape and q.axis == axis % ndim
    assert q.scales.shape == tuple(1 if i == axis % ndim else n for i, n in enumerate(shape))
    assert np.abs(q.values).max() <= 127
    w64 = w.astype(np.float64)
    s64 = q.scales.astype(np.float64)
    assert np.all(np.abs(w64 - q.dequantize(np.float64)) <= s64 / 2)
    # the largest entry of each vector maps to +-127
    assert np.array_equal(np.abs(q.values).max(axis=axis, keepdims=True),
                          np.where(s64 > 0, 127, 0))
    # numpy.asarray dequantizes (float32)
    d = np.asarray(q)
    assert d.dtype == np.float32
    assert np.array_equal(d, q.values.astype(np.float32) * q.scales)


def test_round_half_to_even_and_zero_columns():
    # column 0: scale 1 exactly, halves round to even; column 1: all zero
    w = np.array([[127.0, 0.0], [0.5, 0.0], [1.5, 0.0], [2.5, 0.0], [-3.5, 0.0]])
    q = quantize(w, axis=0)
    assert q.scales.tolist() == [[1.0, 0.0]]
    assert q.values[:, 0].tolist() == [127, 0, 2, 2, -4]
    assert not q.values[:, 1].any()
    assert not np.asarray(q)[:, 1].any()


def test_any_byte_order_and_input_not_modified():
    w = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(">f4")
    w0 = w.copy()
    q = quantize(w)
    assert np.array_equal(w, w0)
    assert np.array_equal(q.values, quantize(w.astype("<f4")).values)


def test_indexing_views():
    w = np.random.default_rng(1).standard_normal((3, 5, 4))
    q = quantize(w)                                   # axis=-2 -> 1
    e = q[1]
    assert isinstance(e, QuantizedArray) and e.shape == (5, 4) and e.axis == 0
    assert np.array_equal(np.asarray(e), np.asarray(q)[1])
    c = q[..., 1:3]
    assert c.shape == (3, 5, 2) and c.axis == 1
    assert np.array_equal(np.asarray(c), np.asarray(q)[..., 1:3])
    with pytest.raises(IndexError, match="scale axis"):
        q[:, 1:2]
    with pytest.raises(IndexError):
        q[[0, 1]]
    assert q.nbytes == q.values.nbytes + q.scales.nbytes
    assert len(q) == 3 and q.ndim == 3


def test_validation():
    with pytest.raises(TypeError, match="w"):
        quantize(np.arange(6).reshape(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="axis"):
        quantize(np.ones((2, 3)), axis=2)
    with pytest.raises(TypeError, match="already"):
        quantize(quantize(np.ones((2, 2))))
    with pytest.raises(TypeError, match="values"):
        QuantizedArray(np.ones((2, 2)), np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="scales"):
        QuantizedArray(np.ones((2, 2), np.int8), np.ones((2, 2), np.float32), axis=0)
    with pytest.raises(ValueError, match="copy"):
        np.asarray(quantize(np.ones((2, 2))), copy=False)


# ------------------------------------------------------- int8 expert weights
def problem(rng, counts, H, F, dtype, bias=False):
    E = len(counts)
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    kw = dict(w_gate=quantize(rng.standard_normal((E, H, F)) / np.sqrt(H)),
              w_up=quantize(rng.standard_normal((E, H, F)) / np.sqrt(H)),
              w_down=quantize(rng.standard_normal((E, F, H)) / np.sqrt(F)))
    if bias:
        kw.update(b_gate=rng.standard_normal((E, F)).astype(dtype),
                  b_up=rng.standard_normal((E, F)).astype(dtype),
                  b_down=rng.standard_normal((E, H)).astype(dtype))
    return rng.standard_normal((int(off[-1]), H)).astype(dtype), off, kw


def reference(xs, off, kw, **opts):
    deq = {k: (v.dequantize(np.float64) if isinstance(v, QuantizedArray) else v)
           for k, v in kw.items()}
    return ref.expert_ffn(xs.astype(np.float64), off, deq.pop("w_gate"), deq.pop("w_up"),
                          deq.pop("w_down"), **deq, **opts)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_expert_ffn_int8_matches_reference_on_dequantized(dtype, bias):
    """Streaming (< NARROW_SMALL_ROWS rows for int8 weights), BLAS (tiles wider than
    BLAS_TILE columns)."""
    rng = np.random.default_rng(2)
    narrow = cpu_experts.NARROW_SMALL_ROWS
    counts = [0, 1, SMALL - 1, SMALL, 3, 90, narrow - 1, narrow]
    F = cpu_experts.BLAS_TILE + 44                # two column tiles per product
    xs, off, kw = problem(rng, counts, 40, F, dtype, bias)
    y = numoe.expert_ffn(xs, off, kw["w_gate"], kw["w_up"], kw["w_down"],
                         **{k: v for k, v in kw.items() if k.startswith("b_")})
    assert y.dtype == dtype
    np.testing.assert_allclose(y, reference(xs, off, kw), rtol=RTOL[np.float32] * 5,
                               atol=ATOL[np.float32] * 10)


@given(seeds, st.lists(st.integers(0, 24), min_size=1, max_size=5), st.integers(1, 20),
       st.integers(1, 20), st.sampled_from(["silu", "gelu", "relu", "swiglu_oai"]))
def test_hypothesis_int8_experts(seed, counts, H, F, activation):
    rng = np.random.default_rng(seed)
    xs, off, kw = problem(rng, counts, H, F, np.float32)
    y = numoe.expert_ffn(xs, off, kw["w_gate"], kw["w_up"], kw["w_down"],
                         activation=activation)
    np.testing.assert_allclose(y, reference(xs, off, kw, activation=activation),
                               rtol=RTOL[np.float32] * 10, atol=ATOL[np.float32] * 10)


def test_int8_must_be_quantized_along_the_input_axis():
    rng = np.random.default_rng(3)
    xs, off, kw = problem(rng, [2, 3], 6, 5, np.float32)
    wrong = quantize(np.asarray(kw["w_gate"]), axis=-1)
    with pytest.raises(ValueError, match="w_gate"):
        numoe.expert_ffn(xs, off, wrong, kw["w_up"], kw["w_down"])


# ------------------------------------------------------------------- layer
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "gpt_oss", "switch"])
@pytest.mark.parametrize("T", [3, 60])
def test_int8_layer(name, T):
    """``astype(weight_dtype="int8")``: expert weights quantized per output column,
    every other array in the activation dtype; equals the reference on the
    dequantized weights, and is close to the float layer."""
    kw = dict(num_experts=8, top_k=2, hidden_dim=32, expert_dim=24)
    if name == "switch":
        kw.pop("top_k")
    if name == "qwen2_moe":
        kw["shared_expert_dim"] = 40
    cfg = getattr(numoe.MoEConfig, name)(**kw)
    base = numoe.MoELayer.random(cfg, seed=4)
    layer = base.astype(weight_dtype="int8")
    assert layer.weight_dtype == np.int8 and layer.dtype == np.float32
    assert isinstance(layer.w_down, QuantizedArray) and isinstance(layer.w_gate, QuantizedArray)
    assert layer.router.dtype == np.float32
    assert layer.nbytes < base.nbytes / 2
    x = np.random.default_rng(5).standard_normal((T, 32)).astype(np.float32)
    y = layer(x)
    r = ref.moe_forward(x, top_k=cfg.top_k, **layer.weights())
    np.testing.assert_allclose(y, r, rtol=RTOL[np.float32] * 5, atol=ATOL[np.float32] * 10)
    yf = base(x)
    assert np.linalg.norm(y - yf) / np.linalg.norm(yf) < 3e-2     # int8 vs unquantized
    same = numoe.MoELayer.random(cfg, seed=4, weight_dtype="int8")
    assert np.array_equal(same(x), y)
