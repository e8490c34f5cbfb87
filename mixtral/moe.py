"""Sparse mixture-of-experts: routing and expert dispatch.

The router picks each token's top-k experts; the chosen experts run through `kernels.ops`, by one of the
dispatch paths that compute the same function side by side:
- "grouped" (`ops.experts`): tokens sorted by expert so that each expert runs one matmul over a contiguous slice
  of its tokens (a single token runs its k experts directly);
- "reference" (`experts_reference`, below): a plain loop over experts, each applied to the tokens that chose it,
  on dequantized weights: the path the others are checked against;
- "triton" (`ops.experts_triton`): the fused Triton kernel (GPUs), the grouped path where it cannot run;
- "dense" (`ops.experts_dense`): every token through every expert, weighted (0 for the unchosen): fixed shapes,
  nothing read on the host, for a step compiled whole or captured in a CUDA graph without the Triton kernel.

Expert or tensor parallelism (`parallel.py`) wraps whichever path is chosen through `MoE.dispatch_hook`.

Shape legend: T tokens, D model dim, E experts, F expert hidden dim, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import ModelConfig
from .kernels import ops
from .kernels.ops import Experts, Routing

MOE_IMPLS = ("grouped", "reference", "triton", "dense")


def route(router_logits_TE: torch.Tensor, top_k: int) -> Routing:
    """Top-k experts per token and their weights: the softmax over the k chosen logits.

    The softmax runs in float32 (as in the reference implementations) so that bf16 router logits give
    stable weights; it equals softmax over all experts followed by renormalising the chosen k.
    Returns (weights_TK float32, indices_TK int64).
    """
    top_logits_TK, idx_TK = torch.topk(router_logits_TE.float(), top_k, dim=-1)
    return Routing(torch.softmax(top_logits_TK, dim=-1), idx_TK)


def experts_reference(x_TD: torch.Tensor, experts: Experts, routing: Routing) -> torch.Tensor:
    """Obviously-correct dispatch: for each expert, run it on the tokens that picked it, scale, add.
    Quantized experts are dequantized first: this path is the reference their kernels are checked against."""
    weights_TK, idx_TK = routing
    out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for e in range(experts.n):
        tok, slot = torch.where(idx_TK == e)
        if tok.numel() == 0:
            continue
        y = ops.swiglu_reference(x_TD[tok], *experts[e])
        out_TD.index_add_(0, tok, y.float() * weights_TK[tok, slot, None])
    return out_TD.to(x_TD.dtype)


_DISPATCH = {
    "grouped": ops.experts,
    "reference": experts_reference,
    "triton": ops.experts_triton,
    "dense": ops.experts_dense,
}


class MoE(nn.Module):
    """The sparse MoE block that replaces the dense FFN: a router and stacked SwiGLU experts."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, D, F_ = config.n_experts, config.dim, config.hidden_dim
        self.top_k = config.top_k
        self.gate = nn.Linear(D, E, bias=False)  # the router
        # Experts stored stacked [E, out, in]: grouped matmuls, per-expert quantization and
        # expert-parallel sharding (split dim 0) all work on these tensors directly.
        self.w1 = nn.Parameter(torch.empty(E, F_, D))
        self.w2 = nn.Parameter(torch.empty(E, D, F_))
        self.w3 = nn.Parameter(torch.empty(E, F_, D))
        self.impl = "grouped"
        # Replaces the local expert computation when set (expert/tensor parallelism, see parallel.py):
        # called as hook(x_TD, experts, routing, local) where `local` is the chosen path.
        self.dispatch_hook: Callable[..., torch.Tensor] | None = None
        # Training only: multiply the router's input by U(1 - j, 1 + j) noise (0 turns it off).
        self.router_jitter = 0.0

    @property
    def experts(self) -> Experts:
        return Experts(self.w1, self.w2, self.w3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output with x's shape, router logits [tokens, E])."""
        x_TD = x.reshape(-1, x.shape[-1])
        router_in = x_TD
        if self.training and self.router_jitter > 0:
            router_in = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
        router_logits_TE = ops.project(self.gate, router_in)
        out_TD = self.dispatch(x_TD, route(router_logits_TE, self.top_k))
        return out_TD.view(x.shape), router_logits_TE

    @property
    def host_sync_free(self) -> bool:
        """Whether the dispatch runs on the device alone (no host reads), as a CUDA graph needs: the Triton kernel
        where it can run on these weights, or the dense path; no parallelism hook."""
        if self.dispatch_hook is not None:
            return False
        if self.impl == "triton":
            from .kernels.fused_moe import triton_unavailable_reason

            device = self.w1.device if isinstance(self.w1, torch.Tensor) else next(self.w1.buffers()).device
            return triton_unavailable_reason(device) is None
        return self.impl == "dense"

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Run the chosen experts (the step that depends on routing decisions: `generate.compile_model` keeps
        it out of compiled graphs)."""
        local = _DISPATCH[self.impl]
        if self.dispatch_hook is None:
            return local(x_TD, self.experts, routing)
        return self.dispatch_hook(x_TD, self.experts, routing, local)
