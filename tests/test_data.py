"""The digits corpus, its tokenizers and the packed on-disk format."""

import numpy as np
import pytest
import torch

from experiments.config import load_config
from experiments.data import TokenStream, build_stream
from mot.tokenizers import BPETokenizer, VQTokenizer, VQVAEConfig, train_vqvae
from mot.tokenizers.vqvae import reconstruction_report

pytest.importorskip("sklearn", reason="needs scikit-learn (the bundled digits)")
from sklearn.datasets import load_digits  # noqa: E402


@pytest.fixture(scope="module")
def digits_stream(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = load_config(None, ["data.name=digits", "data.num_tokens=20000", "data.vq_steps=300",
                             f"data.cache_dir={cache}", "data.text_vocab=400"])
    return cfg, build_stream(cfg.data)


def test_text_round_trip_is_exact():
    tok = BPETokenizer.train(["a handwritten seven", "three plus four is"] * 20, 300)
    for text in ["a handwritten seven", "ünïcode ✓ and emoji 😀\n\ttabs", "", "  spaces  "]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.specials == {"pad": 0, "bos": 1, "eos": 2, "boi": 3, "eoi": 4, "boa": 5, "eoa": 6}
    with pytest.raises(ValueError, match=r"text vocab_size \(100\) must be >= 263"):
        BPETokenizer.train(["x"], 100)


@pytest.mark.parametrize("ema", [0.99, 0.0])
def test_vq_reconstructs_held_out_digits(ema, tmp_path):
    images = torch.tensor(load_digits().images, dtype=torch.float32)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, held_out = images[perm[:1500]], images[perm[1500:]]
    model = train_vqvae(train, VQVAEConfig(ema_decay=ema), steps=600)
    report = reconstruction_report(model, held_out)
    # pixels scaled to [0, 1]: predicting the mean image gives about 0.09
    assert report["mse"] < 0.01 and report["codebook_usage"] > 0.5
    tok = VQTokenizer(model)
    tok.save(tmp_path / "vq.pt")
    again = VQTokenizer.load(tmp_path / "vq.pt")
    ids = tok.encode(held_out[0])
    assert len(ids) == 16 and again.encode(held_out[0]) == ids
    assert torch.equal(again.decode(ids), tok.decode(ids))


def test_dead_codes_are_restarted():
    images = torch.tensor(load_digits().images[:256], dtype=torch.float32)
    cfg = VQVAEConfig(codebook_size=64, restart_after=5)
    model = train_vqvae(images, cfg, steps=60, batch_size=64)
    assert int(model.idle.max()) < 5 + 1


def test_digits_documents_and_split(digits_stream):
    cfg, stream = digits_stream
    assert stream.modalities == ["text", "image"] and stream.vocab["image"] == 128
    images = stream.meta["images"]
    assert not set(images["train"]) & set(images["val"])
    train, val = stream.split(cfg.data.val_fraction)
    assert train.doc[-1] < val.doc[0]  # documents do not straddle the split
    # every image span of the validation part is the code sequence of a validation image
    vq = VQTokenizer.load(next(cfg.data.cache_path.glob("digits-*")) / "vq.pt")
    all_codes = vq.encode_batch(torch.tensor(load_digits().images, dtype=torch.float32))
    val_codes = {tuple(all_codes[i].tolist()) for i in images["val"]}
    spans = _image_spans(val)
    assert spans and all(tuple(s) in val_codes for s in spans)
    boi, eoi = stream.specials["boi"], stream.specials["eoi"]
    tokens, modality = stream.tokens.tolist(), stream.modality.tolist()
    for i, m in enumerate(modality):
        if m == 1:
            assert tokens[i - 1] == boi or modality[i - 1] == 1
            assert (i + 1 < len(tokens) and tokens[i + 1] == eoi) or modality[i + 1] == 1


def _image_spans(stream):
    spans, current = [], []
    for t, m in zip(stream.tokens.tolist(), stream.modality.tolist()):
        if m == 1:
            current.append(t)
        elif current:
            spans.append(current)
            current = []
    return spans


def test_digits_corpus_is_deterministic_and_cached(digits_stream, tmp_path):
    cfg, stream = digits_stream
    again = build_stream(cfg.data)  # from the cache
    assert torch.equal(again.tokens, stream.tokens) and torch.equal(again.doc, stream.doc)
    fresh = load_config(None, ["data.name=digits", "data.num_tokens=20000",
                               "data.vq_steps=300", f"data.cache_dir={tmp_path}",
                               "data.text_vocab=400"])
    rebuilt = build_stream(fresh.data)  # built again from scratch, same seed
    assert torch.equal(rebuilt.tokens, stream.tokens)


def test_packed_format_round_trip(tmp_path):
    stream = TokenStream(torch.tensor([1, 5, 6, 2, 1, 3, 9, 4, 2]),
                         torch.tensor([0, 0, 0, 0, 0, 0, 1, 0, 0]),
                         torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1]), ["text", "image"],
                         {"text": 10, "image": 12}, {"bos": 1}, {"boi": ("image", 1)}, 4,
                         {"note": "x"})
    stream.save(tmp_path / "corpus")
    assert np.load(tmp_path / "corpus" / "tokens.npy").dtype == np.int32
    loaded = TokenStream.load(tmp_path / "corpus")
    for name in ("tokens", "modality", "doc"):
        assert torch.equal(getattr(loaded, name), getattr(stream, name))
    assert loaded.spans == {"boi": ("image", 1)} and loaded.split_at == 4
    with pytest.raises(ValueError, match="holds no packed corpus"):
        TokenStream.load(tmp_path / "nothing")


def test_bad_mix_is_rejected():
    with pytest.raises(ValueError, match=r"data.mix .* must map some of"):
        load_config(None, ["data.mix={poetry: 1.0}"])


def test_digits_image_positions_carry_their_pixel_patches(digits_stream):
    from experiments.data.digits import patches

    cfg, stream = digits_stream
    images = torch.tensor(load_digits().images, dtype=torch.float32)
    # hand check of the patch order: the top-left 2 x 2 block first, row by row
    assert patches(images[0])[0].tolist() == [images[0][0, 0] / 16, images[0][0, 1] / 16,
                                              images[0][1, 0] / 16, images[0][1, 1] / 16]
    vq = VQTokenizer.load(next(cfg.data.cache_path.glob("digits-*")) / "vq.pt")
    all_codes = vq.encode_batch(images)
    by_codes = {tuple(all_codes[i].tolist()): i for i in range(len(images))}
    is_image = stream.modality == 1
    assert torch.all(stream.features[~is_image] == 0)
    starts = (is_image & ~torch.roll(is_image, 1)).nonzero().flatten().tolist()
    checked = 0
    for s in starts[:50]:
        image = by_codes.get(tuple(stream.tokens[s:s + 16].tolist()))
        if image is None:
            continue
        feats = stream.features[s:s + 16].float()
        # several scans can share a code sequence: the features match one of them
        same = [i for i in range(len(images))
                if torch.equal(all_codes[i], all_codes[image])]
        assert any(torch.allclose(feats, patches(images[i]), atol=1e-3) for i in same)
        checked += 1
    assert checked > 10
