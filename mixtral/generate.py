"""Generation as small functions: prefill, decode one step, sample; and the batched, streaming loop that
strings them together.

- `prefill` runs prompts (in chunks) through the model into their cache rows, returning the logits of
  each prompt's last token;
- `decode_step` feeds one token per sequence, each at its own position;
- `sample` picks the next token of one sequence under its `SamplingParams` and its own RNG, so a seeded
  sequence gives the same output alone or in a batch;
- `generate_stream` / `generate` run a batch of prompts to completion; each sequence stops on its own
  (EOS, a stop string, max_new_tokens), and text is streamed piece by piece.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .cache import CacheRows, KVCache
from .kernels import cpu_step
from .model import Block, RMSNorm, Transformer


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 is greedy; the filters apply in the order
    repetition penalty, presence/frequency penalties, temperature, top-k, top-p, min-p."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; >1 discourages tokens already in the prompt or output
    # OpenAI's penalties, on generated tokens only: logit -= presence * (count > 0) + frequency * count
    presence_penalty: float = 0.0  # 0: off; in [-2, 2]
    frequency_penalty: float = 0.0  # 0: off; in [-2, 2]
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends when the text contains one; it is not part of the output

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", _finite(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 turns it off)"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("min_p", _finite(self.min_p) and 0 <= self.min_p <= 1, "a number in [0, 1]"),
            ("repetition_penalty", _finite(self.repetition_penalty) and self.repetition_penalty > 0, "a number > 0"),
            ("presence_penalty", _penalty(self.presence_penalty), "a number in [-2, 2]"),
            ("frequency_penalty", _penalty(self.frequency_penalty), "a number in [-2, 2]"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer or None"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
        ]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {valid}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _penalty(x: object) -> bool:
    return _finite(x) and -2 <= x <= 2  # type: ignore[operator]


# ---- sampling -------------------------------------------------------------------------------------------


def process_logits(
    logits_V: torch.Tensor, params: SamplingParams, history: torch.Tensor, prompt_len: int = 0
) -> torch.Tensor:
    """Apply the penalties and filters; removed tokens get -inf. `history` holds the ids seen so far, the
    first `prompt_len` of them the prompt: the repetition penalty counts them all, the presence and
    frequency penalties only the generated ones (as OpenAI's do)."""
    logits = logits_V.float().clone()
    if params.repetition_penalty != 1.0 and history.numel():
        seen = logits[history]
        logits[history] = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
    generated = history[prompt_len:]
    if (params.presence_penalty or params.frequency_penalty) and generated.numel():
        counts = torch.bincount(generated, minlength=logits.numel()).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    if params.greedy:
        return logits
    logits /= params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits[logits < kth] = -math.inf
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits[order[drop]] = -math.inf
    if params.min_p > 0.0:
        probs = torch.softmax(logits, -1)
        logits[probs < params.min_p * probs.max()] = -math.inf
    return logits


def sample(
    logits_V: torch.Tensor,
    params: SamplingParams,
    history: torch.Tensor,
    generator: torch.Generator | None,
    prompt_len: int = 0,
) -> int:
    """The next token for one sequence (`history` and `prompt_len` as in `process_logits`)."""
    logits = process_logits(logits_V, params, history, prompt_len)
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def logprobs(logits_V: torch.Tensor, token: int, top_n: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` and the `top_n` most likely (id, log-probability) pairs, best first,
    under the model's own distribution (the raw logits: before penalties, temperature and filters)."""
    logp = torch.log_softmax(logits_V.float(), -1)
    top: list[tuple[int, float]] = []
    if top_n > 0:
        values, ids = torch.topk(logp, min(top_n, logp.numel()))
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return float(logp[token]), top


# ---- compiling the model --------------------------------------------------------------------------------------

_COMPILER_OK: bool | None = None


def compile_available() -> bool:
    """Whether torch.compile works here: on a CPU, inductor builds C++ with the system compiler, so a tiny
    function is compiled and run once (caches off, so a broken compiler cannot hide behind a cached build)."""
    global _COMPILER_OK
    if _COMPILER_OK is None:
        import warnings

        try:
            import torch._inductor.config as inductor_config

            with inductor_config.patch(fx_graph_cache=False, autotune_local_cache=False):
                fn = torch.compile(lambda a: torch.nn.functional.silu(a) * 2.0 + 1.0, fullgraph=True, dynamic=False)
                a = torch.randn(8)
                _COMPILER_OK = bool(torch.allclose(fn(a), torch.nn.functional.silu(a) * 2.0 + 1.0))
        except Exception as e:  # any failure (no compiler, no headers, unsupported platform) means eager
            warnings.warn(f"torch.compile is unavailable here ({type(e).__name__}); running eagerly", stacklevel=2)
            _COMPILER_OK = False
        finally:
            torch._dynamo.reset()
    return _COMPILER_OK


def _keep_eager() -> None:
    """Mark the expert dispatch and the cache update to stay eager inside compiled blocks. Done here, on the
    first compile, not where they are defined: `torch.compiler.disable` imports dynamo (and sympy), ~150 MB
    of memory that a process that never compiles should not carry."""
    from .cache import KVCache
    from .moe import MoE

    for cls, name in ((MoE, "dispatch"), (KVCache, "_update")):
        fn = getattr(cls, name)
        if not getattr(fn, "_mixtral_eager", False):
            eager = torch.compiler.disable(fn)
            eager._mixtral_eager = True
            setattr(cls, name, eager)


def compile_model(model: Transformer) -> bool:
    """Compile each block's forward with torch.compile where it works; returns whether it did.

    The expert dispatch (`MoE.dispatch`) and the cache update (`KVCache._update`) are marked to stay
    eager (they read a few ids on the host and index by them: a graph break either way), so the compiled
    regions are the attention and routing around them: norms, projections, rotary embedding, softmax and
    the residual adds fused into few kernels: it pays at prefill, not at decode, and costs a compile per
    process (docs/performance.md has the figures). Without a working compiler the model stays eager and
    computes the same function."""
    if getattr(model, "compiled", False):
        return True
    if not compile_available():
        return False
    _keep_eager()
    # One compiled entry per (block, prefill/decode shape): more than dynamo's default of 8 cache entries.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 8 * len(model.layers))
    for layer in model.layers:  # (the fused one-token CPU step, `decode_step`, runs outside them: nothing to compile)
        layer.forward = torch.compile(layer.forward, dynamic=False)
    model.compiled = True
    return True


# ---- model steps ------------------------------------------------------------------------------------------


@torch.no_grad()
def prefill(
    model: Transformer, cache: KVCache | CacheRows, prompts: Sequence[Sequence[int]], chunk_size: int = 512
) -> torch.Tensor:
    """Run prompts through the model into the cache (in chunks of `chunk_size` tokens), starting at
    position 0; returns the logits of each prompt's last token [n, V] (float32)."""
    device = model.embed.weight.device
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    tokens = torch.zeros((len(prompts), longest), dtype=torch.long)
    positions = torch.full((len(prompts), longest), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        positions[i, : len(p)] = torch.arange(len(p))
    last = torch.empty((len(prompts), model.config.vocab_size), dtype=torch.float32, device=device)
    for start in range(0, longest, chunk_size):
        end = min(start + chunk_size, longest)
        ending = [(i, n - 1 - start) for i, n in enumerate(lengths) if start < n <= end]  # last tokens here
        at = torch.tensor(ending, dtype=torch.long, device=device).view(-1, 2)
        logits = model(
            tokens[:, start:end].to(device), positions=positions[:, start:end].to(device), cache=cache, logits_at=at
        )
        if ending:
            last[at[:, 0]] = logits.float()
    return last


@torch.no_grad()
def decode_step(model: Transformer, cache: KVCache, tokens_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
    """One new token per sequence, each at its own position (-1: an idle row); returns logits [B, V].

    One sequence in a bf16 `KVCache` on a CPU takes the fused one-call step (`kernels/cpu_step.py`) where it can
    run: the same logits as the model's code, which runs everywhere else."""
    step = _fused_step(model, cache, tokens_B)
    if step is not None and int(pos_B) >= 0:
        logits, router_LBE = step(int(tokens_B), int(pos_B), cache)
        if model.keep_router_logits:
            model.router_logits = list(router_LBE.unbind(0))
        return logits[:, 0].float()
    device = model.embed.weight.device
    logits = model(tokens_B.view(-1, 1).to(device), positions=pos_B.view(-1, 1).to(device), cache=cache)
    return logits[:, 0].float()


def _fused_step(model: Transformer, cache: KVCache, tokens_B: torch.Tensor) -> cpu_step.Step | None:
    """The fused one-token step for this call, or None: one token of a one-row bf16 `KVCache` on a CPU, gradients
    off, and a step the model allows now (`cpu_step.plan`)."""
    if tokens_B.numel() != 1 or type(cache) is not KVCache or cache.batch_size != 1 or torch.is_grad_enabled():
        return None
    if tokens_B.device.type != "cpu" or cache.k[0].dtype != torch.bfloat16:
        return None
    return cpu_step.plan(model, Block, RMSNorm)


# ---- streaming text ----------------------------------------------------------------------------------------


class TextStream:
    """Turns one sequence's generated ids into text pieces that concatenate to exactly its final text.

    Text is decoded together with a few prompt tokens so that the first piece gets its leading space
    right (sentencepiece drops it at the start of a decode); a piece is held back while it ends in an
    incomplete UTF-8 character (byte-fallback tokens) or could be the start of a stop string.
    """

    def __init__(self, tokenizer, prompt: Sequence[int], stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.context = list(prompt[-4:])
        self.base = tokenizer.decode(self.context)
        self.ids: list[int] = []
        self.stop = tuple(stop)
        self.text = ""  # the decoded continuation so far
        self.sent = 0  # characters of `text` already given out
        self.stopped = False

    def _decode(self) -> str:
        full = self.tokenizer.decode(self.context + self.ids)
        if full.startswith(self.base):
            return full[len(self.base) :]
        return self.tokenizer.decode(self.ids)  # the context decodes differently with the new ids attached

    def push(self, token: int) -> str:
        """Add a token; return the text that is now certain (maybe empty). Sets `stopped` on a stop string."""
        self.ids.append(token)
        text = self._decode()
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its other bytes
            return ""
        self.text = text
        for s in self.stop:
            at = text.find(s)
            if at != -1:
                self.stopped = True
                self.text = text[:at]
        if self.stopped:
            return self._take(len(self.text))
        hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return self._take(len(text) - hold)

    def finish(self) -> str:
        """The rest of the text, at the end of generation."""
        if not self.stopped:
            self.text = self._decode()
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        end = max(end, self.sent)
        piece = self.text[self.sent : end]
        self.sent = end
        return piece


# ---- the generation loop -------------------------------------------------------------------------------------


@dataclass
class Event:
    """One step of one sequence: the new token, the text it completes, and why the sequence ended (None
    while it goes on). On an EOS the token is the EOS id, which is not part of the output."""

    index: int
    token: int
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"


@dataclass
class _Seq:
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    history: list[int]
    stream: TextStream | None
    out: list[int] = field(default_factory=list)
    done: bool = False


def check_prompts(model: Transformer, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> None:
    """Refuse empty prompts, out-of-vocabulary ids, and prompt + max_new_tokens beyond the context."""
    vocab, context = model.config.vocab_size, model.config.max_seq_len
    if not prompts:
        raise ValueError("no prompts given")
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty (it needs at least one token, e.g. BOS)")
        bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        if len(p) + sp.max_new_tokens > context:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens and max_new_tokens is {sp.max_new_tokens}: together "
                f"{len(p) + sp.max_new_tokens}, more than the model's context of {context} tokens"
            )


def generate_stream(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    *,
    tokenizer=None,
    eos_id: int | None = 2,
    prefill_chunk: int = 512,
) -> Iterator[Event]:
    """Generate for a batch of prompts (token-id lists), yielding an `Event` per new token.

    `params` is one SamplingParams for all prompts or one per prompt. Text pieces and stop strings need
    a `tokenizer`. `eos_id=None` never stops on EOS. The EOS token itself is not part of the output.
    """
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params) != len(prompts):
        raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
    check_prompts(model, prompts, params)
    if tokenizer is None and any(p.stop for p in params):
        raise ValueError("stop strings need a tokenizer to decode the generated text")
    seqs = []
    for p, sp in zip(prompts, params, strict=True):
        gen = None if sp.seed is None else torch.Generator().manual_seed(sp.seed)
        stream = None if tokenizer is None else TextStream(tokenizer, p, sp.stop)
        seqs.append(_Seq(list(p), sp, gen, list(p), stream))
    B = len(seqs)
    total = max(len(s.prompt) + s.params.max_new_tokens for s in seqs)
    dtype = model.embed.weight.dtype
    cache = KVCache(model.config, B, total, dtype=dtype, device=model.embed.weight.device)
    logits = prefill(model, cache, [s.prompt for s in seqs], prefill_chunk).cpu()
    while True:
        next_tokens = torch.zeros(B, dtype=torch.long)
        next_pos = torch.full((B,), -1, dtype=torch.long)
        for i, s in enumerate(seqs):
            if s.done:
                continue
            token = sample(logits[i], s.params, torch.tensor(s.history), s.generator, len(s.prompt))
            if token == eos_id:
                s.done = True
                yield Event(i, token, s.stream.finish() if s.stream else "", "stop")
                continue
            s.out.append(token)
            s.history.append(token)
            text = s.stream.push(token) if s.stream else ""
            if s.stream is not None and s.stream.stopped:
                s.done = True
                yield Event(i, token, text, "stop")
                continue
            if len(s.out) >= s.params.max_new_tokens:
                s.done = True
                yield Event(i, token, text + (s.stream.finish() if s.stream else ""), "length")
                continue
            yield Event(i, token, text)
            next_tokens[i] = token
            next_pos[i] = len(s.history) - 1
        if all(s.done for s in seqs):
            return
        logits = decode_step(model, cache, next_tokens, next_pos).cpu()


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    tokenizer=None,
    eos_id: int | None = 2,
    prefill_chunk: int = 512,
) -> list[list[int]]:
    """Generate for a batch of prompts (token-id lists); returns the new token ids of each prompt.

    Every prompt is sampled with its own generator seeded with `seed`, so a prompt gives the same output
    alone or in a batch. Stop strings need `tokenizer`.
    """
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stop or ()),
    )
    out: list[list[int]] = [[] for _ in prompts]
    for ev in generate_stream(model, prompts, params, tokenizer=tokenizer, eos_id=eos_id, prefill_chunk=prefill_chunk):
        if not (ev.finish_reason == "stop" and ev.token == eos_id):
            out[ev.index].append(ev.token)
    return out
