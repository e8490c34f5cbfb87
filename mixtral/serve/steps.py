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

from ..cache import KVCache
from ..generate import decode_step
from ..model import Transformer

HEARTBEAT = 60.0  # seconds between pings while idle: well under any process group timeout


class Steps:
    """One model and its KV cache: reset rows, prefill one chunk of one row, decode every row."""

    lockstep = False  # a failed step is fatal when other processes must stay in step

    def __init__(self, model: Transformer, cache: KVCache) -> None:
        self.model, self.cache = model, cache

    def reset(self, rows: list[int] | None = None) -> None:
        self.cache.reset(rows)

    @torch.no_grad()
    def prefill(self, row: int, tokens: list[int], start: int) -> torch.Tensor:
        """Prompt tokens at positions start.. into one row; returns the last token's logits [V] (float32)."""
        device = self.model.embed.weight.device
        tokens_1T = torch.tensor([tokens], dtype=torch.long, device=device)
        positions = torch.arange(start, start + len(tokens), dtype=torch.long, device=device)[None]
        at = torch.tensor([[0, len(tokens) - 1]], device=device)
        logits = self.model(tokens_1T, positions=positions, cache=self.cache.rows([row]), logits_at=at)
        return logits[0].float()

    def decode(self, tokens_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        """One token for every row (position -1: an idle row); returns logits [B, V] (float32)."""
        return decode_step(self.model, self.cache, tokens_B, pos_B)

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

    def prefill(self, row: int, tokens: list[int], start: int) -> torch.Tensor:
        self._send("prefill", row, tokens, start)
        return super().prefill(row, tokens, start)

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
        elif op == "prefill":
            steps.prefill(*args)
        elif op == "decode":
            tokens, positions = args
            steps.decode(torch.tensor(tokens, dtype=torch.long), torch.tensor(positions, dtype=torch.long))
        elif op != "ping":
            raise RuntimeError(f"rank 0 sent an unknown step {op!r}")
        n += op != "ping"
