"""Gradient parity with PyTorch autograd through the Hugging Face MoE blocks.

Each test builds one family's HF block with random weights, copies them
into a :class:`numoe.MoELayer` ("x @ W" layout), runs both forwards on the
same input, back-propagates the same ``d_y`` (``L = sum(y * d_y)``) and
compares ``d_x`` and every weight gradient (relative Frobenius error), in
float64 and float32. Skipped without torch/transformers.
"""
import numpy as np
import pytest

from numoe import MoEConfig, MoELayer

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.parity

# relative (Frobenius) error bounds per dtype. float64 is bounded by HF, not numoe:
# several HF routers take their softmax in float32 even in a float64 block
# (numoe's float64 gradients match finite differences to ~1e-9: test_backward.py)
TOL = {np.float64: 1e-6, np.float32: 2e-5}
DTYPES = [np.float64, np.float32]
E, K, H, F, T = 8, 2, 16, 24, 40


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def init_(module, seed, std=0.3, dtype=np.float64):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    module.eval()
    return module.double() if dtype == np.float64 else module.float()


def arr(t, dtype):
    return t.detach().numpy().astype(dtype)


def check(block, layer, grads_of, dtype, seed=0, tol=None, batch=1, T_=T):
    """Run both, compare ``d_x`` and the gradients ``grads_of(block) -> {name: array}``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, T_, layer.config.hidden_dim)).astype(dtype)
    d_y = rng.standard_normal(x.shape).astype(dtype)
    xt = torch.from_numpy(x).requires_grad_(True)
    out = block(xt)
    out = out[0] if isinstance(out, tuple) else out
    (out * torch.from_numpy(d_y)).sum().backward()
    y, info = layer.forward(x, return_info=True)
    assert rel_err(y, arr(out, np.float64)) < (tol or TOL[dtype])
    g = layer.backward(x, info, d_y)
    want = {"x": arr(xt.grad, np.float64), **grads_of(block)}
    assert set(want) <= set(g)
    errs = {name: rel_err(g[name], w) for name, w in want.items()}
    bad = {n: e for n, e in errs.items() if not e < (tol or TOL[dtype])}
    assert not bad, bad
    return errs


def glu_from(ex, dtype):
    gu = arr(ex.gate_up_proj, dtype)
    Fh = gu.shape[1] // 2
    return dict(w_gate=gu[:, :Fh].transpose(0, 2, 1), w_up=gu[:, Fh:].transpose(0, 2, 1),
                w_down=arr(ex.down_proj, dtype).transpose(0, 2, 1))


def glu_grads(ex):
    gu = arr(ex.gate_up_proj.grad, np.float64)
    Fh = gu.shape[1] // 2
    return dict(w_gate=gu[:, :Fh].transpose(0, 2, 1), w_up=gu[:, Fh:].transpose(0, 2, 1),
                w_down=arr(ex.down_proj.grad, np.float64).transpose(0, 2, 1))


def mlp_from(mlp, dtype):
    return dict(shared_gate_proj=arr(mlp.gate_proj.weight, dtype).T,
                shared_up_proj=arr(mlp.up_proj.weight, dtype).T,
                shared_down_proj=arr(mlp.down_proj.weight, dtype).T)


def mlp_grads(mlp):
    return dict(shared_gate_proj=arr(mlp.gate_proj.weight.grad, np.float64).T,
                shared_up_proj=arr(mlp.up_proj.weight.grad, np.float64).T,
                shared_down_proj=arr(mlp.down_proj.weight.grad, np.float64).T)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixtral(dtype):
    from transformers.models.mixtral import modeling_mixtral as m
    block = init_(m.MixtralSparseMoeBlock(m.MixtralConfig(
        hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K)), 1,
        dtype=dtype)
    cfg = MoEConfig.mixtral(num_experts=E, top_k=K, hidden_dim=H, expert_dim=F)
    layer = MoELayer(cfg, router=arr(block.gate.weight, dtype).T, **glu_from(block.experts, dtype))
    check(block, layer, lambda b: dict(router=arr(b.gate.weight.grad, np.float64).T,
                                       **glu_grads(b.experts)), dtype, batch=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qwen2_moe_shared_expert_gate(dtype):
    from transformers.models.qwen2_moe import modeling_qwen2_moe as m
    S = 40
    block = init_(m.Qwen2MoeSparseMoeBlock(m.Qwen2MoeConfig(
        hidden_size=H, moe_intermediate_size=F, shared_expert_intermediate_size=S,
        num_experts=E, num_experts_per_tok=4, norm_topk_prob=False)), 2, dtype=dtype)
    cfg = MoEConfig.qwen2_moe(num_experts=E, top_k=4, hidden_dim=H, expert_dim=F,
                              shared_expert_dim=S)
    layer = MoELayer(cfg, router=arr(block.gate.weight, dtype).T,
                     **glu_from(block.experts, dtype), **mlp_from(block.shared_expert, dtype),
                     shared_gate_weight=arr(block.shared_expert_gate.weight, dtype)[0])
    check(block, layer, lambda b: dict(
        router=arr(b.gate.weight.grad, np.float64).T, **glu_grads(b.experts),
        **mlp_grads(b.shared_expert),
        shared_gate_weight=arr(b.shared_expert_gate.weight.grad, np.float64)[0]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])
def test_qwen3_moe(dtype, norm):
    from transformers.models.qwen3_moe import modeling_qwen3_moe as m
    block = init_(m.Qwen3MoeSparseMoeBlock(m.Qwen3MoeConfig(
        hidden_size=H, moe_intermediate_size=F, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=norm)), 3, dtype=dtype)
    cfg = MoEConfig.qwen3_moe(num_experts=16, top_k=4, hidden_dim=H, expert_dim=F,
                              renormalize=norm)
    layer = MoELayer(cfg, router=arr(block.gate.weight, dtype).T, **glu_from(block.experts, dtype))
    check(block, layer, lambda b: dict(router=arr(b.gate.weight.grad, np.float64).T,
                                       **glu_grads(b.experts)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_olmoe(dtype):
    from transformers.models.olmoe import modeling_olmoe as m
    block = init_(m.OlmoeSparseMoeBlock(m.OlmoeConfig(
        hidden_size=H, intermediate_size=F, num_experts=16, num_experts_per_tok=8)), 4,
        dtype=dtype)
    cfg = MoEConfig.olmoe(num_experts=16, top_k=8, hidden_dim=H, expert_dim=F)
    layer = MoELayer(cfg, router=arr(block.gate.weight, dtype).T, **glu_from(block.experts, dtype))
    check(block, layer, lambda b: dict(router=arr(b.gate.weight.grad, np.float64).T,
                                       **glu_grads(b.experts)), dtype, batch=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deepseek_v3_groups_bias_scaling_shared(dtype):
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m
    block = init_(m.DeepseekV3MoE(m.DeepseekV3Config(
        hidden_size=H, moe_intermediate_size=F, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        n_shared_experts=1)), 5, dtype=dtype)
    bias = np.random.default_rng(5).normal(0, 0.2, 16).astype(np.float32)
    with torch.no_grad():
        block.gate.e_score_correction_bias.copy_(torch.from_numpy(bias))
    cfg = MoEConfig.deepseek_v3(num_experts=16, top_k=4, hidden_dim=H, expert_dim=F,
                                n_groups=4, topk_groups=2)
    layer = MoELayer(cfg, router=arr(block.gate.weight, dtype).T,
                     selection_bias=bias.astype(dtype), **glu_from(block.experts, dtype),
                     **mlp_from(block.shared_experts, dtype))
    # HF runs this router in float32 whatever the block's dtype
    check(block, layer, lambda b: dict(
        router=arr(b.gate.weight.grad, np.float64).T, **glu_grads(b.experts),
        **mlp_grads(b.shared_experts)), dtype, tol=5e-5 if dtype == np.float32 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt_oss_clamped_swiglu_biases(dtype):
    from transformers.models.gpt_oss import modeling_gpt_oss as m
    block = init_(m.GptOssMLP(m.GptOssConfig(
        hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=4)), 6,
        std=1.0, dtype=dtype)                      # big enough for the clamp at 7 to bite
    ex = block.experts
    gu, gub = arr(ex.gate_up_proj, dtype), arr(ex.gate_up_proj_bias, dtype)
    cfg = MoEConfig.gpt_oss(num_experts=E, top_k=4, hidden_dim=H, expert_dim=F)
    layer = MoELayer(cfg, router=arr(block.router.weight, dtype).T,
                     router_bias=arr(block.router.bias, dtype),
                     w_gate=gu[..., 0::2], w_up=gu[..., 1::2], w_down=arr(ex.down_proj, dtype),
                     b_gate=gub[:, 0::2], b_up=gub[:, 1::2],
                     b_down=arr(ex.down_proj_bias, dtype))

    def grads(b):
        e = b.experts
        g, gb = arr(e.gate_up_proj.grad, np.float64), arr(e.gate_up_proj_bias.grad, np.float64)
        return dict(router=arr(b.router.weight.grad, np.float64).T,
                    router_bias=arr(b.router.bias.grad, np.float64),
                    w_gate=g[..., 0::2], w_up=g[..., 1::2], b_gate=gb[:, 0::2],
                    b_up=gb[:, 1::2], w_down=arr(e.down_proj.grad, np.float64),
                    b_down=arr(e.down_proj_bias.grad, np.float64))
    check(block, layer, grads, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_switch_top1_relu_capacity(dtype):
    from transformers.models.switch_transformers import modeling_switch_transformers as m
    cap, T_ = 5, 32
    block = init_(m.SwitchTransformersSparseMLP(m.SwitchTransformersConfig(
        d_model=H, d_ff=F, num_experts=4, expert_capacity=cap, router_bias=False,
        dense_act_fn="relu")), 7, std=0.5, dtype=dtype)
    ex = [block.experts[f"expert_{e}"] for e in range(4)]
    cfg = MoEConfig.switch(num_experts=4, hidden_dim=H, expert_dim=F,
                           capacity_factor=cap * 4 / T_)
    layer = MoELayer(cfg, router=arr(block.router.classifier.weight, dtype).T,
                     w_gate=np.stack([arr(e.wi.weight, dtype).T for e in ex]),
                     w_down=np.stack([arr(e.wo.weight, dtype).T for e in ex]))
    x = np.random.default_rng(0).standard_normal((1, T_, H)).astype(dtype)
    assert layer.forward(x, return_info=True)[1]["plan"].dropped.any()
    check(block, layer, lambda b: dict(
        router=arr(b.router.classifier.weight.grad, np.float64).T,
        w_gate=np.stack([arr(e.wi.weight.grad, np.float64).T for e in ex]),
        w_down=np.stack([arr(e.wo.weight.grad, np.float64).T for e in ex])), dtype, T_=T_)
