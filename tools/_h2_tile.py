import time, numpy as np, numba
import numoe
from numoe._cpu import experts as C
cfg = numoe.MoEConfig.olmoe(num_experts=64, top_k=8, hidden_dim=2048, expert_dim=1024)
layer = numoe.MoELayer.random(cfg, seed=0, weight_dtype="bfloat16")
rng = np.random.default_rng(0)
x = rng.standard_normal((512, 2048)).astype(np.float32)
for tile in (256, 512, 1024, 2048):
    C.BLAS_TILE = tile
    layer(x)
    ts = []
    for _ in range(3):
        t0 = time.perf_counter(); layer(x); ts.append(time.perf_counter() - t0)
    print(f"bf16 weights, f32 x, T=512, BLAS_TILE={tile}: min {min(ts)*1e3:.1f} med {np.median(ts)*1e3:.1f} ms", flush=True)
