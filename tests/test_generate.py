"""KV-cached decoding equals full recompute; sampling switches heads at the span markers."""

import pytest
import torch

from mot.attention import KVCache
from mot.generate import SpanGrammar, generate, sample
from mot.model import MultimodalTransformer
from tests.conftest import random_batch, tiny_config

KINDS = {"dense": {}, "mot": dict(layers="mot"), "moe": dict(layers="dense,moe"),
         "gqa+reorder": dict(n_kv_heads=2, norm_reorder=True)}


@pytest.mark.parametrize("kind", list(KINDS))
def test_kv_cached_steps_equal_full_recompute(kind):
    cfg = tiny_config(**KINDS[kind])
    model = MultimodalTransformer(cfg).eval()
    tokens, modality = random_batch(cfg, 2, 20)
    full = model(tokens, modality)
    cache = KVCache(cfg.n_layers)
    pieces = [model(tokens[:, :7], modality[:, :7], cache=cache)]  # a prompt, then one by one
    for t in range(7, 20):
        pieces.append(model(tokens[:, t:t + 1], modality[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 20 and cache.keys[0].shape[1] == 20


def test_grammar_hand_worked():
    g = SpanGrammar(begin={3: 1, 5: 2}, length={1: 2, 2: 1})
    assert g.start([1, 9], [0, 0]) == (0, 0)
    assert g.start([1, 3], [0, 0]) == (1, 2)  # prompt ends on begin-of-image
    assert g.start([3, 7], [0, 1]) == (1, 1)  # one image token already there
    assert g.step(7, 1, 2) == (1, 1) and g.step(7, 1, 1) == (0, 0)
    assert g.step(5, 0, 0) == (2, 1) and g.step(9, 0, 0) == (0, 0)
    with pytest.raises(ValueError, match="needs a span length >= 1"):
        SpanGrammar(begin={3: 1})


def test_generation_switches_heads_at_the_markers():
    cfg = tiny_config()
    model = MultimodalTransformer(cfg)
    with torch.no_grad():
        model.heads.weight[:40].zero_()  # text logits all equal: greedy text always emits id 0
    grammar = SpanGrammar(begin={0: 1}, length={1: 4})  # id 0 opens a 4-token image span
    tokens, modality = generate(model, torch.tensor([5, 6]), torch.tensor([0, 0]), 12, grammar,
                                temperature=0.0)
    assert modality[0].tolist() == [0, 0] + [0, 1, 1, 1, 1] * 2 + [0, 1]
    new = list(zip(tokens[0, 2:].tolist(), modality[0, 2:].tolist()))
    assert all(t == 0 for t, m in new if m == 0)  # the text head chose the marker
    assert all(t < 24 for t, m in new if m == 1)  # image tokens come from the image vocabulary
    image_head = model.heads(model(tokens[:, :3], modality[:, :3])[0, -1], 1)
    assert new[1][0] == int(image_head.argmax())  # ... sampled with the image head


def test_sampling_follows_the_grammar():
    model = MultimodalTransformer(tiny_config())
    grammar = SpanGrammar(begin={3: 1, 4: 2}, length={1: 3, 2: 2})
    prompt, prompt_mod = torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0])
    tokens, modality = generate(model, prompt, prompt_mod, 30, grammar, top_k=5,
                                generator=torch.Generator().manual_seed(0))
    state = grammar.start(prompt.tolist(), prompt_mod.tolist())
    assert state == (1, 3)  # the prompt ends on begin-of-image
    for t, m in zip(tokens[0, 3:].tolist(), modality[0, 3:].tolist()):
        assert m == state[0]
        state = grammar.step(t, *state)


def test_greedy_and_top_k_sampling():
    logits = torch.tensor([0.1, 2.0, 1.5, -1.0])
    assert sample(logits, 0.0, None, None) == 1
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, 1.0, 2, g) for _ in range(50)}
    assert picks == {1, 2}


def test_cache_needs_causal_masking():
    model = MultimodalTransformer(tiny_config(attention={"mask": "bidirectional_spans"}))
    tokens, modality = random_batch(model.cfg, 1, 4)
    with pytest.raises(ValueError, match="a KV cache decodes causally"):
        model(tokens, modality, cache=KVCache(2))
