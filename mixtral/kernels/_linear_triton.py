"""Triton kernels for weights in the model's stored forms (`weights.py`): how a kernel reads a tile of a plain, int8,
fp8 or int4 weight (shared with the fused MoE kernels, `_fused_moe_triton.py`), and the weight-only quantized matmul
(`triton_linear.py` is its public entry). Imported only when a kernel runs: it needs triton, and TRITON_INTERPRET=1
must be set before this import to interpret on the CPU. The kernels call only triton builtins and the @jit functions
of this module (library ones such as tl.sum cannot be interpreted when triton was imported before TRITON_INTERPRET=1
was set, e.g. by torch.compile in another test).

A weight tile is [BLOCK_K, BLOCK_N] of W^T in the activations' dtype: element (k, c) is W[rows[c], k0 + k], each
element dequantized as `QuantizedView.dequantize` does it (in float32, rounded once to the activations' dtype), then
multiplied by tl.dot (float32 sums): the kernels compute x @ w.dequantize(x.dtype).T up to the order of the sums.
Elementwise dequantization rather than the algebraic form scale * dot(x, q - 8) + zero * sum(x): it gives the
reference's numbers (each weight rounded to the activations' dtype, as the reference's matmul sees it) for a few
float32 operations per weight, which a memory-bound decode step has to spare (not measured against the other form).
- plain (PLAIN): the weight as it is (its dtype is the activations');
- int8 and fp8 (SCALED): q [N, K] (K contiguous), w = q * scale[n], the scales loaded once per program;
- int4 (INT4): `blocks` [N/64, G, group_size * 32 + 64 * 2 * itemsize] (uint8): row n is in block n // 64 at
  j = n % 64; column k of group g = k // group_size is the byte blocks[n // 64, g, (k % group_size) * 32 + j % 32],
  its low nibble for j < 32 and its high one for j >= 32; w = (q - 8) * scale + zero with the pair (scale, zero) of
  row j stored after the group's columns (read through the same bytes viewed as the scales' dtype: `Operand.s`).
  A tile holds BLOCK_N / 2 byte columns (each 32 of them a block's 32 contiguous bytes per k, loaded as vectors):
  both nibbles of a byte are dequantized and interleaved (tl.join), so tile column c is row 32 * (c % 2) + j % 32
  of block j // 32 for its byte column j = c // 2, and the results are stored to those rows. BLOCK_K divides the
  group size, so a tile lies in one group (one (scale, zero) pair per column, loaded as one vector); a step over K
  is UNROLL such tiles, whose loads are in flight together (a group of 32 would otherwise make short steps).
Interpreted (TRITON_INTERPRET=1) with bf16 activations the kernels emulate the GPU's bf16 arithmetic, which the
interpreter gets wrong (`emulated_bf16`).

Shape legend: M rows of x, N output channels, K input channels, G groups per row, E experts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from .weights import INT4_BLOCK, PER_CHANNEL, QuantizedView, QuantizedWeight

# The weight formats as the kernels tell them apart (the MODE constexpr).
PLAIN, SCALED, INT4 = 0, 1, 2
_SCALED = tl.constexpr(SCALED)
_INT4 = tl.constexpr(INT4)


class Operand(NamedTuple):
    """A weight [N, K] or a stack of them [E, N, K] as the kernels read it. Strides are in elements of the tensor they
    belong to; for int4 `stride_n` steps over a block of 64 rows and `stride_g` over a group."""

    mode: int  # PLAIN, SCALED (int8, fp8) or INT4
    w: torch.Tensor  # the plain weight, q, or the int4 blocks (uint8)
    s: torch.Tensor  # the scales [..., N]; int4: the blocks seen as the scales' dtype, from the first pair on; else w
    n: int
    k: int
    group: int  # int4 group size (1 otherwise)
    stride_e: int  # from one matrix of a stack to the next (0 for one matrix)
    stride_n: int
    stride_g: int
    s_stride_e: int
    s_stride_n: int
    s_stride_g: int


def operand(w: torch.Tensor | QuantizedWeight | QuantizedView, stacked: bool) -> Operand:
    """`w` (a matrix, or a stack of them where `stacked`) as the kernels take it: views of its tensors, no copies.
    Its innermost stride must be 1 (K contiguous; int4: the blocks' bytes)."""
    if isinstance(w, QuantizedWeight):
        w = w.view_all()
    dims = 3 if stacked else 2
    if isinstance(w, torch.Tensor):
        if w.dim() != dims or w.stride(-1) != 1:
            raise ValueError(f"a weight of {dims} dims with contiguous rows is needed, got {tuple(w.shape)}")
        e = w.stride(0) if stacked else 0
        return Operand(PLAIN, w, w, w.shape[-2], w.shape[-1], 1, e, w.stride(-2), 0, 0, 0, 0)
    if w.mode in PER_CHANNEL:
        q, s = w.tensors
        if q.dim() != dims or s.dim() != dims - 1 or q.stride(-1) != 1:
            raise ValueError(f"a {w.mode} weight of {dims} dims with contiguous rows is needed, got {tuple(q.shape)}")
        e, se = (q.stride(0), s.stride(0)) if stacked else (0, 0)
        return Operand(SCALED, q, s, q.shape[-2], q.shape[-1], 1, e, q.stride(-2), 0, se, s.stride(-1), 0)
    (blocks,) = w.tensors
    if blocks.dim() != dims + 1 or blocks.stride(-1) != 1:
        raise ValueError(f"int4 blocks of {dims + 1} dims with contiguous bytes are needed, got {tuple(blocks.shape)}")
    # The (scale, zero) pairs of a block and group follow its group_size * 32 bytes of columns: the same bytes seen
    # as the scales' dtype (a view: torch checks that the strides allow it), from the first pair on.
    pairs = blocks.view(w.dtype)[..., w.group_size * INT4_BLOCK // 2 // w.dtype.itemsize :]
    N, K = w.shape[-2:]
    e, se = (blocks.stride(0), pairs.stride(0)) if stacked else (0, 0)
    return Operand(
        INT4, blocks, pairs, N, K, w.group_size, e, blocks.stride(-3), blocks.stride(-2), se, pairs.stride(-3),
        pairs.stride(-2),
    )  # fmt: skip


def emulated_bf16(x: torch.Tensor) -> bool:
    """Whether the kernels on x emulate a GPU's bf16 arithmetic (the EMULATE_BF16 constexpr): only interpreted, where
    triton's interpreter (3.9) multiplies bf16 bit patterns as integers in tl.dot and truncates float32 to bf16. There
    the tiles go to tl.dot in float32 (exact: products of bf16 are exact in float32, and the sums are float32 either
    way) and roundings to bf16 are done on the bits first (`rounded`)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def rounded(v, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """v (float32) in DTYPE, rounded to nearest even as a GPU does. EMULATE_BF16 (see `emulated_bf16`): the bits are
    rounded first (carrying into the exponent where they overflow), so that the interpreter's truncation is exact."""
    if EMULATE_BF16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        v = bits.to(tl.float32, bitcast=True)
    return v.to(DTYPE)


@triton.jit
def dot(a, b, acc, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b (float32 sums); with EMULATE_BF16 (see `emulated_bf16`) the tiles go in as float32."""
    if EMULATE_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def tile_rows(pid_n, N, stride_n, s_stride_n, MODE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The output rows of tile `pid_n` (BLOCK_N of them) in the order of the weight tile's columns, and per column of
    loaded weights (per byte column for int4: BLOCK_N / 2 of them) the offset of its weights at k = 0 and of its
    scales, and whether it exists. Returns (rows, w_cols, s_cols, w_ok); rows < N says which rows to store."""
    if MODE == _INT4:
        c = tl.arange(0, BLOCK_N)
        j = pid_n * (BLOCK_N // 2) + c // 2  # the byte column of tile column c
        rows = j // 32 * 64 + c % 2 * 32 + j % 32
        jb = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        w_cols = (jb // 32).to(tl.int64) * stride_n + jb % 32
        s_cols = (jb // 32).to(tl.int64) * s_stride_n + jb % 32 * 2  # the pair of row j % 32 of the block
        w_ok = jb < N // 2
    else:
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_cols = rows.to(tl.int64) * stride_n
        s_cols = rows.to(tl.int64) * s_stride_n
        w_ok = rows < N
    return rows, w_cols, s_cols, w_ok


@triton.jit
def channel_scales(s_ptr, s_cols, w_ok, MODE: tl.constexpr):
    """int8 / fp8: the tile's per-channel scales in float32 (loaded once per program); other formats: unused."""
    if MODE == _SCALED:  # noqa: SIM108 (a constexpr branch: the other one is not compiled)
        scale = tl.load(s_ptr + s_cols, mask=w_ok, other=0).to(tl.float32)
    else:
        scale = 0.0
    return scale


@triton.jit
def weight_tile(
    w_ptr,
    s_ptr,
    w_cols,
    s_cols,
    w_ok,
    scale,
    k0,
    offs_k,
    k_ok,
    K,
    stride_g,
    s_stride_g,
    DTYPE: tl.constexpr,
    MODE: tl.constexpr,
    GROUP: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The [BLOCK_K, BLOCK_N] tile of W^T at k0 in DTYPE (see the module's docstring). w_ptr, s_ptr: the matrix's
    first weight and scale (for int4 its first pair); k_ok: offs_k < K - k0. Columns past N and rows past K read
    as 0."""
    if MODE == _INT4:
        # BLOCK_K divides GROUP (and GROUP divides K): the whole tile is in group g. A tile past K (an unrolled
        # step's last) reads the last group's pairs and zero bytes: finite weights, multiplied by x's zeros.
        g = tl.minimum(k0, K - 1) // GROUP
        kk = k0 % GROUP + offs_k
        b_ptrs = w_ptr + g * stride_g + kk[:, None] * 32 + w_cols[None, :]
        b = tl.load(b_ptrs, mask=k_ok[:, None] & w_ok[None, :], other=0)
        pair = s_ptr + g * s_stride_g + s_cols
        # each pair as one [.., 2] load (a 4-byte vector for bf16), split in registers; row j + 32: pair 2 (j + 32)
        pairs = pair[:, None] + tl.arange(0, 2)[None, :]
        s_lo, z_lo = tl.split(tl.load(pairs, mask=w_ok[:, None], other=0).to(tl.float32))
        s_hi, z_hi = tl.split(tl.load(pairs + 64, mask=w_ok[:, None], other=0).to(tl.float32))
        # (q - 8) * scale is exact in float32 (4 bits times a bf16 or fp16 scale): fused or not, one rounding
        lo = rounded(((b & 15).to(tl.float32) - 8.0) * s_lo[None, :] + z_lo[None, :], DTYPE, EMULATE_BF16)
        hi = rounded(((b >> 4).to(tl.float32) - 8.0) * s_hi[None, :] + z_hi[None, :], DTYPE, EMULATE_BF16)
        w = tl.reshape(tl.join(lo, hi), (BLOCK_K, BLOCK_N))
    elif MODE == _SCALED:
        q = tl.load(w_ptr + (k0 + offs_k)[:, None] + w_cols[None, :], mask=k_ok[:, None] & w_ok[None, :], other=0.0)
        w = rounded(q.to(tl.float32) * scale[None, :], DTYPE, EMULATE_BF16)
    else:
        w = tl.load(w_ptr + (k0 + offs_k)[:, None] + w_cols[None, :], mask=k_ok[:, None] & w_ok[None, :], other=0)
    return w


@triton.jit
def _linear_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # the weight [N, K] (see `Operand`)
    s_ptr,
    y_ptr,  # [M, N] out, x's dtype
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wg,
    stride_sn,
    stride_sg,
    stride_ym,
    MODE: tl.constexpr,
    GROUP: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UNROLL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows_n, w_cols, s_cols, w_ok = tile_rows(pid_n, N, stride_wn, stride_sn, MODE, BLOCK_N)
    scale = channel_scales(s_ptr, s_cols, w_ok, MODE)
    offs_k = tl.arange(0, BLOCK_K)
    if BLOCK_M == 1:
        # One row (decode at batch 1): no tl.dot (it would pad the row to 16), the products summed elementwise in
        # float32 over the steps and across the tile's k once at the end.
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
        acc = tl.full((BLOCK_K, BLOCK_N), 0.0, dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K * UNROLL):
            for u in tl.static_range(UNROLL):  # UNROLL tiles a step: their loads are all in flight at once
                kt = k0 + u * BLOCK_K
                k_ok = offs_k < K - kt
                a = tl.load(x_row + (kt + offs_k)[:, None] * stride_xk, mask=k_ok[:, None], other=0)
                b = weight_tile(
                    w_ptr, s_ptr, w_cols, s_cols, w_ok, scale, kt, offs_k, k_ok, K, stride_wg, stride_sg, a.dtype,
                    MODE, GROUP, EMULATE_BF16, BLOCK_K, BLOCK_N,
                )  # fmt: skip
                acc += b.to(tl.float32) * a.to(tl.float32)
        y = tl.reduce(acc, 0, _add)
        y = rounded(y, y_ptr.dtype.element_ty, EMULATE_BF16)
        tl.store(y_ptr + pid_m.to(tl.int64) * stride_ym + rows_n, y, mask=rows_n < N)
    else:
        rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rows_m < M
        x_rows = x_ptr + rows_m[:, None].to(tl.int64) * stride_xm
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K * UNROLL):
            for u in tl.static_range(UNROLL):
                kt = k0 + u * BLOCK_K
                k_ok = offs_k < K - kt
                a = tl.load(x_rows + (kt + offs_k)[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0)
                b = weight_tile(
                    w_ptr, s_ptr, w_cols, s_cols, w_ok, scale, kt, offs_k, k_ok, K, stride_wg, stride_sg, a.dtype,
                    MODE, GROUP, EMULATE_BF16, BLOCK_K, BLOCK_N,
                )  # fmt: skip
                acc = dot(a, b, acc, EMULATE_BF16, PRECISION)
        y_ptrs = y_ptr + rows_m[:, None].to(tl.int64) * stride_ym + rows_n[None, :]
        y = rounded(acc, y_ptr.dtype.element_ty, EMULATE_BF16)
        tl.store(y_ptrs, y, mask=m_ok[:, None] & (rows_n < N)[None, :])


def k_tiles(step: int, w: Operand) -> tuple[int, int]:
    """(BLOCK_K, UNROLL) for a kernel stepping over K by `step` (a power of two) on `w`: int4 in tiles of at most the
    group size (powers of two: a tile divides the group, one (scale, zero) pair per column per tile), UNROLL of them
    a step, their loads in flight together; other formats in one tile a step."""
    tile = min(step, w.group) if w.mode == INT4 else step
    return tile, step // tile


def precision(x: torch.Tensor) -> str:
    """tl.dot's input precision: float32 stays exact, as torch's matmul (and the interpreter's bf16, see
    `emulated_bf16`); tf32 is ignored for 16-bit inputs."""
    return "ieee" if x.dtype == torch.float32 or emulated_bf16(x) else "tf32"


def launch_linear(x_MK: torch.Tensor, w: Operand, config: Any) -> torch.Tensor:  # config: triton_linear.LinearConfig
    """y [M, N] = x @ W^T in x's dtype (float32 sums): one launch, nothing allocated but y."""
    M, K = x_MK.shape
    if w.k != K:
        raise ValueError(f"x has {K} columns but the weight {w.k}")
    c = config
    y_MN = torch.empty((M, w.n), dtype=x_MK.dtype, device=x_MK.device)
    if M == 0:
        return y_MN
    tile_k, unroll = k_tiles(c.block_k, w)
    grid = (triton.cdiv(w.n, c.block_n), M if c.block_m == 1 else triton.cdiv(M, c.block_m))
    _linear_kernel[grid](
        x_MK,
        w.w,
        w.s,
        y_MN,
        M,
        w.n,
        K,
        x_MK.stride(0),
        x_MK.stride(1),
        w.stride_n,
        w.stride_g,
        w.s_stride_n,
        w.s_stride_g,
        y_MN.stride(0),
        MODE=w.mode,
        GROUP=w.group,
        EMULATE_BF16=emulated_bf16(x_MK),
        PRECISION=precision(x_MK),
        BLOCK_M=c.block_m,
        BLOCK_N=c.block_n,
        BLOCK_K=tile_k,
        UNROLL=unroll,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
        enable_fp_fusion=True,  # FMAs (as triton < 3.10 by default): (q - 8) * scale is exact either way
    )
    return y_MN
