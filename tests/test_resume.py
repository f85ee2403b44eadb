"""Checkpoints: bit-exact resume, atomic saves, rotation, non-finite guards, accumulation."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import experiments.checkpoint as checkpoint
from experiments.config import load_config
from experiments.train import DEFAULT_CONFIG, NonFiniteError, train
from mot.model import MultimodalTransformer

ROOT = Path(__file__).parent.parent
SMALL = ["model.dim=32", "model.n_layers=2", "data.num_tokens=6000", "train.batch_size=2",
         "train.seq_len=32", "train.eval_every=1000", "train.log_every=1000", "train.warmup=2"]


def config(out_dir, *extra):
    return load_config(DEFAULT_CONFIG, SMALL + [f"train.out_dir={out_dir}", *extra])


def losses(history):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in history if "loss" in r]


@pytest.mark.parametrize("layers", ["dense", "moe"])
def test_resume_after_a_crash_is_bit_exact(tmp_path, monkeypatch, layers):
    extra = [f"model.layers={layers}", "model.dropout=0.1", "train.steps=10",
             "train.save_every=4"]
    whole = train(config(tmp_path / "whole", *extra), progress=False)["history"]

    crashed = tmp_path / "crashed"
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def crash_at_step_7(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(config(crashed, *extra), progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert [p.name for p in checkpoint.list_checkpoints(crashed)] == ["step_0000004.pt"]
    resumed = train(config(crashed, *extra, "train.resume=true"), progress=False)["history"]
    assert losses(resumed) == losses(whole)  # bit for bit, steps 1-4 restored, 5-10 recomputed


def test_resume_refuses_another_model(tmp_path):
    train(config(tmp_path, "train.steps=2"), progress=False)
    message = r"different model config \(fields \['dim', 'ffn_hidden'\]\)"
    with pytest.raises(ValueError, match=message):
        train(config(tmp_path, "train.steps=4", "train.resume=true", "model.dim=64"),
              progress=False)


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save_checkpoint(tmp_path, 1, {"step": 1}, keep=3)

    def crash(*args):
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(os, "replace", crash)  # dies after writing the data, before the rename
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, 2, {"step": 2}, keep=3)
    assert checkpoint.latest_checkpoint(tmp_path) == {"step": 1}
    assert not list((tmp_path / "checkpoints").glob(".*"))  # the partial file was removed


def test_damaged_newest_checkpoint_falls_back(tmp_path):
    checkpoint.save_checkpoint(tmp_path, 1, {"step": 1}, keep=3)
    checkpoint.checkpoint_path(tmp_path, 2).write_bytes(b"truncated")
    assert checkpoint.latest_checkpoint(tmp_path) == {"step": 1}


def test_rotation_keeps_the_newest(tmp_path):
    for step in range(1, 6):
        checkpoint.save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_0000004.pt",
                                                                      "step_0000005.pt"]


def _poison(monkeypatch, at_call: int):
    real = MultimodalTransformer.loss
    calls = {"n": 0}

    def loss(self, batch):
        out = real(self, batch)
        calls["n"] += 1
        if calls["n"] == at_call:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MultimodalTransformer, "loss", loss)


def test_non_finite_loss_aborts_with_the_step(tmp_path, monkeypatch):
    _poison(monkeypatch, at_call=3)
    with pytest.raises(NonFiniteError, match="non-finite loss at step 3"):
        train(config(tmp_path, "train.steps=5"), progress=False)


def test_non_finite_loss_can_be_skipped(tmp_path, monkeypatch):
    _poison(monkeypatch, at_call=3)
    summary = train(config(tmp_path, "train.steps=5", "train.nonfinite=skip"), progress=False)
    assert summary["skipped_steps"] == 1
    assert summary["history"][2] == {"step": 3, "skipped": "loss"}
    trained = [r for r in summary["history"] if "val/text" not in r]
    assert all("loss" in r for i, r in enumerate(trained) if i != 2)


def test_accumulation_equals_a_bigger_batch(tmp_path):
    # without document masking every window has the same number of scored targets, so the
    # mean of two micro-batch means is the mean over the joint batch
    common = ["train.steps=2", "model.attention.document_mask=false", "train.grad_clip=0"]
    one = train(config(tmp_path / "a", *common, "train.batch_size=4"), progress=False)
    two = train(config(tmp_path / "b", *common, "train.batch_size=2", "train.accumulate=2"),
                progress=False)
    for a, b in zip(losses(one["history"]), losses(two["history"])):
        assert a[1] == pytest.approx(b[1], rel=1e-5) and a[2] == pytest.approx(b[2], rel=1e-4)


def test_bfloat16_autocast_trains(tmp_path):
    summary = train(config(tmp_path, "train.steps=8", "train.dtype=bfloat16"), progress=False)
    history = losses(summary["history"])
    assert history[-1][1] < history[0][1]


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_matches(tmp_path):
    """A real SIGKILL at an arbitrary moment (often mid-save: one every step) and a resume give
    the losses of an uninterrupted run after the last complete checkpoint."""
    args = SMALL + ["train.steps=200", "train.save_every=1", "train.keep_checkpoints=2"]
    whole = train(load_config(DEFAULT_CONFIG, args + [f"train.out_dir={tmp_path / 'w'}"]),
                  progress=False)["history"]
    out = tmp_path / "k"
    cmd = [sys.executable, "-m", "experiments.train", *args, f"train.out_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(checkpoint.list_checkpoints(out)) < 2 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # while it trains and saves every step
    proc.wait()
    state = checkpoint.latest_checkpoint(out)
    assert state is not None and state["step"] < 200
    resumed = train(load_config(DEFAULT_CONFIG, args + [f"train.out_dir={out}",
                                                       "train.resume=true"]),
                    progress=False)["history"]
    assert losses(resumed) == losses(whole)


def test_resume_accepts_a_config_saved_before_newer_fields(tmp_path):
    train(config(tmp_path, "train.steps=2"), progress=False)
    path = checkpoint.list_checkpoints(tmp_path)[-1]
    state = torch.load(path, weights_only=False)
    del state["config"]["model"]["fusion"]  # as written before late fusion existed
    for spec in state["config"]["model"]["modalities"]:
        del spec["input"]
    checkpoint.atomic_torch_save(state, path)
    resumed = train(config(tmp_path, "train.steps=3", "train.resume=true"), progress=False)
    assert [r["step"] for r in resumed["history"] if "loss" in r] == [1, 2, 3]
