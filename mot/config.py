"""Typed configuration of the multimodal backbone.

`ModelConfig` describes the whole model; each layer's block (dense, MoT, MoE, ...) is described
by its own small config class registered in `mot.blocks`. Every value is checked in
`__post_init__`, and a bad value raises `ValueError` naming the field and the valid range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def check(ok: bool, message: str) -> None:
    """Raise `ValueError(message)` unless `ok`: the one way config checks fail."""
    if not ok:
        raise ValueError(message)


def check_positive(name: str, value: Any) -> None:
    check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
          f"{name} ({value!r}) must be a positive integer")


def check_unit_interval(name: str, value: Any) -> None:
    check(isinstance(value, (int, float)) and 0.0 <= value < 1.0,
          f"{name} ({value!r}) must be in [0, 1)")


def check_non_negative(name: str, value: Any) -> None:
    check(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
          f"{name} ({value!r}) must be >= 0")


@dataclass
class ModalitySpec:
    """One modality: its name, vocabulary size (ids are local to the modality) and loss weight."""

    name: str
    vocab_size: int
    loss_weight: float = 1.0

    def __post_init__(self):
        check(isinstance(self.name, str) and self.name.isidentifier(),
              f"modality name ({self.name!r}) must be a non-empty identifier")
        check_positive(f"modalities.{self.name}.vocab_size", self.vocab_size)
        check_non_negative(f"modalities.{self.name}.loss_weight", self.loss_weight)


ATTENTION_BACKENDS = ("sdpa", "reference", "flash")
MASK_MODES = ("causal", "bidirectional_spans")


@dataclass
class AttentionConfig:
    """How attention is computed and masked.

    mask: "causal", or "bidirectional_spans" (Transfusion): causal, except that tokens inside
        one contiguous span of a modality listed in `bidirectional_modalities` see each other.
        With discrete next-token targets a bidirectional span lets a position see the token it
        predicts; the mode is meant for continuous (non-autoregressive) image tokens.
    document_mask: when the batch carries document ids (packed sequences), tokens attend only
        within their own document.
    backend: "sdpa" (`F.scaled_dot_product_attention`), "reference" (plain softmax, for
        checking), or "flash" (flash-attn varlen kernels; needs the `flash-attn` package and CUDA).
    """

    backend: str = "sdpa"
    mask: str = "causal"
    bidirectional_modalities: list[str] = field(default_factory=lambda: ["image"])
    document_mask: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        check(self.backend in ATTENTION_BACKENDS,
              f"attention.backend ({self.backend!r}) must be one of {list(ATTENTION_BACKENDS)}")
        check(self.mask in MASK_MODES,
              f"attention.mask ({self.mask!r}) must be one of {list(MASK_MODES)}")
        check_unit_interval("attention.dropout", self.dropout)
        check(not (self.backend == "flash" and self.mask == "bidirectional_spans"),
              "attention.mask 'bidirectional_spans' is not supported by attention.backend "
              "'flash' (varlen kernels are causal or fully bidirectional); use 'sdpa'")


def default_modalities() -> list[ModalitySpec]:
    return [ModalitySpec("text", 256), ModalitySpec("image", 256)]


@dataclass
class ModelConfig:
    """The backbone: sizes, stability options, modalities and the per-layer block pattern.

    layers: comma-separated block kinds, repeated to `n_layers` ("dense", or "dense,moe" for
        alternating layers). Each kind's options live in `blocks[kind]` (see `mot.blocks`).
    norm_reorder: Chameleon's ordering `h = x + norm(f(x))` instead of pre-norm `x + f(norm(x))`.
    z_loss: coefficient of the LM z-loss `mean(logsumexp(logits)^2)` (Chameleon uses 1e-5).
    freeze: modalities whose own parameters stay fixed in training (see `mot.freeze`).
    """

    modalities: list[ModalitySpec] = field(default_factory=default_modalities)
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    qk_norm: bool = True
    norm_reorder: bool = False
    norm_eps: float = 1e-5
    dropout: float = 0.0
    z_loss: float = 0.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    layers: str = "dense"
    blocks: dict[str, Any] = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)

    def __post_init__(self):
        from mot.blocks import block_config  # the registry lives beside the blocks

        check(isinstance(self.modalities, list) and len(self.modalities) > 0,
              "modalities must be a non-empty list")
        self.modalities = [m if isinstance(m, ModalitySpec) else ModalitySpec(**m)
                           for m in self.modalities]
        names = [m.name for m in self.modalities]
        check(len(set(names)) == len(names), f"modalities names ({names}) must be unique")
        if isinstance(self.attention, dict):
            self.attention = AttentionConfig(**self.attention)
        for name in self.attention.bidirectional_modalities:
            check(name in names, f"attention.bidirectional_modalities: unknown modality "
                                 f"{name!r}; valid: {names}")
        for name in self.freeze:
            check(name in names, f"freeze: unknown modality {name!r}; valid: {names}")
        for key in ("dim", "n_layers", "n_heads", "max_seq_len"):
            check_positive(key, getattr(self, key))
        check(self.dim % self.n_heads == 0,
              f"n_heads ({self.n_heads}) must divide dim ({self.dim})")
        check(self.head_dim % 2 == 0, f"dim / n_heads ({self.head_dim}) must be even for RoPE")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        check_positive("n_kv_heads", self.n_kv_heads)
        check(self.n_heads % self.n_kv_heads == 0,
              f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.ffn_hidden is None:  # LLaMA's 2/3 * 4 * dim, rounded up to a multiple of 64
            self.ffn_hidden = -(-(8 * self.dim // 3) // 64) * 64
        check_positive("ffn_hidden", self.ffn_hidden)
        check(self.rope_theta > 0, f"rope_theta ({self.rope_theta}) must be > 0")
        check(0 < self.norm_eps < 1, f"norm_eps ({self.norm_eps}) must be in (0, 1)")
        check_unit_interval("dropout", self.dropout)
        check_non_negative("z_loss", self.z_loss)
        check_non_negative("init_std", self.init_std)
        # Block options: each entry becomes the typed config of its kind.
        check(isinstance(self.blocks, dict), "blocks must be a mapping from block kind to options")
        self.blocks = {kind: block_config(kind, opts) for kind, opts in self.blocks.items()}
        pattern = self.layer_kinds
        check(len(pattern) > 0 and self.n_layers % len(pattern) == 0,
              f"layers ({self.layers!r}) has {len(pattern)} entries, which must divide "
              f"n_layers ({self.n_layers})")
        for kind in pattern:
            if kind not in self.blocks:
                self.blocks[kind] = block_config(kind, {})
        for cfg in self.blocks.values():
            cfg.validate_for(self)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def layer_kinds(self) -> list[str]:
        kinds = [k.strip() for k in self.layers.split(",")] if isinstance(self.layers, str) \
            else list(self.layers)
        return kinds

    def layer_block(self, i: int):
        """The block config of layer `i`."""
        kinds = self.layer_kinds
        return self.blocks[kinds[i % len(kinds)]]

    def modality_index(self, name: str) -> int:
        names = self.modality_names
        check(name in names, f"unknown modality {name!r}; valid: {names}")
        return names.index(name)
