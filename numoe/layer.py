"""The whole MoE layer: :class:`MoELayer`, :func:`moe` and the seed-compatible wrappers.

One forward chains the public ops (api.md): router logits ``x @ router``
(+ bias), :func:`numoe.route`, :func:`numoe.dispatch_plan` (capacity from
:func:`numoe.capacity`), the expert FFNs, :func:`numoe.unpermute`, plus the
shared experts. On the CPU two steps are fused for speed, with the same
results as the chain within rounding: the expert driver gathers each
expert's rows through the plan itself (no separate :func:`numoe.permute`
copy of ``x``), and gate and up run as one product on weights fused once
at construction (``[E, H, 2F]``; ``w_gate`` / ``w_up`` are views of it).
On the GPU (device ``x`` after :meth:`MoELayer.to_device`) every step is
the public call itself.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from . import _validate as V
from ._backend import backend_of, cuda_module, is_device
from ._types import DispatchPlan, Routing
from .config import MoEConfig
from .dispatch import capacity as _capacity, dispatch_plan, permute, unpermute
from .experts import _check_expert_options, expert_ffn
from .losses import load_balancing_loss, router_z_loss, routing_stats
from .routing import route, router_probs

__all__ = ["MoELayer", "moe", "moe_gating_forward", "moe_expert_computation"]

_SHARED_NAMES = ("shared_gate_proj", "shared_up_proj", "shared_down_proj", "shared_gate_weight")


def _on_device(a):
    """True for GPU arrays, including the CUDA simulator's (``NUMBA_ENABLE_CUDASIM=1``)."""
    return is_device(a) or type(a).__module__.startswith("numba.cuda.simulator")


def _check_config(config):
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a numoe.MoEConfig, got {type(config).__name__}")
    return config


def _as(name, a, dtype, shape):
    """Host weight ``a`` as a C-contiguous ``dtype`` array of ``shape`` (copies only if needed)."""
    w = V.float_array(name, a, dtype=dtype)
    return V.shape(name, w, shape)


def _fused_base(wg, wu):
    """The ``[..., 2F]`` array whose two halves are ``wg`` and ``wu``, or None.

    Lets a layer built from another layer's ``w_gate`` / ``w_up`` views share
    their memory instead of copying it.
    """
    base = wg.base
    if (not isinstance(base, np.ndarray) or wu.base is not base or wg.dtype != wu.dtype
            or base.dtype != wg.dtype or wg.shape != wu.shape
            or base.shape != wg.shape[:-1] + (2 * wg.shape[-1],)
            or not base.flags.c_contiguous or wg.strides != base.strides
            or wu.strides != base.strides):
        return None
    p0 = base.__array_interface__["data"][0]
    if (wg.__array_interface__["data"][0] != p0
            or wu.__array_interface__["data"][0] != p0 + wg.shape[-1] * wg.itemsize):
        return None
    return base


def _fuse(name_g, wg, name_u, wu, dtype, shape):
    """``concatenate([wg, wu], -1)`` as one C-contiguous array (no copy when already fused)."""
    if isinstance(wg, np.ndarray) and isinstance(wu, np.ndarray) and wg.dtype == dtype:
        base = _fused_base(wg, wu)
        if base is not None and wg.shape == shape:
            return base
    g = V.shape(name_g, V.float_array(name_g, wg), shape)
    u = V.shape(name_u, V.float_array(name_u, wu), shape)
    out = np.empty(shape[:-1] + (2 * shape[-1],), dtype=dtype)
    F = shape[-1]
    out[..., :F] = g
    out[..., F:] = u
    return out


class MoELayer:
    """A Mixture-of-Experts feed-forward layer holding its weights ("x @ W" layout).

    Parameters
    ----------
    config : MoEConfig
    router : (H, E) float array
        Router weights; the layer's dtype (float32 or float64) is that of
        ``w_gate``, and every other weight is converted to it once here.
    w_gate, w_up : (E, H, F) float array
        Gate and up projections (``w_up=None`` when ``config.glu`` is
        False: plain experts ``act(x @ w_gate) @ w_down``). They are stored
        fused as one ``(E, H, 2F)`` array (one copy, none when they already
        are the two halves of such an array); the attributes ``w_gate`` /
        ``w_up`` are views of it.
    w_down : (E, F, H) float array
    router_bias : (E,) float array, optional
        Added to the logits (needed iff ``config.router_bias``).
    selection_bias : (E,) float array, optional
        Selection-only routing bias (needed iff ``config.selection_bias``);
        an ordinary attribute, so ``layer.selection_bias =
        numoe.update_bias(...)`` updates it.
    b_gate, b_up : (E, F) float array, optional
    b_down : (E, H) float array, optional
        Expert biases (needed iff ``config.expert_bias``; no ``b_up`` for
        plain experts).
    shared_gate_proj, shared_up_proj : (H, S) float array, optional
    shared_down_proj : (S, H) float array, optional
        The shared SwiGLU MLP, ``S = config.shared_expert_dim`` (needed iff
        ``config.num_shared_experts > 0``).
    shared_gate_weight : (H,) float array, optional
        Gate of the shared output, ``sigmoid(x @ shared_gate_weight)``
        (needed iff ``config.shared_gate``).

    Notes
    -----
    ``layer(x)`` and ``layer.forward(x)`` take ``x [..., H]`` of the layer's
    dtype and return ``y`` of the same shape. Results are deterministic:
    bit-identical for any number of threads (``numba.set_num_threads``).

    Examples
    --------
    >>> import numpy as np, numoe
    >>> cfg = numoe.MoEConfig.mixtral(num_experts=4, top_k=2, hidden_dim=8, expert_dim=16)
    >>> layer = numoe.MoELayer.random(cfg, seed=0)
    >>> x = np.ones((3, 8), np.float32)
    >>> y, info = layer.forward(x, return_info=True)
    >>> y.shape, info["routing"].experts.shape
    ((3, 8), (3, 2))
    >>> ref = numoe.reference.moe_forward(x, top_k=2, **layer.weights())
    >>> bool(np.allclose(y, ref, rtol=1e-4, atol=1e-5))
    True
    """

    def __init__(self, config, *, router, w_gate, w_up=None, w_down, router_bias=None,
                 selection_bias=None, b_gate=None, b_up=None, b_down=None,
                 shared_gate_proj=None, shared_up_proj=None, shared_down_proj=None,
                 shared_gate_weight=None):
        cfg = _check_config(config)
        E, H, F = cfg.num_experts, cfg.hidden_dim, cfg.expert_dim
        # the layer's dtype is w_gate's; asarray keeps views (no copy before fusing)
        wg = w_gate if isinstance(w_gate, np.ndarray) else V.float_array("w_gate", w_gate)
        if wg.dtype not in V.FLOATS:
            V.float_array("w_gate", wg)             # raises the TypeError
        dt = wg.dtype
        self.config = cfg
        self.dtype = dt
        self._device = False
        self.router = _as("router", router, dt, (H, E))
        if cfg.glu:
            if w_up is None:
                raise ValueError("w_up is None but config.glu is True (GLU experts need w_up)")
            self._w1 = _fuse("w_gate", wg, "w_up", w_up, dt, (E, H, F))
        else:
            if w_up is not None:
                raise ValueError("w_up was given but config.glu is False (plain FFN experts)")
            self._w1 = _as("w_gate", wg, dt, (E, H, F))
        self.w_down = _as("w_down", w_down, dt, (E, F, H))
        self.router_bias = self._optional("router_bias", router_bias, cfg.router_bias, dt, (E,))
        self.selection_bias = self._optional("selection_bias", selection_bias,
                                             cfg.selection_bias, dt, (E,))
        self.b_gate = self._optional("b_gate", b_gate, cfg.expert_bias, dt, (E, F))
        self.b_up = self._optional("b_up", b_up, cfg.expert_bias and cfg.glu, dt, (E, F))
        self.b_down = self._optional("b_down", b_down, cfg.expert_bias, dt, (E, H))
        S = cfg.shared_expert_dim
        has_shared = cfg.num_shared_experts > 0
        if has_shared:
            for name, a in (("shared_gate_proj", shared_gate_proj),
                            ("shared_up_proj", shared_up_proj),
                            ("shared_down_proj", shared_down_proj)):
                if a is None:
                    raise ValueError(f"{name} is required: config.num_shared_experts = "
                                     f"{cfg.num_shared_experts}")
            self._s1 = _fuse("shared_gate_proj", shared_gate_proj, "shared_up_proj",
                             shared_up_proj, dt, (H, S))
            self.shared_down_proj = _as("shared_down_proj", shared_down_proj, dt, (S, H))
        else:
            for name, a in (("shared_gate_proj", shared_gate_proj),
                            ("shared_up_proj", shared_up_proj),
                            ("shared_down_proj", shared_down_proj)):
                if a is not None:
                    raise ValueError(f"{name} was given but config.num_shared_experts is 0")
            self._s1 = None
            self.shared_down_proj = None
        self.shared_gate_weight = self._optional("shared_gate_weight", shared_gate_weight,
                                                 cfg.shared_gate, dt, (H,))
        opts = _check_expert_options(cfg.activation, cfg.limit, cfg.alpha, cfg.glu)
        self._code, self._limit, self._alpha = opts.code, opts.limit, opts.alpha

    @staticmethod
    def _optional(name, a, wanted, dt, shape):
        if a is None:
            if wanted:
                raise ValueError(f"{name} is required by the config (its flag is set)")
            return None
        if not wanted:
            raise ValueError(f"{name} was given but the config does not use it "
                             "(set the matching MoEConfig flag)")
        return _as(name, a, dt, shape)

    # --------------------------------------------------------- weight views
    @property
    def w_gate(self):
        """(E, H, F) gate (or plain-FFN input) projection; a view of the fused weights."""
        if self._device:
            return self._dev["w_gate"]
        return self._w1 if not self.config.glu else self._w1[..., :self.config.expert_dim]

    @property
    def w_up(self):
        """(E, H, F) up projection (None for plain experts); a view of the fused weights."""
        if self._device:
            return self._dev["w_up"]
        return None if not self.config.glu else self._w1[..., self.config.expert_dim:]

    @property
    def shared_gate_proj(self):
        """(H, S) gate projection of the shared MLP, or None."""
        if self._device:
            return self._dev["shared_gate_proj"]
        return None if self._s1 is None else self._s1[:, :self.config.shared_expert_dim]

    @property
    def shared_up_proj(self):
        """(H, S) up projection of the shared MLP, or None."""
        if self._device:
            return self._dev["shared_up_proj"]
        return None if self._s1 is None else self._s1[:, self.config.shared_expert_dim:]

    def weights(self):
        """All weights and options as keyword arguments of
        :func:`numoe.reference.moe_forward` (except ``top_k``)."""
        cfg = self.config
        kw = {name: getattr(self, name) for name in (
            "router", "w_gate", "w_up", "w_down", "router_bias", "selection_bias", "b_gate",
            "b_up", "b_down") + _SHARED_NAMES}
        kw.update(score=cfg.score, renormalize=cfg.renormalize, n_groups=cfg.n_groups,
                  topk_groups=cfg.topk_groups, group_score=cfg.group_score, scale=cfg.scale,
                  activation=cfg.activation, capacity_factor=cfg.capacity_factor,
                  drop_policy=cfg.drop_policy, limit=cfg.limit, alpha=cfg.alpha)
        return kw

    def __repr__(self):
        where = "cuda" if self._device else "cpu"
        return f"MoELayer({self.config!r}, dtype={np.dtype(self.dtype).name}, device={where!r})"

    # ------------------------------------------------------------ creation
    @classmethod
    def random(cls, config, seed=0, dtype=np.float32):
        """A layer with random weights (deterministic in ``seed``).

        Weights are normal with standard deviation ``1/sqrt(fan_in)`` (so
        activations stay of order one), biases normal with deviation 0.1,
        the selection bias zero. Generated in place in the fused layout:
        no temporary copies of the expert weights.

        Parameters
        ----------
        config : MoEConfig
        seed : int
        dtype : float32 or float64
        """
        cfg = _check_config(config)
        dt = np.dtype(dtype)
        if dt not in V.FLOATS:
            raise TypeError(f"dtype must be float32 or float64, got {dt}")
        seed = V.integer("seed", seed, lo=0)
        rng = np.random.default_rng(seed)
        E, H, F, k = cfg.num_experts, cfg.hidden_dim, cfg.expert_dim, cfg.top_k

        def normal(shape, std):
            a = np.empty(shape, dtype=dt)
            rng.standard_normal(out=a, dtype=dt)
            a *= dt.type(std)
            return a

        router = normal((H, E), 1.0 / math.sqrt(H))
        w1 = normal((E, H, 2 * F if cfg.glu else F), 1.0 / math.sqrt(H))
        w_down = normal((E, F, H), 1.0 / math.sqrt(F))
        kw = {}
        if cfg.router_bias:
            kw["router_bias"] = normal((E,), 0.1)
        if cfg.selection_bias:
            kw["selection_bias"] = np.zeros(E, dtype=dt)
        if cfg.expert_bias:
            kw["b_gate"] = normal((E, F), 0.1)
            if cfg.glu:
                kw["b_up"] = normal((E, F), 0.1)
            kw["b_down"] = normal((E, H), 0.1)
        if cfg.num_shared_experts:
            S = cfg.shared_expert_dim
            s1 = normal((H, 2 * S), 1.0 / math.sqrt(H))
            kw.update(shared_gate_proj=s1[:, :S], shared_up_proj=s1[:, S:],
                      shared_down_proj=normal((S, H), 1.0 / math.sqrt(S)))
            if cfg.shared_gate:
                kw["shared_gate_weight"] = normal((H,), 1.0 / math.sqrt(H))
        if cfg.glu:
            return cls(cfg, router=router, w_gate=w1[..., :F], w_up=w1[..., F:],
                       w_down=w_down, **kw)
        return cls(cfg, router=router, w_gate=w1, w_down=w_down, **kw)

    def to_device(self):
        """A copy of this layer with every weight on the GPU (``numba.cuda.to_device``).

        Calls with device ``x`` (numba, CuPy or PyTorch CUDA arrays) then run
        on the GPU through the public ops; this layer stays on the host.
        """
        from numba import cuda

        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._device = True
        new._w1 = new._s1 = None
        put = lambda a: None if a is None else cuda.to_device(np.ascontiguousarray(a))  # noqa
        dev = {name: put(getattr(self, name)) for name in (
            "w_gate", "w_up", "shared_gate_proj", "shared_up_proj")}
        new._dev = dev
        for name in ("router", "w_down", "router_bias", "selection_bias", "b_gate", "b_up",
                     "b_down", "shared_down_proj", "shared_gate_weight"):
            setattr(new, name, put(getattr(self, name)))
        if self._s1 is not None:     # the shared MLP as a one-expert expert_ffn
            dev["shared"] = tuple(put(np.ascontiguousarray(a)[None]) for a in (
                self.shared_gate_proj, self.shared_up_proj, self.shared_down_proj))
        return new

    # ------------------------------------------------------------- forward
    def __call__(self, x):
        return self.forward(x)

    def forward(self, x, return_info=False):
        """Run the layer.

        Parameters
        ----------
        x : (..., H) float array, the layer's dtype
            Host (NumPy) for a host layer, a device array for a layer from
            :meth:`to_device`.
        return_info : bool
            Also return the routing details.

        Returns
        -------
        y : (..., H) array, dtype of ``x``
        info : dict, only with ``return_info=True``
            ``logits [T, E]``, ``routing`` (:class:`numoe.Routing`, ``[T, k]``),
            ``plan`` (:class:`numoe.DispatchPlan`), ``aux_loss`` (load
            balancing, :func:`numoe.load_balancing_loss` on the router
            scores), ``z_loss`` (:func:`numoe.router_z_loss`) and ``stats``
            (:func:`numoe.routing_stats`). Leading dims of ``x`` are
            flattened to ``T`` tokens here.
        """
        if self._device or _on_device(x):
            return self._forward_device(x, return_info)
        x2, lead = self._host_tokens(x)
        logits = self._logits(x2)
        routing, plan = self._route(logits)
        y = self._experts(x2, routing, plan)
        y = y.reshape(lead + (y.shape[-1],))
        if not return_info:
            return y
        return y, _info(logits, routing, plan, self.config)

    def _host_tokens(self, x):
        x2, lead = V.tokens_2d("x", x)
        H = self.config.hidden_dim
        if x2.shape[1] != H:
            raise ValueError(f"x must have last dim hidden_dim = {H}, got shape {np.shape(x)}")
        if x2.dtype != self.dtype:
            raise TypeError(f"x has dtype {x2.dtype} but the layer is "
                            f"{np.dtype(self.dtype).name}; cast x (or build the layer "
                            "in that dtype)")
        V.check_finite("x", x2)
        return x2, lead

    def _logits(self, x2):
        from ._cpu import experts as cpu

        logits = cpu.matmul(x2, self.router)
        if self.router_bias is not None:
            logits += self.router_bias
        return logits

    def _route(self, logits):
        cfg = self.config
        T = logits.shape[0]
        routing = route(logits, cfg.top_k, score=cfg.score, renormalize=cfg.renormalize,
                        bias=self.selection_bias, n_groups=cfg.n_groups,
                        topk_groups=cfg.topk_groups, group_score=cfg.group_score,
                        scale=cfg.scale)
        cap = None
        if cfg.capacity_factor is not None:
            cap = _capacity(T, cfg.num_experts, cfg.top_k, cfg.capacity_factor)
        plan = dispatch_plan(routing.experts, cfg.num_experts, capacity=cap,
                             weights=routing.weights, drop_policy=cfg.drop_policy)
        return routing, plan

    def _experts(self, x2, routing, plan):
        """Routed experts (rows gathered through the plan), combine, shared MLP."""
        from ._cpu import experts as cpu

        cfg = self.config
        T, H = x2.shape
        k = cfg.top_k
        dt = self.dtype
        ys = np.empty((plan.order.shape[0], H), dtype=dt)
        jobs = []
        if ys.shape[0]:
            jobs.append(cpu.Job(x2, plan.order, k, plan.offsets, self._w1, None, cfg.glu,
                                self.w_down, self.b_gate, self.b_up, self.b_down, self._code,
                                self._limit, self._alpha, ys))
        sh = None
        if self._s1 is not None and T:
            sh = np.empty((T, H), dtype=dt)
            jobs.append(cpu.Job(x2, None, 1, np.array([0, T], np.int64), self._s1[None], None,
                                True, self.shared_down_proj[None], None, None, None, 0,
                                math.inf, 1.0, sh))
        cpu.run_jobs(jobs)
        y = unpermute(ys, plan, routing.weights)
        if sh is not None:
            gate = None
            if self.shared_gate_weight is not None:
                gate = cpu.matmul(x2, self.shared_gate_weight[:, None])[:, 0]
            cpu.add_shared(y, sh, gate)
        return y

    # -------------------------------------------------------------- device
    def _forward_device(self, x, return_info):
        if not self._device:
            raise TypeError("x is a device array but this layer's weights are on the host; "
                            "use layer.to_device()")
        if not _on_device(x):
            raise TypeError("x is a host array but this layer's weights are on the GPU; "
                            "pass a device array (numba.cuda.to_device(x))")
        from numba import cuda

        cfg = self.config
        H, E = cfg.hidden_dim, cfg.num_experts
        xd = x if hasattr(x, "copy_to_host") else cuda.as_cuda_array(x)
        shape = tuple(xd.shape)
        if not shape or shape[-1] != H:
            raise ValueError(f"x must have last dim hidden_dim = {H}, got shape {shape}")
        if np.dtype(xd.dtype) != self.dtype:
            raise TypeError(f"x has dtype {xd.dtype} but the layer is {self.dtype}")
        lead = shape[:-1]
        T = int(np.prod(lead)) if lead else 1
        x2 = xd.reshape(T, H)
        gemm = cuda_module("gemm")
        logits = gemm.matmul(x2, self.router)
        if self.router_bias is not None:
            _dev_add_row(logits, self.router_bias)
        routing, plan = self._route(logits)
        xs = permute(x2, plan)
        ys = expert_ffn(xs, plan.offsets, self.w_gate, self.w_up, self.w_down,
                        activation=cfg.activation, b_gate=self.b_gate, b_up=self.b_up,
                        b_down=self.b_down, limit=cfg.limit, alpha=cfg.alpha)
        y = unpermute(ys, plan, routing.weights)
        if self._dev.get("shared") is not None:
            sg, su, sd = self._dev["shared"]
            offs = cuda.to_device(np.array([0, T], np.int64))
            sh = expert_ffn(x2, offs, sg, su, sd, activation="silu")
            gate = None
            if self.shared_gate_weight is not None:
                gate = gemm.matmul(x2, self.shared_gate_weight.reshape(H, 1))
            _dev_add_shared(y, sh, gate)
        y = y.reshape(lead + (H,))
        if not return_info:
            return y
        return y, _info(logits, routing, plan, cfg)


def _info(logits, routing, plan, cfg):
    """The ``info`` dict of :meth:`MoELayer.forward`."""
    T = logits.shape[0]
    if T:
        aux = load_balancing_loss(router_probs(logits, cfg.score), routing.experts)
        z = router_z_loss(logits)
    else:
        aux = z = 0.0
    stats = routing_stats(routing.experts, cfg.num_experts, weights=routing.weights, plan=plan)
    return dict(logits=logits, routing=routing, plan=plan, aux_loss=aux, z_loss=z, stats=stats)


# ------------------------------------------------------- tiny device helpers
_DEV_KERNELS = {}
cuda = None            # numba.cuda, imported on first device use (a module global, so
                       # that the CUDA simulator can swap it inside the kernels)


def _dev_kernels():
    """Two elementwise CUDA kernels the device forward needs (compiled on first use)."""
    global cuda
    if not _DEV_KERNELS:
        from numba import cuda as _cuda

        cuda = _cuda

        @cuda.jit
        def add_row(a, b):                  # a[t, e] += b[e]
            i = cuda.grid(1)
            n = a.shape[0] * a.shape[1]
            while i < n:
                t, e = i // a.shape[1], i % a.shape[1]
                a[t, e] += b[e]
                i += cuda.gridsize(1)

        @cuda.jit
        def add_shared(y, sh, gate, gated):  # y[t] += sigmoid(gate[t]) * sh[t]  (or sh[t])
            i = cuda.grid(1)
            n = y.shape[0] * y.shape[1]
            while i < n:
                t, j = i // y.shape[1], i % y.shape[1]
                g = 1.0
                if gated:
                    g = 1.0 / (1.0 + math.exp(-gate[t, 0]))
                y[t, j] += g * sh[t, j]
                i += cuda.gridsize(1)

        _DEV_KERNELS.update(add_row=add_row, add_shared=add_shared)
    return _DEV_KERNELS


def _launch(kernel, n, *args):
    if n:
        blocks = min(1024, (n + 255) // 256)
        kernel[blocks, 256](*args)


def _dev_add_row(a, b):
    _launch(_dev_kernels()["add_row"], a.shape[0] * a.shape[1], a, b)


def _dev_add_shared(y, sh, gate):
    gated = gate is not None
    g = gate if gated else sh
    _launch(_dev_kernels()["add_shared"], y.shape[0] * y.shape[1], y, sh, g, gated)


# ------------------------------------------------------- functional forms
def moe(x, layer_or_weights, config=None):
    """Functional MoE layer: ``y = layer(x)``.

    Parameters
    ----------
    x : (..., H) float array
    layer_or_weights : MoELayer or mapping
        A layer, or the keyword arguments of :class:`MoELayer` (``router``,
        ``w_gate``, ``w_up``, ``w_down``, ...). A mapping builds a layer on
        every call (fusing gate and up costs a copy): build a
        :class:`MoELayer` once for repeated calls.
    config : MoEConfig
        Required with a mapping; with a layer it must equal ``layer.config``
        when given.

    Returns
    -------
    y : (..., H) array

    Examples
    --------
    >>> import numpy as np, numoe
    >>> cfg = numoe.MoEConfig.olmoe(num_experts=4, top_k=2, hidden_dim=8, expert_dim=4)
    >>> layer = numoe.MoELayer.random(cfg)
    >>> x = np.ones((2, 8), np.float32)
    >>> bool(np.array_equal(numoe.moe(x, layer), layer(x)))
    True
    """
    if isinstance(layer_or_weights, MoELayer):
        if config is not None and config != layer_or_weights.config:
            raise ValueError("config differs from layer_or_weights.config")
        return layer_or_weights(x)
    if not isinstance(layer_or_weights, Mapping):
        raise TypeError("layer_or_weights must be a MoELayer or a mapping of its weights, "
                        f"got {type(layer_or_weights).__name__}")
    if config is None:
        raise TypeError("config is required when layer_or_weights is a mapping of weights")
    return MoELayer(config, **layer_or_weights)(x)


def moe_gating_forward(x, gate_weights, config):
    """Router of the seed API: logits, top-k routing and the load-balancing loss.

    Parameters
    ----------
    x : (..., H) float array
    gate_weights : (H, E) float array
        Router weights.
    config : MoEConfig
        ``top_k``, ``score``, ``renormalize``, groups and ``scale`` apply.

    Returns
    -------
    expert_weights : (T, k) float array, dtype of ``x``
    expert_indices : (T, k) int32 array
    load_loss : float
        :func:`numoe.load_balancing_loss` of the router scores (1.0 at
        perfect balance).

    Examples
    --------
    >>> import numpy as np, numoe
    >>> cfg = numoe.MoEConfig(num_experts=4, top_k=2, hidden_dim=3, expert_dim=5)
    >>> w, idx, loss = numoe.moe_gating_forward(np.eye(3), np.arange(12.0).reshape(3, 4), cfg)
    >>> idx.tolist()
    [[3, 2], [3, 2], [3, 2]]
    """
    cfg = _check_config(config)
    E, H = cfg.num_experts, cfg.hidden_dim
    if backend_of(x=x, gate_weights=gate_weights) == "cuda":
        gemm = cuda_module("gemm")
        lead_shape = tuple(x.shape[:-1])
        T = int(np.prod(lead_shape)) if lead_shape else 1
        logits = gemm.matmul(x.reshape(T, x.shape[-1]), gate_weights)
    else:
        from ._cpu import experts as cpu

        x2, _ = V.tokens_2d("x", x)
        if x2.shape[1] != H:
            raise ValueError(f"x must have last dim hidden_dim = {H}, got shape {np.shape(x)}")
        gw = _as("gate_weights", gate_weights, x2.dtype, (H, E))
        V.check_finite("x", x2)
        logits = cpu.matmul(x2, gw)
    r = route(logits, cfg.top_k, score=cfg.score, renormalize=cfg.renormalize,
              n_groups=cfg.n_groups, topk_groups=cfg.topk_groups,
              group_score=cfg.group_score, scale=cfg.scale)
    loss = load_balancing_loss(router_probs(logits, cfg.score), r.experts) \
        if logits.shape[0] else 0.0
    return r.weights, r.experts, loss


def _expert_params(expert_params, cfg):
    """Normalise the ``expert_params`` of :func:`moe_expert_computation` to a dict."""
    if isinstance(expert_params, MoELayer):
        return expert_params
    if isinstance(expert_params, Mapping):
        p = dict(expert_params)
    elif isinstance(expert_params, Sequence) and not isinstance(expert_params, str):
        items = list(expert_params)
        if len(items) == cfg.num_experts and items and isinstance(items[0], (tuple, list)):
            items = [np.stack(parts) for parts in zip(*items)]   # per-expert tuples
        if cfg.glu and len(items) == 3:
            p = dict(w_gate=items[0], w_up=items[1], w_down=items[2])
        elif not cfg.glu and len(items) == 2:
            p = dict(w_gate=items[0], w_down=items[1])
        else:
            raise ValueError("expert_params must be (w_gate, w_up, w_down) for GLU experts or "
                             "(w_in, w_out) for plain experts, stacked [E, ...] or one tuple "
                             f"per expert; got {len(items)} items")
    else:
        raise TypeError("expert_params must be a MoELayer, a mapping of weights or a "
                        f"sequence of arrays, got {type(expert_params).__name__}")
    unknown = set(p) - {"w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down",
                        "shared_gate_proj", "shared_up_proj", "shared_down_proj",
                        "shared_gate_weight"}
    if unknown:
        raise ValueError(f"expert_params has unknown keys: {sorted(unknown)}")
    for name in ("w_gate", "w_down"):
        if p.get(name) is None:
            raise ValueError(f"expert_params needs {name}")
    return p


def moe_expert_computation(x, expert_weights, expert_indices, expert_params, config):
    """Experts and combine of the seed API, for a given routing.

    Parameters
    ----------
    x : (..., H) float array
    expert_weights : (T, k) float array
    expert_indices : (T, k) int array
        A routing, e.g. from :func:`moe_gating_forward`.
    expert_params : MoELayer, mapping or sequence
        A layer; or ``{"w_gate", "w_up", "w_down"}`` (+ optional biases and
        ``shared_*`` weights, names as in :class:`MoELayer`); or the arrays
        ``(w_gate, w_up, w_down)`` (``(w_in, w_out)`` for plain experts),
        stacked ``[E, ...]`` or one tuple per expert.
    config : MoEConfig
        ``activation``, capacity, drop policy, ``limit``/``alpha`` apply.

    Returns
    -------
    y : (..., H) array, dtype of ``x``
        ``sum_j expert_weights[t, j] * FFN_{expert_indices[t, j]}(x[t])`` over
        the kept assignments (+ the shared experts).

    Examples
    --------
    >>> import numpy as np, numoe
    >>> cfg = numoe.MoEConfig(num_experts=2, top_k=1, hidden_dim=2, expert_dim=2,
    ...                       glu=False, activation="relu")
    >>> eye = np.stack([np.eye(2), 2 * np.eye(2)])
    >>> y = numoe.moe_expert_computation(np.array([[1.0, 2.0]]), np.array([[0.5]]),
    ...                                  np.array([[1]]), (eye, eye), cfg)
    >>> y.tolist()
    [[2.0, 4.0]]
    """
    cfg = _check_config(config)
    p = _expert_params(expert_params, cfg)
    if isinstance(p, MoELayer):
        if p.config.num_experts != cfg.num_experts or p.config.hidden_dim != cfg.hidden_dim:
            raise ValueError("expert_params (a MoELayer) does not match config's sizes")
        layer = p
        p = {name: getattr(layer, name) for name in (
            "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down") + _SHARED_NAMES}
        if not layer._device and not is_device(x):
            x2, lead = layer._host_tokens(x)
            routing = Routing(expert_weights, expert_indices)
            T = x2.shape[0]
            cap = None if cfg.capacity_factor is None else _capacity(
                T, cfg.num_experts, cfg.top_k, cfg.capacity_factor)
            plan = dispatch_plan(expert_indices, cfg.num_experts, capacity=cap,
                                 weights=expert_weights, drop_policy=cfg.drop_policy)
            y = layer._experts(x2, routing, plan)
            return y.reshape(lead + (y.shape[-1],))
    device = backend_of(x=x, expert_weights=expert_weights, expert_indices=expert_indices,
                        **{k: v for k, v in p.items() if v is not None}) == "cuda"
    if device:
        lead = tuple(x.shape[:-1])
        T = int(np.prod(lead)) if lead else 1
        x2 = x.reshape(T, x.shape[-1])
    else:
        x2, lead = V.tokens_2d("x", x)
        T = x2.shape[0]
    cap = None if cfg.capacity_factor is None else _capacity(
        T, cfg.num_experts, cfg.top_k, cfg.capacity_factor)
    plan = dispatch_plan(expert_indices, cfg.num_experts, capacity=cap, weights=expert_weights,
                         drop_policy=cfg.drop_policy)
    if isinstance(plan, DispatchPlan) and plan.dropped.shape[0] != T:
        raise ValueError(f"expert_indices must have T = {T} rows (tokens of x), "
                         f"got {plan.dropped.shape[0]}")
    xs = permute(x2, plan)
    ys = expert_ffn(xs, plan.offsets, p["w_gate"], p.get("w_up"), p["w_down"],
                    activation=cfg.activation, b_gate=p.get("b_gate"), b_up=p.get("b_up"),
                    b_down=p.get("b_down"), limit=cfg.limit, alpha=cfg.alpha)
    y = unpermute(ys, plan, expert_weights)
    if p.get("shared_down_proj") is not None:
        sg, su, sd = (p["shared_gate_proj"], p["shared_up_proj"], p["shared_down_proj"])
        if device:
            from numba import cuda
            offs = cuda.to_device(np.array([0, T], np.int64))
            sh = expert_ffn(x2, offs, sg.reshape((1,) + sg.shape), su.reshape((1,) + su.shape),
                            sd.reshape((1,) + sd.shape))
            gw = p.get("shared_gate_weight")
            gate = None if gw is None else cuda_module("gemm").matmul(x2, gw.reshape(-1, 1))
            _dev_add_shared(y, sh, gate)
        else:
            from ._cpu import experts as cpu
            sh = expert_ffn(x2, [0, T], np.asarray(sg)[None], np.asarray(su)[None],
                            np.asarray(sd)[None])
            gw = p.get("shared_gate_weight")
            gate = None if gw is None else cpu.matmul(
                x2, _as("shared_gate_weight", gw, x2.dtype, (x2.shape[1],))[:, None])[:, 0]
            cpu.add_shared(y, sh, gate)
    return y.reshape(lead + (y.shape[-1],))
