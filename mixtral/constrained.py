"""Constrained decoding: a grammar (a JSON schema, any JSON object, a tool call) turned into a mask on one
sequence's logits at each step, with xgrammar (an optional extra: `pip install mixtral[constrained]`).

- `Grammars`: one per tokenizer; compiles grammars against its vocabulary (each token's bytes);
- `Grammar`: a compiled grammar; `start()` gives a fresh `Constraint` for one sequence;
- `Constraint`: `mask(logits_V)` sets every token the grammar does not allow next to -inf (EOS only once the
  grammar is complete), `accept(token)` moves it on;
- `mask_rows(logits_BV, constraints)`: the same for the rows of a batch, the masks of all constrained rows in one
  call of xgrammar's batched matcher and applied in one call (the server's path).

The mask is xgrammar's bitmask (one bit per token, 32 to an int32) applied by its CPU kernel; `apply_bitmask`
is the plain PyTorch reference beside it, and a test checks that they agree.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import torch

from .tokenizer import Tokenizer

__all__ = [
    "Constraint",
    "Grammar",
    "GrammarError",
    "Grammars",
    "apply_bitmask",
    "available",
    "call_format",
    "mask_rows",
]

# Tool calls as Mistral's tokenizers write them: up to v7, the marker, then a JSON list of {"name", "arguments"};
# from v11 on, each call is the marker, the name, [ARGS] and the arguments' JSON object (v11 may put [CALL_ID] and
# an id before [ARGS]).
TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_TEXT_CONTROLS = (TOOL_CALLS, ARGS, CALL_ID)  # control tokens that a grammar matches as their own text
MAX_CALLS = 16  # calls in one answer of tool_choice auto, v11's format
# JSON as Mistral's chat format and Python's json.dumps write it; a fixed layout (no free whitespace) also keeps a
# model from spending its tokens on blank space.
_SEPARATORS = (", ", ": ")


class GrammarError(ValueError):
    """A schema or grammar that cannot be compiled (the message says why)."""


def available() -> bool:
    """Whether xgrammar is installed."""
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise GrammarError(
            "constrained decoding (response_format, tools) needs xgrammar: pip install 'mixtral[constrained]'"
        ) from None
    return xgrammar


def vocabulary(tokenizer: Tokenizer) -> list[bytes]:
    """Each token's bytes as it adds them to the text: "▁" is a space, a byte-fallback piece its byte. Control
    tokens (<s>, </s>, [INST], ...) are empty, which the grammar never allows, except those of tool calls
    ([TOOL_CALLS], [ARGS], [CALL_ID]), each its own text: a grammar's "[TOOL_CALLS]" then matches that one token
    (or the same text in pieces, in a tokenizer that has no such token)."""
    controls = tokenizer.control_ids

    def control(i: int) -> bytes:
        piece = tokenizer.id_to_piece(i)
        return piece.encode() if piece in _TEXT_CONTROLS else b""

    return [control(i) if i in controls else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]


def call_format(tokenizer: Tokenizer) -> str:
    """How `tokenizer`'s version writes tool calls: "list" (v2-v7: the marker and a JSON list; v1 as text too) or
    "args" (v11 on: the marker, the name, [ARGS] and the arguments, for each call)."""
    return "args" if int(tokenizer.version.lstrip("v")) >= 11 else "list"


class Grammars:
    """Compiles grammars for `tokenizer` and a model of `vocab_size` logits (the tokens past the tokenizer's, if
    any, are never allowed). Compiled grammars are cached by their source."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        xgr = _xgrammar()
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo(
            vocabulary(tokenizer), xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=[tokenizer.eos_id]
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.json_schema = functools.lru_cache(maxsize=64)(self._json_schema)
        self.call_format = call_format(tokenizer)

    def _json_schema(self, schema_text: str) -> Grammar:
        xgr = _xgrammar()
        try:
            compiled = self._compiler.compile_json_schema(schema_text, any_whitespace=False, separators=_SEPARATORS)
        except (RuntimeError, ValueError, xgr.InvalidJSONError) as e:
            raise GrammarError(f"the JSON schema cannot be used: {e}") from None
        return Grammar(compiled, self.vocab_size)

    def schema(self, schema: Mapping[str, Any]) -> Grammar:
        """Output that is one JSON value valid under `schema` (keys in the schema's order; no other keys)."""
        return self.json_schema(json.dumps(schema, sort_keys=False))

    def json_object(self) -> Grammar:
        """Output that is one JSON object, any keys and values."""
        return self.json_schema('{"type": "object"}')

    def tool_calls(
        self,
        tools: list[Mapping[str, Any]],
        *,
        required: bool,
        parallel: bool = True,
        text: Mapping[str, Any] | None = None,
    ) -> Grammar:
        """Tool calls as Mistral's models write them (`call_format`): "[TOOL_CALLS]" and a JSON list of one or more
        {"name": NAME, "arguments": {...}}, or from v11 on "[TOOL_CALLS]NAME[ARGS]{...}" once per call; the arguments
        valid under each tool's parameters schema. `required`: the output is the calls alone; else (tool_choice
        auto) it is free text, in which "[TOOL_CALLS]" starts the calls that the grammar then checks, and after which
        only EOS may come; or, with `text` (a JSON schema: response_format), either the calls or one JSON value valid
        under `text`. `parallel` False: one call at most."""
        if self.call_format == "args":
            return self._structural(
                json.dumps({"type": "structural_tag", "format": self._args_calls(tools, required, parallel, text)})
            )
        # as EBNF: a structural tag's own json_schema content would allow any whitespace
        content = {"type": "grammar", "grammar": self._ebnf(calls_schema(tools, parallel), "the tools' parameters")}
        # "[TOOL_CALLS] [{...": the space that Mistral's format (one sentencepiece sentence after the marker) has
        tag = {"type": "tag", "begin": TOOL_CALLS + " ", "content": content, "end": ""}
        if required:
            fmt: dict[str, Any] = tag
        elif text is not None:
            fmt = {"type": "or", "elements": [tag, self._answer(text)]}
        else:
            fmt = {"type": "triggered_tags", "triggers": [TOOL_CALLS], "tags": [tag], "stop_after_first": True}
        return self._structural(json.dumps({"type": "structural_tag", "format": fmt}))

    def _answer(self, text: Mapping[str, Any]) -> dict[str, Any]:
        return {"type": "grammar", "grammar": self._ebnf(text, "the response_format schema")}

    def _args_calls(
        self, tools: list[Mapping[str, Any]], required: bool, parallel: bool, text: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """`tool_calls` in v11's format: each call a tag "[TOOL_CALLS]NAME[ARGS]" + its arguments. tool_choice
        auto: free text until the first marker, whose tag then holds the further calls (a tag's content must be of
        bounded length where its end is empty: MAX_CALLS calls in all)."""
        tags = []
        for t in tools:
            schema = t.get("parameters") or {"type": "object"}
            args = {"type": "grammar", "grammar": self._ebnf(schema, f"the parameters of {t['name']!r}")}
            tags.append({"type": "tag", "begin": TOOL_CALLS + t["name"] + ARGS, "content": args, "end": ""})
        one = tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}
        if required or text is not None:
            calls = {"type": "plus", "content": one} if parallel else one
            return calls if required else {"type": "or", "elements": [calls, self._answer(text)]}
        if parallel:
            more = {"type": "repeat", "min": 0, "max": MAX_CALLS - 1, "content": one}
            tags = [{**tag, "content": {"type": "sequence", "elements": [tag["content"], more]}} for tag in tags]
        return {"type": "triggered_tags", "triggers": [TOOL_CALLS], "tags": tags, "stop_after_first": True}

    def _ebnf(self, schema: Mapping[str, Any], what: str) -> str:
        xgr = _xgrammar()
        try:
            return str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, separators=_SEPARATORS))
        except (RuntimeError, ValueError, xgr.InvalidJSONError) as e:
            raise GrammarError(f"{what} cannot be used: {e}") from None

    @functools.lru_cache(maxsize=64)  # noqa: B019 (one Grammars per server, alive as long as it)
    def _structural(self, text: str) -> Grammar:
        xgr = _xgrammar()
        try:
            compiled = self._compiler.compile_structural_tag(text)
        except (RuntimeError, ValueError, xgr.InvalidJSONError, xgr.InvalidStructuralTagError) as e:
            raise GrammarError(f"the tools and format cannot be used together: {e}") from None
        return Grammar(compiled, self.vocab_size)


def calls_schema(tools: list[Mapping[str, Any]], parallel: bool = True) -> dict[str, Any]:
    """The JSON schema of a list of calls of `tools` ({"name", "parameters"} each): name first, then arguments."""
    one = [
        {
            "type": "object",
            "properties": {"name": {"const": t["name"]}, "arguments": t.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = {"type": "array", "items": one[0] if len(one) == 1 else {"anyOf": one}, "minItems": 1}
    return schema if parallel else {**schema, "maxItems": 1}


class Grammar:
    """A compiled grammar; `start()` gives a new `Constraint` (cheap: the compiled form is shared)."""

    def __init__(self, compiled: Any, vocab_size: int) -> None:
        self._compiled = compiled
        self.vocab_size = vocab_size

    def start(self) -> Constraint:
        return Constraint(_xgrammar().GrammarMatcher(self._compiled), self.vocab_size)


class Constraint:
    """Where one sequence is in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._bitmask = _xgrammar().allocate_token_bitmask(1, vocab_size)

    def bitmask(self) -> torch.Tensor:
        """The tokens allowed next, one bit each (1: allowed), [ceil(V / 32)] int32."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        return self._bitmask[0]

    def mask(self, logits_V: torch.Tensor) -> torch.Tensor:
        """A float32 copy of `logits_V` with the tokens not allowed next at -inf (xgrammar's CPU kernel)."""
        out = logits_V.float().clone()
        if out.shape[-1] < self.vocab_size:
            raise ValueError(f"{out.shape[-1]} logits for a grammar of {self.vocab_size} tokens")
        self.bitmask()
        if out.device.type == "cpu":
            _xgrammar().apply_token_bitmask_inplace(out[None], self._bitmask, vocab_size=self.vocab_size)
            return out
        return apply_bitmask(out, self._bitmask[0].to(out.device))

    def accept(self, token: int) -> None:
        """Move on by `token` (sampled under `mask`); a token the grammar refuses is a bug, raised."""
        if not self._matcher.accept_token(int(token)):
            raise RuntimeError(f"token {token} does not match the grammar (it was sampled without its mask)")

    @property
    def finished(self) -> bool:
        """The grammar has taken EOS."""
        return self._matcher.is_terminated()


def apply_bitmask(logits_V: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """The reference: `logits_V` with each token whose bit (token i: bit i % 32 of word i // 32) is 0 at -inf, and
    the tokens past the bitmask's 32 * words too. Rows [..., V] take bitmasks [..., words]. Returns a new tensor."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[..., None] >> bits) & 1).bool().flatten(-2)
    V = logits_V.shape[-1]
    keep = torch.zeros(*allowed.shape[:-1], V, dtype=torch.bool, device=logits_V.device)
    n = min(V, allowed.shape[-1])
    keep[..., :n] = allowed[..., :n]
    return logits_V.masked_fill(~keep, float("-inf"))


@functools.cache
def _batch_matcher() -> Any:
    return _xgrammar().BatchGrammarMatcher()


def mask_rows(logits_BV: torch.Tensor, constraints: list[Constraint | None]) -> torch.Tensor:
    """A float32 copy of `logits_BV` in which each row with a constraint has the tokens its grammar does not allow
    next at -inf (rows without one are copied as they are): `Constraint.mask` of each row, with the masks of all
    constrained rows filled by one call of xgrammar's batched matcher (its threads) and applied by one call."""
    if logits_BV.shape[0] != len(constraints):
        raise ValueError(f"{logits_BV.shape[0]} rows of logits for {len(constraints)} constraints")
    out = logits_BV.float().clone()
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return out
    vocab = {constraints[i].vocab_size for i in rows}
    if len(vocab) != 1 or out.shape[-1] < min(vocab):
        raise ValueError(f"{out.shape[-1]} logits for grammars of {sorted(vocab)} tokens")
    xgr = _xgrammar()
    vocab_size = vocab.pop()
    bitmask = xgr.allocate_token_bitmask(len(constraints), vocab_size)  # row i: logits row i's (`indices`)
    _batch_matcher().batch_fill_next_token_bitmask([constraints[i]._matcher for i in rows], bitmask, indices=rows)
    if out.device.type == "cpu":
        xgr.apply_token_bitmask_inplace(out, bitmask, vocab_size=vocab_size, indices=rows)
        return out
    index = torch.tensor(rows, device=out.device)
    out[index] = apply_bitmask(out[index], bitmask[rows].to(out.device))
    return out
