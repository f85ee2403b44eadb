"""The training entry point: a short run learns, writes its outputs, rejects misfit configs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.config import load_config
from experiments.data import build_stream
from experiments.train import DEFAULT_CONFIG, lr_at, train

ROOT = Path(__file__).parent.parent


def test_short_run_learns_and_writes_outputs(tmp_path):
    cfg = load_config(DEFAULT_CONFIG, [f"train.out_dir={tmp_path}", "train.steps=60",
                                       "train.eval_every=60", "model.dim=64", "model.n_layers=2",
                                       "data.num_tokens=20000"])
    summary = train(cfg, progress=False)
    # uniform guessing over 64 codes costs log(64) = 4.16 nats; the stream is far more predictable
    assert summary["val_loss"]["text"] < 3.0 and summary["val_loss"]["image"] < 3.0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    state = torch.load(tmp_path / "checkpoints" / "step_0000060.pt", weights_only=False)
    assert state["step"] == 60 and "embed.weight" in state["model"]
    assert (tmp_path / "config.yaml").exists() and any((tmp_path / "tb").iterdir())


def test_mot_run_logs_routing_per_modality(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(ROOT / "experiments/configs/mot.yaml",
                      [f"train.out_dir={tmp_path}", "train.steps=4", "train.log_every=2",
                       "train.eval_every=4", "model.dim=32", "data.num_tokens=5000",
                       "train.batch_size=2", "model.freeze=[text]"])
    train(cfg, progress=False)
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    shares = [events.Scalars(f"routing/layers.0.ffn/tokens/{m}")[-1].value
              for m in ("text", "image")]
    assert sum(shares) == pytest.approx(1.0) and min(shares) > 0.2


def test_model_must_fit_the_data():
    cfg = load_config(DEFAULT_CONFIG, ["model.modalities.image.vocab_size=10"])
    stream = build_stream(cfg.data)
    with pytest.raises(ValueError, match=r"model.modalities.image.vocab_size \(10\) must be >= 64"):
        stream.check_fits(cfg.model, cfg.train.seq_len)


def test_split_keeps_documents_whole():
    cfg = load_config(DEFAULT_CONFIG, ["data.num_tokens=5000"])
    train_part, val_part = build_stream(cfg.data).split(0.1)
    assert train_part.doc[-1] != val_part.doc[0]
    assert len(train_part.tokens) + len(val_part.tokens) == 5000


def test_schedule_warms_up_then_decays():
    tc = load_config(DEFAULT_CONFIG, ["train.steps=100", "train.warmup=10"]).train
    lrs = [lr_at(s, tc) for s in range(100)]
    assert lrs[9] == pytest.approx(tc.lr) and lrs[0] == pytest.approx(tc.lr / 10)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(tc.lr * tc.min_lr_ratio, rel=1e-2)


def test_exponential_schedule_by_hand():
    tc = load_config(DEFAULT_CONFIG, ["train.steps=21", "train.warmup=1", "train.lr=0.01",
                                      "train.min_lr_ratio=0.01", "train.schedule=exponential"]
                     ).train
    # after warmup, progress p = (step - 1) / 20 and lr = 0.01 * 0.01 ** p
    assert lr_at(0, tc) == pytest.approx(0.01)
    assert lr_at(11, tc) == pytest.approx(0.001)  # halfway: 0.01 * 0.01 ** 0.5
    assert lr_at(21, tc) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match=r"train.schedule \('linear'\) must be one of"):
        load_config(DEFAULT_CONFIG, ["train.schedule=linear"])


def test_cli_reports_bad_override():
    result = subprocess.run([sys.executable, "-m", "experiments.train", "model.n_heads=3"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "n_heads (3) must divide dim (128)" in result.stderr


def test_eval_and_generate_clis_on_a_run(tmp_path):
    cfg = load_config(DEFAULT_CONFIG, [f"train.out_dir={tmp_path}", "train.steps=150",
                                       "model.dim=64", "model.n_layers=2",
                                       "data.num_tokens=20000", "train.eval_every=150"])
    train(cfg, progress=False)
    result = subprocess.run([sys.executable, "-m", "experiments.eval", str(tmp_path),
                             "--batches", "4"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "eval.json").read_text())["validation"]
    for m in metrics.values():
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    # the trained model continues "bos <word> ... boi" with a 16-token image span, then text
    result = subprocess.run([sys.executable, "-m", "experiments.generate", str(tmp_path),
                             "--prompt-ids", "1 20 30 3", "--max-new", "20",
                             "--temperature", "0"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    pieces = result.stdout.split()
    assert pieces[4:20] == [p for p in pieces[4:20] if p.startswith("image:")]
    assert pieces[20].startswith("text:")
    bad = subprocess.run([sys.executable, "-m", "experiments.generate", str(tmp_path),
                          "--prompt-ids", "999"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "give text token ids in [0, 64)" in bad.stderr
    text = subprocess.run([sys.executable, "-m", "experiments.generate", str(tmp_path),
                           "--prompt", "hello"], cwd=ROOT, capture_output=True, text=True)
    assert text.returncode == 2 and "--prompt needs a text tokenizer" in text.stderr
    missing = subprocess.run([sys.executable, "-m", "experiments.eval", str(tmp_path / "nope")],
                             cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 2 and "is not a run directory" in missing.stderr


def test_expert_parallel_needs_several_processes(tmp_path):
    cfg = load_config(DEFAULT_CONFIG, [f"train.out_dir={tmp_path}", "train.ep=2"])
    with pytest.raises(ValueError, match=r"train.ep \(2\) > 1 needs several processes: launch "
                                         r"with torchrun --nproc_per_node 2"):
        train(cfg, progress=False)
    with pytest.raises(ValueError, match=r"train.timeout \(0\) must be > 0 seconds"):
        load_config(DEFAULT_CONFIG, ["train.timeout=0"])
