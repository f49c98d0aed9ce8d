"""Loading Hugging Face MoE weights into a :class:`numoe.MoELayer`.

Three entry points, reached through the classmethods of :class:`numoe.MoELayer`:

* :func:`from_hf` -- a transformers MoE block object (PyTorch) to a layer;
* :func:`from_state_dict` -- arrays (NumPy or torch) keyed as in a
  checkpoint of that model family;
* :func:`from_safetensors` -- one MoE layer of a safetensors checkpoint
  directory (one file, or shards with ``model.safetensors.index.json``);
  only that layer's tensors are read, with NumPy alone (neither torch nor
  transformers is imported).

Quantized checkpoints as published are read too: block-wise FP8 weights
with their ``weight_scale_inv`` (DeepSeek-V3, ``quant_method: fp8``) and
MXFP4 experts (gpt-oss, ``*_blocks`` / ``*_scales``) are dequantized to
bfloat16 (or ``weight_dtype=``) on load (:func:`dequantize_fp8`,
:func:`dequantize_mxfp4`).

Seven families (the ``model_type`` of a transformers ``config.json``):
``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``, ``deepseek_v3``,
``gpt_oss`` and ``switch_transformers``. HF stores linear weights as
``[out, in]``; numoe uses the "x @ W" layout (``[in, out]``), so every
matrix is transposed once, straight into the layer's fused gate/up buffer.
Weights keep their stored dtype (bfloat16 stays ``ml_dtypes.bfloat16``)
unless ``weight_dtype=`` asks for another; ``dtype=`` sets the layer's
activation dtype (see :class:`numoe.MoELayer`).

torch is touched only through the objects the caller passes (duck typing);
this module imports neither torch nor transformers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from . import _dtypes as D, _validate as V
from .config import MoEConfig

__all__ = ["FAMILIES", "from_hf", "from_state_dict", "from_safetensors", "config_from_hf",
           "moe_layer_indices", "dequantize_fp8", "dequantize_mxfp4"]

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss",
            "switch_transformers")
_ALIASES = {"switch": "switch_transformers", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
            "deepseekv3": "deepseek_v3", "gptoss": "gpt_oss"}

# transformers block classes (the same names in transformers 4 and 5) -> family
BLOCK_CLASSES = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "OlmoeSparseMoeBlock": "olmoe",
    "DeepseekV3MoE": "deepseek_v3",
    "GptOssMLP": "gpt_oss",
    "SwitchTransformersSparseMLP": "switch_transformers",
}

# HF activation names (config strings and module classes) -> numoe activation
_ACT_NAMES = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_python": "gelu",
              "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
              "gelu_python_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
_ACT_CLASSES = {"SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu",
                "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh",
                "PytorchGELUTanh": "gelu_tanh", "FastGELUActivation": "gelu_tanh",
                "ReLU": "relu"}


@dataclasses.dataclass(frozen=True)
class _Names:
    """How one family's checkpoints name the tensors of an MoE block (relative to it)."""

    router: str                       # [E, H]
    gate: str | None                  # per-expert [F, H] ("{e}" = expert id)
    up: str | None                    # per-expert [F, H] (None: plain experts)
    down: str                         # per-expert [H, F]
    prefixes: tuple                   # the block inside a whole checkpoint ("{i}" = layer)
    router_bias: str | None = None
    selection_bias: str | None = None
    shared: str | None = None         # prefix of the shared SwiGLU MLP
    shared_gate: str | None = None    # [1, H]


_QWEN = dict(router="gate.weight", gate="experts.{e}.gate_proj.weight",
             up="experts.{e}.up_proj.weight", down="experts.{e}.down_proj.weight",
             prefixes=("model.layers.{i}.mlp.",))
NAMES = {
    "mixtral": _Names(router="gate.weight", gate="experts.{e}.w1.weight",
                      up="experts.{e}.w3.weight", down="experts.{e}.w2.weight",
                      prefixes=("model.layers.{i}.block_sparse_moe.", "model.layers.{i}.mlp.")),
    "qwen2_moe": _Names(**_QWEN, shared="shared_expert.", shared_gate="shared_expert_gate.weight"),
    "qwen3_moe": _Names(**_QWEN),
    "olmoe": _Names(**_QWEN),
    "deepseek_v3": _Names(**_QWEN, selection_bias="gate.e_score_correction_bias",
                          shared="shared_experts."),
    # gpt-oss keeps its experts fused in the checkpoint too (see _experts)
    "gpt_oss": _Names(router="router.weight", router_bias="router.bias", gate=None, up=None,
                      down="experts.down_proj", prefixes=("model.layers.{i}.mlp.",)),
    "switch_transformers": _Names(router="router.classifier.weight",
                                  router_bias="router.classifier.bias",
                                  gate="experts.expert_{e}.wi.weight", up=None,
                                  down="experts.expert_{e}.wo.weight",
                                  prefixes=("encoder.block.{i}.layer.1.mlp.",)),
}
# transformers >= 5 keeps the GLU experts fused in memory: gate_up_proj [E, 2F, H]
# (gate rows first) and down_proj [E, H, F]; model.state_dict() has these names
_FUSED_GATE_UP, _FUSED_DOWN = "experts.gate_up_proj", "experts.down_proj"


# ------------------------------------------------------------------ families
def _family(name, family):
    """A family argument (or a config's model_type) checked against :data:`FAMILIES`."""
    if not isinstance(family, str):
        raise TypeError(f"{name} must be a string naming the model family, got {family!r}")
    fam = _ALIASES.get(family.lower(), family.lower())
    if fam not in FAMILIES:
        raise ValueError(f"{name} must be one of {', '.join(FAMILIES)}; got {family!r}")
    return fam


def _hf_dict(name, hf_config):
    """An HF config (config.json mapping or a transformers config object) as a dict."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return dict(hf_config.to_dict())
    raise TypeError(f"{name} must be a numoe.MoEConfig, a config.json mapping or a "
                    f"transformers config, got {type(hf_config).__name__}")


def _field(hf, key, default=KeyError):
    """``hf[key]``; ``key`` may be a tuple of synonyms (config classes rename fields
    across transformers versions, e.g. ``num_experts`` / ``num_local_experts``)."""
    for name in (key if isinstance(key, tuple) else (key,)):
        if hf.get(name) is not None:
            return hf[name]
    if default is KeyError:
        raise ValueError(f"config lacks {key!r} (needed to size the MoE layer of a "
                         f"{hf.get('model_type', '?')} model)")
    return default


def _activation(where, act):
    name = _ACT_NAMES.get(str(act).lower())
    if name is None:
        raise ValueError(f"{where} has activation {act!r}, which numoe does not implement "
                         f"(supported: {', '.join(sorted(_ACT_NAMES))})")
    return name


def config_from_hf(hf_config, family=None):
    """The :class:`numoe.MoEConfig` of an MoE layer of a Hugging Face model config.

    Parameters
    ----------
    hf_config : mapping or transformers config
        The contents of ``config.json`` (or a ``PretrainedConfig``).
    family : str, optional
        One of :data:`FAMILIES`; default: ``hf_config["model_type"]``.

    Returns
    -------
    MoEConfig

    Notes
    -----
    Switch Transformers caps each expert at ``expert_capacity`` tokens *per
    sequence*; numoe's capacity is relative to the batch
    (:func:`numoe.capacity`), so the config is dropless
    (``capacity_factor=None``). For one sequence of ``T`` tokens, HF's
    drops are reproduced by ``capacity_factor = expert_capacity * E / T``.

    Examples
    --------
    >>> from numoe.loading import config_from_hf
    >>> cfg = config_from_hf({"model_type": "mixtral", "num_local_experts": 8,
    ...                       "num_experts_per_tok": 2, "hidden_size": 64,
    ...                       "intermediate_size": 128})
    >>> (cfg.num_experts, cfg.top_k, cfg.renormalize, cfg.activation)
    (8, 2, True, 'silu')
    """
    hf = _hf_dict("hf_config", hf_config)
    fam = _family("family", family if family is not None else _field(hf, "model_type"))
    get = lambda key, default=KeyError: _field(hf, key, default)  # noqa: E731
    # the expert count's name differs by family and transformers version
    E = get(("n_routed_experts", "num_local_experts") if fam == "deepseek_v3" else
            ("num_experts", "num_local_experts"))
    if fam == "switch_transformers":
        return MoEConfig.switch(
            E, 1, get("d_model"), get("d_ff"), capacity_factor=None,
            activation=_activation("config.dense_act_fn", get("dense_act_fn", "relu")),
            router_bias=bool(get("router_bias", False)))
    k = get(("num_experts_per_tok", "experts_per_token"))
    H = get("hidden_size")
    if fam == "gpt_oss":
        return MoEConfig.gpt_oss(E, k, H, get("intermediate_size"),
                                 limit=float(get("swiglu_limit", 7.0)),
                                 alpha=float(get("swiglu_alpha", 1.702)))
    act = _activation("config.hidden_act", get("hidden_act", "silu"))
    if fam == "mixtral":
        return MoEConfig.mixtral(E, k, H, get("intermediate_size"), activation=act)
    norm = bool(get("norm_topk_prob", fam == "deepseek_v3"))
    if fam == "qwen3_moe":
        return MoEConfig.qwen3_moe(E, k, H, get("moe_intermediate_size"), renormalize=norm,
                                   activation=act)
    if fam == "olmoe":
        return MoEConfig.olmoe(E, k, H, get("intermediate_size"), renormalize=norm,
                               activation=act)
    ns = 1 if fam == "qwen2_moe" else int(get("n_shared_experts", 1) or 0)
    if act != "silu" and ns:
        raise ValueError(f"config.hidden_act must be 'silu' for {fam} (numoe's shared expert "
                         f"is SwiGLU), got {get('hidden_act')!r}")
    if fam == "qwen2_moe":
        return MoEConfig.qwen2_moe(E, k, H, get("moe_intermediate_size"), renormalize=norm,
                                   shared_expert_dim=get("shared_expert_intermediate_size"))
    # deepseek_v3
    F = get("moe_intermediate_size")
    g = get("n_group", 1) or 1
    return MoEConfig.deepseek_v3(
        E, k, H, F, n_groups=g, topk_groups=get("topk_group", None) or g, renormalize=norm,
        scale=float(get("routed_scaling_factor", 1.0)), num_shared_experts=ns,
        activation=act, shared_expert_dim=(ns * F) if ns else None)


def moe_layer_indices(hf_config, family=None):
    """The layer indices that hold an MoE block, as the family's model builds them.

    Parameters
    ----------
    hf_config : mapping or transformers config
    family : str, optional
        Default: ``hf_config["model_type"]``.

    Returns
    -------
    list of int
        For Switch Transformers, the encoder's blocks.

    Examples
    --------
    >>> from numoe.loading import moe_layer_indices
    >>> moe_layer_indices({"model_type": "deepseek_v3", "num_hidden_layers": 5,
    ...                    "first_k_dense_replace": 3})
    [3, 4]
    """
    hf = _hf_dict("hf_config", hf_config)
    fam = _family("family", family if family is not None else _field(hf, "model_type"))
    if fam == "switch_transformers":
        n = int(_field(hf, ("num_layers", "num_hidden_layers")))
        step = hf.get("encoder_sparse_step")
        if step is None:
            sparse = int(hf.get("num_sparse_encoder_layers", 3))
            step = n // sparse if sparse > 0 else n
        step = int(step)
        return [i for i in range(n) if step > 0 and (i % step == 1 or step == 1)]
    n = int(_field(hf, "num_hidden_layers"))
    if fam in ("qwen2_moe", "qwen3_moe"):
        only = set(hf.get("mlp_only_layers") or ())
        step = int(hf.get("decoder_sparse_step", 1) or 1)
        if int(_field(hf, ("num_experts", "num_local_experts"), 1) or 0) <= 0:
            return []
        return [i for i in range(n) if i not in only and (i + 1) % step == 0]
    if fam == "deepseek_v3":
        first = int(hf.get("first_k_dense_replace", 0) or 0)
        freq = int(hf.get("moe_layer_freq", 1) or 1)
        return [i for i in range(first, n) if i % freq == 0]
    return list(range(n))


# ------------------------------------------------------------------ arrays
_TORCH_VIEWS = {   # torch dtypes NumPy lacks: (same-size integer torch dtype, NumPy dtype)
    "bfloat16": ("int16", D.BFLOAT16),
    "float8_e4m3fn": ("uint8", np.dtype(ml_dtypes.float8_e4m3fn)),
    "float8_e5m2": ("uint8", np.dtype(ml_dtypes.float8_e5m2)),
}


def _to_numpy(name, a):
    """``a`` (NumPy array or torch tensor) as a NumPy array of the same dtype (no copy
    for CPU tensors; bfloat16 bits reinterpreted as ``ml_dtypes.bfloat16``)."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "detach") and hasattr(a, "numpy") and hasattr(a, "dtype"):   # torch
        t = a.detach()
        if str(getattr(t, "device", "cpu")) != "cpu":
            t = t.cpu()
        kind = str(t.dtype).replace("torch.", "")
        if kind in _TORCH_VIEWS:
            torch = sys.modules[type(a).__module__.split(".")[0]]
            int_dt, np_dt = _TORCH_VIEWS[kind]
            return t.contiguous().view(getattr(torch, int_dt)).numpy().view(np_dt)
        return t.numpy()
    try:
        arr = np.asarray(a)
    except Exception as exc:  # noqa: BLE001
        raise TypeError(f"{name} must be a NumPy array or a torch tensor, "
                        f"got {type(a).__name__}") from exc
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got {type(a).__name__}")
    return arr


_FP8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
_FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def dequantize_fp8(weight, scale_inv, block_size=(128, 128), dtype=np.float32):
    """A block-wise scaled float8 weight (DeepSeek-V3 checkpoints) as floats.

    Parameters
    ----------
    weight : (..., N, K) float8 array (``ml_dtypes.float8_e4m3fn`` or ``float8_e5m2``)
    scale_inv : (..., ceil(N/bn), ceil(K/bk)) float array
        One multiplier per ``bn x bk`` block (a single value: per tensor).
    block_size : (int, int) or None
        ``(bn, bk)`` (the config's ``quantization_config.weight_block_size``);
        None: per-tensor scale.
    dtype : float dtype
        Of the result; the products are formed in float32.

    Returns
    -------
    (..., N, K) array of ``dtype``
    """
    w = np.asarray(weight).astype(np.float32)
    s = np.asarray(scale_inv).astype(np.float32)
    if block_size is None or s.size == 1:
        return (w * s.reshape(()) if s.size == 1 else w * s).astype(dtype, copy=False)
    bn, bk = (int(v) for v in block_size)
    N, K = w.shape[-2:]
    want = w.shape[:-2] + (-(-N // bn), -(-K // bk))
    if s.shape != want:
        raise ValueError(f"scale_inv must have shape {want} for a weight of shape {w.shape} "
                         f"in {bn}x{bk} blocks, got {s.shape}")
    s = np.repeat(np.repeat(s, bn, axis=-2)[..., :N, :], bk, axis=-1)[..., :K]
    return (w * s).astype(dtype, copy=False)


def dequantize_mxfp4(blocks, scales, dtype=ml_dtypes.bfloat16):
    """MXFP4 expert weights (gpt-oss checkpoints) as floats, in the "x @ W" layout.

    Parameters
    ----------
    blocks : (E, N, G, 16) uint8 array
        Two FP4 (E2M1) values per byte, low nibble first: row ``n`` of expert
        ``e`` holds ``K = 32 G`` values in ``G`` groups of 32.
    scales : (E, N, G) uint8 array
        Each group's power-of-two scale, ``2**(scale - 127)`` (E8M0).
    dtype : float dtype
        Of the result (every MXFP4 value is exact in bfloat16).

    Returns
    -------
    (E, K, N) array of ``dtype``
        Transposed from the stored ``[E, N, K]`` (HF's dequantisation gives the
        same ``[E, K, N]``: gpt-oss ``gate_up_proj [E, H, 2F]``, ``down_proj
        [E, F, H]``).
    """
    b = np.asarray(blocks)
    sc = np.asarray(scales)
    if b.dtype != np.uint8 or sc.dtype != np.uint8:
        raise TypeError(f"blocks and scales must be uint8, got {b.dtype} and {sc.dtype}")
    if b.ndim != 4 or b.shape[-1] != 16 or b.shape[:-1] != sc.shape:
        raise ValueError(f"blocks must be (E, N, G, 16) and scales (E, N, G), got "
                         f"{b.shape} and {sc.shape}")
    E, N, G, _ = b.shape
    out = np.empty((E, 32 * G, N), dtype)
    vals = np.empty((N, G, 32), np.float32)
    for e in range(E):                       # one expert at a time: bounded float32 scratch
        vals[..., 0::2] = _FP4_VALUES[b[e] & 0x0F]
        vals[..., 1::2] = _FP4_VALUES[b[e] >> 4]
        np.ldexp(vals, (sc[e].astype(np.int32) - 127)[..., None], out=vals)
        out[e] = vals.reshape(N, 32 * G).T
    return out


@dataclasses.dataclass(frozen=True)
class _Quant:
    """How to read quantized tensors: FP8 block size and the dtype they dequantize to."""

    fp8_block: tuple | None = (128, 128)
    dtype: np.dtype = D.BFLOAT16


def _quant(hf, qdt):
    """The :class:`_Quant` of a config.json's ``quantization_config`` (checked); quantized
    weights dequantize to ``qdt``."""
    qc = (hf or {}).get("quantization_config")
    if not qc:
        return _Quant(dtype=qdt)
    method = qc.get("quant_method")
    if method == "fp8":
        bs = qc.get("weight_block_size")
        return _Quant(fp8_block=None if bs is None else tuple(int(v) for v in bs), dtype=qdt)
    if method == "mxfp4":
        return _Quant(dtype=qdt)
    raise ValueError(f"config quantization_config.quant_method {method!r} is not supported "
                     "(numoe reads float checkpoints, block-wise 'fp8' and 'mxfp4')")


class _Source:
    """Named tensors of one MoE block: ``get(local_name, shape)`` -> NumPy array (HF
    layout); quantized tensors (FP8 + ``_scale_inv``, MXFP4 ``_blocks`` + ``_scales``)
    come back dequantized."""

    def __init__(self, where, prefix, lookup, has, quant=_Quant()):
        self.where, self.prefix, self._lookup, self._has = where, prefix, lookup, has
        self.quant = quant

    def has(self, local):
        key = self.prefix + local
        return self._has(key) or self._has(key + "_blocks")

    def _read(self, key):
        return _to_numpy(f"{self.where}[{key!r}]", self._lookup(key))

    def get(self, local, shape=None):
        key = self.prefix + local
        if self._has(key):
            a = self._read(key)
            if a.dtype in _FP8:
                sk = key + "_scale_inv"
                if not self._has(sk):
                    raise TypeError(f"{self.where}[{key!r}] is float8 but {sk!r} (its "
                                    "scales) is missing")
                a = dequantize_fp8(a, self._read(sk), self.quant.fp8_block, self.quant.dtype)
        elif self._has(key + "_blocks") and self._has(key + "_scales"):
            a = dequantize_mxfp4(self._read(key + "_blocks"), self._read(key + "_scales"),
                                 self.quant.dtype)
        else:
            raise ValueError(f"{self.where} has no tensor {key!r}")
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise ValueError(f"{self.where}[{key!r}] must have shape {tuple(shape)}, "
                             f"got {tuple(a.shape)}")
        if D.native(a.dtype) not in D.FLOATS:
            raise TypeError(f"{self.where}[{key!r}] must be a float tensor, got dtype "
                            f"{a.dtype}")
        return a


# ------------------------------------------------------------------ building
def _cast(a, dt):
    """A fresh C-contiguous copy of ``a`` (as ``dt`` if given): the layer never shares
    memory with the caller's arrays or tensors."""
    return np.array(a, dtype=a.dtype if dt is None else dt, order="C")


def _experts(fam, cfg, src, dt):
    """Routed expert weights as MoELayer keyword arguments (gate/up fused in one buffer)."""
    names = NAMES[fam]
    E, H, F = cfg.num_experts, cfg.hidden_dim, cfg.expert_dim
    kw = {}
    if fam == "gpt_oss":      # [E, H, 2F], gate and up interleaved (columns 0::2, 1::2)
        gu = src.get("experts.gate_up_proj", (E, H, 2 * F))
        gub = src.get("experts.gate_up_proj_bias", (E, 2 * F))
        dt = dt or gu.dtype
        w1 = np.empty((E, H, 2 * F), dt)
        w1[..., :F], w1[..., F:] = gu[..., 0::2], gu[..., 1::2]
        kw.update(w_gate=w1[..., :F], w_up=w1[..., F:],
                  w_down=_cast(src.get("experts.down_proj", (E, F, H)), dt),
                  b_gate=_cast(gub[:, 0::2], dt), b_up=_cast(gub[:, 1::2], dt),
                  b_down=_cast(src.get("experts.down_proj_bias", (E, H)), dt))
        return kw
    if cfg.glu and src.has(_FUSED_GATE_UP):       # transformers >= 5 in-memory names
        gu = src.get(_FUSED_GATE_UP, (E, 2 * F, H))
        dt = dt or gu.dtype
        w1 = np.empty((E, H, 2 * F), dt)
        w1[...] = gu.transpose(0, 2, 1)
        down = src.get(_FUSED_DOWN, (E, H, F))
        w_down = np.empty((E, F, H), dt)
        w_down[...] = down.transpose(0, 2, 1)
        return dict(w_gate=w1[..., :F], w_up=w1[..., F:], w_down=w_down)
    # one tensor per expert (checkpoint files; transformers 4 modules)
    g0 = src.get(names.gate.format(e=0), (F, H))
    dt = dt or g0.dtype
    w1 = np.empty((E, H, 2 * F if cfg.glu else F), dt)
    w_down = np.empty((E, F, H), dt)
    for e in range(E):
        w1[e, :, :F] = (g0 if e == 0 else src.get(names.gate.format(e=e), (F, H))).T
        if cfg.glu:
            w1[e, :, F:] = src.get(names.up.format(e=e), (F, H)).T
        w_down[e] = src.get(names.down.format(e=e), (H, F)).T
    if cfg.glu:
        return dict(w_gate=w1[..., :F], w_up=w1[..., F:], w_down=w_down)
    return dict(w_gate=w1, w_down=w_down)


@dataclasses.dataclass(frozen=True)
class _Load:
    """What the caller asked of the layer: its class, storage and activation dtypes."""

    layer_cls: type
    weight_dtype: np.dtype | None     # convert the weights to this float dtype on load
    int8: bool                        # then quantize the expert weights (layer.astype)
    dtype: np.dtype | None            # activation dtype (None: the layer's default)
    batch_invariant: bool

    @property
    def quant(self):
        """The dtype quantized checkpoints dequantize to."""
        return self.weight_dtype or D.BFLOAT16


def _load_options(layer_cls, dtype, weight_dtype, batch_invariant):
    if layer_cls is None:
        from .layer import MoELayer as layer_cls
    int8 = isinstance(weight_dtype, str) and weight_dtype == "int8"
    wdt = None if weight_dtype is None or int8 else \
        D.as_float_dtype("weight_dtype", weight_dtype)
    dt = None if dtype is None else D.as_float_dtype("dtype", dtype)
    V.flag("batch_invariant", batch_invariant)
    return _Load(layer_cls, wdt, int8, dt, bool(batch_invariant))


def _build(fam, cfg, src, opts):
    """The layer of family ``fam`` with config ``cfg`` from the block tensors in ``src``."""
    names = NAMES[fam]
    E, H = cfg.num_experts, cfg.hidden_dim
    dt = opts.weight_dtype
    kw = _experts(fam, cfg, src, dt)
    wdt = kw["w_gate"].dtype
    kw["router"] = _cast(src.get(names.router, (E, H)).T, dt)
    if cfg.router_bias:
        kw["router_bias"] = _cast(src.get(names.router_bias, (E,)), dt)
    if cfg.selection_bias:
        kw["selection_bias"] = _cast(src.get(names.selection_bias, (E,)), dt)
    if cfg.num_shared_experts:
        S = cfg.shared_expert_dim
        p = names.shared
        s1 = np.empty((H, 2 * S), wdt)
        s1[:, :S] = src.get(p + "gate_proj.weight", (S, H)).T
        s1[:, S:] = src.get(p + "up_proj.weight", (S, H)).T
        kw.update(shared_gate_proj=s1[:, :S], shared_up_proj=s1[:, S:],
                  shared_down_proj=_cast(src.get(p + "down_proj.weight", (H, S)).T, dt))
        if cfg.shared_gate:
            kw["shared_gate_weight"] = _cast(src.get(names.shared_gate, (1, H))[0], dt)
    if opts.batch_invariant:
        kw["batch_invariant"] = True
    if opts.dtype is not None:
        kw["dtype"] = opts.dtype
    layer = opts.layer_cls(cfg, **kw)
    return layer.astype(weight_dtype="int8") if opts.int8 else layer


def _with_options(cfg, options):
    if not options:
        return cfg
    bad = set(options) - {f.name for f in dataclasses.fields(MoEConfig)}
    if bad:
        raise TypeError(f"unknown MoEConfig field(s): {', '.join(sorted(bad))}")
    return dataclasses.replace(cfg, **options)


# ------------------------------------------------------------------ from_hf
def _block_family(block):
    for obj in (block, getattr(block, "mlp", None)):
        if obj is not None:
            fam = BLOCK_CLASSES.get(type(obj).__name__)
            if fam is not None:
                return fam, obj
    raise TypeError("block must be a transformers MoE block of a supported family "
                    f"({', '.join(sorted(BLOCK_CLASSES))}), got {type(block).__name__}")


def _module_activation(experts):
    """numoe activation of an HF experts module (the ``act_fn``/``act`` of it or of its
    first expert)."""
    cands = [experts]
    children = getattr(experts, "children", None)
    if children is not None:
        cands.extend(list(children())[:1])
    for obj in cands:
        for attr in ("act_fn", "act"):
            act = getattr(obj, attr, None)
            if act is None:
                continue
            cls = type(act).__name__
            if cls == "GELU":                     # torch.nn.GELU
                return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
            if cls in _ACT_CLASSES:
                return _ACT_CLASSES[cls]
            raise ValueError(f"block's experts use activation {cls}, which numoe does not "
                             "implement")
    return "silu"


def _attr(name, *objs):
    for obj in objs:
        if obj is not None and getattr(obj, name, None) is not None:
            return getattr(obj, name)
    raise ValueError(f"block lacks {name!r} (not a supported transformers MoE block?)")


def _block_config(fam, block, src):
    """MoEConfig of an HF block, from its tensors' shapes and its routing attributes."""
    if getattr(block, "training", False):
        warnings.warn(f"{type(block).__name__} is in training mode: numoe computes the "
                      "inference forward (no router jitter, no dropout); call "
                      "model.eval() to silence this", UserWarning, stacklevel=4)
    names = NAMES[fam]
    if not src.has(names.router):
        raise ValueError(f"block has no {names.router!r} parameter")
    E, H = src.get(names.router).shape
    hf_cfg = getattr(block, "config", None)
    if fam == "gpt_oss":
        F = src.get("experts.down_proj").shape[1]
        ex = block.experts
        return MoEConfig.gpt_oss(E, int(block.router.top_k), H, F,
                                 limit=float(ex.limit), alpha=float(ex.alpha))
    if fam == "switch_transformers":
        F = src.get(names.gate.format(e=0)).shape[0]
        return MoEConfig.switch(E, 1, H, F, capacity_factor=None,
                                activation=_module_activation(block.experts),
                                router_bias=src.has(names.router_bias))
    if src.has(_FUSED_GATE_UP):
        F = src.get(_FUSED_GATE_UP).shape[1] // 2
    else:
        F = src.get(names.gate.format(e=0)).shape[0]
    act = _module_activation(block.experts)
    gate = block.gate
    k = int(_attr("top_k", gate, block, hf_cfg))
    if fam == "mixtral":
        return MoEConfig.mixtral(E, k, H, F, activation=act)
    norm = bool(_attr("norm_topk_prob", gate, block, hf_cfg))
    if fam in ("qwen2_moe", "deepseek_v3") and act != "silu":
        raise ValueError(f"block's experts use {act}; numoe supports shared experts only "
                         "with SwiGLU (silu)")
    if fam == "qwen2_moe":
        S = src.get(names.shared + "gate_proj.weight").shape[0]
        return MoEConfig.qwen2_moe(E, k, H, F, renormalize=norm, shared_expert_dim=S)
    if fam == "qwen3_moe":
        return MoEConfig.qwen3_moe(E, k, H, F, renormalize=norm, activation=act)
    if fam == "olmoe":
        return MoEConfig.olmoe(E, k, H, F, renormalize=norm, activation=act)
    # deepseek_v3
    g = int(_attr("num_group", gate) if hasattr(gate, "num_group") else
            _attr("n_group", gate, hf_cfg))
    tg = int(_attr("topk_group", gate, hf_cfg))
    scale = float(_attr("routed_scaling_factor", gate, hf_cfg))
    shared = names.shared + "gate_proj.weight"
    if src.has(shared):
        S = src.get(shared).shape[0]
        kw = dict(num_shared_experts=max(1, S // F), shared_expert_dim=S)
    else:
        kw = dict(num_shared_experts=0)
    return MoEConfig.deepseek_v3(E, k, H, F, n_groups=g, topk_groups=tg, renormalize=norm,
                                 scale=scale, **kw)


def from_hf(block, *, dtype=None, weight_dtype=None, batch_invariant=False, layer_cls=None,
            **options):
    """A :class:`numoe.MoELayer` equal to a Hugging Face transformers MoE block.

    Parameters
    ----------
    block : torch.nn.Module
        ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock``,
        ``Qwen3MoeSparseMoeBlock``, ``OlmoeSparseMoeBlock``, ``DeepseekV3MoE``,
        ``GptOssMLP`` or ``SwitchTransformersSparseMLP`` (or a decoder layer
        whose ``.mlp`` is one). Experts fused (transformers 5) or one module
        per expert (transformers 4).
    dtype : float dtype, optional
        The layer's activation dtype (of ``x`` and ``y``); default: that of
        the weights.
    weight_dtype : float dtype or "int8", optional
        Store the weights in this dtype (default: as stored, bfloat16 stays
        ``ml_dtypes.bfloat16``; quantized FP8/MXFP4 weights dequantize to
        bfloat16); ``"int8"`` quantizes the experts
        (:meth:`numoe.MoELayer.astype`).
    batch_invariant : bool
        See :class:`numoe.MoELayer`.
    **options
        Fields of the inferred :class:`numoe.MoEConfig` to replace (e.g.
        ``capacity_factor`` for Switch, see :func:`config_from_hf`).

    Returns
    -------
    MoELayer
        Its config inferred from the block (sizes from the weights, routing
        from the block's attributes); weights copied into the "x @ W" layout.
    """
    opts = _load_options(layer_cls, dtype, weight_dtype, batch_invariant)
    fam, blk = _block_family(block)
    sd = blk.state_dict()
    src = _Source(f"{type(blk).__name__}.state_dict()", "", sd.__getitem__, sd.__contains__,
                  _Quant(dtype=opts.quant))
    cfg = _with_options(_block_config(fam, blk, src), options)
    return _build(fam, cfg, src, opts)


# ------------------------------------------------------------------ from_state_dict
def _family_from_keys(keys):
    """The family whose block layout the (block-relative) names ``keys`` match, or None."""
    keys = set(keys)
    for fam in ("switch_transformers", "gpt_oss", "deepseek_v3", "qwen2_moe"):
        n = NAMES[fam]
        marker = n.selection_bias or n.shared_gate or n.router
        if marker in keys:
            return fam
    if "experts.0.w1.weight" in keys:
        return "mixtral"
    if "gate.weight" in keys:
        return "qwen3_moe"           # same names and semantics as olmoe/mixtral (fused)
    return None


def _resolve(config, family, keys=None):
    """(family, MoEConfig, config dict or None) from a from_state_dict/from_safetensors
    ``config``/``family``."""
    fam = None if family is None else _family("family", family)
    if isinstance(config, MoEConfig):
        if fam is None and keys is not None:
            fam = _family_from_keys(keys)
        if fam is None:
            raise ValueError("family is required when config is a numoe.MoEConfig "
                             f"(one of {', '.join(FAMILIES)})")
        return fam, config, None
    hf = _hf_dict("config", config)
    if "model_type" in hf:
        mt = _family("config['model_type']", hf["model_type"])
        if fam is not None and fam != mt:
            raise ValueError(f"family={family!r} contradicts config model_type "
                             f"{hf['model_type']!r}")
        fam = mt
    if fam is None:
        raise ValueError("family is required: config has no 'model_type'")
    return fam, config_from_hf(hf, fam), hf


def from_state_dict(state_dict, config, *, prefix="", family=None, dtype=None,
                    weight_dtype=None, batch_invariant=False, layer_cls=None, **options):
    """A :class:`numoe.MoELayer` from arrays keyed as in an HF checkpoint.

    Parameters
    ----------
    state_dict : mapping of str to array
        NumPy arrays or torch tensors, named as in the family's checkpoints
        (e.g. ``model.layers.3.block_sparse_moe.experts.0.w1.weight``) or as in
        a transformers 5 model's ``state_dict()`` (fused
        ``experts.gate_up_proj``).
    config : MoEConfig, mapping or transformers config
        The layer's :class:`numoe.MoEConfig`, or the model's ``config.json``
        contents / config object (family from its ``model_type``).
    prefix : str
        Prepended to the block-relative names (``"model.layers.3.mlp."``);
        ``""`` when ``state_dict`` is the block's own.
    family : str, optional
        One of :data:`FAMILIES` (needed with a ``MoEConfig`` when the names
        do not tell).
    dtype : float dtype, optional
        The layer's activation dtype (of ``x`` and ``y``); default: that of
        the weights.
    weight_dtype : float dtype or "int8", optional
        Store the weights in this dtype (default: as stored, bfloat16 stays
        ``ml_dtypes.bfloat16``; quantized FP8/MXFP4 weights dequantize to
        bfloat16); ``"int8"`` quantizes the experts
        (:meth:`numoe.MoELayer.astype`).
    batch_invariant : bool
        See :class:`numoe.MoELayer`.
    **options
        Fields of the :class:`numoe.MoEConfig` to replace.

    Returns
    -------
    MoELayer
    """
    opts = _load_options(layer_cls, dtype, weight_dtype, batch_invariant)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to arrays, "
                        f"got {type(state_dict).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string, got {prefix!r}")
    if prefix and not prefix.endswith("."):
        prefix += "."
    local = [k[len(prefix):] for k in state_dict if isinstance(k, str) and k.startswith(prefix)]
    fam, cfg, hf = _resolve(config, family, local)
    cfg = _with_options(cfg, options)
    if not any(k == NAMES[fam].router for k in local):
        raise ValueError(f"state_dict has no {prefix + NAMES[fam].router!r}: not a {fam} MoE "
                         f"block under prefix={prefix!r}")
    src = _Source("state_dict", prefix, state_dict.__getitem__, state_dict.__contains__,
                  _quant(hf, opts.quant))
    return _build(fam, cfg, src, opts)


# ------------------------------------------------------------------ safetensors
# safetensors dtype names NumPy's own dtypes do not cover (the package's NumPy API
# rejects them): read from the file's bytes and viewed as ml_dtypes.
_RAW_DTYPES = {"BF16": D.BFLOAT16, "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
               "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
               "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu)}


class _Checkpoint:
    """The tensors of a safetensors checkpoint (a file, or a directory of one file or
    of shards listed by ``model.safetensors.index.json``), read one at a time."""

    def __init__(self, path):
        self.path = path
        if os.path.isfile(path):
            files = [path]
            self._file_of = None
        else:
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.isfile(index):
                with open(index) as f:
                    wm = json.load(f).get("weight_map")
                if not isinstance(wm, Mapping):
                    raise ValueError(f"path: {index} has no 'weight_map'")
                self._file_of = {k: os.path.join(path, v) for k, v in wm.items()}
                files = None
            else:
                files = sorted(os.path.join(path, n) for n in os.listdir(path)
                               if n.endswith(".safetensors"))
                if not files:
                    raise ValueError(f"path: no .safetensors file in {path}")
                self._file_of = None
        self._headers = {}
        if files is not None:
            self._file_of = {}
            for fn in files:
                for key in self._header(fn)[0]:
                    self._file_of.setdefault(key, fn)
        self._handles = {}

    def _header(self, fn):
        """(tensor table, byte offset of the data) of one safetensors file."""
        if fn not in self._headers:
            try:
                with open(fn, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    head = json.loads(f.read(n))
            except (OSError, ValueError) as exc:
                raise ValueError(f"path: cannot read safetensors file {fn}: {exc}") from exc
            head.pop("__metadata__", None)
            self._headers[fn] = (head, 8 + n)
        return self._headers[fn]

    def keys(self):
        return self._file_of.keys()

    def __contains__(self, key):
        return key in self._file_of

    def __getitem__(self, key):
        fn = self._file_of[key]
        head, base = self._header(fn)
        if key not in head:
            raise ValueError(f"path: the index maps {key!r} to {fn}, which lacks it")
        info = head[key]
        raw = _RAW_DTYPES.get(info["dtype"])
        if raw is None:          # the safetensors package's NumPy API
            from safetensors import safe_open

            if fn not in self._handles:
                self._handles[fn] = safe_open(fn, framework="np")
            return self._handles[fn].get_tensor(key)
        begin, end = info["data_offsets"]
        a = np.fromfile(fn, dtype=np.uint8, count=end - begin, offset=base + begin)
        if sys.byteorder != "little":                   # safetensors is little-endian
            a = a.view(f"<u{raw.itemsize}").astype(f"=u{raw.itemsize}")
        return a.view(raw).reshape(info["shape"])

    def close(self):
        self._handles.clear()


def _read_config(path, config):
    if config is not None:
        return config
    base = path if os.path.isdir(path) else os.path.dirname(path)
    fn = os.path.join(base, "config.json")
    if not os.path.isfile(fn):
        raise ValueError(f"path: no config.json in {base}; pass config=")
    with open(fn) as f:
        return json.load(f)


def from_safetensors(path, layer_index, *, config=None, prefix=None, family=None, dtype=None,
                     weight_dtype=None, batch_invariant=False, layer_cls=None, **options):
    """One MoE layer of a safetensors checkpoint, read with NumPy only.

    Parameters
    ----------
    path : str or os.PathLike
        A checkpoint directory (``config.json`` plus ``model.safetensors``,
        or shards with ``model.safetensors.index.json``), or one
        ``.safetensors`` file.
    layer_index : int
        The decoder layer (Switch: the encoder block) whose MoE block to load.
    config : mapping, transformers config or MoEConfig, optional
        Default: the directory's ``config.json``.
    prefix : str, optional
        Where the block's tensors live, ``"{i}"`` standing for
        ``layer_index`` (default by family, e.g. ``"model.layers.{i}.mlp."``;
        Switch decoder: ``"decoder.block.{i}.layer.2.mlp."``).
    family : str, optional
        Default: ``config["model_type"]``.
    dtype : float dtype, optional
        The layer's activation dtype (of ``x`` and ``y``); default: that of
        the weights.
    weight_dtype : float dtype or "int8", optional
        Store the weights in this dtype (default: as stored, bfloat16 stays
        ``ml_dtypes.bfloat16``; quantized FP8/MXFP4 weights dequantize to
        bfloat16); ``"int8"`` quantizes the experts
        (:meth:`numoe.MoELayer.astype`).
    batch_invariant : bool
        See :class:`numoe.MoELayer`.
    **options
        Fields of the :class:`numoe.MoEConfig` to replace.

    Returns
    -------
    MoELayer

    Notes
    -----
    Only the tensors of that block are read. Neither torch nor transformers
    is imported.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    opts = _load_options(layer_cls, dtype, weight_dtype, batch_invariant)
    if not os.path.exists(path):
        raise ValueError(f"path does not exist: {path}")
    if isinstance(layer_index, bool) or not isinstance(layer_index, (int, np.integer)):
        raise TypeError(f"layer_index must be an integer, got {layer_index!r}")
    i = int(layer_index)
    cfg_in = _read_config(path, config)
    ckpt = _Checkpoint(path)
    try:
        hf = None if isinstance(cfg_in, MoEConfig) else _hf_dict("config", cfg_in)
        fam, cfg, _ = _resolve(cfg_in, family)
        quant = _quant(hf, opts.quant)
        if hf is not None and prefix is None:
            n_key = "num_layers" if fam == "switch_transformers" else "num_hidden_layers"
            n = hf.get(n_key)
            if n is not None and not 0 <= i < int(n):
                raise ValueError(f"layer_index must be in [0, {n}) for this checkpoint "
                                 f"({n_key} = {n}), got {i}")
            if n is not None:
                moe = moe_layer_indices(hf, fam)
                if i not in moe:
                    raise ValueError(f"layer_index {i} is a dense (non-MoE) layer of this "
                                     f"{fam} checkpoint; its MoE layers are {_ranges(moe)}")
        if i < 0:
            raise ValueError(f"layer_index must be >= 0, got {i}")
        names = NAMES[fam]
        if prefix is not None:
            if not isinstance(prefix, str):
                raise TypeError(f"prefix must be a string, got {prefix!r}")
            cands = (prefix if not prefix or prefix.endswith(".") else prefix + ".",)
        else:
            cands = names.prefixes
        cands = [p.replace("{i}", str(i)) for p in cands]
        found = [p for p in cands if p + names.router in ckpt]
        if not found:
            raise ValueError(f"layer_index {i}: the checkpoint has no MoE router tensor "
                             f"{cands[0] + names.router!r} (a dense layer, or pass prefix=)")
        src = _Source(f"checkpoint {path}", found[0], ckpt.__getitem__, ckpt.__contains__,
                      quant)
        cfg = _with_options(cfg, options)
        return _build(fam, cfg, src, opts)
    finally:
        ckpt.close()


def _ranges(ids):
    """``[1, 3, 5, 7]`` -> ``'1, 3, 5, 7'``; long contiguous runs shortened."""
    if not ids:
        return "none"
    if len(ids) > 8 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}..{ids[-1]}"
    return ", ".join(map(str, ids[:16])) + (", ..." if len(ids) > 16 else "")
