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

:meth:`ExpertParallel.backward` reverses the trips: output gradients and
routing weights go to the owners, input gradients and routing-weight
gradients come back, and the replicated weights' gradients are summed over
the ranks in rank order.

mpi4py is imported on first use: ``import numoe`` does not need it. See
docs/distributed.md for running on a cluster and the cost model.
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


def _layer_fingerprint(layer):
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
    hence ``y``) can differ from one process in the last bits; with
    ``MoELayer(..., batch_invariant=True)`` every product is row-independent
    and ``y`` is bit-identical to one process. :meth:`backward` gives the
    gradients of ``layer.backward`` on the concatenated batch the same way.
    Host (NumPy) layers and arrays only in this version.

    Examples
    --------
    Run under ``mpiexec -n 2 python script.py``::

        from numoe.distributed import ExpertParallel

        layer = numoe.MoELayer.random(cfg, seed=0)       # same on every rank
        ep = ExpertParallel(layer)                      # comm: MPI.COMM_WORLD
        y_local = ep(x_local)                           # this rank's tokens
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
        digests = comm.allgather(_layer_fingerprint(layer))
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
            over ranks in rank order: equal to one process to rounding);
            ``ep``: what :meth:`backward` reads (the whole batch's token
            count and assignments per expert, the exchange layout, and the
            rows this rank's experts received).

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
        except Exception as exc:  # noqa: BLE001 - tell the other ranks, then raise it here
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
        yin, sh, xc = self._run_experts(x2, xin, kin)
        t4 = clock()
        ys = np.empty((xs.shape[0], H), dtype=yin.dtype)    # compute dtype, as one process
        self._exchange(ys, send_rows, yin, kin, H, forward=False)
        t5 = clock()
        y = unpermute(ys, plan, routing.weights)
        if sh is not None:
            from ._cpu import experts as cpu

            gate = None
            if layer.shared_gate_weight is not None:
                gate = cpu.linear(xc, layer.shared_gate_weight[:, None],
                                  rowwise=layer.batch_invariant)[:, 0]
            cpu.add_shared(y, sh, gate)
        if y.dtype != layer.dtype:
            y = y.astype(layer.dtype)
        y = y.reshape(lead + (H,))
        t6 = clock()

        own = self.rank
        sent = int(send_rows.sum() - send_rows[own])
        recv = int(kin.sum() - kin[own].sum())
        out_b, back_b = x2.dtype.itemsize * H, yin.dtype.itemsize * H
        self.traffic = dict(sent=sent * out_b + recv * back_b,
                            received=recv * out_b + sent * back_b,
                            local=int(send_rows[own]) * (out_b + back_b), meta=int(meta))
        self.timings = dict(route=t1 - t0, exchange=(t3 - t1) + (t5 - t4),
                            experts=t4 - t3, combine=t6 - t5)
        if not return_info:
            return y
        info = self._info(logits, routing, plan, Tg)
        info["ep"].update(kin=kin, send_rows=send_rows, xin=xin)   # for backward
        return y, info

    # ----------------------------------------------------------- backward
    def backward(self, x_local, info, d_y_local, *, aux_loss_coef=0.0, z_loss_coef=0.0):
        """Gradients as :meth:`numoe.MoELayer.backward`, spread like the forward.

        Collective. The rows' output gradients go to the experts' owners
        (with their routing weights), each owner runs the expert backward on
        the block of rows it saw in the forward, and the input gradients
        and routing-weight gradients come back; the router, its bias and
        the shared experts' gradients are summed over the ranks in rank
        order (a chain ``((g0 + g1) + g2) + ...`` in float64, then
        broadcast), so every rank holds the same values.

        Parameters
        ----------
        x_local : (..., H) float array
            This rank's input to :meth:`forward`.
        info : dict
            From ``ep.forward(x_local, return_info=True)``.
        d_y_local : (..., H) float array
            Gradient of the loss with respect to this rank's ``y``.
        aux_loss_coef, z_loss_coef : float
            Coefficients of the whole batch's load-balancing loss and
            z-loss (``info["aux_loss"]``, ``info["z_loss"]``).

        Returns
        -------
        dict
            ``"x"``: this rank's ``d_x``; ``router``, ``router_bias`` and the
            ``shared_*`` entries: the whole batch's gradients (the same on
            every rank); the expert entries (``w_gate``, ``w_up``,
            ``w_down``, ``b_gate``, ``b_up``, ``b_down``): the gradients of
            this rank's experts only, ``[len(ep.experts), ...]`` (rows
            ``ep.experts`` of the one-process gradient). Same names and
            dtypes as :meth:`numoe.MoELayer.parameters`.

        Notes
        -----
        Equal to the one-process ``layer.backward`` on the concatenated
        batch to rounding: the expert gradients see the same rows in the
        same blocks (bit for bit given the same router logits); the router
        and shared gradients are sums over ranks of per-rank products.
        """
        from ._cpu import experts as cpu
        from . import _validate as V
        from .dispatch import permute_backward
        from .routing import route_backward, router_probs, router_probs_backward
        from .losses import router_z_loss_backward

        layer, cfg, comm = self.layer, self.layer.config, self.comm
        E, k, F, H = cfg.num_experts, cfg.top_k, cfg.expert_dim, cfg.hidden_dim
        e0, e1 = self.experts.start, self.experts.stop
        err = None
        try:
            if not isinstance(info, dict) or "ep" not in info:
                raise TypeError("info must be the dict from ep.forward(x_local, "
                                "return_info=True)")
            x2, lead = layer._host_tokens(x_local)
            T = x2.shape[0]
            logits, routing, plan = info["logits"], info["routing"], info["plan"]
            if np.shape(logits) != (T, E):
                raise ValueError(f"info does not belong to this x_local: logits "
                                 f"{np.shape(logits)}, expected {(T, E)}")
            aux_loss_coef = V.real("aux_loss_coef", aux_loss_coef)
            z_loss_coef = V.real("z_loss_coef", z_loss_coef)
            cdt = x2.dtype
            dy = V.float_array("d_y_local", d_y_local, dtype=cdt)
            if dy.shape != np.shape(x_local):
                raise ValueError(f"d_y_local must have the shape of x_local "
                                 f"{np.shape(x_local)}, got {dy.shape}")
            dy = dy.reshape(T, H)
            V.check_finite("d_y_local", dy)
        except Exception as exc:  # noqa: BLE001 - tell the other ranks, then raise it here
            err = exc
        bad = [r for r, e in enumerate(comm.allgather(err is not None)) if e]
        if err is not None:
            raise err
        if bad:
            raise ValueError(f"ExpertParallel.backward: rank(s) {bad} got bad input (see the "
                             "error raised there); nothing was computed")
        ep = info["ep"]
        kin, send_rows, xin, Tg = ep["kin"], ep["send_rows"], ep["xin"], ep["tokens"]
        wide = lambda a: None if a is None else np.ascontiguousarray(a, dtype=cdt)  # noqa
        new = lambda a: None if a is None else np.empty(np.shape(a), cdt)          # noqa

        # routed experts: output gradients and routing weights to the owners
        order = np.asarray(plan.order)
        rows = order // k
        dys = np.take(dy, rows, axis=0)
        rs = np.ascontiguousarray(np.asarray(routing.weights).reshape(-1)[order], dtype=cdt)
        n_in = xin.shape[0]
        dys_in = np.empty((n_in, H), cdt)
        rs_in = np.empty(n_in, cdt)
        self._exchange(dys, send_rows, dys_in, kin, H, forward=True)
        self._exchange(rs, send_rows, rs_in, kin, 1, forward=True)
        w1 = wide(layer._w1[e0:e1])
        offs = np.concatenate([[0], np.cumsum(kin.sum(axis=0))]).astype(np.int64)
        sl = lambda a: None if a is None else a[e0:e1]                            # noqa
        job = cpu.BackwardJob(
            xs=wide(xin), offsets=offs, w1=w1, w_up=None, fused=cfg.glu,
            w_down=wide(sl(layer.w_down)), b_gate=wide(sl(layer.b_gate)),
            b_up=wide(sl(layer.b_up)), b_down=wide(sl(layer.b_down)), code=layer._code,
            limit=layer._limit, alpha=layer._alpha, d_ys=dys_in, row_scale=rs_in,
            d_xs=np.empty((n_in, H), cdt), d_w1=np.empty(w1.shape, cdt), d_w_up=None,
            d_w_down=new(sl(layer.w_down)), d_b_gate=new(sl(layer.b_gate)),
            d_b_up=new(sl(layer.b_up)), d_b_down=new(sl(layer.b_down)),
            d_scale=np.empty(n_in))
        if n_in:
            cpu.run_backward(job)
        else:                                   # no rows: zero weight gradients
            for a in (job.d_w1, job.d_w_down, job.d_b_gate, job.d_b_up, job.d_b_down):
                if a is not None:
                    a[...] = 0
        d_xs = np.empty((order.shape[0], H), cdt)
        d_scale = np.empty(order.shape[0])
        self._exchange(d_xs, send_rows, job.d_xs, kin, H, forward=False)
        self._exchange(d_scale, send_rows, job.d_scale, kin, 1, forward=False)
        d_x = permute_backward(d_xs, plan)
        d_w = np.zeros(T * k)
        d_w[order] = d_scale
        grads = dict(w_gate=job.d_w1[..., :F] if cfg.glu else job.d_w1,
                     w_down=job.d_w_down, b_gate=job.d_b_gate, b_up=job.d_b_up,
                     b_down=job.d_b_down)
        if cfg.glu:
            grads["w_up"] = job.d_w1[..., F:]

        # router: routing weights, the whole batch's aux and z losses, the product
        lg = np.asarray(logits)
        d_logits = np.asarray(route_backward(
            lg, routing, d_w.reshape(T, k).astype(lg.dtype), score=cfg.score,
            renormalize=cfg.renormalize, scale=cfg.scale), dtype=np.float64)
        if aux_loss_coef and T:
            row = aux_loss_coef * E * (ep["counts"] / (Tg * k)) / Tg
            probs = router_probs(lg, cfg.score, normalize=True)
            d_p = np.empty(np.shape(probs), np.asarray(probs).dtype)
            d_p[...] = row.astype(d_p.dtype)
            d_logits += router_probs_backward(lg, d_p, score=cfg.score, normalize=True)
        if z_loss_coef and T:
            d_logits += router_z_loss_backward(lg, d_loss=z_loss_coef * T / Tg)
        d_logits = d_logits.astype(cdt)
        part = {"router": cpu.matmul_tn(x2, d_logits) if T else np.zeros((H, E), cdt)}
        if layer.router_bias is not None:
            part["router_bias"] = np.empty(E, cdt)
            cpu.column_sums(d_logits, np.zeros(0, cdt), part["router_bias"])
        if T:
            d_x += cpu.matmul(d_logits, wide(layer.router).T)

        # shared SwiGLU MLP on this rank's tokens (its sigmoid gate as a row scale)
        if layer._s1 is not None:
            S = cfg.shared_expert_dim
            gw = wide(layer.shared_gate_weight)
            s1 = wide(layer._s1)[None]
            d_s1 = np.zeros(s1.shape, cdt)
            d_sd = np.zeros((1, S, H), cdt)
            if gw is not None:
                part["shared_gate_weight"] = np.zeros(H, cdt)
            if T:
                sig = None
                if gw is not None:
                    a = cpu.matmul(x2, gw[:, None])[:, 0].astype(np.float64)
                    sig = 1.0 / (1.0 + np.exp(-a))
                sjob = cpu.BackwardJob(
                    xs=x2, offsets=np.array([0, T], np.int64), w1=s1, w_up=None, fused=True,
                    w_down=wide(layer.shared_down_proj)[None], b_gate=None, b_up=None,
                    b_down=None, code=0, limit=math.inf, alpha=1.0, d_ys=dy,
                    row_scale=None if sig is None else sig.astype(cdt),
                    d_xs=np.empty((T, H), cdt), d_w1=d_s1, d_w_up=None, d_w_down=d_sd,
                    d_b_gate=None, d_b_up=None, d_b_down=None,
                    d_scale=None if sig is None else np.empty(T))
                cpu.run_backward(sjob)
                d_x += sjob.d_xs
                if sig is not None:
                    d_a = (sig * (1.0 - sig) * sjob.d_scale).astype(cdt)
                    part["shared_gate_weight"] = cpu.matmul_tn(x2, d_a[:, None])[:, 0]
                    d_x += d_a[:, None] * gw[None, :]
            part["shared_gate_proj"] = d_s1[0, :, :S]
            part["shared_up_proj"] = d_s1[0, :, S:]
            part["shared_down_proj"] = d_sd[0]
        grads.update(self._ordered_sum(part))
        out = {"x": d_x.reshape(lead + (H,))}
        for name, p in layer.parameters().items():
            g = grads[name]
            out[name] = g if g.dtype == p.dtype else g.astype(p.dtype)
        return out

    def _ordered_sum(self, parts):
        """Sum each array of ``parts`` over the ranks in rank order, exactly:
        rank r receives the float64 sum of ranks ``0..r-1``, adds its own and
        passes it on; the last rank broadcasts the total. Returns the sums
        in the arrays' dtypes."""
        comm, r, P = self.comm, self.rank, self.size
        names = sorted(parts)
        flat = np.concatenate([np.asarray(parts[n], np.float64).reshape(-1) for n in names]) \
            if names else np.zeros(0)
        acc = flat.copy()
        if r > 0:
            comm.Recv(acc, source=r - 1, tag=71)
            acc += flat
        if r < P - 1:
            comm.Send(acc, dest=r + 1, tag=71)
        comm.Bcast(acc, root=P - 1)
        out, pos = {}, 0
        for n in names:
            a = np.asarray(parts[n])
            out[n] = acc[pos:pos + a.size].reshape(a.shape).astype(a.dtype)
            pos += a.size
        return out

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

    def _run_experts(self, x2, xin, kin):
        """This rank's experts on the received rows (one block per expert, as in
        one process) and the shared experts on its own tokens, in the compute
        dtype (16-bit rows widened to float32). Returns ``(yin, sh, xc)``: the
        experts' rows, the shared output (or None) and ``x2`` in the compute
        dtype."""
        from ._cpu import experts as cpu

        layer = self.layer
        e0, e1 = self.experts.start, self.experts.stop
        T, H = x2.shape
        xin_c = layer._compute_x(xin)
        yin = np.empty(xin_c.shape, dtype=xin_c.dtype)
        jobs = []
        if xin.shape[0]:
            offs = np.concatenate([[0], np.cumsum(kin.sum(axis=0))]).astype(np.int64)
            jobs.append(layer._routed_job(xin_c, None, 1, offs, yin, slice(e0, e1)))
        xc = layer._compute_x(x2)
        sh = None
        if layer._s1 is not None and T:
            sh = np.empty((T, H), dtype=xc.dtype)
            jobs.append(layer._shared_job(xc, sh))
        cpu.run_jobs(jobs)
        return yin, sh, xc

    def _info(self, logits, routing, plan, Tg):
        """``info`` of this rank's tokens with the whole batch's losses."""
        from .routing import router_probs

        cfg = self.layer.config
        E, k = cfg.num_experts, cfg.top_k
        info = _info(logits, routing, plan, cfg)
        T = logits.shape[0]
        part = np.zeros(2 * E + 1)
        if T:
            part[:E] = np.asarray(router_probs(logits, cfg.score, normalize=True),
                                  np.float64).sum(axis=0)
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
        # the whole batch's token count and assignments per expert (for backward)
        info["ep"] = dict(tokens=Tg, counts=total[E:2 * E].astype(np.int64))
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
