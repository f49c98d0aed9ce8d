"""Smoke test of numoe's fast kernel launch path on a real GPU (exit 1 on any mismatch).

Runs a few ops twice (the first call of each kernel specialisation goes through
numba, later ones through cuLaunchKernel) and compares with the CPU backend.
Run in its own process: a bad launch could poison the CUDA context.
"""
import sys

import numpy as np
from numba import cuda

import numoe
from numoe._cuda import _launch


def main():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((300, 16)).astype(np.float32)
    x = rng.standard_normal((300, 64)).astype(np.float32)
    E, H, F = 16, 64, 40
    wg = rng.standard_normal((E, H, F)).astype(np.float32) * 0.1
    wd = rng.standard_normal((E, F, H)).astype(np.float32) * 0.1
    want = numoe.route(z, 4)
    plan_c = numoe.dispatch_plan(want.experts, E)
    ys_c = numoe.expert_ffn(numoe.permute(x, plan_c), plan_c.offsets, wg, wg, wd)
    y_c = numoe.unpermute(ys_c, plan_c, want.weights)
    zd, xd = cuda.to_device(z), cuda.to_device(x)
    wgd, wdd = cuda.to_device(wg), cuda.to_device(wd)
    ok = True
    for rep in range(3):
        r = numoe.route(zd, 4)
        p = numoe.dispatch_plan(r.experts, E)
        xs = numoe.permute(xd, p)
        ys = numoe.expert_ffn(xs, p.offsets, wgd, wgd, wdd)
        y = numoe.unpermute(ys, p, r.weights).copy_to_host()
        same = np.array_equal(r.experts.copy_to_host(), want.experts)
        err = np.abs(y - y_c).max() / np.abs(y_c).max()
        print(f"rep {rep}: experts equal {same}, rel err {err:.2e}, launches {_launch.stats()}")
        ok = ok and same and err < 1e-4
    print("fast launch smoke:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
