"""Per-modality embeddings, output heads and the per-modality next-token loss.

Token ids are local to their modality's vocabulary; the special tokens (begin/end of image, ...)
belong to the text vocabulary. Embeddings of all modalities live in one packed table indexed by
`id + offset[modality]` (one gather, same as separate tables). The head used for a position is the
head of the modality of the token it predicts.

A continuous modality (`input: continuous`) has no rows in the table and no softmax head: its
positions are embedded by a linear map of their feature vectors (`FeatureEmbedding`), and with
`loss: regression` a linear head predicts the next position's features (`RegressionHeads`,
`regression_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe.grouping import Grouping
from mot.config import ModelConfig


def table_sizes(cfg: ModelConfig) -> list[int]:
    """Rows of each modality in the packed token table and heads: its vocabulary, or 0 when its
    input is continuous."""
    return [0 if m.continuous else m.vocab_size for m in cfg.modalities]


class ModalityEmbedding(nn.Module):
    """tokens (B, T) local ids + modality (B, T) -> embeddings (B, T, D). Positions of a
    continuous modality get row 0 here; the model replaces them with their feature embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        sizes = torch.tensor(table_sizes(cfg))
        self.register_buffer("vocab_sizes", sizes, persistent=False)
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.register_buffer("discrete", torch.tensor([not m.continuous for m in cfg.modalities]),
                             persistent=False)
        self.all_discrete = all(not m.continuous for m in cfg.modalities)
        self.weight = nn.Parameter(torch.empty(int(sizes.sum()), cfg.dim))

    def forward(self, tokens: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        ids = tokens + self.offsets[modality]
        if not self.all_discrete:  # ids of continuous positions are ignored
            ids = torch.where(self.discrete[modality], ids, 0)
        return F.embedding(ids, self.weight)

    def modality_slices(self):
        starts, sizes = self.offsets.tolist(), self.vocab_sizes.tolist()
        return [(self.weight, m, slice(s, s + n)) for m, (s, n) in enumerate(zip(starts, sizes))
                if n > 0]  # a continuous modality owns no rows here


class ModalityHeads(nn.Module):
    """One linear head per modality, packed in one (sum V, D) weight (or tied to the embedding);
    a continuous modality's head has no rows."""

    def __init__(self, cfg: ModelConfig, embedding: ModalityEmbedding | None = None):
        super().__init__()
        self.sizes = table_sizes(cfg)
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
                for m, (s, n) in enumerate(zip(self.starts, self.sizes)) if n > 0]

    def forward(self, hidden: torch.Tensor, m: int) -> torch.Tensor:
        """hidden (..., D) -> logits (..., V_m) of modality m."""
        return F.linear(hidden, self.head_weight(m))


class FeatureEmbedding(nn.Module):
    """Input of the continuous modalities: modality m's positions are embedded as
    `W_m @ features[..., :feature_dim_m]`, W_m (D, F_m) one linear map per modality."""

    def __init__(self, cfg: ModelConfig, modalities: list[str], dim: int):
        super().__init__()
        specs = [m for m in cfg.modalities if m.continuous and m.name in modalities]
        self.ids = {m.name: cfg.modality_index(m.name) for m in specs}
        self.widths = {m.name: m.feature_dim for m in specs}
        self.proj = nn.ModuleDict({m.name: nn.Linear(m.feature_dim, dim, bias=False)
                                   for m in specs})

    def forward(self, x: torch.Tensor, modality: torch.Tensor,
                features: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D) with the positions of these modalities replaced by their feature
        embedding; features (B, T, F) (None only when no such position is present)."""
        if features is None:  # the model has checked that no position needs them
            return x
        for name, proj in self.proj.items():
            at = modality == self.ids[name]  # (B, T)
            embedded = proj(features[..., :self.widths[name]].to(x.dtype))  # (B, T, D)
            x = torch.where(at[..., None], embedded, x)
        return x

    def modality_slices(self):
        return [(p.weight, self.ids[name], slice(0, p.weight.shape[0]))
                for name, p in self.proj.items()]


class RegressionHeads(nn.Module):
    """One linear head (F_m, D) per continuous modality with `loss: regression`: the hidden state
    of a position predicts the feature vector of the next one."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        specs = [m for m in cfg.modalities if m.objective == "regression"]
        self.ids = {m.name: cfg.modality_index(m.name) for m in specs}
        self.proj = nn.ModuleDict({m.name: nn.Linear(cfg.dim, m.feature_dim, bias=False)
                                   for m in specs})

    def forward(self, hidden: torch.Tensor, name: str) -> torch.Tensor:
        """hidden (..., D) -> predicted features (..., F_m) of modality `name`."""
        return self.proj[name](hidden)

    def modality_slices(self):
        return [(p.weight, self.ids[name], slice(0, p.weight.shape[0]))
                for name, p in self.proj.items()]


@dataclass
class LossOutput:
    """loss: what to backpropagate (weighted LM loss + z-loss).
    lm_loss: the weighted next-token loss alone; per_modality: mean cross-entropy over the
    positions that predict each modality (absent when a modality has no target in the batch),
    and for a regression modality `<name>_mse`, its mean squared error per feature;
    tokens: how many targets of each of those were counted. regression_loss: the weighted sum
    of the regression modalities' errors (included in `loss`)."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    z_loss: torch.Tensor
    per_modality: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    regression_loss: torch.Tensor | None = None


def modality_loss(heads: ModalityHeads, cfg: ModelConfig, hidden: torch.Tensor,
                  targets: torch.Tensor, target_modality: torch.Tensor,
                  valid: torch.Tensor) -> LossOutput:
    """Next-token loss with one head per target modality.

    hidden (N, D), targets / target_modality / valid (N,). Targets of continuous modalities are
    not scored here (the caller leaves them out of `valid`). With N_valid the number of valid
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
    # Positions sorted by target modality (invalid ones last), stably: each modality's rows are
    # one slice of a single gather whose gradient is the inverse gather (per-modality boolean
    # indexing zero-fills and scatter-adds a full-size gradient per modality instead).
    M = cfg.num_modalities
    by_target = Grouping.from_ids(torch.where(valid, target_modality, M), M + 1)
    counts = by_target.counts.tolist()
    rows = by_target.permute(hidden).split(counts)  # (n_m, D) each
    sorted_targets = targets[by_target.order].split(counts)
    for m, spec in enumerate(cfg.modalities):
        n = counts[m]
        if spec.continuous or n == 0:
            continue
        logits = heads(rows[m], m).float()  # (n_m, V_m)
        ce = F.cross_entropy(logits, sorted_targets[m], reduction="sum")
        lm_loss = lm_loss + spec.loss_weight * ce
        if cfg.z_loss > 0:
            z_sum = z_sum + logits.logsumexp(dim=-1).pow(2).sum()
        out.per_modality[spec.name] = ce.detach() / n
        out.tokens[spec.name] = n
    out.lm_loss = lm_loss / n_valid
    out.z_loss = cfg.z_loss * z_sum / n_valid
    out.loss = out.lm_loss + out.z_loss
    return out


def regression_loss(heads: RegressionHeads, cfg: ModelConfig, hidden: torch.Tensor,
                    target_features: torch.Tensor, target_modality: torch.Tensor,
                    valid: torch.Tensor, out: LossOutput) -> LossOutput:
    """Add the feature regression of each `loss: regression` modality to `out`.

    hidden (N, D), target_features (N, F), target_modality / valid (N,). For modality m with
    n_m valid targets of feature_dim F_m:
        mse_m = sum over its targets and features of (head_m(h) - f)^2 / (n_m F_m)
        regression_loss = sum_m loss_weight_m * mse_m,   out.loss += regression_loss
    and mse_m is reported as per_modality["<m>_mse"] (tokens["<m>_mse"] = n_m).
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for name, m in heads.ids.items():
        spec = cfg.modalities[m]
        idx = ((target_modality == m) & valid).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        predicted = heads(hidden[idx], name).float()  # (n_m, F_m)
        mse = F.mse_loss(predicted, target_features[idx, :spec.feature_dim].float())
        total = total + spec.loss_weight * mse
        out.per_modality[f"{name}_mse"] = mse.detach()
        out.tokens[f"{name}_mse"] = idx.numel()
    out.regression_loss = total
    out.loss = out.loss + total
    return out
