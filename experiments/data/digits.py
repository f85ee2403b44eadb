"""The built-in "digits" corpus: real handwritten digits with captions, arithmetic and prose.

Images are scikit-learn's bundled `load_digits` (1797 scans, 8 x 8, 16 grey levels; shipped
with the package, nothing is downloaded). Documents, mixed by `data.mix`:

    caption_image   <bos> "a handwritten seven" <boi> 16 image codes <eoi> <eos>
    image_caption   <bos> <boi> codes <eoi> "the digit 7" <eos>
    arithmetic      <bos> "three plus four is" <boi> codes of a 7 <eoi> <eos>
    prose           <bos> a paragraph of the Python documentation (pydoc_data) <eos>
    audio_transcript <bos> <boa> 10 audio codes of a spoken "seven" <eoa> "the word seven" <eos>
    text_audio      <bos> "say seven" <boa> audio codes <eoa> <eos>
    video_caption   <bos> <bov> 3 frames x 24 codes <eov> "a seven moving right" <eos>
    caption_video   <bos> "a seven moving right" <bov> frames <eov> <eos>

Captions come from several templates with number words or digits. Images are split once,
seeded, into train and validation sets (no image in both); the validation documents use only
validation images and prose paragraphs. Tokenizers (byte-level BPE for text, a VQ-VAE for
images: 4 x 4 = 16 codes per image) are trained on the train split and cached.

Audio (modality "audio", when the mix asks for it): the ten digit words spoken by espeak-ng in
6 voices x 3 speeds x 3 pitches (540 clips), split by clip like the images, tokenised by the
log-mel VQ of `mot.tokenizers.audio` (0.8 s -> 10 codes). Without espeak-ng the audio kinds are
left out with a one-line notice. Video (modality "video"): Moving-MNIST-style clips of 3 frames,
a digit sliding 2 pixels per frame left or right across a 12 x 8 canvas, each frame tokenised by
the image VQ-VAE (6 x 4 = 24 codes), with its own modality id and begin/end markers.
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
KINDS = ("caption_image", "image_caption", "arithmetic", "prose", "audio_transcript",
         "text_audio", "video_caption", "caption_video")
AUDIO_KINDS = ("audio_transcript", "text_audio")
VIDEO_KINDS = ("video_caption", "caption_video")
TRANSCRIPTS = ["the word {w}", "someone says {w}", "{w}", "a voice saying {w}", "spoken: {w}"]
SAY = ["say {w}", "speak the word {w}", "read aloud: {w}", "pronounce {w}"]
MOTION = ["a {w} moving {dir}", "the digit {d} slides {dir}", "a handwritten {w} going {dir}"]
VIDEO_FRAMES, VIDEO_STEP, VIDEO_WIDTH = 3, 2, 12
PATCH_FEATURES = 4  # continuous input of image and video positions: 2 x 2 pixel patches
FORMAT = 2  # bumped when the corpus layout changes (2: continuous patch features)


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


def wanted(cfg, kinds) -> bool:
    return any(cfg.mix.get(k, 0) > 0 for k in kinds)


def has_audio(cfg) -> bool:
    """Whether the corpus of `cfg` has audio: asked for by the mix, and espeak-ng present."""
    from experiments.data.speech import espeak

    return wanted(cfg, AUDIO_KINDS) and espeak() is not None


def cache_folder(cfg):
    """Where the corpus and tokenizers of data config `cfg` are cached."""
    fields = [cfg.seed, cfg.num_tokens, cfg.val_fraction, cfg.mix, cfg.text_vocab, cfg.vq_steps,
              FORMAT]
    if has_audio(cfg):
        fields += [cfg.audio_vq_steps]
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    return cfg.cache_path / f"digits-{key.hexdigest()[:12]}"


def load_tokenizers(cfg) -> tuple[BPETokenizer, VQTokenizer]:
    """The text and image tokenizers of a digits corpus (built if not cached yet)."""
    build_digits(cfg)
    folder = cache_folder(cfg)
    return BPETokenizer.load(folder / "text.json"), VQTokenizer.load(folder / "vq.pt")


def load_audio_tokenizer(cfg):
    """The audio tokenizer of a digits corpus with audio, or None."""
    from mot.tokenizers.audio import AudioTokenizer

    build_digits(cfg)
    path = cache_folder(cfg) / "audio.pt"
    return AudioTokenizer.load(path) if path.is_file() else None


def patches(image: torch.Tensor) -> torch.Tensor:
    """The continuous features of an image (or video frame) H x W: its 2 x 2 pixel patches in
    the row-major order of the VQ code grid, scaled to [0, 1]: (H/2 * W/2, 4)."""
    H, W = image.shape
    return image.view(H // 2, 2, W // 2, 2).permute(0, 2, 1, 3).reshape(-1, 4) / 16


def moving_clip(image: torch.Tensor, direction: str) -> torch.Tensor:
    """An 8 x 8 digit sliding across an 8 x 12 canvas: (VIDEO_FRAMES, 8, 12)."""
    frames = torch.zeros(VIDEO_FRAMES, 8, VIDEO_WIDTH)
    for f in range(VIDEO_FRAMES):
        x = f * VIDEO_STEP if direction == "right" else (VIDEO_FRAMES - 1 - f) * VIDEO_STEP
        frames[f, :, x:x + 8] = image
    return frames


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
    video = wanted(cfg, VIDEO_KINDS)
    audio_tok, audio_codes, split_clips, clip_labels = None, None, {}, []
    if wanted(cfg, AUDIO_KINDS) and not has_audio(cfg):
        from experiments.data.speech import INSTALL

        print(f"digits: audio documents skipped: espeak-ng is not installed ({INSTALL})")
    if has_audio(cfg):
        audio_tok, audio_codes, split_clips, clip_labels = _spoken(cfg, rng)
        texts += [fill(t, d) for t in TRANSCRIPTS + SAY for d in range(10)]
    if video:
        texts += [motion(d, dir_, rng) for d in range(10) for dir_ in ("left", "right")
                  for _ in range(5)]
    text_tok = BPETokenizer.train(texts, cfg.text_vocab,
                                  ["<bov>", "<eov>"] if video else ())
    vq = VQTokenizer(train_vqvae(images[split_images["train"]], VQVAEConfig(),
                                 steps=cfg.vq_steps, seed=cfg.seed))
    codes = vq.encode_batch(images)  # (1797, 16)
    sp = text_tok.specials
    modalities = ["text", "image"] + (["audio"] if audio_tok else []) + (["video"] if video
                                                                         else [])
    mid = {name: i for i, name in enumerate(modalities)}
    parts = {}
    for split in ("train", "val"):
        budget = int(cfg.num_tokens * (cfg.val_fraction if split == "val" else
                                       1 - cfg.val_fraction))
        ids = split_images[split]
        by_label = {d: [i for i in ids if labels[i] == d] for d in range(10)}
        kinds = [k for k in cfg.mix if audio_tok or k not in AUDIO_KINDS]
        weights = np.array([cfg.mix[k] for k in kinds], dtype=float)
        clips = split_clips.get(split, [])
        tokens, modality, doc, features = [], [], [], []
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
            span = ("boi", patches(images[image]))  # the continuous features of the span
            if kind in AUDIO_KINDS:
                span = None
                clip = clips[rng.integers(len(clips))]
                word = clip_labels[clip]
                audio_part = [(sp["boa"], 0)] + [(c, mid["audio"]) for c in
                                                  audio_codes[clip].tolist()] + [(sp["eoa"], 0)]
                if kind == "audio_transcript":
                    text = fill(TRANSCRIPTS[rng.integers(len(TRANSCRIPTS))], word)
                    body = audio_part + [(t, 0) for t in text_tok.encode(text)]
                else:
                    text = fill(SAY[rng.integers(len(SAY))], word)
                    body = [(t, 0) for t in text_tok.encode(text)] + audio_part
            elif kind in VIDEO_KINDS:
                direction = "left" if rng.random() < 0.5 else "right"
                clip_frames = moving_clip(images[image], direction)
                frames = vq.encode_batch(clip_frames).flatten()
                span = ("bov", torch.cat([patches(f) for f in clip_frames]))
                video_part = [(sp["bov"], 0)] + [(c, mid["video"]) for c in frames.tolist()] \
                    + [(sp["eov"], 0)]
                text = [(t, 0) for t in text_tok.encode(motion(labels[image], direction, rng))]
                body = video_part + text if kind == "video_caption" else text + video_part
            elif kind == "caption_image":
                body = [(t, 0) for t in text_tok.encode(caption(labels[image], rng))] + image_part
            elif kind == "image_caption":
                body = image_part + [(t, 0) for t in text_tok.encode(caption(labels[image], rng))]
            elif kind == "arithmetic":
                body = [(t, 0) for t in text_tok.encode(prompt)] + image_part
            else:
                span = None
                text = split_prose[split][rng.integers(len(split_prose[split]))]
                body = [(t, 0) for t in text_tok.encode(text)]
            body = [(sp["bos"], 0)] + body + [(sp["eos"], 0)]
            tokens += [t for t, _ in body]
            modality += [m for _, m in body]
            doc += [d] * len(body)
            rows = torch.zeros(len(body), PATCH_FEATURES)
            if span is not None:
                at = body.index((sp[span[0]], 0)) + 1
                rows[at:at + len(span[1])] = span[1]
            features.append(rows)
            d += 1
        parts[split] = (tokens, modality, doc, torch.cat(features))
    train, val = parts["train"], parts["val"]
    val = (val[0], val[1], [x + train[2][-1] + 1 for x in val[2]], val[3])  # unique doc ids
    vocab = {"text": text_tok.vocab_size, "image": vq.vocab_size}
    spans = {"boi": ("image", codes.shape[1])}
    meta = {"images": split_images, "labels": labels}
    files = {"text.json": text_tok.save, "vq.pt": vq.save}
    if audio_tok:
        vocab["audio"] = audio_tok.vocab_size
        spans["boa"] = ("audio", audio_codes.shape[1])
        meta.update(clips=split_clips, clip_labels=clip_labels)
        files["audio.pt"] = audio_tok.save
        files["audio_codes.pt"] = lambda path: torch.save(audio_codes, path)
    if video:
        vocab["video"] = vq.vocab_size
        spans["bov"] = ("video", VIDEO_FRAMES * (VIDEO_WIDTH // 2) * 4)
        meta["video"] = {"frames": VIDEO_FRAMES, "height": 8, "width": VIDEO_WIDTH}
    stream = TokenStream(torch.tensor(train[0] + val[0]), torch.tensor(train[1] + val[1]),
                         torch.tensor(train[2] + val[2]), modalities, vocab, sp, spans,
                         split_at=len(train[0]), meta=meta,
                         features=torch.cat([train[3], val[3]]))
    stream.save(cache, files)
    return stream


def motion(label: int, direction: str, rng: np.random.Generator) -> str:
    return MOTION[rng.integers(len(MOTION))].format(w=WORDS[label], d=label, dir=direction)


def _spoken(cfg, rng: np.random.Generator):
    """-> (audio tokenizer, codes (clips, 10), {"train"/"val": clip indices}, clip labels)."""
    from experiments.data.speech import spoken_digits
    from mot.tokenizers import audio

    audio_cfg = audio.AudioConfig()
    clips = spoken_digits(tuple(WORDS))
    specs = torch.stack([audio.log_mel(audio.prepare(w, r, audio_cfg), audio_cfg)
                         for _, w, r, _ in clips])
    order = rng.permutation(len(clips))
    n_val = max(1, int(len(clips) * cfg.val_fraction))
    split = {"train": sorted(order[n_val:].tolist()), "val": sorted(order[:n_val].tolist())}
    tok = audio.AudioTokenizer(audio.train_audio_vq(specs[split["train"]], audio_cfg,
                                                    steps=cfg.audio_vq_steps, seed=cfg.seed))
    return tok, tok.encode_spectrograms(specs), split, [label for label, *_ in clips]
