"""Full-size correctness of every CUDA op against the CPU backend, plus kernel timings.

Run on a GPU machine (``tools/gpu_run.sh check``). Each check draws fresh
random inputs, poisons outputs where the API allows (``out=``), compares
integers exactly and floats by relative error against the CPU backend (the
oracle), and times the op (median of synchronised calls). Writes a JSON
summary to ``$OUT/gpu_check.json`` (or ./gpu_check.json) and prints a table.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

import numpy as np
from numba import cuda

import numoe
from numoe import reference as R
from numoe._cuda import _arrays as A
from numoe._cuda import bench as B
from numoe._cuda import dispatch as CD
from numoe._cuda import experts as CX
from numoe._cuda import gemm as CG
from numoe._cuda import losses as CL
from numoe._cuda import routing as CR

RESULTS = []
OUT = os.environ.get("OUT", ".")


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def record(name, ok, **kw):
    kw.update(name=name, ok=bool(ok))
    RESULTS.append(kw)
    extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in kw.items() if k not in ("name", "ok"))
    print(f"{'PASS' if ok else 'FAIL'} {name:40s} {extra}", flush=True)


def check(name):
    def deco(fn):
        def run():
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                record(name, False, error=f"{type(exc).__name__}: {exc}"[:300])
        run.__name__ = fn.__name__
        CHECKS.append(run)
        return run
    return deco


CHECKS = []
rng = np.random.default_rng(12345)
d = cuda.to_device
h = lambda a: a.copy_to_host()  # noqa: E731


@check("route")
def _route():
    for dt in (np.float32, np.float64):
        for T, E, k, kw in [(262144, 64, 8, {}), (262144, 8, 2, {}),
                            (65536, 256, 8, dict(score="sigmoid", bias=True, n_groups=8,
                                                 topk_groups=4, scale=2.5)),
                            (65536, 128, 8, dict(renormalize=False)),
                            (4096, 16, 16, dict(score="sigmoid"))]:
            z = rng.standard_normal((T, E)).astype(dt)
            z[:100] = np.round(z[:100])          # ties
            z[100:110] = 0.0
            z[110:120, : E // 2] = -np.inf
            ckw = dict(kw)
            dkw = dict(kw)
            if kw.get("bias"):
                b = rng.standard_normal(E) * 0.1
                ckw["bias"] = b
                dkw["bias"] = d(b)
            c = numoe.route(z, k, **ckw)
            zd = d(z)
            t, _, r = B.timeit(lambda: CR.route(zd, k, **dkw), budget=0.5)
            same = bool((h(r.experts) == c.experts).all())
            e = rel(h(r.weights), c.weights)
            record(f"route {np.dtype(dt).name} T={T} E={E} k={k} {sorted(kw)}",
                   same and e < (1e-6 if dt == np.float32 else 1e-13), experts_equal=same,
                   rel_err=e, ms=t * 1e3,
                   GBps=(T * E * z.itemsize + T * k * (z.itemsize + 4)) / t / 1e9)
        p = CR.router_probs(zd)
        record(f"router_probs {np.dtype(dt).name}", rel(h(p), numoe.router_probs(z)) < 1e-6,
               rel_err=rel(h(p), numoe.router_probs(z)))


@check("dispatch")
def _dispatch():
    for T, E, k, cap, pol in [(262144, 64, 8, None, "slot"), (65536, 64, 8, 9000, "slot"),
                              (65536, 64, 8, 9000, "position"), (65536, 64, 8, 9000, "score"),
                              (4096, 256, 8, 100, "score"), (4096, 1, 4, None, "slot"),
                              (100000, 8, 2, 20000, "slot")]:
        ex = rng.integers(0, E, size=(T, k)).astype(np.int32)
        ex[: T // 3, 0] = 0          # overflow expert 0
        w = rng.random((T, k)).astype(np.float32)
        w[::7] = 0.5                 # ties
        c = numoe.dispatch_plan(ex, E, capacity=cap, weights=w, drop_policy=pol)
        exd, wd = d(ex), d(w)
        t, _, p = B.timeit(lambda: CD.dispatch_plan(exd, E, capacity=cap, weights=wd,
                                                    drop_policy=pol), budget=0.5)
        ok = all(np.array_equal(h(getattr(p, f)), getattr(c, f))
                 for f in ("order", "offsets", "counts", "dropped"))
        record(f"dispatch_plan T={T} E={E} k={k} cap={cap} {pol}", ok, ms=t * 1e3)


@check("permute/unpermute")
def _perm():
    for dt in (np.float32, np.float64):
        T, E, k, H = 65536, 64, 8, 1024
        ex = rng.integers(0, E, size=(T, k)).astype(np.int32)
        w = rng.random((T, k)).astype(dt)
        x = rng.standard_normal((T, H)).astype(dt)
        c = numoe.dispatch_plan(ex, E, capacity=7000)
        p = CD.dispatch_plan(d(ex), E, capacity=7000)
        xs_c = numoe.permute(x, c)
        out = cuda.to_device(np.full(xs_c.shape, np.nan, dt))
        xd = d(x)
        t, _, xs = B.timeit(lambda: CD.permute(xd, p, out=out), budget=0.5)
        record(f"permute {np.dtype(dt).name}", np.array_equal(h(xs), xs_c), ms=t * 1e3)
        ys = rng.standard_normal(xs_c.shape).astype(dt)
        yc = numoe.unpermute(ys, c, w)
        yd, wd = d(ys), d(w)
        t, _, y = B.timeit(lambda: CD.unpermute(yd, p, wd), budget=0.5)
        y1 = h(y)
        y2 = h(CD.unpermute(yd, p, wd))
        record(f"unpermute {np.dtype(dt).name}", rel(y1, yc) < 1e-6 and np.array_equal(y1, y2),
               rel_err=rel(y1, yc), bitwise_repeat=bool(np.array_equal(y1, y2)), ms=t * 1e3)


def _ffn_case(dt, T, E, k, H, F, glu=True, act="silu", bias=False, limit=None, force=None,
              gemm=None, seed=0, label=""):
    r = np.random.default_rng(seed)
    ex = np.stack([r.permutation(E)[:k] for _ in range(T)]).astype(np.int32)
    plan = numoe.dispatch_plan(ex, E)
    N = int(plan.offsets[-1])
    xs = r.standard_normal((N, H)).astype(dt)
    s = 1 / np.sqrt(H)
    wg = (r.standard_normal((E, H, F)) * s).astype(dt)
    wu = (r.standard_normal((E, H, F)) * s).astype(dt) if glu else None
    wd = (r.standard_normal((E, F, H)) / np.sqrt(F)).astype(dt)
    bg = (r.standard_normal((E, F)) * 0.1).astype(dt) if bias else None
    bu = (r.standard_normal((E, F)) * 0.1).astype(dt) if (bias and glu) else None
    bd = (r.standard_normal((E, H)) * 0.1).astype(dt) if bias else None
    kw = dict(activation=act, b_gate=bg, b_up=bu, b_down=bd, limit=limit)
    ref = numoe.expert_ffn(xs, plan.offsets, wg, wu, wd, **kw)
    D = lambda a: None if a is None else d(a)  # noqa: E731
    xsd, wgd, wud, wdd = D(xs), D(wg), D(wu), D(wd)
    bgd, bud, bdd = D(bg), D(bu), D(bd)
    opts = numoe.experts._check_expert_options(act, limit, 1.702, glu)
    off = d(np.asarray(plan.offsets, np.int64))
    out = cuda.to_device(np.full((N, H), np.nan, dt))

    def call():
        return CX.run_ffn(xsd, None, 0, off, N, wgd, wud, wdd, bgd, bud, bdd, opts.code,
                          opts.limit, opts.alpha, out, None, None, force=force, gemm=gemm)
    t, n, y = B.timeit(call, budget=1.0)
    path = {k_: v for k_, v in CX.last_path.items() if k_ != "work"}
    y1 = h(y)
    y2 = h(call())
    flops = 2 * N * H * F * (3 if glu else 2)
    touched = len(np.unique(ex))
    wbytes = touched * (3 if glu else 2) * H * F * np.dtype(dt).itemsize
    e = rel(y1, ref)
    tol = 1e-5 if dt == np.float32 else 1e-12
    record(f"expert_ffn {label} {np.dtype(dt).name} T={T} E={E} k={k} H={H} F={F} "
           f"glu={glu} {act} bias={bias} force={force} gemm={gemm}",
           e < tol and np.array_equal(y1, y2) and np.isfinite(y1).all(), rel_err=e,
           bitwise_repeat=bool(np.array_equal(y1, y2)), ms=t * 1e3,
           TFLOPs=flops / t / 1e12, weight_GBps=wbytes / t / 1e9, path=str(path))


@check("expert_ffn small shapes")
def _ffn_small():
    for dt in (np.float32, np.float64):
        for glu, act, bias, limit in [(True, "silu", False, None), (True, "gelu", True, None),
                                      (True, "gelu_tanh", False, None),
                                      (True, "swiglu_oai", True, 7.0),
                                      (False, "relu", True, None), (False, "gelu", False, None)]:
            for force in ("tiled", "skinny"):
                _ffn_case(dt, 300, 16, 4, 200, 136, glu, act, bias, limit, force=force,
                          label="odd")


@check("expert_ffn OLMoE shapes")
def _ffn_big():
    for T in (16, 64):
        _ffn_case(np.float32, T, 64, 8, 2048, 1024, label="decode")
    _ffn_case(np.float32, 4096, 64, 8, 2048, 1024, label="prefill", force="tiled")
    try:
        import cupy  # noqa: F401
        _ffn_case(np.float32, 4096, 64, 8, 2048, 1024, label="prefill", gemm="cublas")
        _ffn_case(np.float32, 64, 64, 8, 2048, 1024, label="decode", gemm="cublas")
    except ImportError:
        record("cublas path", True, note="CuPy not installed: skipped")
    _ffn_case(np.float64, 512, 64, 8, 2048, 1024, label="prefill-f64")


@check("matmul")
def _matmul():
    for M, K, N in [(4096, 2048, 64), (16, 2048, 64), (1000, 300, 7)]:
        a = rng.standard_normal((M, K)).astype(np.float32)
        b = rng.standard_normal((K, N)).astype(np.float32)
        ad, bd = d(a), d(b)
        t, _, c = B.timeit(lambda: CG.matmul(ad, bd), budget=0.5)
        e = rel(h(c), a.astype(np.float64) @ b)
        record(f"matmul {M}x{K}x{N}", e < 1e-5, rel_err=e, ms=t * 1e3)


@check("losses")
def _losses():
    T, E, k = 65536, 64, 8
    z = rng.standard_normal((T, E)).astype(np.float32)
    ex = rng.integers(0, E, size=(T, k)).astype(np.int32)
    mask = rng.random(T) < 0.8
    probs = R.router_probs(z).astype(np.float32)
    for name, got, want in [
        ("load_balancing_loss", CL.load_balancing_loss(d(probs), d(ex), mask=d(mask)),
         R.load_balancing_loss(probs, ex, mask=mask)),
        ("router_z_loss", CL.router_z_loss(d(z), mask=d(mask)), R.router_z_loss(z, mask=mask)),
    ]:
        e = abs(got - want) / abs(want)
        record(name, e < 1e-6, rel_err=e)
    cnt = h(CL.expert_counts(d(ex), E))
    record("expert_counts", np.array_equal(cnt, R.expert_counts(ex, E)))
    b = rng.standard_normal(E).astype(np.float32)
    nb = h(CL.update_bias(d(b), d(cnt), 1e-3))
    record("update_bias", np.array_equal(nb, R.update_bias(b, cnt, 1e-3)))
    w = rng.random((T, k)).astype(np.float32)
    plan = CD.dispatch_plan(d(ex), E, capacity=8000)
    st = CL.routing_stats(d(ex), E, weights=d(w), plan=plan)
    ref = R.routing_stats(ex, E, weights=w, plan=numoe.dispatch_plan(ex, E, capacity=8000))
    keys = ("cv", "max_over_mean", "balancedness", "drop_rate")
    ok = all(abs(st[key] - ref[key]) < 1e-9 for key in keys)
    ok = ok and st["dead_experts"] == ref["dead_experts"]
    ok = ok and rel(h(st["weight_mass"]), ref["weight_mass"]) < 1e-12
    record("routing_stats", ok)


def _explore():
    """Time the expert GEMMs for a few tile shapes (prefill tiled, decode skinny)."""
    base = dict(CX.TILE_OVERRIDE)
    try:
        for glu_cfg, plain_cfg in [((128, 64, 8, 8, 4), (128, 128, 8, 8, 8)),
                                   ((128, 64, 16, 8, 4), (128, 128, 16, 8, 8)),
                                   ((64, 64, 8, 4, 4), (128, 64, 8, 8, 4)),
                                   ((128, 32, 8, 8, 2), (64, 128, 8, 4, 8))]:
            CX.TILE_OVERRIDE.clear()
            CX.TILE_OVERRIDE.update(glu=glu_cfg, plain=plain_cfg)
            _ffn_case(np.float32, 4096, 64, 8, 2048, 1024, label=f"explore {glu_cfg}/{plain_cfg}",
                      force="tiled")
        for sk in [(8, 128, 256, 8), (4, 128, 256, 8), (16, 128, 128, 4), (8, 256, 128, 8),
                   (8, 64, 256, 8)]:
            CX.TILE_OVERRIDE.clear()
            CX.TILE_OVERRIDE.update(skinny=sk)
            for T in (16, 64):
                _ffn_case(np.float32, T, 64, 8, 2048, 1024, label=f"explore skinny {sk}",
                          force="skinny")
    finally:
        CX.TILE_OVERRIDE.clear()
        CX.TILE_OVERRIDE.update(base)


@check("launch overhead")
def _launch_overhead():
    """Python-side cost of one numba launch with the GEMM kernels' 20 arguments."""
    from numba import cuda as nc

    @nc.jit
    def k20(a, b, c, d_, e, f, g, h_, i, j, k, l_, m, n, o, p, q, r, s, t):
        if nc.grid(1) == 0:
            a[0] = b[0]
    from numoe._cuda._launch import launch

    arrs = [d(np.zeros(4, np.float32)) for _ in range(20)]
    for name, go in [("numba", lambda: k20[1, 32](*arrs)),
                     ("fast", lambda: launch(k20, 1, 32, 0, *arrs))]:
        go()
        go()
        nc.synchronize()
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            go()
        nc.synchronize()
        per = (time.perf_counter() - t0) / n
        record(f"launch overhead (20 array args, {name})", True, us=per * 1e6)


def main():
    print(f"numoe CUDA check on {A.device_name()}; numpy {np.__version__}")
    if "--explore" in sys.argv:
        CHECKS.append(_explore)
    only = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--only=")]
    for c in CHECKS:
        if only and not any(o in c.__name__ for o in only[0].split(",")):
            continue
        t0 = time.perf_counter()
        c()
        print(f"   ({c.__name__}: {time.perf_counter() - t0:.1f} s)", flush=True)
    from numoe._cuda import _launch
    print("fast launch:", _launch.ENABLED, _launch.stats())
    n_fail = sum(not r["ok"] for r in RESULTS)
    with open(os.path.join(OUT, "gpu_check.json"), "w") as fh:
        json.dump(dict(device=A.device_name(), results=RESULTS), fh, indent=1, default=str)
    print(f"{len(RESULTS)} checks, {n_fail} failed")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
