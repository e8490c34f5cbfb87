"""Fused MoE experts for GPUs: every expert of a layer in one grouped-GEMM launch per projection (Triton).

The computation, the same function as `ops.experts` (its reference; `ops.experts_triton` falls back to it where
this kernel cannot run):
1. `align_by_expert`: the T*K (token, expert) pairs sorted by expert, each expert's group padded to a
   multiple of BLOCK_M so that every block of BLOCK_M rows belongs to one expert. Tensor ops only, on
   the device, with no host synchronisation (the buffers are sized for the worst case), so the kernel
   path can be captured in a CUDA graph.
2. gate/up kernel, one launch: program (block, tile of F) computes silu(x W1[e]^T) * (x W3[e]^T) for its
   block's rows, both products sharing each loaded tile of x; the result h is rounded once to x's dtype.
3. down kernel, one launch: program (block, tile of D) computes h W2[e]^T, multiplies each row by its
   pair's router weight (in float32, in the kernel) and writes it to row `pair` of y [T*K, D] (float32).
4. out = y summed over each token's K rows in float32, then rounded: as the reference does, the K
   contributions of a token are added once (deterministic: no atomics).

Expert weights are the model's dtype, or the model's quantized stacks (`weights.QuantizedWeight`, as
`quantize.quantize_model` leaves them: int8, int4 of any group size, fp8; the three of one format), each weight
dequantized in registers as `QuantizedView.dequantize` does it (in float32, rounded once to x's dtype) before its
tile's tl.dot: a memory-bound decode step reads one byte (int8, fp8) or 0.53-0.63 byte (int4) per weight, and the result
is the reference's (`moe.experts_reference` on the same stack) up to the order of the float32 sums.
`_linear_triton.py` has the layouts and how a tile of each is read.

Shape legend: T tokens, D model dim, E experts, F expert hidden dim, K experts per token, P = T*K pairs.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from .weights import QuantizedView, QuantizedWeight


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of the two kernels (BLOCK_M is shared: it is the padding of the expert groups)."""

    block_m: int = 64
    up_n: int = 128  # gate/up kernel: tile of F
    up_k: int = 64  # gate/up kernel: step over D
    down_n: int = 128  # down kernel: tile of D
    down_k: int = 64  # down kernel: step over F
    num_warps: int = 4
    num_stages: int = 3


# Decode (few pairs): small row blocks; narrow output tiles give enough programs to keep every SM loading
# weights, which is all a memory-bound step does. Prefill: larger tiles reuse each weight tile across rows.
DECODE_CONFIG = KernelConfig(block_m=16, up_n=64, up_k=128, down_n=32, down_k=128, num_warps=4, num_stages=4)
PREFILL_CONFIG = KernelConfig()
# Quantized experts: the dequantization's registers on top of the two 64 x 128 float32 accumulators take 4 warps of
# the gate/up kernel to 255 registers a thread and spills (int4; ptxas for sm_90); 8 warps halve the accumulators'.
# (int4 steps over K in group-sized tiles: a step of 128 is 4 tiles of a group of 32.)
PREFILL_CONFIG_QUANTIZED = KernelConfig(num_warps=8)


def default_config(n_pairs: int, n_experts: int, quantized: bool = False) -> KernelConfig:
    if n_pairs <= 4 * n_experts * 16:
        return DECODE_CONFIG
    return PREFILL_CONFIG_QUANTIZED if quantized else PREFILL_CONFIG


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); pip install triton"
    return None


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """Why the Triton kernel cannot run on tensors of `device` here, or None when it can."""
    device = torch.device(device)
    if (error := _triton_import_error()) is not None:
        return error
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"tensors on {device} need a CUDA GPU (or TRITON_INTERPRET=1 to interpret the kernel on the CPU)"


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_unavailable_reason(device: torch.device | str) -> str | None:
    """Why a kernel cannot read fp8 weights on `device`, or None: triton converts float8 e4m3 on GPUs of compute
    capability 8.9 on (Ada, Hopper), not before."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if _capability(device.index if device.index is not None else torch.cuda.current_device()) < (8, 9):
        return "fp8 weights need a GPU of compute capability 8.9 or newer (Ada, Hopper)"
    return None


Weight = torch.Tensor | QuantizedWeight | QuantizedView


def unavailable_reason(x_TD: torch.Tensor, *weights: Weight) -> str | None:
    """Why the kernel cannot run on these tensors (no triton, tensors neither on a GPU nor interpreted, activations
    not bf16 / fp16 / float32, expert weights on another device or of mixed formats, fp8 on a GPU older than
    Ada/Hopper, or gradients needed: the kernel has no backward), or None when it can. `weights`: the experts' (w1,
    w2, w3), then any other tensor whose gradient matters."""
    reason = triton_unavailable_reason(x_TD.device)
    if reason is None and x_TD.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        reason = f"activations in {x_TD.dtype}: the kernel takes bf16, fp16 or float32"
    quantized = [w for w in weights if isinstance(w, QuantizedWeight | QuantizedView)]
    stored = [t for w in weights[:3] for t in _tensors(w)]
    if reason is None and any(t.device != x_TD.device for t in stored):
        reason = f"expert weights on {stored[0].device}, activations on {x_TD.device}"
    if reason is None and quantized:
        modes = {w.mode for w in quantized}
        if len(quantized) != 3 or len(modes) != 1:
            reason = "the expert weights are of mixed formats (plain and quantized, or two quantized formats)"
        elif modes == {"fp8"}:
            reason = fp8_unavailable_reason(x_TD.device)
    tensors = [t for t in (x_TD, *weights) if isinstance(t, torch.Tensor)]
    if reason is None and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        reason = "gradients are needed and the kernel has no backward"
    return reason


def align_by_expert(idx_TK: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs sorted by expert, each expert's group padded to a multiple of `block_m`.

    Returns (pair_ids int32 [n_blocks * block_m], block_expert int32 [n_blocks]): pair_ids holds flat
    pair indices t*K + k (P marks a padding row); block_expert the expert of each block, -1 for the
    blocks beyond the last group (the buffers are sized for the worst case, P + E*(block_m - 1) rows).
    """
    flat = idx_TK.reshape(-1)
    P = flat.numel()
    device = flat.device
    # scatter_add rather than bincount: bincount reads its input's max on the host (a synchronisation).
    counts = torch.zeros(n_experts, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)
    e_sorted = flat[order]
    first_sorted = counts.cumsum(0) - counts  # where each expert's pairs begin in sorted order
    dest = starts[e_sorted] + torch.arange(P, device=device) - first_sorted[e_sorted]
    n_blocks = -(-(P + n_experts * (block_m - 1)) // block_m)
    pair_ids = torch.full((n_blocks * block_m,), P, dtype=torch.int32, device=device)
    pair_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(n_blocks, device=device) * block_m
    block_expert = torch.searchsorted(ends, block_start, right=True)  # the first expert ending after it
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return pair_ids, block_expert


def _tensors(w: Weight) -> tuple[torch.Tensor, ...]:
    if isinstance(w, QuantizedWeight):
        w = w.view_all()
    return w.tensors if isinstance(w, QuantizedView) else (w,)


def fused_experts(
    x_TD: torch.Tensor,
    w1_EFD: Weight,
    w2_EDF: Weight,
    w3_EFD: Weight,
    weights_TK: torch.Tensor,
    idx_TK: torch.Tensor,
    *,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """MoE experts through the fused Triton kernel (the same result as `ops.experts`). The experts: plain tensors in
    x's dtype, or quantized stacks (`QuantizedWeight`, int8 / int4 / fp8, the three of one format). Where it cannot
    run (`unavailable_reason`) that is an error: `ops.experts_triton` is the entry that falls back."""
    reason = unavailable_reason(x_TD, w1_EFD, w2_EDF, w3_EFD, weights_TK)
    if reason is not None:
        raise RuntimeError(f"the fused MoE Triton kernel cannot run: {reason}")
    if isinstance(w1_EFD, torch.Tensor) and w1_EFD.dtype != x_TD.dtype:
        raise TypeError(f"expert weights are {w1_EFD.dtype} but activations {x_TD.dtype}")
    from ._fused_moe_triton import launch  # triton imported only now: it is optional
    from ._linear_triton import operand

    T, K = idx_TK.shape
    if T == 0:
        return x_TD.new_zeros(x_TD.shape)
    config = config or default_config(T * K, w1_EFD.shape[0], quantized=not isinstance(w1_EFD, torch.Tensor))
    pair_ids, block_expert = align_by_expert(idx_TK, w1_EFD.shape[0], config.block_m)
    y_PD = launch(
        x_TD.contiguous(),
        *(operand(w, stacked=True) for w in (w1_EFD, w2_EDF, w3_EFD)),
        weights_TK.reshape(-1).float().contiguous(),
        pair_ids,
        block_expert,
        K,
        config,
    )
    return y_PD.view(T, K, -1).sum(dim=1).to(x_TD.dtype)
