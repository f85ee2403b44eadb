"""The benchmark baselines compute the same function as the layers they are compared with."""

import json

import pytest
import torch

from experiments.bench.maskloop import MaskLoopMoTLayer
from experiments.bench.mot import interleaved_runs
from moe import ops
from moe.grouping import Grouping
from mot.attention import build_mask
from mot.config import ModelConfig
from mot.layers import Rotary
from mot.model import TransformerLayer


def test_mask_loop_baseline_equals_mot_layer():
    B, T, D, H, F_, M = 2, 96, 32, 4, 64, 3
    cfg = ModelConfig(modalities=[{"name": n, "vocab_size": 8} for n in ("a", "b", "c")],
                      dim=D, n_heads=H, n_layers=1, ffn_hidden=F_, max_seq_len=T,
                      layers="mot", blocks={"mot": {"untie": "all"}},
                      attention={"bidirectional_modalities": []})
    layer = TransformerLayer(cfg, cfg.layer_block(0))
    for p in layer.parameters():  # break the symmetry of the per-modality copies
        torch.nn.init.normal_(p, mean=1.0 if p.dim() == 2 else 0.0, std=0.1)
    loop = MaskLoopMoTLayer(M, D, H, F_)
    loop.copy_from(layer)
    modality = interleaved_runs(B, T, M, torch.Generator().manual_seed(0))
    mask = build_mask(cfg.attention, modality, None, [])
    rope = Rotary(cfg.head_dim, cfg.rope_theta)(torch.arange(T).expand(B, T), torch.float32)
    x = torch.randn(B, T, D)
    expected = loop(x, modality, rope, mask)
    torch.testing.assert_close(layer(x, modality, rope, mask), expected, atol=1e-4, rtol=1e-4)
    # the same layer on the residual stream grouped by modality, as the backbone runs it
    g = Grouping.from_ids(modality, M, grouped=True)
    out = layer(g.from_sequence(x), g, rope, mask)
    torch.testing.assert_close(g.to_sequence(out), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_ep_bench_reports_the_minimum_bytes(capsys):
    from experiments.bench.ep import main

    assert main(["--tokens", "64", "--dim", "32", "--hidden", "48", "--experts", "4",
                 "--repeats", "1", "--warmup", "0"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bytes_over_minimum"] == 1.0 and last["backward_bytes_over_minimum"] == 1.0
    assert last["ep_over_one_process"] > 0


def test_block_benches_run_and_end_with_their_ratios(capsys):
    """`bench mot` / `bench moe` at toy sizes: one JSON line of both ratios per dtype, after the
    default warm-up (longer in half precision, where oneDNN compiles per product shape)."""
    from experiments.bench import WARMUP, warmup_calls
    from experiments.bench.moe import main as moe_main
    from experiments.bench.mot import main as mot_main

    assert warmup_calls(None, torch.bfloat16) == WARMUP[torch.bfloat16] > WARMUP[torch.float32]
    assert warmup_calls(3, torch.bfloat16) == 3
    assert mot_main(["--batch", "1", "--seq", "64", "--dim", "32", "--heads", "2",
                     "--hidden", "64", "--repeats", "1"]) == 0
    mot = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert moe_main(["--tokens", "64", "--dim", "32", "--hidden", "48", "--experts", "4",
                     "--repeats", "1"]) == 0
    moe = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for dtype in ("float32", "bfloat16"):
        assert mot[dtype]["mot_vs_dense"] > 0 and mot[dtype]["mot_vs_maskloop"] > 0
        assert moe[dtype]["moe_vs_dense"] > 0


def test_rounds_reverse_their_order_every_other_round():
    from experiments.bench import time_rounds

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = time_rounds(fns, repeats=3, warmup=1)
    # warm-up in order, then rounds a b c | c b a | a b c
    assert calls == list("abc") + list("abc") + list("cba") + list("abc")
    assert {name: len(ts) for name, ts in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)


@pytest.mark.skipif(not ops.AVAILABLE, reason="moe._C was not built (needs a C++ compiler)")
def test_ops_bench_takes_the_fastest_copy_as_its_floor(capsys):
    from experiments.bench.ops import COPY_OFFSETS, copy_bandwidth, copy_variants, main

    fns = copy_variants(mib=1)  # one copy per destination offset, each runnable
    assert list(fns) == [f"copy+{off}" for off in COPY_OFFSETS]
    for fn in fns.values():
        fn()
    times = {"copy+0": [4.0, 2.0, 3.0], "copy+1024": [1.0, 1.0, 5.0], "kernel": [0.1]}
    assert copy_bandwidth(times, mib=1) == 2 * 2 ** 20 / 1.0  # the fastest median, read + write
    assert main(["--tokens", "4096", "--dim", "256", "--k", "2", "--groups", "4",
                 "--repeats", "1"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for dtype in ("float32", "bfloat16"):
        assert last[dtype]["speedup_vs_reference"] > 0
        assert last[dtype]["fraction_of_copy_bandwidth"] > 0
