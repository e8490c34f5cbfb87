"""Experts offloaded to CPU memory (`offload.py`), with a CPU tensor pool standing in for the GPU: the same logits and
generations as the model with its experts resident, the LRU slots and their counters, the prefetch, the memory
budget and the CLI flags."""

from __future__ import annotations

import pytest
import torch

import mixtral.cli
from mixtral.cache import KVCache
from mixtral.config import get_preset
from mixtral.generate import decode_step, generate, prefill
from mixtral.kernels import ops
from mixtral.kernels.ops import Experts, Routing
from mixtral.kernels.weights import QuantizedWeight
from mixtral.model import Transformer
from mixtral.offload import (
    ExpertCache,
    _passes,
    expert_bytes,
    non_expert_bytes,
    offload_experts,
    offload_of,
    resident_for_budget,
)
from mixtral.quantize import quantize_model

VOCAB = 300
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42]]
# head_dim 32: int4 blocks of 64 rows fit wk/wv (2 heads), and bf16 decodes through the fused one-call CPU step
CONFIG = get_preset("tiny").replace(vocab_size=VOCAB, head_dim=32)
FORMATS = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "int8"), (torch.bfloat16, "int4")]


def tiny_model(dtype: torch.dtype = torch.float32, quantize: str | None = None) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.moe.gate.weight.mul_(50)  # decisive routing
        model.embed.weight.mul_(20)
    model = model.to(dtype)
    return quantize_model(model, quantize) if quantize else model


def greedy_logits(model: Transformer, steps: int = 6) -> list[torch.Tensor]:
    """The logits of a batch prefill, then of `steps` greedy decode steps."""
    cache = KVCache(model.config, len(PROMPTS), 32, dtype=model.embed.weight.dtype)
    logits = prefill(model, cache, PROMPTS)
    out, pos = [logits], torch.tensor([len(p) - 1 for p in PROMPTS])
    for _ in range(steps):
        pos = pos + 1
        logits = decode_step(model, cache, logits.argmax(-1), pos)
        out.append(logits)
    return out


@pytest.mark.parametrize("dtype,quantize", FORMATS, ids=["float32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("resident", [8, 2])
def test_offloaded_model_computes_what_the_resident_one_does(dtype, quantize, resident):
    """8 slots hold every expert a step needs: the same numbers bit for bit. 2 slots (top_k): a prompt's step needs
    more experts than that and runs in passes (`_passes`, compared bit for bit below); here within a tight
    tolerance, and the same greedy tokens."""
    want = tiny_model(dtype, quantize)
    model = tiny_model(dtype, quantize)
    offload = offload_experts(model, "cpu", resident)
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        pairs = [(model(tokens), want(tokens))]
    pairs += zip(greedy_logits(model), greedy_logits(want), strict=True)
    for got, expected in pairs:
        if resident == 8:
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert generate(model, PROMPTS, max_new_tokens=8) == generate(want, PROMPTS, max_new_tokens=8)
    total = offload.total()
    assert total.hits > 0 and total.misses > 0 and total.loads == total.misses + total.prefetches
    if resident == 8:
        assert total.loads == 8 * 2  # each expert loaded once, on demand or prefetched
    assert all(p.device.type == "cpu" for p in model.parameters())  # (the stand-in: everything on the CPU)
    assert offload_of(model) is offload and offload_of(want) is None


def test_passes_run_each_expert_on_its_rows_and_round_once():
    """A step needing more experts than slots: passes over whole experts give what one pass over all experts does,
    bit for bit (each expert sees the same rows; the k outputs of a token are summed once, in float32)."""
    g = torch.Generator().manual_seed(0)
    E, D, F = 6, 64, 128
    stack = Experts(*(torch.randn(E, *shape, generator=g).bfloat16() for shape in ((F, D), (D, F), (F, D))))
    x = torch.randn(8, D, generator=g).bfloat16()
    idx = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 0], [0, 2], [3, 5]])  # 6 experts, 2+ rows each
    routing = Routing(torch.softmax(torch.randn(8, 2, generator=g), -1), idx)
    cache = ExpertCache(stack, 2, torch.device("cpu"))
    counts = torch.bincount(idx.reshape(-1), minlength=E).tolist()
    cache.count(list(range(E)))
    got = _passes(cache, x, stack, routing, ops.experts, list(range(E)), counts)
    assert torch.equal(got, ops.experts(x, stack, routing))
    assert (cache.stats.misses, cache.stats.loads) == (6, 6)
    assert list(cache.slot_of) == [4, 5]  # the last pass's experts, most recently used


def test_a_step_needing_more_experts_than_slots_through_the_hook():
    want, model = tiny_model(), tiny_model()
    offload = offload_experts(model, "cpu", 2, prefetch=False)
    x = torch.randn(5, CONFIG.dim)
    routing = Routing(torch.softmax(torch.randn(5, 2), -1), torch.tensor([[0, 1], [2, 3], [4, 0], [1, 2], [3, 4]]))
    with torch.no_grad():
        got = model.layers[0].moe.dispatch(x, routing)
        expected = want.layers[0].moe.dispatch(x, routing)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    stats = offload.caches[0].stats
    assert (stats.hits, stats.misses, stats.loads, stats.prefetches) == (0, 5, 5, 0)
    assert len(offload.caches[0].slot_of) == 2


def labelled_experts(E: int = 6) -> Experts:
    """Experts whose every weight holds its own index: which expert a slot holds can be read off it."""
    w = torch.arange(E, dtype=torch.float32).view(E, 1, 1)
    return Experts(w.expand(E, 4, 2).clone(), w.expand(E, 2, 4).clone(), w.expand(E, 4, 2).clone())


def held(cache: ExpertCache) -> dict[int, int]:
    """slot -> the expert its weights are (checked against `slot_of`)."""
    in_slots = {s: int(cache.slots.w1[s, 0, 0]) for s in cache.slot_of.values()}
    assert {e: s for s, e in in_slots.items()} == dict(cache.slot_of)
    return in_slots


def test_lru_evicts_the_least_recently_used_expert_the_step_does_not_need():
    source = labelled_experts()
    cache = ExpertCache(source, 3, torch.device("cpu"))

    def step(*needed: int) -> None:
        cache.count(needed)
        cache.make_resident(needed, source)

    step(0, 1)
    step(2)
    assert held(cache) == {0: 0, 1: 1, 2: 2} and list(cache.slot_of) == [0, 1, 2]
    step(0, 3)  # 0 is the least recently used but needed: 1 goes
    assert held(cache) == {0: 0, 1: 3, 2: 2} and list(cache.slot_of) == [2, 0, 3]
    step(4)  # 2 goes
    assert held(cache) == {0: 0, 1: 3, 2: 4}
    step(3, 0)  # hits: 4 becomes the least recently used
    step(5)
    assert held(cache) == {0: 0, 1: 3, 2: 5}
    s = cache.stats
    assert (s.hits, s.misses, s.loads, s.prefetches, s.prefetch_used) == (3, 6, 6, 0, 0)
    assert s.hit_rate == pytest.approx(3 / 9)


def test_prefetch_keeps_what_it_guesses_and_counts_what_the_step_uses():
    source = labelled_experts()
    cache = ExpertCache(source, 3, torch.device("cpu"))
    cache.make_resident([0, 1, 2], source)  # 0 least recently used
    cache.prefetch([0, 4, 5], source)  # 0 stays although it is the oldest; 1 and 2 make room
    assert held(cache) == {0: 0, 1: 4, 2: 5}
    cache.prefetch([3, 4, 5, 1], source)  # the first 3 guesses fit; its own 4 and 5 are never taken for them
    assert held(cache) == {0: 3, 1: 4, 2: 5} and cache.prefetched == {3, 4, 5}
    cache.count([4, 1])  # 4 was prefetched and is used; 1 is a miss
    cache.make_resident([4, 1], source)
    s = cache.stats
    assert (s.hits, s.misses, s.prefetches, s.prefetch_used, s.loads) == (1, 1, 3, 1, 3 + 3 + 1)
    assert cache.prefetched == set()  # a prefetch is for the next step only
    assert held(cache) == {0: 3, 1: 4, 2: 1}  # 5, the least recently used the step did not need, made room


def test_a_right_guess_makes_the_next_layer_all_hits():
    """With the guess replaced by the experts layer 1 really chooses, the prefetch made at layer 0 turns all of
    layer 1's misses into hits, and counts its prefetches as used; the output is the same."""
    want, model = tiny_model(), tiny_model()
    offload = offload_experts(model, "cpu", 2)
    tokens = torch.tensor([[7]])
    want.keep_router_logits = True
    with torch.no_grad():
        expected = want(tokens)
        chosen = torch.topk(want.router_logits[1], CONFIG.top_k, dim=-1).indices
        guessed = offload._guess(0, model.layers[0].ffn_norm(model.embed(tokens)).view(1, -1))
    assert guessed is not None and guessed.shape == (CONFIG.n_experts,) and int(guessed.sum()) == CONFIG.top_k
    right = torch.bincount(chosen.view(-1), minlength=CONFIG.n_experts)
    offload._guess = lambda layer, x: right if layer == 0 else None
    with torch.no_grad():
        got = model(tokens)
    assert torch.equal(got, expected)
    first, second = offload.stats()
    assert (first.misses, first.prefetches) == (2, 0)
    assert (second.hits, second.misses, second.prefetches, second.prefetch_used) == (2, 0, 2, 2)
    assert "total" in offload.summary() and "100.0%" in offload.summary()


def test_the_guess_is_the_next_router_on_the_input_rescaled_to_its_norm():
    model = tiny_model()
    with torch.no_grad():
        for layer in model.layers:
            layer.ffn_norm.weight.uniform_(0.2, 2.0)
    offload = offload_experts(model, "cpu", 2)
    x = torch.randn(64, CONFIG.dim)
    w0, w1 = (layer.ffn_norm.weight for layer in model.layers)
    with torch.no_grad():
        chosen = torch.topk(model.layers[1].moe.gate(x / w0 * w1), CONFIG.top_k, dim=-1).indices
        unscaled = torch.topk(model.layers[1].moe.gate(x), CONFIG.top_k, dim=-1).indices
        guessed = offload._guess(0, x)
    assert not torch.equal(chosen, unscaled)  # (the rescaling matters for these norms)
    assert torch.equal(guessed, torch.bincount(chosen.view(-1), minlength=CONFIG.n_experts))
    assert offload._guess(1, x) is None  # no layer after the last


def test_changed_weights_are_copied_again():
    """The slots copy the CPU experts: after a change that bumps the model's version (LoRA, loading), what they
    hold is dropped and the new weights are used."""
    want, model = tiny_model(), tiny_model()
    offload_experts(model, "cpu", 8)
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        model(tokens)
        for m in (want, model):
            m.layers[1].moe.w2.mul_(3.0)
            m.version += 1
        assert torch.equal(model(tokens), want(tokens))


def test_offloading_refuses_what_it_cannot_do():
    model = tiny_model()
    with pytest.raises(ValueError, match="between top_k=2"):
        offload_experts(model, "cpu", 1)
    with pytest.raises(ValueError, match="n_experts=8"):
        offload_experts(model, "cpu", 9)
    offload_experts(model, "cpu", 4)
    with pytest.raises(ValueError, match="already replaced"):
        offload_experts(model, "cpu", 4)


# ---- the budget ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_budget_gives_the_slots_that_fit(quantize):
    model = tiny_model(torch.bfloat16 if quantize else torch.float32, quantize)
    D, F, L, E = CONFIG.dim, CONFIG.hidden_dim, CONFIG.n_layers, CONFIG.n_experts
    one = 3 * F * D * 4 if quantize is None else 3 * F * D + (2 * F + D) * 2  # int8 q + bf16 scales per row
    assert expert_bytes(model) == one
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert non_expert_bytes(model) == total - L * E * one
    reserve = 1000
    fixed = non_expert_bytes(model) + reserve
    assert resident_for_budget(model, fixed + 3 * L * one, reserve) == 3
    assert resident_for_budget(model, fixed + 4 * L * one - 1, reserve) == 3
    assert resident_for_budget(model, 10**12, reserve) == E
    need = fixed + 2 * L * one
    assert resident_for_budget(model, need, reserve) == 2
    with pytest.raises(ValueError, match=f"{need} bytes"):
        resident_for_budget(model, need - 1, reserve)
    with pytest.raises(ValueError, match="top_k"):
        resident_for_budget(model, 10**9)  # the default reserve alone is 1 GiB and more


def test_quantized_slots_are_quantized_weights_of_the_same_format():
    model = tiny_model(torch.bfloat16, "int4")
    offload = offload_experts(model, "cpu", 3)
    slots = offload.caches[0].slots
    assert isinstance(slots.w1, QuantizedWeight) and slots.w1.mode == "int4" and slots.w1.group_size == 64
    assert tuple(slots.w1.shape) == (3, CONFIG.hidden_dim, CONFIG.dim)
    assert tuple(slots.w2.blocks.shape[1:]) == tuple(model.layers[0].moe.w2.blocks.shape[1:])


# ---- the CLI -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("offload") / "tiny"
    assert mixtral.cli.main(["init", "--preset", "tiny", "--out", str(path), "--seed", "3"]) == 0
    return path


def test_cli_offloaded_generation_is_the_same_text(ckpt, capsys):
    args = ["generate", "--checkpoint", str(ckpt), "--prompt", "The capital of France is", "--max-new-tokens", "10"]
    capsys.readouterr()
    assert mixtral.cli.main(args) == 0
    plain = capsys.readouterr().out
    assert mixtral.cli.main([*args, "--resident-experts", "2"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "experts offloaded: 2 of 8 per layer on cpu" in out.err
    assert "mixtral: expert cache: " in out.err and "experts copied in" in out.err  # the counters after the timings
    assert mixtral.cli.main([*args, "--gpu-memory", "2"]) == 0  # a 1 GiB reserve, then every expert fits
    out = capsys.readouterr()
    assert out.out == plain and "8 of 8 per layer" in out.err


def test_cli_offloading_errors(ckpt, capsys):
    base = ["generate", "--checkpoint", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "2"]
    assert mixtral.cli.main([*base, "--gpu-memory", "24", "--ep", "2"]) == 2
    assert "do not combine with --ep/--tp" in capsys.readouterr().err
    assert mixtral.cli.main([*base, "--gpu-memory", "1"]) == 2
    err = capsys.readouterr().err
    assert "--gpu-memory 1:" in err and "bytes) in all" in err
    assert mixtral.cli.main([*base, "--resident-experts", "1"]) == 2
    assert "between top_k=2" in capsys.readouterr().err
    assert mixtral.cli.main([*base, "--resident-experts", "2", "--lora", str(ckpt)]) == 2
    assert "--lora does not combine with --gpu-memory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mixtral.cli.main([*base, "--gpu-memory", "24", "--resident-experts", "2"])
    assert "not allowed with argument" in capsys.readouterr().err
