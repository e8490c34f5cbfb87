"""The fast CPU paths against the plain reference paths: single-token expert dispatch, the matrix-vector
projection, cached decoding, and torch.compile with its eager fallback."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch import nn

import mixtral
from mixtral.kernels.ops import Experts, Routing, experts_decode, linear, project
from mixtral.kernels.ops import experts as experts_grouped
from mixtral.moe import experts_reference, route

gen = importlib.import_module("mixtral.generate")  # the module (`mixtral.generate` is also a function)
DTYPES = [torch.float32, torch.bfloat16]


def tol(dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3])
def test_decode_dispatch_equals_reference(dtype, T):
    torch.manual_seed(0)
    E, D, F_ = 8, 32, 48
    w1, w3 = torch.randn(E, F_, D, dtype=dtype) / 6, torch.randn(E, F_, D, dtype=dtype) / 6
    w2 = torch.randn(E, D, F_, dtype=dtype) / 7
    x = torch.randn(T, D, dtype=dtype)
    weights, idx = route(torch.randn(T, E), 2)
    with torch.no_grad():
        ref = experts_reference(x, Experts(w1, w2, w3), Routing(weights, idx)).float()
        fast = experts_decode(x, Experts(w1, w2, w3), Routing(weights, idx)).float()
        grouped = experts_grouped(x, Experts(w1, w2, w3), Routing(weights, idx)).float()  # T == 1: experts_decode
    assert torch.allclose(fast, ref, rtol=tol(dtype), atol=tol(dtype) * ref.abs().max())
    assert torch.allclose(grouped, ref, rtol=tol(dtype), atol=tol(dtype) * ref.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_row_projection_equals_f_linear(dtype):
    torch.manual_seed(0)
    w = torch.randn(96, 64, dtype=dtype)
    for shape in [(1, 64), (1, 1, 64), (4, 64)]:
        x = torch.randn(shape, dtype=dtype)
        with torch.no_grad():
            got = linear(x, w)
        ref = F.linear(x.float(), w.float())
        assert got.shape == ref.shape and got.dtype == dtype
        assert torch.allclose(got.float(), ref, rtol=tol(dtype), atol=tol(dtype) * ref.abs().max())
    # with autograd on, the ordinary F.linear runs (and gradients flow)
    x = torch.randn(1, 64, requires_grad=True)
    linear(x, w.float()).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("dtype", DTYPES)
def test_projection_with_hooks_runs_them_as_calling_the_module_does(dtype):
    """`project` on a hooked nn.Linear: the kernel's product, then its forward hooks in order (a hook returning
    None keeps the output); hooks it cannot run itself (keyword arguments, pre-hooks) make it call the module."""
    torch.manual_seed(0)
    m = nn.Linear(64, 96, bias=False).to(dtype)
    x = torch.randn(1, 3, 64, dtype=dtype)
    seen = []
    m.register_forward_hook(lambda mod, args, out: out * 2)
    m.register_forward_hook(lambda mod, args, out: seen.append(out.clone()))
    m.register_forward_hook(lambda mod, args, out: out + args[0][..., :1])
    for rows in (1, 3):
        seen.clear()
        with torch.no_grad():
            got, ref = project(m, x[:, :rows]), m(x[:, :rows])
        assert torch.allclose(got.float(), ref.float(), rtol=tol(dtype), atol=tol(dtype) * ref.abs().max().item())
        assert len(seen) == 2  # the second hook ran once per call, each time on the first one's output
        assert torch.allclose(
            seen[0].float(), seen[1].float(), rtol=tol(dtype), atol=tol(dtype) * ref.abs().max().item()
        )
    m.register_forward_hook(lambda mod, args, kwargs, out: out - 1, with_kwargs=True)
    m.register_forward_pre_hook(lambda mod, args: (args[0] * 0,))
    with torch.no_grad():
        assert torch.equal(project(m, x), m(x))  # called: the pre-hook zeroes x
        assert torch.all(project(m, x)[..., 1:] == -1)


def tiny(dtype=torch.float32) -> mixtral.Transformer:
    return tiny_model(dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cached_decode_at_batch_1_equals_a_full_forward(dtype):
    model = tiny(dtype)
    seq = torch.randint(0, 32000, (1, 10))
    with torch.no_grad():
        full = model(seq).float()
        cache = mixtral.KVCache(model.config, 1, 16, dtype=dtype)
        first = gen.prefill(model, cache, [seq[0, :6].tolist()])
        steps = [gen.decode_step(model, cache, seq[:, t], torch.tensor([t])) for t in range(6, 10)]
        model.set_moe_impl("reference")
        ref_full = model(seq).float()
    got = torch.stack([first[0], *[s[0] for s in steps]])
    want = full[0, 5:10]
    assert torch.allclose(got, want, atol=tol(dtype) * 5 * want.abs().max())
    assert torch.allclose(full, ref_full, atol=tol(dtype) * 5 * ref_full.abs().max())


def test_compiled_model_equals_eager():
    if not gen.compile_available():
        pytest.skip("no working C++ compiler for torch.compile here (the fallback is tested above)")
    cfg = mixtral.ModelConfig(
        dim=32, n_layers=1, hidden_dim=64, n_heads=2, n_kv_heads=1, vocab_size=256, n_experts=4, top_k=2, max_seq_len=32
    )
    torch.manual_seed(0)
    model = mixtral.Transformer(cfg).eval()
    eager = mixtral.Transformer(cfg).eval()
    eager.load_state_dict(model.state_dict())
    assert gen.compile_model(model) is True
    prompts = [[1, 5, 9, 7]]
    assert mixtral.generate(model, prompts, max_new_tokens=4) == mixtral.generate(eager, prompts, max_new_tokens=4)
    seq = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert torch.allclose(model(seq), eager(seq), atol=1e-5)


def test_compile_falls_back_to_eager_without_a_compiler(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(gen, "_COMPILER_OK", None)
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    with pytest.warns(UserWarning, match="torch.compile is unavailable"):
        assert gen.compile_available() is False
    model = tiny()
    eager = tiny()
    assert gen.compile_model(model) is False
    assert not getattr(model, "compiled", False)
    out = mixtral.generate(model, [[1, 5, 9]], max_new_tokens=5)
    assert out == mixtral.generate(eager, [[1, 5, 9]], max_new_tokens=5)
    monkeypatch.setattr(gen, "_COMPILER_OK", None)  # forget the simulated failure
