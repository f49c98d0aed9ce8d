"""Time training steps (forward + backward) of one layer, with page faults per step.

    python tools/train_steps.py [--steps 8] [--shape T,E,k,H,F]

The default shape is the bench row seed-128x2048x4096 (Mixtral-style, float32).
Each step returns fresh gradient arrays; on a VM where first-touching memory
is slow, compare with glibc's large blocks kept in the heap:

    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 \\
        python tools/train_steps.py
"""
import argparse
import resource
import time

import numpy as np

import numoe


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--shape", default="128,8,2,2048,4096", help="T,E,k,H,F")
    args = ap.parse_args()
    T, E, k, H, F = (int(v) for v in args.shape.split(","))
    layer = numoe.MoELayer.random(numoe.MoEConfig.mixtral(
        num_experts=E, top_k=k, hidden_dim=H, expert_dim=F), seed=0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, H)).astype(np.float32)
    d_y = rng.standard_normal((T, H)).astype(np.float32)

    def step():
        y, info = layer.forward(x, return_info=True)
        return layer.backward(x, info, d_y)

    step()                                  # compiles
    times = []
    for _ in range(args.steps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        g = step()
        times.append(time.perf_counter() - t0)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        print(f"step {1e3 * times[-1]:8.1f} ms   page faults {faults}")
        del g
    m = numoe.info()
    print(f"median {1e3 * np.median(times):.1f} ms over {args.steps} steps "
          f"(T={T} E={E} k={k} H={H} F={F}, float32; {m['cpu']}, {m['isa']}, "
          f"{m['threads']} threads)")


if __name__ == "__main__":
    main()
