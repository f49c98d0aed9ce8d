import time, numpy as np, ml_dtypes
from threadpoolctl import threadpool_limits
from numoe._cpu import bf16gemm as G
G._bench(ms=(64, 256), repeat=7)
rng = np.random.default_rng(0)
k, n = 2048, 2048
with threadpool_limits(1):
    for m in (16, 64, 256):
        a = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((k, n), dtype=np.float32).astype(ml_dtypes.bfloat16)
        out = np.empty((m, n), np.float32)
        for p in ("auto", "fallback"):
            G.bf16_matmul(a, w, out, force=p)
            ts = []
            for _ in range(5):
                t0 = time.perf_counter(); G.bf16_matmul(a, w, out, force=p); ts.append(time.perf_counter() - t0)
            print(f"unpacked w, M={m} path={G.isa_path(p)}: {min(ts)*1e3:.2f} ms, {2*m*k*n/min(ts)/1e9:.1f} GFLOP/s")
