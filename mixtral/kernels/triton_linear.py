"""Weight-only quantized matmul for GPUs (Triton): y = x @ w.T with w in one of the model's stored forms (`weights.py`:
int8, int4, fp8), dequantized in registers, so that a memory-bound decode step reads 1 byte (int8, fp8) or 0.53 to
0.63 byte (int4 of groups of 128 to 32, its bf16 scales and zeros included) per weight. The attention projections
and the LM head call it through `ops.linear`.

One launch, float32 sums, the result in x's dtype, nothing allocated but the result and nothing read on the host: a
decode step stays capturable in a CUDA graph. It computes x @ w.dequantize(x.dtype).T (each weight dequantized as the
reference does, in float32, rounded once to x's dtype) up to the order of the sums; `_linear_triton.py` has the
layouts and the kernel.

Tiles (`default_config`): one row (decode at batch 1) runs without tl.dot (which pads rows to 16), each program a
narrow band of output channels (16 for int8 / fp8, 32 for int4) over all of K, for many programs (wq: 256 / 128; wk
and wv, 1024 rows: 64 / 32); 2 to 32 rows tl.dot tiles of 16 or 32 rows, still 32 channels wide; more rows (prefill)
64 x 128 tiles that reuse each dequantized weight tile across 64 rows. No split over K: its partial sums would need
a float32 buffer and a second pass (or atomics on a zeroed one), more than this op's one launch and one allocation.
Chosen from the compiled code (registers, spills, where the loads fall; ptxas for sm_90), not yet timed on a GPU:
`config=` overrides them.

Shape legend: M rows, N output channels, K input channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fused_moe import fp8_unavailable_reason, triton_unavailable_reason
from .weights import QuantizedView, QuantizedWeight

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class LinearConfig:
    """Tile sizes of the kernel, powers of two. block_m = 1: one program per row, no tl.dot (else at least 16, as
    block_n and block_k: tl.dot's smallest tile). block_k is the step over K (int4: in tiles of at most the group
    size, unrolled). One row accumulates a [block_k, block_n] float32 tile: mind the registers."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        sizes = (self.block_m, self.block_n, self.block_k)
        if any(b & (b - 1) for b in sizes) or not (self.block_m == 1 or self.block_m >= 16) or min(sizes[1:]) < 16:
            raise ValueError(f"tile sizes must be powers of two, block_m 1 or >= 16, the others >= 16: {sizes}")


def default_config(M: int, mode: str) -> LinearConfig:
    """Tiles for M rows of x and weights in `mode` (int8, fp8 or int4).

    One row: each program reads all of K for a narrow band of output channels, a whole step's loads in flight at
    once (this loop has no tl.dot, so triton does not pipeline it): int8 / fp8 16 rows x 1024 bytes a step over 8
    warps; int4 32 rows x 256 columns (group-sized tiles). An int4 block holds 32 contiguous bytes per k for its 64
    rows: 32 output channels a program take half of each (its neighbour, running at the same time, the other half)
    for twice as many programs as whole blocks would give. 2 to 32 rows: tl.dot tiles of 16 or 32 rows, narrow in N,
    their loads pipelined through shared memory. More rows (prefill): 64 x 128 tiles, each dequantized weight tile
    used by 64 rows."""
    int4 = mode == "int4"
    if M == 1:
        return LinearConfig(1, 32, 256, num_warps=4) if int4 else LinearConfig(1, 16, 1024, num_warps=8)
    if M <= 32:
        return LinearConfig(16 if M <= 16 else 32, 32, 128, num_warps=4, num_stages=4)
    return LinearConfig(64, 128, 64, num_warps=4, num_stages=3)


def unavailable_reason(x: torch.Tensor, w: QuantizedView | QuantizedWeight) -> str | None:
    """Why `linear(x, w)` cannot run here, or None when it can: no triton, x neither on a CUDA GPU nor interpreted
    (TRITON_INTERPRET=1), fp8 on a GPU older than Ada/Hopper, gradients needed (the kernel has no backward), or
    arguments it does not take (a weight that is not one quantized matrix or not on x's device, x not bf16 / fp16 /
    float32 [M, K])."""
    reason = triton_unavailable_reason(x.device)
    if reason is not None:
        return reason
    if not isinstance(w, QuantizedView | QuantizedWeight) or len(w.shape) != 2:
        return "the weight is not one quantized matrix (a QuantizedView or QuantizedWeight of 2 dims)"
    if x.dtype not in ACTIVATION_DTYPES or x.dim() != 2:
        return f"x must be [M, K] in one of {ACTIVATION_DTYPES}, got {x.dtype} {tuple(x.shape)}"
    tensors = w.view_all().tensors if isinstance(w, QuantizedWeight) else w.tensors
    if any(t.device != x.device for t in tensors):
        return f"the weight is on {tensors[0].device}, x on {x.device}"
    if w.mode == "fp8" and (reason := fp8_unavailable_reason(x.device)) is not None:
        return reason
    if torch.is_grad_enabled() and x.requires_grad:
        return "gradients are needed and the kernel has no backward"
    return None


def linear(
    x_MK: torch.Tensor, w: QuantizedView | QuantizedWeight, *, config: LinearConfig | None = None
) -> torch.Tensor:
    """x [M, K] @ w.T -> [M, N] in x's dtype, w a quantized matrix [N, K] (int8, int4 or fp8) on x's device. Where it
    cannot run (`unavailable_reason`) that is an error: `ops.linear` is the entry that falls back."""
    reason = unavailable_reason(x_MK, w)
    if reason is not None:
        raise RuntimeError(f"the quantized linear Triton kernel cannot run: {reason}")
    from ._linear_triton import launch_linear, operand  # triton imported only now: it is optional

    view = w.view_all() if isinstance(w, QuantizedWeight) else w
    return launch_linear(x_MK, operand(view, stacked=False), config or default_config(x_MK.shape[0], view.mode))
