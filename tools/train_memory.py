"""Peak memory of a training loop: numoe with ``out=`` against torch autograd through HF's block.

    python tools/train_memory.py numoe seed-128x2048x4096
    python tools/train_memory.py torch seed-128x2048x4096 [grouped_mm|eager]

Run each in its own process. Builds the registry row's layer (float32), runs
one forward of one token (loading the compiled code), then 4 steps (forward + backward; numoe writes the gradients into the
previous step's arrays with ``out=``; torch: ``zero_grad(set_to_none=True)``,
forward, ``backward(d_y)``, 2 threads) and prints the peak resident set
(``ru_maxrss``) above the resident set before the first step.
"""
import gc
import resource
import sys

import numpy as np

from numoe import bench as B


def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def settle():
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def main():
    which, name = sys.argv[1], sys.argv[2]
    impl = sys.argv[3] if len(sys.argv) > 3 else "grouped_mm"
    row = B.ROWS[name]
    layer = B.build_layer(row, np.dtype(np.float32))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((row.T, row.H)).astype(np.float32)
    d_y = rng.standard_normal((row.T, row.H)).astype(np.float32)
    if which == "numoe":
        y, info = layer.forward(x[:1], return_info=True)    # loads the compiled kernels
        del y, info
        settle()
        base = rss()
        g = None
        for _ in range(4):
            y, info = layer.forward(x, return_info=True)
            g = layer.backward(x, info, d_y, out=g)
            del y, info
    elif which == "torch":
        import torch

        torch.set_num_threads(2)
        block, call = B.hf_block(layer, row.preset, np.dtype(np.float32))
        del layer
        gc.collect()
        for p in block.parameters():
            p.requires_grad_(True)
        block.experts.config._experts_implementation = impl
        xt, dyt = torch.from_numpy(x), torch.from_numpy(d_y)
        call(xt[:1])
        settle()
        base = rss()
        for _ in range(4):
            block.zero_grad(set_to_none=True)
            call(xt.detach().requires_grad_(True)).backward(dyt)
    else:
        raise SystemExit("first argument: numoe or torch")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    label = which if which == "numoe" else f"torch {impl}"
    print(f"{label} {name}: peak {(peak - base) / 2**20:.0f} MiB above the resident set "
          f"before the first step ({base / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
