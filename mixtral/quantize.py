"""Weight-only quantization, applied to a loaded model (or read back from a quantized checkpoint).

- int8: symmetric, one scale per output channel: w ~= q * scale, q in [-127, 127].
- int4: asymmetric, one (scale, zero) pair per group of `group_size` input channels of each output
  channel: w ~= (q - 8) * scale + zero, q in [0, 15] (the convention of PyTorch's int4 CPU kernel).

What is quantized: the attention projections (wq, wk, wv, wo), the stacked experts (w1, w2, w3) and the
LM head (int8 in both modes: it is 14% of the bench model's active bytes, and int4 there costs quality
for little speed). The router, norms and embedding stay in the model's dtype: the router decides which
experts run (a flipped top-k is a large error), the norms are tiny, and one embedding row is read per token.

Kernels (measured on our CPUs before choosing, see the README): on CPUs with AVX-512 our own
(`kernels/cpu_decode.cpp`: integer dot products for up to a few rows, dequantized tiles beyond), which ran
1.9-2.4x faster than PyTorch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` at one row; elsewhere
those ATen ops (torchao's eager int8 path was 5x slower than bf16). Every quantized weight can also
`dequantize()` itself: the reference the tests compare the kernels with.

int4 weights sit in memory and on disk as one uint8 tensor `blocks` [..., N/64, G, group_size * 32 + 256]:
for each block of 64 output rows and each group of input channels, the group's columns in PyTorch's
"int4pack" order (for each input channel k, 32 bytes whose low nibble is row j and high nibble row j + 32
of the block: what `_weight_int4pack_mm_for_cpu` reads; a test checks our packing against
`_convert_weight_to_int4pack_for_cpu`), then the block's 64 (scale, zero) pairs of that group. The decode
kernel reads a block as one sequential stream: with the scales in a tensor of their own (a second stream per
thread) int4 decode ran 1.06x slower. Where ATen's int4 kernel runs instead (no AVX-512 kernels), each call
splits the blocks into its two tensors (a copy).

Shape legend: N output channels, K input channels, G groups per row (K / group_size), E experts.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import cpu as cpu_kernels

QUANT_MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
INT4_BLOCK = 64  # output rows per block of the int4 layout
DEQUANT_ROWS = 32  # from this many rows on, int8 matmuls dequantize and run the dense GEMM


# ---- the numbers ----------------------------------------------------------------------------------------


def quantize_int8(w_NK: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [..., N, K], scale [..., N]) with w ~= q * scale; the scale is stored in `dtype` (default
    w's) and q is computed against that rounded scale, so dequantizing uses exactly the stored numbers."""
    dtype = dtype or w_NK.dtype
    wf = w_NK.float()
    scale = (wf.abs().amax(-1) / 127.0).clamp(min=1e-10).to(dtype)
    q = torch.round(wf / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(
    w_NK: torch.Tensor, group_size: int, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int32 in [0, 15] [..., N, K], scale [..., N, G], zero [..., N, G]) with
    w ~= (q - 8) * scale + zero per group: min/max asymmetric, the range [min, max] mapped onto 0..15."""
    dtype = dtype or w_NK.dtype
    *lead, N, K = w_NK.shape
    if K % group_size:
        raise ValueError(f"input size {K} is not a multiple of the int4 group size {group_size}")
    wf = w_NK.float().reshape(*lead, N, K // group_size, group_size)
    lo, hi = wf.amin(-1), wf.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-10).to(dtype)
    zero = (lo + 8.0 * scale.float()).to(dtype)
    q = torch.round((wf - zero.float()[..., None]) / scale.float()[..., None] + 8.0).clamp(0, 15)
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


# ---- quantized weights ------------------------------------------------------------------------------------


class QuantizedWeight(nn.Module):
    """A quantized weight [..., N, K]: one matrix (attention, head) or a stack of them (experts, [E, N, K]).

    Buffers (what the state dict and a quantized checkpoint hold):
    - int8: `q` int8 [..., N, K], `scale` [..., N];
    - int4: `blocks` uint8 [..., N/64, G, group_size * 32 + 256] (int4pack columns and (scale, zero) pairs by
      block of 64 rows and group: see the module's docstring; `int4_parts` splits them), the scales in `dtype`.
    Calling it on x [..., K] is `F.linear(x, w)` computed by the quantized kernel; `w[e]` is expert e's view.
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
        if mode == "int8":
            q, scale = quantize_int8(w_NK, dtype)
            return cls("int8", {"q": q, "scale": scale})
        q, scale, zero = quantize_int4(w_NK, group_size, dtype)
        scales_zeros = block_major(torch.stack((scale, zero), dim=-1))  # [..., N, G, 2] -> [..., N/64, G, 64, 2]
        return cls("int4", {"blocks": int4_blocks(pack_int4(q), scales_zeros, group_size)}, group_size, dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the activations this weight works with (its scales')."""
        return self.scale.dtype if self.mode == "int8" else self.scale_dtype

    @property
    def shape(self) -> torch.Size:
        """The logical shape [..., N, K] of the weight this stands for."""
        return self.view_all().shape

    def __getitem__(self, i: int) -> QuantizedView:
        if self.mode == "int8":
            return QuantizedView("int8", (self.q[i], self.scale[i]), 0, self.dtype)
        return QuantizedView("int4", (self.blocks[i],), self.group_size, self.dtype)

    def view_all(self) -> QuantizedView:
        if self.mode == "int8":
            return QuantizedView("int8", (self.q, self.scale), 0, self.dtype)
        return QuantizedView("int4", (self.blocks,), self.group_size, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.view_all().linear(x)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.view_all().dequantize(dtype)

    def extra_repr(self) -> str:
        shape = tuple(self.shape)
        g = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"{self.mode}, shape={shape}{g}"


class QuantizedView:
    """One matrix of a `QuantizedWeight` (a plain object: cheap to make per expert per token)."""

    __slots__ = ("dtype", "group_size", "mode", "tensors")

    def __init__(self, mode: str, tensors: tuple[torch.Tensor, ...], group_size: int, dtype: torch.dtype) -> None:
        """tensors: (q, scale) for int8, (blocks,) for int4; dtype: the scales'."""
        self.mode, self.tensors, self.group_size, self.dtype = mode, tensors, group_size, dtype

    @property
    def shape(self) -> torch.Size:
        """The logical shape [..., N, K] of the weight this stands for."""
        if self.mode == "int8":
            return self.tensors[0].shape
        *lead, NB, G, _ = self.tensors[0].shape
        return torch.Size((*lead, NB * INT4_BLOCK, G * self.group_size))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] @ w.T -> [..., N] with the quantized kernel (activations in the scales' dtype)."""
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != self.dtype:
            x2 = x2.to(self.dtype)
        rows = x2.shape[0]
        if 0 < rows <= FUSED_ROWS[self.mode] and x2.dtype == torch.bfloat16 and x2.device.type == "cpu":
            # Our AVX-512 kernels, for the same function: below FUSED_MIN_ROWS rows the GEMV with integer dot
            # products, row by row (int8 ~2.4x and int4 ~1.9x faster than ATen's kernels at one row, still faster
            # at a few); FUSED_MIN_ROWS to FUSED_ROWS rows (a prefill) multiply bf16 tiles of the weights
            # dequantized a block at a time (int8: bit for bit `dequantize()` then `gemm`).
            ops = cpu_kernels.ops() if not (torch.is_grad_enabled() and x2.requires_grad) else None
            if ops is not None and all(t.is_contiguous() for t in self.tensors):
                x2, int8 = x2.contiguous(), self.mode == "int8"
                if rows < FUSED_MIN_ROWS[self.mode] and not (int8 and x2.shape[1] % 16):  # (% 16: see below)
                    y = ops.gemv_int8(*self.tensors, x2) if int8 else ops.gemv_int4(*self.tensors, x2, self.group_size)
                    return y.view(*x.shape[:-1], -1).to(x.dtype)
                if rows >= FUSED_MIN_ROWS[self.mode] and (x2.shape[1] % 32 == 0 or not int8):
                    y = ops.gemm_int8(x2, *self.tensors) if int8 else ops.gemm_int4(x2, *self.tensors, self.group_size)
                    return y.view(*x.shape[:-1], -1).to(x.dtype)
        if self.mode == "int8" and (rows >= DEQUANT_ROWS or x2.shape[1] % 16):
            # Many rows (a prefill) are compute-bound: the int8 kernel multiplies at about a third of the
            # speed of the bf16 GEMM (AMX), so the weight is dequantized (one cheap pass) for this call.
            # torch._weight_int8pack_mm (2.13) also gives wrong sums when K is not a multiple of 16.
            return F.linear(x2, self.dequantize()).reshape(*x.shape[:-1], -1).to(x.dtype)
        if self.mode == "int8":
            y = torch._weight_int8pack_mm(x2.contiguous(), *self.tensors)
        else:
            packed, sz = int4_parts(self.tensors[0], self.group_size, self.dtype)
            y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, self.group_size, aten_scales_zeros(sz))
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight these numbers stand for, [N, K] in `dtype` (default: the scales'), computed in float32."""
        if self.mode == "int8":
            q, s = self.tensors
            # |q| <= 127 is exact in bf16 and the product is rounded once: the same as in float32
            return q.to(s.dtype) * s[..., None] if dtype in (None, s.dtype) else q.to(dtype) * s[..., None].to(dtype)
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


def linear(x: torch.Tensor, w: torch.Tensor | QuantizedView | QuantizedWeight) -> torch.Tensor:
    """`F.linear(x, w)` for a plain weight or a quantized one.

    Without gradients on a CPU, bf16 rows go to our kernels (`kernels/cpu_decode.cpp`): one row to the
    matrix-vector product, which streams w at the memory bandwidth (also the small attention matrices), where
    `F.linear`'s x @ w.T reads at ~2/3 of it; 2 to FEW_ROWS rows to the GEMM of a few rows. Without them one row
    is `torch.mv`. All compute the same dot products in float32, rounded once (in a different order); `F.linear`
    stays the path everywhere else (autograd, many rows, GPUs)."""
    if isinstance(w, torch.Tensor):
        if x.device.type == "cpu" and w.dim() == 2 and x.shape[-1] and not torch.is_grad_enabled():
            rows = x.numel() // x.shape[-1]
            ops = cpu_kernels.ops() if w.dtype == x.dtype == torch.bfloat16 and w.shape[1] % 32 == 0 else None
            if ops is not None and 0 < rows <= FEW_ROWS and w.is_contiguous():
                x2 = x.reshape(rows, -1).contiguous()
                y = ops.gemv(w, x2.view(-1)) if rows == 1 else ops.gemm(x2, w)
                return y.view(*x.shape[:-1], w.shape[0])
            if rows == 1:  # torch.mv pays ~40 us a call but streams w faster than F.linear at one row
                return torch.mv(w, x.reshape(-1)).view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w)
    if isinstance(w, QuantizedWeight):
        return w(x)
    return w.linear(x)


# Up to this many rows (the tokens of one expert in a prefill, a short prompt, decode at batch <= 96), our bf16
# GEMM kernel beats oneDNN's on a CPU: with weights coming from memory (as in a prefill, each expert's matrices
# read once) 1.2-1.6x at 2-16 rows and 1.1-1.2x at 32 (2-core Zen 4, K and N of 1024 and 3584); the 791M
# benchmark's prefill of 128 tokens gains 5-15% (limits of 48 / 96 / 128 rows: medians 1.06 / 1.11-1.15 / 1.05x).
# With the weights already in the cache oneDNN is faster from ~64 rows; beyond 96 it is the path.
FEW_ROWS = 96

# Up to this many rows a bf16 or quantized expert (`moe.swiglu`), and a matmul with quantized weights, run as our
# kernels' fused calls; beyond, F.linear (oneDNN; int8 on its weights dequantized per call) and ATen's int4 kernel.
# One expert of the 791M benchmark model ([3584, 1024] matrices, weights from memory, 2-core Zen 4), against the
# unfused path: bf16 1.97x at 16 rows, 1.52x at 32, 1.04-1.15x at 96-160 and 0.95-1.13x at 160-1024 (since the
# tiles prefetch into L2; noise-level beyond 160, so the limit stays); int8 1.05-1.19x at 160-512 rows,
# 0.85x at 1024 and 0.74x at 2048; int4 2.5-2.9x at 256-2048 rows (ATen's int4 GEMM converts every weight to
# float32), so no limit.
FUSED_ROWS = {"bf16": 160, "int8": 512, "int4": sys.maxsize}
# ... and from this many rows on for quantized weights: below, our GEMV row by row (`gemv_rows` in the kernels) is
# faster than dequantizing blocks. A [3584, 1024] matrix from memory, the GEMV row by row against `gemm_int8` /
# `gemm_int4`: int8 0.62, 0.71, 0.79, 0.91 at 2-5 rows, 1.02 at 6; int4 0.35, 0.52, 0.82 at 2, 4, 8 rows, 1.00 at
# 11, 1.07 at 12. (ATen's kernels, which ran there before, were slower than both at these rows.)
FUSED_MIN_ROWS = {"int8": 6, "int4": 12}


def gemv_cat(ws: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor | None:
    """[w_0; w_1; ...] @ x [K] in one kernel call (e.g. wq, wk, wv of one token), or None where the kernel
    cannot run (then call `linear` for each)."""
    if x.dtype == torch.bfloat16 and x.is_contiguous() and x.shape[-1] % 32 == 0 and not torch.is_grad_enabled():
        ops = cpu_kernels.ops()
        plain = all((ts := kernel_tensors(w)) is not None and len(ts) == 1 for w in ws)  # bf16 tensors
        if ops is not None and x.device.type == "cpu" and plain:
            return ops.gemv_cat(ws, x.reshape(-1))
    return None


def project(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A projection module applied to x: a plain nn.Linear through `linear` (its fast single-row CPU path);
    anything else (a quantized weight, a Linear with hooks such as tensor parallelism's all-reduce) by calling it,
    so that its hooks run."""
    if type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks):
        return linear(x, m.weight)
    return m(x)


def kernel_tensors(w: nn.Module | torch.Tensor) -> list[torch.Tensor] | None:
    """A weight as the CPU decode kernels take it: [w] for plain bf16 (a tensor, or an nn.Linear without hooks),
    [q, scale] for int8, [blocks] for int4 (bf16 scales), all contiguous on the CPU; None for anything else (the
    caller then takes the PyTorch path)."""
    if isinstance(w, QuantizedWeight):
        if w.dtype != torch.bfloat16:
            return None
        tensors = [w.q, w.scale] if w.mode == "int8" else [w.blocks]
    elif type(w) is nn.Linear and not (w._forward_hooks or w._forward_pre_hooks):
        tensors = [w.weight]
    elif type(w) in (torch.Tensor, nn.Parameter):
        tensors = [w]
    else:
        return None
    if not isinstance(w, QuantizedWeight) and tensors[0].dtype != torch.bfloat16:
        return None
    return tensors if all(t.is_contiguous() and t.device.type == "cpu" for t in tensors) else None


def dequantized(w: torch.Tensor | QuantizedView | QuantizedWeight) -> torch.Tensor:
    return w if isinstance(w, torch.Tensor) else w.dequantize()


# ---- applying it to a model -----------------------------------------------------------------------------


def _check_int4_shape(name: str, shape: torch.Size, group_size: int) -> None:
    N, K = shape[-2], shape[-1]
    if N % INT4_BLOCK or K % group_size:
        raise ValueError(
            f"{name} has shape {tuple(shape)}: int4 needs output rows divisible by {INT4_BLOCK} and input "
            f"size divisible by the group size {group_size}"
        )


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(owner module, attribute, full name) of every weight that gets quantized."""
    out = []
    for i, layer in enumerate(model.layers):
        for proj in ("wq", "wk", "wv", "wo"):
            out.append((layer.attn, proj, f"layers.{i}.attn.{proj}"))
        for w in ("w1", "w2", "w3"):
            out.append((layer.moe, w, f"layers.{i}.moe.{w}"))
    if model.output is not None:
        out.append((model, "output", "output"))
    return out


def _weight_of(owner: nn.Module, attr: str) -> torch.Tensor:
    obj = getattr(owner, attr)
    return obj.weight if isinstance(obj, nn.Linear) else obj


def _set(owner: nn.Module, attr: str, qw: QuantizedWeight) -> None:
    if attr in owner._parameters:
        del owner._parameters[attr]
    setattr(owner, attr, qw)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = 64) -> nn.Module:
    """Quantize the model's attention projections and experts in place (`mode` int8 or int4) and its LM
    head (int8). Works on a meta-device model too (building the structure a quantized checkpoint fills).
    Returns the model."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {QUANT_MODES}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size} is not supported; choose one of {GROUP_SIZES}")
    if any(layer.moe.dispatch_hook is not None for layer in model.layers):
        raise ValueError("quantize the model before applying expert/tensor parallelism, not after")
    for owner, attr, name in _targets(model):
        w = _weight_of(owner, attr)
        if isinstance(w, QuantizedWeight):
            raise ValueError(f"{name} is already quantized")
        this_mode = "int8" if attr == "output" else mode
        if this_mode == "int4":
            _check_int4_shape(name, w.shape, group_size)
        if w.is_meta:  # a skeleton to load into: quantize zeros of the right shape on the CPU, then move
            qw = QuantizedWeight.from_float(torch.zeros(w.shape[-2:], dtype=w.dtype), this_mode, group_size)
            tensors = {
                n: torch.empty((*w.shape[:-2], *b.shape), dtype=b.dtype, device="meta") for n, b in qw.named_buffers()
            }
            qw = QuantizedWeight(this_mode, tensors, qw.group_size, qw.scale_dtype)
        else:
            qw = QuantizedWeight.from_float(w.detach(), this_mode, group_size)
        _set(owner, attr, qw)
    model.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None}
    return model


def quantization_of(model: nn.Module) -> dict | None:
    """{"mode", "group_size"} of a quantized model, None for a plain one."""
    return getattr(model, "quantization", None)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (quantized or not)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def active_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights read to decode one token: everything but the embedding (one row of it is read) and
    the experts not chosen (top_k of n_experts per layer)."""
    cfg = model.config
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        nbytes = t.numel() * t.element_size()
        if name.startswith("embed."):
            nbytes = nbytes // cfg.vocab_size
        elif ".moe.w" in name:
            nbytes = nbytes * cfg.top_k // cfg.n_experts
        total += nbytes
    return total
