"""Routing report of a run's MoE / MoT / hybrid layers.

    python -m experiments.inspect RUN_DIR [--batches 4]

Runs the run's newest weights on validation batches and writes into RUN_DIR/inspect/: per routed
layer a modality x expert load heatmap (PNG), the expert load over training time read back from
the run's TensorBoard log (PNG), and `routing.md`: per layer the dropped-token fraction, router
entropy, load coefficient of variation and the expert-specialisation score (mutual information
between modality and expert, normalised; 1 = each modality has experts of its own).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from experiments.checkpoint import atomic_write_bytes, atomic_write_text
from experiments.run import load_run
from moe.inspect import routing_report


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def heatmap(table, modalities: list[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.array(table, dtype=float)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * counts.shape[1], 1 + 0.5 * counts.shape[0]))
    ax.imshow(shares, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(modalities[:counts.shape[0]])), modalities[:counts.shape[0]])
    ax.set_xticks(range(counts.shape[1]))
    ax.set_xlabel("expert")
    ax.set_title(title, fontsize=9)
    for (i, j), v in np.ndenumerate(shares):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=7)
    fig.tight_layout()
    return _png(fig)


def load_over_time(tb_dir: Path, layer: str) -> bytes | None:
    """Expert token shares over training steps, from the run's TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tb_dir.is_dir():
        return None
    events = EventAccumulator(str(tb_dir)).Reload()
    prefix = f"routing/{layer}/tokens/"
    tags = sorted(t for t in events.Tags()["scalars"] if t.startswith(prefix))
    if not tags:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    for tag in tags:
        points = events.Scalars(tag)
        ax.plot([p.step for p in points], [p.value for p in points], label=tag[len(prefix):])
    ax.set_xlabel("step")
    ax.set_ylabel("share of tokens")
    ax.set_title(f"{layer}: load over training", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _png(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error(f"--batches ({args.batches}) must be >= 1")
    try:
        cfg, model, stream, step = load_run(args.run_dir)
    except ValueError as e:
        parser.error(str(e))
    _, val = stream.split(cfg.data.val_fraction)
    names = cfg.model.modality_names

    def run():
        for i in range(args.batches):
            batch = val.fixed(cfg.train.batch_size, cfg.train.seq_len, i)
            model(batch.tokens[:, :-1], batch.modality[:, :-1], batch.doc[:, :-1])

    report = routing_report(model, run, names)
    out = Path(args.run_dir) / "inspect"
    tb = Path(cfg.train.tb_dir or Path(args.run_dir) / "tb")
    lines = [f"# Routing report (step {step})\n"]
    if not report:
        lines.append("No routed (MoE / MoT) layers in this model.")
    for layer, entry in report.items():
        m = entry["metrics"]
        lines.append(f"## {layer}\n")
        lines.append(f"- tokens per group: {entry['tokens']}")
        for key in ("load_cv", "drop_fraction", "router_entropy", "balance_loss", "z_loss"):
            if key in m:
                lines.append(f"- {key.replace('_', ' ')}: {m[key]:.3f}")
        if "specialisation" in entry:
            lines.append(f"- expert specialisation (normalised modality-expert MI): "
                         f"{entry['specialisation']:.3f}")
            atomic_write_bytes(out / f"{layer}_heatmap.png",
                               heatmap(entry["modality_expert"], names, layer))
            lines.append(f"\n![{layer} modality x expert]({layer}_heatmap.png)")
        curve = load_over_time(tb, layer)
        if curve is not None:
            atomic_write_bytes(out / f"{layer}_load.png", curve)
            lines.append(f"\n![{layer} load over training]({layer}_load.png)")
        lines.append("")
    atomic_write_text(out / "routing.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
