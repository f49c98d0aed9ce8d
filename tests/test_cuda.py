"""Device-only tests of the CUDA backend (``numoe._cuda``).

Run on a GPU, or on the CPU with ``NUMBA_ENABLE_CUDASIM=1`` (numba's CUDA
simulator; sizes are kept tiny: T <= 64, E <= 16, H <= 32). The oracle is
the CPU backend (integers exact) and ``numoe.reference`` (floats).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import numoe
from numoe import reference as ref

from conftest import ATOL, CUDA, RTOL, SIM

needs_cuda = pytest.mark.skipif(
    not CUDA, reason="no CUDA device (set NUMBA_ENABLE_CUDASIM=1 for the simulator)")
DTYPES = (np.float32, np.float64)


def dev(a):
    from numoe._cuda import _arrays as A     # bfloat16 too (numba's own copy refuses it)
    return A.to_device(a)


def host(a):
    if hasattr(a, "copy_to_host"):
        from numoe._cuda import _arrays as A
        return A.to_host(a)
    return np.asarray(a)


def is_numba_device(a):
    from numoe._cuda import _arrays as A
    return A.is_device_array(a)


def close(got, want, dtype):
    np.testing.assert_allclose(host(got), want, rtol=RTOL[dtype] * 10, atol=ATOL[dtype] * 10)


# ------------------------------------------------------------ no GPU needed
def test_import_does_not_load_cuda_modules():
    code = ("import sys, numoe; "
            "bad = [m for m in sys.modules if m.startswith('numoe._cuda.')]; "
            "assert not bad, bad; print('ok')")
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


# ----------------------------------------------------------------- backends
@needs_cuda
def test_backends_lists_cuda():
    names = numoe.backends()
    assert names[0] == "cpu"
    assert any(n.startswith("cuda: ") for n in names), names


@needs_cuda
def test_mixed_host_and_device_is_type_error():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((6, 4))
    with pytest.raises(TypeError, match="mix"):
        numoe.route(z, 2, bias=dev(np.zeros(4)))
    ex = np.array([[0, 1], [1, 2]], np.int32)
    with pytest.raises(TypeError, match="mix"):
        numoe.dispatch_plan(dev(ex), 3, weights=np.ones((2, 2)))
    plan = numoe.dispatch_plan(ex, 3)
    with pytest.raises(TypeError, match="mix"):
        numoe.permute(dev(np.ones((2, 4))), plan)
    with pytest.raises(TypeError, match="mix"):
        numoe.expert_ffn(dev(np.ones((4, 3))), plan.offsets, np.ones((3, 3, 2)),
                         np.ones((3, 3, 2)), np.ones((3, 2, 3)))
    from numoe._cuda import routing as R
    with pytest.raises(TypeError, match="device array"):
        R.route(z, 2)


@needs_cuda
def test_outputs_are_numba_device_arrays():
    rng = np.random.default_rng(1)
    z = dev(rng.standard_normal((10, 4)).astype(np.float32))
    r = numoe.route(z, 2)
    p = numoe.dispatch_plan(r.experts, 4)
    x = dev(rng.standard_normal((10, 8)).astype(np.float32))
    xs = numoe.permute(x, p)
    y = numoe.unpermute(xs, p, r.weights)
    for a in (r.weights, r.experts, p.order, p.offsets, p.counts, p.dropped, xs, y):
        assert is_numba_device(a)
    assert host(r.weights).dtype == np.float32 and host(r.experts).dtype == np.int32
    assert host(p.offsets).dtype == np.int64 and host(p.dropped).dtype == np.bool_
    np.testing.assert_allclose(host(y), numoe.unpermute(
        numoe.permute(host(x), numoe.dispatch_plan(host(r.experts), 4)),
        numoe.dispatch_plan(host(r.experts), 4), host(r.weights)), rtol=1e-6)


# ------------------------------------------------------------------ routing
ROUTE_CASES = [
    (24, 8, 2, {}),
    (24, 8, 3, dict(score="sigmoid", scale=2.5)),
    (16, 6, 6, dict(renormalize=False)),                     # k == E
    (5, 1, 1, {}),                                           # one expert
    (0, 4, 2, {}),                                           # no tokens
    (12, 16, 4, dict(score="sigmoid", bias=True, n_groups=4, topk_groups=2)),
    (12, 16, 4, dict(n_groups=8, topk_groups=3, group_score="max")),
    (12, 8, 2, dict(bias=True, renormalize=False)),
    (37, 64, 8, dict(renormalize=False)),                    # OLMoE-sized rows
    (19, 64, 8, dict(score="sigmoid")),
]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k,kw", ROUTE_CASES)
def test_route_matches_cpu(dtype, T, E, k, kw):
    rng = np.random.default_rng(T + E + k)
    z = rng.standard_normal((T, E)).astype(dtype)
    if T > 3:
        z[0] = 1.0                       # all equal: ties go to the lower ids
        z[1] = np.round(z[1])
        z[2, : E // 2] = -np.inf         # masked experts
        z[3, 1:] = -np.inf               # fewer finite entries than k (when k > 1)
        z[4] = np.round(z[4] * 0.5)      # many ties among the top entries
    ckw = dict(kw)
    dkw = dict(kw)
    if kw.get("bias"):
        b = rng.standard_normal(E) * 0.1
        ckw["bias"], dkw["bias"] = b, dev(b)
    want = numoe.route(z, k, **ckw)
    got = numoe.route(dev(z), k, **dkw)
    np.testing.assert_array_equal(host(got.experts), want.experts)
    close(got.weights, ref.route(z, k, **ckw).weights, dtype)
    assert host(got.weights).dtype == dtype


@needs_cuda
def test_route_leading_dims_and_probs():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((2, 3, 5))
    r = numoe.route(dev(z), 2)
    assert tuple(r.weights.shape) == (2, 3, 2)
    np.testing.assert_array_equal(host(r.experts), numoe.route(z, 2).experts)
    for score in ("softmax", "sigmoid"):
        p = numoe.router_probs(dev(z), score)
        close(p, ref.router_probs(z, score), np.float64)


@needs_cuda
def test_route_rejects_bad_values():
    z = np.zeros((4, 5))
    z[2, 1] = np.nan
    with pytest.raises(ValueError, match="row 2"):
        numoe.route(dev(z), 2)
    z = np.zeros((4, 5))
    z[1] = -np.inf
    with pytest.raises(ValueError, match="softmax is undefined"):
        numoe.route(dev(z), 2)
    with pytest.raises(ValueError, match="k must be <="):
        numoe.route(dev(np.zeros((4, 5))), 6)
    with pytest.raises(TypeError, match="float32 or float64"):
        numoe.route(dev(np.zeros((4, 5), np.int32)), 2)
    with pytest.raises(ValueError, match="bias"):
        numoe.route(dev(np.zeros((4, 5))), 2, bias=dev(np.array([0, 0, np.inf, 0, 0.0])))


# ----------------------------------------------------------------- dispatch
PLAN_CASES = [(30, 2, 8, None, "slot"), (30, 3, 5, 4, "slot"), (30, 3, 5, 4, "position"),
              (30, 3, 5, 4, "score"), (0, 2, 4, None, "slot"), (20, 1, 1, 7, "slot"),
              (20, 4, 4, 3, "score")]


@needs_cuda
@pytest.mark.parametrize("T,k,E,cap,policy", PLAN_CASES)
def test_dispatch_plan_matches_cpu(T, k, E, cap, policy):
    rng = np.random.default_rng(T * 7 + k)
    ex = rng.integers(0, E, size=(T, k)).astype(np.int32)
    if T:
        ex[: T // 2, 0] = 0              # overflow expert 0
    w = (rng.integers(-2, 5, size=(T, k)) * 0.25).astype(np.float32)   # many ties
    if T > 2:
        w[1, 0], w[2, 0] = -0.0, 0.0
    want = numoe.dispatch_plan(ex, E, capacity=cap, weights=w, drop_policy=policy)
    got = numoe.dispatch_plan(dev(ex), E, capacity=cap, weights=dev(w), drop_policy=policy)
    for f in ("order", "offsets", "counts", "dropped"):
        np.testing.assert_array_equal(host(getattr(got, f)), getattr(want, f), err_msg=f)
        assert host(getattr(got, f)).dtype == getattr(want, f).dtype, f
    assert got.capacity == cap


@needs_cuda
def test_dispatch_plan_int64_ids_and_errors():
    ex = np.array([[2, 0], [1, 2]], np.int64)
    got = numoe.dispatch_plan(dev(ex), 3)
    np.testing.assert_array_equal(host(got.order), numoe.dispatch_plan(ex, 3).order)
    with pytest.raises(ValueError, match="out of range"):
        numoe.dispatch_plan(dev(np.array([[0, 5]])), 3)
    with pytest.raises(ValueError, match="negative"):
        numoe.dispatch_plan(dev(np.array([[0, -1]])), 3)
    with pytest.raises(ValueError, match="finite"):
        numoe.dispatch_plan(dev(ex), 3, weights=dev(np.array([[1.0, np.nan], [1, 1]])))
    with pytest.raises(TypeError, match="integer"):
        numoe.dispatch_plan(dev(ex.astype(np.float32)), 3)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_unpermute_match_cpu(dtype):
    rng = np.random.default_rng(5)
    T, k, E, H = 20, 3, 5, 12
    ex = rng.integers(0, E, size=(T, k)).astype(np.int32)
    w = rng.random((T, k)).astype(dtype)
    x = rng.standard_normal((T, H)).astype(dtype)
    cplan = numoe.dispatch_plan(ex, E, capacity=9)
    plan = numoe.dispatch_plan(dev(ex), E, capacity=9)
    out = dev(np.full((int(cplan.offsets[-1]), H), np.nan, dtype))
    xs = numoe.permute(dev(x.reshape(4, 5, H)), plan, out=out)
    assert xs is out or host(xs).shape == host(out).shape
    np.testing.assert_array_equal(host(out), numoe.permute(x, cplan))
    ys = rng.standard_normal(host(out).shape).astype(dtype)
    y1 = host(numoe.unpermute(dev(ys), plan, dev(w)))
    y2 = host(numoe.unpermute(dev(ys), plan, dev(w)))
    np.testing.assert_array_equal(y1, y2)                 # bit-reproducible
    close(y1, ref.unpermute(ys, cplan, w), dtype)


@needs_cuda
def test_invalid_device_plans_are_rejected():
    ex = np.array([[0, 1], [1, 2]], np.int32)
    p = numoe.dispatch_plan(dev(ex), 3)
    x = dev(np.ones((2, 4)))
    bad = p._replace(order=dev(np.array([0, 1, 2, 9], np.int32)))
    with pytest.raises(ValueError, match="plan.order"):
        numoe.permute(x, bad)
    bad = p._replace(counts=dev(np.array([1, 1, 2], np.int64)))
    with pytest.raises(ValueError, match="plan.counts"):
        numoe.permute(x, bad)
    bad = p._replace(order=dev(np.array([1, 1, 2, 3], np.int32)))
    with pytest.raises(ValueError, match="repeats ids"):
        numoe.unpermute(dev(np.ones((4, 4))), bad, dev(np.ones((2, 2))))
    with pytest.raises(ValueError, match="tokens"):
        numoe.permute(dev(np.ones((3, 4))), p)


# ------------------------------------------------------------------ experts
FFN_CASES = [(True, "silu", False, None), (True, "gelu", True, None),
             (True, "swiglu_oai", True, 1.5), (False, "relu", True, None),
             (False, "gelu_tanh", False, None)]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("glu,act,bias,limit", FFN_CASES)
def test_expert_ffn_matches_reference(dtype, glu, act, bias, limit):
    rng = np.random.default_rng(7)
    E, H, F = 3, 12, 10
    # expert 2 gets more rows than the skinny limit in a real run; the simulator
    # uses small tiles, so both kernel families run either way
    counts = np.array([5, 0, 11])
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    xs = rng.standard_normal((off[-1], H)).astype(dtype)
    wg = (rng.standard_normal((E, H, F)) * 0.3).astype(dtype)
    wu = (rng.standard_normal((E, H, F)) * 0.3).astype(dtype) if glu else None
    wd = (rng.standard_normal((E, F, H)) * 0.3).astype(dtype)
    b = lambda *s: (rng.standard_normal(s) * 0.1).astype(dtype) if bias else None  # noqa
    bg, bu, bd = b(E, F), (b(E, F) if glu else None), b(E, H)
    kw = dict(activation=act, b_gate=bg, b_up=bu, b_down=bd, limit=limit)
    d = lambda a: None if a is None else dev(a)  # noqa: E731
    want = ref.expert_ffn(xs, off, wg, wu, wd, **kw)
    got = numoe.expert_ffn(d(xs), d(off), d(wg), d(wu), d(wd), activation=act, b_gate=d(bg),
                           b_up=d(bu), b_down=d(bd), limit=limit)
    assert is_numba_device(got)
    close(got, want, dtype)
    # both kernel families on the same problem
    from numoe._cuda import experts as X
    opts = numoe.experts._check_expert_options(act, limit, 1.702, glu)
    for force in ("tiled", "skinny"):
        out = dev(np.full(want.shape, np.nan, dtype))
        X.run_ffn(d(xs), None, 0, d(off), int(off[-1]), d(wg), d(wu), d(wd), d(bg), d(bu),
                  d(bd), opts.code, opts.limit, opts.alpha, out, None, None, force=force)
        close(out, want, dtype)


def _tiles_serial(off, max_small, bm_small, bm_big):
    small, big = [], []
    for e in range(len(off) - 1):
        lo, hi = int(off[e]), int(off[e + 1])
        if hi <= lo:
            continue
        table, bm = (small, bm_small) if hi - lo <= max_small else (big, bm_big)
        table += [(e, r, min(hi, r + bm)) for r in range(lo, hi, bm)]
    return small, big


@needs_cuda
@pytest.mark.parametrize("E,force", [(1, None), (5, None), (21, None), (21, "tiled"),
                                     (300, None)])
def test_tile_tables_match_a_serial_walk(E, force):
    # the one-block table kernel: experts more than a block's threads (21 > the
    # simulator's 8; 300 > 256 on a GPU), empty experts, both kinds of tile
    from numoe._cuda import experts as X
    rng = np.random.default_rng(E)
    counts = rng.integers(0, 100, E) * (rng.random(E) < 0.8)     # max_small is 48
    counts[0] = 90
    counts[-1] = 10 if E > 1 else 90
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    work = X._Work(dev(off), int(off[-1]), force)
    ts, tb, cnt, cap_s, cap_b = work.tables(4, 16)
    small, big = _tiles_serial(off, work.max_small, 4, 16)
    assert big and (small or force == "tiled" or E == 1)
    n = host(cnt)
    assert (n[0], n[1]) == (len(small), len(big))
    assert len(small) <= cap_s and len(big) <= cap_b
    assert [tuple(r) for r in host(ts)[:n[0]]] == small
    assert [tuple(r) for r in host(tb)[:n[1]]] == big


@needs_cuda
@pytest.mark.parametrize("M,bm", [(1, 32), (64, 64), (65, 32), (300, 64)])
def test_router_tile_table_matches_the_device_table(M, bm):
    # the router's product at prefill takes a host-built, cached table
    from numoe._cuda import experts as X, gemm
    tb, cnt = gemm._row_tiles(M, bm)
    _ts, tb_d, cnt_d, _cs, cap_b = X._Work(dev(np.array([0, M])), M, "tiled").tables(4, bm)
    n = host(cnt_d)[1]
    assert host(cnt)[1] == n == -(-M // bm) and tb.shape[0] <= cap_b
    np.testing.assert_array_equal(host(tb)[:n], host(tb_d)[:n])
    assert gemm._row_tiles(M, bm)[0] is tb


@needs_cuda
def test_expert_ffn_argument_errors():
    d = dev
    xs, wg, wd = np.ones((4, 3)), np.ones((2, 3, 5)), np.ones((2, 5, 3))
    with pytest.raises(ValueError, match="offsets"):
        numoe.expert_ffn(d(xs), d(np.array([0, 3, 2])), d(wg), d(wg), d(wd))
    with pytest.raises(TypeError, match="dtype"):
        numoe.expert_ffn(d(xs), d(np.array([0, 2, 4])), d(wg.astype(np.float32)), None, d(wd))
    with pytest.raises(ValueError, match="activation"):
        numoe.expert_ffn(d(xs), d(np.array([0, 2, 4])), d(wg), d(wg), d(wd), activation="tanh")


@needs_cuda
def test_matmul_and_fused_layer():
    from numoe._cuda import gemm, moe
    rng = np.random.default_rng(9)
    a = rng.standard_normal((2, 7, 5)).astype(np.float32)
    b = rng.standard_normal((5, 3)).astype(np.float32)
    close(gemm.matmul(dev(a), dev(b)), a.astype(np.float64) @ b, np.float32)
    with pytest.raises(TypeError):
        gemm.matmul(dev(a), dev(b.astype(np.float64)))
    presets = [("mixtral", {}),
               ("qwen2_moe", dict(num_shared_experts=1, shared_expert_dim=8)),
               ("switch", dict(capacity_factor=1.0))]
    for preset, kw in presets:
        k = 1 if preset == "switch" else 2
        cfg = getattr(numoe.MoEConfig, preset)(num_experts=8, top_k=k, hidden_dim=16,
                                               expert_dim=12, **kw)
        layer = numoe.MoELayer.random(cfg, seed=1)
        x = rng.standard_normal((3, 4, 16)).astype(np.float32)
        want = ref.moe_forward(x, **layer.weights(), top_k=k)
        y = moe.forward(layer.to_device(), dev(x))
        assert tuple(y.shape) == (3, 4, 16)
        close(y, want, np.float32)


# ------------------------------------------------------------------- losses
@needs_cuda
def test_losses_match_reference():
    from numoe._cuda import losses as L
    rng = np.random.default_rng(11)
    T, E, k = 40, 6, 2
    z = rng.standard_normal((T, E))
    ex = rng.integers(0, E, size=(T, k)).astype(np.int32)
    mask = rng.random(T) < 0.7
    p = ref.router_probs(z)
    assert L.load_balancing_loss(dev(p), dev(ex), mask=dev(mask)) == pytest.approx(
        ref.load_balancing_loss(p, ex, mask=mask), rel=1e-12)
    assert L.load_balancing_loss(dev(p), dev(ex)) == pytest.approx(
        ref.load_balancing_loss(p, ex), rel=1e-12)
    z[3, 1] = -np.inf
    assert L.router_z_loss(dev(z), mask=dev(mask)) == pytest.approx(
        ref.router_z_loss(z, mask=mask), rel=1e-12)
    cnt = L.expert_counts(dev(ex), E)
    np.testing.assert_array_equal(host(cnt), ref.expert_counts(ex, E))
    b = rng.standard_normal(E).astype(np.float32)
    np.testing.assert_array_equal(host(L.update_bias(dev(b), cnt, 0.01)),
                                  ref.update_bias(b, host(cnt), 0.01))
    w = rng.random((T, k))
    plan = numoe.dispatch_plan(dev(ex), E, capacity=10)
    st = L.routing_stats(dev(ex), E, weights=dev(w), plan=plan)
    want = ref.routing_stats(ex, E, weights=w, plan=numoe.dispatch_plan(ex, E, capacity=10))
    for key in ("cv", "max_over_mean", "balancedness", "drop_rate", "dead_experts"):
        assert st[key] == pytest.approx(want[key], rel=1e-12), key
    np.testing.assert_allclose(host(st["weight_mass"]), want["weight_mass"], rtol=1e-12)
    np.testing.assert_array_equal(host(st["counts"]), want["counts"])
    with pytest.raises(ValueError, match="out of range"):
        L.expert_counts(dev(np.array([[0, 9]])), 4)
    with pytest.raises(ValueError, match="finite"):
        L.load_balancing_loss(dev(np.full((2, 3), np.nan)), dev(np.zeros((2, 1), np.int32)))


# ---------------------------------------------------- other array libraries
@needs_cuda
@pytest.mark.skipif(SIM, reason="CuPy/PyTorch arrays need a real GPU")
def test_cupy_and_torch_inputs():
    rng = np.random.default_rng(13)
    z = rng.standard_normal((64, 8)).astype(np.float32)
    want = numoe.route(z, 2)
    libs = []
    try:
        import cupy
        libs.append(("cupy", cupy.asarray(z)))
    except ImportError:
        pass
    try:
        import torch
        if torch.cuda.is_available():
            libs.append(("torch", torch.from_numpy(z).to("cuda")))
    except ImportError:
        pass
    if not libs:
        pytest.skip("neither CuPy nor PyTorch with CUDA is installed")
    for name, zz in libs:
        r = numoe.route(zz, 2)
        assert is_numba_device(r.experts), name
        np.testing.assert_array_equal(host(r.experts), want.experts, err_msg=name)
        p = numoe.dispatch_plan(r.experts, 8)
        x = rng.standard_normal((64, 16)).astype(np.float32)
        xx = cupy.asarray(x) if name == "cupy" else torch.from_numpy(x).to("cuda")
        y = numoe.unpermute(numoe.permute(xx, p), p, r.weights)
        np.testing.assert_allclose(host(y), x * host(r.weights).sum(1, keepdims=True),
                                   rtol=1e-5, err_msg=name)


# ------------------------------------------------------------ 16-bit floats
# The simulator runs the same widening helper as the GPU (only the float32
# bit casts differ), so float16 and bfloat16 are both tested here; the real
# GPU runs these tests too (tools/gpu_check.py adds full-size checks).
import ml_dtypes  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
NARROW = (np.dtype(np.float16), BF16)
# a 16-bit result is the float32 computation rounded once (2**-9 for bfloat16,
# 2**-12 for float16), plus float32 accumulation: tolerances of a few roundings
EPS16 = {np.dtype(np.float16): 2.0 ** -9, BF16: 2.0 ** -6}


def f64(a):
    return np.asarray(host(a)).astype(np.float64)


def close16(got, want, dtype):
    got = host(got)
    assert got.dtype == np.dtype(dtype), got.dtype
    want = np.asarray(want, np.float64)
    eps = EPS16[np.dtype(dtype)]
    scale = float(np.abs(want).max()) if want.size else 1.0
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=eps, atol=eps * scale)


@needs_cuda
@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_widen_narrow_match_ml_dtypes(dtype):
    from numoe._cuda import _arrays as A
    step = 13 if SIM else 1                      # the simulator is slow: a sample
    pats = np.arange(0, 65536, step, dtype=np.uint16)
    pats = np.concatenate([pats, np.array([0, 0x8000, 0x7C00, 0xFC00, 0x7F80, 0xFF80,
                                           0x0001, 0x8001, 0x03FF, 0x0400], np.uint16)])
    h = pats.view(dtype)
    want = h.astype(np.float32)
    got = host(A.astype(dev(h), np.float32))
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), pats[~same][:5]
    # narrowing: every finite value, values between neighbours (ties included),
    # overflow, underflow, subnormals
    fin = want[np.isfinite(want)]
    mid = (fin.astype(np.float64) * (1 + 2.0 ** -9)).astype(np.float32)
    tie = (fin.astype(np.float64) * (1 + 2.0 ** -8 if dtype == BF16 else 1 + 2.0 ** -11))
    x = np.concatenate([fin, mid, tie.astype(np.float32), np.array(
        [np.inf, -np.inf, 65519.0, 65520.0, 1e6, 3e-8, -3e-8, 2.9802322e-08, 1e-40],
        np.float32)])
    with np.errstate(over="ignore"):
        want16 = x.astype(dtype).view(np.uint16)
    got16 = host(A.astype(dev(x), dtype)).view(np.uint16)
    bad = got16 != want16
    assert not bad.any(), (x[bad][:5], got16[bad][:5], want16[bad][:5])


@needs_cuda
@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_route_probs_16bit(dtype):
    rng = np.random.default_rng(21)
    T, E, k = 24, 8, 3
    z = (rng.standard_normal((T, E)) * 2).astype(dtype)
    z[0] = 1.0                                   # ties
    z[2, :3] = -np.inf
    z32 = z.astype(np.float32)
    for kw in ({}, dict(score="sigmoid", renormalize=False, scale=2.0)):
        got = numoe.route(dev(z), k, **kw)
        np.testing.assert_array_equal(host(got.experts), numoe.route(z32, k, **kw).experts)
        close16(got.weights, ref.route(z32.astype(np.float64), k, **kw).weights, dtype)
    for score in ("softmax", "sigmoid"):
        close16(numoe.router_probs(dev(z), score), ref.router_probs(f64(z), score), dtype)
    bad = z.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="row 3"):
        numoe.route(dev(bad), 2)


@needs_cuda
@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_dispatch_permute_unpermute_16bit(dtype):
    rng = np.random.default_rng(22)
    T, k, E, H = 20, 3, 5, 12
    ex = rng.integers(0, E, size=(T, k)).astype(np.int32)
    w = (rng.integers(-2, 5, size=(T, k)) * 0.25).astype(dtype)     # ties
    want = numoe.dispatch_plan(ex, E, capacity=7, weights=w.astype(np.float32),
                               drop_policy="score")
    plan = numoe.dispatch_plan(dev(ex), E, capacity=7, weights=dev(w), drop_policy="score")
    for f in ("order", "offsets", "counts", "dropped"):
        np.testing.assert_array_equal(host(getattr(plan, f)), getattr(want, f), err_msg=f)
    x = rng.standard_normal((T, H)).astype(dtype)
    xs = numoe.permute(dev(x), plan)
    np.testing.assert_array_equal(host(xs).view(np.uint16),
                                  x.view(np.uint16)[want.order // k])   # bits moved
    ys = rng.standard_normal(host(xs).shape).astype(dtype)
    wr = rng.random((T, k)).astype(dtype)
    y = numoe.unpermute(dev(ys), plan, dev(wr))
    close16(y, ref.unpermute(f64(ys), want, f64(wr)), dtype)
    np.testing.assert_array_equal(host(y).view(np.uint16),
                                  host(numoe.unpermute(dev(ys), plan, dev(wr))).view(np.uint16))


@needs_cuda
@pytest.mark.parametrize("xdt,wdt", [(np.float16, np.float16), (BF16, BF16),
                                     (np.float32, BF16), (np.float32, np.float16)], ids=str)
@pytest.mark.parametrize("glu,act,bias,limit", FFN_CASES[:3] + FFN_CASES[3:4])
def test_expert_ffn_16bit(xdt, wdt, glu, act, bias, limit, monkeypatch):
    rng = np.random.default_rng(23)
    E, H, F = 3, 12, 8       # F, H multiples of 4: the 16-bit GEMV runs
    counts = np.array([5, 0, 11])
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    xs = rng.standard_normal((off[-1], H)).astype(xdt)
    wg = (rng.standard_normal((E, H, F)) * 0.3).astype(wdt)
    wu = (rng.standard_normal((E, H, F)) * 0.3).astype(wdt) if glu else None
    wd = (rng.standard_normal((E, F, H)) * 0.3).astype(wdt)
    b = lambda *s: (rng.standard_normal(s) * 0.1).astype(xdt) if bias else None  # noqa
    bg, bu, bd = b(E, F), (b(E, F) if glu else None), b(E, H)
    g = lambda a: None if a is None else f64(a)  # noqa: E731
    want = ref.expert_ffn(f64(xs), off, f64(wg), g(wu), f64(wd), activation=act,
                          b_gate=g(bg), b_up=g(bu), b_down=g(bd), limit=limit)
    d = lambda a: None if a is None else dev(a)  # noqa: E731
    got = numoe.expert_ffn(d(xs), d(off), d(wg), d(wu), d(wd), activation=act, b_gate=d(bg),
                           b_up=d(bu), b_down=d(bd), limit=limit)
    check = close16 if np.dtype(xdt) in NARROW else None
    if check is None:                # float32 x, 16-bit weights: float32 result
        assert host(got).dtype == np.float32
        np.testing.assert_allclose(host(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    else:
        check(got, want, xdt)
    from numoe._cuda import experts as X
    opts = numoe.experts._check_expert_options(act, limit, 1.702, glu)
    for force in ("tiled", "skinny"):
        out = dev(np.full(want.shape, np.nan, xdt))
        X.run_ffn(d(xs), None, 0, d(off), int(off[-1]), d(wg), d(wu), d(wd),
                  *X._check_weights(np.dtype(xdt), H, d(wg), d(wu), d(wd), d(bg), d(bu),
                                    d(bd))[3:6],
                  opts.code, opts.limit, opts.alpha, out, None, None, force=force)
        if check is None:
            np.testing.assert_allclose(host(out), want, rtol=1e-4,
                                       atol=1e-4 * np.abs(want).max())
        else:
            check(out, want, xdt)
    # the opt-in 16-bit split-K GEMV for the few-row experts: same values, deterministic
    monkeypatch.setenv("NUMOE_CUDA_DECODE", "1")
    got2 = numoe.expert_ffn(d(xs), d(off), d(wg), d(wu), d(wd), activation=act, b_gate=d(bg),
                            b_up=d(bu), b_down=d(bd), limit=limit)
    assert "gemv16" in X.last_path["up"], X.last_path
    if check is None:
        np.testing.assert_allclose(host(got2), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    else:
        check(got2, want, xdt)
    got3 = numoe.expert_ffn(d(xs), d(off), d(wg), d(wu), d(wd), activation=act, b_gate=d(bg),
                            b_up=d(bu), b_down=d(bd), limit=limit)
    np.testing.assert_array_equal(host(got3).view(np.uint8), host(got2).view(np.uint8))


@needs_cuda
@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_losses_16bit(dtype):
    from numoe._cuda import losses as L
    rng = np.random.default_rng(24)
    T, E, k = 40, 6, 2
    z = rng.standard_normal((T, E)).astype(dtype)
    p = ref.router_probs(f64(z)).astype(dtype)
    ex = rng.integers(0, E, size=(T, k)).astype(np.int32)
    mask = rng.random(T) < 0.7
    assert L.load_balancing_loss(dev(p), dev(ex), mask=dev(mask)) == pytest.approx(
        ref.load_balancing_loss(f64(p), ex, mask=mask), rel=1e-6)
    assert L.router_z_loss(dev(z)) == pytest.approx(ref.router_z_loss(f64(z)), rel=1e-6)
    b = rng.standard_normal(E).astype(dtype)
    cnt = L.expert_counts(dev(ex), E)
    np.testing.assert_array_equal(host(L.update_bias(dev(b), cnt, 0.01)),
                                  ref.update_bias(b.astype(np.float32), host(cnt), 0.01))
    w = rng.random((T, k)).astype(dtype)
    st = L.routing_stats(dev(ex), E, weights=dev(w))
    np.testing.assert_allclose(host(st["weight_mass"]),
                               ref.routing_stats(ex, E, weights=f64(w))["weight_mass"],
                               rtol=1e-6)


def _device_layer(cfg, seed, xdt, wdt):
    """A stand-in for ``MoELayer(...).to_device()`` with 16-bit storage (the fused
    forward reads only these attributes), and the float64 reference weights."""
    from types import SimpleNamespace
    layer = numoe.MoELayer.random(cfg, seed=seed)
    w = layer.weights()
    rounded = {}
    for name in ("router", "w_gate", "w_up", "w_down"):
        a = w.get(name)
        rounded[name] = None if a is None else np.asarray(a).astype(wdt)
    dv = {n: (None if a is None else dev(a)) for n, a in rounded.items()}
    ns = SimpleNamespace(config=cfg, router=dv["router"], router_bias=None,
                         selection_bias=None, w_gate=dv["w_gate"], w_up=dv["w_up"],
                         w_down=dv["w_down"], b_gate=None, b_up=None, b_down=None,
                         shared_gate_weight=None, _dev={})
    refw = {n: (None if a is None else f64(a)) for n, a in rounded.items()}
    return ns, refw


@needs_cuda
@pytest.mark.parametrize("xdt,wdt", [(BF16, BF16), (np.float16, np.float16),
                                     (np.float32, BF16)], ids=str)
def test_fused_layer_16bit(xdt, wdt):
    from numoe._cuda import moe
    rng = np.random.default_rng(25)
    cfg = numoe.MoEConfig.mixtral(num_experts=8, top_k=2, hidden_dim=16, expert_dim=12)
    layer, refw = _device_layer(cfg, 3, wdt, wdt)
    x = rng.standard_normal((2, 5, 16)).astype(xdt)
    y, (logits, routing, plan) = moe.forward(layer, dev(x), return_parts=True)
    assert host(y).dtype == np.dtype(xdt) and tuple(y.shape) == (2, 5, 16)
    # the reference routes on the device's float32 logits (same experts), weights
    # and sums in float64 on the rounded values
    want = ref.moe_forward(f64(x), **refw, top_k=2)
    got = f64(y)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < (1e-2 if np.dtype(xdt) == BF16 else 2e-3), err


@needs_cuda
@pytest.mark.skipif(SIM, reason="CuPy/PyTorch arrays need a real GPU")
def test_cupy_and_torch_16bit_inputs():
    """bfloat16/float16 tensors: PyTorch refuses ``__cuda_array_interface__`` for
    bfloat16, CuPy describes it as raw 2-byte items; both are taken as 16-bit views."""
    rng = np.random.default_rng(14)
    z = rng.standard_normal((64, 8)).astype(BF16)
    x = rng.standard_normal((64, 16)).astype(BF16)
    want = numoe.route(z.astype(np.float32), 2)
    libs = []
    try:
        import torch
        if torch.cuda.is_available():
            def tt(a):
                t = torch.from_numpy(a.view(np.int16)).to("cuda")
                return t.view(torch.bfloat16) if a.dtype == BF16 else t.view(torch.float16)
            libs.append(("torch", tt))
    except ImportError:
        pass
    try:
        import cupy
        libs.append(("cupy", lambda a: cupy.asarray(a.view(np.uint16)).view(a.dtype)))
    except (ImportError, TypeError):
        pass
    if not libs:
        pytest.skip("neither CuPy nor PyTorch with CUDA is installed")
    for name, conv in libs:
        try:
            zz, xx = conv(z), conv(x)
        except (TypeError, ValueError) as exc:     # a CuPy without bfloat16
            pytest.skip(f"{name} cannot hold bfloat16 here: {exc}")
        r = numoe.route(zz, 2)
        np.testing.assert_array_equal(host(r.experts), want.experts, err_msg=name)
        assert host(r.weights).dtype == BF16
        p = numoe.dispatch_plan(r.experts, 8)
        y = numoe.unpermute(numoe.permute(xx, p), p, r.weights)
        close16(y, f64(x) * f64(r.weights).sum(1, keepdims=True), BF16)
        h = x.astype(np.float16)
        yh = numoe.permute(conv(h), p)
        assert host(yh).dtype == np.float16, name


@needs_cuda
@pytest.mark.skipif(SIM, reason="tensor cores (linked CUDA C++) need a real GPU")
@pytest.mark.parametrize("dtype", NARROW, ids=str)
@pytest.mark.parametrize("glu,act,bias,limit", FFN_CASES[:3] + FFN_CASES[3:4])
@pytest.mark.parametrize("bm", ["32", "64"])
def test_expert_ffn_tensor_cores(dtype, glu, act, bias, limit, bm, monkeypatch):
    """Experts with many rows run on the tensor cores (numoe._cuda.mma) when the
    linked C++ builds here, in 32- and 64-row tiles; every tile edge case: ragged
    rows, an empty expert, few-row experts beside them (the GEMV), columns and K not
    multiples of the tile, float32 and 16-bit biases."""
    from numoe._cuda import experts as X
    from numoe._cuda import mma
    monkeypatch.setenv("NUMOE_CUDA_MMA_BM", bm)
    assert mma.tile_rows(10, 5) == int(bm)
    rng = np.random.default_rng(26)
    E, H, F = 5, 136, 200
    counts = np.array([130, 0, 7, 300, 65])
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    xs = rng.standard_normal((off[-1], H)).astype(dtype)
    wg = (rng.standard_normal((E, H, F)) / np.sqrt(H)).astype(dtype)
    wu = (rng.standard_normal((E, H, F)) / np.sqrt(H)).astype(dtype) if glu else None
    wd = (rng.standard_normal((E, F, H)) / np.sqrt(F)).astype(dtype)
    bdt = dtype if bm == "32" else np.float32           # 16-bit biases in the 32-row runs
    b = lambda *s: (rng.standard_normal(s) * 0.1).astype(bdt) if bias else None  # noqa
    bg, bu, bd = b(E, F), (b(E, F) if glu else None), b(E, H)
    g = lambda a: None if a is None else f64(a)  # noqa: E731
    want = ref.expert_ffn(f64(xs), off, f64(wg), g(wu), f64(wd), activation=act,
                          b_gate=g(bg), b_up=g(bu), b_down=g(bd), limit=limit)
    d = lambda a: None if a is None else dev(a)  # noqa: E731
    got = numoe.expert_ffn(d(xs), d(off), d(wg), d(wu), d(wd), activation=act, b_gate=d(bg),
                           b_up=d(bu), b_down=d(bd), limit=limit)
    if X.last_path.get("gemm") != "mma":
        pytest.skip(f"tensor-core path unavailable here: {mma.ERROR}")
    close16(got, want, dtype)
    again = numoe.expert_ffn(d(xs), d(off), d(wg), d(wu), d(wd), activation=act,
                             b_gate=d(bg), b_up=d(bu), b_down=d(bd), limit=limit)
    np.testing.assert_array_equal(host(again).view(np.uint16), host(got).view(np.uint16))


@needs_cuda
@pytest.mark.skipif(SIM, reason="tensor cores (linked CUDA C++) need a real GPU")
@pytest.mark.parametrize("dtype", NARROW, ids=str)
@pytest.mark.parametrize("T", [3, 40])
def test_decode_batch_on_the_tensor_cores(dtype, T, monkeypatch):
    """NUMOE_CUDA_MMA_DECODE_FROM: a decode-sized batch runs every expert on the tensor
    cores in 32-row tiles (no GEMV); the device layer matches the host layer and
    repeats bit for bit."""
    from numoe._cuda import experts as X
    from numoe._cuda import mma, moe
    monkeypatch.setenv("NUMOE_CUDA_MMA_DECODE_FROM", "1")
    cfg = numoe.MoEConfig.qwen2_moe(num_experts=8, top_k=2, hidden_dim=136, expert_dim=72,
                                    num_shared_experts=1, shared_expert_dim=24)
    host_layer = numoe.MoELayer.random(cfg, seed=7, dtype=dtype, weight_dtype=dtype)
    layer = host_layer.to_device()
    x = np.random.default_rng(T).standard_normal((T, 136)).astype(dtype)
    y = moe.forward(layer, dev(x), graph=False)
    if X.last_path.get("gemm") != "mma":
        pytest.skip(f"tensor-core path unavailable here: {mma.ERROR}")
    assert "gemv16" not in X.last_path["up"] and mma.tile_rows(2 * T, 8) == 32
    close16(y, host_layer(x), dtype)
    again = moe.forward(layer, dev(x), graph=False)
    np.testing.assert_array_equal(host(again).view(np.uint16), host(y).view(np.uint16))


@needs_cuda
@pytest.mark.skipif(SIM, reason="tensor cores (linked CUDA C++) need a real GPU")
@pytest.mark.parametrize("dtype", NARROW, ids=str)
@pytest.mark.parametrize("M", [65, 300])
def test_matmul_on_the_tensor_cores(dtype, M, monkeypatch):
    """gemm.matmul (a 16-bit layer's router at prefill): more than 64 rows of 16-bit a
    and b run on the tensor cores, float32 or 16-bit out; odd widths keep the numba
    kernels."""
    from numoe._cuda import gemm, mma
    rng = np.random.default_rng(M)
    a = rng.standard_normal((M, 136)).astype(dtype)
    b = (rng.standard_normal((136, 64)) / 12).astype(dtype)
    calls = []
    plain = mma.plain
    monkeypatch.setattr(mma, "plain", lambda *x: calls.append(1) or plain(*x))
    want = f64(a) @ f64(b)
    got = gemm.matmul(dev(a), dev(b), out_dtype=np.float32)
    if not calls or mma.ERROR is not None:
        pytest.skip(f"tensor-core path unavailable here: {mma.ERROR}")
    np.testing.assert_allclose(host(got), want, rtol=1e-4, atol=1e-4)
    close16(gemm.matmul(dev(a), dev(b)), want, dtype)
    odd = gemm.matmul(dev(a), dev(b[:, :3]), out_dtype=np.float32)     # 3 columns
    assert len(calls) == 2
    np.testing.assert_allclose(host(odd), want[:, :3], rtol=1e-4, atol=1e-4)


@needs_cuda
@pytest.mark.parametrize("T", [1, 2, 5, 12])
def test_decode_gemv_in_the_fused_layer(T, monkeypatch):
    """The 16-bit split-K GEMV (default for 16-bit weights and few rows per expert):
    row tiles sized by the token count (1..8 rows), K split into many slices with a
    short last one; the device layer matches the host layer, repeats bit for bit,
    and NUMOE_CUDA_DECODE=0 falls back to the skinny kernel with close values."""
    from numoe._cuda import decode
    from numoe._cuda import experts as X
    from numoe._cuda import moe
    dt = np.float16                           # the simulator has no bfloat16
    cfg = numoe.MoEConfig.qwen2_moe(num_experts=8, top_k=2, hidden_dim=44, expert_dim=20,
                                    num_shared_experts=1, shared_expert_dim=12)
    host_layer = numoe.MoELayer.random(cfg, seed=5, dtype=dt, weight_dtype=dt)
    layer = host_layer.to_device()
    x = np.random.default_rng(T).standard_normal((T, 44)).astype(dt)
    assert decode.split(44, 2, 1, 2, 64) % 2 == 0 and -(-44 // decode.split(44, 2, 1, 2, 64)) > 1
    from numoe._cuda import gemm as G
    calls = []
    stage = decode.stage
    monkeypatch.setattr(decode, "stage", lambda *a: calls.append(a) or stage(*a))
    np.testing.assert_allclose(                # the router: a one-expert GEMV (16-bit b)
        host(G.matmul(dev(x), layer.router, out_dtype=np.float32)),
        x.astype(np.float32) @ host_layer.router.astype(np.float32), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1
    y = moe.forward(layer, dev(x), graph=False)
    assert "gemv16" in X.last_path["up"], X.last_path
    want = host_layer(x)
    close16(y, want, dt)
    again = moe.forward(layer, dev(x), graph=False)
    np.testing.assert_array_equal(host(again).view(np.uint16), host(y).view(np.uint16))
    # float64 activations keep the float64 kernels (the GEMV sums in float32)
    w = [host(getattr(layer, n)) for n in ("w_gate", "w_up", "w_down")]
    off = np.array([0, T, T] + [T] * 6)
    numoe.expert_ffn(dev(x.astype(np.float64)), dev(off), *map(dev, w))
    assert "gemv16" not in X.last_path["up"], X.last_path
    monkeypatch.setenv("NUMOE_CUDA_DECODE", "0")
    y0 = moe.forward(layer, dev(x), graph=False)
    assert "gemv16" not in X.last_path["up"], X.last_path
    close16(y0, want, dt)


@needs_cuda
@pytest.mark.skipif(SIM, reason="CUDA graphs need a real GPU")
@pytest.mark.parametrize("dtype,wdtype", [(np.float32, np.float32), (BF16, BF16)], ids=str)
@pytest.mark.parametrize("preset,kw", [
    ("olmoe", {}), ("qwen2_moe", dict(num_shared_experts=1, shared_expert_dim=24)),
    ("gpt_oss", {}), ("switch", dict(capacity_factor=1.0))], ids=lambda v: str(v)[:12])
def test_decode_graph_replays_the_eager_forward(dtype, wdtype, preset, kw):
    """Decode-sized calls of a device layer replay a captured CUDA graph from their
    second call on (numoe._cuda.graph): bit-identical to the eager forward, new x
    values and in-place weight updates are seen, every call returns a new array;
    a layer with a capacity stays eager."""
    from numoe._cuda import graph, moe
    rng = np.random.default_rng(31)
    k = 1 if preset == "switch" else 2
    cfg = getattr(numoe.MoEConfig, preset)(num_experts=8, top_k=k, hidden_dim=64,
                                           expert_dim=48, **kw)
    layer = numoe.MoELayer.random(cfg, seed=2, dtype=dtype, weight_dtype=wdtype).to_device()
    bits = lambda a: host(a).view(np.uint8)  # noqa: E731
    outs = []
    for t in range(4):
        x = dev(rng.standard_normal((3, 64)).astype(dtype))
        y = layer(x)
        np.testing.assert_array_equal(bits(y), bits(moe.forward(layer, x, graph=False)))
        outs.append((x, y))
    assert graph.captured(layer) == (cfg.capacity_factor is None), graph.FAILURES
    x0, y0 = outs[0]
    np.testing.assert_array_equal(bits(layer(x0)), bits(y0))   # earlier outputs untouched
    from numoe._cuda import _arrays as A
    w = host(layer.w_down)
    A.bits(layer.w_down).copy_to_device(A.bits(dev((w.astype(np.float32) * 2).astype(w.dtype))))
    y2 = layer(x0)
    np.testing.assert_array_equal(bits(y2), bits(moe.forward(layer, x0, graph=False)))
    assert not np.array_equal(bits(y2), bits(y0))


@needs_cuda
@pytest.mark.skipif(SIM, reason="CUDA graphs need a real GPU")
def test_prefill_graphs_share_one_arena(monkeypatch):
    """16-bit layers replay prefill-sized calls too, every graph's scratch carved from
    one shared arena: two layers' graphs interleaved, a capture that outgrows the arena
    (recaptured in a larger one) and the graphs captured before it stay bit-identical
    to the eager forward."""
    from numoe._cuda import graph, moe
    monkeypatch.setattr(graph, "_ARENA", [None])                 # a fresh, 1 MiB arena
    cfg = numoe.MoEConfig.olmoe(num_experts=8, top_k=2, hidden_dim=64, expert_dim=48)
    layers = [numoe.MoELayer.random(cfg, seed=s, dtype=BF16, weight_dtype=BF16).to_device()
              for s in (1, 2)]
    rng = np.random.default_rng(5)
    bits = lambda a: host(a).view(np.uint16)  # noqa: E731
    xs = [dev(rng.standard_normal((T, 64)).astype(BF16)) for T in (3, 100, 2000)]

    def check_all():
        for x in xs:
            for lay in layers:
                np.testing.assert_array_equal(bits(lay(x)),
                                              bits(moe.forward(lay, x, graph=False)))

    check_all()
    check_all()                       # second calls: captured (the 2000-token one grows)
    check_all()
    for lay in layers:
        gs = {k[0][0]: v for k, v in lay._graphs.items() if isinstance(v, graph._Graph)}
        assert sorted(gs) == [3, 100, 2000], graph.FAILURES
        assert gs[3].keep[0] is not gs[2000].keep[0]          # captured before the growth
    assert graph._ARENA[0].size > 1 << 20


@needs_cuda
def test_decode_graph_cache_states(monkeypatch):
    """The graph cache of numoe._cuda.graph without a GPU (capture faked): eager on a
    shape's first call, captured on its second, replayed after; a failed capture
    leaves that shape eager for good; a replaced weight array means a new capture;
    more than MAX_TOKENS tokens, a capacity or a strided x never use a graph."""
    from numoe._cuda import graph
    captured = []

    class Fake:
        def __init__(self, ok):
            self.ok = ok

        def run(self, x):
            return ("replay", tuple(x.shape))

    def capture(layer, x, weights):
        captured.append(tuple(x.shape))
        return Fake(True) if tuple(x.shape) != (5, 16) else None

    monkeypatch.setattr(graph, "ENABLED", True)
    monkeypatch.setattr(graph._Graph, "capture", staticmethod(capture))
    cfg = numoe.MoEConfig.mixtral(num_experts=4, top_k=2, hidden_dim=16, expert_dim=8)
    layer = numoe.MoELayer.random(cfg, seed=3).to_device()
    x = dev(np.ones((3, 16), np.float32))
    assert graph.forward(layer, x) is None and captured == []        # first call: eager
    assert graph.forward(layer, x) == ("replay", (3, 16)) and captured == [(3, 16)]
    assert graph.forward(layer, x) == ("replay", (3, 16)) and len(captured) == 1
    x5 = dev(np.ones((5, 16), np.float32))
    assert graph.forward(layer, x5) is None and graph.forward(layer, x5) is None
    assert graph.forward(layer, x5) is None and captured.count((5, 16)) == 1   # eager for good
    layer.w_down = dev(host(layer.w_down).copy())                    # a new weight array
    assert graph.forward(layer, x) is None                            # a new key: first call
    assert graph.forward(layer, x) == ("replay", (3, 16)) and captured.count((3, 16)) == 2
    big = dev(np.ones((graph.MAX_TOKENS + 1, 16), np.float32))
    assert graph.forward(layer, big) is None and graph.forward(layer, big) is None
    strided = dev(np.ones((3, 32), np.float32))[:, :16]
    assert graph.forward(layer, strided) is None and graph.forward(layer, strided) is None
    cap = numoe.MoELayer.random(numoe.MoEConfig.switch(
        num_experts=4, top_k=1, hidden_dim=16, expert_dim=8, capacity_factor=1.0),
        seed=3).to_device()
    assert graph.forward(cap, x) is None and graph.forward(cap, x) is None
    assert (65, 16) not in captured and len(captured) == 3
    # 16-bit expert weights: prefill sizes too (the tensor-core forward), up to
    # MAX_TOKENS_16 tokens and MAX_GRAPHS shapes per layer
    l16 = numoe.MoELayer.random(cfg, seed=3, dtype=BF16, weight_dtype=BF16).to_device()
    x65 = dev(np.ones((65, 16), BF16))
    assert graph.forward(l16, x65) is None and graph.forward(l16, x65) == ("replay", (65, 16))
    over = dev(np.ones((graph.MAX_TOKENS_16 + 1, 16), BF16))
    assert graph.forward(l16, over) is None and graph.forward(l16, over) is None
    monkeypatch.setattr(graph, "MAX_GRAPHS", 2)
    x2 = dev(np.ones((2, 16), BF16))
    assert graph.forward(l16, x2) is None and graph.forward(l16, x2) == ("replay", (2, 16))
    x4 = dev(np.ones((4, 16), BF16))                                  # a third shape: eager
    assert graph.forward(l16, x4) is None and graph.forward(l16, x4) is None
    assert (4, 16) not in captured and (graph.MAX_TOKENS_16 + 1, 16) not in captured


@needs_cuda
def test_graph_gemm_mode_is_the_numba_forward():
    """What a CUDA-graph capture queues (``gemm="graph"``: numba kernels, no cuBLAS)
    gives the eager forward's bits (float32 weights: no 16-bit GEMV)."""
    from numoe._cuda import _arrays as A
    from numoe._cuda import moe
    cfg = numoe.MoEConfig.qwen2_moe(num_experts=4, top_k=2, hidden_dim=16, expert_dim=8,
                                    num_shared_experts=1, shared_expert_dim=12)
    layer = numoe.MoELayer.random(cfg, seed=4).to_device()
    x = dev(np.random.default_rng(3).standard_normal((3, 16)).astype(np.float32))
    y, status = moe.queue(layer, x, gemm="graph")
    np.testing.assert_array_equal(host(y), host(moe.forward(layer, x, gemm="numba",
                                                            graph=False)))
    assert host(status).shape == (2,) and A.is_device_array(status)
