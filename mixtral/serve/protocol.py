"""The OpenAI API shapes: request bodies checked and turned into prompts + `SamplingParams`, and the
response objects and stream chunks built from generated text.

Every problem with a request is an `APIError` that names the parameter at fault; the app turns it into
OpenAI's error body `{"error": {"message", "type", "param", "code"}}` with its HTTP status.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import reprlib
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..constrained import Grammar, GrammarError, Grammars
from ..sampling import SamplingParams, TokenLogprob
from ..tokenizer import Tokenizer

MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 1024  # characters per stop string
MAX_TOP_LOGPROBS = {"chat": 20, "completion": 5}  # OpenAI's limits
MAX_PROMPT_LOGPROBS = 20  # vLLM's default limit (--max-logprobs)
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (chat: the rest of the context)

# The fields a request may have; any other is a 400 naming it (a misspelt "max_token" is not silently ignored).
_OPENAI_IGNORED = frozenset(  # OpenAI's, with nothing to do here
    {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}
)
_SAMPLING_FIELDS = frozenset(
    {"model", "n", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop", "logprobs",
     "presence_penalty", "frequency_penalty", "logit_bias", "response_format",
     # vLLM's extensions
     "top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids"}
)  # fmt: skip
CHAT_FIELDS = _SAMPLING_FIELDS | _OPENAI_IGNORED | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "functions", "tool_choice", "function_call"
}  # fmt: skip
COMPLETION_FIELDS = _SAMPLING_FIELDS | _OPENAI_IGNORED | {"prompt", "best_of", "echo", "suffix", "prompt_logprobs"}
TOKENIZE_FIELDS = frozenset({"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                             "return_token_strs"})  # fmt: skip
DETOKENIZE_FIELDS = frozenset({"model", "tokens"})
# vLLM's fields that clients send with their default value, which is what this server does: taken with that
# value, a 400 with another.
_VLLM_DEFAULTS = {
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False,
    "use_beam_search": False,
}
_VLLM_CHAT_DEFAULTS = {**_VLLM_DEFAULTS, "add_generation_prompt": True, "continue_final_message": False, "echo": False}
# vLLM's request extensions that need the engine: passed on in SamplingParams where it has the field (a
# non-default value is a 400 where it has not).
_EXTENSIONS = ("ignore_eos", "min_tokens", "stop_token_ids")
_ENGINE_TAKES = frozenset(f.name for f in dataclasses.fields(SamplingParams))


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
    # Completions: each choice's prompt text to echo before its completion (None: no echo); vLLM's prompt_logprobs
    # (None: not asked); max_tokens 0 (the prompt's logprobs alone, nothing generated)
    echo: list[str] | None = None
    prompt_logprobs: int | None = None
    prompt_only: bool = False
    # Chat: the grammar every choice's output follows (response_format, tools), and how tools are offered: None (no
    # tools, or tool_choice "none"), "auto" or "required" (a named function is "required" of a list of one)
    grammar: Grammar | None = None
    tool_mode: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_top(self) -> int | None:
        """How many most likely tokens the engine gives per prompt position (None: no prompt logprobs at all):
        echo with logprobs shows them for the prompt's tokens, and prompt_logprobs asks for them."""
        wanted = [k for k in (self.prompt_logprobs, self.top_logprobs if self.echo else None) if k is not None]
        return max(wanted) if wanted else None

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


def check_fields(body: Mapping[str, Any], known: frozenset[str], defaults: Mapping[str, Any] | None = None) -> None:
    """Refuse a field that is neither `known` nor one of vLLM's `defaults` at its default value."""
    for name, value in body.items():
        if name in known:
            continue
        if defaults is not None and name in defaults:
            if value is None or value is defaults[name]:
                continue
            raise invalid(
                name, f"{name}={show(value)} is not supported by this server (only {json.dumps(defaults[name])})"
            )
        raise invalid(name[:100], f"Unrecognized request argument supplied: {show(name)}")


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    if body.get("functions"):
        raise invalid("functions", "functions (OpenAI's deprecated function calling) is not supported: use tools")
    if body.get("function_call") not in (None, "none"):
        raise invalid("function_call", "function_call is not supported by this server: use tool_choice")
    if body.get("logit_bias"):
        raise invalid("logit_bias", "logit_bias is not supported by this server")
    if body.get("suffix"):
        raise invalid("suffix", "suffix (insertion) is not supported by this server")


def check_model(body: Mapping[str, Any], served: str | Sequence[str]) -> str:
    """The request's model: `served` (the base model's name, then its LoRA adapters' names) or a 404 naming them."""
    model = body.get("model")
    if model is None:
        raise invalid("model", "model is required: the name of the served model (see GET /v1/models)")
    if not isinstance(model, str):
        raise invalid("model", f"model must be a string, got {show(model)}")
    names = [served] if isinstance(served, str) else list(served)
    if model not in names:
        raise APIError(
            404,
            f"The model {show(model)} does not exist; this server serves {', '.join(map(repr, names))}",
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


def parse_chat(
    body: Mapping[str, Any],
    tokenizer: Tokenizer,
    *,
    model: str | Sequence[str],
    context: int,
    max_n: int,
    vocab: int,
    grammars: Callable[[], Grammars] | None = None,
) -> Job:
    """POST /v1/chat/completions. `grammars`: gives the server's grammar compiler (made on first use), for
    response_format and tools."""
    check_fields(body, CHAT_FIELDS, _VLLM_CHAT_DEFAULTS)
    served = check_model(body, model)
    messages = _chat_messages(body.get("messages"))
    tools = _tools(body.get("tools"))
    tool_choice = _tool_choice(body.get("tool_choice"), tools)
    fmt = _response_format(body.get("response_format"))
    try:
        if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages) or tokenizer.version != "v1":
            prompt = tokenizer.encode_openai_chat(messages, openai_tools(tools) if tool_choice != "none" else None)
        else:  # the v1 format, written here (equal to mistral-common's, tested)
            prompt = tokenizer.encode_chat(messages)
    except ValueError as e:
        raise invalid("messages", f"messages: {e}") from None
    grammar, mode = None, None
    if fmt is not None or tool_choice != "none":
        if grammars is None:
            raise invalid("response_format" if fmt is not None else "tools", "this server has no grammar compiler")
        try:
            compiler = grammars()
            text = {"type": "object"} if fmt == "json_object" else fmt
            if tool_choice == "none":
                grammar = compiler.json_object() if fmt == "json_object" else compiler.schema(fmt)
            else:  # with response_format, auto answers either with calls or with the format's JSON
                offered = tools if isinstance(tool_choice, str) else [t for t in tools if t["name"] == tool_choice[0]]
                mode = "auto" if tool_choice == "auto" else "required"
                grammar = compiler.tool_calls(
                    offered,
                    required=mode == "required",
                    parallel=body.get("parallel_tool_calls") is not False,
                    text=text if mode == "auto" else None,
                )
        except GrammarError as e:
            raise invalid("response_format" if fmt is not None else "tools", str(e)) from None
    top = None
    if _bool(body, "logprobs", False):
        top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS["chat"])
    elif body.get("top_logprobs") is not None:
        raise invalid("top_logprobs", "top_logprobs needs logprobs set to true")
    max_tokens = body.get("max_completion_tokens")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = body.get("max_tokens"), "max_tokens"
    job = _job(body, "chat", served, [prompt], "messages", name, max_tokens, top, context, max_n, vocab)
    job.grammar, job.tool_mode = grammar, mode
    return job


_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _tools(value: Any) -> list[dict[str, Any]]:
    """OpenAI's `tools` -> [{"name", "description"?, "parameters"?}], checked."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("tools", f"tools must be a list of tools, got {show(value)}")
    out, names = [], set()
    for i, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(fn, Mapping):
            raise invalid("tools", f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}')
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise invalid(
                "tools", f"tools[{i}].function.name must be 1 to 64 letters, digits, _ or -, got {show(name)}"
            )
        if name in names:
            raise invalid("tools", f"tools[{i}].function.name {name!r} is given twice")
        names.add(name)
        params = fn.get("parameters")
        if params is not None and not (isinstance(params, Mapping) and params.get("type", "object") == "object"):
            raise invalid("tools", f"tools[{i}].function.parameters must be a JSON schema of an object")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise invalid("tools", f"tools[{i}].function.description must be a string")
        out.append(
            {"name": name, **({"description": desc} if desc else {}), "parameters": params or {"type": "object"}}
        )
    return out


def openai_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": t} for t in tools]


def _tool_choice(value: Any, tools: list[dict[str, Any]]) -> str | tuple[str]:
    """ "none", "auto", "required" or (name,) for a named function; the default: "auto" with tools, else "none"."""
    if value is None:
        return "auto" if tools else "none"
    if value == "none":
        return value
    if value in ("auto", "required"):
        if not tools:
            raise invalid("tool_choice", f"tool_choice {value!r} needs tools")
        return value
    if isinstance(value, Mapping) and value.get("type") == "function" and isinstance(value.get("function"), Mapping):
        name = value["function"].get("name")
        if name not in [t["name"] for t in tools]:
            listed = ", ".join(t["name"] for t in tools) or "none"
            raise invalid(
                "tool_choice", f"tool_choice names the function {show(name)}, which is not in tools ({listed})"
            )
        return (name,)
    raise invalid(
        "tool_choice",
        f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": {{"name": ...}}}}, '
        f"got {show(value)}",
    )


def _response_format(value: Any) -> str | dict[str, Any] | None:
    """None (text), "json_object", or the JSON schema of a json_schema format."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object"
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise invalid("response_format", "response_format.json_schema must be an object with a schema object")
        if not isinstance(spec.get("name"), str):
            raise invalid("response_format", "response_format.json_schema.name is required (a string)")
        return dict(spec.get("schema") or {"type": "object"})
    raise invalid(
        "response_format",
        f'response_format.type must be "text", "json_object" or "json_schema", got {show(kind if kind else value)}',
    )


def parse_completion(
    body: Mapping[str, Any], tokenizer: Tokenizer, *, model: str | Sequence[str], context: int, max_n: int, vocab: int
) -> Job:
    """POST /v1/completions. `prompt` is a string, a list of strings, a list of token ids or a list of them."""
    check_fields(body, COMPLETION_FIELDS, _VLLM_DEFAULTS)
    served = check_model(body, model)
    prompt = body.get("prompt")
    prompts = _completion_prompts(prompt, tokenizer, vocab)
    top = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS["completion"])
    best_of = _integer(body, "best_of", None, 1)
    n = _integer(body, "n", 1, 1)
    if best_of is not None and best_of != n:
        raise invalid("best_of", f"best_of={best_of} is not supported (only best_of equal to n)")
    echo = _bool(body, "echo", False)
    prompt_top = _integer(body, "prompt_logprobs", None, 0, MAX_PROMPT_LOGPROBS)
    max_tokens = body.get("max_tokens")
    job = _job(
        body, "completion", served, prompts, "prompt", "max_tokens", max_tokens, top, context, max_n, vocab,
        prompt_only_ok=echo or prompt_top is not None,
    )  # fmt: skip
    job.prompt_logprobs = prompt_top
    if echo:  # the prompt as sent; token ids as their text
        texts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt[0], str) else None
        texts = texts or [tokenizer.decode(p) for p in prompts]
        job.echo = [t for t in texts for _ in range(n or 1)]  # one per choice, as job.prompts
    return job


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
    vocab: int,
    prompt_only_ok: bool = False,
) -> Job:
    """The checks and SamplingParams common to both routes. `prompt_only_ok`: max_tokens may be 0 (echo or
    prompt_logprobs: the prompt's logprobs alone are wanted)."""
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
    prompt_only = prompt_only_ok and max_tokens == 0
    if longest > context or (longest == context and not prompt_only):
        raise invalid(
            prompt_param,
            f"This model's maximum context length is {context} tokens, but the prompt has {longest} tokens, "
            "which leaves no room for a completion",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = context - longest if kind == "chat" else min(COMPLETION_MAX_TOKENS, context - longest)
    max_tokens = _integer({max_tokens_param: max_tokens}, max_tokens_param, None, 0 if prompt_only_ok else 1)
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
        max_new_tokens=max(max_tokens, 1),  # (prompt_only: none are generated)
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=max(_integer(body, "top_k", 0, -1) or 0, 0),  # -1 (vLLM's "off") and 0 both turn it off
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, math.inf, lo_open=True),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        stop=_stop(body),
        **_extensions(body, max_tokens, vocab),
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
        prompt_only=prompt_only,
    )


def _extensions(body: Mapping[str, Any], max_tokens: int, vocab: int) -> dict[str, Any]:
    """vLLM's ignore_eos, min_tokens and stop_token_ids, checked; those not at their default, as SamplingParams
    fields (a 400 while the engine has no such field)."""
    ignore_eos = _bool(body, "ignore_eos", False)
    min_tokens = _integer(body, "min_tokens", 0, 0)
    if min_tokens is not None and min_tokens > max_tokens:
        raise invalid("min_tokens", f"min_tokens={min_tokens} is more than max_tokens={max_tokens}")
    value = body.get("stop_token_ids")
    stop_token_ids: tuple[int, ...] = ()
    if value is not None:
        ok = isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
        if not ok:
            raise invalid("stop_token_ids", f"stop_token_ids must be a list of token ids, got {show(value)}")
        bad = [t for t in value if not 0 <= t < vocab]
        if bad:
            raise invalid(
                "stop_token_ids", f"stop_token_ids holds ids outside the vocabulary [0, {vocab}): {show(bad)}"
            )
        stop_token_ids = tuple(dict.fromkeys(value))
    given = {"ignore_eos": ignore_eos, "min_tokens": min_tokens, "stop_token_ids": stop_token_ids}
    given = {name: v for name, v in given.items() if v}
    for name in given:
        if name not in _ENGINE_TAKES:
            raise invalid(name, f"{name} is not supported by this server yet")
    return given


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
        if role not in ("system", "user", "assistant", "tool"):
            raise invalid(
                "messages", f"messages[{i}].role {show(role)} is not supported: use system, user, assistant or tool"
            )
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise invalid("messages", f"messages[{i}].content[{j}]: only text parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls:
            message = {"role": role, "content": content or None, "tool_calls": _tool_calls(calls, i)}
            if content is not None and not isinstance(content, str):
                raise invalid("messages", f"messages[{i}].content must be a string, a list of text parts or null")
            out.append(message)
            continue
        if not isinstance(content, str):
            raise invalid("messages", f"messages[{i}].content must be a string or a list of text parts")
        message = {"role": role, "content": content}
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise invalid("messages", f"messages[{i}] (tool) needs tool_call_id, the id of the call it answers")
            message["tool_call_id"] = m["tool_call_id"]
        if role == "assistant" and m.get("prefix"):
            message["prefix"] = m["prefix"]
        out.append(message)
    return out


def _tool_calls(calls: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's tool_calls, checked: [{"id", "type": "function", "function": {"name", "arguments"}}]."""
    if not isinstance(calls, list):
        raise invalid("messages", f"messages[{i}].tool_calls must be a list")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, Mapping) else None
        ok = isinstance(fn, Mapping) and isinstance(fn.get("name"), str) and isinstance(c.get("id"), str)
        if not ok or not isinstance(fn.get("arguments", ""), str):
            raise invalid(
                "messages",
                f"messages[{i}].tool_calls[{j}] must be "
                '{"id", "type": "function", "function": {"name", "arguments"}}',
            )
        try:
            json.loads(fn.get("arguments") or "{}")
        except ValueError:
            raise invalid("messages", f"messages[{i}].tool_calls[{j}].function.arguments is not JSON") from None
        out.append(
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": fn["name"], "arguments": fn.get("arguments") or "{}"},
            }
        )
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


def parse_tokenize(
    body: Mapping[str, Any], tokenizer: Tokenizer, *, model: str | Sequence[str]
) -> tuple[list[int], bool]:
    """POST /tokenize, as vLLM's: `prompt` (a text; `add_special_tokens`, default true, puts <s> in front) or
    `messages` (a chat, in the same format as /v1/chat/completions, with its own <s>); -> (token ids, whether
    to return their pieces too)."""
    check_fields(body, TOKENIZE_FIELDS, {"continue_final_message": False})
    if body.get("model") is not None:
        check_model(body, model)
    if ("prompt" in body) == ("messages" in body):
        raise invalid(None, "give either prompt (a text) or messages (a chat)")
    if "prompt" in body:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise invalid("prompt", f"prompt must be a string, got {show(prompt)}")
        ids = tokenizer.encode(prompt, bos=_bool(body, "add_special_tokens", True))
    else:
        _bool(body, "add_special_tokens", False)  # the chat format holds its special tokens whatever this says
        _bool(body, "add_generation_prompt", True)  # the format has none apart from a user turn's [/INST]
        try:
            ids = tokenizer.encode_chat(_chat_messages(body.get("messages")))
        except ValueError as e:
            raise invalid("messages", f"messages: {e}") from None
    return ids, _bool(body, "return_token_strs", False)


def parse_detokenize(body: Mapping[str, Any], tokenizer: Tokenizer, *, model: str | Sequence[str]) -> str:
    """POST /detokenize, as vLLM's: `tokens` (a list of token ids) -> their text."""
    check_fields(body, DETOKENIZE_FIELDS)
    if body.get("model") is not None:
        check_model(body, model)
    tokens = body.get("tokens")
    if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)):
        raise invalid("tokens", f"tokens must be a list of token ids, got {show(tokens)}")
    bad = [t for t in tokens if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise invalid("tokens", f"tokens holds ids outside the vocabulary [0, {tokenizer.vocab_size}): {show(bad)}")
    return tokenizer.decode(tokens)


# ---- responses -----------------------------------------------------------------------------------------------

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_text(tokenizer: Tokenizer, token: int) -> tuple[str, list[int]]:
    """A token as logprobs show it: its text (sentencepiece's "▁" as a space) and its UTF-8 bytes. A
    byte-fallback piece is its character when it is one (<0x0A>: "\\n"), and else, part of a character, written
    "bytes:\\xNN" as OpenAI writes partial characters."""
    piece = tokenizer.id_to_piece(token)
    if m := _BYTE_PIECE.fullmatch(piece):
        b = int(m.group(1), 16)
        return (chr(b) if b < 0x80 else f"bytes:\\x{b:02x}"), [b]
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


def echo_logprobs(
    tokenizer: Tokenizer, prompt: list[int], lps: list[TokenLogprob | None], top_n: int
) -> dict[str, Any]:
    """A completion's logprobs for its echoed prompt, as OpenAI gives them: the first token's null (nothing predicts
    it), then each token's and its `top_n` most likely."""
    out = completion_logprobs(tokenizer, [lp or TokenLogprob(t, 0.0, []) for t, lp in zip(prompt, lps, strict=True)])
    out["token_logprobs"] = [None if lp is None else lp.logprob for lp in lps]
    out["top_logprobs"] = [
        None if lp is None else {token_text(tokenizer, t)[0]: v for t, v in lp.top[:top_n]} for lp in lps
    ]
    return out


def joined_logprobs(echoed: dict[str, Any], generated: dict[str, Any]) -> dict[str, Any]:
    """The prompt's completion logprobs followed by the generated tokens'."""
    return {key: echoed[key] + generated[key] for key in echoed}


def vllm_prompt_logprobs(
    tokenizer: Tokenizer, lps: list[TokenLogprob | None], top_n: int
) -> list[dict[int, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, null for the first, then {token id: {logprob, rank,
    decoded_token}} of the token itself and its `top_n` most likely (ranks 1..top_n)."""

    def item(t: int, v: float, rank: int | None) -> dict[str, Any]:
        return {"logprob": v, "rank": rank, "decoded_token": token_text(tokenizer, t)[0]}

    out: list[dict[int, dict[str, Any]] | None] = []
    for lp in lps:
        if lp is None:
            out.append(None)
            continue
        entry = {lp.token: item(lp.token, lp.logprob, lp.rank)}
        for rank, (t, v) in enumerate(lp.top[:top_n], 1):
            if t not in entry:
                entry[t] = item(t, v, rank)
        out.append(entry)
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
