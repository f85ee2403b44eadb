"""Open a finished (or interrupted) training run: its config, its newest weights, its data."""

from __future__ import annotations

from pathlib import Path

import yaml

from experiments.checkpoint import latest_checkpoint, list_checkpoints
from experiments.config import RunConfig, from_dict
from experiments.data import TokenStream, build_stream
from mot.model import MultimodalTransformer


def load_run(run_dir: str | Path) -> tuple[RunConfig, MultimodalTransformer, TokenStream, int]:
    """(config, model with the newest checkpoint's weights, token stream, step) of a run."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = from_dict(RunConfig, yaml.safe_load(config_file.read_text()))
    model = MultimodalTransformer(cfg.model)
    folders = [p for p in list_checkpoints(run_dir) if p.suffix == ".dcp"]
    state = latest_checkpoint(run_dir)
    if folders and (state is None or folders[-1].stem > f"step_{state['step']:07d}"):
        from experiments import dcp  # a multi-process run's checkpoint, loaded in one process

        step = dcp.load(folders[-1], model)["step"]
    elif state is not None:
        model.load_state_dict(state["model"])
        step = state["step"]
    else:
        raise ValueError(f"{run_dir} has no checkpoint under checkpoints/")
    return cfg, model.eval(), build_stream(cfg.data).aligned_to(cfg.model), step
