"""The stored forms of quantized weights, which the kernels of `ops.py` read, and the numbers behind them.

- int8: symmetric, one scale per output channel: w ~= q * scale, q in [-127, 127].
- int4: asymmetric, one (scale, zero) pair per group of `group_size` input channels of each output
  channel: w ~= (q - 8) * scale + zero, q in [0, 15] (the convention of PyTorch's int4 CPU kernel).
- fp8: float8 e4m3 (`torch.float8_e4m3fn`), one scale per output channel: w ~= q * scale, |q| <= 448. The format
  GPUs from Hopper/Ada on multiply natively; on the CPU it is dequantized per call (no kernel reads it there).

int4 weights sit in memory and on disk as one uint8 tensor `blocks` [..., N/64, G, group_size * 32 + 256]:
for each block of 64 output rows and each group of input channels, the group's columns in PyTorch's
"int4pack" order (for each input channel k, 32 bytes whose low nibble is row j and high nibble row j + 32
of the block: what `_weight_int4pack_mm_for_cpu` reads; a test checks our packing against
`_convert_weight_to_int4pack_for_cpu`), then the block's 64 (scale, zero) pairs of that group, so that the
decode kernel reads a block as one sequential stream (docs/kernels.md). Where ATen's int4 kernel runs instead,
each call splits the blocks into its two tensors (`int4_parts`, a copy).

Every quantized weight can `dequantize()` itself: the reference the tests compare the kernels with.

Shape legend: N output channels, K input channels, G groups per row (K / group_size), E experts.
"""

from __future__ import annotations

import torch
from torch import nn

QUANT_MODES = ("int8", "int4", "fp8")
FP8_MAX = 448.0  # the largest finite float8 e4m3fn value
GROUP_SIZES = (32, 64, 128, 256)
INT4_BLOCK = 64  # output rows per block of the int4 layout


# ---- the numbers ----------------------------------------------------------------------------------------


def _channel_scale(w_NK: torch.Tensor, qmax: float, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w / scale as a float32 copy, scale [..., N] in `dtype`, default w's) with each row's max |w| mapped to qmax:
    the scale is rounded to `dtype` first, so that dequantizing uses exactly the stored numbers."""
    wf = w_NK.to(torch.float32, copy=True)  # a copy even of float32: it is changed in place below
    lo, hi = torch.aminmax(wf, dim=-1)  # max |w| = max(hi, -lo): one pass, no |w| temporary
    scale = (torch.maximum(hi, -lo) / qmax).clamp(min=1e-10).to(dtype or w_NK.dtype)
    # in place on the float32 copy: the same numbers as out of place, without a temporary per step
    return wf.div_(scale.float()[..., None]), scale


def quantize_int8(w_NK: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [..., N, K], scale [..., N]) with w ~= q * scale; the scale is stored in `dtype` (default w's) and q is
    computed against that rounded scale."""
    v, scale = _channel_scale(w_NK, 127.0, dtype)
    return v.round_().clamp_(-127, 127).to(torch.int8), scale


def quantize_fp8(w_NK: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [..., N, K], scale [..., N]) with w ~= q * scale, max |w| of a row mapped to FP8_MAX; as for
    int8 the scale is rounded to `dtype` (default w's) first and q computed against the stored scale."""
    v, scale = _channel_scale(w_NK, FP8_MAX, dtype)
    return v.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_int4(
    w_NK: torch.Tensor, group_size: int, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int32 in [0, 15] [..., N, K], scale [..., N, G], zero [..., N, G]) with
    w ~= (q - 8) * scale + zero per group: min/max asymmetric, the range [min, max] mapped onto 0..15."""
    dtype = dtype or w_NK.dtype
    *lead, N, K = w_NK.shape
    if K % group_size:
        raise ValueError(f"input size {K} is not a multiple of the int4 group size {group_size}")
    wf = w_NK.to(torch.float32, copy=True).reshape(*lead, N, K // group_size, group_size)  # changed in place below
    lo, hi = torch.aminmax(wf, dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-10).to(dtype)
    zero = (lo + 8.0 * scale.float()).to(dtype)
    # in place on the float32 copy: the same numbers as out of place, without a temporary per step
    q = wf.sub_(zero.float()[..., None]).div_(scale.float()[..., None]).add_(8.0).round_().clamp_(0, 15)
    return q.reshape(*lead, N, K).to(torch.int32), scale, zero


def pack_int4(q_NK: torch.Tensor) -> torch.Tensor:
    """int32 values in [0, 15] [..., N, K] -> the kernel's int4pack layout, uint8 [..., N, K / 2]."""
    *lead, N, K = q_NK.shape
    q = q_NK.to(torch.uint8).reshape(*lead, N // INT4_BLOCK, 2, INT4_BLOCK // 2, K)
    packed = q[..., 0, :, :] | (q[..., 1, :, :] << 4)  # [..., N/64, 32, K]
    return packed.transpose(-1, -2).contiguous().reshape(*lead, N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: uint8 [..., N, K / 2] -> int32 [..., N, K]."""
    *lead, N, half = packed.shape
    K = 2 * half
    p = packed.reshape(*lead, N // INT4_BLOCK, K, INT4_BLOCK // 2).transpose(-1, -2)  # [..., N/64, 32, K]
    q = torch.stack((p & 0xF, p >> 4), dim=-3)  # [..., N/64, 2, 32, K]
    return q.reshape(*lead, N, K).to(torch.int32)


def int4_blocks(packed: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """int4pack bytes [..., N, K / 2] and block-major scales and zeros [..., N/64, G, 64, 2] -> the stored
    `blocks` [..., N/64, G, group_size * 32 + 64 * 2 * itemsize] (see the module's docstring)."""
    *lead, N, half = packed.shape
    G = 2 * half // group_size
    columns = packed.reshape(*lead, N // INT4_BLOCK, G, group_size * INT4_BLOCK // 2)
    pairs = sz.contiguous().view(torch.uint8).reshape(*lead, N // INT4_BLOCK, G, -1)
    return torch.cat((columns, pairs), dim=-1)


def int4_parts(blocks: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `int4_blocks`: (int4pack bytes [..., N, K / 2], scales and zeros [..., N/64, G, 64, 2] in
    `dtype`), both contiguous copies."""
    *lead, NB, G, _ = blocks.shape
    width = group_size * INT4_BLOCK // 2
    packed = blocks[..., :width].reshape(*lead, NB * INT4_BLOCK, G * group_size // 2)
    sz = blocks[..., width:].contiguous().view(dtype).reshape(*lead, NB, G, INT4_BLOCK, 2)
    return packed, sz


# The modes stored as (q, scale per output channel), and the function that makes them.
PER_CHANNEL = {"int8": quantize_int8, "fp8": quantize_fp8}


# ---- quantized weights ------------------------------------------------------------------------------------


class QuantizedWeight(nn.Module):
    """A quantized weight [..., N, K]: one matrix (attention, head) or a stack of them (experts, [E, N, K]).

    Buffers (what the state dict and a quantized checkpoint hold):
    - int8: `q` int8 [..., N, K], `scale` [..., N];
    - int4: `blocks` uint8 [..., N/64, G, group_size * 32 + 256] (int4pack columns and (scale, zero) pairs by
      block of 64 rows and group: see the module's docstring; `int4_parts` splits them), the scales in `dtype`;
    - fp8: `q` float8_e4m3fn [..., N, K], `scale` [..., N] (as int8).
    `w[e]` is expert e's view; `kernels.ops.linear(x, w)` multiplies by it (`quantize.QuantizedLinear` is the module
    that stands in a projection's place and can be called).
    """

    def __init__(
        self, mode: str, tensors: dict[str, torch.Tensor], group_size: int = 0, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if mode not in QUANT_MODES:
            raise ValueError(f"unknown quantization {mode!r}; choose one of {QUANT_MODES}")
        if mode == "int4" and dtype is None:
            raise ValueError("int4 weights need the dtype of their scales")
        self.mode, self.group_size, self.scale_dtype = mode, group_size, dtype
        for name, t in tensors.items():
            self.register_buffer(name, t)

    @classmethod
    def from_float(cls, w_NK: torch.Tensor, mode: str, group_size: int = 64) -> QuantizedWeight:
        dtype = w_NK.dtype
        if mode in PER_CHANNEL:
            q, scale = PER_CHANNEL[mode](w_NK, dtype)
            return cls(mode, {"q": q, "scale": scale})
        q, scale, zero = quantize_int4(w_NK, group_size, dtype)
        scales_zeros = block_major(torch.stack((scale, zero), dim=-1))  # [..., N, G, 2] -> [..., N/64, G, 64, 2]
        return cls("int4", {"blocks": int4_blocks(pack_int4(q), scales_zeros, group_size)}, group_size, dtype)

    @classmethod
    def empty(
        cls, shape: torch.Size, mode: str, group_size: int, dtype: torch.dtype, device: torch.device | str = "meta"
    ) -> QuantizedWeight:
        """Uninitialised buffers for a weight of `shape` [..., N, K] in `dtype` (on the meta device: the skeleton a
        checkpoint fills), shaped as `from_float` makes them, without quantizing anything."""
        *lead, N, K = shape
        if mode in PER_CHANNEL:
            q = torch.empty(shape, dtype=torch.int8 if mode == "int8" else torch.float8_e4m3fn, device=device)
            return cls(mode, {"q": q, "scale": torch.empty((*lead, N), dtype=dtype, device=device)})
        width = group_size * INT4_BLOCK // 2 + INT4_BLOCK * 2 * dtype.itemsize  # int4pack columns, then the pairs
        blocks = torch.empty((*lead, N // INT4_BLOCK, K // group_size, width), dtype=torch.uint8, device=device)
        return cls("int4", {"blocks": blocks}, group_size, dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the activations this weight works with (its scales')."""
        return self.scale.dtype if self.mode in PER_CHANNEL else self.scale_dtype

    @property
    def shape(self) -> torch.Size:
        """The logical shape [..., N, K] of the weight this stands for."""
        return self.view_all().shape

    def __getitem__(self, i: int) -> QuantizedView:
        if self.mode in PER_CHANNEL:
            return QuantizedView(self.mode, (self.q[i], self.scale[i]), 0, self.dtype)
        return QuantizedView("int4", (self.blocks[i],), self.group_size, self.dtype, (self, i))

    def view_all(self) -> QuantizedView:
        if self.mode in PER_CHANNEL:
            return QuantizedView(self.mode, (self.q, self.scale), 0, self.dtype)
        return QuantizedView("int4", (self.blocks,), self.group_size, self.dtype, (self, None))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.view_all().dequantize(dtype)

    def extra_repr(self) -> str:
        shape = tuple(self.shape)
        g = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"{self.mode}, shape={shape}{g}"


class QuantizedView:
    """One matrix of a `QuantizedWeight` (a plain object: cheap to make per expert per token)."""

    __slots__ = ("dtype", "group_size", "mode", "source", "tensors")

    def __init__(
        self,
        mode: str,
        tensors: tuple[torch.Tensor, ...],
        group_size: int,
        dtype: torch.dtype,
        source: tuple[QuantizedWeight, int | None] | None = None,
    ) -> None:
        """tensors: (q, scale) for int8 and fp8, (blocks,) for int4; dtype: the scales'; source: the weight this is a
        view of and the index of the view in it (None: all of it), for what is derived once per weight."""
        self.mode, self.tensors, self.group_size, self.dtype, self.source = mode, tensors, group_size, dtype, source

    @property
    def shape(self) -> torch.Size:
        """The logical shape [..., N, K] of the weight this stands for."""
        if self.mode in PER_CHANNEL:
            return self.tensors[0].shape
        *lead, NB, G, _ = self.tensors[0].shape
        return torch.Size((*lead, NB * INT4_BLOCK, G * self.group_size))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight these numbers stand for, [N, K] in `dtype` (default: the scales'), computed in float32."""
        if self.mode == "int8":
            q, s = self.tensors
            # |q| <= 127 is exact in bf16 and the product is rounded once: the same as in float32
            return q.to(s.dtype) * s[..., None] if dtype in (None, s.dtype) else q.to(dtype) * s[..., None].to(dtype)
        if self.mode == "fp8":  # the product in float32, rounded once
            q, s = self.tensors
            return (q.float() * s.float()[..., None]).to(dtype or s.dtype)
        packed, sz = int4_parts(self.tensors[0], self.group_size, self.dtype)
        q = unpack_int4(packed).float()  # [..., N, K]
        sz = rows_groups(sz.float())  # [..., N, G, 2]
        G = sz.shape[-2]
        qg = q.reshape(*q.shape[:-1], G, -1)
        w = (qg - 8.0) * sz[..., 0:1] + sz[..., 1:2]
        return w.reshape(q.shape).to(dtype or self.dtype)


def block_major(sz_NG2: torch.Tensor) -> torch.Tensor:
    """int4 scales and zeros [..., N, G, 2] -> the stored order [..., N/64, G, 64, 2] (contiguous)."""
    *lead, N, G, _ = sz_NG2.shape
    return sz_NG2.reshape(*lead, N // INT4_BLOCK, INT4_BLOCK, G, 2).transpose(-3, -2).contiguous()


def rows_groups(sz: torch.Tensor) -> torch.Tensor:
    """Stored int4 scales and zeros [..., N/64, G, 64, 2] -> [..., N, G, 2] (a copy)."""
    *lead, NB, G, R, _ = sz.shape
    return sz.transpose(-3, -2).reshape(*lead, NB * R, G, 2)


def aten_scales_zeros(sz: torch.Tensor) -> torch.Tensor:
    """Stored int4 scales and zeros [..., N/64, G, 64, 2] -> ATen's order [..., G, N, 2] (contiguous)."""
    *lead, NB, G, R, _ = sz.shape
    return sz.transpose(-4, -3).reshape(*lead, G, NB * R, 2).contiguous()


def dequantized(w: torch.Tensor | QuantizedView | QuantizedWeight) -> torch.Tensor:
    """A plain weight as it is, a quantized one dequantized (the reference form)."""
    return w if isinstance(w, torch.Tensor) else w.dequantize()
