"""Per-kernel GPU times of numoe's device forward and routing ops (a GPU machine).

    python tools/gpu_profile.py [--Ts 1,16,64] [--route-T 262144] [--gemv "64,8,2048;off"]
                                [--mma "32;64"] [--host 1,4096]

Every launch of one eager call is bracketed by two CUDA events and waited
for (``numoe._cuda._launch.PROFILE``), so the table gives each kernel's GPU
time without the launch overhead; the wall time of the same call with and
without the CUDA graph (``numoe._cuda.graph``) is printed beside the sum.
OLMoE-shaped layer (E=64 k=8 H=2048 F=1024), bfloat16 weights and x.
``--gemv`` first compares decode GEMV configurations (``NUMOE_CUDA_GEMV``
"threads,loads in flight,target blocks"; "off" = the skinny kernel), each on
a fresh device layer: graph wall time and GPU time per token count; ``--mma``
likewise compares the tensor-core tile heights (``NUMOE_CUDA_MMA_BM``; "32/1":
32-row tiles and every expert on the tensor cores from 1 token on,
``NUMOE_CUDA_MMA_DECODE_FROM``) with the GPU time of the two tensor-core kernels
and their TFLOP/s. ``--host``
profiles the host side of the eager forward (cProfile); ``--route-T 0``
skips the routing profiles.
"""
import argparse
import os
import sys
import time

import ml_dtypes
import numpy as np
from numba import cuda

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numoe  # noqa: E402
from numoe._cuda import _arrays as A  # noqa: E402
from numoe._cuda import _launch as L  # noqa: E402
from numoe._cuda import dispatch as D  # noqa: E402
from numoe._cuda import experts as X  # noqa: E402
from numoe._cuda import moe  # noqa: E402
from numoe._cuda import routing as R  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def wall(fn, n=50):
    fn()
    cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def profile(label, fn):
    fn()                                   # compiles
    cuda.synchronize()
    L.PROFILE = {}
    try:
        fn()
    finally:
        prof, L.PROFILE = L.PROFILE, None
    prof.pop("spin", None)
    total = sum(v[1] for v in prof.values())
    print(f"\n== {label}: {sum(v[0] for v in prof.values())} launches, "
          f"GPU {total:.3f} ms in kernels")
    for name, (n, ms) in sorted(prof.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:44s} {n:3d} x  {ms:8.3f} ms  {100 * ms / max(total, 1e-9):5.1f}%")
    return total


def kernel_times(layer, x):
    """{kernel name: [launches, GPU ms]} of one eager forward (no printing)."""
    L.PROFILE = {}
    try:
        moe.forward(layer, x, graph=False)
    finally:
        prof, L.PROFILE = L.PROFILE, None
    prof.pop("spin", None)
    return prof


def host_profile(layer, x, T, n=20):
    """Where the host time of the eager forward goes: cProfile over ``n`` calls."""
    import cProfile
    import pstats

    for _ in range(3):
        moe.forward(layer, x, graph=False)
    cuda.synchronize()
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    for _ in range(n):
        moe.forward(layer, x, graph=False)
    cuda.synchronize()
    pr.disable()
    print(f"\n== host profile, eager forward T={T}: {1e3 * (time.perf_counter() - t0) / n:.3f}"
          f" ms per call (profiled), launches {L.stats()}")
    st = pstats.Stats(pr)
    st.sort_stats("tottime").print_stats(18)
    st.sort_stats("cumulative").print_stats(25)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--Ts", default="1,16,64")
    ap.add_argument("--route-T", type=int, default=262144)
    ap.add_argument("--gemv", default="")
    ap.add_argument("--mma", default="")
    ap.add_argument("--host", default="", help="token counts: cProfile the eager forward")
    a = ap.parse_args()
    cfg = numoe.MoEConfig.olmoe(num_experts=64, top_k=8, hidden_dim=2048, expert_dim=1024)
    host_layer = numoe.MoELayer.random(cfg, seed=0, dtype=BF16, weight_dtype=BF16)
    layer = host_layer.to_device()
    rng = np.random.default_rng(0)
    if a.gemv:
        xs = {T: A.to_device(rng.standard_normal((T, 2048)).astype(BF16))
              for T in (int(v) for v in a.Ts.split(","))}
        for c in a.gemv.split(";"):
            os.environ.pop("NUMOE_CUDA_GEMV", None)
            os.environ["NUMOE_CUDA_DECODE"] = "0" if c == "off" else "1"
            if c not in ("off", "default"):
                os.environ["NUMOE_CUDA_GEMV"] = c
            lay = host_layer.to_device()
            row = []
            for T, x in xs.items():
                g = wall(lambda: moe.forward(lay, x), n=30)
                prof = kernel_times(lay, x)
                row.append(f"T={T}: graph {g:.3f} ms, GPU {sum(v[1] for v in prof.values()):.3f}")
            print(f"gemv {c:16s} " + " | ".join(row), flush=True)
        os.environ.pop("NUMOE_CUDA_GEMV", None)
        os.environ["NUMOE_CUDA_DECODE"] = "1"
    for T in (int(v) for v in a.host.split(",") if v):
        host_profile(layer, A.to_device(rng.standard_normal((T, 2048)).astype(BF16)), T)
    if a.mma:
        xs = {T: A.to_device(rng.standard_normal((T, 2048)).astype(BF16))
              for T in (int(v) for v in a.Ts.split(","))}
        for c in a.mma.split(";"):          # "BM" or "BM/tokens": the tensor cores from
            bm, _, frm = c.partition("/")   # that many tokens on (NUMOE_CUDA_MMA_DECODE_FROM)
            os.environ["NUMOE_CUDA_MMA_BM"] = bm
            if frm:
                os.environ["NUMOE_CUDA_MMA_DECODE_FROM"] = frm
            else:
                os.environ.pop("NUMOE_CUDA_MMA_DECODE_FROM", None)
            lay = host_layer.to_device()
            for T, x in xs.items():
                g = wall(lambda: moe.forward(lay, x), n=20)
                prof = kernel_times(lay, x)
                mm = sum(v[1] for k, v in prof.items()
                         if k in ("_build.glu_kernel", "_build.plain_kernel"))
                tflops = 2 * T * 8 * 3 * 2048 * 1024 / (mm * 1e-3) / 1e12 if mm else 0.0
                print(f"mma {c:6s} T={T} ({X.last_path.get('up')}): wall {g:.3f} ms, "
                      f"GPU {sum(v[1] for v in prof.values()):.3f} ms, tensor-core kernels "
                      f"{mm:.3f} ms ({tflops:.0f} TFLOP/s)", flush=True)
        os.environ.pop("NUMOE_CUDA_MMA_BM", None)
        os.environ.pop("NUMOE_CUDA_MMA_DECODE_FROM", None)
    for T in (int(v) for v in a.Ts.split(",")):
        x = A.to_device(rng.standard_normal((T, 2048)).astype(BF16))
        gpu = profile(f"OLMoE bf16 forward T={T}", lambda: moe.forward(layer, x, graph=False))
        eager = wall(lambda: moe.forward(layer, x, graph=False))
        graphed = wall(lambda: moe.forward(layer, x))
        print(f"  wall: eager {eager:.3f} ms, graph {graphed:.3f} ms, kernels {gpu:.3f} ms")
    T = a.route_T
    if not T:
        return
    z = A.to_device(rng.standard_normal((T, 64)).astype(np.float32))
    profile(f"route T={T} E=64 k=8 float32", lambda: R.route(z, 8))
    r = R.route(z, 8)
    flat = A.reshape(r.experts, (T * 8,))
    profile(f"dispatch_plan T={T}", lambda: D.dispatch_plan(r.experts, 64))
    profile(f"multisplit T={T}", lambda: D.multisplit(flat, 64))


if __name__ == "__main__":
    main()
