"""Tests for numoe.expert_ffn (grouped expert FFNs)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import numoe
from numoe import reference as ref
from numoe._cpu import experts as cpu_experts
from numoe._jit import threads

from conftest import ATOL, RTOL, SIM, to_backend, to_host
from strategies import dtypes, seeds

ACTS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")


# ------------------------------------------------------------------ helpers
def problem(rng, counts, H, F, dtype, *, glu=True, bias=False, scale=1.0):
    """``(xs, offsets, kwargs)`` for expert_ffn with O(1) outputs."""
    E = len(counts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    N = int(offsets[-1])
    nrm = lambda shape, s: (rng.standard_normal(shape) * s).astype(dtype)  # noqa: E731
    kw = dict(w_gate=nrm((E, H, F), scale / np.sqrt(H)),
              w_up=nrm((E, H, F), scale / np.sqrt(H)) if glu else None,
              w_down=nrm((E, F, H), 1 / np.sqrt(F)))
    if bias:
        kw.update(b_gate=nrm((E, F), 0.5), b_down=nrm((E, H), 0.5))
        if glu:
            kw["b_up"] = nrm((E, F), 0.5)
    return nrm((N, H), 1.0), offsets, kw


def call(backend, xs, offsets, kw, **opts):
    args = {k: to_backend(backend, v) for k, v in kw.items()}
    return to_host(numoe.expert_ffn(to_backend(backend, xs), to_backend(backend, offsets),
                                    args.pop("w_gate"), args.pop("w_up"), args.pop("w_down"),
                                    **args, **opts))


def expected(xs, offsets, kw, **opts):
    return ref.expert_ffn(xs, offsets, kw["w_gate"], kw["w_up"], kw["w_down"],
                          **{k: v for k, v in kw.items() if k.startswith("b_")}, **opts)


def assert_close(y, r, dtype):
    np.testing.assert_allclose(y, r, rtol=RTOL[dtype], atol=ATOL[dtype] * 10)


def tiny(backend):
    return backend == "cuda" and SIM


# --------------------------------------------------------------- examples
# counts hit: empty experts, the streaming kernel (< SMALL_ROWS rows), BLAS
# blocks, and (at 700 rows) a block split in two
COUNTS = [0, 1, 3, cpu_experts.SMALL_ROWS - 1, cpu_experts.SMALL_ROWS, 21, 0, 700]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation,glu", [(a, g) for a in ACTS for g in (True, False)
                                            if g or a != "swiglu_oai"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(backend, dtype, activation, glu, bias):
    rng = np.random.default_rng(0)
    counts = [0, 1, 3, 9, 0] if tiny(backend) else COUNTS
    H, F = (16, 12) if tiny(backend) else (40, 36)
    xs, off, kw = problem(rng, counts, H, F, dtype, glu=glu, bias=bias, scale=3.0)
    opts = dict(activation=activation)
    if activation == "swiglu_oai":
        opts["limit"] = 2.0                  # scale=3 makes the clamp bite
    y = call(backend, xs, off, kw, **opts)
    assert y.dtype == dtype and y.shape == xs.shape
    assert_close(y, expected(xs, off, kw, **opts), dtype)


def test_swiglu_oai_clamps_and_alpha(backend):
    rng = np.random.default_rng(1)
    xs, off, kw = problem(rng, [5, 12], 8, 6, np.float64, bias=True, scale=20.0)
    for limit, alpha in ((7.0, 1.702), (0.5, 3.0), (None, 1.0)):
        opts = dict(activation="swiglu_oai", limit=limit, alpha=alpha)
        y = call(backend, xs, off, kw, **opts)
        assert_close(y, expected(xs, off, kw, **opts), np.float64)


def test_one_expert_all_rows(backend):
    rng = np.random.default_rng(2)
    xs, off, kw = problem(rng, [30], 16, 20, np.float32)
    assert_close(call(backend, xs, off, kw), expected(xs, off, kw), np.float32)


def test_zero_rows(backend):
    rng = np.random.default_rng(3)
    xs, off, kw = problem(rng, [0, 0, 0], 8, 4, np.float64)
    y = call(backend, xs, off, kw)
    assert y.shape == (0, 8) and y.dtype == np.float64


def test_plain_ffn_relu_is_switch_ffn():
    """w_up=None: relu(x @ w_in) @ w_out, per expert block."""
    rng = np.random.default_rng(4)
    xs, off, kw = problem(rng, [3, 0, 10], 6, 5, np.float64, glu=False)
    y = numoe.expert_ffn(xs, off, kw["w_gate"], None, kw["w_down"], activation="relu")
    for e in range(3):
        blk = slice(off[e], off[e + 1])
        np.testing.assert_allclose(
            y[blk], np.maximum(xs[blk] @ kw["w_gate"][e], 0) @ kw["w_down"][e], rtol=1e-12,
            atol=1e-12)


def test_inputs_not_modified_and_strided_weights():
    rng = np.random.default_rng(5)
    xs, off, kw = problem(rng, [4, 11], 10, 7, np.float32, bias=True)
    kw["w_gate"] = np.asfortranarray(kw["w_gate"])           # any layout is accepted
    before = {k: v.copy() for k, v in kw.items() if v is not None}
    xs0, off0 = xs.copy(), off.copy()
    y = call("cpu", xs, off, kw)
    assert_close(y, expected(xs, off, kw), np.float32)
    assert np.array_equal(xs, xs0) and np.array_equal(off, off0)
    for k, v in before.items():
        assert np.array_equal(kw[k], v)


def test_offsets_any_integer_dtype_and_list():
    rng = np.random.default_rng(6)
    xs, off, kw = problem(rng, [2, 5], 4, 3, np.float64)
    base = call("cpu", xs, off, kw)
    for o in (off.astype(np.int32), off.astype(np.uint16), off.tolist()):
        assert np.array_equal(call("cpu", xs, o, kw), base)


@pytest.mark.parametrize("counts", [[0, 1, 5, 2, 700, 0, 40, 9], [3] * 16, [2000]])
def test_bit_identical_across_thread_counts(counts):
    rng = np.random.default_rng(7)
    xs, off, kw = problem(rng, counts, 64, 96, np.float32, bias=True)
    outs = []
    for n in (1, 2):
        with threads(n):
            outs.append(call("cpu", xs, off, kw))
    assert np.array_equal(outs[0], outs[1])
    assert np.array_equal(call("cpu", xs, off, kw), outs[0])      # and run to run


@pytest.mark.parametrize("glu,bias", [(True, True), (False, True), (True, False)])
def test_column_split_experts(glu, bias):
    """Few experts with few rows: each is cut into column chunks (all threads read)."""
    rng = np.random.default_rng(10)
    xs, off, kw = problem(rng, [0, 2, 0, 1], 70, 600, np.float64, glu=glu, bias=bias)
    tasks = cpu_experts.plan_tasks(off, 70, 600, 70, glu)
    assert {t[0] for t in tasks} == {cpu_experts.SPLIT_GLU, cpu_experts.SPLIT_DOWN}
    assert_close(call("cpu", xs, off, kw), expected(xs, off, kw), np.float64)


def test_independent_of_the_callers_blas_threads():
    """The products run single-threaded whatever BLAS threading the caller set
    (multi-threaded OpenBLAS changes the bits), NumPy's and SciPy's BLAS alike."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(11)
    xs, off, kw = problem(rng, [300, 2, 150, 40], 256, 384, np.float32)
    outs = []
    for n in (1, 2, 4):
        with threadpool_limits(n, user_api="blas"), threads(2):
            outs.append(call("cpu", xs, off, kw))
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_streaming_kernel_rows_are_independent():
    """A few-row block gives each row the result it gets alone (fixed-order sums)."""
    rng = np.random.default_rng(8)
    xs, off, kw = problem(rng, [cpu_experts.SMALL_ROWS - 1], 300, 520, np.float32)
    y = call("cpu", xs, off, kw)
    for i in range(xs.shape[0]):
        yi = call("cpu", xs[i:i + 1], [0, 1], kw)
        assert np.array_equal(yi[0], y[i])


# ----------------------------------------------------------------- property
@given(st.data(), dtypes, seeds, st.sampled_from(ACTS), st.booleans(), st.booleans())
def test_hypothesis_matches_reference(data, dtype, seed, activation, glu, bias):
    if activation == "swiglu_oai":
        glu = True
    E = data.draw(st.integers(1, 6))
    counts = data.draw(st.lists(st.one_of(st.integers(0, 3), st.integers(0, 40)),
                                min_size=E, max_size=E))
    H = data.draw(st.integers(1, 24))
    F = data.draw(st.integers(1, 24))
    rng = np.random.default_rng(seed)
    xs, off, kw = problem(rng, counts, H, F, dtype, glu=glu, bias=bias, scale=2.0)
    opts = dict(activation=activation)
    if activation == "swiglu_oai":
        opts.update(limit=data.draw(st.sampled_from([None, 0.0, 1.0, 7.0])),
                    alpha=data.draw(st.floats(-3, 3)))
    y = call("cpu", xs, off, kw, **opts)
    assert_close(y, expected(xs, off, kw, **opts), dtype)


# --------------------------------------------------------------- validation
def _base():
    rng = np.random.default_rng(9)
    xs, off, kw = problem(rng, [2, 3], 4, 3, np.float32, bias=True)
    return xs, off, kw


def _err(exc, match, **change):
    xs, off, kw = _base()
    args = dict(xs=xs, offsets=off, **kw)
    args.update(change)
    with pytest.raises(exc, match=match):
        numoe.expert_ffn(args.pop("xs"), args.pop("offsets"), args.pop("w_gate"),
                         args.pop("w_up"), args.pop("w_down"), **args)


def test_validation_shapes():
    xs, off, kw = _base()
    _err(ValueError, "xs", xs=xs[0])
    _err(ValueError, "w_gate", w_gate=kw["w_gate"][..., :2, :])
    _err(ValueError, "w_gate", w_gate=np.zeros((0, 4, 3), np.float32))
    _err(ValueError, "w_up", w_up=kw["w_up"][:1])
    _err(ValueError, "w_down", w_down=kw["w_down"][:, :2])
    _err(ValueError, "b_gate", b_gate=kw["b_gate"][:, :1])
    _err(ValueError, "b_up", b_up=kw["b_up"][:1])
    _err(ValueError, "b_down", b_down=kw["b_down"].T)
    _err(ValueError, "b_up", w_up=None, activation="relu")


def test_validation_offsets():
    _err(ValueError, "offsets", offsets=np.array([0, 5]))
    _err(ValueError, "offsets", offsets=np.array([1, 2, 5]))
    _err(ValueError, "offsets", offsets=np.array([0, 2, 4]))
    _err(ValueError, "offsets", offsets=np.array([0, 6, 5]))
    _err(TypeError, "offsets", offsets=np.array([0.0, 2.0, 5.0]))
    _err(TypeError, "offsets", offsets=None)


def test_validation_dtypes():
    xs, off, kw = _base()
    _err(TypeError, "w_down", w_down=kw["w_down"].astype(np.float64))
    _err(TypeError, "b_gate", b_gate=kw["b_gate"].astype(np.float64))
    _err(TypeError, "xs", xs=xs.astype(np.int64))
    _err(TypeError, "w_gate", w_gate=kw["w_gate"].astype(np.float64))
    _err(TypeError, "w_gate", w_gate=kw["w_gate"].astype(np.int32))


def test_validation_options():
    _err(ValueError, "activation", activation="swish")
    _err(ValueError, "activation", activation=None)
    _err(ValueError, "w_up", w_up=None, b_up=None, activation="swiglu_oai")
    _err(ValueError, "limit", limit=1.0, activation="silu")
    _err(ValueError, "limit", limit=-1.0, activation="swiglu_oai")
    _err(ValueError, "limit", limit=float("inf"), activation="swiglu_oai")
    _err(ValueError, "alpha", alpha=float("nan"), activation="swiglu_oai")
    _err(TypeError, "alpha", alpha="1.7", activation="swiglu_oai")


def test_mixing_host_and_device_is_type_error():
    class Dev:
        __cuda_array_interface__ = {}

    xs, off, kw = _base()
    with pytest.raises(TypeError, match="mix"):
        numoe.expert_ffn(Dev(), off, kw["w_gate"], kw["w_up"], kw["w_down"])
