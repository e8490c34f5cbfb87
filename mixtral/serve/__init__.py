"""`mixtral serve`: an OpenAI-compatible HTTP server with continuous batching.

    engine.py    the scheduler: one thread owns the model and KV cache; requests join and leave the
                 running batch between decode steps
    protocol.py  OpenAI request bodies -> prompts + SamplingParams (errors name the parameter), and the
                 response shapes
    app.py       the FastAPI app: routes, streaming (SSE), errors in OpenAI's shape, /health, /metrics
    server.py    uvicorn with a draining shutdown on SIGTERM
    cli.py       the `serve` subcommand's flags

Importing this package is light; fastapi and uvicorn are imported by `app`/`server` only.
"""

from __future__ import annotations

from .engine import Engine, Request

__all__ = ["Engine", "Request", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
