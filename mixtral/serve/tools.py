"""Tool calls out of generated text: "[TOOL_CALLS]" and a JSON list of {"name", "arguments"}, or from v11 on
"[TOOL_CALLS]NAME[ARGS]{...}" per call (Mistral's formats, which the grammars of constrained.py enforce), turned into
OpenAI's `tool_calls`, whole or as stream deltas.

`ToolOutput` is fed the output's text (control tokens written as their pieces) after each token, and says what is
new: content (the text before the marker; held back while it could still be the start of the marker) and, per
call, its id, name and the fragments of its arguments, as soon as each is known.
"""

from __future__ import annotations

import json
import secrets
import string
from typing import Any

from ..constrained import ARGS, CALL_ID, TOOL_CALLS

_ID_CHARS = string.ascii_letters + string.digits


def call_id() -> str:
    """A tool-call id as Mistral's v3+ formats need them (9 letters or digits), which OpenAI's clients take as is."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


def _string_end(s: str, start: int) -> int:
    """The index just past the JSON string that opens at s[start] ('"'), or -1 if it is not closed yet."""
    i = start + 1
    while i < len(s):
        if s[i] == "\\":
            i += 2
            continue
        if s[i] == '"':
            return i + 1
        i += 1
    return -1


def _value_end(s: str, start: int) -> int:
    """The index just past the JSON object or array that opens at s[start], or -1 if it is not closed yet."""
    depth, i = 0, start
    while i < len(s):
        c = s[i]
        if c == '"':
            i = _string_end(s, i)
            if i < 0:
                return -1
            continue
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def scan_calls(s: str) -> list[tuple[str | None, str, bool]]:
    """The calls in the text after the marker, so far: (name, when its string is closed; the arguments' text so far;
    whether the arguments are complete). The layout is the grammar's: '[{"name": "...", "arguments": {...}}, ...]'
    (whitespace anywhere between tokens)."""
    calls: list[tuple[str | None, str, bool]] = []
    i = s.find("{")
    while i >= 0:
        key = s.find('"name"', i)
        colon = s.find(":", key) if key >= 0 else -1
        quote = s.find('"', colon) if colon >= 0 else -1
        if quote < 0:
            calls.append((None, "", False))
            break
        end = _string_end(s, quote)
        if end < 0:
            calls.append((None, "", False))
            break
        name = json.loads(s[quote:end])
        key = s.find('"arguments"', end)
        colon = s.find(":", key + len('"arguments"')) if key >= 0 else -1
        brace = s.find("{", colon) if colon >= 0 else -1
        if brace < 0:
            calls.append((name, "", False))
            break
        args_end = _value_end(s, brace)
        if args_end < 0:
            calls.append((name, s[brace:], False))
            break
        calls.append((name, s[brace:args_end], True))
        i = s.find("{", args_end)
    return calls


def scan_args_calls(s: str) -> list[tuple[str | None, str, bool]]:
    """As `scan_calls`, for v11's layout: the text after the first marker, 'NAME[ARGS]{...}' for each call, the
    calls joined by the marker (v11 may write '[CALL_ID]ID' before '[ARGS]'; the id is not kept)."""
    calls: list[tuple[str | None, str, bool]] = []
    for part in s.split(TOOL_CALLS):
        at = part.find(ARGS)
        if at < 0:
            calls.append((None, "", False))
            break
        name = part[:at].split(CALL_ID)[0]
        args = part[at + len(ARGS) :]
        brace = args.find("{")
        end = _value_end(args, brace) if brace >= 0 else -1
        calls.append((name, "" if brace < 0 else args[brace:end] if end >= 0 else args[brace:], end >= 0))
        if end < 0:
            break
    return calls


class ToolOutput:
    """One choice's output while tools are offered. `mode` "required": the whole output is the calls (the grammar
    starts with the marker); "auto": text, possibly followed by the marker and calls. `call_format` "list" (up to
    v7) or "args" (v11 on), as `constrained.call_format` says of the tokenizer."""

    def __init__(self, mode: str, call_format: str = "list") -> None:
        self.mode = mode
        self.scan = scan_args_calls if call_format == "args" else scan_calls
        self.sent_content = 0  # characters of content sent
        self.ids: list[str] = []  # the calls' ids, as they are first sent
        self.sent_args: list[int] = []  # characters of each call's arguments sent

    @staticmethod
    def split(text: str) -> tuple[str, str | None]:
        """(content, the text after the marker or None when there is no marker)."""
        at = text.find(TOOL_CALLS)
        if at < 0:
            return text, None
        return text[:at], text[at + len(TOOL_CALLS) :]

    def deltas(self, text: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """What `text` (the whole output so far) adds: (content, OpenAI's tool-call deltas)."""
        content, calls_text = self.split(text)
        if calls_text is None and not final:
            # hold back an end that may be the start of the marker, and a character still missing bytes
            for k in range(min(len(TOOL_CALLS) - 1, len(content)), 0, -1):
                if TOOL_CALLS.startswith(content[-k:]):
                    content = content[:-k]
                    break
            content = content.rstrip("\ufffd")
        if calls_text is not None:
            content = content.rstrip()
        new_content = content[self.sent_content :]
        self.sent_content = max(self.sent_content, len(content))
        out: list[dict[str, Any]] = []
        for k, (name, args, _) in enumerate(self.scan(calls_text or "")):
            if name is None:
                break
            if k == len(self.ids):
                self.ids.append(call_id())
                self.sent_args.append(0)
                out.append(
                    {"index": k, "id": self.ids[k], "type": "function", "function": {"name": name, "arguments": ""}}
                )
            if len(args) > self.sent_args[k]:
                out.append({"index": k, "function": {"arguments": args[self.sent_args[k] :]}})
                self.sent_args[k] = len(args)
        return new_content, out

    def message(self, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """The finished output as OpenAI's message fields: (content, tool_calls); tool_calls None when the output
        holds no complete calls (no marker, or cut by max_tokens: then the whole text is the content)."""
        content, calls_text = self.split(text)
        if calls_text is None:
            return text, None
        try:
            if self.scan is scan_calls:
                calls = json.loads(calls_text)
            else:
                found = self.scan(calls_text)
                if not all(done for _, _, done in found):
                    return text, None
                calls = [{"name": name, "arguments": json.loads(args)} for name, args, _ in found]
        except ValueError:
            return text, None
        tool_calls = []
        for k, call in enumerate(calls):
            ident = self.ids[k] if k < len(self.ids) else call_id()
            arguments = json.dumps(call["arguments"], ensure_ascii=False)
            tool_calls.append(
                {"id": ident, "type": "function", "function": {"name": call["name"], "arguments": arguments}}
            )
        return content.strip() or None, tool_calls
