"""The built-in "digits" corpus: real handwritten digits with captions, arithmetic and prose.

Images are scikit-learn's bundled `load_digits` (1797 scans, 8 x 8, 16 grey levels; shipped
with the package, nothing is downloaded). Documents, mixed by `data.mix`:

    caption_image   <bos> "a handwritten seven" <boi> 16 image codes <eoi> <eos>
    image_caption   <bos> <boi> codes <eoi> "the digit 7" <eos>
    arithmetic      <bos> "three plus four is" <boi> codes of a 7 <eoi> <eos>
    prose           <bos> a paragraph of the Python documentation (pydoc_data) <eos>

Captions come from several templates with number words or digits. Images are split once,
seeded, into train and validation sets (no image in both); the validation documents use only
validation images and prose paragraphs. Tokenizers (byte-level BPE for text, a VQ-VAE for
images: 4 x 4 = 16 codes per image) are trained on the train split and cached.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from mot.tokenizers import BPETokenizer, VQTokenizer, VQVAEConfig, train_vqvae

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTIONS = ["a handwritten {w}", "the digit {d}", "a picture of the number {w}",
            "{W}, written by hand", "an image showing a {w}", "here is a {d}",
            "this is the number {w}", "a scanned digit: {d}", "the number {d} in ink",
            "a {w} drawn by hand"]
KINDS = ("caption_image", "image_caption", "arithmetic", "prose")


def caption(label: int, rng: np.random.Generator) -> str:
    return fill(CAPTIONS[rng.integers(len(CAPTIONS))], label)


def number(n: int, rng: np.random.Generator) -> str:
    return WORDS[n] if rng.random() < 0.5 else str(n)


def arithmetic(rng: np.random.Generator) -> tuple[str, int]:
    a, b = int(rng.integers(10)), int(rng.integers(10))
    if rng.random() < 0.5 and a + b <= 9:
        return f"{number(a, rng)} plus {number(b, rng)} is", a + b
    a, b = max(a, b), min(a, b)
    return f"{number(a, rng)} minus {number(b, rng)} is", a - b


def prose_paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            text = " ".join(block.split())
            if 40 <= len(text) <= 400:
                paragraphs.append(text)
    return paragraphs


def fill(template: str, label: int) -> str:
    return template.format(w=WORDS[label], W=WORDS[label].capitalize(), d=label)


def cache_folder(cfg):
    """Where the corpus and tokenizers of data config `cfg` are cached."""
    key = hashlib.sha256(json.dumps([cfg.seed, cfg.num_tokens, cfg.val_fraction, cfg.mix,
                                     cfg.text_vocab, cfg.vq_steps], sort_keys=True).encode())
    return cfg.cache_path / f"digits-{key.hexdigest()[:12]}"


def load_tokenizers(cfg) -> tuple[BPETokenizer, VQTokenizer]:
    """The text and image tokenizers of a digits corpus (built if not cached yet)."""
    build_digits(cfg)
    folder = cache_folder(cfg)
    return BPETokenizer.load(folder / "text.json"), VQTokenizer.load(folder / "vq.pt")


def build_digits(cfg):
    """The digits `TokenStream` for data config `cfg` (cached under `cfg.cache_dir`)."""
    from experiments.data import TokenStream

    cache = cache_folder(cfg)
    if (cache / "index.json").is_file():
        return TokenStream.load(cache)
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)  # (1797, 8, 8), 0..16
    labels = digits.target.tolist()
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(labels))
    n_val = max(1, int(len(labels) * cfg.val_fraction))
    split_images = {"train": sorted(order[n_val:].tolist()), "val": sorted(order[:n_val].tolist())}
    paragraphs = prose_paragraphs()
    p_order = rng.permutation(len(paragraphs))
    p_val = max(1, int(len(paragraphs) * cfg.val_fraction))
    split_prose = {"train": [paragraphs[i] for i in p_order[p_val:]],
                   "val": [paragraphs[i] for i in p_order[:p_val]]}
    # tokenizers, trained on the train split only
    texts = split_prose["train"] + [caption(d, rng) for d in range(10) for _ in range(50)] \
        + [arithmetic(rng)[0] for _ in range(500)]
    text_tok = BPETokenizer.train(texts, cfg.text_vocab)
    vq = VQTokenizer(train_vqvae(images[split_images["train"]], VQVAEConfig(),
                                 steps=cfg.vq_steps, seed=cfg.seed))
    codes = vq.encode_batch(images)  # (1797, 16)
    sp = text_tok.specials
    parts = {}
    for split in ("train", "val"):
        budget = int(cfg.num_tokens * (cfg.val_fraction if split == "val" else
                                       1 - cfg.val_fraction))
        ids = split_images[split]
        by_label = {d: [i for i in ids if labels[i] == d] for d in range(10)}
        kinds = list(cfg.mix)
        weights = np.array([cfg.mix[k] for k in kinds], dtype=float)
        tokens, modality, doc = [], [], []
        d = 0
        while len(tokens) < budget:
            kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
            if kind == "arithmetic":
                prompt, answer = arithmetic(rng)
                if not by_label[answer]:
                    continue
                image = by_label[answer][rng.integers(len(by_label[answer]))]
            else:
                image = ids[rng.integers(len(ids))]
            image_part = [(sp["boi"], 0)] + [(c, 1) for c in codes[image].tolist()] \
                + [(sp["eoi"], 0)]
            if kind == "caption_image":
                body = [(t, 0) for t in text_tok.encode(caption(labels[image], rng))] + image_part
            elif kind == "image_caption":
                body = image_part + [(t, 0) for t in text_tok.encode(caption(labels[image], rng))]
            elif kind == "arithmetic":
                body = [(t, 0) for t in text_tok.encode(prompt)] + image_part
            else:
                text = split_prose[split][rng.integers(len(split_prose[split]))]
                body = [(t, 0) for t in text_tok.encode(text)]
            body = [(sp["bos"], 0)] + body + [(sp["eos"], 0)]
            tokens += [t for t, _ in body]
            modality += [m for _, m in body]
            doc += [d] * len(body)
            d += 1
        parts[split] = (tokens, modality, doc)
    train, val = parts["train"], parts["val"]
    val = (val[0], val[1], [x + train[2][-1] + 1 for x in val[2]])  # document ids stay unique
    stream = TokenStream(torch.tensor(train[0] + val[0]), torch.tensor(train[1] + val[1]),
                         torch.tensor(train[2] + val[2]), ["text", "image"],
                         {"text": text_tok.vocab_size, "image": vq.vocab_size}, sp,
                         {"boi": ("image", codes.shape[1])}, split_at=len(train[0]),
                         meta={"images": split_images, "labels": labels})
    stream.save(cache, {"text.json": text_tok.save, "vq.pt": vq.save})
    return stream
