"""The ``numoe`` command line: ``numoe info`` and ``numoe bench``.

Examples::

    numoe info
    numoe bench                          # layers: numoe vs the reference (and HF if installed)
    numoe bench --full                   # also the larger model-shaped rows (several GB each)
    numoe bench --shapes olmoe-T4,seed-32x512x1024 --repeat 5 --json out.json
    numoe bench --shape 256,64,8,2048,1024 --preset olmoe   # a custom row: T,E,k,H,F
    numoe bench --dtype bfloat16                            # bf16 activations and weights
    numoe bench --weights int8                              # int8 expert weights, float32 x
    numoe bench routing                  # route / dispatch_plan / permute at T=65536
    numoe bench --latency                # decode latency percentiles (OLMoE shape)
    numoe bench --startup                # import + first forward, cold and warm cache
    numoe bench --train --shapes 'tiny-*'  # forward + backward vs torch autograd
    mpiexec -n 2 numoe bench ep          # expert parallelism over MPI ranks, cost model
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_SUITES = ("layers", "routing", "latency", "startup", "ep")
_BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# kept in step with numoe.bench.PRESETS / WEIGHT_DTYPES (not imported: `numoe --help` stays light)
_PRESETS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "switch")
_WEIGHTS = ("float16", "bfloat16", "float32", "float64", "int8")


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
    b.add_argument("--train", dest="mode", action="store_const", const="train",
                   help="forward + backward against torch autograd through HF's block "
                        "(2 threads unless --threads)")
    b.add_argument("--shapes", help="comma list of row names or patterns (e.g. 'olmoe-*'); "
                   "for latency/startup, the one layer shape to use")
    b.add_argument("--list", action="store_true", help="list the registry rows and exit")
    b.add_argument("--threads", type=_positive_int,
                   help="Numba, PyTorch and BLAS threads (default: all cores)")
    b.add_argument("--full", action="store_true",
                   help="layer suite: also the larger rows (Qwen3-MoE, DeepSeek-V3-style, "
                   "gpt-oss, OLMoE T=4096; several GB of memory each)")
    b.add_argument("--batch-invariant", action="store_true",
                   help="layer suite: also time each layer with batch_invariant=True "
                   "(its cost next to the default)")
    b.add_argument("--shape", metavar="T,E,k,H,F",
                   help="a custom row: tokens, experts, top-k, hidden and expert width "
                   "(replaces --shapes)")
    b.add_argument("--preset", default=None, choices=_PRESETS,
                   help="MoEConfig family of the --shape row (default: mixtral)")
    b.add_argument("--dtype", default="float32",
                   choices=("float32", "float64", "bfloat16", "float16"),
                   help="activation dtype, also HF's torch precision (default float32)")
    b.add_argument("--weights", default=None, choices=_WEIGHTS,
                   help="storage of the expert weights (default: as --dtype)")
    b.add_argument("--repeat", type=_positive_int,
                   help="timed samples per measurement (default: fill --budget; "
                   "calls under 1 ms are batched several per sample)")
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
    import numoe

    d = numoe.info()
    print(f"numoe {d['numoe']} (python {d['python']})")
    print("versions: " + ", ".join(f"{name} {v or 'not installed'}"
                                   for name, v in d["versions"].items()))
    print(f"cpu: {d['cpu']}, {d['cores']} cores, 16-bit GEMM path: {d['isa']}")
    print(f"threads: {d['threads']} Numba threads "
          f"(threading layer setting: {d['threading_layer']})")
    print(f"backends: {', '.join(d['backends'])}")
    print(f"BLAS (numpy): {d['blas']}")
    return 0


# ----------------------------------------------------------------- bench
def _bench(args, argv):
    from numoe import bench

    if args.list:
        for row in bench.ROWS.values():
            flag = "" if row.default else ("  (--full)" if row.full else
                                           "  (not in the default suite)")
            print(f"{row.name:20s} {row.preset:12s} T={row.T} E={row.E} k={row.k} "
                  f"H={row.H} F={row.F}{flag}")
        return 0
    if args.suite == "ep":      # expert parallelism, under mpiexec (numoe/bench_ep.py)
        from numoe import bench_ep

        return bench_ep.main(args, argv)
    if args.threads is not None and any(os.environ.get(v) != str(args.threads)
                                        for v in _BLAS_ENV):
        # BLAS reads its thread count once, at load time: run again in a child
        env = dict(os.environ, **{v: str(args.threads) for v in _BLAS_ENV})
        return subprocess.call([sys.executable, "-m", "numoe", *argv], env=env)
    load_before = bench.machine_load()
    try:
        rows = _run_suite(bench, args)
    except (ValueError, RuntimeError, ImportError) as exc:
        print(f"numoe bench: {exc}", file=sys.stderr)
        return 2
    load_after = bench.machine_load()
    info = bench.machine_info()
    if rows and rows[0].get("threads"):
        info["threads"] = rows[0]["threads"]     # what the suite ran with
    info.update(load_before=load_before[0], load_after=load_after[0])
    print(bench.header_line(info))
    print(f"command: numoe bench {' '.join(argv[1:])}".rstrip())
    print()
    print(bench.format_table(rows, args.suite))
    warnings = bench.noise_warnings([], [], load_before, load_after, info["threads"])
    for w in warnings:
        print(f"  WARNING: {w}")
    rss = bench.peak_rss_mib()
    extra = ""
    if args.suite == "startup":   # the work ran in child processes
        extra = f" (largest child process: {bench.peak_rss_mib(children=True):.0f} MiB)"
    print(f"\npeak RSS: {rss:.0f} MiB{extra}")
    if args.suite == "layers" and args.hf and bench.hf_available() is not None:
        print('HF transformers columns: n/a here; add them with pip install -e ".[parity]"')
    if args.json:
        warnings += bench.noise_warnings(
            rows, [k for k, _, kind in bench.COLUMNS.get(args.suite, ()) if kind == "ms"])
        with open(args.json, "w") as fh:
            json.dump(dict(suite=args.suite, device=args.device, command=argv, machine=info,
                           peak_rss_mib=rss, warnings=warnings,
                           legend=bench.legend(rows, args.suite), rows=rows),
                      fh, indent=1, default=_jsonable)
    if args.plot:
        bench.plot(rows, args.suite, args.plot, title=bench.header_line(info))
    return 0


def _shapes(bench, args):
    """The rows asked for: ``--shape`` (with ``--preset``) or ``--shapes``."""
    if args.shape is not None:
        if args.shapes:
            raise ValueError("give --shape or --shapes, not both")
        return [bench.custom_row(args.shape, args.preset or "mixtral")]
    if args.preset is not None:
        raise ValueError("--preset names the family of a --shape row; add --shape T,E,k,H,F")
    return args.shapes


def _run_suite(bench, args):
    kw = dict(dtype=args.dtype, progress=True)
    budget = {} if args.budget is None else dict(budget=args.budget)
    shapes = _shapes(bench, args)
    if args.device == "cuda":
        if args.suite != "layers":
            raise ValueError(f"--device cuda runs the layer suite only, not {args.suite!r}")
        try:
            return bench.run_cuda_layer_suite(shapes, repeat=args.repeat, hf=args.hf, **kw)
        except Exception as exc:  # noqa: BLE001 - any failure: say why, plainly
            raise RuntimeError(f"the CUDA benchmark could not run: {exc}") from exc
    if args.suite == "train":
        return bench.run_train_suite(shapes, threads=args.threads or 2, repeat=args.repeat,
                                     hf=args.hf, **budget, **kw)
    if args.weights is not None and args.suite not in ("layers", "latency"):
        raise ValueError(f"--weights applies to the layer and latency suites, not {args.suite!r}")
    if args.batch_invariant and args.suite != "layers":
        raise ValueError(f"--batch-invariant applies to the layer suite, not {args.suite!r}")
    if args.suite == "layers":
        return bench.run_layer_suite(shapes, threads=args.threads, repeat=args.repeat,
                                     weights=args.weights, hf=args.hf, full=args.full,
                                     batch_invariant=args.batch_invariant, **budget, **kw)
    if args.suite == "routing":
        return bench.run_routing_suite(args.tokens, threads=args.threads, repeat=args.repeat,
                                       **budget, **kw)
    if args.suite == "latency":
        if isinstance(shapes, str) and "," in shapes:
            raise ValueError("the latency suite runs one layer shape: give one --shapes name")
        return bench.run_latency_suite(shapes or "olmoe-T512", threads=args.threads,
                                       weights=args.weights, **budget, **kw)
    if shapes is not None and not isinstance(shapes, str):
        raise ValueError("the startup suite takes a registry row name (--shapes), not --shape")
    return bench.run_startup(shapes or "seed-32x512x1024", **kw)


def _jsonable(obj):
    """numpy scalars and arrays in results -> plain Python for ``json``."""
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


if __name__ == "__main__":
    sys.exit(main())
