"""A small VQ-VAE image tokenizer: a convolutional encoder maps an H x W image to an
(H/2) x (W/2) grid of vectors, each replaced by its nearest codebook entry (its id is the token),
and a convolutional decoder maps the grid back to pixels.

Codebook learning: EMA updates (van den Oord et al. 2017, appendix) or straight-through with a
codebook loss; commitment loss beta * ||z_e - sg(e)||^2 (beta 0.25); codes unused for
`restart_after` steps are restarted at random encoder outputs of the batch (dead-code restarts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQVAEConfig:
    codebook_size: int = 128
    code_dim: int = 16
    hidden: int = 64
    beta: float = 0.25
    ema_decay: float = 0.99  # 0 switches to straight-through codebook learning
    restart_after: int = 100
    max_value: float = 16.0  # pixel values are in [0, max_value]

    def __post_init__(self):
        for name in ("codebook_size", "code_dim", "hidden", "restart_after"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"vq.{name} ({getattr(self, name)!r}) must be a positive integer")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"vq.ema_decay ({self.ema_decay}) must be in [0, 1)")
        if self.beta < 0 or self.max_value <= 0:
            raise ValueError("vq.beta must be >= 0 and vq.max_value > 0")


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden, cfg.code_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(1, h, 3, padding=1), nn.ReLU(),
            nn.Conv2d(h, h, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(h, d, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(d, h, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(h, h, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(h, 1, 3, padding=1))
        codebook = torch.randn(cfg.codebook_size, d) * 0.1
        if cfg.ema_decay > 0:
            self.register_buffer("codebook", codebook)
            self.register_buffer("ema_count", torch.ones(cfg.codebook_size))
            self.register_buffer("ema_sum", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("idle", torch.zeros(cfg.codebook_size, dtype=torch.long))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, H, W) in [0, max_value] -> z_e (B, h, w, D)."""
        return self.encoder(self.normalize(images)[:, None]).permute(0, 2, 3, 1)

    def codes(self, z_e: torch.Tensor) -> torch.Tensor:
        """Nearest codebook entry of each vector: (..., D) -> (...) int64."""
        flat = z_e.reshape(-1, z_e.shape[-1])
        dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t()
                + self.codebook.pow(2).sum(1))
        return dist.argmin(dim=1).view(z_e.shape[:-1])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> images (B, H, W) in [0, max_value]."""
        return self.denormalize(self.decode_latent(self.codebook[codes]))

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Quantised latents (B, h, w, D) -> reconstruction in the encoder's input scale."""
        return self.decoder(z.permute(0, 3, 1, 2))[:, 0]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Inputs -> the scale the decoder reconstructs ([-1, 1] for pixels)."""
        return images.float() / self.cfg.max_value * 2 - 1

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1) / 2 * self.cfg.max_value

    def forward(self, images: torch.Tensor):
        """-> (reconstruction (B, H, W), codes (B, h, w), loss)."""
        z_e = self.encode(images)
        codes = self.codes(z_e)
        e = self.codebook[codes]
        loss = self.cfg.beta * F.mse_loss(z_e, e.detach())
        if self.cfg.ema_decay == 0:
            loss = loss + F.mse_loss(e, z_e.detach())
        elif self.training:
            self._ema_update(z_e.detach(), codes)
        if self.training:
            self._restart_dead(z_e.detach(), codes)
        z_q = z_e + (e - z_e).detach()  # straight-through to the encoder
        x_hat = self.decode_latent(z_q)
        loss = loss + F.mse_loss(x_hat, self.normalize(images))
        return self.denormalize(x_hat), codes, loss

    @torch.no_grad()
    def _ema_update(self, z_e, codes):
        gamma, K = self.cfg.ema_decay, self.cfg.codebook_size
        flat, ids = z_e.reshape(-1, z_e.shape[-1]), codes.reshape(-1)
        count = torch.bincount(ids, minlength=K).float()
        total = torch.zeros_like(self.ema_sum).index_add_(0, ids, flat)
        self.ema_count.mul_(gamma).add_(count, alpha=1 - gamma)
        self.ema_sum.mul_(gamma).add_(total, alpha=1 - gamma)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + K * 1e-5) * n  # Laplace smoothing
        self.codebook.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead(self, z_e, codes):
        used = torch.bincount(codes.reshape(-1), minlength=self.cfg.codebook_size) > 0
        self.idle.add_(1).masked_fill_(used, 0)
        dead = (self.idle >= self.cfg.restart_after).nonzero().flatten()
        if dead.numel() == 0:
            return
        flat = z_e.reshape(-1, z_e.shape[-1])
        pick = flat[torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)]
        self.codebook.data[dead] = pick
        if self.cfg.ema_decay > 0:
            self.ema_sum[dead] = pick
            self.ema_count[dead] = 1.0
        self.idle[dead] = 0


def train_vqvae(images: torch.Tensor, cfg: VQVAEConfig, steps: int = 1500, batch_size: int = 128,
                lr: float = 2e-3, seed: int = 0, model_class=None) -> VQVAE:
    """Train on images (N, H, W) in [0, max_value] (or whatever `model_class`, a VQVAE subclass,
    encodes); deterministic for a seed."""
    if model_class is None and (images.dim() != 3 or images.shape[1] % 2 or images.shape[2] % 2):
        raise ValueError(f"images must be (N, H, W) with even H and W, got {tuple(images.shape)}")
    torch.manual_seed(seed)
    model = (model_class or VQVAE)(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, 2 * (1 - step / steps) + 0.05)
        _, _, loss = model(images[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def reconstruction_report(model: VQVAE, images: torch.Tensor) -> dict:
    """Mean squared error in units of max_value^2 (pixels scaled to [0, 1]), and the share of
    codebook entries used on `images`."""
    x_hat, codes, _ = model.eval()(images)
    mse = F.mse_loss(x_hat / model.cfg.max_value, images.float() / model.cfg.max_value)
    return {"mse": float(mse), "codebook_usage": float(codes.unique().numel()
                                                        / model.cfg.codebook_size)}


class VQTokenizer:
    """Images of one fixed size <-> (H/2) * (W/2) code ids, row by row."""

    modality = "image"

    def __init__(self, model: VQVAE):
        self.model = model.eval()

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.codebook_size

    @torch.no_grad()
    def encode(self, image) -> list[int]:
        image = torch.as_tensor(image, dtype=torch.float32)
        return self.model.codes(self.model.encode(image[None]))[0].flatten().tolist()

    @torch.no_grad()
    def encode_batch(self, images) -> torch.Tensor:
        """images (N, H, W) -> codes (N, h * w)."""
        images = torch.as_tensor(images, dtype=torch.float32)
        return self.model.codes(self.model.encode(images)).flatten(1)

    @torch.no_grad()
    def decode(self, ids, side: int | None = None) -> torch.Tensor:
        """ids (h * w,) -> image (H, W) in [0, max_value] (a square grid unless `side`)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        side = side or int(round(ids.numel() ** 0.5))
        return self.model.decode(ids.view(1, side, -1))[0].clamp(0, self.model.cfg.max_value)

    def save(self, path: str | Path) -> None:
        save_model(self.model, path)

    @classmethod
    def load(cls, path: str | Path) -> VQTokenizer:
        return cls(load_model(path, VQVAE, VQVAEConfig))


def save_model(model: VQVAE, path: str | Path) -> None:
    """A VQ model's config and weights, written atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"config": asdict(model.cfg), "state": model.state_dict()}, tmp)
    tmp.replace(path)


def load_model(path: str | Path, model_class, config_class):
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = model_class(config_class(**saved["config"]))
    model.load_state_dict(saved["state"])
    return model
