"""`mixtral serve`: the flags, and running the app under uvicorn with a graceful shutdown.

Kept light at import time (no fastapi, no uvicorn) so that `mixtral --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from .. import cli_args
from ..cli_args import CLIError


def add_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `serve` on the `mixtral` command's subparsers."""
    p = subparsers.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API (continuous batching)",
        description="Serve the model over HTTP with the OpenAI API: POST /v1/chat/completions and "
        "/v1/completions (streamed or not), GET /v1/models, POST /tokenize and /detokenize, /health and /metrics "
        "(Prometheus, with vLLM's latency histograms). vLLM's and llama-server's flag names work too. Requests "
        "join the running batch between decode steps. SIGTERM or Ctrl-C stops taking requests, lets those "
        "in flight finish (up to --shutdown-timeout) and exits; a second Ctrl-C exits at once. Under torchrun "
        "with --ep/--tp, rank 0 serves HTTP and every rank runs each step on its shard of the model "
        "(torchrun kills its workers 30 s after it is signalled: keep --shutdown-timeout below that).",
    )
    cli_args.add_model_flags(p)
    # vLLM's and llama-server's names for the same things, so their command lines carry over.
    p.add_argument(
        "--model", "-m", dest="checkpoint", metavar="DIR", default=argparse.SUPPRESS, help="the same as --checkpoint"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=8000, help="port to listen on, up to 65535; 0 picks a free one (default: 8000)"
    )
    p.add_argument(
        "--model-name",
        "--served-model-name",
        "--alias",
        "-a",
        metavar="NAME",
        help="the model id clients send as 'model' (default: the checkpoint folder's name)",
    )
    p.add_argument(
        "--max-batch",
        "--max-num-seqs",
        "--parallel",
        "-np",
        type=int,
        default=64,
        metavar="N",
        help="sequences decoded together, at most (default: 64); the paged KV cache's size (--kv-cache-tokens) "
        "bounds how many fit at once",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="sequences that may wait for a free row; beyond that requests get 429 (default: 64)",
    )
    p.add_argument(
        "--max-seq-len",
        "--max-model-len",
        "--ctx-size",
        "-c",
        type=int,
        metavar="N",
        help="tokens per sequence (prompt + completion) the KV cache holds; bounds its memory "
        "(default: the model's context)",
    )
    p.add_argument(
        "--kv-cache-tokens",
        type=int,
        metavar="N",
        help="positions the paged KV cache holds, all sequences together, in blocks of 16 taken as tokens arrive; "
        "a sequence is admitted when its prompt + max_tokens fit beside the others' (default: min(--max-batch, 8) x "
        "--max-seq-len; at least --max-seq-len)",
    )
    p.add_argument(
        "--no-prefix-caching",
        "--no-enable-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="do not reuse the KV blocks of prompt prefixes other requests computed (on by default)",
    )
    p.add_argument(
        "--no-paged-kv",
        dest="paged_kv",
        action="store_false",
        help="a KV cache of --max-batch rows x --max-seq-len allocated up front instead of the paged one (no "
        "prefix caching): the reference the paged cache is tested against",
    )
    p.add_argument(
        "--prefill-chunk",
        "--max-num-batched-tokens",
        type=int,
        default=512,
        metavar="N",
        help="prompt tokens per forward pass, and per scheduler turn while nothing decodes (default: 512)",
    )
    p.add_argument(
        "--prefill-budget",
        type=int,
        default=256,
        metavar="N",
        help="prompt tokens per scheduler turn while other streams decode (they wait for it: this bounds their "
        "time between tokens; the oldest prompt's next chunk runs every turn whatever its size; default: 256)",
    )
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("MIXTRAL_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $MIXTRAL_API_KEY; unset: no key)",
    )
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=4.0,
        metavar="MB",
        help="the largest request body taken, in MiB; larger ones get 413 (default: 4)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, seconds to let requests in flight finish before they are cut (default: 30)",
    )
    p.add_argument(
        "--log-level",
        "--uvicorn-log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        default="info",
        help="server log level (default: info)",
    )
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.add_argument(
        "--allowed-origins",
        nargs="+",
        metavar="ORIGIN",
        help="answer cross-origin (CORS) requests from these origins, e.g. http://localhost:3000, or '*' for any "
        "(default: none; browsers then refuse pages of other origins)",
    )
    p.add_argument(
        "--lora",
        "--lora-modules",
        nargs="+",
        metavar="NAME=PATH",
        help="LoRA adapters to serve on the base model, un-merged (PEFT's format or `mixtral train`'s "
        'out_dir/adapter): a request picks one with "model": NAME, and /v1/models lists them; rows of one batch '
        "may use different adapters (default: none)",
    )
    p.set_defaults(func=cmd_serve)
    return p


def parse_lora(items: list[str], model_name: str) -> dict[str, str]:
    """--lora NAME=PATH ... as {name: folder}, each folder checked to be an adapter (its files only)."""
    from ..train.lora import adapter_format

    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CLIError(f"--lora {item!r} is invalid: give NAME=PATH (the name requests send as 'model')")
        if name == model_name:
            raise CLIError(f"--lora {item!r}: {name!r} is the served model's own name; give the adapter another")
        if name in out:
            raise CLIError(f"--lora names {name!r} twice")
        try:
            adapter_format(path)
        except ValueError as e:
            raise CLIError(f"--lora {item!r}: {e}") from None
        out[name] = path
    return out


def cmd_serve(args: argparse.Namespace) -> None:
    import torch

    from ..checkpoint import find_checkpoint

    try:
        import uvicorn

        from .app import create_app
        from .engine import Engine
        from .server import Server
        from .steps import LockstepSteps, Steps
    except ImportError as e:
        raise CLIError(f"mixtral serve needs fastapi and uvicorn ({e}); pip install fastapi uvicorn") from e

    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port {args.port} is invalid: must be in [0, 65535] (0: a free port)")
    for flag, value, least in [
        ("--max-batch", args.max_batch, 1),
        ("--max-queue", args.max_queue, 0),
        ("--prefill-chunk", args.prefill_chunk, 1),
        ("--prefill-budget", args.prefill_budget, 1),
        ("--max-seq-len", args.max_seq_len if args.max_seq_len is not None else 1, 1),
        ("--kv-cache-tokens", args.kv_cache_tokens if args.kv_cache_tokens is not None else 1, 1),
    ]:
        if value < least:
            raise CLIError(f"{flag} {value} is invalid: must be >= {least}")
    if not args.max_body_mb > 0 or args.max_body_mb * 2**20 > 2**40:
        raise CLIError(f"--max-body-mb {args.max_body_mb} is invalid: must be > 0 (and at most 1 TiB)")
    if not args.shutdown_timeout >= 0:
        raise CLIError(f"--shutdown-timeout {args.shutdown_timeout} is invalid: must be >= 0")
    if args.api_key == "":
        raise CLIError("--api-key is empty")
    # Fail fast on what can be checked before the server starts (the weights load in the background).
    path = cli_args.checkpoint(args)
    ckpt = find_checkpoint(path)
    context = ckpt.config.max_seq_len
    if args.max_seq_len is not None and args.max_seq_len > context:
        raise CLIError(f"--max-seq-len {args.max_seq_len} is more than the model's context of {context} tokens")
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < (args.max_seq_len or context):
        raise CLIError(
            f"--kv-cache-tokens {args.kv_cache_tokens} cannot hold one sequence of "
            f"{args.max_seq_len or context} tokens (--max-seq-len)"
        )
    cli_args.device(args.device)
    model_name = args.model_name or path.resolve().name
    adapters = parse_lora(args.lora or [], model_name)
    lockstep = args.ep > 1 or args.tp > 1
    if adapters and (lockstep or args.compile):
        raise CLIError("--lora serves adapters in one process, without --compile, --ep or --tp")
    if lockstep:
        from .. import parallel

        parallel.check_layout(ckpt.config, args.ep, args.tp)  # before joining, so that every rank says it
        parallel.init_distributed(cli_args.device(args.device).type)
        parallel.check_layout(ckpt.config, args.ep, args.tp, torch.distributed.get_world_size())
        if not parallel.is_main_process():
            _follow(args)
            return
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    engine = Engine(
        lambda: cli_args.load(args),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_seq_len=args.max_seq_len,
        prefill_chunk=args.prefill_chunk,
        prefill_budget=args.prefill_budget,
        steps=LockstepSteps if lockstep else Steps,
        paged=args.paged_kv,
        kv_cache_tokens=args.kv_cache_tokens,
        prefix_caching=args.prefix_caching,
        adapters=adapters,
    )
    app = create_app(
        engine,
        model_name=model_name,
        api_key=args.api_key,
        max_body=int(args.max_body_mb * 2**20),
        allowed_origins=args.allowed_origins,
    )
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        access_log=args.access_log,
        lifespan="on",
        # A backstop only: the engine itself cuts what is left after --shutdown-timeout.
        timeout_graceful_shutdown=args.shutdown_timeout + 5,
    )
    server = Server(config, engine, args.shutdown_timeout, say=_say)

    def failed(error: BaseException) -> None:
        server.should_exit = True

    def ready() -> None:
        cache = engine.kv_cache_description()
        _say(f"ready: serving {model_name!r} at {url}/v1 (KV cache {cache})")

    engine.on_failure, engine.on_ready = failed, ready
    _say(f"listening on {url}; loading {path} (/health answers 503 until it is loaded and its kernels are ready)")
    server.run(sockets=[sock])
    if engine.load_error is not None:
        raise CLIError(f"loading the model failed: {engine.load_error}")
    if lockstep and not engine.closed:
        # The other ranks wait for a stop that will not come: a failed status makes torchrun end them.
        raise CLIError("the scheduler did not stop cleanly (see the log above); ending the other ranks")
    if lockstep:
        parallel.shutdown()
    _say("stopped")


def _follow(args: argparse.Namespace) -> None:
    """Every rank but 0 under torchrun: load this rank's shard, then run rank 0's steps until it stops."""
    from .. import parallel
    from .engine import make_cache
    from .steps import Steps, follow

    model, _ = cli_args.load(args)  # the same collectives, in the same order, as rank 0's loader
    context = args.max_seq_len or model.config.max_seq_len
    cache = make_cache(
        model,
        args.max_batch,
        context,
        kv_cache_tokens=args.kv_cache_tokens,
        paged=args.paged_kv,
        prefix_caching=args.prefix_caching,
    )
    follow(Steps(model, cache))
    parallel.shutdown()


def _say(message: str) -> None:
    print(f"mixtral serve: {message}", file=sys.stderr, flush=True)


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (uvicorn serves it), so the port is known before the server starts; the
    connections that arrive before uvicorn accepts them wait in the backlog."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise CLIError(f"--host {host!r} is not an address to listen on: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)  # now, not once uvicorn has started: the URL printed takes connections at once
    except OSError as e:
        sock.close()
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock
