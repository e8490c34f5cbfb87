"""The weight-only quantized matmul for GPUs (`triton_linear`), run by Triton's interpreter on the CPU
(TRITON_INTERPRET=1), against x @ w.dequantize(x.dtype).T for each stored format; and this kernel and the fused MoE's
compiled for an H100 / H200 (sm_90) without one, which the interpreter does not check.

Tolerances: float32 activations 1e-5 absolute (outputs of size ~1: the same products, float32 sums in another order);
bf16 / fp16 ones one ulp of each output (the kernel rounds its float32 sum once, the reference is that sum unrounded).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

from mixtral.kernels import triton_linear
from mixtral.kernels.fused_moe import DECODE_CONFIG, PREFILL_CONFIG_QUANTIZED, align_by_expert
from mixtral.kernels.triton_linear import LinearConfig, default_config, linear, unavailable_reason
from mixtral.kernels.weights import QuantizedView, QuantizedWeight

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed (pip install triton): the kernel tests need its interpreter"
)
MODES = [("int8", 0), ("fp8", 0), ("int4", 32), ("int4", 64)]


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """Interpret the kernel on the CPU (see the fixture of test_triton_moe.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        if HAS_TRITON:
            import mixtral.kernels._linear_triton as kernels

            importlib.reload(kernels)
        yield
    if HAS_TRITON:
        importlib.reload(kernels)


def quantized(mode: str, group: int, N: int, K: int, dtype=torch.float32, seed=0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    return QuantizedWeight.from_float((torch.randn(N, K, generator=g) / K**0.5).to(dtype), mode, group or 64)


def shape(mode: str) -> tuple[int, int]:
    """N, K: int8 / fp8 of no tile's multiple (K = 100); int4 has N a multiple of 64 and K of the group size, but
    N = 192 is no multiple of 128 (the prefill tile) and K = 192 no multiple of the steps below (64 and 128)."""
    return (40, 100) if mode in ("int8", "fp8") else (192, 192)


# Small tiles for the interpreter: one row without tl.dot; tl.dot tiles of 16 rows (3 rows: one program row,
# 33 rows: three); int4 steps of 2 or 4 group-sized tiles.
CONFIGS = {1: LinearConfig(1, 16, 64), 3: LinearConfig(16, 32, 32), 33: LinearConfig(16, 32, 128)}


def check(y: torch.Tensor, x: torch.Tensor, w: QuantizedWeight | QuantizedView) -> None:
    ref = x.double() @ w.dequantize(x.dtype).double().T  # the products exact: the reference is the unrounded sum
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.double() - ref).abs()
    if x.dtype == torch.float32:
        assert err.max().item() <= 1e-5
    else:  # one ulp of each output
        mantissa = 8 if x.dtype == torch.bfloat16 else 11
        ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp(min=1e-3))) - (mantissa - 1))
        assert (err <= ulp).all(), f"{(err / ulp).max().item():.2f} ulps"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 33])
@pytest.mark.parametrize("mode,group", MODES)
def test_linear_equals_dequantized_matmul(mode, group, M, dtype):
    N, K = shape(mode)
    w = quantized(mode, group, N, K, dtype)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    check(linear(x, w, config=CONFIGS[M]), x, w)


@needs_triton
@pytest.mark.parametrize("M", [1, 5, 40])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_default_tiles(mode, M):
    """The tiles used on GPUs (one row, decode, prefill), interpreted, on a view of one matrix of a stack (its
    tensors start past the storage's first byte) and x whose rows are strided."""
    N, K = 64, 512 if mode == "int8" else 256
    stack = QuantizedWeight.from_float(torch.randn(2, N, K).bfloat16() / K**0.5, mode, 32)
    w = stack[1]
    x = torch.randn(M, 2 * K).bfloat16()[:, ::2]
    check(linear(x, w), x, w)
    assert default_config(M, mode).block_m == (1 if M == 1 else 16 if M <= 16 else 64)


@needs_triton
def test_fp16_activations_with_bf16_scales():
    """x's dtype need not be the scales': each weight is dequantized in float32 and rounded to x's dtype."""
    w = quantized("int4", 32, 128, 128, torch.bfloat16)
    x = torch.randn(3, 128).half()
    check(linear(x, w, config=CONFIGS[3]), x, w)


@needs_triton
def test_the_result_depends_on_every_weight_and_only_on_its_own_row():
    """One changed byte changes exactly the output it belongs to (int4: the nibble's row, not the other of the byte)."""
    w = quantized("int4", 32, 128, 64)
    x = torch.randn(1, 64)
    before = linear(x, w, config=CONFIGS[1])
    w.blocks[1, 0, 5 * 32 + 7] ^= 0x10  # block 1, group 0, column 5, high nibble of row 32 + 7
    changed = (linear(x, w, config=CONFIGS[1]) != before).nonzero()[:, 1].tolist()
    assert changed == [64 + 32 + 7]
    check(linear(x, w, config=CONFIGS[1]), x, w)


@needs_triton
@pytest.mark.parametrize("M", [1, 3])
def test_steps_past_k_read_nothing_of_x(M):
    """x and an fp8 weight as views of their first 100 columns (K: no multiple of the tiles), x's other columns NaN:
    a tile stepping past K must not read them (one would spread NaN through its sums). (What such a tile reads of
    the weight is multiplied by those zeros: there only a read past the allocation's end, a fault on a GPU, would
    matter; test_triton_moe checks the weights' masks with NaN in plain weights.)"""
    full = quantized("fp8", 0, 40, 128)
    w = QuantizedView("fp8", (full.q[:, :100], full.scale), 0, full.dtype)
    x_full = torch.randn(M, 128)
    x_full[:, 100:] = float("nan")
    x = x_full[:, :100]
    y = linear(x, w, config=CONFIGS[M])
    assert not y.isnan().any()
    check(y, x, w)


def test_unavailable_reasons(monkeypatch):
    w = quantized("int8", 0, 16, 32)
    x = torch.randn(2, 32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in unavailable_reason(x, w)
    with pytest.raises(RuntimeError, match="cannot run"):
        linear(x, w)
    if not HAS_TRITON:
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert unavailable_reason(x, w) is None and unavailable_reason(x, w.view_all()) is None
    assert "quantized matrix" in unavailable_reason(x, torch.randn(16, 32))
    assert "quantized matrix" in unavailable_reason(x, QuantizedWeight.from_float(torch.randn(2, 16, 32), "int8"))
    assert "x must be" in unavailable_reason(x.double(), w)
    assert "on meta" in unavailable_reason(x, quantized("int4", 32, 64, 32).to("meta"))
    assert "gradients" in unavailable_reason(x.requires_grad_(), w)
    with torch.no_grad():
        assert unavailable_reason(x, w) is None
    # fp8 asks whether the GPU converts float8 (test_triton_moe checks that reason itself)
    monkeypatch.setattr(triton_linear, "fp8_unavailable_reason", lambda device: "an old GPU")
    assert unavailable_reason(x.detach(), quantized("fp8", 0, 16, 32)) == "an old GPU"
    assert unavailable_reason(x.detach(), w) is None


def test_tile_sizes_are_checked():
    with pytest.raises(ValueError, match="powers of two"):
        LinearConfig(8, 16, 16)
    with pytest.raises(ValueError, match="powers of two"):
        LinearConfig(16, 24, 16)


# ---- compiled for a GPU, without one -----------------------------------------------------------------------------

TRITON_TYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.int8: "i8", torch.uint8: "u8", torch.int32: "i32"}
TRITON_TYPES[torch.float8_e4m3fn] = "fp8e4nv"
SHARED_MEMORY = 227 * 1024  # the most a program may use on an H100 / H200


class CompileForHopper:
    """Stands in for a @triton.jit kernel: a launch compiles it for sm_90 (PTX, then ptxas), its arguments specialised
    as triton's runtime does (an int 1 a constant, a pointer or an int divisible by 16 marked so), instead of running
    it. Catches what the interpreter lets through: types and layouts the compiler rejects, fp8 conversions, shared
    memory beyond what a program may have."""

    def __init__(self, kernel, compiled: list) -> None:
        self.kernel, self.compiled = kernel, compiled

    def __getitem__(self, grid):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile

        def launch(*args, num_warps, num_stages, enable_fp_fusion=True, **kwargs):
            values = dict(zip(self.kernel.arg_names, args, strict=False)) | kwargs
            signature, constants, attrs = {}, {}, {}
            for i, param in enumerate(self.kernel.params):
                v = values[param.name]
                if param.is_constexpr or (type(v) is int and v == 1):
                    signature[param.name], constants[param.name] = "constexpr", v
                    continue
                if isinstance(v, torch.Tensor):
                    signature[param.name], aligned = "*" + TRITON_TYPES[v.dtype], v.data_ptr() % 16 == 0
                else:
                    signature[param.name], aligned = ("i32" if -(2**31) <= v < 2**31 else "i64"), v % 16 == 0
                if aligned:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": enable_fp_fusion}
            src = ASTSource(self.kernel, signature, constants, attrs)
            self.compiled.append(
                (self.kernel.__name__, kwargs, compile(src, target=GPUTarget("cuda", 90, 32), options=options))
            )

        return launch


def has_cuda_compiler() -> bool:
    if not HAS_TRITON:
        return False
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not has_cuda_compiler(), reason="triton's CUDA backend (its bundled ptxas) is not installed")
def test_kernels_compile_for_hopper(monkeypatch):
    """This matmul at each tile shape of `default_config` and the fused MoE's kernels at their default tiles, each
    weight format, bf16 activations, compiled for sm_90: none rejected, none using more shared memory than a program
    may."""
    import mixtral.kernels._fused_moe_triton as moe_kernels
    import mixtral.kernels._linear_triton as kernels

    compiled = []
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    try:  # (the modules' attributes set here are all replaced by the reload at the end)
        for module in (kernels, moe_kernels):  # compiled kernels, not interpreted ones
            importlib.reload(module)
            module.emulated_bf16 = lambda x: False  # as on a GPU
        kernels._linear_kernel = CompileForHopper(kernels._linear_kernel, compiled)
        moe_kernels._gate_up_kernel = CompileForHopper(moe_kernels._gate_up_kernel, compiled)
        moe_kernels._down_kernel = CompileForHopper(moe_kernels._down_kernel, compiled)
        for mode, group in MODES[:3]:
            w = quantized(mode, group, 128, 256, torch.bfloat16)
            for M in (1, 16, 64):
                x = torch.randn(M, 256).bfloat16()
                kernels.launch_linear(x, kernels.operand(w.view_all(), stacked=False), default_config(M, mode))
        E, D, F_ = 2, 128, 256
        for mode, group in MODES[:3]:
            stack = [QuantizedWeight.from_float(torch.randn(E, n, k).bfloat16(), mode, group or 64) for n, k in
                     ((F_, D), (D, F_), (F_, D))]  # fmt: skip
            for config in (DECODE_CONFIG, PREFILL_CONFIG_QUANTIZED):
                pair_ids, block_expert = align_by_expert(torch.tensor([[0, 1]]), E, config.block_m)
                x = torch.randn(1, D).bfloat16()
                operands = [kernels.operand(w, stacked=True) for w in stack]
                moe_kernels.launch(x, *operands, torch.ones(2), pair_ids, block_expert, 2, config)
    finally:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        for module in (kernels, moe_kernels):
            importlib.reload(module)
    assert len(compiled) == 3 * 3 + 3 * 2 * 2
    for name, constants, kernel in compiled:
        assert kernel.asm["cubin"], name
        assert kernel.metadata.shared <= SHARED_MEMORY, (name, constants, kernel.metadata.shared)
