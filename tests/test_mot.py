"""Mixture-of-Transformers: equivalence with dense, global attention, freezing, statistics."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moe.stats import collect
from mot.accounting import account
from mot.convert import dense_to_mot_state
from mot.model import Batch, MultimodalTransformer
from tests.conftest import random_batch, tiny_config

UNTIE = ["ffn", "ffn+attn", "all"]


def mot_config(untie="all", **options):
    return tiny_config(layers="mot", blocks={"mot": {"untie": untie}}, **options)


@pytest.mark.parametrize("untie", UNTIE)
@pytest.mark.parametrize("options", [dict(), dict(norm_reorder=True, n_kv_heads=2)])
def test_identical_copies_equal_dense(untie, options):
    dense = MultimodalTransformer(tiny_config(**options))
    mot = MultimodalTransformer(mot_config(untie, **options))
    mot.load_state_dict(dense_to_mot_state(dense.state_dict(), mot))
    tokens, modality = random_batch(dense.cfg, 2, 30)
    batch = Batch(tokens, modality)
    loss_dense, loss_mot = dense.loss(batch).loss, mot.loss(batch).loss
    torch.testing.assert_close(loss_mot, loss_dense, atol=1e-6, rtol=1e-6)
    loss_dense.backward()
    loss_mot.backward()
    dense_grads = dict(dense.named_parameters())
    for name, p in mot.named_parameters():
        if name.endswith("w13"):  # the grouped FFN's gate and up side by side: dense w1, w3
            stem = name[:-len("w13")]
            want = torch.cat([dense_grads[f"{stem}w{i}.weight"].grad for i in (1, 3)])
        else:
            want = dense_grads.get(name, dense_grads.get(f"{name}.weight")).grad
        grad = p.grad
        if grad.shape != want.shape:  # untied: the copies' gradients add up to the dense one
            grad = grad.sum(0)
            grad = grad.t() if grad.dim() == 2 else grad
        torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-5, msg=name)


def test_untie_levels_own_the_right_parts():
    shapes = {u: {n: p.dim() for n, p in MultimodalTransformer(mot_config(u)).named_parameters()}
              for u in UNTIE}
    grouped = lambda u, n: shapes[u][n] == (3 if "wqkv" in n or "ffn" in n or "wo" in n else 2)  # noqa
    assert grouped("ffn", "layers.0.ffn.w13") and not grouped("ffn", "layers.0.attn.wqkv.weight")
    assert grouped("ffn+attn", "layers.0.attn.wqkv.weight")
    assert grouped("ffn+attn", "layers.0.attn.q_norm.weight")
    assert not grouped("ffn+attn", "layers.0.attn_norm.weight")
    assert grouped("all", "layers.0.attn_norm.weight") and grouped("all", "norm.weight")


def test_attention_is_global_across_modalities():
    cfg = mot_config()
    model = MultimodalTransformer(cfg).eval()
    modality = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 2, 2, 0]])
    tokens = torch.randint(0, 16, modality.shape)
    base = model(tokens, modality)
    changed = tokens.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 16  # an image token
    out = model(changed, modality)
    assert (out[0, 5:] - base[0, 5:]).abs().amax(dim=-1).min() > 1e-4  # later text sees it
    torch.testing.assert_close(out[0, :3], base[0, :3], atol=1e-6, rtol=0)


@pytest.mark.parametrize("untie", UNTIE)
def test_freeze_by_modality(untie):
    cfg = mot_config(untie, freeze=["text"])
    model = MultimodalTransformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    model.frozen.attach(optimizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens, modality = random_batch(cfg, 2, 30)
    for _ in range(3):
        model.loss(Batch(tokens, modality)).loss.backward()
        frozen_rows = model.frozen.rows
        for p, rows in frozen_rows.items():
            assert p.grad[rows].abs().max() == 0  # no gradient on frozen rows
        optimizer.step()
        optimizer.zero_grad()
    params = dict(model.named_parameters())
    text_rows = slice(0, 40)
    assert torch.equal(params["embed.weight"][text_rows], before["embed.weight"][text_rows])
    assert not torch.equal(params["embed.weight"][40:], before["embed.weight"][40:])
    assert torch.equal(params["layers.0.ffn.w13"][0], before["layers.0.ffn.w13"][0])
    assert not torch.equal(params["layers.0.ffn.w13"][1], before["layers.0.ffn.w13"][1])
    shared = "layers.0.attn.wqkv.weight"
    if untie == "ffn":  # shared attention belongs to every modality: it trains
        assert not torch.equal(params[shared], before[shared])
    else:
        assert torch.equal(params[shared][0], before[shared][0])
        assert not torch.equal(params[shared][2], before[shared][2])


def test_freezing_every_modality_turns_grouped_parameters_off():
    model = MultimodalTransformer(mot_config(freeze=["text", "image", "audio"]))
    assert not model.layers[0].ffn.w13.requires_grad and not model.embed.weight.requires_grad


def test_token_counts_per_layer_reach_the_statistics():
    cfg = mot_config(n_layers=2)
    model = MultimodalTransformer(cfg)
    tokens, modality = random_batch(cfg, 3, 20)
    model(tokens, modality)
    model(tokens, modality)
    stats = collect(model)
    expected = 2 * torch.bincount(modality.flatten(), minlength=3)
    assert set(stats) == {"layers.0.ffn", "layers.1.ffn"}
    for layer in stats.values():
        assert layer["tokens"].tolist() == expected.tolist()
    assert collect(model) == {}  # read resets


@pytest.mark.parametrize("untie", UNTIE)
def test_mot_accounting(untie):
    cfg = mot_config(untie, attention={"backend": "reference"})
    model = MultimodalTransformer(cfg)
    acc = account(cfg, 24)
    assert acc.total_params == sum(p.numel() for p in model.parameters())
    dense_acc = account(tiny_config(attention={"backend": "reference"}), 24)
    assert acc.active_params == dense_acc.active_params  # MoT: same compute per token as dense
    tokens, modality = random_batch(cfg, 2, 25)
    targets = modality[:, 1:].reshape(-1)
    fractions = {n: float((targets == m).float().mean()) for m, n in enumerate(cfg.modality_names)}
    with FlopCounterMode(display=False) as counter:
        model.loss(Batch(tokens, modality)).loss.backward()
    expected = account(cfg, 24, fractions).train_flops_per_token * 2 * 24
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


def test_dense_checkpoint_that_does_not_fit_is_rejected():
    dense = MultimodalTransformer(tiny_config(dim=64))
    mot = MultimodalTransformer(mot_config())
    with pytest.raises(ValueError, match="does not map onto"):
        dense_to_mot_state(dense.state_dict(), mot)


def test_block_is_a_drop_in_mlp():
    """The MoT FFN alone: tensor in, same-shaped tensor out, modality ids required."""
    model = MultimodalTransformer(mot_config())
    ffn = model.layers[0].ffn
    x = torch.randn(4, 7, 32)
    assert ffn(x, torch.randint(0, 3, (4, 7))).shape == x.shape
    with pytest.raises(ValueError, match="pass modality ids"):
        ffn(x, None)


def test_freeze_rejects_unknown_modality():
    with pytest.raises(ValueError, match=r"freeze: unknown modality 'video'"):
        mot_config(freeze=["video"])
