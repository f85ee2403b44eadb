"""Compute-matched ablations: train a grid of variants and compare them at equal training FLOPs.

    python -m experiments.ablate [--config experiments/configs/ablations/default.yaml]
        [--out runs/ablation] [--seeds N] [key=value ...]

The grid file names a base run preset, a reference variant and its number of steps, and the
variants as dotted overrides of the base. A variant may also say `match_params: OTHER`: its
`model.ffn_hidden` is then sized (in multiples of 8) so that its total parameters come as close
as possible to variant OTHER's, e.g. a dense baseline as large as MoT in parameters (the sizing
is printed and written into the results). Compute matching ("match: flops"): every variant gets
the reference's training FLOPs (active FLOPs per token x tokens), so its steps are
    steps_v = round(steps_ref * flops_per_token_ref / flops_per_token_v)
at the same batch and sequence length ("match: steps" trains every variant the same steps).
Each run lives in <out>/runs/<variant>-s<seed> and is resumable: a finished variant is not
rerun, an interrupted one continues from its newest checkpoint. TensorBoard logs of all runs
share <out>/tb. At the end <out>/results.md and results.csv hold, per variant: parameters
(total / active), training FLOPs per token, steps, tokens/s, final validation loss per modality
(mean and spread over seeds), the task metrics of the digits corpus, and the MoT paper's headline
metric: the share of the reference's steps (and FLOPs) the variant needs to reach the reference's
validation loss, per modality. The paper uses the reference's final loss; here the target is the
reference's best (lowest) validation loss, which is the final one unless the reference overfits,
as small corpora make it do. Loss curves are written as PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from pathlib import Path

import yaml

from experiments.allocator import keep_freed_memory
from experiments.checkpoint import atomic_write_bytes, atomic_write_text
from experiments.config import check, config_to_dict, load_config, model_dict
from experiments.data import build_stream
from experiments.train import train
from mot.accounting import account

DEFAULT_GRID = Path(__file__).parent / "configs" / "ablations" / "default.yaml"


def load_grid(path: Path) -> dict:
    check(path.is_file(), f"ablation file {str(path)!r} does not exist")
    grid = yaml.safe_load(path.read_text()) or {}
    for key in ("base", "reference", "steps", "variants"):
        check(key in grid, f"ablation file {path}: missing key {key!r}")
    check(isinstance(grid["variants"], dict) and grid["reference"] in grid["variants"],
          f"ablation file {path}: 'reference' ({grid['reference']!r}) must be one of the "
          f"variants {list(grid['variants'])}")
    check(grid.get("match", "flops") in ("flops", "steps"),
          f"ablation file {path}: match ({grid.get('match')!r}) must be 'flops' or 'steps'")
    check(isinstance(grid["steps"], int) and grid["steps"] > 0,
          f"ablation file {path}: steps ({grid['steps']!r}) must be a positive integer")
    grid["base"] = str((path.parent / grid["base"]).resolve())
    return grid


def overrides_of(variant: dict) -> list[str]:
    """{dotted key: value} -> ["key=value", ...] (values written as YAML)."""
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...')}"
            .strip() for k, v in (variant or {}).items()]


def _params(base: str, overrides: list[str]) -> int:
    cfg = load_config(base, overrides)
    return account(cfg.model, cfg.train.seq_len).total_params


def size_to_params(base: str, overrides: list[str], target: int) -> tuple[int, int]:
    """The model.ffn_hidden (a multiple of 8) whose total parameters are closest to `target`,
    and that count. Parameters grow with ffn_hidden, so a bisection finds the crossing."""
    lo, hi = 1, 1
    while _params(base, overrides + [f"model.ffn_hidden={8 * hi}"]) < target:
        lo, hi = hi, hi * 2
        check(hi <= 1 << 16, f"match_params: no model.ffn_hidden reaches {target} parameters")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _params(base, overrides + [f"model.ffn_hidden={8 * mid}"]) < target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda u: abs(_params(base, overrides + [
        f"model.ffn_hidden={8 * u}"]) - target))
    return 8 * best, _params(base, overrides + [f"model.ffn_hidden={8 * best}"])


def plan(grid: dict, extra: list[str]) -> dict[str, dict]:
    """Per variant: its config overrides, FLOPs per token, parameters and matched steps."""
    plans = {}
    variants = grid["variants"]
    for name, variant in variants.items():
        variant = dict(variant or {})
        like = variant.pop("match_params", None)
        overrides = overrides_of(variant) + list(extra)
        plans[name] = {"overrides": overrides, "match_params": like}
    for name, p in plans.items():
        like = p["match_params"]
        if like is not None:
            check(like in plans and plans[like]["match_params"] is None and like != name,
                  f"variants.{name}.match_params ({like!r}) must name another variant "
                  f"without match_params: one of {[n for n in plans if n != name]}")
            target = _params(grid["base"], plans[like]["overrides"])
            hidden, got = size_to_params(grid["base"], p["overrides"], target)
            p["overrides"] = p["overrides"] + [f"model.ffn_hidden={hidden}"]
            p["sized"] = (f"model.ffn_hidden={hidden}: {got / 1e6:.3f}M parameters for "
                          f"{like}'s {target / 1e6:.3f}M")
        p["cfg"] = load_config(grid["base"], p["overrides"])
    ref_cfg = plans[grid["reference"]]["cfg"]
    stream = build_stream(ref_cfg.data)
    fractions = stream.shares()
    for p in plans.values():
        cfg = p["cfg"]
        acc = account(cfg.model, cfg.train.seq_len, fractions, fractions,
                      stream.span_len(cfg.model))
        p["flops_per_token"] = acc.train_flops_per_token
        p["params"], p["active_params"] = acc.total_params, acc.active_params
        p["tokens_per_step"] = cfg.train.batch_size * cfg.train.seq_len * cfg.train.accumulate
    ref = plans[grid["reference"]]
    budget = grid["steps"] * ref["flops_per_token"] * ref["tokens_per_step"]
    for p in plans.values():
        if grid.get("match", "flops") == "flops":
            p["steps"] = max(1, round(budget / (p["flops_per_token"] * p["tokens_per_step"])))
        else:
            p["steps"] = grid["steps"]
        p["train_flops"] = p["steps"] * p["flops_per_token"] * p["tokens_per_step"]
    return plans


def run_variant(name: str, p: dict, seed: int, out: Path, eval_points: int) -> dict:
    run_dir = out / "runs" / f"{name}-s{seed}"
    summary_file = run_dir / "summary.json"
    saved = run_dir / "config.yaml"
    if saved.is_file():
        planned = config_to_dict(p["cfg"])["model"]
        if model_dict(yaml.safe_load(saved.read_text())["model"]) != planned:
            raise ValueError(f"{run_dir} was trained with another model config than variant "
                             f"{name!r} now asks for; use a new --out or delete that folder")
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        if summary.get("steps") == p["steps"]:
            return summary  # finished earlier: not rerun
    steps = p["steps"]
    cfg = load_config(p["cfg_path"], p["overrides"] + [
        f"train.steps={steps}", f"train.seed={seed}", f"train.out_dir={run_dir}",
        f"train.tb_dir={out / 'tb' / f'{name}-s{seed}'}", "train.resume=true",
        f"train.eval_every={max(1, steps // eval_points)}",
        f"train.save_every={max(1, steps // 4)}", f"train.log_every={max(1, steps // 20)}"])
    return train(cfg, progress=True)


def val_curve(summary: dict, modality: str) -> list[tuple[int, float]]:
    return [(r["step"], r[f"val/{modality}"]) for r in summary["history"]
            if f"val/{modality}" in r]


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def task_metrics(run_dir: Path, cfg, images: int, samples: int) -> dict:
    if cfg.data.name != "digits":
        return {}
    from experiments.eval import digits_metrics
    from experiments.run import load_run

    _, model, stream, _ = load_run(run_dir)
    return digits_metrics(model, cfg, stream, images, samples, seed=0)


def write_plots(out: Path, summaries: dict[str, list[dict]], plans: dict, modalities) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(modalities), figsize=(5 * len(modalities), 3.6))
    for ax, modality in zip(axes if len(modalities) > 1 else [axes], modalities):
        for name, runs in summaries.items():
            per_token = plans[name]["flops_per_token"] * plans[name]["tokens_per_step"]
            curve = val_curve(runs[0], modality)
            ax.plot([s * per_token / 1e12 for s, _ in curve], [v for _, v in curve],
                    label=name, marker=".")
        ax.set_title(f"validation loss: {modality}")
        ax.set_xlabel("training TFLOPs")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out / "loss_curves.png", buffer.getvalue())


def ablate(grid: dict, out: Path, seeds: int, extra: list[str], eval_points: int = 25,
           images: int = 30, samples: int = 2) -> list[dict]:
    plans = plan(grid, extra)
    ref = grid["reference"]
    summaries: dict[str, list[dict]] = {}
    for name, p in plans.items():
        p["cfg_path"] = grid["base"]
        print(f"== {name}: {p['steps']} steps, {p['flops_per_token'] / 1e6:.2f} MFLOP/token, "
              f"{p['params'] / 1e6:.2f}M params ({p['active_params'] / 1e6:.2f}M active)"
              + (f"; sized {p['sized']}" if "sized" in p else ""))
        summaries[name] = [run_variant(name, p, seed, out, eval_points) for seed in range(seeds)]
    modalities = plans[ref]["cfg"].model.modality_names
    # the reference's best validation loss (its final one unless it overfits late in training)
    targets = {m: statistics.mean(min(v for _, v in val_curve(s, m)) for s in summaries[ref])
               for m in modalities if m in summaries[ref][0]["val_loss"]}
    rows = []
    for name, runs in summaries.items():
        p = plans[name]
        row = {"variant": name, "params": p["params"], "active_params": p["active_params"],
               "flops_per_token": p["flops_per_token"], "steps": p["steps"],
               "train_flops": p["train_flops"],
               "tokens_per_s": statistics.mean(s["tokens_per_s"] for s in runs)}
        for m, target in targets.items():
            if any(m not in s["val_loss"] for s in runs):  # e.g. continuous: not softmax-scored
                row[f"val_{m}"] = row[f"val_{m}_spread"] = None
                row[f"steps_to_ref_{m}"] = row[f"flops_to_ref_{m}"] = None
                continue
            mean, spread = mean_spread([s["val_loss"][m] for s in runs])
            row[f"val_{m}"], row[f"val_{m}_spread"] = mean, spread
            reached = steps_to_reach(val_curve(runs[0], m), target)
            ref_steps = plans[ref]["steps"]
            row[f"steps_to_ref_{m}"] = None if reached is None else reached / ref_steps
            row[f"flops_to_ref_{m}"] = None if reached is None else (
                reached * p["flops_per_token"] * p["tokens_per_step"] / plans[ref]["train_flops"])
        row |= task_metrics(out / "runs" / f"{name}-s0", p["cfg"], images, samples)
        rows.append(row)
    sizing = [f"- `{name}` sized to match parameters: {p['sized']}" for name, p in plans.items()
              if "sized" in p]
    write_results(out, rows, targets, grid, seeds, sizing)
    write_plots(out, summaries, plans, list(targets))
    return rows


def _fmt(value, digits=3) -> str:
    if value is None:
        return "not reached"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_results(out: Path, rows: list[dict], targets: dict, grid: dict, seeds: int,
                  notes: list[str] = ()) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in columns})
    atomic_write_text(out / "results.csv", buffer.getvalue())
    ref = grid["reference"]
    lines = ["# Ablation results\n",
             f"Matched by {grid.get('match', 'flops')} to `{ref}` ({grid['steps']} steps); "
             f"{seeds} seed(s). Share of `{ref}` steps / FLOPs needed to reach its best "
             f"validation loss: lower is better.\n"]
    head = ["variant", "params (M, total / active)", "MFLOP/token", "steps", "tokens/s"]
    head += [f"val {m}" for m in targets] + [f"steps / FLOPs to {ref} {m}" for m in targets]
    extra = [k for k in ("caption_accuracy", "generation_accuracy", "transcription_accuracy")
             if any(row.get(k) is not None for row in rows)]
    head += extra
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for row in rows:
        cells = [row["variant"], f"{row['params'] / 1e6:.2f} / {row['active_params'] / 1e6:.2f}",
                 f"{row['flops_per_token'] / 1e6:.2f}", str(row["steps"]),
                 f"{row['tokens_per_s']:.0f}"]
        for m in targets:
            spread = row[f"val_{m}_spread"]
            if row[f"val_{m}"] is None:
                cells.append("n/a")
                continue
            cells.append(f"{row[f'val_{m}']:.3f}" + (f" ± {spread:.3f}" if seeds > 1 else ""))
        for m in targets:
            if row[f"val_{m}"] is None:
                cells.append("n/a")
                continue
            cells.append(f"{_fmt(row[f'steps_to_ref_{m}'], 2)} / "
                         f"{_fmt(row[f'flops_to_ref_{m}'], 2)}")
        cells += ["n/a" if row.get(k) is None else _fmt(row[k]) for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    if seeds > 1:
        lines.append("")
        for m in targets:
            ref_row = next(r for r in rows if r["variant"] == ref)
            for row in rows:
                if row[f"val_{m}"] is None:
                    continue
                gap = abs(row[f"val_{m}"] - ref_row[f"val_{m}"])
                noise = max(row[f"val_{m}_spread"], ref_row[f"val_{m}_spread"])
                if row is not ref_row and gap <= noise:
                    lines.append(f"- {row['variant']} vs {ref} on {m}: the difference "
                                 f"({gap:.3f}) is within the seed spread ({noise:.3f})")
    if notes:
        lines += [""] + list(notes)
    lines.append("\n![validation loss curves](loss_curves.png)\n")
    atomic_write_text(out / "results.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    parser = argparse.ArgumentParser(prog="python -m experiments.ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_GRID), help="ablation grid (YAML)")
    parser.add_argument("--out", default="runs/ablation", help="output folder")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--images", type=int, default=30, help="images for caption accuracy")
    parser.add_argument("--samples", type=int, default=2, help="generated images per digit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value applied to every variant")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.images < 1 or args.samples < 1:
        parser.error("--seeds, --images and --samples must be >= 1")
    try:
        grid = load_grid(Path(args.config))
        plan(grid, args.overrides)  # validates every variant's config before any training
    except ValueError as e:
        parser.error(str(e))
    out = Path(args.out)
    ablate(grid, out, args.seeds, args.overrides, images=args.images, samples=args.samples)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
