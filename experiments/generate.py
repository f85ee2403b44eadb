"""Sample an interleaved continuation from a run's model, with a KV cache.

    python -m experiments.generate RUN_DIR --prompt "three plus four is" [--out DIR]
    python -m experiments.generate RUN_DIR --prompt "say seven" --then audio --out DIR
    python -m experiments.generate RUN_DIR --prompt-ids "1 22 9 3"
        [--max-new 40] [--temperature 0.8] [--top-k 20] [--seed 0]

--prompt is text, encoded with the run's text tokenizer (corpora that have one, e.g. digits),
followed by the begin marker of `--then` (image by default; audio, video, or text for none) so
the model continues in that modality; --prompt-ids gives text token ids directly (special
tokens included; the synthetic stream's begin-of-image is 3). After a begin marker the model
samples that modality's span with its own head, then returns to text. Prints the sequence (text
decoded where a tokenizer exists); with --out, generated images are decoded by the VQ decoder
and written as PNG files (video clips as one PNG strip of frames), and audio as 16-bit WAV
files (Griffin-Lim from the decoded spectrogram).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from experiments.allocator import keep_freed_memory
from experiments.run import load_run
from mot.generate import generate


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    parser = argparse.ArgumentParser(prog="python -m experiments.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="text; the model continues with an image")
    group.add_argument("--prompt-ids", help="space-separated text token ids")
    parser.add_argument("--then", default="image", choices=["image", "audio", "video", "text"],
                        help="the modality the --prompt continues with (default image)")
    parser.add_argument("--out", help="folder for generated images (PNG) and audio (WAV)")
    parser.add_argument("--max-new", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        cfg, model, stream, _ = load_run(args.run_dir)
        text_tok = vq = audio_tok = None
        if cfg.data.name == "digits":
            from experiments.data.digits import load_audio_tokenizer, load_tokenizers

            text_tok, vq = load_tokenizers(cfg.data)
            audio_tok = load_audio_tokenizer(cfg.data)
        if args.prompt is not None:
            if text_tok is None:
                raise ValueError(f"--prompt needs a text tokenizer, which data.name "
                                 f"{cfg.data.name!r} has not; use --prompt-ids")
            sp = stream.specials
            marker = {"image": "boi", "audio": "boa", "video": "bov", "text": None}[args.then]
            if marker is not None and args.then not in stream.modalities:
                raise ValueError(f"--then {args.then}: this run's data has no {args.then} "
                                 f"(modalities {stream.modalities})")
            ids = [sp["bos"]] + text_tok.encode(args.prompt) + ([sp[marker]] if marker else [])
        else:
            ids = [int(t) for t in args.prompt_ids.split()]
    except ValueError as e:
        parser.error(str(e))
    vocab = stream.vocab[stream.modalities[0]]
    if not ids or any(not 0 <= t < vocab for t in ids):
        parser.error(f"--prompt-ids: give text token ids in [0, {vocab})")
    if args.max_new < 1 or args.temperature < 0:
        parser.error("--max-new must be >= 1 and --temperature >= 0")
    try:
        tokens, modality = generate(model, torch.tensor(ids), torch.zeros(len(ids),
                                    dtype=torch.long), args.max_new, stream.grammar(),
                                    args.temperature, args.top_k,
                                    torch.Generator().manual_seed(args.seed),
                                    stop=stream.specials.get("eos"))
    except ValueError as e:  # e.g. a continuous modality, which has no head to sample from
        parser.error(str(e))
    names = stream.modalities
    pairs = list(zip(tokens[0].tolist(), modality[0].tolist()))
    run_modality = 0
    if text_tok is None:
        print(" ".join(f"{names[m]}:{t}" for t, m in pairs))
        return 0
    special_ids = set(stream.specials.values())
    pieces, spans, run = [], [], []
    for t, m in pairs + [(None, 0)]:
        if m != 0:
            run.append(t)
            run_modality = m
            continue
        if run:
            spans.append((names[run_modality], run))
            pieces.append(f"[{names[run_modality]} {len(spans)}]")
            run = []
        if t is not None:
            pieces.append(text_tok.decode([t]) if t not in special_ids else
                          f"<{next(k for k, v in stream.specials.items() if v == t)}>")
    print("".join(pieces))
    if args.out:
        write_spans(Path(args.out), spans, stream, vq, audio_tok)
    return 0


def write_spans(out: Path, spans: list[tuple[str, list[int]]], stream, vq, audio_tok) -> None:
    """Decode each complete generated span to a file: image and video PNG, audio WAV."""
    from experiments.images import write_png

    for i, (name, codes) in enumerate(spans, 1):
        marker = next((k for k, (m, _) in stream.spans.items() if m == name), None)
        if marker is None or len(codes) != stream.spans[marker][1]:
            continue  # an unfinished span (the generation stopped inside it)
        if name == "image":
            path = out / f"image_{i}.png"
            write_png(path, vq.decode(codes), vq.model.cfg.max_value)
        elif name == "video":
            shape = stream.meta["video"]
            h, w = shape["height"] // 2, shape["width"] // 2
            frames = [vq.model.decode(torch.tensor(codes).view(-1, h, w))[f].clamp(
                0, vq.model.cfg.max_value) for f in range(shape["frames"])]
            path = out / f"video_{i}.png"
            write_png(path, torch.cat(frames, dim=1), vq.model.cfg.max_value)
        elif name == "audio" and audio_tok is not None:
            from mot.tokenizers.audio import write_wav

            path = out / f"audio_{i}.wav"
            write_wav(path, audio_tok.decode(codes), audio_tok.cfg.sample_rate)
        else:
            continue
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
