"""Late fusion: a small modality encoder whose outputs enter the backbone as input embeddings.

With `fusion: late` (the baseline to early fusion), the tokens of `late_encoder.modalities` are
embedded by the encoder's own tables (linear maps for continuous input), run through its own
small dense transformer (its own width and depth), one sequence per contiguous span of one such
modality, and projected to the backbone width; those vectors replace the positions' token
embeddings. Everything after that is unchanged: the backbone still predicts every token with the
head of its modality.

The encoder is causal within a span, so a position's input never depends on the tokens after it
and the joint next-token loss stays comparable with early fusion. Spans are encoded as one padded
(S, L) batch with the plain causal mask (padding sits at the end of a row, where a causal mask
hides it); `LateEncoder.reference` encodes them one at a time, for checking.

Incremental decoding keeps, beside the keys and values, the inputs of the span each row may still
be in (`FusionCache`), and recomputes the encoder over that span prefix at every step: spans are
short, and it is the same function as the full forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from mot.attention import AttentionMask, KVCache, document_starts
from mot.config import AttentionConfig, ModelConfig
from mot.layers import RMSNorm, Rotary
from mot.modality import FeatureEmbedding
from mot.model import TransformerLayer, init_weights


@dataclass
class SpanLayout:
    """Where the encoded positions of a (B, T) batch go in the padded (S, L) batch of spans.

    at: (B, T) bool, True at positions of an encoded modality; b, t: (N,) their coordinates in
    row-major order; span, pos: (N,) their span (row of the padded batch) and offset in it.
    """

    at: torch.Tensor
    b: torch.Tensor
    t: torch.Tensor
    span: torch.Tensor
    pos: torch.Tensor

    @property
    def num_spans(self) -> int:
        return int(self.span.max()) + 1 if self.span.numel() else 0

    @property
    def max_len(self) -> int:
        return int(self.pos.max()) + 1 if self.pos.numel() else 0


def span_layout(modality: torch.Tensor, ids: torch.Tensor,
                doc: torch.Tensor | None = None) -> SpanLayout:
    """A span is a maximal run of one encoded modality (inside one document, when doc is given).

    modality (B, T) ids, ids (K,) the encoded modalities, doc (B, T) or None."""
    B, T = modality.shape
    at = torch.isin(modality, ids)  # (B, T)
    starts = torch.ones_like(at)
    starts[:, 1:] = modality[:, 1:] != modality[:, :-1]
    if doc is not None:
        starts |= document_starts(doc)
    starts &= at
    b, t = at.nonzero(as_tuple=True)  # (N,), row-major
    span = starts.flatten().cumsum(0)[b * T + t] - 1  # (N,)
    steps = torch.arange(T, device=modality.device).expand(B, T)
    start_t = torch.where(starts, steps, torch.zeros_like(steps)).cummax(dim=1).values  # (B, T)
    return SpanLayout(at, b, t, span, t - start_t[b, t])


def encoder_config(cfg: ModelConfig) -> ModelConfig:
    """The encoder's layers as a config of their own: dense, causal, at the encoder's width."""
    enc = cfg.late_encoder
    attention = AttentionConfig(backend=cfg.attention.backend, mask="causal",
                                bidirectional_modalities=[], document_mask=False,
                                dropout=cfg.attention.dropout)
    return dataclasses.replace(cfg, dim=enc.width(cfg), n_heads=enc.num_heads(cfg),
                               n_kv_heads=None, ffn_hidden=enc.ffn_hidden, n_layers=enc.layers,
                               layers="dense", blocks={}, freeze=[], fusion="early",
                               attention=attention)


class LateEncoder(nn.Module):
    """tokens, modality (B, T) [+ features (B, T, F)] -> (B, T, D) backbone inputs at the
    positions of the encoded modalities (zero elsewhere) and the (B, T) mask of those positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        enc = encoder_config(cfg)
        names = cfg.late_encoder.modalities
        specs = [cfg.modalities[cfg.modality_index(n)] for n in names]
        self.register_buffer("ids", torch.tensor([cfg.modality_index(n) for n in names]),
                             persistent=False)
        self.index = {s.name: cfg.modality_index(s.name) for s in specs}
        self.feature_width = cfg.feature_width if any(s.continuous for s in specs) else 0
        self.tables = nn.ModuleDict({s.name: nn.Embedding(s.vocab_size, enc.dim)
                                     for s in specs if not s.continuous})
        self.feature_embed = FeatureEmbedding(cfg, names, enc.dim)
        self.layers = nn.ModuleList(TransformerLayer(enc, enc.layer_block(i))
                                    for i in range(enc.n_layers))
        self.norm = RMSNorm(enc.dim, eps=enc.norm_eps)
        self.proj = nn.Linear(enc.dim, cfg.dim, bias=False)  # to the backbone width
        self.rotary = Rotary(enc.head_dim, enc.rope_theta)
        self.dim = enc.dim

    def reset_parameters(self, std: float) -> None:
        init_weights(self, std, len(self.layers))

    def encode(self, tokens: torch.Tensor, modality: torch.Tensor,
               features: torch.Tensor | None) -> torch.Tensor:
        """Spans as rows, padded at the end: (S, L) [+ (S, L, F)] -> (S, L, D)."""
        S, L = tokens.shape
        x = torch.zeros(S, L, self.dim, device=tokens.device, dtype=self.proj.weight.dtype)
        for name, table in self.tables.items():
            here = modality == self.index[name]  # (S, L)
            x = torch.where(here[..., None], table(tokens.masked_fill(~here, 0)), x)
        x = self.feature_embed(x, modality, features)
        rope = self.rotary(torch.arange(L, device=tokens.device).expand(S, L), x.dtype)
        mask = AttentionMask(causal=True, max_seqlen=L)
        for layer in self.layers:
            x = layer(x, None, rope, mask)
        return self.proj(self.norm(x))  # (S, L, D)

    def forward(self, tokens: torch.Tensor, modality: torch.Tensor,
                features: torch.Tensor | None = None, doc: torch.Tensor | None = None):
        """-> (encoded (B, T, D), at (B, T)): one padded batch of spans, encoded at once."""
        B, T = tokens.shape
        layout = span_layout(modality, self.ids, doc)
        if layout.b.numel() == 0:
            D = self.proj.weight.shape[0]
            return self.proj.weight.new_zeros(B, T, D), layout.at
        S, L = layout.num_spans, layout.max_len
        where = (layout.span, layout.pos)
        span_tokens = tokens.new_zeros(S, L).index_put(where, tokens[layout.b, layout.t])
        span_modality = modality.new_full((S, L), int(self.ids[0])).index_put(
            where, modality[layout.b, layout.t])
        span_features = None
        if self.feature_width:
            features = self.features_or_zeros(features, B, T, tokens.device)
            span_features = features.new_zeros(S, L, features.shape[-1]).index_put(
                where, features[layout.b, layout.t])
        encoded = self.encode(span_tokens, span_modality, span_features)  # (S, L, D)
        out = encoded.new_zeros(B, T, encoded.shape[-1])
        return out.index_put((layout.b, layout.t), encoded[where]), layout.at

    def reference(self, tokens: torch.Tensor, modality: torch.Tensor,
                  features: torch.Tensor | None = None, doc: torch.Tensor | None = None):
        """The same as `forward`, one span at a time (slow and plain, for tests)."""
        B, T = tokens.shape
        layout = span_layout(modality, self.ids, doc)
        out = self.proj.weight.new_zeros(B, T, self.proj.weight.shape[0])
        if self.feature_width:
            features = self.features_or_zeros(features, B, T, tokens.device)
        for s in range(layout.num_spans):
            b, t = layout.b[layout.span == s], layout.t[layout.span == s]
            f = None if features is None else features[b, t][None]
            out[b, t] = self.encode(tokens[b, t][None], modality[b, t][None], f)[0]
        return out, layout.at

    def forward_cached(self, tokens: torch.Tensor, modality: torch.Tensor,
                       features: torch.Tensor | None, cache: FusionCache):
        """`forward` for T new positions that continue the cached ones: the encoder runs again
        over the open span of each row plus the new positions; the cache keeps the new tail."""
        if not isinstance(cache, FusionCache):
            raise ValueError("late fusion decodes with the cache of model.new_cache(), which "
                             "keeps the open spans the encoder recomputes")
        T = tokens.shape[1]
        if self.feature_width:
            features = self.features_or_zeros(features, *tokens.shape, tokens.device)
        else:
            features = None
        tokens, modality, features = cache.extend(tokens, modality, features)
        encoded, at = self(tokens, modality, features)
        cache.keep_open_spans(self.ids)
        return encoded[:, -T:], at[:, -T:]

    def features_or_zeros(self, features, B: int, T: int, device) -> torch.Tensor:
        if features is not None:
            return features
        return torch.zeros(B, T, self.feature_width, device=device)

    def modality_slices(self):
        """For freezing by modality: the tables are their modality's; the layers too, when the
        encoder encodes one modality only (else they are shared and stay trainable)."""
        slices = [(t.weight, self.index[n], slice(0, t.weight.shape[0]))
                  for n, t in self.tables.items()]
        if len(self.index) == 1:
            m = next(iter(self.index.values()))
            for module in (self.layers, self.norm, self.proj):
                slices += [(p, m, slice(0, p.shape[0])) for p in module.parameters()]
        return slices


class FusionCache(KVCache):
    """A KV cache that also keeps the inputs of the span each row may still be in, for
    `LateEncoder.forward_cached`. `MultimodalTransformer.new_cache()` makes the right kind."""

    def __init__(self, n_layers: int):
        super().__init__(n_layers)
        self.tail: tuple | None = None  # (tokens, modality, features) (B, L) kept from before

    def extend(self, tokens, modality, features):
        """The kept tail followed by the new inputs; becomes the tail until trimmed."""
        if self.tail is not None:
            old_tokens, old_modality, old_features = self.tail
            tokens = torch.cat([old_tokens, tokens], dim=1)
            modality = torch.cat([old_modality, modality], dim=1)
            if features is not None:
                features = torch.cat([old_features, features], dim=1)
        self.tail = (tokens, modality, features)
        return self.tail

    def keep_open_spans(self, ids: torch.Tensor) -> None:
        """Trim the tail to what the next positions may need: from the earliest start, over the
        rows, of a trailing run of an encoded modality (nothing when no row ends in one)."""
        tokens, modality, features = self.tail
        B, L = modality.shape
        steps = torch.arange(L, device=modality.device).expand(B, L)
        starts = torch.ones_like(modality, dtype=torch.bool)
        starts[:, 1:] = modality[:, 1:] != modality[:, :-1]
        last_start = torch.where(starts, steps, torch.zeros_like(steps)).max(dim=1).values  # (B,)
        open_rows = torch.isin(modality[:, -1], ids)
        keep_from = int(torch.where(open_rows, last_start, L).min())
        self.tail = (tokens[:, keep_from:], modality[:, keep_from:],
                     None if features is None else features[:, keep_from:])
