"""Sample an interleaved continuation from a run's model, with a KV cache.

    python -m experiments.generate RUN_DIR --prompt "three plus four is" [--out DIR]
    python -m experiments.generate RUN_DIR --prompt-ids "1 22 9 3"
        [--max-new 40] [--temperature 0.8] [--top-k 20] [--seed 0]

--prompt is text, encoded with the run's text tokenizer (corpora that have one, e.g. digits),
and ends with begin-of-image so the model draws; --prompt-ids gives text token ids directly
(special tokens included; the synthetic stream's begin-of-image is 3). After a begin marker the
model samples that modality's span with its own head, then returns to text. Prints the sequence
(text decoded where a tokenizer exists); with --out, generated images are decoded by the VQ
decoder and written as PNG files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from experiments.run import load_run
from mot.generate import generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="text; the model continues with an image")
    group.add_argument("--prompt-ids", help="space-separated text token ids")
    parser.add_argument("--out", help="folder for the generated images (PNG)")
    parser.add_argument("--max-new", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        cfg, model, stream, _ = load_run(args.run_dir)
        text_tok = vq = None
        if cfg.data.name == "digits":
            from experiments.data.digits import load_tokenizers

            text_tok, vq = load_tokenizers(cfg.data)
        if args.prompt is not None:
            if text_tok is None:
                raise ValueError(f"--prompt needs a text tokenizer, which data.name "
                                 f"{cfg.data.name!r} has not; use --prompt-ids")
            sp = stream.specials
            ids = [sp["bos"]] + text_tok.encode(args.prompt) + [sp["boi"]]
        else:
            ids = [int(t) for t in args.prompt_ids.split()]
    except ValueError as e:
        parser.error(str(e))
    vocab = stream.vocab[stream.modalities[0]]
    if not ids or any(not 0 <= t < vocab for t in ids):
        parser.error(f"--prompt-ids: give text token ids in [0, {vocab})")
    if args.max_new < 1 or args.temperature < 0:
        parser.error("--max-new must be >= 1 and --temperature >= 0")
    tokens, modality = generate(model, torch.tensor(ids), torch.zeros(len(ids), dtype=torch.long),
                                args.max_new, stream.grammar(), args.temperature, args.top_k,
                                torch.Generator().manual_seed(args.seed),
                                stop=stream.specials.get("eos"))
    names = stream.modalities
    pairs = list(zip(tokens[0].tolist(), modality[0].tolist()))
    if text_tok is None:
        print(" ".join(f"{names[m]}:{t}" for t, m in pairs))
        return 0
    pieces, images, run = [], [], []
    for t, m in pairs + [(None, 0)]:
        if m == 1:
            run.append(t)
            continue
        if run:
            images.append(run)
            pieces.append(f"[image {len(images)}]")
            run = []
        if t is not None:
            pieces.append(text_tok.decode([t]) if t >= len(stream.specials) else
                          f"<{next(k for k, v in stream.specials.items() if v == t)}>")
    print("".join(pieces))
    if args.out:
        from experiments.images import write_png

        for i, codes in enumerate(images, 1):
            if len(codes) == stream.spans["boi"][1]:
                path = Path(args.out) / f"image_{i}.png"
                write_png(path, vq.decode(codes), vq.model.cfg.max_value)
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
