"""`mixtral serve` end to end: the real server in a subprocess on 127.0.0.1 with a tiny random checkpoint,
spoken to with the official `openai` client (and raw httpx where the exact bytes matter).

Every wait is a bounded poll; nothing asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import torch
from conftest import assert_error

import mixtral
from mixtral.generate import generate_stream
from mixtral.sampling import SamplingParams

MODEL = "tiny"
MAX_BATCH = 8


# ---- helpers ------------------------------------------------------------------------------------------------


def wait_until(condition, timeout: float = 30.0, what: str = "condition"):
    """Poll `condition` until it returns something truthy (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Server:
    """`python -m mixtral.serve` (the same as `mixtral serve`) on a free port, ready when constructed;
    `launcher` replaces `python` (e.g. torchrun and its flags)."""

    def __init__(self, ckpt: Path, log: Path, *flags: str, launcher: tuple[str, ...] = (sys.executable,)) -> None:
        self.log = log
        cmd = [*launcher, "-m", "mixtral.serve", "--checkpoint", str(ckpt), "--port", "0"]
        cmd += ["--model-name", MODEL, "--threads", "1", "--log-level", "warning", *flags]
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f)
        self.url = wait_until(self._url, 60, "the server to listen")
        wait_until(lambda: self.health() == 200, 60, "the model to load")

    def _url(self) -> str | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()}")
        m = re.search(r"listening on (http://\S+);", self.log.read_text())
        return m.group(1) if m else None

    def health(self) -> int:
        return httpx.get(self.url + "/health").status_code

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        return {k: float(v) for k, v in re.findall(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def sse_data(lines) -> list:
    """The payloads of an SSE stream's data lines: parsed JSON, or the string "[DONE]"."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    mixtral.save_model(mixtral.Transformer(mixtral.get_preset("tiny")), path)
    return path


@pytest.fixture(scope="module")
def ref(ckpt):
    """The same model and tokenizer in this process: what the server must reproduce."""
    return mixtral.load_model(ckpt), mixtral.load_tokenizer(ckpt)


def local(ref, ids: list[int], max_tokens: int, **params) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of one sequence generated here, alone."""
    model, tok = ref
    sp = SamplingParams(max_new_tokens=max_tokens, **params)
    pieces, reason, n = [], None, 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server runs beside us on few cores: threads fighting over them are slow
    try:
        for ev in generate_stream(model, [ids], sp, tokenizer=tok, eos_id=tok.eos_id):
            pieces.append(ev.text)
            n += ev.token != tok.eos_id
            reason = ev.finish_reason or reason
    finally:
        torch.set_num_threads(threads)
    return "".join(pieces), reason, n


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    s = Server(ckpt, tmp_path_factory.mktemp("log") / "server.log", "--max-batch", str(MAX_BATCH))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]


# ---- the API ---------------------------------------------------------------------------------------------------


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    m = server.metrics()
    assert m["mixtral_model_ready"] == 1
    assert m["mixtral_cache_rows"] == MAX_BATCH
    for name in ("mixtral_queue_depth", "mixtral_running_sequences", "mixtral_generation_tokens_per_second"):
        assert name in m
    assert 'mixtral_requests_finished_total{outcome="cancelled"}' in m


def test_chat_equals_local_generation(client, ref):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    ids = ref[1].encode_chat(CHAT)
    text, reason, n = local(ref, ids, 12)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)


def test_completion_equals_local_generation(client, ref):
    prompt = "The meaning of life is"
    ids = ref[1].encode(prompt)
    text, _, _ = local(ref, ids, 10)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 10)
    # Token ids as the prompt give the same; without max_tokens a completion gets OpenAI's default, 16.
    assert client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0).choices[0].text == text
    assert client.completions.create(model=MODEL, prompt=prompt, temperature=0).usage.completion_tokens == 16


def test_chat_streaming(client, ref):
    ids = ref[1].encode_chat(CHAT)
    text, _, n = local(ref, ids, 12)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n == 12
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_completion_streaming(client, ref):
    ids = ref[1].encode("Once upon a time")
    text, _, _ = local(ref, ids, 9)
    chunks = list(
        client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=9, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for


def test_stop_strings(client, ref):
    ids = ref[1].encode_chat(CHAT)
    full, _, _ = local(ref, ids, 24)
    stop = full[10:13]
    expected = full[: full.index(stop)]
    assert local(ref, ids, 24, stop=(stop,))[:2] == (expected, "stop")
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stop=["\x00", stop])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected, "stop")
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stop=stop, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeds_and_n(client, ref):
    def chat(**kw):
        return client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=1.0, **kw)

    a = chat(seed=7).choices[0].message.content
    assert chat(seed=7).choices[0].message.content == a
    b = chat(seed=8).choices[0].message.content
    assert b != a
    assert a == local(ref, ref[1].encode_chat(CHAT), 10, temperature=1.0, seed=7)[0]
    # n choices: choice i is sampled with seed + i; usage counts the prompt once.
    r = chat(seed=7, n=2)
    assert [c.message.content for c in r.choices] == [a, b] and [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 20 and r.usage.prompt_tokens == len(ref[1].encode_chat(CHAT))
    chunks = list(chat(seed=7, n=2, stream=True))
    for i, want in enumerate([a, b]):
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) == want


def test_presence_and_frequency_penalties(client, ref):
    prompt = "Once upon a time"
    ids = ref[1].encode(prompt)
    plain, _, _ = local(ref, ids, 40)
    penalised, _, _ = local(ref, ids, 40, frequency_penalty=0.5, presence_penalty=0.3)
    assert penalised != plain  # this prompt repeats a token when greedy: the penalties change the output
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=40, temperature=0, frequency_penalty=0.5, presence_penalty=0.3
    )
    assert r.choices[0].text == penalised


def test_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert e.logprob == tops[0]  # greedy takes the most likely token
    assert b"".join(bytes(e.bytes) for e in content).decode() == r.choices[0].message.content

    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) == 2 for t in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=2).choices[0].logprobs is None


# ---- errors ------------------------------------------------------------------------------------------------------

CHAT_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION_BODY = {"model": MODEL, "prompt": "hi", "max_tokens": 4}

BAD = [
    ("chat", {"temperature": 3}, "temperature"),
    ("chat", {"temperature": "hot"}, "temperature"),
    ("chat", {"top_p": 0}, "top_p"),
    ("chat", {"top_k": -2}, "top_k"),
    ("chat", {"min_p": 1.5}, "min_p"),
    ("chat", {"max_tokens": 0}, "max_tokens"),
    ("chat", {"max_tokens": 2.5}, "max_tokens"),
    ("chat", {"n": 0}, "n"),
    ("chat", {"n": MAX_BATCH + 1}, "n"),
    ("chat", {"stop": [""]}, "stop"),
    ("chat", {"stop": 3}, "stop"),
    ("chat", {"seed": "x"}, "seed"),
    ("chat", {"presence_penalty": 2.5}, "presence_penalty"),
    ("chat", {"frequency_penalty": -3}, "frequency_penalty"),
    ("chat", {"logprobs": "yes"}, "logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"stream": "yes"}, "stream"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": "hi"}, "messages"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ("chat", {"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools"),
    ("chat", {"model": None}, "model"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [1, 40000]}, "prompt"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"echo": 1}, "echo"),
    ("completions", {"max_tokens": 0}, "max_tokens"),  # 0 only with echo or prompt_logprobs
    ("completions", {"best_of": 3}, "best_of"),
]


def post(server, route: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    return httpx.post(f"{server.url}/v1/{route}", content=content, headers={"content-type": "application/json"}, **kw)


def test_invalid_parameters_are_400_naming_the_parameter(server):
    for route, change, param in BAD:
        base = CHAT_BODY if route == "chat" else COMPLETION_BODY
        body = {k: v for k, v in {**base, **change}.items() if v is not None}
        error = assert_error(post(server, f"{route}/completions" if route == "chat" else route, body), 400, param)
        assert error["type"] == "invalid_request_error"
        assert param in error["message"], error["message"]
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=MODEL, messages=CHAT, temperature=-1)
    assert e.value.param == "temperature"


def test_invalid_json_is_400(server):
    assert_error(post(server, "chat/completions", "{not json"), 400)
    assert_error(post(server, "chat/completions", "[1, 2]"), 400)


def test_context_length(server, ref):
    ids = ref[1].encode_chat(CHAT)
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=600)
    message = e.value.body["message"]
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    assert "512" in message and str(len(ids)) in message and "600" in message, message
    long_prompt = "word " * 600
    n = len(ref[1].encode(long_prompt))
    error = assert_error(post(server, "completions", {**COMPLETION_BODY, "prompt": long_prompt}), 400, "prompt")
    assert "512" in error["message"] and str(n) in error["message"], error["message"]


def test_unknown_model_and_route_are_404(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    assert e.value.code == "model_not_found"
    assert_error(httpx.get(server.url + "/v1/models/gpt-4"), 404, "model")
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_error(httpx.get(server.url + "/v1/chat/completions"), 405)


def test_client_disconnect_cancels_and_frees_the_row(server):
    before = server.metrics()
    body = {**COMPLETION_BODY, "max_tokens": 500, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        frames = 0
        for line in r.iter_lines():
            frames += line.startswith("data: ")
            if frames == 3:
                break  # leaving the block closes the connection mid-stream

    def cancelled(m):
        return m['mixtral_requests_finished_total{outcome="cancelled"}']

    m = wait_until(
        lambda: (
            (m := server.metrics())["mixtral_running_sequences"] == 0 and cancelled(m) == cancelled(before) + 1 and m
        ),
        what="the cancelled stream's row to be freed",
    )
    assert m["mixtral_cache_rows_free"] == MAX_BATCH
    assert m["mixtral_generation_tokens_total"] - before["mixtral_generation_tokens_total"] < 500

    # A non-streamed request whose client gives up is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        post(server, "completions", {**COMPLETION_BODY, "max_tokens": 500}, timeout=httpx.Timeout(10, read=0.2))
    wait_until(
        lambda: (m := server.metrics())["mixtral_running_sequences"] == 0 and cancelled(m) == cancelled(before) + 2,
        what="the abandoned request to be cancelled",
    )


def test_load_32_concurrent_streams_equal_their_solo_results(server, ref):
    prompts = [f"Story {i}: once there was a {['cat', 'ship', 'tree', 'king'][i % 4]} that" for i in range(32)]

    async def one(aclient: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
        kw = dict(model=MODEL, max_tokens=6 + (i % 4) * 3, seed=1000 + i, temperature=0.0 if i % 4 == 0 else 0.9)
        if i % 2:
            stream = await aclient.completions.create(prompt=prompts[i], stream=True, **kw)
            parts = [(c.choices[0].text, c.choices[0].finish_reason) async for c in stream]
        else:
            messages = [{"role": "user", "content": prompts[i]}]
            stream = await aclient.chat.completions.create(messages=messages, stream=True, **kw)
            parts = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) async for c in stream]
        return "".join(p for p, _ in parts), next(f for _, f in parts if f)

    async def run(indices, concurrent: bool) -> list:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        async with aclient:
            if concurrent:
                return await asyncio.gather(*(one(aclient, i) for i in indices))
            return [await one(aclient, i) for i in indices]

    solo = asyncio.run(run(range(32), concurrent=False))
    process = psutil.Process(server.proc.pid)
    baseline = process.memory_info().rss
    before = server.metrics()
    together = asyncio.run(run(range(32), concurrent=True))
    assert together == solo
    assert len({text for text, _ in solo}) >= 24  # the requests really went different ways
    assert server.health() == 200
    m = server.metrics()
    assert m["mixtral_running_sequences"] == m["mixtral_queue_depth"] == 0
    assert m["mixtral_cache_rows_free"] == MAX_BATCH
    done = 'mixtral_requests_finished_total{outcome="completed"}'
    assert m[done] - before[done] == 32
    # More than one sequence was decoded per step: they really ran together.
    steps = m["mixtral_decode_steps_total"] - before["mixtral_decode_steps_total"]
    assert steps < m["mixtral_generation_tokens_total"] - before["mixtral_generation_tokens_total"]
    assert process.memory_info().rss < baseline + 64 * 2**20


# ---- limits, keys and shutdown (servers of their own) ---------------------------------------------------------------


def test_queue_full_is_429_and_the_api_key_is_required(ckpt, tmp_path):
    s = Server(ckpt, tmp_path / "server.log", "--max-batch", "1", "--max-queue", "1", "--api-key", "sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert_error(post(s, "completions", COMPLETION_BODY), 401, code="invalid_api_key")
        assert s.health() == 200 and httpx.get(s.url + "/metrics").status_code == 200
        auth = {"Authorization": "Bearer sekret"}
        with contextlib.ExitStack() as stack:
            http = stack.enter_context(httpx.Client(headers=auth, timeout=60))
            body = {**COMPLETION_BODY, "max_tokens": 500, "stream": True}
            running = stack.enter_context(http.stream("POST", s.url + "/v1/completions", json=body))
            running_lines = running.iter_lines()  # kept: a line iterator that is closed closes the response
            next(line for line in running_lines if line.startswith("data: "))  # it holds the only row
            body = {**CHAT_BODY, "stream": True, "max_tokens": 3}
            queued = stack.enter_context(http.stream("POST", s.url + "/v1/chat/completions", json=body))
            wait_until(lambda: s.metrics()["mixtral_queue_depth"] == 1, what="the second request to queue")
            with pytest.raises(openai.RateLimitError) as e:
                s.client("sekret").chat.completions.create(**CHAT_BODY)
            assert e.value.code == "queue_full" and e.value.response.headers["retry-after"]
            running.close()  # the first client leaves: the queued request gets the row
            frames = sse_data(queued.iter_lines())
        assert frames[-1] == "[DONE]" and frames[-2]["choices"][0]["finish_reason"] == "length"
        m = s.metrics()
        assert m["mixtral_requests_rejected_total"] == 1
        assert m['mixtral_requests_finished_total{outcome="cancelled"}'] == 1
        assert m['mixtral_http_responses_total{code="429"}'] == 1
    finally:
        s.stop()


def test_sigterm_drains_the_stream_in_flight_then_exits_cleanly(ckpt, tmp_path):
    s = Server(ckpt, tmp_path / "server.log", "--shutdown-timeout", "60")
    try:
        body = {**CHAT_BODY, "max_tokens": 200, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = [next(lines) for _ in range(3)]
            s.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: "SIGTERM" in s.log.read_text(), what="the server to take the signal")

            def refused() -> bool:
                try:
                    assert httpx.post(s.url + "/v1/chat/completions", json=CHAT_BODY).status_code == 503
                except (httpx.ConnectError, httpx.RemoteProtocolError):  # refused, or closed unanswered
                    return True
                return False

            wait_until(refused, what="new connections to be refused")
            frames = sse_data(first + list(lines))
        assert frames[-1] == "[DONE]" and frames[-2]["usage"]["completion_tokens"] == 200
        assert s.proc.wait(30) == 0
        assert "SIGTERM" in s.log.read_text()
    finally:
        s.stop()


def test_sigterm_cuts_streams_that_outlast_the_shutdown_timeout(ckpt, tmp_path):
    s = Server(ckpt, tmp_path / "server.log", "--shutdown-timeout", "0")
    try:
        body = {**COMPLETION_BODY, "max_tokens": 500, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            s.proc.send_signal(signal.SIGTERM)
            frames = sse_data([first, *lines])
        assert frames[-1] == "[DONE]"
        assert "shutting down" in frames[-2]["error"]["message"]
        assert s.proc.wait(30) == 0
    finally:
        s.stop()


def test_bad_flags_and_checkpoints_end_with_one_line_and_status_2(ckpt, tmp_path):
    def serve(*flags: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "mixtral.serve", "--port", "0", *flags]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    r = serve("--checkpoint", str(tmp_path / "missing"))
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr
    r = serve("--checkpoint", str(ckpt), "--max-batch", "0")
    assert r.returncode == 2 and "--max-batch 0" in r.stderr
    # A checkpoint that fails only once the weights load (after the server started listening).
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((ckpt / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:1000])
    r = serve("--checkpoint", str(bad), "--log-level", "warning")
    assert r.returncode == 2 and "loading the model failed" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_second_signal_during_the_drain_exits_at_once_and_cleanly(ckpt, tmp_path, sig):
    s = Server(ckpt, tmp_path / "server.log", "--shutdown-timeout", "120")
    try:
        body = {**CHAT_BODY, "max_tokens": 400, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            s.proc.send_signal(sig)
            wait_until(lambda: sig.name in s.log.read_text(), what="the server to take the first signal")
            s.proc.send_signal(sig)
            code = s.proc.wait(30)  # not the 120 s of the drain
            with contextlib.suppress(httpx.HTTPError):
                for _ in lines:
                    pass
        log = s.log.read_text()
        assert code == 128 + sig, log
        assert "exiting now" in log
        assert "Traceback" not in log and "terminate called" not in log, log
    finally:
        s.stop()


def test_a_port_out_of_range_is_refused(ckpt):
    cmd = [sys.executable, "-m", "mixtral.serve", "--checkpoint", str(ckpt), "--port", "99999"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--port 99999" in r.stderr and "65535" in r.stderr
    assert "Traceback" not in r.stderr and "listening" not in r.stderr
