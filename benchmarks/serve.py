"""`mixtral serve` under load: throughput and latency at several concurrencies, against the same model's
offline batched generation (`generate_stream`, no HTTP, no scheduler) in the same run as the peer.

For each concurrency C, C clients each send streamed /v1/completions requests back to back (distinct
prompts and seeds, temperature 1, a fixed max_tokens) until `--requests` have finished. Reported:
output tokens/s over the level's wall time, time to first token (TTFT) and inter-token latency (ITL:
the gaps between a stream's token chunks) percentiles, and the ratio to offline generation of a batch
of C prompts.

    .venv/bin/python benchmarks/serve.py [--preset tiny] [--concurrency 1 8 32] [--threads 1]
    .venv/bin/python benchmarks/serve.py --checkpoint DIR      # a checkpoint of your own
    .venv/bin/python benchmarks/serve.py --url http://127.0.0.1:8000 --checkpoint DIR   # a running server

Without --url the script starts `python -m mixtral.serve --max-batch MAX(C)` itself and stops it at
the end. The clients run in this process: on a small machine they take CPU from the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

import mixtral
from mixtral.bench import machine_line
from mixtral.generate import generate_stream
from mixtral.sampling import SamplingParams


@dataclass
class Result:
    ttft: float
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, seed: int, max_tokens: int):
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 1.0,
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
                result.tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - t0
                else:
                    result.gaps.append(now - last)
                last = now
    return result


async def run_level(url: str, model: str, concurrency: int, n_requests: int, max_tokens: int) -> tuple:
    prompts = [f"Request {i}: tell me about the number {i * 7919 % 1000}." for i in range(n_requests)]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    results: list[Result] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            results.append(await one_request(client, url, model, prompts[i], i, max_tokens))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return results, wall


def offline_tokens_per_second(path: Path, batch: int, max_tokens: int) -> float:
    """The peer: the same model generating for a batch of `batch` prompts in-process."""
    model, tok = mixtral.load_model(path), mixtral.load_tokenizer(path)
    prompts = [tok.encode(f"Request {i}: tell me about the number {i * 7919 % 1000}.") for i in range(batch)]
    params = [SamplingParams(max_new_tokens=max_tokens, temperature=1.0, seed=i) for i in range(batch)]
    list(generate_stream(model, prompts[:1], params[:1], eos_id=None))  # warm up
    t0 = time.perf_counter()
    n = sum(1 for _ in generate_stream(model, prompts, params, eos_id=None))
    return n / (time.perf_counter() - t0)


def start_server(path: Path, max_batch: int, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "mixtral.serve", "--checkpoint", str(path), "--port", "0", "--model-name", "bench"]
    cmd += ["--max-batch", str(max_batch), "--max-queue", str(4 * max_batch), "--threads", str(threads)]
    cmd += ["--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 600
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited:\n{log.read_text()}")
        if url is None and (m := re.search(r"listening on (http://\S+);", log.read_text())):
            url = m.group(1)
        if url is not None and httpx.get(url + "/health").status_code == 200:
            return proc, url
        time.sleep(0.1)
    proc.kill()
    sys.exit("the server did not become ready in 600 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: a random --preset model)")
    parser.add_argument("--preset", default="tiny", help="shape of the random model without --checkpoint")
    parser.add_argument("--url", help="benchmark this running server instead of starting one (needs --checkpoint)")
    parser.add_argument("--model", default="bench", help="model name the running server serves (with --url)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per level (at least the concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the peer")
    args = parser.parse_args()
    if args.url and not args.checkpoint:
        parser.error("--url needs the --checkpoint it serves (for the offline peer)")

    torch.set_num_threads(args.threads)
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint
        if path is None:
            torch.manual_seed(0)
            path = Path(tmp) / args.preset
            mixtral.save_model(mixtral.Transformer(mixtral.get_preset(args.preset)), path)
        config = mixtral.load_model(path).config
        total, active = config.param_counts()
        print(
            f"model: {path.name} ({total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active); "
            f"{args.max_tokens} tokens per request, temperature 1; server and peer on {args.threads} torch thread(s)"
        )
        peers = {c: offline_tokens_per_second(path, c, args.max_tokens) for c in args.concurrency}

        proc, url, model = None, args.url, args.model
        if url is None:
            proc, url = start_server(path, max(args.concurrency), args.threads, Path(tmp) / "server.log")
            model = "bench"
        try:
            asyncio.run(run_level(url, model, 1, 2, 4))  # warm up
            rows = []
            for c in args.concurrency:
                results, wall = asyncio.run(run_level(url, model, c, max(args.requests, c), args.max_tokens))
                tokens = sum(r.tokens for r in results)
                ttft = [r.ttft * 1e3 for r in results]
                gaps = [g * 1e3 for r in results for g in r.gaps]
                rate = tokens / wall
                rows.append(
                    f"| {c} | {len(results)} | {rate:.0f} | {peers[c]:.0f} | {rate / peers[c]:.2f} | "
                    f"{percentile(ttft, 50):.0f} / {percentile(ttft, 90):.0f} / {percentile(ttft, 99):.0f} | "
                    f"{percentile(gaps, 50):.1f} / {percentile(gaps, 90):.1f} / {percentile(gaps, 99):.1f} | "
                    f"{statistics.mean(r.ttft + sum(r.gaps) for r in results):.2f} |"
                )
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    print()
    print(
        "| concurrency | requests | server tokens/s | offline batch tokens/s | ratio | "
        "TTFT ms p50 / p90 / p99 | ITL ms p50 / p90 / p99 | mean request s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
