"""Sparse mixture-of-experts: routing and expert dispatch.

Dispatch paths compute the same function side by side:
- `experts_reference`: a plain loop over experts, each applied to the tokens that chose it;
- `experts_grouped`: tokens sorted by expert so that each expert runs one matmul over a contiguous
  slice of its tokens; experts that nobody chose cost nothing. A single token (decode at batch 1) goes
  to `experts_decode` instead: its K chosen experts run directly, with no sorting, counting or
  scattering, and no Python work that depends on the number of experts;
- `experts_triton`: the fused Triton kernel of `mixtral/kernels` (GPUs), falling back to `experts_grouped`
  where it cannot run.

Expert or tensor parallelism (`parallel.py`) wraps whichever path is chosen through `MoE.dispatch_hook`.

Shape legend: T tokens, D model dim, E experts, F expert hidden dim, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kernels import cpu as cpu_kernels
from .quantize import (
    FUSED_MIN_ROWS,
    FUSED_ROWS,
    QuantizedView,
    QuantizedWeight,
    dequantized,
    kernel_tensors,
    linear,
    project,
)

MOE_IMPLS = ("grouped", "reference", "triton")


def route(router_logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their weights: the softmax over the k chosen logits.

    The softmax runs in float32 (as in the reference implementations) so that bf16 router logits give
    stable weights; it equals softmax over all experts followed by renormalising the chosen k.
    Returns (weights_TK float32, indices_TK int64).
    """
    top_logits_TK, idx_TK = torch.topk(router_logits_TE.float(), top_k, dim=-1)
    return torch.softmax(top_logits_TK, dim=-1), idx_TK


def swiglu(x: torch.Tensor, w1_FD, w2_DF, w3_FD) -> torch.Tensor:
    """One SwiGLU expert: w2( silu(w1 x) * (w3 x) ). The weights are tensors or quantized weights
    (`quantize.py`), whose kernels compute the same products. A few rows of bf16 on a CPU with the kernels
    (an expert's tokens in a prefill) go to one fused call (`cpu_decode.cpp`'s `swiglu`, `swiglu_int8`,
    `swiglu_int4`): the op-by-op expert on bf16 or dequantized weights (int8: the same sums and roundings; int4:
    the sums in another order), without writing out and reading back the two [rows, F] products for silu and
    the multiplication, and reading the quantized bytes."""
    kind = _fused_rows(x, w1_FD, w2_DF, w3_FD)
    if kind == "bf16":
        return cpu_kernels.ops().swiglu(x, w1_FD, w2_DF, w3_FD)
    if kind == "int8":
        return cpu_kernels.ops().swiglu_int8(x, *w1_FD.tensors, *w2_DF.tensors, *w3_FD.tensors)
    if kind == "int4":
        return cpu_kernels.ops().swiglu_int4(x, *w1_FD.tensors, *w2_DF.tensors, *w3_FD.tensors, w1_FD.group_size)
    return linear(F.silu(linear(x, w1_FD)) * linear(x, w3_FD), w2_DF)


def _fused_rows(x: torch.Tensor, *weights) -> str | None:
    """Which fused call `swiglu` can make ("bf16", "int8" or "int4"), or None: 2 (quantized: FUSED_MIN_ROWS) to
    FUSED_ROWS rows (per format) of bf16 without gradients on a CPU with the kernels; contiguous bf16 weights, or
    int8 / int4 views (one group size) with bf16 scales; dims multiples of 32 (int4: of 64 and of the group size)."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.dim() != 2 or torch.is_grad_enabled():
        return None
    if x.shape[0] < 2 or not x.is_contiguous() or cpu_kernels.ops() is None:
        return None
    D = x.shape[1]
    if all(isinstance(w, torch.Tensor) and w.dtype == x.dtype and w.is_contiguous() for w in weights):
        F_ = weights[1].shape[1]
        return "bf16" if D % 32 == 0 and F_ % 32 == 0 and x.shape[0] <= FUSED_ROWS["bf16"] else None
    views = [w for w in weights if isinstance(w, QuantizedView) and all(t.is_contiguous() for t in w.tensors)]
    if len(views) != 3 or len({(w.mode, w.group_size, w.dtype) for w in views}) != 1:
        return None
    if views[0].dtype != x.dtype:
        return None
    if not FUSED_MIN_ROWS[views[0].mode] <= x.shape[0] <= FUSED_ROWS[views[0].mode]:
        return None
    F_ = views[0].shape[0]
    if views[0].mode == "int8":
        return "int8" if D % 32 == 0 and F_ % 32 == 0 else None
    group = views[0].group_size
    return "int4" if all(n % 64 == 0 and n % group == 0 for n in (D, F_)) and group % 16 == 0 else None


def experts_reference(
    x_TD: torch.Tensor,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
    weights_TK: torch.Tensor,
    idx_TK: torch.Tensor,
) -> torch.Tensor:
    """Obviously-correct dispatch: for each expert, run it on the tokens that picked it, scale, add.
    Quantized experts are dequantized first: this path is the reference their kernels are checked against."""
    out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for e in range(w1_EFD.shape[0]):
        tok, slot = torch.where(idx_TK == e)
        if tok.numel() == 0:
            continue
        y = swiglu(x_TD[tok], dequantized(w1_EFD[e]), dequantized(w2_EDF[e]), dequantized(w3_EFD[e]))
        out_TD.index_add_(0, tok, y.float() * weights_TK[tok, slot, None])
    return out_TD.to(x_TD.dtype)


def grouped_by_expert(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    idx_TK: torch.Tensor,
    n_experts: int,
    expert: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Sort the T*K (token, expert) pairs by expert, run `expert(e, rows)` once per used expert on a
    contiguous slice of its rows, then scale by the router weights and sum each token's k outputs."""
    T, K = idx_TK.shape
    flat_idx = idx_TK.reshape(-1)
    order = torch.argsort(flat_idx, stable=True)  # pairs grouped by expert, token order kept inside
    token_of = order // K  # the token each sorted pair came from
    counts = torch.bincount(flat_idx, minlength=n_experts).tolist()  # slice bounds are needed on the host
    xs = x_TD[token_of]
    ys, start = [], 0
    for e, n in enumerate(counts):
        if n:
            ys.append(expert(e, xs[start : start + n]))
            start += n
    if not ys:  # no tokens
        return x_TD.new_zeros(x_TD.shape)
    return combine(ys, weights_TK.reshape(-1)[order], token_of, T)


def combine(ys: list[torch.Tensor], weights_P: torch.Tensor, token_of_P: torch.Tensor, T: int) -> torch.Tensor:
    """The experts' outputs (one after another: the pairs sorted by expert) scaled by their router weights and summed
    per token -> [T, D]: in float32, each token's k contributions added in pair order from 0, rounded once. On a CPU
    with the kernels (bf16, no gradients) one call (`cpu_decode.cpp`'s `combine`, the same products and sums in the
    same order) in place of the four ops below and their float32 buffers."""
    ops = cpu_kernels.ops() if not torch.is_grad_enabled() else None
    if ops is not None and ys[0].device.type == "cpu" and all(y.dtype == torch.bfloat16 for y in ys):
        return ops.combine([y.contiguous() for y in ys], weights_P.float().contiguous(), token_of_P.contiguous(), T)
    y_PD = torch.cat(ys).float() * weights_P[:, None]
    out_TD = torch.zeros((T, y_PD.shape[1]), dtype=torch.float32, device=y_PD.device)
    out_TD.index_add_(0, token_of_P, y_PD)
    return out_TD.to(ys[0].dtype)


def experts_grouped(
    x_TD: torch.Tensor,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
    weights_TK: torch.Tensor,
    idx_TK: torch.Tensor,
) -> torch.Tensor:
    """Grouped dispatch: sort the T*K (token, expert) pairs by expert, one matmul per used expert."""
    if idx_TK.shape[0] == 1 and not torch.is_grad_enabled():
        return experts_decode(x_TD, w1_EFD, w2_EDF, w3_EFD, weights_TK, idx_TK)
    return grouped_by_expert(
        x_TD, weights_TK, idx_TK, w1_EFD.shape[0], lambda e, h: swiglu(h, w1_EFD[e], w2_EDF[e], w3_EFD[e])
    )


def experts_decode(
    x_TD: torch.Tensor,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
    weights_TK: torch.Tensor,
    idx_TK: torch.Tensor,
) -> torch.Tensor:
    """For a handful of tokens (decode): each token runs its K chosen experts directly, indexing their
    weights in place (a view, no copy). Cost: T*K expert calls whatever the number of experts.

    The chosen ids are read on the host (one small read per layer: on a CPU that is no device sync).
    Scaling and the sum over the K experts happen in float32, rounded once, as in the other paths.
    bf16, int8 and int4 experts on a CPU with the AVX-512 kernels run as one fused call per token
    (`cpu_decode.cpp`: the same roundings, its matrix-vector products at the memory bandwidth)."""
    fused = _fused_cpu(x_TD, w1_EFD, w2_EDF, w3_EFD) if x_TD.shape[0] == 1 else None
    if fused is not None:
        ops, tensors = cpu_kernels.ops(), [t for ts in fused for t in ts]
        if not isinstance(w1_EFD, QuantizedWeight):
            return ops.experts(x_TD, *tensors, weights_TK, idx_TK)
        if w1_EFD.mode == "int8":
            return ops.experts_int8(x_TD, *tensors, weights_TK, idx_TK)
        return ops.experts_int4(x_TD, *tensors, weights_TK, idx_TK, w1_EFD.group_size)
    chosen = idx_TK.tolist()
    out_TD = torch.empty((x_TD.shape[0], x_TD.shape[1]), dtype=torch.float32, device=x_TD.device)
    for t, experts in enumerate(chosen):
        x = x_TD[t : t + 1]
        acc = None
        for k, e in enumerate(experts):
            y = swiglu(x, w1_EFD[e], w2_EDF[e], w3_EFD[e]).float() * weights_TK[t, k]
            acc = y if acc is None else acc + y
        out_TD[t : t + 1] = acc
    return out_TD.to(x_TD.dtype)


def _fused_cpu(x_TD: torch.Tensor, *weights: torch.Tensor | QuantizedWeight) -> list[list[torch.Tensor]] | None:
    """The experts' tensors as the CPU decode kernel takes them (`quantize.kernel_tensors`), or None where it
    cannot run: the kernels unavailable, x not bf16 on the CPU, weights of mixed formats or int4 group sizes,
    dims not multiples of 32 (int4: of 64)."""
    if x_TD.device.type != "cpu" or x_TD.dtype != torch.bfloat16 or cpu_kernels.ops() is None:
        return None
    tensors = [kernel_tensors(w) for w in weights]
    if any(ts is None for ts in tensors):
        return None
    kinds = {(w.mode, w.group_size) if isinstance(w, QuantizedWeight) else "bf16" for w in weights}
    if len(kinds) > 1:
        return None
    multiple = 64 if isinstance(weights[0], QuantizedWeight) and weights[0].mode == "int4" else 32
    if x_TD.shape[1] % multiple or weights[0].shape[1] % multiple:
        return None
    return tensors


def experts_triton(
    x_TD: torch.Tensor,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
    weights_TK: torch.Tensor,
    idx_TK: torch.Tensor,
) -> torch.Tensor:
    """The fused Triton kernel: one grouped-GEMM launch per projection for all experts. Where Triton cannot
    run (no triton, CPU tensors outside TRITON_INTERPRET=1, autograd) it is `experts_grouped`."""
    from .kernels import fused_experts  # imported on first use: triton is an optional dependency

    return fused_experts(x_TD, w1_EFD, w2_EDF, w3_EFD, weights_TK, idx_TK)


_DISPATCH = {"grouped": experts_grouped, "reference": experts_reference, "triton": experts_triton}


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
        # called as hook(x_TD, w1, w2, w3, weights_TK, idx_TK, local) where `local` is the chosen path.
        self.dispatch_hook: Callable[..., torch.Tensor] | None = None
        # Training only: multiply the router's input by U(1 - j, 1 + j) noise (0 turns it off).
        self.router_jitter = 0.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output with x's shape, router logits [tokens, E])."""
        x_TD = x.reshape(-1, x.shape[-1])
        router_in = x_TD
        if self.training and self.router_jitter > 0:
            router_in = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
        router_logits_TE = project(self.gate, router_in)
        weights_TK, idx_TK = route(router_logits_TE, self.top_k)
        out_TD = self.dispatch(x_TD, weights_TK, idx_TK)
        return out_TD.view(x.shape), router_logits_TE

    def dispatch(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
        """Run the chosen experts (the step that depends on routing decisions: `generate.compile_model` keeps
        it out of compiled graphs)."""
        local = _DISPATCH[self.impl]
        if self.dispatch_hook is None:
            return local(x_TD, self.w1, self.w2, self.w3, weights_TK, idx_TK)
        return self.dispatch_hook(x_TD, self.w1, self.w2, self.w3, weights_TK, idx_TK, local)
