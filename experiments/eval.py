"""Evaluate a run: per-modality validation loss and perplexity over the held-out split.

    python -m experiments.eval RUN_DIR [--batches 16]

Writes `eval.json` into the run directory (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from experiments.checkpoint import atomic_write_text
from experiments.run import load_run


@torch.no_grad()
def validation_metrics(model, stream, batch_size: int, seq_len: int, batches: int) -> dict:
    """Token-weighted cross-entropy and perplexity per modality over fixed windows."""
    sums, counts = {}, {}
    for i in range(batches):
        out = model.loss(stream.fixed(batch_size, seq_len, i))
        for name, value in out.per_modality.items():
            sums[name] = sums.get(name, 0.0) + float(value) * out.tokens[name]
            counts[name] = counts.get(name, 0) + out.tokens[name]
    return {name: {"loss": sums[name] / counts[name], "perplexity": math.exp(sums[name] /
                                                                            counts[name]),
                   "tokens": counts[name]} for name in sums}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--batches", type=int, default=16)
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error(f"--batches ({args.batches}) must be >= 1")
    try:
        cfg, model, stream, step = load_run(args.run_dir)
    except ValueError as e:
        parser.error(str(e))
    _, val = stream.split(cfg.data.val_fraction)
    metrics = validation_metrics(model, val, cfg.train.batch_size, cfg.train.seq_len,
                                 args.batches)
    result = {"step": step, "validation": metrics}
    atomic_write_text(Path(args.run_dir) / "eval.json", json.dumps(result, indent=2))
    print(f"step {step}\n{'modality':<10}{'loss':>8}{'ppl':>9}{'tokens':>9}")
    for name, m in metrics.items():
        print(f"{name:<10}{m['loss']:>8.3f}{m['perplexity']:>9.2f}{m['tokens']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
