"""Audio tokenizer: a waveform -> a log-mel spectrogram -> one VQ code per patch of frames.

    tok = AudioTokenizer(train_audio_vq(clips, AudioConfig()))
    ids = tok.encode(wave, sample_rate)        # 16 kHz mono; 0.8 s -> 40 frames -> 10 codes
    wave = tok.decode(ids)                     # Griffin-Lim from the decoded spectrogram

Clips are resampled to `sample_rate`, trimmed of leading silence, and cut or zero-padded to
`seconds`, so every clip has the same number of codes (a fixed-length span, like an image).
The spectrogram is `torch.stft` magnitudes through a triangular mel filterbank (HTK mel scale),
log-compressed. The VQ is the image tokenizer's (EMA codebook, commitment loss, dead-code
restarts, `mot.tokenizers.vqvae`) with 1-d convolutions over time: a stride-`patch` convolution
turns each patch of `patch` frames into one vector, replaced by its nearest code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mot.tokenizers.vqvae import VQVAE, VQVAEConfig, load_model, save_model, train_vqvae


@dataclass
class AudioConfig(VQVAEConfig):
    """Spectrogram and VQ settings (the VQ fields are `VQVAEConfig`'s)."""

    sample_rate: int = 16000
    seconds: float = 0.8
    n_fft: int = 512
    hop: int = 320  # 20 ms
    n_mels: int = 32
    patch: int = 4  # frames per code
    silence: float = 0.02  # leading samples below this share of the peak are trimmed
    log_floor: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        for name in ("sample_rate", "n_fft", "hop", "n_mels", "patch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"audio.{name} ({getattr(self, name)!r}) must be a positive "
                                 "integer")
        if self.frames % self.patch or self.frames < self.patch:
            raise ValueError(f"audio.seconds ({self.seconds}) gives {self.frames} frames, which "
                             f"must be a positive multiple of audio.patch ({self.patch})")

    @property
    def samples(self) -> int:
        return self.frames * self.hop

    @property
    def frames(self) -> int:
        return int(round(self.seconds * self.sample_rate / self.hop))

    @property
    def codes_per_clip(self) -> int:
        return self.frames // self.patch


def resample(wave: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """Linear-interpolation resampling of a mono wave (T,) (adequate for speech at 16 kHz)."""
    if rate == target:
        return wave.float()
    n = max(1, round(wave.numel() * target / rate))
    return F.interpolate(wave.float()[None, None], size=n, mode="linear",
                         align_corners=False)[0, 0]


def mel_filterbank(cfg: AudioConfig) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters evenly spaced on the HTK mel scale."""
    def mel(f):
        return 2595 * math.log10(1 + f / 700)

    def hz(m):
        return 700 * (10 ** (m / 2595) - 1)

    bins = cfg.n_fft // 2 + 1
    freqs = torch.linspace(0, cfg.sample_rate / 2, bins)
    edges = torch.tensor([hz(m) for m in torch.linspace(mel(0), mel(cfg.sample_rate / 2),
                                                         cfg.n_mels + 2).tolist()])
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs - lower) / (centre - lower)
    falling = (upper - freqs) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0)


def prepare(wave: torch.Tensor, rate: int, cfg: AudioConfig) -> torch.Tensor:
    """Mono wave at any rate -> (samples,) at cfg.sample_rate, leading silence trimmed, cut or
    zero-padded to cfg.seconds."""
    wave = resample(torch.as_tensor(wave), rate, cfg.sample_rate)
    if wave.numel() and wave.abs().max() > 0:
        loud = (wave.abs() >= cfg.silence * wave.abs().max()).nonzero()
        wave = wave[int(loud[0]):]
    out = torch.zeros(cfg.samples)
    out[:min(cfg.samples, wave.numel())] = wave[:cfg.samples]
    return out


def log_mel(wave: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """(..., samples) -> (..., frames, n_mels) log-mel spectrogram."""
    spec = torch.stft(wave, cfg.n_fft, cfg.hop, window=torch.hann_window(cfg.n_fft),
                      center=True, return_complex=True).abs()  # (..., bins, frames + 1)
    mel = torch.einsum("mb,...bt->...tm", mel_filterbank(cfg), spec)
    return torch.log(mel.clamp(min=cfg.log_floor))[..., :cfg.frames, :]


def griffin_lim(log_mel_spec: torch.Tensor, cfg: AudioConfig, iterations: int = 32,
                seed: int = 0) -> torch.Tensor:
    """(frames, n_mels) log-mel -> (samples,) wave: the mel filterbank's pseudo-inverse (the
    minimum-norm magnitudes, clipped at 0), then Griffin-Lim phase recovery."""
    fb = mel_filterbank(cfg)
    mag = (torch.linalg.pinv(fb) @ log_mel_spec.exp().t()).clamp(min=0)  # (bins, T)
    mag = torch.cat([mag, mag[:, -1:]], 1)  # center=True has one more frame
    window = torch.hann_window(cfg.n_fft)
    g = torch.Generator().manual_seed(seed)
    phase = torch.exp(2j * math.pi * torch.rand(mag.shape, generator=g))
    length = cfg.samples
    for _ in range(iterations):
        wave = torch.istft(mag * phase, cfg.n_fft, cfg.hop, window=window, length=length)
        spec = torch.stft(wave, cfg.n_fft, cfg.hop, window=window, return_complex=True)
        phase = torch.exp(1j * spec.angle())
    return torch.istft(mag * phase, cfg.n_fft, cfg.hop, window=window, length=length)


class AudioVQ(VQVAE):
    """The VQ-VAE of `mot.tokenizers.vqvae` on log-mel spectrograms (B, frames, n_mels):
    1-d convolutions over time, one code per `patch` frames. Inputs are normalised with the
    mean and standard deviation of the training spectrograms (buffers)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__(cfg)
        h, d, m, p = cfg.hidden, cfg.code_dim, cfg.n_mels, cfg.patch
        self.encoder = nn.Sequential(
            nn.Conv1d(m, h, 3, padding=1), nn.ReLU(),
            nn.Conv1d(h, h, p, stride=p), nn.ReLU(),
            nn.Conv1d(h, d, 1))
        self.decoder = nn.Sequential(
            nn.Conv1d(d, h, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose1d(h, h, p, stride=p), nn.ReLU(),
            nn.Conv1d(h, m, 3, padding=1))
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))

    def normalize(self, spec: torch.Tensor) -> torch.Tensor:
        return (spec.float() - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean

    def encode(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, frames, n_mels) -> z_e (B, frames / patch, D)."""
        return self.encoder(self.normalize(spec).transpose(1, 2)).transpose(1, 2)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z.transpose(1, 2)).transpose(1, 2)


def train_audio_vq(specs: torch.Tensor, cfg: AudioConfig, steps: int = 1500, seed: int = 0
                   ) -> AudioVQ:
    """Train on log-mel spectrograms (N, frames, n_mels); deterministic for a seed."""
    if specs.dim() != 3 or specs.shape[1:] != (cfg.frames, cfg.n_mels):
        raise ValueError(f"spectrograms must be (N, {cfg.frames}, {cfg.n_mels}), got "
                         f"{tuple(specs.shape)}")

    class _Fitted(AudioVQ):  # the normalisation is fixed before the first step
        def __init__(self, c):
            super().__init__(c)
            self.mean.fill_(float(specs.mean()))
            self.std.fill_(float(specs.std().clamp(min=1e-6)))

    trained = train_vqvae(specs, cfg, steps=steps, seed=seed, model_class=_Fitted)
    model = AudioVQ(cfg)
    model.load_state_dict(trained.state_dict())
    return model.eval()


class AudioTokenizer:
    """Mono clips <-> `codes_per_clip` code ids."""

    modality = "audio"

    def __init__(self, model: AudioVQ):
        self.model = model.eval()
        self.cfg: AudioConfig = model.cfg

    @property
    def vocab_size(self) -> int:
        return self.cfg.codebook_size

    @torch.no_grad()
    def spectrogram(self, wave, sample_rate: int) -> torch.Tensor:
        return log_mel(prepare(wave, sample_rate, self.cfg), self.cfg)

    @torch.no_grad()
    def encode(self, wave, sample_rate: int) -> list[int]:
        spec = self.spectrogram(wave, sample_rate)
        return self.model.codes(self.model.encode(spec[None]))[0].tolist()

    @torch.no_grad()
    def encode_spectrograms(self, specs: torch.Tensor) -> torch.Tensor:
        """(N, frames, n_mels) -> codes (N, codes_per_clip)."""
        return self.model.codes(self.model.encode(specs))

    @torch.no_grad()
    def decode_spectrogram(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long).view(1, -1)
        return self.model.decode(ids)[0]

    @torch.no_grad()
    def decode(self, ids) -> torch.Tensor:
        """ids -> (samples,) wave at cfg.sample_rate, peak-normalised to 0.9."""
        wave = griffin_lim(self.decode_spectrogram(ids), self.cfg)
        return wave / wave.abs().max().clamp(min=1e-8) * 0.9

    def save(self, path: str | Path) -> None:
        save_model(self.model, path)

    @classmethod
    def load(cls, path: str | Path) -> AudioTokenizer:
        return cls(load_model(path, AudioVQ, AudioConfig))


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """A 16-bit PCM WAV file -> (mono wave (T,) in [-1, 1], sample rate). Multi-channel files
    are averaged. Raises ValueError naming the file for anything else."""
    import wave as wavelib

    try:
        with wavelib.open(str(path), "rb") as f:
            rate, channels, width, n = (f.getframerate(), f.getnchannels(), f.getsampwidth(),
                                        f.getnframes())
            data = f.readframes(n)
    except (wavelib.Error, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable WAV file ({e})") from e
    if width != 2:
        raise ValueError(f"{path}: {8 * width}-bit samples; only 16-bit PCM is read")
    if n == 0:
        raise ValueError(f"{path}: empty (no samples)")
    samples = torch.frombuffer(bytearray(data), dtype=torch.int16).float() / 32768
    return samples.view(-1, channels).mean(1), rate


def write_wav(path: str | Path, wave: torch.Tensor, sample_rate: int) -> None:
    """Write a mono wave in [-1, 1] as 16-bit PCM, atomically."""
    import wave as wavelib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pcm = (wave.clamp(-1, 1) * 32767).round().to(torch.int16)
    with wavelib.open(str(tmp), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.numpy().tobytes())
    tmp.replace(path)
