"""The PNG writer, read back by hand (signature, header, pixels)."""

import struct
import zlib

import torch

from experiments.images import png_bytes


def test_png_round_trip():
    image = torch.tensor([[0.0, 16.0], [8.0, 4.0]])
    data = png_bytes(image, max_value=16, scale=3)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert kind == b"IHDR" and (width, height, depth, colour) == (6, 6, 8, 0)
    start = data.index(b"IDAT")
    size = struct.unpack(">I", data[start - 4:start])[0]
    raw = zlib.decompress(data[start + 4:start + 4 + size])
    rows = [raw[i * 7 + 1:(i + 1) * 7] for i in range(6)]  # each row: filter byte + 6 pixels
    assert rows[0] == bytes([255, 255, 255, 0, 0, 0])  # blank paper, then full ink
    assert rows[3] == bytes([128, 128, 128, 191, 191, 191])
    assert data.endswith(b"IEND\xaeB`\x82")
