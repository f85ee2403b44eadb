"""Ingest your own data: images with captions, plain text, speech with transcripts -> a packed
corpus (`TokenStream.save`) that training reads with `data.name=packed data.path=OUT_DIR`.

    python -m experiments.ingest OUT_DIR --train-tokenizers [--images DIR --captions FILE.jsonl]
        [--text PATH ...] [--audio DIR --transcripts FILE.jsonl] [--skip-bad] [--overwrite]
    python -m experiments.ingest OUT_DIR --tokenizers OLD_OUT_DIR ...   # reuse saved tokenizers

Inputs (every file under a source folder is an input, except hidden ones, named ".*"):
    --images DIR        image files (anything Pillow reads), made greyscale, stretched to
                        --image-size square and scaled to [0, 16] for the VQ-VAE
    --captions FILE     JSON lines {"file": "cat.png", "caption": "a cat"}; "file" is relative to
                        --images; an image may have several captions (one document each)
    --text PATH ...     UTF-8 text files, or folders of them; one document per paragraph
                        (paragraphs are separated by blank lines)
    --audio DIR         16-bit PCM WAV files at exactly --sample-rate (mono, or channels averaged)
    --transcripts FILE  JSON lines {"file": "a.wav", "text": "hello"}, "file" relative to --audio

Documents:  image  <bos> caption <boi> (size/2)^2 image codes <eoi> <eos>
            text   <bos> paragraph <eos>
            audio  <bos> <boa> codes (10 per 0.8 s clip) <eoa> transcript <eos>
Modalities: text, then image and audio when present. Clips are trimmed of leading silence and
cut or zero-padded to --clip-seconds; clips that are cut are listed.

Items (an image, a paragraph, a clip) are split by seed into train and validation, per modality;
all documents of an item fall on the same side, validation documents come last (`split_at`) and
the item names of each side are kept in index.json meta "split". --train-tokenizers trains byte-
level BPE, the image VQ-VAE and the audio VQ on the train items only and saves them beside the
corpus (text.json, vq.pt, audio.pt); --tokenizers DIR reuses (and copies) saved ones.

Bad input (unreadable or empty file, image without caption, caption naming no file, empty caption
or transcript, text holding a marker such as "<eos>", wrong sample rate, malformed JSON line) is
collected before anything is written and printed as `path: reason` with a count. Without
--skip-bad nothing is written and the exit status is 2; with it, the rest is ingested and the
skipped inputs are listed in index.json meta "skipped". The corpus appears whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mot.config import check, check_positive
from mot.tokenizers.text import EXTRA_SPECIALS, SPECIAL_TOKENS

KINDS = ("text", "image", "audio")  # items of each kind; also the modality order
MAX_VALUE = 16.0  # pixel scale of the VQ-VAE (VQVAEConfig.max_value)
CHUNK = 1024  # items encoded per tokenizer call (bounds memory on large folders)
TOKENIZER_FILES = {"text": "text.json", "image": "vq.pt", "audio": "audio.pt"}


@dataclass
class IngestConfig:
    """The command line as a checked config; names in error messages are the CLI flags."""

    out_dir: str
    images: str | None = None
    captions: str | None = None
    text: list[str] = field(default_factory=list)
    audio: str | None = None
    transcripts: str | None = None
    tokenizers: str | None = None
    train_tokenizers: bool = False
    image_size: int = 8
    sample_rate: int = 16000
    clip_seconds: float = 0.8
    text_vocab: int = 512
    vq_steps: int = 1500
    audio_vq_steps: int = 600
    val_fraction: float = 0.05
    seed: int = 0
    skip_bad: bool = False
    overwrite: bool = False

    def __post_init__(self):
        check(self.images or self.text or self.audio,
              "no input: give --images DIR --captions FILE, --text PATH and/or "
              "--audio DIR --transcripts FILE")
        for folder, jsonl, what in ((self.images, self.captions, "--images/--captions"),
                                    (self.audio, self.transcripts, "--audio/--transcripts")):
            check((folder is None) == (jsonl is None), f"{what} must be given together")
            if folder is not None:
                check(Path(folder).is_dir(), f"{what.split('/')[0]} ({folder}) is not a folder")
                check(Path(jsonl).is_file(), f"{what.split('/')[1]} ({jsonl}) is not a file")
        for path in self.text:
            check(Path(path).exists(), f"--text ({path}) does not exist")
        check((self.tokenizers is None) != (not self.train_tokenizers),
              "give exactly one of --tokenizers DIR (reuse saved tokenizers) and "
              "--train-tokenizers")
        for name in ("image_size", "sample_rate", "text_vocab", "vq_steps", "audio_vq_steps"):
            check_positive(f"--{name.replace('_', '-')}", getattr(self, name))
        check(self.image_size % 2 == 0, f"--image-size ({self.image_size}) must be even (the "
                                        "VQ-VAE gives one code per 2 x 2 pixels)")
        check(isinstance(self.seed, int) and self.seed >= 0,
              f"--seed ({self.seed!r}) must be an integer >= 0")
        check(0 < self.val_fraction < 0.5,
              f"--val-fraction ({self.val_fraction}) must be in (0, 0.5)")
        need = len(SPECIAL_TOKENS) + 256
        check(self.text_vocab >= need, f"--text-vocab ({self.text_vocab}) must be >= {need} "
                                       "(special tokens + 256 bytes)")
        if self.audio:
            audio_config(self.sample_rate, self.clip_seconds)  # raises naming the flags
        out = Path(self.out_dir)
        check(self.overwrite or not out.exists(),
              f"OUT_DIR ({out}) exists; pass --overwrite to replace it")
        if self.tokenizers:
            folder = Path(self.tokenizers)
            check(folder.is_dir(), f"--tokenizers ({folder}) is not a folder")
            for kind in self.kinds:
                check((folder / TOKENIZER_FILES[kind]).is_file(),
                      f"--tokenizers ({folder}) has no {TOKENIZER_FILES[kind]}, the {kind} "
                      "tokenizer this input needs; train one with --train-tokenizers")

    @property
    def kinds(self) -> list[str]:
        """Modalities of the corpus, in order: text always (captions, transcripts)."""
        return ["text"] + [k for k, on in (("image", self.images), ("audio", self.audio)) if on]


def audio_config(sample_rate: int, seconds: float):
    """The audio tokenizer's settings for a sample rate: 20 ms frames (a 32 ms FFT or more),
    4 frames per code, so 0.8 s -> 10 codes at any rate."""
    from mot.tokenizers.audio import AudioConfig

    hop = sample_rate // 50
    check(hop >= 16, f"--sample-rate ({sample_rate}) must be >= 800 Hz")
    try:
        return AudioConfig(sample_rate=sample_rate, seconds=seconds, hop=hop,
                           n_fft=max(512, 1 << (hop * 8 // 5 - 1).bit_length()))
    except ValueError as e:
        raise ValueError(f"--clip-seconds ({seconds}) must be a positive multiple of 0.08 s "
                         f"(4 frames of 20 ms per audio code): {e}") from e


class BadInput(ValueError):
    """Raised with every problem found, before anything is written."""

    def __init__(self, problems: list[tuple[str, str]], inputs: int):
        self.problems, self.inputs = problems, inputs
        lines = [f"{path}: {reason}" for path, reason in problems]
        lines.append(f"{len(problems)} bad of {inputs} inputs; nothing written "
                     "(--skip-bad ingests the rest and lists these in index.json)")
        super().__init__("\n".join(lines))


@dataclass
class Item:
    """One unit of the split: an image, a paragraph or a clip, with its texts (captions, the
    paragraph itself, transcripts: one document each) and its data (pixels or wave)."""

    kind: str
    name: str
    texts: list[str]
    data: torch.Tensor | None = None
    codes: list[int] = field(default_factory=list)  # image or audio codes, once tokenized


class Inputs:
    """Everything read from the sources: good items, problems, and how many inputs (files,
    JSON lines, paragraphs) were looked at."""

    def __init__(self):
        self.items: list[Item] = []
        self.problems: list[tuple[str, str]] = []
        self.count = 0

    def bad(self, where, reason: str) -> None:
        self.problems.append((str(where), reason))


def text_problem(text: str) -> str | None:
    """Why a caption, transcript or paragraph cannot be used, or None."""
    if not text.strip():
        return "empty"
    marker = next((m for m in SPECIAL_TOKENS + EXTRA_SPECIALS if m in text), None)
    if marker:  # the tokenizer would read it as the marker itself, not as text
        return f"contains {marker}, a marker of the token stream"
    return None


def source_files(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Every non-hidden file under `folder`, sorted (the same order on every machine)."""
    skip = exclude.resolve() if exclude else None
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.resolve() != skip
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_jsonl(path: Path, key: str, noun: str, inputs: Inputs
               ) -> dict[str, list[tuple[int, str]]]:
    """JSON lines {"file": ..., key: ...} -> file -> [(line number, text)]; bad lines are
    recorded as problems (`noun` names the text: caption, transcript)."""
    records: dict[str, list[tuple[int, str]]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        inputs.count += 1
        inputs.bad(path, f"unreadable ({e})")
        return records
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        inputs.count += 1
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            inputs.bad(where, f"not JSON ({e.msg})")
            continue
        if not (isinstance(record, dict) and isinstance(record.get("file"), str)
                and isinstance(record.get(key), str)):
            inputs.bad(where, f'must be an object with string fields "file" and "{key}"')
            continue
        problem = text_problem(record[key])
        if problem:
            inputs.bad(where, f"{noun} of {record['file']!r}: {problem}")
            continue
        name = Path(record["file"]).as_posix()
        records.setdefault(name, []).append((number, record[key]))
    return records


def read_image(path: Path, size: int) -> torch.Tensor:
    """An image file -> (size, size) greyscale in [0, 16], stretched to a square.
    ValueError if Pillow cannot decode it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            grey = ImageOps.exif_transpose(image).convert("L").resize(
                (size, size), Image.Resampling.BICUBIC)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable image ({e})") from e
    return torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255 * MAX_VALUE)


def paragraphs(text: str) -> list[str]:
    """Paragraphs of a text, separated by blank lines, stripped; empty ones left out."""
    blocks = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
    return [b.strip() for b in blocks if b.strip()]


def read_paired(folder: Path, jsonl: Path, key: str, noun: str, what: str, inputs: Inputs,
                load) -> None:
    """Files of `folder` paired by name with the texts (`key` of each JSON line, a `noun`) of
    `jsonl`: a file with a text and whose `load(path)` succeeds becomes an Item of kind `what`."""
    texts = read_jsonl(jsonl, key, noun, inputs)
    files = source_files(folder, exclude=jsonl)
    names = {p.relative_to(folder).as_posix(): p for p in files}
    if not files:
        inputs.count += 1
        inputs.bad(folder, f"no {what} files")
    for name, path in names.items():
        inputs.count += 1
        reasons = [] if name in texts else [f"no {noun} in {jsonl}"]
        try:
            data = load(path)
        except ValueError as e:
            reasons.append(str(e).removeprefix(f"{path}: "))
        if reasons:
            inputs.bad(path, "; ".join(reasons))
        else:
            inputs.items.append(Item(what, name, [t for _, t in texts[name]], data))
    for name, entries in texts.items():
        if name not in names:
            for number, _ in entries:
                inputs.bad(f"{jsonl}:{number}", f"{name!r} is not a file in {folder}")


def read_texts(paths: list[str], inputs: Inputs) -> None:
    """Text files (or folders of them) -> one Item per paragraph."""
    files: dict[Path, Path] = {}  # resolved -> as given (a file named twice is read once)
    for arg in map(Path, paths):
        found = source_files(arg) if arg.is_dir() else [arg]
        if not found:
            inputs.count += 1
            inputs.bad(arg, "no text files")
        for path in found:
            files.setdefault(path.resolve(), path)
    for path in files.values():
        try:
            blocks = paragraphs(path.read_bytes().decode("utf-8-sig"))
        except OSError as e:
            blocks, reason = [], f"unreadable ({e})"
        except UnicodeDecodeError as e:
            blocks, reason = [], f"not UTF-8 text (byte {e.start})"
        else:
            reason = "empty (no paragraphs)"
        if not blocks:
            inputs.count += 1
            inputs.bad(path, reason)
        for i, block in enumerate(blocks, 1):
            inputs.count += 1
            problem = text_problem(block)
            if problem:
                inputs.bad(f"{path}#{i}", problem)
            else:
                inputs.items.append(Item("text", f"{path}#{i}", [block]))


def read_sources(cfg: IngestConfig) -> Inputs:
    """Read every input; problems are collected, not raised."""
    from mot.tokenizers.audio import read_wav

    def wav(path):
        wave, rate = read_wav(path)
        if rate != cfg.sample_rate:
            raise ValueError(f"sample rate {rate} Hz, expected {cfg.sample_rate} Hz "
                             "(--sample-rate)")
        return wave

    def image(path):
        return read_image(path, cfg.image_size)

    inputs = Inputs()
    if cfg.images:
        read_paired(Path(cfg.images), Path(cfg.captions), "caption", "caption", "image", inputs,
                    image)
    read_texts(cfg.text, inputs)
    if cfg.audio:
        read_paired(Path(cfg.audio), Path(cfg.transcripts), "text", "transcript", "audio",
                    inputs, wav)
    return inputs


def split_items(items: list[Item], val_fraction: float, rng: np.random.Generator
                ) -> dict[str, list[Item]]:
    """Seeded split by item, per modality: validation gets int(n * val_fraction) items of each
    kind, at least 1 and at most n - 1 (so a kind with one item stays in train)."""
    split = {"train": [], "val": []}
    for kind in KINDS:
        group = sorted((i for i in items if i.kind == kind), key=lambda i: i.name)
        n_val = min(max(1, int(len(group) * val_fraction)), len(group) - 1)
        order = rng.permutation(len(group))
        split["val"] += [group[i] for i in sorted(order[:n_val])]
        split["train"] += [group[i] for i in sorted(order[n_val:])]
    check(split["val"], f"{len(items)} usable item(s): at least 2 are needed to split into "
                        "train and validation")
    return split


def spectrograms(clips: list[Item], cfg) -> torch.Tensor:
    from mot.tokenizers.audio import log_mel, prepare

    return torch.stack([log_mel(prepare(c.data, cfg.sample_rate, cfg), cfg) for c in clips])


def audible_seconds(wave: torch.Tensor, cfg) -> float:
    """Length from the first audible sample on: what `prepare` keeps before cutting."""
    peak = wave.abs().max()
    if peak == 0:
        return 0.0
    first = int((wave.abs() >= cfg.silence * peak).nonzero()[0])
    return (len(wave) - first) / cfg.sample_rate


def load_tokenizers(cfg: IngestConfig) -> dict:
    """The saved tokenizers of --tokenizers, checked against the settings of this run."""
    from mot.tokenizers import BPETokenizer, VQTokenizer
    from mot.tokenizers.audio import AudioTokenizer

    folder = Path(cfg.tokenizers)
    toks = {"text": BPETokenizer.load(folder / "text.json")}
    if cfg.images:
        toks["image"] = VQTokenizer.load(folder / "vq.pt")
        index = folder / "index.json"
        settings = json.loads(index.read_text()).get("meta", {}).get("settings", {}) \
            if index.is_file() else {}
        size = settings.get("image_size", cfg.image_size)
        check(size == cfg.image_size, f"--image-size ({cfg.image_size}) must be {size}, the "
                                      f"size the image tokenizer in {folder} was trained on")
    if cfg.audio:
        toks["audio"] = AudioTokenizer.load(folder / "audio.pt")
        a = toks["audio"].cfg
        for flag, mine, theirs in (("--sample-rate", cfg.sample_rate, a.sample_rate),
                                   ("--clip-seconds", cfg.clip_seconds, a.seconds)):
            check(mine == theirs, f"{flag} ({mine}) must be {theirs}, the audio tokenizer's in "
                                  f"{folder}")
    return toks


def train_tokenizers(cfg: IngestConfig, texts: list[str], images: torch.Tensor | None,
                     specs: torch.Tensor | None, audio_cfg) -> dict:
    """BPE on the train texts, the VQ-VAE on the train images, the audio VQ on the train clips."""
    from mot.tokenizers import BPETokenizer, VQTokenizer, VQVAEConfig, train_vqvae
    from mot.tokenizers.audio import AudioTokenizer, train_audio_vq

    toks = {"text": BPETokenizer.train(texts, cfg.text_vocab)}
    if images is not None:
        model = train_vqvae(images, VQVAEConfig(max_value=MAX_VALUE), steps=cfg.vq_steps,
                            seed=cfg.seed)
        toks["image"] = VQTokenizer(model)
    if specs is not None:
        model = train_audio_vq(specs, audio_cfg, steps=cfg.audio_vq_steps, seed=cfg.seed)
        toks["audio"] = AudioTokenizer(model)
    return toks


@torch.no_grad()
def audio_report(model, specs: torch.Tensor) -> dict:
    """Log-mel reconstruction MSE and the share of codebook entries used on `specs`."""
    x_hat, codes, _ = model.eval()(specs)
    return {"mse": float(F.mse_loss(x_hat, specs)),
            "codebook_usage": codes.unique().numel() / model.cfg.codebook_size}


def document(item: Item, text: str, toks: dict, mid: dict[str, int]) -> tuple[list, list]:
    """One document of an item and one of its texts -> (token ids, modality ids)."""
    sp = toks["text"].specials
    words = (toks["text"].encode(text), mid["text"])
    if item.kind == "image":
        parts = [words, ([sp["boi"]], 0), (item.codes, mid["image"]), ([sp["eoi"]], 0)]
    elif item.kind == "audio":
        parts = [([sp["boa"]], 0), (item.codes, mid["audio"]), ([sp["eoa"]], 0), words]
    else:
        parts = [words]
    parts = [([sp["bos"]], 0)] + parts + [([sp["eos"]], 0)]
    return [t for ids, _ in parts for t in ids], [m for ids, m in parts for _ in ids]


def write_corpus(stream, out: Path, extra: dict, overwrite: bool) -> None:
    """`stream.save` into a hidden staging folder beside OUT_DIR, then one rename: OUT_DIR is
    whole or absent, and the staging folder goes away whatever happens."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as staging:
        staged = Path(staging) / "corpus"
        stream.save(staged, extra)
        if out.exists():
            check(overwrite, f"OUT_DIR ({out}) exists; pass --overwrite to replace it")
            out.rename(Path(staging) / "old")  # deleted with the staging folder
        staged.rename(out)


def encode(items: list[Item], data: torch.Tensor, encode_batch) -> int:
    """Codes of every item (the rows of `data`, in item order) into `item.codes`; returns the
    number of codes per item."""
    codes = torch.cat([encode_batch(data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)])
    for item, row in zip(items, codes.tolist()):
        item.codes = row
    return codes.shape[1]


def held_out(data: torch.Tensor, n_train: int) -> tuple[torch.Tensor, str]:
    """Rows to measure a tokenizer on: validation ones (train ones if there are none), at most
    CHUNK of them, and which they are."""
    if len(data) > n_train:
        return data[n_train:][:CHUNK], "held-out"
    return data[:CHUNK], "train-set"


def tokenize_images(items: list[Item], images: torch.Tensor, tok, n_train: int) -> dict:
    """Image codes into each item; prints and returns the VQ-VAE's reconstruction report."""
    from mot.tokenizers.vqvae import reconstruction_report

    n = encode(items, images, tok.encode_batch)
    rows, which = held_out(images, n_train)
    report = reconstruction_report(tok.model, rows)
    print(f"image tokenizer: {n} codes per image; {which} reconstruction MSE "
          f"{report['mse']:.4f} (pixels in [0, 1]); {report['codebook_usage']:.0%} of "
          f"{tok.vocab_size} codes used")
    return report


def tokenize_audio(items: list[Item], specs: torch.Tensor, tok, n_train: int) -> dict:
    """Audio codes into each item; prints and returns the audio VQ's reconstruction report."""
    n = encode(items, specs, tok.encode_spectrograms)
    rows, which = held_out(specs, n_train)
    report = audio_report(tok.model, rows)
    print(f"audio tokenizer: {n} codes per clip; {which} log-mel MSE {report['mse']:.3f}; "
          f"{report['codebook_usage']:.0%} of {tok.vocab_size} codes used")
    return report


def cut_clips(items: list[Item], cfg) -> dict[str, float]:
    """Clips longer than cfg.seconds after leading silence (name -> seconds), with a notice."""
    lengths = {i.name: round(audible_seconds(i.data, cfg), 3) for i in items}
    cut = {name: s for name, s in sorted(lengths.items()) if s > cfg.seconds}
    if cut:
        print(f"notice: {len(cut)} clip(s) longer than {cfg.seconds} s after leading silence "
              f"were cut to it (--clip-seconds), e.g. {', '.join(list(cut)[:3])}; all are "
              'listed in index.json meta "cut_clips"')
    return cut


def pack(split: dict[str, list[Item]], toks: dict, modalities: list[str],
         rng: np.random.Generator) -> dict:
    """Documents of each side in seeded order, train then validation -> the stream's fields."""
    mid = {name: i for i, name in enumerate(modalities)}
    docs = []
    for side in ("train", "val"):
        side_docs = [document(item, text, toks, mid) for item in split[side]
                     for text in item.texts]
        docs.append([side_docs[i] for i in rng.permutation(len(side_docs))])
    lengths = torch.tensor([len(t) for t, _ in docs[0] + docs[1]], dtype=torch.long)
    return {"tokens": torch.tensor([t for d, _ in docs[0] + docs[1] for t in d]),
            "modality": torch.tensor([m for _, d in docs[0] + docs[1] for m in d]),
            "doc": torch.repeat_interleave(torch.arange(len(lengths)), lengths),
            "split_at": int(lengths[:len(docs[0])].sum())}


def report_problems(inputs: Inputs, skip_bad: bool) -> None:
    """Raise BadInput listing every problem, or (skip_bad) print them and go on."""
    if inputs.problems and not skip_bad:
        raise BadInput(inputs.problems, inputs.count)
    if inputs.problems:
        lines = [f"{path}: {reason}" for path, reason in inputs.problems]
        print("\n".join(lines) + f"\n{len(lines)} bad of {inputs.count} inputs skipped "
              '(listed in index.json meta "skipped")', file=sys.stderr)
    check(inputs.items, "no usable input left")


def ingest(cfg: IngestConfig):
    """Read, check, split, tokenize and save; returns the `TokenStream` written to OUT_DIR.
    Raises `BadInput` (listing every problem) unless cfg.skip_bad, ValueError for settings."""
    from experiments.data import TokenStream

    toks = load_tokenizers(cfg) if cfg.tokenizers else None
    inputs = read_sources(cfg)
    report_problems(inputs, cfg.skip_bad)
    rng = np.random.default_rng(cfg.seed)
    split = split_items(inputs.items, cfg.val_fraction, rng)
    # per kind, train items first: the first n_train[kind] rows of its data are the train split
    group = {k: [i for i in split["train"] + split["val"] if i.kind == k] for k in KINDS}
    n_train = {k: sum(i.kind == k for i in split["train"]) for k in KINDS}
    images = torch.stack([i.data for i in group["image"]]) if group["image"] else None
    audio_cfg = specs = None
    if group["audio"]:
        audio_cfg = toks["audio"].cfg if toks else audio_config(cfg.sample_rate,
                                                                  cfg.clip_seconds)
        specs = spectrograms(group["audio"], audio_cfg)
    if toks is None:
        toks = train_tokenizers(cfg, [t for item in split["train"] for t in item.texts],
                                None if images is None else images[:n_train["image"]],
                                None if specs is None else specs[:n_train["audio"]], audio_cfg)
    modalities = [k for k in KINDS if k == "text" or group[k]]
    spans, reports, cut = {}, {}, {}
    if images is not None:
        reports["image"] = tokenize_images(group["image"], images, toks["image"],
                                           n_train["image"])
        spans["boi"] = ("image", len(group["image"][0].codes))
    if specs is not None:
        reports["audio"] = tokenize_audio(group["audio"], specs, toks["audio"], n_train["audio"])
        spans["boa"] = ("audio", len(group["audio"][0].codes))
        cut = cut_clips(group["audio"], audio_cfg)
    fields = pack(split, toks, modalities, rng)
    settings = ("image_size", "sample_rate", "clip_seconds", "text_vocab", "vq_steps",
                "audio_vq_steps", "val_fraction", "seed", "tokenizers")
    meta = {"source": "experiments.ingest",
            "settings": {k: getattr(cfg, k) for k in settings},
            "split": {side: {k: [i.name for i in items if i.kind == k] for k in KINDS}
                      for side, items in split.items()},
            "documents": {side: sum(len(i.texts) for i in items) for side, items in split.items()},
            "skipped": [{"input": p, "reason": r} for p, r in inputs.problems],
            "cut_clips": cut, "tokenizer_report": reports}
    stream = TokenStream(**fields, modalities=modalities, specials=toks["text"].specials,
                         vocab={m: toks[m].vocab_size for m in modalities}, spans=spans,
                         meta=meta)
    if cfg.tokenizers:
        extra = {TOKENIZER_FILES[k]: lambda path, k=k: shutil.copyfile(
            Path(cfg.tokenizers) / TOKENIZER_FILES[k], path) for k in toks}
    else:
        extra = {TOKENIZER_FILES[k]: tok.save for k, tok in toks.items()}
    write_corpus(stream, Path(cfg.out_dir), extra, cfg.overwrite)
    per_modality = torch.bincount(stream.modality, minlength=len(modalities)).tolist()
    print(f"{cfg.out_dir}: {sum(meta['documents'].values())} documents "
          f"({meta['documents']['train']} train, {meta['documents']['val']} validation) from "
          f"{len(inputs.items)} items; tokens: "
          + ", ".join(f"{m} {n}" for m, n in zip(modalities, per_modality))
          + f"; {stream.split_at} train, {len(stream.tokens) - stream.split_at} validation")
    return stream


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.ingest", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s OUT_DIR (--train-tokenizers | --tokenizers DIR) "
              "[--images DIR --captions FILE.jsonl] [--text PATH ...] "
              "[--audio DIR --transcripts FILE.jsonl] [options]")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the packed corpus to write")
    parser.add_argument("--images", metavar="DIR")
    parser.add_argument("--captions", metavar="FILE.jsonl")
    parser.add_argument("--text", metavar="PATH", nargs="+", action="extend", default=[])
    parser.add_argument("--audio", metavar="DIR")
    parser.add_argument("--transcripts", metavar="FILE.jsonl")
    parser.add_argument("--tokenizers", metavar="DIR",
                        help="reuse the text.json / vq.pt / audio.pt saved in DIR")
    parser.add_argument("--train-tokenizers", action="store_true",
                        help="train them on the train split, save them in OUT_DIR")
    for flag, kind, default, meta, text in (
            ("--image-size", int, 8, "PX", "image side in pixels, even"),
            ("--sample-rate", int, 16000, "HZ", "the WAV files' rate; others are bad input"),
            ("--clip-seconds", float, 0.8, "S", "audio clip length (a multiple of 0.08)"),
            ("--text-vocab", int, 512, "N", "BPE vocabulary size when training"),
            ("--vq-steps", int, 1500, "N", "image VQ-VAE training steps"),
            ("--audio-vq-steps", int, 600, "N", "audio VQ training steps"),
            ("--val-fraction", float, 0.05, "F", "share of items (per modality) for validation"),
            ("--seed", int, 0, "N", "split, document order and tokenizer training")):
        parser.add_argument(flag, type=kind, default=default, metavar=meta,
                            help=f"{text} (default {default})")
    parser.add_argument("--skip-bad", action="store_true",
                        help="ingest the good inputs, list the bad ones in index.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    args = parser.parse_args(argv)
    try:
        cfg = IngestConfig(**vars(args))
        ingest(cfg)
    except BadInput as e:
        print(e, file=sys.stderr)
        return 2
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
