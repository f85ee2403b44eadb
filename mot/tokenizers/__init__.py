"""Tokenizers: each turns items of one modality into ids of that modality's vocabulary and back.

    tok.encode(item) -> list[int];  tok.decode(ids) -> item;  tok.vocab_size;  tok.modality
    tok.save(path);  Cls.load(path)

Text: byte-level BPE (`text.BPETokenizer`); images: a VQ-VAE (`vqvae.VQTokenizer`); audio: a
log-mel VQ (`audio.AudioTokenizer`, whose encode also takes the sample rate).
"""

from mot.tokenizers.audio import AudioConfig, AudioTokenizer, train_audio_vq
from mot.tokenizers.text import SPECIAL_TOKENS, BPETokenizer
from mot.tokenizers.vqvae import VQVAE, VQTokenizer, VQVAEConfig, train_vqvae

__all__ = ["AudioConfig", "AudioTokenizer", "BPETokenizer", "SPECIAL_TOKENS", "VQTokenizer",
           "VQVAE", "VQVAEConfig", "train_audio_vq", "train_vqvae"]
