"""Analytic parameter and FLOP counts against the built model and torch's FLOP counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mot.accounting import account
from mot.model import Batch, MultimodalTransformer
from tests.conftest import random_batch, tiny_config

VARIANTS = [dict(), dict(n_kv_heads=2, tie_embeddings=True), dict(qk_norm=False, ffn_hidden=48)]

# Continuous inputs and late fusion, on tiny_config's text (40), image (24) and audio (16).
TEXT, IMAGE, AUDIO = ({"name": "text", "vocab_size": 40}, {"name": "image", "vocab_size": 24},
                      {"name": "audio", "vocab_size": 16})


def cont(spec: dict, feature_dim: int, **options) -> dict:
    return {**spec, "input": "continuous", "feature_dim": feature_dim, **options}


CONTINUOUS = dict(modalities=[TEXT, cont(IMAGE, 3), AUDIO])
REGRESSION = dict(modalities=[TEXT, cont(IMAGE, 3, loss="regression"), cont(AUDIO, 5)])
LATE = dict(fusion="late", late_encoder={"layers": 2, "dim": 16, "heads": 2, "ffn_hidden": 40,
                                         "modalities": ["image", "audio"]})
LATE_CONTINUOUS = dict(LATE, modalities=[TEXT, IMAGE, cont(AUDIO, 3, loss="regression")])
NEW_OPTIONS = {
    "continuous": CONTINUOUS,
    "continuous+tied": dict(CONTINUOUS, tie_embeddings=True),
    "regression": REGRESSION,
    "regression+tied": dict(REGRESSION, tie_embeddings=True),
    "late": LATE,
    "late+tied": dict(LATE, tie_embeddings=True),
    "late+mot": dict(LATE, layers="mot"),
    "late+continuous": LATE_CONTINUOUS,
    "late+continuous+mot+tied": dict(LATE_CONTINUOUS, layers="mot", tie_embeddings=True),
    # one continuous modality encoded, one embedded directly; GQA in the backbone only
    "late+encoded+direct": dict(fusion="late", n_kv_heads=2, late_encoder={
        "layers": 1, "modalities": ["image"]},
        modalities=[TEXT, cont(IMAGE, 4), cont(AUDIO, 5, loss="regression")]),
    "late+defaults+untie_ffn": dict(fusion="late", layers="mot", blocks={"mot": {"untie": "ffn"}},
                                    late_encoder={"modalities": ["audio"]}),
}
PARAM_CASES = [pytest.param(o, id=str(i)) for i, o in enumerate(VARIANTS)] + [
    pytest.param(o, id=name) for name, o in NEW_OPTIONS.items()]


def numel(*modules) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


@pytest.mark.parametrize("options", PARAM_CASES)
def test_parameter_count_matches_model(options):
    cfg = tiny_config(**options)
    model = MultimodalTransformer(cfg)
    acc = account(cfg)
    assert acc.total_params == sum(p.numel() for p in model.parameters())
    emb = model.embed.weight.numel() + (0 if cfg.tie_embeddings else model.heads.weight.numel())
    emb += numel(model.feature_embed, model.regression)
    encoder = model.encoder
    if encoder is not None:
        emb += numel(encoder.tables, encoder.feature_embed)
    assert acc.embedding_params == emb
    if encoder is None:
        assert acc.active_params == acc.non_embedding_params  # every token uses everything
    else:  # the encoder's layers, norm and projection serve its modalities' positions only
        rest = numel(encoder.layers, encoder.norm, encoder.proj)
        assert rest > 0 and rest + emb + numel(model.layers, model.norm) == acc.total_params
        share = len(cfg.late_encoder.modalities) / cfg.num_modalities  # default: equal shares
        early = account(tiny_config(**dict(options, fusion="early")))  # the same backbone
        assert early.non_embedding_params == acc.non_embedding_params - rest
        assert acc.active_params == round(early.active_params + share * rest)


@pytest.mark.parametrize("options", VARIANTS)
def test_train_flops_match_flop_counter(options):
    # the reference attention is made of matmuls the counter sees on CPU
    cfg = tiny_config(attention={"backend": "reference"}, **options)
    model = MultimodalTransformer(cfg)
    B, T = 2, 24
    tokens, modality = random_batch(cfg, B, T + 1)
    targets = modality[:, 1:].reshape(-1)
    fractions = {n: float((targets == m).float().mean()) for m, n in enumerate(cfg.modality_names)}
    with FlopCounterMode(display=False) as counter:
        model.loss(Batch(tokens, modality)).loss.backward()
    expected = account(cfg, T, fractions).train_flops_per_token * B * T
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


# Two rows of 24 inputs + 1 last target, as (modality, run length): every run of image (1) or
# audio (2) among the inputs is 4 long and never merges with another, so each encoder span has
# length exactly 4; the shares of inputs and of targets differ.
SPAN = 4
RUNS = [[(0, 3), (1, 4), (0, 2), (2, 4), (1, 4), (0, 7), (0, 1)],
        [(1, 4), (2, 4), (0, 1), (1, 4), (0, 3), (2, 4), (1, 4), (0, 1)]]


def spans_batch(cfg) -> Batch:
    modality = torch.tensor([[m for m, n in row for _ in range(n)] for row in RUNS])
    sizes = torch.tensor([m.vocab_size for m in cfg.modalities])
    tokens = (torch.rand(modality.shape) * sizes[modality]).long()
    features = torch.randn(*modality.shape, cfg.feature_width) if cfg.feature_width else None
    return Batch(tokens, modality, features=features)


def shares(modality: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Exact shares (float32 means are too coarse for a 1e-9 match of the encoder's cost)."""
    return {n: int((modality == m).sum()) / modality.numel() for m, n in enumerate(names)}


@pytest.mark.parametrize("name", ["regression", "regression+tied", "late", "late+mot",
                                  "late+continuous", "late+continuous+mot+tied",
                                  "late+encoded+direct", "late+defaults+untie_ffn"])
def test_train_flops_of_continuous_inputs_and_late_fusion_match_flop_counter(name):
    """Continuous inputs, regression heads and the late encoder on a batch whose encoder spans
    all have length SPAN; head costs follow the target shares, the encoder's the input shares."""
    cfg = tiny_config(attention={"backend": "reference"}, **NEW_OPTIONS[name])
    model = MultimodalTransformer(cfg)
    batch = spans_batch(cfg)
    B, T = batch.tokens.shape[0], batch.tokens.shape[1] - 1
    targets = shares(batch.modality[:, 1:], cfg.modality_names)
    inputs = shares(batch.modality[:, :-1], cfg.modality_names)
    # the encoder runs over 32 of the 48 inputs; 31 of the 48 targets are image or audio
    assert [int((m > 0).sum()) for m in (batch.modality[:, :-1], batch.modality[:, 1:])] == [32, 31]
    with FlopCounterMode(display=False) as counter:
        model.loss(batch).loss.backward()
    acc = account(cfg, T, targets, inputs, span_len=SPAN)
    assert counter.get_total_flops() == pytest.approx(acc.train_flops_per_token * B * T,
                                                      rel=1e-9)
