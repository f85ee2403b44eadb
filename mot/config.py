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


INPUTS = ("discrete", "continuous")
LOSSES = {"discrete": ("softmax",), "continuous": ("none", "regression")}


@dataclass
class ModalitySpec:
    """One modality: its name, vocabulary size (ids are local to the modality) and loss weight.

    input: "discrete" (each position carries a token id of the vocabulary) or "continuous"
        (each position carries a feature vector of `feature_dim` floats, embedded by a linear
        map; its token id is ignored, and the modality has no vocabulary rows and no softmax head).
    loss: what the positions that predict this modality are scored with: "softmax" (discrete,
        the default), "none" (continuous default: not scored) or "regression" (continuous: a
        linear head predicts the next position's features, mean-squared error).
    """

    name: str
    vocab_size: int
    loss_weight: float = 1.0
    input: str = "discrete"
    feature_dim: int | None = None
    loss: str | None = None  # None: the input's default (see `objective`)

    def __post_init__(self):
        check(isinstance(self.name, str) and self.name.isidentifier(),
              f"modality name ({self.name!r}) must be a non-empty identifier")
        where = f"modalities.{self.name}"
        check_positive(f"{where}.vocab_size", self.vocab_size)
        check_non_negative(f"{where}.loss_weight", self.loss_weight)
        check(self.input in INPUTS, f"{where}.input ({self.input!r}) must be one of {list(INPUTS)}")
        if self.continuous:
            check(self.feature_dim is not None, f"{where}.feature_dim is required when "
                                                f"{where}.input is 'continuous'")
            check_positive(f"{where}.feature_dim", self.feature_dim)
        else:
            check(self.feature_dim is None, f"{where}.feature_dim ({self.feature_dim!r}) is only "
                                            f"for input 'continuous'; {where}.input is "
                                            f"{self.input!r}")
        valid = LOSSES[self.input]
        check(self.loss is None or self.loss in valid,
              f"{where}.loss ({self.loss!r}) must be one of {list(valid)} for input {self.input!r}")

    @property
    def continuous(self) -> bool:
        return self.input == "continuous"

    @property
    def objective(self) -> str:
        """The loss with its default resolved: "softmax", "none" or "regression"."""
        return self.loss or LOSSES[self.input][0]


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


FUSIONS = ("early", "late")


@dataclass
class LateEncoderConfig:
    """The modality encoder of late fusion (`ModelConfig.fusion: late`, see `mot.fusion`).

    A small dense causal transformer of its own width that embeds the tokens of `modalities`
    with its own tables (or linear maps, for continuous input), runs over each contiguous span of
    one such modality separately, and is projected to the backbone width.
    layers: its depth; dim / heads / ffn_hidden: its width (None: the backbone's dim, n_heads,
    and the LLaMA hidden size of `dim`); modalities: the modalities it encodes.
    """

    layers: int = 2
    dim: int | None = None
    heads: int | None = None
    ffn_hidden: int | None = None
    modalities: list[str] = field(default_factory=lambda: ["image"])

    def __post_init__(self):
        check_positive("late_encoder.layers", self.layers)
        for key in ("dim", "heads", "ffn_hidden"):
            if getattr(self, key) is not None:
                check_positive(f"late_encoder.{key}", getattr(self, key))
        check(isinstance(self.modalities, list) and len(self.modalities) > 0
              and len(set(self.modalities)) == len(self.modalities),
              f"late_encoder.modalities ({self.modalities!r}) must be a non-empty list of "
              "distinct modality names")

    def validate_for(self, model: ModelConfig) -> None:
        """Checks against the backbone; run only when `model.fusion` is "late"."""
        names = model.modality_names
        for name in self.modalities:
            check(name in names, f"late_encoder.modalities: unknown modality {name!r}; "
                                 f"valid: {names}")
        dim, heads = self.width(model), self.num_heads(model)
        check(dim % heads == 0, f"late_encoder.heads ({heads}) must divide late_encoder.dim "
                                f"({dim})")
        check((dim // heads) % 2 == 0, f"late_encoder.dim / late_encoder.heads ({dim // heads}) "
                                       "must be even for RoPE")

    def width(self, model: ModelConfig) -> int:
        return self.dim or model.dim

    def num_heads(self, model: ModelConfig) -> int:
        return self.heads or model.n_heads


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
    fusion: "early" (every token enters the backbone through its embedding) or "late" (the
        tokens of `late_encoder.modalities` first run through a separate encoder whose outputs
        are projected in as their input embeddings; see `mot.fusion`).
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
    fusion: str = "early"
    late_encoder: LateEncoderConfig = field(default_factory=LateEncoderConfig)

    def __post_init__(self):
        from mot.blocks import block_config  # the registry lives beside the blocks

        check(isinstance(self.modalities, list) and len(self.modalities) > 0,
              "modalities must be a non-empty list")
        self.modalities = [m if isinstance(m, ModalitySpec) else ModalitySpec(**m)
                           for m in self.modalities]
        names = [m.name for m in self.modalities]
        check(len(set(names)) == len(names), f"modalities names ({names}) must be unique")
        check(any(not m.continuous for m in self.modalities),
              "modalities: at least one modality must have input 'discrete' (generation and the "
              "token loss need a vocabulary)")
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
        check(self.fusion in FUSIONS, f"fusion ({self.fusion!r}) must be one of {list(FUSIONS)}")
        if isinstance(self.late_encoder, dict):
            self.late_encoder = LateEncoderConfig(**self.late_encoder)
        if self.fusion == "late":
            self.late_encoder.validate_for(self)

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

    @property
    def feature_width(self) -> int:
        """F of the (B, T, F) features a batch carries: the widest continuous modality's
        feature_dim (each continuous modality reads its first feature_dim columns); 0 if none."""
        return max((m.feature_dim for m in self.modalities if m.continuous), default=0)

    def layer_block(self, i: int):
        """The block config of layer `i`."""
        kinds = self.layer_kinds
        return self.blocks[kinds[i % len(kinds)]]

    def modality_index(self, name: str) -> int:
        names = self.modality_names
        check(name in names, f"unknown modality {name!r}; valid: {names}")
        return names.index(name)
