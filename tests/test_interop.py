"""HuggingFace sparse-MoE blocks load into `MoE` and give the same outputs, and back."""

import pytest
import torch
import torch.nn as nn

from moe.interop import from_hf, hf_state_dict

transformers = pytest.importorskip("transformers", reason="needs the transformers package")


def mixtral(E=4, k=2):
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    block = MixtralSparseMoeBlock(transformers.MixtralConfig(
        hidden_size=32, intermediate_size=48, num_local_experts=E, num_experts_per_tok=k))
    return _randomised(block)


def qwen2_moe(norm_topk_prob: bool):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    block = Qwen2MoeSparseMoeBlock(transformers.Qwen2MoeConfig(
        hidden_size=32, moe_intermediate_size=40, shared_expert_intermediate_size=56,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob))
    return _randomised(block)


def _randomised(block):
    torch.manual_seed(0)
    for p in block.parameters():
        nn.init.normal_(p, std=0.2)
    return block.eval()


@pytest.mark.parametrize("make", [mixtral, lambda: mixtral(E=8, k=1),
                                  lambda: qwen2_moe(True), lambda: qwen2_moe(False)],
                         ids=["mixtral", "mixtral-top1", "qwen2moe-renorm", "qwen2moe-raw"])
def test_hf_block_loads_with_same_outputs(make):
    block = make()
    ours = from_hf(block).eval()
    x = torch.randn(2, 11, 32)
    torch.testing.assert_close(ours(x), block(x), atol=1e-5, rtol=1e-5)
    again = make()
    for p in again.parameters():
        nn.init.zeros_(p)
    again.load_state_dict(hf_state_dict(ours))  # and ours back into a HF block
    torch.testing.assert_close(again(x), block(x), atol=0, rtol=0)


class _OldMixtralExpert(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.w1, self.w3 = nn.Linear(D, H, bias=False), nn.Linear(D, H, bias=False)
        self.w2 = nn.Linear(H, D, bias=False)


def test_per_expert_linear_layout_loads_too():
    block = mixtral()
    old = nn.Module()
    old.gate, old.top_k = block.gate, block.top_k
    old.experts = nn.ModuleList(_OldMixtralExpert(32, 48) for _ in range(4))
    with torch.no_grad():
        for e, expert in enumerate(old.experts):
            gate, up = block.experts.gate_up_proj[e].chunk(2, dim=0)
            expert.w1.weight.copy_(gate)
            expert.w3.weight.copy_(up)
            expert.w2.weight.copy_(block.experts.down_proj[e])
    x = torch.randn(1, 5, 32)
    torch.testing.assert_close(from_hf(old).eval()(x), block(x), atol=1e-5, rtol=1e-5)
