"""A small generated text+image stream whose structure a tiny model can learn in minutes.

Each document is either a caption followed by its image, or an image followed by its caption.
Captions are word sequences from a sparse random bigram model with one "class" word; an image is
16 codes, a per-class prototype with 10 % of codes replaced at random. So text is predictable from
text, and image codes are predictable only by attending across modalities to the class word.

Every image position also carries a feature vector (the input of `input: continuous`): a fixed
random embedding of its code in FEATURE_DIM dimensions plus a little Gaussian noise, so the code,
and through the prototypes the class, can be read back from the features. Text positions have
zero features. Features come from a generator of their own: the tokens do not depend on them.
"""

from __future__ import annotations

import numpy as np
import torch

SPECIALS = ["pad", "bos", "eos", "boi", "eoi"]
NUM_CLASSES = 10
NUM_WORDS = 49
TEXT_VOCAB = len(SPECIALS) + NUM_CLASSES + NUM_WORDS  # 64
IMAGE_VOCAB = 64
IMAGE_LEN = 16
NOISE = 0.1
FEATURE_DIM = 4
FEATURE_NOISE = 0.05


def synthetic_stream(num_tokens: int, seed: int):
    from experiments.data import TokenStream

    rng = np.random.default_rng(seed)
    special = {name: i for i, name in enumerate(SPECIALS)}
    first_class, first_word = len(SPECIALS), len(SPECIALS) + NUM_CLASSES
    prototypes = rng.integers(0, IMAGE_VOCAB, size=(NUM_CLASSES, IMAGE_LEN))
    successors = rng.integers(0, NUM_WORDS, size=(NUM_WORDS, 3))  # sparse bigram model
    tokens, modality, doc = [], [], []
    d = 0
    while len(tokens) < num_tokens:
        label = int(rng.integers(NUM_CLASSES))
        word = int(rng.integers(NUM_WORDS))
        caption = []
        for _ in range(int(rng.integers(3, 8))):
            caption.append(first_word + word)
            word = int(successors[word, rng.integers(3)])
        caption.insert(int(rng.integers(len(caption) + 1)), first_class + label)
        image = prototypes[label].copy()
        noisy = rng.random(IMAGE_LEN) < NOISE
        image[noisy] = rng.integers(0, IMAGE_VOCAB, size=int(noisy.sum()))
        text_part = [(t, 0) for t in caption]
        image_part = [(special["boi"], 0)] + [(int(t), 1) for t in image] + [(special["eoi"], 0)]
        parts = text_part + image_part if rng.random() < 0.5 else image_part + text_part
        body = [(special["bos"], 0)] + parts + [(special["eos"], 0)]
        tokens += [t for t, _ in body]
        modality += [m for _, m in body]
        doc += [d] * len(body)
        d += 1
    as_tensor = lambda xs: torch.tensor(xs[:num_tokens], dtype=torch.long)  # noqa: E731
    tokens, modality = as_tensor(tokens), as_tensor(modality)
    return TokenStream(tokens, modality, as_tensor(doc), ["text", "image"],
                       {"text": TEXT_VOCAB, "image": IMAGE_VOCAB}, special,
                       {"boi": ("image", IMAGE_LEN)},
                       features=code_features(tokens, modality == 1, seed))


def code_features(tokens: torch.Tensor, is_image: torch.Tensor, seed: int) -> torch.Tensor:
    """(N, FEATURE_DIM) float32: codebook[code] + noise at image positions, zeros elsewhere."""
    rng = np.random.default_rng([seed, 1])  # apart from the token generator
    codebook = rng.normal(size=(IMAGE_VOCAB, FEATURE_DIM))
    noise = FEATURE_NOISE * rng.normal(size=(len(tokens), FEATURE_DIM))
    codes = tokens.clamp(0, IMAGE_VOCAB - 1).numpy()
    features = np.where(is_image.numpy()[:, None], codebook[codes] + noise, 0.0)
    return torch.from_numpy(features.astype(np.float32))
