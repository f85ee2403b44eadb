"""Auxiliary losses of the router, and how they reach the gradient without a global list.

Load balancing (Switch / GShard form). With N tokens, E experts and top-k routing,
    f_i = (number of the N*k routing choices that picked expert i, before any capacity drop) / (N k)
    P_i = mean over tokens of the router probability of expert i
    loss = E * sum_i f_i * P_i
It is 1 for perfectly uniform routing and grows as load and probability mass concentrate (up
to E). Megatron-Core's `switch_load_balancing_loss_func` computes the same value
(sum(P_sum_i * count_i) * E / (N * N * k)). HF Mixtral's `load_balancing_loss_func` divides the
counts by N instead of N*k, so its value is k times this one. For sigmoid scores, P uses the
scores normalised to sum to 1 per token (as DeepSeek-V3's sequence-wise loss does).

The per-sequence variant computes f and P within each sequence and averages the losses over
sequences (DeepSeek-V3's complementary sequence-wise loss).

Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.

`attach_aux_loss(y, aux)` returns y unchanged but makes backward add d(aux)/d(params): the block
stays a plain `x -> y` function, and its auxiliary losses still train the router (the
Megatron-Core approach).
"""

from __future__ import annotations

import torch


def _probabilities(scores: torch.Tensor, score: str) -> torch.Tensor:
    if score == "softmax":
        return scores
    return scores / scores.sum(dim=-1, keepdim=True).clamp(min=1e-20)


def load_balance_loss(scores: torch.Tensor, expert: torch.Tensor, score: str = "softmax",
                      counts: torch.Tensor | None = None):
    """scores (N, E) router scores, expert (N, k) chosen experts -> scalar. counts (E,): the
    choices per expert, when the caller has them (else counted from `expert`)."""
    N, E = scores.shape
    if N == 0:
        return scores.sum() * 0
    if counts is None:
        counts = torch.bincount(expert.reshape(-1), minlength=E)
    P = _probabilities(scores, score).mean(dim=0)  # (E,)
    return torch.dot(counts.to(scores.dtype), P) * (E / expert.numel())


def sequence_load_balance_loss(scores: torch.Tensor, expert: torch.Tensor, sequence: torch.Tensor,
                               num_sequences: int, score: str = "softmax"):
    """Per-sequence balancing: sequence (N,) the sequence index of each token row."""
    N, E = scores.shape
    if N == 0:
        return scores.sum() * 0
    k = expert.shape[1]
    counts = scores.new_zeros(num_sequences, E)
    counts.index_put_((sequence.repeat_interleave(k), expert.reshape(-1)),
                      torch.ones(N * k, device=scores.device), accumulate=True)
    tokens = torch.bincount(sequence, minlength=num_sequences).to(scores.dtype)  # (S,)
    prob_sums = scores.new_zeros(num_sequences, E).index_add_(0, sequence,
                                                               _probabilities(scores, score))
    present = tokens > 0
    f = counts[present] / (tokens[present, None] * k)
    P = prob_sums[present] / tokens[present, None]
    return (E * (f * P).sum(dim=-1)).mean()


def load_balance_loss_from_sums(prob_sum: torch.Tensor, counts: torch.Tensor,
                                num_tokens: int, k: int) -> torch.Tensor:
    """`load_balance_loss` from the router's sums: prob_sum (E,) the routing probabilities summed
    over the N tokens (P * N), counts (E,) the choices per expert (k per token)."""
    E = prob_sum.shape[0]
    return torch.dot(counts.to(prob_sum.dtype), prob_sum) * (E / (num_tokens * num_tokens * k))


def router_z_loss_from_lse(lse: torch.Tensor) -> torch.Tensor:
    """`router_z_loss` from lse (N,), the logsumexp of each token's logits."""
    return lse.square().mean()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    if logits.shape[0] == 0:
        return logits.float().sum() * 0
    return logits.float().logsumexp(dim=-1).square().mean()


class _AttachAux(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, aux, scale):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


def attach_aux_loss(y: torch.Tensor, aux: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """y, with `scale * aux` added to the objective in backward (aux: a scalar with grad)."""
    if not aux.requires_grad or not torch.is_grad_enabled():
        return y
    return _AttachAux.apply(y, aux, scale)
