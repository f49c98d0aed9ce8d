"""Time training steps (forward + backward) of one layer, with page faults per step.

    python tools/train_steps.py [--steps 8] [--shape T,E,k,H,F]

The default shape is the bench row seed-128x2048x4096 (Mixtral-style, float32).
Each step writes its gradients into the previous step's arrays, as a training
loop does (``layer.backward(..., out=g)``); ``--new-grads`` allocates new
gradient arrays every step instead (out=None, the previous ones freed first).
On a VM where first-touching memory is slow, compare that with glibc's large
blocks kept in the heap:

    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 \\
        python tools/train_steps.py --new-grads
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
    ap.add_argument("--new-grads", action="store_true",
                    help="new gradient arrays every step (out=None)")
    args = ap.parse_args()
    T, E, k, H, F = (int(v) for v in args.shape.split(","))
    layer = numoe.MoELayer.random(numoe.MoEConfig.mixtral(
        num_experts=E, top_k=k, hidden_dim=H, expert_dim=F), seed=0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, H)).astype(np.float32)
    d_y = rng.standard_normal((T, H)).astype(np.float32)

    def step(g):
        y, info = layer.forward(x, return_info=True)
        return layer.backward(x, info, d_y, out=None if args.new_grads else g)

    g = step(None)                          # compiles; the buffers the steps reuse
    times = []
    for _ in range(args.steps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        g = step(g)
        times.append(time.perf_counter() - t0)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        print(f"step {1e3 * times[-1]:8.1f} ms   page faults {faults}")
        if args.new_grads:
            g = None                        # freed before the next step allocates
    m = numoe.info()
    print(f"median {1e3 * np.median(times):.1f} ms over {args.steps} steps "
          f"(T={T} E={E} k={k} H={H} F={F}, float32, "
          f"{'new gradient arrays' if args.new_grads else 'out= reused gradients'}; "
          f"{m['cpu']}, {m['isa']}, "
          f"{m['threads']} threads)")


if __name__ == "__main__":
    main()
