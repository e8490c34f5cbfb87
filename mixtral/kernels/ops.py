"""The one place that picks an implementation per operation: linear, rms_norm, rotary embedding, attention,
swiglu / experts and combine. Each op looks at the device, dtype, weight format and row count, and calls our
CPU kernels (`cpu.py`, `cpu_decode.cpp`), the Triton MoE kernel (`fused_moe.py`) or plain PyTorch; every
threshold that decides it sits here, and each op's plain PyTorch reference (`*_reference`) beside it. The
tests compare each fast path with its reference; docs/kernels.md says why each kernel and threshold is what it is.

The model (`model.py`) and the MoE block (`moe.py`) call these functions and nothing else of the runtime.

A CPU kernel runs only without gradients (training takes the PyTorch paths, which autograd knows) and only
where it computes the same function: the same products, summed in float32 and rounded once. One exception, as
llama.cpp's Q4_0 makes it: on AVX2 the int4 kernels take x in int8 per group of columns
(`int4_product_reference`), which doubles their arithmetic rate where it bounded the GEMV below the bandwidth.

Shape legend: B batch, T query tokens, S key tokens, H query heads, G key/value heads, d head dim,
D model dim, E experts, F expert hidden dim, K experts per token, N output channels, P (token, expert) pairs.
"""

from __future__ import annotations

import functools
import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu
from .weights import (
    FP8_MAX,
    QuantizedView,
    QuantizedWeight,
    aten_scales_zeros,
    dequantized,
    int4_parts,
    pack_int4,
    rows_groups,
    unpack_int4,
)

Weight = torch.Tensor | QuantizedWeight | QuantizedView

# ---- thresholds ------------------------------------------------------------------------------------------------

# Up to this many rows (the tokens of one expert in a prefill, a short prompt, decode at batch <= 96) a bf16 matmul
# runs as our GEMM kernel of a few rows; beyond, oneDNN's (F.linear) is faster where the CPU multiplies bf16 itself
# (AVX-512 BF16). On AVX2, oneDNN's bf16 matmul converts to float32 on the way and runs at a quarter to a third of
# our kernel's speed at any number of rows: ours takes them all.
FEW_ROWS = 96 if cpu.isa() == "avx512" else sys.maxsize

# Up to this many rows a bf16 or quantized expert (`swiglu`), and a matmul with quantized weights, run as our kernels'
# fused calls; beyond, F.linear (int8: on its weights dequantized per call) and ATen's int4 kernel. int4 has no limit:
# ATen's int4 GEMM converts every weight to float32. On AVX2, ours are faster at any number of rows (as FEW_ROWS).
FUSED_ROWS = (
    {"bf16": 160, "int8": 512, "int4": sys.maxsize}
    if cpu.isa() == "avx512"
    else {"bf16": sys.maxsize, "int8": sys.maxsize, "int4": sys.maxsize}
)

# ... and from this many rows on for quantized weights: below, our GEMV of several rows (`gemv_rows` in the kernels:
# the matrix read once, each row's integer sums as alone) is faster than AVX-512's int8 kernel of several rows, which
# dequantizes blocks for bf16 tiles (even with it at ~32 rows on an Intel Xeon, behind from 64). The int4 kernels of
# several rows (and AVX2's int8 ones) do not dequantize: they compute the GEMV's integer sums too, from 2 rows.
FUSED_MIN_ROWS = {"int8": 24, "int4": 2} if cpu.isa() == "avx512" else {"int8": 2, "int4": 2}

# From this many rows on (a prefill, compute-bound) an fp8 matmul on a GPU with fp8 tensor cores quantizes the
# activations too and multiplies in fp8 (`fp8_matmul`); below, the weight-only kernel (memory-bound decode).
FP8_MATMUL_ROWS = 64

# From this many rows on (a prefill, compute-bound) an int8 matmul outside our kernels dequantizes the weight (one
# cheap pass) and runs the bf16 GEMM: ATen's int8 kernel multiplies at about a third of its speed.
DEQUANT_ROWS = 32

# Query rows x key positions up to which a one-sequence prompt's attention runs row by row in our decode attention
# kernel; above, PyTorch's flash attention (made for long queries) wins.
ROW_ATTENTION_MAX = 512 * 512


def _cpu_ops(x: torch.Tensor) -> Any:
    """Our CPU kernels for bf16 x on a CPU without gradients, else None."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or torch.is_grad_enabled():
        return None
    return cpu.ops()


# ---- linear ----------------------------------------------------------------------------------------------------


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """`F.linear(x, w)` for a plain weight or a quantized one (`weights.py`).

    Plain weights, without gradients on a CPU: bf16 rows go to our kernels, one row to the matrix-vector product
    (it streams w at the memory bandwidth, where F.linear's x @ w.T reads at ~2/3 of it), 2 to FEW_ROWS rows to the
    GEMM of a few rows; without them one row is `torch.mv`. All compute the same dot products in float32, rounded
    once (in a different order); F.linear stays the path everywhere else (autograd, many rows, GPUs). The reference is
    F.linear on the weight (`weights.dequantized(w)` for a quantized one)."""
    if isinstance(w, QuantizedWeight):
        w = w.view_all()
    if isinstance(w, QuantizedView):
        return _linear_quantized(x, w)
    if x.device.type == "cpu" and w.dim() == 2 and x.shape[-1] and not torch.is_grad_enabled():
        rows = x.numel() // x.shape[-1]
        ops = cpu.ops() if w.dtype == x.dtype == torch.bfloat16 and w.shape[1] % 32 == 0 else None
        if ops is not None and 0 < rows <= FEW_ROWS and w.is_contiguous():
            x2 = x.reshape(rows, -1).contiguous()
            y = ops.gemv(w, x2.view(-1)) if rows == 1 else ops.gemm(x2, w)
            return y.view(*x.shape[:-1], w.shape[0])
        if rows == 1:  # torch.mv pays ~40 us a call but streams w faster than F.linear at one row
            return torch.mv(w, x.reshape(-1)).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def _linear_quantized(x: torch.Tensor, w: QuantizedView) -> torch.Tensor:
    """x [..., K] @ w.T -> [..., N] with a quantized kernel (activations in the scales' dtype).

    Our kernels, for the same function: below FUSED_MIN_ROWS rows the GEMV with integer dot products (each row's
    sums as alone, the matrix read once);
    FUSED_MIN_ROWS to FUSED_ROWS rows: int4 (and int8 on AVX2) the GEMV's integer sums for all rows at once, int8 on
    AVX-512 bf16 tiles of the weights dequantized a block at a time (bit for bit `dequantize()` then `gemm`).
    Elsewhere ATen's int8 / int4 kernels, or (int8, many rows) the dense GEMM on the weight dequantized for this
    call."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != w.dtype:
        x2 = x2.to(w.dtype)
    if x2.device.type != "cpu":
        return _linear_quantized_gpu(x2, w).reshape(*x.shape[:-1], -1).to(x.dtype)
    if w.mode == "fp8":  # no CPU kernel reads fp8: the weight dequantized for this call
        return F.linear(x2, w.dequantize()).reshape(*x.shape[:-1], -1).to(x.dtype)
    rows, int8 = x2.shape[0], w.mode == "int8"
    if 0 < rows <= FUSED_ROWS[w.mode] and x2.dtype == torch.bfloat16 and x2.device.type == "cpu":
        ops = cpu.ops() if not (torch.is_grad_enabled() and x2.requires_grad) else None
        if ops is not None and all(t.is_contiguous() for t in w.tensors):
            x2 = x2.contiguous()
            if rows < FUSED_MIN_ROWS[w.mode] and not (int8 and x2.shape[1] % 16):  # (% 16: see below)
                y = ops.gemv_int8(*w.tensors, x2) if int8 else ops.gemv_int4(*w.tensors, x2, w.group_size)
                return y.view(*x.shape[:-1], -1).to(x.dtype)
            if rows >= FUSED_MIN_ROWS[w.mode] and (x2.shape[1] % 32 == 0 or not int8):
                y = ops.gemm_int8(x2, *w.tensors) if int8 else ops.gemm_int4(x2, *w.tensors, w.group_size)
                return y.view(*x.shape[:-1], -1).to(x.dtype)
    if int8 and (rows >= DEQUANT_ROWS or x2.shape[1] % 16):
        # torch._weight_int8pack_mm (2.13) also gives wrong sums when K is not a multiple of 16.
        return F.linear(x2, w.dequantize()).reshape(*x.shape[:-1], -1).to(x.dtype)
    if int8:
        y = torch._weight_int8pack_mm(x2.contiguous(), *w.tensors)
    else:
        packed, sz = _aten_int4(w)
        y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, w.group_size, sz)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def _linear_quantized_gpu(x2: torch.Tensor, w: QuantizedView) -> torch.Tensor:
    """x2 [M, K] @ w.T on a GPU: fp8 from FP8_MATMUL_ROWS rows on a GPU that multiplies fp8 (`fp8_matmul`: the
    activations quantized per row too, tensor cores at twice the bf16 rate); otherwise the Triton kernel that
    dequantizes in registers (`triton_linear`: a decode step reads one byte, int4 half a byte, per weight). Where
    neither can run, the weight dequantized for the call, said once."""
    from . import triton_linear  # triton is imported only when its kernel launches: it is optional

    if w.mode == "fp8" and x2.shape[0] >= FP8_MATMUL_ROWS and fp8_matmul_unavailable_reason(x2, w) is None:
        return fp8_matmul(x2, w)
    reason = triton_linear.unavailable_reason(x2, w)
    if reason is None:
        return triton_linear.linear(x2, w)
    _warn_once(f"{w.mode} matmul on {x2.device}: the Triton kernel cannot run ({reason}); dequantizing per call")
    return F.linear(x2, w.dequantize(x2.dtype))


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def fp8_matmul_unavailable_reason(x2: torch.Tensor, w: QuantizedView) -> str | None:
    """Why `fp8_matmul` cannot run on these tensors, or None: it needs torch._scaled_mm's fp8 support (a CUDA GPU of
    compute capability 8.9 or later, or the CPU), no gradients, and dims that are multiples of 16."""
    from .fused_moe import fp8_unavailable_reason  # (torch only: triton is imported when a kernel launches)

    if (reason := fp8_unavailable_reason(x2.device)) is not None:
        return reason
    if x2.shape[1] % 16 or w.shape[0] % 16:
        return f"fp8 matmuls need dims that are multiples of 16, got K={x2.shape[1]}, N={w.shape[0]}"
    if torch.is_grad_enabled() and x2.requires_grad:
        return "gradients are needed"
    return None


def fp8_activations(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] as float8 e4m3 with one float32 scale per row ([M, 1]): x ~= q * scale."""
    scale = (x2.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (x2.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_matmul(x2: torch.Tensor, w: QuantizedView) -> torch.Tensor:
    """x2 [M, K] @ w.T for an fp8 weight with x2 quantized to fp8 per row (`fp8_activations`): torch._scaled_mm with
    row-wise scales, float32 accumulation, the result in x2's dtype. Not the weight-only product: the activations'
    rounding adds an error of about the weights' own (`fp8_matmul_reference` is the same function in float32)."""
    xq, sx = fp8_activations(x2)
    q, sw = w.tensors
    return torch._scaled_mm(xq, q.t(), scale_a=sx, scale_b=sw.float()[None, :], out_dtype=x2.dtype)


def fp8_matmul_reference(x2: torch.Tensor, w: QuantizedView) -> torch.Tensor:
    xq, sx = fp8_activations(x2)
    return F.linear(xq.float() * sx, w.dequantize(torch.float32)).to(x2.dtype)


def int4_product_reference(x: torch.Tensor, w: QuantizedView | QuantizedWeight) -> torch.Tensor:
    """x [..., K] @ w.T for int4 weights [N, K] as the AVX2 kernels compute it, in float64: the weights exact,
    x rounded to int8 per group of the weights' columns, t_g = max |x_k| / 127 (rounded to float32), x_k taken
    as t_g round(x_k * (127 / max |x_k|)) (the product in float64, ties to even). The kernels agree up to their
    float32 sums and the bf16 rounding of the result; a group holding inf or NaN makes its rows NaN there."""
    view = w.view_all() if isinstance(w, QuantizedWeight) else w
    packed, sz = int4_parts(view.tensors[0], view.group_size, view.dtype)
    q = unpack_int4(packed).double()  # [N, K]
    N, K = q.shape
    G = K // view.group_size
    sz = rows_groups(sz.double())  # [N, G, 2]
    w_NK = ((q.view(N, G, -1) - 8.0) * sz[..., 0:1] + sz[..., 1:2]).view(N, K)
    x_g = x.double().reshape(*x.shape[:-1], G, view.group_size)
    top = x_g.abs().amax(-1, keepdim=True)
    inv = torch.full_like(top, 127.0) / top  # a true division, as the kernels' (`127.0 / top` is 127 * (1 / top))
    xq = torch.round(x_g * torch.where(top > 0, inv, 0.0))
    step = (top / 127.0).float().double()
    return (xq * step).reshape(x.shape) @ w_NK.T


def _aten_int4(w: QuantizedView) -> tuple[torch.Tensor, torch.Tensor]:
    """An int4 weight as ATen's int4 kernel takes it (packed bytes in its layout for this CPU, scales and zeros
    [G, N, 2]). Where ATen's layout is ours the blocks are split per call (a copy of the weight's size, cheap beside
    the kernel); where it differs, converting is not cheap, so it is done once per weight and kept beside it (the
    weight's memory twice: only on CPUs without our kernels)."""
    if _aten_int4pack_is_ours() or w.source is None:
        packed, sz = int4_parts(w.tensors[0], w.group_size, w.dtype)
        if not _aten_int4pack_is_ours():
            packed = _to_aten_int4pack(packed)
        return packed, aten_scales_zeros(sz)
    parent, index = w.source
    blocks = parent.blocks
    cached = _aten_int4_cache.get(parent)
    if cached is None or cached[0] is not blocks:
        packed, sz = int4_parts(blocks, parent.group_size, parent.scale_dtype)
        cached = _aten_int4_cache[parent] = (blocks, _to_aten_int4pack(packed), aten_scales_zeros(sz))
    _, packed, sz = cached
    return (packed, sz) if index is None else (packed[index], sz[index])


def _to_aten_int4pack(packed: torch.Tensor) -> torch.Tensor:
    """Our int4pack bytes [..., N, K/2] in ATen's layout for this CPU."""
    lead = packed.shape[:-2]
    flat = [
        torch._convert_weight_to_int4pack_for_cpu(unpack_int4(p), 1) for p in packed.reshape(-1, *packed.shape[-2:])
    ]
    return torch.stack(flat).reshape(*lead, *flat[0].shape)


# ATen-layout int4 weights, per weight, on CPUs where ATen's layout is not ours (see `_aten_int4`).
_aten_int4_cache: weakref.WeakKeyDictionary[QuantizedWeight, tuple] = weakref.WeakKeyDictionary()


@functools.cache
def _aten_int4pack_is_ours() -> bool:
    """Whether ATen's int4 CPU kernel reads our int4pack bytes as they are. Its layout depends on the CPU it was
    dispatched for (the AVX-512 one is ours; others differ), so it is asked once: where it differs, each call
    converts the unpacked values into ATen's layout."""
    q = torch.arange(64 * 32, dtype=torch.int32).reshape(64, 32) % 16
    return torch.equal(pack_int4(q), torch._convert_weight_to_int4pack_for_cpu(q, 1))


def project(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A projection module applied to x: a plain nn.Linear (or a quantized weight) through `linear`, then its forward
    hooks (tensor parallelism's all-reduce, a served LoRA adapter's delta) in order, as calling it would run them,
    each replacing the output where it returns one. Anything else (pre-hooks, hooks taking keyword arguments or
    always called, global hooks, another module) is called."""
    if type(m) is nn.Linear or isinstance(m, QuantizedWeight):
        plain = not (m._forward_pre_hooks or m._forward_hooks_with_kwargs or m._forward_hooks_always_called)
        if plain and not global_hooks():
            out = linear(x, m.weight if type(m) is nn.Linear else m)
            for hook in m._forward_hooks.values():
                result = hook(m, (x,), out)
                if result is not None:
                    out = result
            return out
    return m(x)


def global_hooks() -> bool:
    """Whether forward hooks registered for every module are set (code that skips calling a module would skip
    them)."""
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


def qkv_one_row(wq: nn.Module, wk: nn.Module, wv: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """[q; k; v] of a single token (x [1, 1, D]) in one kernel call, or None where the kernel cannot run (then one
    projection each): bf16 nn.Linear without hooks only."""
    ws = [kernel_tensors(m) for m in (wq, wk, wv)]
    bf16 = all(w is not None and len(w) == 1 and w[0].dtype == torch.bfloat16 for w in ws)  # (not int4 blocks)
    if not bf16 or x.shape[-1] % 32 or not x.is_contiguous():
        return None
    ops = _cpu_ops(x)
    return None if ops is None else ops.gemv_cat([w[0] for w in ws], x.reshape(-1))


def kernel_tensors(w: nn.Module | torch.Tensor | QuantizedView) -> list[torch.Tensor] | None:
    """A weight as the CPU kernels take it: [w] for plain bf16 (a tensor, or an nn.Linear without hooks), [q, scale]
    for int8, [blocks] for int4 (bf16 scales), all contiguous on the CPU; None for anything else (the caller then
    takes the PyTorch path)."""
    if isinstance(w, QuantizedWeight):
        w = w.view_all()
    if isinstance(w, QuantizedView):
        if w.dtype != torch.bfloat16 or w.mode == "fp8":  # (no CPU kernel reads fp8)
            return None
        tensors = list(w.tensors)
    elif type(w) is nn.Linear and not (w._forward_hooks or w._forward_pre_hooks):
        tensors = [w.weight]
    elif type(w) in (torch.Tensor, nn.Parameter):
        tensors = [w]
    else:
        return None
    if not isinstance(w, QuantizedView) and tensors[0].dtype != torch.bfloat16:
        return None
    return tensors if all(t.is_contiguous() and t.device.type == "cpu" for t in tensors) else None


def int4_group(w: Any) -> int:
    """The int4 group size of a weight (0 for anything else)."""
    if isinstance(w, QuantizedWeight | QuantizedView) and w.mode == "int4":
        return w.group_size
    return 0


# ---- rms_norm --------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_reference`; bf16 on a CPU without gradients in one kernel call with the same roundings (the
    reference is ~10 small ops)."""
    if x.dtype == weight.dtype and x.is_contiguous():
        ops = _cpu_ops(x)
        if ops is not None:
            return ops.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 (bf16 sums of squares lose too much), cast back, then scale: the same order of roundings
    # as the reference implementations.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


# ---- rotary embedding ------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The rotary frequencies [d/2], float32: the angle of pair i at position p is p * inv_freq[i]."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def rope_cos_sin(
    pos_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, T, d] for the rotate-half layout, angles computed in float32."""
    angles = pos_BT.float()[..., None] * rope_inv_freq(head_dim, theta, pos_BT.device)  # [B, T, d/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x_BHTd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of each head by the position's angles ("rotate-half" layout, the one Hugging Face
    checkpoints use; consolidated checkpoints are permuted into it when loaded)."""
    half = x_BHTd.shape[-1] // 2
    rotated = torch.cat((-x_BHTd[..., half:], x_BHTd[..., :half]), dim=-1)
    return x_BHTd * cos_BTd[:, None] + rotated * sin_BTd[:, None]


# ---- attention -------------------------------------------------------------------------------------------------


def attention_mask(qpos_BT: torch.Tensor, kpos_BS: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [B, 1, T, S]: query at position i sees key at position j iff j <= i (and i - W < j).

    Key positions below zero mark empty cache slots or padding: never attended to. A padding query (position < 0)
    would see nothing; it sees every key instead of producing NaNs (its output is garbage that nobody reads)."""
    q = qpos_BT[:, :, None]
    k = kpos_BS[:, None, :]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= k > q - window
    return (allowed | (q < 0))[:, None]


def attention(
    q_BHTd: torch.Tensor, k_BGSd: torch.Tensor, v_BGSd: torch.Tensor, mask_B1TS: torch.Tensor
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), masked) v, query head h reading key/value head h // (H / G).

    bf16 on a CPU without gradients goes to our kernel (`decode_attention`, the same sums in float32) for one new
    token per sequence (decode): PyTorch's CPU flash attention pays a large fixed cost per call for a single query
    row. A short prompt of one sequence (T * S <= ROW_ATTENTION_MAX) goes there too, each query row as a sequence
    of its own over the same keys (views, no copies)."""
    B, _, T, d = q_BHTd.shape
    ops = _cpu_ops(q_BHTd) if d % 32 == 0 else None
    if ops is not None:
        scale = d**-0.5
        if T == 1:
            return ops.decode_attention(q_BHTd.contiguous(), k_BGSd, v_BGSd, mask_B1TS.contiguous(), scale)
        if B == 1 and T * k_BGSd.shape[2] <= ROW_ATTENTION_MAX:
            q_T = q_BHTd[0].transpose(0, 1).unsqueeze(2).contiguous()  # [T, H, 1, d]: query rows as a batch
            k, v = k_BGSd.expand(T, -1, -1, -1), v_BGSd.expand(T, -1, -1, -1)
            out_TH1d = ops.decode_attention(q_T, k, v, mask_B1TS[0, 0, :, None, None, :].contiguous(), scale)
            return out_TH1d.squeeze(2).transpose(0, 1).unsqueeze(0)  # [1, H, T, d] (a view)
    return attention_reference(q_BHTd, k_BGSd, v_BGSd, mask_B1TS)


def attention_reference(
    q_BHTd: torch.Tensor, k_BGSd: torch.Tensor, v_BGSd: torch.Tensor, mask_B1TS: torch.Tensor
) -> torch.Tensor:
    gqa = q_BHTd.shape[1] != k_BGSd.shape[1]
    return F.scaled_dot_product_attention(q_BHTd, k_BGSd, v_BGSd, attn_mask=mask_B1TS, enable_gqa=gqa)


# ---- experts ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Experts:
    """A layer's stacked SwiGLU experts: w1, w3 [E, F, D], w2 [E, D, F] (tensors or quantized weights)."""

    w1: Any
    w2: Any
    w3: Any

    @property
    def n(self) -> int:
        return self.w1.shape[0]

    def __getitem__(self, e: int) -> tuple[Any, Any, Any]:
        """Expert e's (w1, w2, w3): views, no copies."""
        return self.w1[e], self.w2[e], self.w3[e]


class Routing(NamedTuple):
    """Each token's chosen experts, best first, and their weights (float32)."""

    weights_TK: torch.Tensor
    idx_TK: torch.Tensor


def swiglu(x: torch.Tensor, w1_FD: Weight, w2_DF: Weight, w3_FD: Weight) -> torch.Tensor:
    """One SwiGLU expert: w2( silu(w1 x) * (w3 x) ). A few rows of bf16 on a CPU with the kernels (an expert's
    tokens in a prefill) go to one fused call (`swiglu`, `swiglu_int8`, `swiglu_int4`): the op-by-op expert on bf16
    or dequantized weights (int8: the same sums and roundings; int4: the sums in another order), without writing out
    and reading back the two [rows, F] products, and reading the quantized bytes."""
    kind = _fused_swiglu(x, w1_FD, w2_DF, w3_FD)
    if kind is None:
        return linear(F.silu(linear(x, w1_FD)) * linear(x, w3_FD), w2_DF)
    ops = cpu.ops()
    if kind == "bf16":
        return ops.swiglu(x, w1_FD, w2_DF, w3_FD)
    if kind == "int8":
        return ops.swiglu_int8(x, *w1_FD.tensors, *w2_DF.tensors, *w3_FD.tensors)
    return ops.swiglu_int4(x, *w1_FD.tensors, *w2_DF.tensors, *w3_FD.tensors, w1_FD.group_size)


def swiglu_reference(x: torch.Tensor, w1_FD: Weight, w2_DF: Weight, w3_FD: Weight) -> torch.Tensor:
    w1, w2, w3 = (dequantized(w) for w in (w1_FD, w2_DF, w3_FD))
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def _fused_swiglu(x: torch.Tensor, *weights: Weight) -> str | None:
    """Which fused call `swiglu` can make ("bf16", "int8" or "int4"), or None: 2 (quantized: FUSED_MIN_ROWS) to
    FUSED_ROWS rows (per format) of bf16 without gradients on a CPU with the kernels; contiguous bf16 weights, or
    int8 / int4 views (one group size) with bf16 scales; dims multiples of 32 (int4: of 64 and of the group size)."""
    if x.dim() != 2 or x.shape[0] < 2 or not x.is_contiguous() or _cpu_ops(x) is None:
        return None
    D = x.shape[1]
    if all(isinstance(w, torch.Tensor) and w.dtype == x.dtype and w.is_contiguous() for w in weights):
        F_ = weights[1].shape[1]
        return "bf16" if D % 32 == 0 and F_ % 32 == 0 and x.shape[0] <= FUSED_ROWS["bf16"] else None
    views = [w for w in weights if isinstance(w, QuantizedView) and all(t.is_contiguous() for t in w.tensors)]
    if len(views) != 3 or len({(w.mode, w.group_size, w.dtype) for w in views}) != 1:
        return None
    if views[0].dtype != x.dtype or views[0].mode not in FUSED_ROWS:
        return None
    if not FUSED_MIN_ROWS[views[0].mode] <= x.shape[0] <= FUSED_ROWS[views[0].mode]:
        return None
    F_ = views[0].shape[0]
    if views[0].mode == "int8":
        return "int8" if D % 32 == 0 and F_ % 32 == 0 else None
    group = views[0].group_size
    return "int4" if all(n % 64 == 0 and n % group == 0 for n in (D, F_)) and group % 16 == 0 else None


def experts(x_TD: torch.Tensor, stack: Experts, routing: Routing) -> torch.Tensor:
    """Each token's chosen experts, scaled by their router weights and summed (in float32, rounded once) -> [T, D].

    A single token without gradients (decode at batch 1) runs its K experts directly (`experts_decode`); more tokens
    are grouped by expert, one matmul per used expert (`grouped_by_expert`)."""
    if routing.idx_TK.shape[0] == 1 and not torch.is_grad_enabled():
        return experts_decode(x_TD, stack, routing)
    return grouped_by_expert(x_TD, routing, stack.n, lambda e, h: swiglu(h, *stack[e]))


def grouped_by_expert(
    x_TD: torch.Tensor, routing: Routing, n_experts: int, expert: Callable[[int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Sort the T*K (token, expert) pairs by expert, run `expert(e, rows)` once per used expert on a contiguous
    slice of its rows, then scale by the router weights and sum each token's k outputs. Experts nobody chose cost
    nothing."""
    T = routing.idx_TK.shape[0]
    order, token_of = pairs_by_expert(routing.idx_TK)
    counts = torch.bincount(routing.idx_TK.reshape(-1), minlength=n_experts).tolist()  # slice bounds, on the host
    xs = x_TD[token_of]
    ys, start = [], 0
    for e, n in enumerate(counts):
        if n:
            ys.append(expert(e, xs[start : start + n]))
            start += n
    if not ys:  # no tokens
        return x_TD.new_zeros(x_TD.shape)
    return combine(ys, routing.weights_TK.reshape(-1)[order], token_of, T)


def pairs_by_expert(idx_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The T*K (token, expert) pairs sorted by expert, token order kept inside each expert: (order_P, the index of
    each sorted pair among the T*K; token_of_P, the token it came from)."""
    order = torch.argsort(idx_TK.reshape(-1), stable=True)
    return order, order // idx_TK.shape[1]


def combine(ys: list[torch.Tensor], weights_P: torch.Tensor, token_of_P: torch.Tensor, T: int) -> torch.Tensor:
    """The experts' outputs (one after another: the pairs sorted by expert) scaled by their router weights and summed
    per token -> [T, D]: in float32, each token's k contributions added in pair order from 0, rounded once. bf16 on a
    CPU with the kernels: one call (`combine`, the same products and sums in the same order)."""
    ops = _cpu_ops(ys[0]) if all(y.dtype == torch.bfloat16 for y in ys) else None
    if ops is not None:
        return ops.combine([y.contiguous() for y in ys], weights_P.float().contiguous(), token_of_P.contiguous(), T)
    return combine_reference(ys, weights_P, token_of_P, T)


def combine_reference(
    ys: list[torch.Tensor], weights_P: torch.Tensor, token_of_P: torch.Tensor, T: int
) -> torch.Tensor:
    y_PD = torch.cat(ys).float() * weights_P[:, None]
    out_TD = torch.zeros((T, y_PD.shape[1]), dtype=torch.float32, device=y_PD.device)
    out_TD.index_add_(0, token_of_P, y_PD)
    return out_TD.to(ys[0].dtype)


def experts_decode(x_TD: torch.Tensor, stack: Experts, routing: Routing) -> torch.Tensor:
    """For a handful of tokens (decode): each token runs its K chosen experts directly, indexing their weights in
    place (a view, no copy). Cost: T*K expert calls whatever the number of experts.

    The chosen ids are read on the host (one small read per layer: on a CPU that is no device sync). Scaling and the
    sum over the K experts happen in float32, rounded once, as in the other paths. bf16, int8 and int4 experts of one
    token on a CPU with the kernels run as one fused call (`experts`, `experts_int8`, `experts_int4`: the same
    roundings, the matrix-vector products at the memory bandwidth)."""
    weights_TK, idx_TK = routing
    fused = _fused_experts_cpu(x_TD, stack) if x_TD.shape[0] == 1 else None
    if fused is not None:
        ops, tensors = cpu.ops(), [t for ts in fused for t in ts]
        if not isinstance(stack.w1, QuantizedWeight):
            return ops.experts(x_TD, *tensors, weights_TK, idx_TK)
        if stack.w1.mode == "int8":
            return ops.experts_int8(x_TD, *tensors, weights_TK, idx_TK)
        return ops.experts_int4(x_TD, *tensors, weights_TK, idx_TK, stack.w1.group_size)
    chosen = idx_TK.tolist()
    out_TD = torch.empty((x_TD.shape[0], x_TD.shape[1]), dtype=torch.float32, device=x_TD.device)
    for t, chosen_t in enumerate(chosen):
        x = x_TD[t : t + 1]
        acc = None
        for k, e in enumerate(chosen_t):
            y = swiglu(x, *stack[e]).float() * weights_TK[t, k]
            acc = y if acc is None else acc + y
        out_TD[t : t + 1] = acc
    return out_TD.to(x_TD.dtype)


def _fused_experts_cpu(x_TD: torch.Tensor, stack: Experts) -> list[list[torch.Tensor]] | None:
    """The experts' tensors as the CPU decode kernel takes them (`kernel_tensors`), or None where it cannot run: the
    kernels unavailable, x not bf16 on the CPU, weights of mixed formats or int4 group sizes, dims not multiples of
    32 (int4: of 64)."""
    if x_TD.device.type != "cpu" or x_TD.dtype != torch.bfloat16 or cpu.ops() is None:
        return None
    weights = (stack.w1, stack.w2, stack.w3)
    tensors = [kernel_tensors(w) for w in weights]
    if any(ts is None for ts in tensors):
        return None
    kinds = {(w.mode, w.group_size) if isinstance(w, QuantizedWeight) else "bf16" for w in weights}
    if len(kinds) > 1:
        return None
    multiple = 64 if int4_group(weights[0]) else 32
    if x_TD.shape[1] % multiple or weights[0].shape[1] % multiple:
        return None
    return tensors


def experts_dense(x_TD: torch.Tensor, stack: Experts, routing: Routing) -> torch.Tensor:
    """Every token through every expert, each output scaled by the token's router weight for that expert (0 for
    the experts it did not choose), summed in float32 and rounded once. Fixed shapes and nothing read on the host:
    the dispatch for a step compiled whole or captured in a CUDA graph where the Triton kernel cannot run, at the
    cost of reading all E experts (E/K times the grouped path's weights)."""
    weights_TK, idx_TK = routing
    E = stack.n
    weights_TE = torch.zeros((x_TD.shape[0], E), dtype=torch.float32, device=x_TD.device)
    weights_TE.scatter_(1, idx_TK, weights_TK.float())  # (top-k ids are distinct: no pair adds to another)
    w1, w2, w3 = (dequantized(w) for w in (stack.w1, stack.w2, stack.w3))
    h_ETF = F.silu(torch.einsum("td,efd->etf", x_TD, w1)) * torch.einsum("td,efd->etf", x_TD, w3)
    y_ETD = torch.einsum("etf,edf->etd", h_ETF, w2)
    return (y_ETD.float() * weights_TE.T[:, :, None]).sum(dim=0).to(x_TD.dtype)


def experts_triton(
    x_TD: torch.Tensor, stack: Experts, routing: Routing, *, config: Any = None, fallback: bool = True
) -> torch.Tensor:
    """The fused Triton kernel (`fused_moe.py`): one grouped-GEMM launch per projection for all experts, plain or
    quantized (int8, int4, fp8: dequantized in registers). Where it cannot run (no triton, CPU tensors outside
    TRITON_INTERPRET=1, autograd, fp8 on a GPU without fp8) the plain path runs instead (`experts`) with a warning;
    with `fallback=False` that is an error."""
    from . import fused_moe  # triton itself is imported only when the kernel launches: it is optional

    reason = fused_moe.unavailable_reason(x_TD, stack.w1, stack.w2, stack.w3, routing.weights_TK)
    if reason is None or not fallback:
        return fused_moe.fused_experts(x_TD, stack.w1, stack.w2, stack.w3, *routing, config=config)
    warnings.warn(f"fused MoE kernel unavailable, using the plain PyTorch path: {reason}", stacklevel=2)
    return experts(x_TD, stack, routing)
