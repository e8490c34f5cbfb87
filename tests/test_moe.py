"""The fast (grouped) expert dispatch against the plain reference loop."""

from __future__ import annotations

import pytest
import torch

from mixtral.config import get_preset
from mixtral.kernels.ops import Experts, Routing
from mixtral.kernels.ops import experts as experts_grouped
from mixtral.model import Transformer
from mixtral.moe import experts_reference, route


def random_experts(E=8, D=32, F=48, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(E, F, D, generator=g) / D**0.5
    w2 = torch.randn(E, D, F, generator=g) / F**0.5
    w3 = torch.randn(E, F, D, generator=g) / D**0.5
    return [w.to(dtype) for w in (w1, w2, w3)]


def test_route_equals_softmax_then_renormalise():
    logits = torch.randn(50, 8)
    weights, idx = route(logits, 2)
    probs = torch.softmax(logits, -1)
    top, top_idx = probs.topk(2, -1)
    assert torch.equal(idx, top_idx)
    assert torch.allclose(weights, top / top.sum(-1, keepdim=True), atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_grouped_equals_reference(top_k, tokens):
    w1, w2, w3 = random_experts()
    x = torch.randn(tokens, 32)
    weights, idx = route(torch.randn(tokens, 8) * 3, top_k)
    ref = experts_reference(x, Experts(w1, w2, w3), Routing(weights, idx))
    fast = experts_grouped(x, Experts(w1, w2, w3), Routing(weights, idx))
    assert torch.allclose(fast, ref, atol=1e-5)


def test_grouped_skips_unused_experts_and_matches_in_bf16():
    w1, w2, w3 = random_experts(dtype=torch.bfloat16)
    x = torch.randn(16, 32, dtype=torch.bfloat16)
    idx = torch.tensor([[0, 5]] * 16)  # only experts 0 and 5 are used
    weights = torch.full((16, 2), 0.5)
    # poison the unused experts: a grouped path that touched them would produce NaN
    for w in (w1, w2, w3):
        w[[1, 2, 3, 4, 6, 7]] = float("nan")
    fast = experts_grouped(x, Experts(w1, w2, w3), Routing(weights, idx))
    ref = experts_reference(x, Experts(w1, w2, w3), Routing(weights, idx))
    assert fast.dtype == torch.bfloat16 and not fast.isnan().any()
    assert torch.allclose(fast.float(), ref.float(), atol=1e-2)


def test_whole_model_paths_agree_with_gradients():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").replace(vocab_size=200))
    with torch.no_grad():
        for layer in model.layers:
            layer.moe.gate.weight.mul_(50)  # decisive routing
    tokens = torch.randint(0, 200, (2, 12))
    grads = {}
    outs = {}
    for impl in ("grouped", "reference"):
        model.zero_grad()
        model.set_moe_impl(impl)
        out = model(tokens)
        out.logsumexp(-1).mean().backward()
        outs[impl] = out.detach()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert torch.allclose(outs["grouped"], outs["reference"], atol=1e-5)
    for name in grads["reference"]:
        assert torch.allclose(grads["grouped"][name], grads["reference"][name], atol=1e-6), name
    with pytest.raises(ValueError, match="unknown MoE implementation 'fancy'"):
        model.set_moe_impl("fancy")
