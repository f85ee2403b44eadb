"""Train a multimodal transformer on a token stream.

    python -m experiments.train [--config PATH] [key=value ...]

Logs the total and per-modality losses to TensorBoard (`<out_dir>/tb`), shows a progress bar
with tokens/s, evaluates on the held-out split every `train.eval_every` steps and writes the
config, a final checkpoint and `summary.json` to `train.out_dir`, each atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml

from experiments.checkpoint import atomic_torch_save, atomic_write_text
from experiments.config import RunConfig, TrainConfig, config_to_dict, load_config
from experiments.data import TokenStream, build_stream
from moe.moe import update_biases
from moe.stats import collect, summarize
from mot.accounting import account
from mot.model import MultimodalTransformer

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused kernel), weight decay on matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), fused=True)


@torch.no_grad()
def evaluate(model: MultimodalTransformer, stream: TokenStream, cfg: TrainConfig) -> dict:
    """Token-weighted mean loss per modality over fixed validation windows."""
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for i in range(cfg.eval_batches):
        out = model.loss(stream.fixed(cfg.batch_size, cfg.seq_len, i).to(cfg.device))
        for name, value in out.per_modality.items():
            sums[name] = sums.get(name, 0.0) + float(value) * out.tokens[name]
            counts[name] = counts.get(name, 0) + out.tokens[name]
    model.train()
    return {name: sums[name] / counts[name] for name in sums}


def log_routing(writer, model: MultimodalTransformer, step: int) -> dict:
    """Write each routed block's metrics since the last call to TensorBoard (token shares per
    modality or expert, load CV, drop fraction, router entropy, modality x expert shares), e.g.
    `routing/layers.0.ffn/tokens/image`, then reset the counters."""
    names = dict(model.named_modules())
    modalities = model.cfg.modality_names
    stats = collect(model)
    for layer, counters in stats.items():
        by_modality = getattr(names[layer], "modality_indexed", False)
        metrics = summarize(counters, modalities if by_modality else None, modalities)
        for key, value in metrics.items():
            writer.add_scalar(f"routing/{layer}/{key}", value, step)
    return stats


def train(cfg: RunConfig, progress: bool = True) -> dict:
    """Run one training job; returns the summary also written to `summary.json`."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    tc = cfg.train
    stream = build_stream(cfg.data)
    stream.check_fits(cfg.model, tc.seq_len)
    train_stream, val_stream = stream.split(cfg.data.val_fraction)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    model = MultimodalTransformer(cfg.model).to(tc.device)
    optimizer = build_optimizer(model, tc)
    if model.frozen is not None:
        model.frozen.attach(optimizer)
    out_dir = Path(tc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    acc = account(cfg.model, tc.seq_len)
    writer = SummaryWriter(str(out_dir / "tb"))
    generator = torch.Generator().manual_seed(tc.seed)
    history, val = [], {}
    bar = tqdm(range(tc.steps), disable=not progress, dynamic_ncols=True, file=sys.stdout,
                mininterval=1.0)
    start = time.perf_counter()
    for step in bar:
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = train_stream.sample(tc.batch_size, tc.seq_len, generator).to(tc.device)
        out = model.loss(batch)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"non-finite loss ({float(out.loss)}) at step {step}")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
        optimizer.step()
        update_biases(model)
        record = {"step": step + 1, "loss": out.lm_loss.item(), "lr": lr,
                  "grad_norm": float(grad_norm),
                  **{f"loss/{k}": float(v) for k, v in out.per_modality.items()}}
        history.append(record)
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            tokens_per_s = (step + 1) * tc.batch_size * tc.seq_len / (time.perf_counter() - start)
            for key, value in record.items():
                if key != "step":
                    writer.add_scalar(f"train/{key}", value, step + 1)
            writer.add_scalar("train/tokens_per_s", tokens_per_s, step + 1)
            log_routing(writer, model, step + 1)
            bar.set_postfix_str(" ".join([f"loss {record['loss']:.3f}"] + [
                f"{k[5:]} {v:.3f}" for k, v in record.items() if k.startswith("loss/")]
                + [f"{tokens_per_s:,.0f} tok/s"]))
        if (step + 1) % tc.eval_every == 0 or step + 1 == tc.steps:
            val = evaluate(model, val_stream, tc)
            for name, value in val.items():
                writer.add_scalar(f"val/loss/{name}", value, step + 1)
    writer.close()
    elapsed = time.perf_counter() - start
    summary = {"steps": tc.steps, "final_train_loss": history[-1]["loss"],
               "val_loss": val, "tokens_per_s": tc.steps * tc.batch_size * tc.seq_len / elapsed,
               "params": acc.total_params, "active_params": acc.active_params,
               "train_flops_per_token": acc.train_flops_per_token}
    atomic_torch_save({"model": model.state_dict(), "config": config_to_dict(cfg),
                       "step": tc.steps}, out_dir / "checkpoint.pt")
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML preset")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        parser.error(str(e))
    summary = train(cfg)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
