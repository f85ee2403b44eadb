"""Parameters and FLOPs of a config, computed analytically (no model is built).

Conventions (the ones of `torch.utils.flop_counter`, which tests check us against):
- a matmul of (n, k) by (k, m) is 2 n k m FLOPs; backward costs twice the forward;
- attention scores and values cost 4 T hd per head and token over the full T x T square
  (no discount for the causal mask), as the counter counts attention kernels;
- embedding gathers, norms and activations are not counted;
- "active" parameters exclude the embedding table and the output heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from mot.config import ModelConfig


@dataclass
class Accounting:
    total_params: int
    embedding_params: int  # input embeddings + output heads
    non_embedding_params: int
    active_params: int  # non-embedding parameters one token uses
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


def account(cfg: ModelConfig, seq_len: int | None = None,
            modality_fractions: dict[str, float] | None = None) -> Accounting:
    """Parameters and per-token FLOPs of `cfg` at `seq_len` (default max_seq_len).

    modality_fractions: share of targets of each modality (default: equal shares); it sets the
    average cost of the per-modality output heads.
    """
    seq_len = seq_len or cfg.max_seq_len
    names = cfg.modality_names
    fractions = modality_fractions or {n: 1 / len(names) for n in names}
    vocab = sum(m.vocab_size for m in cfg.modalities)
    embedding = vocab * cfg.dim * (1 if cfg.tie_embeddings else 2)
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
                   for m in cfg.modalities)
    return Accounting(total_params=total + embedding, embedding_params=embedding,
                      non_embedding_params=total, active_params=active,
                      forward_flops_per_token=forward, train_flops_per_token=3 * forward)
