"""Benchmark suites behind ``numoe bench`` (also usable as a library).

One registry, :data:`ROWS`, names every benchmarked layer shape (model
preset, sizes, token count); the suites below only read it.

* :func:`run_layer_suite` -- whole MoE layers: numoe vs the NumPy
  reference vs the equivalent Hugging Face transformers block (PyTorch,
  eager and ``grouped_mm`` experts), with the error against the float64
  oracle, throughput and the share of this machine's BLAS GEMM rate.
* :func:`run_routing_suite` -- route / dispatch_plan / permute / unpermute
  at a large token count against the reference, PyTorch and a plain copy.
* :func:`run_latency_suite` -- decode-sized batches: per-call latency
  percentiles against the time to read the touched expert weights once.
* :func:`run_startup` -- ``import numoe`` and the first forward in fresh
  processes, with an empty and with a warm Numba cache.

Every suite returns a list of plain ``dict`` rows (JSON-ready; ``None``
where something was not measured) and reports progress through an
optional callable. Times are medians of warm calls (the first call, which
compiles, is excluded) taken until a per-measurement time budget is spent.
"""
from __future__ import annotations

import contextlib
import datetime
import fnmatch
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np

import numoe
from numoe import reference
from numoe._jit import threads as numba_threads


# ------------------------------------------------------------------ registry
class Row(NamedTuple):
    """One benchmarked layer: a ``MoEConfig`` preset, its sizes and a token count."""

    name: str
    preset: str          # MoEConfig preset name, also the Hugging Face family
    T: int               # tokens
    E: int               # experts
    k: int               # experts per token
    H: int               # hidden size
    F: int               # expert width
    options: tuple = ()  # (field, value) pairs passed to the preset
    default: bool = True  # part of the suite that ``numoe bench`` runs


_DEEPSEEK_GROUPS = (("n_groups", 8), ("topk_groups", 4), ("num_shared_experts", 1))

ROWS = {r.name: r for r in [
    # the seed's three configurations: Mixtral-style, 8 experts, top-2
    Row("seed-32x512x1024", "mixtral", 32, 8, 2, 512, 1024),
    Row("seed-64x1024x2048", "mixtral", 64, 8, 2, 1024, 2048),
    Row("seed-128x2048x4096", "mixtral", 128, 8, 2, 2048, 4096),
    # model-shaped layers
    Row("olmoe-T512", "olmoe", 512, 64, 8, 2048, 1024),
    Row("olmoe-T4", "olmoe", 4, 64, 8, 2048, 1024),
    Row("qwen3-moe-T512", "qwen3_moe", 512, 128, 8, 2048, 768),
    Row("deepseek-v3-T512", "deepseek_v3", 512, 256, 8, 1024, 512,
        _DEEPSEEK_GROUPS + (("shared_expert_dim", 512),)),
    Row("gpt-oss-20b-T256", "gpt_oss", 256, 32, 4, 2880, 2880),
    # tiny versions of every family, for smoke tests (not in the default suite)
    Row("tiny-mixtral", "mixtral", 16, 8, 2, 32, 48, default=False),
    Row("tiny-olmoe", "olmoe", 16, 16, 4, 32, 24, default=False),
    Row("tiny-qwen3-moe", "qwen3_moe", 16, 16, 4, 32, 24, default=False),
    Row("tiny-deepseek-v3", "deepseek_v3", 16, 32, 4, 32, 16,
        _DEEPSEEK_GROUPS + (("shared_expert_dim", 16),), default=False),
    Row("tiny-gpt-oss", "gpt_oss", 16, 8, 2, 32, 32, default=False),
]}

LATENCY_TOKENS = (1, 4, 16, 64)


def select_rows(patterns=None):
    """Registry rows matching a list (or comma string) of names / shell patterns.

    ``None`` gives the default suite. Unknown names raise ``ValueError``.
    """
    if patterns is None:
        return [r for r in ROWS.values() if r.default]
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    out = []
    for pat in (p.strip() for p in patterns):
        hits = [r for name, r in ROWS.items() if fnmatch.fnmatchcase(name, pat)]
        if not hits:
            raise ValueError(f"shapes: unknown row {pat!r}; known rows: {', '.join(ROWS)}")
        out += [r for r in hits if r not in out]
    return out


def build_config(row):
    """The ``MoEConfig`` of a registry row."""
    make = getattr(numoe.MoEConfig, row.preset)
    return make(num_experts=row.E, top_k=row.k, hidden_dim=row.H, expert_dim=row.F,
                **dict(row.options))


def layer_flops(layer, T):
    """Useful FLOPs of one forward of ``T`` tokens: router, routed and shared experts."""
    cfg = layer.config
    H, F, E, k = cfg.hidden_dim, cfg.expert_dim, cfg.num_experts, cfg.top_k
    flops = 2 * T * H * E + 2 * T * k * H * F * (2 if layer.w_up is None else 3)
    if layer.shared_up_proj is not None:
        flops += 2 * T * H * layer.shared_up_proj.shape[1] * 3
    return flops


def expert_bytes(layer):
    """Bytes of one routed expert's weights (and biases)."""
    total = 0
    for name in ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"):
        a = getattr(layer, name)
        if a is not None:
            total += a[0].nbytes
    return total


# ------------------------------------------------------------------ timing
def measure(fn, *, repeat=None, budget=2.0, min_runs=3, max_runs=100, warmup=True):
    """Median wall time of ``fn()`` in seconds.

    One untimed warm-up call (JIT compilation, first-touch page faults)
    unless ``warmup=False``; then ``repeat`` timed calls, or when ``repeat``
    is None as many as fit in ``budget`` seconds, clamped to
    ``[min_runs, max_runs]``. Returns ``(median, runs, last result)``.
    """
    result = fn() if warmup else None
    samples = []
    while True:
        t0 = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - t0)
        if repeat is None:
            want = min(max(min_runs, int(budget / max(samples[0], 1e-9))), max_runs)
        else:
            want = repeat
        if len(samples) >= want:
            return statistics.median(samples), len(samples), result


def blas_gflops(dtype=np.float32, n=2048, repeat=None, budget=1.0):
    """Measured GEMM rate of NumPy's BLAS: ``np.matmul`` of two ``n x n`` matrices."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    out = np.empty((n, n), dtype)
    t, _, _ = measure(lambda: np.matmul(a, b, out=out), repeat=repeat, budget=budget)
    return 2.0 * n ** 3 / t / 1e9


def memory_bandwidth(nbytes=256 << 20, repeat=None, budget=1.0):
    """Bytes per second of a large ``np.copyto`` (bytes read + bytes written)."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    t, _, _ = measure(lambda: np.copyto(dst, src), repeat=repeat, budget=budget)
    return 2.0 * src.nbytes / t


def rel_err(y, ref):
    """``||y - ref|| / ||ref||`` in float64."""
    y = np.asarray(y, dtype=np.float64).reshape(ref.shape)
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(y - ref) / (den if den > 0 else 1.0))


def _reporter(progress):
    if progress is True:
        return lambda msg: print(msg, file=sys.stderr, flush=True)
    return progress if callable(progress) else (lambda msg: None)


def _torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


@contextlib.contextmanager
def _torch_threads(torch, n):
    """Run a block with ``torch.set_num_threads(n)`` (``None``: leave as is)."""
    if torch is None or n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------- Hugging Face equivalents
def _param(torch, a, dtype):
    return torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)),
                              requires_grad=False)


def _glu_experts(torch, experts, layer, dtype):
    """Copy w_gate/w_up/w_down into HF's [E, 2F, H] / [E, H, F] expert tensors."""
    F = layer.config.expert_dim
    gate_up = np.empty((layer.config.num_experts, 2 * F, layer.config.hidden_dim), dtype)
    gate_up[:, :F], gate_up[:, F:] = layer.w_gate.transpose(0, 2, 1), layer.w_up.transpose(0, 2, 1)
    experts.gate_up_proj = _param(torch, gate_up, dtype)
    experts.down_proj = _param(torch, layer.w_down.transpose(0, 2, 1), dtype)


def hf_block(layer, family, dtype=np.float32):
    """The Hugging Face transformers MoE block equivalent to ``layer``, same weights.

    Returns ``(module, call)``; ``call(x)`` maps a ``[T, H]`` torch tensor
    to the ``[T, H]`` output. Raises ``ImportError`` without transformers
    and ``ValueError`` for a preset without an HF equivalent here.
    """
    import torch
    cfg = layer.config
    E, k, H, F = cfg.num_experts, cfg.top_k, cfg.hidden_dim, cfg.expert_dim
    sizes = dict(hidden_size=H, num_experts_per_tok=k)
    if family in ("mixtral", "olmoe", "qwen3_moe"):
        if family == "mixtral":
            from transformers.models.mixtral import modeling_mixtral as m
            hfc = m.MixtralConfig(intermediate_size=F, num_local_experts=E, **sizes)
            block = m.MixtralSparseMoeBlock(hfc)
        elif family == "olmoe":
            from transformers.models.olmoe import modeling_olmoe as m
            hfc = m.OlmoeConfig(intermediate_size=F, num_experts=E,
                                norm_topk_prob=cfg.renormalize, **sizes)
            block = m.OlmoeSparseMoeBlock(hfc)
        else:
            from transformers.models.qwen3_moe import modeling_qwen3_moe as m
            hfc = m.Qwen3MoeConfig(moe_intermediate_size=F, num_experts=E,
                                   norm_topk_prob=cfg.renormalize, **sizes)
            block = m.Qwen3MoeSparseMoeBlock(hfc)
        block.gate.weight = _param(torch, layer.router.T, dtype)
        _glu_experts(torch, block.experts, layer, dtype)
    elif family == "deepseek_v3":
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m
        shared_f = layer.shared_up_proj.shape[1]
        hfc = m.DeepseekV3Config(moe_intermediate_size=F, n_routed_experts=E,
                                 n_shared_experts=shared_f // F, n_group=cfg.n_groups,
                                 topk_group=cfg.topk_groups, routed_scaling_factor=cfg.scale,
                                 norm_topk_prob=cfg.renormalize, **sizes)
        block = m.DeepseekV3MoE(hfc)
        block.gate.weight = _param(torch, layer.router.T, np.float32)
        if layer.selection_bias is not None:
            block.gate.e_score_correction_bias.copy_(torch.from_numpy(
                np.asarray(layer.selection_bias, dtype=np.float32)))
        _glu_experts(torch, block.experts, layer, dtype)
        sh = block.shared_experts
        sh.gate_proj.weight = _param(torch, layer.shared_gate_proj.T, dtype)
        sh.up_proj.weight = _param(torch, layer.shared_up_proj.T, dtype)
        sh.down_proj.weight = _param(torch, layer.shared_down_proj.T, dtype)
    elif family == "gpt_oss":
        from transformers.models.gpt_oss import modeling_gpt_oss as m
        hfc = m.GptOssConfig(intermediate_size=F, num_local_experts=E,
                             swiglu_limit=cfg.limit, swiglu_alpha=cfg.alpha, **sizes)
        block = m.GptOssMLP(hfc)
        block.router.weight = _param(torch, layer.router.T, dtype)
        block.router.bias = _param(torch, layer.router_bias, dtype)
        ex = block.experts
        gate_up = np.empty((E, H, 2 * F), dtype)   # gpt-oss interleaves gate and up columns
        gate_up[..., 0::2], gate_up[..., 1::2] = layer.w_gate, layer.w_up
        bias = np.empty((E, 2 * F), dtype)
        bias[:, 0::2], bias[:, 1::2] = layer.b_gate, layer.b_up
        ex.gate_up_proj = _param(torch, gate_up, dtype)
        ex.gate_up_proj_bias = _param(torch, bias, dtype)
        ex.down_proj = _param(torch, layer.w_down, dtype)
        ex.down_proj_bias = _param(torch, layer.b_down, dtype)
    else:
        raise ValueError(f"no Hugging Face equivalent for a {family!r} layer")
    block.eval()
    if dtype == np.float64:
        block.double()

    def call(x):
        out = block(x[None])
        return (out[0] if isinstance(out, tuple) else out)[0]
    return block, call


def hf_available():
    """``None`` when transformers can be imported, else the reason it cannot."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"transformers/torch not installed ({exc.name})"
    return None


def _has_grouped_mm():
    """Whether the installed transformers offers the ``grouped_mm`` experts implementation."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    return "grouped_mm" in ALL_EXPERTS_FUNCTIONS


# ------------------------------------------------------------ layer suite
def _time_hf(layer, family, x, ref, dtype, repeat, budget, notes):
    """HF eager and grouped_mm times, and the larger of their errors."""
    torch = _torch()
    block, call = hf_block(layer, family, dtype)
    xt = torch.from_numpy(x)
    times, err = {}, None
    impls = ["eager"] + (["grouped_mm"] if _has_grouped_mm() else [])
    if "grouped_mm" not in impls:
        notes.append("this transformers has no grouped_mm experts implementation")
    with torch.inference_mode():
        for impl in impls:
            block.experts.config._experts_implementation = impl
            try:
                t, _, y = measure(lambda: call(xt), repeat=repeat, budget=budget, min_runs=2)
            except (RuntimeError, ValueError) as exc:   # e.g. grouped_mm has no float64 kernel
                notes.append(f"HF {impl}: {str(exc).splitlines()[0]}")
                continue
            times[impl] = t
            e = rel_err(y.numpy(), ref)
            err = e if err is None else max(err, e)
    return times.get("eager"), times.get("grouped_mm"), err


def run_layer_suite(shapes=None, *, threads=None, dtype="float32", repeat=None, budget=2.0,
                    hf=True, progress=None):
    """Time whole MoE layers (registry rows) against the reference and HF transformers.

    Parameters
    ----------
    shapes : list of str or str, optional
        Registry row names or shell patterns (:data:`ROWS`); default: the
        default suite.
    threads : int, optional
        Numba and PyTorch threads (default: leave as set).
    dtype : {"float32", "float64"}
    repeat : int, optional
        Timed calls per measurement; default: as many as fit ``budget``
        seconds (at least 3; at least 1 for the slow NumPy reference).
    hf : bool
        Also time the Hugging Face transformers block when installed.
    progress : bool or callable
        ``True`` prints one line per row to stderr.

    Returns
    -------
    rows : list of dict
        Per row: sizes, ``rel_err`` (numoe vs the float64 reference),
        ``numoe_s``, ``tokens_per_s``, ``gflops``, ``pct_blas``, ``ref_s``,
        ``hf_eager_s``, ``hf_grouped_s``, ``hf_err``, ``speedup`` (HF best /
        numoe), ``notes``.
    """
    dtype = np.dtype(dtype).type
    say = _reporter(progress)
    rows = select_rows(shapes)
    hf_reason = hf_available() if hf else "not requested"
    torch = _torch() if hf_reason is None else None
    out = []
    with numba_threads(threads), _torch_threads(torch, threads):
        say(f"measuring the BLAS {np.dtype(dtype).name} GEMM rate (2048^3 np.matmul) ...")
        peak = blas_gflops(dtype, repeat=repeat)
        for i, row in enumerate(rows, 1):
            t_row = time.perf_counter()
            say(f"[{i}/{len(rows)}] {row.name}: T={row.T} E={row.E} k={row.k} "
                f"H={row.H} F={row.F} ...")
            res = _layer_row(row, dtype, repeat, budget, hf_reason, peak)
            res["threads"] = threads
            out.append(res)
            best = "n/a" if res["speedup"] is None else f"{res['speedup']:.2f}x vs HF"
            say(f"    numoe {res['numoe_s'] * 1e3:.2f} ms, err {res['rel_err']:.1e}, "
                f"{best}  ({time.perf_counter() - t_row:.0f} s)")
    return out


def _layer_row(row, dtype, repeat, budget, hf_reason, peak_gflops):
    layer = numoe.MoELayer.random(build_config(row), seed=0, dtype=dtype)
    x = np.random.default_rng(1).standard_normal((row.T, row.H)).astype(dtype)
    kw = dict(layer.weights(), top_k=layer.config.top_k)   # numoe.reference.moe_forward
    t_ref, n_ref, ref = measure(lambda: reference.moe_forward(x, **kw), repeat=repeat,
                                budget=budget, min_runs=1, max_runs=10, warmup=False)
    t, n, y = measure(lambda: layer(x), repeat=repeat, budget=budget)
    flops = layer_flops(layer, row.T)
    res = dict(name=row.name, preset=row.preset, T=row.T, E=row.E, k=row.k, H=row.H,
               F=row.F, dtype=np.dtype(dtype).name, rel_err=rel_err(y, ref), numoe_s=t,
               numoe_runs=n, tokens_per_s=row.T / t, gflops=flops / t / 1e9,
               pct_blas=100.0 * flops / t / 1e9 / peak_gflops, blas_gflops=peak_gflops,
               ref_s=t_ref, ref_runs=n_ref, hf_eager_s=None, hf_grouped_s=None,
               hf_err=None, speedup=None, notes=[])
    if hf_reason is not None:
        res["notes"].append(f"HF: {hf_reason}")
    else:
        e, g, err = _time_hf(layer, row.preset, x, ref, dtype, repeat, budget, res["notes"])
        res.update(hf_eager_s=e, hf_grouped_s=g, hf_err=err)
        best = min((v for v in (e, g) if v is not None), default=None)
        res["speedup"] = None if best is None else best / t
    return res


def run_cuda_layer_suite(shapes=None, *, dtype="float32", repeat=None, progress=None):
    """The layer suite on the GPU: ``numoe._cuda.bench.run`` (the CUDA backend's own)."""
    mod = numoe._backend.cuda_module("bench")
    return mod.run(shapes=[r.name for r in select_rows(shapes)], dtype=dtype,
                   repeat=repeat, progress=_reporter(progress))


# ---------------------------------------------------------- routing suite
def _torch_route(torch, lt, k):
    p = torch.softmax(lt, dim=-1)
    w, idx = torch.topk(p, k, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), idx


def run_routing_suite(T=65536, experts=(8, 64, 256), ks=(2, 8), *, H=2048, threads=None,
                      dtype="float32", repeat=None, budget=1.0, max_bytes=1 << 30,
                      progress=None):
    """Routing, planning and data movement at a large token count.

    For each ``(E, k)``: softmax top-k :func:`numoe.route` vs
    :func:`numoe.reference.route` vs PyTorch (softmax + topk + renormalise);
    :func:`numoe.dispatch_plan`; :func:`numoe.permute` and
    :func:`numoe.unpermute` of ``[T, H]`` activations vs ``np.copyto`` of
    the same ``[T*k, H]`` bytes (all outputs preallocated, ``out=``, so
    no page faults are timed). Where ``T*k*H`` values take more than
    ``max_bytes`` the activation width is reduced (column ``H``) so the
    copy stays the same size.

    Returns
    -------
    rows : list of dict
        ``E, k, H, route_s, ref_route_s, torch_route_s, ref_ratio,
        torch_ratio, experts_equal, plan_s, permute_s, unpermute_s, copy_s,
        permute_vs_copy, plan_pct_of_permute``.
    """
    dtype = np.dtype(dtype).type
    say = _reporter(progress)
    torch = _torch()
    rng = np.random.default_rng(0)
    out = []
    with numba_threads(threads), _torch_threads(torch, threads):
        for E in experts:
            logits = rng.standard_normal((T, E)).astype(dtype)
            for k in ks:
                say(f"routing T={T} E={E} k={k} ...")
                out.append(_routing_row(logits, k, H, dtype, torch, repeat, budget, max_bytes))
    return out


def _routing_row(logits, k, H, dtype, torch, repeat, budget, max_bytes):
    T, E = logits.shape
    t_route, _, r = measure(lambda: numoe.route(logits, k), repeat=repeat, budget=budget)
    t_ref, _, rr = measure(lambda: reference.route(logits, k), repeat=repeat, budget=budget,
                           min_runs=1, max_runs=10, warmup=False)
    t_torch = None
    if torch is not None:
        lt = torch.from_numpy(logits)
        with torch.inference_mode():
            t_torch, _, _ = measure(lambda: _torch_route(torch, lt, k), repeat=repeat,
                                    budget=budget)
    t_plan, _, plan = measure(lambda: numoe.dispatch_plan(r.experts, E), repeat=repeat,
                              budget=budget)
    itemsize = np.dtype(dtype).itemsize
    h = int(min(H, max(1, max_bytes // (T * k * itemsize))))
    x = np.random.default_rng(2).standard_normal((T, h)).astype(dtype)
    xs, y = np.empty((plan.order.size, h), dtype), np.empty_like(x)   # outputs allocated once
    t_perm, _, _ = measure(lambda: numoe.permute(x, plan, out=xs), repeat=repeat, budget=budget)
    t_unperm, _, _ = measure(lambda: numoe.unpermute(xs, plan, r.weights, out=y),
                             repeat=repeat, budget=budget)
    dst = np.empty_like(xs)
    t_copy, _, _ = measure(lambda: np.copyto(dst, xs), repeat=repeat, budget=budget)
    return dict(T=T, E=E, k=k, H=h, dtype=np.dtype(dtype).name, route_s=t_route,
                ref_route_s=t_ref, torch_route_s=t_torch, ref_ratio=t_ref / t_route,
                torch_ratio=None if t_torch is None else t_torch / t_route,
                experts_equal=bool(np.array_equal(r.experts, rr.experts)),
                plan_s=t_plan, permute_s=t_perm, unpermute_s=t_unperm, copy_s=t_copy,
                permute_vs_copy=t_perm / t_copy, plan_pct_of_permute=100.0 * t_plan / t_perm)


# ---------------------------------------------------------- latency suite
def run_latency_suite(shape="olmoe-T512", tokens=LATENCY_TOKENS, *, threads=None,
                      dtype="float32", budget=3.0, min_calls=20, max_calls=5000,
                      bandwidth_bytes=256 << 20, progress=None):
    """Per-call latency of decode-sized batches on one layer shape.

    For each token count, calls the layer back to back (``budget`` seconds,
    ``min_calls``..``max_calls`` calls) and reports p50/p95/p99 latency,
    tokens/s at the median, and the floor: the time to read the weights of
    the experts this batch touches (plus the router) once at the memory
    bandwidth measured by an ``np.copyto`` of ``bandwidth_bytes`` (much
    larger than the caches).
    """
    dtype = np.dtype(dtype).type
    say = _reporter(progress)
    (row,) = select_rows([shape]) if isinstance(shape, str) else (shape,)
    layer = numoe.MoELayer.random(build_config(row), seed=0, dtype=dtype)
    out = []
    with numba_threads(threads):
        say(f"measuring memory bandwidth (np.copyto of {bandwidth_bytes >> 20} MiB) ...")
        bw = memory_bandwidth(bandwidth_bytes)
        for T in tokens:
            say(f"latency {row.name} T={T} ...")
            x = np.random.default_rng(T).standard_normal((T, row.H)).astype(dtype)
            _, info = layer.forward(x, return_info=True)           # also the warm-up
            touched = int(np.unique(np.asarray(info["routing"].experts)).size)
            nbytes = touched * expert_bytes(layer) + layer.router.nbytes
            lat = []
            t_end = time.perf_counter() + budget
            while len(lat) < max_calls and (len(lat) < min_calls or time.perf_counter() < t_end):
                t0 = time.perf_counter()
                layer(x)
                lat.append(time.perf_counter() - t0)
            p50, p95, p99 = np.percentile(lat, [50, 95, 99])
            floor = nbytes / bw
            out.append(dict(shape=row.name, T=T, E=row.E, k=row.k, H=row.H, F=row.F,
                            dtype=np.dtype(dtype).name, calls=len(lat), p50_s=p50, p95_s=p95,
                            p99_s=p99, tokens_per_s=T / p50, touched_experts=touched,
                            weight_bytes=nbytes, bandwidth_gbs=bw / 1e9, floor_s=floor,
                            p50_over_floor=p50 / floor))
    return out


# ---------------------------------------------------------- start-up cost
_STARTUP_SCRIPT = """
import json, sys, time
import numpy as np
t0 = time.perf_counter()
import numoe
from numoe import bench
t1 = time.perf_counter()
row = bench.select_rows([sys.argv[1]])[0]
layer = numoe.MoELayer.random(bench.build_config(row), seed=0, dtype=sys.argv[2])
x = np.random.default_rng(1).standard_normal((row.T, row.H)).astype(sys.argv[2])
t2 = time.perf_counter()
layer(x)
t3 = time.perf_counter()
layer(x)
t4 = time.perf_counter()
print(json.dumps(dict(import_s=t1 - t0, first_forward_s=t3 - t2, second_forward_s=t4 - t3)))
"""


def run_startup(shape="seed-32x512x1024", *, dtype="float32", warm_runs=3, progress=None):
    """``import numoe`` and the first forward, in fresh processes.

    ``cold``: an empty ``NUMBA_CACHE_DIR`` (everything compiles); ``warm``:
    the same directory again (compiled code loads from the cache; median of
    ``warm_runs`` processes). Layer construction is not counted.
    """
    say = _reporter(progress)
    out = []
    with tempfile.TemporaryDirectory(prefix="numoe-cache-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for mode, runs in (("cold", 1), ("warm", warm_runs)):
            got = []
            for _ in range(runs):
                say(f"startup {mode} ({shape}) ...")
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-c", _STARTUP_SCRIPT, shape,
                                       np.dtype(dtype).name], env=env, capture_output=True,
                                      text=True, check=False)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise RuntimeError(f"start-up probe failed:\n{proc.stderr[-2000:]}")
                got.append(dict(_json_last_line(proc.stdout), process_s=wall))
            med = {key: statistics.median(g[key] for g in got) for key in got[0]}
            out.append(dict(mode=mode, shape=shape, runs=runs, **med))
    return out


def _json_last_line(text):
    import json
    return json.loads(text.strip().splitlines()[-1])


# ------------------------------------------------------------- reporting
def machine_info():
    """CPU, core count, versions and date, for the header of every table."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numba
    return dict(cpu=cpu, cores=os.cpu_count(), threads=numba.get_num_threads(),
                date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                numoe=numoe.__version__, python=platform.python_version(),
                numpy=np.__version__, numba=numba.__version__,
                torch=installed_version("torch"), blas=blas_name())


def installed_version(package):
    """Version of an installed distribution (without importing it), or None."""
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def blas_name():
    """Name and version of the BLAS NumPy was built with."""
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def header_line(info):
    """The one-line description of the machine that starts every printed table."""
    return (f"{info['cpu']}, {info['cores']} cores, {info['threads']} threads | {info['date']} | "
            f"numoe {info['numoe']}, numpy {info['numpy']}, numba {info['numba']}, "
            f"torch {info['torch'] or 'not installed'} | BLAS {info['blas']}")


def peak_rss_mib(children=False):
    """Peak resident set size in MiB of this process (or of its largest finished child)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0


def _fmt(v, kind):
    """One table cell: ``ms`` seconds shown as milliseconds, ``x`` ratio, ``e`` error,
    ``%`` percentage, ``f`` number, ``mib`` bytes as MiB, ``s`` as is."""
    if v is None:
        return "n/a"
    if kind == "ms":
        return f"{v * 1e3:.3g}" if v * 1e3 < 100 else f"{v * 1e3:.0f}"
    if kind == "mib":
        return f"{v / 2**20:.1f}"
    if kind == "x":
        return f"{v:.2f}x"
    if kind == "e":
        return f"{v:.1e}"
    if kind == "%":
        return f"{v:.1f}%"
    if kind == "f":
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


# (key, column header, format) per suite
COLUMNS = {
    "layers": [("name", "row", "s"), ("T", "T", "s"), ("E", "E", "s"), ("k", "k", "s"),
               ("H", "H", "s"), ("F", "F", "s"), ("rel_err", "rel err", "e"),
               ("numoe_s", "numoe ms", "ms"), ("tokens_per_s", "tok/s", "f"),
               ("gflops", "GFLOP/s", "f"), ("pct_blas", "%BLAS", "%"),
               ("ref_s", "ref ms", "ms"), ("hf_eager_s", "HF eager ms", "ms"),
               ("hf_grouped_s", "HF grouped ms", "ms"), ("hf_err", "HF err", "e"),
               ("speedup", "HF best/numoe", "x")],
    "routing": [("E", "E", "s"), ("k", "k", "s"), ("route_s", "route ms", "ms"),
                ("ref_route_s", "ref ms", "ms"), ("ref_ratio", "ref/numoe", "x"),
                ("torch_route_s", "torch ms", "ms"), ("torch_ratio", "torch/numoe", "x"),
                ("experts_equal", "= ref", "s"), ("plan_s", "plan ms", "ms"),
                ("H", "H", "s"), ("permute_s", "permute ms", "ms"),
                ("unpermute_s", "unpermute ms", "ms"), ("copy_s", "copyto ms", "ms"),
                ("permute_vs_copy", "permute/copy", "x"),
                ("plan_pct_of_permute", "plan % perm", "%")],
    "latency": [("shape", "layer", "s"), ("T", "T", "s"), ("calls", "calls", "s"),
                ("p50_s", "p50 ms", "ms"), ("p95_s", "p95 ms", "ms"), ("p99_s", "p99 ms", "ms"),
                ("tokens_per_s", "tok/s", "f"), ("touched_experts", "experts", "s"),
                ("weight_bytes", "MiB read", "mib"), ("floor_s", "floor ms", "ms"),
                ("p50_over_floor", "p50/floor", "x")],
    "startup": [("mode", "cache", "s"), ("shape", "shape", "s"), ("runs", "runs", "s"),
                ("import_s", "import s", "f"), ("first_forward_s", "1st forward s", "f"),
                ("second_forward_s", "2nd forward ms", "ms"), ("process_s", "process s", "f")],
}


def format_table(rows, suite):
    """Rows as an aligned text table (first column left-aligned, the rest right),
    followed by the rows' notes."""
    cols = COLUMNS[suite]
    cells = [[head for _, head, _ in cols]]
    cells += [[_fmt(r.get(key), kind) for key, _, kind in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]

    def line(c):
        return "  ".join([c[0].ljust(widths[0])] +
                         [c[i].rjust(widths[i]) for i in range(1, len(c))])
    lines = [line(cells[0]), line(["-" * w for w in widths])] + [line(c) for c in cells[1:]]
    notes = [f"{r.get('name', '')}: {note}" for r in rows for note in r.get("notes", ())]
    return "\n".join(lines + [f"  note: {n}" for n in notes])


# time columns drawn by --plot, per suite: (key, label)
PLOT_SERIES = {
    "layers": [("numoe_s", "numoe"), ("ref_s", "NumPy reference"),
               ("hf_eager_s", "HF eager"), ("hf_grouped_s", "HF grouped_mm")],
    "routing": [("route_s", "numoe route"), ("ref_route_s", "reference route"),
                ("torch_route_s", "torch route"), ("plan_s", "dispatch_plan"),
                ("permute_s", "permute"), ("unpermute_s", "unpermute"), ("copy_s", "np.copyto")],
    "latency": [("p50_s", "p50"), ("p99_s", "p99"), ("floor_s", "bandwidth floor")],
    "startup": [("import_s", "import"), ("first_forward_s", "first forward")],
}


def _row_label(r, suite):
    if suite == "routing":
        return f"E={r['E']} k={r['k']}"
    if suite == "latency":
        return f"T={r['T']}"
    if suite == "startup":
        return r["mode"]
    return r["name"]


def plot(rows, suite, path, title=""):
    """Horizontal grouped bar chart (log time axis) of the suite's time columns, as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = [(k, lbl) for k, lbl in PLOT_SERIES[suite] if any(r.get(k) for r in rows)]
    n = len(rows)
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.35 * n * max(1, len(series))))
    height = 0.8 / max(1, len(series))
    for j, (key, label) in enumerate(series):
        ys = [i + j * height for i in range(n)]
        vals = [(r.get(key) or 0.0) * 1e3 for r in rows]
        ax.barh(ys, vals, height=height, label=label)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(n)])
    ax.set_yticklabels([_row_label(r, suite) for r in rows])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds (log scale, lower is better)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
