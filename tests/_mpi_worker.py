"""MPI worker for tests/test_distributed.py: run under ``mpiexec -n P python this.py``.

Every case builds the same layer and the same global batch on every rank,
splits the tokens over the ranks (some ranks may get none), runs
``ExpertParallel`` and compares each rank's rows with the one-process layer
on the concatenated batch:

* ``y`` close to ``layer(x_all)`` (float rounding) and, when the rank's
  router logits equal the one-process ones, the routing and the capacity
  drops equal too;
* bit equality given the same router logits: the one-process layer run on
  the ranks' own logits (concatenated) gives exactly the ranks' ``y``
  (configs without shared experts, whose BLAS blocks follow a rank's token
  count);
* with ``batch_invariant=True``: ``y`` bit-identical to ``layer(x_all)``;
* the whole-batch aux and z losses;
* backward (float32/float64): ``ep.backward`` against ``layer.backward`` on
  the whole batch, expert weight gradients bit-identical given the same
  router logits, the replicated gradients the same on every rank.

The ranks agree on each case's verdict (allgather) so that a failure on one
rank never leaves the others waiting; rank 0 prints one line per case and
the exit status is 1 if any case failed. Error cases check that bad input or
disagreeing layers raise on every rank.
"""
from __future__ import annotations

import sys
import traceback

import ml_dtypes
import numpy as np
from mpi4py import MPI

import numoe
from numoe.distributed import ExpertParallel, split_experts

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


def _config(name, **kw):
    small = dict(hidden_dim=32, expert_dim=24)
    if name == "mixtral":
        return numoe.MoEConfig.mixtral(num_experts=8, top_k=2, **small, **kw)
    if name == "olmoe":
        return numoe.MoEConfig.olmoe(num_experts=16, top_k=4, **small, **kw)
    if name == "qwen2":
        return numoe.MoEConfig.qwen2_moe(num_experts=8, top_k=2, shared_expert_dim=40, **small,
                                         **kw)
    if name == "gpt_oss":
        return numoe.MoEConfig.gpt_oss(num_experts=8, top_k=2, **small, **kw)
    if name == "deepseek":
        return numoe.MoEConfig.deepseek_v3(num_experts=16, top_k=4, n_groups=4, topk_groups=2,
                                           shared_expert_dim=24, **small, **kw)
    if name == "switch":
        return numoe.MoEConfig.switch(num_experts=2, top_k=1, **small, **kw)
    raise KeyError(name)


def _split(T_all, mode):
    """Token counts per rank: 'even', 'uneven' or 'empty' (rank 1 gets none)."""
    if mode == "even":
        sizes = [T_all // SIZE] * SIZE
        sizes[-1] += T_all - sum(sizes)
    elif mode == "uneven":
        sizes = [(2 * r + 1) for r in range(SIZE)]
        sizes[-1] += T_all - sum(sizes)
    else:
        sizes = [T_all // (SIZE - 1)] * SIZE
        sizes[1] = 0
        sizes[-1 if SIZE > 2 else 0] += T_all - sum(sizes)
    return np.concatenate([[0], np.cumsum(sizes)])


def run_case(cfg_name, T_all, split, dtype=np.float32, layer_kw=None, **cfg_kw):
    cfg = _config(cfg_name, **cfg_kw)
    layer = numoe.MoELayer.random(cfg, seed=7, dtype=dtype, **(layer_kw or {}))
    rng = np.random.default_rng(11)
    x_all = rng.standard_normal((T_all, cfg.hidden_dim)).astype(dtype)
    exact = layer.batch_invariant          # then y is bit-identical to one process outright
    bounds = _split(T_all, split)
    lo, hi = int(bounds[RANK]), int(bounds[RANK + 1])
    ep = ExpertParallel(layer)
    y, info = ep.forward(x_all[lo:hi], return_info=True)
    y_ref, info_ref = layer.forward(x_all, return_info=True)
    msgs = []
    rtol = {2: 2e-2, 4: 1e-5, 8: 1e-12}[np.dtype(dtype).itemsize]
    if y.shape != (hi - lo, cfg.hidden_dim) or y.dtype != dtype:
        msgs.append(f"y shape/dtype {y.shape} {y.dtype}")
    elif not np.allclose(y.astype(np.float64), y_ref[lo:hi].astype(np.float64), rtol=rtol,
                         atol=rtol):
        msgs.append(f"y differs from layer(x_all): max abs err "
                    f"{np.max(np.abs(y.astype(np.float64) - y_ref[lo:hi]))}")
    if exact and not np.array_equal(y, y_ref[lo:hi]):
        msgs.append("batch_invariant layer: not bit-identical to layer(x_all)")
    logits_equal = np.array_equal(info["logits"], info_ref["logits"][lo:hi])
    if logits_equal:
        for key in ("weights", "experts"):
            if not np.array_equal(getattr(info["routing"], key),
                                  getattr(info_ref["routing"], key)[lo:hi]):
                msgs.append(f"routing.{key} differs with equal logits")
        if not np.array_equal(info["plan"].dropped, info_ref["plan"].dropped[lo:hi]):
            msgs.append("capacity drops differ from one process")
        if info["plan"].capacity != info_ref["plan"].capacity:
            msgs.append(f"capacity {info['plan'].capacity} != {info_ref['plan'].capacity}")
    # bit equality given the same router logits: one process on the ranks' logits
    logits_all = np.concatenate(COMM.allgather(info["logits"]))
    routing, plan = layer._route(logits_all)
    y_same = layer._experts(x_all, routing, plan)
    bit_equal = np.array_equal(y, y_same[lo:hi])
    shared = cfg.num_shared_experts > 0
    if not shared and not bit_equal:
        msgs.append("not bit-identical to one process given the same router logits "
                    f"(max abs diff {np.max(np.abs(y - y_same[lo:hi]), initial=0.0)})")
    if not np.allclose(y.astype(np.float64), y_same[lo:hi].astype(np.float64), rtol=rtol,
                       atol=rtol):
        msgs.append("differs from one process on the same logits beyond rounding")
    for loss in ("aux_loss", "z_loss"):
        if not np.isclose(info[loss], info_ref[loss], rtol=10 * rtol, atol=rtol):
            msgs.append(f"{loss} {info[loss]} != one process {info_ref[loss]}")
    if np.dtype(dtype).itemsize >= 4 and "weight_dtype" not in (layer_kw or {}):
        msgs += _check_backward(layer, ep, x_all, lo, hi, info, info_ref,
                                dict(logits=logits_all, routing=routing, plan=plan), rtol)
    traffic = COMM.allgather(ep.traffic)
    if sum(t["sent"] for t in traffic) != sum(t["received"] for t in traffic):
        msgs.append(f"bytes sent and received do not add up: {traffic}")
    dropped = int(info_ref["plan"].dropped.sum())
    note = (f"T={hi - lo} experts={ep.experts.start}:{ep.experts.stop} "
            f"logits_equal={logits_equal} bit_equal={bit_equal} dropped_all={dropped}")
    return msgs, note


def _close(a, b, rtol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(np.max(np.abs(b),
                                                                          initial=0.0))))


def _check_backward(layer, ep, x_all, lo, hi, info, info_ref, info_same, rtol):
    """ep.backward against layer.backward on the whole batch (and on the ranks' logits)."""
    msgs = []
    coefs = dict(aux_loss_coef=0.03, z_loss_coef=0.002)
    dy_all = np.random.default_rng(5).standard_normal(x_all.shape).astype(x_all.dtype)
    g = ep.backward(x_all[lo:hi], info, dy_all[lo:hi], **coefs)
    g_ref = layer.backward(x_all, info_ref, dy_all, **coefs)
    g_same = layer.backward(x_all, info_same, dy_all, **coefs)
    e0, e1 = ep.experts.start, ep.experts.stop
    if sorted(g) != sorted(g_ref):
        return [f"backward keys {sorted(g)} != {sorted(g_ref)}"]
    tol = 100 * rtol
    for name, ref in g_ref.items():
        mine, same = g[name], g_same[name]
        if name == "x":
            ref, same = ref[lo:hi], same[lo:hi]
        elif name in ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"):
            ref, same = ref[e0:e1], same[e0:e1]
            if not np.array_equal(mine, same):      # same rows, same blocks: same bits
                msgs.append(f"d_{name} not bit-identical to one process on the same logits")
        if mine.shape != ref.shape or mine.dtype != ref.dtype:
            msgs.append(f"d_{name}: {mine.shape} {mine.dtype} vs {ref.shape} {ref.dtype}")
        elif not _close(mine, ref, tol) or not _close(mine, same, tol):
            msgs.append(f"d_{name} differs from layer.backward: max abs "
                        f"{np.max(np.abs(mine.astype(float) - ref), initial=0.0)}")
    everyone = COMM.allgather(g["router"])
    if not all(np.array_equal(everyone[0], r) for r in everyone):
        msgs.append("d_router differs between ranks")
    return msgs


def error_cases():
    """Bad input on one rank and disagreeing layers raise on every rank."""
    cfg = _config("mixtral")
    msgs = []
    # 1. layers differ (a different seed on the last rank)
    seed = 1 if RANK == SIZE - 1 else 0
    try:
        ExpertParallel(numoe.MoELayer.random(cfg, seed=seed))
        msgs.append("different layers were accepted")
    except ValueError as exc:
        if f"ranks [{SIZE - 1}] hold a different layer" not in str(exc):
            msgs.append(f"unexpected message: {exc}")
    # 2. bad input on rank 1 only: that rank gets its own error, the others name it
    ep = ExpertParallel(numoe.MoELayer.random(cfg, seed=0))
    x = np.zeros((3, cfg.hidden_dim), np.float64 if RANK == 1 else np.float32)
    try:
        ep(x)
        msgs.append("bad input on rank 1 was accepted")
    except TypeError as exc:
        if RANK != 1 or "dtype" not in str(exc):
            msgs.append(f"unexpected TypeError: {exc}")
    except ValueError as exc:
        if RANK == 1 or "rank(s) [1]" not in str(exc):
            msgs.append(f"unexpected ValueError: {exc}")
    # 3. the same for backward: a wrong d_y shape on rank 1
    x = np.ones((2, cfg.hidden_dim), np.float32)
    y, info = ep.forward(x, return_info=True)
    dy = np.ones((3 if RANK == 1 else 2, cfg.hidden_dim), np.float32)
    try:
        ep.backward(x, info, dy)
        msgs.append("bad d_y on rank 1 was accepted")
    except ValueError as exc:
        want = "d_y_local must have the shape" if RANK == 1 else "rank(s) [1]"
        if want not in str(exc):
            msgs.append(f"unexpected backward ValueError: {exc}")
    # 4. the communicator still works afterwards
    y = ep(np.ones((2, cfg.hidden_dim), np.float32))
    if not np.allclose(y, numoe.MoELayer.random(cfg, seed=0)(np.ones((2, 32), np.float32)),
                       rtol=1e-5, atol=1e-6):
        msgs.append("wrong result after an error")
    if not isinstance(split_experts(cfg.num_experts, SIZE), np.ndarray):
        msgs.append("split_experts")
    return msgs, ""


CASES = {
    "dropless-even": lambda: run_case("mixtral", 24, "even"),
    "dropless-uneven-f64": lambda: run_case("olmoe", 20, "uneven", dtype=np.float64),
    "empty-rank": lambda: run_case("mixtral", 12, "empty"),
    "slot": lambda: run_case("mixtral", 30, "uneven", capacity_factor=0.6),
    "position": lambda: run_case("olmoe", 30, "uneven", capacity_factor=0.6,
                             drop_policy="position"),
    "score": lambda: run_case("mixtral", 30, "empty", capacity_factor=0.6,
                          drop_policy="score"),
    "shared-gated": lambda: run_case("qwen2", 18, "uneven"),
    "biases-oai": lambda: run_case("gpt_oss", 16, "even", capacity_factor=1.0),
    "groups-sigmoid": lambda: run_case("deepseek", 16, "uneven"),
    "fewer-experts-than-ranks": lambda: run_case("switch", 9, "even", capacity_factor=0.5),
    "idle-experts": lambda: run_case("olmoe", 3, "even"),
    "large-blocks": lambda: run_case("mixtral", 300, "uneven"),
    "batch-invariant-shared": lambda: run_case("qwen2", 20, "uneven", capacity_factor=0.8,
                                           layer_kw=dict(batch_invariant=True)),
    "bfloat16": lambda: run_case("mixtral", 20, "uneven", dtype=ml_dtypes.bfloat16,
                             capacity_factor=0.8, drop_policy="score"),
    "int8-weights": lambda: run_case("olmoe", 20, "empty",
                                 layer_kw=dict(weight_dtype="int8")),
    "errors": error_cases,
}


def main(argv):
    names = argv or list(CASES)
    failed = 0
    for name in names:
        try:
            msgs, note = CASES[name]()
        except Exception:  # noqa: BLE001 - report any failure, keep the ranks together
            msgs, note = [traceback.format_exc(limit=4)], ""
        verdicts = COMM.allgather((msgs, note))
        bad = [(r, m) for r, (ms, _) in enumerate(verdicts) for m in ms]
        if RANK == 0:
            status = "FAIL" if bad else "OK"
            print(f"{status} {name} P={SIZE}: " + " | ".join(n for _, n in verdicts), flush=True)
            for r, m in bad:
                print(f"    rank {r}: {m}", flush=True)
        failed += bool(bad)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
