"""The CPU decode kernels (`mixtral/kernels/cpu_decode.cpp`, AVX512-BF16 or AVX2 builds) against the plain
PyTorch path they replace: the same products in float32 rounded once, so they differ from an exact float32 result
no more than torch.mv does; and the model decodes the same with and without them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import mixtral
from mixtral.cache import KVCache
from mixtral.config import ModelConfig
from mixtral.generate import decode_step, prefill
from mixtral.kernels import cpu as cpu_kernels
from mixtral.kernels import cpu_step
from mixtral.kernels import ops as kops
from mixtral.kernels.ops import (
    FEW_ROWS,
    FUSED_MIN_ROWS,
    FUSED_ROWS,
    Experts,
    Routing,
    attention,
    attention_mask,
    experts_decode,
    grouped_by_expert,
    int4_product_reference,
    linear,
    swiglu,
)
from mixtral.kernels.weights import QuantizedWeight, quantize_int8
from mixtral.model import RMSNorm, Transformer
from mixtral.moe import experts_reference
from mixtral.quantize import QuantizedLinear, quantize_model

needs_kernels = pytest.mark.skipif(cpu_kernels.ops() is None, reason=f"CPU kernels: {cpu_kernels.status()}")


def _max_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return (y.float() - ref).abs().max().item()


def _avx2_int4_swiglu(x: torch.Tensor, w1, w2, w3) -> torch.Tensor:
    """One int4 SwiGLU expert as AVX2's kernels round: each product on x in int8 per group
    (`int4_product_reference`), bf16 at w1 x, w3 x, silu, their product and the result."""
    a, b = (int4_product_reference(x, w).to(torch.bfloat16) for w in (w1, w3))
    h = torch.nn.functional.silu(a) * b
    return int4_product_reference(h, w2).to(torch.bfloat16)


@needs_kernels
@pytest.mark.parametrize("shape", [(3584, 1024), (1024, 3584), (256, 1024), (37, 64), (8, 32), (1, 96)])
def test_gemv_is_as_close_to_float32_as_torch_mv(shape):
    torch.manual_seed(0)
    W, x = torch.randn(shape, dtype=torch.bfloat16), torch.randn(shape[1], dtype=torch.bfloat16)
    exact = W.float() @ x.float()
    y = cpu_kernels.ops().gemv(W, x)
    assert y.dtype == torch.bfloat16 and y.shape == (shape[0],)
    # Rounded once to bf16 from a float32 sum: within half a bf16 step (2^-8 relative) plus summation-order noise.
    assert (y.float() - exact).abs().le(exact.abs() * 2**-8 + 1e-4 * shape[1] ** 0.5).all()
    assert _max_err(y, exact) <= 1.5 * _max_err(torch.mv(W, x), exact) + 1e-3


@needs_kernels
@pytest.mark.parametrize(("T", "K", "D"), [(128, 2, 1024), (7, 3, 72), (1, 2, 64), (50, 4, 100)])
def test_combine_equals_the_pytorch_sum_bit_for_bit(T, K, D, monkeypatch):
    """The grouped MoE's last step: each token's k weighted expert outputs summed in float32 in pair order and
    rounded once, in one kernel call; the same as the float32 ops (k > 2 makes the order of the sums matter)."""
    torch.manual_seed(T)
    E = 8
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, K), dim=-1)
    x = torch.randn(T, D, dtype=torch.bfloat16)
    scales = torch.randn(E, D)

    def expert(e: int, h: torch.Tensor) -> torch.Tensor:  # a stand-in expert: distinct per expert, bf16 out
        return (h.float() * scales[e]).to(torch.bfloat16)

    calls = []
    real = cpu_kernels.ops().combine
    monkeypatch.setattr(torch.ops.mixtral_cpu, "combine", lambda *a: calls.append(len(a[0])) or real(*a))
    with torch.no_grad():
        fast = grouped_by_expert(x, Routing(weights, idx), E, expert)
        with cpu_kernels.disabled():
            plain = grouped_by_expert(x, Routing(weights, idx), E, expert)
    assert calls == [len(set(idx.flatten().tolist()))]  # one call, given each used expert's output
    assert fast.dtype == torch.bfloat16 and torch.equal(fast, plain)
    with pytest.raises(RuntimeError, match="names token"):
        real([torch.zeros(2, D, dtype=torch.bfloat16)], torch.ones(2), torch.tensor([0, T]), T)


@needs_kernels
@pytest.mark.parametrize("shape", [(128, 1024), (3, 72), (1, 4096), (2, 5, 40)])
def test_rms_norm_kernel_agrees_with_the_pytorch_path(shape):
    """The same roundings (normalised x to bf16, times the weight to bf16); only the order of the float32 sum of
    squares differs, which moves a rare result by one bf16 step."""
    torch.manual_seed(len(shape))
    norm = RMSNorm(shape[-1], 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]))
        x = torch.randn(shape, dtype=torch.bfloat16) * 3
        fast = norm(x)
        with cpu_kernels.disabled():
            plain = norm(x)
    assert fast.dtype == torch.bfloat16 and fast.shape == x.shape
    assert (fast != plain).float().mean().item() <= 0.01
    # where the normalised value sits on a rounding boundary it moves by one bf16 step, then the product rounds again
    two_steps = torch.maximum(fast.float().abs(), plain.float().abs()) * 2**-6
    assert ((fast.float() - plain.float()).abs() <= two_steps).all()


@needs_kernels
def test_linear_uses_the_kernel_for_one_bf16_row_and_agrees_with_f_linear():
    torch.manual_seed(1)
    W, x = torch.randn(384, 256, dtype=torch.bfloat16), torch.randn(1, 1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        fast = linear(x, W)
        with cpu_kernels.disabled():
            plain = linear(x, W)
    exact = x.float() @ W.float().T
    assert fast.shape == plain.shape == (1, 1, 384)
    assert _max_err(fast, exact) <= 1.5 * _max_err(plain, exact) + 1e-3


@needs_kernels
@pytest.mark.parametrize(("M", "N", "K"), [(2, 3584, 1024), (13, 1024, 3584), (96, 37, 64), (7, 5, 96), (6, 4, 32)])
def test_gemm_of_a_few_rows_is_as_close_to_float32_as_f_linear(M, N, K):
    # Row counts around the 6-row tiles (full tiles, a remainder, one tile) and column counts around the 4-row blocks.
    torch.manual_seed(3)
    W, x = torch.randn(N, K, dtype=torch.bfloat16), torch.randn(M, K, dtype=torch.bfloat16)
    exact = x.float() @ W.float().T
    y = cpu_kernels.ops().gemm(x, W)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    assert (y.float() - exact).abs().le(exact.abs() * 2**-8 + 1e-4 * K**0.5).all()
    assert _max_err(y, exact) <= 1.5 * _max_err(torch.nn.functional.linear(x, W), exact) + 1e-3
    # Each sum rounded once to the nearest bf16: the exact product rounded differs only where the float32 sum sits
    # on the other side of a rounding boundary (rare), a truncation would differ in about half the elements.
    rounded = (x.double() @ W.double().T).float().bfloat16()
    assert (y != rounded).float().mean().item() <= 0.01


@needs_kernels
def test_linear_uses_the_gemm_kernel_for_a_few_rows_and_agrees_with_f_linear(monkeypatch):
    torch.manual_seed(4)
    few = min(FEW_ROWS, 40)  # AVX2 has no limit (FEW_ROWS): one is set to see the path beyond it
    monkeypatch.setattr(kops, "FEW_ROWS", few)
    W, x = torch.randn(384, 256, dtype=torch.bfloat16), torch.randn(2, 5, 256, dtype=torch.bfloat16)
    calls = []
    real = cpu_kernels.ops().gemm
    monkeypatch.setattr(torch.ops.mixtral_cpu, "gemm", lambda *a: calls.append(a[0].shape) or real(*a), raising=False)
    with torch.no_grad():
        fast = linear(x, W)
        with cpu_kernels.disabled():
            plain = linear(x, W)
        many = linear(torch.randn(few + 1, 256, dtype=torch.bfloat16), W)  # oneDNN
    assert calls == [(10, 256)] and many.shape == (few + 1, 384)
    exact = x.float() @ W.float().T
    assert fast.shape == plain.shape == (2, 5, 384)
    assert _max_err(fast, exact) <= 1.5 * _max_err(plain, exact) + 1e-3


@needs_kernels
@pytest.mark.parametrize(("M", "D", "F"), [(2, 64, 96), (7, 96, 160), (13, 1024, 3584), (40, 64, 32)])
def test_fused_swiglu_equals_the_expert_op_by_op(M, D, F):
    # The same GEMM sums as `gemm` and moe.swiglu's roundings; only silu's exponential is computed differently
    # (a polynomial within ~2 ulp of float32 instead of PyTorch's), which may move a rare bf16 rounding.
    torch.manual_seed(5)
    x = torch.randn(M, D, dtype=torch.bfloat16)
    w1, w3 = (torch.randn(F, D, dtype=torch.bfloat16) / D**0.5 for _ in range(2))
    w2 = torch.randn(D, F, dtype=torch.bfloat16) / F**0.5
    ops = cpu_kernels.ops()
    y = ops.swiglu(x, w1, w2, w3)
    op_by_op = ops.gemm(torch.nn.functional.silu(ops.gemm(x, w1)) * ops.gemm(x, w3), w2)
    assert y.dtype == torch.bfloat16 and y.shape == (M, D)
    assert (y != op_by_op).float().mean().item() <= 1e-3
    torch.testing.assert_close(y, op_by_op, rtol=1e-2, atol=1e-2)
    h = torch.nn.functional.silu(x.float() @ w1.float().T) * (x.float() @ w3.float().T)
    exact = h @ w2.float().T
    plain = torch.nn.functional.linear(
        torch.nn.functional.silu(torch.nn.functional.linear(x, w1)) * torch.nn.functional.linear(x, w3), w2
    )
    assert _max_err(y, exact) <= 1.5 * _max_err(plain, exact) + 1e-3
    with pytest.raises(RuntimeError, match=r"swiglu: .* need w1 and w3 \[F, D\], w2 \[D, F\]"):
        ops.swiglu(x, w1, w1, w3)  # w1's [F, D] where w2 [D, F] belongs


@needs_kernels
@pytest.mark.parametrize(("M", "D", "F"), [(2, 64, 96), (13, 1024, 3584), (40, 96, 64)])
def test_fused_int8_swiglu_equals_the_bf16_one_on_the_dequantized_weights(M, D, F):
    # Each block of rows is dequantized as QuantizedView.dequantize does (q * scale, rounded to bf16 once), then
    # the same tiles run: bit for bit the bf16 expert on the dequantized weights.
    torch.manual_seed(7)
    x = torch.randn(M, D, dtype=torch.bfloat16)
    ws = [
        QuantizedWeight.from_float(torch.randn(*shape, dtype=torch.bfloat16), "int8")
        for shape in ((F, D), (D, F), (F, D))
    ]
    ops = cpu_kernels.ops()
    y = ops.swiglu_int8(x, *(t for w in ws for t in (w.q, w.scale)))
    bf16 = ops.swiglu(x, *(w.dequantize() for w in ws))
    if cpu_kernels.isa() == "avx512":
        assert torch.equal(y, bf16)
    else:  # AVX2: the GEMV's integer sums (see the AVX2 test below)
        torch.testing.assert_close(y, bf16, rtol=2e-2, atol=1e-2 * bf16.abs().max().item())
    with pytest.raises(RuntimeError, match="int8 weights must be a contiguous int8 CPU tensor"):
        ops.swiglu_int8(x, ws[0].q.float(), ws[0].scale, ws[1].q, ws[1].scale, ws[2].q, ws[2].scale)


@needs_kernels
@pytest.mark.parametrize(
    ("M", "D", "F", "group"), [(2, 64, 128, 64), (7, 128, 192, 32), (13, 1024, 3584, 64), (40, 256, 128, 128)]
)
def test_fused_int4_swiglu_equals_the_bf16_one_on_the_dequantized_weights(M, D, F, group):
    # The GEMV's integer sums on weights never rounded to bf16 (see the test below), x in fixed point: AVX-512's 15
    # bits, as close to exact float32 as the bf16 kernel on the dequantized weights; AVX2's int8 per group, as close
    # to that rounding's reference.
    torch.manual_seed(8)
    x = torch.randn(M, D, dtype=torch.bfloat16)
    shapes = ((F, D), (D, F), (F, D))
    ws = [QuantizedWeight.from_float(torch.randn(*shape, dtype=torch.bfloat16), "int4", group) for shape in shapes]
    dq = [w.dequantize() for w in ws]
    ops = cpu_kernels.ops()
    y = ops.swiglu_int4(x, *(w.blocks for w in ws), group)
    bf16 = ops.swiglu(x, *dq)
    h = torch.nn.functional.silu(x.float() @ dq[0].float().T) * (x.float() @ dq[2].float().T)
    exact = h @ dq[1].float().T
    if cpu_kernels.isa() == "avx512":
        torch.testing.assert_close(y, bf16, rtol=2e-2, atol=2e-2 * exact.abs().max().item())
        assert _max_err(y, exact) <= 1.5 * _max_err(bf16, exact) + 1e-3
    else:  # AVX2: x and h in int8 per group; as close to that rounding's reference as bf16's kernel to exact
        ref = _avx2_int4_swiglu(x, *ws)
        torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2 * exact.abs().max().item())
        assert _max_err(y, ref.float()) <= 1.5 * _max_err(bf16, exact) + 1e-3
    with pytest.raises(RuntimeError, match="do not fit"):
        ops.swiglu_int4(x, *(w.blocks for w in ws), group // 2 + 1)


@needs_kernels
@pytest.mark.parametrize(("M", "N", "K"), [(2, 64, 128), (13, 1024, 3584), (128, 192, 256)])
def test_quantized_gemms_of_a_few_rows_equal_gemm_on_the_dequantized_weight(M, N, K, monkeypatch):
    torch.manual_seed(9)
    x, W = torch.randn(M, K, dtype=torch.bfloat16), torch.randn(N, K, dtype=torch.bfloat16)
    ops = cpu_kernels.ops()
    q8, q4 = QuantizedWeight.from_float(W, "int8"), QuantizedWeight.from_float(W, "int4", 64)
    y8 = ops.gemm_int8(x, q8.q, q8.scale)
    if cpu_kernels.isa() == "avx512":
        assert torch.equal(y8, ops.gemm(x, q8.dequantize()))  # the int8 rows dequantized, then the same tiles
    else:  # AVX2: the GEMV's integer sums for all rows at once (see the AVX2 test below)
        torch.testing.assert_close(y8, ops.gemm(x, q8.dequantize()), rtol=2e-2, atol=1e-2 * y8.abs().max().item())
    y4, ref4 = ops.gemm_int4(x, q4.blocks, 64), ops.gemm(x, q4.dequantize())
    exact4 = x.float() @ q4.dequantize().float().T
    torch.testing.assert_close(y4, ref4, rtol=2e-2, atol=2e-2 * exact4.abs().max().item())
    if cpu_kernels.isa() == "avx2":  # x in int8 per group: the error is that rounding's (see the AVX2 tests)
        exact4 = int4_product_reference(x, q4).float()
    assert _max_err(y4, exact4) <= 1.5 * _max_err(ref4, x.float() @ q4.dequantize().float().T) + 1e-3
    # QuantizedWeight's matmul takes them for FUSED_MIN_ROWS to FUSED_ROWS rows without gradients
    calls = []
    for name in ("gemm_int8", "gemm_int4"):
        real = getattr(ops, name)
        monkeypatch.setattr(
            torch.ops.mixtral_cpu, name, lambda *a, real=real, name=name: calls.append(name) or real(*a)
        )
    fused = {mode: min(limit, 40) for mode, limit in FUSED_ROWS.items()}  # AVX2: no limits; one to go beyond
    fused["int4"] = FUSED_ROWS["int4"]
    monkeypatch.setattr(kops, "FUSED_ROWS", fused)
    expected = []
    with torch.no_grad():
        for rows in (1, 2, *FUSED_MIN_ROWS.values(), fused["int8"] + 1):  # int8 beyond: dequantized, oneDNN
            xr = torch.randn(rows, K, dtype=torch.bfloat16)
            y8, y4 = linear(xr, q8), linear(xr, q4)
            torch.testing.assert_close(y8, ops.gemm(xr, q8.dequantize()), rtol=2e-2, atol=2e-2 * y8.abs().max().item())
            torch.testing.assert_close(y4, ops.gemm(xr, q4.dequantize()), rtol=2e-2, atol=2e-2 * y4.abs().max().item())
            expected += ["gemm_int8"] * (FUSED_MIN_ROWS["int8"] <= rows <= fused["int8"])
            expected += ["gemm_int4"] * (rows >= FUSED_MIN_ROWS["int4"])  # int4 has no upper limit
    assert calls == expected and "gemm_int8" in calls and calls[-1] == "gemm_int4" and 1 not in FUSED_MIN_ROWS.values()


@needs_kernels
def test_moe_swiglu_fuses_an_experts_rows_where_the_kernel_can(monkeypatch):
    torch.manual_seed(6)
    w1, w3 = torch.randn(96, 64, dtype=torch.bfloat16), torch.randn(96, 64, dtype=torch.bfloat16)
    w2 = torch.randn(64, 96, dtype=torch.bfloat16)
    calls = []
    real = cpu_kernels.ops().swiglu
    monkeypatch.setattr(torch.ops.mixtral_cpu, "swiglu", lambda x, *w: calls.append(x.shape[0]) or real(x, *w))
    limit = min(FUSED_ROWS["bf16"], 40)  # AVX2: no limit; one to go beyond
    monkeypatch.setattr(kops, "FUSED_ROWS", {**FUSED_ROWS, "bf16": limit})
    for rows in (1, 2, limit, limit + 1):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        with torch.no_grad():
            fast = swiglu(x, w1, w2, w3)
            with cpu_kernels.disabled():
                plain = swiglu(x, w1, w2, w3)
        torch.testing.assert_close(fast, plain, rtol=2e-2, atol=2e-2)
    swiglu(torch.randn(4, 64, dtype=torch.bfloat16), w1, w2, w3)  # gradients on: F.linear
    assert calls == [2, limit]
    int8_calls = []
    real8 = cpu_kernels.ops().swiglu_int8
    monkeypatch.setattr(
        torch.ops.mixtral_cpu, "swiglu_int8", lambda x, *w: int8_calls.append(x.shape[0]) or real8(x, *w)
    )
    q1, q2, q3 = (QuantizedWeight.from_float(w[None], "int8") for w in (w1, w2, w3))  # stacks of one expert
    x = torch.randn(max(FUSED_MIN_ROWS.values()), 64, dtype=torch.bfloat16)
    with torch.no_grad():
        fast = swiglu(x, q1[0], q2[0], q3[0])
        plain = swiglu(x, q1[0].dequantize(), q2[0].dequantize(), q3[0].dequantize())
        swiglu(x[: FUSED_MIN_ROWS["int8"] - 1], q1[0], q2[0], q3[0])  # fewer rows: ATen's int8 kernel
    assert int8_calls == [len(x)]
    torch.testing.assert_close(fast, plain, rtol=2e-2, atol=1e-2 * plain.abs().max().item())
    assert torch.equal(fast, plain) or cpu_kernels.isa() != "avx512"
    int4_calls = []
    real4 = cpu_kernels.ops().swiglu_int4
    monkeypatch.setattr(
        torch.ops.mixtral_cpu, "swiglu_int4", lambda x, *w: int4_calls.append(x.shape[0]) or real4(x, *w)
    )
    w1, w3 = torch.randn(128, 64, dtype=torch.bfloat16), torch.randn(128, 64, dtype=torch.bfloat16)
    w2 = torch.randn(64, 128, dtype=torch.bfloat16)
    q1, q2, q3 = (QuantizedWeight.from_float(w[None], "int4", 32) for w in (w1, w2, w3))
    with torch.no_grad():
        fast = swiglu(x, q1[0], q2[0], q3[0])
        plain = swiglu(x, q1[0].dequantize(), q2[0].dequantize(), q3[0].dequantize())
        swiglu(x[: FUSED_MIN_ROWS["int4"] - 1], q1[0], q2[0], q3[0])  # fewer rows: the GEMV row by row
    assert int4_calls == [len(x)]
    torch.testing.assert_close(fast, plain, rtol=2e-2, atol=2e-2 * plain.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("top_k", [1, 2])
def test_fused_experts_equal_the_reference_dispatch(top_k):
    torch.manual_seed(2)
    E, F, D = 8, 96, 64
    w1, w3 = (torch.randn(E, F, D, dtype=torch.bfloat16) / 8 for _ in range(2))
    w2 = torch.randn(E, D, F, dtype=torch.bfloat16) / 8
    x = torch.randn(1, D, dtype=torch.bfloat16)
    weights, idx = torch.softmax(torch.randn(1, top_k), -1), torch.randperm(E)[:top_k][None]
    with torch.no_grad():
        fast = experts_decode(x, Experts(w1, w2, w3), Routing(weights, idx))
        ref = experts_reference(x, Experts(w1, w2, w3), Routing(weights, idx))
        with cpu_kernels.disabled():
            plain = experts_decode(x, Experts(w1, w2, w3), Routing(weights, idx))
        exact = experts_reference(x.float(), Experts(w1.float(), w2.float(), w3.float()), Routing(weights, idx))
    assert fast.dtype == torch.bfloat16 and fast.shape == (1, D)
    torch.testing.assert_close(fast, ref, rtol=2e-2, atol=2e-2)
    assert _max_err(fast, exact) <= 1.5 * _max_err(plain, exact) + 1e-3
    with pytest.raises(RuntimeError, match="expert id 8 is out of range for 8 experts"):
        cpu_kernels.ops().experts(x[0], w1, w2, w3, weights[0], torch.full((top_k,), 8))


@needs_kernels
def test_the_builtin_model_decodes_the_same_with_and_without_the_kernels():
    model = mixtral.load_model(mixtral.BUILTIN, dtype=torch.bfloat16)
    prompt = [1, *range(300, 340)]

    def steps() -> torch.Tensor:
        cache = KVCache(model.config, 1, 64, dtype=torch.bfloat16)
        logits = [prefill(model, cache, [prompt])]
        for i in range(8):  # the same fed tokens both times, so the steps compare one to one
            logits.append(decode_step(model, cache, torch.tensor([500 + i]), torch.tensor([len(prompt) + i])))
        return torch.cat(logits)

    fast = steps()
    with cpu_kernels.disabled():
        plain = steps()
    assert (fast.argmax(-1) == plain.argmax(-1)).all()
    assert (fast - plain).abs().max() < 0.05 * plain.abs().max()


def _assert_attention_close(fast, plain, q, k, v, mask) -> None:
    """The kernel's attention against float32 SDPA: float32 sums rounded once, so within a bf16 step of the float32
    result, and no further from it than SDPA's own bf16 result (`plain`)."""
    rep = q.shape[1] // k.shape[1]
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1), attn_mask=mask
    )
    assert fast.dtype == torch.bfloat16
    assert ((fast.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-3).all()
    assert _max_err(fast, exact) <= 1.5 * _max_err(plain, exact) + 1e-3


@needs_kernels
@pytest.mark.parametrize(
    ("B", "H", "G", "S", "d", "peak"),
    [(1, 16, 4, 200, 64, 1), (3, 8, 8, 37, 32, 1), (2, 4, 1, 5, 128, 1), (1, 12, 2, 50, 64, 1), (2, 6, 2, 33, 32, 20)],
)
def test_decode_attention_equals_sdpa(B, H, G, S, d, peak):
    """Query heads per key/value head of 4, 1, 4, 6 (4 + 2 at once) and 3; `peak` scales q for scores far apart
    (probabilities down to e^-100 and below: the kernel's exponential over its whole range)."""
    torch.manual_seed(5)
    q = torch.randn(B, H, 1, d, dtype=torch.bfloat16) * peak
    # k and v as the cache hands them over: the first S of more slots (strided views)
    k, v = (torch.randn(B, G, S + 7, d, dtype=torch.bfloat16)[:, :, :S] for _ in range(2))
    mask = torch.rand(B, 1, 1, S) < 0.7
    mask[..., 0] = True  # every row attends to something
    with torch.no_grad():
        fast = attention(q, k, v, mask)
        with cpu_kernels.disabled():
            plain = attention(q, k, v, mask)
    assert fast.shape == (B, H, 1, d)
    _assert_attention_close(fast, plain, q, k, v, mask)
    with pytest.raises(RuntimeError, match="mask must be contiguous bool"):
        cpu_kernels.ops().decode_attention(q, k, v, mask.float(), 0.125)


@needs_kernels
@pytest.mark.parametrize(
    ("H", "G", "T", "prefix", "window"), [(16, 4, 128, 0, None), (6, 2, 37, 20, 16), (4, 4, 5, 0, None)]
)
def test_a_short_prompts_attention_runs_row_by_row_and_equals_sdpa(H, G, T, prefix, window, monkeypatch):
    """A prompt of one sequence (bf16, T x S within ROW_ATTENTION_MAX) attends through the one-row kernel, each query
    row a batch row of its own over the same keys; causal, after cached positions, and with a sliding window."""
    torch.manual_seed(T)
    d, S = 64, prefix + T
    q = torch.randn(1, H, T, d, dtype=torch.bfloat16)
    k, v = (torch.randn(1, G, S + 3, d, dtype=torch.bfloat16)[:, :, :S] for _ in range(2))  # strided, as cached
    mask = attention_mask(torch.arange(prefix, S)[None], torch.arange(S)[None], window)
    calls = []
    real = cpu_kernels.ops().decode_attention
    monkeypatch.setattr(torch.ops.mixtral_cpu, "decode_attention", lambda q, *a: calls.append(q.shape) or real(q, *a))
    with torch.no_grad():
        fast = attention(q, k, v, mask)
        with cpu_kernels.disabled():
            plain = attention(q, k, v, mask)
        monkeypatch.setattr(kops, "ROW_ATTENTION_MAX", T * S - 1)
        attention(q, k, v, mask)  # one position more than the limit: flash attention
    assert calls == [(T, H, 1, d)]
    assert fast.shape == (1, H, T, d)
    _assert_attention_close(fast, plain, q, k, v, mask)


def test_turned_off_by_the_environment_falls_back_to_torch_mv():
    code = (
        "import torch, mixtral; from mixtral.kernels import cpu; print(cpu.status());"
        "m = mixtral.load_model(mixtral.BUILTIN, dtype=torch.bfloat16);"
        "print(len(mixtral.generate(m, [[1, 300, 301]], max_new_tokens=4, eos_id=None)[0]))"
    )
    env = {**os.environ, "MIXTRAL_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    status, tokens = out.stdout.splitlines()
    assert status == "torch.mv (turned off by MIXTRAL_CPU_KERNELS=0)"
    assert tokens == "4"


def test_the_instruction_set_is_picked_by_the_cpus_flags():
    avx2 = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx512vbmi"}
    assert cpu_kernels.pick_isa(avx512) == "avx512"
    assert cpu_kernels.pick_isa(avx512, "avx2") == "avx2"  # MIXTRAL_CPU_KERNELS=avx2: to compare the two builds
    assert cpu_kernels.pick_isa(avx512 - {"avx512_bf16"}) == "avx2"  # AVX-512 without BF16 (Skylake-X, Ice Lake)
    assert cpu_kernels.pick_isa(avx2) == cpu_kernels.pick_isa(avx2, "avx512") == "avx2"
    assert cpu_kernels.pick_isa(avx2 - {"fma"}) is None and cpu_kernels.pick_isa(set()) is None


@needs_kernels
def test_this_cpu_runs_the_build_its_flags_call_for():
    flags = cpu_kernels.cpu_flags()
    isa = cpu_kernels.pick_isa(flags, os.environ.get("MIXTRAL_CPU_KERNELS", ""))
    assert cpu_kernels.status() == f"{cpu_kernels.ISA_NAMES[isa]} decode kernels"
    assert isa == "avx512" or "avx512_bf16" not in flags or os.environ.get("MIXTRAL_CPU_KERNELS") == "avx2"


def test_each_instruction_set_builds_into_a_folder_named_by_its_flags(monkeypatch, tmp_path):
    import torch.utils.cpp_extension

    monkeypatch.setenv("MIXTRAL_KERNEL_DIR", str(tmp_path))
    builds = []

    def fake_load(name, sources, extra_cflags, build_directory, **kwargs):
        builds.append((Path(build_directory).name, extra_cflags))
        (Path(build_directory) / f"{name}.so").write_bytes(b"")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    monkeypatch.setattr(torch.library, "register_fake", lambda name: lambda fn: fn)
    monkeypatch.setattr(cpu_kernels, "_isa", None)
    for isa in ("avx2", "avx512"):
        cpu_kernels._build(isa)
    (avx2, avx2_flags), (avx512, avx512_flags) = builds
    assert avx2.startswith("mixtral_cpu_decode_avx2_") and avx512.startswith("mixtral_cpu_decode_avx512_")
    assert "-mavx2" in avx2_flags and "-mavx512bf16" not in avx2_flags and "-mavx512bf16" in avx512_flags


@needs_kernels
@pytest.mark.parametrize("rows", [1, 5, 12, 200])
def test_int4_weights_are_read_in_place_where_the_kernels_run(rows, monkeypatch):
    """Our kernels read the stored int4 blocks (memory-mapped ones included) as they are: no conversion to ATen's
    layout (a copy of the weight) at any row count."""
    monkeypatch.setattr(kops, "_aten_int4", lambda w: pytest.fail("converted to ATen's int4 layout"))
    torch.manual_seed(12)
    qw = QuantizedWeight.from_float(torch.randn(128, 256, dtype=torch.bfloat16), "int4", 64)
    x = torch.randn(rows, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        y = linear(x, qw)
    ref = x.float() @ qw.dequantize().float().T
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("shape", [(3584, 1024), (1024, 3584), (37, 64), (5, 16), (9, 208)])
@pytest.mark.parametrize("outliers", [False, True])
def test_int8_gemv_equals_torch_int8pack_mm(shape, outliers):
    torch.manual_seed(3)
    q, scale = quantize_int8(torch.randn(shape, dtype=torch.bfloat16))
    x = torch.randn(shape[1], dtype=torch.bfloat16)
    if outliers:  # a few elements 1000x the rest: the fixed-point copy of x keeps ~2^-15 of the largest
        x[:: max(shape[1] // 3, 1)] *= 1000
    y = cpu_kernels.ops().gemv_int8(q, scale, x)
    ref = torch._weight_int8pack_mm(x[None], q, scale)[0]
    exact = (q.float() @ x.float()) * scale.float()
    # x in fixed point is off by at most max|x| * 2^-14 per element; then one rounding to bf16 (2^-8 relative).
    fixed_err = (q.float().abs() @ torch.ones(shape[1])) * scale.float() * x.float().abs().max() * 2**-14
    assert ((y.float() - exact).abs() <= (exact.abs() + fixed_err) * 2**-8 + fixed_err).all()
    # and as close to the float32 result as ATen's kernel (float32 FMAs), up to that fixed-point term
    assert _max_err(y, exact) <= 1.5 * _max_err(ref, exact) + fixed_err.max()


@needs_kernels
@pytest.mark.parametrize("K", [200, 1000, 37])
@pytest.mark.parametrize("magnitude", [1.0, 2.0**-118, 2.0**100])
def test_int8_gemv_of_any_length_and_magnitude_is_exact_up_to_the_fixed_point(K, magnitude):
    # x's fixed-point copy is made 16 elements at a time with a scalar tail (K % 16), and by the scalar loop alone
    # where 1/t is not a float32 (|x| below ~2^-113); every case is within the same bound of the exact sums.
    torch.manual_seed(5)
    q, scale = quantize_int8(torch.randn(48, K, dtype=torch.bfloat16))
    x = (torch.randn(K, dtype=torch.float64) * magnitude).to(torch.bfloat16)
    y = cpu_kernels.ops().gemv_int8(q, scale, x)
    exact = (q.double() @ x.double()) * scale.double()
    fixed_err = (q.double().abs() @ torch.ones(K, dtype=torch.float64)) * scale.double() * x.double().abs().max()
    fixed_err = fixed_err * 2**-14
    assert y.isfinite().all() and (y != 0).any()
    assert ((y.double() - exact).abs() <= (exact.abs() + fixed_err) * 2**-8 + fixed_err).all()


@needs_kernels
def test_int8_gemv_passes_nan_and_zero_through():
    q, scale = quantize_int8(torch.randn(64, 128, dtype=torch.bfloat16))
    zero = cpu_kernels.ops().gemv_int8(q, scale, torch.zeros(128, dtype=torch.bfloat16))
    assert (zero == 0).all()
    x = torch.randn(128, dtype=torch.bfloat16)
    x[5] = float("nan")
    assert cpu_kernels.ops().gemv_int8(q, scale, x).isnan().all()


@needs_kernels
@pytest.mark.parametrize(("mode", "group"), [("int8", 0), ("int4", 32), ("int4", 64)])
def test_quantized_experts_equal_the_reference_on_dequantized_weights(mode, group):
    torch.manual_seed(4)
    E, F, D = 8, 192, 128

    def q(*shape):
        return QuantizedWeight.from_float(torch.randn(*shape, dtype=torch.bfloat16) / 8, mode, group)

    w1, w3, w2 = q(E, F, D), q(E, F, D), q(E, D, F)
    x = torch.randn(1, D, dtype=torch.bfloat16)
    weights, idx = torch.softmax(torch.randn(1, 2), -1), torch.tensor([[5, 2]])
    with torch.no_grad():
        fast = experts_decode(x, Experts(w1, w2, w3), Routing(weights, idx))
        with cpu_kernels.disabled():
            plain = experts_decode(x, Experts(w1, w2, w3), Routing(weights, idx))  # torch's int8 / int4 kernel
        ref = experts_reference(x, Experts(w1, w2, w3), Routing(weights, idx))  # dequantized weights
    if mode == "int4" and cpu_kernels.isa() == "avx2":  # x and h in int8 per group: against that rounding
        wt = weights[0].tolist()
        ref = sum(wt[j] * _avx2_int4_swiglu(x, w1[e], w2[e], w3[e]).float() for j, e in enumerate(idx[0].tolist()))
        torch.testing.assert_close(fast.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
        return
    torch.testing.assert_close(fast, plain, rtol=2e-2, atol=2e-2)
    # the reference runs on weights dequantized to bf16 (int4 values rounded), the kernels on exact ones
    assert _max_err(fast, ref.float()) <= 1.5 * _max_err(plain, ref.float()) + 1e-2


@needs_kernels
@pytest.mark.parametrize(
    ("shape", "group"), [((3584, 1024), 64), ((1024, 3584), 32), ((128, 256), 128), ((64, 64), 64)]
)
@pytest.mark.parametrize("outliers", [False, True])
def test_int4_gemv_equals_torch_int4pack_mm(shape, group, outliers):
    torch.manual_seed(6)
    qw = QuantizedWeight.from_float(torch.randn(shape, dtype=torch.bfloat16), "int4", group)
    x = torch.randn(shape[1], dtype=torch.bfloat16)
    if outliers:
        x[:: max(shape[1] // 3, 1)] *= 1000
    y = cpu_kernels.ops().gemv_int4(qw.blocks, x, group)
    packed, sz = kops._aten_int4(qw.view_all())  # in ATen's layout for this CPU (ours on AVX-512 CPUs)
    ref = torch._weight_int4pack_mm_for_cpu(x[None], packed, group, sz)[0]
    w = qw.dequantize(torch.float32)
    exact = w @ x.float()
    if cpu_kernels.isa() == "avx2":  # x in int8 per group: each column off by at most t_g / 2
        t_g = x.float().view(-1, group).abs().amax(-1) / 127
        fixed_err = (w.abs().view(shape[0], -1, group).sum(-1) * t_g / 2).sum(-1)
    else:  # x in fixed point with 14 bits below its largest element
        fixed_err = (w.abs() @ torch.ones(shape[1])) * x.float().abs().max() * 2**-14
    assert ((y.float() - exact).abs() <= (exact.abs() + fixed_err) * 2**-8 + fixed_err + 1e-3).all()
    assert _max_err(y, exact) <= 1.5 * _max_err(ref, exact) + fixed_err.max() + 1e-3
    with torch.no_grad():  # and through the quantized weight's own call
        torch.testing.assert_close(linear(x[None], qw), y[None], rtol=0, atol=0)
        with cpu_kernels.disabled():
            torch.testing.assert_close(linear(x[None], qw), ref[None], rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize(
    ("mode", "rows", "group"),
    [
        ("int8", 2, 0),
        ("int8", 5, 0),
        ("int4", 2, 64),
        ("int4", 5, 64),
        ("int4", 11, 64),
        ("int4", 3, 32),
        ("int4", 4, 128),
    ],
)
def test_quantized_gemv_of_a_few_rows_is_the_one_row_gemv_of_each(mode, rows, group):
    # Fewer rows than FUSED_MIN_ROWS take the GEMV (faster than ATen's kernels there; AVX-512's int4 GEMV reads the
    # matrix once for all rows): the same numbers as one row at a time, close to ATen's
    torch.manual_seed(7)
    qw = QuantizedWeight.from_float(torch.randn(192, 256, dtype=torch.bfloat16), mode, group or 64)
    X = torch.randn(rows, 256, dtype=torch.bfloat16)
    X[0, ::50] *= 500  # outliers in one row only: each row has its own fixed point
    ops = cpu_kernels.ops()

    def gemv(x):
        return ops.gemv_int8(qw.q, qw.scale, x) if mode == "int8" else ops.gemv_int4(qw.blocks, x, group)

    y = gemv(X)
    assert torch.equal(y, torch.stack([gemv(x) for x in X]))
    bad = X.clone()
    bad[-1, 7] = float("nan")  # NaN in one row: that row NaN, the others as before
    y_bad = gemv(bad)
    assert y_bad[-1].isnan().all() and torch.equal(y_bad[:-1], y[:-1])
    with torch.no_grad():
        assert torch.equal(linear(X[None], qw), y[None])
        with cpu_kernels.disabled():
            aten = linear(X, qw)
    torch.testing.assert_close(y, aten, rtol=2e-2, atol=2e-2 * aten.abs().max().item())
    with pytest.raises(RuntimeError, match="x must be"):
        gemv(X[None])


@needs_kernels
@pytest.mark.parametrize("K", [96, 4128])
def test_int8_gemv_of_a_few_rows_with_columns_past_the_last_128(K):
    # the tail of the columns (64 at a time, masked) in the kernel that reads the matrix once for all rows
    torch.manual_seed(13)
    qw = QuantizedWeight.from_float(torch.randn(40, K, dtype=torch.bfloat16), "int8")
    X = torch.randn(7, K, dtype=torch.bfloat16)
    ops = cpu_kernels.ops()
    assert torch.equal(ops.gemv_int8(qw.q, qw.scale, X), torch.stack([ops.gemv_int8(qw.q, qw.scale, x) for x in X]))


@needs_kernels
@pytest.mark.skipif(cpu_kernels.isa() != "avx2", reason="AVX2's int4 kernels take x in int8 per group")
@pytest.mark.parametrize(("N", "K", "group"), [(3584, 1024, 64), (1024, 3584, 32), (128, 512, 128), (64, 4096, 256)])
def test_avx2_int4_kernels_equal_their_reference(N, K, group):
    # ops.int4_product_reference rounds x as the kernels do and sums exactly: the kernels differ by their float32
    # sums and the bf16 rounding of the result, at one row (the GEMV) and at several (the rows' kernel).
    torch.manual_seed(12)
    qw = QuantizedWeight.from_float(torch.randn(N, K, dtype=torch.bfloat16), "int4", group)
    X = torch.randn(4, K, dtype=torch.bfloat16)
    X[1, ::37] *= 300  # outliers: their groups take a coarser step
    X[2, :group] = 0.0  # a group of zeros
    X[3] *= 1e-30
    ops = cpu_kernels.ops()
    ref = int4_product_reference(X, qw)
    terms = X.double().abs() @ qw.dequantize(torch.float32).double().abs().T
    for y in (ops.gemv_int4(qw.blocks, X, group), ops.gemm_int4(X, qw.blocks, group)):
        err = (y.double() - ref).abs()
        assert (err <= ref.abs() * 2**-8 + terms * 2**-18).all(), (err / (ref.abs() * 2**-8 + terms * 2**-18)).max()
    # inf or NaN in x: NaN in every row, as float32 arithmetic on it would give NaN or inf
    bad = X[0].clone()
    bad[group + 3] = float("inf")
    assert ops.gemv_int4(qw.blocks, bad, group).isnan().all()


@needs_kernels
def test_int4_kernel_refuses_a_layout_it_cannot_read():
    qw = QuantizedWeight.from_float(torch.randn(64, 128, dtype=torch.bfloat16), "int4", 64)
    x = torch.randn(128, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="do not fit the group size 48"):
        cpu_kernels.ops().gemv_int4(qw.blocks, x, 48)
    with pytest.raises(RuntimeError, match="must be a contiguous uint8"):
        cpu_kernels.ops().gemv_int4(qw.blocks.view(torch.int8), x, 64)
    with pytest.raises(RuntimeError, match="must be a contiguous uint8"):
        cpu_kernels.ops().gemv_int4(qw.blocks[0], x, 64)  # a block of one matrix, not a matrix


def _small_model(seed: int, window: int | None = None, tie: bool = False) -> tuple[ModelConfig, Transformer]:
    """A 2-layer bf16 model for the fused decode tests (weights of std 0.05: routing is decisive)."""
    config = ModelConfig(
        dim=128, n_layers=2, hidden_dim=192, n_heads=4, n_kv_heads=2, vocab_size=512, n_experts=4,
        max_seq_len=64, sliding_window=window, tie_embeddings=tie,
    )  # fmt: skip
    return config, tiny_model(config, seed=seed, dtype=torch.bfloat16, std=0.05)


def _decode(model: Transformer, steps: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Logits of a 3-token prefill and `steps` decode steps, one row, concatenated."""
    cache = KVCache(model.config, 1, 16, dtype=dtype)
    logits = [prefill(model, cache, [[1, 5, 9]])]
    for i in range(steps):
        logits.append(decode_step(model, cache, torch.tensor([7 * i + 3]), torch.tensor([3 + i])))
    return torch.cat(logits)


def _count_fused_steps(monkeypatch) -> list[bool]:
    """Record, at each decode step, whether the fused one-call step ran."""
    ran: list[bool] = []
    original = cpu_step.Step.__call__

    def run(self, *args):
        ran.append(True)
        return original(self, *args)

    monkeypatch.setattr(cpu_step.Step, "__call__", run)
    return ran


def _plain_decode(model: Transformer, steps: int, monkeypatch, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`_decode` op by op (no fused step)."""
    with monkeypatch.context() as m:
        m.setattr(cpu_step, "plan", lambda *args: None)
        return _decode(model, steps, dtype)


@needs_kernels
@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("window", [None, 8])
def test_the_fused_step_equals_the_model_code(mode, window, monkeypatch):
    """`decode_token` (a whole step for one token in one kernel call: embedding, rotary angles, cache slot and mask,
    every layer, norm and LM head) against the model's own code with the single-op kernels: the same roundings, so
    the same logits and router logits bit for bit (rolling cache included)."""
    config, model = _small_model(7, window)
    if mode != "bf16":
        quantize_model(model, mode, group_size=32)
    model.keep_router_logits = True

    def steps() -> tuple[torch.Tensor, torch.Tensor]:
        cache = KVCache(config, 1, 40, dtype=torch.bfloat16)
        logits = [prefill(model, cache, [[1, 5, 9, 200, 33]])]
        router = []
        for i in range(20):  # positions 5..14, then 25..34: a gap leaves keys outside a sliding window in the cache
            pos = 5 + i + (10 if i >= 10 else 0)
            logits.append(decode_step(model, cache, torch.tensor([(37 * i) % 500 + 3]), torch.tensor([pos])))
            router.append(torch.cat(model.router_logits))
        return torch.cat(logits), torch.stack(router)

    ran = _count_fused_steps(monkeypatch)
    fused = steps()
    assert len(ran) == 20
    monkeypatch.setattr(cpu_step, "plan", lambda *args: None)
    plain = steps()
    assert len(ran) == 20
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])


@needs_kernels
def test_the_fused_step_leaves_hooks_to_the_model_code(monkeypatch):
    """A forward hook on a block, or one registered for every module, is not skipped by the one-call step: such a
    step runs op by op (and gives the same logits)."""
    _, model = _small_model(9)
    fast = _decode(model, 3)
    seen = []
    with model.layers[1].register_forward_hook(lambda mod, args, out: seen.append(1)):
        assert torch.equal(_decode(model, 3), fast) and len(seen) == 4  # the prefill and 3 decode steps
    with torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: seen.append(2)):
        assert torch.equal(_decode(model, 3), fast) and seen.count(2) > 4 * 2
    ran = _count_fused_steps(monkeypatch)
    assert torch.equal(_decode(model, 3), fast) and len(ran) == 3


@needs_kernels
@pytest.mark.parametrize("head", ["tied", "int4"])
def test_the_one_call_step_takes_any_lm_head(head, monkeypatch):
    """`decode_token` computes the LM head in the kernel: the embedding matrix for tied embeddings, or an int4 head
    (its group size passed along), with the logits of the op-by-op code bit for bit."""
    _, model = _small_model(11, tie=head == "tied")
    if head == "int4":
        model.output = QuantizedLinear.from_float(model.output.weight.detach(), "int4", 32)
    ran = _count_fused_steps(monkeypatch)
    fast = _decode(model, 4)
    assert len(ran) == 4
    assert torch.equal(fast, _plain_decode(model, 4, monkeypatch))


@needs_kernels
@pytest.mark.parametrize(
    "where",
    ["embed", "norm", "output", "layers.1.attn_norm", "layers.0.attn", "layers.1.attn.wk", "layers.0.ffn_norm",
     "layers.1.moe", "layers.0.moe.gate"],
)  # fmt: skip
def test_the_fused_step_runs_hooks_on_the_modules_it_covers(where):
    """`decode_token` computes the embedding, every block's modules, the final norm and the LM head itself: with a
    forward hook on any of them the step runs op by op, so the hook sees every token, and the logits are the same."""
    _, model = _small_model(9)
    fast = _decode(model, 3)
    seen = []
    with model.get_submodule(where).register_forward_hook(lambda mod, args, out: seen.append(1)):
        assert torch.equal(_decode(model, 3), fast) and len(seen) == 4  # the prefill and 3 decode steps


@needs_kernels
def test_the_one_call_step_names_a_bad_token_or_position():
    """A token id outside the vocabulary, or a position past a full cache, is refused before the cache changes."""
    _, model = _small_model(9)
    cache = KVCache(model.config, 1, 8, dtype=torch.bfloat16)
    with pytest.raises(IndexError, match="token id 512 is outside the vocabulary of 512"):
        decode_step(model, cache, torch.tensor([512]), torch.tensor([0]))
    with pytest.raises(ValueError, match="position 8 does not fit a cache of 8 positions"):
        decode_step(model, cache, torch.tensor([5]), torch.tensor([8]))
    assert (cache.slot_pos == -1).all()
    with cpu_kernels.disabled(), pytest.raises(ValueError, match="position 8 does not fit a cache of 8 positions"):
        decode_step(model, cache, torch.tensor([5]), torch.tensor([8]))  # the op-by-op code says the same


@needs_kernels
def test_the_fused_steps_arguments_follow_changes_to_the_model(monkeypatch):
    """The step's arguments are derived once per model version: quantizing in place, a forward hook on a projection
    and a conversion to float32 after fused decoding must each be seen by the next step (decoded as their op-by-op
    code does)."""
    _, model = _small_model(8)

    def steps(dtype=torch.bfloat16) -> torch.Tensor:
        return _decode(model, 4, dtype)

    def plain(dtype=torch.bfloat16) -> torch.Tensor:
        return _plain_decode(model, 4, monkeypatch, dtype)

    derived = []
    derive = cpu_step._derive
    monkeypatch.setattr(cpu_step, "_derive", lambda *args: derived.append(1) or derive(*args))
    bf16 = steps()
    assert len(derived) == 1  # once for all 4 decode steps
    assert torch.equal(bf16, plain())
    quantize_model(model, "int8")
    int8 = steps()
    assert len(derived) == 2 and torch.equal(int8, plain()) and not torch.equal(int8, bf16)

    seen = []
    handle = model.layers[1].attn.wq.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    assert torch.equal(steps(), int8) and len(seen) == 5  # the prefill and 4 decode steps, op by op
    handle.remove()

    _, model = _small_model(8)
    steps()
    model.float()  # tensors converted in place: the cached bf16 arguments must not be used
    assert torch.equal(steps(torch.float32), plain(torch.float32))


@pytest.fixture
def parallel_settings():
    """Restores `set_parallel`'s settings and torch's thread count after the test."""
    old, threads = cpu_kernels.ops().set_parallel(-1, -1, -1, -1, -1), torch.get_num_threads()
    yield cpu_kernels.ops().set_parallel
    cpu_kernels.ops().set_parallel(*old[:5])
    torch.set_num_threads(threads)


def _kernel_outputs() -> list[torch.Tensor]:
    """Outputs of kernels of every kind of parallel region: GEMV (odd row counts), GEMM and fused experts in bf16
    and int4, a norm over many rows, attention, and fused decode steps in bf16 and int4."""
    ops = cpu_kernels.ops()
    g = torch.Generator().manual_seed(3)
    W, x = torch.randn(1037, 256, generator=g).bfloat16(), torch.randn(256, generator=g).bfloat16()
    X = torch.randn(7, 256, generator=g).bfloat16()
    w1, w3 = torch.randn(320, 256, generator=g).bfloat16() / 16, torch.randn(320, 256, generator=g).bfloat16() / 16
    w2 = torch.randn(256, 320, generator=g).bfloat16() / 16
    q, k, v = (torch.randn(2, n, 1 if i == 0 else 40, 64, generator=g).bfloat16() for i, n in enumerate((8, 2, 2)))
    out = [ops.gemv(W, x), ops.gemm(X, W), ops.swiglu(X, w1, w2, w3), ops.rms_norm(X.repeat(40, 1), x, 1e-5)]
    out.append(ops.decode_attention(q, k, v, torch.ones(2, 1, 1, 40, dtype=torch.bool), 0.125))
    for mode in ("bf16", "int4"):
        _, model = _small_model(11)
        if mode == "int4":
            quantize_model(model, "int4", group_size=32)
        out.append(_decode(model, 6))
    return out


@needs_kernels
def test_the_thread_pool_gives_what_the_openmp_regions_give_bit_for_bit(parallel_settings):
    """`parallel` on the pool (chunks claimed from a counter, the caller working too), and OpenMP regions that give way
    to it after a stall (mode 3, the default), against plain OpenMP regions (one static range per thread): each unit
    of work is computed the same way whatever the split, so every kernel's output is the same bit for bit, for any
    number of chunks per thread and of threads (3 on a 2-core machine: a worker descheduled while it holds a chunk)."""
    set_parallel = parallel_settings
    set_parallel(0, -1, -1, -1, -1)
    reference = _kernel_outputs()
    for mode, chunks, threads in [
        (1, 4, 2),
        (2, 1, 2),
        (2, 64, 2),
        (1, 3, 3),
        (2, 1024, 1),
        (1, 4, 2),
        (3, 4, 2),
        (3, 4, 3),
    ]:
        torch.set_num_threads(threads)
        set_parallel(mode, chunks, -1, -1, -1)
        for got, want in zip(_kernel_outputs(), reference, strict=True):
            assert torch.equal(got, want), (mode, chunks, threads)


@needs_kernels
def test_regions_from_several_threads_and_after_a_fork_still_compute_the_product(parallel_settings):
    """One caller at a time owns the pool; another thread's regions meanwhile run on that thread alone. A child
    forked after the pool started has none of its workers and starts its own."""
    import threading

    parallel_settings(1, -1, -1, -1, -1)
    g = torch.Generator().manual_seed(5)
    W, x = torch.randn(2048, 512, generator=g).bfloat16(), torch.randn(512, generator=g).bfloat16()
    want = cpu_kernels.ops().gemv(W, x)
    bad = []

    def work():
        for _ in range(200):
            if not torch.equal(cpu_kernels.ops().gemv(W, x), want):
                bad.append(1)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 if the product is right
        os._exit(0 if all(torch.equal(cpu_kernels.ops().gemv(W, x), want) for _ in range(20)) else 1)
    assert os.waitpid(pid, 0)[1] == 0


@needs_kernels
def test_a_lock_left_by_a_killed_build_does_not_stop_the_next_one():
    """torch's build lock is a file: a build killed while holding it leaves it behind. Ours is an OS lock, and a
    lock file found while holding it is stale and removed, so the kernels still load (not a wait without end)."""
    folder = cpu_kernels.build_directory(cpu_kernels.build_name(cpu_kernels.isa() or "avx2"))
    (folder / "lock").write_text("")  # what a killed build leaves
    code = "from mixtral.kernels import cpu; assert cpu.ops() is not None, cpu.status()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert not (folder / "lock").exists()


@needs_kernels
@pytest.mark.parametrize(
    ("M", "N", "K", "group"), [(2, 64, 128, 32), (3, 128, 256, 64), (8, 256, 512, 128), (13, 64, 192, 32)]
)
def test_int4_kernels_of_a_few_rows_equal_the_gemv_row_by_row(M, N, K, group):
    # The integer sums of the GEMV, with the nibbles split once for all rows: bit for bit, at any number of rows
    # (tiles of 3 rows on AVX2, 2 on AVX-512, and the rows left over), and through the fused expert too.
    torch.manual_seed(10)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    x[0, :5] = 0.0
    x[-1] *= 1e-30  # a row in fixed point with another step
    q = QuantizedWeight.from_float(torch.randn(N, K, dtype=torch.bfloat16), "int4", group)
    ops = cpu_kernels.ops()
    assert torch.equal(ops.gemm_int4(x, q.blocks, group), torch.stack([ops.gemv_int4(q.blocks, r, group) for r in x]))
    w1, w3 = (QuantizedWeight.from_float(torch.randn(N, K, dtype=torch.bfloat16), "int4", group) for _ in range(2))
    w2 = QuantizedWeight.from_float(torch.randn(K, N, dtype=torch.bfloat16), "int4", group)
    h = ops.gemm_int4(x, w1.blocks, group), ops.gemm_int4(x, w3.blocks, group)
    fused = ops.swiglu_int4(x, w1.blocks, w2.blocks, w3.blocks, group)
    unfused = ops.gemv_int4(w2.blocks, (torch.nn.functional.silu(h[0]) * h[1]), group)
    torch.testing.assert_close(fused, unfused, rtol=2e-2, atol=1e-2 * unfused.abs().max().item())


@needs_kernels
@pytest.mark.skipif(cpu_kernels.isa() != "avx2", reason="AVX2's int8 kernel of a few rows (AVX-512 dequantizes)")
@pytest.mark.parametrize(("M", "N", "K"), [(2, 64, 128), (3, 36, 4128), (8, 130, 256), (13, 64, 96)])
def test_avx2_int8_kernels_of_a_few_rows_equal_the_gemv_row_by_row(M, N, K):
    # The GEMV's exact integer sums for 4 rows of W and 3 of X at a time (rows of W past the last 4 by the GEMV's
    # loop; more than 4096 columns: the int32 lanes flushed into int64): bit for bit, and through the fused expert.
    torch.manual_seed(11)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    x[-1] *= 1e-30
    q = QuantizedWeight.from_float(torch.randn(N, K, dtype=torch.bfloat16), "int8")
    ops = cpu_kernels.ops()
    assert torch.equal(ops.gemm_int8(x, q.q, q.scale), torch.stack([ops.gemv_int8(q.q, q.scale, r) for r in x]))
    F = 64
    w1, w3 = (QuantizedWeight.from_float(torch.randn(F, K, dtype=torch.bfloat16), "int8") for _ in range(2))
    w2 = QuantizedWeight.from_float(torch.randn(K, F, dtype=torch.bfloat16), "int8")
    if K % 32 == 0:
        h = ops.gemm_int8(x, w1.q, w1.scale), ops.gemm_int8(x, w3.q, w3.scale)
        fused = ops.swiglu_int8(x, w1.q, w1.scale, w2.q, w2.scale, w3.q, w3.scale)
        unfused = ops.gemv_int8(w2.q, w2.scale, torch.nn.functional.silu(h[0]) * h[1])
        torch.testing.assert_close(fused, unfused, rtol=2e-2, atol=1e-2 * unfused.abs().max().item())
