"""Loading Hugging Face weights: MoELayer.from_hf / from_state_dict / from_safetensors.

Part 1 (NumPy only): a Qwen2-MoE-style checkpoint written with
``safetensors.numpy`` (and a bfloat16 one written byte by byte), loaded
with torch and transformers absent, checked against a layer built by hand
from the same arrays and against the float64 reference; bad input.

Part 2 (``parity``): per family a tiny random transformers model (2 layers,
layer 1 an MoE block) saved with ``save_pretrained`` into a temporary
directory; the three loaders must reproduce that model's own MoE block.
"""
import json
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import numoe
from numoe import MoEConfig, MoELayer, loading

TOL = 1e-5                     # relative error (Frobenius), float32
BF16 = np.dtype(ml_dtypes.bfloat16)


def _layer_takes_bf16():
    try:
        MoELayer.random(MoEConfig(num_experts=2, top_k=1, hidden_dim=4, expert_dim=4),
                        dtype=ml_dtypes.bfloat16)
        return True
    except (TypeError, ValueError):
        return False


needs_bf16_layer = pytest.mark.skipif(not _layer_takes_bf16(),
                                      reason="MoELayer does not accept bfloat16 weights yet")


def rel_err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


# ======================================================================
# Part 1: NumPy only
# ======================================================================
E, K, H, F, S = 6, 2, 8, 12, 20
QWEN2_CONFIG = {"model_type": "qwen2_moe", "num_hidden_layers": 2, "hidden_size": H,
                "num_experts": E, "num_experts_per_tok": K, "moe_intermediate_size": F,
                "shared_expert_intermediate_size": S, "decoder_sparse_step": 2,
                "norm_topk_prob": False, "hidden_act": "silu", "intermediate_size": 16}
P = "model.layers.1.mlp."


def qwen2_tensors(seed=0):
    """HF-layout ([out, in]) tensors of a 2-layer Qwen2-MoE: layer 0 dense, layer 1 MoE
    (plus an unrelated tensor, which must not be read)."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.5  # noqa: E731
    t = {"model.embed_tokens.weight": w(32, H),
         "model.layers.0.mlp.gate_proj.weight": w(16, H),
         "model.layers.0.mlp.up_proj.weight": w(16, H),
         "model.layers.0.mlp.down_proj.weight": w(H, 16),
         P + "gate.weight": w(E, H),
         P + "shared_expert.gate_proj.weight": w(S, H),
         P + "shared_expert.up_proj.weight": w(S, H),
         P + "shared_expert.down_proj.weight": w(H, S),
         P + "shared_expert_gate.weight": w(1, H)}
    for e in range(E):
        t[P + f"experts.{e}.gate_proj.weight"] = w(F, H)
        t[P + f"experts.{e}.up_proj.weight"] = w(F, H)
        t[P + f"experts.{e}.down_proj.weight"] = w(H, F)
    return t


def by_hand(t, dtype=np.float32):
    """The expected layer, transposed here independently of numoe.loading."""
    c = lambda a: np.asarray(a).astype(dtype)  # noqa: E731
    cfg = MoEConfig.qwen2_moe(num_experts=E, top_k=K, hidden_dim=H, expert_dim=F,
                              shared_expert_dim=S)
    ex = lambda name: np.stack([c(t[P + f"experts.{e}.{name}.weight"]).T  # noqa: E731
                                for e in range(E)])
    return MoELayer(cfg, router=c(t[P + "gate.weight"]).T, w_gate=ex("gate_proj"),
                    w_up=ex("up_proj"), w_down=ex("down_proj"),
                    shared_gate_proj=c(t[P + "shared_expert.gate_proj.weight"]).T,
                    shared_up_proj=c(t[P + "shared_expert.up_proj.weight"]).T,
                    shared_down_proj=c(t[P + "shared_expert.down_proj.weight"]).T,
                    shared_gate_weight=c(t[P + "shared_expert_gate.weight"])[0])


WEIGHT_NAMES = ("router", "w_gate", "w_up", "w_down", "shared_gate_proj", "shared_up_proj",
                "shared_down_proj", "shared_gate_weight")


def assert_same_weights(a, b):
    for name in WEIGHT_NAMES:
        wa, wb = getattr(a, name), getattr(b, name)
        assert (wa is None) == (wb is None), name
        if wa is None:
            continue
        assert wa.dtype == wb.dtype, name
        assert np.array_equal(wa, wb), name


def write_checkpoint(path, tensors, config, shards=1):
    """config.json + tensors written with safetensors.numpy (sharded with an index)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return
    keys = sorted(tensors)
    wm = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s::shards]}
        save_file(part, os.path.join(path, name))
        wm.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)


def write_raw_safetensors(fn, tensors):
    """A safetensors file written byte by byte (the NumPy API cannot write bfloat16)."""
    codes = {BF16: "BF16", np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8",
             np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3"}
    head, blobs, off = {}, [], 0
    for k, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        head[k] = {"dtype": codes[a.dtype], "shape": list(a.shape),
                   "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(head).encode()
    h += b" " * (-len(h) % 8)
    with open(fn, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_np")
    write_checkpoint(str(path), qwen2_tensors(), QWEN2_CONFIG)
    return path


def x_tokens(T=24, seed=1, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((T, H)).astype(dtype)


def test_numpy_checkpoint_without_torch(qwen2_dir, tmp_path):
    """from_safetensors with torch and transformers unimportable in the process."""
    out = tmp_path / "w.npz"
    script = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None          # any import of torch now fails
        sys.modules["transformers"] = None
        import numpy as np
        import numoe
        layer = numoe.MoELayer.from_safetensors(sys.argv[1], 1)
        np.savez(sys.argv[2], **{k: getattr(layer, k) for k in sys.argv[3:]})
        assert sys.modules["torch"] is None and sys.modules["transformers"] is None
    """)
    r = subprocess.run([sys.executable, "-c", script, str(qwen2_dir), str(out), *WEIGHT_NAMES],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    want = by_hand(qwen2_tensors())
    got = np.load(out)
    for name in WEIGHT_NAMES:
        assert np.array_equal(got[name], getattr(want, name)), name


def test_numpy_checkpoint_matches_by_hand_and_reference(qwen2_dir):
    layer = MoELayer.from_safetensors(qwen2_dir, 1)
    want = by_hand(qwen2_tensors())
    assert layer.config == want.config
    assert layer.dtype == np.float32
    assert_same_weights(layer, want)
    x = x_tokens()
    y = layer(x)
    assert np.array_equal(y, want(x))
    ref = numoe.reference.moe_forward(x, top_k=K, **layer.weights())
    assert rel_err(y, ref) < TOL


def test_numpy_checkpoint_sharded_and_single_file(qwen2_dir, tmp_path):
    t = qwen2_tensors()
    write_checkpoint(str(tmp_path / "sharded"), t, QWEN2_CONFIG, shards=3)
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    a = MoELayer.from_safetensors(tmp_path / "sharded", 1)
    b = MoELayer.from_safetensors(str(qwen2_dir / "model.safetensors"), 1)   # one file
    assert_same_weights(a, by_hand(t))
    assert_same_weights(b, by_hand(t))


def test_numpy_state_dict_prefix_and_dtype():
    t = qwen2_tensors()
    layer = MoELayer.from_state_dict(t, QWEN2_CONFIG, prefix="model.layers.1.mlp")
    assert_same_weights(layer, by_hand(t))
    for name, w in layer.parameters().items():          # copies, never views of the inputs
        assert not any(np.shares_memory(w, a) for a in t.values()), name
    # block-relative names, a numoe config and the family inferred from the names
    local = {k[len(P):]: v for k, v in t.items() if k.startswith(P)}
    layer2 = MoELayer.from_state_dict(local, layer.config, weight_dtype=np.float64)
    assert layer2.dtype == np.float64
    assert_same_weights(layer2, by_hand(t, np.float64))


def test_layer_options(qwen2_dir):
    a = MoELayer.from_safetensors(qwen2_dir, 1, batch_invariant=True)
    assert a.batch_invariant
    q = MoELayer.from_safetensors(qwen2_dir, 1, weight_dtype="int8")
    assert q.weight_dtype == np.int8 and q.dtype == np.float32
    x = x_tokens()
    assert rel_err(q(x), a(x)) < 2e-2                   # int8 weights: ~1e-2 rounding
    with pytest.raises(TypeError, match="weight_dtype"):
        MoELayer.from_safetensors(qwen2_dir, 1, weight_dtype=np.int32)
    with pytest.raises(TypeError, match="batch_invariant"):
        MoELayer.from_safetensors(qwen2_dir, 1, batch_invariant=1)


def test_only_the_layer_tensors_are_read(qwen2_dir, monkeypatch):
    read = []
    orig = loading._Checkpoint.__getitem__
    monkeypatch.setattr(loading._Checkpoint, "__getitem__",
                        lambda self, key: read.append(key) or orig(self, key))
    MoELayer.from_safetensors(qwen2_dir, 1)
    assert read and all(k.startswith(P) for k in read)
    assert len(set(read)) == len(read) == 1 + 3 * E + 4


def test_bfloat16_checkpoint_read_as_bfloat16(tmp_path):
    t = {k: v.astype(BF16) for k, v in qwen2_tensors().items()}
    os.makedirs(tmp_path / "bf")
    write_raw_safetensors(str(tmp_path / "bf" / "model.safetensors"), t)
    with open(tmp_path / "bf" / "config.json", "w") as f:
        json.dump(QWEN2_CONFIG, f)
    # the checkpoint reader gives ml_dtypes.bfloat16 arrays, bit for bit
    ck = loading._Checkpoint(str(tmp_path / "bf"))
    a = ck[P + "experts.3.up_proj.weight"]
    assert a.dtype == BF16
    assert np.array_equal(a.view(np.uint16), t[P + "experts.3.up_proj.weight"].view(np.uint16))
    # converted to float32 on request: exact (every bfloat16 is a float32)
    layer = MoELayer.from_safetensors(tmp_path / "bf", 1, weight_dtype=np.float32)
    assert_same_weights(layer, by_hand(t, np.float32))


@needs_bf16_layer
def test_bfloat16_checkpoint_layer_keeps_bfloat16(tmp_path):
    t = {k: v.astype(BF16) for k, v in qwen2_tensors().items()}
    os.makedirs(tmp_path / "bf")
    write_raw_safetensors(str(tmp_path / "bf" / "model.safetensors"), t)
    with open(tmp_path / "bf" / "config.json", "w") as f:
        json.dump(QWEN2_CONFIG, f)
    layer = MoELayer.from_safetensors(tmp_path / "bf", 1)
    assert layer.w_gate.dtype == BF16 and layer.dtype == BF16
    want = np.stack([t[P + f"experts.{e}.gate_proj.weight"].T for e in range(E)])
    assert np.array_equal(layer.w_gate.view(np.uint16), want.view(np.uint16))
    # float32 activations on the bfloat16 weights (no float32 copy of the experts)
    l32 = MoELayer.from_safetensors(tmp_path / "bf", 1, dtype=np.float32)
    assert (l32.dtype, l32.weight_dtype) == (np.float32, BF16)
    x = x_tokens()
    ref = numoe.reference.moe_forward(x, top_k=K, **l32.weights())
    assert rel_err(l32(x), ref) < TOL


def save_raw_checkpoint(path, tensors, config):
    os.makedirs(path, exist_ok=True)
    write_raw_safetensors(os.path.join(path, "model.safetensors"), tensors)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


def fp8_by_hand(w8, scale, bn, bk):
    """Block-wise dequantisation written as a loop over the blocks."""
    out = w8.astype(np.float32)
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            out[r * bn:(r + 1) * bn, c * bk:(c + 1) * bk] *= scale[r, c]
    return out


def test_deepseek_fp8_checkpoint(tmp_path):
    """DeepSeek-V3 as published: FP8 experts with 128x128-block scales (here 4x8 blocks,
    sizes not multiples of them), bfloat16 router, float32 selection bias."""
    E_, H_, F_, bn, bk = 8, 12, 10, 4, 8
    rng = np.random.default_rng(7)
    cfg = {"model_type": "deepseek_v3", "num_hidden_layers": 2, "first_k_dense_replace": 1,
           "n_routed_experts": E_, "num_experts_per_tok": 2, "hidden_size": H_,
           "moe_intermediate_size": F_, "n_group": 2, "topk_group": 1,
           "routed_scaling_factor": 2.5, "n_shared_experts": 1, "norm_topk_prob": True,
           "hidden_act": "silu",
           "quantization_config": {"quant_method": "fp8", "weight_block_size": [bn, bk]}}
    p = "model.layers.1.mlp."
    t, want = {}, {}

    def fp8_weight(name, out_dim, in_dim):
        w8 = (rng.standard_normal((out_dim, in_dim)) * 2).astype(FP8)
        sc = rng.uniform(0.05, 0.3, (-(-out_dim // bn), -(-in_dim // bk))).astype(np.float32)
        t[p + name], t[p + name + "_scale_inv"] = w8, sc
        want[name] = fp8_by_hand(w8, sc, bn, bk)

    for e in range(E_):
        for proj, o, i in (("gate_proj", F_, H_), ("up_proj", F_, H_), ("down_proj", H_, F_)):
            fp8_weight(f"experts.{e}.{proj}.weight", o, i)
    for proj, o, i in (("gate_proj", F_, H_), ("up_proj", F_, H_), ("down_proj", H_, F_)):
        fp8_weight(f"shared_experts.{proj}.weight", o, i)
    t[p + "gate.weight"] = rng.standard_normal((E_, H_)).astype(BF16)
    t[p + "gate.e_score_correction_bias"] = rng.normal(0, 0.1, E_).astype(np.float32)
    save_raw_checkpoint(tmp_path / "ds", t, cfg)

    layer = MoELayer.from_safetensors(tmp_path / "ds", 1, weight_dtype=np.float32)
    ex = lambda proj: np.stack([want[f"experts.{e}.{proj}.weight"].T  # noqa: E731
                                for e in range(E_)])
    assert np.array_equal(layer.w_gate, ex("gate_proj"))
    assert np.array_equal(layer.w_up, ex("up_proj"))
    assert np.array_equal(layer.w_down, ex("down_proj"))
    assert np.array_equal(layer.shared_down_proj, want["shared_experts.down_proj.weight"].T)
    assert np.array_equal(layer.router, t[p + "gate.weight"].astype(np.float32).T)
    assert np.array_equal(layer.selection_bias, t[p + "gate.e_score_correction_bias"])
    x = np.random.default_rng(8).standard_normal((16, H_)).astype(np.float32)
    ref = numoe.reference.moe_forward(x, top_k=2, **layer.weights())
    assert rel_err(layer(x), ref) < TOL
    # default: dequantized to bfloat16, as HF does
    lb = MoELayer.from_safetensors(tmp_path / "ds", 1)
    assert lb.w_gate.dtype == BF16
    assert np.array_equal(lb.w_gate.astype(np.float32),
                          ex("gate_proj").astype(BF16).astype(np.float32))
    # a float8 tensor without its scales, and an unsupported quantization method
    del t[p + "experts.5.up_proj.weight_scale_inv"]
    save_raw_checkpoint(tmp_path / "bad", t, cfg)
    with pytest.raises(TypeError, match="experts.5.up_proj.weight_scale_inv"):
        MoELayer.from_safetensors(tmp_path / "bad", 1)
    with pytest.raises(ValueError, match="quant_method 'awq'"):
        MoELayer.from_safetensors(tmp_path / "ds", 1, config={
            **cfg, "quantization_config": {"quant_method": "awq"}})


FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def mxfp4_by_hand(blocks, scales):
    """[E, N, G, 16] bytes + [E, N, G] exponents -> [E, K, N] float32, element by element."""
    E_, N, G, _ = blocks.shape
    out = np.zeros((E_, N, 32 * G), np.float32)
    for e, n, g, j in np.ndindex(E_, N, G, 16):
        byte = int(blocks[e, n, g, j])
        for half, nib in ((0, byte & 15), (1, byte >> 4)):
            v = (-1.0 if nib & 8 else 1.0) * FP4[nib & 7] * 2.0 ** (int(scales[e, n, g]) - 127)
            out[e, n, 32 * g + 2 * j + half] = v
    return out.transpose(0, 2, 1)


def test_dequantize_mxfp4_known_values():
    blocks = np.zeros((1, 1, 1, 16), np.uint8)
    blocks[0, 0, 0, 0] = 0x21            # low nibble 1 -> 0.5, high nibble 2 -> 1.0
    blocks[0, 0, 0, 1] = 0xF9            # 9 -> -0.5, 15 -> -6.0
    scales = np.full((1, 1, 1), 128, np.uint8)           # x 2
    w = loading.dequantize_mxfp4(blocks, scales, np.float32)
    assert w.shape == (1, 32, 1)
    assert w[0, :4, 0].tolist() == [1.0, 2.0, -1.0, -12.0]
    assert not w[0, 4:].any()
    with pytest.raises(ValueError, match="blocks must be"):
        loading.dequantize_mxfp4(blocks[..., :8], scales)
    with pytest.raises(TypeError, match="uint8"):
        loading.dequantize_mxfp4(blocks.astype(np.int16), scales)


def gpt_oss_mxfp4_checkpoint(path, E_=4, H_=64, F_=32, seed=9):
    """gpt-oss as published: MXFP4 experts, bfloat16 router and biases."""
    rng = np.random.default_rng(seed)
    p = "model.layers.0.mlp."
    t = {p + "router.weight": (rng.standard_normal((E_, H_)) * 0.2).astype(BF16),
         p + "router.bias": rng.normal(0, 0.1, E_).astype(BF16),
         p + "experts.gate_up_proj_bias": rng.normal(0, 0.1, (E_, 2 * F_)).astype(BF16),
         p + "experts.down_proj_bias": rng.normal(0, 0.1, (E_, H_)).astype(BF16)}
    for name, n, k in (("gate_up_proj", 2 * F_, H_), ("down_proj", H_, F_)):
        t[p + f"experts.{name}_blocks"] = rng.integers(0, 256, (E_, n, k // 32, 16), np.uint8)
        t[p + f"experts.{name}_scales"] = rng.integers(122, 127, (E_, n, k // 32), np.uint8)
    cfg = {"model_type": "gpt_oss", "num_hidden_layers": 1, "num_local_experts": E_,
           "experts_per_token": 2, "num_experts_per_tok": 2, "hidden_size": H_,
           "intermediate_size": F_, "swiglu_limit": 7.0,
           "quantization_config": {"quant_method": "mxfp4"}}
    save_raw_checkpoint(path, t, cfg)
    return t, p


def test_gpt_oss_mxfp4_checkpoint(tmp_path):
    t, p = gpt_oss_mxfp4_checkpoint(tmp_path / "oss")
    layer = MoELayer.from_safetensors(tmp_path / "oss", 0)
    assert layer.w_gate.dtype == BF16
    gu = mxfp4_by_hand(t[p + "experts.gate_up_proj_blocks"], t[p + "experts.gate_up_proj_scales"])
    down = mxfp4_by_hand(t[p + "experts.down_proj_blocks"], t[p + "experts.down_proj_scales"])
    as32 = lambda a: np.asarray(a).astype(np.float32)  # noqa: E731
    assert np.array_equal(as32(layer.w_gate), gu[..., 0::2])        # exact in bfloat16
    assert np.array_equal(as32(layer.w_up), gu[..., 1::2])
    assert np.array_equal(as32(layer.w_down), down)
    assert np.array_equal(as32(layer.b_up), as32(t[p + "experts.gate_up_proj_bias"])[:, 1::2])
    l32 = MoELayer.from_safetensors(tmp_path / "oss", 0, weight_dtype=np.float32)
    x = np.random.default_rng(10).standard_normal((16, 64)).astype(np.float32)
    ref = numoe.reference.moe_forward(x, top_k=2, **l32.weights())
    assert rel_err(l32(x), ref) < TOL


def test_config_from_hf_and_moe_layers():
    cfg = loading.config_from_hf(QWEN2_CONFIG)
    assert cfg == MoEConfig.qwen2_moe(num_experts=E, top_k=K, hidden_dim=H, expert_dim=F,
                                      shared_expert_dim=S)
    assert loading.moe_layer_indices(QWEN2_CONFIG) == [1]
    assert loading.moe_layer_indices({**QWEN2_CONFIG, "num_hidden_layers": 6,
                                      "mlp_only_layers": [3]}) == [1, 5]
    ds = {"model_type": "deepseek_v3", "num_hidden_layers": 5, "first_k_dense_replace": 3,
          "n_routed_experts": 16, "num_experts_per_tok": 4, "hidden_size": 8,
          "moe_intermediate_size": 4, "n_group": 4, "topk_group": 2,
          "routed_scaling_factor": 2.5, "n_shared_experts": 2, "norm_topk_prob": True}
    c = loading.config_from_hf(ds)
    assert (c.score, c.n_groups, c.topk_groups, c.scale, c.selection_bias) == \
        ("sigmoid", 4, 2, 2.5, True)
    assert (c.num_shared_experts, c.shared_expert_dim) == (2, 8)
    assert loading.moe_layer_indices(ds) == [3, 4]
    sw = {"model_type": "switch_transformers", "num_experts": 8, "d_model": 8, "d_ff": 16,
          "num_layers": 4, "num_sparse_encoder_layers": 2, "dense_act_fn": "gelu_new"}
    c = loading.config_from_hf(sw)
    assert (c.glu, c.activation, c.capacity_factor, c.top_k) == (False, "gelu_tanh", None, 1)
    assert loading.moe_layer_indices(sw) == [1, 3]
    g = loading.config_from_hf({"model_type": "gpt_oss", "num_local_experts": 4,
                                "num_experts_per_tok": 2, "hidden_size": 8,
                                "intermediate_size": 4, "swiglu_limit": 5.0})
    assert (g.activation, g.limit, g.router_bias, g.expert_bias) == \
        ("swiglu_oai", 5.0, True, True)


def test_bad_input(qwen2_dir, tmp_path):
    t = qwen2_tensors()
    with pytest.raises(ValueError, match="layer_index 0 is a dense"):
        MoELayer.from_safetensors(qwen2_dir, 0)
    with pytest.raises(ValueError, match=r"layer_index must be in \[0, 2\)"):
        MoELayer.from_safetensors(qwen2_dir, 2)
    with pytest.raises(ValueError, match="layer_index must be in"):
        MoELayer.from_safetensors(qwen2_dir, -1)
    with pytest.raises(TypeError, match="layer_index"):
        MoELayer.from_safetensors(qwen2_dir, "1")
    with pytest.raises(ValueError, match="path"):
        MoELayer.from_safetensors(tmp_path / "nowhere", 1)
    with pytest.raises(ValueError, match="config.json"):
        MoELayer.from_safetensors(tmp_path, 1)
    with pytest.raises(ValueError, match="model_type"):
        MoELayer.from_safetensors(qwen2_dir, 1, config={**QWEN2_CONFIG, "model_type": "llama"})
    with pytest.raises(ValueError, match="family must be one of"):
        MoELayer.from_state_dict(t, QWEN2_CONFIG, prefix=P, family="llama")
    with pytest.raises(ValueError, match="contradicts"):
        MoELayer.from_state_dict(t, QWEN2_CONFIG, prefix=P, family="mixtral")
    with pytest.raises(ValueError, match="family is required"):
        MoELayer.from_state_dict({"x": t[P + "gate.weight"]}, by_hand(t).config)
    with pytest.raises(ValueError, match="no 'model.layers.0.mlp.gate.weight'"):
        MoELayer.from_state_dict(t, QWEN2_CONFIG, prefix="model.layers.0.mlp.")
    missing = dict(t)
    del missing[P + "experts.4.up_proj.weight"]
    with pytest.raises(ValueError, match="experts.4.up_proj.weight"):
        MoELayer.from_state_dict(missing, QWEN2_CONFIG, prefix=P)
    bad = dict(t)
    bad[P + "experts.2.down_proj.weight"] = t[P + "experts.2.down_proj.weight"].T
    with pytest.raises(ValueError, match=r"experts.2.down_proj.weight.*shape \(8, 12\)"):
        MoELayer.from_state_dict(bad, QWEN2_CONFIG, prefix=P)
    ints = dict(t)
    ints[P + "gate.weight"] = np.zeros((E, H), np.int8)
    with pytest.raises(TypeError, match="gate.weight.*float"):
        MoELayer.from_state_dict(ints, QWEN2_CONFIG, prefix=P)
    with pytest.raises(TypeError, match="state_dict"):
        MoELayer.from_state_dict(list(t.items()), QWEN2_CONFIG)
    with pytest.raises(TypeError, match="config"):
        MoELayer.from_state_dict(t, 42, prefix=P)
    with pytest.raises(ValueError, match="hidden_size"):
        MoELayer.from_state_dict(t, {k: v for k, v in QWEN2_CONFIG.items()
                                     if k != "hidden_size"}, prefix=P)
    with pytest.raises(TypeError, match="unknown MoEConfig field"):
        MoELayer.from_state_dict(t, QWEN2_CONFIG, prefix=P, capacity=3)
    with pytest.raises(TypeError, match="block"):
        MoELayer.from_hf(object())
    with pytest.raises(ValueError, match="activation"):
        loading.config_from_hf({**QWEN2_CONFIG, "model_type": "olmoe", "intermediate_size": 4,
                                "hidden_act": "mish"})
    assert t[P + "gate.weight"].flags.writeable          # inputs untouched
    assert np.array_equal(t[P + "gate.weight"], qwen2_tensors()[P + "gate.weight"])


# ======================================================================
# Part 2: parity with tiny transformers models
# ======================================================================
try:
    import torch
    import transformers
    HAVE_HF = True
except ImportError:                      # the parity extra is not installed
    HAVE_HF = False



def parity(test):
    """Mark a test as a transformers parity test, skipped without the parity extra."""
    skip = pytest.mark.skipif(not HAVE_HF, reason="needs torch and transformers (parity extra)")
    return pytest.mark.parity(skip(test))


COMMON = dict(vocab_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              hidden_size=16)
MODELS = {   # family: (config class, model class, MoE options; layer 1 is MoE, 0 dense if any)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=32, moe_intermediate_size=24,
                       shared_expert_intermediate_size=40, num_experts=8,
                       num_experts_per_tok=3, decoder_sparse_step=2, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=32, moe_intermediate_size=24, num_experts=8,
                       num_experts_per_tok=2, decoder_sparse_step=2, norm_topk_prob=True,
                       head_dim=8)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=24, num_experts=8, num_experts_per_tok=4)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=32, moe_intermediate_size=24, n_routed_experts=16,
                         num_experts_per_tok=4, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, first_k_dense_replace=1,
                         n_shared_experts=1, kv_lora_rank=8, q_lora_rank=8,
                         qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                     head_dim=8)),
}
SWITCH = dict(vocab_size=32, d_model=16, d_ff=24, d_kv=8, num_heads=2, num_layers=2,
              num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
              num_experts=4, expert_capacity=64, router_bias=True)
ALL = list(MODELS) + ["switch_transformers"]
DISK_PREFIX = {"mixtral": "model.layers.1.block_sparse_moe.",
               "switch_transformers": "encoder.block.1.layer.1.mlp."}
MEM_PREFIX = {"switch_transformers": "encoder.block.1.layer.1.mlp."}


def moe_block(model, family):
    if family == "switch_transformers":
        return model.encoder.block[1].layer[1].mlp
    return model.model.layers[1].mlp


def build_model(family, seed=0):
    """A tiny random model of ``family`` (eval mode), its MoE block randomised."""
    torch.manual_seed(seed)
    if family == "switch_transformers":
        model = transformers.SwitchTransformersForConditionalGeneration(
            transformers.SwitchTransformersConfig(**SWITCH))
    else:
        cfg_cls, model_cls, kw = MODELS[family]
        model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**COMMON, **kw))
    model.eval()
    block = moe_block(model, family)
    g = torch.Generator().manual_seed(seed + 1)
    std = 1.0 if family == "gpt_oss" else 0.5          # gpt-oss: the clamp at 7 bites
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
        if family == "deepseek_v3":
            block.gate.e_score_correction_bias.copy_(torch.randn(16, generator=g) * 0.2)
    return model


def run_block(block, x):
    with torch.inference_mode():
        out = block(torch.from_numpy(x))
    return (out[0] if isinstance(out, tuple) else out).float().numpy()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """family -> (model, checkpoint directory), built and saved once per module."""
    if not HAVE_HF:
        pytest.skip("needs torch and transformers")
    cache = {}

    def get(family):
        if family not in cache:
            model = build_model(family)
            path = tmp_path_factory.mktemp(family)
            model.save_pretrained(path)
            cache[family] = (model, path)
        return cache[family]
    return get


def hf_x(seed=0, T=20, batch=2, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((batch, T, 16)).astype(dtype)


@parity
@pytest.mark.parametrize("family", ALL)
def test_from_hf(hf_models, family):
    model, _ = hf_models(family)
    block = moe_block(model, family)
    layer = MoELayer.from_hf(block)
    x = hf_x()
    assert layer.dtype == np.float32
    assert rel_err(layer(x), run_block(block, x)) < TOL
    if family == "gpt_oss":                              # the clamp is exercised
        assert np.abs(x.reshape(-1, 16) @ layer.w_gate[0] + layer.b_gate[0]).max() > 7.0
    if family == "deepseek_v3":
        c = layer.config
        assert (c.n_groups, c.topk_groups, c.scale, c.score) == (4, 2, 2.5, "sigmoid")
        assert np.array_equal(layer.selection_bias,
                              block.gate.e_score_correction_bias.numpy())


@parity
@pytest.mark.parametrize("family", ALL)
def test_from_safetensors(hf_models, family):
    model, path = hf_models(family)
    block = moe_block(model, family)
    layer = MoELayer.from_safetensors(path, 1)
    assert layer.config == MoELayer.from_hf(block).config
    x = hf_x(1)
    assert rel_err(layer(x), run_block(block, x)) < TOL


@parity
@pytest.mark.parametrize("family", ALL)
def test_from_state_dict(hf_models, family):
    from safetensors.torch import load_file

    model, path = hf_models(family)
    block = moe_block(model, family)
    x = hf_x(2)
    ref = run_block(block, x)
    with open(path / "config.json") as f:
        config = json.load(f)
    # (1) checkpoint names, torch tensors, config.json contents
    disk = load_file(path / "model.safetensors")
    a = MoELayer.from_state_dict(disk, config,
                                 prefix=DISK_PREFIX.get(family, "model.layers.1.mlp."))
    # (2) the live model's state_dict (transformers 5: fused experts), its config object
    b = MoELayer.from_state_dict(model.state_dict(), model.config,
                                 prefix=MEM_PREFIX.get(family, "model.layers.1.mlp."))
    # (3) the block's own parameters (requires_grad tensors), a numoe config
    c = MoELayer.from_state_dict({**dict(block.named_parameters()), **dict(block.named_buffers())},
                                 a.config, family=family)
    for layer in (a, b, c):
        assert rel_err(layer(x), ref) < TOL
    assert_same_weights(a, b)


@parity
@pytest.mark.parametrize("family", ALL)
def test_float64(family):
    model = build_model(family)                 # a fresh copy to convert
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")   # grouped_mm has no float64
    block = moe_block(model, family).double()
    layer = MoELayer.from_hf(block)
    assert layer.dtype == np.float64
    x = hf_x(3, dtype=np.float64)
    ref = run_block(block, x)
    y = layer(x)
    # HF computes the router scores in float32 whatever the model dtype
    assert rel_err(y, ref) < 1e-6
    oracle = numoe.reference.moe_forward(x, top_k=layer.config.top_k, **layer.weights())
    assert rel_err(y, oracle) < 1e-12


@parity
def test_sharded_checkpoint(hf_models, tmp_path):
    model, path = hf_models("deepseek_v3")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) >= 3
    a = MoELayer.from_safetensors(tmp_path, 1)
    b = MoELayer.from_safetensors(path, 1)
    assert_same_weights(a, b)
    assert np.array_equal(a.selection_bias, b.selection_bias)


@parity
def test_dense_layers_rejected(hf_models):
    for family in ("qwen2_moe", "deepseek_v3"):
        _, path = hf_models(family)
        with pytest.raises(ValueError, match="layer_index 0 is a dense"):
            MoELayer.from_safetensors(path, 0)
    _, path = hf_models("mixtral")
    with pytest.raises(ValueError, match="layer_index must be in"):
        MoELayer.from_safetensors(path, 2)


@parity
def test_from_hf_accepts_decoder_layer_and_rejects_others(hf_models):
    model, _ = hf_models("olmoe")
    layer = MoELayer.from_hf(model.model.layers[1])          # its .mlp is the block
    assert layer.config == MoELayer.from_hf(model.model.layers[1].mlp).config
    with pytest.raises(TypeError, match="block"):
        MoELayer.from_hf(model.model.layers[1].self_attn)
    block = build_model("mixtral")
    block = moe_block(block.train(), "mixtral")
    with pytest.warns(UserWarning, match="training mode"):
        MoELayer.from_hf(block)


@parity
def test_switch_capacity_per_sequence():
    """HF caps each expert at expert_capacity tokens per sequence; numoe reproduces it for
    one sequence with capacity_factor = expert_capacity * E / T."""
    torch.manual_seed(3)
    cfg = transformers.SwitchTransformersConfig(**{**SWITCH, "expert_capacity": 5})
    block = transformers.SwitchTransformersForConditionalGeneration(cfg).eval()
    block = block.encoder.block[1].layer[1].mlp
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    T = 32
    layer = MoELayer.from_hf(block, capacity_factor=5 * 4 / T)
    x = hf_x(4, T=T, batch=1)
    y, info = layer.forward(x, return_info=True)
    assert info["plan"].capacity == 5 and info["plan"].dropped.any()
    assert rel_err(y, run_block(block, x)) < TOL
    assert MoELayer.from_hf(block).config.capacity_factor is None       # default: dropless


@parity
def test_bfloat16_conversion_bit_exact(tmp_path):
    model = build_model("mixtral").to(torch.bfloat16)
    block = moe_block(model, "mixtral")
    gu = block.experts.gate_up_proj
    a = loading._to_numpy("gate_up_proj", gu)
    assert a.dtype == BF16
    assert np.array_equal(a.view(np.int16), gu.detach().view(torch.int16).numpy())
    # the checkpoint, read with NumPy: the same bits (BF16 -> float32 exactly here)
    model.save_pretrained(tmp_path)
    layer = MoELayer.from_safetensors(tmp_path, 1, weight_dtype=np.float32)
    F_ = gu.shape[1] // 2
    want = gu.detach().float().numpy()[:, :F_].transpose(0, 2, 1)
    assert np.array_equal(layer.w_gate, want)


@parity
@needs_bf16_layer
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_bfloat16_layer(family, tmp_path):
    model = build_model(family).to(torch.bfloat16)
    block = moe_block(model, family)
    a = MoELayer.from_hf(block)
    assert a.w_gate.dtype == BF16
    model.save_pretrained(tmp_path)
    b = MoELayer.from_safetensors(tmp_path, 1)
    assert b.w_gate.dtype == BF16
    assert np.array_equal(a.w_gate.view(np.uint16), b.w_gate.view(np.uint16))
    # numoe computes in float32 on the bfloat16 weights: compare with HF in float32 on
    # the same (rounded) weights and inputs
    x = hf_x(5).astype(BF16)
    ref = run_block(moe_block(model, family).float(), x.astype(np.float32))
    assert rel_err(a(x), ref) < 1e-2          # measured 1.7e-3: bfloat16 output rounding



@parity
def test_dequantizers_match_transformers():
    """numoe's FP8 and MXFP4 dequantisation against transformers' own (CPU) code."""
    from transformers.integrations import finegrained_fp8, mxfp4

    rng = np.random.default_rng(11)
    blocks = rng.integers(0, 256, (3, 8, 2, 16), np.uint8)
    scales = rng.integers(100, 140, (3, 8, 2), np.uint8)
    want = mxfp4.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                            dtype=torch.bfloat16)
    got = loading.dequantize_mxfp4(blocks, scales)
    assert got.shape == tuple(want.shape)
    assert np.array_equal(got.view(np.int16), want.view(torch.int16).numpy())
    deq = getattr(finegrained_fp8, "_dequantize_fp8_weight", None)
    if deq is None:
        pytest.skip("this transformers has no FP8 dequantisation helper to compare with")
    w8 = (rng.standard_normal((10, 12)) * 3).astype(FP8)
    sc = rng.uniform(0.05, 0.3, (3, 2)).astype(np.float32)
    w8_t = torch.from_numpy(w8.view(np.uint8)).view(torch.float8_e4m3fn)
    want = deq(w8_t, torch.from_numpy(sc), [4, 8], torch.float32).numpy()
    assert np.array_equal(loading.dequantize_fp8(w8, sc, (4, 8)), want)
    assert np.array_equal(fp8_by_hand(w8, sc, 4, 8), want)


@parity
def test_gpt_oss_mxfp4_matches_hf_block(tmp_path):
    """The dequantized MXFP4 layer equals HF's GptOssMLP holding the same weights."""
    t, p = gpt_oss_mxfp4_checkpoint(tmp_path / "oss")
    layer = MoELayer.from_safetensors(tmp_path / "oss", 0, weight_dtype=np.float32)
    from transformers.integrations import mxfp4
    from transformers.models.gpt_oss import modeling_gpt_oss as m

    block = m.GptOssMLP(m.GptOssConfig(hidden_size=64, intermediate_size=32,
                                       num_local_experts=4, num_experts_per_tok=2)).eval()
    tt = lambda a: torch.from_numpy(np.asarray(a).astype(np.float32))  # noqa: E731

    def deq(name):
        return mxfp4.convert_moe_packed_tensors(torch.from_numpy(t[p + f"experts.{name}_blocks"]),
                                                torch.from_numpy(t[p + f"experts.{name}_scales"]),
                                                dtype=torch.float32)

    with torch.no_grad():
        block.router.weight.copy_(tt(t[p + "router.weight"]))
        block.router.bias.copy_(tt(t[p + "router.bias"]))
        block.experts.gate_up_proj.copy_(deq("gate_up_proj"))
        block.experts.down_proj.copy_(deq("down_proj"))
        block.experts.gate_up_proj_bias.copy_(tt(t[p + "experts.gate_up_proj_bias"]))
        block.experts.down_proj_bias.copy_(tt(t[p + "experts.down_proj_bias"]))
    x = np.random.default_rng(12).standard_normal((1, 16, 64)).astype(np.float32)
    assert rel_err(layer(x), run_block(block, x)) < TOL


@parity
def test_switch_decoder_block_with_prefix(hf_models):
    model, path = hf_models("switch_transformers")
    block = model.decoder.block[1].layer[2].mlp
    layer = MoELayer.from_safetensors(path, 1, prefix="decoder.block.{i}.layer.2.mlp.")
    x = hf_x(6, batch=1)
    assert rel_err(layer(x), run_block(block, x)) < TOL
    with pytest.raises(ValueError, match="no MoE router tensor"):
        MoELayer.from_safetensors(path, 0, prefix="decoder.block.{i}.layer.2.mlp.")


@parity
def test_from_hf_transformers4_style_block(hf_models):
    """A block keeping one module per expert (transformers 4 layout: gate a Linear, experts
    a ModuleList of w1/w2/w3 MLPs) loads like the fused transformers 5 block."""
    model, _ = hf_models("mixtral")
    fused = moe_block(model, "mixtral")
    nn = torch.nn
    E_, F2, H_ = fused.experts.gate_up_proj.shape

    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Linear(H_, F2 // 2, bias=False)
            self.w2 = nn.Linear(F2 // 2, H_, bias=False)
            self.w3 = nn.Linear(H_, F2 // 2, bias=False)
            self.act_fn = nn.SiLU()

    class MixtralSparseMoeBlock(nn.Module):           # the transformers 4 class name
        def __init__(self):
            super().__init__()
            self.top_k = 2
            self.gate = nn.Linear(H_, E_, bias=False)
            self.experts = nn.ModuleList([Expert() for _ in range(E_)])

    old = MixtralSparseMoeBlock().eval()
    with torch.no_grad():
        old.gate.weight.copy_(fused.gate.weight)
        for e, ex in enumerate(old.experts):
            ex.w1.weight.copy_(fused.experts.gate_up_proj[e, :F2 // 2])
            ex.w3.weight.copy_(fused.experts.gate_up_proj[e, F2 // 2:])
            ex.w2.weight.copy_(fused.experts.down_proj[e])
    a, b = MoELayer.from_hf(old), MoELayer.from_hf(fused)
    assert a.config == b.config
    assert_same_weights(a, b)
