"""The paged KV cache and prefix caching (cache.PagedKVCache, in the serving engine): a forward pass through the
pages gives what the plain KVCache gives, a prefix shared by concurrent requests is computed once, the cache's
memory grows with the tokens in use, a sliding-window model gives the same tokens with pages as without, and
prefix-cache hits and evictions leave every output as a cold run's."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import engine_tokens, fused_step_model, started_engine

import mixtral
from mixtral.cache import KVCache, PagedKVCache
from mixtral.generate import generate_stream
from mixtral.sampling import SamplingParams
from mixtral.serve.engine import Engine
from mixtral.serve.steps import Steps


class Counting(Steps):
    """Steps that count the prompt tokens actually prefilled."""

    def __init__(self, model, cache) -> None:
        super().__init__(model, cache)
        self.prefilled = 0

    def prefill(self, row, tokens, start, every=False):
        self.prefilled += len(tokens)
        return super().prefill(row, tokens, start, every)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mixtral.Transformer(mixtral.get_preset("tiny")).eval(), mixtral.load_tokenizer()


@pytest.fixture(scope="module")
def tiny_swa():
    torch.manual_seed(1)
    return mixtral.Transformer(mixtral.get_preset("tiny-swa")).eval(), mixtral.load_tokenizer()


def start(tiny, **engine_args) -> tuple[Engine, list[Counting]]:
    made: list[Counting] = []

    def steps(model, cache) -> Counting:
        made.append(Counting(model, cache))
        return made[-1]

    engine = started_engine(lambda: tiny, steps=steps, **engine_args)
    return engine, made


def run(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    """Submit `jobs` (prompt, params) at once; the tokens each generates."""
    return engine_tokens(engine, jobs)


def serve(tiny, jobs, **engine_args) -> tuple[list[list[int]], Engine, Counting]:
    engine, made = start(tiny, **engine_args)
    try:
        return run(engine, jobs), engine, made[0]
    finally:
        engine.stop()


def solo(tiny, prompt: list[int], params: SamplingParams) -> list[int]:
    model, tok = tiny
    return [e.token for e in generate_stream(model, [prompt], params, tokenizer=tok, eos_id=tok.eos_id) if e.generated]


def randoms(n: int, seed: int) -> list[int]:
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_a_forward_pass_through_pages_equals_the_plain_cache(tiny):
    """Prefill and decode of 3 sequences of different lengths, one through a PagedKVCache (gathered), one through a
    KVCache: the same logits, bit for bit (full attention: the gathered cache has the plain cache's layout)."""
    model, _ = tiny
    config = model.config
    paged = Steps(model, PagedKVCache(config, 3, 40, block_size=16, prefix_caching=False, dtype=torch.float32))
    plain = Steps(model, KVCache(config, 3, 128, dtype=torch.float32))
    prompts = [randoms(n, n) for n in (5, 21, 40)]
    for row, prompt in enumerate(prompts):
        paged.admit(row, 128, prompt)
        plain.admit(row, 128, prompt)
        for a in range(0, len(prompt), 16):  # in chunks, as the engine prefills
            chunk = prompt[a : a + 16]
            assert torch.equal(paged.prefill(row, chunk, a), plain.prefill(row, chunk, a))
    pos = torch.tensor([len(p) for p in prompts])
    for step in range(20):
        tokens = torch.tensor(randoms(3, 100 + step))
        assert torch.equal(paged.decode(tokens, pos), plain.decode(tokens, pos))
        pos += 1
    assert paged.cache.blocks_used == sum(paged.cache.blocks_for(p) for p in pos.tolist())  # positions 0..p-1


def test_kv_memory_grows_with_the_tokens_in_use(tiny):
    model, _ = tiny
    cache = PagedKVCache(model.config, 4, 64, block_size=16, prefix_caching=False, dtype=torch.float32)
    steps = Steps(model, cache)
    assert cache.blocks_used == 0
    steps.admit(0, 200, [1, 2, 3])
    assert cache.blocks_used == 0  # reserved, not taken
    used = []
    for n in range(1, 50, 7):  # one sequence's prompt growing: a block per 16 positions
        steps.prefill(0, randoms(7, n), n - 1)
        used.append(cache.blocks_used)
        assert cache.blocks_used == cache.blocks_for(n - 1 + 7)
    assert used == sorted(used) and used[-1] > used[0]
    steps.admit(1, 100, [1])
    steps.prefill(1, randoms(33, 7), 0)
    assert cache.blocks_used == cache.blocks_for(49 + 7 - 1) + 3
    steps.release(0)
    assert cache.blocks_used == 3
    steps.release(1)
    assert cache.blocks_used == 0 and len(cache.free) == cache.n_blocks


def test_a_prefix_shared_by_concurrent_requests_is_computed_once(tiny):
    system = [1, *randoms(47, 0)]  # 48 tokens: 3 full blocks
    jobs = [
        ([*system, *randoms(5 + i, 10 + i)], SamplingParams(max_new_tokens=6, temperature=[0.0, 1.0][i % 2], seed=i))
        for i in range(4)
    ]
    out, engine, steps = serve(tiny, jobs, max_batch=4, prefill_chunk=32)
    assert out == [solo(tiny, p, sp) for p, sp in jobs]
    # the 3 shared blocks are computed by the first request alone; the others prefill their own tails only
    assert steps.prefilled == sum(len(p) for p, _ in jobs) - 3 * 48
    assert (engine.stats.prefix_cache_hits, engine.stats.prefix_cache_queries) == (3 * 48, sum(len(p) for p, _ in jobs))
    assert engine.stats.kv_blocks_used == 0 and engine.stats.kv_blocks_cached > 0


def test_prefix_cache_hits_give_the_outputs_of_a_cold_run(tiny):
    prompts = [[1, *randoms(70, 3)], [1, *randoms(70, 3)[:40], *randoms(9, 4)]]  # the second shares 41 tokens
    params = SamplingParams(max_new_tokens=8, temperature=0.7, seed=11)
    engine, _ = start(tiny, max_batch=2, prefill_chunk=24)
    try:
        first = run(engine, [(prompts[0], params)])
        again = run(engine, [(prompts[0], params), (prompts[1], params)])  # hits: 4 blocks, then 2
        hits = engine.stats.prefix_cache_hits
    finally:
        engine.stop()
    assert hits == 4 * 16 + 2 * 16
    cold = [solo(tiny, p, params) for p in prompts]
    assert first == cold[:1] and again == cold
    off, engine, _ = serve(tiny, [(p, params) for p in prompts], max_batch=2, prefix_caching=False)
    assert off == cold and engine.stats.prefix_cache_hits == 0


def test_eviction_under_a_small_pool_keeps_outputs_right(tiny):
    # a pool of one context (512 tokens, 32 blocks): 12 requests of 100-token prompts evict each other's blocks
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    prompts = [[1, *randoms(99, 50 + i % 6)] for i in range(12)]  # 6 distinct prompts, each twice
    jobs = [(p, params) for p in prompts]
    out, engine, _ = serve(tiny, jobs, max_batch=3, kv_cache_tokens=512)
    assert out == [solo(tiny, p, params) for p in prompts[:6]] * 2
    assert engine.stats.kv_blocks_total == 32 and engine.stats.kv_blocks_used == 0
    assert 0 < engine.stats.prefix_cache_hits < 6 * 96  # some reused, some evicted before their second use


def test_a_sliding_window_model_gives_the_same_tokens_with_pages_as_without(tiny_swa):
    # window 16: prompts and generations run far past it; blocks older than the window are dropped
    system = [1, *randoms(40, 7)]
    jobs = [
        ([*system, *randoms(3 + 9 * i, 20 + i)], SamplingParams(max_new_tokens=30, temperature=0.9 * (i % 2), seed=i))
        for i in range(5)
    ]
    paged, engine, _ = serve(tiny_swa, jobs, max_batch=3, prefill_chunk=20)
    plain, _, _ = serve(tiny_swa, jobs, max_batch=3, prefill_chunk=20, paged=False)
    assert paged == plain == [solo(tiny_swa, p, sp) for p, sp in jobs]
    assert engine.stats.prefix_cache_hits > 0


def test_a_sliding_window_row_holds_only_the_blocks_its_window_reaches(tiny_swa):
    model, _ = tiny_swa
    cache = PagedKVCache(model.config, 1, 32, block_size=4, prefix_caching=False, dtype=torch.float32)
    steps = Steps(model, cache)
    steps.admit(0, 100, [1])
    steps.prefill(0, randoms(20, 1), 0)
    pos = torch.tensor([20])
    for _ in range(40):
        steps.decode(torch.tensor([5]), pos)
        pos += 1
        # window 16: the next query at p sees p-15..p, within blocks (p-15)//4 .. p//4
        assert cache.blocks_used <= 16 // 4 + 1
    assert cache.tables[0][:10] == [0] * 10  # dropped


def test_the_fused_step_reads_through_pages_and_equals_the_plain_cache():
    model = fused_step_model()
    config = model.config
    paged = Steps(model, PagedKVCache(config, 2, 8, block_size=16, dtype=torch.bfloat16))
    plain = Steps(model, KVCache(config, 2, 64, dtype=torch.bfloat16))
    for steps in (paged, plain):
        steps.admit(1, 64, [1, 2, 3])
        steps.prefill(1, [1, 2, 3], 0)
        steps.swap(1, 0)
    for pos in range(3, 40):  # crosses two block boundaries
        step = (torch.tensor([pos * 7]), torch.tensor([pos]))
        assert torch.equal(paged.decode(*step), plain.decode(*step))


def test_metrics_count_prefix_cache_queries_and_hits_in_tokens(tiny):
    from fastapi.testclient import TestClient

    from mixtral.serve.app import create_app

    def metric(client, name: str) -> float:
        (value,) = [
            float(line.split()[-1]) for line in client.get("/metrics").text.splitlines() if line.startswith(name + " ")
        ]
        return value

    engine = Engine(lambda: tiny, max_batch=4)
    prompt = [1, *randoms(40, 9)]  # 41 tokens: 2 full blocks may be reused (the last token's block is computed)
    with TestClient(create_app(engine, model_name="tiny", max_body=2**20)) as client:
        for _ in range(3000):
            if engine.state == "ready":
                break
            time.sleep(0.01)
        texts = []
        for _ in range(2):
            r = client.post(
                "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0}
            )
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
        assert texts[0] == texts[1]
        assert metric(client, "mixtral_prefix_cache_queries_total") == 2 * 41
        assert metric(client, "mixtral_prefix_cache_hits_total") == 32
        assert metric(client, "mixtral_kv_blocks_used") == 0
        assert metric(client, "mixtral_kv_blocks_cached") == 2
        assert metric(client, "mixtral_kv_blocks") == engine.stats.kv_blocks_total > 0


def test_a_sequence_waits_for_a_promised_block_until_it_is_written_or_its_writer_leaves(tiny):
    model, _ = tiny
    cache = PagedKVCache(model.config, 3, 32, block_size=16, dtype=torch.float32)
    steps = Steps(model, cache)
    prompt = [1, *randoms(40, 2)]  # 41 tokens: blocks 0 and 1 shareable
    for row in range(3):
        assert steps.admit(row, 64, prompt) == 0  # nothing cached yet
    assert steps.prefix(0) == (0, False)  # row 0 computes, and promises blocks 0 and 1
    assert steps.prefix(1) == (0, True) and steps.prefix(2) == (0, True)
    steps.prefill(0, prompt[:16], 0)
    assert steps.prefix(1) == (0, True)  # block 0 written, block 1 still promised
    steps.release(0)  # its writer leaves (cancelled): block 0 stays cached, block 1's promise goes
    assert steps.prefix(1) == (16, False)  # takes block 0, promises block 1
    assert steps.prefix(2) == (0, True)
    steps.prefill(1, prompt[16:], 16)
    assert steps.prefix(2) == (32, False)
    assert cache.hits == 48 and cache.queries == 3 * 41  # every lookup counts, a miss too


def test_decode_steps_reuse_the_gathered_view_until_a_row_needs_a_new_block(tiny, monkeypatch):
    """A decode step that goes on where the last one ended, within the blocks gathered, runs on the last view (which
    that step wrote) instead of gathering every block again; a new block, a swap or a new sequence gathers again;
    the logits stay the plain cache's, bit for bit."""
    import mixtral.cache as cache_module

    model, _ = tiny
    config = model.config
    builds = []
    real_of = cache_module.KVCache.of
    monkeypatch.setattr(cache_module.KVCache, "of", lambda *a, **k: builds.append(1) or real_of(*a, **k))
    paged = Steps(model, PagedKVCache(config, 3, 40, block_size=16, prefix_caching=False, dtype=torch.float32))
    plain = Steps(model, KVCache(config, 3, 128, dtype=torch.float32))
    prompts = [randoms(n, n) for n in (5, 21, 40)]
    for steps in (paged, plain):
        for row, prompt in enumerate(prompts):
            steps.admit(row, 128, prompt)
            steps.prefill(row, prompt, 0)
    pos = torch.tensor([len(p) for p in prompts])
    builds.clear()
    for step in range(20):  # the first step gathers; rows 0 and 1 need a new block at step 11 (positions 16 and 32),
        # row 2 at step 8 (48): two gathers more
        tokens = torch.tensor(randoms(3, 200 + step))
        assert torch.equal(paged.decode(tokens, pos), plain.decode(tokens, pos))
        pos += 1
    assert len(builds) == 3, len(builds)
    for steps in (paged, plain):
        steps.swap(0, 2)
    pos = pos[[2, 1, 0]]
    builds.clear()
    for step in range(3):
        tokens = torch.tensor(randoms(3, 300 + step))
        assert torch.equal(paged.decode(tokens, pos), plain.decode(tokens, pos))
        pos += 1
    assert len(builds) == 1
