"""The Mixtral tokenizer (sentencepiece BPE, 32000 pieces, byte fallback) and the v1 instruct chat format.

Mistral ships the tokenizer as a sentencepiece ``tokenizer.model``; Hugging Face checkpoints carry the same
vocabulary as a ``tokenizer.json``; llama.cpp's GGUF files carry its pieces, scores and types in their metadata
(``tokenizer.ggml.*``), from which the sentencepiece model is rebuilt. All load into one :class:`Tokenizer` whose
ids are exactly sentencepiece's, which are also mistral-common's, the reference for the chat format. Mistral's
later models use tekken (``tekken.json``, 131072 tokens), read through mistral-common; their chats are encoded by
mistral-common too, as every version after v1 is.

Chat format v1 (Mixtral 8x7B Instruct), as mistral-common's ``InstructTokenizerV1`` writes it::

    <s>[INST] user [/INST] answer</s>[INST] next user [/INST]

``[INST]`` and ``[/INST]`` are plain text, not control tokens.
"""

import hashlib
import importlib.resources
import json
import operator
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Protocol

import gguf
import sentencepiece
import tokenizers
from sentencepiece import sentencepiece_model_pb2

__all__ = ["Tokenizer", "load_tokenizer"]

# sentencepiece writes a space as U+2581 "▁" inside pieces.
_SPACE = "\u2581"
# What sentencepiece prints for <unk> (its default unk_surface).
_UNK_SURFACE = " \u2047 "
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _mistral_common_v1() -> Traversable:
    """The v1 tokenizer.model that mistral-common ships (Mixtral 8x7B's tokenizer)."""
    return importlib.resources.files("mistral_common").joinpath("data", "tokenizer.model.v1")


class _Backend(Protocol):
    """What the two file formats provide; ids given to ``decode`` are already range-checked."""

    vocab_size: int
    bos_id: int
    eos_id: int
    control_ids: frozenset[int]  # <s>, </s>, [INST], ...: pieces that print nothing

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def id_to_piece(self, i: int) -> str: ...


class _SentencePieceBackend:
    """A sentencepiece ``tokenizer.model``: the reference behaviour."""

    def __init__(self, model_proto: bytes) -> None:
        # sentencepiece accepts empty bytes as a model with no pieces, so reject it here.
        if not model_proto:
            raise ValueError("the file is empty")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise ValueError(f"sentencepiece cannot parse it ({e})") from e
        self.model_proto = model_proto
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError("the sentencepiece model defines no BOS or EOS piece")
        self.control_ids = frozenset(i for i in range(self.vocab_size) if self._sp.is_control(i))

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)


class _TokenizerJsonBackend:
    """A Hugging Face ``tokenizer.json`` of a sentencepiece BPE vocabulary (Llama/Mistral layout).

    Only the json's vocabulary and merges are used. Its normalizer, pre-tokenizer, post-processor and
    decoder differ between transformers versions (``Prepend`` + ``Replace`` or ``Metaspace``, with or
    without a BOS template) and none of them reproduces sentencepiece exactly: ``Metaspace`` adds no
    dummy prefix to text that starts with a space, the added-token matcher turns a literal "<s>" in
    the text into the BOS id, and the decoder drops <unk> and strips a leading space byte. So this
    backend applies sentencepiece's own normalization (this vocabulary's is the identity, plus the dummy
    prefix and spaces written as "▁") and decodes piece by piece the way sentencepiece does.
    """

    def __init__(self, spec: Any) -> None:
        model = spec.get("model") if isinstance(spec, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE" or not model.get("byte_fallback"):
            raise ValueError("its model is not a byte-fallback BPE (the sentencepiece layout Mixtral uses)")
        model_vocab: dict[str, int] = model.get("vocab") or {}
        id_of = dict(model_vocab)
        special: set[int] = set()
        for token in spec.get("added_tokens") or []:
            id_of.setdefault(token["content"], token["id"])
            if token.get("special"):
                special.add(token["id"])
        ids = sorted(id_of.values())
        if ids != list(range(len(ids))):
            raise ValueError("its token ids are not 0..N-1")
        for piece in ("<s>", "</s>"):
            if piece not in id_of:
                raise ValueError(f"it has no {piece} token")

        self.vocab_size = len(ids)
        self.bos_id = id_of["<s>"]
        self.eos_id = id_of["</s>"]
        self._pieces = [""] * self.vocab_size
        for piece, i in id_of.items():
            self._pieces[i] = piece
        self._unk_id = id_of.get(model.get("unk_token") or "<unk>", -1)
        # sentencepiece prints nothing for control pieces (<s>, </s>) but " ⁇ " for <unk>.
        self._control = frozenset(special - {self._unk_id})
        self.control_ids = self._control
        self._byte = [-1] * self.vocab_size
        for i, piece in enumerate(self._pieces):
            if m := _BYTE_PIECE.fullmatch(piece):
                self._byte[i] = int(m.group(1), 16)

        # sentencepiece scores the pieces made only of "▁" (runs of spaces) below every other piece, so it
        # merges them last, leftmost pair first. transformers ranks merges by piece id instead, which puts
        # "▁ ▁" first: " hello" would give "▁▁" "hello" where sentencepiece gives "▁" "▁hell" "o". So
        # those merges are left out of the BPE and done afterwards by _merge_space_runs. The other pieces'
        # scores fall as their ids rise, so the json's ranking of their merges is sentencepiece's.
        merges = [_parse_merge(m) for m in model.get("merges") or []]
        merges = [(a, b) for a, b in merges if not _is_spaces(a + b)]
        self._space_run_ids = {len(p): i for p, i in model_vocab.items() if _is_spaces(p)}
        self._space_id = model_vocab.get(_SPACE, -1)
        try:
            self._bpe = tokenizers.models.BPE(
                vocab=model_vocab,
                merges=merges,
                unk_token=model.get("unk_token"),
                fuse_unk=bool(model.get("fuse_unk")),
                byte_fallback=True,
                ignore_merges=False,
            )
        except Exception as e:  # tokenizers raises a bare Exception for inconsistent vocab/merges
            raise ValueError(f"its BPE model is inconsistent ({e})") from e

    def encode(self, text: str) -> list[int]:
        if not text:
            return []  # sentencepiece adds no dummy prefix to empty text
        ids = [t.id for t in self._bpe.tokenize(_SPACE + text.replace(" ", _SPACE))]
        return self._merge_space_runs(ids)

    def _merge_space_runs(self, ids: list[int]) -> list[int]:
        """Merge runs of bare "▁" pieces the way sentencepiece does: always the leftmost mergeable pair.

        Merging the leftmost pair first is the same as pushing the pieces one by one onto a stack and
        merging its top two while their join is a piece, which is linear in the run length.
        """
        out: list[int] = []
        run: list[int] = []  # lengths of the "▁"-only pieces of the current run
        for i in [*ids, -1]:
            if i == self._space_id and i >= 0:
                run.append(1)
                while len(run) >= 2 and run[-2] + run[-1] in self._space_run_ids:
                    last = run.pop()
                    run[-1] += last
                continue
            out.extend(self._space_run_ids[n] for n in run)
            run.clear()
            if i >= 0:
                out.append(i)
        return out

    def decode(self, ids: list[int]) -> str:
        parts: list[str] = []
        pending = bytearray()  # a run of byte-fallback pieces, decoded as one UTF-8 string
        at_start = True  # sentencepiece drops the dummy-prefix space of the first piece only
        for i in ids:
            if self._byte[i] >= 0:
                pending.append(self._byte[i])
                at_start = False
                continue
            if pending:
                parts.append(_utf8_like_sentencepiece(bytes(pending)))
                pending.clear()
            if i in self._control:
                continue
            if i == self._unk_id:
                parts.append(_UNK_SURFACE)
            else:
                piece = self._pieces[i]
                if at_start and piece.startswith(_SPACE):
                    piece = piece[1:]
                parts.append(piece.replace(_SPACE, " "))
            at_start = False
        if pending:
            parts.append(_utf8_like_sentencepiece(bytes(pending)))
        return "".join(parts)

    def id_to_piece(self, i: int) -> str:
        return self._pieces[i]


class _TekkenBackend:
    """Mistral's tekken tokenizer (``tekken.json``: a tiktoken-style byte-level BPE after 1000 special tokens, which
    Mistral NeMo, Pixtral, Ministral and later models use), read by mistral-common's `Tekkenizer`: its ids exactly.
    No dummy prefix: "hi" and " hi" are different tokens, and the text is encoded as it is."""

    def __init__(self, path: str) -> None:
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        try:
            self._tekken = Tekkenizer.from_file(path)
        except Exception as e:  # mistral-common raises several types for a file it cannot use
            raise ValueError(f"its tekken vocabulary cannot be read ({type(e).__name__}: {e})") from None
        self.vocab_size = self._tekken.n_words
        self.bos_id, self.eos_id = self._tekken.bos_id, self._tekken.eos_id
        self.control_ids = frozenset(range(self._tekken.num_special_tokens)) - {self._tekken.unk_id}
        self.version = self._tekken.version.value

    def encode(self, text: str) -> list[int]:
        return self._tekken.encode(text, bos=False, eos=False)

    def decode(self, ids: list[int]) -> str:
        return self._tekken.decode(ids)  # its special tokens (ours are those but <unk>) print nothing

    def id_to_piece(self, i: int) -> str:
        return self._tekken.id_to_piece(i)

    def token_bytes(self, i: int) -> bytes:
        return self._tekken.id_to_byte_piece(i)


def _parse_merge(merge: Any) -> tuple[str, str]:
    # Older tokenizer.json files write a merge as "a b", newer ones as ["a", "b"].
    a, b = merge.split(" ") if isinstance(merge, str) else merge
    return a, b


def _is_spaces(piece: str) -> bool:
    return bool(piece) and piece.strip(_SPACE) == ""


def _utf8_like_sentencepiece(data: bytes) -> str:
    """Decode UTF-8 replacing every byte of an invalid sequence by U+FFFD, as sentencepiece does.

    Python's "replace" handler would turn a truncated sequence such as F0 9F 98 into a single U+FFFD.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    out: list[str] = []
    pos = 0
    while pos < len(data):
        lead = data[pos]
        size = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        try:
            out.append(data[pos : pos + size].decode("utf-8"))
            pos += size
        except UnicodeDecodeError:
            out.append("\ufffd")
            pos += 1
    return "".join(out)


class Tokenizer:
    """Text <-> token ids for Mixtral, plus the v1 instruct chat format.

    Build one with :func:`load_tokenizer`. Ids equal sentencepiece's (and mistral-common's) whichever file
    it was loaded from.
    """

    def __init__(self, backend: _Backend, source: str) -> None:
        self._backend = backend
        self._source = source

    def __repr__(self) -> str:
        return f"Tokenizer(source={self._source!r}, vocab_size={self.vocab_size})"

    @property
    def source(self) -> str:
        """The file this tokenizer was loaded from."""
        return self._source

    @property
    def bos_id(self) -> int:
        """Id of <s>, which starts every sequence."""
        return self._backend.bos_id

    @property
    def eos_id(self) -> int:
        """Id of </s>, which ends every assistant answer."""
        return self._backend.eos_id

    @property
    def vocab_size(self) -> int:
        """Number of pieces (32000 for Mixtral)."""
        return self._backend.vocab_size

    @property
    def control_ids(self) -> frozenset[int]:
        """The control tokens (<s>, </s>, and in v2+ [INST], [TOOL_CALLS], ...), which print nothing."""
        return self._backend.control_ids

    @property
    def version(self) -> str:
        """Mistral's tokenizer version ("v1", "v2", "v3", "v7"): how chats and tools are encoded. Taken from the
        file name's suffix where it has one (mistral-common's files: ``tokenizer.model.v3``), else from the control
        tokens, which each version added: [TOOL_CALLS] (v2), [IMG] (v3), [SYSTEM_PROMPT] (v7); none of them: v1."""
        if isinstance(version := getattr(self._backend, "version", None), str):  # a tekken file says its own
            return version
        if m := re.search(r"\.(v\d+)(m\d+)?$", self._source):
            return m.group(1)
        controls = {self._backend.id_to_piece(i) for i in self.control_ids}
        for piece, version in (("[SYSTEM_PROMPT]", "v7"), ("[IMG]", "v3"), ("[TOOL_CALLS]", "v2")):
            if piece in controls:
                return version
        return "v1"

    @property
    def is_tekken(self) -> bool:
        """Whether this is a tekken tokenizer (loaded from a ``tekken.json``)."""
        return isinstance(self._backend, _TekkenBackend)

    @property
    def tool_tokens(self) -> bool:
        """Whether the vocabulary has Mistral's tool tokens ([AVAILABLE_TOOLS], [TOOL_CALLS], [TOOL_RESULTS])."""
        return self.version != "v1"

    def decode_with_controls(self, ids: Iterable[int]) -> str:
        """As `decode`, but control tokens other than <s> and </s> are written as their pieces ("[TOOL_CALLS]")."""
        ids = [self._check_id(i) for i in ids]
        parts, run = [], []
        for i in ids:
            if i in self.control_ids and i not in (self.bos_id, self.eos_id):
                parts += [self._backend.decode(run), self._backend.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join([*parts, self._backend.decode(run)])

    def encode_openai_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of an OpenAI chat (messages with roles system, user, assistant (with ``tool_calls``) and tool
        (with ``tool_call_id``); ``tools`` as OpenAI's {"type": "function", "function": {...}}), in this tokenizer's
        version of Mistral's format. v2 and later: through mistral-common (`MistralTokenizer.encode_chat_completion`),
        its ids exactly. v1, which has no tool tokens: tools, calls and results are written as text in the same
        layout (see `_v1_tool_messages`), then encoded as `encode_chat`. A conversation mistral-common refuses is a
        ``ValueError`` saying why."""
        if self.version == "v1":
            return self.encode_chat(_v1_tool_messages(messages, tools or []))
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        try:
            request = ChatCompletionRequest.from_openai(_mistral_ids(messages), tools=list(tools) if tools else None)
            if messages and messages[-1].get("role") == "assistant" and messages[-1].get("prefix"):
                request.messages[-1].prefix = True  # an answer to continue (from_openai drops the key)
            return self._mistral().encode_chat_completion(request).tokens
        except (MistralCommonException, ValueError, TypeError, KeyError) as e:  # pydantic's errors are ValueErrors
            raise ValueError(f"mistral-common refuses the conversation: {e}") from None

    def _mistral(self) -> Any:
        """mistral-common's tokenizer for this file, at `version` (its own loader reads the version from the file
        name alone, and calls a bare tokenizer.model v1)."""
        if getattr(self, "_mistral_tokenizer", None) is None:
            self._mistral_tokenizer = _mistral_common_tokenizer(self._source, self.version)
        return self._mistral_tokenizer

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with <s> in front if ``bos`` and </s> at the end if ``eos``.

        The text is encoded as one sentencepiece sentence: a space is prepended (the "dummy prefix"), so
        "hi" and " hi" differ, and special-token strings such as "<s>" or "[INST]" are ordinary text.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self._backend.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``, as sentencepiece decodes it.

        <s> and </s> print nothing, <unk> prints " ⁇ ", the leading space of the first piece is dropped
        and a byte-fallback sequence that is not valid UTF-8 gives one U+FFFD per byte. To stream, decode
        all ids generated so far and emit what was added; hold back text ending in U+FFFD, which may be a
        character whose remaining bytes are still to come.
        """
        ids = [self._check_id(i) for i in ids]
        return self._backend.decode(ids)

    def id_to_piece(self, i: int) -> str:
        """The raw piece of id ``i``, e.g. "▁the", "<0xE2>" or "<s>"."""
        return self._backend.id_to_piece(self._check_id(i))

    def token_bytes(self, i: int) -> bytes:
        """The bytes token ``i`` adds to the text (inside a text, not at its start): "▁" a space, a byte-fallback
        piece its byte, a control token none."""
        i = self._check_id(i)
        if i in self.control_ids:
            return b""
        if hasattr(self._backend, "token_bytes"):
            return self._backend.token_bytes(i)
        piece = self._backend.id_to_piece(i)
        if m := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        return piece.replace(_SPACE, " ").encode()

    def sentencepiece_model(self) -> bytes:
        """The serialized sentencepiece model (what a GGUF file's tokenizer metadata is written from); only for a
        tokenizer loaded from a sentencepiece model or a GGUF file, a ValueError otherwise."""
        proto = getattr(self._backend, "model_proto", None)
        if proto is None:
            raise ValueError(f"{self._source} is not a sentencepiece model; load the tokenizer from a tokenizer.model")
        return proto

    def _check_id(self, i: int) -> int:
        i = operator.index(i)  # accepts numpy and 0-d torch integers, rejects floats
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return i

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of a conversation in this tokenizer's instruct format, identical to mistral-common's: v1
        written here, later versions (v2, v3, v7, tekken's) through mistral-common (`encode_openai_chat`).

        ``messages`` are ``{"role": "system" | "user" | "assistant", "content": str}``; the last one may
        be an assistant message with ``"prefix": True``, an answer for the model to continue (no </s>).
        The sequence must end with a user message (or such a prefix); see :func:`_chat_turns` for how
        system messages and runs of one role are folded. Raises ``ValueError`` naming the offending
        message when the conversation is not one mistral-common accepts.
        """
        if self.version != "v1":
            _validate_chat(messages)
            return self.encode_openai_chat(messages)
        return self._encode_turns(_chat_turns(messages))[0]

    def encode_chat_with_mask(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[bool]]:
        """For training: the ids of a conversation that may end with a complete assistant answer, and a
        mask that is True on assistant tokens (answers and their </s>), the tokens a model learns to say. The v1
        format only: a ValueError for a tokenizer of a later version."""
        if self.version != "v1":
            raise ValueError(
                f"chat training data is written in the v1 instruct format; {self._source} is a {self.version} "
                "tokenizer (train on plain text, or with Mixtral's v1 tokenizer.model)"
            )
        if messages and isinstance(messages[-1], Mapping) and messages[-1].get("role") == "assistant":
            if messages[-1].get("prefix"):
                raise ValueError(f"message {len(messages) - 1} (assistant): a training answer cannot be a prefix")
            # Validate as a conversation to be continued, then close the last answer with </s>.
            turns = _chat_turns([*messages[:-1], {**messages[-1], "prefix": True}])
            turns[-1] = _Turn("assistant", turns[-1].content, prefix=False)
        else:
            turns = _chat_turns(messages)
        return self._encode_turns(turns)

    def _encode_turns(self, turns: Sequence["_Turn"]) -> tuple[list[int], list[bool]]:
        ids, mask = [self.bos_id], [False]
        for turn in turns:
            if turn.role == "user":
                # One sentencepiece sentence, so "[INST]" gets the dummy-prefix space: "▁[INST]".
                seg = self.encode(f"[INST] {turn.content} [/INST]", bos=False)
            else:
                seg = self.encode(turn.content, bos=False, eos=not turn.prefix)
            ids += seg
            mask += [turn.role == "assistant"] * len(seg)
        return ids, mask


@dataclass(frozen=True)
class _Turn:
    role: str  # "user" or "assistant"
    content: str
    prefix: bool = False


_ROLES = ("system", "user", "assistant")


def _chat_turns(messages: Sequence[Mapping[str, Any]]) -> list[_Turn]:
    """Validate a conversation and fold it into alternating turns, as mistral-common v1 does.

    - All non-empty system contents, wherever they are, are joined with a blank line and put, followed by
      a blank line, in front of the first user turn.
    - Consecutive user (or assistant) messages become one turn, their non-empty contents joined with a
      blank line; a system message between two of them keeps them apart.
    - If the first turn is not a user turn (only system messages, or an assistant message first), an
      empty user turn is put in front.
    """
    _validate_chat(messages)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    turns: list[_Turn] = []
    run: list[Mapping[str, Any]] = []  # consecutive messages of one role
    for message in [*messages, None]:
        if run and (message is None or message["role"] != run[0]["role"]):
            if run[0]["role"] != "system":
                content = "\n\n".join(m["content"] for m in run if m["content"])
                prefix = any(m.get("prefix", False) for m in run)
                turns.append(_Turn(run[0]["role"], content, prefix))
            run = []
        if message is not None:
            run.append(message)
    if not turns or turns[0].role != "user":
        turns.insert(0, _Turn("user", ""))
    if system:
        turns[0] = _Turn("user", f"{system}\n\n{turns[0].content}")
    return turns


def _validate_chat(messages: Sequence[Mapping[str, Any]]) -> None:
    """The checks mistral-common's v1 validator makes (for text-only messages), as ``ValueError``."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("the conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} is a {type(m).__name__}, not a dict with role and content")
        role = m.get("role")
        if role not in _ROLES:
            raise ValueError(f"message {i} has role {role!r}; expected one of {', '.join(_ROLES)}")
        if not isinstance(m.get("content"), str):
            got = type(m.get("content")).__name__
            raise ValueError(f"message {i} ({role}) needs a str content, got {got}")
        allowed = {"role", "content", "prefix"} if role == "assistant" else {"role", "content"}
        if extra := sorted(set(m) - allowed):
            raise ValueError(f"message {i} ({role}) has unexpected keys {extra}")
        if not isinstance(m.get("prefix", False), bool):
            raise ValueError(f"message {i} ({role}) has a non-bool prefix")

    last = len(messages) - 1
    if last == 0 and messages[0]["role"] == "assistant":
        raise ValueError("message 0 (assistant): a conversation must start with a user or system message")
    if last > 0 and messages[last]["role"] == "assistant" and not messages[last].get("prefix", False):
        raise ValueError(
            f"message {last} (assistant): the last message must be a user message, or an assistant "
            'message with "prefix": True to be continued'
        )
    for i in range(1, len(messages)):
        if messages[i - 1]["role"] == "assistant" and messages[i]["role"] == "system":
            raise ValueError(f"message {i} (system): a system message cannot follow an assistant message")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"]:
            raise ValueError(f"message {i} (assistant): an assistant message needs non-empty content")
        if m.get("prefix", False) and i != last:
            raise ValueError(f'message {i} (assistant): only the last message can have "prefix": True')


def _v1_tool_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> list[dict]:
    """An OpenAI chat with tools as plain v1 messages, in the layout of Mistral's v3 format written as text: the
    tools as "[AVAILABLE_TOOLS] [...] [/AVAILABLE_TOOLS]" in a system message (v1 puts it before the first user
    turn), an assistant's calls as "[TOOL_CALLS] [{"name": ..., "arguments": {...}}]", a tool's result as a user
    message "[TOOL_RESULTS] {"content": ..., "call_id": ...} [/TOOL_RESULTS]"."""
    out: list[dict] = []
    if tools:
        listed = json.dumps(list(tools), ensure_ascii=False)
        out.append({"role": "system", "content": f"[AVAILABLE_TOOLS] {listed} [/AVAILABLE_TOOLS]"})
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if role == "tool":
            result = json.dumps({"content": content, "call_id": m.get("tool_call_id")}, ensure_ascii=False)
            out.append({"role": "user", "content": f"[TOOL_RESULTS] {result} [/TOOL_RESULTS]"})
        elif role == "assistant" and m.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")}
                for c in m["tool_calls"]
            ]
            text = f"[TOOL_CALLS] {json.dumps(calls, ensure_ascii=False)}"
            out.append({"role": "assistant", "content": f"{content} {text}" if content else text})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content", "prefix")})
    return out


def _mistral_ids(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """`messages` with their tool-call ids as mistral-common v3+ requires them (9 letters or digits): an id that is
    not one is replaced by one made from its hash, the same in the call and in the tool's result."""

    def fix(call_id: Any) -> Any:
        if not isinstance(call_id, str) or re.fullmatch(r"[A-Za-z0-9]{9}", call_id):
            return call_id
        digest = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
        return "".join(_ID_CHARS[(digest >> (6 * k)) % len(_ID_CHARS)] for k in range(9))

    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "id": fix(c.get("id"))} for c in m["tool_calls"]]
        if m.get("tool_call_id") is not None:
            m["tool_call_id"] = fix(m["tool_call_id"])
        out.append(m)
    return out


_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _mistral_common_tokenizer(source: str, version: str) -> Any:
    """mistral-common's MistralTokenizer for the tokenizer file `source`, at `version`."""
    from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
    from mistral_common.tokens.tokenizers import instruct
    from mistral_common.tokens.tokenizers.base import TokenizerVersion
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer, get_normalizer
    from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

    path = Path(source)
    if not path.is_file():
        raise ValueError(f"the {version} chat format needs the tokenizer's own file; {source} is not one")
    if path.suffix == ".json":
        return MistralTokenizer.from_file(path)
    classes = {
        "v2": instruct.InstructTokenizerV2,
        "v3": instruct.InstructTokenizerV3,
        "v7": instruct.InstructTokenizerV7,
    }
    if version not in classes:
        raise ValueError(f"tokenizer version {version} is not supported here (v1, v2, v3, v7)")
    tokenizer = SentencePieceTokenizer(path, tokenizer_version=TokenizerVersion(version))
    return MistralTokenizer(
        classes[version](tokenizer),
        validator=get_validator(tokenizer.version, mode=ValidationMode.test),
        request_normalizer=get_normalizer(tokenizer.version, tokenizer.model_settings_builder),
    )


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Tokenizer:
    """Load the Mixtral tokenizer.

    ``path`` may be a sentencepiece model, a ``tokenizer.json`` or a GGUF file (told apart by content, not by
    name), or a directory: its ``tokenizer.model`` if present, else its ``tokenizer.json``, else (as with
    ``None``) the v1 tokenizer.model that mistral-common ships, which is Mixtral 8x7B's.
    """
    if path is None:
        resource = _mistral_common_v1()
        return _load_bytes(resource.read_bytes(), str(resource))
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("tokenizer.model", "tekken.json", "tokenizer.json"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        return load_tokenizer(None)
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer path {path} does not exist; expected a tokenizer.model, a tokenizer.json "
            "or a directory holding one"
        )
    if not path.is_file():
        raise ValueError(f"tokenizer path {path} is not a regular file; expected a tokenizer.model or tokenizer.json")
    try:
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":  # a GGUF model file: its tokenizer is in its metadata
                return Tokenizer(_SentencePieceBackend(_gguf_sentencepiece(path)), str(path))
            f.seek(0)
            data = f.read(MAX_TOKENIZER_BYTES + 1)
    except OSError as e:
        raise ValueError(f"tokenizer file {path} cannot be read: {e.strerror or e}") from None
    if len(data) > MAX_TOKENIZER_BYTES:
        raise ValueError(f"{path} is larger than any tokenizer ({MAX_TOKENIZER_BYTES >> 20} MiB at most)")
    return _load_bytes(data, str(path))


# Mixtral's tokenizer.model is 0.5 MB, a large tokenizer.json ~20 MB: past this a file is not a tokenizer.
MAX_TOKENIZER_BYTES = 256 << 20


# llama.cpp's token types (gguf.TokenType) are sentencepiece's piece types, by the same numbers.
_SP_TYPES = {int(t) for t in gguf.TokenType}


def _gguf_sentencepiece(path: Path) -> bytes:
    """The sentencepiece model (serialized) that a GGUF file's ``tokenizer.ggml.*`` metadata describes: llama.cpp's
    converter copies a sentencepiece BPE model's pieces, scores and types there (``tokenizer.ggml.model`` "llama"),
    with its BOS / EOS / UNK ids and whether it adds the dummy-prefix space. Only the header of the file is read."""
    try:
        fields = gguf.GGUFReader(path, "r").fields
    except Exception as e:  # the reader raises many types for a bad file
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None

    def get(key: str, default: Any = None) -> Any:
        f = fields.get(f"tokenizer.ggml.{key}")
        return default if f is None else f.contents()

    model = get("model")
    if model != "llama":
        raise ValueError(
            f"{path}: its tokenizer is {model!r}, not a sentencepiece BPE ('llama', Mixtral's); pass --tokenizer"
        )
    tokens = get("tokens")
    if not tokens:
        raise ValueError(f"{path} holds no tokenizer.ggml.tokens; pass --tokenizer")
    scores = get("scores") or [0.0] * len(tokens)
    types = get("token_type") or [int(gguf.TokenType.NORMAL)] * len(tokens)
    if not len(scores) == len(types) == len(tokens) or not set(types) <= _SP_TYPES:
        raise ValueError(f"{path}: tokenizer.ggml.tokens, scores and token_type do not agree")
    proto = sentencepiece_model_pb2.ModelProto()
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        proto.pieces.add(piece=piece, score=score, type=kind)
    spec = proto.trainer_spec
    spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = int(gguf.TokenType.BYTE) in types
    spec.unk_id = get("unknown_token_id", 0)
    spec.bos_id = get("bos_token_id", 1)
    spec.eos_id = get("eos_token_id", 2)
    spec.pad_id = -1
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(get("add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    template = fields.get("tokenizer.chat_template")
    if template is not None and "[INST]" not in template.contents():
        # Our chat format is Mistral's v1 ([INST] ... [/INST]), Mixtral Instruct's; another template is not run.
        said = f"mixtral: {path.name}'s chat template is not Mistral's [INST] format; chat uses Mistral's v1"
        print(said, file=sys.stderr)
    return proto.SerializeToString()


def _load_bytes(data: bytes, source: str) -> Tokenizer:
    backend: _Backend
    if data.lstrip()[:1] == b"{":
        try:
            spec = json.loads(data)
            if isinstance(spec, dict) and isinstance(spec.get("vocab"), list) and "config" in spec:  # tekken
                return Tokenizer(_TekkenBackend(source), source)
            backend = _TokenizerJsonBackend(spec)
        except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(
                f"{source} is not a usable tokenizer.json: {e}; expected a Hugging Face tokenizer.json "
                "with a byte-fallback BPE model (Llama/Mistral layout)"
            ) from e
    else:
        try:
            backend = _SentencePieceBackend(data)
        except ValueError as e:
            raise ValueError(
                f"{source} is neither a sentencepiece model nor a tokenizer.json: {e}; expected a "
                "sentencepiece tokenizer.model or a Hugging Face tokenizer.json"
            ) from e
    return Tokenizer(backend, source)
