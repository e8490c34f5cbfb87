"""The HTTP side: a FastAPI app with OpenAI's routes in front of an `Engine`.

Generation runs inside the response object (`_StreamResponse`, `_JSONWhenDone`), which also watches
the connection: when the client goes away, the request is cancelled and its cache rows are freed.
"""

from __future__ import annotations

import asyncio
import bisect
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..constrained import Grammars, call_format
from ..generate import Event
from ..sampling import TokenLogprob
from .engine import SHUTDOWN_MESSAGE, UNAVAILABLE, Engine, QueueFull, Request, Unavailable
from .protocol import (
    APIError,
    Job,
    chat_logprobs,
    completion_logprobs,
    echo_logprobs,
    joined_logprobs,
    parse_body,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
    usage,
    vllm_prompt_logprobs,
)
from .tools import ToolOutput

log = logging.getLogger("mixtral.serve")

MAX_BODY_MB = 4.0  # the default limit on a request body (--max-body-mb)


def create_app(
    engine: Engine,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body: int = int(MAX_BODY_MB * 2**20),
    allowed_origins: Sequence[str] | None = None,
) -> FastAPI:
    """The app for `engine` (started with the app, stopped with it). `api_key`: the Bearer token every
    /v1 route and /tokenize, /detokenize require (/health and /metrics stay open). `max_body`: the largest
    request body taken, in bytes (413 beyond it). `allowed_origins`: the origins whose pages may call the
    API from a browser (CORS; "*": any); none by default."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine._thread is None:
            engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="mixtral", summary="OpenAI-compatible Mixtral server", lifespan=lifespan)
    responses = _ResponseCounter()
    latency = _Latency()
    app.add_middleware(_LimitBody, limit=max_body)
    if allowed_origins:
        # Outside _LimitBody and the routes, so that their errors (413, 401, ...) carry the CORS headers too and
        # a browser shows them; preflight (OPTIONS) requests are answered here.
        app.add_middleware(
            CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(_CountResponses, counter=responses)  # the outer one: it counts the 413s too
    created = int(time.time())
    # What a request's "model" may name: the base model, or one of the LoRA adapters served on it.
    names = [model_name, *engine.adapter_paths]
    compiler: list[Grammars] = []  # made on the first request that needs one (xgrammar reads the whole vocabulary)
    compiler_lock = threading.Lock()

    def grammars() -> Grammars:
        with compiler_lock:
            if not compiler:
                assert engine.tokenizer is not None and engine.model is not None
                compiler.append(Grammars(engine.tokenizer, engine.model.config.vocab_size))
            return compiler[0]

    # ---- errors, all in OpenAI's shape -------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if e.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(
            APIError(e.status_code, message, code=kind).body(), status_code=e.status_code, headers=e.headers
        )

    @app.exception_handler(Exception)
    async def internal_error(request: HTTPRequest, e: Exception) -> JSONResponse:
        error = APIError(500, f"internal server error: {type(e).__name__}: {e}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    def authorize(request: HTTPRequest) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401,
                "missing or invalid API key: send the header 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def ready() -> None:
        if engine.state != "ready":
            message = UNAVAILABLE[engine.state]
            raise APIError(503, message, type="server_error", code="unavailable", headers={"Retry-After": "5"})

    # Parsing and tokenizing take time in proportion to the body (up to `max_body`): in a worker thread, so
    # that the event loop goes on answering every other request (and /health) meanwhile.
    async def json_body(request: HTTPRequest) -> dict[str, Any]:
        return await run_in_threadpool(parse_body, await request.body())

    # ---- routes ----------------------------------------------------------------------------------------------

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers' and uptime checkers' probe
    async def health() -> JSONResponse:
        if engine.state == "ready":
            return JSONResponse({"status": "ok", "model": model_name})
        body: dict[str, Any] = {"status": engine.state}
        if engine.load_error is not None:
            body["error"] = str(engine.load_error)
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = _metrics_text(engine, responses) + latency.text(model_name)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def model_card(name: str) -> dict[str, Any]:
        # As vLLM lists them: a LoRA adapter's root is its folder and its parent the base model.
        adapter = name != model_name
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "mixtral",
            "root": engine.adapter_paths[name] if adapter else model_name,
            "parent": model_name if adapter else None,
            "max_model_len": engine.context_len or None,
        }

    @app.get("/v1/models")
    async def list_models(request: HTTPRequest) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: HTTPRequest) -> dict[str, Any]:
        authorize(request)
        if model not in names:
            valid = ", ".join(map(repr, names))
            raise APIError(404, f"The model {model!r} does not exist; this server serves {valid}", param="model",
                           code="model_not_found")  # fmt: skip
        return model_card(model)

    async def parsed_and_submitted(request: HTTPRequest, parse: Callable[..., Any], **extra: Any) -> Response:
        """A generation request: authorized, its body parsed off the event loop, then queued."""
        received = time.monotonic()
        authorize(request)
        body = await json_body(request)
        ready()
        assert engine.tokenizer is not None and engine.model is not None
        job = await run_in_threadpool(
            parse,
            body,
            engine.tokenizer,
            model=names,
            context=engine.context_len,
            max_n=engine.max_batch,
            vocab=engine.model.config.vocab_size,
            **extra,
        )
        return submit(job, received)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Response:
        return await parsed_and_submitted(request, parse_chat, grammars=grammars)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Response:
        return await parsed_and_submitted(request, parse_completion)

    # vLLM's tokenizer routes: the ids a prompt or chat becomes here (its length against max_model_len), and back.
    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest) -> dict[str, Any]:
        authorize(request)
        body = await json_body(request)
        ready()
        assert engine.tokenizer is not None
        tokenizer = engine.tokenizer

        def work() -> tuple[list[int], list[str] | None]:
            ids, with_pieces = parse_tokenize(body, tokenizer, model=names)
            return ids, [tokenizer.id_to_piece(i) for i in ids] if with_pieces else None

        ids, pieces = await run_in_threadpool(work)
        return {"count": len(ids), "max_model_len": engine.context_len, "tokens": ids, "token_strs": pieces}

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest) -> dict[str, Any]:
        authorize(request)
        body = await json_body(request)
        ready()
        assert engine.tokenizer is not None
        return {"prompt": await run_in_threadpool(parse_detokenize, body, engine.tokenizer, model=names)}

    def submit(job: Job, received: float) -> Response:
        request = Request(
            job.prompts,
            job.params,
            job.top_logprobs,
            asyncio.get_running_loop(),
            prompt_logprobs=job.prompt_top,
            prompt_only=job.prompt_only,
            adapter=None if job.model == model_name else job.model,
            constraints=[job.grammar.start() for _ in job.prompts] if job.grammar is not None else None,
        )
        try:
            engine.submit(request)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from e
        except Unavailable as e:
            raise APIError(503, str(e), type="server_error", code="unavailable", headers={"Retry-After": "5"}) from e
        events = latency.timed(request.events(), received)
        if job.stream:
            return _StreamResponse(request, _stream_chunks(engine, request, job, events))
        return _JSONWhenDone(request, lambda: _collect(engine, request, job, events))

    return app


# ---- generation inside the response ---------------------------------------------------------------------------


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def _error_for(message: str) -> APIError:
    if message == SHUTDOWN_MESSAGE:
        return APIError(503, message, type="server_error", code="unavailable")
    return APIError(500, message, type="server_error")


async def _stream_chunks(
    engine: Engine, request: Request, job: Job, events: AsyncIterator[Event]
) -> AsyncIterator[bytes]:
    """The SSE frames of a streamed response: chunks, an optional usage chunk, then [DONE]. A failure
    midway (of the generation, or of this code) is an error frame, then [DONE]."""
    try:
        async for frame in _frames(engine, request, job, events):
            yield frame
    except Exception as e:
        log.exception("streaming a response failed")
        request.cancel()
        yield _sse(APIError(500, f"internal server error: {type(e).__name__}: {e}", type="server_error").body())
        yield _sse("[DONE]")


async def _frames(engine: Engine, request: Request, job: Job, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    tokenizer = engine.tokenizer
    assert tokenizer is not None
    chat = job.kind == "chat"
    base = {
        "id": job.response_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": job.created,
        "model": job.model,
    }
    if job.include_usage:
        base["usage"] = None

    def chunk(index: int, text: str | None, lp: TokenLogprob | None, finish: str | None, role: bool = False) -> bytes:
        choice: dict[str, Any] = {"index": index}
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice["delta"] = delta
            choice["logprobs"] = chat_logprobs(tokenizer, [lp]) if lp is not None else None
        else:
            choice["text"] = text or ""
            choice["logprobs"] = completion_logprobs(tokenizer, [lp], offsets[index]) if lp is not None else None
        choice["finish_reason"] = finish
        return _sse({**base, "choices": [choice]})

    def prompt_chunk(ev: Event) -> bytes:
        """A completion choice's first chunk, before its first token: the prompt echoed, with its logprobs (echo),
        and vLLM's prompt_logprobs."""
        i = ev.index
        choice: dict[str, Any] = {"index": i, "text": job.echo[i] if job.echo else "", "logprobs": None}
        if job.echo and job.top_logprobs is not None:
            choice["logprobs"] = echo_logprobs(tokenizer, job.prompts[i], ev.prompt_logprobs, job.top_logprobs)
        if job.prompt_logprobs is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(tokenizer, ev.prompt_logprobs, job.prompt_logprobs)
        offsets[i] += len(choice["text"])
        return _sse({**base, "choices": [{**choice, "finish_reason": None}]})

    def tool_chunks(ev: Event) -> AsyncIterator[bytes] | list[bytes]:
        """With tools: the content and tool-call deltas that this event's token adds, then the finish."""
        i, out = ev.index, outputs[ev.index]
        if ev.generated:
            tokens[i].append(ev.token)
        content, calls = out.deltas(tokenizer.decode_with_controls(tokens[i]), final=ev.finish_reason is not None)
        frames = []
        if content:
            frames.append(chunk(i, content, None, None))
        for call in calls:
            choice = {"index": i, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}
            frames.append(_sse({**base, "choices": [choice]}))
        if ev.finish_reason is not None:
            finish = "tool_calls" if out.ids and ev.finish_reason == "stop" else ev.finish_reason
            frames.append(chunk(i, None, None, finish))
        return frames

    offsets = [0] * len(request)  # characters sent so far, per choice (completions' text_offset)
    started = [False] * len(request)  # whether a choice's first event has come
    layout = call_format(tokenizer)
    outputs = [ToolOutput(job.tool_mode, layout) for _ in range(len(request))] if job.tool_mode else None
    tokens: list[list[int]] = [[] for _ in range(len(request))]
    n_tokens = 0
    if chat:
        for i in range(len(request)):
            yield chunk(i, None, None, None, role=True)
    async for ev in events:
        if ev.error is not None:
            request.cancel()
            yield _sse(_error_for(ev.error).body())
            yield _sse("[DONE]")
            return
        if not started[ev.index] and (job.echo or job.prompt_logprobs is not None):
            yield prompt_chunk(ev)
        started[ev.index] = True
        n_tokens += ev.generated
        if outputs is not None:
            for frame in tool_chunks(ev):
                yield frame
            continue
        if ev.text or ev.logprob is not None:
            yield chunk(ev.index, ev.text, ev.logprob, None)
            offsets[ev.index] += len(ev.text)
        if ev.finish_reason is not None:
            yield chunk(ev.index, None, None, ev.finish_reason)
    if job.include_usage:
        yield _sse({**base, "choices": [], "usage": usage(job.prompt_tokens, n_tokens)})
    yield _sse("[DONE]")


async def _collect(
    engine: Engine, request: Request, job: Job, events: AsyncIterator[Event]
) -> tuple[int, dict[str, Any]]:
    """The whole (non-streamed) response: (status, body)."""
    tokenizer = engine.tokenizer
    assert tokenizer is not None
    n = len(request)
    texts: list[list[str]] = [[] for _ in range(n)]
    lps: list[list[TokenLogprob]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    prompt_lps: list[list[TokenLogprob | None] | None] = [None] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    n_tokens = 0
    async for ev in events:
        if ev.error is not None:
            request.cancel()
            error = _error_for(ev.error)
            return error.status, error.body()
        texts[ev.index].append(ev.text)
        if ev.generated:
            tokens[ev.index].append(ev.token)
        n_tokens += ev.generated
        if ev.logprob is not None:
            lps[ev.index].append(ev.logprob)
        if ev.prompt_logprobs is not None:
            prompt_lps[ev.index] = ev.prompt_logprobs
        if ev.finish_reason is not None:
            finish[ev.index] = ev.finish_reason
    choices = []
    for i in range(n):
        text = "".join(texts[i])
        if job.kind == "chat":
            logprobs = chat_logprobs(tokenizer, lps[i]) if job.top_logprobs is not None else None
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if job.tool_mode is not None:
                output = ToolOutput(job.tool_mode, call_format(tokenizer))
                content, calls = output.message(tokenizer.decode_with_controls(tokens[i]))
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                    finish[i] = "tool_calls" if finish[i] == "stop" else finish[i]
            choice = {"index": i, "message": message, "logprobs": logprobs}
        else:
            echo = job.echo[i] if job.echo else ""
            logprobs = None
            if job.top_logprobs is not None:
                logprobs = completion_logprobs(tokenizer, lps[i], len(echo))
                if job.echo:
                    prompt = echo_logprobs(tokenizer, job.prompts[i], prompt_lps[i], job.top_logprobs)
                    logprobs = joined_logprobs(prompt, logprobs)
            choice = {"index": i, "text": echo + text, "logprobs": logprobs}
            if job.prompt_logprobs is not None:
                choice["prompt_logprobs"] = vllm_prompt_logprobs(tokenizer, prompt_lps[i], job.prompt_logprobs)
        choices.append({**choice, "finish_reason": finish[i]})
    return 200, {
        "id": job.response_id,
        "object": "chat.completion" if job.kind == "chat" else "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": choices,
        "usage": usage(job.prompt_tokens, n_tokens),
    }


class _StreamResponse(StreamingResponse):
    """Server-sent events; the request is cancelled (its rows freed) however the response ends."""

    def __init__(self, request: Request, frames: AsyncIterator[bytes]) -> None:
        super().__init__(
            frames,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.request = request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.request.cancel()


class _JSONWhenDone(Response):
    """A JSON response sent once generation ends; a client that disconnects first cancels it."""

    def __init__(self, request: Request, collect: Callable[[], Awaitable[tuple[int, dict[str, Any]]]]) -> None:
        super().__init__(media_type="application/json")
        self.request, self.collect = request, collect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        work = asyncio.ensure_future(self.collect())
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                status, body = work.result()
                await JSONResponse(body, status_code=status)(scope, receive, send)
        finally:
            for task in (work, gone):
                task.cancel()
            self.request.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# ---- metrics ---------------------------------------------------------------------------------------------------


class _ResponseCounter:
    def __init__(self) -> None:
        self.by_code: dict[int, int] = {}

    def count(self, code: int) -> None:
        self.by_code[code] = self.by_code.get(code, 0) + 1


class _CountResponses:
    """Counts HTTP responses by status code (for /metrics)."""

    def __init__(self, app: ASGIApp, counter: _ResponseCounter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.counter.count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:  # the server-error middleware outside answers it with a 500
            if not started:
                self.counter.count(500)
            raise


class _LimitBody:
    """Refuses a request body over `limit` bytes with a 413 in OpenAI's shape: at once when its
    Content-Length says so, else as soon as the bytes read pass it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    def error(self, size: str) -> APIError:
        return APIError(
            413,
            f"the request body is {size} bytes; this server takes at most {self.limit} (--max-body-mb)",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and (len(length) > 18 or int(length) > self.limit):  # (int() refuses 4,300 digits)
            error = self.error(length.decode() if len(length) <= 18 else f"more than {self.limit}")
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self.error(f"more than {self.limit}")  # answered by the app's APIError handler
            return message

        await self.app(scope, limited_receive, send)


class _Histogram:
    """A Prometheus histogram: counts per bucket (upper bounds, `le`), the sum and the count."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = list(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1  # the first bound >= value
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip([*(f"{b:g}" for b in self.buckets), "+Inf"], self.counts, strict=True):
            total += n
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {total}')
        out.append(f"{name}_sum{{{labels}}} {self.sum!r}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


class _Latency:
    """Request latencies as vLLM reports them (its metric names and buckets, so that dashboards made for vLLM
    work), measured here where the tokens reach the HTTP layer: time to first token and end-to-end latency
    from the request's arrival, inter-token latency between two tokens of one sequence (choice), each per
    sequence. A sequence that fails or is cancelled has no end-to-end latency."""

    # vLLM's buckets (vllm/v1/metrics/loggers.py), in seconds.
    TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
    ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0)  # fmt: skip
    E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)  # fmt: skip

    def __init__(self) -> None:
        self.ttft = _Histogram(self.TTFT_BUCKETS)
        self.itl = _Histogram(self.ITL_BUCKETS)
        self.e2e = _Histogram(self.E2E_BUCKETS)

    async def timed(self, events: AsyncIterator[Event], received: float) -> AsyncIterator[Event]:
        """`events`, passed on as they arrive, timed (`received`: the request's arrival, time.monotonic())."""
        last: dict[int, float] = {}  # when each sequence's latest token arrived
        async for ev in events:
            now = time.monotonic()
            if ev.token is not None:  # an EOS too: it is an output token, as in vLLM
                previous = last.get(ev.index)
                if previous is None:
                    self.ttft.observe(now - received)
                else:
                    self.itl.observe(now - previous)
                last[ev.index] = now
            if ev.finish_reason is not None:
                self.e2e.observe(now - received)
            yield ev

    def text(self, model_name: str) -> str:
        name = model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        labels = f'model_name="{name}"'
        lines: list[str] = []
        for metric, help, histogram in [
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", self.itl),
            (
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds (vLLM's older name of the inter-token latency).",
                self.itl,
            ),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", self.e2e),
        ]:
            lines += [f"# HELP {metric} {help}", f"# TYPE {metric} histogram", *histogram.lines(metric, labels)]
        return "\n".join(lines) + "\n"


def _metrics_text(engine: Engine, responses: _ResponseCounter) -> str:
    s = engine.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, values: dict[str, float] | float) -> None:
        lines.append(f"# HELP {name} {help}")
        lines.append(f"# TYPE {name} {kind}")
        if isinstance(values, dict):
            for labels, v in values.items():
                lines.append(f"{name}{{{labels}}} {v:g}")
        else:
            lines.append(f"{name} {values:g}")

    outcomes = ("completed", "cancelled", "error", "aborted")
    metric(
        "mixtral_model_ready",
        "gauge",
        "1 once the model is loaded and requests are taken",
        int(engine.state == "ready"),
    )
    metric("mixtral_requests_total", "counter", "Generation requests accepted", s.requests_accepted)
    metric(
        "mixtral_requests_finished_total",
        "counter",
        "Accepted requests that ended, by outcome (aborted: cut by shutdown)",
        {f'outcome="{o}"': s.requests_finished[o] for o in outcomes},
    )
    metric(
        "mixtral_requests_rejected_total", "counter", "Requests refused because the queue was full", s.requests_rejected
    )
    metric(
        "mixtral_http_responses_total",
        "counter",
        "HTTP responses by status code",
        {f'code="{c}"': v for c, v in sorted(responses.by_code.items())},
    )
    metric("mixtral_prompt_tokens_total", "counter", "Prompt tokens prefilled", s.prompt_tokens)
    metric("mixtral_generation_tokens_total", "counter", "Tokens generated", s.generation_tokens)
    metric(
        "mixtral_generation_tokens_per_second",
        "gauge",
        "Tokens generated per second, last 10 s",
        engine.tokens_per_second(),
    )
    metric("mixtral_decode_steps_total", "counter", "Batched decode steps run", s.decode_steps)
    metric("mixtral_prefill_chunks_total", "counter", "Prompt chunks prefilled", s.prefill_chunks)
    metric("mixtral_queue_depth", "gauge", "Sequences waiting for a cache row", s.waiting)
    metric("mixtral_running_sequences", "gauge", "Sequences holding a cache row", s.running)
    metric("mixtral_cache_rows_free", "gauge", "Free KV-cache rows", s.rows_free)
    metric("mixtral_cache_rows", "gauge", "KV-cache rows (--max-batch)", engine.max_batch)
    # paged KV cache (0 with --no-paged-kv); prefix cache lookups in prompt tokens, as vLLM counts them
    metric("mixtral_kv_blocks_used", "gauge", "KV-cache blocks held by sequences", s.kv_blocks_used)
    metric("mixtral_kv_blocks_cached", "gauge", "KV-cache blocks held by none, kept for reuse", s.kv_blocks_cached)
    metric("mixtral_kv_blocks", "gauge", "KV-cache blocks in the pool", s.kv_blocks_total)
    metric("mixtral_prefix_cache_queries_total", "counter", "Prompt tokens looked up", s.prefix_cache_queries)
    metric("mixtral_prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache", s.prefix_cache_hits)
    return "\n".join(lines) + "\n"
