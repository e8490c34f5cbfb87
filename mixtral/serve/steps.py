"""The model steps the scheduler runs, on one process or on every rank of a torchrun world in lock-step.

`Steps` runs them here. Under torchrun (`--ep`/`--tp`) every MoE block and every attention block is a
collective, so every rank must run the same forward passes in the same order. Only rank 0 serves HTTP
and schedules; its `LockstepSteps` broadcasts each step (op and arguments, a few hundred bytes) before
running it, and every other rank sits in `follow`, running what it receives on its own shard of the model
and its own KV cache (same rows, its own heads). Logits are replicated, so only rank 0 samples.

The ranks stop together: rank 0 broadcasts "stop" when its scheduler ends; the other ranks ignore
SIGINT/SIGTERM (torchrun and a terminal's Ctrl-C send them to every rank) so that rank 0 can drain the
requests in flight first. While the server is idle rank 0 sends a "ping" every `HEARTBEAT` seconds, so the
waiting ranks' collectives never reach the process group's timeout. If a rank fails, the process exits
with an error and torchrun ends the others.
"""

from __future__ import annotations

import signal
import time

import torch

from ..cache import KVCache, PagedKVCache
from ..generate import decode_step
from ..model import Transformer

HEARTBEAT = 60.0  # seconds between pings while idle: well under any process group timeout


class Steps:
    """One model and its KV cache: admit, release, reset or swap rows, look up a prompt's cached prefix, prefill one
    chunk of one row, decode the first rows. The cache is a `KVCache` (a row per sequence, allocated up front) or a
    `PagedKVCache` (blocks taken as tokens arrive; each forward pass runs on a gathered copy of its rows)."""

    lockstep = False  # a failed step is fatal when other processes must stay in step

    def __init__(self, model: Transformer, cache: KVCache | PagedKVCache) -> None:
        self.model, self.cache = model, cache
        self.paged = isinstance(cache, PagedKVCache)

    def reset(self, rows: list[int] | None = None) -> None:
        self.cache.reset(rows)

    def fits(self, tokens: int, prompt: list[int], reuse: bool = True, salt: bytes = b"") -> bool:
        """Whether a new sequence (at most `tokens` positions, starting with `prompt`) fits the cache now, given a
        free row (paged: its blocks, less those of the prompt's cached prefix, can be reserved). `salt` names what
        else sets its keys and values (its LoRA adapter): cached blocks are shared only under the same salt."""
        return self.cache.can_admit(tokens, prompt, reuse, salt) if self.paged else True

    def admit(self, row: int, tokens: int, prompt: list[int], reuse: bool = True, salt: bytes = b"") -> int:
        """Row `row`, emptied, for a new sequence; returns how many of its prompt tokens are cached already (paged:
        `PagedKVCache.admit`)."""
        if self.paged:
            return self.cache.admit(row, tokens, prompt, reuse, salt)
        self.cache.reset([row])
        return 0

    def release(self, row: int) -> None:
        """A sequence has ended: a paged cache takes its blocks back now (a row of a `KVCache` is reset when it is
        taken again)."""
        if self.paged:
            self.cache.release(row)

    def prefix(self, row: int) -> tuple[int, bool]:
        """Before a sequence's first prefill: (prompt tokens already cached, wait) (`PagedKVCache.prefix`)."""
        return self.cache.prefix(row) if self.paged else (0, False)

    def swap(self, a: int, b: int) -> None:
        self.cache.swap(a, b)

    @torch.no_grad()
    def prefill(self, row: int, tokens: list[int], start: int, every: bool = False) -> torch.Tensor:
        """Prompt tokens at positions start.. into one row; returns the last token's logits [V] (float32), or with
        `every` every token's [T, V] (for prompt logprobs; on the model's device: the caller reduces them there)."""
        device = self.model.embed.weight.device
        tokens_1T = torch.tensor([tokens], dtype=torch.long, device=device)
        end = start + len(tokens)
        positions = torch.arange(start, end, dtype=torch.long, device=device)[None]
        at = None if every else torch.tensor([[0, len(tokens) - 1]], device=device)
        view = self.cache.gather([row], [start], [end]) if self.paged else self.cache.view(row, row + 1)
        logits = self.model(tokens_1T, positions=positions, cache=view, logits_at=at)
        if self.paged:
            self.cache.scatter(view, [row], [start], [end])
        return logits[0].float()

    @torch.no_grad()
    def decode(self, tokens_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        """One token for each of the first B rows (position -1: an idle row); returns logits [B, V] (float32).
        The rows past them are not touched, so a lone sequence in row 0 takes the one-row (fused) step."""
        if not self.paged:
            return decode_step(self.model, self.cache.view(0, len(tokens_B)), tokens_B, pos_B)
        rows, pos = list(range(len(tokens_B))), pos_B.tolist()
        start, end = [max(p, 0) for p in pos], [p + 1 if p >= 0 else 0 for p in pos]
        view = self.cache.gather(rows, start, end)
        device = self.model.embed.weight.device
        if device.type == "cpu":  # the fused one-token step at batch 1, as on a KVCache
            logits = decode_step(self.model, view, tokens_B, pos_B)
        else:  # eager: a CUDA graph is captured for one cache's tensors, and each gather makes new ones
            logits = self.model(tokens_B.view(-1, 1).to(device), positions=pos_B.view(-1, 1).to(device), cache=view)
            logits = logits[:, 0].float()
        self.cache.scatter(view, rows, start, end)
        return logits

    def idle(self) -> None:
        """Called while the scheduler waits for work."""

    def close(self) -> None:
        """Called once when the scheduler ends."""


class LockstepSteps(Steps):
    """Rank 0's steps: each is broadcast to the other ranks (running `follow`) before it runs here."""

    lockstep = True

    def __init__(self, model: Transformer, cache: KVCache) -> None:
        super().__init__(model, cache)
        self._last = time.monotonic()
        self._closed = False

    def _send(self, *message: object) -> None:
        from .. import parallel

        parallel.broadcast_from_main(message)
        self._last = time.monotonic()

    def reset(self, rows: list[int] | None = None) -> None:
        self._send("reset", rows)
        super().reset(rows)

    def admit(self, row: int, tokens: int, prompt: list[int], reuse: bool = True, salt: bytes = b"") -> int:
        if not self.paged:  # a row of a KVCache is only reset
            self.reset([row])
            return 0
        self._send("admit", row, tokens, prompt, reuse, salt)
        return super().admit(row, tokens, prompt, reuse, salt)

    def release(self, row: int) -> None:
        if self.paged:  # (a KVCache does nothing here)
            self._send("release", row)
        super().release(row)

    def prefix(self, row: int) -> tuple[int, bool]:
        if self.paged:
            self._send("prefix", row)
        return super().prefix(row)

    def swap(self, a: int, b: int) -> None:
        self._send("swap", a, b)
        super().swap(a, b)

    def prefill(self, row: int, tokens: list[int], start: int, every: bool = False) -> torch.Tensor:
        self._send("prefill", row, tokens, start, every)  # every rank's last layer computes the same tokens
        return super().prefill(row, tokens, start, every)

    def decode(self, tokens_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        self._send("decode", tokens_B.tolist(), pos_B.tolist())
        return super().decode(tokens_B, pos_B)

    def idle(self) -> None:
        if time.monotonic() - self._last >= HEARTBEAT:
            self._send("ping")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._send("stop")


def follow(steps: Steps) -> int:
    """The loop of every rank but 0: run rank 0's steps until it says stop; returns the number of steps run."""
    from .. import parallel

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # rank 0 decides when to stop, after draining
    n = 0
    while True:
        op, *args = parallel.broadcast_from_main(None)
        if op == "stop":
            return n
        if op == "reset":
            steps.reset(*args)
        elif op == "admit":
            steps.admit(*args)
        elif op == "release":
            steps.release(*args)
        elif op == "prefix":
            steps.prefix(*args)
        elif op == "swap":
            steps.swap(*args)
        elif op == "prefill":
            steps.prefill(*args)
        elif op == "decode":
            tokens, positions = args
            steps.decode(torch.tensor(tokens, dtype=torch.long), torch.tensor(positions, dtype=torch.long))
        elif op != "ping":
            raise RuntimeError(f"rank 0 sent an unknown step {op!r}")
        n += op != "ping"
