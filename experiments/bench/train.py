"""Training throughput and model-FLOPs utilisation of each block kind's preset.

    python -m experiments.bench train [--presets default,mot,moe] [--dtype float32]

For each preset (experiments/configs/<name>.yaml, which share data, sizes and active FLOPs per
token), one training step (forward, backward, AdamW) is timed alternately with the others; the
ratios to the first preset are paired (the median over rounds of the ratio within a round).
MFU = the model's matmul FLOPs per second (`mot.accounting`) over the peak matmul rate of this
machine, measured in the same run as a 2048 x 2048 x 2048 GEMM in the same dtype.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from experiments.bench import paired_ratio, time_rounds
from experiments.config import load_config
from experiments.data import build_stream
from experiments.train import build_optimizer
from mot.accounting import account
from mot.model import MultimodalTransformer

CONFIGS = Path(__file__).parent.parent / "configs"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench train")
    parser.add_argument("--presets", default="default,mot,moe")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    steps, info = {}, {}
    for name in args.presets.split(","):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        tc = cfg.train
        stream, _ = build_stream(cfg.data).split(cfg.data.val_fraction)
        torch.manual_seed(0)
        model = MultimodalTransformer(cfg.model)
        optimizer = build_optimizer(model, tc)
        generator = torch.Generator().manual_seed(0)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

        def step(model=model, optimizer=optimizer, stream=stream, tc=tc, generator=generator,
                 autocast=autocast):
            batch = stream.sample(tc.batch_size, tc.seq_len, generator)
            with autocast:
                loss = model.loss(batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        steps[name] = step
        targets = stream.modality.float().mean().item()
        fractions = {"text": 1 - targets, "image": targets}
        info[name] = (tc.batch_size * tc.seq_len,
                      account(cfg.model, tc.seq_len, fractions).train_flops_per_token,
                      cfg.model.layers)
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    rounds = time_rounds(steps | {"peak_gemm": lambda: a @ b}, repeats=args.repeats)
    peak = 2 * 2048 ** 3 / statistics.median(rounds["peak_gemm"])
    print(f"training step per preset, {args.dtype}, {torch.get_num_threads()} threads; "
          f"peak GEMM {peak / 1e9:.1f} GFLOP/s")
    print(f"{'preset':<10}{'layers':<8}{'ms/step':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'MFU':>7}"
          f"{'vs first':>10}")
    result, first = {}, next(iter(steps))
    for name in steps:
        tokens, flops, layers = info[name]
        t = statistics.median(rounds[name])
        tps = tokens / t
        mfu = flops * tps / peak
        # paired: the first preset's step time over this one's, within each round (equal
        # tokens per step), then the median over rounds
        vs_first = paired_ratio(rounds, first, name) * tokens / info[first][0]
        result[name] = {"tokens_per_s": round(tps), "mfu": round(mfu, 3),
                        "tokens_per_s_vs_first": round(vs_first, 3)}
        print(f"{name:<10}{layers:<8}{t * 1e3:>9.1f}{tps:>10.0f}{flops * tps / 1e9:>9.1f}"
              f"{mfu:>7.1%}{vs_first:>10.3f}")
    print(json.dumps(result))
    return 0
