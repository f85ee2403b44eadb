"""The joint-attention backbone: one decoder-only transformer over an interleaved sequence.

Tokens of every modality share one sequence and one global attention (early fusion). What each
layer's parameters are (dense, untied by modality, sparse experts) is decided by the block config
of that layer; the backbone only wires embeddings, layers, final norm and per-modality heads.

Input embeddings come from the packed token table, from a linear map of the feature vectors for a
continuous modality, or, with late fusion, from a separate modality encoder (`mot.fusion`).
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
from mot.modality import (
    FeatureEmbedding,
    LossOutput,
    ModalityEmbedding,
    ModalityHeads,
    RegressionHeads,
    modality_loss,
    regression_loss,
)


@dataclass
class Batch:
    """A batch of token sequences, each of length T + 1 (inputs are [:-1], targets [1:]).

    tokens: (B, T+1) ids local to each token's modality; modality: (B, T+1) modality index;
    doc: optional (B, T+1) document ids of packed sequences; loss_mask: optional (B, T+1) bool,
    False on targets that must not be scored; features: optional (B, T+1, F) float feature
    vectors of the positions of continuous modalities (zeros elsewhere).
    """

    tokens: torch.Tensor
    modality: torch.Tensor
    doc: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    features: torch.Tensor | None = None

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.tokens), move(self.modality), move(self.doc), move(self.loss_mask),
                     move(self.features))


def init_weights(root: nn.Module, std: float, n_layers: int) -> None:
    """Norm weights 1; matrices Normal(0, std), the residual-branch outputs (wo, w2) scaled by
    1/sqrt(2 n_layers)."""
    scaled = (2 * n_layers) ** -0.5
    for module_name, module in root.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.RMSNorm) or getattr(module, "is_norm", False):
                nn.init.ones_(p)
            else:
                out = module_name.endswith(("wo", "ffn")) and name in ("weight", "w2") \
                    or module_name.endswith("w2")
                nn.init.normal_(p, std=std * (scaled if out else 1.0))


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
        # Optional inputs and heads (None unless the config asks for them).
        encoded = cfg.late_encoder.modalities if cfg.fusion == "late" else []
        direct = [m.name for m in cfg.modalities if m.continuous and m.name not in encoded]
        self.feature_embed = FeatureEmbedding(cfg, direct, cfg.dim) if direct else None
        self.regression = RegressionHeads(cfg) \
            if any(m.objective == "regression" for m in cfg.modalities) else None
        self.encoder = None
        if cfg.fusion == "late":
            from mot.fusion import LateEncoder  # builds on this module's layers

            self.encoder = LateEncoder(cfg)
        self.reset_parameters()
        self.frozen = FrozenModalities(self, [cfg.modality_index(n) for n in cfg.freeze]) \
            if cfg.freeze else None

    def reset_parameters(self) -> None:
        """Norm weights 1; matrices Normal(0, init_std), the residual-branch outputs (wo, w2)
        scaled by 1/sqrt(2 n_layers) (the late encoder's by its own depth)."""
        init_weights(self, self.cfg.init_std, self.cfg.n_layers)
        if self.encoder is not None:
            self.encoder.reset_parameters(self.cfg.init_std)

    def new_cache(self) -> KVCache:
        """An empty cache for incremental decoding (with late fusion it also keeps the open
        spans' inputs, which the encoder recomputes)."""
        if self.encoder is not None:
            from mot.fusion import FusionCache

            return FusionCache(len(self.layers))
        return KVCache(len(self.layers))

    def check_features(self, modality: torch.Tensor, features: torch.Tensor | None) -> None:
        """Continuous modalities need features (B, T, F) wherever they occur; without continuous
        modalities features are ignored."""
        width = self.cfg.feature_width
        if width == 0:
            return
        if features is None:
            continuous = [m.name for i, m in enumerate(self.cfg.modalities)
                          if m.continuous and bool((modality == i).any())]
            if continuous:
                raise ValueError(f"modalities {continuous} have input 'continuous': their "
                                 f"positions need features (batch, seq_len, {width}), got none")
            return
        if features.shape != (*modality.shape, width):
            raise ValueError(f"features {tuple(features.shape)} must be (batch, seq_len, F) = "
                             f"{(*modality.shape, width)}, F the widest continuous "
                             "modality's feature_dim")

    def check_inputs(self, tokens: torch.Tensor, modality: torch.Tensor, doc,
                     features: torch.Tensor | None = None) -> None:
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
        bad = (tokens < 0) | (tokens >= self.embed.vocab_sizes[modality])
        if not self.embed.all_discrete:  # the ids of continuous positions are ignored
            bad &= self.embed.discrete[modality]
        if bool(bad.any()):
            sizes = {m.name: m.vocab_size for m in self.cfg.modalities if not m.continuous}
            raise ValueError(f"token ids out of range for their modality's vocabulary "
                             f"(sizes {sizes})")
        self.check_features(modality, features)

    def route(self, modality: torch.Tensor):
        """What the layers receive as `groups`: the modality ids themselves, or, when some
        block routes by modality, one grouping computed here for every layer. Then the residual
        stream itself is kept grouped by modality (rows (N, D)): grouped layers need no gathers,
        and each attention gathers only its input and output back and forth."""
        if not self.needs_grouping:
            return modality
        return Grouping.from_ids(modality, self.cfg.num_modalities, grouped=True)

    def embed_inputs(self, tokens: torch.Tensor, modality: torch.Tensor,
                     doc: torch.Tensor | None = None, features: torch.Tensor | None = None,
                     cache: KVCache | None = None) -> torch.Tensor:
        """Input embeddings (B, T, D): token table rows, feature maps of continuous modalities,
        late-fusion encoder outputs (over the open spans of the cache when decoding)."""
        x = self.embed(tokens, modality)  # (B, T, D)
        if self.feature_embed is not None:
            x = self.feature_embed(x, modality, features)
        if self.encoder is not None:
            if cache is None:
                use_docs = doc if self.cfg.attention.document_mask else None
                encoded, at = self.encoder(tokens, modality, features, use_docs)
            else:
                encoded, at = self.encoder.forward_cached(tokens, modality, features, cache)
            x = torch.where(at[..., None], encoded.to(x.dtype), x)
        return x

    def forward(self, tokens: torch.Tensor, modality: torch.Tensor,
                doc: torch.Tensor | None = None, cache: KVCache | None = None,
                features: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, modality, doc: (B, T), features: (B, T, F) or None -> hidden states (B, T, D).

        With a `KVCache` (incremental decoding, causal mask only; `new_cache()` makes one) the
        tokens continue the cached ones: positions start at `cache.length`, and their keys and
        values are appended."""
        self.check_inputs(tokens, modality, doc, features)
        B, T = tokens.shape
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
        x = self.embed_inputs(tokens, modality, doc, features, cache)  # (B, T, D)
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
        """Next-token loss of a batch of (B, T+1) sequences, reported per modality; targets of
        continuous modalities are left out of it, and scored by feature regression where
        their `loss` is "regression"."""
        tokens, modality, doc, features = batch.tokens, batch.modality, batch.doc, batch.features
        self.check_features(modality, features)
        if self.cfg.feature_width == 0:
            features = None
        hidden = self(tokens[:, :-1], modality[:, :-1], None if doc is None else doc[:, :-1],
                      features=None if features is None else features[:, :-1])
        valid = torch.ones_like(tokens[:, 1:], dtype=torch.bool)
        if doc is not None and self.cfg.attention.document_mask:
            valid &= doc[:, 1:] == doc[:, :-1]  # a document's first token has no context
        if batch.loss_mask is not None:
            valid &= batch.loss_mask[:, 1:]
        scored = valid if self.embed.all_discrete else valid & self.embed.discrete[modality[:, 1:]]
        D = hidden.shape[-1]
        hidden, target_modality = hidden.reshape(-1, D), modality[:, 1:].reshape(-1)
        out = modality_loss(self.heads, self.cfg, hidden, tokens[:, 1:].reshape(-1),
                            target_modality, scored.reshape(-1))
        if self.regression is not None and features is not None:
            target_features = features[:, 1:].reshape(-1, features.shape[-1])
            out = regression_loss(self.regression, self.cfg, hidden, target_features,
                                  target_modality, valid.reshape(-1), out)
        return out
