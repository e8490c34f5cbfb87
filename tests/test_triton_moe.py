"""The fused MoE Triton kernel against the plain PyTorch reference path, run by Triton's interpreter on the CPU
(TRITON_INTERPRET=1): plain experts and the model's quantized stacks (int8, int4, fp8); its alignment step and its
fallback. On a GPU, benchmarks/gpu_bench.py checks the compiled kernel against the reference at full size before
it times anything.

Tolerances: float32 activations 1e-5 absolute (outputs of size ~1: the same products, float32 sums in another
order); bf16 ones 2 bf16 ulps of the largest output (the reference rounds h to bf16 after each of its 4 ops, the
kernel once)."""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

from mixtral.config import get_preset
from mixtral.kernels.fused_moe import (
    KernelConfig,
    align_by_expert,
    fp8_unavailable_reason,
    fused_experts,
    triton_unavailable_reason,
    unavailable_reason,
)
from mixtral.kernels.ops import Experts, Routing, experts_triton
from mixtral.kernels.ops import experts as experts_grouped
from mixtral.kernels.weights import QuantizedWeight
from mixtral.model import Transformer
from mixtral.moe import experts_reference, route
from mixtral.quantize import quantize_model

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed (pip install triton): the kernel tests need its interpreter"
)
# Small tiles: the interpreter runs every program in numpy, one after another.
SMALL = KernelConfig(block_m=16, up_n=16, up_k=16, down_n=16, down_k=16, num_warps=1, num_stages=1)
# int4 in steps of 64 and 128: 2 or 4 group-sized tiles a step, those past K in the last step read as zeros when K is
# not a multiple of the step (F = 192: six groups of 32, three of 64)
UNROLLED = KernelConfig(block_m=16, up_n=32, up_k=64, down_n=32, down_k=128, num_warps=1, num_stages=1)
KERNEL_MODULES = ("mixtral.kernels._linear_triton", "mixtral.kernels._fused_moe_triton")  # in import order


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """Interpret the kernels on the CPU. The variable is read when the kernels are defined, so a kernel
    module imported without it (on a GPU machine) is imported again."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        if HAS_TRITON:
            for name in KERNEL_MODULES:
                importlib.reload(importlib.import_module(name))
        yield
    if HAS_TRITON:
        for name in KERNEL_MODULES:  # back to compiled kernels for whoever comes next
            importlib.reload(importlib.import_module(name))


def random_experts(E=4, D=40, F=24, seed=0):
    # D and F are not multiples of the tiles: the masks at the edges are exercised
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(E, F, D, generator=g) / D**0.5
    w2 = torch.randn(E, D, F, generator=g) / F**0.5
    w3 = torch.randn(E, F, D, generator=g) / D**0.5
    return [w1, w2, w3]


def routed(T, E, K, D=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    weights, idx = route(torch.randn(T, E, generator=g) * 3, K)
    return x, weights, idx


# ---- alignment (plain torch) ------------------------------------------------------------------------------


@pytest.mark.parametrize("T,K,E,block", [(1, 2, 8, 16), (37, 2, 4, 16), (100, 3, 8, 8), (0, 2, 4, 16)])
def test_align_sorts_by_expert_and_pads_each_group(T, K, E, block):
    _, _, idx = routed(T, E, K)
    pair_ids, block_expert = align_by_expert(idx, E, block)
    P = T * K
    assert pair_ids.numel() == block_expert.numel() * block >= P + 0
    real = pair_ids[pair_ids < P]
    assert sorted(real.tolist()) == list(range(P))  # every pair exactly once
    flat = idx.reshape(-1)
    for b, e in enumerate(block_expert.tolist()):
        rows = pair_ids[b * block : (b + 1) * block]
        rows = rows[rows < P]
        if e == -1:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (flat[rows] == e).all()  # one expert per block
    used = (block_expert >= 0).sum().item()
    counts = torch.bincount(flat, minlength=E)
    assert used == sum(-(-int(c) // block) for c in counts)  # each group padded to whole blocks, no more


# ---- the kernel against the reference ---------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("T,K,E", [(1, 2, 8), (5, 1, 4), (37, 2, 4), (19, 3, 8)])
def test_kernel_equals_reference(T, K, E):
    w1, w2, w3 = random_experts(E=E)
    x, weights, idx = routed(T, E, K)
    ref = experts_reference(x, Experts(w1, w2, w3), Routing(weights, idx))
    out = fused_experts(x, w1, w2, w3, weights, idx, config=SMALL)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5


@needs_triton
def test_kernel_default_tiles_equal_reference():
    """The tile sizes used on GPUs (decode and prefill), interpreted."""
    w1, w2, w3 = random_experts(E=8, D=32, F=48)
    for T in (3, 300):  # below and above the decode/prefill switch
        x, weights, idx = routed(T, 8, 2, D=32)
        out = fused_experts(x, w1, w2, w3, weights, idx)
        assert (out - experts_grouped(x, Experts(w1, w2, w3), Routing(weights, idx))).abs().max().item() <= 1e-5


def bf16_ulp(x: torch.Tensor) -> float:
    """The spacing of bf16 numbers at the largest |x|."""
    return 2.0 ** (torch.floor(torch.log2(x.float().abs().max())).item() - 7)


def tolerance(ref: torch.Tensor) -> float:
    return 1e-5 if ref.dtype == torch.float32 else 2 * bf16_ulp(ref)


QUANTIZED = [("int8", 0), ("fp8", 0), ("int4", 32), ("int4", 64)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,group", QUANTIZED)
def test_quantized_kernel_equals_reference_on_the_same_stack(mode, group, dtype):
    """The model's own quantized stacks (what quantize_model leaves in layer.moe), dequantized in registers, against
    the reference that dequantizes them. int4 needs D, F multiples of 64 (and of the group size): F = 192 is not a
    multiple of UNROLLED's down step; int8 / fp8 keep the edges (D = 40, F = 24) that no tile divides."""
    E, T, K = 4, 21, 2
    D, F_ = {0: (40, 24), 32: (64, 192), 64: (128, 192)}[group]
    w1, w2, w3 = (w.to(dtype) for w in random_experts(E=E, D=D, F=F_))
    stack = Experts(*(QuantizedWeight.from_float(w, mode, group or 64) for w in (w1, w2, w3)))
    x, weights, idx = routed(T, E, K, D=D)
    x = x.to(dtype)
    out = fused_experts(x, stack.w1, stack.w2, stack.w3, weights, idx, config=UNROLLED if group else SMALL)
    ref = experts_reference(x, stack, Routing(weights, idx))
    assert out.dtype == dtype and out.shape == ref.shape
    assert (out.float() - ref.float()).abs().max().item() <= tolerance(ref)
    # and the quantized experts stay close to the plain ones (the comparison above is not of garbage with garbage)
    full = experts_reference(x, Experts(w1, w2, w3), Routing(weights, idx)).float()
    assert (out.float() - full).norm() <= 0.25 * full.norm()  # int4 of random weights: ~15%


@needs_triton
@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 32)])
def test_quantized_kernel_never_reads_unused_experts(mode, group):
    """Every token on experts 0 and 5 of 8: the other experts' scales are NaN, which any read of them would spread."""
    D, F_ = (40, 24) if mode == "int8" else (64, 64)
    stack = [QuantizedWeight.from_float(w, mode, group or 64) for w in random_experts(E=8, D=D, F=F_)]
    x, _, _ = routed(16, 8, 2, D=D)
    idx = torch.tensor([[0, 5]] * 16)
    weights = torch.full((16, 2), 0.5)
    unused = [1, 2, 3, 4, 6, 7]
    for w in stack:
        if mode == "int8":
            w.scale[unused] = float("nan")
        else:
            w.blocks[unused] = 255  # every (scale, zero) pair's float32 bits become a NaN
    out = fused_experts(x, *stack, weights, idx, config=SMALL)
    assert not out.isnan().any()
    assert (out - experts_reference(x, Experts(*stack), Routing(weights, idx))).abs().max().item() <= 1e-5


@needs_triton
def test_quantized_kernel_default_tiles_equal_reference():
    """The tile sizes used on GPUs (decode and prefill), interpreted, on int4 of group size 32 (two and four
    group-sized tiles a step) in bf16."""
    E, D, F_ = 4, 64, 128
    stack = Experts(*(QuantizedWeight.from_float(w.bfloat16(), "int4", 32) for w in random_experts(E=E, D=D, F=F_)))
    for T in (3, 200):  # below and above the decode/prefill switch
        x, weights, idx = routed(T, E, 2, D=D)
        x = x.bfloat16()
        out = fused_experts(x, stack.w1, stack.w2, stack.w3, weights, idx)
        ref = experts_reference(x, stack, Routing(weights, idx))
        assert (out.float() - ref.float()).abs().max().item() <= tolerance(ref)


def test_mixed_formats_other_devices_and_old_gpus_are_reasons_not_to_run(monkeypatch):
    w1, w2, w3 = random_experts()
    x = torch.randn(3, 40)
    q2 = QuantizedWeight.from_float(w2, "int8")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert unavailable_reason(x, w1, w2, w3) is None or not HAS_TRITON
    if HAS_TRITON:
        assert "mixed formats" in unavailable_reason(x, w1, q2, w3)
        q1, q3 = QuantizedWeight.from_float(w1, "fp8"), QuantizedWeight.from_float(w3, "fp8")
        assert "mixed formats" in unavailable_reason(x, q1, q2, q3)
        assert "activations" in unavailable_reason(x.double(), w1, w2, w3)
        assert "expert weights on meta" in unavailable_reason(x, q1.to("meta"), q2, q3)
    import mixtral.kernels.fused_moe as fused_moe

    fused_moe._capability.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    assert "8.9" in fp8_unavailable_reason("cuda:0")
    assert fp8_unavailable_reason("cpu") is None
    fused_moe._capability.cache_clear()


@needs_triton
def test_kernel_never_reads_unused_experts():
    w1, w2, w3 = random_experts(E=8)
    x, _, _ = routed(16, 8, 2)
    idx = torch.tensor([[0, 5]] * 16)
    weights = torch.full((16, 2), 0.5)
    for w in (w1, w2, w3):
        w[[1, 2, 3, 4, 6, 7]] = float("nan")  # a kernel that touched them would produce NaN
    out = fused_experts(x, w1, w2, w3, weights, idx, config=SMALL)
    assert not out.isnan().any()
    assert (out - experts_reference(x, Experts(w1, w2, w3), Routing(weights, idx))).abs().max().item() <= 1e-5


@needs_triton
def test_kernel_never_reads_past_the_end_of_the_rows():
    """Plain experts as views of their first D (or F) columns, the other columns NaN, and x likewise: a tile stepping
    past the end of a row must not read them."""
    E, D, F_ = 4, 40, 24
    pad = 24
    ws = [torch.randn(E, n, k + pad) / k**0.5 for n, k in ((F_, D), (D, F_), (F_, D))]
    for w in ws:
        w[..., -pad:] = float("nan")
    w1, w2, w3 = (w[..., :-pad] for w in ws)
    x_full, weights, idx = routed(21, E, 2, D=D + pad)
    x_full[:, D:] = float("nan")
    x = x_full[:, :D]
    out = fused_experts(x, w1, w2, w3, weights, idx, config=SMALL)
    assert not out.isnan().any()
    assert (out - experts_reference(x, Experts(w1, w2, w3), Routing(weights, idx))).abs().max().item() <= 1e-5


@needs_triton
@pytest.mark.parametrize(
    ("quantize", "changes"),
    [(None, {"n_layers": 1}), ("int4", {"n_layers": 2, "head_dim": 32})],  # int4: wk/wv need 64 output rows
)
def test_whole_model_with_the_kernel_equals_grouped(quantize, changes):
    """A tiny model, plain or quantized int4 (attention and experts; the head int8), its experts through the kernel
    against the grouped path (for int4 ATen's kernel: other sums of the same weights): logits of size ~1, 1e-5."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").replace(vocab_size=200, **changes)).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.moe.gate.weight.mul_(50)  # decisive routing
    if quantize:
        quantize_model(model, quantize, group_size=32)
        assert isinstance(model.layers[0].moe.w1, QuantizedWeight) and model.layers[0].moe.w1.mode == quantize
    tokens = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        want = model(tokens)
        model.set_moe_impl("triton")
        got = model(tokens)
    assert (got - want).abs().max().item() <= 1e-5


# ---- fallback ------------------------------------------------------------------------------------------------


def test_falls_back_to_the_plain_path_where_triton_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_unavailable_reason("cpu") is not None
    w1, w2, w3 = random_experts()
    x, weights, idx = routed(9, 4, 2)
    with pytest.warns(UserWarning, match="using the plain PyTorch path"):
        out = experts_triton(x, Experts(w1, w2, w3), Routing(weights, idx))
    assert torch.equal(out, experts_grouped(x, Experts(w1, w2, w3), Routing(weights, idx)))
    with pytest.raises(RuntimeError, match="the fused MoE Triton kernel cannot run"):
        experts_triton(x, Experts(w1, w2, w3), Routing(weights, idx), fallback=False)


@needs_triton
def test_gradients_take_the_plain_path():
    assert os.environ.get("TRITON_INTERPRET") == "1" and triton_unavailable_reason("cpu") is None
    w1, w2, w3 = (w.requires_grad_() for w in random_experts())
    x, weights, idx = routed(9, 4, 2)
    with pytest.warns(UserWarning, match="the kernel has no backward"):
        out = experts_triton(x, Experts(w1, w2, w3), Routing(weights, idx))
    out.sum().backward()
    assert w1.grad is not None and w1.grad.abs().sum() > 0
