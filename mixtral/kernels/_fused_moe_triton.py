"""The Triton kernels of the fused MoE (see `fused_moe.py` for the algorithm). Imported only when a kernel
runs: it needs triton, and TRITON_INTERPRET=1 must be set before this import to interpret on the CPU.
The kernels call only triton builtins (see the note in `_gate_up_kernel`).

Shape legend: T tokens, D model dim, E experts, F expert hidden dim, P = T*K pairs, R padded rows.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, D], rows contiguous
    w1_ptr,  # [E, F, D], contiguous
    w3_ptr,  # [E, F, D]
    s1_ptr,  # [E, F] float32 scales (int8 weights) or a dummy
    s3_ptr,
    h_ptr,  # [R, F] out: silu(x W1^T) * (x W3^T), one row per padded row
    pair_ids_ptr,  # [R] int32: flat pair index t*K + k, n_pairs for padding
    block_expert_ptr,  # [R / BLOCK_M] int32: expert of each block, -1 for unused blocks
    n_pairs,
    D,
    F,
    stride_xt,
    stride_we,
    stride_wf,
    stride_se,
    stride_hr,
    TOP_K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ids_ptr + rows)
    valid = pair < n_pairs
    tok = (pair // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < F
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]
    # [BLOCK_K, BLOCK_N] tile of W[e]^T: element (k, n) is W[e, n, k]
    w_offs = e * stride_we + offs_n[None, :].to(tl.int64) * stride_wf + offs_k[:, None]
    acc1 = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    acc3 = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = offs_k < D - k0
        a = tl.load(x_ptrs, mask=valid[:, None] & k_ok[None, :], other=0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        b1 = tl.load(w1_ptr + w_offs, mask=w_mask, other=0)
        b3 = tl.load(w3_ptr + w_offs, mask=w_mask, other=0)
        if HAS_SCALE:  # int8 -> activation dtype is exact (|q| <= 127); the scale comes after the sum
            b1 = b1.to(a.dtype)
            b3 = b3.to(a.dtype)
        acc1 = tl.dot(a, b1, acc1, input_precision=PRECISION)
        acc3 = tl.dot(a, b3, acc3, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_offs += BLOCK_K
    if HAS_SCALE:
        acc1 = acc1 * tl.load(s1_ptr + e * stride_se + offs_n, mask=n_ok, other=0.0)[None, :]
        acc3 = acc3 * tl.load(s3_ptr + e * stride_se + offs_n, mask=n_ok, other=0.0)[None, :]
    # SwiGLU in float32, rounded once below. (Only builtins in these kernels: tl.zeros, tl.sigmoid and the
    # like are library @jit functions, which the interpreter cannot call when triton was imported before
    # TRITON_INTERPRET=1 was set, e.g. by torch.compile in another test.)
    h = acc1 / (1.0 + tl.exp(-acc1)) * acc3
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hr + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr,  # [R, F]
    w2_ptr,  # [E, D, F], contiguous
    s2_ptr,  # [E, D] float32 scales or a dummy
    y_ptr,  # [P, D] float32 out: router weight * expert output, one row per pair
    pair_ids_ptr,
    block_expert_ptr,
    rw_ptr,  # [P] float32 router weights
    n_pairs,
    D,
    F,
    stride_hr,
    stride_we,
    stride_wd,
    stride_se,
    stride_yp,
    HAS_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ids_ptr + rows)
    valid = pair < n_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hr + offs_k[None, :]
    # [BLOCK_K, BLOCK_N] tile of W2[e]^T: element (k, n) is W2[e, n, k]
    w_offs = e * stride_we + offs_n[None, :].to(tl.int64) * stride_wd + offs_k[:, None]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        k_ok = offs_k < F - k0
        a = tl.load(h_ptrs, mask=valid[:, None] & k_ok[None, :], other=0)
        b = tl.load(w2_ptr + w_offs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        if HAS_SCALE:
            b = b.to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        w_offs += BLOCK_K
    if HAS_SCALE:
        acc = acc * tl.load(s2_ptr + e * stride_se + offs_n, mask=n_ok, other=0.0)[None, :]
    # The router weight of each row's (token, expert) pair, applied here rather than in a separate pass.
    acc = acc * tl.load(rw_ptr + pair, mask=valid, other=0.0)[:, None]
    y_ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_yp + offs_n[None, :]
    tl.store(y_ptrs, acc, mask=valid[:, None] & n_ok[None, :])


def launch(
    x_TD: torch.Tensor,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    rw_P: torch.Tensor,
    pair_ids: torch.Tensor,
    block_expert: torch.Tensor,
    top_k: int,
    config: Any,  # fused_moe.KernelConfig
) -> torch.Tensor:
    """Run both kernels; returns y [P, D] float32 (router-weighted expert outputs, one row per pair)."""
    T, D = x_TD.shape
    E, F_, _ = w1_EFD.shape
    P = T * top_k
    for name, w, shape in (("w1", w1_EFD, (E, F_, D)), ("w2", w2_EDF, (E, D, F_)), ("w3", w3_EFD, (E, F_, D))):
        if tuple(w.shape) != shape or not w.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {shape} tensor, got {tuple(w.shape)} (strides {w.stride()})")
    has_scale = scales is not None
    s1, s2, s3 = scales if has_scale else (rw_P, rw_P, rw_P)  # dummies: never read without HAS_SCALE
    precision = "ieee" if x_TD.dtype == torch.float32 else "tf32"  # fp32 stays exact, as torch's matmul
    R = pair_ids.numel()
    n_blocks = block_expert.numel()
    h_RF = torch.empty((R, F_), dtype=x_TD.dtype, device=x_TD.device)
    y_PD = torch.empty((P, D), dtype=torch.float32, device=x_TD.device)
    c = config
    _gate_up_kernel[(n_blocks, triton.cdiv(F_, c.up_n))](
        x_TD,
        w1_EFD,
        w3_EFD,
        s1,
        s3,
        h_RF,
        pair_ids,
        block_expert,
        P,
        D,
        F_,
        x_TD.stride(0),
        w1_EFD.stride(0),
        w1_EFD.stride(1),
        s1.stride(0) if has_scale else 0,
        h_RF.stride(0),
        TOP_K=top_k,
        HAS_SCALE=has_scale,
        PRECISION=precision,
        BLOCK_M=c.block_m,
        BLOCK_N=c.up_n,
        BLOCK_K=c.up_k,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )
    _down_kernel[(n_blocks, triton.cdiv(D, c.down_n))](
        h_RF,
        w2_EDF,
        s2,
        y_PD,
        pair_ids,
        block_expert,
        rw_P,
        P,
        D,
        F_,
        h_RF.stride(0),
        w2_EDF.stride(0),
        w2_EDF.stride(1),
        s2.stride(0) if has_scale else 0,
        y_PD.stride(0),
        HAS_SCALE=has_scale,
        PRECISION=precision,
        BLOCK_M=c.block_m,
        BLOCK_N=c.down_n,
        BLOCK_K=c.down_k,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )
    return y_PD
