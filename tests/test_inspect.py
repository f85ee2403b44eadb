"""The routing report: exact heatmap and specialisation on a forced routing; CLI on a run."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe import MoE, MoEConfig
from moe.inspect import routing_report, specialisation
from mot.model import MultimodalTransformer
from tests.conftest import random_batch, tiny_config

ROOT = Path(__file__).parent.parent


def test_specialisation_hand_worked():
    assert specialisation(torch.tensor([[5, 0], [0, 7]])) == pytest.approx(1.0)
    assert specialisation(torch.tensor([[5, 5], [3, 3]])) == pytest.approx(0.0, abs=1e-12)
    partial = specialisation(torch.tensor([[4, 1], [1, 4]]))
    assert 0 < partial < 1


def test_forced_routing_gives_the_exact_heatmap_and_score_one():
    # MoMa with one expert per modality: modality m can only go to expert m
    cfg = tiny_config(layers="moma", blocks={"moma": {"num_experts": 3, "top_k": 1}})
    model = MultimodalTransformer(cfg)
    tokens, modality = random_batch(cfg, 2, 30)
    report = routing_report(model, lambda: model(tokens, modality), cfg.modality_names)
    counts = torch.bincount(modality.flatten(), minlength=3).tolist()
    for layer in ("layers.0.ffn", "layers.1.ffn"):
        assert report[layer]["modality_expert"] == [[counts[0], 0, 0], [0, counts[1], 0],
                                                    [0, 0, counts[2]]]
        assert report[layer]["specialisation"] == pytest.approx(1.0)


def test_report_on_a_block_lifted_into_another_model():
    block = MoE(MoEConfig(dim=16, hidden=32, num_experts=4, top_k=2))
    host = torch.nn.Sequential(torch.nn.Linear(8, 16), block)
    report = routing_report(host, lambda: host(torch.randn(40, 8)))
    assert list(report) == ["1"] and sum(report["1"]["tokens"]) == 80


def test_inspect_cli(tmp_path):
    from experiments.config import load_config
    from experiments.train import DEFAULT_CONFIG, train

    cfg = load_config(DEFAULT_CONFIG, [f"train.out_dir={tmp_path}", "train.steps=6",
                                       "model.dim=32", "model.n_layers=2", "model.layers=moe",
                                       "data.num_tokens=6000", "train.batch_size=2",
                                       "train.seq_len=32", "train.log_every=2"])
    train(cfg, progress=False)
    result = subprocess.run([sys.executable, "-m", "experiments.inspect", str(tmp_path),
                             "--batches", "2"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    md = (tmp_path / "inspect" / "routing.md").read_text()
    assert "## layers.0.ffn" in md and "expert specialisation" in md
    assert (tmp_path / "inspect" / "layers.0.ffn_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "inspect" / "layers.0.ffn_load.png").is_file()
