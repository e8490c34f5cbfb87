"""The GPU decode step, checked on the CPU: the cache planned on the device alone (`KVCache.fixed`), the dense
fixed-shape MoE dispatch, the step compiled as one graph (the proof that it reads nothing back to the host), the
default MoE path per device and when CUDA graphs are used. The tests at the end need a CUDA GPU."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

from mixtral import cli_args
from mixtral.cache import KVCache, decode_span
from mixtral.config import get_preset
from mixtral.generate import decode_fixed, decode_step, generate, graphable, prefill, prepare_for_device
from mixtral.kernels import fused_moe
from mixtral.kernels.fused_moe import align_by_expert
from mixtral.kernels.ops import Experts, experts_dense
from mixtral.model import Transformer
from mixtral.moe import experts_reference, route
from mixtral.quantize import quantize_model

generate_module = importlib.import_module("mixtral.generate")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
VOCAB = 300
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [4, 5, 6]]


def tiny_model(window: int | None = None, device: str = "cpu", dtype=torch.float32) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").replace(vocab_size=VOCAB, sliding_window=window)).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.moe.gate.weight.mul_(50)  # decisive routing
        model.embed.weight.mul_(20)
    return model.to(device=device, dtype=dtype)


def prefilled(model: Transformer, length: int = 40) -> KVCache:
    w = model.embed.weight
    cache = KVCache(model.config, len(PROMPTS), length, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        prefill(model, cache, PROMPTS)
    return cache


@pytest.mark.parametrize("window", [None, 8])
def test_fixed_step_equals_the_cache_update(window):
    """Step by step, with a row going idle: the same logits as the host-planned step, and the same cache."""
    model = tiny_model(window)
    eager, fixed = prefilled(model), prefilled(model)
    pos, tok = torch.tensor([11, 3]), torch.tensor([7, 8])
    with torch.no_grad():
        for i in range(12):  # past the window: the rolling buffer wraps
            want = decode_step(model, eager, tok, pos)
            got = decode_fixed(model, fixed, tok.view(-1, 1), pos.view(-1, 1), decode_span(fixed, pos))
            live = pos >= 0
            torch.testing.assert_close(got[live], want[live], rtol=1e-5, atol=1e-5)
            assert torch.equal(fixed.slot_pos, eager.slot_pos)
            used = eager.slot_pos >= 0  # [B, S]: what an empty slot's keys hold does not matter
            for a, b in zip(fixed.k + fixed.v, eager.k + eager.v, strict=True):  # (attention over more masked
                torch.testing.assert_close(a.transpose(1, 2)[used], b.transpose(1, 2)[used])  # slots: ~1e-7)
            tok, pos = (tok * 7 + 3) % VOCAB, pos + 1
            if i == 4:
                pos[1] = -1  # the second sequence ends: an idle row writes nothing


def test_decode_span_is_a_power_of_two_within_the_cache():
    cache = KVCache(get_preset("tiny"), 2, 500, dtype=torch.float32)
    assert decode_span(cache, torch.tensor([3, -1])) == 128
    assert decode_span(cache, torch.tensor([127, 5])) == 128
    assert decode_span(cache, torch.tensor([128, 5])) == 256
    assert decode_span(cache, torch.tensor([300, -1])) == 500
    with pytest.raises(ValueError, match="does not fit"):
        decode_span(cache, torch.tensor([500, 0]))
    rolling = KVCache(get_preset("tiny-swa"), 1, 500, dtype=torch.float32)
    assert decode_span(rolling, torch.tensor([10_000])) == 16


@pytest.mark.parametrize("T", [1, 5])
def test_dense_experts_equal_reference(T):
    g = torch.Generator().manual_seed(T)
    E, D, F_ = 8, 32, 48
    stack = Experts(*(torch.randn(E, *s, generator=g) / s[1] ** 0.5 for s in ((F_, D), (D, F_), (F_, D))))
    x = torch.randn(T, D, generator=g)
    routing = route(torch.randn(T, E, generator=g), 2)
    torch.testing.assert_close(experts_dense(x, stack, routing), experts_reference(x, stack, routing))


@pytest.mark.parametrize("quantize", [None, "int8", "fp8"])
def test_decode_step_compiles_whole_without_host_reads(monkeypatch, quantize):
    """torch.compile(fullgraph=True) of a whole decode step, scalar reads not captured: an `.item()`, `.tolist()` or
    a data-dependent shape anywhere would break the graph and fail. The grouped MoE path, which reads the expert
    counts on the host, fails it; the dense one passes, with the eager step's logits and cache; plain or with
    quantized weights (as `--quantize` makes them on a GPU)."""
    import torch._dynamo

    from mixtral.cache import KVCache
    from mixtral.moe import MoE

    for cls, name in ((MoE, "dispatch"), (KVCache, "_update")):  # as before any `compile_model` in this process
        fn = getattr(cls, name)
        monkeypatch.setattr(cls, name, getattr(fn, "_mixtral_original", fn))
    model = tiny_model()
    if quantize:
        quantize_model(model, quantize)
    model.set_moe_impl("dense")
    eager, compiled = prefilled(model), prefilled(model)
    pos, tok = torch.tensor([[11], [3]]), torch.tensor([[7], [8]])
    with torch._dynamo.config.patch(capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False):
        torch._dynamo.reset()
        step = torch.compile(decode_fixed, fullgraph=True, dynamic=False, backend="eager")  # (dynamo is the check)
        with torch.no_grad():
            for _ in range(2):
                want = decode_fixed(model, eager, tok, pos, 40)
                assert torch.equal(step(model, compiled, tok, pos, 40), want)
                assert torch.equal(compiled.slot_pos, eager.slot_pos) and torch.equal(compiled.k[1], eager.k[1])
                pos = pos + 1
            model.set_moe_impl("grouped")
            torch._dynamo.reset()
            with pytest.raises(Exception, match="tolist"):
                torch.compile(decode_fixed, fullgraph=True, dynamic=False, backend="eager")(
                    model, compiled, tok, pos, 40
                )
        torch._dynamo.reset()


def test_triton_alignment_compiles_whole():
    """The host-side part of the Triton dispatch (`align_by_expert`) is tensor ops of fixed shapes too."""
    import torch._dynamo

    idx = route(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), 2).idx_TK
    with torch._dynamo.config.patch(capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False):
        torch._dynamo.reset()
        got = torch.compile(align_by_expert, fullgraph=True, dynamic=False, backend="eager")(idx, 8, 16)
        torch._dynamo.reset()
    for a, b in zip(got, align_by_expert(idx, 8, 16), strict=True):
        assert torch.equal(a, b)


def test_default_moe_impl_per_device(monkeypatch):
    choose = generate_module.default_moe_impl
    monkeypatch.setattr(fused_moe, "triton_unavailable_reason", lambda device: None)
    assert choose("cuda") == "triton" and choose(torch.device("cuda", 1)) == "triton"
    assert choose("cpu") == "grouped"  # our CPU kernels, whether or not triton could be interpreted
    monkeypatch.setattr(fused_moe, "triton_unavailable_reason", lambda device: "triton is not installed")
    assert choose("cuda") == "grouped"


def test_prepare_for_device_sets_the_dispatch_compile_and_graphs(monkeypatch):
    model = tiny_model()
    model.set_moe_impl("reference")
    compiled = []
    monkeypatch.setattr(generate_module, "compile_model", lambda m: compiled.append(m) or True)
    monkeypatch.setattr(generate_module, "default_moe_impl", lambda device: "dense" if device.type == "cpu" else "x")
    prepare_for_device(model, compile=True, cuda_graphs=False)
    assert {layer.moe.impl for layer in model.layers} == {"dense"} and compiled == [model]
    assert model.cuda_graphs is False
    prepare_for_device(model)
    assert model.cuda_graphs is True and len(compiled) == 1


def test_cli_flags_for_compile_and_cuda_graphs():
    import argparse

    p = argparse.ArgumentParser()
    cli_args.add_model_flags(p)
    assert p.parse_args([]).cuda_graphs is True and p.parse_args([]).compile is False
    args = p.parse_args(["--no-cuda-graphs", "--compile"])
    assert args.cuda_graphs is False and args.compile is True


def test_graphable_needs_a_dispatch_on_the_device_and_no_hooks(monkeypatch):
    model = tiny_model()
    assert not graphable(model)  # grouped: reads expert counts on the host
    model.set_moe_impl("dense")
    assert graphable(model)
    model.cuda_graphs = False
    assert not graphable(model)
    model.cuda_graphs = True
    model.keep_router_logits = True
    assert not graphable(model)
    model.keep_router_logits = False
    handle = model.layers[0].attn.register_forward_hook(lambda *a: None)
    assert not graphable(model)
    handle.remove()
    model.set_moe_impl("triton")
    monkeypatch.setattr(fused_moe, "triton_unavailable_reason", lambda device: "no GPU")
    assert not graphable(model)
    monkeypatch.setattr(fused_moe, "triton_unavailable_reason", lambda device: None)
    assert graphable(model)
    # quantized experts (buffers, no `.device` of their own) on the kernel: the same answer, asked of their device
    asked = []
    monkeypatch.setattr(fused_moe, "triton_unavailable_reason", lambda device: asked.append(device))
    quantize_model(model, "int8")
    assert graphable(model) and asked == [torch.device("cpu")] * len(model.layers)


# ---- on a GPU ------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize(
    ("impl", "quantize"), [("dense", None), ("triton", None), ("triton", "int8"), ("triton", "fp8")]
)
def test_cuda_decode_step_never_synchronises(impl, quantize):
    if impl == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    model = tiny_model(device="cuda", dtype=torch.bfloat16)
    if quantize:
        quantize_model(model, quantize)
    model.set_moe_impl(impl)
    cache = prefilled(model)
    tok, pos = torch.tensor([[7], [8]], device="cuda"), torch.tensor([[11], [3]], device="cuda")
    with torch.no_grad():
        decode_fixed(model, cache, tok, pos, 40)  # warm up (Triton compiles its kernels)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            decode_fixed(model, cache, tok, pos + 1, 40)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("quantize", ["int8", "fp8"])
def test_cuda_graphs_with_quantized_weights_generate_what_the_eager_step_does(quantize):
    """The quantized Triton kernels (experts, projections) inside a captured step: the same tokens as eagerly."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    model = quantize_model(tiny_model(device="cuda", dtype=torch.bfloat16), quantize)
    prepare_for_device(model)
    assert graphable(model)
    graphed = generate(model, PROMPTS, max_new_tokens=20)
    model.cuda_graphs = False
    assert generate(model, PROMPTS, max_new_tokens=20) == graphed


@needs_cuda
@pytest.mark.parametrize("window", [None, 8])
def test_cuda_graphs_generate_what_the_eager_step_does(window):
    model = tiny_model(window, device="cuda", dtype=torch.bfloat16)
    prepare_for_device(model)
    assert graphable(model) == (importlib.util.find_spec("triton") is not None)
    model.set_moe_impl("dense")  # the same dispatch both ways: the graphs are the only difference
    graphed = generate(model, PROMPTS, max_new_tokens=20)
    model.cuda_graphs = False
    assert generate(model, PROMPTS, max_new_tokens=20) == graphed
