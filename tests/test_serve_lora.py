"""Several LoRA adapters served at once (`mixtral serve --lora NAME=PATH ...`): rows of one batched step with
different adapters (or none) give what each adapter merged into a copy of the model gives alone, and what
`mixtral generate --lora` gives; the adapters are listed in /v1/models and picked by "model"."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from conftest import engine_tokens, started_engine, tiny_model
from fastapi.testclient import TestClient

import mixtral
from mixtral.generate import generate_stream
from mixtral.quantize import quantize_model
from mixtral.sampling import SamplingParams
from mixtral.serve import Engine, create_app
from mixtral.serve.adapters import AdapterBank, merged_reference
from mixtral.train.lora import apply_lora, load_adapter, save_adapter

# Two adapters on different weights and ranks: together they cover every target lora.py knows.
ADAPTERS = {"a": (4, 8.0, ("wq", "wv", "w1", "w2")), "b": (2, 4.0, ("wk", "wo", "w3", "w2"))}
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0), mixtral.load_tokenizer()


@pytest.fixture(scope="module")
def adapter_dirs(tiny, tmp_path_factory):
    """The adapters of ADAPTERS saved in PEFT's format, with random B (trained adapters are not zero)."""
    model, _ = tiny
    root = tmp_path_factory.mktemp("lora")
    paths = {}
    for i, (name, (rank, alpha, targets)) in enumerate(ADAPTERS.items()):
        m = copy.deepcopy(model)
        torch.manual_seed(10 + i)
        for p in apply_lora(m, rank, alpha, targets):
            if p.abs().sum() == 0:  # B
                p.data.normal_(0.0, 0.3)
        paths[name] = root / name
        save_adapter(m, paths[name])
    return paths


def prompts(n: int, length: int = 12, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(3, 32000, (length - 1,), generator=g).tolist()] for _ in range(n)]


def test_batched_rows_equal_the_merged_reference(tiny, adapter_dirs):
    model, _ = tiny
    bank = AdapterBank.load(model, adapter_dirs)
    tokens = torch.tensor(prompts(4))
    with torch.no_grad():
        base = model(tokens)
        merged = {name: merged_reference(model, path)(tokens) for name, path in adapter_dirs.items()}
    # rows on different adapters (gathered per row), and every row on one (its A and B used as they are)
    for rows in ([bank.index("a"), None, bank.index("b"), bank.index("a")], [bank.index("b")] * 4):
        with torch.no_grad():
            bank.select(rows)
            mixed = model(tokens)
            bank.select([None])
            after = model(tokens)
        assert torch.equal(after, base)  # no hooks left: the base path itself
        for r, slot in enumerate(rows):
            want = base[r] if slot is None else merged[bank.names[slot]][r]
            assert torch.allclose(mixed[r], want, atol=2e-4, rtol=1e-4), (r, (mixed[r] - want).abs().max())
    for name in adapter_dirs:  # the adapters change the output (the test would be empty otherwise)
        assert (merged[name] - base).abs().max() > 0.1


def test_a_quantized_base_with_adapters(tiny, adapter_dirs):
    """On an int8 base the delta is added to the quantized weights' output: equal to the merged reference on the
    dequantized weights, within int8's own rounding of the activations."""
    model, _ = tiny
    quantized = quantize_model(copy.deepcopy(model), "int8")
    bank = AdapterBank.load(quantized, adapter_dirs)
    tokens = torch.tensor(prompts(2))
    with torch.no_grad():
        bank.select([bank.index("b"), None])
        mixed = quantized(tokens)
        bank.select([None])
        base = quantized(tokens)
        ref = merged_reference(model, adapter_dirs["b"])(tokens)
    assert torch.equal(mixed[1], base[1])
    assert (mixed[0] - ref[0]).abs().max() < 0.05 * ref[0].abs().max()


def run_engine(tiny, adapter_dirs, jobs: list[tuple[list[int], str | None]], **kw) -> list[list[int]]:
    engine = started_engine(lambda: tiny, adapters={k: str(v) for k, v in adapter_dirs.items()}, **kw)
    try:
        return engine_tokens(engine, [(p, GREEDY, {"adapter": name}) for p, name in jobs])
    finally:
        engine.stop()


def test_a_mixed_batch_gives_what_generate_lora_gives_alone(tiny, adapter_dirs):
    model, _ = tiny
    ps = prompts(5, seed=2)
    names = ["a", None, "b", "a", None]
    got = run_engine(tiny, adapter_dirs, list(zip(ps, names, strict=True)), max_batch=8)
    for p, name, tokens in zip(ps, names, got, strict=True):
        m = model
        if name is not None:  # as `mixtral generate --lora PATH` runs: the adapter applied, not merged
            m = copy.deepcopy(model)
            load_adapter(m, adapter_dirs[name])
        want = [e.token for e in generate_stream(m, [p], GREEDY, eos_id=None) if e.generated]
        assert tokens == want, name
    assert got[0] != got[1] and got[2] != got[1]  # the adapters change the greedy tokens


def test_cached_prompt_blocks_are_not_shared_across_adapters(tiny, adapter_dirs):
    """One prompt of 3 cache blocks asked in turn with adapter a, the base model, b and a again (one row: each
    finds the earlier ones' blocks cached): each gets what it gets alone, since keys and values depend on the
    adapter; the second 'a' reuses the first's blocks."""
    model, _ = tiny
    p = prompts(1, length=50, seed=3)[0]
    names = ["a", None, "b", "a"]
    got = run_engine(tiny, adapter_dirs, [(p, n) for n in names], max_batch=1)
    for name, tokens in zip(names, got, strict=True):
        m = model if name is None else merged_reference(model, adapter_dirs[name])
        assert tokens == [e.token for e in generate_stream(m, [p], GREEDY, eos_id=None) if e.generated], name


def test_models_lists_the_adapters_and_model_picks_one(tiny, adapter_dirs):
    engine = Engine(lambda: tiny, max_batch=4, adapters={k: str(v) for k, v in adapter_dirs.items()})
    with TestClient(create_app(engine, model_name="tiny")) as client:
        for _ in range(3000):
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.01)
        cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
        assert set(cards) == {"tiny", "a", "b"}
        assert cards["a"]["parent"] == "tiny" and cards["a"]["root"] == str(adapter_dirs["a"])
        assert cards["tiny"]["parent"] is None
        assert client.get("/v1/models/b").json()["parent"] == "tiny"
        body = {"prompt": prompts(1)[0], "max_tokens": 6, "temperature": 0}
        out = {m: client.post("/v1/completions", json={**body, "model": m}).json() for m in ("tiny", "a")}
        assert out["a"]["model"] == "a" and out["a"]["choices"][0]["text"] != out["tiny"]["choices"][0]["text"]
        r = client.post("/v1/completions", json={**body, "model": "c"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert all(repr(n) in r.json()["error"]["message"] for n in ("tiny", "a", "b"))


def test_serve_lora_flag_errors(tmp_path, adapter_dirs):
    from mixtral.serve.cli import parse_lora

    assert parse_lora([f"x={adapter_dirs['a']}"], "base") == {"x": str(adapter_dirs["a"])}
    for bad, says in [
        ([str(adapter_dirs["a"])], "NAME=PATH"),
        ([f"x={adapter_dirs['a']}", f"x={adapter_dirs['b']}"], "twice"),
        ([f"base={adapter_dirs['a']}"], "served model"),
        ([f"x={tmp_path / 'none'}"], "not a LoRA adapter"),
    ]:
        with pytest.raises(mixtral.cli_args.CLIError, match=says):
            parse_lora(bad, "base")
