"""Determinism: bit-identical results at any thread count, and per-token independence.

The thread-count check runs one script in fresh interpreters with
``NUMBA_NUM_THREADS=1`` and ``=2`` (the thread pool size is fixed at
start-up) and compares every output byte for byte. Ops whose modules are
still placeholders (``NotImplementedError``) are skipped, and so reported.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import numoe

SCRIPT = textwrap.dedent(r'''
    import json, sys
    import numpy as np
    import numba
    import numoe

    out, skipped = {}, []

    def record(name, value):
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            for f in value._fields:
                record(f"{name}.{f}", getattr(value, f))
        elif isinstance(value, dict):
            for key in sorted(value):
                record(f"{name}.{key}", value[key])
        elif isinstance(value, (tuple, list)) and value and not np.isscalar(value[0]):
            for i, v in enumerate(value):
                record(f"{name}.{i}", v)
        elif value is not None:
            out[name] = np.asarray(value)

    def run(name, fn):
        try:
            record(name, fn())
        except NotImplementedError:
            skipped.append(name)

    rng = np.random.default_rng(12345)
    T, E, k, H = 6000, 64, 4, 40          # T*k spans several dispatch chunks
    logits = {np.float32: rng.normal(0, 3, (T, E)).astype(np.float32),
              np.float64: rng.normal(0, 3, (T, E))}
    logits[np.float64][::7, ::5] = np.round(logits[np.float64][::7, ::5])   # ties
    bias = rng.normal(0, 0.3, E)
    for dt, z in logits.items():
        tag = np.dtype(dt).name
        run(f"router_probs.softmax.{tag}", lambda: numoe.router_probs(z))
        run(f"router_probs.sigmoid.{tag}", lambda: numoe.router_probs(z, score="sigmoid"))
        run(f"route.softmax.{tag}", lambda: numoe.route(z, k))
        run(f"route.sigmoid_groups.{tag}", lambda: numoe.route(
            z, k, score="sigmoid", renormalize=True, bias=bias.astype(dt), n_groups=8,
            topk_groups=4, scale=2.5))
        run(f"route.raw.{tag}", lambda: numoe.route(z, 8, renormalize=False))

    # routing inputs for the rest, independent of whether route is implemented
    experts = np.argsort(rng.random((T, E)) + np.linspace(0, 0.5, E), axis=1)[:, :k]
    experts = experts.astype(np.int32)
    weights = (rng.random((T, k)) * 4).round(1).astype(np.float32)   # ties for "score"
    probs = rng.dirichlet(np.ones(E), T)
    x = rng.standard_normal((T, H)).astype(np.float32)
    cap = numoe.capacity(T, E, k, 0.9)
    plans = {"dropless": numoe.dispatch_plan(experts, E)}
    for pol in ("slot", "position", "score"):
        plans[pol] = numoe.dispatch_plan(experts, E, capacity=cap, weights=weights,
                                         drop_policy=pol)
    for name, plan in plans.items():
        record(f"dispatch_plan.{name}", plan)
        xs = numoe.permute(x, plan)
        record(f"permute.{name}", xs)
        ys = (xs * np.float32(1.5) - np.float32(0.25)).astype(np.float32)
        record(f"unpermute.{name}", numoe.unpermute(ys, plan, weights))
        record(f"unpermute64.{name}", numoe.unpermute(ys.astype(np.float64), plan, weights))

    # every CPU driver variant on one case (streaming permute: outputs >= 32 MiB)
    from numoe._cpu import dispatch as cpu
    plan, k_ = plans["score"], experts.shape[1]
    xs = numoe.permute(x, plan)
    record("permute.stream", cpu.permute(x, plan.order, k_, np.empty_like(xs), mode="stream"))
    pos, _ = cpu.inverse_positions(plan.order, plan.dropped.reshape(-1))
    for mode in ("serial", "parallel"):
        record(f"unpermute.{mode}", cpu.unpermute(xs, pos, weights, k_,
                                                  np.empty((T, H), np.float32), mode=mode))

    # 16-bit storage (computed in float32), recorded as uint16 bits
    import ml_dtypes
    for dt16 in (np.float16, ml_dtypes.bfloat16):
        tag, z16, b16 = np.dtype(dt16).name, logits[np.float64].astype(dt16), bias.astype(dt16)
        run(f"route.groups.{tag}", lambda: (lambda r: (r.weights.view(np.uint16), r.experts))(
            numoe.route(z16, k, bias=b16, n_groups=8, topk_groups=4)))
        run(f"router_probs.{tag}", lambda: numoe.router_probs(z16).view(np.uint16))
        xs16 = numoe.permute(x.astype(dt16), plans["score"])
        record(f"permute.{tag}", xs16.view(np.uint16))
        record(f"unpermute.{tag}", numoe.unpermute(xs16, plans["score"],
                                                   weights.astype(dt16)).view(np.uint16))

    run("load_balancing_loss", lambda: numoe.load_balancing_loss(probs, experts))
    run("load_balancing_loss.mask", lambda: numoe.load_balancing_loss(
        probs, experts, mask=np.arange(T) % 3 != 0))
    run("router_z_loss", lambda: numoe.router_z_loss(logits[np.float64]))
    run("router_z_loss.f32", lambda: numoe.router_z_loss(logits[np.float32]))
    run("expert_counts", lambda: numoe.expert_counts(experts, E))
    run("update_bias", lambda: numoe.update_bias(np.zeros(E, np.float32),
                                                 np.bincount(experts.ravel(), minlength=E), 1e-3))
    run("routing_stats", lambda: numoe.routing_stats(experts, E, weights=weights,
                                                     plan=plans["slot"]))

    F, Ex = 24, 8
    ex8 = (experts % Ex).astype(np.int32)
    plan8 = numoe.dispatch_plan(np.sort(ex8, axis=1)[:, :1], Ex)
    xs8 = numoe.permute(x, plan8)
    wg = rng.standard_normal((Ex, H, F)).astype(np.float32) * 0.2
    wu = rng.standard_normal((Ex, H, F)).astype(np.float32) * 0.2
    wd = rng.standard_normal((Ex, F, H)).astype(np.float32) * 0.2
    run("expert_ffn.silu", lambda: numoe.expert_ffn(xs8, plan8.offsets, wg, wu, wd))
    run("expert_ffn.relu_plain", lambda: numoe.expert_ffn(xs8, plan8.offsets, wg, None, wd,
                                                          activation="relu"))

    def layer_out(**kw):
        cfg = numoe.MoEConfig(Ex, 2, H, F, **kw)
        layer = numoe.MoELayer.random(cfg, seed=0)
        y, info = layer.forward(x[:512], return_info=True)
        return {"y": y, "aux_loss": info["aux_loss"], "z_loss": info["z_loss"],
                "plan": info["plan"], "routing": info["routing"]}

    if hasattr(numoe.MoELayer, "random") and hasattr(numoe.MoELayer, "forward"):
        run("MoELayer.dropless", lambda: layer_out())
        run("MoELayer.capacity", lambda: layer_out(capacity_factor=1.0))
    else:                                   # the layer module is still a placeholder
        skipped += ["MoELayer.dropless", "MoELayer.capacity"]

    np.savez(sys.argv[1], **out)
    print(json.dumps({"threads": numba.get_num_threads(), "skipped": skipped}))
''')


def _run(tmp_path, threads):
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
    path = tmp_path / f"out{threads}.npz"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = json.loads(proc.stdout.strip().splitlines()[-1])
    assert meta["threads"] == threads
    with np.load(path) as f:
        return {name: f[name] for name in f.files}, meta["skipped"]


def test_bit_identical_across_thread_counts(tmp_path):
    one, skipped1 = _run(tmp_path, 1)
    two, skipped2 = _run(tmp_path, 2)
    assert skipped1 == skipped2
    assert sorted(one) == sorted(two)
    assert any(name.startswith("dispatch_plan") for name in one)
    differ = [n for n in one if one[n].dtype != two[n].dtype or one[n].shape != two[n].shape
              or one[n].tobytes() != two[n].tobytes()]
    assert not differ, f"results differ between 1 and 2 threads: {differ}"
    if skipped1:
        print("not implemented yet, skipped:", ", ".join(skipped1))


# --------------------------------------------------- per-token independence
def _routing(logits, k):
    try:
        return numoe.route(logits, k)
    except NotImplementedError:
        return None


def _combine(x, experts, weights, E):
    plan = numoe.dispatch_plan(experts, E)
    ys = numoe.permute(x, plan) * x.dtype.type(1.5)      # row-wise "experts"
    return numoe.unpermute(ys, plan, weights)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_token_results_do_not_depend_on_the_batch(dtype):
    dtype = np.dtype(dtype).type                # ("bfloat16": registered by ml_dtypes)
    rng = np.random.default_rng(99)
    T, E, k, H = 3000, 48, 6, 24
    logits = rng.normal(0, 3, (T, E)).astype(dtype)
    logits[::5] = np.round(logits[::5])                   # ties
    x = rng.standard_normal((T, H)).astype(dtype)
    subsets = [np.arange(0, T, 3), np.arange(T)[::-1], rng.permutation(T)[:100], np.array([17])]

    r = _routing(logits, k)
    if r is not None:
        for idx in subsets:
            rs = numoe.route(logits[idx], k)
            assert rs.experts.tobytes() == r.experts[idx].tobytes()
            assert rs.weights.tobytes() == r.weights[idx].tobytes()
        try:
            p = numoe.router_probs(logits)
            assert numoe.router_probs(logits[subsets[0]]).tobytes() == p[subsets[0]].tobytes()
        except NotImplementedError:
            pass
        experts, weights = r.experts, r.weights
    else:
        experts = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32)
        weights = rng.random((T, k)).astype(dtype)

    y = _combine(x, experts, weights, E)
    for idx in subsets:
        ysub = _combine(np.ascontiguousarray(x[idx]), np.ascontiguousarray(experts[idx]),
                        np.ascontiguousarray(weights[idx]), E)
        assert ysub.tobytes() == y[idx].tobytes()
