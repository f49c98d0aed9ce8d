"""Real-GPU checks and timings of numoe's 16-bit CUDA paths (issues 9 and 8, item 5).

Usage (on the GPU machine, from the repository root; tools/gpu_run.sh bf16 does it):
    python tools/gpu_bf16.py [--quick] [--no-time]

Checks, at full size, every CUDA op in float16, bfloat16, float32 and float64
against the host (integers exact, floats by relative error ||got - want|| /
||want|| against a float64 or float32 reference on the same rounded values):
the widening helper on all 65536 bit patterns, route, router_probs,
dispatch_plan (16-bit weights, capacity by score), permute, unpermute,
expert_ffn (tensor-core path, numba path, mixed float32 x / bf16 weights),
the losses, the fused device layer and the public layer with bf16 weights.

Times (medians of synchronised calls after a warm-up): the OLMoE-shaped
layer (E=64, k=8, H=2048, F=1024) at T = 1, 4, 16, 64, 512, 4096 and the
Qwen3-MoE row in bfloat16 -- numoe (tensor cores), numoe numba-only, numoe
float32, HF transformers bf16 grouped_mm and eager -- against the floor of
reading the touched experts' bf16 weights once at the copy bandwidth
measured in the same run; the routing ops at T = 262144 in bf16 and fp32.
Writes $OUT/bf16.json; prints a summary table last.
"""
import argparse
import functools
import json
import os
import sys
import time
import traceback

import ml_dtypes
import numpy as np
from numba import cuda

import numoe
from numoe import reference as ref
from numoe._cuda import _arrays as A
from numoe._cuda import bench as B
from numoe._cuda import experts as X
from numoe._cuda import graph as G
from numoe._cuda import moe

BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
ALL = (F16, BF16, F32, F64)
TOL = {F16: 5e-3, BF16: 2e-2, F32: 1e-5, F64: 1e-12}
OUT = os.environ.get("OUT", ".")
RES = {"checks": [], "timings": [], "notes": []}


def say(*a):
    print(*a, flush=True)


def rel(got, want):
    got = np.asarray(got).astype(np.float64)
    want = np.asarray(want).astype(np.float64)
    d = np.linalg.norm(want)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.linalg.norm(got - want) / (d if d > 0 else 1.0))


def h(a):
    return A.to_host(a) if hasattr(a, "copy_to_host") else np.asarray(a)


def dev(a):
    return A.to_device(a)


def record(name, ok, **kw):
    RES["checks"].append(dict(name=name, ok=bool(ok), **kw))
    extra = " ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in kw.items())
    say(f"  [{'ok' if ok else 'FAIL'}] {name} {extra}")


def section(fn):
    @functools.wraps(fn)
    def run(*a, **k):
        say(f"== {fn.__name__}")
        t0 = time.perf_counter()
        try:
            fn(*a, **k)
        except Exception as exc:  # noqa: BLE001 - keep going, report
            record(fn.__name__, False, error=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
        say(f"   ({time.perf_counter() - t0:.1f} s)")
    return run


def nm(dt):
    return np.dtype(dt).name


# ------------------------------------------------------------------ checks
@section
def widen_narrow(step=1, nrand=1 << 20):
    for dt in (F16, BF16):
        pats = np.arange(0, 65536, step, dtype=np.uint16)
        hv = pats.view(dt)
        want = hv.astype(np.float32)
        got = h(A.astype(dev(hv), np.float32))
        same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
        record(f"widen {nm(dt)} {pats.size} patterns", same.all(), bad=int((~same).sum()))
        rng = np.random.default_rng(0)
        fin = want[np.isfinite(want)]
        x = np.concatenate([fin, (fin * np.float32(1 + 2.0 ** -9)).astype(np.float32),
                            (rng.standard_normal(nrand) * 10.0 ** rng.integers(-9, 6, nrand)
                             ).astype(np.float32)])
        with np.errstate(over="ignore"):
            w16 = x.astype(dt).view(np.uint16)
        g16 = h(A.astype(dev(x), dt)).view(np.uint16)
        record(f"narrow {nm(dt)} RNE vs ml_dtypes ({x.size} values)", (g16 == w16).all(),
               bad=int((g16 != w16).sum()))


@section
def routing(T=65536, E=64, k=8):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((T, E)) * 2
    bias = rng.standard_normal(E) * 0.1
    for dt in ALL:
        z = base.astype(dt)
        zw = z.astype(F64 if dt == F64 else F32)           # the same values, host dtype
        for kw in ({}, dict(score="sigmoid", renormalize=False, scale=2.5),
                   dict(score="sigmoid", n_groups=8, topk_groups=4)):
            kwh, kwd = dict(kw), dict(kw)
            if kw.get("n_groups"):
                kwh["bias"], kwd["bias"] = bias, dev(bias)
            got = numoe.route(dev(z), k, **kwd)
            want = numoe.route(zw, k, **kwh)
            wref = ref.route(zw.astype(np.float64), k, **kwh).weights
            ex_ok = np.array_equal(h(got.experts), want.experts)
            e = rel(h(got.weights), wref)
            record(f"route {nm(dt)} {kw or 'softmax'}", ex_ok and e < TOL[dt]
                   and h(got.weights).dtype == dt, rel=e, experts_equal=ex_ok)
        for score in ("softmax", "sigmoid"):
            p = numoe.router_probs(dev(z), score)
            e = rel(h(p), ref.router_probs(zw.astype(np.float64), score))
            record(f"router_probs {nm(dt)} {score}", e < TOL[dt] and h(p).dtype == dt, rel=e)


@section
def dispatch(T=65536, k=8, E=64, H=2048):
    rng = np.random.default_rng(2)
    ex = rng.integers(0, E, size=(T, k)).astype(np.int32)
    wb = rng.integers(0, 16, size=(T, k)) * 0.0625
    for dt in ALL:
        w = wb.astype(dt)
        for cap, pol in ((None, "slot"), (int(T * k / E * 0.8), "score"),
                         (int(T * k / E * 0.8), "slot")):
            got = numoe.dispatch_plan(dev(ex), E, capacity=cap, weights=dev(w), drop_policy=pol)
            want = numoe.dispatch_plan(ex, E, capacity=cap, weights=w.astype(
                F64 if dt == F64 else F32), drop_policy=pol)
            ok = all(np.array_equal(h(getattr(got, f)), getattr(want, f))
                     for f in ("order", "offsets", "counts", "dropped"))
            record(f"dispatch_plan weights {nm(dt)} cap={cap} {pol}", ok)
    Tp = min(T, 8192)
    exp = ex[:Tp]
    plan_h = numoe.dispatch_plan(exp, E)
    plan = numoe.dispatch_plan(dev(exp), E)
    order = plan_h.order
    for dt in ALL:
        x = rng.standard_normal((Tp, H)).astype(dt)
        xs = h(numoe.permute(dev(x), plan))
        ok = np.array_equal(xs.view(np.uint8), x[order // k].view(np.uint8))
        record(f"permute {nm(dt)} T={Tp} H={H}", ok and xs.dtype == dt)
        wr = rng.random((Tp, k)).astype(dt)
        y = numoe.unpermute(dev(xs), plan, dev(wr))
        want = ref.unpermute(xs.astype(np.float64), plan_h, wr.astype(np.float64))
        e = rel(h(y), want)
        record(f"unpermute {nm(dt)}", e < TOL[dt] and h(y).dtype == dt, rel=e)


def _cupy_ffn(xs, off, wg, wu, wd, act="silu", bg=None, bu=None, bd=None, limit=None,
              alpha=1.702):
    """float32 (or float64) per-expert reference through CuPy on the widened values."""
    try:
        import cupy as cp
    except ImportError:          # the simulator smoke test: NumPy
        cp = np
        cp.asnumpy = np.asarray
    ct = np.float64 if xs.dtype == F64 else np.float32
    X_ = cp.asarray(xs.astype(ct))
    out = cp.zeros((xs.shape[0], wd.shape[2]), ct)
    for e in range(wg.shape[0]):
        lo, hi = int(off[e]), int(off[e + 1])
        if hi == lo:
            continue
        g = X_[lo:hi] @ cp.asarray(wg[e].astype(ct))
        if bg is not None:
            g += cp.asarray(bg[e].astype(ct))
        if wu is not None:
            u = X_[lo:hi] @ cp.asarray(wu[e].astype(ct))
            if bu is not None:
                u += cp.asarray(bu[e].astype(ct))
            if act == "swiglu_oai":
                g = cp.minimum(g, limit)
                u = cp.clip(u, -limit, limit)
                hh = (u + 1) * g / (1 + cp.exp(-alpha * g))
            else:
                hh = g / (1 + cp.exp(-g)) * u
        else:
            hh = cp.maximum(g, 0)
        y = hh @ cp.asarray(wd[e].astype(ct))
        if bd is not None:
            y += cp.asarray(bd[e].astype(ct))
        out[lo:hi] = y
    return cp.asnumpy(out)


@section
def experts(N=32768, E=64, H=2048, F=1024):
    from numoe._cuda import mma
    rng = np.random.default_rng(3)
    counts = rng.multinomial(N, rng.dirichlet(np.ones(E) * 2))
    counts[5] = 0
    counts[7] = 3                       # a few-row expert: the skinny kernels
    counts[0] += N - counts.sum()
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    xs0 = rng.standard_normal((N, H))
    wg0 = rng.standard_normal((E, H, F)) / np.sqrt(H)
    wu0 = rng.standard_normal((E, H, F)) / np.sqrt(H)
    wd0 = rng.standard_normal((E, F, H)) / np.sqrt(F)
    cases = [(BF16, BF16, None), (BF16, BF16, "numba"), (F16, F16, None),
             (F32, BF16, None), (F32, F32, None), (F32, F32, "numba")]
    for xdt, wdt, gemm in cases:
        xs, wg, wu, wd = xs0.astype(xdt), wg0.astype(wdt), wu0.astype(wdt), wd0.astype(wdt)
        want = _cupy_ffn(xs, off, wg, wu, wd)
        dx, dg, du, dd, do = dev(xs), dev(wg), dev(wu), dev(wd), dev(off)
        opts = numoe.experts._check_expert_options("silu", None, 1.702, True)
        out = A.empty((N, H), xdt)
        X.run_ffn(dx, None, 0, do, N, dg, du, dd, None, None, None, opts.code, opts.limit,
                  opts.alpha, out, None, None, gemm=gemm)
        path = dict(X.last_path)
        e = rel(h(out), want)
        tag = f"expert_ffn x={nm(xdt)} w={nm(wdt)} gemm={gemm or 'auto'}"
        record(tag, e < TOL[xdt], rel=e, path=f"{path.get('gemm')}:{path.get('up')}",
               mma_error=str(mma.ERROR))
        y = numoe.expert_ffn(dx, do, dg, du, dd)
        record(tag + " public", rel(h(y), want) < TOL[xdt], rel=rel(h(y), want))
        del dg, du, dd
    # biases + gpt-oss activation, plain relu FFN, on the tensor cores (smaller)
    if N < 4096:
        return
    n2, E2 = 4096, 8
    off2 = np.array([0, 1000, 1000, 1500, 2600, 2610, 3000, 3900, 4096], np.int64)
    xs = rng.standard_normal((n2, 512)).astype(BF16)
    wg = (rng.standard_normal((E2, 512, 256)) / 20).astype(BF16)
    wu = (rng.standard_normal((E2, 512, 256)) / 20).astype(BF16)
    wd = (rng.standard_normal((E2, 256, 512)) / 16).astype(BF16)
    bg, bu, bd = (rng.standard_normal(s).astype(np.float32) * 0.1
                  for s in ((E2, 256), (E2, 256), (E2, 512)))
    want = _cupy_ffn(xs, off2, wg, wu, wd, "swiglu_oai", bg, bu, bd, limit=1.5)
    y = numoe.expert_ffn(dev(xs), dev(off2), dev(wg), dev(wu), dev(wd), activation="swiglu_oai",
                         b_gate=dev(bg), b_up=dev(bu), b_down=dev(bd), limit=1.5)
    record("expert_ffn bf16 swiglu_oai+biases", rel(h(y), want) < TOL[BF16],
           rel=rel(h(y), want), path=X.last_path.get("gemm"))
    want = _cupy_ffn(xs, off2, wg, None, wd, "relu")
    y = numoe.expert_ffn(dev(xs), dev(off2), dev(wg), None, dev(wd), activation="relu")
    record("expert_ffn bf16 plain relu", rel(h(y), want) < TOL[BF16], rel=rel(h(y), want),
           path=X.last_path.get("gemm"))


@section
def losses(T=65536, E=64, k=8):
    rng = np.random.default_rng(4)
    z0 = rng.standard_normal((T, E))
    ex = rng.integers(0, E, size=(T, k)).astype(np.int32)
    mask = rng.random(T) < 0.8
    for dt in ALL:
        z = z0.astype(dt)
        p = ref.router_probs(z.astype(np.float64)).astype(dt)
        a = numoe.load_balancing_loss(dev(p), dev(ex), mask=dev(mask))
        b = ref.load_balancing_loss(p.astype(np.float64), ex, mask=mask)
        c = numoe.router_z_loss(dev(z))
        d = ref.router_z_loss(z.astype(np.float64))
        ok = abs(a - b) <= 1e-6 * abs(b) and abs(c - d) <= 1e-6 * abs(d)
        record(f"losses {nm(dt)}", ok, lb=abs(a - b) / abs(b), z=abs(c - d) / abs(d))


def _olmoe_cfg(E=64, k=8, H=2048, F=1024):
    return numoe.MoEConfig.olmoe(num_experts=E, top_k=k, hidden_dim=H, expert_dim=F)


def _stand_in(layer, dt):
    """The device-layer attributes moe.forward reads, weights stored in ``dt``."""
    from types import SimpleNamespace
    w = layer.weights()
    d = {n: None if w.get(n) is None else dev(np.asarray(w[n]).astype(dt))
         for n in ("router", "w_gate", "w_up", "w_down")}
    return SimpleNamespace(config=layer.config, router_bias=None, selection_bias=None,
                           b_gate=None, b_up=None, b_down=None, shared_gate_weight=None,
                           _dev={}, **d)


@section
def layer_checks(T=4096):
    cfg = _olmoe_cfg() if T > 64 else _olmoe_cfg(8, 2, 16, 8)
    host = numoe.MoELayer.random(cfg, seed=0)
    x0 = np.random.default_rng(5).standard_normal((T, cfg.hidden_dim))
    for dt in (BF16, F16):
        lay = _stand_in(host, dt)
        # the float32 twin of the same rounded weights and inputs
        lay32 = _stand_in(host, dt)
        for n in ("router", "w_gate", "w_up", "w_down"):
            setattr(lay32, n, dev(h(getattr(lay, n)).astype(np.float32)))
        x = x0.astype(dt)
        y = moe.forward(lay, dev(x))
        y32 = moe.forward(lay32, dev(x.astype(np.float32)))
        e = rel(h(y), h(y32))
        record(f"fused layer {nm(dt)} vs float32 on the same rounded values", e < TOL[dt],
               rel=e, path=X.last_path.get("gemm"))
    # the public layer with 16-bit weights (if the host layer offers weight_dtype)
    try:
        lb = numoe.MoELayer.random(cfg, seed=0, dtype=BF16, weight_dtype=BF16)
    except TypeError as exc:
        RES["notes"].append(f"MoELayer.random(weight_dtype=...) unavailable: {exc}")
        say(f"  (skip public bf16 layer: {exc})")
        return
    xb = x0[:64].astype(BF16)
    yh = lb(xb)
    yd = lb.to_device()(dev(xb))
    e = rel(h(yd), yh)
    record("public MoELayer bf16 to_device() vs host layer", e < TOL[BF16], rel=e)
    try:
        import torch
        if not torch.cuda.is_available():
            return
        xt = torch.from_numpy(xb.view(np.int16)).to("cuda").view(torch.bfloat16)
        yt = lb.to_device()(xt)
        record("public MoELayer bf16, torch bfloat16 input", rel(h(yt), yh) < TOL[BF16],
               rel=rel(h(yt), yh))
    except ImportError:
        pass


# ----------------------------------------------------------------- timings
_HF = {}


def _hf_times(host, fam, x, dt, budget):
    """HF block of ``fam`` in ``dt`` on the GPU: {impl: (seconds, output)}."""
    import torch
    from numoe import bench as CB
    out = {}
    if not torch.cuda.is_available():
        return out
    torch.backends.cuda.matmul.allow_tf32 = False
    key = (id(host), dt)
    if key not in _HF:
        try:
            block, call = CB.hf_block(host, fam, dt)
        except Exception as exc:  # noqa: BLE001
            RES["notes"].append(f"HF block: {type(exc).__name__}: {exc}")
            return out
        _HF[key] = (block.to("cuda"), call)
    block, call = _HF[key]
    tdt = {BF16: torch.bfloat16, F16: torch.float16, F32: torch.float32}[dt]
    xt = torch.from_numpy(np.asarray(x, np.float32)).to("cuda").to(tdt)
    impls = ["eager"] + (["grouped_mm"] if CB._has_grouped_mm() else [])
    with torch.inference_mode():
        for impl in impls:
            block.experts.config._experts_implementation = impl
            try:
                t, _, y = B.timeit(lambda: call(xt), None, budget)
                out[impl] = (t, y.float().cpu().numpy())
            except Exception as exc:  # noqa: BLE001
                RES["notes"].append(f"HF {impl} {nm(dt)}: {str(exc)[:120]}")
    return out


@section
def layer_timings(budget, Ts=(1, 4, 16, 64, 512, 4096), small=False, qwen=True):
    bw = B.copy_bandwidth()
    RES["copy_GBps"] = bw / 1e9
    say(f"  copy bandwidth {bw / 1e9:.0f} GB/s")
    if small:
        rows = [("olmoe", _olmoe_cfg(8, 2, 16, 8), T) for T in Ts]
    else:
        rows = [("olmoe", _olmoe_cfg(), T) for T in Ts]
        if qwen:
            rows.append(("qwen3_moe", numoe.MoEConfig.qwen3_moe(
                num_experts=128, top_k=8, hidden_dim=2048, expert_dim=768), 512))
    cache = {}
    for fam, cfg, T in rows:
        key = (fam, cfg.num_experts)
        if key not in cache:
            host = numoe.MoELayer.random(cfg, seed=0)
            cache.clear()
            _HF.clear()
            cache[key] = (host, _stand_in(host, BF16), _stand_in(host, F32))
        host, lb, l32 = cache[key]
        x = np.random.default_rng(T).standard_normal((T, cfg.hidden_dim))
        xb, x32 = dev(x.astype(BF16)), dev(x.astype(np.float32))
        r = dict(family=fam, T=T, E=cfg.num_experts, k=cfg.top_k, H=cfg.hidden_dim,
                 F=cfg.expert_dim)
        t, _, y = B.timeit(lambda: moe.forward(lb, xb), None, budget)
        r["numoe_bf16_ms"], r["path"] = t * 1e3, X.last_path.get("gemm")
        state = [v for kk, v in getattr(lb, "_graphs", {}).items() if kk[0] == tuple(xb.shape)]
        if state and isinstance(state[0], G._Graph):
            r["path"] = "graph"
            t, _, ye = B.timeit(lambda: moe.forward(lb, xb, graph=False), None, budget)
            r["numoe_bf16_eager_ms"] = t * 1e3
            r["graph_eq_eager"] = bool(np.array_equal(h(y).view(np.uint16), h(ye).view(np.uint16)))
            r["arena_MB"] = G._ARENA[0].size / 2**20 if G._ARENA[0] is not None else 0.0
        yb = h(y).astype(np.float64)
        t, _, _ = B.timeit(lambda: moe.forward(lb, xb, gemm="numba"), None, budget)
        r["numoe_bf16_numba_ms"] = t * 1e3
        t, _, y32 = B.timeit(lambda: moe.forward(l32, x32), None, budget)
        r["numoe_f32_ms"] = t * 1e3
        if G.captured(l32):
            t, _, _ = B.timeit(lambda: moe.forward(l32, x32, graph=False), None, budget)
            r["numoe_f32_eager_ms"] = t * 1e3
        _, (_lg, _rt, plan) = moe.forward(lb, xb, return_parts=True)
        touched = int((h(plan.counts) > 0).sum())
        wbytes = touched * 3 * cfg.hidden_dim * cfg.expert_dim * 2
        r["floor_bf16_ms"] = wbytes / bw * 1e3
        r["numoe_over_floor"] = r["numoe_bf16_ms"] / r["floor_bf16_ms"]
        r["err_bf16_vs_f32"] = rel(yb, h(y32))
        for impl, (th, yh) in _hf_times(host, fam, x, BF16, budget).items():
            r[f"hf_bf16_{impl}_ms"] = th * 1e3
            r[f"hf_bf16_{impl}_err_vs_numoe_f32"] = rel(yh, h(y32))
        for impl, (th, _yh) in _hf_times(host, fam, x, F32, budget).items():
            r[f"hf_f32_{impl}_ms"] = th * 1e3
        best = min([v for kk, v in r.items() if kk.startswith("hf_bf16_") and kk.endswith("ms")]
                   or [float("nan")])
        r["hf_bf16_best_over_numoe"] = best / r["numoe_bf16_ms"]
        if state and not isinstance(state[0], G._Graph):
            r["graph_state"] = state[0]
            r["graph_failures"] = list(G.FAILURES[-2:])
        RES["timings"].append(r)
        say("  " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in r.items()))


@section
def routing_timings(budget, T=262144):
    for dt in ("bfloat16", "float32"):
        rows = B.run_routing(T=T, dtype=BF16 if dt == "bfloat16" else np.float32, budget=budget)
        for r in rows:
            r["dtype"] = dt
        RES.setdefault("routing", []).extend(rows)
        say(B.format_routing(rows))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--no-time", action="store_true")
    p.add_argument("--budget", type=float, default=0.4)
    p.add_argument("--only", default="")
    p.add_argument("--small", action="store_true")
    p.add_argument("--Ts", default="1,4,16,64,512,4096", help="token counts of the layer rows")
    p.add_argument("--no-qwen", action="store_true", help="layer rows: OLMoE only")
    a = p.parse_args()
    say(f"numoe gpu_bf16 {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} on "
        f"{A.device_name()}")
    RES["device"] = A.device_name()
    RES["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    # --small: tiny sizes, for a smoke test of this script under the CUDA simulator
    small = a.small
    sizes = {
        "widen_narrow": dict(step=251, nrand=64) if small else {},
        "routing": dict(T=64, E=8, k=2) if small else {},
        "dispatch": dict(T=64, k=2, E=8, H=16) if small else {},
        "experts": dict(N=300, E=8, H=16, F=8) if small else {},
        "losses": dict(T=64, E=8, k=2) if small else {},
        "layer_checks": dict(T=16) if small else {},
    }
    steps = [widen_narrow, routing, dispatch, experts, losses, layer_checks]
    names = [s for s in a.only.split(",") if s]
    for s in steps:
        if not names or s.__name__ in names:
            s(**sizes.get(s.__name__, {}))
    if not a.no_time:
        if not names or "layer_timings" in names:
            layer_timings(a.budget, **(dict(Ts=(2,), small=True) if small else dict(
                Ts=tuple(int(v) for v in a.Ts.split(",")), qwen=not a.no_qwen)))
        if not names or "routing_timings" in names:
            routing_timings(a.budget, **(dict(T=256) if small else {}))
    with open(os.path.join(OUT, "bf16.json"), "w") as fh:
        json.dump(RES, fh, indent=1, default=str)
    bad = [c for c in RES["checks"] if not c["ok"]]
    say(f"\n{len(RES['checks']) - len(bad)} checks passed, {len(bad)} failed")
    for c in bad:
        say(f"  FAILED {c}")
    cols = ["T", "numoe_bf16_ms", "numoe_bf16_eager_ms", "numoe_bf16_numba_ms", "numoe_f32_ms",
            "numoe_f32_eager_ms", "hf_bf16_grouped_mm_ms",
            "hf_bf16_eager_ms", "hf_f32_grouped_mm_ms", "floor_bf16_ms", "numoe_over_floor",
            "hf_bf16_best_over_numoe", "path"]
    say(" | ".join(["family"] + cols))
    for r in RES["timings"]:
        say(" | ".join([r["family"]] + [f"{r.get(c):.3f}" if isinstance(r.get(c), float)
                                        else str(r.get(c)) for c in cols]))
    for n in RES["notes"]:
        say("note:", n)
    for n in G.FAILURES:
        say("graph capture failed:", n)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
