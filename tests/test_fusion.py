"""Native multimodal ablation axes: continuous patch inputs and late fusion.

Continuous: a continuous modality is embedded by a linear map of its features, is left out of the
softmax loss, and with `loss: regression` adds a feature MSE. Late fusion: a causal encoder per
span whose projected outputs are the spans' input embeddings; cached decoding equals recompute.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from experiments.config import load_config
from experiments.data import TokenStream
from experiments.data.synthetic import FEATURE_DIM, NUM_CLASSES, SPECIALS, synthetic_stream
from mot.attention import KVCache
from mot.fusion import span_layout
from mot.generate import SpanGrammar, generate
from mot.model import Batch, MultimodalTransformer
from tests.conftest import random_batch, tiny_config

IMAGE, AUDIO = 1, 2


def continuous(**overrides):
    """tiny_config with image continuous (3 features) and audio continuous (5 features)."""
    image = {"name": "image", "vocab_size": 24, "input": "continuous", "feature_dim": 3}
    audio = {"name": "audio", "vocab_size": 16, "input": "continuous", "feature_dim": 5}
    image.update(overrides.pop("image", {}))
    audio.update(overrides.pop("audio", {}))
    return tiny_config(modalities=[{"name": "text", "vocab_size": 40}, image, audio],
                       **overrides)


def late(**overrides):
    options = dict(fusion="late", late_encoder={"layers": 2, "dim": 16, "heads": 2,
                                                "modalities": ["image", "audio"]})
    options.update(overrides)
    return tiny_config(**options)


# ---------------------------------------------------------------- continuous inputs


def test_continuous_positions_embed_the_linear_map_of_their_features():
    cfg = continuous()
    model = MultimodalTransformer(cfg)
    tokens, modality = random_batch(cfg, 2, 12)
    features = torch.randn(2, 12, 5)  # the widest feature_dim; image reads the first 3
    x = model.embed_inputs(tokens, modality, features=features)
    image_w = model.feature_embed.proj["image"].weight  # (D, 3)
    audio_w = model.feature_embed.proj["audio"].weight  # (D, 5)
    for b in range(2):
        for t in range(12):
            m = int(modality[b, t])
            if m == IMAGE:
                expected = image_w @ features[b, t, :3]
            elif m == AUDIO:
                expected = audio_w @ features[b, t]
            else:
                expected = model.embed.weight[tokens[b, t]]  # text rows come first
            torch.testing.assert_close(x[b, t], expected)
    # continuous modalities have no rows in the token table nor a softmax head
    assert model.embed.weight.shape[0] == 40 and model.heads.weight.shape[0] == 40
    # their token ids are ignored, even out of any vocabulary
    other = torch.where(modality == 0, tokens, 10_000)
    torch.testing.assert_close(model(other, modality, features=features),
                               model(tokens, modality, features=features))


def test_continuous_targets_are_left_out_of_the_softmax_loss():
    cfg = continuous()
    model = MultimodalTransformer(cfg)
    tokens = torch.tensor([[1, 5, 0, 0, 7, 0, 3, 9]])
    modality = torch.tensor([[0, 0, 1, 1, 0, 2, 0, 0]])
    features = torch.randn(1, 8, 5)
    out = model.loss(Batch(tokens, modality, features=features))
    # targets: positions 1..7 -> text at 1, 4, 6, 7 are scored; image at 2, 3 and audio at 5 not
    assert out.tokens == {"text": 4} and set(out.per_modality) == {"text"}
    hidden = model(tokens[:, :-1], modality[:, :-1], features=features[:, :-1])[0]
    scored = torch.tensor([1, 4, 6, 7])
    ce = F.cross_entropy(model.heads(hidden[scored - 1], 0), tokens[0, scored])
    torch.testing.assert_close(out.lm_loss, ce)
    torch.testing.assert_close(out.loss, out.lm_loss)
    assert out.regression_loss is None


def test_regression_loss_is_the_hand_computed_mse():
    cfg = continuous(image={"loss": "regression", "loss_weight": 0.5}, z_loss=1e-2)
    model = MultimodalTransformer(cfg)
    tokens = torch.tensor([[1, 5, 0, 0, 0, 4, 0, 9], [2, 0, 0, 3, 0, 0, 0, 6]])
    modality = torch.tensor([[0, 0, 1, 1, 1, 0, 2, 0], [0, 1, 1, 0, 2, 1, 1, 0]])
    features = torch.randn(2, 8, 5)
    loss_mask = torch.ones(2, 8, dtype=torch.bool)
    loss_mask[1, 6] = False  # an image target that must not count
    out = model.loss(Batch(tokens, modality, loss_mask=loss_mask, features=features))
    hidden = model(tokens[:, :-1], modality[:, :-1], features=features[:, :-1])
    head = model.regression.proj["image"].weight  # (3, D)
    errors = []
    for b, t in [(0, 2), (0, 3), (0, 4), (1, 1), (1, 2), (1, 5)]:  # image targets, (1, 6) masked
        errors.append((head @ hidden[b, t - 1] - features[b, t, :3]).pow(2))
    mse = torch.cat(errors).sum() / (6 * 3)
    torch.testing.assert_close(out.per_modality["image_mse"], mse.detach())
    assert out.tokens["image_mse"] == 6 and "image" not in out.tokens
    torch.testing.assert_close(out.regression_loss, 0.5 * mse)
    torch.testing.assert_close(out.loss, out.lm_loss + out.z_loss + 0.5 * mse)
    out.loss.backward()
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_continuous_images_carry_the_class_into_the_caption():
    """Trained on the synthetic stream with continuous images (and their regression loss), a
    tiny model names the class after an image from its features: shuffling the features among
    image positions makes the class word much less likely."""
    stream = synthetic_stream(20000, 0)
    train, val = stream.split(0.2)
    cfg = tiny_config(modalities=[{"name": "text", "vocab_size": 64},
                                  {"name": "image", "vocab_size": 64, "input": "continuous",
                                   "feature_dim": FEATURE_DIM, "loss": "regression"}],
                      dim=48, n_layers=2, n_heads=4)
    model = MultimodalTransformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    batch = val.fixed(64, 48, 0)
    first_mse = float(model.loss(batch).per_modality["image_mse"])
    for _ in range(300):
        out = model.loss(train.sample(16, 48, generator))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()
    shuffled = batch.features.clone()
    at = batch.modality == IMAGE
    shuffled[at] = batch.features[at][torch.randperm(int(at.sum()))]
    real_ce = class_word_loss(model, batch, batch.features)
    shuffled_ce = class_word_loss(model, batch, shuffled)
    assert real_ce < math.log(NUM_CLASSES) - 0.5 and shuffled_ce > real_ce + 0.8
    assert float(model.loss(batch).per_modality["image_mse"]) < 0.6 * first_mse


@torch.no_grad()
def class_word_loss(model, batch: Batch, features: torch.Tensor) -> float:
    """Cross-entropy among the class words of class-word targets that follow an image of the
    same document."""
    tokens, modality, doc = batch.tokens, batch.modality, batch.doc
    hidden = model(tokens[:, :-1], modality[:, :-1], doc[:, :-1], features=features[:, :-1])
    image_doc = torch.where(modality == IMAGE, doc, -1).cummax(dim=1).values  # latest image's doc
    first = len(SPECIALS)
    target = tokens[:, 1:]
    sel = (modality[:, 1:] == 0) & (target >= first) & (target < first + NUM_CLASSES) \
        & (image_doc[:, :-1] == doc[:, 1:])
    assert int(sel.sum()) > 20
    logits = model.heads(hidden[sel], 0)[:, first:first + NUM_CLASSES]
    return float(F.cross_entropy(logits, target[sel] - first))


@pytest.mark.parametrize("modalities, message", [
    ([{"name": "text", "vocab_size": 8}, {"name": "image", "vocab_size": 8,
                                           "input": "continuous"}],
     r"modalities.image.feature_dim is required when modalities.image.input is 'continuous'"),
    ([{"name": "text", "vocab_size": 8}, {"name": "image", "vocab_size": 8,
                                           "input": "continuous", "feature_dim": 0}],
     r"modalities.image.feature_dim \(0\) must be a positive integer"),
    ([{"name": "text", "vocab_size": 8, "feature_dim": 4}],
     r"modalities.text.feature_dim \(4\) is only for input 'continuous'"),
    ([{"name": "text", "vocab_size": 8, "input": "pixels"}],
     r"modalities.text.input \('pixels'\) must be one of \['discrete', 'continuous'\]"),
    ([{"name": "text", "vocab_size": 8, "loss": "regression"}],
     r"modalities.text.loss \('regression'\) must be one of \['softmax'\]"),
    ([{"name": "text", "vocab_size": 8}, {"name": "image", "vocab_size": 8,
                                           "input": "continuous", "feature_dim": 2,
                                           "loss": "softmax"}],
     r"modalities.image.loss \('softmax'\) must be one of \['none', 'regression'\]"),
    ([{"name": "image", "vocab_size": 8, "input": "continuous", "feature_dim": 2}],
     r"at least one modality must have input 'discrete'"),
])
def test_continuous_config_errors_name_the_field(modalities, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(modalities=modalities)


def test_missing_or_misshapen_features_are_clear_errors():
    cfg = continuous(image={"loss": "regression"})
    model = MultimodalTransformer(cfg)
    tokens = torch.tensor([[1, 0, 0, 3]])
    modality = torch.tensor([[0, 1, 1, 0]])
    with pytest.raises(ValueError, match=r"modalities \['image'\] have input 'continuous': their "
                                         r"positions need features \(batch, seq_len, 5\)"):
        model(tokens, modality)
    with pytest.raises(ValueError, match=r"features \(1, 4, 3\) must be \(batch, seq_len, F\) = "
                                         r"\(1, 4, 5\)"):
        model(tokens, modality, features=torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match=r"have input 'continuous'"):  # a continuous target only
        model.loss(Batch(torch.tensor([[1, 2, 0]]), torch.tensor([[0, 0, 1]])))
    text_only = torch.tensor([[0, 0, 0]])  # no continuous position: features not needed
    assert model(tokens[:, :3], text_only).shape == (1, 3, 32)


def test_generation_reads_continuous_prompts_and_refuses_to_sample_them():
    cfg = continuous()
    model = MultimodalTransformer(cfg).eval()
    grammar = SpanGrammar(begin={3: IMAGE}, length={IMAGE: 4})
    prompt = torch.tensor([1, 3, 0, 0, 0, 0, 4])  # bos boi [4 image positions] eoi
    prompt_mod = torch.tensor([0, 0, 1, 1, 1, 1, 0])
    features = torch.randn(7, 5)
    tokens, modality = generate(model, prompt, prompt_mod, 3, SpanGrammar(), temperature=0.0,
                                features=features)
    assert modality[0, 7:].tolist() == [0, 0, 0]
    hidden = model(prompt[None], prompt_mod[None], features=features[None])[0, -1]
    assert tokens[0, 7] == int(model.heads(hidden, 0).argmax())  # from the image's features
    with pytest.raises(ValueError, match="have input 'continuous'"):
        generate(model, prompt, prompt_mod, 3, SpanGrammar())  # features missing
    with pytest.raises(ValueError, match=r"generation would have to sample a span of modality "
                                         r"'image', whose input is 'continuous'"):
        generate(model, prompt[:2], prompt_mod[:2], 3, grammar)  # the prompt opens an image
    with torch.no_grad():
        model.heads.weight.zero_()  # greedy text emits id 0 ...
    opens = SpanGrammar(begin={0: IMAGE}, length={IMAGE: 4})  # ... which opens an image
    with pytest.raises(ValueError, match="generation would have to sample a span"):
        generate(model, prompt, prompt_mod, 5, opens, temperature=0.0, features=features)


# ---------------------------------------------------------------- data


def test_packed_format_round_trip_with_features(tmp_path):
    stream = synthetic_stream(3000, 7)
    assert stream.features.shape == (3000, FEATURE_DIM)
    assert (stream.features[stream.modality == 0] == 0).all()
    assert (stream.features[stream.modality == IMAGE].abs().sum(-1) > 0).all()
    stream.save(tmp_path / "corpus")
    loaded = TokenStream.load(tmp_path / "corpus")
    assert loaded.features.dtype == torch.float16
    torch.testing.assert_close(loaded.features.float(), stream.features, atol=2e-3, rtol=1e-3)
    assert torch.equal(loaded.tokens, stream.tokens)
    batch = loaded.sample(3, 20, torch.Generator().manual_seed(0))
    assert batch.features.shape == (3, 21, FEATURE_DIM) and batch.features.dtype == torch.float32
    for b in range(3):  # each row's features are those of its tokens' positions
        start = next(s for s in range(3000 - 20) if torch.equal(loaded.tokens[s:s + 21],
                                                                batch.tokens[b])
                     and torch.equal(loaded.doc[s:s + 21], batch.doc[b]))
        assert torch.equal(batch.features[b], loaded.features[start:start + 21].float())
    train, val = loaded.split(0.1)
    assert len(train.features) == len(train.tokens) and len(val.features) == len(val.tokens)
    assert torch.equal(torch.cat([train.features, val.features]), loaded.features)
    assert loaded.fixed(2, 20, 0).features.shape == (2, 21, FEATURE_DIM)
    # a stream without features stays as it was: no file, no batch field
    plain = TokenStream(stream.tokens, stream.modality, stream.doc, stream.modalities,
                        stream.vocab, stream.specials, stream.spans)
    plain.save(tmp_path / "plain")
    assert not (tmp_path / "plain" / "features.npy").exists()
    again = TokenStream.load(tmp_path / "plain")
    assert again.features is None and again.sample(2, 8, torch.Generator()).features is None


def test_model_must_fit_the_data_features():
    stream = synthetic_stream(3000, 7)
    cfg = load_config(None, ["model.modalities=[{name: text, vocab_size: 64}, {name: image, "
                             "vocab_size: 1, input: continuous, feature_dim: 4}]"]).model
    stream.check_fits(cfg, 64)  # a continuous modality needs no vocabulary room
    wide = load_config(None, ["model.modalities=[{name: text, vocab_size: 64}, {name: image, "
                              "vocab_size: 1, input: continuous, feature_dim: 6}]"]).model
    with pytest.raises(ValueError, match=r"model.modalities.image.feature_dim \(6\): the model's "
                                         r"feature width \(6.*must equal the data's \(4\)"):
        stream.check_fits(wide, 64)
    plain = TokenStream(stream.tokens, stream.modality, stream.doc, stream.modalities,
                        stream.vocab, stream.specials, stream.spans)
    with pytest.raises(ValueError, match=r"model.modalities.image.input is 'continuous', but "
                                         r"the data has no features"):
        plain.check_fits(cfg, 64)


# ---------------------------------------------------------------- late fusion


def test_span_layout_hand_worked():
    modality = torch.tensor([[0, 1, 1, 2, 0, 1],
                             [1, 1, 0, 0, 2, 2]])
    doc = torch.tensor([[0, 0, 0, 0, 0, 0],
                        [0, 0, 0, 0, 0, 1]])
    layout = span_layout(modality, torch.tensor([1, 2]), doc)
    assert layout.b.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert layout.t.tolist() == [1, 2, 3, 5, 0, 1, 4, 5]
    assert layout.span.tolist() == [0, 0, 1, 2, 3, 3, 4, 5]  # a new document splits 2, 2
    assert layout.pos.tolist() == [0, 1, 0, 0, 0, 1, 0, 0]
    assert (layout.num_spans, layout.max_len) == (6, 2)


@pytest.mark.parametrize("options", [{}, dict(layers="mot")])
def test_packed_spans_equal_one_span_at_a_time(options):
    cfg = late(**options)
    model = MultimodalTransformer(cfg)
    tokens, modality = random_batch(cfg, 3, 30)
    doc = torch.tensor([[0] * 12 + [1] * 18, [0] * 30, [0] * 29 + [1]])
    fast, at = model.encoder(tokens, modality, doc=doc)
    slow, slow_at = model.encoder.reference(tokens, modality, doc=doc)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert torch.equal(at, slow_at) and torch.equal(at, modality > 0)
    assert (fast[~at] == 0).all()


def test_encoder_is_causal_within_a_span_and_blind_to_the_rest():
    cfg = late()
    model = MultimodalTransformer(cfg)
    modality = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0, 2, 2, 2, 0]])
    tokens = torch.tensor([[5, 6, 1, 2, 3, 4, 5, 7, 1, 2, 3, 8]])
    changed = tokens.clone()
    changed[0, 4] = 9  # the third image token
    changed[0, 0] = 30  # and text before the span
    enc, _ = model.encoder(tokens, modality)
    enc2, _ = model.encoder(changed, modality)
    torch.testing.assert_close(enc[0, :4], enc2[0, :4])  # earlier positions of the span
    assert not torch.allclose(enc[0, 4:7], enc2[0, 4:7])  # the changed one and after
    torch.testing.assert_close(enc[0, 7:], enc2[0, 7:])  # the next span
    # through the whole model: causal, so the change reaches no earlier position
    h, h2 = model(tokens, modality), model(changed, modality)
    assert not torch.allclose(h[0, 0], h2[0, 0])
    h, h2 = model(tokens[:, 1:], modality[:, 1:]), model(changed[:, 1:], modality[:, 1:])
    torch.testing.assert_close(h[0, :3], h2[0, :3])
    assert not torch.allclose(h[0, 3:], h2[0, 3:])
    # a span's encoding does not depend on where it is in the sequence
    moved, _ = model.encoder(tokens[:, 2:7], modality[:, 2:7])
    torch.testing.assert_close(moved[0], enc[0, 2:7], atol=1e-6, rtol=1e-5)


def test_zero_projection_gives_encoded_positions_zero_input():
    cfg = late(tie_embeddings=True)
    model = MultimodalTransformer(cfg)
    tokens, modality = random_batch(cfg, 2, 20)
    with torch.no_grad():
        model.encoder.proj.weight.zero_()
    x = model.embed_inputs(tokens, modality)
    text = modality == 0
    assert (x[~text] == 0).all()
    torch.testing.assert_close(x[text], model.embed.weight[tokens[text]])


def test_late_fusion_trains_with_mot_layers_and_continuous_input():
    cfg = late(layers="mot", modalities=[
        {"name": "text", "vocab_size": 40}, {"name": "image", "vocab_size": 24},
        {"name": "audio", "vocab_size": 16, "input": "continuous", "feature_dim": 3,
         "loss": "regression"}])
    model = MultimodalTransformer(cfg)
    assert model.feature_embed is None  # audio enters through the encoder
    assert set(model.encoder.feature_embed.proj) == {"audio"}
    tokens, modality = random_batch(cfg, 2, 25)
    batch = Batch(tokens, modality, features=torch.randn(2, 25, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = model.loss(batch)
        first = first if first is not None else out.loss.item()
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.loss.item() < 0.7 * first
    assert set(out.per_modality) == {"text", "image", "audio_mse"}
    assert model.encoder.layers[0].attn.wqkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("options", [
    {}, dict(layers="mot"), dict(late_encoder={"layers": 1, "modalities": ["image"]}),
    dict(modalities=[{"name": "text", "vocab_size": 40}, {"name": "image", "vocab_size": 24},
                     {"name": "audio", "vocab_size": 16, "input": "continuous",
                      "feature_dim": 3}])])
def test_kv_cached_decoding_equals_full_recompute(options):
    cfg = late(**options)
    model = MultimodalTransformer(cfg).eval()
    tokens, modality = random_batch(cfg, 2, 24)
    features = torch.randn(2, 24, 3) if cfg.feature_width else None
    full = model(tokens, modality, features=features)
    cache = model.new_cache()
    pieces = [model(tokens[:, :5], modality[:, :5], cache=cache,
                    features=None if features is None else features[:, :5])]
    for t in range(5, 24):
        pieces.append(model(tokens[:, t:t + 1], modality[:, t:t + 1], cache=cache,
                            features=None if features is None else features[:, t:t + 1]))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    open_runs = [len(row) - next(i for i in range(len(row)) if set(row[i:]) == {row[-1]})
                 for row in modality.tolist() if row[-1] != 0]
    assert cache.tail[1].shape[1] == max(open_runs, default=0)  # only the open spans are kept
    with pytest.raises(ValueError, match=r"late fusion decodes with the cache of "
                                         r"model.new_cache\(\)"):
        model(tokens[:, :3], modality[:, :3], cache=KVCache(cfg.n_layers),
              features=None if features is None else features[:, :3])


def test_late_fusion_generation_equals_greedy_recompute():
    cfg = late()
    model = MultimodalTransformer(cfg).eval()
    grammar = SpanGrammar(begin={3: IMAGE, 4: AUDIO}, length={IMAGE: 5, AUDIO: 3})
    prompt, prompt_mod = torch.tensor([1, 7, 3, 2]), torch.tensor([0, 0, 0, 1])
    tokens, modality = generate(model, prompt, prompt_mod, 20, grammar, temperature=0.0)
    # the same continuation, recomputing the whole sequence at every step
    seq, mods = prompt.tolist(), prompt_mod.tolist()
    m, left = grammar.start(seq, mods)
    with torch.no_grad():
        for _ in range(20):
            hidden = model(torch.tensor([seq]), torch.tensor([mods]))[0, -1]
            token = int(model.heads(hidden, m).argmax())
            seq.append(token)
            mods.append(m)
            m, left = grammar.step(token, m, left)
    assert tokens[0].tolist() == seq and modality[0].tolist() == mods
    assert mods[4:8] == [IMAGE] * 4  # the span the prompt opened, continued from the cache


@pytest.mark.parametrize("overrides, message", [
    (dict(fusion="middle"), r"fusion \('middle'\) must be one of \['early', 'late'\]"),
    (dict(fusion="late", late_encoder={"modalities": ["video"]}),
     r"late_encoder.modalities: unknown modality 'video'; valid: \['text', 'image', 'audio'\]"),
    (dict(late_encoder={"layers": 0}), r"late_encoder.layers \(0\) must be a positive integer"),
    (dict(late_encoder={"modalities": []}), r"late_encoder.modalities \(\[\]\) must be a "
                                            r"non-empty list"),
    (dict(fusion="late", late_encoder={"dim": 24, "heads": 5}),
     r"late_encoder.heads \(5\) must divide late_encoder.dim \(24\)"),
    (dict(fusion="late", late_encoder={"dim": 36, "heads": 4}),
     r"late_encoder.dim / late_encoder.heads \(9\) must be even"),
    (dict(fusion="late", late_encoder={"dim": 12}),
     r"late_encoder.dim / late_encoder.heads \(3\) must be even"),
])
def test_late_fusion_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_freezing_a_modality_freezes_its_encoder_and_feature_map():
    cfg = tiny_config(fusion="late", late_encoder={"modalities": ["image"]}, freeze=["image"],
                      modalities=[{"name": "text", "vocab_size": 40},
                                  {"name": "image", "vocab_size": 24},
                                  {"name": "audio", "vocab_size": 16, "input": "continuous",
                                   "feature_dim": 3}])
    model = MultimodalTransformer(cfg)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert model.feature_embed.proj["audio"].weight.requires_grad
    again = MultimodalTransformer(dataclasses.replace(cfg, freeze=["audio"]))
    assert not again.feature_embed.proj["audio"].weight.requires_grad
    assert all(p.requires_grad for p in again.encoder.parameters())
    tokens, modality = random_batch(cfg, 2, 16)
    for frozen in (model, again):  # and a training step leaves them as they were
        before = {n: p.detach().clone() for n, p in frozen.named_parameters()}
        optimizer = torch.optim.AdamW([p for p in frozen.parameters() if p.requires_grad])
        frozen.frozen.attach(optimizer)
        frozen.loss(Batch(tokens, modality, features=torch.randn(2, 16, 3))).loss.backward()
        optimizer.step()
        for name, p in frozen.named_parameters():
            if not p.requires_grad:
                assert torch.equal(p, before[name]), name


# ---------------------------------------------------------------- the training entry point


@pytest.mark.parametrize("overrides, losses", [
    (["model.fusion=late", "model.layers=mot"], {"text", "image"}),
    (["model.modalities.image.input=continuous", "model.modalities.image.feature_dim=4",
      "model.modalities.image.loss=regression", "model.fusion=late"], {"text", "image_mse"}),
    (["model.modalities.image.input=continuous", "model.modalities.image.feature_dim=4",
      "model.layers=mot"], {"text"}),
])
def test_runs_from_dotted_overrides(tmp_path, overrides, losses):
    from experiments.train import train

    cfg = load_config(None, [f"train.out_dir={tmp_path}", "train.steps=3", "train.eval_every=3",
                             "train.batch_size=2", "train.seq_len=32", "model.dim=32",
                             "model.n_layers=2", "model.max_seq_len=32", "data.num_tokens=3000",
                             *overrides])
    summary = train(cfg, progress=False)
    assert set(summary["val_loss"]) == losses
    assert all(math.isfinite(v) for v in summary["val_loss"].values())
