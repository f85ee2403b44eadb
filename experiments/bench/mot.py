"""Forward + backward of one transformer block: dense vs MoT (ours) vs the mask-loop MoT.

    python -m experiments.bench mot [--batch 4 --seq 1024 --dim 512 --heads 8 --hidden 2048]

Tokens of 3 modalities are interleaved in runs (as in real documents). All variants share the
causal mask, rotary tables, dtype and thread count. MoT's block takes its input as the backbone
holds it between layers, rows grouped by modality; its time includes building the grouping
(which a full model amortises over all layers). Every call starts with no parameter gradients
(`zero_grad(set_to_none=True)`), as a training step does. MoT is timed in two rotations: against
dense (`mot_vs_dense`), then against the mask loop (`mot_vs_maskloop`); in one shared rotation
the mask loop's half-precision products, which meet new shapes on every call, slowed the dense
calls after them more than MoT's (bfloat16 MoT / dense read 1.04-1.09 there, 1.09-1.13 apart).

`--layouts fresh` (the default) gives every call a new batch with its own modality layout, so
group sizes change from call to call as between training steps (every variant sees the same
batches in the same order); `--layouts fixed` repeats one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch

from experiments.bench import paired_ratio, time_rounds, warmup_calls
from experiments.bench.maskloop import MaskLoopMoTLayer
from moe.grouping import Grouping
from mot.attention import build_mask
from mot.config import ModelConfig
from mot.layers import Rotary
from mot.model import TransformerLayer


def interleaved_runs(B: int, T: int, M: int, generator: torch.Generator) -> torch.Tensor:
    """(B, T) modality ids in runs of 16..256 tokens, like interleaved documents."""
    rows = []
    for _ in range(B):
        row: list[int] = []
        while len(row) < T:
            m = int(torch.randint(0, M, (1,), generator=generator))
            row += [m] * int(torch.randint(16, 257, (1,), generator=generator))
        rows.append(row[:T])
    return torch.tensor(rows)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench mot")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls first (default: 8 in float32, 48 in half "
                             "precision, see experiments.bench.WARMUP)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--layouts", choices=("fresh", "fixed"), default="fresh",
                        help="a new modality layout per call, or one layout")
    args = parser.parse_args(argv)
    B, T, M = args.batch, args.seq, 3
    modalities = [{"name": n, "vocab_size": 16} for n in ("text", "image", "audio")]
    common = dict(modalities=modalities, dim=args.dim, n_heads=args.heads, n_layers=1,
                  ffn_hidden=args.hidden, max_seq_len=T)
    dense_cfg = ModelConfig(**common, layers="dense")
    mot_cfg = ModelConfig(**common, layers="mot", blocks={"mot": {"untie": "all"}})
    generator = torch.Generator().manual_seed(0)
    names = args.dtypes.split(",")
    dtypes = [getattr(torch, name) for name in names]
    warmup = {dtype: warmup_calls(args.warmup, dtype) for dtype in dtypes}
    calls = max(warmup.values()) + args.repeats if args.layouts == "fresh" else 1
    layouts = [interleaved_runs(B, T, M, generator) for _ in range(calls)]
    masks = [build_mask(dense_cfg.attention, modality, None, []) for modality in layouts]
    positions = torch.arange(T).expand(B, T)
    ratios = {}
    print(f"one block, fwd+bwd, B={B} T={T} D={args.dim} heads={args.heads} "
          f"FFN={args.hidden}, {M} modalities, {args.layouts} layouts, "
          f"{torch.get_num_threads()} threads, warm-up calls "
          + ", ".join(f"{n}: {w}" for n, w in zip(names, warmup.values())))
    print(f"{'dtype':<10}{'dense ms':>10}{'MoT ms':>10}{'mask-loop ms':>14}"
          f"{'MoT/dense':>11}{'MoT/loop':>10}")
    for dtype_name, dtype in zip(names, dtypes):
        torch.manual_seed(0)
        dense = TransformerLayer(dense_cfg, dense_cfg.layer_block(0)).to(dtype)
        mot = TransformerLayer(mot_cfg, mot_cfg.layer_block(0)).to(dtype)
        loop = MaskLoopMoTLayer(M, args.dim, args.heads, args.hidden).to(dtype)
        loop.copy_from(mot)
        rope = Rotary(dense_cfg.head_dim, dense_cfg.rope_theta)(positions, dtype)
        batches = []
        for modality, mask in zip(layouts, masks):
            x = torch.randn(B, T, args.dim, dtype=dtype, requires_grad=True)
            # MoT's residual stream is grouped by modality, as the backbone keeps it
            x_rows = Grouping.from_ids(modality, M).permute(x.detach().view(B * T, -1))
            batches.append((x, x_rows.requires_grad_(), modality, mask))

        def step(fn):
            calls = itertools.count()

            def run():
                x, x_rows, modality, mask = batches[next(calls) % len(batches)]
                x.grad = x_rows.grad = None
                for module in (dense, mot, loop):  # as a training step does
                    module.zero_grad(set_to_none=True)
                fn(x, x_rows, modality, mask).float().square().mean().backward()
            return run

        run_dense = lambda x, x_rows, modality, mask: dense(x, modality, rope, mask)  # noqa: E731
        run_mot = lambda x, x_rows, modality, mask: mot(  # noqa: E731
            x_rows, Grouping.from_ids(modality, M, grouped=True), rope, mask)
        run_loop = lambda x, x_rows, modality, mask: loop(x, modality, rope, mask)  # noqa: E731
        # two rotations, MoT against dense, then MoT against the mask loop: the mask loop's
        # products meet new shapes on every call, and in half precision the kernels oneDNN
        # compiles for them crowd its primitive cache and slow the calls after them. Its row
        # counts are any of 1..B*T (no whole blocks), so no warm-up reaches its steady state:
        # the second rotation keeps the short one.
        rounds = time_rounds({"dense": step(run_dense), "mot": step(run_mot)},
                             repeats=args.repeats, warmup=warmup[dtype])
        loop_rounds = time_rounds({"mot": step(run_mot), "maskloop": step(run_loop)},
                                  repeats=args.repeats, warmup=min(warmup[dtype], 8))
        t = {name: statistics.median(ts) for name, ts in rounds.items()}
        t["maskloop"] = statistics.median(loop_rounds["maskloop"])
        ratios[dtype_name] = {
            "mot_vs_dense": round(paired_ratio(rounds, "mot", "dense"), 3),
            "mot_vs_maskloop": round(paired_ratio(loop_rounds, "mot", "maskloop"), 3)}
        print(f"{dtype_name:<10}{t['dense'] * 1e3:>10.1f}{t['mot'] * 1e3:>10.1f}"
              f"{t['maskloop'] * 1e3:>14.1f}{ratios[dtype_name]['mot_vs_dense']:>11.3f}"
              f"{ratios[dtype_name]['mot_vs_maskloop']:>10.3f}")
    print(json.dumps(ratios))
    return 0
