"""Byte-level BPE text tokenizer, trained with the `tokenizers` library on the corpus text.

The special tokens of the interleaved sequence (begin/end of document, image, audio) are the
first ids of the text vocabulary, in the order of `SPECIAL_TOKENS`, so the text head predicts
them like any other text token. Byte-level: every string round-trips exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<boa>", "<eoa>"]
EXTRA_SPECIALS = ["<bov>", "<eov>"]  # begin/end of video, added when a corpus has video


class BPETokenizer:
    modality = "text"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        names = SPECIAL_TOKENS + EXTRA_SPECIALS
        self.specials = {name.strip("<>"): self.tokenizer.token_to_id(name) for name in names
                         if self.tokenizer.token_to_id(name) is not None}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512,
              extra_specials: Iterable[str] = ()) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        specials = SPECIAL_TOKENS + [s for s in extra_specials if s not in SPECIAL_TOKENS]
        if vocab_size < len(specials) + 256:
            raise ValueError(f"text vocab_size ({vocab_size}) must be >= "
                             f"{len(specials) + 256} (specials + 256 bytes)")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        """Write atomically (temporary name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        self.tokenizer.save(str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))
