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
