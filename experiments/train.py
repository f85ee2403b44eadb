"""Train a multimodal transformer on a token stream.

    python -m experiments.train [--config PATH] [key=value ...]

Logs the total and per-modality losses and the routing statistics to TensorBoard
(`<out_dir>/tb`), shows a progress bar with tokens/s, evaluates on the held-out split every
`train.eval_every` steps, and writes the config, rotating checkpoints (`checkpoints/`) and
`summary.json` to `train.out_dir`, each atomically. `train.resume=true` continues from the newest
checkpoint, bit for bit as if never interrupted.

Several processes (CPU with gloo, GPUs with NCCL), experts sharded over `train.ep` of them:

    torchrun --nproc_per_node 4 -m experiments.train train.ep=2

Each rank trains on its own `train.accumulate` micro-batches of `train.batch_size` sequences (a
step sees world x accumulate x batch_size sequences); only rank 0 logs and writes; checkpoints are
`torch.distributed.checkpoint` folders that load under any other `train.ep` (see
experiments/distributed.py and experiments/dcp.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from experiments import dcp
from experiments import distributed as dist
from experiments.allocator import keep_freed_memory
from experiments.checkpoint import (
    atomic_write_text,
    checkpoint_dir,
    list_checkpoints,
    rotate,
    save_checkpoint,
)
from experiments.config import RunConfig, TrainConfig, config_to_dict, load_config, model_dict
from experiments.data import TokenStream, build_stream
from moe.moe import update_biases
from moe.parallel import communication, shard_experts
from moe.stats import collect, summarize
from mot.accounting import account
from mot.model import MultimodalTransformer

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then decay to `lr * min_lr_ratio` at the last step: cosine, or
    exponential (`lr * min_lr_ratio ** progress`)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min((step - cfg.warmup) / max(1, cfg.steps - cfg.warmup), 1.0)
    if cfg.schedule == "exponential":
        return cfg.lr * cfg.min_lr_ratio ** progress
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused kernel), weight decay on matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), fused=True)


@torch.no_grad()
def evaluate(model: MultimodalTransformer, stream: TokenStream, cfg: TrainConfig,
             par: dist.Parallel | None = None) -> dict:
    """Token-weighted mean loss per modality over fixed validation windows (split over the
    ranks of a multi-process run; a rank with one window fewer runs its last one again
    without counting it, so every rank makes the same collective calls)."""
    par = par or dist.Parallel()
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    windows = list(range(par.rank, cfg.eval_batches, par.world))
    for j in range(math.ceil(cfg.eval_batches / par.world)):
        i = windows[min(j, len(windows) - 1)] if windows else 0
        out = model.loss(stream.fixed(cfg.batch_size, cfg.seq_len, i).to(cfg.device))
        if j >= len(windows):
            continue
        for name, value in out.per_modality.items():
            sums[name] = sums.get(name, 0.0) + float(value) * out.tokens[name]
            counts[name] = counts.get(name, 0) + out.tokens[name]
    model.train()
    if par.enabled:
        names = model.cfg.modality_names
        totals = dist.mean_over_ranks({**{f"s/{n}": sums.get(n, 0.0) for n in names},
                                       **{f"c/{n}": counts.get(n, 0) for n in names}}, par)
        sums = {n: totals[f"s/{n}"] for n in names if totals[f"c/{n}"] > 0}
        counts = {n: totals[f"c/{n}"] for n in sums}
    return {name: sums[name] / counts[name] for name in sums}


def log_routing(writer, model: MultimodalTransformer, step: int,
                par: dist.Parallel | None = None, steps: int = 1) -> dict:
    """Write each routed block's metrics since the last call to TensorBoard (token shares per
    modality or expert, load CV, drop fraction, router entropy, modality x expert shares), e.g.
    `routing/layers.0.ffn/tokens/image`, then reset the counters. In a multi-process run the
    counters of all ranks are added up first (every rank calls this; rank 0 writes), and the
    expert-parallel bytes sent per step (over the `steps` since the last call, all ranks) are
    logged under `comm/`: payload forward and backward, its analytic minimum, metadata."""
    par = par or dist.Parallel()
    names = dict(model.named_modules())
    modalities = model.cfg.modality_names
    stats = dist.sum_over_ranks(collect(model), par)
    comm = dist.sum_counts(communication(model), par)
    if writer is None:
        return stats
    for key, value in comm.items():
        writer.add_scalar(f"comm/{key}_per_step", value / steps, step)
    for layer, counters in stats.items():
        by_modality = getattr(names[layer], "modality_indexed", False)
        metrics = summarize(counters, modalities if by_modality else None, modalities)
        for key, value in metrics.items():
            writer.add_scalar(f"routing/{layer}/{key}", value, step)
    return stats


class NonFiniteError(FloatingPointError):
    """A NaN or inf loss or gradient, with the step it happened at."""


def _restore(model, optimizer, generator, out_dir: Path, cfg: RunConfig,
             par: dist.Parallel) -> tuple[int, list]:
    """Load the newest checkpoint of out_dir (model, optimizer, data position, RNG); returns the
    step to continue from and the loss history up to it. Either format loads under any number
    of processes and any `train.ep`. Refuses a different model config."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            state = dcp.read_meta(path) if path.suffix == ".dcp" else \
                torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # a damaged file: fall back to the one before
            continue
        break
    else:
        return 0, []
    saved = model_dict(state["config"]["model"])
    current = config_to_dict(cfg)["model"]
    if saved != current:
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        raise ValueError(f"train.resume: the checkpoint in {out_dir} was trained with a "
                         f"different model config (fields {diff})")
    if path.suffix == ".dcp":
        dcp.load(path, model, optimizer, par.rank, par.world)
    elif par.enabled:
        dcp.load_unsharded(state, model, optimizer)
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    generator.set_state(state["generator"])
    return state["step"], state["history"]


def _save(out_dir: Path, done: int, model, optimizer, generator, cfg: RunConfig, history,
          par: dist.Parallel) -> None:
    meta = {"step": done, "generator": generator.get_state(), "config": config_to_dict(cfg),
            "history": history}
    if not par.enabled:
        save_checkpoint(out_dir, done, {**meta, "model": model.state_dict(),
                                        "optimizer": optimizer.state_dict(),
                                        "torch_rng": torch.get_rng_state()},
                        cfg.train.keep_checkpoints)
        return
    folder = checkpoint_dir(out_dir) / f"step_{done:07d}.dcp"
    dcp.save(folder, model, optimizer, {**meta, "world": par.world}, par.rank)
    if par.is_main:
        rotate(out_dir, cfg.train.keep_checkpoints)


def _moe_blocks(model):
    from moe.moe import MoE

    return [m for m in model.modules() if isinstance(m, MoE)]


def train(cfg: RunConfig, progress: bool = True) -> dict:
    """Run (or resume) one training job; returns the summary also written to `summary.json`.

    The summary's "history" holds one record per step (loss, per-modality losses, lr, grad
    norm); resuming from a checkpoint reproduces an uninterrupted run's records bit for bit.
    Under torchrun every rank calls this; a failed or silent peer raises `PeerFailure` within
    `train.timeout` seconds."""
    tc = cfg.train
    par = dist.init(tc.ep, tc.timeout, tc.device)
    with dist.guard(par):
        return _train(cfg, par, progress)


def _train(cfg: RunConfig, par: dist.Parallel, progress: bool) -> dict:
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    tc = cfg.train
    device = tc.device
    if par.enabled and torch.device(device).type == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    # every rank builds (or reads the cache of) the same data
    stream = build_stream(cfg.data).aligned_to(cfg.model)
    stream.check_fits(cfg.model, tc.seq_len)
    train_stream, val_stream = stream.split(cfg.data.val_fraction)
    if len(val_stream.tokens) <= tc.seq_len + 1:
        raise ValueError(f"train.seq_len ({tc.seq_len}) must be < the validation part of the "
                         f"data ({len(val_stream.tokens)} tokens)")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    model = MultimodalTransformer(cfg.model).to(device)
    if par.ep > 1:
        shard_experts(model, par.ep_group)
    optimizer = build_optimizer(model, tc)
    if model.frozen is not None:
        model.frozen.attach(optimizer)
    for block in _moe_blocks(model):  # auxiliary losses on the same scale as the main loss
        block.aux_loss_scale = 1.0 / tc.accumulate
    generator = torch.Generator().manual_seed(tc.seed)
    out_dir = Path(tc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start_step, history = _restore(model, optimizer, generator, out_dir, cfg, par) \
        if tc.resume else (0, [])
    acc = account(cfg.model, tc.seq_len, stream.shares(), stream.shares(),
                  stream.span_len(cfg.model))
    writer = None
    if par.is_main:
        atomic_write_text(out_dir / "config.yaml",
                          yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        writer = SummaryWriter(tc.tb_dir or str(out_dir / "tb"),
                               purge_step=start_step + 1 if start_step else None)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=tc.dtype == "bfloat16")
    val, skipped = {}, 0
    sequences = tc.batch_size * tc.accumulate * par.world  # per step, all ranks
    bar = tqdm(range(start_step, tc.steps), initial=start_step, total=tc.steps,
               disable=not (progress and par.is_main), dynamic_ncols=True, file=sys.stdout,
               mininterval=1.0)
    start = time.perf_counter()
    last_log = start_step
    for step in bar:
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        # every rank draws the step's world x accumulate micro-batches, keeps its own
        batches = [train_stream.sample(tc.batch_size, tc.seq_len, generator)
                   for _ in range(tc.accumulate * par.world)]
        mine = batches[par.rank * tc.accumulate:(par.rank + 1) * tc.accumulate]
        lm_loss, per_modality, finite = 0.0, {}, True
        for batch in mine:
            with autocast:
                out = model.loss(batch.to(device))
            finite = bool(torch.isfinite(out.loss))
            if par.enabled:  # all ranks skip the backward together, or none does
                finite = dist.mean_over_ranks({"finite": float(finite)}, par)["finite"] == 1.0
            if not finite:
                break
            (out.loss / tc.accumulate).backward()
            lm_loss += out.lm_loss.item() / tc.accumulate
            for name, value in out.per_modality.items():
                per_modality[name] = per_modality.get(name, 0.0) + float(value) / tc.accumulate
        if finite:
            dist.reduce_gradients(model, par)
            grad_norm = dist.clip_grad_norm(model, tc.grad_clip or math.inf, par)
        else:
            grad_norm = torch.tensor(float("nan"))
        if not finite or not torch.isfinite(grad_norm):
            what = "loss" if not finite else "gradient norm"
            if tc.nonfinite == "abort":
                raise NonFiniteError(f"non-finite {what} at step {step + 1}; set "
                                     "train.nonfinite=skip to drop such steps instead")
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            history.append({"step": step + 1, "skipped": what})
            continue
        optimizer.step()
        dist.sum_expert_load(model, par)
        update_biases(model)
        if par.enabled:
            means = dist.mean_over_ranks({"loss": lm_loss, **per_modality}, par)
            lm_loss = means.pop("loss")
            per_modality = means
        record = {"step": step + 1, "loss": lm_loss, "lr": lr, "grad_norm": float(grad_norm),
                  **{f"loss/{k}": v for k, v in per_modality.items()}}
        history.append(record)
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            tokens_per_s = (done - start_step) * sequences * tc.seq_len / \
                (time.perf_counter() - start)
            log_routing(writer, model, done, par, done - last_log)
            last_log = done
            if writer is not None:
                for key, value in record.items():
                    if key != "step":
                        writer.add_scalar(f"train/{key}", value, done)
                writer.add_scalar("train/tokens_per_s", tokens_per_s, done)
            bar.set_postfix_str(" ".join([f"loss {record['loss']:.3f}"] + [
                f"{k[5:]} {v:.3f}" for k, v in record.items() if k.startswith("loss/")]
                + [f"{tokens_per_s:,.0f} tok/s"]))
        if done % tc.eval_every == 0 or done == tc.steps:
            val = evaluate(model, val_stream, tc, par)
            if writer is not None:
                for name, value in val.items():
                    writer.add_scalar(f"val/loss/{name}", value, done)
            history.append({"step": done, **{f"val/{k}": v for k, v in val.items()}})
        if done % tc.save_every == 0 or done == tc.steps:
            _save(out_dir, done, model, optimizer, generator, cfg, history, par)
    if writer is not None:
        writer.close()
    elapsed = time.perf_counter() - start
    steps_run = max(tc.steps - start_step, 1)
    last = next((r for r in reversed(history) if "loss" in r), {"loss": float("nan")})
    summary = {"steps": tc.steps, "final_train_loss": last["loss"], "val_loss": val,
               "skipped_steps": skipped + sum(1 for r in history[:start_step] if "skipped" in r),
               "tokens_per_s": steps_run * sequences * tc.seq_len / elapsed,
               "processes": par.world, "expert_parallel": par.ep,
               "params": acc.total_params, "active_params": acc.active_params,
               "train_flops_per_token": acc.train_flops_per_token, "history": history}
    if par.is_main:
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    dist.barrier(par)
    return summary


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    parser = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML preset")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        parser.error(str(e))
    try:
        summary = train(cfg)
    except dist.PeerFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a setting that does not fit the launch (e.g. train.ep)
        parser.error(str(e))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
