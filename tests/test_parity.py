"""Our model against `transformers`' MixtralForCausalLM on checkpoints transformers itself writes."""

from __future__ import annotations

import pytest
import torch
from conftest import HF_CONFIGS, random_tokens

import mixtral


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_transformers(hf_ckpt, name):
    path, hf = hf_ckpt(name)
    model = mixtral.load_model(path, dtype=torch.float32)
    tokens = random_tokens(hf.config.vocab_size, batch=2, seq=24)
    with torch.no_grad():
        expected = hf(tokens).logits
        got = model(tokens)
    assert got.shape == expected.shape == (2, 24, hf.config.vocab_size)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_router_is_decisive(hf_ckpt, name):
    """The parity checkpoints must route different tokens to different experts, or they test little."""
    path, hf = hf_ckpt(name)
    model = mixtral.load_model(path, dtype=torch.float32)
    model.keep_router_logits = True
    with torch.no_grad():
        model(random_tokens(hf.config.vocab_size, batch=2, seq=24))
    for logits in model.router_logits:
        first_choice = logits.argmax(-1)
        assert len(first_choice.unique()) >= min(3, hf.config.num_local_experts)
        top2 = logits.topk(2, dim=-1).values
        # top-1 and top-2 are well separated for most tokens: routing is not a coin toss
        assert (top2[:, 0] - top2[:, 1]).median().item() > 0.1


def test_sliding_window_matters(hf_ckpt):
    """Guards the window test above: with the window off, logits past the window change."""
    path, hf = hf_ckpt("swa8-top2of4")
    model = mixtral.load_model(path, dtype=torch.float32)
    tokens = random_tokens(hf.config.vocab_size, batch=1, seq=24)
    with torch.no_grad():
        windowed = model(tokens)
        for layer in model.layers:
            layer.attn.window = None
        full = model(tokens)
    assert torch.allclose(windowed[:, :8], full[:, :8], atol=1e-5)
    assert (windowed[:, 8:] - full[:, 8:]).abs().max() > 1e-3


def test_bfloat16_matches_transformers_in_bfloat16(hf_ckpt):
    path, hf = hf_ckpt("gqa-top2of8")
    tokens = random_tokens(hf.config.vocab_size, batch=2, seq=24)
    model = mixtral.load_model(path, dtype=torch.bfloat16)
    hf_bf16 = type(hf)(hf.config).eval()
    hf_bf16.load_state_dict(hf.state_dict())
    hf_bf16.to(torch.bfloat16)
    with torch.no_grad():
        got, theirs, exact = model(tokens).float(), hf_bf16(tokens).logits.float(), hf(tokens).logits
    # The same order of roundings as the reference: the two bf16 runs differ by a few bf16 ulps (logits
    # are O(1), an ulp there is 0.004-0.016), and ours is as close to the fp32 result as theirs.
    assert (got - theirs).abs().max().item() < 0.25
    assert (got - theirs).abs().mean().item() < 0.01
    assert (got - exact).abs().mean() <= 1.25 * (theirs - exact).abs().mean()
