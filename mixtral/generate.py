"""Generation as small functions: prefill, decode one step, one sequence's step; and the batched, streaming
loop that strings them together.

- `prefill` runs prompts (in chunks) through the model into their cache rows, returning the logits of
  each prompt's last token;
- `decode_step` feeds one token per sequence, each at its own position;
- `SequenceState.step` samples one sequence's next token (sampling.py, under its own seeded generator, so
  a seeded sequence gives the same output alone or in a batch), streams its text and ends it on EOS, a
  stop string or max_new_tokens; the server's scheduler runs its sequences through it too;
- `generate_stream` / `generate` run a batch of prompts to completion; each sequence stops on its own,
  and text is streamed piece by piece;
- `prepare_kernels` builds (once per installed copy) or loads the CPU kernels before anything is timed or
  served, rather than inside the first forward pass; `prepare_for_device` readies a loaded model for its device
  (the MoE dispatch, compilation, CUDA graphs), as the commands run it.

On a GPU a decode step reads nothing back to the host until its logits (`decode_fixed`): the cache's slots and
mask and the expert dispatch stay on the device, and the attention span is known on the host beforehand
(`cache.decode_span`). Such a step is replayed from a CUDA graph (`DecodeGraph`), one per batch size and span.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .cache import CacheRows, KVCache, decode_span
from .kernels import cpu as cpu_kernels
from .kernels import cpu_step
from .model import Block, RMSNorm, Transformer
from .sampling import SamplingParams, TokenLogprob, logprobs, sample

if TYPE_CHECKING:
    from .constrained import Constraint

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
            eager._mixtral_eager, eager._mixtral_original = True, fn
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
    # On a GPU also one per decode step's batch size and attention span (`decode_span`).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32 * len(model.layers))
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
    run: the same logits as the model's code, which runs everywhere else. On other devices, with host-side
    positions, the step runs on the device alone (`decode_fixed`), replayed from a CUDA graph where it can be."""
    device = model.embed.weight.device
    if device.type != "cpu" and type(cache) is KVCache and pos_B.device.type == "cpu":
        span = decode_span(cache, pos_B)
        tokens_B1, pos_B1 = tokens_B.view(-1, 1), pos_B.view(-1, 1)
        graph = _decode_graph(model, cache, span) if device.type == "cuda" else None
        if graph is not None:
            return graph(tokens_B1, pos_B1)
        return decode_fixed(model, cache, tokens_B1.to(device), pos_B1.to(device), span)
    step = _fused_step(model, cache, tokens_B)
    if step is not None and int(pos_B) >= 0:
        logits, router_LBE = step(int(tokens_B), int(pos_B), cache)
        # as `Transformer.forward` leaves them: this step's, or none when they are not kept
        model.router_logits = list(router_LBE.unbind(0)) if model.keep_router_logits else []
        return logits[:, 0].float()
    logits = model(tokens_B.view(-1, 1).to(device), positions=pos_B.view(-1, 1).to(device), cache=cache)
    return logits[:, 0].float()


def decode_fixed(
    model: Transformer, cache: KVCache, tokens_B1: torch.Tensor, pos_B1: torch.Tensor, span: int
) -> torch.Tensor:
    """`decode_step` on the device alone: one token per row of `cache` (tokens and positions [B, 1] on the model's
    device, position -1: an idle row), attending over the first `span` slots (`cache.decode_span`); logits [B, V]
    float32. Nothing is read back to the host and every shape is fixed by (B, span) where the MoE dispatch is
    (`MoE.host_sync_free`): so it compiles as one graph and can be captured in a CUDA graph."""
    logits = model(tokens_B1, positions=pos_B1, cache=cache.fixed(span))
    return logits[:, 0].float()


class DecodeGraph:
    """`decode_fixed` for one cache (its tensors: the rows a view shows), batch size and span, captured in a CUDA
    graph: a step is two small copies and one replay instead of ~30 kernel launches per layer from Python. The
    warm-up runs (lazy initialisation, Triton's compilation) and the capture feed idle rows, which leave the cache
    as it was."""

    def __init__(self, model: Transformer, cache: KVCache, span: int, pool: tuple) -> None:
        device = cache.slot_pos.device
        B = cache.batch_size
        self.tokens_B1 = torch.zeros((B, 1), dtype=torch.long, device=device)
        self.pos_B1 = torch.full((B, 1), -1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                decode_fixed(model, cache, self.tokens_B1, self.pos_B1, span)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits_BV = decode_fixed(model, cache, self.tokens_B1, self.pos_B1, span)

    def __call__(self, tokens_B1: torch.Tensor, pos_B1: torch.Tensor) -> torch.Tensor:
        self.tokens_B1.copy_(tokens_B1)
        self.pos_B1.copy_(pos_B1)
        self.graph.replay()
        return self.logits_BV.clone()  # the graph's buffer is overwritten by its next replay


def graphable(model: Transformer) -> bool:
    """Whether a decode step of `model` can be a CUDA graph: allowed (`model.cuda_graphs`), every MoE dispatch on
    the device alone (`MoE.host_sync_free`), router logits not kept, and no hooks (tensor parallelism's
    collectives, adapters) whose code the graph would not run."""
    if not model.cuda_graphs or model.keep_router_logits:
        return False
    if not all(layer.moe.host_sync_free for layer in model.layers):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _decode_graph(model: Transformer, cache: KVCache, span: int) -> DecodeGraph | None:
    """This step's CUDA graph (captured the first time a batch size and span come), or None: not `graphable`, or
    its capture failed (said once; the step then runs eagerly). Kept with the cache, which the graph writes."""
    if not graphable(model):
        return None
    key = (id(model), model.version, cache.slot_pos.data_ptr(), cache.batch_size, span)
    graph = cache.graphs.get(key)
    if graph is None:
        if "pool" not in cache.graphs:  # one memory pool for all of a cache's graphs: they never run at once
            cache.graphs["pool"] = torch.cuda.graph_pool_handle()
        try:
            graph = DecodeGraph(model, cache, span, cache.graphs["pool"])
        except Exception as e:  # any failure to capture leaves the eager step, which computes the same
            warnings.warn(
                f"decode step not captured in a CUDA graph ({type(e).__name__}: {e}); running eagerly", stacklevel=3
            )
            graph = False
        cache.graphs[key] = graph
    return graph or None


def _fused_step(model: Transformer, cache: KVCache, tokens_B: torch.Tensor) -> cpu_step.Step | None:
    """The fused one-token step for this call, or None: one token of a one-row bf16 `KVCache` on a CPU, gradients
    off, and a step the model allows now (`cpu_step.plan`)."""
    if tokens_B.numel() != 1 or type(cache) is not KVCache or cache.batch_size != 1 or torch.is_grad_enabled():
        return None
    if tokens_B.device.type != "cpu" or cache.k[0].dtype != torch.bfloat16:
        return None
    return cpu_step.plan(model, Block, RMSNorm)


# ---- streaming text ----------------------------------------------------------------------------------------


class _StopMatcher:
    """Where one stop string stands in a text read a character at a time (Knuth-Morris-Pratt): `matched` is
    the longest start of the stop string that the text read so far ends with. Each character costs O(1)
    amortised, whatever the lengths of the text and the stop string."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        # fail[i]: the longest proper prefix of stop[:i + 1] that is also its suffix
        self.fail = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k
        self.matched = 0

    def feed(self, c: str) -> bool:
        """Read one character; True when the text now ends with the whole stop string."""
        stop, k = self.stop, self.matched
        if k == len(stop):
            k = self.fail[k - 1]
        while k and c != stop[k]:
            k = self.fail[k - 1]
        if c == stop[k]:
            k += 1
        self.matched = k
        return k == len(stop)


class TextStream:
    """Turns one sequence's generated ids into text pieces that concatenate to exactly its final text.

    Text is decoded together with a few prompt tokens so that the first piece gets its leading space
    right (sentencepiece drops it at the start of a decode); a piece is held back while it ends in an
    incomplete UTF-8 character (byte-fallback tokens) or could be the start of a stop string. Stop strings
    are looked for in the new characters only (`_StopMatcher`), so a token costs the same however long the
    text or the stop strings are; the text ends where the first stop string to be completed starts.
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
        self._matchers = [_StopMatcher(s) for s in self.stop]
        self._read = 0  # characters of `text` the matchers have read

    def _decode(self) -> str:
        full = self.tokenizer.decode(self.context + self.ids)
        if full.startswith(self.base):
            return full[len(self.base) :]
        return self.tokenizer.decode(self.ids)  # the context decodes differently with the new ids attached

    def push(self, token: int) -> str:
        """Add a token; return the text that is now certain (maybe empty). Sets `stopped` on a stop string."""
        if self.stopped:  # the text ended at the stop string
            return ""
        self.ids.append(token)
        text = self._decode()
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its other bytes
            return ""
        if not self._matchers:
            self.text = text
            return self._take(len(text))
        if not text.startswith(self.text[: self._read]):  # earlier text decoded differently: read it again
            for m in self._matchers:
                m.matched = 0
            self._read = 0
        self.text = text
        for i in range(self._read, len(text)):
            done = [m for m in self._matchers if m.feed(text[i])]
            if done:  # the longest one that ends here starts first
                self.stopped = True
                self.text = text[: i + 1 - max(len(m.stop) for m in done)]
                return self._take(len(self.text))
        self._read = len(text)
        hold = max(m.matched for m in self._matchers)
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


# ---- the kernels ---------------------------------------------------------------------------------------------


def default_moe_impl(device: torch.device | str) -> str:
    """The expert dispatch a model on `device` runs by default: the fused Triton kernel on a CUDA GPU where triton
    is installed (all experts in one launch per projection, nothing read on the host: a decode step can be a CUDA
    graph), else the grouped path (our CPU kernels; the plain PyTorch matmuls elsewhere)."""
    from .kernels.fused_moe import triton_unavailable_reason

    device = torch.device(device)
    if device.type == "cuda" and triton_unavailable_reason(device) is None:
        return "triton"
    return "grouped"


def prepare_for_device(model: Transformer, *, compile: bool = False, cuda_graphs: bool = True) -> None:
    """Ready a loaded single-device model for the device it is on, as generate, chat, serve and bench run it: its
    MoE dispatch (`default_moe_impl`), torch.compile of its blocks (`compile_model`, any device) when asked,
    whether decode steps may be CUDA graphs on a GPU, and its CPU kernels built (`prepare_kernels`)."""
    model.set_moe_impl(default_moe_impl(model.embed.weight.device))
    model.cuda_graphs = cuda_graphs
    if compile:
        compile_model(model)
    prepare_kernels(model)


def prepare_kernels(model: Transformer) -> None:
    """Build (the first time in an installed copy: a minute or two) or load the CPU kernels `model` runs on,
    now rather than inside its first forward pass: so that the build is not counted as a prompt's time, and
    a server is ready only once they are. The kernels' module says when it builds, how long that took, and
    why they cannot run where they cannot."""
    if model.embed.weight.device.type == "cpu":
        cpu_kernels.ops()


# ---- one sequence ------------------------------------------------------------------------------------------


@dataclass
class Event:
    """One step of one sequence: the new token, the text it completes, and why the sequence ended (None
    while it goes on). On an EOS the token is the EOS id (and `eos` is set), which is not part of the
    output. The server also sends events without a token: a sequence cut by an `error`."""

    index: int
    token: int | None
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
    logprob: TokenLogprob | None = None  # when asked for (`top_logprobs`), on every token but an EOS
    # The server's: the prompt tokens' logprobs (None for the first, which nothing predicts), on a sequence's first
    # event, when its request asks for them (echo with logprobs, prompt_logprobs)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None
    eos: bool = False

    @property
    def generated(self) -> bool:
        """Whether this event adds a token to the output."""
        return self.token is not None and not self.eos


class SequenceState:
    """One sequence being generated: its prompt, `SamplingParams` and own seeded generator, the tokens so
    far and its text stream. `step` samples the next token from the sequence's logits and says what
    happened as an `Event`: the sequence ends on the EOS token (`eos_id`; None: never), a stop string
    (which needs a `tokenizer`) or `max_new_tokens`. The batched loop below and the server's scheduler
    both run their sequences through it."""

    def __init__(
        self,
        index: int,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        tokenizer=None,
        eos_id: int | None = None,
        top_logprobs: int | None = None,
        constraint: Constraint | None = None,
    ) -> None:
        self.index = index
        self.prompt = list(prompt)
        self.constraint = constraint  # a grammar the output must follow (constrained.py): its mask, then its step
        self.params = params
        self.eos_id = None if params.ignore_eos else eos_id
        self.stop_ids = frozenset(params.stop_token_ids)
        # what cannot be sampled before min_tokens: the tokens that would end the sequence
        self._enders = sorted({t for t in (eos_id, *params.stop_token_ids) if t is not None})
        self.top_logprobs = top_logprobs  # None: no logprobs; k: the chosen token's and the k most likely
        self.generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        self.stream = None if tokenizer is None else TextStream(tokenizer, self.prompt, params.stop)
        self.history = list(self.prompt)  # the prompt, then every generated token (an EOS is not one)
        self.n_out = 0  # generated tokens
        self.done = False

    @property
    def position(self) -> int:
        """The position of the newest token: the one to feed to the model next."""
        return len(self.history) - 1

    def allowed(self, logits_V: torch.Tensor, masked: bool = False) -> torch.Tensor:
        """`logits_V` with the tokens that would end the sequence (EOS, stop_token_ids) at -inf while fewer than
        `min_tokens` have been generated, and those the sequence's grammar does not allow next at -inf (a copy then;
        else `logits_V` itself): what to sample from. `masked`: the grammar's mask is applied already
        (`constrained.mask_rows`, a batch's rows at once)."""
        if self.constraint is not None and not masked:
            logits_V = self.constraint.mask(logits_V).to(logits_V.dtype)
        if self.n_out >= self.params.min_tokens or not self._enders:
            return logits_V
        out = logits_V.clone()
        out[[t for t in self._enders if t < out.shape[-1]]] = float("-inf")
        return out

    def step(self, logits_V: torch.Tensor, token: int | None = None) -> Event:
        """Sample the next token from `logits_V` (this sequence's, for its next position; `allowed` applied here)
        and take it; or take `token`, sampled already from `allowed(logits_V)` (by `sampling.sample_batch`, with
        this sequence's generator)."""
        if token is None:
            history = torch.tensor(self.history, dtype=torch.long)
            token = sample(self.allowed(logits_V), self.params, history, self.generator, len(self.prompt))
        if self.constraint is not None:
            self.constraint.accept(token)
        if token == self.eos_id or token in self.stop_ids:
            self.done = True
            return Event(self.index, token, self._rest(), "stop", eos=True)
        lp = None
        if self.top_logprobs is not None:
            lp = TokenLogprob(token, *logprobs(logits_V, token, self.top_logprobs))
        self.history.append(token)
        self.n_out += 1
        text = self.stream.push(token) if self.stream is not None else ""
        if self.stream is not None and self.stream.stopped:
            reason = "stop"
        elif self.n_out >= self.params.max_new_tokens:
            reason, text = "length", text + self._rest()
        else:
            return Event(self.index, token, text, logprob=lp)
        self.done = True
        return Event(self.index, token, text, reason, lp)

    def _rest(self) -> str:
        return self.stream.finish() if self.stream is not None else ""


# ---- the generation loop -------------------------------------------------------------------------------------


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
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),  # noqa: B008 - frozen: safe to share
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
    seqs = [
        SequenceState(i, p, sp, tokenizer=tokenizer, eos_id=eos_id)
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
    ]
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
            event = s.step(logits[i])
            yield event
            if not s.done:
                next_tokens[i] = event.token
                next_pos[i] = s.position
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
        if ev.generated:
            out[ev.index].append(ev.token)
    return out
