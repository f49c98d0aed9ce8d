"""Tests for numoe._cpu.bf16gemm: the bf16 prefill product on every ISA path.

The AMX and AVX512-BF16 paths are skipped on CPUs without them; the
fallback is forced with ``force="fallback"`` and runs everywhere (CI on a
CPU without the bf16 instructions runs the fallback only; to rehearse that
here: ``NUMBA_CPU_NAME=znver3 python -m pytest tests/test_bf16gemm.py``).

Oracle: float64 NumPy on the *bf16-rounded* activations and the bf16 weight
(every path multiplies exactly those values; bf16 products are exact in
float32). Tolerance: each path adds K products in float32, at most one
rounding per addition (``vdpbf16ps`` / ``tdpbf16ps`` add a pair per step), so
the recursive-summation bound gives
``|out - ref| <= (K + 2) * 2**-24 * (|a| @ |w|)`` elementwise; test data have
no bf16 subnormals (which the bf16 instructions flush).
"""
from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from numoe._cpu import bf16gemm as G

BF16 = np.dtype(ml_dtypes.bfloat16)
HAS = G.has_avx512_bf16()
HAS_AMX = G.has_amx_bf16()
FAST = [pytest.param(G.AMX, marks=pytest.mark.skipif(not HAS_AMX, reason="no usable AMX-BF16")),
        pytest.param(G.AVX512, marks=pytest.mark.skipif(not HAS, reason="no AVX512-BF16"))]
PATHS = FAST + ["fallback"]


def _data(M, K, N, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    a = (scale * rng.standard_normal((M, K))).astype(np.float32)
    w = rng.standard_normal((K, N)).astype(np.float32).astype(BF16)
    return a, w


def _check(out, a, w):
    a64 = a.astype(BF16).astype(np.float64)
    w64 = w.astype(np.float64)
    ref = a64 @ w64
    bound = (a.shape[1] + 2) * 2.0**-24 * (np.abs(a64) @ np.abs(w64))
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_array_less(np.abs(out - ref), bound + 1e-30)


def test_detection_and_path(monkeypatch):
    monkeypatch.delenv("NUMOE_FORCE_FALLBACK", raising=False)
    assert isinstance(HAS, bool) and isinstance(HAS_AMX, bool)
    assert HAS or not HAS_AMX
    best = G.AMX if HAS_AMX else G.AVX512 if HAS else G.FALLBACK
    assert G.isa_path() == G.isa_path("auto") == G.isa_path(G.AMX) == best
    assert G.isa_path(G.AVX512) == (G.AVX512 if HAS else G.FALLBACK)
    assert G.isa_path("fallback") == G.isa_path(G.FALLBACK) == G.FALLBACK
    monkeypatch.setenv("NUMOE_FORCE_FALLBACK", "1")
    assert G.isa_path() == G.FALLBACK
    assert G.pack_bf16(_data(1, 4, 3)[1]).layout == "kn"
    assert G.isa_path("auto") == best                # an explicit argument wins
    monkeypatch.setenv("NUMOE_FORCE_FALLBACK", "0")
    assert G.isa_path() == best


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("M,K,N", [
    (1, 1, 1), (1, 33, 3), (1, 2048, 70), (6, 256, 64), (7, 33, 70),
    (13, 300, 130), (40, 517, 200), (64, 512, 257),
])
def test_matches_oracle(path, M, K, N):
    a, w = _data(M, K, N, seed=M * 7 + K + N)
    a0, w0 = a.copy(), w.copy()
    out = G.bf16_matmul(a, w, force=path)
    _check(out, a, w)
    np.testing.assert_array_equal(a, a0)           # inputs untouched
    np.testing.assert_array_equal(w.view(np.uint16), w0.view(np.uint16))


@pytest.mark.parametrize("path", PATHS)
def test_packed_bf16_input_and_out_argument(path):
    """Packing once, bf16 activations and ``out=`` give the same bits as the plain call."""
    a, w = _data(9, 301, 131, seed=3)
    ref = G.bf16_matmul(a, w, force=path)
    p = G.pack_bf16(w, force=path)
    np.testing.assert_array_equal(G.bf16_matmul(a, p, force=path), ref)
    np.testing.assert_array_equal(G.bf16_matmul(a.astype(BF16), p, force=path), ref)
    np.testing.assert_array_equal(G.bf16_matmul(a.astype(BF16).view(np.uint16), p, force=path),
                                  ref)
    np.testing.assert_array_equal(G.bf16_matmul(a.astype(">f4"), w.view(np.uint16), force=path),
                                  ref)
    out = np.full((9, 131), np.nan, np.float32)
    assert G.bf16_matmul(a, p, out, force=path) is out
    np.testing.assert_array_equal(out, ref)


@pytest.mark.skipif(not HAS, reason="needs AVX512-BF16 to build the panel layout")
def test_fallback_reads_panel_layout():
    a, w = _data(5, 99, 150, seed=4)
    p = G.pack_bf16(w, force="auto")
    assert p.layout == "panels"
    assert p.data.nbytes == 2 * 64 * 3 * G.NR * 2    # bf16 bytes plus padding, no float32 copy
    np.testing.assert_array_equal(G.bf16_matmul(a, p, force="fallback"),
                                  G.bf16_matmul(a, w, force="fallback"))


@pytest.mark.parametrize("path", FAST)
def test_rows_independent_of_batch(path):
    """A row's bits do not depend on the rows around it (M blocking, tails, K blocks)."""
    a, w = _data(70, 600, 140, seed=5)
    p = G.pack_bf16(w, force=path)
    full = G.bf16_matmul(a, p, force=path)
    for i in range(70):
        np.testing.assert_array_equal(G.bf16_matmul(a[i:i + 1], p, force=path), full[i:i + 1])
    for lo, hi in [(0, 6), (5, 11), (3, 20), (17, 23), (0, 32), (1, 49), (30, 70)]:
        np.testing.assert_array_equal(G.bf16_matmul(a[lo:hi], p, force=path), full[lo:hi])
        # an unpacked weight (AVX512-BF16: packed block by block inside the call): same bits
        np.testing.assert_array_equal(G.bf16_matmul(a[lo:hi], w, force=path), full[lo:hi])


@pytest.mark.parametrize("path", PATHS)
def test_threads_give_same_bits(path):
    a, w = _data(32, 400, 200, seed=6)
    p = G.pack_bf16(w, force=path)
    ref = G.bf16_matmul(a, p, force=path)
    outs = [None] * 4

    def work(t):
        outs[t] = G.bf16_matmul(a, p, force=path)

    ts = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for o in outs:
        np.testing.assert_array_equal(o, ref)


@pytest.mark.parametrize("path", PATHS)
def test_empty(path):
    a, w = _data(0, 17, 5)
    out = G.bf16_matmul(a, w, force=path)
    assert out.shape == (0, 5) and out.dtype == np.float32
    out = G.bf16_matmul(np.ones((3, 0), np.float32), np.ones((0, 4), BF16), force=path)
    np.testing.assert_array_equal(out, np.zeros((3, 4), np.float32))
    assert G.bf16_matmul(np.ones((3, 4), np.float32), np.ones((4, 0), BF16),
                         force=path).shape == (3, 0)


@pytest.mark.parametrize("path", FAST)
def test_paths_agree(path):
    a, w = _data(20, 700, 90, seed=7)
    x = G.bf16_matmul(a, w, force=path)
    y = G.bf16_matmul(a, w, force="fallback")
    np.testing.assert_allclose(x, y, rtol=0, atol=float(700 * 2.0**-23 * np.abs(y).max()))


def test_bad_arguments():
    a, w = _data(2, 8, 3)
    with pytest.raises(TypeError, match="w"):
        G.bf16_matmul(a, w.astype(np.float32))
    with pytest.raises(TypeError, match="a"):
        G.bf16_matmul(a.astype(np.int32), w)
    with pytest.raises(ValueError, match="a"):
        G.bf16_matmul(a[:, :5], w)
    with pytest.raises(ValueError, match="w"):
        G.pack_bf16(w[0])
    with pytest.raises(ValueError, match="out"):
        G.bf16_matmul(a, w, np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="force"):
        G.isa_path("avx2")


@given(M=st.integers(0, 20), K=st.integers(1, 300), N=st.integers(1, 140),
       seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       path=st.sampled_from([G.AMX] * HAS_AMX + [G.AVX512] * HAS + ["fallback"]))
def test_oracle_property(M, K, N, seed, scale, path):
    a, w = _data(M, K, N, seed=seed, scale=scale)
    _check(G.bf16_matmul(a, w, force=path), a, w)
