"""The scheduler in-process, without HTTP: which rows a decode step spans, and that what a sequence generates
under load (rows swapped as others end, prompts prefilled in chunks between decode steps) is what it generates
alone."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import engine_tokens, fused_step_model, started_engine

import mixtral
from mixtral.generate import generate_stream
from mixtral.sampling import SamplingParams
from mixtral.serve.steps import Steps


class Spy(Steps):
    """Steps that remember what ran: each decode step's batch, each swap, each prefill chunk's row."""

    def __init__(self, model, cache) -> None:
        super().__init__(model, cache)
        self.log: list[tuple] = []

    def swap(self, a: int, b: int) -> None:
        self.log.append(("swap", a, b))
        super().swap(a, b)

    def prefill(self, row: int, tokens: list[int], start: int, every: bool = False) -> torch.Tensor:
        self.log.append(("prefill", row, len(tokens)))
        return super().prefill(row, tokens, start, every)

    def decode(self, tokens_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        self.log.append(("decode", len(tokens_B)))
        return super().decode(tokens_B, pos_B)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mixtral.Transformer(mixtral.get_preset("tiny")).eval(), mixtral.load_tokenizer()


def serve(tiny, jobs: list[tuple[list[int], SamplingParams]], **engine_args) -> tuple[list[list[int]], list[tuple]]:
    """Run `jobs` (prompt, params), all submitted at once, through an Engine; (tokens of each, the steps log)."""
    spies: list[Spy] = []

    def steps(model, cache) -> Spy:
        spies.append(Spy(model, cache))
        return spies[-1]

    engine = started_engine(lambda: tiny, steps=steps, **engine_args)
    try:
        out = engine_tokens(engine, jobs)
    finally:
        engine.stop()
    return out, spies[0].log


def solo(tiny, prompt: list[int], params: SamplingParams) -> list[int]:
    model, tok = tiny
    return [e.token for e in generate_stream(model, [prompt], params, tokenizer=tok, eos_id=tok.eos_id) if e.generated]


def test_a_lone_sequence_decodes_at_batch_1(tiny):
    params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=3)
    (out,), log = serve(tiny, [([1, 5, 9, 2000], params)], max_batch=4)
    assert out == solo(tiny, [1, 5, 9, 2000], params)
    assert [e for e in log if e[0] == "decode"] == [("decode", 1)] * (len(out) - 1)
    assert not [e for e in log if e[0] == "swap"]


def test_outputs_under_load_equal_solo_outputs(tiny):
    # more sequences than rows, ending at different times: rows are swapped to keep the decoding ones first
    g = torch.Generator().manual_seed(1)
    jobs = []
    for i in range(7):
        prompt = [1, *torch.randint(3, 32000, (3 + 5 * i,), generator=g).tolist()]
        params = SamplingParams(
            max_new_tokens=4 + 3 * (i % 3),
            temperature=0.0 if i % 2 else 1.0,
            top_k=[0, 40][i % 2],
            top_p=[1.0, 0.9, 0.5][i % 3],
            repetition_penalty=[1.0, 1.3][i % 2],
            seed=i,
        )
        jobs.append((prompt, params))
    out, log = serve(tiny, jobs, max_batch=3, prefill_chunk=8)
    assert out == [solo(tiny, p, sp) for p, sp in jobs]
    batches = [e[1] for e in log if e[0] == "decode"]
    assert max(batches) == 3 and min(batches) < 3
    assert [e for e in log if e[0] == "swap"]


def test_a_running_stream_keeps_decoding_while_a_long_prompt_is_prefilled(tiny):
    short = ([1, 42, 7], SamplingParams(max_new_tokens=24, temperature=1.0, seed=5))
    long = ([1, *range(100, 300)], SamplingParams(max_new_tokens=3, temperature=0.0))
    out, log = serve(tiny, [short, long], max_batch=4, prefill_chunk=16)
    assert out == [solo(tiny, *short), solo(tiny, *long)]
    assert len(out[0]) == 24
    # the long prompt goes in 13 chunks of at most 16 tokens, one per scheduler turn, each followed by a decode
    # step of the running stream alone (the prompt's row is not part of it)
    steps = [e for e in log if e[0] == "decode" or e[:2] == ("prefill", 1)]
    chunks = [i for i, e in enumerate(steps) if e[0] == "prefill"]
    assert len(chunks) == 13 and all(steps[i][2] <= 16 for i in chunks)
    for a, b in itertools.pairwise(chunks):
        assert steps[a + 1 : b] == [("decode", 1)]


@pytest.mark.parametrize(("budget", "per_turn"), [(24, 1), (48, 2)])
def test_while_streams_decode_a_turn_prefills_within_the_budget(tiny, budget, per_turn):
    """Prompts waiting while a stream decodes: each turn prefills what fits `prefill_budget` (at least one chunk),
    where nothing decoding lets a turn take `prefill_chunk` tokens; the outputs are the solo ones either way."""
    g = torch.Generator().manual_seed(2)
    stream = ([1, 42, 7], SamplingParams(max_new_tokens=30, temperature=1.0, seed=5))
    prompts = [
        ([1, *torch.randint(3, 32000, (19,), generator=g).tolist()], SamplingParams(max_new_tokens=2)) for _ in range(6)
    ]
    jobs = [stream, *prompts]
    out, log = serve(tiny, jobs, max_batch=8, prefill_chunk=64, prefill_budget=budget)
    assert out == [solo(tiny, *job) for job in jobs]
    turns, turn = [], []  # the prefills between decode steps
    for e in log:
        if e[0] == "decode":
            turns.append(turn)
            turn = []
        elif e[0] == "prefill":
            turn.append(e[2])
    # (the first turn may run before every job is submitted; from the second on, the stream decodes)
    later = [t for t in turns[1:] if t]
    assert sum(map(len, turns)) == len(jobs)
    assert all(len(t) == 1 or sum(t) <= budget for t in later)
    assert max(map(len, later)) == per_turn


def test_a_one_row_view_takes_the_fused_step_and_equals_a_cache_of_its_own():
    from mixtral.cache import KVCache
    from mixtral.generate import _fused_step, decode_step, prefill

    model = fused_step_model()
    config = model.config
    shared = KVCache(config, 4, 64, dtype=torch.bfloat16)
    own = KVCache(config, 1, 64, dtype=torch.bfloat16)
    prefill(model, shared.view(2, 3), [[1, 2, 3]])
    prefill(model, own, [[1, 2, 3]])
    shared.swap(2, 0)  # as the scheduler moves a sequence into the first row
    with torch.no_grad():
        assert _fused_step(model, shared.view(0, 1), torch.tensor([7])) is not None
    for pos, token in [(3, 7), (4, 9)]:
        step = [torch.tensor([token]), torch.tensor([pos])]
        assert torch.equal(decode_step(model, shared.view(0, 1), *step), decode_step(model, own, *step))
