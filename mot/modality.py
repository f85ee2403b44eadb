"""Per-modality embeddings, output heads and the per-modality next-token loss.

Token ids are local to their modality's vocabulary; the special tokens (begin/end of image, ...)
belong to the text vocabulary. Embeddings of all modalities live in one packed table indexed by
`id + offset[modality]` (one gather, same as separate tables). The head used for a position is the
head of the modality of the token it predicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from mot.config import ModelConfig


class ModalityEmbedding(nn.Module):
    """tokens (B, T) local ids + modality (B, T) -> embeddings (B, T, D)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        sizes = torch.tensor([m.vocab_size for m in cfg.modalities])
        self.register_buffer("vocab_sizes", sizes, persistent=False)
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.weight = nn.Parameter(torch.empty(int(sizes.sum()), cfg.dim))

    def forward(self, tokens: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens + self.offsets[modality], self.weight)

    def modality_slices(self):
        starts, sizes = self.offsets.tolist(), self.vocab_sizes.tolist()
        return [(self.weight, m, slice(s, s + n)) for m, (s, n) in enumerate(zip(starts, sizes))]


class ModalityHeads(nn.Module):
    """One linear head per modality, packed in one (sum V, D) weight (or tied to the embedding)."""

    def __init__(self, cfg: ModelConfig, embedding: ModalityEmbedding | None = None):
        super().__init__()
        self.sizes = [m.vocab_size for m in cfg.modalities]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.tied = embedding is not None
        if self.tied:
            self.embedding = [embedding]  # a list, so the tied weight is not registered twice
        else:
            self.weight = nn.Parameter(torch.empty(sum(self.sizes), cfg.dim))

    def head_weight(self, m: int) -> torch.Tensor:
        weight = self.embedding[0].weight if self.tied else self.weight
        return weight[self.starts[m]:self.starts[m] + self.sizes[m]]  # (V_m, D)

    def modality_slices(self):
        if self.tied:
            return []  # the embedding reports the shared rows
        return [(self.weight, m, slice(s, s + n))
                for m, (s, n) in enumerate(zip(self.starts, self.sizes))]

    def forward(self, hidden: torch.Tensor, m: int) -> torch.Tensor:
        """hidden (..., D) -> logits (..., V_m) of modality m."""
        return F.linear(hidden, self.head_weight(m))


@dataclass
class LossOutput:
    """loss: what to backpropagate (weighted LM loss + z-loss).
    lm_loss: the weighted next-token loss alone; per_modality: mean cross-entropy over the
    positions that predict each modality (absent when a modality has no target in the batch);
    tokens: how many targets of each modality were counted."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    z_loss: torch.Tensor
    per_modality: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)


def modality_loss(heads: ModalityHeads, cfg: ModelConfig, hidden: torch.Tensor,
                  targets: torch.Tensor, target_modality: torch.Tensor,
                  valid: torch.Tensor) -> LossOutput:
    """Next-token loss with one head per target modality.

    hidden (N, D), targets / target_modality / valid (N,). With N_valid the number of valid
    targets and CE_m the summed cross-entropy of modality m's targets:
        lm_loss = sum_m loss_weight_m * CE_m / N_valid
    so with all weights 1 it is the plain token-mean cross-entropy of a joint LM objective,
    and lm_loss = sum_m loss_weight_m * (n_m / N_valid) * per_modality_m.
    z_loss = z * sum over valid positions of logsumexp(logits)^2 / N_valid.
    """
    n_valid = valid.sum().clamp(min=1)
    lm_loss = hidden.new_zeros((), dtype=torch.float32)
    z_sum = hidden.new_zeros((), dtype=torch.float32)
    out = LossOutput(lm_loss, lm_loss, z_sum)
    for m, spec in enumerate(cfg.modalities):
        idx = ((target_modality == m) & valid).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        logits = heads(hidden[idx], m).float()  # (n_m, V_m)
        ce = F.cross_entropy(logits, targets[idx], reduction="sum")
        lm_loss = lm_loss + spec.loss_weight * ce
        if cfg.z_loss > 0:
            z_sum = z_sum + logits.logsumexp(dim=-1).pow(2).sum()
        out.per_modality[spec.name] = ce.detach() / idx.numel()
        out.tokens[spec.name] = idx.numel()
    out.lm_loss = lm_loss / n_valid
    out.z_loss = cfg.z_loss * z_sum / n_valid
    out.loss = out.lm_loss + out.z_loss
    return out
