"""Evaluate a run: per-modality validation loss and perplexity over the held-out split, and for
the digits corpus the task metrics of `experiments.metrics` on validation images: captioning
accuracy and generation accuracy (generated images decoded by the VQ decoder and classified by a
logistic regression trained on the real train-split digits, whose own validation accuracy is
reported beside it as the ceiling), and, when the corpus has audio, transcription accuracy on
the validation clips (null otherwise).

    python -m experiments.eval RUN_DIR [--batches 16] [--images 50] [--samples 3]

Writes `eval.json` into the run directory (atomically) and prints the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from experiments.allocator import keep_freed_memory
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
    # a regression loss (`<m>_mse`) is a mean squared error: it has no perplexity
    return {name: {"loss": sums[name] / counts[name],
                   "perplexity": None if name.endswith("_mse") else math.exp(sums[name] /
                                                                            counts[name]),
                   "tokens": counts[name]} for name in sums}


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    parser = argparse.ArgumentParser(prog="python -m experiments.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--images", type=int, default=50, help="validation images to caption")
    parser.add_argument("--samples", type=int, default=3, help="generated images per digit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("batches", "images", "samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} ({getattr(args, name)}) must be >= 1")
    try:
        cfg, model, stream, step = load_run(args.run_dir)
    except ValueError as e:
        parser.error(str(e))
    _, val = stream.split(cfg.data.val_fraction)
    metrics = validation_metrics(model, val, cfg.train.batch_size, cfg.train.seq_len,
                                 args.batches)
    result = {"step": step, "validation": metrics}
    if cfg.data.name == "digits":
        result |= digits_metrics(model, cfg, stream, args.images, args.samples, args.seed)
    atomic_write_text(Path(args.run_dir) / "eval.json", json.dumps(result, indent=2))
    print(f"step {step}\n{'modality':<10}{'loss':>8}{'ppl':>9}{'tokens':>9}")
    for name, m in metrics.items():
        ppl = "-" if m["perplexity"] is None else f"{m['perplexity']:.2f}"
        print(f"{name:<10}{m['loss']:>8.3f}{ppl:>9}{m['tokens']:>9}")
    for key in ("caption_accuracy", "generation_accuracy", "classifier_accuracy",
                "transcription_accuracy"):
        if key in result:
            print(f"{key}: {result[key]}")
    return 0


def digits_metrics(model, cfg, stream, n_images: int, samples: int, seed: int) -> dict:
    from sklearn.datasets import load_digits

    from experiments.data.digits import CAPTIONS, fill, load_tokenizers, patches
    from experiments.metrics import (
        caption_accuracy,
        continuation_logprobs,
        digit_classifier,
        generation_accuracy,
    )
    from mot.generate import generate

    text_tok, vq = load_tokenizers(cfg.data)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)
    labels = digits.target.tolist()
    split = stream.meta["images"]
    val_ids = split["val"][:n_images]
    codes = vq.encode_batch(images[val_ids]).tolist()
    sp = stream.specials
    captions = {d: [text_tok.encode(fill(t, d)) for t in CAPTIONS] for d in range(10)}
    continuous = model.cfg.modalities[1].continuous  # image positions read pixel patches
    features = None
    if continuous:
        width = model.cfg.feature_width
        features = [torch.nn.functional.pad(patches(images[i]), (0, width - 4)) for i in val_ids]
    caption_acc = caption_accuracy(lambda p, c, *f: continuation_logprobs(model, p, c, *f),
                                   codes, [labels[i] for i in val_ids], captions.__getitem__, sp,
                                   span_features=features)
    classify = digit_classifier(images[split["train"]], [labels[i] for i in split["train"]])
    ceiling = float((classify(images[split["val"]]) == torch.tensor(
        [labels[i] for i in split["val"]])).float().mean())
    image_len = stream.spans["boi"][1]
    generator = torch.Generator().manual_seed(seed)

    def generate_image(d: int, i: int) -> torch.Tensor:
        prompt = [sp["bos"]] + captions[d][i % len(CAPTIONS)] + [sp["boi"]]
        tokens, modality = generate(model, torch.tensor(prompt), torch.zeros(len(prompt),
                                    dtype=torch.long), image_len, stream.grammar(),
                                    temperature=0.7, generator=generator)
        return vq.decode(tokens[0, len(prompt):len(prompt) + image_len])

    # a continuous image modality has no image head to sample from
    generation_acc = None if continuous else generation_accuracy(generate_image, classify,
                                                                 samples)
    return {"caption_accuracy": caption_acc, "generation_accuracy": generation_acc,
            "classifier_accuracy": ceiling,
            "transcription_accuracy": transcription(model, cfg, stream, text_tok, n_images)}


def transcription(model, cfg, stream, text_tok, n_clips: int) -> float | None:
    """Accuracy of picking the spoken digit's transcripts for validation clips (None without
    audio)."""
    if "audio" not in stream.modalities:
        return None
    from experiments.data.digits import TRANSCRIPTS, cache_folder, fill
    from experiments.metrics import caption_accuracy, continuation_logprobs

    clips = stream.meta["clips"]["val"][:n_clips]
    codes = torch.load(cache_folder(cfg.data) / "audio_codes.pt", weights_only=True)
    labels = [stream.meta["clip_labels"][c] for c in clips]
    transcripts = {d: [text_tok.encode(fill(t, d)) for t in TRANSCRIPTS] for d in range(10)}
    return caption_accuracy(lambda p, c: continuation_logprobs(model, p, c),
                            [codes[c].tolist() for c in clips], labels, transcripts.__getitem__,
                            stream.specials, span=("boa", "eoa", stream.modalities.index("audio")))


if __name__ == "__main__":
    sys.exit(main())
