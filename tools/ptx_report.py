"""Compile numoe's CUDA kernels to PTX for sm_90 without a GPU and report resources.

Usage: python tools/ptx_report.py [name-filter]  (needs libnvvm + ptxas on the path,
e.g. the nvidia-cuda-nvcc / nvidia-nvvm wheels). Prints registers, spills and
stack per kernel and whether the shared-memory loads of the GEMM inner loops
were vectorised.
"""
import os
import re
import subprocess
import sys
import tempfile

import numba
import numpy as np
from numba import cuda, types

from numoe._cuda import experts as X


def arr(dt, nd):
    return types.Array(numba.from_dtype(np.dtype(dt)), nd, "C")


def sigs():
    out = {}
    for dt in ("float32", "float64"):
        i64 = types.int64
        b = types.boolean
        f64 = types.float64
        args = (arr(dt, 1), arr("int64", 1), i64, i64, arr(dt, 1), arr(dt, 1), i64, arr(dt, 1),
                b, arr(dt, 1), b, i64, f64, f64, arr("int64", 1), arr(dt, 1), b, arr(dt, 1),
                arr("int64", 2), arr("int64", 1), i64)
        for glu in (False, True):
            nm = "glu" if glu else "plain"
            k, _, _ = X._tiled(dt, glu, *X._tiled_cfg(glu))
            out[f"{nm}_tiled_{dt}"] = (k, args)
            k, _ = X._skinny(dt, glu, *X._skinny_cfg())
            out[f"{nm}_skinny_{dt}"] = (k, args)
    return out


def _no_device():
    """Let device functions compile without a GPU: pretend an sm_90 device is current."""
    import types as pytypes

    import numba.cuda.dispatcher as disp

    fake = pytypes.SimpleNamespace(compute_capability=(9, 0))
    disp.get_current_device = lambda: fake


def main():
    _no_device()
    flt = sys.argv[1] if len(sys.argv) > 1 else ""
    for name, (kern, sig) in sigs().items():
        if flt not in name:
            continue
        ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "k.ptx")
            open(p, "w").write(ptx)
            open(f"/tmp/{name}.ptx", "w").write(ptx)
            r = subprocess.run(["ptxas", "-arch=sm_90", "-v", p, "-o", os.path.join(d, "k.o")],
                               capture_output=True, text=True)
        info = " ".join(ln.split("info    : ")[-1] for ln in r.stderr.splitlines()
                        if "Used" in ln or "spill" in ln)
        nfma = len(re.findall(r"\bfma\.rn\.f(32|64)", ptx))
        lds = len(re.findall(r"ld\.shared\.f(32|64)", ptx))
        ldsv = len(re.findall(r"ld\.shared\.v[24]", ptx))
        loc = len(re.findall(r"ld\.local|st\.local", ptx))
        print(f"{name:22s} {info} | fma {nfma} lds {lds} lds.v {ldsv} local {loc}")


if __name__ == "__main__":
    main()
