"""The ablation runner: compute matching, results files, resumability, clear errors."""

import csv
import math
from pathlib import Path

import pytest

from experiments.ablate import ablate, load_grid, overrides_of, plan, steps_to_reach
from experiments.config import load_config

GRIDS = Path(__file__).parent.parent / "experiments" / "configs" / "ablations"
TINY = ["model.dim=32", "model.n_layers=2", "data.num_tokens=6000", "train.batch_size=2",
        "train.seq_len=32"]


def test_compute_matching_gives_equal_training_flops():
    grid = load_grid(GRIDS / "smoke.yaml")
    grid["variants"]["wide"] = {"model.layers": "dense", "model.ffn_hidden": 256}
    plans = plan(grid, TINY)
    ref = plans["dense"]
    assert ref["steps"] == 12
    budget = 12 * ref["flops_per_token"] * ref["tokens_per_step"]
    wide = plans["wide"]
    assert wide["flops_per_token"] > ref["flops_per_token"]
    assert wide["steps"] == round(budget / (wide["flops_per_token"] * wide["tokens_per_step"]))
    assert wide["train_flops"] == pytest.approx(budget, rel=0.5 / wide["steps"] + 1e-12)
    assert plans["mot"]["steps"] == 12  # MoT: the same active FLOPs as dense


def test_smoke_grid_end_to_end_and_resume(tmp_path, monkeypatch):
    grid = load_grid(GRIDS / "smoke.yaml")
    rows = ablate(grid, tmp_path, seeds=2, extra=TINY, eval_points=4)
    assert [r["variant"] for r in rows] == ["dense", "mot"]
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and all(math.isfinite(float(r["val_text"])) for r in table)
    best = float(table[0]["steps_to_ref_text"])  # where the reference reaches its best loss
    assert 0 < best <= 1.0
    md = (tmp_path / "results.md").read_text()
    assert "| dense |" in md and "| mot |" in md and " ± " in md  # 2 seeds: mean ± spread
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "tb").iterdir())) == 4  # all runs under one TensorBoard folder

    import experiments.ablate as module

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr(module, "train", must_not_train)
    again = ablate(grid, tmp_path, seeds=2, extra=TINY, eval_points=4)
    assert [r["val_text"] for r in again] == [r["val_text"] for r in rows]


def test_steps_to_reach():
    curve = [(10, 3.0), (20, 2.5), (30, 2.4)]
    assert steps_to_reach(curve, 2.5) == 20 and steps_to_reach(curve, 2.0) is None


def test_overrides_round_trip_through_the_config():
    variant = {"model.layers": "moe", "model.blocks.moe": {"num_experts": 4, "top_k": 1}}
    cfg = load_config(GRIDS.parent / "default.yaml", overrides_of(variant))
    assert cfg.model.layers == "moe" and cfg.model.blocks["moe"].num_experts == 4


@pytest.mark.parametrize("text, message", [
    ("base: ../default.yaml\nreference: x\nsteps: 5\nvariants: {a: {}}", "'reference'"),
    ("base: ../default.yaml\nreference: a\nsteps: 0\nvariants: {a: {}}", "steps"),
    ("reference: a\nsteps: 5\nvariants: {a: {}}", "missing key 'base'"),
])
def test_bad_grids(tmp_path, text, message):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_grid(path)


def test_cli_rejects_a_bad_variant_before_training(tmp_path):
    import subprocess
    import sys

    grid = tmp_path / "grid.yaml"
    grid.write_text(f"base: {GRIDS.parent / 'default.yaml'}\nreference: a\nsteps: 3\n"
                    "variants: {a: {model.n_heads: 3}}")
    result = subprocess.run([sys.executable, "-m", "experiments.ablate", "--config", str(grid),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 2 and "n_heads (3) must divide dim (128)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_changed_variant_is_not_mistaken_for_a_finished_one(tmp_path):
    grid = load_grid(GRIDS / "smoke.yaml")
    ablate(grid, tmp_path, seeds=1, extra=TINY, eval_points=2)
    grid["variants"]["mot"] = {"model.layers": "mot", "model.blocks.mot": {"untie": "ffn"}}
    with pytest.raises(ValueError, match="was trained with another model config"):
        ablate(grid, tmp_path, seeds=1, extra=TINY, eval_points=2)


def test_match_params_sizes_the_ffn_to_the_closest_parameter_count():
    from experiments.ablate import _params

    grid = load_grid(GRIDS / "smoke.yaml")
    grid["variants"]["dense_as_mot"] = {"model.layers": "dense", "match_params": "mot"}
    plans = plan(grid, TINY)
    target = plans["mot"]["params"]
    sized = plans["dense_as_mot"]
    hidden = sized["cfg"].model.ffn_hidden
    assert hidden % 8 == 0 and sized["params"] > plans["dense"]["params"]
    base = sized["overrides"][:-1]  # without the chosen ffn_hidden
    miss = abs(sized["params"] - target)
    for neighbour in (hidden - 8, hidden + 8):  # no other multiple of 8 comes closer
        assert abs(_params(grid["base"], base + [f"model.ffn_hidden={neighbour}"]) - target) \
            >= miss
    assert f"model.ffn_hidden={hidden}" in sized["sized"]
    grid["variants"]["dense_as_mot"]["match_params"] = "nope"
    with pytest.raises(ValueError, match=r"variants.dense_as_mot.match_params \('nope'\) must "
                                         r"name another variant"):
        plan(grid, TINY)


def test_a_variant_without_a_modality_loss_reads_n_a(tmp_path):
    from experiments.ablate import write_results

    grid = {"reference": "dense", "steps": 10}
    rows = [{"variant": "dense", "params": 1e6, "active_params": 1e6, "flops_per_token": 1e6,
             "steps": 10, "tokens_per_s": 5.0, "val_text": 2.0, "val_text_spread": 0.0,
             "val_image": 3.0, "val_image_spread": 0.0, "steps_to_ref_text": 1.0,
             "flops_to_ref_text": 1.0, "steps_to_ref_image": 0.5, "flops_to_ref_image": 0.5,
             "caption_accuracy": 0.5, "generation_accuracy": 0.25},
            {"variant": "continuous", "params": 1e6, "active_params": 1e6,
             "flops_per_token": 1e6, "steps": 10, "tokens_per_s": 5.0, "val_text": 1.9,
             "val_text_spread": 0.0, "val_image": None, "val_image_spread": None,
             "steps_to_ref_text": 0.8, "flops_to_ref_text": 0.8, "steps_to_ref_image": None,
             "flops_to_ref_image": None, "caption_accuracy": 0.75, "generation_accuracy": None}]
    write_results(tmp_path, rows, {"text": 2.0, "image": 3.0}, grid, 1)
    table = (tmp_path / "results.md").read_text().splitlines()
    line = next(row for row in table if row.startswith("| continuous"))
    assert line == ("| continuous | 1.00 / 1.00 | 1.00 | 10 | 5 | 1.900 | n/a | 0.80 / 0.80 | "
                    "n/a | 0.750 | n/a |")
