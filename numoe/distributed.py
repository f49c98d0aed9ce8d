"""Expert parallelism across processes with MPI: :class:`ExpertParallel`.

Every rank holds the same :class:`numoe.MoELayer`; rank ``r`` runs only its
contiguous block of experts (:func:`split_experts`) plus the replicated
router and shared experts. One forward on each rank:

1. *route*: router logits, :func:`numoe.route` and a dropless
   :func:`numoe.dispatch_plan` of the rank's own tokens;
2. *exchange*: the per-expert counts (and the token count, for the
   capacity) go to the experts' owners in one ``Alltoall``; with a
   capacity, each owner decides which assignments it keeps with the
   one-process rule over the whole batch (it receives each candidate's
   slot or weight and answers with keep flags); then the kept rows go out
   in one ``Alltoallw`` straight from the plan's order;
3. *experts*: each owner runs its experts through the CPU scheduler on
   the rows it received, which land grouped by expert and, inside an
   expert, in rank order: the rows and the order one process would see
   over the concatenated batch;
4. the results go back the same way (one ``Alltoallw``) and *combine*
   (:func:`numoe.unpermute`, shared experts) runs on each rank.

The row exchanges use ``Alltoallw`` (``Alltoallv`` with one MPI datatype
per peer): the sender's rows leave from one contiguous send buffer in the
plan's order, and each owner's receive datatype scatters them straight
into expert-major order, so neither side copies rows beyond that send
buffer; the return trip uses the same datatypes the other way round.

mpi4py is imported on first use: ``import numoe`` does not need it.
"""
from __future__ import annotations

import hashlib
import math
import time

import numpy as np

from ._types import DispatchPlan
from .dispatch import capacity as _capacity, dispatch_plan, unpermute
from .layer import MoELayer, _info, _on_device
from .routing import route

__all__ = ["ExpertParallel", "split_experts"]

_PHASES = ("route", "exchange", "experts", "combine")


def _mpi():
    """``mpi4py.MPI``, imported on first use, with a clear message when absent."""
    try:
        from mpi4py import MPI
    except ImportError as exc:      # pragma: no cover - depends on the environment
        raise ImportError("numoe.distributed needs mpi4py and an MPI library: "
                          "pip install 'numoe[mpi]' (brings mpi4py and MPICH)") from exc
    return MPI


def split_experts(num_experts, num_ranks):
    """Contiguous blocks of experts, as even as possible, one per rank.

    Parameters
    ----------
    num_experts : int
        E >= 1.
    num_ranks : int
        P >= 1 (may exceed E: the last ranks then own no expert).

    Returns
    -------
    bounds : (P+1,) int64 array
        Rank ``r`` owns experts ``bounds[r]:bounds[r+1]``; the first
        ``E % P`` ranks own one expert more than the others.

    Examples
    --------
    >>> from numoe.distributed import split_experts
    >>> split_experts(8, 3).tolist()
    [0, 3, 6, 8]
    >>> split_experts(2, 3).tolist()
    [0, 1, 2, 2]
    """
    for name, v in (("num_experts", num_experts), ("num_ranks", num_ranks)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    E, P = int(num_experts), int(num_ranks)
    sizes = np.full(P, E // P, dtype=np.int64)
    sizes[:E % P] += 1
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def layer_fingerprint(layer):
    """A short digest of what every rank must agree on: the config, the dtype,
    the router (+ biases) and the shared experts (the expert weights each rank
    uses are its own, so they are not hashed)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(layer.config).encode())
    h.update(np.dtype(layer.dtype).str.encode())
    for name in ("router", "router_bias", "selection_bias", "shared_gate_proj",
                 "shared_up_proj", "shared_down_proj", "shared_gate_weight"):
        a = getattr(layer, name)
        h.update(name.encode())
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class ExpertParallel:
    """One MoE layer spread over the ranks of an MPI communicator by experts.

    Parameters
    ----------
    layer : MoELayer
        The same layer on every rank (same seed or checkpoint), on the host.
        Rank ``r`` computes with experts ``bounds[r]:bounds[r+1]`` of it
        (:func:`split_experts`), read as views (an in-place weight update
        takes effect), and with its router and shared experts.
    comm : mpi4py communicator, optional
        Default ``MPI.COMM_WORLD``. Collective: every rank of ``comm`` must
        build the ExpertParallel and then call it the same number of times.

    Attributes
    ----------
    rank, size : int
    bounds : (size+1,) int64 array
    experts : range
        The experts this rank owns.
    timings : dict
        Seconds of the last forward per phase (``route``, ``exchange``,
        ``experts``, ``combine``).
    traffic : dict
        Bytes of the last forward: ``sent`` / ``received`` (rows, to and
        from other ranks, both directions of the trip), ``local`` (rows a
        rank sent itself), ``meta`` (counts, capacity keys and flags sent
        to other ranks).

    Raises
    ------
    ValueError
        When the ranks' layers differ (config, dtype, router, biases or
        shared experts); raised on every rank.

    Notes
    -----
    ``ep(x_local)`` on rank ``r`` equals rank ``r``'s rows of
    ``layer(np.concatenate(all ranks' x))``, capacity drops included (each
    owner applies the one-process ``drop_policy`` to the whole batch, with
    the capacity of the whole batch). Each expert sees the same rows in the
    same order, in a block of the same shape, as in one process, so its
    outputs are bit for bit the same given the same router logits; the
    router logits and the shared experts are products over a rank's own
    rows, whose BLAS blocking follows the rank's token count, so they (and
    hence ``y``) can differ from one process in the last bits.

    Examples
    --------
    Run under ``mpiexec -n 2 python script.py``::

        layer = numoe.MoELayer.random(cfg, seed=0)       # same on every rank
        ep = numoe.distributed.ExpertParallel(layer)
        y_local = ep(x_local)
    """

    def __init__(self, layer, comm=None):
        if not isinstance(layer, MoELayer):
            raise TypeError(f"layer must be a numoe.MoELayer, got {type(layer).__name__}")
        if layer._device:
            raise TypeError("ExpertParallel runs host layers (NumPy arrays) only in this "
                            "version; build it from the host layer, not layer.to_device()")
        if comm is None:
            comm = _mpi().COMM_WORLD
        self.comm = comm
        self.layer = layer
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        cfg = layer.config
        self.bounds = split_experts(cfg.num_experts, self.size)
        e0, e1 = (int(b) for b in self.bounds[self.rank:self.rank + 2])
        self.experts = range(e0, e1)
        self._emax = int(np.max(np.diff(self.bounds)))
        self.timings = dict.fromkeys(_PHASES, 0.0)
        self.traffic = dict(sent=0, received=0, local=0, meta=0)
        digests = comm.allgather(layer_fingerprint(layer))
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        if bad:
            raise ValueError(f"ranks {bad} hold a different layer than rank 0 (config, dtype, "
                             "router, biases or shared experts differ); every rank must pass "
                             "the same layer (same seed or checkpoint)")

    def __repr__(self):
        return (f"ExpertParallel(rank={self.rank}/{self.size}, experts={self.experts.start}:"
                f"{self.experts.stop}, {self.layer!r})")

    def __call__(self, x_local):
        return self.forward(x_local)

    # ------------------------------------------------------------ forward
    def forward(self, x_local, return_info=False):
        """The layer on this rank's tokens, experts computed by their owners.

        Collective: every rank of the communicator must call it (a rank may
        pass zero tokens).

        Parameters
        ----------
        x_local : (..., H) float array, the layer's dtype
            This rank's tokens.
        return_info : bool
            Also return the routing details of this rank's tokens.

        Returns
        -------
        y_local : (..., H) array
            This rank's rows of the one-process layer on the concatenated
            batch (see the class Notes for the rounding).
        info : dict, only with ``return_info=True``
            As :meth:`numoe.MoELayer.forward`, for this rank's tokens:
            ``logits``, ``routing``, ``plan`` (local flat ids; its capacity
            and drops are those of the whole batch), ``stats`` (this rank's
            tokens); ``aux_loss`` and ``z_loss`` of the whole batch (summed
            over ranks in rank order: equal to one process to rounding).

        Raises
        ------
        ValueError, TypeError
            Bad ``x_local`` on any rank raises on every rank (the ranks
            agree on it before moving rows), naming the failing ranks.
        """
        layer, cfg, comm = self.layer, self.layer.config, self.comm
        P, E, k = self.size, cfg.num_experts, cfg.top_k
        clock = time.perf_counter
        t0 = clock()
        err = None
        try:
            if _on_device(x_local):
                raise TypeError("x_local is a device array: ExpertParallel runs host "
                                "(NumPy) arrays only in this version")
            x2, lead = layer._host_tokens(x_local)
            logits = layer._logits(x2)
            routing = route(logits, k, score=cfg.score, renormalize=cfg.renormalize,
                            bias=layer.selection_bias, n_groups=cfg.n_groups,
                            topk_groups=cfg.topk_groups, group_score=cfg.group_score,
                            scale=cfg.scale)
            plan0 = dispatch_plan(routing.experts, E)        # dropless, local flat ids
            T = x2.shape[0]
        except (ValueError, TypeError) as exc:
            err = exc
        t1 = clock()

        # -- counts: [status/T, candidates per owned expert (padded)] to every owner
        blk = self._emax + 1
        sendc = np.zeros((P, blk), dtype=np.int64)
        if err is None:
            sendc[:, 0] = T
            for r in range(P):
                b0, b1 = self.bounds[r], self.bounds[r + 1]
                sendc[r, 1:1 + b1 - b0] = plan0.counts[b0:b1]
        else:
            sendc[:, 0] = -1
        recvc = np.empty_like(sendc)
        comm.Alltoall(sendc, recvc)
        failed = [r for r in range(P) if recvc[r, 0] < 0]
        if err is not None:
            raise err
        if failed:
            raise ValueError(f"ExpertParallel: rank(s) {failed} got bad input (see the "
                             "error raised there); nothing was computed")
        e0, e1 = self.experts.start, self.experts.stop
        Tg = int(recvc[:, 0].sum())                            # tokens of the whole batch
        cand_in = np.ascontiguousarray(recvc[:, 1:1 + e1 - e0])   # [P, E_loc] rows
        send_owner = self._owner_sums(plan0.counts)
        meta = sendc.nbytes - blk * 8

        # -- capacity: owners decide which assignments survive (one-process rule)
        cap = None
        if cfg.capacity_factor is not None:
            cap = _capacity(Tg, E, k, cfg.capacity_factor)
        if cap is None or Tg == 0:
            plan, kin = plan0._replace(capacity=cap), cand_in
        else:
            keep, kin, meta_keep = self._owner_keep(plan0, routing.weights, cand_in,
                                                    send_owner, cap)
            meta += meta_keep
            plan = _kept_plan(plan0, keep, cap)
        send_rows = self._owner_sums(plan.counts)
        t2 = clock()

        # -- rows to their owners, experts, rows back
        H = cfg.hidden_dim
        xs = np.take(x2, plan.order // k, axis=0)          # the send buffer, plan order
        xin = np.empty((int(kin.sum()), H), dtype=x2.dtype)
        self._exchange(xs, send_rows, xin, kin, H, forward=True)
        t3 = clock()
        yin = np.empty_like(xin)
        sh = self._run_experts(x2, xin, kin, yin)
        t4 = clock()
        ys = np.empty_like(xs)
        self._exchange(ys, send_rows, yin, kin, H, forward=False)
        t5 = clock()
        y = unpermute(ys, plan, routing.weights)
        if sh is not None:
            from ._cpu import experts as cpu

            gate = None
            if layer.shared_gate_weight is not None:
                gate = cpu.matmul(x2, layer.shared_gate_weight[:, None])[:, 0]
            cpu.add_shared(y, sh, gate)
        y = y.reshape(lead + (H,))
        t6 = clock()

        item = x2.dtype.itemsize * H
        own = self.rank
        sent = int(send_rows.sum() - send_rows[own])
        recv = int(kin.sum() - kin[own].sum())
        self.traffic = dict(sent=(sent + recv) * item, received=(recv + sent) * item,
                            local=int(send_rows[own]) * item, meta=int(meta))
        self.timings = dict(route=t1 - t0, exchange=(t2 - t1) + (t3 - t2) + (t5 - t4),
                            experts=t4 - t3, combine=t6 - t5)
        if not return_info:
            return y
        return y, self._info(logits, routing, plan, Tg)

    # ----------------------------------------------------------- helpers
    def _owner_sums(self, counts):
        """Per-owner sums of a per-expert count vector (ranks may own no expert)."""
        c = np.concatenate([[0], np.cumsum(counts)])
        return c[self.bounds[1:]] - c[self.bounds[:-1]]

    def _exchange(self, send, send_rows, recv, kin, width, forward):
        """Rows between senders (contiguous blocks per owner, in plan order) and
        owners (expert-major, rank order inside an expert). ``forward``: sender
        to owner; else the same layout back (``recv`` is then the source)."""
        MPI = _mpi()
        P = self.size
        nbytes = width * send.dtype.itemsize
        row = MPI.BYTE.Create_contiguous(nbytes).Commit()
        # contiguous side: one block of rows per peer
        starts = np.concatenate([[0], np.cumsum(send_rows)[:-1]])
        flat_counts = [int(c) for c in send_rows]
        flat_displs = [int(s) * nbytes for s in starts]
        # expert-major side: for peer s, its rows of each local expert
        E_loc = kin.shape[1]
        exp_start = np.concatenate([[0], np.cumsum(kin.sum(axis=0))[:-1]])   # [E_loc]
        before = np.cumsum(kin, axis=0) - kin                                # [P, E_loc]
        types = []
        try:
            for s in range(P):
                if E_loc:
                    disp = ((exp_start + before[s]) * nbytes).astype(np.int64).tolist()
                    t = row.Create_hindexed([int(c) for c in kin[s]], disp).Commit()
                else:
                    t = row.Create_contiguous(0).Commit()
                types.append(t)
            flat = [send, (flat_counts, flat_displs), [row] * P]
            scattered = [recv, ([1] * P, [0] * P), types]
            if forward:
                self.comm.Alltoallw(flat, scattered)
            else:
                self.comm.Alltoallw(scattered, flat)
        finally:
            for t in types:
                t.Free()
            row.Free()

    def _owner_keep(self, plan0, weights, cand_in, send_owner, cap):
        """Keep flags (plan0 order) from the owners' capacity decision, the
        kept rows per (sender, local expert) and the metadata bytes sent.

        Each sender sends its candidates' priority key (slot ``j`` for
        ``"slot"``, the weight for ``"score"``; none for ``"position"``,
        where arrival order is the priority) to their owners; an owner
        stable-sorts each expert's candidates (rank order, then local flat
        id: global flat id order) by the key, keeps the first ``cap`` and
        answers with flags.
        """
        cfg = self.layer.config
        k, policy = cfg.top_k, cfg.drop_policy
        n_in = int(cand_in.sum())
        if policy == "slot":
            key = (plan0.order % k).astype(np.float64)
        elif policy == "score":
            key = -np.asarray(weights, dtype=np.float64).reshape(-1)[plan0.order]
        else:
            key = None
        seg = cand_in.sum(axis=0)                                # candidates per expert
        seg_id = np.repeat(np.arange(seg.shape[0]), seg)
        seg_start = np.concatenate([[0], np.cumsum(seg)[:-1]])
        meta = 0
        if key is None:
            idx = np.arange(n_in)
        else:
            key_in = np.empty(n_in, np.float64)
            self._exchange(key, send_owner, key_in, cand_in, 1, forward=True)
            meta += 8 * int(send_owner.sum() - send_owner[self.rank])
            idx = np.argsort(key_in, kind="stable")
            idx = idx[np.argsort(seg_id[idx], kind="stable")]
        rank_in_seg = np.arange(n_in) - seg_start[seg_id[idx]]
        flags_in = np.empty(n_in, np.uint8)
        flags_in[idx] = rank_in_seg < cap
        flags = np.empty(plan0.order.shape[0], np.uint8)
        self._exchange(flags, send_owner, flags_in, cand_in, 1, forward=False)
        meta += int(n_in - cand_in[self.rank].sum())
        # what this owner keeps from each sender, per local expert
        cs = np.concatenate([[0], np.cumsum(flags_in, dtype=np.int64)])
        start = seg_start[None, :] + np.cumsum(cand_in, axis=0) - cand_in     # [P, E_loc]
        kept = cs[start + cand_in] - cs[start]
        return flags.astype(bool), kept, meta

    def _run_experts(self, x2, xin, kin, yin):
        """This rank's experts on the received rows (one block per expert, as in
        one process) and the shared experts on its own tokens; returns the
        shared output (or None)."""
        from ._cpu import experts as cpu

        layer, cfg = self.layer, self.layer.config
        e0, e1 = self.experts.start, self.experts.stop
        T, H = x2.shape
        jobs = []
        if xin.shape[0]:
            offs = np.concatenate([[0], np.cumsum(kin.sum(axis=0))]).astype(np.int64)
            jobs.append(cpu.Job(
                src=xin, order=None, k=1, offsets=offs, w1=layer._w1[e0:e1], w_up=None,
                fused=cfg.glu, w_down=layer.w_down[e0:e1],
                b_gate=None if layer.b_gate is None else layer.b_gate[e0:e1],
                b_up=None if layer.b_up is None else layer.b_up[e0:e1],
                b_down=None if layer.b_down is None else layer.b_down[e0:e1],
                code=layer._code, limit=layer._limit, alpha=layer._alpha, out=yin))
        sh = None
        if layer._s1 is not None and T:
            sh = np.empty((T, H), dtype=x2.dtype)
            jobs.append(cpu.Job(
                src=x2, order=None, k=1, offsets=np.array([0, T], np.int64),
                w1=layer._s1[None], w_up=None, fused=True,
                w_down=layer.shared_down_proj[None], b_gate=None, b_up=None, b_down=None,
                code=0, limit=math.inf, alpha=1.0, out=sh))
        cpu.run_jobs(jobs)
        return sh

    def _info(self, logits, routing, plan, Tg):
        """``info`` of this rank's tokens with the whole batch's losses."""
        from .routing import router_probs

        cfg = self.layer.config
        E, k = cfg.num_experts, cfg.top_k
        info = _info(logits, routing, plan, cfg)
        T = logits.shape[0]
        part = np.zeros(2 * E + 1)
        if T:
            part[:E] = np.asarray(router_probs(logits, cfg.score), np.float64).sum(axis=0)
            part[E:2 * E] = np.bincount(routing.experts.reshape(-1), minlength=E)
            part[2 * E] = info["z_loss"] * T
        parts = self.comm.allgather(part)
        total = np.zeros(2 * E + 1)
        for p in parts:                        # fixed rank order
            total += p
        if Tg:
            f = total[E:2 * E] / (Tg * k)
            info["aux_loss"] = float(E * np.sum(f * (total[:E] / Tg)))
            info["z_loss"] = float(total[2 * E] / Tg)
        return info


def _kept_plan(plan0, keep, cap):
    """The local plan with the owners' drops: ``plan0`` (dropless) restricted
    to the kept assignments (same order inside each expert)."""
    order = plan0.order[keep]
    c = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    offsets = c[plan0.offsets]
    counts = np.diff(offsets)
    dropped = np.zeros(plan0.dropped.size, dtype=bool)
    dropped[plan0.order[~keep]] = True
    return DispatchPlan(order, offsets, counts, dropped.reshape(plan0.dropped.shape), cap)
