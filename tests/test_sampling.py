"""Batched sampling (`sample_batch`) against its one-row reference (`sample`): the same tokens for every row,
whatever the other rows of the batch ask for."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mixtral import sampling
from mixtral.sampling import SamplingParams, process_logits, process_logits_batch, sample, sample_batch

V = 1000

# Every filter and penalty, alone and together, greedy and not, seeded and not, and values at the edge of their
# range (as the server's hostile tests send them).
PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=0.7, top_k=40, seed=2),
    SamplingParams(temperature=1.3, top_p=0.9, seed=3),
    SamplingParams(temperature=1.0, min_p=0.05, seed=4),
    SamplingParams(temperature=0.9, top_k=50, top_p=0.8, min_p=0.02, repetition_penalty=1.3, seed=5),
    SamplingParams(temperature=1.0, presence_penalty=1.5, frequency_penalty=-0.5, seed=6),
    SamplingParams(repetition_penalty=1.2, frequency_penalty=2.0),  # greedy, after penalties
    SamplingParams(temperature=1.5, top_k=1),  # greedy
    SamplingParams(temperature=2.0, top_k=V + 5),  # top_k past the vocabulary: off
    SamplingParams(temperature=1.0),  # unseeded: the global generator
    SamplingParams(temperature=1e-40, seed=7),
    SamplingParams(temperature=1.0, top_p=1e-300, seed=8),
    SamplingParams(temperature=1.0, repetition_penalty=1e-308, seed=9),
    SamplingParams(temperature=2.0, repetition_penalty=1e308, presence_penalty=2, frequency_penalty=2, top_k=3),
    SamplingParams(temperature=2.0, min_p=1.0, seed=10),
    SamplingParams(temperature=1e-40, top_p=1e-300, repetition_penalty=1e-308, min_p=1.0, seed=11),
]


def generators(params: list[SamplingParams]) -> list[torch.Generator | None]:
    return [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in params]


@pytest.mark.parametrize("order", ["as listed", "reversed", "shuffled"])
def test_batched_sampling_gives_the_per_row_tokens(order, monkeypatch):
    if order == "shuffled":  # and sampled 3 rows at a time, as a CPU samples blocks of a big batch
        monkeypatch.setattr(sampling, "CPU_BLOCK_BYTES", 3 * 4 * V)
    params = list(PARAMS)
    if order == "reversed":
        params.reverse()
    elif order == "shuffled":
        perm = torch.randperm(len(params), generator=torch.Generator().manual_seed(0)).tolist()
        params = [params[i] for i in perm]
    B = len(params)
    g = torch.Generator().manual_seed(42)
    prompt_lens = [int(n) for n in torch.randint(1, 20, (B,), generator=g)]
    histories = [torch.randint(0, V, (n,), generator=g).tolist() for n in prompt_lens]
    batch_gens, row_gens = generators(params), generators(params)
    for step in range(6):
        logits = torch.randn(B, V, generator=g) * 4
        logits[0, 7] = math.nan if step == 3 else logits[0, 7]  # a row whose logits are broken falls back alone
        state = torch.get_rng_state()
        batched = sample_batch(logits, params, histories, batch_gens, prompt_lens)
        torch.set_rng_state(state)  # the unseeded rows draw from the global generator: the same draws again
        one_by_one = [
            sample(logits[b], params[b], torch.tensor(histories[b], dtype=torch.long), row_gens[b], prompt_lens[b])
            for b in range(B)
        ]
        assert batched == one_by_one, step
        assert all(0 <= t < V for t in batched)
        for h, t in zip(histories, batched, strict=True):
            h.append(t)


def test_batched_filters_equal_the_per_row_ones():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(len(PARAMS), V, generator=g) * 8
    histories = [torch.randint(0, V, (9,), generator=g).tolist() for _ in PARAMS]
    out = process_logits_batch(logits, PARAMS, histories, [4] * len(PARAMS))
    for b, p in enumerate(PARAMS):
        assert torch.equal(out[b], process_logits(logits[b], p, torch.tensor(histories[b]), 4)), p
        assert not out[b].isnan().any() and torch.isfinite(out[b].max())


def test_a_seeded_row_does_not_depend_on_its_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=g)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=123)
    tokens = set()
    for others, row in itertools.product([SamplingParams(), SamplingParams(temperature=0.5, seed=9)], range(4)):
        batch = [others] * 4
        batch[row] = params
        gens = generators(batch)
        tokens.add(sample_batch(logits[[0] * 4], batch, [[1, 2]] * 4, gens, [2] * 4)[row])
    assert len(tokens) == 1
