"""Parameters and FLOPs of a config, computed analytically (no model is built).

Conventions (the ones of `torch.utils.flop_counter`, which tests check us against):
- a matmul of (n, k) by (k, m) is 2 n k m FLOPs; backward costs twice the forward (input and
  weight gradients), except where the input needs no gradient (the feature maps below: weight
  gradient only, so backward costs once the forward);
- attention scores and values cost 4 T hd per head and token over the full T x T square
  (no discount for the causal mask), as the counter counts attention kernels;
- embedding gathers, norms, activations and losses are not counted;
- what is counted is what the model executes, which is not always the least it could:
  a continuous modality's feature map (`mot.modality.FeatureEmbedding`) is applied to every
  position of the sequence and then selected, so it costs 2 F_m D per token of any modality,
  not only per token of modality m;
- embedding parameters are the token tables (the backbone's and the late encoder's), the
  softmax heads (unless tied), the feature maps of continuous modalities and the regression
  heads: everything that maps between a modality's tokens or features and a hidden width.

Continuous modalities (`input: continuous`) own no rows in the token table nor in the softmax
heads; each has a bias-free `Linear(F_m, D)` feature map (in the late encoder instead, at its
width E, when the encoder encodes it), and with `loss: regression` a bias-free `Linear(D, F_m)`
head applied to the targets of modality m.

Late fusion (`fusion: late`): the encoder (`mot.fusion.LateEncoder`) adds its own tables
(V_m x E) or feature maps (F_m x E) for the modalities it encodes, its dense layers at width E,
a final norm and the projection E -> D. The backbone keeps its table rows for the encoded
discrete modalities: their input embedding is replaced by the encoder's output, so untied they
are held but unused, tied they are the modality's softmax head. The encoder runs only over the
positions of the encoded modalities, each span (maximal run of one encoded modality) as one
causal sequence; its cost per encoded token assumes every span is `span_len` tokens long (the
model pads the spans of a batch to the longest one, so spans of varied lengths cost more: the
padded positions are computed too).
"""

from __future__ import annotations

from dataclasses import dataclass

from mot.config import ModelConfig


@dataclass
class Accounting:
    total_params: int
    embedding_params: int  # tables, softmax heads, feature maps, regression heads
    non_embedding_params: int
    active_params: int  # non-embedding parameters one input token uses, on average
    forward_flops_per_token: float
    train_flops_per_token: float  # forward + backward


def attention_params(cfg: ModelConfig, block, copies: bool = True) -> int:
    n = lambda part: block.copies(cfg, part) if copies else 1  # noqa: E731
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    params = n("attn") * (cfg.dim * qkv + cfg.n_heads * cfg.head_dim * cfg.dim)
    params += n("norm") * 2 * cfg.dim
    if cfg.qk_norm:
        params += n("qk_norm") * 2 * cfg.head_dim
    return params


def attention_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward matmul FLOPs of one token through one attention layer."""
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    projections = 2 * cfg.dim * qkv + 2 * cfg.n_heads * cfg.head_dim * cfg.dim
    return projections + 4 * seq_len * cfg.head_dim * cfg.n_heads


@dataclass
class EncoderAccounting:
    """The late encoder alone. Parameters: `embedding` (its tables and feature maps) and `other`
    (layers, final norm, projection to the backbone). FLOPs are forward, per encoded token:
    `flops` for its layers and projection, `feature_flops` for its feature maps."""

    embedding: int
    other: int
    flops: float
    feature_flops: float


def late_encoder_accounting(cfg: ModelConfig, span_len: int) -> EncoderAccounting:
    """The late encoder of `cfg` (fusion "late"), its spans all `span_len` tokens long.

    With E its width, L = span_len and the encoded modalities split into discrete (vocab V_m)
    and continuous (feature_dim F_m):
        embedding = sum_discrete V_m E + sum_continuous F_m E
        other = sum_layers (attention + FFN parameters at width E) + E + E D
        flops = sum_layers (attention_flops(E, L) + ffn_flops(E)) + 2 E D
        feature_flops = sum_continuous 2 F_m E   (each map runs over every span position)
    """
    from mot.fusion import encoder_config  # the encoder's own layer config, as the model builds

    enc = encoder_config(cfg)
    specs = [cfg.modalities[cfg.modality_index(n)] for n in cfg.late_encoder.modalities]
    embedding = sum((m.feature_dim if m.continuous else m.vocab_size) * enc.dim for m in specs)
    other = enc.dim + enc.dim * cfg.dim  # final norm, projection
    flops = 2.0 * enc.dim * cfg.dim
    for i in range(enc.n_layers):
        block = enc.layer_block(i)
        other += attention_params(enc, block) + block.ffn_params(enc)[0]
        flops += attention_flops(enc, span_len) + block.ffn_flops(enc)
    feature_flops = sum(2.0 * m.feature_dim * enc.dim for m in specs if m.continuous)
    return EncoderAccounting(embedding, other, flops, feature_flops)


def account(cfg: ModelConfig, seq_len: int | None = None,
            modality_fractions: dict[str, float] | None = None,
            input_fractions: dict[str, float] | None = None,
            span_len: int | None = None) -> Accounting:
    """Parameters and per-token FLOPs of `cfg` at `seq_len` (default max_seq_len).

    modality_fractions: share of targets of each modality (default: equal shares); it sets the
    average cost of the per-modality output heads (softmax for discrete modalities, the
    regression head for `loss: regression` ones, nothing for continuous ones with `loss: none`).
    input_fractions: share of input positions of each modality (default: modality_fractions);
    with late fusion, the share f_enc of positions the encoder runs over (the sum over its
    modalities) weights its FLOPs and active parameters.
    span_len: with late fusion, the length of the spans the encoder attends within (default
    seq_len, one span filling the sequence: an overestimate of its attention when spans are
    shorter). The model's spans are maximal runs of one encoded modality, so this is a
    property of the data (e.g. the tokens of one image), not of the config.

    With D the width, per token (averaged over the tokens of a sequence):
        forward = sum_layers (attention_flops(D, seq_len) + ffn_flops)
                  + sum_discrete 2 D V_m f_m + sum_regression 2 D F_m f_m     (heads)
                  + sum_direct 2 F_m D                                      (feature maps)
                  + f_enc (encoder flops + encoder feature_flops)
        train = 3 forward - feature maps' forward     (their inputs need no gradient)
    where f_m are modality_fractions and the direct feature maps are those of the continuous
    modalities the encoder does not encode. See `late_encoder_accounting` for the encoder.

    active_params: the non-embedding parameters one input position uses, on average: every
    layer once (one copy of each untied part, the active experts), the final norm, and with
    late fusion f_enc times the encoder's non-embedding parameters (its layers, norm and
    projection: used by the positions of its modalities only); rounded to an integer.
    """
    seq_len = seq_len or cfg.max_seq_len
    names = cfg.modality_names
    fractions = modality_fractions or {n: 1 / len(names) for n in names}
    inputs = input_fractions or fractions
    encoded = cfg.late_encoder.modalities if cfg.fusion == "late" else []
    rows = sum(m.vocab_size for m in cfg.modalities if not m.continuous)
    embedding = rows * cfg.dim * (1 if cfg.tie_embeddings else 2)
    direct = [m for m in cfg.modalities if m.continuous and m.name not in encoded]
    regression = [m for m in cfg.modalities if m.objective == "regression"]
    embedding += sum(m.feature_dim * cfg.dim for m in direct)
    embedding += sum(cfg.dim * m.feature_dim for m in regression)
    last = cfg.layer_block(cfg.n_layers - 1)
    total = active = 0
    forward = 0.0
    for i in range(cfg.n_layers):
        block = cfg.layer_block(i)
        ffn_total, ffn_active = block.ffn_params(cfg)
        total += attention_params(cfg, block) + ffn_total
        active += attention_params(cfg, block, copies=False) + ffn_active
        forward += attention_flops(cfg, seq_len) + block.ffn_flops(cfg)
    total += last.copies(cfg, "norm") * cfg.dim
    active += cfg.dim
    forward += sum(2 * cfg.dim * m.vocab_size * fractions.get(m.name, 0.0)
                   for m in cfg.modalities if not m.continuous)
    forward += sum(2 * cfg.dim * m.feature_dim * fractions.get(m.name, 0.0) for m in regression)
    feature_forward = sum(2.0 * m.feature_dim * cfg.dim for m in direct)
    if encoded:
        enc = late_encoder_accounting(cfg, span_len or seq_len)
        f_enc = sum(inputs.get(n, 0.0) for n in encoded)
        embedding += enc.embedding
        total += enc.other
        active += f_enc * enc.other
        forward += f_enc * enc.flops
        feature_forward += f_enc * enc.feature_flops
    forward += feature_forward
    return Accounting(total_params=total + embedding, embedding_params=embedding,
                      non_embedding_params=total, active_params=round(active),
                      forward_flops_per_token=forward,
                      train_flops_per_token=3 * forward - feature_forward)
