"""`mixtral serve` under load: throughput and latency at several concurrencies, against a peer in the same run:
llama.cpp's `llama-server` on the same weights (`--peer-llama-server PATH`), else the same model's offline batched
generation (`generate_stream`, no HTTP, no scheduler).

For each concurrency C, C clients each send streamed /v1/completions requests back to back (distinct prompts and
seeds, `--temperature`, a fixed max_tokens) until `--requests` have finished or `--duration` seconds have passed.
Each level sends prompts that no earlier level sent (a server's prompt cache would otherwise answer them).
Reported: output tokens/s over the level's wall time, time to first token (TTFT) and inter-token latency (ITL: the
gaps between a stream's token chunks), medians and p95, and the servers' peak RSS (VmHWM).

Workloads (`--workload`): `plain` (prompts of about `--prompt-tokens` tokens, each its own), `shared-prefix` (one
1,000-token system prompt before every short question: what prefix caching is for), `mixed` (long and short
prompts alternating: a long prefill arriving while other streams decode).

    .venv/bin/python benchmarks/serve.py [--preset tiny] [--concurrency 1 8 32] [--threads 2]
    .venv/bin/python benchmarks/serve.py --preset bench-791m --peer-llama-server PATH/llama-server [--formats bf16 int4]
    .venv/bin/python benchmarks/serve.py --checkpoint DIR      # a checkpoint of your own
    .venv/bin/python benchmarks/serve.py --url http://127.0.0.1:8000 --checkpoint DIR   # a running server

Without --url the script starts `python -m mixtral.serve --max-batch MAX(C)` itself and stops it at the end. With
`--peer-llama-server`, the weights are exported with `save_gguf` (BF16, or Q4_0 with a Q8_0 LM head / Q8_0 against
`--formats int4 / int8`, quantized by the gguf package from the same bf16 weights: the same formats as ours, whose
int4 models keep an int8 head) and `llama-server -np MAX(C) -cb` serves them; the
two servers run one at a time, level by level, alternating. llama.cpp is a benchmark dependency, never a runtime one
(docs/performance.md says how to build it). The clients run in this process: on a small machine they take CPU from
the servers, the same for both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import torch

import mixtral
from mixtral.checkpoint.gguf import save_gguf
from mixtral.generate import generate_stream
from mixtral.measure import machine_line
from mixtral.sampling import SamplingParams


@dataclass
class Result:
    ttft: float
    gaps: list[float] = field(default_factory=list)
    usage: int | None = None  # completion_tokens of the final usage chunk, where the server sends one
    chunks: int = 0  # text chunks: one token each where no usage is sent

    @property
    def tokens(self) -> int:
        return self.usage if self.usage is not None else self.chunks


@dataclass
class Server:
    name: str
    url: str
    model: str
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def run(self, *level_args) -> tuple:
        """`run_level(self, *level_args)`; a request that fails ends the benchmark, with the server's log."""
        try:
            return asyncio.run(run_level(self, *level_args))
        except httpx.HTTPError as e:
            state = "running" if self.proc is None or self.proc.poll() is None else f"exited ({self.proc.poll()})"
            tail = self.log.read_text(errors="replace")[-3000:] if self.log and self.log.exists() else ""
            sys.exit(f"{self.name} failed a request ({type(e).__name__}: {e}); it is {state}. Its log ends:\n{tail}")

    def peak_rss(self) -> int | None:
        """The server process's peak RSS (VmHWM), while it runs."""
        if self.proc is None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024
        except (OSError, StopIteration):
            return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, seed: int, max_tokens: int, temperature: float
):
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    last = None
    result = Result(ttft=float("nan"))
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                result.usage = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                result.chunks += 1
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - t0
                else:
                    result.gaps.append(now - last)
                last = now
    return result


WORDS = [  # the plain prompts' words
    *("the", "river", "ran", "past", "the", "old", "mill", "while", "the", "miller", "counted", "sacks", "of"),
    *("grain", "and", "sang", "about", "the", "weather", "in", "the", "hills", "where", "his", "brother", "kept"),
    *("sheep", "and", "goats", "through", "the", "long", "winter"),
]


def text_of_tokens(tok, n: int, start: int) -> str:
    """About `n` tokens of plain words (by the tokenizer), starting at word `start` of a fixed list."""
    words: list[str] = []
    i = start
    while len(tok.encode(" ".join(words), bos=False)) < n:
        words.extend(WORDS[(i + k) % len(WORDS)] for k in range(8))
        i += 8
    return " ".join(words)


def workload(name: str, tok, n_requests: int, prompt_tokens: int) -> list[str]:
    """The prompts of a workload (see the module's docstring), one per request."""
    question = [f"Question {i}: what is {i * 7919 % 1000} times {i % 13}?" for i in range(n_requests)]
    if name == "plain":
        return [f"{question[i]} {text_of_tokens(tok, prompt_tokens, i)}" for i in range(n_requests)]
    if name == "shared-prefix":
        system = text_of_tokens(tok, 1000, 0)
        return [f"{system}\n{question[i]}" for i in range(n_requests)]
    assert name == "mixed"
    return [f"{question[i]} {text_of_tokens(tok, 1000 if i % 2 else prompt_tokens, i)}" for i in range(n_requests)]


async def run_level(
    server: Server, prompts: list[str], concurrency: int, max_tokens: int, temperature: float, duration: float
) -> tuple:
    """`concurrency` clients sending `prompts` back to back, until all are sent or `duration` seconds (0: no
    limit) have passed; (the results, the wall time)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)
    results: list[Result] = []
    t0 = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty() and not (duration and time.perf_counter() - t0 > duration):
            i = queue.get_nowait()
            r = await one_request(client, server.url, server.model, prompts[i], i, max_tokens, temperature)
            results.append(r)

    # a new connection per request, for both servers: llama-server (cpp-httplib) closes a kept-alive connection after a
    # few requests, and a request sent on it as it closes fails ("Server disconnected without sending a response")
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return results, wall


def offline_tokens_per_second(path: Path, batch: int, max_tokens: int) -> float:
    """The in-process peer: the same model generating for a batch of `batch` prompts."""
    model, tok = mixtral.load_model(path), mixtral.load_tokenizer(path)
    prompts = [tok.encode(f"Request {i}: tell me about the number {i * 7919 % 1000}.") for i in range(batch)]
    params = [SamplingParams(max_new_tokens=max_tokens, temperature=1.0, seed=i) for i in range(batch)]
    list(generate_stream(model, prompts[:1], params[:1], eos_id=None))  # warm up
    t0 = time.perf_counter()
    n = sum(1 for _ in generate_stream(model, prompts, params, eos_id=None))
    return n / (time.perf_counter() - t0)


def start_server(
    path: Path, max_batch: int, threads: int, quantize: str | None, log: Path, extra: list[str] = ()
) -> Server:
    cmd = [sys.executable, "-m", "mixtral.serve", "--checkpoint", str(path), "--port", "0", "--model-name", "bench"]
    cmd += ["--max-batch", str(max_batch), "--max-queue", str(4 * max_batch), "--threads", str(threads), *extra]
    cmd += ["--log-level", "warning"] + (["--quantize", quantize] if quantize else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    return _ready(Server("mixtral serve", "", "bench", proc, log), log, r"listening on (http://\S+);")


def start_llama_server(binary: Path, gguf: Path, slots: int, ctx: int, threads: int, log: Path) -> Server:
    """llama.cpp's server on `gguf` with `slots` parallel sequences of `ctx` tokens each, continuous batching (run
    from its folder: it loads the libraries beside it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(binary.resolve()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads)]
    cmd += ["-np", str(slots), "-cb", "-c", str(slots * ctx)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), cwd=binary.resolve().parent)
    server = Server("llama-server", f"http://127.0.0.1:{port}", "bench", proc, log)
    return _ready(server, log, None)


def _ready(server: Server, log: Path, url_pattern: str | None) -> Server:
    """Wait until the server answers /health with 200 (600 s at most)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            sys.exit(f"{server.name} exited:\n{log.read_text()[-3000:]}")
        if not server.url and (m := re.search(url_pattern, log.read_text())):
            server.url = m.group(1)
        try:
            if server.url and httpx.get(server.url + "/health").status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.proc.kill()
    sys.exit(f"{server.name} did not become ready in 600 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: a random --preset model)")
    parser.add_argument("--preset", default="tiny", help="shape of the random model without --checkpoint")
    parser.add_argument("--url", help="benchmark this running server instead of starting one (needs --checkpoint)")
    parser.add_argument("--model", default="bench", help="model name the running server serves (with --url)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per level (at least the concurrency)")
    parser.add_argument("--duration", type=float, default=0, help="seconds per level at most (default: no limit)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    parser.add_argument("--prompt-tokens", type=int, default=100, help="prompt tokens of plain requests (about)")
    parser.add_argument("--workload", choices=["plain", "shared-prefix", "mixed"], default="plain")
    parser.add_argument(
        "--formats",
        "--quantize",
        nargs="+",
        choices=["bf16", "int8", "int4"],
        default=["bf16"],
        help="weight formats of ours, one after the other in this run (the peer: BF16 / Q8_0 / Q4_0)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of both servers")
    parser.add_argument("--peer-llama-server", type=Path, metavar="PATH", help="llama.cpp's llama-server binary")
    parser.add_argument(
        "--no-prefix-caching", action="store_true", help="serve ours with --no-prefix-caching (for the comparison)"
    )
    parser.add_argument(
        "--serve-args", default="", metavar="FLAGS", help="more flags for our server, e.g. '--prefill-budget 512'"
    )
    args = parser.parse_args()
    if args.url and not args.checkpoint:
        parser.error("--url needs the --checkpoint it serves (for the peer)")
    if args.url and len(args.formats) > 1:
        parser.error("--url benchmarks the one format the running server serves: give one --formats")
    if args.peer_llama_server and not args.peer_llama_server.is_file():
        parser.error(f"--peer-llama-server {args.peer_llama_server}: no such file")

    torch.set_num_threads(args.threads)
    print(machine_line())
    # each level sends prompts of its own, after two for the warm-up: a prompt that an earlier level sent would be
    # in the servers' prompt caches (llama-server keeps each slot's last prompt; ours its prefix blocks)
    per_level = max(args.requests, *args.concurrency)
    n_prompts = 2 + per_level * len(args.concurrency)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint
        if path is None:
            torch.manual_seed(0)
            path = Path(tmp) / args.preset
            config = mixtral.get_preset(args.preset)
            # a context that holds the workload's longest prompt and its answer (rotary positions go anywhere)
            tok = mixtral.load_tokenizer()
            longest = max(len(tok.encode(p)) for p in workload(args.workload, tok, n_prompts, args.prompt_tokens))
            if longest + args.max_tokens > config.max_seq_len:
                config = replace(config, max_seq_len=-(-(longest + args.max_tokens) // 256) * 256)
            model = mixtral.Transformer(config).to(torch.bfloat16)
            mixtral.save_model(model, path)
            del model
        tok = mixtral.load_tokenizer(path)
        config = mixtral.load_model(path).config
        total, active = config.param_counts()
        prompts = workload(args.workload, tok, n_prompts, args.prompt_tokens)
        lengths = sorted(len(tok.encode(p)) for p in prompts)
        print(
            f"model: {path.name} ({total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active), "
            f"{' then '.join(args.formats)}; workload {args.workload} (prompts of {lengths[0]}-{lengths[-1]} tokens); "
            f"{args.max_tokens} tokens per request, temperature {args.temperature}; {args.threads} thread(s); "
            f"prefix caching {'off' if args.no_prefix_caching else 'on'}"
            + (f"; our server with {args.serve_args}" if args.serve_args else "")
        )
        tables = []
        for fmt in args.formats:
            quantize = None if fmt == "bf16" else fmt
            tables.append(run_format(args, path, tok, prompts, lengths, per_level, quantize, Path(tmp)))
            print(f"\n{fmt}:\n{tables[-1]}", flush=True)
    if len(tables) > 1:
        print()
        for fmt, text in zip(args.formats, tables, strict=True):
            print(f"{fmt}:\n{text}\n")


def run_format(
    args: argparse.Namespace,
    path: Path,
    tok,
    prompts: list[str],
    lengths: list[int],
    per_level: int,
    quantize: str | None,
    tmp: Path,
) -> str:
    """Every level against ours served in `quantize` (None: bf16) and the peer in the matching format; the table."""
    servers: list[Server] = []
    try:
        if args.url:
            servers.append(Server("mixtral serve", args.url, args.model))
        else:
            extra = ["--no-prefix-caching"] if args.no_prefix_caching else []
            extra += shlex.split(args.serve_args)
            servers.append(start_server(path, max(args.concurrency), args.threads, quantize, tmp / "s.log", extra))
        peers = None
        if args.peer_llama_server:
            gguf_type = {"int8": "q8_0", "int4": "q4_0"}.get(quantize, "bf16")
            gguf = tmp / f"model-{gguf_type}.gguf"
            if not gguf.exists():
                save_gguf(mixtral.load_model(path, dtype=torch.bfloat16), gguf, tok, gguf_type)
            ctx = lengths[-1] + args.max_tokens + 16
            log = tmp / "llama.log"
            servers.append(
                start_llama_server(args.peer_llama_server, gguf, max(args.concurrency), ctx, args.threads, log)
            )
        else:
            peers = {c: offline_tokens_per_second(path, c, args.max_tokens) for c in args.concurrency}
        for server in servers:
            server.run(prompts[:2], 1, 4, args.temperature, 0)  # warm up
        rows = []
        for level, c in enumerate(args.concurrency):
            row = {}
            first = 2 + level * per_level
            for server in servers if c % 2 else servers[::-1]:  # alternate which goes first
                n = max(args.requests, c)
                level_prompts = prompts[first : first + n]
                results, wall = server.run(level_prompts, c, args.max_tokens, args.temperature, args.duration)
                row[server.name] = summary(results, wall)
            rows.append((c, row))
        rss = {server.name: server.peak_rss() for server in servers}
    finally:
        for server in servers:
            server.stop()
    return table(rows, [s.name for s in servers], peers, rss)


def summary(results: list[Result], wall: float) -> dict:
    ttft = [r.ttft * 1e3 for r in results]
    gaps = [g * 1e3 for r in results for g in r.gaps]
    return {
        "requests": len(results),
        "tok_s": sum(r.tokens for r in results) / wall,
        "ttft": (percentile(ttft, 50), percentile(ttft, 95)),
        "itl": (percentile(gaps, 50), percentile(gaps, 95)),
    }


def table(rows: list, names: list[str], peers: dict | None, rss: dict) -> str:
    """A markdown table: per concurrency, each server's tokens/s, TTFT and ITL (median / p95); the ratio of ours to
    the peer (llama-server, else offline batched generation)."""
    head = "| concurrency |"
    for name in names:
        head += f" {name} requests | tok/s | TTFT ms p50 / p95 | ITL ms p50 / p95 |"
    head += " ours / peer tok/s | TTFT p50 ours / peer |" if len(names) > 1 else " offline tok/s | ratio |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c, row in rows:
        line = f"| {c} |"
        for name in names:
            r = row[name]
            line += f" {r['requests']} | {r['tok_s']:.1f} | {r['ttft'][0]:.0f} / {r['ttft'][1]:.0f} |"
            line += f" {r['itl'][0]:.1f} / {r['itl'][1]:.1f} |"
        ours = row[names[0]]
        if len(names) > 1:
            peer = row[names[1]]
            line += f" {ours['tok_s'] / peer['tok_s']:.2f} | {ours['ttft'][0] / peer['ttft'][0]:.2f} |"
        else:
            line += f" {peers[c]:.1f} | {ours['tok_s'] / peers[c]:.2f} |"
        lines.append(line)
    lines.append("")
    lines.append("peak RSS: " + ", ".join(f"{n} {v / 1e9:.2f} GB" for n, v in rss.items() if v) or "peak RSS: -")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
