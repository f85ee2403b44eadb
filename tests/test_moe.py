"""The sparse MoE block: equivalences, hand-worked routing, losses, balancing, config errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe import MoE, MoEConfig, SwiGLU, fused, ops
from moe.dispatch import TopKDispatch, priority_order
from moe.grouping import Grouping
from moe.losses import load_balance_loss, router_z_loss, sequence_load_balance_loss
from moe.routing import capacity_keep, topk_route


def make(**options) -> MoE:
    base = dict(dim=16, hidden=24, num_experts=4, top_k=2)
    return MoE(MoEConfig(**(base | options)))


def test_one_expert_top1_dropless_equals_dense_ffn():
    moe = make(num_experts=1, top_k=1, balance_loss=0.0, z_loss=0.0)
    dense = SwiGLU(16, 24)
    with torch.no_grad():
        moe.experts.w1.copy_(dense.w1.weight.t()[None])
        moe.experts.w3.copy_(dense.w3.weight.t()[None])
        moe.experts.w2.copy_(dense.w2.weight.t()[None])
    x = torch.randn(3, 5, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = moe(x), dense(x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-6)
    gate_up = torch.cat([dense.w1.weight.grad, dense.w3.weight.grad]).t()  # (D, 2H) = [w1 | w3]
    torch.testing.assert_close(moe.experts.w13.grad[0], gate_up, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(moe.experts.w2.grad[0], dense.w2.weight.grad.t(), atol=1e-6,
                               rtol=1e-6)


CONFIGS = [dict(), dict(score="sigmoid", renormalize=False), dict(capacity_factor=0.75),
           dict(capacity_factor=1.0, drop_policy="position"), dict(shared_experts=1,
                                                                    shared_gate=True),
           dict(router="expert_choice"), dict(experts_per_modality=[2, 2], top_k=1),
           dict(top_k=4), dict(bias_balancing=True), dict(balance_loss_type="sequence")]


def assert_same_block(options: dict, implementation: str) -> tuple[MoE, MoE]:
    """The default implementation and `implementation`, same weights and inputs: equal
    outputs, input gradients and parameter gradients. Returns (default, other)."""
    torch.manual_seed(0)
    grouped = make(**options)
    other = make(**(options | {"implementation": implementation}))
    other.load_state_dict(grouped.state_dict())
    x = torch.randn(2, 13, 16, requires_grad=True)
    x_other = x.detach().clone().requires_grad_()
    modality = torch.randint(0, 2, (2, 13))
    y, y_other = grouped(x, modality), other(x_other, modality)
    torch.testing.assert_close(y_other, y, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    y_other.square().sum().backward()
    torch.testing.assert_close(x_other.grad, x.grad, atol=1e-5, rtol=1e-5)
    for (name, p), p_other in zip(grouped.named_parameters(), other.parameters()):
        torch.testing.assert_close(p_other.grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)
    return grouped, other


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in
                                                                     o.items()) or "default")
def test_grouped_equals_loop_reference(options):
    assert_same_block(options, "loop")


PADDED = [dict(), dict(capacity_factor=0.75), dict(capacity_factor=1.0, drop_policy="position"),
          dict(router="expert_choice"), dict(top_k=4, num_experts=6)]


@pytest.mark.parametrize("options", PADDED, ids=lambda o: ",".join(f"{k}={v}" for k, v in
                                                                   o.items()) or "default")
def test_padded_equals_grouped(options):
    grouped, padded = assert_same_block(options, "padded")
    assert padded.stats.read()["dropped"] == grouped.stats.read()["dropped"]


def test_padded_dispatch_gives_each_expert_the_same_rows():
    expert = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])  # expert 0: 4 slots, 1: 3, 2: 1
    dispatch = TopKDispatch(expert, 3, padded=True)
    assert dispatch.rows_per_expert == 8 and dispatch.kept == 24  # 4 rounded up to 8
    x = torch.arange(1.0, 5.0)[:, None]
    rows = dispatch.gather(x).view(3, 8)
    assert rows[0, :4].tolist() == [1.0, 2.0, 3.0, 4.0] and rows[1, :3].tolist() == [1.0, 3.0, 4.0]
    assert rows[2, 0] == 2.0 and rows[0, 4:].eq(0).all() and rows[2, 1:].eq(0).all()
    weight = torch.full((4, 2), 0.5)
    assert dispatch.combine(rows.view(-1, 1), weight).flatten().tolist() == [1.0, 2.0, 3.0, 4.0]


def test_dropless_equals_capacity_that_drops_nothing():
    dropless = make()
    big = make(capacity_factor=4.0)  # capacity = N * k: no expert can overflow
    big.load_state_dict(dropless.state_dict())
    x = torch.randn(20, 16)
    torch.testing.assert_close(big(x), dropless(x))
    assert big.stats.read()["dropped"] == 0


def test_capacity_hand_worked_top1():
    expert = torch.tensor([[0], [0], [1], [2], [0], [1]])
    weight = torch.tensor([[0.5], [0.9], [0.6], [0.7], [0.8], [0.4]])
    by_position = capacity_keep(expert, weight, 3, capacity=1, policy="position")
    assert by_position.flatten().tolist() == [True, False, True, True, False, False]
    by_probability = capacity_keep(expert, weight, 3, capacity=1, policy="probability")
    assert by_probability.flatten().tolist() == [False, True, True, True, False, False]


def test_capacity_dispatch_and_combine_hand_worked_top2():
    # 4 tokens, 3 experts, top-2, capacity 2, by position: all first choices queue first.
    expert = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])
    weight = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    keep = capacity_keep(expert, weight, 3, capacity=2, policy="position")
    dispatch = TopKDispatch(expert, 3, 2, priority_order(expert, weight, "position"))
    assert torch.equal(dispatch.keep, keep)
    # expert 0 queue: t0, t1, t3 (first choices), t2 (second) -> keeps t0, t1
    # expert 1 queue: t2 (first), t0, t3 (second)           -> keeps t2, t0
    # expert 2 queue: t1 (second)                             -> keeps t1
    assert keep.tolist() == [[True, True], [True, True], [True, False], [False, False]]
    assert dispatch.counts.tolist() == [2, 2, 1] and dispatch.dropped == 3
    assert dispatch.token.tolist() == [0, 1, 2, 0, 1]  # by expert, each in queue order
    x = torch.arange(1.0, 5.0)[:, None]  # token t carries the value t + 1
    out = dispatch.combine(dispatch.gather(x), weight)  # identity experts
    # token 2 keeps only its first slot, token 3 is dropped entirely (its residual carries it)
    assert out.flatten().tolist() == pytest.approx([1.0, 2.0, 1.5, 0.0])


def test_load_balance_loss_hand_worked():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    # f = [1/2, 1/2], P = [0.55, 0.45]: 2 * (0.275 + 0.225) = 1
    assert load_balance_loss(scores, torch.tensor([[0], [1]])).item() == pytest.approx(1.0)
    # both to expert 0: f = [1, 0]: 2 * 0.55
    assert load_balance_loss(scores, torch.tensor([[0], [0]])).item() == pytest.approx(1.1)
    # the same with the counts handed in (as the block does when dropless)
    assert load_balance_loss(scores, torch.tensor([[0], [0]]), counts=torch.tensor([2, 0])
                             ).item() == pytest.approx(1.1)
    # top-2 of 2 experts: f = [1/2, 1/2] whatever the scores
    assert load_balance_loss(scores, torch.tensor([[0, 1], [1, 0]])).item() == pytest.approx(1.0)


def test_load_balance_loss_is_minimal_for_uniform_routing():
    E, N = 4, 64
    uniform = load_balance_loss(torch.full((N, E), 1 / E), torch.arange(N)[:, None] % E)
    assert uniform.item() == pytest.approx(1.0)
    for skew in (0.5, 1.0, 2.0):
        scores = (torch.randn(N, E) + skew * torch.arange(E)).softmax(-1)
        expert, _ = topk_route(scores, 1, renormalize=False)
        assert load_balance_loss(scores, expert).item() > uniform.item()


def test_sequence_balance_loss_sees_imbalance_inside_sequences():
    scores = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    expert = torch.tensor([[0], [0], [1], [1]])
    sequence = torch.tensor([0, 0, 1, 1])
    assert load_balance_loss(scores, expert).item() == pytest.approx(1.0)  # balanced overall
    # each sequence: f = [1, 0], P = [0.9, 0.1] -> 2 * 0.9
    value = sequence_load_balance_loss(scores, expert, sequence, 2).item()
    assert value == pytest.approx(1.8)


def test_router_z_loss_hand_worked():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_aux_losses_reach_the_router_through_the_output():
    moe = make(balance_loss=0.1, z_loss=0.01)
    x = torch.randn(12, 16)
    (moe(x) * 0).sum().backward()  # the output carries no task gradient at all
    logits = x @ moe.router.weight.t()
    scores = logits.softmax(-1)
    expert, _ = topk_route(scores, 2, True)
    aux = 0.1 * load_balance_loss(scores, expert) + 0.01 * router_z_loss(logits)
    expected = torch.autograd.grad(aux, moe.router.weight)[0]
    torch.testing.assert_close(moe.router.weight.grad, expected)


@pytest.mark.skipif(not ops.AVAILABLE, reason="moe._C was not built (needs a C++ compiler "
                    "at install time)")
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_losses_and_statistics_from_the_router_kernel_equal_the_composition(score, monkeypatch):
    # the compiled router sums the probabilities, logsumexps and entropy in its pass; without it
    # the block composes the same losses from the scores and logits
    def run():
        torch.manual_seed(0)
        moe = make(score=score, balance_loss=0.1, z_loss=0.01)
        x = torch.randn(40, 16, requires_grad=True)
        moe(x).square().sum().backward()
        return moe, x.grad, moe.stats.read()

    fast_moe, fast_grad, fast_stats = run()
    monkeypatch.setattr(fused, "router_topk", lambda *args, **kwargs: None)
    slow_moe, slow_grad, slow_stats = run()
    torch.testing.assert_close(fast_grad, slow_grad, atol=1e-5, rtol=1e-4)
    for (name, a), (_, b) in zip(fast_moe.named_parameters(), slow_moe.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert fast_stats.keys() == slow_stats.keys()
    for key in ("balance_loss", "z_loss", "entropy", "tokens"):
        torch.testing.assert_close(fast_stats[key].float(), slow_stats[key].float(), atol=1e-5,
                                   rtol=1e-5, msg=key)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_balancing_moves_load_toward_uniform(score):
    moe = make(top_k=1, bias_balancing=True, bias_update_rate=0.005, score=score)
    with torch.no_grad():
        moe.router.weight.normal_(std=0.5)
        moe.router.weight[0] += 0.3  # inputs have a positive mean: expert 0 is favoured
    x = torch.randn(256, 16) + 0.5

    def load_cv():
        moe(x)
        tokens = moe.stats.read()["tokens"]
        return (tokens.std(unbiased=False) / tokens.mean()).item()

    before = load_cv()
    for _ in range(200):
        load_cv()
        moe.update_bias()
    after = load_cv()
    assert before > 0.5 and after < 0.2 * before
    assert moe.expert_bias[0] < 0  # the favoured expert was pushed down


def test_statistics_are_counted_per_expert_and_modality():
    moe = make(capacity_factor=0.5)
    x = torch.randn(2, 10, 16)
    modality = torch.tensor([[0] * 10, [1] * 6 + [2] * 4])
    moe(x, modality)
    stats = moe.stats.read()
    assert stats["tokens"].sum() == 20 * 2 and stats["rows"] == 20
    assert stats["modality_tokens"].shape == (3, 4)
    assert stats["modality_tokens"].sum(1).tolist() == [20, 12, 8]
    assert stats["dropped"] == 40 - 4 * moe.cfg.capacity(20)
    assert 0 < stats["entropy"] / stats["rows"] <= math.log(4)


def test_moma_routes_within_the_modality_group():
    moe = make(num_experts=6, experts_per_modality=[2, 4], top_k=2)
    modality = torch.randint(0, 2, (40,))
    moe(torch.randn(40, 16), modality)
    counts = moe.stats.read()["modality_tokens"]
    assert counts[0, 2:].sum() == 0 and counts[1, :2].sum() == 0
    with pytest.raises(ValueError, match="routes by modality: pass modality ids"):
        moe(torch.randn(4, 16))


def test_expert_choice_fills_every_expert():
    moe = make(router="expert_choice", capacity_factor=1.0)
    x = torch.randn(16, 16)
    y = moe(x)
    stats = moe.stats.read()
    C = moe.cfg.capacity(16)  # 16 * 2 / 4 = 8 tokens per expert
    assert stats["tokens"].tolist() == [C] * 4
    scores = moe.router(x).softmax(-1)
    expected = torch.zeros_like(x)
    for e in range(4):
        top = scores[:, e].topk(C)
        w1, w3, w2 = moe.experts.w1[e], moe.experts.w3[e], moe.experts.w2[e]
        xe = x[top.indices]
        out = (F.silu(xe @ w1) * (xe @ w3)) @ w2
        expected.index_add_(0, top.indices, top.values[:, None] * out)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_grouped_layout_gives_the_same_block_output():
    moe = make(balance_loss_type="sequence")
    x = torch.randn(3, 8, 16)
    modality = torch.randint(0, 2, (3, 8))
    g = Grouping.from_ids(modality, 2, grouped=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_seq = moe(x1, modality)
    y_rows = moe(g.from_sequence(x2), g)
    torch.testing.assert_close(g.to_sequence(y_rows), y_seq, atol=1e-6, rtol=1e-6)
    (y_seq * 0).sum().backward()
    grad_seq = moe.router.weight.grad.clone()
    moe.router.weight.grad = None
    (y_rows * 0).sum().backward()  # only the per-sequence balance and z losses: same sequences
    torch.testing.assert_close(moe.router.weight.grad, grad_seq)


@pytest.mark.parametrize("options, message", [
    (dict(top_k=9), r"moe.top_k \(9\) must be in \[1, moe.num_experts \(4\)\]"),
    (dict(capacity_factor=0.0), r"moe.capacity_factor \(0.0\) must be > 0"),
    (dict(capacity_factor=-1.0), r"moe.capacity_factor \(-1.0\) must be > 0"),
    (dict(router="hash"), r"moe.router \('hash'\) must be one of \['topk', 'expert_choice'\]"),
    (dict(score="relu"), r"moe.score \('relu'\) must be one of"),
    (dict(drop_policy="random"), r"moe.drop_policy \('random'\) must be one of"),
    (dict(experts_per_modality=[1, 2]), r"must be positive and sum to moe.num_experts \(4\)"),
    (dict(num_experts=0), r"moe.num_experts \(0\) must be a positive integer"),
])
def test_config_errors_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**(dict(dim=16, hidden=24, num_experts=4, top_k=2) | options))


def test_megablocks_names_what_is_missing():
    pytest.importorskip("megablocks") if torch.cuda.is_available() else None
    with pytest.raises(ValueError, match="moe.implementation 'megablocks' needs"):
        make(implementation="megablocks")


def test_wrong_width_is_a_clear_error():
    with pytest.raises(ValueError, match=r"input width 8 must equal moe.dim \(16\)"):
        make()(torch.randn(3, 8))


def test_top1_router_learns_from_the_task():
    """With top-1 the default keeps the raw probability as the weight (Switch), so the task
    gradient reaches the router; renormalised, the weight is 1 and it would not."""
    x = torch.randn(12, 16)
    norms = {}
    for renormalize in (None, True):
        torch.manual_seed(0)
        moe = make(top_k=1, renormalize=renormalize, balance_loss=0.0, z_loss=0.0)
        moe(x).square().sum().backward()
        norms[renormalize] = float(moe.router.weight.grad.norm())
    assert norms[None] > 1e4 * norms[True]  # renormalised: only rounding error reaches it


def test_routing_stats_sum_queued_numbers_and_tensors():
    from moe.stats import RoutingStats

    stats = RoutingStats()
    stats.FOLD = 3  # fold twice within the seven calls, and once more on read
    for i in range(7):
        shape = (1, 2) if i < 4 else (2, 2)  # a second modality appears at call 4
        stats.add(tokens=torch.tensor([1, i]), dropped=i, rows=2.5,
                  modality_tokens=torch.ones(shape, dtype=torch.long))
    assert len(stats.pending) == 1
    sums = stats.read()
    assert sums["tokens"].tolist() == [7.0, 21.0] and sums["dropped"].item() == 21.0
    assert sums["rows"].item() == 17.5 and sums["tokens"].dtype == torch.float64
    assert sums["modality_tokens"].tolist() == [[7.0, 7.0], [3.0, 3.0]]
    assert stats.read() == {} and stats.calls == 0


def test_padded_half_precision_pads_to_whole_blocks(monkeypatch):
    # bfloat16 matmuls on CPU compile a kernel per shape: padded rows are multiples of 64
    from moe.layers import GroupedSwiGLU

    rows = []
    run = GroupedSwiGLU.ffn_padded
    monkeypatch.setattr(GroupedSwiGLU, "ffn_padded",
                        lambda self, x: rows.append(x.shape[1]) or run(self, x))
    torch.manual_seed(0)
    grouped = make().to(torch.bfloat16)
    padded = make(implementation="padded").to(torch.bfloat16)
    padded.load_state_dict(grouped.state_dict())
    x = torch.randn(2, 13, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(padded(x), grouped(x), atol=2e-2, rtol=2e-2)
    padded.stats.read()
    padded.float()(x.float())
    largest = int(padded.stats.read()["tokens"].max())
    # bfloat16: one 64-row block; float32: the largest group rounded up to 8
    assert rows == [64, -(-largest // 8) * 8] and largest < 64
