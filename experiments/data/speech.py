"""Spoken digits synthesised with espeak-ng (a Debian package: `apt-get install espeak-ng`).

Several voices, speeds and pitches per digit word; each clip is synthesised once into memory.
Without espeak-ng the digits corpus leaves its audio documents out and says how to install it.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

VOICES = ["en", "en-us", "en+f3", "en+m3", "en-gb-scotland", "en+f2"]
SPEEDS = [130, 165, 200]  # words per minute
PITCHES = [30, 55, 80]  # 0..99
INSTALL = "apt-get install espeak-ng"


def espeak() -> str | None:
    """The espeak-ng executable, or None."""
    return shutil.which("espeak-ng")


def synthesize(text: str, voice: str = "en", speed: int = 160, pitch: int = 50
               ) -> tuple[torch.Tensor, int]:
    """-> (mono wave (T,) in [-1, 1], sample rate) of `text` spoken by espeak-ng."""
    from mot.tokenizers.audio import read_wav

    exe = espeak()
    if exe is None:
        raise ValueError(f"espeak-ng is not installed ({INSTALL})")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "clip.wav"
        subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(out),
                        text], check=True, capture_output=True)
        return read_wav(out)


@functools.lru_cache(maxsize=2)
def spoken_digits(words: tuple[str, ...]) -> list[tuple[int, torch.Tensor, int, str]]:
    """(label, wave, sample rate, speaker) for every word x voice x speed x pitch (cached for
    the life of the process: synthesis takes seconds)."""
    clips = []
    for label, word in enumerate(words):
        for voice in VOICES:
            for speed in SPEEDS:
                for pitch in PITCHES:
                    wave, rate = synthesize(word, voice, speed, pitch)
                    clips.append((label, wave, rate, f"{voice}/{speed}/{pitch}"))
    return clips
