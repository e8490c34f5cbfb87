"""The Triton kernels of the fused MoE (see `fused_moe.py` for the algorithm). Imported only when a kernel
runs: it needs triton, and TRITON_INTERPRET=1 must be set before this import to interpret on the CPU.
The kernels call only triton builtins and the @jit functions of `_linear_triton.py`, which reads a tile of the
experts in each of their formats (plain, int8 / fp8 with a scale per channel, int4 blocks); see the note there.

Shape legend: T tokens, D model dim, E experts, F expert hidden dim, P = T*K pairs, R padded rows.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._linear_triton import (
    Operand,
    channel_scales,
    dot,
    emulated_bf16,
    k_tiles,
    precision,
    rounded,
    tile_rows,
    weight_tile,
)


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, D], rows contiguous
    w1_ptr,  # [E, F, D] (see `Operand`: plain, q, or int4 blocks)
    w3_ptr,  # the same format and strides as w1
    s1_ptr,  # w1's scales (int8 / fp8), pairs (int4) or unread
    s3_ptr,
    h_ptr,  # [R, F] out: silu(x W1^T) * (x W3^T), one row per padded row
    pair_ids_ptr,  # [R] int32: flat pair index t*K + k, n_pairs for padding
    block_expert_ptr,  # [R / BLOCK_M] int32: expert of each block, -1 for unused blocks
    n_pairs,
    D,
    F,
    stride_xt,
    stride_we,
    stride_wn,
    stride_wg,
    stride_se,
    stride_sn,
    stride_sg,
    stride_hr,
    TOP_K: tl.constexpr,
    MODE: tl.constexpr,
    GROUP: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UNROLL: tl.constexpr,
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
    # the tile's output columns (rows of W), in the order of the weight tile's columns
    cols, w_cols, s_cols, w_ok = tile_rows(pid_n, F, stride_wn, stride_sn, MODE, BLOCK_N)
    w1 = w1_ptr + e * stride_we
    w3 = w3_ptr + e * stride_we
    s1 = s1_ptr + e * stride_se
    s3 = s3_ptr + e * stride_se
    scale1 = channel_scales(s1, s_cols, w_ok, MODE)
    scale3 = channel_scales(s3, s_cols, w_ok, MODE)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + tok[:, None] * stride_xt
    acc1 = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    acc3 = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K * UNROLL):
        for u in tl.static_range(UNROLL):  # int4 of small groups: several group-sized tiles a step
            kt = k0 + u * BLOCK_K
            k_ok = offs_k < D - kt
            a = tl.load(x_rows + (kt + offs_k)[None, :], mask=valid[:, None] & k_ok[None, :], other=0)
            # [BLOCK_K, BLOCK_N] tiles of W[e]^T, dequantized to x's dtype
            b1 = weight_tile(
                w1, s1, w_cols, s_cols, w_ok, scale1, kt, offs_k, k_ok, D, stride_wg, stride_sg, a.dtype, MODE,
                GROUP, EMULATE_BF16, BLOCK_K, BLOCK_N,
            )  # fmt: skip
            b3 = weight_tile(
                w3, s3, w_cols, s_cols, w_ok, scale3, kt, offs_k, k_ok, D, stride_wg, stride_sg, a.dtype, MODE,
                GROUP, EMULATE_BF16, BLOCK_K, BLOCK_N,
            )  # fmt: skip
            acc1 = dot(a, b1, acc1, EMULATE_BF16, PRECISION)
            acc3 = dot(a, b3, acc3, EMULATE_BF16, PRECISION)
    # SwiGLU in float32, rounded once below. (Only builtins and our @jit functions in these kernels: tl.zeros,
    # tl.sigmoid and the like are library @jit functions, which the interpreter cannot call when triton was
    # imported before TRITON_INTERPRET=1 was set, e.g. by torch.compile in another test.)
    h = acc1 / (1.0 + tl.exp(-acc1)) * acc3
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hr + cols[None, :]
    tl.store(h_ptrs, rounded(h, h_ptr.dtype.element_ty, EMULATE_BF16), mask=valid[:, None] & (cols < F)[None, :])


@triton.jit
def _down_kernel(
    h_ptr,  # [R, F]
    w2_ptr,  # [E, D, F] (see `Operand`)
    s2_ptr,
    y_ptr,  # [P, D] float32 out: router weight * expert output, one row per pair
    pair_ids_ptr,
    block_expert_ptr,
    rw_ptr,  # [P] float32 router weights
    n_pairs,
    D,
    F,
    stride_hr,
    stride_we,
    stride_wn,
    stride_wg,
    stride_se,
    stride_sn,
    stride_sg,
    stride_yp,
    MODE: tl.constexpr,
    GROUP: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UNROLL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ids_ptr + rows)
    valid = pair < n_pairs
    cols, w_cols, s_cols, w_ok = tile_rows(pid_n, D, stride_wn, stride_sn, MODE, BLOCK_N)
    w2 = w2_ptr + e * stride_we
    s2 = s2_ptr + e * stride_se
    scale2 = channel_scales(s2, s_cols, w_ok, MODE)
    offs_k = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + rows[:, None].to(tl.int64) * stride_hr
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K * UNROLL):
        for u in tl.static_range(UNROLL):
            kt = k0 + u * BLOCK_K
            k_ok = offs_k < F - kt
            a = tl.load(h_rows + (kt + offs_k)[None, :], mask=valid[:, None] & k_ok[None, :], other=0)
            b = weight_tile(
                w2, s2, w_cols, s_cols, w_ok, scale2, kt, offs_k, k_ok, F, stride_wg, stride_sg, a.dtype, MODE,
                GROUP, EMULATE_BF16, BLOCK_K, BLOCK_N,
            )  # fmt: skip
            acc = dot(a, b, acc, EMULATE_BF16, PRECISION)
    # The router weight of each row's (token, expert) pair, applied here rather than in a separate pass.
    acc = acc * tl.load(rw_ptr + pair, mask=valid, other=0.0)[:, None]
    y_ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_yp + cols[None, :]
    tl.store(y_ptrs, acc, mask=valid[:, None] & (cols < D)[None, :])


def launch(
    x_TD: torch.Tensor,
    w1: Operand,
    w2: Operand,
    w3: Operand,
    rw_P: torch.Tensor,
    pair_ids: torch.Tensor,
    block_expert: torch.Tensor,
    top_k: int,
    config: Any,  # fused_moe.KernelConfig
) -> torch.Tensor:
    """Run both kernels; returns y [P, D] float32 (router-weighted expert outputs, one row per pair)."""
    T, D = x_TD.shape
    E, F_ = w1.w.shape[0], w1.n
    P = T * top_k
    for name, w, shape in (("w1", w1, (F_, D)), ("w2", w2, (D, F_)), ("w3", w3, (F_, D))):
        if (w.n, w.k) != shape or w.w.shape[0] != E:
            raise ValueError(f"{name} must be {E} experts of {shape}, got {w.w.shape[0]} of {(w.n, w.k)}")
    if w1[:1] + w1[3:] != w3[:1] + w3[3:]:  # all but the tensors: one kernel reads both with the same numbers
        raise ValueError("w1 and w3 must be of the same format, group size and strides")
    if w1.mode != w2.mode:
        raise ValueError("w1 and w2 must be of the same format")
    R = pair_ids.numel()
    n_blocks = block_expert.numel()
    h_RF = torch.empty((R, F_), dtype=x_TD.dtype, device=x_TD.device)
    y_PD = torch.empty((P, D), dtype=torch.float32, device=x_TD.device)
    c = config
    emulate, prec = emulated_bf16(x_TD), precision(x_TD)
    (up_k, up_unroll), (down_k, down_unroll) = k_tiles(c.up_k, w1), k_tiles(c.down_k, w2)
    _gate_up_kernel[(n_blocks, triton.cdiv(F_, c.up_n))](
        x_TD,
        w1.w,
        w3.w,
        w1.s,
        w3.s,
        h_RF,
        pair_ids,
        block_expert,
        P,
        D,
        F_,
        x_TD.stride(0),
        w1.stride_e,
        w1.stride_n,
        w1.stride_g,
        w1.s_stride_e,
        w1.s_stride_n,
        w1.s_stride_g,
        h_RF.stride(0),
        TOP_K=top_k,
        MODE=w1.mode,
        GROUP=w1.group,
        EMULATE_BF16=emulate,
        PRECISION=prec,
        BLOCK_M=c.block_m,
        BLOCK_N=c.up_n,
        BLOCK_K=up_k,
        UNROLL=up_unroll,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
        enable_fp_fusion=True,  # FMAs (as triton < 3.10 by default): (q - 8) * scale is exact either way
    )
    _down_kernel[(n_blocks, triton.cdiv(D, c.down_n))](
        h_RF,
        w2.w,
        w2.s,
        y_PD,
        pair_ids,
        block_expert,
        rw_P,
        P,
        D,
        F_,
        h_RF.stride(0),
        w2.stride_e,
        w2.stride_n,
        w2.stride_g,
        w2.s_stride_e,
        w2.s_stride_n,
        w2.s_stride_g,
        y_PD.stride(0),
        MODE=w2.mode,
        GROUP=w2.group,
        EMULATE_BF16=emulate,
        PRECISION=prec,
        BLOCK_M=c.block_m,
        BLOCK_N=c.down_n,
        BLOCK_K=down_k,
        UNROLL=down_unroll,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
        enable_fp_fusion=True,  # FMAs (as triton < 3.10 by default): (q - 8) * scale is exact either way
    )
    return y_PD
