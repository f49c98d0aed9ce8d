"""Benchmark suites behind ``numoe bench`` (also usable as a library).

One registry, :data:`ROWS`, names every benchmarked layer shape (model
preset, sizes, token count); the suites below only read it. The default
suite is light (no PyTorch needed, under 3 GiB); ``full=True`` adds the
larger rows, :func:`custom_row` any ``T,E,k,H,F`` of any preset.

* :func:`run_layer_suite` -- whole MoE layers: numoe vs the NumPy reference
  vs the equivalent Hugging Face transformers block (PyTorch, eager and
  ``grouped_mm`` experts, when the ``parity`` extra is installed), in any
  activation dtype and weight storage (bfloat16, float16, int8, ...), with
  the error against the float64 oracle and a PASS/FAIL verdict, throughput
  and the share of this machine's BLAS GEMM rate.
* :func:`run_routing_suite` -- route / dispatch_plan / permute / unpermute
  at a large token count against the reference, PyTorch and a plain copy.
* :func:`run_latency_suite` -- decode-sized batches on fresh tokens:
  per-call latency percentiles against the time to read the touched
  expert weights once at the read bandwidth of a parallel read-only pass.
* :func:`run_startup` -- ``import numoe`` and the first forward in fresh
  processes, with an empty and with a warm Numba cache.

Every suite returns a list of plain ``dict`` rows (JSON-ready; ``None``
where something was not measured) and reports progress through an
optional callable. Each time is the median of warm samples (the first
call, which compiles, is excluded; calls shorter than
:data:`MIN_SAMPLE_S` are batched several per sample) and comes with its
spread (``<name>_spread``: min, quartiles, max, samples, calls per
sample). Roofs (BLAS GEMM rate, bandwidth) are measured before and after
the rows and the better kept. :func:`format_table` prints a legend under
every table and warns when the spread says the figures are noisy;
:func:`noise_warnings` also reads the machine load.
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

import numba
import numpy as np
from numba import prange

import numoe
from numoe import reference
from numoe._cpu import experts as cpu_experts
from numoe._dtypes import BFLOAT16, as_float_dtype, compute_dtype
from numoe._jit import driver, threads as numba_threads


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
    full: bool = False    # part of the larger suite that ``numoe bench --full`` adds


_DEEPSEEK_GROUPS = (("n_groups", 8), ("topk_groups", 4), ("num_shared_experts", 1))

ROWS = {r.name: r for r in [
    # the seed's three configurations: Mixtral-style, 8 experts, top-2
    Row("seed-32x512x1024", "mixtral", 32, 8, 2, 512, 1024),
    Row("seed-64x1024x2048", "mixtral", 64, 8, 2, 1024, 2048),
    Row("seed-128x2048x4096", "mixtral", 128, 8, 2, 2048, 4096),
    # model-shaped layers (OLMoE: 1.6 GB of float32 experts; the others, behind
    # --full, 1.6 to 3.4 GB each: the default suite stays under 3 GiB peak)
    Row("olmoe-T512", "olmoe", 512, 64, 8, 2048, 1024),
    Row("olmoe-T4", "olmoe", 4, 64, 8, 2048, 1024),
    Row("qwen3-moe-T512", "qwen3_moe", 512, 128, 8, 2048, 768, default=False, full=True),
    Row("deepseek-v3-T512", "deepseek_v3", 512, 256, 8, 1024, 512,
        _DEEPSEEK_GROUPS + (("shared_expert_dim", 512),), default=False, full=True),
    Row("gpt-oss-20b-T256", "gpt_oss", 256, 32, 4, 2880, 2880, default=False, full=True),
    Row("olmoe-T4096", "olmoe", 4096, 64, 8, 2048, 1024, default=False, full=True),
    # tiny versions of every family, for smoke tests (not in the default suite)
    Row("tiny-mixtral", "mixtral", 16, 8, 2, 32, 48, default=False),
    Row("tiny-olmoe", "olmoe", 16, 16, 4, 32, 24, default=False),
    Row("tiny-qwen3-moe", "qwen3_moe", 16, 16, 4, 32, 24, default=False),
    Row("tiny-deepseek-v3", "deepseek_v3", 16, 32, 4, 32, 16,
        _DEEPSEEK_GROUPS + (("shared_expert_dim", 16),), default=False),
    Row("tiny-gpt-oss", "gpt_oss", 16, 8, 2, 32, 32, default=False),
]}

LATENCY_TOKENS = (1, 4, 16, 64)

#: ``MoEConfig`` presets a custom row (``--shape``) may name.
PRESETS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "switch")


def select_rows(patterns=None, *, full=False):
    """Registry rows matching a list (or comma string) of names / shell patterns.

    ``None`` gives the default suite (with ``full=True``: also the larger
    rows). :class:`Row` objects in the list pass through (custom rows).
    Unknown names raise ``ValueError``.
    """
    if patterns is None:
        return [r for r in ROWS.values() if r.default or (full and r.full)]
    if isinstance(patterns, (str, Row)):
        patterns = [patterns]
    names = []
    for p in patterns:
        names += [p] if isinstance(p, Row) else [q.strip() for q in p.split(",") if q.strip()]
    out = []
    for pat in names:
        if isinstance(pat, Row):
            hits = [pat]
        else:
            hits = [r for name, r in ROWS.items() if fnmatch.fnmatchcase(name, pat)]
        if not hits:
            raise ValueError(f"shapes: unknown row {pat!r}; known rows: {', '.join(ROWS)}")
        out += [r for r in hits if r not in out]
    return out


def custom_row(shape, preset="mixtral"):
    """A :class:`Row` from ``"T,E,k,H,F"`` (token count, experts, top-k, hidden, expert width).

    ``preset`` names the ``MoEConfig`` family (:data:`PRESETS`); the other
    options are that preset's defaults (DeepSeek-V3: 8 groups keep 4 when
    ``E`` is a multiple of 8, one shared expert of width ``F``).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    parts = shape.split(",") if isinstance(shape, str) else list(shape)
    try:
        T, E, k, H, F = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be five integers T,E,k,H,F, got {shape!r}") from None
    if min(T, E, k, H, F) < 1:
        raise ValueError(f"shape: every size must be positive, got {shape!r}")
    options = ()
    if preset == "deepseek_v3":
        options = ((("n_groups", 8), ("topk_groups", 4)) if E % 8 == 0 else
                   (("n_groups", 1), ("topk_groups", None)))
        options += (("shared_expert_dim", F),)
    return Row(f"{preset}-T{T}-E{E}-k{k}-H{H}-F{F}", preset, T, E, k, H, F, options,
               default=False)


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
    """Bytes of one routed expert's weights (and biases), in their storage dtype
    (int8 weights: values and scales)."""
    total = 0
    for name in ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"):
        a = getattr(layer, name)
        if a is not None:
            total += a.nbytes // a.shape[0]
    return total


# ------------------------------------------------------------------ timing
#: Shortest timed sample: calls shorter than this are batched, several per sample,
#: so every sample is at least a thousand times the clock's resolution.
MIN_SAMPLE_S = max(1e-3, 1000 * time.get_clock_info("perf_counter").resolution)

#: Relative spread ``(q3 - q1) / median`` above which a timing is flagged as noisy.
NOISY_IQR = 0.10


class Timing(NamedTuple):
    """Wall time of one call, from :func:`time_calls`: spread over the samples.

    Each sample times ``calls`` back-to-back calls and is divided by
    ``calls``; ``runs`` samples were taken. ``result`` is the last call's
    return value.
    """

    median: float
    min: float
    q1: float
    q3: float
    max: float
    runs: int
    calls: int
    result: object = None

    def spread(self):
        """The JSON-ready summary: ``min, q1, median, q3, max`` (seconds), ``runs``, ``calls``."""
        return dict(min=self.min, q1=self.q1, median=self.median, q3=self.q3, max=self.max,
                    runs=self.runs, calls=self.calls)

    @property
    def noisy(self):
        """True when the inter-quartile range exceeds :data:`NOISY_IQR` of the median."""
        return self.runs >= 3 and (self.q3 - self.q1) > NOISY_IQR * self.median


def time_calls(fn, *, repeat=None, budget=2.0, min_runs=3, max_runs=100, warmup=True,
               min_sample=MIN_SAMPLE_S):
    """Time ``fn()``: quartiles of several samples, short calls batched per sample.

    One untimed warm-up call (JIT compilation, first-touch page faults)
    unless ``warmup=False``. Calls faster than ``min_sample`` seconds are
    batched: the batch grows (calibration, untimed) until one batch lasts
    ``min_sample``, and every sample times such a batch, so the clock's
    resolution and the timer's own cost stay negligible. Then ``repeat``
    samples, or when ``repeat`` is None as many as fit in ``budget``
    seconds, clamped to ``[min_runs, max_runs]``.

    Returns
    -------
    Timing
        Seconds per call: median, min, quartiles, max; samples and calls per sample.
    """
    result = fn() if warmup else None
    calls, samples = 1, []
    while True:                 # calibrate: grow the batch until one sample lasts min_sample
        t0 = time.perf_counter()
        for _ in range(calls):
            result = fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_sample:
            break
        calls = min(10 * calls, int(np.ceil(1.2 * calls * min_sample / max(elapsed, 1e-9))))
    if calls == 1:
        samples.append(elapsed)     # a long call: the calibration call is the first sample
    per_sample = elapsed
    while True:
        if repeat is None:
            want = min(max(min_runs, int(budget / max(per_sample, 1e-9))), max_runs)
        else:
            want = repeat
        if len(samples) >= want:
            break
        t0 = time.perf_counter()
        for _ in range(calls):
            result = fn()
        samples.append((time.perf_counter() - t0) / calls)
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    return Timing(float(med), float(min(samples)), float(q1), float(q3), float(max(samples)),
                  len(samples), calls, result)


def measure(fn, *, repeat=None, budget=2.0, min_runs=3, max_runs=100, warmup=True):
    """Median wall time of ``fn()`` in seconds: ``(median, samples, last result)``.

    A short form of :func:`time_calls` (same arguments), which also gives the spread.
    """
    t = time_calls(fn, repeat=repeat, budget=budget, min_runs=min_runs, max_runs=max_runs,
                   warmup=warmup)
    return t.median, t.runs, t.result


def blas_gflops(dtype=np.float32, n=2048, repeat=None, budget=1.0):
    """Measured GEMM rate of NumPy's BLAS: ``np.matmul`` of two ``n x n`` matrices.

    The rate at the fastest sample (the roof this machine can reach). 16-bit
    dtypes are measured in float32 (NumPy's BLAS has no 16-bit GEMM).
    """
    dt = np.dtype(dtype)
    if dt.itemsize < 4:
        dt = np.dtype(np.float32)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dt)
    b = rng.standard_normal((n, n)).astype(dt)
    out = np.empty((n, n), dt)
    t = time_calls(lambda: np.matmul(a, b, out=out), repeat=repeat, budget=budget)
    return 2.0 * n ** 3 / t.min / 1e9


def memory_bandwidth(nbytes=256 << 20, repeat=None, budget=1.0):
    """Bytes per second of a large ``np.copyto`` (bytes read + bytes written), fastest sample."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    t = time_calls(lambda: np.copyto(dst, src), repeat=repeat, budget=budget)
    return 2.0 * src.nbytes / t.min


@driver(fastmath=True)
def _read_pass(a, chunks):
    """Sum of ``a`` in ``chunks`` parallel chunks: reads every byte once, writes nothing."""
    n = a.size
    step = (n + chunks - 1) // chunks
    part = np.zeros(chunks, dtype=np.float32)
    for c in prange(chunks):
        # index a slice from 0: with a signed start, Numba's negative-index wrap turns
        # the loads into gathers (4 GB/s instead of the bandwidth, on Zen 4)
        seg = a[c * step:min(n, (c + 1) * step)]
        s = np.float32(0.0)
        for i in range(seg.size):
            s += seg[i]
        part[c] = s
    return part.sum()


def read_bandwidth(nbytes=256 << 20, repeat=None, budget=1.0):
    """Bytes per second read by a parallel read-only pass (a Numba ``prange`` sum).

    The ceiling for memory-bound decode, which reads weights and writes
    little; ``np.copyto`` (read + write) understates it. The array is much
    larger than the caches; the rate is that of the fastest sample.
    """
    a = np.ones(nbytes // 4, dtype=np.float32)
    chunks = 8 * max(1, numba.get_num_threads())
    t = time_calls(lambda: _read_pass(a, chunks), repeat=repeat, budget=budget)
    return a.nbytes / t.min


def machine_load():
    """``(1-minute load average, cores)``; the load is None where the OS has none."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        return os.getloadavg()[0], cores
    except (AttributeError, OSError):
        return None, cores


def noise_warnings(rows, keys, load_before=None, load_after=None, threads=None):
    """Lines warning that figures may be noisy: wide spreads, a loaded machine.

    ``rows`` carry ``<key>_spread`` dicts (from :meth:`Timing.spread`) for
    the timing ``keys``; ``load_before``/``load_after`` are
    :func:`machine_load` results around the measurement.
    """
    out = []
    for r in rows:
        wide = []
        for key in keys:
            sp = r.get(key[:-2] + "_spread")
            if sp and sp["runs"] >= 3 and sp["q3"] - sp["q1"] > NOISY_IQR * sp["median"]:
                wide.append(f"{key[:-2]} {100 * (sp['q3'] - sp['q1']) / sp['median']:.0f}%")
        if wide:
            out.append(f"{_row_label(r, None)}: noisy timings, spread (IQR/median) "
                       f"{', '.join(wide)}")
    for when, load in (("before", load_before), ("after", load_after)):
        if load is None or load[0] is None:
            continue
        la, cores = load
        # the bench itself keeps up to `threads` cores busy while it runs
        own = 0 if when == "before" else (threads or cores)
        if la > own + 0.25 * cores:
            out.append(f"machine load {la:.2f} {when} the run on {cores} cores: other jobs "
                       f"were running, figures are noisy")
    return out


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
def _dense(a):
    """A weight as a NumPy array (int8 weights dequantized to float32)."""
    return a if a is None or isinstance(a, np.ndarray) else np.asarray(a, dtype=np.float32)


def _tensor(torch, a, dtype):
    """A torch tensor holding ``a`` in ``dtype`` (bfloat16 through its int16 bits)."""
    dt = np.dtype(dtype)
    a = np.ascontiguousarray(_dense(a), dtype=dt)
    if dt == BFLOAT16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _param(torch, a, dtype):
    return torch.nn.Parameter(_tensor(torch, a, dtype), requires_grad=False)


def _glu_experts(torch, experts, layer, dtype):
    """Copy w_gate/w_up/w_down into HF's [E, 2F, H] / [E, H, F] expert tensors."""
    F = layer.config.expert_dim
    gate_up = np.empty((layer.config.num_experts, 2 * F, layer.config.hidden_dim), dtype)
    gate_up[:, :F] = _dense(layer.w_gate).transpose(0, 2, 1)
    gate_up[:, F:] = _dense(layer.w_up).transpose(0, 2, 1)
    experts.gate_up_proj = _param(torch, gate_up, dtype)
    del gate_up
    experts.down_proj = _param(torch, _dense(layer.w_down).transpose(0, 2, 1), dtype)


def hf_block(layer, family, dtype=np.float32):
    """The Hugging Face transformers MoE block equivalent to ``layer``, same weights.

    ``dtype`` is the torch precision of the block (float16, bfloat16,
    float32 or float64; DeepSeek-V3's router stays float32, as in HF).
    Returns ``(module, call)``; ``call(x)`` maps a ``[T, H]`` torch tensor
    to the ``[T, H]`` output. Raises ``ImportError`` without transformers
    and ``ValueError`` for a preset without an HF equivalent here.
    """
    import torch
    dtype = as_float_dtype("dtype", dtype)
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
        gate_up[..., 0::2], gate_up[..., 1::2] = _dense(layer.w_gate), _dense(layer.w_up)
        bias = np.empty((E, 2 * F), dtype)
        bias[:, 0::2], bias[:, 1::2] = layer.b_gate, layer.b_up
        ex.gate_up_proj = _param(torch, gate_up, dtype)
        del gate_up
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
        return (f"{exc.name} is not installed: the HF columns need the parity extra, "
                f'pip install -e ".[parity]"')
    return None


def _has_grouped_mm():
    """Whether the installed transformers offers the ``grouped_mm`` experts implementation."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    return "grouped_mm" in ALL_EXPERTS_FUNCTIONS


# ------------------------------------------------------------ layer suite
#: Largest ``rel_err`` against the float64 reference (on the same rounded
#: inputs and weights) that passes, per activation dtype: a few units of the
#: dtype's rounding, summed over the layer's dot products.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}

#: Weight storage choices of ``numoe bench --weights``.
WEIGHT_DTYPES = ("float16", "bfloat16", "float32", "float64", "int8")


def build_layer(row, dtype="float32", weights=None, seed=0):
    """The random layer of a registry row: activations ``dtype``, experts stored as ``weights``.

    ``weights`` (default: as ``dtype``) is a float dtype name or ``"int8"``
    (weight-only quantization). Built with ``MoELayer.random(cfg, seed,
    dtype=..., weight_dtype=...)`` and ``layer.astype(weight_dtype=...)``;
    raises ``ValueError`` saying so when this numoe lacks them.
    """
    cfg = build_config(row)
    dt = as_float_dtype("dtype", dtype)
    wname = None if weights in (None, dt.name) else str(weights)
    if wname is not None and wname not in WEIGHT_DTYPES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_DTYPES)}, got {weights!r}")
    try:
        if wname is None:
            layer = numoe.MoELayer.random(cfg, seed=seed, dtype=dt)
        else:
            layer = numoe.MoELayer.random(cfg, seed=seed, dtype=dt, weight_dtype=wname)
    except (TypeError, AttributeError) as exc:
        what = dt.name if wname is None else f"{dt.name} activations with {wname} weights"
        raise ValueError(f"this numoe cannot build a layer of {what}: {exc} (needs "
                         f"MoELayer.random(..., dtype=, weight_dtype=) and layer.astype)") from exc
    return layer


def weight_dtype_name(layer):
    """The storage of the layer's expert weights: a dtype name or ``"int8"``."""
    return np.dtype(layer.w_down.dtype).name


def _reference_kw(layer):
    """Keyword arguments of :func:`numoe.reference.moe_forward`: the layer's arrays
    (the reference widens them to float64 one expert at a time; ``layer.weights()``
    hands int8 weights over dequantized)."""
    return dict(layer.weights(), top_k=layer.config.top_k)


def _time_hf(layer, family, x, ref, dtype, repeat, budget, notes):
    """HF eager and grouped_mm timings, and the larger of their errors."""
    torch = _torch()
    block, call = hf_block(layer, family, dtype)
    xt = _tensor(torch, x, dtype)
    times, err = {}, None
    impls = ["eager"] + (["grouped_mm"] if _has_grouped_mm() else [])
    if "grouped_mm" not in impls:
        notes.append("this transformers has no grouped_mm experts implementation")
    with torch.inference_mode():
        for impl in impls:
            block.experts.config._experts_implementation = impl
            try:
                t = time_calls(lambda: call(xt), repeat=repeat, budget=budget, min_runs=2)
            except (RuntimeError, ValueError) as exc:   # e.g. grouped_mm has no float64 kernel
                notes.append(f"HF {impl}: {str(exc).splitlines()[0]}")
                continue
            times[impl] = t
            e = rel_err(t.result.float().numpy() if t.result.dtype != torch.float64
                        else t.result.numpy(), ref)
            err = e if err is None else max(err, e)
    return times.get("eager"), times.get("grouped_mm"), err


def run_layer_suite(shapes=None, *, threads=None, dtype="float32", weights=None, repeat=None,
                    budget=2.0, hf=True, full=False, batch_invariant=False, progress=None):
    """Time whole MoE layers (registry rows) against the reference and HF transformers.

    Parameters
    ----------
    shapes : list of str or Row, or str, optional
        Registry row names or shell patterns (:data:`ROWS`), or custom rows
        (:func:`custom_row`); default: the default suite.
    threads : int, optional
        Numba and PyTorch threads (default: leave as set).
    dtype : {"float32", "float64", "bfloat16", "float16"}
        Activations (and HF's torch precision).
    weights : {None, "bfloat16", "float16", "float32", "float64", "int8"}
        Storage of the expert weights (default: as ``dtype``).
    repeat : int, optional
        Timed samples per measurement; default: as many as fit ``budget``
        seconds (at least 3; at least 1 for the slow NumPy reference).
    hf : bool
        Also time the Hugging Face transformers block when installed.
    full : bool
        With ``shapes=None``: the larger rows too (several GB of weights each).
    batch_invariant : bool
        Also time each layer with ``batch_invariant=True`` (``inv_s``,
        ``inv_spread``, ``inv_cost`` = that time / ``numoe_s``, ``inv_err``).
    progress : bool or callable
        ``True`` prints one line per row to stderr.

    Returns
    -------
    rows : list of dict
        Per row: sizes, ``dtype``, ``weights``, ``rel_err`` (numoe vs the
        float64 reference on the same rounded weights), ``tol`` and
        ``check`` (``"PASS"``/``"FAIL"``), ``numoe_s`` (median) and
        ``numoe_spread`` (min, quartiles, max, samples), ``tokens_per_s``,
        ``gflops``, ``pct_blas`` (against the better of two BLAS GEMM rates
        measured before and after the rows), ``ref_s``, ``hf_eager_s``,
        ``hf_grouped_s`` (each with its ``_spread``), ``hf_err``,
        ``ref_speedup`` (reference / numoe), ``speedup`` (HF best / numoe:
        above 1, numoe is faster), ``weight_bytes`` (all the layer's arrays,
        in their storage dtype), ``peak_rss_mib``, ``notes``.
    """
    dt = as_float_dtype("dtype", dtype)
    say = _reporter(progress)
    rows = select_rows(shapes, full=full)
    hf_reason = hf_available() if hf else "not requested (--no-hf)"
    torch = _torch() if hf_reason is None else None
    out = []
    with numba_threads(threads), _torch_threads(torch, threads):
        say(f"measuring the BLAS {compute_dtype(dt).name} GEMM rate (2048^3 np.matmul) ...")
        before = blas_gflops(dt, repeat=repeat)
        for i, row in enumerate(rows, 1):
            t_row = time.perf_counter()
            say(f"[{i}/{len(rows)}] {row.name}: T={row.T} E={row.E} k={row.k} "
                f"H={row.H} F={row.F} ...")
            res = _layer_row(row, dt, weights, repeat, budget, hf_reason, batch_invariant)
            res["threads"] = numba.get_num_threads()
            out.append(res)
            best = "n/a" if res["speedup"] is None else f"{res['speedup']:.2f}x HF's best"
            say(f"    numoe {res['numoe_s'] * 1e3:.2f} ms, err {res['rel_err']:.1e} "
                f"{res['check']}, speedup {best}  ({time.perf_counter() - t_row:.0f} s)")
        say("measuring the BLAS GEMM rate again ...")
        after = blas_gflops(dt, repeat=repeat)
    peak = max(before, after)
    for res in out:
        res.update(blas_gflops=peak, blas_gflops_before=before, blas_gflops_after=after,
                   pct_blas=100.0 * res["gflops"] / peak)
    return out


def _layer_row(row, dt, weights, repeat, budget, hf_reason, batch_invariant=False):
    layer = build_layer(row, dt, weights)
    x = np.random.default_rng(1).standard_normal((row.T, row.H)).astype(dt)
    t_ref = time_calls(lambda: reference.moe_forward(x, **_reference_kw(layer)), repeat=repeat,
                       budget=budget, min_runs=1, max_runs=10, warmup=False)
    ref = t_ref.result
    t = time_calls(lambda: layer(x), repeat=repeat, budget=budget)
    flops = layer_flops(layer, row.T)
    err = rel_err(t.result, ref)
    tol = TOLERANCE[dt.name]
    res = dict(name=row.name, preset=row.preset, T=row.T, E=row.E, k=row.k, H=row.H,
               F=row.F, dtype=dt.name, weights=weight_dtype_name(layer), rel_err=err, tol=tol,
               check="PASS" if err <= tol else "FAIL",
               numoe_s=t.median, numoe_spread=t.spread(), numoe_runs=t.runs,
               tokens_per_s=row.T / t.median, gflops=flops / t.median / 1e9,
               ref_s=t_ref.median, ref_spread=t_ref.spread(), ref_runs=t_ref.runs,
               ref_speedup=t_ref.median / t.median, hf_eager_s=None, hf_grouped_s=None,
               hf_err=None, speedup=None, notes=[])
    if batch_invariant:              # the same weights, the batch-invariant schedule
        layer.batch_invariant = True
        t_inv = time_calls(lambda: layer(x), repeat=repeat, budget=budget)
        layer.batch_invariant = False
        res.update(inv_s=t_inv.median, inv_spread=t_inv.spread(),
                   inv_cost=t_inv.median / t.median, inv_err=rel_err(t_inv.result, ref))
    if hf_reason is not None:
        res["notes"].append(f"HF: {hf_reason}")
    else:
        e, g, hf_err = _time_hf(layer, row.preset, x, ref, dt, repeat, budget, res["notes"])
        for key, tm in (("hf_eager", e), ("hf_grouped", g)):
            if tm is not None:
                res[key + "_s"], res[key + "_spread"] = tm.median, tm.spread()
        res["hf_err"] = hf_err
        best = min((tm.median for tm in (e, g) if tm is not None), default=None)
        res["speedup"] = None if best is None else best / t.median
    res["weight_bytes"] = sum(getattr(getattr(layer, name), "nbytes", 0) for name in (
        "router", "w_gate", "w_up", "w_down", "router_bias", "selection_bias", "b_gate", "b_up",
        "b_down", "shared_gate_proj", "shared_up_proj", "shared_down_proj",
        "shared_gate_weight"))
    res["peak_rss_mib"] = peak_rss_mib()     # of the process so far (a running maximum)
    return res


def run_cuda_layer_suite(shapes=None, *, dtype="float32", repeat=None, progress=None,
                         hf=True):
    """The layer suite on the GPU: ``numoe._cuda.bench.run`` (the CUDA backend's own)."""
    mod = numoe._backend.cuda_module("bench")
    return mod.run(rows=select_rows(shapes), dtype=dtype, repeat=repeat,
                   progress=_reporter(progress), hf=hf)


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
    no page faults are timed; the copy is timed before and after the
    permutes and the faster kept). Where ``T*k*H`` values take more than
    ``max_bytes`` the activation width is reduced (column ``H``) so the
    copy stays the same size.

    Returns
    -------
    rows : list of dict
        ``E, k, H, route_s, ref_route_s, torch_route_s, ref_ratio,
        torch_ratio, experts_equal, check, plan_s, permute_s, unpermute_s,
        copy_s, permute_vs_copy, plan_pct_of_permute``; every ``*_s`` time
        (median) has a ``*_spread`` (min, quartiles, max, samples).
    """
    dtype = as_float_dtype("dtype", dtype)
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
                out[-1]["threads"] = numba.get_num_threads()
    return out


def _routing_row(logits, k, H, dtype, torch, repeat, budget, max_bytes):
    T, E = logits.shape
    res = dict(T=T, E=E, k=k, dtype=np.dtype(dtype).name, torch_route_s=None)

    def timed(key, fn, **kw):
        t = time_calls(fn, repeat=repeat, budget=budget, **kw)
        res[key + "_s"], res[key + "_spread"] = t.median, t.spread()
        return t.result

    r = timed("route", lambda: numoe.route(logits, k))
    rr = timed("ref_route", lambda: reference.route(logits, k), min_runs=1, max_runs=10,
               warmup=False)
    if torch is not None and dtype != BFLOAT16:
        lt = torch.from_numpy(logits)
        with torch.inference_mode():
            timed("torch_route", lambda: _torch_route(torch, lt, k))
    plan = timed("plan", lambda: numoe.dispatch_plan(r.experts, E))
    itemsize = np.dtype(dtype).itemsize
    h = int(min(H, max(1, max_bytes // (T * k * itemsize))))
    x = np.random.default_rng(2).standard_normal((T, h)).astype(dtype)
    xs, y = np.empty((plan.order.size, h), dtype), np.empty_like(x)   # outputs allocated once
    dst = np.empty_like(xs)
    copy1 = time_calls(lambda: np.copyto(dst, xs), repeat=repeat, budget=budget)
    timed("permute", lambda: numoe.permute(x, plan, out=xs))
    timed("unpermute", lambda: numoe.unpermute(xs, plan, r.weights, out=y))
    copy2 = time_calls(lambda: np.copyto(dst, xs), repeat=repeat, budget=budget)
    copy = min(copy1, copy2, key=lambda t: t.median)
    equal = bool(np.array_equal(r.experts, rr.experts))
    res.update(H=h, copy_s=copy.median, copy_spread=copy.spread(),
               ref_ratio=res["ref_route_s"] / res["route_s"],
               torch_ratio=(None if res["torch_route_s"] is None
                            else res["torch_route_s"] / res["route_s"]),
               experts_equal=equal, check="PASS" if equal else "FAIL",
               permute_vs_copy=res["permute_s"] / copy.median,
               plan_pct_of_permute=100.0 * res["plan_s"] / res["permute_s"])
    return res


# ---------------------------------------------------------- latency suite
def run_latency_suite(shape="olmoe-T512", tokens=LATENCY_TOKENS, *, threads=None,
                      dtype="float32", weights=None, budget=3.0, min_calls=20, max_calls=5000,
                      bandwidth_bytes=256 << 20, progress=None):
    """Per-call latency of decode-sized batches on one layer shape.

    For each token count ``T``, calls the layer back to back (``budget``
    seconds, ``min_calls``..``max_calls`` calls), each call on fresh
    tokens (a new ``[T, H]`` batch drawn from a pool, so each call routes
    to different experts, as in decoding), and reports p50/p95/p99
    latency, tokens/s at the median, and the floor: the time to read, once,
    the weights of the experts those calls touch (on average; in their
    storage dtype) plus the router, at the bandwidth of a parallel
    read-only pass over ``bandwidth_bytes`` (:func:`read_bandwidth`,
    measured before and after; the faster kept). Rows are named
    ``<shape family>-T<T>``.
    """
    dt = as_float_dtype("dtype", dtype)
    say = _reporter(progress)
    rows = select_rows(shape)
    if len(rows) != 1:
        raise ValueError(f"shape: the latency suite runs one layer shape, got {len(rows)}")
    row = rows[0]
    layer = build_layer(row, dt, weights)
    family = row.name.rsplit("-T", 1)[0]
    rng = np.random.default_rng(0)
    out = []
    with numba_threads(threads):
        say(f"measuring read bandwidth (parallel read of {bandwidth_bytes >> 20} MiB) ...")
        bw_before = read_bandwidth(bandwidth_bytes)
        for T in tokens:
            say(f"latency {family} T={T} ...")
            pool = rng.standard_normal((64, T, row.H)).astype(dt)   # fresh tokens per call
            layer(pool[-1])                                              # warm-up
            lat, touched = [], []
            t_end = time.perf_counter() + budget
            while len(lat) < max_calls and (len(lat) < min_calls or time.perf_counter() < t_end):
                x = pool[len(lat) % len(pool)]
                t0 = time.perf_counter()
                layer(x)
                lat.append(time.perf_counter() - t0)
            for x in pool[:16]:     # experts touched per call, outside the timed loop
                info = layer.forward(x, return_info=True)[1]
                touched.append(np.unique(np.asarray(info["routing"].experts)).size)
            n_touched = float(np.mean(touched))
            nbytes = n_touched * expert_bytes(layer) + layer.router.nbytes
            p50, p95, p99 = np.percentile(lat, [50, 95, 99])
            out.append(dict(shape=f"{family}-T{T}", registry_row=row.name, T=T, E=row.E,
                            k=row.k, H=row.H, F=row.F, dtype=dt.name,
                            weights=weight_dtype_name(layer), calls=len(lat),
                            min_s=float(min(lat)), p50_s=p50, p95_s=p95, p99_s=p99,
                            max_s=float(max(lat)), tokens_per_s=T / p50,
                            touched_experts=n_touched, weight_bytes=nbytes,
                            threads=numba.get_num_threads()))
        say("measuring read bandwidth again ...")
        bw_after = read_bandwidth(bandwidth_bytes)
    bw = max(bw_before, bw_after)
    for res in out:
        floor = res["weight_bytes"] / bw
        res.update(bandwidth_gbs=bw / 1e9, bandwidth_gbs_before=bw_before / 1e9,
                   bandwidth_gbs_after=bw_after / 1e9, floor_s=floor,
                   p50_over_floor=res["p50_s"] / floor, peak_rss_mib=peak_rss_mib())
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

    ``cold``: an empty ``NUMBA_CACHE_DIR`` (everything compiles; one
    process); ``warm``: the same directory again (compiled code loads from
    the cache; median of ``warm_runs`` processes). Layer construction is
    not counted. Rows: ``mode`` (``"cold"``/``"warm"``), ``cache`` (what
    that means), times in seconds, ``notes``.
    """
    say = _reporter(progress)
    out = []
    with tempfile.TemporaryDirectory(prefix="numoe-cache-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for mode, runs, what in (("cold", 1, "empty cache: compiles"),
                                 ("warm", warm_runs, "cache on disk")):
            got = []
            for i in range(runs):
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-c", _STARTUP_SCRIPT, shape,
                                       np.dtype(dtype).name], env=env, capture_output=True,
                                      text=True, check=False)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise RuntimeError(f"start-up probe failed:\n{proc.stderr[-2000:]}")
                got.append(dict(_json_last_line(proc.stdout), process_s=wall))
                say(f"startup {mode} ({what}) run {i + 1}/{runs} on {shape}: import "
                    f"{got[-1]['import_s']:.2f} s, first forward "
                    f"{got[-1]['first_forward_s']:.2f} s")
            med = {key: statistics.median(g[key] for g in got) for key in got[0]}
            out.append(dict(mode=mode, cache=what, shape=shape, runs=runs, notes=[], **med))
    if out[0]["first_forward_s"] < 2 * out[1]["first_forward_s"]:
        out[0]["notes"].append("the cold first forward was not much slower than the warm one: "
                               "was compilation cached elsewhere?")
    return out


def _json_last_line(text):
    import json
    return json.loads(text.strip().splitlines()[-1])


# ------------------------------------------------------------- reporting
def cpu_model():
    """The CPU's model name (``/proc/cpuinfo``; else what ``platform`` says)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def isa_path():
    """Which instruction path numoe's 16-bit GEMMs take on this CPU, in words.

    ``"avx512_bf16"`` (bf16 dot products), ``"avx512 fallback"`` /
    ``"avx2 fallback"`` (16-bit tiles widened to float32 for sgemm) or
    ``"generic fallback"``. Asks ``numoe._cpu.bf16gemm`` when this numoe
    has it, else reads the CPU flags.
    """
    try:
        from numoe._cpu import bf16gemm
    except ImportError:
        bf16gemm = None
    for name in ("isa_path", "path_name", "has_avx512_bf16", "has_bf16_dot"):
        fn = getattr(bf16gemm, name, None)
        if callable(fn):
            try:
                got = fn()
            except Exception:  # noqa: BLE001 - informational only: fall back to the flags
                break
            if isinstance(got, str):
                fallback = _fallback_name(cpu_flags())
                return f"{got} ({fallback.split()[0]})" if "fallback" in got else got
            if isinstance(got, bool):
                return "avx512_bf16" if got else _fallback_name(cpu_flags())
    flags = cpu_flags()
    return "avx512_bf16" if "avx512_bf16" in flags else _fallback_name(flags)


def _fallback_name(flags):
    if "avx512f" in flags:
        return "avx512 fallback"
    if "avx2" in flags:
        return "avx2 fallback"
    return "generic fallback"


def machine_info():
    """CPU (model, ISA path), cores, threads, load, versions and date, for every table."""
    load, cores = machine_load()
    return dict(cpu=cpu_model(), isa=isa_path(), cores=cores, threads=numba.get_num_threads(),
                load=load, date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                numoe=numoe.__version__, python=platform.python_version(),
                numpy=np.__version__, numba=numba.__version__,
                torch=installed_version("torch"), blas=blas_name())


def info():
    """What ``numoe info`` prints, as a dict: versions, CPU, threads, backends, BLAS.

    Keys: ``numoe``, ``python``, ``versions`` (package -> version or None),
    ``cpu``, ``isa``, ``cores``, ``threads`` (Numba threads),
    ``threading_layer``, ``backends``, ``blas``.
    """
    m = machine_info()
    return dict(numoe=numoe.__version__, python=m["python"],
                versions={name: installed_version(name) for name in (
                    "numpy", "numba", "scipy", "ml_dtypes", "torch", "transformers")},
                cpu=m["cpu"], isa=m["isa"], cores=m["cores"], threads=m["threads"],
                threading_layer=numba.config.THREADING_LAYER, backends=numoe.backends(),
                blas=m["blas"])


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
    load = "" if info.get("load") is None else f", load {info['load']:.2f}"
    return (f"{info['cpu']} ({info.get('isa', '?')}), {info['cores']} cores, "
            f"{info['threads']} threads{load} | {info['date']} | "
            f"numoe {info['numoe']}, numpy {info['numpy']}, numba {info['numba']}, "
            f"torch {info['torch'] or 'not installed'} | BLAS {info['blas']}")


def peak_rss_mib(children=False):
    """Peak resident set size in MiB of this process (or of its largest finished child)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0


def _ms(v):
    return f"{v * 1e3:.3g}" if v * 1e3 < 100 else f"{v * 1e3:.0f}"


def _fmt(v, kind, spread=None):
    """One table cell: ``ms`` seconds as milliseconds (with ``[min-max]`` when a
    spread is given), ``x`` ratio, ``e`` error, ``%`` percentage, ``f`` number,
    ``mib`` bytes as MiB, ``s`` as is."""
    if v is None:
        return "n/a"
    if kind == "ms":
        if spread and spread.get("runs", 1) > 1:
            return f"{_ms(v)} [{_ms(spread['min'])}-{_ms(spread['max'])}]"
        return _ms(v)
    if kind == "mib":
        mib = v / 2**20
        return f"{mib:.3g}" if mib < 1000 else f"{mib:.0f}"
    if kind == "x":
        return f"{v:.2f}x"
    if kind == "e":
        return f"{v:.1e}"
    if kind == "%":
        return f"{v:.1f}%"
    if kind == "f":
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


# columns left out of a table where no row has a value (the parity extra is not installed)
_OPTIONAL_COLUMNS = ("hf_", "speedup", "torch_", "inv_")

# (key, column header, format) per suite; a "ms" column shows its key's ``_spread``
COLUMNS = {
    "layers": [("name", "row", "s"), ("T", "T", "s"), ("E", "E", "s"), ("k", "k", "s"),
               ("H", "H", "s"), ("F", "F", "s"), ("storage", "x/weights", "s"),
               ("weight_bytes", "weights MiB", "mib"), ("rel_err", "rel err", "e"), ("check", "check", "s"),
               ("numoe_s", "numoe ms", "ms"), ("tokens_per_s", "tok/s", "f"),
               ("gflops", "GFLOP/s", "f"), ("pct_blas", "%BLAS", "%"),
               ("ref_s", "ref ms", "ms"), ("ref_speedup", "numoe speedup vs ref (>1: faster)", "x"),
               ("hf_eager_s", "HF eager ms", "ms"),
               ("hf_grouped_s", "HF grouped_mm ms", "ms"), ("hf_err", "HF err", "e"),
               ("speedup", "numoe speedup vs HF (>1: faster)", "x"),
               ("inv_s", "batch-invariant ms", "ms"),
               ("inv_cost", "batch-invariant cost (x numoe ms)", "x")],
    "routing": [("E", "E", "s"), ("k", "k", "s"), ("route_s", "route ms", "ms"),
                ("ref_route_s", "ref ms", "ms"),
                ("ref_ratio", "numoe speedup vs ref (>1: faster)", "x"),
                ("torch_route_s", "torch ms", "ms"),
                ("torch_ratio", "numoe speedup vs torch (>1: faster)", "x"),
                ("experts_equal", "= ref", "s"), ("plan_s", "plan ms", "ms"),
                ("H", "H", "s"), ("permute_s", "permute ms", "ms"),
                ("unpermute_s", "unpermute ms", "ms"),
                ("copy_s", "copy floor ms", "ms"),
                ("permute_vs_copy", "permute/floor", "x"),
                ("plan_pct_of_permute", "plan % perm", "%")],
    "latency": [("shape", "layer", "s"), ("T", "T", "s"), ("storage", "x/weights", "s"),
                ("calls", "calls", "s"), ("p50_s", "p50 ms", "ms"), ("p95_s", "p95 ms", "ms"),
                ("p99_s", "p99 ms", "ms"), ("tokens_per_s", "tok/s", "f"),
                ("touched_experts", "experts", "f"), ("weight_bytes", "MiB read", "mib"),
                ("floor_s", "floor ms", "ms"), ("p50_over_floor", "p50/floor", "x")],
    "startup": [("mode", "run", "s"), ("cache", "Numba cache", "s"), ("shape", "shape", "s"),
                ("runs", "runs", "s"), ("import_s", "import s", "f"),
                ("first_forward_s", "1st forward s", "f"),
                ("second_forward_s", "2nd forward ms", "ms"), ("process_s", "process s", "f")],
}


def legend(rows, suite):
    """The lines that explain a suite's columns (printed under its table)."""
    r0 = rows[0] if rows else {}
    if suite == "layers":
        tols = ", ".join(f"{d} {t:g}" for d, t in TOLERANCE.items())
        blas = r0.get("blas_gflops")
        before, after = r0.get("blas_gflops_before"), r0.get("blas_gflops_after")
        blas = "" if blas is None else f": {blas:.1f} GFLOP/s" + (
            "" if before is None else f" (before {before:.1f}, after {after:.1f})")
        return [
            "ms: median time per call [min-max over the timed samples] (short calls are "
            "batched so each sample lasts >= 1 ms).",
            "rel err: ||y - y_ref|| / ||y_ref||, y_ref = the float64 NumPy reference on the "
            "same rounded inputs and weights.",
            f"check: PASS when rel err <= the tolerance of the activation dtype ({tols}).",
            "x/weights: activation dtype / storage of the expert weights; weights MiB: all "
            "the layer's arrays as stored.",
            "%BLAS: numoe's GFLOP/s over NumPy's BLAS GEMM rate (2048^3 np.matmul, float32 "
            "for 16-bit dtypes; the better of two runs, before and after the table"
            f"{blas}).",
            "numoe speedup vs ref / vs HF: the other's time / numoe's time: above 1, numoe is "
            "faster (HF: the faster of HF eager and grouped_mm).",
        ] + (["HF err: rel err of the Hugging Face block against the same reference."]
             if any(r.get("hf_err") is not None for r in rows) else []) + (
            ["batch-invariant: the same layer with batch_invariant=True (every token's output "
             "bit-identical whatever else is in the batch); cost = its time / numoe's time."]
            if any(r.get("inv_s") is not None for r in rows) else [])
    if suite == "routing":
        return [
            "ms: median time per call [min-max over the samples] (short calls are batched so "
            "each sample lasts >= 1 ms).",
            "numoe speedup vs ref / vs torch: their time / numoe's time: above 1, numoe is faster.",
            "= ref: numoe chose exactly the reference's experts (PASS/FAIL).",
            "copy floor: np.copyto of the same [T*k, H] bytes (the faster of two runs, before "
            "and after the permutes); permute/floor: 1.00x = at the floor.",
            "plan % perm: dispatch_plan's time as a share of one permute's.",
        ]
    if suite == "latency":
        bw = r0.get("bandwidth_gbs")
        bw = "" if bw is None else (
            f" ({bw:.1f} GB/s; before {r0['bandwidth_gbs_before']:.1f}, after "
            f"{r0['bandwidth_gbs_after']:.1f})")
        return [
            "p50/p95/p99: per-call latency percentiles over `calls` calls, each call on fresh "
            "tokens (different experts each call).",
            "experts: distinct experts one call touches (mean); MiB read: their weights in "
            "the storage dtype, plus the router.",
            f"floor: MiB read / the read bandwidth of a parallel read-only pass{bw}, the "
            "better of two runs; p50/floor: 1.00x = at the memory floor.",
        ]
    if suite == "train":
        return [
            "ms: median time per step [min-max over the timed samples]; a step = forward "
            "(return_info=True) + backward of the whole layer (d_x and every parameter's "
            "gradient).",
            "numoe fwd+bwd: as a training loop runs it, layer.backward(..., out=g) writing "
            "into the previous step's gradient arrays; new-grads: out=None, new gradient "
            "arrays every step while the previous ones are alive (first-touch page faults).",
            "HF: torch autograd through the equivalent Hugging Face block (zero_grad("
            "set_to_none=True), forward, backward(d_y)), eager and grouped_mm experts.",
            "MiB: rise of the resident set during one step (numoe: a new-grads step plus the "
            "backward scratch kept between steps; HF: the larger of its two).",
            "numoe speedup vs HF: HF's faster time / numoe fwd+bwd: above 1, numoe is faster.",
        ]
    if suite == "startup":
        return [
            "cold: one fresh process with an empty NUMBA_CACHE_DIR (everything compiles); "
            "warm: fresh processes with that cache on disk (median of `runs`).",
            "import s: `import numoe`; 1st forward s: the first layer call (compile or cache "
            "load); 2nd forward: a warm call; process s: the whole child process.",
        ]
    return []


_SHORT = {"float64": "f64", "float32": "f32", "float16": "f16", "bfloat16": "bf16",
          "int8": "int8"}


def _storage(r):
    """``x dtype/weight storage`` in short names, e.g. ``f32/bf16``."""
    x = r.get("dtype", "")
    w = r.get("weights") or x
    return f"{_SHORT.get(x, x)}/{_SHORT.get(w, w)}"


def _row_label(r, suite):
    if "name" in r:
        return r["name"]
    if suite == "startup" or "mode" in r:
        return r["mode"]
    if suite == "latency" or "shape" in r:
        return f"T={r['T']}"
    return f"E={r['E']} k={r['k']}"


def _roof_warnings(rows):
    """A warning when a roof measured before and after the rows moved by over 20 %."""
    out = []
    r0 = rows[0] if rows else {}
    for key, what, unit in (("blas_gflops", "BLAS GEMM rate", "GFLOP/s"),
                            ("bandwidth_gbs", "read bandwidth", "GB/s")):
        a, b = r0.get(key + "_before"), r0.get(key + "_after")
        if a and b and max(a, b) > 1.2 * min(a, b):
            out.append(f"the {what} moved from {a:.1f} to {b:.1f} {unit} during the run: "
                       f"the machine's load changed, figures are noisy")
    return out


def format_table(rows, suite, *, with_legend=True):
    """Rows as an aligned text table (first column left-aligned, the rest right),
    followed by the rows' notes, warnings about noisy timings and the legend."""
    cols = [c for c in COLUMNS[suite]       # HF/torch columns only where something was timed
            if not c[0].startswith(_OPTIONAL_COLUMNS) or any(r.get(c[0]) is not None
                                                             for r in rows)]
    cells = [[head for _, head, _ in cols]]
    for r in rows:
        r = dict(r, storage=_storage(r))
        if suite == "routing":
            r["experts_equal"] = r.get("check") or ("PASS" if r.get("experts_equal") else "FAIL")
        cells.append([_fmt(r.get(key), kind, r.get(key[:-2] + "_spread") if kind == "ms"
                           else None) for key, _, kind in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]

    def line(c):
        return "  ".join([c[0].ljust(widths[0])] +
                         [c[i].rjust(widths[i]) for i in range(1, len(c))])
    lines = [line(cells[0]), line(["-" * w for w in widths])] + [line(c) for c in cells[1:]]
    common = [n for n in (rows[0].get("notes", ()) if len(rows) > 1 else ())
              if all(n in r.get("notes", ()) for r in rows)]
    notes = [f"every row: {note}" for note in common]
    notes += [f"{_row_label(r, suite)}: {note}" for r in rows for note in r.get("notes", ())
              if note not in common]
    lines += [f"  note: {n}" for n in notes]
    keys = [key for key, _, kind in cols if kind == "ms"]
    lines += [f"  WARNING: {w}" for w in noise_warnings(rows, keys) + _roof_warnings(rows)]
    if with_legend:
        lines += [f"  legend: {line}" if i == 0 else f"          {line}"
                  for i, line in enumerate(legend(rows, suite))]
    return "\n".join(lines)


# time columns drawn by --plot, per suite: (key, label)
PLOT_SERIES = {
    "layers": [("numoe_s", "numoe"), ("hf_eager_s", "HF eager"),
               ("hf_grouped_s", "HF grouped_mm"), ("ref_s", "NumPy reference")],
    "routing": [("route_s", "numoe route"), ("ref_route_s", "reference route"),
                ("torch_route_s", "torch route"), ("plan_s", "dispatch_plan"),
                ("permute_s", "permute"), ("unpermute_s", "unpermute"),
                ("copy_s", "np.copyto floor")],
    "latency": [("p50_s", "p50"), ("p99_s", "p99"), ("floor_s", "read floor")],
    "startup": [("import_s", "import"), ("first_forward_s", "first forward")],
}

_PLOT_TITLES = {"layers": "One MoE layer forward", "routing": "Routing and data movement",
                "latency": "Decode latency", "startup": "Start-up"}


def plot(rows, suite, path, title=""):
    """A PNG for a report: one panel per row, horizontal bars on a linear millisecond
    axis, each labelled with its value, whiskers from the first to the third quartile
    of the samples where measured.

    ``title`` (e.g. :func:`header_line`) is wrapped under the suite's name.
    """
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = [(k, lbl) for k, lbl in PLOT_SERIES[suite] if any(r.get(k) for r in rows)]
    n = max(1, len(rows))
    ncols = 1 if n <= 3 else 2
    nrows = -(-n // ncols)
    panel_h = 0.42 * max(1, len(series)) + 1.1
    head = [_PLOT_TITLES.get(suite, suite)] + (textwrap.wrap(title, 100) if title else [])
    head_h = 0.22 * len(head) + 0.55
    fig_h = panel_h * nrows + head_h
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, fig_h), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = [k for k, _ in series]
    for ax, r in zip(axes.flat, rows):
        keys = [(k, lbl) for k, lbl in series if r.get(k)]
        vals = [r[k] * 1e3 for k, _ in keys]
        right = max(vals) if vals else 1.0
        lo, hi = [], []
        for (k, _), v in zip(keys, vals):
            sp = r.get(k[:-2] + "_spread") or {}
            lo.append(max(0.0, v - sp.get("q1", v / 1e3) * 1e3))
            hi.append(min(max(0.0, sp.get("q3", v / 1e3) * 1e3 - v), 0.25 * right))
        ys = np.arange(len(keys))
        ax.barh(ys, vals, color=[colors[names.index(k) % len(colors)] for k, _ in keys],
                xerr=[lo, hi] if any(lo) or any(hi) else None, capsize=3,
                error_kw=dict(ecolor="0.3", lw=1))
        ax.set_yticks(ys, [lbl for _, lbl in keys])
        ax.invert_yaxis()
        ax.set_xlim(0, right * 1.45)
        for y, v, h in zip(ys, vals, hi):
            ax.text(v + h + right * 0.02, y, f"{v:.3g} ms" if v < 100 else f"{v:.0f} ms",
                    va="center", fontsize=8)
        ax.set_title(_plot_panel_title(r, suite), fontsize=8.5)
        ax.set_xlabel("ms per call (lower is better; whiskers: quartiles)", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle("\n".join(head), fontsize=9)
    fig.tight_layout()
    fig.subplots_adjust(top=1 - head_h / fig_h)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_panel_title(r, suite):
    label = _row_label(r, suite)
    if suite == "layers":
        parts = [f"{label}: T={r['T']}, E={r['E']}, k={r['k']}, H={r['H']}, F={r['F']}, "
                 f"{_storage(r)}, {r.get('check', '')}"]
        ratio, other = r.get("speedup"), "HF's best"
        if ratio is None:
            ratio, other = r.get("ref_speedup"), "the NumPy reference"
        if ratio is not None:
            parts.append(f"numoe {ratio:.2f}x faster than {other}" if ratio >= 1 else
                         f"numoe {1 / ratio:.2f}x slower than {other}")
        return "\n".join(parts)
    if suite == "latency":
        return f"{r['shape']}: p50 = {r['p50_over_floor']:.2f}x the read floor"
    if suite == "routing":
        return f"T={r['T']}, {label}, H={r['H']}"
    return f"{label} ({r.get('cache', '')})"


# ------------------------------------------------------------- train suite
# Forward + backward of whole layers (``numoe bench --train``): numoe's
# ``layer.forward`` + ``layer.backward`` against torch autograd through the
# equivalent HF block (eager and grouped_mm experts), same weights, input
# and output gradient; peak memory of each as the rise of this process's
# resident set during one step (sampled every half millisecond).
def _rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_during(fn):
    """``(result, bytes)``: ``fn()`` and how far the resident set rose above its
    level at the call (polled by a thread; Linux ``/proc``, else ``None``)."""
    import ctypes
    import threading

    try:        # hand freed heap back to the OS first, so that reuse cannot hide a peak
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        base = _rss_bytes()
    except OSError:
        return fn(), None
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(5e-4)
    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        res = fn()
    finally:
        peak[0] = max(peak[0], _rss_bytes())
        done.set()
        th.join()
    return res, peak[0] - base


def _hf_train_step(torch, layer, family, x, d_y, dtype):
    """``(block, step, impls)``: ``step()`` runs HF's forward and ``backward(d_y)``
    and returns ``d_x`` (every parameter's gradient is filled too)."""
    block, call = hf_block(layer, family, dtype)
    for p in block.parameters():
        p.requires_grad_(True)
    block.train(False)
    xt = _tensor(torch, x, dtype)
    dyt = _tensor(torch, d_y, dtype)

    def step():
        block.zero_grad(set_to_none=True)
        xg = xt.detach().requires_grad_(True)
        call(xg).backward(dyt)
        return xg.grad
    impls = ["eager"] + (["grouped_mm"] if _has_grouped_mm() else [])
    return block, step, impls


def run_train_suite(shapes=None, *, threads=2, dtype="float32", repeat=None, budget=2.0,
                    hf=True, progress=None):
    """Time one training step (forward + backward) of whole layers against PyTorch.

    Parameters
    ----------
    shapes : list of str or Row, or str, optional
        Registry rows (default: the default suite).
    threads : int, optional
        Numba and PyTorch threads (default 2; None: leave as set).
    dtype : {"float32", "float64"}
    repeat, budget, progress
        As :func:`run_layer_suite`.
    hf : bool
        Also time torch autograd through the HF block when installed.

    Returns
    -------
    rows : list of dict
        Per row: sizes, ``numoe_s`` (forward + backward as a training loop
        runs it: ``backward(..., out=g)`` writes into the previous step's
        gradient arrays, ``numoe_grads`` says so; median, with
        ``numoe_spread``), ``numoe_new_s`` (the same step with new gradient
        arrays, ``out=None``, the previous result still alive),
        ``numoe_fwd_s`` (forward alone), ``hf_eager_s``,
        ``hf_grouped_s``, ``speedup`` (HF best / numoe), ``dx_err`` (numoe's
        ``d_x`` against HF's, relative), ``numoe_mem`` / ``hf_mem`` (bytes the
        resident set rose during one step; numoe: a step with new gradient
        arrays, as HF allocates its ``.grad``, plus the backward scratch kept
        between steps; HF: the larger of eager and grouped_mm), ``notes``.
    """
    dt = as_float_dtype("dtype", dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"the train suite runs float32 or float64, not {dt.name}")
    say = _reporter(progress)
    hf_reason = hf_available() if hf else "not requested (--no-hf)"
    torch = _torch() if hf_reason is None else None
    out = []
    with numba_threads(threads), _torch_threads(torch, threads):
        for i, row in enumerate(select_rows(shapes), 1):
            say(f"[{i}/{len(select_rows(shapes))}] {row.name} (train): T={row.T} E={row.E} "
                f"k={row.k} H={row.H} F={row.F} ...")
            res = _train_row(row, dt, repeat, budget, hf_reason, torch)
            res["threads"] = numba.get_num_threads()
            out.append(res)
            best = "n/a" if res["speedup"] is None else f"{res['speedup']:.2f}x HF's best"
            say(f"    numoe fwd+bwd {res['numoe_s'] * 1e3:.2f} ms, speedup {best}")
    return out


def _train_row(row, dt, repeat, budget, hf_reason, torch):
    layer = build_layer(row, dt)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((row.T, row.H)).astype(dt)
    d_y = rng.standard_normal((row.T, row.H)).astype(dt)

    def fresh_step():               # new gradient arrays every step
        y, info = layer.forward(x, return_info=True)
        return layer.backward(x, info, d_y)
    g = fresh_step()                # warm-up (compiles); the buffers step() reuses

    def step():                     # a training loop: the gradients written into g
        y, info = layer.forward(x, return_info=True)
        return layer.backward(x, info, d_y, out=g)
    step()
    # peak memory: a step that allocates its gradients, as HF's does (its .grad), plus
    # the backward scratch this thread keeps between steps
    g2, mem = peak_rss_during(fresh_step)
    del g2
    if mem is not None:
        mem += cpu_experts.scratch_bytes()
    t = time_calls(step, repeat=repeat, budget=budget, warmup=False)
    t_new = time_calls(fresh_step, repeat=repeat, budget=budget, min_runs=2)
    t_fwd = time_calls(lambda: layer(x), repeat=repeat, budget=budget)
    res = dict(name=row.name, preset=row.preset, T=row.T, E=row.E, k=row.k, H=row.H,
               F=row.F, dtype=dt.name, numoe_s=t.median, numoe_spread=t.spread(),
               numoe_grads="out= (reused buffers)", numoe_new_s=t_new.median,
               numoe_new_spread=t_new.spread(),
               numoe_fwd_s=t_fwd.median, numoe_fwd_spread=t_fwd.spread(), numoe_mem=mem,
               hf_eager_s=None, hf_grouped_s=None, hf_mem=None, dx_err=None, speedup=None,
               notes=[])
    del g
    if hf_reason is not None:
        res["notes"].append(f"HF: {hf_reason}")
        return res
    try:
        block, hf_step, impls = _hf_train_step(torch, layer, row.preset, x, d_y, dt)
    except ValueError as exc:
        res["notes"].append(f"HF: {exc}")
        return res
    times = {}
    for impl in impls:
        block.experts.config._experts_implementation = impl
        try:
            hf_step()
            dx, m = peak_rss_during(hf_step)
            tm = time_calls(hf_step, repeat=repeat, budget=budget, min_runs=2, warmup=False)
        except (RuntimeError, ValueError) as exc:
            res["notes"].append(f"HF {impl}: {str(exc).splitlines()[0]}")
            continue
        times[impl] = tm
        res["hf_mem"] = m if res["hf_mem"] is None else max(res["hf_mem"], m)
        if res["dx_err"] is None:
            gx = layer.backward(x, layer.forward(x, return_info=True)[1], d_y)["x"]
            res["dx_err"] = rel_err(gx, dx.detach().double().numpy())
    for key, impl in (("hf_eager", "eager"), ("hf_grouped", "grouped_mm")):
        if impl in times:
            res[key + "_s"], res[key + "_spread"] = times[impl].median, times[impl].spread()
    best = min((tm.median for tm in times.values()), default=None)
    res["speedup"] = None if best is None else best / t.median
    return res


COLUMNS["train"] = [
    ("name", "row", "s"), ("T", "T", "s"), ("E", "E", "s"), ("k", "k", "s"), ("H", "H", "s"),
    ("F", "F", "s"), ("dtype", "dtype", "s"), ("numoe_fwd_s", "numoe fwd ms", "ms"),
    ("numoe_s", "numoe fwd+bwd ms", "ms"), ("numoe_new_s", "numoe new-grads ms", "ms"),
    ("hf_eager_s", "HF eager ms", "ms"),
    ("hf_grouped_s", "HF grouped_mm ms", "ms"), ("dx_err", "d_x err vs HF", "e"),
    ("numoe_mem", "numoe MiB", "mib"), ("hf_mem", "HF MiB", "mib"),
    ("speedup", "numoe speedup vs HF (>1: faster)", "x")]
PLOT_SERIES["train"] = [("numoe_s", "numoe fwd+bwd"), ("hf_eager_s", "HF eager fwd+bwd"),
                        ("hf_grouped_s", "HF grouped_mm fwd+bwd")]
