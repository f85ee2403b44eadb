"""Does the data loader keep up with training? Loader throughput vs one training step.

    python -m experiments.bench data [--config GRID] [--variants dense,mot] [--repeats 9]
        [--batches 200] [key=value ...]

The training loop draws its micro-batches inline (`TokenStream.sample`, no worker processes),
so every millisecond of loading adds to every step. This times the loader alone (batches/s and
tokens/s at the ablation's batch size and sequence length) on two copies of the training split
of the ablation's data: the stream `build_stream` returns, and the same stream written in the
packed on-disk format and read back with `TokenStream.load`, the path user data takes. In the
same rounds it times one training step (forward, backward, AdamW) of every variant of the
ablation grid (default: experiments/configs/ablations/default.yaml, digits corpus) on a
pre-drawn batch, and reports the loader's time per step as a share of the step (median over
rounds of the within-round ratio). The target is a share < 5% for every variant. The digits
corpus is built and cached under `data.cache_dir` on the first run (about a minute).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from experiments.ablate import DEFAULT_GRID, load_grid, overrides_of
from experiments.bench import time_rounds
from experiments.config import RunConfig, check, load_config
from experiments.data import TokenStream, build_stream
from experiments.train import build_optimizer
from mot.model import Batch, MultimodalTransformer

TARGET = 0.05  # loader time per step over step time


def draw(stream: TokenStream, tc, generator: torch.Generator, steps: int) -> list[Batch]:
    """The micro-batches of `steps` training steps, drawn as experiments.train draws them."""
    return [stream.sample(tc.batch_size, tc.seq_len, generator)
            for _ in range(steps * tc.accumulate)]


def streams(data_cfg, folder: Path) -> tuple[dict[str, TokenStream], float]:
    """Training splits of the data: as built, and packed into `folder` then loaded back;
    and the seconds `TokenStream.load` took."""
    built = build_stream(data_cfg)
    built.save(folder)
    start = time.perf_counter()
    packed = TokenStream.load(folder)
    load_s = time.perf_counter() - start
    return {"in-memory": built.split(data_cfg.val_fraction)[0],
            "packed": packed.split(data_cfg.val_fraction)[0]}, load_s


def train_step(cfg: RunConfig, batches: list[Batch]):
    """One optimizer step of cfg's model on `batches` (its micro-batches), as in training."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = MultimodalTransformer(cfg.model)
    optimizer = build_optimizer(model, tc)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.dtype == "bfloat16")

    def step():
        optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            with autocast:
                loss = model.loss(batch).loss
            (loss / len(batches)).backward()
        optimizer.step()

    return step


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench data")
    parser.add_argument("--config", default=str(DEFAULT_GRID), help="ablation grid (YAML)")
    parser.add_argument("--variants", default=None, help="comma-separated; default: all")
    parser.add_argument("--repeats", "--steps", type=int, default=9,
                        help="timed rounds (one training step per variant in each)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, default=200, help="loader batches per round")
    parser.add_argument("overrides", nargs="*", help="dotted key=value applied to every variant")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batches < 1 or args.warmup < 0:
        parser.error("--repeats and --batches must be >= 1, --warmup >= 0")
    try:
        grid = load_grid(Path(args.config))
        names = args.variants.split(",") if args.variants else list(grid["variants"])
        unknown = sorted(set(names) - set(grid["variants"]))
        check(not unknown, f"--variants: unknown {unknown}; valid: {list(grid['variants'])}")
        cfgs = {n: load_config(grid["base"], overrides_of(grid["variants"][n]) + args.overrides)
                for n in names}
        first = cfgs[names[0]]
        shape = lambda c: (c.train.batch_size, c.train.seq_len, c.train.accumulate)  # noqa: E731
        check(all(shape(c) == shape(first) and c.data == first.data for c in cfgs.values()),
              "the variants must share data, batch size, sequence length and accumulation")
    except ValueError as e:
        parser.error(str(e))
    data, tc = first.data, first.train
    if data.name == "digits":
        from experiments.data.digits import cache_folder

        if not (cache_folder(data) / "index.json").is_file():
            print(f"building the digits corpus into {cache_folder(data)} (first run only)")
    with tempfile.TemporaryDirectory() as tmp:
        loaders, load_s = streams(data, Path(tmp) / "packed")
        for cfg in cfgs.values():
            loaders["in-memory"].check_fits(cfg.model, tc.seq_len)
        batches = draw(loaders["in-memory"], tc, torch.Generator().manual_seed(tc.seed), 1)
        fns = {}
        for name, stream in loaders.items():
            generator = torch.Generator().manual_seed(tc.seed)
            fns[name] = lambda s=stream, g=generator: draw(s, tc, g, args.batches)
        fns |= {name: train_step(cfg, batches) for name, cfg in cfgs.items()}
        rounds = time_rounds(fns, repeats=args.repeats, warmup=args.warmup)

    tokens = tc.batch_size * tc.seq_len  # per micro-batch, as training counts them
    per_step = {n: [t * tc.accumulate / args.batches for t in rounds[n]] for n in loaders}
    print(f"data loader vs training step: {data.name} ({len(loaders['in-memory'].tokens):,} "
          f"training tokens), batch {tc.batch_size} x {tc.seq_len}"
          f"{f' x {tc.accumulate} micro-batches' if tc.accumulate > 1 else ''}, "
          f"{torch.get_num_threads()} threads, {args.repeats} rounds of {args.batches} batches; "
          f"TokenStream.load {load_s * 1e3:.1f} ms")
    result = {}
    for name in loaders:
        t = statistics.median(rounds[name]) / args.batches
        key = "loader" if name == "in-memory" else "packed_loader"
        result[f"{key}_tokens_per_s"] = round(tokens / t)
        result[f"{key}_batches_per_s"] = round(1 / t, 1)
        print(f"  loader {name:<10} {t * 1e3:7.3f} ms/batch {1 / t:9.0f} batches/s "
              f"{tokens / t:12,.0f} tokens/s")
    print(f"{'variant':<10}{'step ms':>9}" + "".join(
        f"{f'{n} load ms':>19}{'share':>8}" for n in loaders))
    shares = {}
    for name in cfgs:
        step = rounds[name]
        shares[name] = {n: statistics.median(x / y for x, y in zip(per_step[n], step))
                        for n in loaders}
        print(f"{name:<10}{statistics.median(step) * 1e3:>9.1f}" + "".join(
            f"{statistics.median(per_step[n]) * 1e3:>19.3f}{shares[name][n]:>8.3%}"
            for n in loaders))
    worst = max(max(s.values()) for s in shares.values())
    met = worst < TARGET
    print(f"target: loader < {TARGET:.0%} of every step: {'met' if met else 'NOT met'} "
          f"(largest share {worst:.3%})")
    result["loader_share_of_step_max"] = float(f"{worst:.4g}")
    for name in cfgs:  # per variant, the slower of the two loaders
        result[f"loader_share_of_step_{name}"] = float(f"{max(shares[name].values()):.4g}")
    result["target_met"] = met
    print(json.dumps(result))
    return 0
