"""The attention's inputs in one pass (csrc/qkv_cpu.cpp): split, QK-norm, rotary and sequence
order against `moe.fused.qkv_heads_reference` (values and gradients against float64 autograd),
the dtypes of autocast, argument checks, registration, and the attention's q, k, v against the
reference."""

import pytest
import torch

from moe import fused, ops
from moe.grouping import Grouping
from mot.config import ModelConfig
from mot.layers import Rotary
from mot.model import TransformerLayer

needs_kernels = pytest.mark.skipif(not ops.AVAILABLE, reason="moe._C was not built "
                                   "(needs a C++ compiler at install time)")
HALF = (torch.bfloat16, torch.float16)


def inputs(B=2, T=5, H=4, KV=2, hd=8, G=3, *, norm=True, groups=True, src=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = B * T
    qkv = torch.randn(P, (H + 2 * KV) * hd, generator=g)
    rows = G if groups else 1
    q_w = 1 + 0.3 * torch.randn(rows, hd, generator=g) if norm else None
    k_w = 1 + 0.3 * torch.randn(rows, hd, generator=g) if norm else None
    angles = torch.randn(B, T, 1, hd // 2, generator=g).repeat(1, 1, 1, 2)
    order = torch.randperm(P, generator=g) if src else None
    ids = torch.randint(0, G, (P,), generator=g) if norm and groups else None
    return dict(qkv=qkv, heads=H, kv_heads=KV, cos=angles.cos(), sin=angles.sin(),
                q_weight=q_w, k_weight=k_w, eps=1e-5, src=order, group=ids)


def run(fn, args, dtype=None, weight_dtype=None, angle_dtype=None):
    """fn on leaf copies of args (qkv in dtype, weights in weight_dtype, angles in angle_dtype)
    -> (q, k, v), and the gradients of qkv and the weights under fixed output gradients."""
    a = dict(args)
    a["qkv"] = a["qkv"].to(dtype or a["qkv"].dtype).requires_grad_()
    for name in ("q_weight", "k_weight"):
        if a[name] is not None:
            a[name] = a[name].to(weight_dtype or a["qkv"].dtype).requires_grad_()
    a["cos"], a["sin"] = (a[n].to(angle_dtype or a["qkv"].dtype) for n in ("cos", "sin"))
    out = fn(**a)
    g = torch.Generator().manual_seed(1)
    loss = sum((o.double() * torch.randn(o.shape, generator=g).to(o.dtype).double()).sum()
               for o in out)
    leaves = [a["qkv"]] + [a[n] for n in ("q_weight", "k_weight") if a[n] is not None]
    return out, torch.autograd.grad(loss, leaves)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["plain", "grouped", "no_norm", "no_src", "mha"])
def test_qkv_heads_matches_reference(dtype, layout):
    args = inputs(norm=layout != "no_norm", groups=layout in ("grouped", "no_src"),
                  src=layout != "no_src" and layout != "plain",
                  KV=4 if layout == "mha" else 2)
    out, grads = run(fused.qkv_heads, args, dtype)
    want, want_grads = run(fused.qkv_heads_reference, args, torch.float64)
    close = dict(atol=3e-2, rtol=3e-2) if dtype in HALF else dict(atol=1e-5, rtol=1e-5)
    for o, w in zip(out, want):
        assert o.dtype == dtype and o.is_contiguous()
        torch.testing.assert_close(o.double(), w, **close)
    for g, w in zip(grads, want_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, **close)


@needs_kernels
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("angle_dtype", [torch.bfloat16, torch.float32])
def test_qkv_heads_takes_autocasts_dtypes(weight_dtype, angle_dtype):
    # under autocast the projection is bfloat16, the norm weights and rotary tables float32:
    # q and k come out in the angles' dtype, v in the projection's, as the unfused chain gives
    args = inputs()
    out, grads = run(fused.qkv_heads, args, torch.bfloat16, weight_dtype, angle_dtype)
    want, want_grads = run(fused.qkv_heads_reference, args, torch.bfloat16, weight_dtype,
                           angle_dtype)
    assert [o.dtype for o in out] == [w.dtype for w in want] == [angle_dtype] * 2 + [torch.bfloat16]
    for o, w in zip(out + grads, want + want_grads):
        assert o.dtype == w.dtype
        torch.testing.assert_close(o.double(), w.double(), atol=3e-2, rtol=3e-2)


@needs_kernels
def test_qkv_heads_with_unused_outputs_and_no_rows():
    args = inputs()
    qkv = args["qkv"].clone().requires_grad_()
    q, k, v = fused.qkv_heads(**{**args, "qkv": qkv})
    q.sum().backward()  # k and v unused: their part of the gradient is zero
    ref = args["qkv"].clone().requires_grad_()
    fused.qkv_heads_reference(**{**args, "qkv": ref})[0].sum().backward()
    torch.testing.assert_close(qkv.grad, ref.grad)
    assert qkv.grad[:, 4 * 8:].abs().sum() == 0
    empty = inputs(B=2, T=0, src=False, groups=False)
    qkv = empty["qkv"].requires_grad_()
    q, k, v = fused.qkv_heads(**{**empty, "qkv": qkv})
    assert q.shape == (2, 0, 4, 8) and v.shape == (2, 0, 2, 8)
    (q.sum() + k.sum()).backward()
    assert qkv.grad.shape == (0, 64)


@needs_kernels
def test_qkv_heads_checks_its_arguments():
    args = inputs()
    m = torch.ops.moe_ops
    cos, sin = args["cos"].squeeze(2), args["sin"].squeeze(2)
    base = (args["qkv"], args["src"], args["group"], args["q_weight"], args["k_weight"], cos, sin,
            4, 2, 1e-5)
    with pytest.raises(RuntimeError, match="permutation"):
        m.qkv_heads(args["qkv"], torch.zeros(10, dtype=torch.long), *base[2:])
    with pytest.raises(RuntimeError, match="group ids must be in"):
        m.qkv_heads(*base[:2], torch.full((10,), 3), *base[3:])
    with pytest.raises(RuntimeError, match="qkv must be a contiguous"):
        m.qkv_heads(args["qkv"][:, :-8], *base[1:])
    with pytest.raises(RuntimeError, match="need group ids"):
        m.qkv_heads(*base[:2], None, *base[3:])


@needs_kernels
def test_qkv_heads_pass_opcheck():
    m = torch.ops.moe_ops
    for args in (inputs(), inputs(norm=False, src=False)):
        cos, sin = args["cos"].squeeze(2), args["sin"].squeeze(2)
        fwd = (args["qkv"], args["src"], args["group"], args["q_weight"], args["k_weight"], cos,
               sin, 4, 2, 1e-5)
        torch.library.opcheck(m.qkv_heads, fwd)
        q, k, v = m.qkv_heads(*fwd)
        grads = (torch.randn_like(q).transpose(1, 2).contiguous().transpose(1, 2),  # strided
                 torch.randn_like(k), torch.randn_like(v))
        torch.library.opcheck(m.qkv_heads_backward, grads + fwd[:7] + (1e-5,))


@pytest.mark.parametrize("layers,untie,grouped", [("dense", None, False), ("mot", "ffn", True),
                                                  ("mot", "all", True), ("mot", "all", False)])
def test_attention_heads_equal_the_reference(layers, untie, grouped):
    # the attention's q, k, v: the compiled pass where built, else the chain of separate ops
    mods = [{"name": n, "vocab_size": 8} for n in ("text", "image", "audio")]
    cfg = ModelConfig(modalities=mods, dim=32, n_heads=4, n_kv_heads=2, n_layers=1,
                      max_seq_len=16, layers=layers,
                      blocks={"mot": {"untie": untie}} if untie else {})
    torch.manual_seed(0)
    attn = TransformerLayer(cfg, cfg.layer_block(0)).attn
    for norm in (attn.q_norm, attn.k_norm):
        torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    B, T = 2, 7
    modality = torch.randint(0, 3, (B, T))
    groups = Grouping.from_ids(modality, 3, grouped=grouped) if layers == "mot" else modality
    rows = (B * T,) if grouped else (B, T)
    qkv = torch.randn(*rows, attn.wqkv(torch.zeros(*rows, 32), groups).shape[-1])
    rope = Rotary(cfg.head_dim, cfg.rope_theta)(torch.arange(T).expand(B, T), torch.float32)
    params = [attn.q_norm.weight, attn.k_norm.weight]
    per_modality = attn.q_norm.weight.dim() == 2
    reference = dict(heads=4, kv_heads=2, cos=rope[0], sin=rope[1], eps=cfg.norm_eps,
                     src=groups.position if grouped else None,
                     group=modality.reshape(-1) if per_modality else None)

    def grads(fn):
        x = qkv.clone().requires_grad_()
        out = fn(x)
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in out)
        return out, torch.autograd.grad(loss, [x] + params)

    out, got = grads(lambda x: attn.heads(x, groups, rope))
    want, want_grads = grads(lambda x: fused.qkv_heads_reference(
        x, q_weight=params[0], k_weight=params[1], **reference))
    for a, b in zip(out + got, want + want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
