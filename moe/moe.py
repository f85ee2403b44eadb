"""The sparse MoE block: router -> top-k (or expert-choice) dispatch -> grouped experts -> combine.

    from moe import MoE, MoEConfig
    block = MoE(MoEConfig(dim=512, hidden=1024, num_experts=8, top_k=2))
    y = block(x)            # x (..., 512) -> y (..., 512); aux losses ride along in backward

A drop-in for an MLP: tensor in, tensor of the same shape out. `modality` ids (or a `Grouping`)
are needed only for modality-specific expert groups (MoMa) and per-modality statistics.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn as nn

from moe import cpu_gemm
from moe.config import MoEConfig
from moe.dispatch import TopKDispatch, priority_order
from moe.grouping import Grouping, row_ids
from moe.layers import GroupedSwiGLU, SwiGLU
from moe.losses import (
    attach_aux_loss,
    load_balance_loss,
    load_balance_loss_from_sums,
    router_z_loss,
    router_z_loss_from_lse,
    sequence_load_balance_loss,
)
from moe.routing import expert_choice_route, route_topk, router_scores
from moe.stats import RoutingStats


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if cfg.dim is None or cfg.hidden is None:
            raise ValueError(f"moe.dim ({cfg.dim}) and moe.hidden ({cfg.hidden}) must be set to "
                             "build an MoE block")
        self.cfg = cfg
        E, D = cfg.num_experts, cfg.dim
        self.router = nn.Linear(D, E, bias=False)
        self.experts = GroupedSwiGLU(E, D, cfg.hidden)
        self.shared = SwiGLU(D, cfg.shared_experts * (cfg.shared_hidden or cfg.hidden)) \
            if cfg.shared_experts else None
        self.shared_gate = nn.Linear(D, 1, bias=False) if cfg.shared_experts and cfg.shared_gate \
            else None
        if cfg.bias_balancing:
            self.register_buffer("expert_bias", torch.zeros(E))
            self.register_buffer("load", torch.zeros(E), persistent=False)
        if cfg.experts_per_modality:
            group_of_expert = torch.repeat_interleave(
                torch.arange(len(cfg.experts_per_modality)),
                torch.tensor(cfg.experts_per_modality))
            self.register_buffer("group_of_expert", group_of_expert, persistent=False)
        self.megablocks = build_megablocks(cfg) if cfg.implementation == "megablocks" else None
        self.stats = RoutingStats()
        self.dispatcher = None  # set by `moe.parallel.shard_experts` to run experts on their ranks
        self.aux_loss_scale = 1.0  # e.g. 1 / gradient-accumulation steps, set by the trainer

    def forward(self, x: torch.Tensor, modality=None) -> torch.Tensor:
        cfg = self.cfg
        if x.shape[-1] != cfg.dim:
            raise ValueError(f"input width {x.shape[-1]} must equal moe.dim ({cfg.dim})")
        if self.megablocks is not None:
            return self.megablocks(x)
        rows = x.reshape(-1, cfg.dim)  # (N, D), any order
        router_in = rows
        if self.training and cfg.jitter > 0:
            router_in = rows * torch.empty_like(rows).uniform_(1 - cfg.jitter, 1 + cfg.jitter)
        logits = self.router(router_in)  # (N, E)
        ids = None
        if modality is not None:
            groups = modality.num_groups if isinstance(modality, Grouping) else None
            ids = row_ids(modality, groups or _num_ids(modality), x).reshape(-1)
        allowed = self.allowed_experts(ids)
        routed = None  # (E,) routing choices per expert, before capacity, where known
        if cfg.router == "topk":
            bias = self.expert_bias if cfg.bias_balancing else None
            scores, expert, weight, sums = route_topk(  # (N, E), (N, k), (N, k)
                logits, cfg.score, cfg.top_k, cfg.renormalize, bias, allowed)
            y, dropped, routed = self.token_choice(rows, expert, weight)
        else:
            scores = router_scores(logits, cfg.score, allowed)  # (N, E) float32
            y, expert, dropped = self.expert_choice(rows, scores)
            sums = None
        if routed is None:
            routed = torch.bincount(expert.reshape(-1), minlength=cfg.num_experts)
        if self.shared is not None:
            shared = self.shared(rows)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(rows)) * shared
            y = y + shared
        aux, parts = self.aux_losses(logits, scores, expert, x, modality, routed, sums)
        if aux is not None:
            y = attach_aux_loss(y, aux, self.aux_loss_scale)
        self.record(scores, expert, routed, dropped, ids, parts, sums)
        return y.view_as(x)

    def allowed_experts(self, ids: torch.Tensor | None) -> torch.Tensor | None:
        """MoMa: (N, E) bool, each token may use only its modality's experts."""
        if not self.cfg.experts_per_modality:
            return None
        if ids is None:
            raise ValueError("moe.experts_per_modality routes by modality: pass modality ids")
        groups = len(self.cfg.experts_per_modality)
        if ids.numel() and int(ids.max()) >= groups:
            raise ValueError(f"modality ids must be in [0, {groups}) for "
                             f"moe.experts_per_modality ({self.cfg.experts_per_modality})")
        return self.group_of_expert[None, :] == ids[:, None]

    def token_choice(self, rows, expert, weight):
        """rows (N, D), expert / weight (N, k) the routing -> (y (N, D), dropped slots, routing
        choices per expert (E,) when dropless, else None)."""
        cfg = self.cfg
        capacity = priority = None
        if cfg.capacity_factor is not None:
            capacity = cfg.capacity(rows.shape[0])
            priority = priority_order(expert, weight, cfg.drop_policy)
        padded = cfg.implementation == "padded" and self.dispatcher is None
        # half precision on CPU: few distinct shapes for oneDNN, as in moe.cpu_gemm
        multiple = cpu_gemm.BLOCK if padded and rows.device.type == "cpu" and \
            cpu_gemm.block_rows(rows.dtype) > 1 else 8
        dispatch = TopKDispatch(expert, cfg.num_experts, capacity, priority, padded, multiple)
        routed = dispatch.counts if capacity is None else None  # dropless: kept = routed
        if self.dispatcher is not None:  # expert parallel: kept slots go to their experts' ranks
            slot = dispatch.order[:dispatch.kept]
            y = self.dispatcher(rows, slot // cfg.top_k, expert.reshape(-1)[slot],
                                weight.reshape(-1)[slot], self.experts,
                                cfg.implementation == "loop")
            return y, dispatch.dropped, routed
        if not padded and cfg.implementation != "loop":  # gather, experts, combine: one op
            e = self.experts
            y = cpu_gemm.routed_swiglu(rows, e.w13, e.w2, dispatch, weight)
            if y is not None:
                return y, dispatch.dropped, routed
        x = dispatch.gather(rows)  # (kept, D)
        if padded:
            y = self.experts.ffn_padded(x.view(cfg.num_experts, -1, cfg.dim)).view_as(x)
        else:
            y = self.experts.ffn(x, dispatch.offsets, reference=cfg.implementation == "loop")
        return dispatch.combine(y, weight), dispatch.dropped, routed

    def expert_choice(self, rows, scores):
        cfg = self.cfg
        N, E = scores.shape
        token, weight = expert_choice_route(scores, cfg.capacity(N))  # (E, C)
        C = token.shape[1]
        # for statistics and the balance loss: the experts that took each token
        expert = torch.arange(E, device=rows.device).repeat_interleave(C)[:, None]
        if self.dispatcher is not None:  # expert parallel
            out = self.dispatcher(rows, token.reshape(-1), expert.reshape(-1), weight.reshape(-1),
                                  self.experts, cfg.implementation == "loop")
        else:
            picked_rows = rows.index_select(0, token.reshape(-1))  # (E * C, D)
            if cfg.implementation == "padded":  # already E groups of C rows
                y = self.experts.ffn_padded(picked_rows.view(E, C, -1)).view_as(picked_rows)
            else:
                counts = torch.full((E,), C, device=rows.device)
                y = self.experts.ffn(picked_rows, counts.cumsum(0).to(torch.int32),
                                     reference=cfg.implementation == "loop")
            y = y * weight.reshape(-1, 1).to(y.dtype)
            out = torch.zeros_like(rows).index_add(0, token.reshape(-1), y)
        picked = torch.zeros(N, dtype=torch.bool, device=rows.device)
        picked[token.reshape(-1)] = True
        return out, expert, int(N - picked.sum())

    def aux_losses(self, logits, scores, expert, x, modality, routed, sums=None):
        """-> (weighted sum to train on or None, {name: unweighted value} for the statistics).
        routed (E,): the routing choices per expert; sums: the compiled router's `RouterSums`
        (the same losses without another pass over the (N, E) scores), or None."""
        cfg = self.cfg
        terms, parts = [], {}
        if cfg.balance_loss > 0 and cfg.router == "topk":
            if cfg.balance_loss_type == "sequence":
                sequence, count = sequence_ids(x, modality)
                lb = sequence_load_balance_loss(scores, expert, sequence, count, cfg.score)
            elif sums is not None:
                lb = load_balance_loss_from_sums(sums.prob_sum, routed, *expert.shape)
            else:
                lb = load_balance_loss(scores, expert, cfg.score, routed)
            terms.append(cfg.balance_loss * lb)
            parts["balance_loss"] = lb.detach()
        if cfg.z_loss > 0:
            z = router_z_loss(logits) if sums is None else router_z_loss_from_lse(sums.lse)
            terms.append(cfg.z_loss * z)
            parts["z_loss"] = z.detach()
        return (sum(terms[1:], terms[0]) if terms else None), parts

    @torch.no_grad()
    def record(self, scores, expert, routed, dropped: int, ids, losses: dict, sums=None) -> None:
        E = self.cfg.num_experts
        if sums is not None:
            entropy = sums.entropy
        else:
            probs = scores if self.cfg.score == "softmax" else \
                scores / scores.sum(dim=-1, keepdim=True).clamp(min=1e-20)  # rows summing to 1
            entropy = torch.special.entr(probs).sum()
        values = dict(tokens=routed, dropped=dropped, entropy=entropy,
                      rows=scores.shape[0], calls=1, **losses)
        if ids is not None and self.cfg.router == "topk":
            M = _num_ids(ids)
            pairs = ids.repeat_interleave(expert.shape[1]) * E + expert.reshape(-1)
            values["modality_tokens"] = torch.bincount(pairs, minlength=M * E).view(M, E)
        self.stats.add(**values)
        if self.cfg.bias_balancing and self.training:
            self.load += routed

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3 balancing step, after each optimizer step: raise the bias of underloaded
        experts and lower it for overloaded ones by `bias_update_rate`, from the load counted
        since the last call."""
        if not self.cfg.bias_balancing or self.load.sum() == 0:
            return
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()


def _num_ids(ids) -> int:
    if isinstance(ids, Grouping):
        return ids.num_groups
    return int(ids.max()) + 1 if ids.numel() else 1


def sequence_ids(x: torch.Tensor, modality) -> tuple[torch.Tensor, int]:
    """The sequence index of each row of x, and the number of sequences: from a grouped layout's
    permutation, from x's (..., T, D) shape, or one sequence for (N, D) rows."""
    if isinstance(modality, Grouping) and modality.grouped:
        T = modality.shape[-1]
        return modality.order // T, math.prod(modality.shape) // T
    N = x.numel() // x.shape[-1]
    if x.dim() >= 3:
        T = x.shape[-2]
        return torch.arange(N, device=x.device) // T, N // T
    return torch.zeros(N, dtype=torch.long, device=x.device), 1


def update_biases(model: nn.Module) -> None:
    """Run the auxiliary-loss-free balancing step of every MoE block of `model`."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.update_bias()


def build_megablocks(cfg: MoEConfig):
    """megablocks' dropless MoE (dMoE) configured from ours; CUDA only."""
    missing = [what for what, ok in (
        ("the megablocks package (pip install 'mot-moe[gpu]')",
         importlib.util.find_spec("megablocks") is not None),
        ("a CUDA device", torch.cuda.is_available())) if not ok]
    if missing:
        raise ValueError(f"moe.implementation 'megablocks' needs {' and '.join(missing)}; "
                         "use 'grouped'")
    import dataclasses

    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE

    wanted = dict(hidden_size=cfg.dim, ffn_hidden_size=cfg.hidden, moe_num_experts=cfg.num_experts,
                  moe_top_k=cfg.top_k, mlp_type="glu", activation_fn=torch.nn.functional.silu,
                  mlp_impl="grouped", moe_loss_weight=cfg.balance_loss,
                  moe_zloss_weight=cfg.z_loss, moe_jitter_eps=cfg.jitter or None, bias=False,
                  return_bias=False, fp16=False, bf16=False,
                  moe_normalize_expert_weights=1.0 if cfg.renormalize else None)
    known = {f.name for f in dataclasses.fields(Arguments)}  # fields differ across releases
    return _MegablocksMoE(dMoE(Arguments(**{k: v for k, v in wanted.items() if k in known})))


class _MegablocksMoE(nn.Module):
    """Adapts dMoE's `(x) -> y` on (T, B, D) to our `(..., D) -> (..., D)`. megablocks keeps its
    own load-balancing loss (read it with `megablocks.layers.moe.get_load_balancing_loss`)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, 1, x.shape[-1])  # (seq, batch, D) as megablocks expects
        y = self.block(rows)
        y = y[0] if isinstance(y, tuple) else y  # (out, bias) when a release ignores return_bias
        return y.view_as(x)
