"""What `mixtral serve` shares with the tools people already use: vLLM's and llama-server's flag names, CORS,
HEAD /health, vLLM's latency histograms, /tokenize and /detokenize, vLLM's request extensions, unknown fields
refused, logprob token text as OpenAI writes it, and the prompt's logprobs (echo, prompt_logprobs) that
evaluation harnesses read. In-process (FastAPI's TestClient) on the tiny model."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from conftest import assert_error
from fastapi.testclient import TestClient

import mixtral
from mixtral.cli import build_parser
from mixtral.generate import generate_stream
from mixtral.sampling import SamplingParams, TokenLogprob
from mixtral.serve import Engine, create_app
from mixtral.serve.protocol import chat_logprobs, completion_logprobs, token_text

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mixtral.Transformer(mixtral.get_preset("tiny")).eval(), mixtral.load_tokenizer()


def serve(tiny, prefill_chunk: int = 512, **kwargs) -> TestClient:
    engine = Engine(lambda: tiny, max_batch=4, prefill_chunk=prefill_chunk)
    client = TestClient(create_app(engine, model_name="tiny", **kwargs), raise_server_exceptions=False)
    client.__enter__()
    deadline = time.monotonic() + 600  # a first run builds the CPU kernels (minutes on a busy machine)
    while engine.state == "loading" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.state == "ready"
    return client


@pytest.fixture(scope="module")
def client(tiny):
    c = serve(tiny)
    yield c
    c.__exit__(None, None, None)


def assert_still_serves(client) -> None:
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


# ---- A. conventions -------------------------------------------------------------------------------------------


def test_vllm_and_llama_server_flag_names_are_aliases():
    parse = build_parser().parse_args
    ours = parse(["serve", "--checkpoint", "ck", "--model-name", "m", "--max-seq-len", "64", "--max-batch", "3"])
    for argv in (
        ["serve", "--model", "ck", "--served-model-name", "m", "--max-model-len", "64", "--max-num-seqs", "3"],
        ["serve", "-m", "ck", "--alias", "m", "--ctx-size", "64", "--parallel", "3"],
        ["serve", "-m", "ck", "-a", "m", "-c", "64", "-np", "3"],
    ):
        args = parse(argv)
        assert (args.checkpoint, args.model_name, args.max_seq_len, args.max_batch) == ("ck", "m", 64, 3), argv
    assert ours.checkpoint == "ck" and parse(["serve"]).checkpoint is None
    assert parse(["serve", "--max-num-batched-tokens", "128"]).prefill_chunk == 128
    assert parse(["serve", "--uvicorn-log-level", "debug"]).log_level == "debug"
    assert parse(["serve"]).allowed_origins is None
    assert parse(["serve", "--allowed-origins", "http://a", "*"]).allowed_origins == ["http://a", "*"]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0
    assert re.fullmatch(r"mixtral \S+.*\n", capsys.readouterr().out)


def test_head_health(client):
    r = client.head("/health")
    assert r.status_code == 200 and r.content == b""
    assert client.get("/health").json()["status"] == "ok"


def test_cors_is_off_by_default(client):
    r = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": "http://ui.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = client.options("/v1/chat/completions", headers=preflight("http://ui.example"))
    assert "access-control-allow-origin" not in r.headers


def preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }


def test_allowed_origins_answer_cors_requests_errors_included(tiny):
    client = serve(tiny, allowed_origins=["http://ui.example"], api_key="k")
    try:
        r = client.options("/v1/chat/completions", headers=preflight("http://ui.example"))
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        auth = {"Origin": "http://ui.example", "Authorization": "Bearer k"}
        r = client.post("/v1/chat/completions", json=CHAT, headers=auth)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.example"
        r = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": "http://ui.example"})
        assert_error(r, 401, code="invalid_api_key")  # a browser can read why
        assert r.headers["access-control-allow-origin"] == "http://ui.example"
        r = client.post("/v1/chat/completions", json=CHAT, headers={**auth, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = client.options("/v1/chat/completions", headers=preflight("http://evil.example"))
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    finally:
        client.__exit__(None, None, None)
    client = serve(tiny, allowed_origins=["*"])
    try:
        r = client.get("/v1/models", headers={"Origin": "http://anywhere.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    finally:
        client.__exit__(None, None, None)


def histogram(text: str, name: str) -> tuple[list[tuple[float, int]], float, int]:
    """(cumulative buckets, sum, count) of histogram `name` for model "tiny" in /metrics text."""
    buckets = [
        (float(le), int(v))
        for le, v in re.findall(rf'^{re.escape(name)}_bucket\{{model_name="tiny",le="([^"]+)"\}} (\S+)$', text, re.M)
    ]
    total = float(re.search(rf'^{re.escape(name)}_sum\{{model_name="tiny"\}} (\S+)$', text, re.M).group(1))
    count = int(re.search(rf'^{re.escape(name)}_count\{{model_name="tiny"\}} (\S+)$', text, re.M).group(1))
    return buckets, total, count


def test_metrics_have_vllms_latency_histograms(tiny):
    client = serve(tiny)
    try:
        text = client.get("/metrics").text
        for name in ("time_to_first_token", "inter_token_latency", "time_per_output_token", "e2e_request_latency"):
            assert f"# TYPE vllm:{name}_seconds histogram" in text
            assert histogram(text, f"vllm:{name}_seconds")[2] == 0
        assert "mixtral_requests_total 0" in text  # beside ours

        tokens = 0
        r = client.post("/v1/chat/completions", json=CHAT)
        tokens += r.json()["usage"]["completion_tokens"] + (r.json()["choices"][0]["finish_reason"] == "stop")
        with client.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True, "n": 2}) as r:
            assert r.status_code == 200
            frames = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        reasons = [c["finish_reason"] for f in frames for c in f["choices"] if c["finish_reason"]]
        assert len(reasons) == 2
        r = client.post("/v1/completions", json={**COMPLETION, "n": 2})
        tokens += r.json()["usage"]["completion_tokens"] * 2  # the streamed pair was the same greedy pair
        tokens += sum(c["finish_reason"] == "stop" for c in r.json()["choices"]) * 2
        sequences = 5

        text = client.get("/metrics").text
        ttft, itl, e2e = (
            histogram(text, f"vllm:{n}_seconds")
            for n in ("time_to_first_token", "inter_token_latency", "e2e_request_latency")
        )
        assert ttft[2] == e2e[2] == sequences
        assert itl[2] == tokens - sequences  # one gap per token after each sequence's first (EOS included)
        assert histogram(text, "vllm:time_per_output_token_seconds") == itl
        for (buckets, total, count), bounds in [
            (ttft, (0.001, 2560.0)),
            (itl, (0.01, 80.0)),
            (e2e, (0.3, 7680.0)),
        ]:
            les = [le for le, _ in buckets]
            assert (les[0], les[-2], les[-1]) == (*bounds, float("inf"))  # vLLM's buckets
            counts = [v for _, v in buckets]
            assert counts == sorted(counts) and counts[-1] == count and total > 0
        assert ttft[1] <= e2e[1]
    finally:
        client.__exit__(None, None, None)


# ---- B. /tokenize and /detokenize -------------------------------------------------------------------------------


def test_tokenize_and_detokenize_as_vllm(client, tiny):
    _, tok = tiny
    r = client.post("/tokenize", json={"model": "tiny", "prompt": "Hello world"})
    assert r.status_code == 200, r.text
    ids = tok.encode("Hello world")
    context = client.get("/v1/models").json()["data"][0]["max_model_len"]
    assert context > 0
    assert r.json() == {"count": len(ids), "max_model_len": context, "tokens": ids, "token_strs": None}
    r = client.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False, "return_token_strs": True})
    assert r.json()["tokens"] == ids[1:] and r.json()["token_strs"] == [tok.id_to_piece(i) for i in ids[1:]]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    r = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": True})
    assert r.json()["tokens"] == tok.encode_chat(messages) and r.json()["count"] == len(tok.encode_chat(messages))

    r = client.post("/detokenize", json={"model": "tiny", "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": "Hello world"}
    assert client.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(
    "route, body, status, param",
    [
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400, None),
        ("/tokenize", {}, 400, None),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
        ("/tokenize", {"messages": [{"role": "robot", "content": "a"}]}, 400, "messages"),
        ("/tokenize", {"messages": [{"role": "assistant", "content": "a"}]}, 400, "messages"),
        ("/tokenize", {"prompt": "a", "promt": "b"}, 400, "promt"),
        ("/tokenize", {"prompt": "a", "model": "other"}, 404, "model"),
        ("/detokenize", {"tokens": [1, -1]}, 400, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": "hi"}, 400, "tokens"),
        ("/detokenize", {"tokens": [1, True]}, 400, "tokens"),
        ("/detokenize", {}, 400, "tokens"),
        ("/detokenize", {"tokens": [1], "prompt": "x"}, 400, "prompt"),
        ("/detokenize", "[1, 2]", 400, None),
        ("/detokenize", "{not json", 400, None),
    ],
)
def test_tokenize_errors_are_openai_shaped_400s(client, route, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = client.post(route, content=content, headers={"content-type": "application/json"})
    error = assert_error(r, status, param)
    if param is not None:
        assert param in error["message"]
    assert client.post("/tokenize", json={"prompt": "a"}).json()["count"] == 2  # a good request still works


def test_tokenize_needs_the_api_key_and_the_model(tiny):
    client = serve(tiny, api_key="k")
    try:
        assert_error(client.post("/tokenize", json={"prompt": "a"}), 401, code="invalid_api_key")
        assert_error(client.post("/detokenize", json={"tokens": [1]}), 401, code="invalid_api_key")
        r = client.post("/tokenize", json={"prompt": "a"}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and r.json()["count"] == 2
    finally:
        client.__exit__(None, None, None)


# ---- C. request fields ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "route, change, param",
    [
        ("chat/completions", {"max_token": 5}, "max_token"),
        ("completions", {"top_logprobs": 2}, "top_logprobs"),
        ("completions", {"messages": []}, "messages"),
        ("chat/completions", {"skip_special_tokens": False}, "skip_special_tokens"),
        ("chat/completions", {"add_generation_prompt": False}, "add_generation_prompt"),
        ("completions", {"use_beam_search": True}, "use_beam_search"),
        ("chat/completions", {"ignore_eos": "yes"}, "ignore_eos"),
        ("completions", {"min_tokens": -1}, "min_tokens"),
        ("completions", {"min_tokens": 7, "max_tokens": 6}, "min_tokens"),
        ("chat/completions", {"stop_token_ids": 2}, "stop_token_ids"),
        ("chat/completions", {"stop_token_ids": [2, "3"]}, "stop_token_ids"),
        ("completions", {"stop_token_ids": [32000]}, "stop_token_ids"),
        ("completions", {"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_unknown_and_bad_fields_are_400s_naming_them(client, route, change, param):
    base = CHAT if route.startswith("chat") else COMPLETION
    error = assert_error(client.post(f"/v1/{route}", json={**base, **change}), 400, param)
    assert param in error["message"] and error["type"] == "invalid_request_error"


def test_known_fields_at_their_defaults_are_served(client):
    extras = {
        "user": "u1",
        "metadata": {"k": "v"},
        "store": False,
        "skip_special_tokens": True,
        "spaces_between_special_tokens": True,
        "include_stop_str_in_output": False,
        "ignore_eos": False,
        "min_tokens": 0,
        "stop_token_ids": [],
    }
    plain = client.post("/v1/chat/completions", json=CHAT).json()["choices"]
    r = client.post("/v1/chat/completions", json={**CHAT, **extras, "add_generation_prompt": True, "echo": False})
    assert r.status_code == 200, r.text
    assert r.json()["choices"] == plain
    r = client.post("/v1/completions", json={**COMPLETION, **extras})
    assert r.status_code == 200, r.text


def test_vllm_extensions(client, tiny):
    model, tok = tiny
    params = SamplingParams(max_new_tokens=8)
    greedy = [ev.token for ev in generate_stream(model, [tok.encode("Hello")], params, tokenizer=tok, eos_id=None)]
    # min_tokens = max_tokens: exactly that many tokens, whatever the model wants (EOS masked until then).
    r = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 8, "min_tokens": 8}).json()
    assert r["usage"]["completion_tokens"] == 8 and r["choices"][0]["finish_reason"] == "length"
    # A stop token ends the generation with finish_reason "stop"; it is not part of the text.
    r = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 8, "stop_token_ids": [greedy[2]]}).json()
    cut = greedy.index(greedy[2])  # its first time
    before = client.post("/v1/completions", json={**COMPLETION, "max_tokens": cut}).json() if cut else None
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["text"] == (before["choices"][0]["text"] if before else "")
    # ignore_eos: only the length ends it.
    r = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 8, "ignore_eos": True}).json()
    assert r["usage"]["completion_tokens"] == 8


def test_logprob_token_text_is_openais(tiny):
    _, tok = tiny
    newline = next(i for i in range(tok.vocab_size) if tok.id_to_piece(i) == "<0x0A>")
    assert token_text(tok, newline) == ("\n", [10])
    partial = next(i for i in range(tok.vocab_size) if tok.id_to_piece(i) == "<0xE2>")
    assert token_text(tok, partial) == ("bytes:\\xe2", [0xE2])
    word = tok.encode("hello", bos=False)[0]
    assert tok.id_to_piece(word) == "\u2581hell"
    assert token_text(tok, word) == (" hell", list(b" hell"))
    lp = TokenLogprob(newline, -0.5, [(newline, -0.5), (word, -1.0)])
    entry = chat_logprobs(tok, [lp])["content"][0]
    assert (entry["token"], entry["bytes"], entry["top_logprobs"][0]["token"]) == ("\n", [10], "\n")
    completion = completion_logprobs(tok, [lp, lp], offset=3)
    assert completion["tokens"] == ["\n", "\n"] and completion["text_offset"] == [3, 4]
    assert completion["top_logprobs"][0] == {"\n": -0.5, " hell": -1.0}


# ---- D. the prompt's logprobs: echo, prompt_logprobs, max_tokens 0 ---------------------------------------------


def full_pass_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax (float32) of one plain forward pass over `ids`, no cache: [T, V]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)


@pytest.mark.parametrize("prefill_chunk", [512, 3])
def test_echo_gives_the_prompts_logprobs_of_a_full_forward_pass(tiny, prefill_chunk):
    model, tok = tiny
    ids = tok.encode("The quick brown fox jumps over the lazy dog")
    ref_TV = full_pass_logprobs(model, ids)
    client = serve(tiny, prefill_chunk=prefill_chunk)  # 3: the prompt in four chunks
    try:
        body = {"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2, "temperature": 0}
        r = client.post("/v1/completions", json={**body, "prompt_logprobs": 3})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == tok.decode(ids) and choice["finish_reason"] == "length"
        assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
        lp = choice["logprobs"]
        assert lp["tokens"] == [token_text(tok, t)[0] for t in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first
        want = [ref_TV[j - 1, ids[j]].item() for j in range(1, len(ids))]
        torch.testing.assert_close(lp["token_logprobs"][1:], want, rtol=0, atol=1e-5)
        for j in range(1, len(ids)):
            values, top_ids = ref_TV[j - 1].topk(2)
            top = lp["top_logprobs"][j]
            assert list(top) == [token_text(tok, t)[0] for t in top_ids.tolist()]
            torch.testing.assert_close(list(top.values()), values.tolist(), rtol=0, atol=1e-5)
        offsets = lp["text_offset"]
        assert offsets[0] == 0 and offsets == sorted(offsets) and len(offsets) == len(ids)

        # vLLM's prompt_logprobs: null, then per token {id: {logprob, rank, decoded_token}}, the token's own first.
        plp = choice["prompt_logprobs"]
        assert plp[0] is None and len(plp) == len(ids)
        for j in range(1, len(ids)):
            entry = plp[j]
            own = entry[str(ids[j])]
            assert next(iter(entry)) == str(ids[j]) and own["decoded_token"] == token_text(tok, ids[j])[0]
            assert own["rank"] == int((ref_TV[j - 1] > ref_TV[j - 1, ids[j]]).sum()) + 1
            assert abs(own["logprob"] - want[j - 1]) <= 1e-5
            _, top_ids = ref_TV[j - 1].topk(3)
            assert set(entry) == {str(ids[j])} | {str(t) for t in top_ids.tolist()}
            assert [entry[str(t)]["rank"] for t in top_ids.tolist() if t != ids[j]] == [
                k + 1 for k, t in enumerate(top_ids.tolist()) if t != ids[j]
            ]
    finally:
        client.__exit__(None, None, None)


def test_echo_then_generate_and_a_text_prompt(client, tiny):
    model, tok = tiny
    prompt = "Hello there, general"
    ids = tok.encode(prompt)
    plain = client.post("/v1/completions", json={**COMPLETION, "prompt": prompt, "max_tokens": 4, "logprobs": 1})
    echoed = client.post(
        "/v1/completions", json={**COMPLETION, "prompt": prompt, "max_tokens": 4, "logprobs": 1, "echo": True}
    )
    assert plain.status_code == echoed.status_code == 200, echoed.text
    plain, echoed = plain.json()["choices"][0], echoed.json()["choices"][0]
    assert echoed["text"] == prompt + plain["text"]  # a text prompt is echoed as sent
    assert "prompt_logprobs" not in echoed  # not asked for
    n = len(ids)
    lp, generated = echoed["logprobs"], plain["logprobs"]
    assert len(lp["tokens"]) == n + len(generated["tokens"])
    for key in ("tokens", "token_logprobs", "top_logprobs"):
        assert lp[key][n:] == generated[key]
    assert lp["text_offset"][n] == len(prompt)  # the completion's tokens are placed after the echoed prompt
    ref_TV = full_pass_logprobs(model, ids)
    torch.testing.assert_close(lp["token_logprobs"][1:n], [ref_TV[j - 1, ids[j]].item() for j in range(1, n)])

    # Without logprobs, echo is the text alone; max_tokens 0 with prompt_logprobs alone: no echo, no generation.
    r = client.post("/v1/completions", json={**COMPLETION, "prompt": prompt, "max_tokens": 0, "echo": True}).json()
    assert r["choices"][0]["text"] == prompt and r["choices"][0]["logprobs"] is None
    r = client.post("/v1/completions", json={**COMPLETION, "prompt": [ids, ids[:3]], "max_tokens": 0,
                                             "prompt_logprobs": 0}).json()  # fmt: skip
    assert [c["text"] for c in r["choices"]] == ["", ""]
    first, second = (c["prompt_logprobs"] for c in r["choices"])
    assert len(first) == n and len(second) == 3 and all(len(e) == 1 for e in first[1:])
    for a, b in zip(first[1:], second[1:], strict=False):  # the same numbers, up to float rounding (other shapes)
        assert a.keys() == b.keys() and all(abs(a[k]["logprob"] - b[k]["logprob"]) <= 1e-5 for k in a)


def test_echo_streamed_as_the_whole_response(client):
    body = {**COMPLETION, "prompt": "Once upon", "max_tokens": 3, "logprobs": 1, "echo": True, "prompt_logprobs": 1}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        frames = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    choices = [f["choices"][0] for f in frames]
    assert choices[0]["text"] == "Once upon" and choices[0]["prompt_logprobs"] == whole["prompt_logprobs"]
    assert "".join(c["text"] for c in choices) == whole["text"]
    for key in ("tokens", "token_logprobs", "text_offset"):
        assert [v for c in choices if c["logprobs"] for v in c["logprobs"][key]] == whole["logprobs"][key]


@pytest.mark.parametrize(
    "change, param",
    [
        ({"max_tokens": 0}, "max_tokens"),  # 0 only with echo or prompt_logprobs: there is nothing to give
        ({"echo": "yes"}, "echo"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"echo": True, "max_tokens": -1}, "max_tokens"),
    ],
)
def test_bad_echo_requests_are_400s(client, change, param):
    assert_error(client.post("/v1/completions", json={**COMPLETION, **change}), 400, param)


def test_chat_refuses_echo_and_prompt_logprobs(client):
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "echo": True}), 400, "echo")
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "prompt_logprobs": 1}), 400, "prompt_logprobs")
