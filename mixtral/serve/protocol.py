"""The OpenAI API shapes: request bodies checked and turned into prompts + `SamplingParams`, and the
response objects and stream chunks built from generated text.

Every problem with a request is an `APIError` that names the parameter at fault; the app turns it into
OpenAI's error body `{"error": {"message", "type", "param", "code"}}` with its HTTP status.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..sampling import SamplingParams, TokenLogprob
from ..tokenizer import Tokenizer

MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 1024  # characters per stop string
MAX_TOP_LOGPROBS = {"chat": 20, "completion": 5}  # OpenAI's limits
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (chat: the rest of the context)


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Job:
    """A checked request: one prompt and one SamplingParams per choice."""

    kind: str  # "chat" or "completion"
    model: str
    prompts: list[list[int]]
    params: list[SamplingParams]
    prompt_tokens: int  # for usage: each distinct prompt counted once
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None  # None: no logprobs
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.id


# ---- checking values ------------------------------------------------------------------------------------

_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict = 3, 60, 60, 8, 8


def show(value: Any) -> str:
    """A value as an error message quotes it: short, however long or deeply nested it is."""
    return _SHOW.repr(value)


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > hi or value < lo or (lo_open and value == lo):
        if math.isfinite(hi):
            bound = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        else:
            bound = f"{'>' if lo_open else '>='} {lo:g}"
        raise invalid(name, f"{name} must be a number {bound}, got {show(value)}")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise invalid(name, f"{name} must be an integer {bound}, got {show(value)}")
    return value


def _bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"{name} must be true or false, got {show(value)}")
    return value


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", f"stop must be a non-empty string or a list of them, got {show(value)}")
    if len(stops) > MAX_STOP:
        raise invalid("stop", f"stop has {len(stops)} strings; at most {MAX_STOP} are allowed")
    longest = max(len(s) for s in stops)
    if longest > MAX_STOP_CHARS:
        raise invalid("stop", f"stop holds a string of {longest} characters; at most {MAX_STOP_CHARS} are allowed")
    return tuple(stops)


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for name in ("tools", "functions"):
        if body.get(name):
            raise invalid(name, f"{name} (function calling) is not supported by this server")
    if body.get("tool_choice") not in (None, "none"):
        raise invalid("tool_choice", "tool_choice is not supported by this server (function calling)")
    if body.get("function_call") not in (None, "none"):
        raise invalid("function_call", "function_call is not supported by this server")
    if body.get("logit_bias"):
        raise invalid("logit_bias", "logit_bias is not supported by this server")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise invalid("response_format", 'response_format: only {"type": "text"} is supported')
    if body.get("echo"):
        raise invalid("echo", "echo is not supported by this server")
    if body.get("suffix"):
        raise invalid("suffix", "suffix (insertion) is not supported by this server")


def check_model(body: Mapping[str, Any], served: str) -> str:
    model = body.get("model")
    if model is None:
        raise invalid("model", "model is required: the name of the served model (see GET /v1/models)")
    if not isinstance(model, str):
        raise invalid("model", f"model must be a string, got {show(model)}")
    if model != served:
        raise APIError(
            404,
            f"The model {show(model)} does not exist; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )
    return model


# ---- requests ---------------------------------------------------------------------------------------------

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \uD800 to \uDFFF: half of a UTF-16 pair


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body: a JSON object of valid Unicode text. JSON's syntax allows a lone half of a UTF-16
    surrogate pair ("\\ud800"), which no tokenizer can encode (nor a response echo), and nesting as deep as
    the sender likes, which Python's parser refuses with a RecursionError: both are the request's fault."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(None, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise invalid(None, "the request body is not valid JSON here: it is nested too deeply") from None
    if not isinstance(body, dict):
        raise invalid(None, f"the request body must be a JSON object, got {type(body).__name__}")
    if _SURROGATE_ESCAPE.search(raw):  # rare: only then is the whole body checked
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            bad = e.object[e.start : e.end]
            raise invalid(
                None, f"the request body is not valid Unicode: it holds a lone surrogate {show(bad)}"
            ) from None
    return body


def parse_chat(body: Mapping[str, Any], tokenizer: Tokenizer, *, model: str, context: int, max_n: int) -> Job:
    """POST /v1/chat/completions."""
    served = check_model(body, model)
    messages = _chat_messages(body.get("messages"))
    try:
        prompt = tokenizer.encode_chat(messages)
    except ValueError as e:
        raise invalid("messages", f"messages: {e}") from None
    top = None
    if _bool(body, "logprobs", False):
        top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS["chat"])
    elif body.get("top_logprobs") is not None:
        raise invalid("top_logprobs", "top_logprobs needs logprobs set to true")
    max_tokens = body.get("max_completion_tokens")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = body.get("max_tokens"), "max_tokens"
    return _job(body, "chat", served, [prompt], "messages", name, max_tokens, top, context, max_n)


def parse_completion(
    body: Mapping[str, Any], tokenizer: Tokenizer, *, model: str, context: int, max_n: int, vocab: int
) -> Job:
    """POST /v1/completions. `prompt` is a string, a list of strings, a list of token ids or a list of them."""
    served = check_model(body, model)
    prompts = _completion_prompts(body.get("prompt"), tokenizer, vocab)
    top = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS["completion"])
    best_of = _integer(body, "best_of", None, 1)
    n = _integer(body, "n", 1, 1)
    if best_of is not None and best_of != n:
        raise invalid("best_of", f"best_of={best_of} is not supported (only best_of equal to n)")
    return _job(
        body, "completion", served, prompts, "prompt", "max_tokens", body.get("max_tokens"), top, context, max_n
    )


def _job(
    body: Mapping[str, Any],
    kind: str,
    model: str,
    prompts: list[list[int]],
    prompt_param: str,
    max_tokens_param: str,
    max_tokens: Any,
    top_logprobs: int | None,
    context: int,
    max_n: int,
) -> Job:
    _refuse_unsupported(body)
    n = _integer(body, "n", 1, 1)
    assert n is not None
    if n * len(prompts) > max_n:
        what = f"n={n}" if len(prompts) == 1 else f"n={n} for {len(prompts)} prompts"
        raise invalid("n", f"{what} asks for {n * len(prompts)} completions; this server runs at most {max_n} at once")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options", "stream_options is only allowed when stream is true")
        if not isinstance(options, Mapping):
            raise invalid("stream_options", f"stream_options must be an object, got {show(options)}")
        include_usage = _bool(options, "include_usage", False)

    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise invalid(
            prompt_param,
            f"This model's maximum context length is {context} tokens, but the prompt has {longest} tokens, "
            "which leaves no room for a completion",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = context - longest if kind == "chat" else min(COMPLETION_MAX_TOKENS, context - longest)
    max_tokens = _integer({max_tokens_param: max_tokens}, max_tokens_param, None, 1)
    assert max_tokens is not None
    if longest + max_tokens > context:
        raise invalid(
            max_tokens_param,
            f"This model's maximum context length is {context} tokens, but {longest + max_tokens} were requested: "
            f"{longest} in the prompt and {max_tokens} for the completion ({max_tokens_param})",
            code="context_length_exceeded",
        )

    seed = _integer(body, "seed", None, -(2**63), 2**64 - 1)
    common = dict(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=max(_integer(body, "top_k", 0, -1) or 0, 0),  # -1 (vLLM's "off") and 0 both turn it off
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, math.inf, lo_open=True),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        stop=_stop(body),
    )
    choice_prompts, params = [], []
    for p in prompts:
        for i in range(n):
            # Choice i of a seeded request uses seed + i: choice 0 is what n=1 would give.
            choice_seed = None if seed is None else (seed + i) % 2**64
            choice_prompts.append(p)
            params.append(SamplingParams(seed=choice_seed, **common))  # type: ignore[arg-type]
    return Job(
        kind=kind,
        model=model,
        prompts=choice_prompts,
        params=params,
        prompt_tokens=sum(len(p) for p in prompts),
        stream=stream,
        include_usage=include_usage,
        top_logprobs=top_logprobs,
    )


def _chat_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI messages -> the tokenizer's {"role", "content"} dicts (text parts joined; developer ->
    system; an assistant "prefix" flag kept)."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", f"messages must be a non-empty list of messages, got {show(messages)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise invalid("messages", f"messages[{i}] must be an object with role and content, got {show(m)}")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise invalid(
                "messages", f"messages[{i}].role {show(role)} is not supported: use system, user or assistant"
            )
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise invalid("messages", f"messages[{i}].content[{j}]: only text parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None and role == "assistant" and m.get("tool_calls"):
            raise invalid("messages", f"messages[{i}]: tool calls are not supported")
        if not isinstance(content, str):
            raise invalid("messages", f"messages[{i}].content must be a string or a list of text parts")
        message: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant" and m.get("prefix"):
            message["prefix"] = m["prefix"]
        out.append(message)
    return out


def _completion_prompts(prompt: Any, tokenizer: Tokenizer, vocab: int) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [tokenizer.encode(p) for p in prompt]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [_token_ids(prompt, vocab)]
        if all(isinstance(p, list) and p for p in prompt):
            return [_token_ids(p, vocab) for p in prompt]
    raise invalid(
        "prompt",
        "prompt must be a string, a list of strings, a list of token ids or a list of such lists (none empty)",
    )


def _token_ids(ids: list[Any], vocab: int) -> list[int]:
    bad = [t for t in ids if not (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab)]
    if bad:
        raise invalid("prompt", f"prompt holds token ids outside the vocabulary [0, {vocab}): {show(bad[:5])}")
    return list(ids)


# ---- responses -----------------------------------------------------------------------------------------------

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_text(tokenizer: Tokenizer, token: int) -> tuple[str, list[int]]:
    """A token as logprobs show it: its text (sentencepiece's "▁" as a space) and its UTF-8 bytes. A
    byte-fallback piece is written "bytes:\\xNN", as OpenAI writes partial characters."""
    piece = tokenizer.id_to_piece(token)
    if m := _BYTE_PIECE.fullmatch(piece):
        b = int(m.group(1), 16)
        return f"bytes:\\x{b:02x}", [b]
    text = piece.replace("\u2581", " ")
    return text, list(text.encode("utf-8"))


def chat_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text, data = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": data}

    content = [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    tokens, offsets = [], []
    for lp in lps:
        text, _ = token_text(tokenizer, lp.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{token_text(tokenizer, t)[0]: v for t, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
