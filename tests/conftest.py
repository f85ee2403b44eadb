import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mot.config import ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=[1, 2, 3], ids=lambda t: f"{t}threads")
def threads(request):
    """Runs a test at 1, 2 and 3 threads (the kernels' thread plans cut rows differently)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def tiny_config(**overrides) -> ModelConfig:
    """A model small enough for exhaustive checks: 2 layers, dim 32, 3 modalities."""
    base = dict(modalities=[{"name": "text", "vocab_size": 40}, {"name": "image", "vocab_size": 24},
                            {"name": "audio", "vocab_size": 16}],
                dim=32, n_layers=2, n_heads=4, max_seq_len=64)
    base.update(overrides)
    return ModelConfig(**base)


def interleaved_modality(B: int, T: int, M: int = 3, generator=None) -> torch.Tensor:
    """(B, T) modality ids in contiguous runs, as in real interleaved documents."""
    rows = []
    for _ in range(B):
        row = []
        while len(row) < T:
            m = int(torch.randint(0, M, (1,), generator=generator))
            row += [m] * int(torch.randint(1, 9, (1,), generator=generator))
        rows.append(row[:T])
    return torch.tensor(rows)


def random_batch(cfg: ModelConfig, B: int, T: int, generator=None):
    """Random tokens valid for each position's modality: (tokens, modality), both (B, T)."""
    modality = interleaved_modality(B, T, cfg.num_modalities, generator)
    sizes = torch.tensor([m.vocab_size for m in cfg.modalities])
    tokens = (torch.rand(B, T, generator=generator) * sizes[modality]).long()
    return tokens, modality


ROOT = Path(__file__).parent.parent


def run_module(module: str, *args) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repository root, output captured as text."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def train_and_eval(out: Path, args: list[str]) -> dict:
    """Train a run into `out` with `args`, evaluate it briefly, and return its eval.json."""
    done = run_module("experiments.train", *args, f"train.out_dir={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    result = run_module("experiments.eval", out, "--batches", "1", "--images", "5",
                        "--samples", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((out / "eval.json").read_text())
