"""OLMoE-shaped decode/prefill: float32 vs bf16 vs int8 weights (temporary, H2)."""
import sys, time, numpy as np, ml_dtypes, numba
from numba import njit, prange
import numoe
from numoe._cpu import bf16gemm
cfg = numoe.MoEConfig.olmoe(num_experts=64, top_k=8, hidden_dim=2048, expert_dim=1024)
which = sys.argv[1].split(",")
Ts = [int(t) for t in sys.argv[2].split(",")]
base = numoe.MoELayer.random(cfg, seed=0)
mk = {"f32": lambda: base, "bf16w": lambda: base.astype(weight_dtype="bfloat16"),
      "bf16": lambda: base.astype(dtype="bfloat16", weight_dtype="bfloat16"),
      "int8w": lambda: base.astype(weight_dtype="int8"),
      "bf16inv": lambda: numoe.MoELayer.random(cfg, seed=0, dtype="bfloat16", batch_invariant=True)}

@njit(parallel=True, cache=True)
def _readsum(a, nt):
    n = a.size; part = np.zeros(nt)
    for t in prange(nt):
        s = 0.0
        for i in range(t * n // nt, (t + 1) * n // nt):
            s += a[i]
        part[t] = s
    return part.sum()
big = np.ones(1 << 28, np.float32)
_readsum(big, 2)
t0 = time.perf_counter(); _readsum(big, 2); _readsum(big, 2); bw = 2 * big.nbytes / (time.perf_counter() - t0)
del big
print(f"threads {numba.get_num_threads()}  read bandwidth {bw/1e9:.1f} GB/s  bf16 gemm path {bf16gemm.isa_path()}", flush=True)
rng = np.random.default_rng(0)
for name in which:
    layer = mk[name]()
    per_expert = (layer._w1.nbytes + layer.w_down.nbytes) / 64
    print(f"{name}: dtype {layer.dtype}, weights {layer.weight_dtype}, nbytes {layer.nbytes/1e6:.0f} MB", flush=True)
    for T in Ts:
        reps = 40 if T <= 4 else (15 if T <= 16 else 3)
        xs = [rng.standard_normal((T, 2048)).astype(layer.dtype) for _ in range(reps + 2)]
        layer(xs[0]); layer(xs[1])
        ts, uniq = [], []
        for x in xs[2:]:
            t0 = time.perf_counter(); y, info = layer.forward(x, return_info=True); ts.append(time.perf_counter() - t0)
            uniq.append(len(np.unique(info["routing"].experts)))
        floor = np.mean(uniq) * per_expert / bw
        q = np.percentile(ts, [0, 50, 100]) * 1e3
        print(f"  T={T:4d} min {q[0]:8.2f} med {q[1]:8.2f} max {q[2]:8.2f} ms   floor {floor*1e3:6.2f} ms  med/floor {q[1]/1e3/floor:5.2f}", flush=True)
