"""The data-loader benchmark: its JSON line, and that it times the batches training draws."""

import json
import math

import pytest
import torch

from experiments.bench.data import draw, main, streams
from experiments.config import load_config
from experiments.data import build_stream

TINY = ["data.name=synthetic", "data.num_tokens=4000", "model.dim=32", "model.n_layers=1",
        "train.batch_size=2", "train.seq_len=32"]


def test_bench_data_prints_finite_positive_numbers_last(capsys):
    assert main(["--variants", "dense,moe", "--repeats", "2", "--warmup", "1", "--batches", "5",
                 *TINY]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    numbers = {k: v for k, v in last.items() if not isinstance(v, bool)}
    assert {"loader_tokens_per_s", "packed_loader_tokens_per_s", "loader_share_of_step_max",
            "loader_share_of_step_dense", "loader_share_of_step_moe"} <= set(numbers)
    assert all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0
               for v in numbers.values())
    assert last["loader_share_of_step_max"] == max(last["loader_share_of_step_dense"],
                                                   last["loader_share_of_step_moe"])
    assert last["target_met"] == (last["loader_share_of_step_max"] < 0.05)


def test_bench_data_rejects_an_unknown_variant():
    with pytest.raises(SystemExit):
        main(["--variants", "dense,nope", *TINY])


def test_timed_loaders_draw_what_training_samples(tmp_path):
    cfg = load_config("experiments/configs/digits.yaml", TINY + ["train.accumulate=2"])
    tc = cfg.train
    train_split = build_stream(cfg.data).split(cfg.data.val_fraction)[0]
    generator = torch.Generator().manual_seed(7)
    expected = [train_split.sample(tc.batch_size, tc.seq_len, generator) for _ in range(6)]
    loaders, _ = streams(cfg.data, tmp_path / "packed")
    assert set(loaders) == {"in-memory", "packed"}
    for stream in loaders.values():  # the packed copy too: same windows, same dtypes
        got = draw(stream, tc, torch.Generator().manual_seed(7), 3)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            for field in ("tokens", "modality", "doc"):
                x, y = getattr(a, field), getattr(b, field)
                assert x.dtype == y.dtype and torch.equal(x, y)
