"""Continuous batching: one scheduler thread owns the model and its KV cache.

Each sequence (one choice of one request) gets a row of a KV cache made once for `max_batch` rows.
Every turn of the loop:

1. admits waiting sequences into free rows and drops cancelled ones (their rows are freed);
2. prefills: runs one prompt chunk of the sequences still reading their prompt (a token budget per
   turn, so a long prompt does not stall everyone else's decoding);
3. samples the next token of every sequence whose logits are fresh, each under its own
   `SamplingParams` and its own seeded generator, and hands the text to its request (one
   `SequenceState.step`, as in `generate_stream`: the same end-of-sequence, stop-string and length rules);
4. runs one `decode_step` over the whole cache: every decoding row advances by one token, each at its
   own position; idle rows (position -1) write nothing.

A sequence's numbers do not depend on what else runs: its prompt is prefilled alone in its row, in
chunks whose bounds depend only on its own length, the decode step always spans all `max_batch` rows,
and its sampling uses only its own logits, history and generator.

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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..cache import KVCache
from ..generate import Event, SequenceState, prepare_kernels
from ..model import Transformer
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from .steps import HEARTBEAT, Steps

log = logging.getLogger("mixtral.serve")

Loader = Callable[[], tuple[Transformer, Tokenizer]]
StepsFactory = Callable[[Transformer, KVCache], Steps]


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
    ) -> None:
        if len(prompts) != len(params) or not prompts:
            raise ValueError(f"{len(prompts)} prompts for {len(params)} SamplingParams")
        self.prompts = [list(p) for p in prompts]
        self.params = list(params)
        self.top_logprobs = top_logprobs  # None: no logprobs; k: the chosen token's and the k most likely
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
            index, prompt, params, tokenizer=tokenizer, eos_id=tokenizer.eos_id, top_logprobs=request.top_logprobs
        )
        self.request = request
        self.row = -1
        self.prefilled = 0  # prompt tokens already in the cache
        self.logits: torch.Tensor | None = None  # [V] for the next token, when fresh
        self.next_token: int | None = None  # to feed at the next decode step


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
        steps: StepsFactory = Steps,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} is invalid: must be >= 1")
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue} is invalid: must be >= 0")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk} is invalid: must be >= 1")
        self._load = load
        self._make_steps = steps
        self._steps: Steps | None = None
        self.closed = False  # the scheduler ended normally (and told the other ranks, under torchrun)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
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
            request.engine = self
            for i, (prompt, params) in enumerate(zip(request.prompts, request.params, strict=True)):
                self._waiting.append(_Seq(request, i, prompt, params, self.tokenizer))
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
            prepare_kernels(model)  # "loading" until they are built: the first request does not wait for them
            context = model.config.max_seq_len if self._max_seq_len is None else self._max_seq_len
            if context > model.config.max_seq_len:
                raise ValueError(
                    f"max_seq_len={context} is more than the model's context of {model.config.max_seq_len} tokens"
                )
            weight = model.embed.weight
            cache = KVCache(model.config, self.max_batch, context, dtype=weight.dtype, device=weight.device)
            self._steps = self._make_steps(model, cache)
        except Exception as e:  # reported to the server, which exits with this message
            with self._cond:
                self.state = "failed"
                self.load_error = e
            log.error("loading the model failed: %s", e)
            if self.on_failure is not None:
                self.on_failure(e)
            return
        self._free_rows = list(range(self.max_batch))
        with self._cond:
            self.model, self.tokenizer, self.context_len = model, tokenizer, context
            if self.state == "loading":
                self.state = "ready"
        if self.on_ready is not None:
            self.on_ready()
        try:
            self._loop()
        except Exception as e:  # a bug, or a failed lock-step: say so everywhere rather than leave requests hanging
            log.error("the scheduler failed:\n%s", traceback.format_exc())
            with self._cond:
                self.state = "failed"
                self._abort_all("the server failed (see its log)")
            if self.on_failure is not None:
                self.on_failure(e)
            return
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
        while self._waiting and self._free_rows:
            s = self._waiting.popleft()
            s.row = self._free_rows.pop(0)
            self._steps.reset([s.row])
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
            self._steps.reset([s.row])
            self._free_rows.append(s.row)
            self._free_rows.sort()
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
        self.stats.rows_free = len(self._free_rows)

    def _step(self) -> None:
        running = list(self._running)
        finished: list[tuple[_Seq, Event, str]] = []
        failed: list[tuple[_Seq, Exception]] = []

        # Prefill: one chunk each, oldest first, within a token budget (at least one chunk per turn).
        budget = self.prefill_chunk
        for s in running:
            if s.prefilled == len(s.prompt) or budget <= 0:
                continue
            start = s.prefilled
            end = min(start + self.prefill_chunk, len(s.prompt))
            try:
                s.logits = self._steps.prefill(s.row, s.prompt[start:end], start).cpu()
            except Exception as e:  # its row alone was written: that sequence fails, the others go on
                if self._steps.lockstep:
                    raise
                failed.append((s, e))
                continue
            self.stats.prefill_chunks += 1
            s.prefilled = end
            budget -= end - start

        # Sample every sequence whose logits are fresh. What goes wrong in one sequence's sampling or text
        # fails that sequence only.
        for s in running:
            if s.logits is None or s.prefilled < len(s.prompt):
                continue
            logits, s.logits = s.logits, None
            try:
                event = s.step(logits)
            except Exception as e:
                failed.append((s, e))
                continue
            self.stats.generation_tokens += event.generated
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

        # Decode: one token for every sequence that has one to feed, over all rows of the cache.
        feeding = [s for s in self._running if s.next_token is not None]
        if feeding:
            tokens_B = torch.zeros(self.max_batch, dtype=torch.long)
            pos_B = torch.full((self.max_batch,), -1, dtype=torch.long)
            for s in feeding:
                tokens_B[s.row] = s.next_token
                pos_B[s.row] = s.position
                s.next_token = None
            logits_BV = self._steps.decode(tokens_B, pos_B).cpu()
            for s in feeding:
                s.logits = logits_BV[s.row]
            self.stats.decode_steps += 1
        now = time.monotonic()
        self._rate.append((now, self.stats.generation_tokens))
        while len(self._rate) > 1 and self._rate[1][0] < now - 60:
            self._rate.popleft()
