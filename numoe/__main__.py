"""The ``numoe`` command line: ``numoe info`` and ``numoe bench``.

Examples::

    numoe info
    numoe bench                          # layer suite: seed shapes + model-shaped layers
    numoe bench --shapes olmoe-T4,seed-32x512x1024 --repeat 5 --json out.json
    numoe bench routing                  # route / dispatch_plan / permute at T=65536
    numoe bench --latency                # decode latency percentiles (OLMoE shape)
    numoe bench --startup                # import + first forward, cold and warm cache
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_SUITES = ("layers", "routing", "latency", "startup")
_BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _parser():
    parser = argparse.ArgumentParser(prog="numoe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, threads, backends and BLAS")
    info.set_defaults(func=_info)

    b = sub.add_parser("bench", help="run a benchmark suite on this machine",
                       description="Benchmark suites; rows are listed by --list.")
    b.add_argument("suite", nargs="?", choices=_SUITES, help="which suite (default: layers)")
    b.add_argument("--latency", dest="mode", action="store_const", const="latency",
                   help="same as the 'latency' suite")
    b.add_argument("--startup", dest="mode", action="store_const", const="startup",
                   help="same as the 'startup' suite")
    b.add_argument("--shapes", help="comma list of row names or patterns (e.g. 'olmoe-*'); "
                   "for latency/startup, the one layer shape to use")
    b.add_argument("--list", action="store_true", help="list the registry rows and exit")
    b.add_argument("--threads", type=_positive_int,
                   help="Numba, PyTorch and BLAS threads (default: all cores)")
    b.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    b.add_argument("--repeat", type=_positive_int,
                   help="timed calls per measurement (default: fill --budget)")
    b.add_argument("--budget", type=_positive_float, default=None,
                   help="seconds per measurement when --repeat is not given")
    b.add_argument("--tokens", type=_positive_int, default=65536,
                   help="routing suite token count (default 65536)")
    b.add_argument("--no-hf", dest="hf", action="store_false",
                   help="skip the Hugging Face transformers comparison")
    b.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    b.add_argument("--plot", metavar="PATH", help="also draw a PNG bar chart of the times")
    b.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``numoe`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        if args.suite and args.mode and args.suite != args.mode:
            parser.error(f"choose one suite: {args.suite!r} or --{args.mode}")
        args.suite = args.mode or args.suite or "layers"
    return args.func(args, sys.argv[1:] if argv is None else list(argv))


# ------------------------------------------------------------------ info
def _info(args, argv):
    import numba
    import numpy as np

    import numoe
    from numoe import bench

    m = bench.machine_info()
    print(f"numoe {numoe.__version__} (python {m['python']})")
    versions = [f"numpy {np.__version__}", f"numba {numba.__version__}"]
    for name in ("scipy", "torch", "transformers"):
        versions.append(f"{name} {bench.installed_version(name) or 'not installed'}")
    print("versions: " + ", ".join(versions))
    print(f"cpu: {m['cpu']}, {m['cores']} cores")
    print(f"threads: {numba.get_num_threads()} Numba threads "
          f"(threading layer setting: {numba.config.THREADING_LAYER})")
    print(f"backends: {', '.join(numoe.backends())}")
    print(f"BLAS (numpy): {m['blas']}")
    return 0


# ----------------------------------------------------------------- bench
def _bench(args, argv):
    from numoe import bench

    if args.list:
        for row in bench.ROWS.values():
            flag = "" if row.default else "  (not in the default suite)"
            print(f"{row.name:20s} {row.preset:12s} T={row.T} E={row.E} k={row.k} "
                  f"H={row.H} F={row.F}{flag}")
        return 0
    if args.threads is not None and any(os.environ.get(v) != str(args.threads)
                                        for v in _BLAS_ENV):
        # BLAS reads its thread count once, at load time: run again in a child
        env = dict(os.environ, **{v: str(args.threads) for v in _BLAS_ENV})
        return subprocess.call([sys.executable, "-m", "numoe", *argv], env=env)
    try:
        rows = _run_suite(bench, args)
    except (ValueError, RuntimeError, ImportError) as exc:
        print(f"numoe bench: {exc}", file=sys.stderr)
        return 2
    info = bench.machine_info()
    if args.threads is not None:
        info["threads"] = args.threads
    print(bench.header_line(info))
    print(f"command: numoe bench {' '.join(argv[1:])}".rstrip())
    if args.suite == "layers" and args.device == "cpu" and rows:
        print(f"BLAS {args.dtype} GEMM rate (np.matmul 2048^3, median): "
              f"{rows[0]['blas_gflops']:.1f} GFLOP/s")
    print()
    print(bench.format_table(rows, args.suite))
    rss = bench.peak_rss_mib()
    extra = ""
    if args.suite == "startup":   # the work ran in child processes
        extra = f" (largest child process: {bench.peak_rss_mib(children=True):.0f} MiB)"
    print(f"\npeak RSS: {rss:.0f} MiB{extra}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(suite=args.suite, device=args.device, command=argv, machine=info,
                           peak_rss_mib=rss, rows=rows), fh, indent=1, default=_jsonable)
    if args.plot:
        bench.plot(rows, args.suite, args.plot, title=bench.header_line(info))
    return 0


def _run_suite(bench, args):
    kw = dict(dtype=args.dtype, progress=True)
    budget = {} if args.budget is None else dict(budget=args.budget)
    if args.device == "cuda":
        if args.suite != "layers":
            raise ValueError(f"--device cuda runs the layer suite only, not {args.suite!r}")
        try:
            return bench.run_cuda_layer_suite(args.shapes, repeat=args.repeat, **kw)
        except Exception as exc:  # noqa: BLE001 - any failure: say why, plainly
            raise RuntimeError(f"the CUDA benchmark could not run: {exc}") from exc
    if args.suite == "layers":
        return bench.run_layer_suite(args.shapes, threads=args.threads, repeat=args.repeat,
                                     hf=args.hf, **budget, **kw)
    if args.suite == "routing":
        return bench.run_routing_suite(args.tokens, threads=args.threads, repeat=args.repeat,
                                       **budget, **kw)
    if args.suite == "latency":
        return bench.run_latency_suite(args.shapes or "olmoe-T512", threads=args.threads,
                                       **budget, **kw)
    return bench.run_startup(args.shapes or "seed-32x512x1024", **kw)


def _jsonable(obj):
    """numpy scalars and arrays in results -> plain Python for ``json``."""
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


if __name__ == "__main__":
    sys.exit(main())
