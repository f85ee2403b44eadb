"""MoE, MoMa and MoT+MoE as block kinds of the backbone."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moe import MoE
from moe.layers import SwiGLU
from moe.stats import collect, summarize
from mot.accounting import account
from mot.model import Batch, MultimodalTransformer
from tests.conftest import random_batch, tiny_config

KINDS = {
    "moe": dict(layers="moe", blocks={"moe": {"num_experts": 4, "top_k": 2}}),
    "moe+shared": dict(layers="dense,moe", blocks={"moe": {"num_experts": 4, "top_k": 1,
                                                           "shared_experts": 1,
                                                           "shared_gate": True}}),
    "moma": dict(layers="moma", blocks={"moma": {"num_experts": 6, "top_k": 1}}),
    "mot_moe": dict(layers="mot_moe", blocks={"mot_moe": {"moe_modalities": ["text"],
                                                          "moe": {"num_experts": 4}}}),
    "mot,moe": dict(layers="mot,moe", blocks={"moe": {"balance_loss_type": "sequence"}}),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_block_kind_accounting_matches_model_and_counter(kind):
    cfg = tiny_config(attention={"backend": "reference"}, **KINDS[kind])
    model = MultimodalTransformer(cfg)
    acc = account(cfg, 24)
    assert acc.total_params == sum(p.numel() for p in model.parameters())
    if kind in ("moe", "moe+shared", "mot,moe"):  # every token costs the same
        tokens, modality = random_batch(cfg, 2, 25)
        targets = modality[:, 1:].reshape(-1)
        fractions = {n: float((targets == m).float().mean())
                     for m, n in enumerate(cfg.modality_names)}
        with FlopCounterMode(display=False) as counter:
            model.loss(Batch(tokens, modality)).loss.backward()
        expected = account(cfg, 24, fractions).train_flops_per_token * 2 * 24
        assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("kind", list(KINDS))
def test_block_kind_trains(kind):
    cfg = tiny_config(**KINDS[kind])
    model = MultimodalTransformer(cfg)
    tokens, modality = random_batch(cfg, 2, 25)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        loss = model.loss(Batch(tokens, modality)).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.7 * first
    assert collect(model)  # every kind reports routing statistics


def test_moma_keeps_each_modality_on_its_experts():
    cfg = tiny_config(layers="moma", blocks={"moma": {"num_experts": 6, "top_k": 1}})
    model = MultimodalTransformer(cfg)
    assert model.layers[0].ffn.cfg.experts_per_modality == [2, 2, 2]
    tokens, modality = random_batch(cfg, 2, 30)
    model(tokens, modality)
    counts = collect(model)["layers.0.ffn"]["modality_tokens"]  # (3 modalities, 6 experts)
    for m in range(3):
        outside = [e for e in range(6) if e // 2 != m]
        assert counts[m, outside].sum() == 0 and counts[m].sum() > 0


def test_mot_moe_runs_moe_for_text_and_dense_for_the_rest():
    cfg = tiny_config(**KINDS["mot_moe"])
    model = MultimodalTransformer(cfg)
    ffn = model.layers[0].ffn
    assert isinstance(ffn.ffns[0], MoE) and all(isinstance(f, SwiGLU) for f in ffn.ffns[1:])
    x = torch.randn(2, 9, 32)
    modality = torch.randint(0, 3, (2, 9))
    y = ffn(x, modality)
    for m, f in enumerate(ffn.ffns):
        torch.testing.assert_close(y[modality == m], f(x[modality == m]), atol=1e-6, rtol=1e-6)


def test_freeze_image_tower_of_mot_moe():
    cfg = tiny_config(freeze=["image"], **KINDS["mot_moe"])
    model = MultimodalTransformer(cfg)
    assert not any(p.requires_grad for p in model.layers[0].ffn.ffns[1].parameters())
    assert all(p.requires_grad for p in model.layers[0].ffn.ffns[0].parameters())


def test_routing_summary_is_readable():
    cfg = tiny_config(**KINDS["moe"])
    model = MultimodalTransformer(cfg)
    tokens, modality = random_batch(cfg, 2, 30)
    model(tokens, modality)
    metrics = summarize(collect(model)["layers.0.ffn"], row_labels=cfg.modality_names)
    assert sum(metrics[f"tokens/{e}"] for e in range(4)) == pytest.approx(1.0)
    assert metrics["drop_fraction"] == 0.0 and metrics["load_cv"] >= 0
    assert 0 < metrics["router_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert sum(metrics[f"modality_tokens/text/{e}"] for e in range(4)) == pytest.approx(1.0)
    assert 0.5 < metrics["balance_loss"] <= 4.0  # about 1 when balanced, at most E = 4
    assert metrics["z_loss"] > 0


@pytest.mark.parametrize("blocks, message", [
    ({"moe": {"top_k": 9}}, r"moe.top_k \(9\) must be in \[1, moe.num_experts \(8\)\]"),
    ({"moma": {"num_experts": 7}}, r"blocks.moma.num_experts \(7\) must divide evenly"),
    ({"moe": {"experts_per_modality": [4, 4]}}, r"needs one entry per modality"),
    ({"mot_moe": {"moe_modalities": ["video"]}}, r"moe_modalities: unknown modality 'video'"),
    ({"mot_moe": {"moe": {"experts": 3}}}, r"blocks.mot_moe.moe: unknown option\(s\)"),
])
def test_block_config_errors(blocks, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(layers=next(iter(blocks)), blocks=blocks)
