"""Token streams for training: an interleaved multimodal stream of (token, modality, doc) ids,
optionally with a feature vector per position (the input of continuous modalities).

`build_stream(data_cfg)` returns a `TokenStream`; each stream names its modalities and their
vocabulary sizes, so a model config that does not fit the data is rejected before training.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mot.config import ModelConfig, check
from mot.model import Batch


@dataclass
class TokenStream:
    """tokens, modality, doc: (N,) int64 tensors; vocab: modality name -> vocabulary size;
    modalities: names in modality-id order; specials: named special tokens (text vocabulary);
    spans: special token name -> (modality, length) of the span it opens (e.g. an image);
    features: optional (N, F) float feature vectors aligned with `tokens` (zeros where a position
    has none; float16 and memory-mapped when loaded from the packed format), which a model reads
    at the positions of its continuous modalities."""

    tokens: torch.Tensor
    modality: torch.Tensor
    doc: torch.Tensor
    modalities: list[str]
    vocab: dict[str, int]
    specials: dict[str, int]
    spans: dict[str, tuple[str, int]] = field(default_factory=dict)
    split_at: int | None = None  # where validation starts (None: split by val_fraction)
    meta: dict = field(default_factory=dict)
    features: torch.Tensor | None = None

    def __post_init__(self):
        check(self.features is None or (self.features.dim() == 2
                                        and len(self.features) == len(self.tokens)),
              f"features {None if self.features is None else tuple(self.features.shape)} must "
              f"be (N, F) with N = {len(self.tokens)} tokens")

    @property
    def feature_dim(self) -> int:
        """F of the features, 0 without them."""
        return 0 if self.features is None else self.features.shape[1]

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        """The packed on-disk format: tokens.npy (int32), modality.npy (uint8), doc.npy (int32),
        features.npy (float16, (N, F), only for a stream with features), memory-mappable, and
        index.json (modalities, vocabularies, specials, spans, split, metadata, tokenizer
        files). `extra` maps file names to writers (e.g. tokenizers).
        Written into a temporary folder renamed at the end: never half a corpus."""
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "tokens.npy", self.tokens.numpy().astype(np.int32))
        np.save(tmp / "modality.npy", self.modality.numpy().astype(np.uint8))
        np.save(tmp / "doc.npy", self.doc.numpy().astype(np.int32))
        if self.features is not None:
            np.save(tmp / "features.npy", self.features.numpy().astype(np.float16))
        for name, write in (extra or {}).items():
            write(tmp / name)
        index = {"modalities": self.modalities, "vocab": self.vocab, "specials": self.specials,
                 "spans": self.spans, "split_at": self.split_at, "meta": self.meta,
                 "files": sorted(p.name for p in tmp.iterdir())}
        (tmp / "index.json").write_text(json.dumps(index))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)

    @staticmethod
    def load(folder: str | Path) -> TokenStream:
        folder = Path(folder)
        index_file = folder / "index.json"
        check(index_file.is_file(), f"{folder} holds no packed corpus (index.json missing)")
        index = json.loads(index_file.read_text())
        # left memory-mapped in their stored types; windows are widened to int64 when drawn
        arrays = [torch.from_numpy(np.load(folder / f"{name}.npy", mmap_mode="c"))
                  for name in ("tokens", "modality", "doc")]
        features = None
        if "features.npy" in index.get("files", []):  # float16, left memory-mapped
            features = torch.from_numpy(np.load(folder / "features.npy", mmap_mode="c"))
        return TokenStream(*arrays, index["modalities"], index["vocab"], index["specials"],
                           {k: tuple(v) for k, v in index["spans"].items()}, index["split_at"],
                           index["meta"], features)

    def grammar(self):
        """The `SpanGrammar` of generation for this stream's markers."""
        from mot.generate import SpanGrammar

        index = {name: i for i, name in enumerate(self.modalities)}
        return SpanGrammar(begin={self.specials[k]: index[m] for k, (m, _) in self.spans.items()},
                           length={index[m]: n for m, n in self.spans.values()})

    def split(self, val_fraction: float) -> tuple[TokenStream, TokenStream]:
        """Split on a document boundary: the last `val_fraction` of the stream is validation."""
        cut = self.split_at if self.split_at is not None \
            else int(len(self.tokens) * (1 - val_fraction))
        while 0 < cut < len(self.tokens) and self.doc[cut] == self.doc[cut - 1]:
            cut += 1
        parts = [slice(0, cut), slice(cut, None)]
        return tuple(TokenStream(self.tokens[s], self.modality[s], self.doc[s], self.modalities,
                                 self.vocab, self.specials, self.spans, None, self.meta,
                                 None if self.features is None else self.features[s])
                     for s in parts)

    def shares(self) -> dict[str, float]:
        """The share of positions of each modality (for FLOP accounting of heads and encoders)."""
        counts = torch.bincount(self.modality.long(), minlength=len(self.modalities)).double()
        return dict(zip(self.modalities, (counts / counts.sum().clamp(min=1)).tolist()))

    def span_len(self, model: ModelConfig) -> int | None:
        """The span length of the first modality a late-fusion encoder reads (its attention
        runs within spans), or None."""
        lengths = {m: n for m, n in self.spans.values()}
        return next((lengths[m] for m in model.late_encoder.modalities if m in lengths), None) \
            if model.fusion == "late" else None

    def aligned_to(self, model: ModelConfig) -> TokenStream:
        """This stream with its modality ids renumbered to the model's order of the same names
        (a model may list modalities the data lacks, e.g. audio without espeak-ng). ValueError
        for a data modality the model does not have."""
        names = model.modality_names
        missing = [m for m in self.modalities if m not in names]
        check(not missing, f"model.modalities {names} lack the data's modalities {missing}")
        order = [names.index(m) for m in self.modalities]
        if order == list(range(len(order))):
            return self
        remap = torch.tensor(order, dtype=torch.long)
        return TokenStream(self.tokens, remap[self.modality.long()], self.doc, names,
                           self.vocab, self.specials, self.spans, self.split_at, self.meta,
                           self.features)

    def check_fits(self, model: ModelConfig, seq_len: int) -> None:
        """ValueError unless every modality of the data exists in the model with room for its
        vocabulary (or, for a continuous one, with the data's feature width), in the same order,
        and the stream holds a window of `seq_len + 1` tokens."""
        names = model.modality_names
        check(names[:len(self.modalities)] == self.modalities,
              f"model.modalities {names} must start with the data's modalities "
              f"{self.modalities}, in that order")
        for spec in model.modalities[:len(self.modalities)]:
            if spec.continuous:
                check(self.features is not None,
                      f"model.modalities.{spec.name}.input is 'continuous', but the data has no "
                      "features; use input 'discrete' or a stream with features")
                check(self.feature_dim == model.feature_width,
                      f"model.modalities.{spec.name}.feature_dim ({spec.feature_dim}): the "
                      f"model's feature width ({model.feature_width}, the widest continuous "
                      f"modality) must equal the data's ({self.feature_dim})")
                continue
            need = self.vocab.get(spec.name)
            if need is None:  # a modality of the model that this data does not have
                continue
            check(spec.vocab_size >= need, f"model.modalities.{spec.name}.vocab_size "
                                           f"({spec.vocab_size}) must be >= {need}, the data's")
        check(len(self.tokens) > seq_len + 1,
              f"train.seq_len ({seq_len}) must be < the stream length ({len(self.tokens)})")

    def window(self, start: int, length: int) -> tuple[torch.Tensor | None, ...]:
        """tokens, modality, doc (length,) and features (length, F) float32 or None."""
        s = slice(start, start + length)
        features = None if self.features is None else self.features[s].float()
        return self.tokens[s].long(), self.modality[s].long(), self.doc[s].long(), features

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
        """Random packed windows of seq_len + 1 tokens."""
        starts = torch.randint(0, len(self.tokens) - seq_len - 1, (batch_size,),
                               generator=generator)
        return self._batch(starts.tolist(), seq_len)

    def fixed(self, batch_size: int, seq_len: int, index: int) -> Batch:
        """Deterministic, evenly spread windows (validation)."""
        span = len(self.tokens) - seq_len - 1
        n = batch_size * (index + 1)
        starts = [(span * (batch_size * index + b)) // max(n, 1) for b in range(batch_size)]
        return self._batch(starts, seq_len)

    def _batch(self, starts: list[int], seq_len: int) -> Batch:
        rows = [self.window(s, seq_len + 1) for s in starts]
        tokens, modality, doc, features = zip(*rows)
        return Batch(torch.stack(tokens), torch.stack(modality), torch.stack(doc),
                     features=None if self.features is None else torch.stack(features))


def build_stream(cfg) -> TokenStream:
    check(cfg.name in DATASETS, f"data.name ({cfg.name!r}) must be one of {sorted(DATASETS)}")
    return DATASETS[cfg.name](cfg)


def _synthetic(cfg) -> TokenStream:
    from experiments.data.synthetic import synthetic_stream

    return synthetic_stream(cfg.num_tokens, cfg.seed)


def _digits(cfg) -> TokenStream:
    from experiments.data.digits import build_digits

    return build_digits(cfg)


def _packed(cfg) -> TokenStream:
    check(bool(cfg.path), "data.path must name a packed corpus folder for data.name 'packed' "
                          "(see python -m experiments.ingest)")
    return TokenStream.load(cfg.path)


DATASETS = {"synthetic": _synthetic, "digits": _digits, "packed": _packed}
