"""The joint-attention backbone: one decoder-only transformer over an interleaved sequence.

Tokens of every modality share one sequence and one global attention (early fusion). What each
layer's parameters are (dense, untied by modality, sparse experts) is decided by the block config
of that layer; the backbone only wires embeddings, layers, final norm and per-modality heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from moe.grouping import Grouping
from mot.attention import (
    Attention,
    AttentionMask,
    KVCache,
    build_mask,
    positions_from_documents,
)
from mot.config import ModelConfig
from mot.freeze import FrozenModalities
from mot.layers import Rotary
from mot.modality import LossOutput, ModalityEmbedding, ModalityHeads, modality_loss


@dataclass
class Batch:
    """A batch of token sequences, each of length T + 1 (inputs are [:-1], targets [1:]).

    tokens: (B, T+1) ids local to each token's modality; modality: (B, T+1) modality index;
    doc: optional (B, T+1) document ids of packed sequences; loss_mask: optional (B, T+1) bool,
    False on targets that must not be scored.
    """

    tokens: torch.Tensor
    modality: torch.Tensor
    doc: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.tokens), move(self.modality), move(self.doc), move(self.loss_mask))


class TransformerLayer(nn.Module):
    """Attention then FFN, each with a residual; pre-norm, or Chameleon's `x + norm(f(x))`."""

    def __init__(self, cfg: ModelConfig, block):
        super().__init__()
        self.kind = block.kind
        self.reorder = cfg.norm_reorder
        self.attn_norm = block.build_norm(cfg, "norm", cfg.dim)
        self.attn = Attention(cfg, block)
        self.ffn_norm = block.build_norm(cfg, "norm", cfg.dim)
        self.ffn = block.build_ffn(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, groups, rope, mask: AttentionMask, cache=None, index: int = 0):
        attend = lambda h: self.attn(h, groups, rope, mask, cache, index)  # noqa: E731
        if self.reorder:
            h = x + self.drop(self.attn_norm(attend(x), groups))
            return h + self.drop(self.ffn_norm(self.ffn(h, groups), groups))
        h = x + self.drop(attend(self.attn_norm(x, groups)))
        return h + self.drop(self.ffn(self.ffn_norm(h, groups), groups))


class MultimodalTransformer(nn.Module):
    """Embeddings -> layers -> final norm -> per-modality heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = ModalityEmbedding(cfg)
        self.layers = nn.ModuleList(TransformerLayer(cfg, cfg.layer_block(i))
                                    for i in range(cfg.n_layers))
        last = cfg.layer_block(cfg.n_layers - 1)
        self.norm = last.build_norm(cfg, "norm", cfg.dim)
        self.heads = ModalityHeads(cfg, self.embed if cfg.tie_embeddings else None)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.bidirectional_ids = [cfg.modality_index(n)
                                  for n in cfg.attention.bidirectional_modalities]
        self.needs_grouping = any(cfg.layer_block(i).needs_grouping for i in range(cfg.n_layers))
        self.reset_parameters()
        self.frozen = FrozenModalities(self, [cfg.modality_index(n) for n in cfg.freeze]) \
            if cfg.freeze else None

    def reset_parameters(self) -> None:
        """Norm weights 1; matrices Normal(0, init_std), the residual-branch outputs (wo, w2)
        scaled by 1/sqrt(2 n_layers)."""
        std, scaled = self.cfg.init_std, (2 * self.cfg.n_layers) ** -0.5
        for module_name, module in self.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, nn.RMSNorm) or getattr(module, "is_norm", False):
                    nn.init.ones_(p)
                else:
                    out = module_name.endswith(("wo", "ffn")) and name in ("weight", "w2") \
                        or module_name.endswith("w2")
                    nn.init.normal_(p, std=std * (scaled if out else 1.0))

    def check_inputs(self, tokens: torch.Tensor, modality: torch.Tensor, doc) -> None:
        """Clear errors for inputs that would otherwise fail deep inside (or silently)."""
        if tokens.dim() != 2 or modality.shape != tokens.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} and modality "
                             f"{tuple(modality.shape)} must both be (batch, seq_len)")
        if doc is not None and doc.shape != tokens.shape:
            raise ValueError(f"doc {tuple(doc.shape)} must match tokens {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len "
                             f"({self.cfg.max_seq_len})")
        if tokens.numel() == 0:
            return
        M = self.cfg.num_modalities
        if int(modality.min()) < 0 or int(modality.max()) >= M:
            raise ValueError(f"modality ids must be in [0, {M}) for modalities "
                             f"{self.cfg.modality_names}, got range [{int(modality.min())}, "
                             f"{int(modality.max())}]")
        if bool(((tokens < 0) | (tokens >= self.embed.vocab_sizes[modality])).any()):
            sizes = dict(zip(self.cfg.modality_names, self.embed.vocab_sizes.tolist()))
            raise ValueError(f"token ids out of range for their modality's vocabulary "
                             f"(sizes {sizes})")

    def route(self, modality: torch.Tensor):
        """What the layers receive as `groups`: the modality ids themselves, or, when some
        block routes by modality, one grouping computed here for every layer. Then the residual
        stream itself is kept grouped by modality (rows (N, D)): grouped layers need no gathers,
        and each attention gathers only its input and output back and forth."""
        if not self.needs_grouping:
            return modality
        return Grouping.from_ids(modality, self.cfg.num_modalities, grouped=True)

    def forward(self, tokens: torch.Tensor, modality: torch.Tensor,
                doc: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """tokens, modality, doc: (B, T) -> final hidden states (B, T, D).

        With a `KVCache` (incremental decoding, causal mask only) the tokens continue the cached
        ones: positions start at `cache.length`, and their keys and values are appended."""
        self.check_inputs(tokens, modality, doc)
        B, T = tokens.shape
        x = self.embed(tokens, modality)  # (B, T, D)
        if cache is None:
            mask = build_mask(self.cfg.attention, modality, doc, self.bidirectional_ids)
            use_docs = doc if self.cfg.attention.document_mask else None
            positions = positions_from_documents(use_docs, B, T, tokens.device)
        else:
            if self.cfg.attention.mask != "causal" or doc is not None:
                raise ValueError("a KV cache decodes causally: attention.mask must be 'causal' "
                                 "and no document ids may be given")
            if cache.length + T > self.cfg.max_seq_len:
                raise ValueError(f"cached length {cache.length} + {T} new tokens exceeds "
                                 f"max_seq_len ({self.cfg.max_seq_len})")
            mask = cache.mask(B, T, tokens.device)
            positions = (cache.length + torch.arange(T, device=tokens.device)).expand(B, T)
        rope = self.rotary(positions, x.dtype)
        groups = self.route(modality)
        if isinstance(groups, Grouping):
            x = groups.from_sequence(x)  # (N, D) grouped rows
        for i, layer in enumerate(self.layers):
            x = layer(x, groups, rope, mask, cache, i)
        if cache is not None:
            cache.length += T
        x = self.norm(x, groups)
        return groups.to_sequence(x) if isinstance(groups, Grouping) else x

    def loss(self, batch: Batch) -> LossOutput:
        """Next-token loss of a batch of (B, T+1) sequences, reported per modality."""
        tokens, modality, doc = batch.tokens, batch.modality, batch.doc
        hidden = self(tokens[:, :-1], modality[:, :-1], None if doc is None else doc[:, :-1])
        valid = torch.ones_like(tokens[:, 1:], dtype=torch.bool)
        if doc is not None and self.cfg.attention.document_mask:
            valid &= doc[:, 1:] == doc[:, :-1]  # a document's first token has no context
        if batch.loss_mask is not None:
            valid &= batch.loss_mask[:, 1:]
        D = hidden.shape[-1]
        return modality_loss(self.heads, self.cfg, hidden.reshape(-1, D),
                             tokens[:, 1:].reshape(-1), modality[:, 1:].reshape(-1),
                             valid.reshape(-1))
