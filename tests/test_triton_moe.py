"""The fused MoE Triton kernel against the plain PyTorch reference path, run by Triton's interpreter on the CPU
(TRITON_INTERPRET=1); its alignment step and its fallback. On a GPU, benchmarks/gpu_bench.py checks the
compiled kernel (bf16 and int8) against the plain path at full size before it times anything."""

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
    fused_experts,
    quantize_int8,
    triton_unavailable_reason,
)
from mixtral.kernels.ops import Experts, Routing, experts_int8_reference, experts_triton
from mixtral.kernels.ops import experts as experts_grouped
from mixtral.model import Transformer
from mixtral.moe import experts_reference, route

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed (pip install triton): the kernel tests need its interpreter"
)
# Small tiles: the interpreter runs every program in numpy, one after another.
SMALL = KernelConfig(block_m=16, up_n=16, up_k=16, down_n=16, down_k=16, num_warps=1, num_stages=1)


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """Interpret the kernels on the CPU. The variable is read when the kernels are defined, so a kernel
    module imported without it (on a GPU machine) is imported again."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        if HAS_TRITON:
            import mixtral.kernels._fused_moe_triton as kernels

            importlib.reload(kernels)
        yield
    if HAS_TRITON:
        importlib.reload(kernels)  # back to compiled kernels for whoever comes next


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


@needs_triton
def test_int8_kernel_equals_int8_reference():
    w1, w2, w3 = random_experts(E=4)
    (q1, s1), (q2, s2), (q3, s3) = (quantize_int8(w) for w in (w1, w2, w3))
    x, weights, idx = routed(21, 4, 2)
    out = fused_experts(x, q1, q2, q3, weights, idx, scales=(s1, s2, s3), config=SMALL)
    ref = experts_int8_reference(x, Experts(q1, q2, q3), Routing(weights, idx), (s1, s2, s3))
    assert (out - ref).abs().max().item() <= 1e-5
    # and int8 stays close to the unquantized experts
    full = experts_reference(x, Experts(w1, w2, w3), Routing(weights, idx))
    assert (out - full).abs().max().item() <= 0.05 * full.abs().max().item()


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
def test_whole_model_with_the_kernel_equals_grouped():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").replace(vocab_size=200, n_layers=1)).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.moe.gate.weight.mul_(50)  # decisive routing
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
