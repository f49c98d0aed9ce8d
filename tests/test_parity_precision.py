"""bfloat16 parity with Hugging Face transformers (PyTorch, CPU, torch.bfloat16).

Per family: a numoe bf16 layer (activations and weights bfloat16) and HF's
block holding the same bf16 weights (built by :func:`numoe.bench.hf_block`)
run on the same bf16 input; both outputs are compared with the float64
reference on those rounded weights and input. numoe's error must be no
larger than PyTorch's: numoe accumulates in float32 and rounds once at the
end (router logits stay float32), PyTorch rounds every intermediate product
to bfloat16. Skipped without torch/transformers.
"""
import ml_dtypes
import numpy as np
import pytest

from numoe import MoEConfig, MoELayer
from numoe import reference as ref

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.parity

BF16 = np.dtype(ml_dtypes.bfloat16)
H, F, T = 64, 96, 48
FAMILIES = {
    "mixtral": MoEConfig.mixtral(num_experts=8, top_k=2, hidden_dim=H, expert_dim=F),
    "qwen3_moe": MoEConfig.qwen3_moe(num_experts=16, top_k=4, hidden_dim=H, expert_dim=F),
    "olmoe": MoEConfig.olmoe(num_experts=16, top_k=8, hidden_dim=H, expert_dim=F),
    "deepseek_v3": MoEConfig.deepseek_v3(num_experts=16, top_k=4, hidden_dim=H, expert_dim=F,
                                         n_groups=4, topk_groups=2, shared_expert_dim=F),
    "gpt_oss": MoEConfig.gpt_oss(num_experts=8, top_k=2, hidden_dim=H, expert_dim=F),
}


def rel_err(y, r):
    return float(np.linalg.norm(np.asarray(y, np.float64) - r) / np.linalg.norm(r))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("tokens", [3, T])
def test_bf16_error_no_larger_than_torch(family, tokens):
    from numoe.bench import hf_block

    layer = MoELayer.random(FAMILIES[family], seed=11, dtype=BF16)
    assert layer.weight_dtype == BF16
    _, call = hf_block(layer, family, dtype=BF16)
    x = np.random.default_rng(12).standard_normal((tokens, H)).astype(BF16)
    with torch.inference_mode():
        xt = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
        out = call(xt).float().numpy()
    y = layer(x)
    assert y.dtype == BF16 and y.shape == out.shape
    r = ref.moe_forward(x.astype(np.float64), top_k=layer.config.top_k, **layer.weights())
    ours, theirs = rel_err(y, r), rel_err(out, r)
    assert ours < 1e-2, ours
    assert ours <= theirs, (ours, theirs)
