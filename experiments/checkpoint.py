"""Atomic writes: a file is either the old complete version or the new complete version.

Write to a temporary name in the same directory, flush and fsync, then `os.replace` (atomic on
POSIX), then fsync the directory so the rename itself survives a crash.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import torch


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj, path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# ---- training checkpoints: out_dir/checkpoints/step_0000100.pt, newest kept, older rotated ----
# (multi-process runs write `step_0000100.dcp` folders instead, see experiments/dcp.py)

def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(out_dir) / f"step_{step:07d}.pt"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of either format, oldest first (a save in progress only exists
    under a hidden .tmp name)."""
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step_*.pt") if p.is_file()]
    found += [p for p in folder.glob("step_*.dcp") if (p / "meta.pt").is_file()]
    return sorted(found, key=lambda p: (p.stem, p.suffix))


def remove_checkpoint(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save_checkpoint(out_dir: str | Path, step: int, state: dict, keep: int) -> Path:
    """Write the checkpoint of `step` atomically, then drop all but the newest `keep`."""
    path = checkpoint_path(out_dir, step)
    atomic_torch_save(state, path)
    rotate(out_dir, keep)
    return path


def rotate(out_dir: str | Path, keep: int) -> None:
    """Drop all but the newest `keep` checkpoints."""
    for old in list_checkpoints(out_dir)[:-keep]:
        remove_checkpoint(old)


def latest_checkpoint(out_dir: str | Path) -> dict | None:
    """The newest single-file checkpoint that loads, or None."""
    for path in reversed([p for p in list_checkpoints(out_dir) if p.suffix == ".pt"]):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # a damaged file: fall back to the one before
            continue
    return None
