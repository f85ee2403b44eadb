"""Masks and attention backends: reference equals SDPA, causality, bidirectional spans,
documents."""

import pytest
import torch

from mot.attention import (
    build_mask,
    flash_available,
    positions_from_documents,
    reference_attention,
    sdpa_attention,
)
from mot.config import AttentionConfig
from mot.model import MultimodalTransformer
from tests.conftest import random_batch, tiny_config

IMAGE = 1


def allowed_matrix(cfg, modality, doc=None):
    mask = build_mask(cfg, modality, doc, [IMAGE])
    if mask.causal:
        T = modality.shape[1]
        return torch.ones(T, T, dtype=torch.bool).tril().expand(modality.shape[0], T, T)
    return mask.allowed[:, 0]


def test_bidirectional_span_mask_hand_worked():
    # text text image image image text image image ; two image spans
    modality = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1]])
    allowed = allowed_matrix(AttentionConfig(mask="bidirectional_spans"), modality)[0]
    expected = torch.ones(8, 8, dtype=torch.bool).tril()
    expected[2:5, 2:5] = True  # first image span sees itself both ways
    expected[6:8, 6:8] = True  # second span, not the first one's future
    assert torch.equal(allowed, expected)


def test_document_mask_hand_worked():
    modality = torch.tensor([[0, 0, 1, 1, 0]])
    doc = torch.tensor([[0, 0, 0, 1, 1]])
    mask = build_mask(AttentionConfig(mask="bidirectional_spans"), modality, doc, [IMAGE])
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[:3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()
    expected[2, 2] = True
    expected[3:, 3:] = torch.ones(2, 2, dtype=torch.bool).tril()
    # the image run crosses the document boundary: it is two spans, one per document
    assert torch.equal(mask.allowed[0, 0], expected)
    assert mask.cu_seqlens.tolist() == [0, 3, 5] and mask.max_seqlen == 3
    assert positions_from_documents(doc, 1, 5, "cpu").tolist() == [[0, 1, 2, 0, 1]]


@pytest.mark.parametrize("mode", ["causal", "bidirectional_spans"])
@pytest.mark.parametrize("with_docs", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_equals_reference(mode, with_docs, kv_heads, dtype):
    B, T, H, hd = 2, 37, 4, 16
    q = torch.randn(B, T, H, hd, dtype=dtype)
    k, v = torch.randn(2, B, T, kv_heads, hd, dtype=dtype)
    modality = torch.randint(0, 2, (B, T))
    doc = torch.randint(0, 3, (B, T)).sort(dim=1).values if with_docs else None
    mask = build_mask(AttentionConfig(mask=mode), modality, doc, [IMAGE])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(sdpa_attention(q, k, v, mask), reference_attention(q, k, v, mask),
                               atol=tol, rtol=tol)


def test_mask_bias_is_built_once_per_dtype():
    modality = torch.randint(0, 2, (2, 9))
    doc = torch.randint(0, 3, (2, 9)).sort(dim=1).values
    mask = build_mask(AttentionConfig(), modality, doc, [IMAGE])
    bias = mask.bias(torch.float32)
    assert mask.bias(torch.float32) is bias  # shared by every layer of the forward
    assert torch.equal(bias == 0, mask.allowed) and torch.isneginf(bias[~mask.allowed]).all()
    assert mask.bias(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_model_is_causal(backend):
    cfg = tiny_config(attention={"backend": backend})
    model = MultimodalTransformer(cfg).eval()
    tokens, modality = random_batch(cfg, 2, 24)
    base = model(tokens, modality)
    for t in (5, 13, 23):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 16
        out = model(changed, modality)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-4  # the change itself is seen


def test_model_bidirectional_image_span():
    cfg = tiny_config(attention={"mask": "bidirectional_spans"})
    model = MultimodalTransformer(cfg).eval()
    modality = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1]])
    tokens = torch.randint(0, 16, modality.shape)
    base = model(tokens, modality)
    changed = tokens.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 16  # last token of the first image span
    out = model(changed, modality)
    # earlier tokens of the same image span see it
    assert (out[0, 3:6] - base[0, 3:6]).abs().amax(dim=-1).min() > 1e-4
    torch.testing.assert_close(out[0, :3], base[0, :3], atol=1e-6, rtol=0)  # text before: no


def test_document_mask_isolates_documents():
    cfg = tiny_config()
    model = MultimodalTransformer(cfg).eval()
    tokens, modality = random_batch(cfg, 1, 20)
    doc = torch.tensor([[0] * 8 + [1] * 12])
    packed = model(tokens, modality, doc)
    alone = model(tokens[:, 8:], modality[:, 8:])  # the second document on its own
    torch.testing.assert_close(packed[:, 8:], alone, atol=1e-5, rtol=1e-5)


def test_flash_backend_names_what_is_missing():
    missing = flash_available()
    if missing is None:
        pytest.skip("flash-attn and CUDA are both present")
    with pytest.raises(ValueError, match="attention.backend 'flash' needs"):
        MultimodalTransformer(tiny_config(attention={"backend": "flash"}))
