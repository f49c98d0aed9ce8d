"""Full-size check of every CUDA backward op against the host backward ops.

Run on a GPU machine::

    python tools/gpu_backward_check.py                  # T=4096 E=64 k=8 H=1024 F=512
    python tools/gpu_backward_check.py --dtypes float32,float64,bfloat16 --time
    python tools/gpu_backward_check.py --only expert_ffn,layer

or, to check that the script itself works, under the simulator at tiny sizes::

    NUMBA_ENABLE_CUDASIM=1 python tools/gpu_backward_check.py --tiny

Each check draws random inputs (with ties and masked ``-inf`` logits where
they matter), runs the public backward call on device arrays and on the same
host arrays, and prints per output the max abs error and the max error
relative to the host result's largest entry, then PASS/FAIL against a
per-dtype tolerance. Each device op also runs twice: the results must be
bit-identical (no atomics in the float reductions). ``--time`` adds the
median time of synchronised device calls and of the host call. A JSON
summary goes to ``$OUT/gpu_backward_check.json`` (or ./). Exit status 1 if
anything failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numoe  # noqa: E402

# max error relative to the largest host entry, per dtype of the compared output
TOL = {"float64": 1e-9, "float32": 2e-4, "float16": 1e-2, "bfloat16": 4e-2}
DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
          "bfloat16": ml_dtypes.bfloat16}
RESULTS = []


def _dev(a):
    from numoe._cuda import _arrays as A     # bfloat16 too (numba's own copy refuses it)

    return None if a is None else A.to_device(np.ascontiguousarray(a))


def _host(a):
    from numoe._cuda import _arrays as A

    return A.to_host(a) if hasattr(a, "copy_to_host") else np.asarray(a)


def _sync():
    from numba import cuda

    cuda.synchronize()


def _errors(got, want):
    g = _host(got).astype(np.float64)
    w = np.asarray(want).astype(np.float64)
    if g.shape != w.shape:
        return np.inf, np.inf
    if not w.size:
        return 0.0, 0.0
    err = float(np.abs(g - w).max())
    return err, err / max(float(np.abs(w).max()), 1e-30)


def _outputs(r):
    """Named array outputs of a backward op's result."""
    if isinstance(r, dict):                  # layer.backward
        return dict(r)
    if isinstance(r, numoe.ExpertGrads):
        return {k: v for k, v in r._asdict().items() if v is not None}
    if isinstance(r, tuple):
        return {f"out{i}": v for i, v in enumerate(r)}
    return {"out": r}


def _median_time(fn, reps):
    ts = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def wanted(args, name):
    """Whether ``--only`` selects the check ``name``."""
    return not args.only or any(o in name for o in args.only.split(","))


def run_case(name, dtype, dev_call, host_call, args):
    """Compare ``dev_call()`` with ``host_call()``; record and print one line per output."""
    label = f"{name} [{np.dtype(dtype).name}]"
    if not wanted(args, name):
        return
    try:
        got = _outputs(dev_call())
        again = _outputs(dev_call())
        t_host = time.perf_counter()
        want = _outputs(host_call())
        t_host = time.perf_counter() - t_host
        for key in want:
            abs_err, rel_err = _errors(got[key], want[key])
            same = np.array_equal(_host(got[key]).view(np.uint8),
                                  _host(again[key]).view(np.uint8))
            gdt, wdt = _host(got[key]).dtype, np.asarray(want[key]).dtype
            tol = max(TOL[np.dtype(gdt).name], TOL[np.dtype(wdt).name])
            ok = rel_err <= tol and same and gdt == wdt
            rec = dict(name=label, output=key, ok=bool(ok), max_abs=abs_err, max_rel=rel_err,
                       tol=tol, deterministic=bool(same), dtype=np.dtype(gdt).name,
                       host_dtype=np.dtype(wdt).name)
            RESULTS.append(rec)
            note = "" if same else " NOT DETERMINISTIC"
            if gdt != wdt:
                note += f" DTYPE device {np.dtype(gdt).name} != host {np.dtype(wdt).name}"
            print(f"{'PASS' if ok else 'FAIL'} {label:44s} {key:9s} max_abs={abs_err:.3g} "
                  f"max_rel={rel_err:.3g} (tol {tol:g}){note}", flush=True)
        if args.time:
            t_dev = _median_time(dev_call, args.reps)
            RESULTS.append(dict(name=label, output="time", ok=True, device_s=t_dev,
                                host_s=t_host))
            print(f"     {label:44s} device {t_dev * 1e3:.3f} ms, host {t_host * 1e3:.3f} ms "
                  "(host: one call)", flush=True)
    except Exception as exc:  # noqa: BLE001 - report and go on
        traceback.print_exc()
        RESULTS.append(dict(name=label, output="-", ok=False,
                            error=f"{type(exc).__name__}: {exc}"[:300]))
        print(f"FAIL {label:44s} {type(exc).__name__}: {exc}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (simulator smoke run)")
    ap.add_argument("--dtypes", default="float32,float64",
                    help="comma-separated: float32,float64,float16,bfloat16")
    ap.add_argument("--time", action="store_true", help="also time device and host calls")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="",
                    help="comma-separated substrings: run only the checks whose name has one "
                         "(e.g. expert_ffn,layer)")
    args = ap.parse_args(argv)
    if args.tiny:
        T, E, k, H, F, n_groups = 16, 4, 2, 8, 4, 2
    else:
        T, E, k, H, F, n_groups = 4096, 64, 8, 1024, 512, 8
    print(f"numoe backward ops, device vs host: T={T} E={E} k={k} H={H} F={F}; "
          f"backends {numoe.backends()}", flush=True)
    rng = np.random.default_rng(args.seed)
    for dname in args.dtypes.split(","):
        dt = DTYPES[dname.strip()]
        check_dtype(rng, dt, T, E, k, H, F, n_groups, args)
    n_fail = sum(not r["ok"] for r in RESULTS)
    out = os.path.join(os.environ.get("OUT", "."), "gpu_backward_check.json")
    with open(out, "w") as fh:
        json.dump(dict(sizes=dict(T=T, E=E, k=k, H=H, F=F), backends=numoe.backends(),
                       results=RESULTS), fh, indent=1)
    print(f"{len(RESULTS)} records, {n_fail} failed; summary in {out}", flush=True)
    return 1 if n_fail else 0


def check_dtype(rng, dt, T, E, k, H, F, n_groups, args):
    d = _dev
    z = (rng.standard_normal((T, E)) * 2).astype(dt)
    z[:8] = np.round(z[:8])                   # ties
    z[8:12, : E // 2] = -np.inf               # masked experts
    mask = rng.random(T) < 0.9

    # routing
    for score in ("softmax", "sigmoid"):
        g = rng.standard_normal((T, E)).astype(dt)
        run_case(f"router_probs_backward {score}", dt,
                 lambda: numoe.router_probs_backward(d(z), d(g), score=score),
                 lambda: numoe.router_probs_backward(z, g, score=score), args)
    for label, rkw, bkw in [
            ("softmax renorm", {}, {}),
            ("sigmoid grouped bias", dict(bias=rng.standard_normal(E) * 0.1,
                                          n_groups=n_groups, topk_groups=n_groups // 2),
             dict(score="sigmoid", renormalize=True, scale=2.5)),
            ("softmax raw", {}, dict(renormalize=False))]:
        r = numoe.route(z, k, **rkw, **bkw)
        dw = rng.standard_normal((T, k)).astype(dt)
        rd = (d(r.weights), d(r.experts))
        run_case(f"route_backward {label}", dt,
                 lambda: numoe.route_backward(d(z), rd, d(dw), **bkw),
                 lambda: numoe.route_backward(z, r, dw, **bkw), args)

    # dispatch
    r = numoe.route(z, k)
    for label, cap in (("dropless", None), ("capacity", numoe.capacity(T, E, k, 1.0))):
        plan = numoe.dispatch_plan(r.experts, E, capacity=cap)
        dplan = numoe.DispatchPlan(d(plan.order), d(plan.offsets), d(plan.counts),
                                   d(plan.dropped), plan.capacity)
        N = len(plan.order)
        d_xs = rng.standard_normal((N, H)).astype(dt)
        run_case(f"permute_backward {label}", dt,
                 lambda: numoe.permute_backward(d(d_xs), dplan),
                 lambda: numoe.permute_backward(d_xs, plan), args)
        d_y = rng.standard_normal((T, H)).astype(dt)
        ys = rng.standard_normal((N, H)).astype(dt)
        run_case(f"unpermute_backward {label}", dt,
                 lambda: numoe.unpermute_backward(d(d_y), d(ys), dplan, d(r.weights)),
                 lambda: numoe.unpermute_backward(d_y, ys, plan, r.weights), args)

    # experts (rows grouped by the dropless plan)
    plan = numoe.dispatch_plan(r.experts, E)
    x = rng.standard_normal((T, H)).astype(dt)
    xs = numoe.permute(x, plan)
    off = plan.offsets
    d_ys = rng.standard_normal(xs.shape).astype(dt)
    sc = 1.0 / np.sqrt(H)
    for label, glu, act, bias, limit in [("silu glu bias", True, "silu", True, None),
                                         ("swiglu_oai limit 7", True, "swiglu_oai", True, 7.0),
                                         ("gelu plain", False, "gelu", False, None)]:
        wg = (rng.standard_normal((E, H, F)) * sc).astype(dt)
        wu = (rng.standard_normal((E, H, F)) * sc).astype(dt) if glu else None
        wd = (rng.standard_normal((E, F, H)) / np.sqrt(F)).astype(dt)
        b = (lambda *s: (rng.standard_normal(s) * 0.1).astype(dt)) if bias else \
            (lambda *s: None)
        bg, bu, bd = b(E, F), (b(E, F) if glu else None), b(E, H)
        kw = dict(activation=act, limit=limit)
        dev_args = [d(a) for a in (xs, off, wg, wu, wd, d_ys)]
        run_case(f"expert_ffn_backward {label}", dt,
                 lambda: numoe.expert_ffn_backward(*dev_args, b_gate=d(bg), b_up=d(bu),
                                                   b_down=d(bd), **kw),
                 lambda: numoe.expert_ffn_backward(xs, off, wg, wu, wd, d_ys, b_gate=bg,
                                                   b_up=bu, b_down=bd, **kw), args)

    # losses
    p = numoe.router_probs(z)
    for m in (None, mask):
        tag = "masked" if m is not None else "all"
        run_case(f"load_balancing_loss_backward {tag}", dt,
                 lambda: numoe.load_balancing_loss_backward(d(p), d(r.experts), mask=d(m),
                                                            d_loss=0.01),
                 lambda: numoe.load_balancing_loss_backward(p, r.experts, mask=m, d_loss=0.01),
                 args)
        run_case(f"router_z_loss_backward {tag}", dt,
                 lambda: numoe.router_z_loss_backward(d(z), mask=d(m), d_loss=1e-3),
                 lambda: numoe.router_z_loss_backward(z, mask=m, d_loss=1e-3), args)

    # the layer (device layer.backward vs the host layer's), two model families
    for preset, kw in (("olmoe", {}),
                       ("qwen2_moe", dict(num_shared_experts=1, shared_expert_dim=2 * F,
                                          router_bias=True))):
        if not wanted(args, f"layer.backward {preset}"):
            continue
        cfg = getattr(numoe.MoEConfig, preset)(num_experts=E, top_k=k, hidden_dim=H,
                                               expert_dim=F, **kw)
        layer = numoe.MoELayer.random(cfg, seed=1, dtype=dt)
        dl = layer.to_device()
        xl = rng.standard_normal((T, H)).astype(dt)
        dyl = rng.standard_normal((T, H)).astype(dt)
        coefs = dict(aux_loss_coef=0.01, z_loss_coef=1e-3)
        _, info = layer.forward(xl, return_info=True)
        xd, dyd = d(xl), d(dyl)
        _, infod = dl.forward(xd, return_info=True)
        run_case(f"layer.backward {preset}", dt,
                 lambda: dl.backward(xd, infod, dyd, **coefs),
                 lambda: layer.backward(xl, info, dyl, **coefs), args)


if __name__ == "__main__":
    sys.exit(main())
