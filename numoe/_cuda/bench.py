"""GPU benchmarks behind ``numoe bench --device cuda``.

:func:`run` -- the layer table of the CPU suite, on the GPU, float32 by
default: numoe (the fused device forward of :mod:`numoe._cuda.moe`, and the
public-op chain ``layer(x)``) against the equivalent Hugging Face
transformers MoE block on the same GPU (eager and ``grouped_mm`` experts),
each with its error against the float64 NumPy reference. ``%BLAS`` is the
share of the cuBLAS rate measured here (``torch.matmul`` 8192^3, TF32 off).

:func:`run_routing` -- route / dispatch_plan / permute / unpermute at a
large token count (default T=262144), in GB/s of the bytes each op must
move, against the device-to-device copy bandwidth measured in the same run.

Times are medians of synchronised wall-clock calls after a warm-up call
(which compiles): Python launch overhead is included.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
from numba import cuda

from . import _arrays as A


# ------------------------------------------------------------------ timing
def _sync():
    cuda.synchronize()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ImportError:  # pragma: no cover
        pass


def timeit(fn, repeat=None, budget=1.0, min_runs=5, max_runs=200):
    """Median seconds of ``fn()`` (synchronised), after one warm-up call; also the result."""
    out = fn()
    _sync()
    times = []
    t_end = time.perf_counter() + budget
    n = repeat or max_runs
    for i in range(n):
        t0 = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t0)
        if repeat is None and i + 1 >= min_runs and time.perf_counter() > t_end:
            break
    return statistics.median(times), len(times), out


def copy_bandwidth(nbytes=2 << 30):
    """Device-to-device copy rate in bytes/s (read + write counted)."""
    if A.SIM:
        nbytes = 1 << 12
    n = nbytes // 4
    src = A.empty((n,), np.float32)
    A._fill[A.grid(n, 256), 256](src, 1.0)
    dst = A.empty((n,), np.float32)
    t, _, _ = timeit(lambda: dst.copy_to_device(src), budget=1.0)
    return 2 * nbytes / t


def cublas_gflops(n=8192):
    """float32 GEMM rate of cuBLAS through PyTorch (TF32 off), GFLOP/s; None without torch."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    t, _, _ = timeit(lambda: a @ b, budget=1.0)
    return 2 * n ** 3 / t / 1e9


def rel_err(y, ref):
    y = np.asarray(y, dtype=np.float64)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-300))


# ------------------------------------------------------------- layer table
def run(shapes=None, *, dtype="float32", repeat=None, progress=None, rows=None, budget=1.0,
        hf=True, gemm=None, peak=None, bw=None):
    """The layer table on the GPU (rows of ``numoe.bench.ROWS`` by name, or ``rows``).

    Returns a list of dicts with the keys of the CPU layer table plus
    ``fused_s`` / ``layer_s`` (the two numoe paths), ``gemm_path`` (which
    expert GEMM kernels ran) and ``device``.
    """
    from .. import bench as B
    from .. import reference
    import numoe

    say = progress if callable(progress) else (lambda m: None)
    if rows is None:
        rows = B.select_rows(shapes)
    dt = np.dtype(dtype).type
    say(f"device: {A.device_name()}; measuring the cuBLAS float32 rate and copy bandwidth ...")
    peak = cublas_gflops() if peak is None else peak
    bw = copy_bandwidth() if bw is None else bw
    hf_reason = B.hf_available() if hf else "not requested"
    out = []
    for i, row in enumerate(rows, 1):
        say(f"[{i}/{len(rows)}] {row.name}: T={row.T} E={row.E} k={row.k} H={row.H} "
            f"F={row.F} ...")
        out.append(_row(B, reference, numoe, row, dt, repeat, budget, peak, hf_reason, gemm, bw))
        r = out[-1]
        say(f"    numoe {r['numoe_s'] * 1e3:.3f} ms ({r['gemm_path']}), err "
            f"{r['rel_err']:.1e}; HF grouped {_ms(r['hf_grouped_s'])}, eager "
            f"{_ms(r['hf_eager_s'])}")
    return out


def _ms(v):
    return "n/a" if v is None else f"{v * 1e3:.3f} ms"


def _row(B, reference, numoe, row, dt, repeat, budget, peak, hf_reason, gemm, bw):
    from . import experts as X
    from . import moe

    layer = numoe.MoELayer.random(B.build_config(row), seed=0, dtype=dt)
    x = np.random.default_rng(1).standard_normal((row.T, row.H)).astype(dt)
    kw = dict(layer.weights(), top_k=layer.config.top_k)
    t0 = time.perf_counter()
    ref = reference.moe_forward(x, **kw)
    t_ref = time.perf_counter() - t0
    dl = layer.to_device()
    xd = A.to_device(x)
    t, n, y = timeit(lambda: moe.forward(dl, xd, gemm=gemm), repeat, budget)
    path = dict(X.last_path)
    _, (_lg, _rt, plan) = moe.forward(dl, xd, gemm=gemm, return_parts=True)
    touched = int((plan.counts.copy_to_host() > 0).sum())
    wbytes = touched * B.expert_bytes(layer)
    floor = wbytes / bw
    flops = B.layer_flops(layer, row.T)
    res = dict(name=row.name, preset=row.preset, T=row.T, E=row.E, k=row.k, H=row.H,
               F=row.F, dtype=np.dtype(dt).name, device=A.device_name(),
               rel_err=rel_err(y.copy_to_host(), ref), numoe_s=t, fused_s=t, numoe_runs=n,
               tokens_per_s=row.T / t, gflops=flops / t / 1e9,
               pct_blas=None if peak is None else 100.0 * flops / t / 1e9 / peak,
               blas_gflops=peak, ref_s=t_ref, layer_s=None, layer_err=None,
               gemm_path=f"{path.get('up', '?')}/{path.get('gemm', '?')}",
               hf_eager_s=None, hf_grouped_s=None, hf_err=None, speedup=None, notes=[],
               touched_experts=touched, weight_bytes=wbytes, floor_s=floor,
               copy_GBps=bw / 1e9, numba_gemm_s=None)
    res["notes"].append("ref ms: the float64 NumPy reference on the host CPU, one call")
    from . import graph as Gr

    if Gr.captured(dl):
        te, _, _ = timeit(lambda: moe.forward(dl, xd, gemm=gemm, graph=False), repeat, budget)
        res["gemm_path"] += "+graph"
        res["eager_s"] = te
        res["notes"].append(f"numoe ms: replays of a captured CUDA graph; the same forward "
                            f"launched eagerly: {te * 1e3:.3f} ms")
    res["notes"].append(f"expert GEMMs: {res['gemm_path']}; touched experts {touched}, "
                        f"weights read once at copy bandwidth ({bw / 1e9:.0f} GB/s): "
                        f"{floor * 1e3:.3f} ms = floor; numoe/floor {t / floor:.2f}x")
    if path.get("gemm") == "cublas" and "cublas" in path.get("up", ""):
        tn, _, _ = timeit(lambda: moe.forward(dl, xd, gemm="numba"), repeat, budget)
        res["numba_gemm_s"] = tn
        res["notes"].append(f"numba-only expert GEMMs: {tn * 1e3:.3f} ms")
    try:
        tl, _, yl = timeit(lambda: dl(xd), repeat, budget)
        res["layer_s"] = tl
        res["layer_err"] = rel_err(A.as_device("y", yl).copy_to_host(), ref)
        res["notes"].append(f"public-op layer(x): {tl * 1e3:.3f} ms "
                            f"(err {res['layer_err']:.1e})")
    except Exception as exc:  # noqa: BLE001 - report, keep going
        res["notes"].append(f"layer(x) on the device failed: {type(exc).__name__}: {exc}")
    if hf_reason is not None:
        res["notes"].append(f"HF: {hf_reason}")
    else:
        _hf(B, layer, row, x, ref, dt, repeat, budget, res)
    best = min((v for v in (res["hf_eager_s"], res["hf_grouped_s"]) if v is not None),
               default=None)
    res["speedup"] = None if best is None else best / t
    return res


def _hf(B, layer, row, x, ref, dt, repeat, budget, res):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        block, call = B.hf_block(layer, row.preset, dt)
    except (ValueError, ImportError) as exc:
        res["notes"].append(f"HF: {exc}")
        return
    try:
        block = block.to("cuda")
    except (RuntimeError, AssertionError) as exc:      # a CPU-only PyTorch build
        res["notes"].append(f"HF: PyTorch cannot use the GPU: {str(exc).splitlines()[0]}")
        return
    xt = torch.from_numpy(x).to("cuda")
    impls = ["eager"] + (["grouped_mm"] if B._has_grouped_mm() else [])
    err = None
    with torch.inference_mode():
        for impl in impls:
            block.experts.config._experts_implementation = impl
            try:
                t, _, y = timeit(lambda: call(xt), repeat, budget)
            except (RuntimeError, ValueError, NotImplementedError) as exc:
                res["notes"].append(f"HF {impl}: {str(exc).splitlines()[0][:120]}")
                continue
            res["hf_eager_s" if impl == "eager" else "hf_grouped_s"] = t
            e = rel_err(y.cpu().numpy(), ref)
            err = e if err is None else max(err, e)
    res["hf_err"] = err


# ------------------------------------------------------------ routing table
def run_routing(T=262144, E=64, k=8, H=1024, *, dtype="float32", repeat=None, budget=1.0,
                progress=None):
    """route / dispatch_plan / permute / unpermute at ``T`` tokens, in GB/s.

    Bytes counted per op (each input read once, each output written once):
    route ``T*E*s + T*k*(s+4)``; dispatch_plan ``T*k*4`` in, ``T*k*(4+1)``
    out; permute ``2*N*H*s`` (+ order); unpermute ``N*H*s + T*H*s`` (+
    weights, order). ``%copy`` is against the device-to-device copy rate
    measured here. The ``fused`` rows skip the argument validation that the
    public calls do on every call.
    """
    from . import dispatch as D
    from . import routing as R

    say = progress if callable(progress) else (lambda m: None)
    dt = np.dtype(dtype)
    s = dt.itemsize
    bw = copy_bandwidth()
    say(f"device: {A.device_name()}; copy {bw / 1e9:.0f} GB/s")
    rng = np.random.default_rng(0)
    z = A.to_device(rng.standard_normal((T, E)).astype(dt))
    r = R.route(z, k)
    N = T * k
    rows = []

    def add(op, t, nbytes, note=""):
        rows.append(dict(op=op, T=T, E=E, k=k, H=H, ms=t * 1e3, GBps=nbytes / t / 1e9,
                         pct_copy=100.0 * nbytes / t / bw, note=note))
        say(f"  {op:24s} {t * 1e3:8.3f} ms  {nbytes / t / 1e9:7.0f} GB/s  "
            f"{100.0 * nbytes / t / bw:5.1f}% of copy")

    t, _, _ = timeit(lambda: R.route(z, k), repeat, budget)
    add("route", t, T * E * s + T * k * (s + 4))
    t, _, _ = timeit(lambda: R.route_async(z, k), repeat, budget)
    add("route (fused)", t, T * E * s + T * k * (s + 4), "no status read-back")
    t, _, plan = timeit(lambda: D.dispatch_plan(r.experts, E), repeat, budget)
    add("dispatch_plan", t, T * k * 4 + T * k * 5)
    flat = A.reshape(r.experts, (N,))
    t, _, _ = timeit(lambda: D.multisplit(flat, E), repeat, budget)
    add("dispatch_plan (fused)", t, T * k * 4 + T * k * 4, "no id check, no dropped mask")
    x = A.to_device(rng.standard_normal((T, H)).astype(dt))
    xs = A.empty((N, H), dt)
    t, _, _ = timeit(lambda: D.permute(x, plan, out=xs), repeat, budget)
    add("permute", t, 2 * N * H * s + N * 4)
    t, _, _ = timeit(lambda: D.gather_rows(x, plan.order, k, xs), repeat, budget)
    add("permute (fused)", t, 2 * N * H * s + N * 4, "no plan check")
    y = A.empty((T, H), dt)
    t, _, _ = timeit(lambda: D.unpermute(xs, plan, r.weights, out=y), repeat, budget)
    add("unpermute", t, N * H * s + T * H * s + N * (s + 8))
    pos = D.inverse_positions(plan.order, plan.dropped)
    w = r.weights
    t, _, _ = timeit(lambda: D.combine(xs, pos, w, k, y), repeat, budget)
    add("unpermute (fused)", t, N * H * s + T * H * s + N * (s + 8), "inverse positions given")
    for row in rows:
        row["copy_GBps"] = bw / 1e9
        row["device"] = A.device_name()
    return rows


def format_routing(rows):
    """The routing rows as a text table."""
    head = f"{'op':24s} {'T':>7s} {'E':>4s} {'k':>2s} {'H':>5s} {'ms':>9s} {'GB/s':>7s} " \
           f"{'%copy':>6s}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['op']:24s} {r['T']:7d} {r['E']:4d} {r['k']:2d} {r['H']:5d} "
                     f"{r['ms']:9.3f} {r['GBps']:7.0f} {r['pct_copy']:5.1f}%  {r['note']}")
    return "\n".join(lines)
