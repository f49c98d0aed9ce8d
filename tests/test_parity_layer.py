"""Parity with the Hugging Face transformers MoE blocks (PyTorch, CPU, float32).

Each test builds the HF block of one model family from a tiny config with
random weights, copies the weights into a :class:`numoe.MoELayer` (HF keeps
``[out, in]`` matrices: they are transposed to the "x @ W" layout, and
gpt-oss's interleaved gate/up columns are split), runs both on the same
input and checks the relative error. Skipped without torch/transformers.
"""
import numpy as np
import pytest

from numoe import MoEConfig, MoELayer

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.parity

TOL = 1e-5        # relative error (Frobenius), float32


def rel_err(y, ref):
    return float(np.linalg.norm(y.astype(np.float64) - ref) / np.linalg.norm(ref))


def np32(t):
    return t.detach().numpy().astype(np.float32)


def init_(module, seed, std=0.3):
    """Random weights for every parameter and buffer of ``module``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    module.eval()
    return module


def glu_experts(ex):
    """HF ``gate_up_proj [E, 2F, H]`` (gate rows first) and ``down_proj [E, H, F]``."""
    gu = np32(ex.gate_up_proj)
    F = gu.shape[1] // 2
    return dict(w_gate=gu[:, :F].transpose(0, 2, 1), w_up=gu[:, F:].transpose(0, 2, 1),
                w_down=np32(ex.down_proj).transpose(0, 2, 1))


def shared_mlp(mlp):
    return dict(shared_gate_proj=np32(mlp.gate_proj.weight).T,
                shared_up_proj=np32(mlp.up_proj.weight).T,
                shared_down_proj=np32(mlp.down_proj.weight).T)


def compare(block, layer, T, H, seed=0, batch=1):
    x = np.random.default_rng(seed).standard_normal((batch, T, H)).astype(np.float32)
    with torch.inference_mode():
        out = block(torch.from_numpy(x))
    out = out[0] if isinstance(out, tuple) else out
    y = layer(x)
    assert y.shape == tuple(out.shape)
    err = rel_err(y, out.numpy().astype(np.float64))
    assert err < TOL, err
    return err


E, K, H, F, T = 8, 2, 16, 24, 40


def test_mixtral():
    from transformers.models.mixtral import modeling_mixtral as m
    block = init_(m.MixtralSparseMoeBlock(m.MixtralConfig(
        hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K)), 1)
    cfg = MoEConfig.mixtral(num_experts=E, top_k=K, hidden_dim=H, expert_dim=F)
    layer = MoELayer(cfg, router=np32(block.gate.weight).T, **glu_experts(block.experts))
    compare(block, layer, T, H, batch=2)


def test_qwen2_moe_shared_expert_and_gate():
    from transformers.models.qwen2_moe import modeling_qwen2_moe as m
    S = 40
    block = init_(m.Qwen2MoeSparseMoeBlock(m.Qwen2MoeConfig(
        hidden_size=H, moe_intermediate_size=F, shared_expert_intermediate_size=S,
        num_experts=E, num_experts_per_tok=4, norm_topk_prob=False)), 2)
    cfg = MoEConfig.qwen2_moe(num_experts=E, top_k=4, hidden_dim=H, expert_dim=F,
                              shared_expert_dim=S)
    layer = MoELayer(cfg, router=np32(block.gate.weight).T, **glu_experts(block.experts),
                     **shared_mlp(block.shared_expert),
                     shared_gate_weight=np32(block.shared_expert_gate.weight)[0])
    compare(block, layer, T, H)


@pytest.mark.parametrize("norm", [True, False])
def test_qwen3_moe(norm):
    from transformers.models.qwen3_moe import modeling_qwen3_moe as m
    block = init_(m.Qwen3MoeSparseMoeBlock(m.Qwen3MoeConfig(
        hidden_size=H, moe_intermediate_size=F, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=norm)), 3)
    cfg = MoEConfig.qwen3_moe(num_experts=16, top_k=4, hidden_dim=H, expert_dim=F,
                              renormalize=norm)
    layer = MoELayer(cfg, router=np32(block.gate.weight).T, **glu_experts(block.experts))
    compare(block, layer, T, H)


def test_olmoe():
    from transformers.models.olmoe import modeling_olmoe as m
    block = init_(m.OlmoeSparseMoeBlock(m.OlmoeConfig(
        hidden_size=H, intermediate_size=F, num_experts=16, num_experts_per_tok=8)), 4)
    cfg = MoEConfig.olmoe(num_experts=16, top_k=8, hidden_dim=H, expert_dim=F)
    layer = MoELayer(cfg, router=np32(block.gate.weight).T, **glu_experts(block.experts))
    compare(block, layer, T, H, batch=3)


def test_deepseek_v3_groups_bias_scaling_shared():
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m
    block = init_(m.DeepseekV3MoE(m.DeepseekV3Config(
        hidden_size=H, moe_intermediate_size=F, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        n_shared_experts=1)), 5)
    bias = np.random.default_rng(5).normal(0, 0.2, 16).astype(np.float32)
    block.gate.e_score_correction_bias.copy_(torch.from_numpy(bias))
    cfg = MoEConfig.deepseek_v3(num_experts=16, top_k=4, hidden_dim=H, expert_dim=F,
                                n_groups=4, topk_groups=2)
    layer = MoELayer(cfg, router=np32(block.gate.weight).T, selection_bias=bias,
                     **glu_experts(block.experts), **shared_mlp(block.shared_experts))
    compare(block, layer, T, H)


def test_gpt_oss_interleaved_clamped_swiglu():
    from transformers.models.gpt_oss import modeling_gpt_oss as m
    block = init_(m.GptOssMLP(m.GptOssConfig(
        hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=4)), 6,
        std=1.0)                                   # big enough for the clamp at 7 to bite
    ex = block.experts
    gu, gub = np32(ex.gate_up_proj), np32(ex.gate_up_proj_bias)   # [E, H, 2F], [E, 2F]
    cfg = MoEConfig.gpt_oss(num_experts=E, top_k=4, hidden_dim=H, expert_dim=F)
    layer = MoELayer(cfg, router=np32(block.router.weight).T,
                     router_bias=np32(block.router.bias),
                     w_gate=gu[..., 0::2], w_up=gu[..., 1::2], w_down=np32(ex.down_proj),
                     b_gate=gub[:, 0::2], b_up=gub[:, 1::2], b_down=np32(ex.down_proj_bias))
    x = np.random.default_rng(0).standard_normal((T, H)).astype(np.float32)
    gate = x @ layer.w_gate[0] + layer.b_gate[0]
    assert np.abs(gate).max() > 7.0                # the clamp is exercised
    compare(block, layer, T, H)


def test_switch_top1_relu_capacity():
    from transformers.models.switch_transformers import modeling_switch_transformers as m
    cap, T_ = 5, 32
    block = init_(m.SwitchTransformersSparseMLP(m.SwitchTransformersConfig(
        d_model=H, d_ff=F, num_experts=4, expert_capacity=cap, router_bias=False,
        dense_act_fn="relu")), 7, std=0.5)
    w_in = np.stack([np32(block.experts[f"expert_{e}"].wi.weight).T for e in range(4)])
    w_out = np.stack([np32(block.experts[f"expert_{e}"].wo.weight).T for e in range(4)])
    # HF caps each expert at expert_capacity tokens per sequence: one sequence of T_
    # tokens and capacity_factor * T_ / E == cap exactly
    cfg = MoEConfig.switch(num_experts=4, hidden_dim=H, expert_dim=F,
                           capacity_factor=cap * 4 / T_)
    layer = MoELayer(cfg, router=np32(block.router.classifier.weight).T, w_gate=w_in,
                     w_down=w_out)
    x = np.random.default_rng(0).standard_normal((1, T_, H)).astype(np.float32)
    _, info = layer.forward(x, return_info=True)
    assert info["plan"].capacity == cap and info["plan"].dropped.any()
    compare(block, layer, T_, H)
