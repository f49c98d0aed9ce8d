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

from . import _dtypes as D, _validate as V
from ._backend import backend_of, cuda_module, is_device
from .quant import QuantizedArray, quantize
from ._types import DispatchPlan, Routing
from .config import MoEConfig
from .dispatch import capacity as _capacity, dispatch_plan, permute, unpermute
from .experts import _check_expert_options, expert_ffn
from .losses import load_balancing_loss, router_z_loss, routing_stats
from .routing import route, router_probs

__all__ = ["MoELayer", "moe", "moe_gating_forward", "moe_expert_computation"]

_SHARED_NAMES = ("shared_gate_proj", "shared_up_proj", "shared_down_proj", "shared_gate_weight")
_PARAM_NAMES = ("router", "router_bias", "w_gate", "w_up", "w_down", "b_gate", "b_up",
                "b_down") + _SHARED_NAMES       # trained by MoELayer.backward


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


def _as_q(name, a, shape):
    """An int8 expert weight: a QuantizedArray along the input axis (checked), or a
    float array quantized here (once)."""
    if not isinstance(a, QuantizedArray):
        return quantize(V.shape(name, V.float_array(name, a), shape), axis=-2)
    V.shape(name, a, shape)
    if a.axis != len(shape) - 2:
        raise ValueError(f"{name} must be quantized along its input axis (axis=-2), "
                         f"got axis {a.axis}")
    return QuantizedArray(np.ascontiguousarray(a.values), np.ascontiguousarray(a.scales),
                          a.axis)


def _fuse_q(name_g, wg, name_u, wu, shape):
    """int8 gate and up fused as one ``[..., 2F]`` QuantizedArray (per-column scales
    concatenated: the same as quantizing the fused matrix)."""
    g, u = _as_q(name_g, wg, shape), _as_q(name_u, wu, shape)
    return QuantizedArray(np.concatenate([g.values, u.values], -1),
                          np.concatenate([g.scales, u.scales], -1), g.axis)


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
        Router weights.
    w_gate, w_up : (E, H, F) float array or QuantizedArray
        Gate and up projections (``w_up=None`` when ``config.glu`` is
        False: plain experts ``act(x @ w_gate) @ w_down``). They are stored
        fused as one ``(E, H, 2F)`` array (one copy, none when they already
        are the two halves of such an array); the attributes ``w_gate`` /
        ``w_up`` are views of it. ``w_gate``'s dtype is the layer's
        ``weight_dtype`` (float16, bfloat16, float32, float64, or int8 for a
        :class:`numoe.QuantizedArray` from :func:`numoe.quantize`).
    w_down : (E, F, H) float array or QuantizedArray
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
    batch_invariant : bool
        Every token's output bit-identical whatever else is in the batch
        (opt-in; costs speed at prefill): the router product, every expert
        block, the shared MLP and its gate run through the row-independent
        streaming kernel instead of BLAS. Capacity drops
        (``config.capacity_factor``) depend on the batch by definition: the
        guarantee is for dropless configs, on the CPU (a device layer from
        :meth:`to_device` does not promise it yet).
    dtype : float dtype, optional
        The activation dtype (of ``x`` and ``y``): float16, bfloat16,
        float32 or float64. Default: ``w_gate``'s dtype (float32 for int8
        weights).

    Notes
    -----
    ``layer(x)`` and ``layer.forward(x)`` take ``x [..., H]`` of the layer's
    ``dtype`` (any byte order) and return ``y`` of the same shape and dtype.
    Results are deterministic: bit-identical for any number of threads
    (``numba.set_num_threads``).

    Precision and storage. ``layer.dtype`` is the activation dtype,
    ``layer.weight_dtype`` the storage of the expert weights; 16-bit
    activations and weights compute with float32 accumulation (x is widened
    once per call, y rounded once at the end; ``info["logits"]`` stays
    float32). Which arrays follow ``weight_dtype``:

    * a float ``weight_dtype`` (as Hugging Face bf16 checkpoints): every
      array the layer holds -- router, router bias, expert weights and
      biases, shared MLP and its gate -- except ``selection_bias`` (balancing
      state, kept in the activations' compute dtype);
    * ``int8``: the expert weights ``w_gate``/``w_up``/``w_down`` only
      (per-output-column scales); every other array is stored in ``dtype``.

    Weights wider than the activations' compute dtype (float64 weights,
    float32 ``x``) are cast to ``dtype`` once at construction. The kernels
    read the stored bytes: a bfloat16 layer holds half the bytes of a
    float32 one, with no float32 copy of the experts anywhere.

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
                 shared_gate_weight=None, batch_invariant=False, dtype=None):
        cfg = _check_config(config)
        E, H, F = cfg.num_experts, cfg.hidden_dim, cfg.expert_dim
        # the weight storage is w_gate's; asarray keeps views (no copy before fusing)
        quant = isinstance(w_gate, QuantizedArray)
        wg = w_gate if quant or isinstance(w_gate, np.ndarray) else \
            V.float_array("w_gate", w_gate)
        if not quant and D.native(wg.dtype) not in D.FLOATS:
            V.float_array("w_gate", wg)             # raises the TypeError
        wdt = np.dtype(np.int8) if quant else D.native(wg.dtype)
        if dtype is not None:
            dt = D.as_float_dtype("dtype", dtype)
        else:
            dt = D.FLOAT32 if quant else wdt
        if not quant and D.compute_dtype(wdt).itemsize > D.compute_dtype(dt).itemsize:
            wdt = dt                  # weights wider than the activations: cast once, here
        sdt = dt if quant else wdt    # the other arrays (router, biases, shared MLP)
        V.flag("batch_invariant", batch_invariant)
        self.config = cfg
        self.dtype = dt
        self.weight_dtype = wdt
        self.batch_invariant = bool(batch_invariant)
        self._device = False
        self.router = _as("router", router, sdt, (H, E))
        if cfg.glu:
            if w_up is None:
                raise ValueError("w_up is None but config.glu is True (GLU experts need w_up)")
            self._w1 = _fuse_q("w_gate", wg, "w_up", w_up, (E, H, F)) if quant else \
                _fuse("w_gate", wg, "w_up", w_up, wdt, (E, H, F))
        else:
            if w_up is not None:
                raise ValueError("w_up was given but config.glu is False (plain FFN experts)")
            self._w1 = _as_q("w_gate", wg, (E, H, F)) if quant else \
                _as("w_gate", wg, wdt, (E, H, F))
        self.w_down = _as_q("w_down", w_down, (E, F, H)) if quant else \
            _as("w_down", w_down, wdt, (E, F, H))
        dt = sdt
        self.router_bias = self._optional("router_bias", router_bias, cfg.router_bias, dt, (E,))
        self.selection_bias = self._optional("selection_bias", selection_bias,
                                             cfg.selection_bias, D.compute_dtype(self.dtype),
                                             (E,))
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
        for name, a in kw.items():              # int8: the dequantized weights, float64
            if isinstance(a, QuantizedArray):
                kw[name] = a.dequantize(np.float64)
        kw.update(score=cfg.score, renormalize=cfg.renormalize, n_groups=cfg.n_groups,
                  topk_groups=cfg.topk_groups, group_score=cfg.group_score, scale=cfg.scale,
                  activation=cfg.activation, capacity_factor=cfg.capacity_factor,
                  drop_policy=cfg.drop_policy, limit=cfg.limit, alpha=cfg.alpha)
        return kw

    def __repr__(self):
        where = "cuda" if self._device else "cpu"
        extra = "" if self.weight_dtype == self.dtype else \
            f", weight_dtype={np.dtype(self.weight_dtype).name}"
        extra += ", batch_invariant=True" if self.batch_invariant else ""
        return (f"MoELayer({self.config!r}, dtype={np.dtype(self.dtype).name}{extra}, "
                f"device={where!r})")

    @property
    def nbytes(self):
        """Bytes of every array the layer holds (host layers)."""
        arrays = [self._w1, self.w_down, self._s1] + [getattr(self, n) for n in (
            "router", "router_bias", "selection_bias", "b_gate", "b_up", "b_down",
            "shared_down_proj", "shared_gate_weight")]
        return int(sum(a.nbytes for a in arrays if a is not None))

    def astype(self, dtype=None, weight_dtype=None):
        """A copy of the layer with other activation and/or weight dtypes.

        Parameters
        ----------
        dtype : float dtype, optional
            The new activation dtype (float16, bfloat16, float32, float64);
            default: unchanged.
        weight_dtype : float dtype or "int8", optional
            The new storage (see the class Notes for which arrays follow it);
            ``"int8"`` quantizes the expert weights (:func:`numoe.quantize`,
            one scale per expert and output column). Default: unchanged.

        Returns
        -------
        MoELayer
            A new host layer (arrays converted once; unchanged arrays shared).

        Examples
        --------
        >>> import numpy as np, numoe
        >>> cfg = numoe.MoEConfig.olmoe(num_experts=4, top_k=2, hidden_dim=8, expert_dim=4)
        >>> layer = numoe.MoELayer.random(cfg)
        >>> half = layer.astype(weight_dtype="bfloat16")
        >>> half.dtype, half.weight_dtype, half.nbytes * 2 == layer.nbytes
        (dtype('float32'), dtype(bfloat16), True)
        """
        if self._device:
            raise TypeError("astype works on host layers; call it before to_device()")
        dt = self.dtype if dtype is None else D.as_float_dtype("dtype", dtype)
        if weight_dtype is None:
            wdt = self.weight_dtype
        elif isinstance(weight_dtype, str) and weight_dtype == "int8" or \
                (not isinstance(weight_dtype, str) and np.dtype(weight_dtype) == np.int8):
            wdt = np.dtype(np.int8)
        else:
            wdt = D.as_float_dtype("weight_dtype", weight_dtype)
        quant = wdt == np.int8
        if not quant and D.compute_dtype(wdt).itemsize > D.compute_dtype(dt).itemsize:
            wdt = dt
        sdt = dt if quant else wdt
        cfg = self.config
        F = cfg.expert_dim

        def conv(a, to):
            if a is None:
                return None
            if isinstance(a, QuantizedArray):
                return a.dequantize(D.compute_dtype(to)).astype(to, copy=False)
            return a if a.dtype == to else a.astype(to)

        if quant:
            w1 = self._w1 if isinstance(self._w1, QuantizedArray) else \
                quantize(self._w1, axis=-2)
            w_down = self.w_down if isinstance(self.w_down, QuantizedArray) else \
                quantize(self.w_down, axis=-2)
        else:
            w1, w_down = conv(self._w1, wdt), conv(self.w_down, wdt)
        kw = dict(router=conv(self.router, sdt), w_down=w_down,
                  selection_bias=conv(self.selection_bias, D.compute_dtype(dt)))
        if cfg.glu:
            kw.update(w_gate=w1[..., :F], w_up=w1[..., F:])
        else:
            kw["w_gate"] = w1
        for name in ("router_bias", "b_gate", "b_up", "b_down", "shared_down_proj",
                     "shared_gate_weight"):
            kw[name] = conv(getattr(self, name), sdt)
        if self._s1 is not None:
            s1 = conv(self._s1, sdt)
            S = cfg.shared_expert_dim
            kw.update(shared_gate_proj=s1[:, :S], shared_up_proj=s1[:, S:])
        return type(self)(cfg, batch_invariant=self.batch_invariant, dtype=dt, **kw)

    # ------------------------------------------------------------ creation
    @classmethod
    def random(cls, config, seed=0, dtype=np.float32, weight_dtype=None,
               batch_invariant=False):
        """A layer with random weights (deterministic in ``seed``).

        Weights are normal with standard deviation ``1/sqrt(fan_in)`` (so
        activations stay of order one), biases normal with deviation 0.1,
        the selection bias zero. Generated in place in the fused layout, one
        expert at a time: no temporary copies of the expert weights. Drawn
        in float32 (float64 for float64 storage) and rounded to the storage
        dtype, so ``random(cfg, s, weight_dtype="bfloat16")`` holds exactly
        ``random(cfg, s).astype(weight_dtype="bfloat16")``'s weights.

        Parameters
        ----------
        config : MoEConfig
        seed : int
        dtype : float16, bfloat16, float32 or float64
            The activation dtype.
        weight_dtype : float dtype or "int8", optional
            Storage of the weights (see :class:`MoELayer`); default ``dtype``.
        batch_invariant : bool
            See :class:`MoELayer`.
        """
        cfg = _check_config(config)
        dt = D.as_float_dtype("dtype", dtype)
        quant = weight_dtype is not None and (
            weight_dtype == "int8" if isinstance(weight_dtype, str)
            else np.dtype(weight_dtype) == np.int8)
        if weight_dtype is None or quant:
            wdt = dt
        else:
            wdt = D.as_float_dtype("weight_dtype", weight_dtype)
        if D.compute_dtype(wdt).itemsize > D.compute_dtype(dt).itemsize:
            wdt = dt
        gen = D.FLOAT64 if wdt == D.FLOAT64 else D.FLOAT32
        if quant:
            wdt = gen                 # drawn as floats, quantized at the end
        seed = V.integer("seed", seed, lo=0)
        rng = np.random.default_rng(seed)
        E, H, F, k = cfg.num_experts, cfg.hidden_dim, cfg.expert_dim, cfg.top_k

        def normal(shape, std):
            a = np.empty(shape, dtype=wdt)
            parts = a if a.ndim == 3 else [a]          # one expert at a time
            tmp = None if wdt == gen else np.empty(parts[0].shape, dtype=gen)
            for part in parts:
                buf = part if tmp is None else tmp
                rng.standard_normal(out=buf, dtype=gen)
                buf *= gen.type(std)
                if tmp is not None:
                    part[...] = tmp
            return a

        router = normal((H, E), 1.0 / math.sqrt(H))
        w1 = normal((E, H, 2 * F if cfg.glu else F), 1.0 / math.sqrt(H))
        w_down = normal((E, F, H), 1.0 / math.sqrt(F))
        kw = {}
        if cfg.router_bias:
            kw["router_bias"] = normal((E,), 0.1)
        if cfg.selection_bias:
            kw["selection_bias"] = np.zeros(E, dtype=D.compute_dtype(dt))
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
            kw.update(w_gate=w1[..., :F], w_up=w1[..., F:])
        else:
            kw["w_gate"] = w1
        layer = cls(cfg, router=router, w_down=w_down, batch_invariant=batch_invariant, dtype=dt,
                    **kw)
        return layer.astype(weight_dtype="int8") if quant else layer

    # ---------------------------------------------- loading (numoe/loading.py)
    @classmethod
    def from_hf(cls, block, **options):
        """The layer equal to a Hugging Face transformers MoE block (Mixtral,
        Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, gpt-oss, Switch): config
        inferred, weights copied, dtype kept. Keywords (``dtype``,
        ``weight_dtype``, ``batch_invariant``, MoEConfig fields): see
        :func:`numoe.loading.from_hf`."""
        from . import loading

        return loading.from_hf(block, layer_cls=cls, **options)

    @classmethod
    def from_state_dict(cls, state_dict, config, *, prefix="", family=None, **options):
        """The layer from arrays (NumPy or torch) keyed as in the family's HF
        checkpoints. See :func:`numoe.loading.from_state_dict`."""
        from . import loading

        return loading.from_state_dict(state_dict, config, prefix=prefix, family=family,
                                       layer_cls=cls, **options)

    @classmethod
    def from_safetensors(cls, path, layer_index, *, config=None, **options):
        """MoE layer ``layer_index`` of a (possibly sharded) safetensors checkpoint
        directory, read with NumPy only (no torch, no transformers). See
        :func:`numoe.loading.from_safetensors`."""
        from . import loading

        return loading.from_safetensors(path, layer_index, config=config, layer_cls=cls,
                                        **options)

    def to_device(self):
        """A copy of this layer with every weight on the GPU (``numba.cuda.to_device``).

        Calls with device ``x`` (numba, CuPy or PyTorch CUDA arrays) then run
        on the GPU through the public ops; this layer stays on the host.
        """
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._device = True
        new._w1 = new._s1 = None
        to_dev = cuda_module("_arrays").to_device       # bfloat16 weights included
        put = lambda a: None if a is None else to_dev(np.ascontiguousarray(a))  # noqa
        dev = {name: put(getattr(self, name)) for name in (
            "w_gate", "w_up", "shared_gate_proj", "shared_up_proj")}
        new._dev = dev
        for name in ("router", "w_down", "router_bias", "selection_bias", "b_gate", "b_up",
                     "b_down", "shared_down_proj", "shared_gate_weight"):
            setattr(new, name, put(getattr(self, name)))
        if self._s1 is not None:     # the shared MLP as a one-expert expert_ffn: views
            one = lambda a: cuda_module("_arrays").reshape(a, (1,) + tuple(a.shape))  # noqa
            dev["shared"] = (one(dev["shared_gate_proj"]), one(dev["shared_up_proj"]),
                             one(new.shared_down_proj))
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
            scores, sigmoid scores normalised per token: 1.0 = balanced),
            ``z_loss`` (:func:`numoe.router_z_loss`) and ``stats``
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
        if isinstance(x, (list, tuple)):     # no dtype of its own: read in the layer's
            x = V.float_array("x", V.sequence_as("x", x, self.dtype))
        x2, lead = V.tokens_2d("x", x, min_ndim=1)      # 1-D: one token
        H = self.config.hidden_dim
        if x2.shape[1] != H:
            raise ValueError(f"x must have last dim hidden_dim = {H}, got shape {np.shape(x)}")
        if x2.dtype != self.dtype:
            raise TypeError(f"x has dtype {x2.dtype} but the layer is "
                            f"{np.dtype(self.dtype).name}; cast x (or build the layer "
                            "in that dtype)")
        V.check_finite("x", x2)
        return x2, lead

    def _compute_x(self, x2):
        """``x2`` in the compute dtype (16-bit activations widened to float32)."""
        from ._cpu import experts as cpu

        cd = D.compute_dtype(x2.dtype)
        return x2 if x2.dtype == cd else cpu.widen_weight(x2, cd)

    def _logits(self, x2):
        """Router logits ``[T, E]`` in the compute dtype (float32 for 16-bit layers)."""
        from ._cpu import experts as cpu

        logits = cpu.linear(self._compute_x(x2), self.router, rowwise=self.batch_invariant)
        if self.router_bias is not None:
            logits += self.router_bias.astype(logits.dtype, copy=False)
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

    def _routed_job(self, src, order, k, offsets, out, experts=slice(None)):
        """The :class:`numoe._cpu.experts.Job` of the routed ``experts`` (a slice): rows
        ``src`` (gathered through ``order`` unless None) grouped by ``offsets``."""
        from ._cpu import experts as cpu

        def pick(a):
            return None if a is None else a[experts]
        return cpu.Job(src, order, k, offsets, self._w1[experts], None, self.config.glu,
                       self.w_down[experts], pick(self.b_gate), pick(self.b_up),
                       pick(self.b_down), self._code, self._limit, self._alpha, out,
                       stream_all=self.batch_invariant, bf16_inputs=self.dtype == D.BFLOAT16)

    def _shared_job(self, xc, out):
        """The :class:`numoe._cpu.experts.Job` of the shared SwiGLU MLP on rows ``xc``."""
        from ._cpu import experts as cpu

        return cpu.Job(xc, None, 1, np.array([0, xc.shape[0]], np.int64), self._s1[None],
                       None, True, self.shared_down_proj[None], None, None, None, 0, math.inf,
                       1.0, out, stream_all=self.batch_invariant,
                       bf16_inputs=self.dtype == D.BFLOAT16)

    def _experts(self, x2, routing, plan):
        """Routed experts (rows gathered through the plan), combine, shared MLP."""
        from ._cpu import experts as cpu

        cfg = self.config
        T, H = x2.shape
        k = cfg.top_k
        xc = self._compute_x(x2)
        dt = xc.dtype
        inv = self.batch_invariant
        ys = np.empty((plan.order.shape[0], H), dtype=dt)
        jobs = []
        if ys.shape[0]:
            jobs.append(self._routed_job(xc, plan.order, k, plan.offsets, ys))
        sh = None
        if self._s1 is not None and T:
            sh = np.empty((T, H), dtype=dt)
            jobs.append(self._shared_job(xc, sh))
        cpu.run_jobs(jobs)
        y = unpermute(ys, plan, routing.weights)
        if sh is not None:
            gate = None
            if self.shared_gate_weight is not None:
                gate = cpu.linear(xc, self.shared_gate_weight[:, None], rowwise=inv)[:, 0]
            cpu.add_shared(y, sh, gate)
        return y if y.dtype == self.dtype else y.astype(self.dtype)

    # ------------------------------------------------------------ training
    def parameters(self):
        """The live arrays the layer computes with, by constructor name.

        Returns
        -------
        dict
            ``router``, ``w_gate``, ``w_up``, ``w_down`` and whichever of
            ``router_bias``, ``b_gate``, ``b_up``, ``b_down``,
            ``shared_gate_proj``, ``shared_up_proj``, ``shared_down_proj``,
            ``shared_gate_weight`` the layer holds (``selection_bias`` is not
            trained by gradients: see :func:`numoe.update_bias`). ``w_gate``
            / ``w_up`` (and the shared gate/up) are views of the fused
            weights: updating any entry in place (``p -= lr * g``) changes
            the next forward. A device layer returns its device arrays, which
            its forward reads (in-place updates with CuPy, PyTorch or numba
            kernels change the next forward, CUDA graphs included).
        """
        return {n: getattr(self, n) for n in _PARAM_NAMES if getattr(self, n) is not None}

    def backward(self, x, info, d_y, *, aux_loss_coef=0.0, z_loss_coef=0.0, out=None):
        """Gradients of ``L = sum(y * d_y) + aux_loss_coef * info["aux_loss"]
        + z_loss_coef * info["z_loss"]``.

        Parameters
        ----------
        x : (..., H) float array
            The input given to :meth:`forward`.
        info : dict
            From ``layer.forward(x, return_info=True)`` (``logits``,
            ``routing``, ``plan`` are read: the routing is held fixed).
        d_y : (..., H) float array
            Gradient of the loss with respect to ``y``.
        aux_loss_coef, z_loss_coef : float
            Coefficients of the load-balancing loss and the router z-loss.
        out : dict, optional
            The dict returned by an earlier ``backward`` of this layer (same
            keys, every array of the shape and dtype it had there; any
            writeable NumPy arrays of those shapes and dtypes will do,
            sharing no memory with ``x``, ``d_y``, ``info`` or the
            parameters). The gradients are written into its arrays
            (overwritten, not accumulated) and ``out`` itself is returned:
            a training loop reuses its gradient buffers instead of
            allocating (and first touching) weight-sized arrays every step.
            Results are bit-identical to ``out=None``. A device layer takes
            device arrays and copies its results into them.

        Returns
        -------
        dict
            ``"x"``: ``d_x`` (shape of ``x``), and one gradient per entry of
            :meth:`parameters`, same names, shapes and dtypes (float32 for
            int8 weights). ``w_gate`` / ``w_up`` (and the shared gate / up)
            are the two halves of one fused buffer where the dtype allows.
            With ``out``: ``out``, its arrays filled.

        Notes
        -----
        Chains the backward ops (unpermute, expert FFN, permute, route,
        losses, router product), with the combine folded into the expert
        backward: the routing weight of a row scales its output gradient,
        and its own gradient is ``d_y . ys`` from the recomputed hidden
        layer. Selections (top-k, groups, selection bias, capacity drops)
        carry no gradient. Bit-identical for any thread count. With
        ``out``, gradients land directly in its arrays when they are
        C-contiguous in the compute dtype (``w_gate`` / ``w_up`` as the
        two halves of one ``[E, H, 2F]`` buffer, as ``backward`` returns
        them); other arrays (e.g. 16-bit weights' gradients) are computed
        in a scratch array and copied.

        Examples
        --------
        >>> import numpy as np, numoe
        >>> cfg = numoe.MoEConfig.mixtral(num_experts=4, top_k=2, hidden_dim=8, expert_dim=16)
        >>> layer = numoe.MoELayer.random(cfg, seed=0)
        >>> x = np.ones((3, 8), np.float32)
        >>> y, info = layer.forward(x, return_info=True)
        >>> g = layer.backward(x, info, np.ones_like(y), aux_loss_coef=0.01)
        >>> sorted(g) == sorted(["x", *layer.parameters()])
        True
        >>> y, info = layer.forward(2 * x, return_info=True)    # the next step
        >>> layer.backward(2 * x, info, np.ones_like(y), out=g) is g
        True
        """
        from ._cpu import experts as cpu
        from .dispatch import permute_backward
        from .losses import load_balancing_loss_backward, router_z_loss_backward
        from .routing import route_backward, router_probs_backward

        if self._device or _on_device(x):
            mb = cuda_module("moe_backward")
            grads = mb.backward(self, x, info, d_y, aux_loss_coef=aux_loss_coef,
                                z_loss_coef=z_loss_coef)
            if out is None:
                return grads
            return mb.write_into(out, grads, dict(x=x, d_y=d_y, **self.parameters()))
        cfg = self.config
        x_in = x
        x2, lead = self._host_tokens(x)
        T, H = x2.shape
        E, k, F = cfg.num_experts, cfg.top_k, cfg.expert_dim
        if not isinstance(info, Mapping) or not {"logits", "routing", "plan"} <= set(info):
            raise TypeError("info must be the dict from layer.forward(x, return_info=True)")
        logits, routing, plan = info["logits"], info["routing"], info["plan"]
        if np.shape(logits) != (T, E) or np.shape(plan.dropped) != (T, k):
            raise ValueError(f"info does not belong to this x: logits {np.shape(logits)}, "
                             f"expected {(T, E)}")
        aux_loss_coef = V.real("aux_loss_coef", aux_loss_coef)
        z_loss_coef = V.real("z_loss_coef", z_loss_coef)
        xdt = x2.dtype
        x2 = self._compute_x(x2)                 # 16-bit activations: float32
        cdt = x2.dtype
        dy = V.float_array("d_y", d_y, dtype=cdt)
        if dy.shape != np.shape(x):
            raise ValueError(f"d_y must have the shape of x {np.shape(x)}, got {dy.shape}")
        dy = dy.reshape(T, H)
        V.check_finite("d_y", dy)
        params = self.parameters()
        # each gradient in its parameter's float dtype (int8 weights: the compute dtype)
        spec = {"x": (lead + (H,), xdt)}
        spec.update((n, (tuple(p.shape), p.dtype if isinstance(p, np.ndarray) else cdt))
                    for n, p in params.items())
        if out is not None:
            _check_grad_out(out, spec, dict(
                x=x_in, d_y=d_y, logits=logits, routing_weights=routing.weights,
                selection_bias=self.selection_bias, **params))

        def wide(a):        # a weight in the compute dtype (a copy if stored narrower)
            if a is None or (isinstance(a, np.ndarray) and a.dtype == cdt):
                return a
            if isinstance(a, np.ndarray):
                return cpu.widen_weight(a, cdt)
            return np.ascontiguousarray(np.asarray(a), dtype=cdt)    # QuantizedArray

        # Where each gradient is computed: out=None, new arrays (the routed experts'
        # zero-filled: pages of experts without rows are never touched); else out's
        # own array when it is C-contiguous in the compute dtype, else a scratch array
        # copied at the end (the kernels then write the zeros of experts without rows).
        direct = set()

        def target(name, shape=None, fused=None, zero=False):
            shape = spec[name][0] if shape is None else shape
            if out is None:
                return np.zeros(shape, cdt) if zero else np.empty(shape, cdt)
            if fused is not None:                   # two halves of one [..., 2n] buffer
                a, b = out[name], out[fused]
                base = _fused_base(a, b) if a.dtype == cdt else None
                if base is not None and base.flags.writeable:
                    direct.update((name, fused))
                    return base
                return np.empty(shape, cdt)
            a = out[name]
            if a.dtype == cdt and a.flags.c_contiguous:
                direct.add(name)
                return a
            return np.empty(shape, cdt)

        def opt(name):
            return None if params.get(name) is None else target(name, zero=True)

        grads = {}

        # routed experts, the combine folded in (row scale = routing weight)
        order = np.asarray(plan.order)
        N = order.shape[0]
        # the [N, H] row intermediates in per-thread scratch kept between calls (as
        # run_backward's [N, 3F]): fresh pages cost more than the copies on some hosts
        xs = permute(x2, plan, out=cpu._scratch("bw_xs", (N, H), cdt))
        dys = permute(dy, plan, out=cpu._scratch("bw_dys", (N, H), cdt))
        rs = np.ascontiguousarray(np.asarray(routing.weights).reshape(-1)[order], dtype=cdt)
        w1 = wide(self._w1)
        d_w1 = target("w_gate", w1.shape, "w_up" if cfg.glu else None, zero=True)
        job = cpu.BackwardJob(xs, np.asarray(plan.offsets, np.int64), w1, None, cfg.glu,
                              wide(self.w_down), wide(self.b_gate), wide(self.b_up),
                              wide(self.b_down), self._code, self._limit, self._alpha, dys, rs,
                              cpu._scratch("bw_dxs", (N, H), cdt), d_w1, None,
                              target("w_down", zero=True),
                              opt("b_gate"), opt("b_up"), opt("b_down"),
                              np.empty(N), zeroed=out is None)
        cpu.run_backward(job)
        d_x = permute_backward(job.d_xs, plan)
        d_w = np.zeros(T * k)
        d_w[order] = job.d_scale
        grads.update(w_gate=d_w1[..., :F] if cfg.glu else d_w1, w_down=job.d_w_down,
                     b_gate=job.d_b_gate, b_up=job.d_b_up, b_down=job.d_b_down)
        if cfg.glu:
            grads["w_up"] = d_w1[..., F:]

        # router: routing weights, aux loss, z-loss, then the logits' product
        lg = np.asarray(logits)
        d_logits = np.asarray(route_backward(
            lg, routing, d_w.reshape(T, k).astype(lg.dtype), score=cfg.score,
            renormalize=cfg.renormalize, scale=cfg.scale), dtype=np.float64)
        if aux_loss_coef and T:
            d_p = load_balancing_loss_backward(router_probs(lg, cfg.score, normalize=True),
                                               routing.experts,
                                               d_loss=aux_loss_coef)
            d_logits += router_probs_backward(lg, d_p, score=cfg.score, normalize=True)
        if z_loss_coef and T:
            d_logits += router_z_loss_backward(lg, d_loss=z_loss_coef)
        d_logits = d_logits.astype(cdt)
        grads["router"] = cpu.matmul_tn(x2, d_logits, out=target("router"))
        if self.router_bias is not None:
            grads["router_bias"] = target("router_bias")
            cpu.column_sums(d_logits, np.zeros(0, cdt), grads["router_bias"])
        d_x += cpu.matmul(d_logits, wide(self.router).T)

        # shared SwiGLU MLP (its sigmoid gate as a row scale)
        if self._s1 is not None:
            S = cfg.shared_expert_dim
            gw = wide(self.shared_gate_weight)
            sig = None
            if gw is not None:
                a = cpu.matmul(x2, gw[:, None])[:, 0].astype(np.float64)
                sig = 1.0 / (1.0 + np.exp(-a))
            s1 = wide(self._s1)[None]
            d_s1 = target("shared_gate_proj", s1.shape[1:], "shared_up_proj")
            sjob = cpu.BackwardJob(x2, np.array([0, T], np.int64), s1, None, True,
                                   wide(self.shared_down_proj)[None], None, None, None, 0,
                                   math.inf, 1.0, dy, None if sig is None else sig.astype(cdt),
                                   np.empty((T, H), cdt), d_s1[None], None,
                                   target("shared_down_proj")[None], None, None, None,
                                   None if sig is None else np.empty(T))
            cpu.run_backward(sjob)
            d_x += sjob.d_xs
            grads.update(shared_gate_proj=d_s1[:, :S], shared_up_proj=d_s1[:, S:],
                         shared_down_proj=sjob.d_w_down[0])
            if sig is not None:
                d_a = (sig * (1.0 - sig) * sjob.d_scale).astype(cdt)
                g = target("shared_gate_weight")
                grads["shared_gate_weight"] = cpu.matmul_tn(x2, d_a[:, None], out=g[:, None])[:, 0]
                d_x += d_a[:, None] * gw[None, :]
        d_x = d_x.reshape(lead + (H,))
        if out is not None:
            np.copyto(out["x"], d_x, casting="unsafe")
            for name in params:
                if name not in direct:
                    np.copyto(out[name], grads[name], casting="unsafe")
            return out
        res = {"x": d_x.astype(xdt, copy=False)}
        for name, p in params.items():     # each in its parameter's float dtype
            g = grads[name]
            res[name] = g if g.dtype == spec[name][1] else g.astype(spec[name][1])
        return res

    # -------------------------------------------------------------- device
    def _forward_device(self, x, return_info):
        if not self._device:
            raise TypeError("x is a device array but this layer's weights are on the host; "
                            "use layer.to_device()")
        if not _on_device(x):
            raise TypeError("x is a host array but this layer's weights are on the GPU; "
                            "pass a device array (numba.cuda.to_device(x))")
        cfg = self.config
        H = cfg.hidden_dim
        # numba, CuPy or PyTorch CUDA arrays, bfloat16 tensors included
        xd = cuda_module("_arrays").as_device("x", x)
        shape = tuple(xd.shape)
        if not shape or shape[-1] != H:
            raise ValueError(f"x must have last dim hidden_dim = {H}, got shape {shape}")
        if np.dtype(xd.dtype) != self.dtype:
            raise TypeError(f"x has dtype {xd.dtype} but the layer is {self.dtype}")
        # the fused device forward (numoe._cuda.moe): rows read through the plan,
        # routing weight in the GEMM epilogue, 16-bit storage widened in registers
        fused = cuda_module("moe")
        if not return_info:
            return fused.forward(self, xd)
        y, (logits, routing, plan) = fused.forward(self, xd, return_parts=True)
        return y, _info(logits, routing, plan, cfg)


def check_out_keys(out, names):
    """``out`` of a layer backward (host or device): a dict with exactly the keys ``names``."""
    if not isinstance(out, dict):
        raise TypeError(f"out must be the dict returned by an earlier layer.backward, "
                        f"got {type(out).__name__}")
    missing = [n for n in names if n not in out]
    extra = [str(n) for n in out if n not in names]
    if missing or extra:
        raise ValueError(f"out must have exactly the keys {sorted(names)} (those of "
                         f"layer.backward's result): missing {missing}, extra {sorted(extra)}")


def _check_grad_out(out, spec, inputs):
    """``out`` of :meth:`MoELayer.backward`: a dict with exactly the keys of ``spec``
    (name -> (shape, dtype)), each a writeable ndarray of that shape and dtype,
    sharing no memory with ``inputs`` (name -> array or None) nor with each other
    (the two halves of one fused buffer are disjoint)."""
    check_out_keys(out, spec)
    arrays = []
    for name, (shape, dtype) in spec.items():
        a = out[name]
        if not isinstance(a, np.ndarray):
            raise TypeError(f"out[{name!r}] must be a NumPy array, got {type(a).__name__}")
        if a.dtype != dtype:
            raise TypeError(f"out[{name!r}] must have dtype {np.dtype(dtype).name}, "
                            f"got {a.dtype}")
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"out[{name!r}] must have shape {tuple(shape)}, got {a.shape}")
        if not a.flags.writeable:
            raise ValueError(f"out[{name!r}] must be writeable")
        arrays.append((name, a))
    others = []
    for name, v in inputs.items():
        if isinstance(v, QuantizedArray):
            others += [(name, v.values), (name, v.scales)]
        elif v is not None:
            others.append((name, v))
    for i, (name, a) in enumerate(arrays):
        for other, b in others:
            if isinstance(b, np.ndarray) and _overlap(a, b):
                raise ValueError(f"out[{name!r}] must not share memory with {other}")
        for name2, b in arrays[:i]:
            if _overlap(a, b):
                raise ValueError(f"out[{name!r}] and out[{name2!r}] must not share memory")


def _overlap(a, b):
    """Whether ``a`` and ``b`` share memory (exact; too hard to decide: True)."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=1 << 20))
    except np.exceptions.TooHardError:
        return True


def _info(logits, routing, plan, cfg):
    """The ``info`` dict of :meth:`MoELayer.forward`."""
    T = logits.shape[0]
    if T:
        aux = load_balancing_loss(router_probs(logits, cfg.score, normalize=True),
                                  routing.experts)
        z = router_z_loss(logits)
    else:
        aux = z = 0.0
    stats = routing_stats(routing.experts, cfg.num_experts, weights=routing.weights, plan=plan)
    return dict(logits=logits, routing=routing, plan=plan, aux_loss=aux, z_loss=z, stats=stats)


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
        :func:`numoe.load_balancing_loss` of the router scores (sigmoid
        scores normalised per token; 1.0 at perfect balance).

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
    loss = load_balancing_loss(router_probs(logits, cfg.score, normalize=True), r.experts) \
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
            cuda_module("moe").add_shared(y, sh, gate)
        else:
            from ._cpu import experts as cpu
            sh = expert_ffn(x2, [0, T], np.asarray(sg)[None], np.asarray(su)[None],
                            np.asarray(sd)[None])
            gw = p.get("shared_gate_weight")
            gate = None if gw is None else cpu.matmul(
                x2, _as("shared_gate_weight", gw, x2.dtype, (x2.shape[1],))[:, None])[:, 0]
            cpu.add_shared(y, sh, gate)
    return y.reshape(lead + (y.shape[-1],))
