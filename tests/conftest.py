"""Shared test helpers: tiny random checkpoints written by `transformers` itself, in the real formats."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

# Small shapes that still exercise every feature; each test picks what it needs.
HF_CONFIGS = {
    "gqa-top2of8": dict(num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2),
    "mha-top1of4": dict(num_attention_heads=4, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=1),
    "swa8-top2of4": dict(
        num_attention_heads=4, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, sliding_window=8
    ),
    "headdim32-top2of8": dict(
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, head_dim=32
    ),
    "tied-top1of8": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=1,
        tie_word_embeddings=True,
    ),
}


def make_hf_model(seed: int = 0, **overrides):
    """A random `transformers` MixtralForCausalLM (fp32) with a decisive router."""
    from transformers import MixtralConfig, MixtralForCausalLM

    kwargs = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        rope_theta=1e6,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    config = MixtralConfig(**kwargs)
    model = MixtralForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Random weights of unit scale for norms (so they matter) and a router whose logits are
            # large, so each token really picks its own experts.
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
            elif "gate.weight" in name:
                p.normal_(0.0, 1.0)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model


def tiny_model(config=None, *, seed: int = 0, dtype: torch.dtype = torch.float32, std: float | None = None):
    """A random `mixtral.Transformer` of `config` (default: the "tiny" preset) in eval mode, seeded; with `std`, its
    weights re-drawn N(0, std) (unit norms) by the model's own initialiser."""
    import mixtral

    torch.manual_seed(seed)
    model = mixtral.Transformer(config or mixtral.get_preset("tiny"))
    if std is not None:
        model.init_weights(std=std)
    return model.to(dtype).eval()


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_ckpt(tmp_path_factory):
    """Factory: (name) -> (path, hf_model) for a checkpoint in HF_CONFIGS, written once per session."""
    cache: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in cache:
            model = make_hf_model(**HF_CONFIGS[name])
            cache[name] = (save_hf(model, tmp_path_factory.mktemp(name)), model)
        return cache[name]

    return get


def random_tokens(vocab: int, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


# A tiny vocabulary for synthetic training text.
WORDS = [
    "the",
    "king",
    "said",
    "to",
    "his",
    "son",
    "that",
    "the",
    "queen",
    "would",
    "come",
    "home",
    "before",
    "night",
    "and",
    "all",
    "the",
    "lords",
    "were",
    "glad",
]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small synthetic corpus: 30 text files and a JSONL file of chats (the loss on assistant tokens only, so rows
    hold different target counts)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(30):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(120)))
    chats = [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
        for w in WORDS
    ]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    return root


def assert_error(r, status: int, param: str | None = None, code: str | None = None) -> dict:
    """An HTTP response is an error in OpenAI's shape, with this status, `param` and (if given) `code`."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def started_engine(load, **engine_args):
    """A serving `Engine` on `load()`'s (model, tokenizer), started and ready."""
    import time

    from mixtral.serve.engine import Engine

    engine = Engine(load, **engine_args)
    engine.start()
    deadline = time.monotonic() + 600  # the first run in an install builds the CPU kernels
    while engine.state != "ready":
        assert time.monotonic() < deadline and engine.state == "loading", (engine.state, engine.load_error)
        time.sleep(0.01)
    return engine


def engine_tokens(engine, jobs: list[tuple], timeout: float = 120) -> list[list[int]]:
    """Submit `jobs` (prompt, params[, Request keyword arguments]) at once; the tokens each generates."""
    import asyncio

    from mixtral.serve.engine import Request

    async def go() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        requests = [Request([job[0]], [job[1]], None, loop, **(job[2] if len(job) > 2 else {})) for job in jobs]
        for r in requests:
            engine.submit(r)

        async def tokens(r: Request) -> list[int]:
            events = [e async for e in r.events()]
            assert all(e.error is None for e in events), events
            return [e.token for e in events if e.generated]

        return await asyncio.gather(*map(tokens, requests))

    return asyncio.run(asyncio.wait_for(go(), timeout))


def fused_step_model():
    """A bf16 model of a shape the fused CPU decode step takes (tiny's head_dim 16 is not one), seeded; skips where
    the CPU kernels are not available."""
    import dataclasses

    import mixtral
    from mixtral.kernels import cpu

    if cpu.ops() is None:
        pytest.skip("the CPU kernels are not available here")
    torch.manual_seed(0)
    config = dataclasses.replace(mixtral.get_preset("tiny"), dim=128, hidden_dim=256, head_dim=32)
    return mixtral.Transformer(config).eval().to(torch.bfloat16)
