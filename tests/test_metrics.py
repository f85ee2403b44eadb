"""Task metrics on hand-built cases with known answers, and the eval CLI on a digits run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.metrics import caption_accuracy, continuation_logprobs, generation_accuracy
from mot.model import MultimodalTransformer
from tests.conftest import tiny_config, train_and_eval

SPECIALS = {"bos": 1, "eos": 2, "boi": 3, "eoi": 4}
ROOT = Path(__file__).parent.parent


def test_caption_accuracy_hand_worked():
    # captions of digit d are the token sequences [10 + d] and [20 + d]; the fake model gives
    # log-prob 0 to captions of digit `belief[image]` and -5 to every other caption
    belief = {0: 7, 1: 2, 2: 2, 3: 9}  # image index -> the digit the model "sees"
    labels = [7, 2, 5, 9]  # image 2 is a 5 but the model believes 2: 3 of 4 right

    def score(prefix, continuations):
        image = prefix[2][0]  # the first image code carries the image index
        return torch.tensor([0.0 if c[0][0] % 10 == belief[image] else -5.0
                             for c in continuations])

    captions = lambda d: [[10 + d], [20 + d]]  # noqa: E731
    images = [[i, 0, 0] for i in range(4)]
    assert caption_accuracy(score, images, labels, captions, SPECIALS) == 0.75


def test_generation_accuracy_hand_worked():
    # "images" are 1x1 tensors holding the digit drawn; the model draws a 5 when asked for a 3
    drawn = lambda d, i: torch.tensor([[5.0 if d == 3 else float(d)]])  # noqa: E731
    classify = lambda images: images.flatten().long()  # noqa: E731
    assert generation_accuracy(drawn, classify, samples_per_digit=2) == pytest.approx(0.9)


def test_continuation_logprobs_equal_token_by_token_scores():
    model = MultimodalTransformer(tiny_config()).eval()
    prefix = [(1, 0), (3, 0), (5, 1), (6, 1), (4, 0)]
    conts = [[(7, 0), (2, 0)], [(9, 0)]]
    got = continuation_logprobs(model, prefix, conts)
    for c, value in zip(conts, got):
        row = prefix + c
        tokens = torch.tensor([[t for t, _ in row]])
        modality = torch.tensor([[m for _, m in row]])
        with torch.no_grad():
            hidden = model(tokens, modality)[0]
            expected = sum(model.heads(hidden[p - 1], m).log_softmax(-1)[t]
                           for p, (t, m) in enumerate(row) if p >= len(prefix))
        assert value == pytest.approx(float(expected), abs=1e-4)


@pytest.mark.slow
def test_eval_cli_reports_digits_metrics(tmp_path):
    pytest.importorskip("sklearn", reason="needs scikit-learn (the bundled digits)")
    out = tmp_path / "run"
    args = ["--config", "experiments/configs/digits.yaml", "train.steps=20", "model.dim=64",
            "model.n_layers=2", "data.num_tokens=20000", "data.vq_steps=200",
            f"data.cache_dir={tmp_path / 'cache'}", f"train.out_dir={out}", "train.seq_len=128"]
    subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT, check=True,
                   capture_output=True)
    result = subprocess.run([sys.executable, "-m", "experiments.eval", str(out), "--batches", "2",
                             "--images", "5", "--samples", "1"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())
    for key in ("caption_accuracy", "generation_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    assert report["classifier_accuracy"] > 0.9  # the judge itself reads real digits well
    assert report["transcription_accuracy"] is None
    drawn = subprocess.run([sys.executable, "-m", "experiments.generate", str(out), "--prompt",
                            "a handwritten seven", "--max-new", "18", "--out",
                            str(tmp_path / "png")], cwd=ROOT, capture_output=True, text=True)
    assert drawn.returncode == 0, drawn.stderr
    assert drawn.stdout.startswith("<bos>a handwritten seven<boi>[image 1]")
    assert (tmp_path / "png" / "image_1.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_reads_pixel_patches_for_continuous_images(tmp_path):
    pytest.importorskip("sklearn", reason="needs scikit-learn (the bundled digits)")
    out = tmp_path / "run"
    args = ["--config", "experiments/configs/digits.yaml", "train.steps=5", "model.dim=32",
            "model.n_layers=1", "data.num_tokens=20000", "data.vq_steps=100",
            "model.modalities.image.input=continuous", "model.modalities.image.feature_dim=4",
            "model.modalities.image.loss=regression", "model.fusion=late",
            f"data.cache_dir={tmp_path / 'cache'}", "train.seq_len=64"]
    report = train_and_eval(out, args)
    assert 0.0 <= report["caption_accuracy"] <= 1.0
    assert report["generation_accuracy"] is None  # no image head to sample from
    assert report["validation"]["image_mse"]["perplexity"] is None
    assert "image" not in report["validation"]  # continuous targets are not softmax-scored
    drawn = subprocess.run([sys.executable, "-m", "experiments.generate", str(out), "--prompt",
                            "a handwritten seven"], cwd=ROOT, capture_output=True, text=True)
    assert drawn.returncode == 2 and "continuous" in drawn.stderr
