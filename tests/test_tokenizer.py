"""The tokenizer against mistral-common, the reference for Mixtral's v1 tokenizer and chat format."""

import importlib.resources
import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral.tokenizer import Tokenizer, load_tokenizer

V1_MODEL = importlib.resources.files("mistral_common").joinpath("data", "tokenizer.model.v1")

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Café, naïve, façade, Ångström, Straße",
    "e\u0301 (a combining accent)",
    "日本語のテキストと中文文本",
    "Ελληνικά Русский العربية עברית हिन्दी",
    "emoji 🙂 🦀 🫠 🇫🇷 👨‍👩‍👧 ꙮ 𝔘",  # most of these are byte-fallback pieces
    "def f(x):\n\tif x:\n\t\treturn x  # comment\n    pass\n",
    "a    b        c",
    "   leading and trailing   ",
    " ",
    "  ",
    "\n",
    "\t",
    "\r\nwindows line\r\n",
    "0 1 12 123 1234 3.14159 -42 1e10 2024-01-01 $1,000.50",
    "",
    "[INST] not a control token [/INST]",
    "<s> </s> <unk> are text here",
    "▁ already escaped ▁▁ spaces",
    "\u3000 ideographic space, ﬁ ligature, fullwidth Ａ",  # no NFKC: all kept as they are
    "word " * 300,
]
# Runs of spaces are where a tokenizer.json and sentencepiece disagree unless handled.
SPACE_RUNS = [ctx.format(" " * n) for n in range(0, 34) for ctx in ("{}", "x{}", "{}x", "a{}b", "\n{}x")]


@pytest.fixture(scope="module")
def reference() -> MistralTokenizer:
    return MistralTokenizer.v1()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_mistral_common(tok: Tokenizer, reference: MistralTokenizer, text: str) -> None:
    raw = reference.instruct_tokenizer.tokenizer
    for bos in (True, False):
        for eos in (True, False):
            assert tok.encode(text, bos=bos, eos=eos) == raw.encode(text, bos=bos, eos=eos)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_mistral_common_and_round_trips(tok: Tokenizer, reference: MistralTokenizer, text: str) -> None:
    ids = tok.encode(text, bos=True, eos=True)
    assert tok.decode(ids) == reference.decode(ids)
    # sentencepiece writes spaces as "▁", so a literal "▁" comes back as a space; all else round-trips.
    assert tok.decode(ids) == text.replace("▁", " ")


def test_vocabulary_facts(tok: Tokenizer) -> None:
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert [tok.id_to_piece(i) for i in (0, 1, 2, 3, 258)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    assert tok.encode("", bos=False) == [] and tok.encode("") == [1]
    # "🦀" is not in the vocabulary: "▁" then its four UTF-8 bytes.
    assert [tok.id_to_piece(i) for i in tok.encode("🦀", bos=False)] == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]
    assert [tok.id_to_piece(i) for i in tok.encode(" the", bos=False)] == ["▁", "▁the"]


def test_decode_edge_cases_match_mistral_common(tok: Tokenizer, reference: MistralTokenizer) -> None:
    byte = {b: 3 + b for b in range(256)}
    x = tok.encode("x", bos=False)[0]
    cases = [
        [0],  # <unk> prints " ⁇ "
        [x, 0, x],
        [byte[0xE2]],  # a truncated character: one U+FFFD per byte
        [byte[0xF0], byte[0x9F], byte[0x98]],
        [byte[0xE2], byte[0x82], byte[0xAC], byte[0xE2]],  # "€" then a lone byte
        [byte[0xE2], 2, byte[0x82], byte[0xAC]],  # a control piece splits a byte run
        [byte[0x20], x],  # a leading space byte is not the dummy prefix
        [1, x, 2, x, 2],
        [2, 2, 1],
        [],
    ]
    for ids in cases:
        assert tok.decode(ids) == reference.decode(ids), ids
    assert tok.decode([byte[0xE2]]) == "\ufffd"
    assert tok.decode([byte[0xF0], byte[0x9F], byte[0x98]]) == "\ufffd" * 3
    assert tok.decode(iter((1, x))) == "x"


def test_out_of_range_ids_raise(tok: Tokenizer) -> None:
    for bad in (32000, -1):
        with pytest.raises(ValueError, match=str(bad)):
            tok.decode([1, bad])
        with pytest.raises(ValueError, match=str(bad)):
            tok.id_to_piece(bad)
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- chat
def _reference_chat(reference: MistralTokenizer, messages: list[dict]) -> list[int]:
    classes = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    converted = [classes[m["role"]](**{k: v for k, v in m.items() if k != "role"}) for m in messages]
    return reference.encode_chat_completion(ChatCompletionRequest(messages=converted)).tokens


def _s(content: str) -> dict:
    return {"role": "system", "content": content}


def _u(content: str) -> dict:
    return {"role": "user", "content": content}


def _a(content: str, prefix: bool = False) -> dict:
    return {"role": "assistant", "content": content, "prefix": prefix}


CHATS = {
    "one user": [_u("Hello!")],
    "multi-turn": [_u("What is 2+2?"), _a("4."), _u("And 3+3?"), _a("6."), _u("Thanks! Now 🦀?")],
    "system first": [_s("You are terse."), _u("Hi"), _a("Hello."), _u("Bye")],
    "two systems, one late": [_s("Be kind."), _u("Hi"), _a("Hey"), _u("Q"), _s("Be brief.")],
    "system only": [_s("Only a system prompt")],
    "system between users": [_u("a"), _s("sys"), _u("b")],
    "consecutive users merge": [_u("first"), _u(""), _u("second"), _a("ok"), _u("x")],
    "consecutive assistants merge": [_u("q"), _a("part one"), _a("part two"), _u("next")],
    "assistant first": [_a("I speak first"), _u("ok")],
    "system then assistant": [_s("sys"), _a("I speak first"), _u("ok")],
    "empty user": [_u("")],
    "empty system is dropped": [_s(""), _u("hi")],
    "prefix to continue": [_s("sys"), _u("Write a poem"), _a("Roses are", prefix=True)],
    "merged into a prefix": [_u("q"), _a("one"), _a("two", prefix=True)],
    "spaces and literal markers": [_u("  [INST] spaced [/INST]  "), _a(" </s> "), _u("\n\tend\n")],
}


@pytest.mark.parametrize("messages", CHATS.values(), ids=CHATS.keys())
def test_chat_matches_mistral_common(tok: Tokenizer, reference: MistralTokenizer, messages: list[dict]) -> None:
    assert tok.encode_chat(messages) == _reference_chat(reference, messages)


def test_chat_format_v1(tok: Tokenizer) -> None:
    # <s>[INST] system\n\nuser [/INST] answer</s>[INST] user [/INST], each segment encoded on its own.
    messages = [_s("Be brief."), _u("Hi"), _a("Hello."), _u("Bye")]
    expected = [
        tok.bos_id,
        *tok.encode("[INST] Be brief.\n\nHi [/INST]", bos=False),
        *tok.encode("Hello.", bos=False, eos=True),
        *tok.encode("[INST] Bye [/INST]", bos=False),
    ]
    assert tok.encode_chat(messages) == expected
    assert tok.decode(expected) == "[INST] Be brief.\n\nHi [/INST] Hello. [INST] Bye [/INST]"
    # A prefix gets no </s>, so the model continues it.
    assert tok.encode_chat([_u("Hi"), _a("Hel", prefix=True)])[-1] != tok.eos_id


def test_random_chats_match_mistral_common(tok: Tokenizer, reference: MistralTokenizer) -> None:
    """Random role sequences: both accept with the same ids, or both reject."""
    rng = random.Random(0)
    contents = ["", "hi", "Hello there!", " spaced ", "two\n\nlines", "日本語 🦀", "[INST]"]
    accepted = 0
    for _ in range(400):
        messages = []
        for _ in range(rng.randrange(0, 6)):
            role = rng.choice(["system", "user", "user", "assistant", "assistant"])
            message = {"role": role, "content": rng.choice(contents)}
            if role == "assistant" and rng.random() < 0.3:
                message["prefix"] = True
            messages.append(message)
        try:
            expected = _reference_chat(reference, messages)
        except Exception:
            with pytest.raises(ValueError):
                tok.encode_chat(messages)
        else:
            assert tok.encode_chat(messages) == expected, messages
            accepted += 1
    assert 80 < accepted < 320  # both outcomes were exercised


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "no messages"),
        ([_u("hi"), {"role": "tool", "content": "x"}], r"message 1 .*'tool'"),
        ([_u("hi"), {"role": "assistant", "content": None}], r"message 1 \(assistant\).*str"),
        ([{"role": "user", "content": ["chunk"]}], r"message 0 \(user\).*str"),
        ([{"role": "user"}], r"message 0 \(user\)"),
        (["hi"], "message 0"),
        ([_a("hi")], r"message 0 \(assistant\)"),
        ([_u("hi"), _a("answer")], r"message 1 \(assistant\).*last"),
        ([_u("hi"), _a("a", prefix=True), _u("b")], r"message 1 \(assistant\).*prefix"),
        ([_u("hi"), _a("answer"), _s("late"), _u("b")], r"message 2 \(system\).*follow an assistant"),
        ([_u("hi"), _a(""), _u("b")], r"message 1 \(assistant\).*non-empty"),
        ([{"role": "user", "content": "hi", "prefix": True}], r"message 0 \(user\).*unexpected keys"),
        ([_u("hi"), {"role": "assistant", "content": "a", "prefix": "yes"}], r"message 1 \(assistant\)"),
    ],
)
def test_invalid_chats_raise(tok: Tokenizer, messages: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tok.encode_chat(messages)


# ------------------------------------------------------------------------------------ tokenizer.json
def _json_by_transformers_from_vocab(out: Path) -> None:
    """transformers' sentencepiece -> tokenizer.json conversion, reading the pieces with sentencepiece.

    ``LlamaTokenizer.from_pretrained`` does exactly this (vocab {piece: id}, ``generate_merges``) but
    reads the .model with protobuf, which is not a dependency here; both give the same json.
    """
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = sentencepiece.SentencePieceProcessor(model_proto=V1_MODEL.read_bytes())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab)).save_pretrained(out)


def _json_by_transformers_from_pretrained(out: Path) -> None:
    pytest.importorskip("google.protobuf", reason="transformers reads a .model with protobuf")
    from transformers import LlamaTokenizer

    source = out / "source"
    source.mkdir()
    shutil.copyfile(str(V1_MODEL), source / "tokenizer.model")
    hf = LlamaTokenizer.from_pretrained(source)
    assert len(hf) == 32000  # without the extractor transformers silently falls back to a 3-token vocab
    hf.save_pretrained(out)
    shutil.rmtree(source)


def _json_in_legacy_hub_layout(out: Path) -> None:
    """The layout of the tokenizer.json on the hub for Mixtral 8x7B: Prepend + Replace normalizer, no
    pre-tokenizer, a post-processor that adds <s>, and merges written as "a b" strings."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import normalizers, processors

    _json_by_transformers_from_vocab(out)
    hf = HFTokenizer.from_file(str(out / "tokenizer.json"))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.pre_tokenizer = None
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    assert hf.encode("hi").ids[0] == 1  # this json, used as is, would add <s> on its own
    spec = json.loads(hf.to_str())
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


JSON_MAKERS = {
    "transformers-from-vocab": _json_by_transformers_from_vocab,
    "transformers-from_pretrained": _json_by_transformers_from_pretrained,
    "legacy-hub-layout": _json_in_legacy_hub_layout,
}


@pytest.fixture(scope="module", params=JSON_MAKERS.keys())
def json_tok(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out = tmp_path_factory.mktemp(request.param)
    JSON_MAKERS[request.param](out)
    assert not (out / "tokenizer.model").exists()  # so load_tokenizer(out) must read the json
    loaded = load_tokenizer(out)
    assert "tokenizer.json" in repr(loaded)
    return loaded


def test_json_backend_encodes_like_sentencepiece(json_tok: Tokenizer, tok: Tokenizer) -> None:
    assert (json_tok.vocab_size, json_tok.bos_id, json_tok.eos_id) == (32000, 1, 2)
    code = Path(sentencepiece.__file__).read_text(encoding="utf-8")  # real code: indentation, comments
    for text in [*TEXTS, *SPACE_RUNS, code]:
        for bos, eos in ((True, False), (False, False), (False, True)):
            assert json_tok.encode(text, bos=bos, eos=eos) == tok.encode(text, bos=bos, eos=eos), repr(text)


def test_json_backend_decodes_like_sentencepiece(json_tok: Tokenizer, tok: Tokenizer) -> None:
    assert all(json_tok.id_to_piece(i) == tok.id_to_piece(i) for i in range(tok.vocab_size))
    rng = random.Random(0)
    # Mostly <unk>, <s>, </s>, byte pieces and "▁" pieces, where decoding has its special cases.
    tricky = [0, 1, 2, *range(3, 259), 259, 260, 28705, *tok.encode("x y", bos=False)]
    for _ in range(2000):
        ids = [rng.choice(tricky) if rng.random() < 0.7 else rng.randrange(32000) for _ in range(rng.randrange(12))]
        assert json_tok.decode(ids) == tok.decode(ids), ids
    for text in TEXTS:
        assert json_tok.decode(tok.encode(text)) == text.replace("▁", " ")


def test_json_backend_chat(json_tok: Tokenizer, tok: Tokenizer) -> None:
    messages = CHATS["two systems, one late"]
    assert json_tok.encode_chat(messages) == tok.encode_chat(messages)


# ---------------------------------------------------------------------------------------- loading
def test_load_default_is_mistral_common_v1() -> None:
    default = load_tokenizer()
    assert (default.vocab_size, default.bos_id, default.eos_id) == (32000, 1, 2)
    assert "tokenizer.model.v1" in repr(default)


def test_load_directory_prefers_tokenizer_model(tmp_path: Path, tok: Tokenizer) -> None:
    shutil.copyfile(str(V1_MODEL), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text("not read")
    loaded = load_tokenizer(tmp_path)
    assert repr(loaded) == f"Tokenizer(source={str(tmp_path / 'tokenizer.model')!r}, vocab_size=32000)"
    assert loaded.encode(TEXTS[6]) == tok.encode(TEXTS[6])


def test_load_file_by_content_not_name(tmp_path: Path) -> None:
    path = tmp_path / "mixtral.tok"
    shutil.copyfile(str(V1_MODEL), path)
    assert load_tokenizer(str(path)).vocab_size == 32000


def test_load_directory_without_tokenizer_falls_back_to_v1(tmp_path: Path) -> None:
    assert "tokenizer.model.v1" in repr(load_tokenizer(tmp_path))


def test_load_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_tokenizer(missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("tokenizer.model", b"\x00garbage\xff" * 50, "sentencepiece"),
        ("tokenizer.model", b"", "sentencepiece"),
        ("tokenizer.json", b"{not json", "tokenizer.json"),
        ("tokenizer.json", b'{"model": {"type": "WordPiece"}}', "byte-fallback BPE"),
        ("config.json", b'{"dim": 4096}', "tokenizer.json"),
    ],
)
def test_load_invalid_file_names_it(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=expected) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


# ---- tekken (Mistral's later tokenizers): through mistral-common, its ids exactly ----------------------------------

TEKKEN_FILES = ["tekken_240718.json", "tekken_240911.json"]


def _tekken(name: str) -> Path:
    return Path(str(importlib.resources.files("mistral_common").joinpath("data", name)))


@pytest.mark.parametrize("name", TEKKEN_FILES)
def test_tekken_ids_and_text_equal_mistral_commons(name: str) -> None:
    ours, reference = load_tokenizer(_tekken(name)), MistralTokenizer.from_file(str(_tekken(name)))
    raw = reference.instruct_tokenizer.tokenizer
    assert ours.is_tekken and ours.vocab_size == raw.n_words == 131072 and ours.version == "v3"
    assert (ours.bos_id, ours.eos_id) == (raw.bos_id, raw.eos_id)
    for text in TEXTS:
        ids = ours.encode(text, bos=True, eos=True)
        assert ids == raw.encode(text, bos=True, eos=True), text
        assert ours.decode(ids) == raw.decode(ids) == text  # controls print nothing, no dummy prefix
    tools = ours.encode("[TOOL_CALLS]", bos=False)
    assert raw.get_special_token("[TOOL_CALLS]") not in tools  # special strings in the text stay text
    assert ours.decode_with_controls([1, raw.get_special_token("[INST]"), *ours.encode("hi", bos=False)]) == "[INST]hi"
    # each token's bytes, as the grammar compiler sees them: the text is their concatenation
    ids = ours.encode("Straße 日本 🙂 x", bos=False)
    assert b"".join(ours.token_bytes(i) for i in ids).decode() == "Straße 日本 🙂 x"


def test_tekken_chats_equal_mistral_commons_and_later_versions_use_their_own_format() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    mc_messages = [UserMessage(content="Hi there"), AssistantMessage(content="Hello!")]
    for path in (
        _tekken("tekken_240911.json"),
        Path(str(V1_MODEL)).with_name("mistral_instruct_tokenizer_240323.model.v3"),
    ):
        ours, reference = load_tokenizer(path), MistralTokenizer.from_file(str(path))
        want = [SystemMessage(content="Be brief."), *mc_messages, UserMessage(content="How are you?")]
        got = ours.encode_chat(messages)
        assert got == reference.encode_chat_completion(ChatCompletionRequest(messages=want)).tokens
        assert ours.encode("[INST]", bos=False) != got[1:2]  # [INST] is the control token, not text as in v1
        prefix = [*messages, {"role": "assistant", "content": "I am", "prefix": True}]
        want_prefix = [*want, AssistantMessage(content="I am", prefix=True)]
        got = ours.encode_chat(prefix)
        assert got == reference.encode_chat_completion(ChatCompletionRequest(messages=want_prefix)).tokens
        assert got[-1] != ours.eos_id
        with pytest.raises(ValueError, match="v1 instruct format"):
            ours.encode_chat_with_mask([*messages, {"role": "assistant", "content": "Fine."}])


def test_a_folder_with_tekken_json_loads_it_and_save_model_writes_it(tmp_path: Path) -> None:
    import mixtral

    shutil.copyfile(_tekken("tekken_240911.json"), tmp_path / "tekken.json")
    (tmp_path / "tokenizer.json").write_text("{}")  # a transformers file beside it is not read
    tok = load_tokenizer(tmp_path)
    assert tok.is_tekken and tok.source == str(tmp_path / "tekken.json")
    config = mixtral.ModelConfig(**{**vars(mixtral.get_preset("tiny")), "vocab_size": 131072})
    out = tmp_path / "model"
    mixtral.save_model(mixtral.Transformer(config), out, tokenizer=tok)
    assert (out / "tekken.json").read_bytes() == (tmp_path / "tekken.json").read_bytes()
    assert not (out / "tokenizer.model").exists() and not (out / "tokenizer_config.json").exists()
    again = mixtral.load_tokenizer(out)
    assert again.is_tekken and again.encode("hello there") == tok.encode("hello there")
