"""Write greyscale images as PNG files with the standard library only (zlib + struct)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch

from experiments.checkpoint import atomic_write_bytes


def png_bytes(image: torch.Tensor, max_value: float, scale: int = 8) -> bytes:
    """image (H, W) with values in [0, max_value] -> an 8-bit greyscale PNG, each pixel drawn as
    a scale x scale block (ink is dark: the digits' high values become black)."""
    if image.dim() != 2:
        raise ValueError(f"image must be (H, W), got {tuple(image.shape)}")
    grey = (255 - (image.float().clamp(0, max_value) / max_value * 255)).round().to(torch.uint8)
    grey = grey.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    H, W = grey.shape
    raw = b"".join(b"\x00" + bytes(row) for row in grey.tolist())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", W, H, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) \
        + chunk(b"IEND", b"")


def write_png(path: str | Path, image: torch.Tensor, max_value: float, scale: int = 8) -> None:
    atomic_write_bytes(path, png_bytes(image, max_value, scale))
