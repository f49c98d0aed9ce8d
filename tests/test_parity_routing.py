"""Parity of numoe.route and the balancing loss with HF transformers' MoE routers.

Tiny configs, routers built from random weights (nothing is downloaded).
Each router returns its logits; numoe.route on those logits must choose
the same experts with the same weights (float32 tolerance: HF computes in
float32, numoe in float64 then rounds).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import numoe  # noqa: E402

pytestmark = pytest.mark.parity

H = 32
TOL = dict(rtol=2e-5, atol=2e-6)


def _hidden(T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g)


def _randomise(router, seed, *names):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            p = getattr(router, name)
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return router


def _forward(router, x):
    with torch.no_grad():
        logits, weights, experts = router(x)
    return logits.float().numpy(), weights.float().numpy(), experts.numpy()


def _sorted_by_expert(weights, experts):
    """Rows reordered by expert id (for routers whose top-k is unsorted)."""
    o = np.argsort(experts, axis=1)
    return np.take_along_axis(weights, o, 1), np.take_along_axis(experts, o, 1)


def test_mixtral_router():
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    cfg = MixtralConfig(hidden_size=H, num_local_experts=8, num_experts_per_tok=2)
    router = _randomise(MixtralTopKRouter(cfg), 0, "weight")
    logits, w_hf, e_hf = _forward(router, _hidden(257, 1))
    r = numoe.route(logits, 2)                     # softmax, top-k, renormalise
    np.testing.assert_array_equal(r.experts, e_hf)
    np.testing.assert_allclose(r.weights, w_hf, **TOL)


@pytest.mark.parametrize("norm", [False, True])
def test_qwen2_moe_router(norm):
    from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    cfg = Qwen2MoeConfig(hidden_size=H, num_experts=12, num_experts_per_tok=4,
                         norm_topk_prob=norm)
    router = _randomise(Qwen2MoeTopKRouter(cfg), 2, "weight")
    logits, w_hf, e_hf = _forward(router, _hidden(200, 3))
    r = numoe.route(logits, 4, renormalize=norm)
    np.testing.assert_array_equal(r.experts, e_hf)
    np.testing.assert_allclose(r.weights, w_hf, **TOL)


def test_olmoe_router():
    from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

    cfg = OlmoeConfig(hidden_size=H, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False)
    router = _randomise(OlmoeTopKRouter(cfg), 4, "weight")
    logits, w_hf, e_hf = _forward(router, _hidden(200, 5))
    r = numoe.route(logits, 4, renormalize=False)
    np.testing.assert_array_equal(r.experts, e_hf)
    np.testing.assert_allclose(r.weights, w_hf, **TOL)


@pytest.mark.parametrize("n_group, topk_group, norm", [(4, 2, True), (8, 3, False), (1, 1, True)])
def test_deepseek_v3_router(n_group, topk_group, norm):
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    E, k = 32, 4
    cfg = DeepseekV3Config(hidden_size=H, n_routed_experts=E, num_experts_per_tok=k,
                           n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5,
                           norm_topk_prob=norm)
    router = _randomise(DeepseekV3TopkRouter(cfg), 6, "weight")
    with torch.no_grad():
        router.e_score_correction_bias.copy_(
            torch.randn(E, generator=torch.Generator().manual_seed(7)) * 0.1)
    logits, w_hf, e_hf = _forward(router, _hidden(300, 8))
    bias = router.e_score_correction_bias.numpy()
    r = numoe.route(logits, k, score="sigmoid", renormalize=norm, bias=bias, n_groups=n_group,
                    topk_groups=topk_group, group_score="top2", scale=2.5)
    # HF's top-k here is unsorted: compare as sets (rows ordered by expert id)
    w_hf, e_hf = _sorted_by_expert(w_hf, e_hf)
    w, e = _sorted_by_expert(r.weights, r.experts)
    np.testing.assert_array_equal(e, e_hf)
    np.testing.assert_allclose(w, w_hf, **TOL)


def test_gpt_oss_router():
    from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    cfg = GptOssConfig(hidden_size=H, num_local_experts=8, num_experts_per_tok=4)
    router = _randomise(GptOssTopKRouter(cfg), 9, "weight", "bias")
    x = _hidden(200, 10)
    logits, w_hf, e_hf = _forward(router, x)
    # the router bias is part of the logits (x @ W + b), not a selection bias
    np.testing.assert_allclose(
        logits, x.numpy() @ router.weight.detach().numpy().T + router.bias.detach().numpy(),
        rtol=1e-5, atol=1e-5)
    r = numoe.route(logits, 4)         # top-k of logits, softmax over the chosen == renormalise
    np.testing.assert_array_equal(r.experts, e_hf)
    np.testing.assert_allclose(r.weights, w_hf, **TOL)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_mixtral_load_balancing_loss_is_k_times_ours(k, with_mask):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    B, S, E = 3, 40, 8
    g = torch.Generator().manual_seed(11 + k)
    gate_logits = torch.randn(B * S, E, generator=g) * 2
    mask = (torch.rand(B, S, generator=g) < 0.7).long() if with_mask else None
    hf = float(load_balancing_loss_func((gate_logits,), E, k, attention_mask=mask))
    z = gate_logits.numpy()
    ours = numoe.load_balancing_loss(numoe.router_probs(z), numoe.route(z, k).experts,
                                     mask=None if mask is None else mask.numpy().reshape(-1))
    assert hf == pytest.approx(k * ours, rel=1e-5)
