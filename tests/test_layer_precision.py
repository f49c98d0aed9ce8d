"""16-bit activations and mixed weight storage: expert_ffn and MoELayer.

Every comparison is with the float64 reference run on the *same rounded*
values (the bf16/fp16 inputs and weights converted exactly to float64), so
the storage rounding itself is not in the error; what is left:

* float32 results (float32 x, any narrower weights): only float32
  accumulation, the float32 tolerances of the other tests (``conftest.RTOL``);
* 16-bit results: accumulated in float32, then rounded once to the output
  dtype: half an ulp of the result, ``2**-9`` relative for bfloat16 (8-bit
  significand) and ``2**-12`` for float16 (11 bits), plus the float32 part;
  ``RTOL16`` allows one ulp, ``ATOL16`` the absolute floor of near-zero
  outputs (float32 cancellation in a sum of O(1) terms); for bfloat16 the
  floor is ``2**-8 * max|reference|``: at prefill sizes on a CPU with
  AMX-BF16 or AVX512-BF16 the down product takes the hidden layer rounded to
  bfloat16 (as PyTorch does), an error of half an ulp per term, at most about
  ``2**-9 * sum_j |h_j w_j|``, which near-zero outputs feel in full;
* float64 x with narrower weights: the products are exact, float64 tolerances.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

import numoe
from numoe import MoEConfig, MoELayer
from numoe import reference as ref
from numoe._cpu import experts as cpu_experts
from numoe._jit import threads

from conftest import ATOL, RTOL
from strategies import seeds

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
RTOL16 = {BF16: 2.0 ** -8, F16: 2.0 ** -11}
ATOL16 = {BF16: 1e-4, F16: 1e-5}
SMALL = cpu_experts.SMALL_ROWS
NARROW = cpu_experts.NARROW_SMALL_ROWS        # the BLAS threshold of widened narrow weights
# (xs dtype, weight dtype): weights as wide as xs's compute dtype or narrower
PAIRS = [(F32, BF16), (F32, F16), (BF16, BF16), (F16, F16), (BF16, F32), (F16, BF16),
         (F64, BF16), (F64, F32), (F32, F32)]


def tol(dtype):
    """``(rtol, atol)`` for a result of ``dtype`` vs the float64 reference."""
    dt = np.dtype(dtype)
    if dt in RTOL16:
        return RTOL16[dt], ATOL16[dt]
    return RTOL[dt.type] * 5, ATOL[dt.type] * 10


def assert_close(y, r):
    rtol, atol = tol(y.dtype)
    if y.dtype == BF16 and r.size:
        atol += 2.0 ** -8 * np.abs(r).max()
    np.testing.assert_allclose(y.astype(np.float64), r, rtol=rtol, atol=atol)


def problem(rng, counts, H, F, xdt, wdt, glu=True, bias=False):
    E = len(counts)
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    nrm = lambda shape, s, dt=wdt: (rng.standard_normal(shape) * s).astype(dt)  # noqa: E731
    kw = dict(w_gate=nrm((E, H, F), 1 / np.sqrt(H)),
              w_up=nrm((E, H, F), 1 / np.sqrt(H)) if glu else None,
              w_down=nrm((E, F, H), 1 / np.sqrt(F)))
    if bias:
        kw.update(b_gate=nrm((E, F), 0.5), b_down=nrm((E, H), 0.5))
        if glu:
            kw["b_up"] = nrm((E, F), 0.5)
    return nrm((int(off[-1]), H), 1.0, xdt), off, kw


def ffn(xs, off, kw, **opts):
    return numoe.expert_ffn(xs, off, kw["w_gate"], kw["w_up"], kw["w_down"],
                            **{k: v for k, v in kw.items() if k.startswith("b_")}, **opts)


def reference(xs, off, kw, **opts):
    f64 = {k: None if v is None else np.asarray(v, np.float64) for k, v in kw.items()}
    return ref.expert_ffn(xs.astype(np.float64), off, f64.pop("w_gate"), f64.pop("w_up"),
                          f64.pop("w_down"), **f64, **opts)


# ---------------------------------------------------------------- expert_ffn
@pytest.mark.parametrize("xdt,wdt", PAIRS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("glu,bias", [(True, False), (True, True), (False, True)])
def test_expert_ffn_mixed_storage(xdt, wdt, glu, bias):
    """Both kernel paths: streaming blocks (< SMALL_ROWS rows, or NARROW_SMALL_ROWS for
    narrow weights; also column-split) and BLAS blocks whose narrow weights are widened
    in tiles (F > BLAS_TILE: two tiles)."""
    rng = np.random.default_rng(0)
    counts = [0, 1, SMALL - 1, SMALL, 2, 75, NARROW - 1, NARROW]
    F = cpu_experts.BLAS_TILE + 20
    xs, off, kw = problem(rng, counts, 36, F, xdt, wdt, glu=glu, bias=bias)
    act = "silu" if glu else "gelu"
    y = ffn(xs, off, kw, activation=act)
    assert y.dtype == xdt and y.shape == xs.shape
    assert_close(y, reference(xs, off, kw, activation=act))


@pytest.mark.parametrize("force", ["0", "1"])
def test_bf16_prefill_on_both_gemm_paths(monkeypatch, force):
    """bf16 rows and weights at prefill sizes: the bf16 matrix kernel where the CPU
    has it (NUMOE_FORCE_FALLBACK=0) and the widened-tile sgemm (=1)."""
    from numoe._cpu import bf16gemm

    monkeypatch.setenv("NUMOE_FORCE_FALLBACK", force)
    if force == "1":
        assert bf16gemm.isa_path() == bf16gemm.FALLBACK
    rng = np.random.default_rng(9)
    xs, off, kw = problem(rng, [40, 2, 100, NARROW], 64, 96, BF16, BF16, bias=True)
    y = ffn(xs, off, kw)
    assert_close(y, reference(xs, off, kw))
    cfg = MoEConfig.mixtral(num_experts=4, top_k=2, hidden_dim=64, expert_dim=96)
    layer = MoELayer.random(cfg, seed=9, dtype=BF16)
    x = rng.standard_normal((150, 64)).astype(BF16)
    assert_close(layer(x), ref.moe_forward(x.astype(np.float64), top_k=2, **layer.weights()))


@pytest.mark.parametrize("wdt", [BF16, F16])
def test_expert_ffn_column_split_decode(wdt):
    """One row, one expert: the streaming expert is cut into column chunks."""
    rng = np.random.default_rng(1)
    xs, off, kw = problem(rng, [0, 1], 40, 600, F32, wdt, bias=True)
    tasks = cpu_experts.plan_tasks(off, 40, 600, 40, True)
    assert {t[0] for t in tasks} == {cpu_experts.SPLIT_GLU, cpu_experts.SPLIT_DOWN}
    assert_close(ffn(xs, off, kw), reference(xs, off, kw))


@given(st.data(), seeds, st.sampled_from(PAIRS),
       st.sampled_from(["silu", "gelu_tanh", "relu", "swiglu_oai"]), st.booleans())
def test_hypothesis_mixed_storage(data, seed, pair, activation, bias):
    xdt, wdt = pair
    E = data.draw(st.integers(1, 5))
    counts = data.draw(st.lists(st.one_of(st.integers(0, 3), st.integers(0, 30)),
                                min_size=E, max_size=E))
    H = data.draw(st.integers(1, 24))
    F = data.draw(st.integers(1, 24))
    rng = np.random.default_rng(seed)
    xs, off, kw = problem(rng, counts, H, F, xdt, wdt, bias=bias)
    opts = dict(activation=activation)
    if activation == "swiglu_oai":
        opts["limit"] = data.draw(st.sampled_from([None, 1.0, 7.0]))
    y = ffn(xs, off, kw, **opts)
    assert y.dtype == xdt
    assert_close(y, reference(xs, off, kw, **opts))


def test_any_byte_order():
    rng = np.random.default_rng(2)
    xs, off, kw = problem(rng, [3, 20], 16, 12, F32, F16)
    base = ffn(xs, off, kw)
    big = {k: None if v is None else v.astype(v.dtype.newbyteorder(">")) for k, v in kw.items()}
    y = ffn(xs.astype(">f4"), off, big)
    assert y.dtype == F32 and np.array_equal(y, base)


def test_wider_weights_than_xs_is_type_error():
    rng = np.random.default_rng(3)
    xs, off, kw = problem(rng, [2, 3], 4, 3, BF16, F64)
    with pytest.raises(TypeError, match="w_gate"):
        ffn(xs, off, kw)
    xs, off, kw = problem(rng, [2, 3], 4, 3, F32, F64)
    with pytest.raises(TypeError, match="wider"):
        ffn(xs, off, kw)


def test_weights_are_read_not_copied():
    """Narrow weights and inputs are not modified; repeated calls agree."""
    rng = np.random.default_rng(4)
    xs, off, kw = problem(rng, [1, 30, 4], 20, 16, BF16, BF16, bias=True)
    before = {k: v.copy() for k, v in kw.items() if v is not None}
    y = ffn(xs, off, kw)
    for k, v in before.items():
        assert np.array_equal(kw[k].view(np.uint16), v.view(np.uint16))
    assert np.array_equal(ffn(xs, off, kw).view(np.uint16), y.view(np.uint16))


@pytest.mark.parametrize("counts", [[0, 1, 5, 2, 300, 0, 40, 9], [3] * 16, [1, 0]])
def test_bf16_bit_identical_across_thread_counts(counts):
    rng = np.random.default_rng(5)
    xs, off, kw = problem(rng, counts, 64, 300, BF16, BF16, bias=True)
    outs = []
    for n in (1, 2):
        with threads(n):
            outs.append(ffn(xs, off, kw).view(np.uint16))
    assert np.array_equal(outs[0], outs[1])


# --------------------------------------------------------------------- layer
PRESETS = {
    "mixtral": dict(num_experts=8, top_k=2, hidden_dim=32, expert_dim=48),
    "qwen2_moe": dict(num_experts=8, top_k=4, hidden_dim=32, expert_dim=16,
                      shared_expert_dim=40),
    "deepseek_v3": dict(num_experts=16, top_k=4, hidden_dim=32, expert_dim=16, n_groups=4,
                        topk_groups=2),
    "gpt_oss": dict(num_experts=8, top_k=2, hidden_dim=32, expert_dim=32),
    "switch": dict(num_experts=8, hidden_dim=32, expert_dim=64),
}
LAYER_DTYPES = [(F32, BF16), (BF16, BF16), (F16, F16), (F32, F16), (BF16, F32), (F64, BF16)]


def expected(layer, x):
    return ref.moe_forward(np.asarray(x, np.float64), top_k=layer.config.top_k,
                           **layer.weights())


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("dt,wdt", LAYER_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("T", [3, 200])
def test_layer_matches_reference(name, dt, wdt, T):
    """Decode-sized (streaming) and prefill-sized batches (BLAS for float weights;
    widened narrow weights stream below NARROW_SMALL_ROWS rows per expert)."""
    cfg = getattr(MoEConfig, name)(**PRESETS[name])
    layer = MoELayer.random(cfg, seed=1, dtype=dt, weight_dtype=wdt)
    assert layer.dtype == dt and layer.weight_dtype == wdt
    x = np.random.default_rng(2).standard_normal((T, cfg.hidden_dim)).astype(dt)
    y, info = layer.forward(x, return_info=True)
    assert y.dtype == dt and y.shape == x.shape
    assert info["logits"].dtype == np.dtype(dt if dt == F64 else F32)
    assert_close(y, expected(layer, x))


def test_storage_rules_and_nbytes():
    """A bf16 layer holds half the bytes of a float32 one; which arrays follow
    weight_dtype (all but selection_bias) -- see MoELayer's Notes."""
    cfg = MoEConfig.qwen2_moe(num_experts=8, top_k=2, hidden_dim=32, expert_dim=16,
                              shared_expert_dim=24)
    f32 = MoELayer.random(cfg, seed=3)
    bf = MoELayer.random(cfg, seed=3, weight_dtype="bfloat16")
    assert bf.nbytes * 2 == f32.nbytes
    for name in ("router", "w_gate", "w_up", "w_down", "shared_gate_proj", "shared_up_proj",
                 "shared_down_proj", "shared_gate_weight"):
        a, b = getattr(f32, name), getattr(bf, name)
        assert b.dtype == BF16, name
        assert np.array_equal(a.astype(BF16).view(np.uint16), b.view(np.uint16)), name
    assert bf.dtype == F32 and bf.weight_dtype == BF16
    # the same as converting the float32 layer; astype back and forth
    cast = f32.astype(weight_dtype=BF16)
    assert cast.nbytes == bf.nbytes
    x = np.random.default_rng(4).standard_normal((5, 32)).astype(np.float32)
    assert np.array_equal(cast(x), bf(x))
    both = f32.astype(dtype="bfloat16", weight_dtype="bfloat16")
    assert both.dtype == BF16 and both(x.astype(BF16)).dtype == BF16
    # selection bias follows the activations' compute dtype
    ds = MoELayer.random(MoEConfig.deepseek_v3(num_experts=8, top_k=2, hidden_dim=16,
                                               expert_dim=8, n_groups=2, topk_groups=1),
                         dtype=BF16)
    assert ds.selection_bias.dtype == F32 and ds.router.dtype == BF16


def test_layer_from_bf16_arrays_and_byte_order():
    """The constructor takes bf16 weights (HF checkpoints): the layer is bf16;
    ``dtype=`` picks other activations; x of any byte order."""
    cfg = MoEConfig.mixtral(num_experts=4, top_k=2, hidden_dim=16, expert_dim=8)
    src = MoELayer.random(cfg, seed=5, weight_dtype=BF16)
    kw = dict(router=src.router, w_gate=src.w_gate, w_up=src.w_up, w_down=src.w_down)
    layer = MoELayer(cfg, **kw)
    assert layer.dtype == BF16 and layer.weight_dtype == BF16
    mixed = MoELayer(cfg, dtype=np.float32, **kw)
    assert mixed.dtype == F32 and mixed.weight_dtype == BF16
    x = np.random.default_rng(6).standard_normal((7, 16)).astype(np.float32)
    assert np.array_equal(mixed(x), mixed(x.astype(">f4")))
    assert np.array_equal(mixed(x), src(x))
    with pytest.raises(TypeError, match="x"):
        mixed(x.astype(BF16))
    with pytest.raises(TypeError, match="weight_dtype"):
        src.astype(weight_dtype=np.int32)
    with pytest.raises(TypeError, match="dtype"):
        MoELayer.random(cfg, dtype=np.int16)


def test_layer_bf16_bit_identical_across_thread_counts():
    cfg = MoEConfig.qwen2_moe(num_experts=8, top_k=2, hidden_dim=64, expert_dim=48,
                              shared_expert_dim=32)
    layer = MoELayer.random(cfg, seed=7, dtype=BF16)
    for T in (1, 4, 120):
        x = np.random.default_rng(T).standard_normal((T, 64)).astype(BF16)
        outs = []
        for n in (1, 2):
            with threads(n):
                outs.append(layer(x).view(np.uint16))
        assert np.array_equal(outs[0], outs[1]), T


# ------------------------------------------------------- the widening helper
def test_narrow_helper_round_trips_like_ml_dtypes():
    """numoe._cpu._narrow: widening is exact; narrowing rounds to nearest even,
    as ml_dtypes/NumPy do (NaN stays NaN, overflow to inf, subnormals kept)."""
    from numoe._cpu import _narrow

    rng = np.random.default_rng(10)
    x = (rng.standard_normal(20000) * np.exp(rng.uniform(-40, 40, 20000))).astype(np.float32)
    x = np.concatenate([x, np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -3e-42,
                                     3.4e38, 65504.0, 65520.0, 6e-8, 1.0 + 2.0 ** -8,
                                     1.0 + 3 * 2.0 ** -8], np.float32)])
    for dt in (BF16, F16):
        with np.errstate(over="ignore"):
            want = x.astype(dt)
        got = _narrow.from_float32(x, dt)
        nan = np.isnan(want.astype(np.float32))
        assert np.array_equal(np.isnan(got.astype(np.float32)), nan)
        assert np.array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
        back = _narrow.to_float32(want)
        assert np.array_equal(back[~nan], want.astype(np.float32)[~nan])
