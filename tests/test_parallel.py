"""Expert parallelism on 2 gloo processes equals one process with the same weights and inputs:
outputs, auxiliary losses, every gradient, routing statistics, dropped tokens, bytes sent."""

import copy

import pytest
import torch
import torch.distributed as dist

from experiments.distributed import spawn
from moe import MoE, MoEConfig
from moe.parallel import communication, shard_experts
from moe.stats import collect

pytestmark = pytest.mark.slow

D, H, N = 16, 24, 40

CASES = {
    "top2": dict(num_experts=4, top_k=2, balance_loss=0.01, z_loss=0.001),
    "top2_shared_loop": dict(num_experts=4, top_k=2, shared_experts=1, implementation="loop"),
    "top1_skewed": dict(num_experts=4, top_k=1, balance_loss=0.01),  # all tokens to expert 0
    "capacity": dict(num_experts=4, top_k=2, capacity_factor=0.5, drop_policy="probability"),
    "capacity_position": dict(num_experts=8, top_k=2, capacity_factor=0.75,
                              drop_policy="position", balance_loss_type="sequence",
                              balance_loss=0.01),
    "expert_choice": dict(num_experts=4, top_k=2, router="expert_choice", capacity_factor=1.0),
    "moma": dict(num_experts=4, top_k=1, experts_per_modality=[2, 2]),
    "sigmoid_bias": dict(num_experts=8, top_k=2, score="sigmoid", bias_balancing=True),
}


def _block(name: str) -> MoE:
    torch.manual_seed(0)
    block = MoE(MoEConfig(dim=D, hidden=H, **CASES[name]))
    if name == "top1_skewed":
        with torch.no_grad():  # inputs are shifted by +5 (see _run): expert 0 wins every token
            block.router.weight.zero_()
            block.router.weight[0] = 1.0
    return block


def _inputs(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, N // 2, D, generator=g, requires_grad=True)
    modality = torch.randint(0, 2, (2, N // 2), generator=g)
    target = torch.randn(2, N // 2, D, generator=g)
    return x, modality, target


def _run(block, rank, shift=0.0):
    x, modality, target = _inputs(rank)
    y = block(x + shift, modality)
    (y * target).sum().backward()
    return y.detach(), x.grad


def _ep_equals_one_process(names):
    rank = dist.get_rank()
    out = {}
    for name in names:
        reference = _block(name)
        shift = 5.0 if name == "top1_skewed" else 0.0
        y_ref, dx_ref = _run(reference, rank, shift)
        stats_ref = collect(reference)[""]
        block = _block(name)
        shard_experts(block)
        y, dx = _run(block, rank, shift)
        stats = collect(block)[""]
        local = 4 if name in ("capacity_position", "sigmoid_bias") else 2
        first = rank * local
        # a shard's expert gradient is the sum of every rank's tokens' contributions
        expert_grads = {}
        for w in ("w13", "w2"):
            full = getattr(reference.experts, w).grad.clone()
            dist.all_reduce(full)
            expert_grads[w] = (getattr(block.experts, w).grad, full[first:first + local])
        out[name] = dict(
            y=(y, y_ref), dx=(dx, dx_ref), router=(block.router.weight.grad,
                                                   reference.router.weight.grad),
            experts=expert_grads, stats=(stats, stats_ref), comm=communication(block),
            shared=[(p.grad, q.grad) for p, q in zip(block.shared.parameters(),
                                                     reference.shared.parameters())]
            if block.shared is not None else [])
    return out


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_two_expert_parallel_ranks_equal_one_process():
    results = spawn(_ep_equals_one_process, 2, list(CASES))
    for result in results:
        for name, r in result.items():
            for key in ("y", "dx", "router"):
                _close(*r[key])
            for got, want in r["experts"].values():
                _close(got, want)
            for got, want in r["shared"]:
                _close(got, want)
            stats, stats_ref = r["stats"]
            assert stats.keys() == stats_ref.keys(), name
            for key in stats:
                _close(stats[key], stats_ref[key])
    for name in CASES:  # over both ranks: each rank returns what the other sent it
        comm = [r[name]["comm"] for r in results]
        sent = sum(c["bytes"] for c in comm)
        assert sent == sum(c["min_bytes"] for c in comm), (name, comm)
        assert sent == sum(c["backward_bytes"] for c in comm), (name, comm)
    skewed = [r["top1_skewed"]["stats"][0]["tokens"] for r in results]
    assert all(t[1:].sum() == 0 for t in skewed)  # experts 1-3 empty, rank 1 receives nothing
    assert all(r["capacity"]["stats"][0]["dropped"] > 0 for r in results)
    assert results[1]["top1_skewed"]["comm"]["min_bytes"] > 0  # rank 1 sends everything away
    assert results[0]["top1_skewed"]["comm"]["bytes"] > 0  # and rank 0 sends results back


def _pairs_off_rank(rank: int, local: int, top_k: int) -> int:
    """Hand count for the dropless top-k case: (token, rank) pairs with rank != this rank."""
    block = _block("top2")
    x, modality, _ = _inputs(rank)
    with torch.no_grad():
        expert = torch.topk(block.router(x.reshape(-1, D)), top_k).indices  # (N, k)
    owners = expert // local
    return sum(len(set(row) - {rank}) for row in owners.tolist())


def _byte_count():
    rank = dist.get_rank()
    block = _block("top2")
    shard_experts(block)
    _run(block, rank)
    return communication(block), _pairs_off_rank(rank, 2, 2), _pairs_off_rank(1 - rank, 2, 2)


def test_bytes_sent_equal_the_analytic_minimum():
    for comm, mine, theirs in spawn(_byte_count, 2):
        # tokens out (one row per off-rank pair) and results back (one per pair received)
        assert comm["bytes"] == (mine + theirs) * D * 4
        assert comm["min_bytes"] == 2 * mine * D * 4


def _refuses_uneven_sharding():
    block = MoE(MoEConfig(dim=D, hidden=H, num_experts=3, top_k=1))
    try:
        shard_experts(block)
    except ValueError as e:
        return str(e)
    return None


def test_experts_must_divide_over_ranks():
    messages = spawn(_refuses_uneven_sharding, 2)
    assert all("moe.num_experts (3) must be divisible by the expert-parallel size (2)" in m
               for m in messages)


def _model_equivalence(layers: str):
    from mot.config import ModelConfig
    from mot.model import Batch, MultimodalTransformer

    rank = dist.get_rank()
    blocks = {"mot_moe": {"untie": "all", "moe_modalities": ["text"],
                          "moe": {"num_experts": 2, "top_k": 1, "balance_loss": 0.01}},
              "moe": {"num_experts": 4, "top_k": 2, "balance_loss": 0.01},
              "moma": {"num_experts": 4, "top_k": 1}}
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, layers=layers,
                      blocks={layers: blocks[layers]})
    torch.manual_seed(0)
    reference = MultimodalTransformer(cfg)
    model = copy.deepcopy(reference)
    shard_experts(model)
    g = torch.Generator().manual_seed(7 + rank)
    tokens = torch.randint(0, 200, (2, 24), generator=g)
    modality = torch.randint(0, 2, (2, 24), generator=g)
    batch = Batch(tokens=tokens, modality=modality)
    loss_ref = reference.loss(batch).loss
    loss_ref.backward()
    loss = model.loss(batch).loss
    loss.backward()
    grads = {}
    sharded = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        got = sharded[name].grad
        want = p.grad
        if got.shape != want.shape:  # an expert shard: every rank's tokens contribute
            want = want.clone()
            dist.all_reduce(want)
            want = want[rank * got.shape[0]:(rank + 1) * got.shape[0]]
        grads[name] = (got, want)
    return loss.detach(), loss_ref.detach(), grads


@pytest.mark.parametrize("layers", ["mot_moe", "moe", "moma"])
def test_backbone_with_sharded_experts_equals_one_process(layers):
    for loss, loss_ref, grads in spawn(_model_equivalence, 2, layers):
        _close(loss, loss_ref)
        for name, (got, want) in grads.items():
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def _gathered_stats():
    from experiments.distributed import Parallel, sum_over_ranks

    rank, world = dist.get_rank(), dist.get_world_size()
    block = _block("capacity")
    shard_experts(block)
    _run(block, rank)
    gathered = sum_over_ranks(collect(block), Parallel(rank=rank, world=world))
    reference = _block("capacity")
    for r in range(world):  # one process sees both ranks' batches, one call each
        _run(reference, r)
    return gathered[""], collect(reference)[""]


def test_routing_statistics_are_gathered_over_ranks():
    for gathered, reference in spawn(_gathered_stats, 2):
        assert gathered.keys() == reference.keys()
        for key in reference:
            _close(gathered[key], reference[key])
        assert reference["dropped"] > 0 and reference["modality_tokens"].shape == (2, 4)
