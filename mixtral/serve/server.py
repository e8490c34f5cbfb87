"""uvicorn's server with the shutdown we want: the first SIGTERM/SIGINT stops taking requests and lets
those in flight finish (the engine cuts what is left after the drain timeout), a second one quits at once.

uvicorn's own handlers re-raise the signal once the server is down, which would end the process with the
signal's status; after a drain we exit with 0. A second signal ends the process on the spot with status
128 + the signal's number (as a shell reports a process ended by it): tearing down the event loop's tasks
and the interpreter while the scheduler thread is inside a forward pass would print a traceback per task
and can abort in C++ ("terminate called without an active exception").
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

import uvicorn

from .engine import Engine


class Server(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, engine: Engine, drain_timeout: float, say: Callable[[str], None] = print
    ) -> None:
        super().__init__(config)
        self.engine, self.drain_timeout, self.say = engine, drain_timeout, say
        self._signalled = False

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: object) -> None:
        # Marked before anything that can wait (the engine's lock): a second signal can run this handler
        # again while the first one is still inside it.
        if self._signalled:
            self.say(f"{signal.Signals(sig).name} again: exiting now, cutting the requests in flight")
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(128 + sig)
        self._signalled = True
        self.say(
            f"{signal.Signals(sig).name}: not taking new requests; finishing those in flight "
            f"(up to {self.drain_timeout:g}s)"
        )
        self.engine.drain(self.drain_timeout)
        self.should_exit = True
