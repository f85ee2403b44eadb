"""The backbone end to end: losses per modality, stability options, input errors, learning."""

import pytest
import torch
import torch.nn.functional as F

from mot.model import Batch, MultimodalTransformer
from tests.conftest import random_batch, tiny_config


def test_per_modality_losses_add_up_with_weights():
    weights = {"text": 1.0, "image": 0.5, "audio": 2.0}
    cfg = tiny_config(modalities=[{"name": n, "vocab_size": v, "loss_weight": weights[n]}
                                  for n, v in [("text", 40), ("image", 24), ("audio", 16)]])
    model = MultimodalTransformer(cfg)
    tokens, modality = random_batch(cfg, 3, 33)
    out = model.loss(Batch(tokens, modality))
    n = sum(out.tokens.values())
    assert n == 3 * 32 and set(out.tokens) == set(weights)
    expected = sum(weights[m] * out.tokens[m] / n * out.per_modality[m] for m in weights)
    torch.testing.assert_close(out.lm_loss.detach(), expected)
    # and each per-modality loss is the cross-entropy of that modality's own head
    hidden = model(tokens[:, :-1], modality[:, :-1]).reshape(-1, cfg.dim)
    target, target_mod = tokens[:, 1:].reshape(-1), modality[:, 1:].reshape(-1)
    for m, name in enumerate(cfg.modality_names):
        sel = target_mod == m
        ce = F.cross_entropy(model.heads(hidden[sel], m), target[sel])
        torch.testing.assert_close(out.per_modality[name], ce.detach())


def test_z_loss_matches_definition():
    cfg = tiny_config(z_loss=1e-2)
    model = MultimodalTransformer(cfg)
    tokens, modality = random_batch(cfg, 2, 17)
    out = model.loss(Batch(tokens, modality))
    hidden = model(tokens[:, :-1], modality[:, :-1]).reshape(-1, cfg.dim)
    target_mod = modality[:, 1:].reshape(-1)
    lse = torch.cat([model.heads(hidden[target_mod == m], m).logsumexp(-1) for m in range(3)])
    torch.testing.assert_close(out.z_loss, 1e-2 * lse.pow(2).mean())
    torch.testing.assert_close(out.loss, out.lm_loss + out.z_loss)


def test_document_boundaries_and_loss_mask_are_not_scored():
    cfg = tiny_config()
    model = MultimodalTransformer(cfg)
    tokens, modality = random_batch(cfg, 1, 11)
    doc = torch.tensor([[0] * 5 + [1] * 6])
    loss_mask = torch.ones(1, 11, dtype=torch.bool)
    loss_mask[0, -1] = False
    out = model.loss(Batch(tokens, modality, doc, loss_mask))
    assert sum(out.tokens.values()) == 10 - 1 - 1  # first token of doc 1, and the masked one


@pytest.mark.parametrize("options", [dict(norm_reorder=True), dict(tie_embeddings=True),
                                     dict(n_kv_heads=2), dict(qk_norm=False),
                                     dict(dropout=0.1, attention={"dropout": 0.1})])
def test_options_train(options):
    """Every stability / shape option builds, runs forward and backward, and the loss falls."""
    cfg = tiny_config(**options)
    model = MultimodalTransformer(cfg)
    tokens, modality = random_batch(cfg, 2, 25)
    batch = Batch(tokens, modality)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model.loss(batch).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.7 * first


def test_tied_embeddings_share_one_tensor():
    model = MultimodalTransformer(tiny_config(tie_embeddings=True))
    assert model.heads.head_weight(1).data_ptr() == model.embed.weight[40:].data_ptr()
    names = [n for n, _ in model.named_parameters()]
    assert "heads.weight" not in names


def test_tiny_model_overfits_a_fixed_batch():
    cfg = tiny_config(dim=64, n_layers=2)
    model = MultimodalTransformer(cfg)
    tokens, modality = random_batch(cfg, 2, 32)
    batch = Batch(tokens, modality)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        out = model.loss(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.lm_loss.item() < 0.1, out.per_modality


@pytest.mark.parametrize("make_input, message", [
    (lambda t, m: (t[0], m[0]), "must both be \\(batch, seq_len\\)"),
    (lambda t, m: (t, m[:, :-1]), "must both be \\(batch, seq_len\\)"),
    (lambda t, m: (t, m + 3), "modality ids must be in \\[0, 3\\)"),
    (lambda t, m: (t + 40, m), "token ids out of range"),
    (lambda t, m: (torch.zeros(1, 65, dtype=torch.long),) * 2, "exceeds max_seq_len \\(64\\)"),
])
def test_bad_inputs_raise_clear_errors(make_input, message):
    cfg = tiny_config()
    model = MultimodalTransformer(cfg)
    tokens, modality = random_batch(cfg, 2, 9)
    with pytest.raises(ValueError, match=message):
        model(*make_input(tokens, modality))
