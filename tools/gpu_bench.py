"""GPU benchmark tables (run by tools/gpu_run.sh bench): layers vs HF, and routing GB/s.

Usage: python tools/gpu_bench.py [--rows olmoe-T16,olmoe-T4096,...] [--routing-T 262144]
Writes $OUT/bench.json.
"""
import argparse
import json
import os
import sys

from numoe import bench as CPU
from numoe._cuda import bench as B

# GPU rows: OLMoE-shaped decode/prefill (issue 5 targets) plus the registry's model rows
EXTRA = [CPU.Row("olmoe-T16", "olmoe", 16, 64, 8, 2048, 1024),
         CPU.Row("olmoe-T64", "olmoe", 64, 64, 8, 2048, 1024),
         CPU.Row("olmoe-T4096", "olmoe", 4096, 64, 8, 2048, 1024)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="olmoe-T16,olmoe-T64,olmoe-T4096,olmoe-T512,"
                   "qwen3-moe-T512,deepseek-v3-T512,gpt-oss-20b-T256,seed-128x2048x4096")
    p.add_argument("--routing-T", type=int, default=262144)
    p.add_argument("--gemm", default=None)
    p.add_argument("--budget", type=float, default=1.0)
    p.add_argument("--no-routing", action="store_true")
    a = p.parse_args()
    known = {r.name: r for r in EXTRA}
    known.update(CPU.ROWS)
    rows = [known[n] for n in a.rows.split(",") if n]
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    res = {}
    if not a.no_routing:
        rr = B.run_routing(T=a.routing_T, progress=say, budget=a.budget)
        res["routing"] = rr
        print(B.format_routing(rr))
    out = os.path.join(os.environ.get("OUT", "."), "bench.json")
    peak, bw = B.cublas_gflops(), B.copy_bandwidth()
    lr = []
    for row in rows:                       # one row at a time: partial results survive
        try:
            lr += B.run(rows=[row], progress=say, budget=a.budget, gemm=a.gemm, peak=peak,
                        bw=bw)
        except Exception as exc:  # noqa: BLE001
            say(f"row {row.name} failed: {type(exc).__name__}: {exc}")
        res["layers"] = lr
        with open(out, "w") as fh:
            json.dump(res, fh, indent=1, default=str)
    print(CPU.format_table(lr, "layers"))
    for r in lr:
        lay = "n/a" if r["layer_s"] is None else "%.3f ms" % (r["layer_s"] * 1e3)
        print(f"{r['name']}: fused {r['fused_s'] * 1e3:.3f} ms, public-op layer {lay}, "
              f"gemm {r['gemm_path']}, device {r['device']}")
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
