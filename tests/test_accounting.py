"""Analytic parameter and FLOP counts against the built model and torch's FLOP counter."""

import pytest
from torch.utils.flop_counter import FlopCounterMode

from mot.accounting import account
from mot.model import Batch, MultimodalTransformer
from tests.conftest import random_batch, tiny_config

VARIANTS = [dict(), dict(n_kv_heads=2, tie_embeddings=True), dict(qk_norm=False, ffn_hidden=48)]


@pytest.mark.parametrize("options", VARIANTS)
def test_parameter_count_matches_model(options):
    cfg = tiny_config(**options)
    model = MultimodalTransformer(cfg)
    acc = account(cfg)
    assert acc.total_params == sum(p.numel() for p in model.parameters())
    emb = model.embed.weight.numel() + (0 if cfg.tie_embeddings else model.heads.weight.numel())
    assert acc.embedding_params == emb
    assert acc.active_params == acc.non_embedding_params  # dense: every token uses everything


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
