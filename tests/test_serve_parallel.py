"""`mixtral serve --ep 2` / `--tp 2` under torchrun (2 CPU processes, gloo): rank 0 serves HTTP and both
ranks run every step in lock-step. Its answers must equal single-process generation, alone and under
concurrent load, and a SIGTERM must drain the request in flight and end every rank.

Every wait is a bounded poll; nothing asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import torch
from test_serve import CHAT, MODEL, Server, ckpt, local, ref, sse_data, wait_until  # noqa: F401 - fixtures

from mixtral.serve import steps as steps_module

TORCHRUN = (str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2")
LAYOUTS = {"ep": ("--ep", "2"), "tp": ("--tp", "2")}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def server(request, ckpt, tmp_path_factory):  # noqa: F811 - the fixture
    log = tmp_path_factory.mktemp("log") / f"serve-{request.param}.log"
    s = Server(ckpt, log, "--max-batch", "4", *LAYOUTS[request.param], launcher=TORCHRUN)
    yield s
    s.stop()


def test_answers_equal_single_process_generation(server, ref):  # noqa: F811
    client = server.client()
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == local(ref, ref[1].encode_chat(CHAT), 12)[0]
    prompt = "Once upon a time"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=9, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == local(ref, ref[1].encode(prompt), 9)[0]
    seeded = client.completions.create(model=MODEL, prompt=prompt, max_tokens=9, temperature=1.0, seed=3)
    assert seeded.choices[0].text == local(ref, ref[1].encode(prompt), 9, temperature=1.0, seed=3)[0]


def test_concurrent_streams_equal_single_process_generation(server, ref):  # noqa: F811
    prompts = [f"Tale {i}: a {['cat', 'ship', 'tree'][i % 3]} once" for i in range(6)]

    async def one(aclient: openai.AsyncOpenAI, i: int) -> str:
        kw = dict(max_tokens=5 + 2 * i, seed=100 + i, temperature=0.0 if i % 2 else 0.9)
        stream = await aclient.completions.create(model=MODEL, prompt=prompts[i], stream=True, **kw)
        return "".join([c.choices[0].text async for c in stream])

    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        async with aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(6)))

    before = server.metrics()
    together = asyncio.run(run())
    for i, text in enumerate(together):
        kw = dict(seed=100 + i, temperature=0.0 if i % 2 else 0.9)
        assert text == local(ref, ref[1].encode(prompts[i]), 5 + 2 * i, **kw)[0], i
    m = server.metrics()
    steps = m["mixtral_decode_steps_total"] - before["mixtral_decode_steps_total"]
    assert steps < m["mixtral_generation_tokens_total"] - before["mixtral_generation_tokens_total"]  # batched
    assert m["mixtral_cache_rows_free"] == 4


def test_sigterm_drains_the_stream_in_flight_and_ends_every_rank(ckpt, tmp_path):  # noqa: F811
    s = Server(ckpt, tmp_path / "server.log", "--ep", "2", "--shutdown-timeout", "20", launcher=TORCHRUN)
    try:
        workers = psutil.Process(s.proc.pid).children()
        assert len(workers) == 2
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 60, "stream": True, "temperature": 0}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = [next(lines) for _ in range(3)]
            s.proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
            frames = sse_data(first + list(lines))
        assert frames[-1] == "[DONE]" and frames[-2]["choices"][0]["finish_reason"] == "length"
        s.proc.wait(60)
        wait_until(lambda: not any(w.is_running() for w in workers), 30, "every rank to exit")
        log = s.log.read_text()
        assert "mixtral serve: stopped" in log and "SIGKILL" not in log
    finally:
        s.stop()


# ---- the lock-step protocol, in one process -----------------------------------------------------------------------


class Recorder(steps_module.Steps):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def reset(self, rows=None):
        self.calls.append(("reset", rows))

    def prefill(self, row, tokens, start, every=False):
        self.calls.append(("prefill", row, tokens, start, every))

    def swap(self, a, b):
        self.calls.append(("swap", a, b))

    def decode(self, tokens_B, pos_B):
        self.calls.append(("decode", tokens_B.tolist(), pos_B.tolist()))


def test_follow_runs_what_rank_0_sends_until_stop(monkeypatch):
    sent = [("reset", [1]), ("ping",), ("prefill", 1, [5, 6], 0, False), ("swap", 1, 0), ("decode", [7], [2]),
            ("prefill", 0, [8], 2, True), ("stop",)]  # fmt: skip
    messages = iter(sent)
    monkeypatch.setattr("mixtral.parallel.broadcast_from_main", lambda value: next(messages))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # leave this process's handlers alone
    recorder = Recorder()
    assert steps_module.follow(recorder) == 5
    assert recorder.calls == [
        ("reset", [1]),
        ("prefill", 1, [5, 6], 0, False),
        ("swap", 1, 0),
        ("decode", [7], [2]),
        ("prefill", 0, [8], 2, True),  # every position's logits (prompt logprobs): the same on every rank
    ]
    monkeypatch.setattr("mixtral.parallel.broadcast_from_main", lambda value: ("resize", 3))
    with pytest.raises(RuntimeError, match="unknown step 'resize'"):
        steps_module.follow(recorder)


def test_rank_0_broadcasts_each_step_before_running_it_and_pings_while_idle(monkeypatch):
    sent: list[tuple] = []
    monkeypatch.setattr("mixtral.parallel.broadcast_from_main", lambda value: sent.append(value) or value)
    model = torch.nn.Module()
    lock = steps_module.LockstepSteps(model, cache=None)
    ran: list[str] = []
    monkeypatch.setattr(steps_module.Steps, "reset", lambda self, rows=None: ran.append(f"reset {rows} after {sent}"))
    lock.reset([2])
    assert ran == ["reset [2] after [('reset', [2])]"]
    lock.idle()
    assert len(sent) == 1  # just spoke: no ping yet
    monkeypatch.setattr(steps_module, "HEARTBEAT", 0.0)
    lock.idle()
    lock.close()
    lock.close()  # once only
    assert sent == [("reset", [2]), ("ping",), ("stop",)]


def test_an_impossible_layout_ends_every_rank_with_one_line(ckpt, tmp_path):  # noqa: F811
    cmd = [*TORCHRUN, "-m", "mixtral.serve", "--checkpoint", str(ckpt), "--port", "0", "--ep", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    # one per rank, before anything loads (the two ranks write to one pipe at once: their lines may interleave)
    assert out.stderr.count("mixtral serve: error:") == 2, out.stderr[-2000:]
    assert out.stderr.count("cannot split n_experts=8 over ep=3 ranks") == 2, out.stderr[-2000:]
    # torchrun prints its own traceback on a failed worker; the workers print none.
    assert not re.search(r'File ".*/mixtral/(serve/|cli\.py|parallel\.py|checkpoint\.py)', out.stderr)
