"""KV caches, chunked prefill, batched generation and sampling."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model, random_tokens

import mixtral
from mixtral.cache import KVCache
from mixtral.config import get_preset
from mixtral.generate import generate, generate_stream, prefill, prepare_kernels
from mixtral.kernels import cpu as cpu_kernels
from mixtral.model import Transformer
from mixtral.sampling import SamplingParams, process_logits, sample

VOCAB = 300
generate_module = importlib.import_module("mixtral.generate")  # the module (`mixtral.generate` is also a function)


def tiny_model(window: int | None = None, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(get_preset("tiny").replace(vocab_size=VOCAB, sliding_window=window)).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.moe.gate.weight.mul_(50)  # decisive routing: each token picks its own experts
        model.embed.weight.mul_(20)
    return model


@pytest.mark.parametrize("window", [None, 8])
def test_token_by_token_decoding_equals_full_forward(window):
    model = tiny_model(window)
    tokens = random_tokens(VOCAB, batch=2, seq=40)  # 5x the window
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.config, 2, 40, dtype=torch.float32)
        if window:
            assert cache.rolling and cache.n_slots == window  # memory bounded by the window
        steps = [model(tokens[:, t : t + 1], positions=torch.tensor([t]), cache=cache) for t in range(40)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("chunk", [3, 8, 13, 64])
def test_chunked_prefill_equals_one_shot(window, chunk):
    model = tiny_model(window)
    tokens = random_tokens(VOCAB, batch=1, seq=37)
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.config, 1, 45, dtype=torch.float32)
        last = prefill(model, cache, [tokens[0].tolist()], chunk_size=chunk)
        assert (last[0] - full[0, -1]).abs().max().item() <= 1e-4
        # the cache it leaves behind is right too: one more step equals a full forward of 38 tokens
        nxt = torch.tensor([[5]])
        step = model(nxt, positions=torch.tensor([37]), cache=cache)
        full38 = model(torch.cat([tokens, nxt], dim=1))
    assert (step[0, -1] - full38[0, -1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_at_runs_the_last_layer_on_the_chosen_tokens_alone(window, dtype):
    model = tiny_model(window).to(dtype)
    tokens = random_tokens(VOCAB, batch=3, seq=11)
    at = torch.tensor([[0, 10], [2, 4], [2, 7], [1, 0]])  # rows in any order, two tokens of one row
    seen = []  # tokens each layer's MoE was given
    for layer in model.layers:
        layer.moe.register_forward_pre_hook(
            lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])
        )
    with torch.no_grad():
        full = model(tokens).float()
        seen.clear()
        some = model(tokens, logits_at=at).float()
        assert seen == [33] * (len(model.layers) - 1) + [4]
        seen.clear()
        model.keep_router_logits = True  # then every token's router logits are wanted: the last layer runs all
        kept = model(tokens, logits_at=at).float()
        assert seen == [33] * len(model.layers) and [r.shape[0] for r in model.router_logits] == seen
    for got in (some, kept):
        assert (got - full[at[:, 0], at[:, 1]]).abs().max().item() <= 1e-5 * full.abs().max().item()


def test_logits_at_none_still_fills_the_cache():
    """A prefill chunk in which no prompt ends asks for no logits; its last layer's keys and values are stored."""
    model = tiny_model()
    tokens = random_tokens(VOCAB, batch=1, seq=9)
    with torch.no_grad():
        cache = KVCache(model.config, 1, 16, dtype=torch.float32)
        none = model(tokens[:, :5], cache=cache, logits_at=torch.zeros((0, 2), dtype=torch.long))
        step = model(tokens[:, 5:], positions=torch.arange(5, 9), cache=cache)
        full = model(tokens)
    assert none.shape == (0, VOCAB)
    assert (step - full[:, 5:]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("window", [None, 8])
def test_batched_greedy_equals_one_by_one(window):
    model = tiny_model(window)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 17, 9, 1)]
    alone = [generate(model, [p], max_new_tokens=20, eos_id=None)[0] for p in prompts]
    batched = generate(model, prompts, max_new_tokens=20, eos_id=None, prefill_chunk=5)
    assert batched == alone
    assert all(len(o) == 20 for o in batched)
    assert len({tuple(o) for o in batched}) >= 3  # the prompts really lead different ways


@pytest.mark.parametrize("window", [None, 6])
def test_greedy_equals_transformers_generate(tmp_path, window):
    hf = make_hf_model(seed=11, sliding_window=window, vocab_size=VOCAB)
    hf.save_pretrained(tmp_path)
    model = mixtral.load_model(tmp_path, dtype=torch.float32)
    prompt = random_tokens(VOCAB, batch=1, seq=10, seed=4)
    with torch.no_grad():
        theirs = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, 10:].tolist()
    ours = generate(model, [prompt[0].tolist()], max_new_tokens=32, eos_id=None)[0]
    assert ours == theirs
    assert len(set(ours)) > 3  # not a degenerate repetition that would match by accident


def test_each_sequence_stops_on_its_own():
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5]]
    free = generate(model, prompts, max_new_tokens=12, eos_id=None)
    eos = free[0][4]  # make the 5th token of the first sequence its EOS
    out = generate(model, prompts, max_new_tokens=12, eos_id=eos)
    first_eos = free[0].index(eos)
    assert out[0] == free[0][:first_eos]
    cut = free[1].index(eos) if eos in free[1] else 12
    assert out[1] == free[1][:cut]
    events = list(generate_stream(model, prompts, SamplingParams(max_new_tokens=12), eos_id=eos))
    reasons = {e.index: e.finish_reason for e in events if e.finish_reason}
    assert reasons[0] == "stop"


def test_ignore_eos_min_tokens_and_stop_token_ids():
    """vLLM's extensions in the generation loop: EOS ignored; EOS and stop ids held off for min_tokens; a stop id
    ends the sequence as EOS does (not part of the output)."""
    model = tiny_model()
    prompt = [[1, 2, 3]]
    free = generate(model, prompt, max_new_tokens=10, eos_id=None)[0]
    eos = free[0]  # greedy's first token made the EOS: without the extensions, nothing is generated

    def run(**extra) -> tuple[list[int], str]:
        events = list(generate_stream(model, prompt, SamplingParams(max_new_tokens=10, **extra), eos_id=eos))
        return [e.token for e in events if not e.eos], events[-1].finish_reason

    assert run() == ([], "stop")
    assert run(ignore_eos=True) == (free, "length")
    tokens, reason = run(min_tokens=3)
    assert len(tokens) >= 3 and eos not in tokens[:3]
    stop = free[4]
    tokens, reason = run(ignore_eos=True, stop_token_ids=(stop,))
    assert (tokens, reason) == (free[: free.index(stop)], "stop")
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_new_tokens=4, min_tokens=5)


def test_seeds_give_reproducible_samples_alone_or_in_a_batch():
    model = tiny_model()
    prompts = [[1, 2, 3], [7, 8, 9, 10]]
    kw = dict(max_new_tokens=15, temperature=1.0, top_p=0.95, seed=1234, eos_id=None)
    a = generate(model, prompts, **kw)
    b = generate(model, prompts, **kw)
    assert a == b
    assert generate(model, [prompts[1]], **kw)[0] == a[1]
    assert generate(model, prompts, **{**kw, "seed": 99}) != a


def test_top_k_1_equals_greedy():
    model = tiny_model()
    greedy = generate(model, [[1, 2, 3]], max_new_tokens=15, eos_id=None)
    topk1 = generate(model, [[1, 2, 3]], max_new_tokens=15, temperature=1.3, top_k=1, seed=5, eos_id=None)
    assert greedy == topk1


# Upper 0.1% points of the chi-square distribution (df = degrees of freedom).
CHI2_999 = {3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=1.5, top_k=5),
        SamplingParams(temperature=1.0, min_p=0.1),
    ],
)
def test_sampling_follows_the_distribution(params):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    # The expected distribution, computed directly from the definitions.
    p = torch.softmax(logits / params.temperature, -1)
    keep = torch.ones(8, dtype=torch.bool)
    if params.top_k:
        keep[params.top_k :] = False  # logits are sorted descending
    if params.top_p < 1:
        keep &= (torch.cumsum(p, 0) - p) < params.top_p
    if params.min_p:
        keep &= p >= params.min_p * p.max()
    expected = torch.where(keep, p, 0.0)
    expected /= expected.sum()
    n = 20000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(8)
    for _ in range(n):
        counts[sample(logits, params, torch.tensor([], dtype=torch.long), g)] += 1
    assert counts[~keep].sum() == 0  # filtered tokens never appear
    exp = expected[keep] * n
    chi2 = float(((counts[keep] - exp) ** 2 / exp).sum())
    df = int(keep.sum()) - 1
    assert chi2 < CHI2_999[df], (chi2, counts, exp)


def test_repetition_penalty():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = process_logits(logits, SamplingParams(repetition_penalty=2.0), torch.tensor([0, 1]))
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]


def test_context_length_is_enforced():
    model = tiny_model()  # context 512
    with pytest.raises(ValueError, match="prompt 0 has 500 tokens and max_new_tokens is 20: together 520, more than"):
        generate(model, [[1] * 500], max_new_tokens=20)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, VOCAB + 5]], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"top_p=1\.5 is invalid"):
        generate(model, [[1]], max_new_tokens=2, top_p=1.5)


def test_prepare_kernels_builds_them_for_a_cpu_model_only(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kernels, "ops", lambda: calls.append(1))
    model = tiny_model()
    prepare_kernels(model)
    assert calls == [1]
    model.to("meta")
    prepare_kernels(model)
    assert calls == [1]


def test_a_kernel_build_goes_to_this_installs_folder_and_says_how_long_it_took(monkeypatch, tmp_path, capsys):
    """The build (torch's cpp_extension `load`, faked here) goes to a folder of this installed copy's own, says
    where before it starts and how long it took after; a second load of a finished build says nothing."""
    import torch.utils.cpp_extension

    monkeypatch.setenv("MIXTRAL_KERNEL_DIR", str(tmp_path))
    builds = []

    def fake_load(name, sources, build_directory, **kwargs):
        builds.append(build_directory)
        (Path(build_directory) / f"{name}.so").write_bytes(b"")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    monkeypatch.setattr(torch.library, "register_fake", lambda name: lambda fn: fn)
    cpu_kernels._build()
    err = capsys.readouterr().err
    assert len(builds) == 1 and Path(builds[0]).parent.parent == tmp_path
    assert f"compiling the CPU kernels into {builds[0]}" in err and "CPU kernels built in" in err
    cpu_kernels._build()  # built before: loaded, quietly
    assert len(builds) == 2 and builds[1] == builds[0] and capsys.readouterr().err == ""
    monkeypatch.setattr(sys, "prefix", "/another/venv")  # another install: another folder
    assert cpu_kernels.build_directory("x").parent != Path(builds[0]).parent
