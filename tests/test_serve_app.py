"""The server's pieces in-process: /health while the model loads, a generation that fails midway, and the
sampling additions the server needs (presence/frequency penalties, logprobs)."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch
from fastapi.testclient import TestClient

import mixtral
from mixtral.kernels import cpu as cpu_kernels
from mixtral.sampling import SamplingParams, logprobs, process_logits
from mixtral.serve import Engine, create_app

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}


def wait_for(condition) -> None:
    for _ in range(3000):
        if condition():
            return
        threading.Event().wait(0.01)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mixtral.Transformer(mixtral.get_preset("tiny")).eval(), mixtral.load_tokenizer()


def test_health_is_503_while_loading_then_200(tiny):
    release = threading.Event()

    def load():
        release.wait(30)
        return tiny

    engine = Engine(load, max_batch=2)
    with TestClient(create_app(engine, model_name="tiny")) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["code"] == "unavailable"
        release.set()
        wait_for(lambda: client.get("/health").status_code == 200)
        assert client.get("/health").json() == {"status": "ok", "model": "tiny"}
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_health_is_503_until_the_cpu_kernels_are_built(tiny, monkeypatch):
    building, release = threading.Event(), threading.Event()

    def ops():  # a first run: the kernels build for a while after the model has loaded
        building.set()
        release.wait(30)

    monkeypatch.setattr(cpu_kernels, "ops", ops)
    engine = Engine(lambda: tiny, max_batch=2)
    with TestClient(create_app(engine, model_name="tiny")) as client:
        assert building.wait(30)
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 503
        release.set()
        wait_for(lambda: client.get("/health").status_code == 200)
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_load_failure_is_reported(tiny):
    def load():
        raise FileNotFoundError("no such checkpoint")

    engine = Engine(load)
    with TestClient(create_app(engine, model_name="tiny")) as client:
        wait_for(lambda: engine.state == "failed")
        r = client.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "failed", "error": "no such checkpoint"}


def test_a_failure_mid_stream_sends_an_error_frame_then_done_and_the_server_goes_on(tiny):
    model, tok = tiny
    calls = {"n": 0, "fail_at": 4}
    forward = model.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise RuntimeError("injected failure")
        return forward(*args, **kwargs)

    engine = Engine(lambda: (model, tok), max_batch=2)
    model.forward = flaky
    try:
        with TestClient(create_app(engine, model_name="tiny")) as client:
            wait_for(lambda: engine.state == "ready")
            with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                assert r.status_code == 200
                frames = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
            assert frames[-1] == "[DONE]"
            error = json.loads(frames[-2])["error"]
            assert "injected failure" in error["message"] and error["type"] == "server_error"
            assert any(json.loads(f).get("choices", [{}])[0].get("delta", {}).get("content") for f in frames[:-2])

            calls["fail_at"] = calls["n"] + 2  # the same, not streamed: a 500 in OpenAI's shape
            r = client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]

            r = client.post("/v1/chat/completions", json=CHAT)  # the engine still serves
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
            metrics = client.get("/metrics").text
            assert 'mixtral_requests_finished_total{outcome="error"} 2' in metrics
            assert "mixtral_cache_rows_free 2" in metrics
    finally:
        del model.forward


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = torch.zeros(6)
    history = torch.tensor([1, 1, 3, 3, 4])  # prompt [1, 1], then generated 3, 3, 4
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = process_logits(logits, params, history, prompt_len=2)
    assert out.tolist() == [0.0, 0.0, 0.0, -(0.5 + 2 * 0.25), -(0.5 + 0.25), 0.0]
    # Negative values encourage repeats; without prompt_len the whole history counts.
    out = process_logits(logits, SamplingParams(frequency_penalty=-1.0), history)
    assert out.tolist() == [0.0, 2.0, 0.0, 2.0, 1.0, 0.0]
    for name in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: 2.5})


def test_logprobs_are_the_model_distribution():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    lp, top = logprobs(logits, 2, top_n=2)
    expected = torch.log_softmax(logits, -1)
    assert math.isclose(lp, expected[2].item(), rel_tol=1e-6)
    assert [t for t, _ in top] == [1, 2] and math.isclose(top[0][1], expected[1].item(), rel_tol=1e-6)
    assert logprobs(logits, 0)[1] == []
