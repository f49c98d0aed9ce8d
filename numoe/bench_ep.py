"""``numoe bench ep``: expert parallelism over MPI ranks, per phase, and a cost model.

Run it under MPI, one process per rank::

    mpiexec -n 2 python -m numoe bench ep                       # default shape
    mpiexec -n 2 python -m numoe bench ep --shapes 1024,8,2,1024,2048 --repeat 5

Every rank builds the same layer and its share of one global batch of ``T``
tokens. Rank 0 first times the one-process layer on the whole batch (at one
thread and at all of this process's Numba threads) and
:class:`numoe.distributed.ExpertParallel` on ``MPI.COMM_SELF`` (the same
phases, the exchange reduced to local copies) while the other ranks wait
without spinning; then all ranks run ``ExpertParallel`` on ``COMM_WORLD``,
one Numba thread each, and report the median time of each phase (route,
exchange, experts, combine) and the bytes each rank moved. Last, a cost
model: the exchange time of ``P`` ranks at a few network bandwidths, next to
the compute time per rank measured here (scale it to your machine).
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import numba
import numpy as np

import numoe
from numoe import bench
from numoe._dtypes import as_float_dtype, compute_dtype
from numoe._jit import threads as numba_threads

DEFAULT_SHAPE = "512,8,2,1024,2048"         # T, E, k, H, F (Mixtral-style)
BANDWIDTHS_GBIT = (10, 25, 100, 400)        # network links, Gbit/s per direction
RANKS = (2, 4, 8, 16, 64)


def _row(shape):
    """A bench row from a registry name or ``"T,E,k,H,F"`` (Mixtral preset)."""
    if isinstance(shape, bench.Row):
        return shape
    shape = shape or DEFAULT_SHAPE
    if shape.replace(",", "").isdigit():
        return bench.custom_row(shape, "mixtral")
    rows = bench.select_rows(shape)
    if len(rows) != 1:
        raise ValueError(f"shapes: the ep suite runs one layer shape, got {len(rows)}")
    return rows[0]


def _row_bytes(dtype):
    """Bytes per value of a row's round trip: out in the activation dtype, back in
    the compute dtype (float32 for 16-bit activations)."""
    dt = as_float_dtype("dtype", dtype)
    return dt.itemsize + np.dtype(compute_dtype(dt)).itemsize


def _idle_wait(comm):
    """Barrier that sleeps between polls (an idle rank must not steal a core)."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.002)


def _median_time(fn, repeat):
    fn()                                          # warm-up (compilation, page faults)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ep_phases(ep, x, repeat, comm):
    """Median per-phase seconds, call seconds and traffic of ``repeat`` synchronised calls."""
    ep(x)                                          # warm-up
    rec = {p: [] for p in ep.timings}
    rec["call"] = []
    for _ in range(repeat):
        comm.Barrier()
        t0 = time.perf_counter()
        ep(x)
        rec["call"].append(time.perf_counter() - t0)
        for p, v in ep.timings.items():
            rec[p].append(v)
    out = {p: statistics.median(v) for p, v in rec.items()}
    out.update(ep.traffic)
    out["T"] = int(x.shape[0])
    return out


def run_ep_bench(shape=None, *, dtype="float32", weight_dtype=None, repeat=None, comm=None,
                 progress=None):
    """Measure expert parallelism on ``comm`` (default ``COMM_WORLD``); collective.

    Returns (on every rank) a dict: ``row``, ``ranks``, ``one_process``
    (``layer_1thread_s``, ``layer_nthreads_s``, ``nthreads``, ``ep_self``:
    phases of ExpertParallel on one rank), ``per_rank`` (a list of phase
    dicts: seconds per phase, ``call``, bytes ``sent`` / ``received`` /
    ``local`` / ``meta``, tokens ``T``).
    """
    from numoe.distributed import ExpertParallel, _mpi

    MPI = _mpi()
    comm = MPI.COMM_WORLD if comm is None else comm
    rank, P = comm.Get_rank(), comm.Get_size()
    say = (lambda m: None) if progress is None or rank else progress
    row = _row(shape)
    dt = as_float_dtype("dtype", dtype)
    repeat = repeat or 5
    cfg = bench.build_config(row)
    layer = numoe.MoELayer.random(cfg, seed=0, dtype=dt, weight_dtype=weight_dtype)
    x_all = np.random.default_rng(1).standard_normal((row.T, row.H)).astype(dt)
    cuts = np.linspace(0, row.T, P + 1).round().astype(int)
    x = x_all[cuts[rank]:cuts[rank + 1]]
    one = {}
    if rank == 0:
        nmax = numba.config.NUMBA_NUM_THREADS
        say(f"one process: layer on T={row.T} at 1 and {nmax} threads ...")
        with numba_threads(1):
            one["layer_1thread_s"] = _median_time(lambda: layer(x_all), repeat)
            ep_self = ExpertParallel(layer, MPI.COMM_SELF)
            one["ep_self"] = _ep_phases(ep_self, x_all, repeat, MPI.COMM_SELF)
        with numba_threads(nmax):
            one["layer_nthreads_s"] = _median_time(lambda: layer(x_all), repeat)
        one["nthreads"] = nmax
    _idle_wait(comm)
    say(f"{P} ranks, one thread each ...")
    ep = ExpertParallel(layer, comm)
    with numba_threads(1):
        mine = _ep_phases(ep, x, repeat, comm)
    per_rank = comm.allgather(mine)
    one = comm.bcast(one, root=0)
    return dict(row=row._asdict(), dtype=dt.name, weights=str(weight_dtype or dt.name),
                ranks=P, repeat=repeat, one_process=one, per_rank=per_rank)


def cost_model(res, ranks=RANKS, bandwidths=BANDWIDTHS_GBIT):
    """Exchange vs compute time per rank for ``P`` ranks at each bandwidth.

    Each token sends its ``k`` rows of ``H`` values to the experts' owners
    and gets ``k`` rows back: ``2 k H s`` bytes per token (``s`` = dtype
    size), of which ``(P-1)/P`` leave the rank when routing is balanced.
    Tokens per rank stay at this run's; compute per rank is this machine's
    one-thread time per token (route + experts + combine, from the
    one-process ExpertParallel run), which scales with tokens per rank.
    Returns rows ``(P, [(gbit, exchange_s, ratio), ...], compute_s)``.
    """
    row = res["row"]
    s = _row_bytes(res["dtype"])
    self_ = res["one_process"]["ep_self"]
    per_tok = (self_["route"] + self_["experts"] + self_["combine"]) / max(self_["T"], 1)
    T_r = row["T"] / res["ranks"]
    compute = per_tok * T_r
    out = []
    for p in ranks:
        nbytes = T_r * row["k"] * row["H"] * s * (p - 1) / p
        cells = [(g, nbytes / (g * 1e9 / 8), nbytes / (g * 1e9 / 8) / compute)
                 for g in bandwidths]
        out.append((p, cells, compute, nbytes))
    return out


def format_report(res):
    """The text ``numoe bench ep`` prints."""
    row, one, P = res["row"], res["one_process"], res["ranks"]
    s = _row_bytes(res["dtype"])
    ms = lambda v: f"{1e3 * v:9.2f}"                      # noqa: E731
    mib = lambda v: f"{v / 2**20:9.2f}"                   # noqa: E731
    lines = [f"layer: {row['preset']} T={row['T']} E={row['E']} k={row['k']} H={row['H']} "
             f"F={row['F']} {res['dtype']} (weights {res['weights']}); {res['repeat']} timed "
             "calls, medians",
             f"one process, layer(x) on all {row['T']} tokens: "
             f"{1e3 * one['layer_1thread_s']:.2f} ms at 1 thread, "
             f"{1e3 * one['layer_nthreads_s']:.2f} ms at {one['nthreads']} threads",
             "",
             "                      T   route ms exchange ms experts ms combine ms   call ms"
             "  sent MiB  recv MiB local MiB"]

    def line(label, d):
        return (f"{label:16s} {d['T']:6d} {ms(d['route'])}  {ms(d['exchange'])}  "
                f"{ms(d['experts'])} {ms(d['combine'])} {ms(d['call'])} {mib(d['sent'])} "
                f"{mib(d['received'])} {mib(d['local'])}")

    lines.append(line("1 rank (self)", one["ep_self"]))
    for r, d in enumerate(res["per_rank"]):
        lines.append(line(f"{P} ranks: rank {r}", d))
    wall = max(d["call"] for d in res["per_rank"])
    lines += ["",
              f"{P} ranks x 1 thread: {1e3 * wall:.2f} ms per call (slowest rank) vs one "
              f"process {1e3 * one['layer_1thread_s']:.2f} ms at 1 thread "
              f"({one['layer_1thread_s'] / wall:.2f}x) and "
              f"{1e3 * one['layer_nthreads_s']:.2f} ms at {one['nthreads']} threads "
              f"({one['layer_nthreads_s'] / wall:.2f}x)",
              "(sent/recv: rows to/from other ranks, both trips; meta bytes not shown)",
              "",
              f"cost model: k*H*(s_out + s_back) = {row['k'] * row['H'] * s} bytes per token "
              f"per forward ({row['k']} rows out, {row['k']} back; rows return in the compute "
              "dtype), (P-1)/P of it off-rank; "
              f"{row['T'] // P} tokens per rank; compute per rank = this machine's 1-thread "
              "time per token x tokens per rank",
              "   P  off-rank MiB  compute ms  " + "  ".join(
                  f"{g:>4d} Gbit/s ms (x)" for g in BANDWIDTHS_GBIT)]
    for p, cells, compute, nbytes in cost_model(res):
        lines.append(f"{p:4d}  {nbytes / 2**20:12.2f}  {1e3 * compute:10.2f}  " + "  ".join(
            f"{1e3 * t:10.3f} ({r:4.2f})" for _, t, r in cells))
    lines.append("(x) = exchange time / compute time per rank; latency per message not "
                 "modelled")
    return "\n".join(lines)


def main(args, argv):
    """``numoe bench ep`` (called by ``numoe.__main__``); returns the exit status."""
    from numoe.distributed import _mpi

    try:
        MPI = _mpi()
    except ImportError as exc:
        print(f"numoe bench ep: {exc}", file=sys.stderr)
        return 2
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    progress = (lambda m: print(m, file=sys.stderr, flush=True)) if rank == 0 else None
    try:
        shape = getattr(args, "shapes", None)
        if getattr(args, "shape", None):               # a custom row: T,E,k,H,F
            shape = bench.custom_row(args.shape, getattr(args, "preset", None) or "mixtral")
        res = run_ep_bench(shape, dtype=getattr(args, "dtype", "float32"),
                           weight_dtype=getattr(args, "weights", None),
                           repeat=getattr(args, "repeat", None), comm=comm, progress=progress)
    except ValueError as exc:
        if rank == 0:
            print(f"numoe bench ep: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        info = bench.machine_info()
        print(bench.header_line(info))
        launch = f"mpiexec -n {comm.Get_size()} " if comm.Get_size() > 1 else ""
        print(f"command: {launch}numoe bench {' '.join(argv[1:])}".rstrip())
        if comm.Get_size() == 1:
            print("(one rank: run under mpiexec -n P for the multi-rank rows)")
        print()
        print(format_report(res))
        if getattr(args, "json", None):
            with open(args.json, "w") as fh:
                json.dump(dict(suite="ep", command=argv, machine=info, **res), fh, indent=1,
                          default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    return 0
