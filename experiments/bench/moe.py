"""Forward + backward of one MoE FFN: ours vs dense SwiGLU of the same active FLOPs vs HF Mixtral.

    python -m experiments.bench moe [--tokens 4096 --dim 512 --hidden 1024 --experts 8 --top-k 2]

Dropless top-k routing. The dense baseline is a plain SwiGLU of three `nn.Linear` with
intermediate size k * hidden (the same expert FLOPs per token: the practical limit). The
HuggingFace `MixtralSparseMoeBlock` (from `transformers`, a test/benchmark extra) runs with its
`eager` and `grouped_mm` expert implementations and the same weights as ours (loaded with
`moe.interop.from_hf`), so every MoE variant routes identically. Ours includes its load-balancing
and z-losses (defaults); HF's block computes none. Every call starts with no parameter gradients
(`zero_grad(set_to_none=True)`), as a training step does. Ours is timed in two rotations: against
dense (`moe_vs_dense`), then against the HF paths (`moe_vs_hf_best`); in one shared rotation the
HF paths, whose per-expert products meet new shapes on every call in half precision, slowed the
calls that followed them (bfloat16 `moe_vs_dense` 1.28 there against 1.17 alone).

`--routing fresh` (the default) feeds every call a new batch, so expert group sizes change from
call to call as they do between training steps (every variant sees the same batches in the same
order); `--routing fixed` repeats one batch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch

from experiments.bench import paired_ratio, time_rounds, warmup_calls
from moe.interop import from_hf
from moe.layers import SwiGLU


def hf_mixtral(dim: int, hidden: int, experts: int, top_k: int, implementation: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=dim, intermediate_size=hidden, num_local_experts=experts,
                           num_experts_per_tok=top_k)
    config._experts_implementation = implementation
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=dim ** -0.5)
    return block


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench moe")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls first (default: 8 in float32, 48 in half "
                             "precision, see experiments.bench.WARMUP)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--routing", choices=("fresh", "fixed"), default="fresh",
                        help="a new batch per call (group sizes change), or one batch")
    args = parser.parse_args(argv)
    N, D, H, E, k = args.tokens, args.dim, args.hidden, args.experts, args.top_k
    try:
        import transformers  # noqa: F401
        hf_impls = ["eager", "grouped_mm"]
    except ImportError:
        print("transformers is not installed: HF baselines skipped "
              "(pip install -e '.[dev]')")
        hf_impls = []
    print(f"one MoE FFN, fwd+bwd, {N} tokens, D={D}, expert FFN={H}, {E} experts, top-{k}, "
          f"dropless, {args.routing} routing, {torch.get_num_threads()} threads")
    columns = ["dense"] + ["moe"] + [f"hf_{i}" for i in hf_impls]
    print(f"{'dtype':<10}" + "".join(f"{c + ' ms':>18}" for c in columns)
          + f"{'moe/dense':>11}{'moe/hf best':>13}")
    ratios = {}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        warmup = warmup_calls(args.warmup, dtype)
        hf = {i: hf_mixtral(D, H, E, k, i).to(dtype) for i in hf_impls}
        if hf:
            ours = from_hf(next(iter(hf.values()))).to(dtype)
            for block in hf.values():  # every MoE variant holds the same weights
                block.load_state_dict(next(iter(hf.values())).state_dict())
        else:
            from moe import MoE, MoEConfig

            ours = MoE(MoEConfig(dim=D, hidden=H, num_experts=E, top_k=k)).to(dtype)
        dense = SwiGLU(D, k * H).to(dtype)
        batches = [torch.randn(1, N, D, dtype=dtype, requires_grad=True)
                   for _ in range(warmup + args.repeats if args.routing == "fresh" else 1)]

        def step(module):
            calls = itertools.count()

            def run():
                x = batches[next(calls) % len(batches)]
                x.grad = None
                module.zero_grad(set_to_none=True)  # as a training step does
                module(x).float().square().mean().backward()
            return run

        # two rotations: ours against dense, then ours against HF's paths, so that the HF
        # paths' per-expert kernels (compiled afresh for new group sizes) do not run between
        # the two timings of the first ratio. HF's row counts are any of 1..N, so no warm-up
        # reaches their steady state in half precision: the second rotation keeps a short one
        rounds = time_rounds({"dense": step(dense), "moe": step(ours)}, repeats=args.repeats,
                             warmup=warmup)
        t = {name: statistics.median(ts) for name, ts in rounds.items()}
        r = {"moe_vs_dense": round(paired_ratio(rounds, "moe", "dense"), 3)}
        if hf:
            hf_rounds = time_rounds({"moe": step(ours)} | {f"hf_{i}": step(block)
                                                          for i, block in hf.items()},
                                    repeats=args.repeats, warmup=min(warmup, 8))
            t |= {name: statistics.median(ts) for name, ts in hf_rounds.items() if name != "moe"}
            best = min((f"hf_{i}" for i in hf_impls), key=t.get)
            r["moe_vs_hf_best"] = round(paired_ratio(hf_rounds, "moe", best), 3)
            r["hf_best"] = best[3:]
        ratios[dtype_name] = r
        print(f"{dtype_name:<10}" + "".join(f"{t[c] * 1e3:>18.1f}" for c in columns)
              + f"{r['moe_vs_dense']:>11.3f}{r.get('moe_vs_hf_best', float('nan')):>13.3f}")
    print(json.dumps(ratios))
    return 0
