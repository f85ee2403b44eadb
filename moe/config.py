"""`MoEConfig`: every option of the sparse MoE block, checked on construction.

`moe` does not import `mot`, so the checks here are self-contained; messages name the field as
`moe.<field>` and give the valid range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROUTERS = ("topk", "expert_choice")
SCORES = ("softmax", "sigmoid")
DROP_POLICIES = ("probability", "position")
BALANCE_LOSSES = ("batch", "sequence")
IMPLEMENTATIONS = ("grouped", "padded", "loop", "megablocks")


def _fail(message: str):
    raise ValueError(message)


@dataclass
class MoEConfig:
    """A sparse mixture of SwiGLU experts.

    dim, hidden: model width and each expert's FFN width (the backbone fills them when None).
    router: "topk" (token choice) or "expert_choice" (each expert takes its top tokens; it ranks
        tokens of the whole batch, so in a causal model a token's routing depends on later tokens:
        the leak the MoT paper warns about; use it for ablations, not for generation).
    score: "softmax" or "sigmoid" router scores; renormalize: divide the top-k weights by their
        sum. None (default) means True for top_k > 1 and False for top_k = 1: a single weight
        renormalised is always 1, and the router would then learn from the auxiliary losses only
        (Switch keeps the raw probability for top-1; Mixtral renormalises its top-2).
    jitter: multiplicative input noise U(1 - jitter, 1 + jitter) on the router input in training.
    bias_balancing: DeepSeek-V3 auxiliary-loss-free balancing: a per-expert bias added to the
        scores for selection only, moved by `bias_update_rate` toward uniform load by
        `MoE.update_bias()` after each optimizer step (outside the gradient).
    capacity_factor: None for dropless; else each expert takes at most
        ceil(capacity_factor * tokens * top_k / num_experts) slots, the rest are dropped by
        `drop_policy` ("probability": lowest router weight first; "position": later tokens and
        later choices first, as GShard).
    balance_loss: coefficient of the load-balancing loss (see `moe.losses`), computed over the
        whole batch or per sequence (`balance_loss_type`); z_loss: coefficient of the router
        z-loss. Both reach the gradient through the block's output (no global list).
    shared_experts: always-on experts (DeepSeek / Qwen2-MoE), one SwiGLU of width
        shared_experts * (shared_hidden or hidden); shared_gate: Qwen2-MoE's sigmoid gate on it.
    experts_per_modality: MoMa: experts split into consecutive groups, one per modality; a token
        is routed only among its modality's experts (needs modality ids).
    implementation: "grouped" (grouped GEMM over each expert's rows), "padded" (GShard's
        layout: every expert padded to the same rows -- the capacity, or the largest group --
        and one batched matmul; it computes the padding too, so it pays off only for small
        experts with even load, see README), "loop" (per-expert reference), or "megablocks"
        (megablocks' dropless MoE; needs that package and CUDA).
    """

    dim: int | None = None
    hidden: int | None = None
    num_experts: int = 8
    top_k: int = 2
    router: str = "topk"
    score: str = "softmax"
    renormalize: bool | None = None
    jitter: float = 0.0
    bias_balancing: bool = False
    bias_update_rate: float = 1e-3
    capacity_factor: float | None = None
    drop_policy: str = "probability"
    balance_loss: float = 0.01
    balance_loss_type: str = "batch"
    z_loss: float = 1e-3
    shared_experts: int = 0
    shared_hidden: int | None = None
    shared_gate: bool = False
    experts_per_modality: list[int] = field(default_factory=list)
    implementation: str = "grouped"

    def __post_init__(self):
        for name in ("dim", "hidden", "shared_hidden"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value > 0):
                _fail(f"moe.{name} ({value!r}) must be a positive integer")
        if not (isinstance(self.num_experts, int) and self.num_experts > 0):
            _fail(f"moe.num_experts ({self.num_experts!r}) must be a positive integer")
        if not (isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts):
            _fail(f"moe.top_k ({self.top_k!r}) must be in [1, moe.num_experts "
                  f"({self.num_experts})]")
        for name, valid in (("router", ROUTERS), ("score", SCORES),
                            ("drop_policy", DROP_POLICIES),
                            ("balance_loss_type", BALANCE_LOSSES),
                            ("implementation", IMPLEMENTATIONS)):
            if getattr(self, name) not in valid:
                _fail(f"moe.{name} ({getattr(self, name)!r}) must be one of {list(valid)}")
        if self.renormalize is None:
            self.renormalize = self.top_k > 1
        if not 0 <= self.jitter < 1:
            _fail(f"moe.jitter ({self.jitter}) must be in [0, 1)")
        if self.bias_update_rate < 0:
            _fail(f"moe.bias_update_rate ({self.bias_update_rate}) must be >= 0")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            _fail(f"moe.capacity_factor ({self.capacity_factor}) must be > 0, or None for "
                  "dropless")
        if self.router == "expert_choice" and self.capacity_factor is None:
            self.capacity_factor = 1.0  # expert choice always fills a fixed capacity
        for name in ("balance_loss", "z_loss"):
            if getattr(self, name) < 0:
                _fail(f"moe.{name} ({getattr(self, name)}) must be >= 0")
        if not (isinstance(self.shared_experts, int) and self.shared_experts >= 0):
            _fail(f"moe.shared_experts ({self.shared_experts!r}) must be an integer >= 0")
        if self.experts_per_modality:
            groups = self.experts_per_modality
            if any(not isinstance(n, int) or n < 1 for n in groups) \
                    or sum(groups) != self.num_experts:
                _fail(f"moe.experts_per_modality ({groups}) must be positive and sum to "
                      f"moe.num_experts ({self.num_experts})")
            if self.top_k > min(groups):
                _fail(f"moe.top_k ({self.top_k}) must be <= the smallest modality group "
                      f"({min(groups)})")
            if self.router != "topk":
                _fail("moe.experts_per_modality needs moe.router 'topk'")
        if self.implementation == "megablocks" and (self.router != "topk" or self.shared_experts
                                                     or self.experts_per_modality
                                                     or self.capacity_factor is not None):
            _fail("moe.implementation 'megablocks' supports dropless top-k routing only "
                  "(router 'topk', capacity_factor None, no shared experts or modality groups)")

    def capacity(self, tokens: int) -> int:
        """Slots per expert for `tokens` tokens: ceil(capacity_factor * tokens * k / E)."""
        import math

        return math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts)

    def build(self):
        from moe.moe import MoE

        return MoE(self)
