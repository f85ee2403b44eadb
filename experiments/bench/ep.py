"""Expert parallelism: one MoE FFN, forward + backward, on 2 gloo processes vs one process.

    python -m experiments.bench ep [--tokens 4096 --dim 512 --hidden 1024 --experts 8 --top-k 2]

Each of the P processes holds E/P experts and routes its own `--tokens` tokens (one thread
each); the one-process variant runs the whole layer on all P x tokens with P threads, so both
do the same work on the same cores. Rounds alternate the two, separated by barriers. Also
prints the dispatcher's payload bytes against the analytic minimum, counted independently from
the routing: 2 directions x (token, rank) pairs whose rank is not the token's own x D x element
size. On CPU the timing is informative only (gloo moves the bytes through local sockets).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from experiments.distributed import spawn


def _worker(args) -> dict:
    from moe import MoE, MoEConfig
    from moe.parallel import communication, shard_experts

    rank, P = dist.get_rank(), dist.get_world_size()
    N, D = args.tokens, args.dim
    dtype = getattr(torch, args.dtype)
    cfg = MoEConfig(dim=D, hidden=args.hidden, num_experts=args.experts, top_k=args.top_k)
    torch.manual_seed(0)
    whole = MoE(cfg).to(dtype)
    torch.manual_seed(0)
    sharded = shard_experts(MoE(cfg).to(dtype))[0]
    xs = [torch.randn(N, D, generator=torch.Generator().manual_seed(r), dtype=torch.float32)
          .to(dtype) for r in range(P)]
    x_all = torch.cat(xs).requires_grad_()
    x = xs[rank].clone().requires_grad_()

    def step(block, inp):
        inp.grad = None
        block.zero_grad(set_to_none=True)
        block(inp).float().sum().backward()

    # the analytic minimum from the routing alone
    with torch.no_grad():
        expert = torch.topk(sharded.router(x), args.top_k).indices  # (N, k) dropless
    owners = (expert // (args.experts // P)).tolist()
    off_rank_pairs = sum(len(set(row) - {rank}) for row in owners)
    step(sharded, x)
    comm = communication(sharded)
    counts = torch.tensor([comm["bytes"], comm["backward_bytes"], comm["meta_bytes"],
                           off_rank_pairs], dtype=torch.int64)
    dist.all_reduce(counts)
    times = {"ep": [], "one": []}
    for i in range(args.warmup + args.repeats):
        dist.barrier()
        start = time.perf_counter()
        step(sharded, x)
        dist.barrier()
        ep = time.perf_counter() - start
        start = time.perf_counter()
        if rank == 0:
            torch.set_num_threads(P)
            step(whole, x_all)
            torch.set_num_threads(1)
        dist.barrier()
        one = time.perf_counter() - start
        if i >= args.warmup:
            times["ep"].append(ep)
            times["one"].append(one)
    element = x.element_size()
    return dict(times=times, bytes=int(counts[0]), backward_bytes=int(counts[1]),
                meta_bytes=int(counts[2]), minimum=int(counts[3]) * 2 * D * element)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench ep")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096, help="per process")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    P = args.processes
    if args.experts % P:
        parser.error(f"--experts ({args.experts}) must be divisible by --processes ({P})")
    result = spawn(_worker, P, args, timeout=600, wait=3600)[0]
    t = result["times"]
    ratio = statistics.median(a / b for a, b in zip(t["ep"], t["one"]))
    print(f"one MoE FFN, fwd+bwd, {P} x {args.tokens} tokens, D={args.dim}, expert FFN="
          f"{args.hidden}, {args.experts} experts, top-{args.top_k}, dropless, {args.dtype}, "
          f"gloo on CPU")
    print(f"{'variant':<34}{'ms (median)':>12}")
    print(f"{f'EP={P}: {P} processes x 1 thread':<34}{statistics.median(t['ep']) * 1e3:>12.1f}")
    print(f"{f'one process x {P} threads':<34}{statistics.median(t['one']) * 1e3:>12.1f}")
    print(f"payload bytes forward {result['bytes']:,} (analytic minimum {result['minimum']:,}), "
          f"backward {result['backward_bytes']:,}, metadata {result['meta_bytes']:,}")
    print(json.dumps({"ep_over_one_process": round(ratio, 3),
                      "bytes_over_minimum": round(result["bytes"] / max(result["minimum"], 1), 6),
                      "backward_bytes_over_minimum":
                          round(result["backward_bytes"] / max(result["minimum"], 1), 6)}))
    return 0
