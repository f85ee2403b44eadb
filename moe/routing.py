"""Routers: which experts each token goes to, with what weight, and which slots capacity drops.

All functions work on flat rows: logits (N, E) of N tokens over E experts. Scores and weights are
float32 whatever the model dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moe import fused


def router_scores(logits: torch.Tensor, score: str, allowed: torch.Tensor | None = None):
    """logits (N, E) -> scores (N, E) in float32: softmax or sigmoid. `allowed` (N, E) bool
    restricts each token to some experts (MoMa's modality groups): the others score 0."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits.softmax(dim=-1) if score == "softmax" else logits.sigmoid()


def topk_route(scores: torch.Tensor, k: int, renormalize: bool,
               bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token choice: scores (N, E) -> expert (N, k) int64, weight (N, k) float32.

    `bias` (E,) shifts the scores for selection only (DeepSeek-V3 balancing): weights are always
    the unbiased scores of the chosen experts."""
    select = scores if bias is None else scores + bias
    expert = select.topk(k, dim=-1).indices  # (N, k)
    weight = scores.gather(1, expert)
    if renormalize:
        weight = weight / weight.sum(dim=-1, keepdim=True).clamp(min=1e-20)
    return expert, weight


class RouterSums(NamedTuple):
    """What the compiled router adds up in its pass over the tokens, for the losses and
    statistics (`moe.losses`): lse (N,) logsumexp of each token's logits, prob_sum (E,) the
    routing probabilities summed over tokens, entropy () their entropy summed; float32."""

    lse: torch.Tensor
    prob_sum: torch.Tensor
    entropy: torch.Tensor


def route_topk(logits: torch.Tensor, score: str, k: int, renormalize: bool,
               bias: torch.Tensor | None = None, allowed: torch.Tensor | None = None):
    """Token choice from the logits: scores (N, E) float32, expert (N, k), weight (N, k) float32,
    as `router_scores` then `topk_route` give them, and `RouterSums` or None; in one compiled pass
    where it is built (and no `allowed` mask applies), else the composition and None."""
    if allowed is None:
        out = fused.router_topk(logits, k, renormalize, score == "sigmoid", bias)
        if out is not None:
            return (*out[:3], RouterSums(*out[3:]))
    scores = router_scores(logits, score, allowed)
    return (scores, *topk_route(scores, k, renormalize, bias), None)


def capacity_keep(expert: torch.Tensor, weight: torch.Tensor, num_experts: int, capacity: int,
                  policy: str) -> torch.Tensor:
    """Which of the (N, k) routing slots fit in `capacity` slots per expert -> keep (N, k) bool.

    policy "position": slots queue by choice rank, then token position (all first choices before
    any second choice, earlier tokens first; GShard); "probability": by router weight, highest
    first, ties in slot order. (The reference of what `TopKDispatch` computes with the kernel.)"""
    from moe.dispatch import priority_order
    from moe.ops import sort_by_group_reference

    N, k = expert.shape
    _, inverse, counts = sort_by_group_reference(expert.reshape(-1), priority_order(
        expert, weight, policy), num_experts, capacity)
    return (inverse < counts.sum()).view(N, k)


def expert_choice_route(scores: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert choice: each expert takes its `capacity` highest-scoring tokens of the batch.
    scores (N, E) -> token (E, C) int64 and weight (E, C) float32, C = min(capacity, N)."""
    C = min(capacity, scores.shape[0])
    top = scores.t().topk(C, dim=-1)  # (E, C)
    return top.indices, top.values
