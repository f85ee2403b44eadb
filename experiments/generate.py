"""Sample an interleaved continuation from a run's model, with a KV cache.

    python -m experiments.generate RUN_DIR --prompt "1 22 9 3" [--max-new 40]
        [--temperature 0.8] [--top-k 20] [--seed 0]

The prompt is text token ids of the run's stream (special tokens included: the synthetic
stream's begin-of-image is 3); after a begin marker the model samples that modality's span with
its own head, then returns to text. Prints the tokens as `modality:id`.
"""

from __future__ import annotations

import argparse
import sys

import torch

from experiments.run import load_run
from mot.generate import generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--prompt", required=True, help="space-separated text token ids")
    parser.add_argument("--max-new", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        cfg, model, stream, _ = load_run(args.run_dir)
        ids = [int(t) for t in args.prompt.split()]
    except ValueError as e:
        parser.error(str(e))
    vocab = stream.vocab[stream.modalities[0]]
    if not ids or any(not 0 <= t < vocab for t in ids):
        parser.error(f"--prompt: give text token ids in [0, {vocab})")
    if args.max_new < 1 or args.temperature < 0:
        parser.error("--max-new must be >= 1 and --temperature >= 0")
    tokens, modality = generate(model, torch.tensor(ids), torch.zeros(len(ids), dtype=torch.long),
                                args.max_new, stream.grammar(), args.temperature, args.top_k,
                                torch.Generator().manual_seed(args.seed),
                                stop=stream.specials.get("eos"))
    names = stream.modalities
    print(" ".join(f"{names[m]}:{t}" for t, m in zip(tokens[0].tolist(), modality[0].tolist())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
