"""Streaming text: pieces decoded across sentencepiece boundaries concatenate to exactly the final text."""

from __future__ import annotations

import pytest
import torch

from mixtral.config import get_preset
from mixtral.generate import TextStream, generate_stream
from mixtral.model import Transformer
from mixtral.sampling import SamplingParams
from mixtral.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def stream_all(tok, prompt, ids, stop=()):
    s = TextStream(tok, prompt, stop)
    pieces = [s.push(i) for i in ids]
    if not s.stopped:
        pieces.append(s.finish())
    return pieces, s


TEXTS = [
    "Grüße, 世界! 🙂🎉 naïve café — “quotes” ok",
    "  leading spaces and\ttabs\n\nnew lines   end ",
    "def f(x):\n    return x ** 2  # 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "12345 + 0.5 = 12345.5",
]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_final_text(tok, text):
    prompt = tok.encode("Say:")
    ids = tok.encode(text, bos=False)
    pieces, _ = stream_all(tok, prompt, ids)
    final = tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
    assert "".join(pieces) == final
    assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_multibyte_characters_split_over_byte_pieces(tok):
    ids = tok.encode("𝔘𝔫", bos=False)  # not in the vocabulary: 4 byte-fallback tokens each
    byte_pieces = [i for i in ids if tok.id_to_piece(i).startswith("<0x")]
    assert len(byte_pieces) == 8
    pieces, _ = stream_all(tok, tok.encode("x"), ids)
    nonempty = [p for p in pieces if p]
    assert "".join(nonempty) == " 𝔘𝔫"
    assert nonempty[-2:] == ["𝔘", "𝔫"]  # each character arrives whole, once its last byte is there
    assert pieces.count("") >= 6  # the incomplete bytes were held back


def test_leading_space_of_first_piece(tok):
    prompt = tok.encode("Hello")
    ids = tok.encode("Hello world", bos=False)[1:]  # "▁world"
    pieces, _ = stream_all(tok, prompt, ids)
    assert "".join(pieces) == " world"


def test_stop_string_is_cut_and_held_back(tok):
    prompt = tok.encode("Chat:")
    ids = tok.encode("Hello there. User: how are you", bos=False)
    pieces, s = stream_all(tok, prompt, ids, stop=("User:",))
    assert s.stopped
    assert "".join(pieces) == " Hello there. "
    assert not any("Us" in p for p in pieces)  # a possible stop-string start never leaked out


def test_generate_stream_text_matches_ids(tok):
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny")).eval()
    prompt = tok.encode("Once upon a time")
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=7)
    pieces, ids = [], []
    for ev in generate_stream(model, [prompt], params, tokenizer=tok, eos_id=None):
        pieces.append(ev.text)
        ids.append(ev.token)
    assert len(ids) == 40
    assert "".join(pieces) == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
