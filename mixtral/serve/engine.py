"""Continuous batching: one scheduler thread owns the model and its KV cache.

Each sequence (one choice of one request) holds a row of a KV cache made once for `max_batch` rows.
Every turn of the loop:

1. admits waiting sequences into free rows and drops cancelled ones (their rows are freed);
2. prefills: runs one prompt chunk of the sequences still reading their prompt, within a token budget per
   turn: `prefill_chunk` tokens while nothing decodes, `prefill_budget` while some sequences do (a turn's
   prefill holds every running stream for its length: this bounds their inter-token time). The oldest
   waiting prompt's chunk runs in every turn, whatever its size, so a prompt never starves;
3. samples the next token of every sequence whose logits are fresh, in one batch (`sample_batch`: each
   under its own `SamplingParams` and its own seeded generator, the tokens `sample` gives one by one), and
   hands the text to its request (one `SequenceState.step`, as in `generate_stream`: the same
   end-of-sequence, stop-string and length rules);
4. runs one `decode_step` over the decoding sequences only: they are first moved into the first rows of
   the cache (a row swap when one ends or a prompt is done, none otherwise), and the step spans those rows,
   each sequence at its own position. A lone sequence decodes at batch 1, with the fused one-token step.

A sequence's numbers do not depend on what else runs: its prompt is prefilled alone in its row, in
chunks whose bounds depend only on its own length, a decode step computes each row's token from that
row's keys and values alone, and its sampling uses only its own logits, history and generator.

The model work itself goes through a `Steps` object (steps.py): on one process it runs here; under
torchrun it is broadcast to the other ranks first, so that every rank runs the same forward passes.

Requests live on the asyncio side: the scheduler posts `Event`s to a request's queue with
`call_soon_threadsafe`; the HTTP layer reads them with `Request.events()`.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..cache import KVCache, PagedKVCache
from ..constrained import Constraint, mask_rows
from ..generate import Event, SequenceState, prepare_kernels
from ..model import Transformer
from ..sampling import SamplingParams, TokenLogprob, prompt_logprobs, sample_batch
from ..tokenizer import Tokenizer
from .adapters import AdapterBank
from .steps import HEARTBEAT, Steps

log = logging.getLogger("mixtral.serve")

Loader = Callable[[], tuple[Transformer, Tokenizer]]
StepsFactory = Callable[[Transformer, KVCache | PagedKVCache], Steps]

BLOCK_SIZE = 16  # positions per KV block: a shared prefix is reused in whole blocks; a sequence wastes < 1 block


def make_cache(
    model: Transformer,
    rows: int,
    context: int,
    *,
    kv_cache_tokens: int | None = None,
    paged: bool = True,
    prefix_caching: bool = True,
    block_size: int = BLOCK_SIZE,
) -> KVCache | PagedKVCache:
    """The serving KV cache for `rows` sequences of at most `context` positions: paged (a pool of `kv_cache_tokens`
    positions in blocks; default: min(rows, 8) x context, what 8 rows of a `KVCache` held before, at least one whole
    context so that any request fits), or with `paged` False a `KVCache` of rows x context allocated up front."""
    weight = model.embed.weight
    if not paged:
        return KVCache(model.config, rows, context, dtype=weight.dtype, device=weight.device)
    tokens = min(rows, 8) * context if kv_cache_tokens is None else kv_cache_tokens
    if tokens < context:
        raise ValueError(f"a KV cache of {tokens} tokens cannot hold one sequence of {context} (the context)")
    n_blocks = -(-tokens // block_size)
    return PagedKVCache(
        model.config,
        rows,
        n_blocks,
        block_size=block_size,
        prefix_caching=prefix_caching,
        dtype=weight.dtype,
        device=weight.device,
    )


SHUTDOWN_MESSAGE = "the server is shutting down"  # also the error of sequences cut by a shutdown
# Why requests are refused, by engine state.
UNAVAILABLE = {
    "loading": "the model is still loading; try again shortly",
    "failed": "the model is not available (it failed to load, or the scheduler failed: see the server log)",
    "draining": SHUTDOWN_MESSAGE,
    "stopped": SHUTDOWN_MESSAGE,
}


class Unavailable(Exception):
    """The engine cannot take requests now (still loading, failed to load, or shutting down)."""


class QueueFull(Exception):
    """Every cache row is busy and the waiting queue is full."""


class Request:
    """One HTTP request: one or more sequences (choices), and the queue their events arrive on."""

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        top_logprobs: int | None,
        loop: asyncio.AbstractEventLoop,
        *,
        prompt_logprobs: int | None = None,
        prompt_only: bool = False,
        adapter: str | None = None,
        constraints: Sequence[Constraint | None] | None = None,
    ) -> None:
        if len(prompts) != len(params) or not prompts:
            raise ValueError(f"{len(prompts)} prompts for {len(params)} SamplingParams")
        self.prompts = [list(p) for p in prompts]
        self.params = list(params)
        self.top_logprobs = top_logprobs  # None: no logprobs; k: the chosen token's and the k most likely
        # The prompt tokens' logprobs too (the logits of every prompt position): None: not computed (the fast
        # prefill, which computes the last position's alone); k: each token's, its rank and the k most likely.
        self.prompt_logprobs = prompt_logprobs
        self.prompt_only = prompt_only  # the prompt prefilled (for its logprobs), nothing generated (max_tokens 0)
        self.adapter = adapter  # the LoRA adapter's name (`Engine(adapters=)`), None: the base model
        self.constraints = list(constraints or [None] * len(prompts))  # each sequence's grammar, if any
        self.cancelled = False
        self.engine: Engine | None = None
        # Scheduler side: how it ended ("completed", "cancelled", "error", "aborted").
        self.outcome: str | None = None
        self.ended = False
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._open = len(prompts)  # sequences that have not sent their last event (asyncio side)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def done(self) -> bool:
        return self._open == 0

    def _post(self, event: Event) -> None:
        """Called by the scheduler thread."""
        if self.cancelled:
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            if self.engine is not None:
                self.engine.cancel(self)

    async def events(self) -> AsyncIterator[Event]:
        """Every event of every sequence, until each has finished (or failed)."""
        while self._open:
            event = await self._queue.get()
            if event.finish_reason is not None or event.error is not None:
                self._open -= 1
            yield event

    def cancel(self) -> None:
        """Stop generating (the client went away); frees the request's cache rows. Idempotent."""
        if not self.done and not self.cancelled and self.engine is not None:
            self.engine.cancel(self)


class _Seq(SequenceState):
    """One sequence (choice) of a request in the scheduler: its state as in `generate_stream` (the index is
    the choice's index within its request), and where it is in the cache."""

    def __init__(self, request: Request, index: int, prompt: list[int], params: SamplingParams, tokenizer) -> None:
        super().__init__(
            index,
            prompt,
            params,
            tokenizer=tokenizer,
            eos_id=tokenizer.eos_id,
            top_logprobs=request.top_logprobs,
            constraint=request.constraints[index],
        )
        self.request = request
        self.row = -1
        self.prefilled = 0  # prompt tokens already in the cache
        self.logits: torch.Tensor | None = None  # [V] for the next token, when fresh
        self.next_token: int | None = None  # to feed at the next decode step
        self.adapter: int | None = None  # its LoRA adapter's slot in the engine's `AdapterBank`; None: the base model
        # the prompt's logprobs as its chunks are prefilled (the first token has none), until the first event
        self.prompt_lps: list[TokenLogprob | None] | None = None if request.prompt_logprobs is None else [None]
        self.matched = False  # its prompt looked up in the prefix cache (`Steps.prefix`)
        self.cached = 0  # prompt tokens it found there


@dataclass
class Stats:
    """Counters and gauges for /metrics (written by the scheduler thread, read by the HTTP side)."""

    requests_accepted: int = 0
    requests_rejected: int = 0  # queue full
    requests_finished: collections.Counter = field(default_factory=collections.Counter)  # by outcome
    prompt_tokens: int = 0
    generation_tokens: int = 0
    decode_steps: int = 0
    prefill_chunks: int = 0
    waiting: int = 0
    running: int = 0
    rows_free: int = 0
    kv_blocks_used: int = 0  # paged cache: blocks held by sequences
    kv_blocks_cached: int = 0  # ... held by nobody, kept for prefix caching
    kv_blocks_total: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # ... and found there (not computed again)


class Engine:
    """Owns the model; serves `Request`s with continuous batching on its own thread.

    `load` builds (model, tokenizer) on that thread, and the CPU kernels are built or loaded after it, so
    an HTTP server can answer /health (503, "loading") until both are done. `max_batch` rows are decoded
    together; at most `max_queue` more sequences wait for a row. `steps` wraps the model and its cache
    (`LockstepSteps` under torchrun). With lock-step steps a failed forward pass is fatal (the other ranks
    cannot be brought back in step): the engine fails and calls `on_failure`, and the process should exit
    so that torchrun ends the others.
    """

    def __init__(
        self,
        load: Loader,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        prefill_budget: int = 256,
        steps: StepsFactory = Steps,
        paged: bool = True,
        kv_cache_tokens: int | None = None,
        prefix_caching: bool = True,
        adapters: Mapping[str, str] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} is invalid: must be >= 1")
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue} is invalid: must be >= 0")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk} is invalid: must be >= 1")
        if prefill_budget < 1:
            raise ValueError(f"prefill_budget={prefill_budget} is invalid: must be >= 1")
        self._load = load
        self._make_steps = steps
        # LoRA adapters {name: folder}, read once the model is loaded; requests pick one by name (`Request.adapter`)
        self.adapter_paths = dict(adapters or {})
        self.adapters: AdapterBank | None = None
        self._steps: Steps | None = None
        self.closed = False  # the scheduler ended normally (and told the other ranks, under torchrun)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk, self.prefill_budget = prefill_chunk, prefill_budget
        self.paged, self.kv_cache_tokens, self.prefix_caching = paged, kv_cache_tokens, prefix_caching
        self._max_seq_len = max_seq_len
        self.state = "loading"  # -> ready -> draining -> stopped; or loading -> failed
        self.load_error: BaseException | None = None
        self.model: Transformer | None = None
        self.tokenizer: Tokenizer | None = None
        self.context_len = 0  # tokens per sequence (prompt + completion) the cache holds
        self.stats = Stats(rows_free=max_batch)
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: list[_Seq] = []
        self._rows: list[_Seq | None] = [None] * max_batch  # who holds each cache row
        self._cancelled: set[Request] = set()
        self._deadline: float | None = None  # when draining: abort what is left at this time
        self._stopping = False
        self._thread: threading.Thread | None = None
        # (time, generation_tokens) after each step, for tokens_per_second; a minute of them
        self._rate: collections.deque[tuple[float, int]] = collections.deque([(time.monotonic(), 0)])
        # Called on the scheduler thread when loading fails, or when the scheduler fails with lock-step steps.
        self.on_failure: Callable[[BaseException], None] | None = None
        self.on_ready: Callable[[], None] | None = None  # likewise

    # ---- the asyncio side -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="mixtral-scheduler", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue a request; raises `Unavailable` or `QueueFull`."""
        with self._cond:
            if self.state != "ready":
                raise Unavailable(UNAVAILABLE[self.state])
            busy = len(self._running) + len(self._waiting)
            if busy + len(request) > self.max_batch + self.max_queue:
                self.stats.requests_rejected += 1
                raise QueueFull(
                    f"the server is busy: {len(self._running)} sequences running and {len(self._waiting)} "
                    f"waiting (--max-batch {self.max_batch}, --max-queue {self.max_queue})"
                )
            slot = None
            if request.adapter is not None:
                if self.adapters is None:
                    raise ValueError(f"no LoRA adapter named {request.adapter!r}: this engine serves none")
                slot = self.adapters.index(request.adapter)
            request.engine = self
            for i, (prompt, params) in enumerate(zip(request.prompts, request.params, strict=True)):
                self._waiting.append(_Seq(request, i, prompt, params, self.tokenizer))
                self._waiting[-1].adapter = slot
            self.stats.requests_accepted += 1
            self.stats.waiting = len(self._waiting)
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        with self._cond:
            request.cancelled = True
            self._cancelled.add(request)
            self._cond.notify()

    def drain(self, timeout: float) -> None:
        """Refuse new requests; let those in flight finish, aborting what is left after `timeout` s."""
        with self._cond:
            if self.state in ("ready", "loading"):
                self.state = "draining"
            self._deadline = time.monotonic() + timeout
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything still in flight and end the scheduler thread."""
        with self._cond:
            self._stopping = True
            if self.state != "failed":
                self.state = "stopped"
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def kv_cache_description(self) -> str:
        cache = self._steps.cache if self._steps is not None else None
        if isinstance(cache, PagedKVCache):
            prefix = "on" if cache.prefix_caching else "off"
            return (
                f"paged: {cache.n_blocks} blocks of {cache.block_size} tokens for up to {self.max_batch} sequences "
                f"of {self.context_len} tokens; prefix caching {prefix}"
            )
        return f"{self.max_batch} rows x {self.context_len} tokens"

    @property
    def idle(self) -> bool:
        return not self._running and not self._waiting

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last `window` seconds (or since the start, if sooner)."""
        now = time.monotonic()
        samples = list(self._rate)  # (time, generation_tokens), oldest first; the first is older than any window
        start_t, start_n = samples[0]
        for t, n in samples:
            if t > now - window:
                break
            start_t, start_n = t, n
        elapsed = now - max(start_t, now - window)
        return (self.stats.generation_tokens - start_n) / elapsed if elapsed > 0 else 0.0

    # ---- the scheduler thread ---------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            model, tokenizer = self._load()
            adapters = AdapterBank.load(model, self.adapter_paths) if self.adapter_paths else None
            prepare_kernels(model)  # "loading" until they are built: the first request does not wait for them
            context = model.config.max_seq_len if self._max_seq_len is None else self._max_seq_len
            if context > model.config.max_seq_len:
                raise ValueError(
                    f"max_seq_len={context} is more than the model's context of {model.config.max_seq_len} tokens"
                )
            cache = make_cache(
                model,
                self.max_batch,
                context,
                kv_cache_tokens=self.kv_cache_tokens,
                paged=self.paged,
                prefix_caching=self.prefix_caching,
            )
            self._steps = self._make_steps(model, cache)
        except Exception as e:  # reported to the server, which exits with this message
            with self._cond:
                self.state = "failed"
                self.load_error = e
            log.error("loading the model failed: %s", e)
            if self.on_failure is not None:
                self.on_failure(e)
            return
        with self._cond:
            self.model, self.tokenizer, self.context_len = model, tokenizer, context
            self.adapters = adapters
            if self.state == "loading":
                self.state = "ready"
        if self.on_ready is not None:
            self.on_ready()
        try:
            self._loop()
        except Exception as e:  # a bug, or a failed lock-step: say so everywhere rather than leave requests hanging
            self._use_adapters([])
            log.error("the scheduler failed:\n%s", traceback.format_exc())
            with self._cond:
                self.state = "failed"
                self._abort_all("the server failed (see its log)")
            if self.on_failure is not None:
                self.on_failure(e)
            return
        self._use_adapters([])  # the model as it was loaded: no adapter hooks left on it
        self._steps.close()  # after a failure the other ranks may be inside a collective: no stop for them
        self.closed = True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._running or self._stopping or self._cancelled):
                    if self._deadline_passed():
                        break
                    self._steps.idle()
                    timeout = 0.5 if self._deadline is not None else HEARTBEAT if self._steps.lockstep else None
                    self._cond.wait(timeout=timeout)
                if self._stopping or self._deadline_passed():
                    self._abort_all(SHUTDOWN_MESSAGE)
                    self._deadline = None  # nothing is left to wait for: new requests are refused
                    if self._stopping:
                        return
                    continue
                self._drop_cancelled()
                self._admit()
            try:
                self._step()
            except Exception as e:  # a failed forward pass: fail the running sequences, keep serving
                if self._steps.lockstep:
                    raise
                log.error("generation failed:\n%s", traceback.format_exc())
                with self._cond:
                    for s in list(self._running):
                        error = f"generation failed: {type(e).__name__}: {e}"
                        self._finish(s, Event(s.index, None, error=error), "error")
                    self._steps.reset()

    def _deadline_passed(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _admit(self) -> None:
        # In arrival order: while the first waiting sequence does not fit the cache, the others wait behind it.
        while self._waiting and None in self._rows:
            s = self._waiting[0]
            reuse = s.request.prompt_logprobs is None  # else every prompt position's logits are computed
            total = min(len(s.prompt) + s.params.max_new_tokens, self.context_len)
            salt = b"" if s.request.adapter is None else f"lora:{s.request.adapter}".encode()  # keys differ by adapter
            if not self._steps.fits(total, s.prompt, reuse, salt):
                break
            self._waiting.popleft()
            s.row = self._rows.index(None)  # the lowest free row: where it will decode, often with no move
            self._rows[s.row] = s
            s.cached = s.prefilled = self._steps.admit(s.row, total, s.prompt, reuse, salt)
            self._running.append(s)
            self.stats.prompt_tokens += len(s.prompt)
        self._sync_gauges()

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        for s in [s for s in self._waiting if s.request in self._cancelled]:
            self._waiting.remove(s)
            self._end_request(s.request, "cancelled")
        for s in [s for s in self._running if s.request in self._cancelled]:
            self._release(s)
            self._end_request(s.request, "cancelled")
        self._cancelled.clear()
        self._sync_gauges()

    def _abort_all(self, message: str) -> None:
        for s in list(self._running) + list(self._waiting):
            self._finish(s, Event(s.index, None, error=message), "aborted")
        self._sync_gauges()

    def _release(self, s: _Seq) -> None:
        if s in self._running:
            self._running.remove(s)
            self._rows[s.row] = None  # (a KVCache row is reset when it is taken again)
            self._steps.release(s.row)
        elif s in self._waiting:
            self._waiting.remove(s)
        self._sync_gauges()  # before the request hears that it is done

    def _finish(self, s: _Seq, event: Event, outcome: str) -> None:
        """Post a sequence's last event and free its row (called with the lock held)."""
        self._release(s)
        s.request._post(event)
        if outcome != "completed":
            s.request.outcome = outcome
        still_open = any(o.request is s.request for o in itertools.chain(self._running, self._waiting))
        if not still_open:
            self._end_request(s.request, s.request.outcome or outcome)

    def _end_request(self, request: Request, outcome: str) -> None:
        if request.ended:
            return
        request.ended = True
        self.stats.requests_finished[outcome] += 1

    def _sync_gauges(self) -> None:
        self.stats.waiting = len(self._waiting)
        self.stats.running = len(self._running)
        self.stats.rows_free = self._rows.count(None)
        cache = self._steps.cache if self._steps is not None else None
        if isinstance(cache, PagedKVCache):
            st = self.stats
            st.kv_blocks_used, st.kv_blocks_cached, st.kv_blocks_total = (
                cache.blocks_used,
                len(cache.cached),
                cache.n_blocks,
            )
            st.prefix_cache_queries, st.prefix_cache_hits = cache.queries, cache.hits

    def _gather(self, feeding: list[_Seq]) -> None:
        """Move the sequences that decode now into the first rows of the cache, so that a decode step spans
        them alone (a lone sequence: one row, the fused one-token step). Each sequence out of place swaps rows
        with one that does not decode now (a free row, or a prompt still being prefilled); rows only move when
        a sequence ends or a prompt ends its prefill."""
        n = len(feeding)
        out = [s for s in feeding if s.row >= n]
        holes = [r for r in range(n) if self._rows[r] is None or self._rows[r].next_token is None]
        for s, r in zip(out, holes, strict=True):
            other = self._rows[r]
            self._steps.swap(s.row, r)
            self._rows[s.row] = other
            if other is not None:
                other.row = s.row
            self._rows[r], s.row = s, r

    def _use_adapters(self, rows: list[_Seq]) -> None:
        """Each row's LoRA adapter for the next step (`rows` in row order from the step's first row)."""
        if self.adapters is not None:
            self.adapters.select([s.adapter for s in rows])

    def _step(self) -> None:
        running = list(self._running)
        finished: list[tuple[_Seq, Event, str]] = []
        failed: list[tuple[_Seq, Exception]] = []

        # Prefill: one chunk each, oldest first, those that fit the turn's token budget (the first one whatever its
        # size): `prefill_budget` tokens while other sequences decode, which wait for this, else `prefill_chunk`.
        # A sequence first takes what the prefix cache holds of its prompt, or waits while another computes the
        # next block. Chunks end at multiples of prefill_chunk whatever was cached: the same bounds as a cold run.
        decoding = any(s.prefilled == len(s.prompt) for s in running)
        budget = min(self.prefill_budget, self.prefill_chunk) if decoding else self.prefill_chunk
        ran = 0
        for s in running:
            if s.prefilled == len(s.prompt):
                continue
            if not s.matched:
                cached, wait = self._steps.prefix(s.row)
                if wait:
                    continue
                s.matched, s.cached, s.prefilled = True, max(cached, s.cached), max(cached, s.prefilled)
            start = s.prefilled
            end = min((start // self.prefill_chunk + 1) * self.prefill_chunk, len(s.prompt))
            if ran and end - start > budget:
                continue  # (a later, shorter prompt may still fit)
            top = s.request.prompt_logprobs
            try:
                self._use_adapters([s])
                logits = self._steps.prefill(s.row, s.prompt[start:end], start, top is not None)
                if top is not None:  # position i's logits give token i + 1's logprob
                    s.prompt_lps += prompt_logprobs(logits, s.prompt[start + 1 : end + 1], top)
                    logits = logits[-1]
                s.logits = logits.cpu()
            except Exception as e:  # its row alone was written: that sequence fails, the others go on
                if self._steps.lockstep:
                    raise
                failed.append((s, e))
                continue
            self.stats.prefill_chunks += 1
            s.prefilled = end
            budget -= end - start
            ran += 1
            if end == len(s.prompt) and s.request.prompt_only:  # done: nothing to generate
                s.logits = None
                finished.append((s, Event(s.index, None, "", "length", prompt_logprobs=s.prompt_lps), "completed"))

        # Sample every sequence whose logits are fresh, all in one batch. What goes wrong in one sequence's
        # sampling or text fails that sequence only: should the batch fail, each is sampled on its own.
        fresh = [s for s in running if s.logits is not None and s.prefilled == len(s.prompt)]
        tokens: list[int | None] = [None] * len(fresh)
        if fresh:
            try:
                rows = torch.stack([s.logits for s in fresh])
                constraints = [s.constraint for s in fresh]
                if any(c is not None for c in constraints):  # every row's grammar mask in one batched call
                    rows = mask_rows(rows, constraints).to(rows.dtype)
                tokens = sample_batch(
                    torch.stack([s.allowed(row, masked=True) for s, row in zip(fresh, rows, strict=True)]),
                    [s.params for s in fresh],
                    [s.history for s in fresh],
                    [s.generator for s in fresh],
                    [len(s.prompt) for s in fresh],
                )
            except Exception:
                log.warning("batched sampling failed; sampling each sequence alone:\n%s", traceback.format_exc())
        for s, token in zip(fresh, tokens, strict=True):
            logits, s.logits = s.logits, None
            try:
                event = s.step(logits, token)
            except Exception as e:
                failed.append((s, e))
                continue
            self.stats.generation_tokens += event.generated
            if s.prompt_lps is not None:  # on its first event
                event.prompt_logprobs, s.prompt_lps = s.prompt_lps, None
            if s.done:
                finished.append((s, event, "completed"))
            else:
                s.request._post(event)
                s.next_token = event.token
        for s, e in failed:
            log.error("sequence %d of a request failed:\n%s", s.index, "".join(traceback.format_exception(e)))
            error = f"generation failed: {type(e).__name__}: {e}"
            finished.append((s, Event(s.index, None, error=error), "error"))
        if finished:
            with self._cond:
                for s, event, outcome in finished:
                    if not s.request.cancelled:
                        self._finish(s, event, outcome)
                self._sync_gauges()

        # Decode: one token for every sequence that has one to feed, over their rows only (the first ones).
        feeding = [s for s in self._running if s.next_token is not None]
        if feeding:
            self._gather(feeding)
            tokens_B = torch.zeros(len(feeding), dtype=torch.long)
            pos_B = torch.zeros(len(feeding), dtype=torch.long)
            for s in feeding:
                tokens_B[s.row] = s.next_token
                pos_B[s.row] = s.position
                s.next_token = None
            self._use_adapters(sorted(feeding, key=lambda s: s.row))
            logits_BV = self._steps.decode(tokens_B, pos_B).cpu()
            for s in feeding:
                s.logits = logits_BV[s.row]
            self.stats.decode_steps += 1
        self._sync_gauges()
        now = time.monotonic()
        self._rate.append((now, self.stats.generation_tokens))
        while len(self._rate) > 1 and self._rate[1][0] < now - 60:
            self._rate.popleft()
