"""Multi-process training on gloo: data x expert parallel equals one process, checkpoints reshard
across expert-parallel sizes, and a dead or silent rank stops the others with a clear error."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist

from experiments import dcp
from experiments.config import load_config
from experiments.distributed import grid, reduce_gradients, spawn
from experiments.train import DEFAULT_CONFIG, build_optimizer, train
from moe.parallel import shard_experts
from mot.model import MultimodalTransformer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
SMALL = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "data.num_tokens=6000",
         "train.batch_size=2", "train.seq_len=32", "train.eval_every=1000",
         "train.log_every=1", "train.warmup=1", "train.eval_batches=3",
         "model.layers=moe", "model.blocks.moe.num_experts=4", "model.blocks.moe.top_k=2",
         "model.blocks.moe.balance_loss=0.01", "model.blocks.moe.z_loss=0.001"]


def _config(out_dir, *extra):
    return load_config(DEFAULT_CONFIG, SMALL + [f"train.out_dir={out_dir}", *extra])


def _train(out_dir, extra):
    summary = train(_config(out_dir, *extra), progress=False)
    return summary["history"]


def _records(history, key):
    return [r[key] for r in history if key in r]


def test_data_x_expert_parallel_on_4_ranks_equals_one_process(tmp_path):
    extra = ["train.steps=3", "model.blocks.moe.capacity_factor=1.0"]
    one = _train(tmp_path / "one", extra + ["train.accumulate=4"])
    four = spawn(_train, 4, tmp_path / "four", extra + ["train.ep=2"])
    assert all(h == four[0] for h in four)  # every rank reports the same reduced history
    for key in ("loss", "grad_norm", "loss/text", "loss/image", "val/text", "val/image"):
        torch.testing.assert_close(_records(four[0], key), _records(one, key), rtol=2e-5,
                                   atol=0, msg=key)
    single = torch.load(tmp_path / "one/checkpoints/step_0000003.pt", weights_only=False)
    model = MultimodalTransformer(_config(tmp_path, *extra).model)
    dcp.load(tmp_path / "four/checkpoints/step_0000003.dcp", model)
    for name, value in model.state_dict().items():  # Adam steps are ~lr = 3e-3; sums in
        # another order may move one by up to a few 1e-6
        torch.testing.assert_close(value, single["model"][name], rtol=1e-4, atol=1e-5, msg=name)


def _flat(model, optimizer):
    return {k: v.clone() for k, v in dcp.flat_state(model, optimizer).items()}


def _trained(cfg, ep: int):
    torch.manual_seed(0)
    model = MultimodalTransformer(cfg.model)
    if ep > 1:
        shard_experts(model)
    optimizer = build_optimizer(model, cfg.train)
    rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(rank))
    from mot.model import Batch

    model.loss(Batch(tokens, tokens % 2)).loss.backward()
    if ep > 1:  # replicas must agree before a save writes one copy of them
        reduce_gradients(model, grid(ep))
    optimizer.step()
    return model, optimizer


def _save_ep2(cfg, folder):
    model, optimizer = _trained(cfg, 2)
    dcp.save(folder, model, optimizer, {"step": 1}, torch_dist.get_rank())
    return _flat(model, optimizer)


def _load_ep2(cfg, folder):
    model = MultimodalTransformer(cfg.model)
    shard_experts(model)
    optimizer = build_optimizer(model, cfg.train)
    dcp.load(folder, model, optimizer, torch_dist.get_rank(), 2)
    return _flat(model, optimizer)


def test_checkpoint_reshards_from_ep2_to_ep1_and_back_bit_exact(tmp_path):
    cfg = _config(tmp_path)
    saved = spawn(_save_ep2, 2, cfg, tmp_path / "ep2")
    whole = {**saved[0], **saved[1]}
    assert any(k.endswith(".w13.3") for k in saved[1]) and not any(
        k.endswith(".w13.3") for k in saved[0])  # expert 3 lives on rank 1 only
    model = MultimodalTransformer(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    dcp.load(tmp_path / "ep2", model, optimizer)  # one process, no process group
    loaded = _flat(model, optimizer)
    assert loaded.keys() == whole.keys()
    assert all(torch.equal(loaded[k], whole[k]) for k in whole)
    dcp.save(tmp_path / "ep1", model, optimizer, {"step": 1})
    back = spawn(_load_ep2, 2, cfg, tmp_path / "ep1")
    for rank in range(2):
        assert back[rank].keys() == saved[rank].keys()
        assert all(torch.equal(back[rank][k], saved[rank][k]) for k in saved[rank])


def test_an_unfinished_save_is_not_a_checkpoint(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    model = MultimodalTransformer(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    folder = tmp_path / "checkpoints" / "step_0000001.dcp"
    dcp.save(folder, model, optimizer, {"step": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(dcp, "atomic_torch_save", crash)  # dies before the folder is complete
    with pytest.raises(KeyboardInterrupt):
        dcp.save(tmp_path / "checkpoints" / "step_0000002.dcp", model, optimizer, {"step": 2})
    from experiments.checkpoint import list_checkpoints

    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001.dcp"]


def _torchrun(nproc, *args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "experiments.train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _cli(out_dir, *extra):
    return SMALL + [f"train.out_dir={out_dir}", "train.save_every=2", *extra]


def test_torchrun_ep2_then_one_process_then_ep2_again(tmp_path):
    out = tmp_path / "run"
    first = _torchrun(2, *_cli(out, "train.steps=4", "train.ep=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count('"final_train_loss"') == 1  # rank 0 alone reports
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_0000002.dcp", "step_0000004.dcp"]
    middle = train(load_config(DEFAULT_CONFIG, _cli(out, "train.steps=6", "train.resume=true")),
                   progress=False)
    assert _records(middle["history"], "step")[:4] == [1, 2, 3, 4]
    last = _torchrun(2, *_cli(out, "train.steps=8", "train.ep=2", "train.resume=true"))
    assert last.returncode == 0, last.stderr[-3000:]
    summary = __import__("json").loads((out / "summary.json").read_text())
    steps = [r["step"] for r in summary["history"] if "loss" in r]
    assert steps == list(range(1, 9))
    assert summary["history"][:6] == [r for r in middle["history"]][:6]


def _dies_or_hangs(out_dir, how):
    rank = torch_dist.get_rank()
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 2:
            if how == "dies":
                os._exit(3)
            (Path(out_dir) / "stalled").write_text(str(time.time()))
            time.sleep(15)  # silent: alive but does not join the next collective
            os._exit(4)
        return real_step(self, *args, **kwargs)

    torch.optim.AdamW.step = step
    try:
        train(_config(out_dir, "train.steps=5", "train.ep=2", "train.timeout=4"),
              progress=False)
    except Exception as e:
        return type(e).__name__, str(e), time.time()
    return None


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_failed_rank_stops_the_others_within_the_timeout(tmp_path, how):
    results = spawn(_dies_or_hangs, 2, tmp_path, how, timeout=4, wait=60,
                    allow_failures=True)
    name, message, failed_at = results[0]
    assert name == "PeerFailure", message
    assert "rank 0/2" in message and "train.timeout (4 s)" in message
    if how == "hangs":  # the timeout fired, not the silent rank's exit 15 s later
        stalled = float((tmp_path / "stalled").read_text())
        assert failed_at - stalled < 4 + 4
