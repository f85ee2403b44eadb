"""Bring HuggingFace sparse-MoE blocks in, and take ours out.

`from_hf(block)` builds an `MoE` that computes what a `transformers` Mixtral-style block computes
(`MixtralSparseMoeBlock`, `Qwen2MoeSparseMoeBlock` with its gated shared expert, and others with
the same parts: `gate` router, `experts`, optional `shared_expert` / `shared_expert_gate`), in
both expert layouts: fused 3-D tensors (`experts.gate_up_proj` (E, 2H, D), `experts.down_proj`
(E, D, H), transformers >= 5) and per-expert linears (`experts.{e}.w1/w2/w3`, older releases).
`hf_state_dict(moe)` writes our weights in the fused layout, to load into such a block.

One difference remains in training mode only: Mixtral's jitter multiplies the experts' input too,
ours (Switch's) only the router's input.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moe.config import MoEConfig
from moe.moe import MoE


def _expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """-> w13 (E, D, 2H) (gate | up) and w2 (E, H, D) in our layout."""
    if hasattr(experts, "gate_up_proj"):  # (E, 2H, D): gate rows, then up rows
        return experts.gate_up_proj.detach().transpose(1, 2), \
            experts.down_proj.detach().transpose(1, 2)
    w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]).detach().t() for e in experts])
    w2 = torch.stack([e.w2.weight.detach().t() for e in experts])
    return w13, w2


def from_hf(block: nn.Module, **options) -> MoE:
    """An `MoE` equal to the HuggingFace sparse-MoE `block`; `options` set the rest of
    `MoEConfig` (losses, capacity, ...), which do not change the forward."""
    router = block.gate.weight.detach()  # (E, D)
    E, D = router.shape
    w13, w2 = _expert_weights(block.experts)
    shared = getattr(block, "shared_expert", None)
    gate = getattr(block, "shared_expert_gate", None)
    cfg = MoEConfig(dim=D, hidden=w2.shape[1], num_experts=E,
                    top_k=getattr(block.gate, "top_k", getattr(block, "top_k", None)),
                    renormalize=bool(getattr(block.gate, "norm_topk_prob", True)),
                    shared_experts=1 if shared is not None else 0,
                    shared_hidden=shared.gate_proj.weight.shape[0] if shared is not None else None,
                    shared_gate=gate is not None, **options)
    moe = MoE(cfg).to(router.dtype)
    with torch.no_grad():
        moe.router.weight.copy_(router)
        moe.experts.w13.copy_(w13)
        moe.experts.w2.copy_(w2)
        if shared is not None:
            moe.shared.w1.weight.copy_(shared.gate_proj.weight)
            moe.shared.w3.weight.copy_(shared.up_proj.weight)
            moe.shared.w2.weight.copy_(shared.down_proj.weight)
        if gate is not None:
            moe.shared_gate.weight.copy_(gate.weight)
    return moe


def hf_state_dict(moe: MoE) -> dict[str, torch.Tensor]:
    """Our weights under the names and layout of a transformers >= 5 sparse-MoE block."""
    e = moe.experts
    state = {"gate.weight": moe.router.weight.detach().clone(),
             "experts.gate_up_proj": e.w13.detach().transpose(1, 2).contiguous(),
             "experts.down_proj": e.w2.detach().transpose(1, 2).contiguous()}
    if moe.shared is not None:
        state |= {"shared_expert.gate_proj.weight": moe.shared.w1.weight.detach().clone(),
                  "shared_expert.up_proj.weight": moe.shared.w3.weight.detach().clone(),
                  "shared_expert.down_proj.weight": moe.shared.w2.weight.detach().clone()}
    if moe.shared_gate is not None:
        state["shared_expert_gate.weight"] = moe.shared_gate.weight.detach().clone()
    return state
