"""Token streams for training: an interleaved multimodal stream of (token, modality, doc) ids.

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
    spans: special token name -> (modality, length) of the span it opens (e.g. an image)."""

    tokens: torch.Tensor
    modality: torch.Tensor
    doc: torch.Tensor
    modalities: list[str]
    vocab: dict[str, int]
    specials: dict[str, int]
    spans: dict[str, tuple[str, int]] = field(default_factory=dict)
    split_at: int | None = None  # where validation starts (None: split by val_fraction)
    meta: dict = field(default_factory=dict)

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        """The packed on-disk format: tokens.npy (int32), modality.npy (uint8), doc.npy (int32),
        memory-mappable, and index.json (modalities, vocabularies, specials, spans, split,
        metadata, tokenizer files). `extra` maps file names to writers (e.g. tokenizers).
        Written into a temporary folder renamed at the end: never half a corpus."""
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "tokens.npy", self.tokens.numpy().astype(np.int32))
        np.save(tmp / "modality.npy", self.modality.numpy().astype(np.uint8))
        np.save(tmp / "doc.npy", self.doc.numpy().astype(np.int32))
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
        arrays = [torch.from_numpy(np.load(folder / f"{name}.npy", mmap_mode="c").astype(
            np.int64)) for name in ("tokens", "modality", "doc")]
        return TokenStream(*arrays, index["modalities"], index["vocab"], index["specials"],
                           {k: tuple(v) for k, v in index["spans"].items()}, index["split_at"],
                           index["meta"])

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
                                 self.vocab, self.specials, self.spans, None, self.meta)
                     for s in parts)

    def check_fits(self, model: ModelConfig, seq_len: int) -> None:
        """ValueError unless every modality of the data exists in the model with room for its
        vocabulary, in the same order, and the stream holds a window of `seq_len + 1` tokens."""
        names = model.modality_names
        check(names[:len(self.modalities)] == self.modalities,
              f"model.modalities {names} must start with the data's modalities "
              f"{self.modalities}, in that order")
        for spec in model.modalities[:len(self.modalities)]:
            need = self.vocab[spec.name]
            check(spec.vocab_size >= need, f"model.modalities.{spec.name}.vocab_size "
                                           f"({spec.vocab_size}) must be >= {need}, the data's")
        check(len(self.tokens) > seq_len + 1,
              f"train.seq_len ({seq_len}) must be < the stream length ({len(self.tokens)})")

    def window(self, start: int, length: int) -> tuple[torch.Tensor, ...]:
        s = slice(start, start + length)
        return self.tokens[s], self.modality[s], self.doc[s]

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
        return Batch(*(torch.stack(parts) for parts in zip(*rows)))


def build_stream(cfg) -> TokenStream:
    check(cfg.name in DATASETS, f"data.name ({cfg.name!r}) must be one of {sorted(DATASETS)}")
    return DATASETS[cfg.name](cfg)


def _synthetic(cfg) -> TokenStream:
    from experiments.data.synthetic import synthetic_stream

    return synthetic_stream(cfg.num_tokens, cfg.seed)


def _digits(cfg) -> TokenStream:
    from experiments.data.digits import build_digits

    return build_digits(cfg)


DATASETS = {"synthetic": _synthetic, "digits": _digits}
