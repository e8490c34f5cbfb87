"""Routing statistics on known assignments, and the report files on a real (tiny) model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mixtral
from mixtral.routing import Routed, chance_rates, expert_share, repeat_rates, shuffled_rates


def routed(choices, starts=(0,)) -> Routed:
    c = torch.tensor(choices)
    return Routed("synthetic", list(range(c.shape[1])), c, list(starts))


def test_known_assignments_give_known_rates():
    # one layer, five tokens, top-2: pairs (t, t+1) share the first choice once, share an expert twice
    r = routed([[[0, 1], [0, 2], [3, 4], [5, 4], [6, 7]]])
    first, topk = repeat_rates([r])
    assert first.tolist() == [0.25] and topk.tolist() == [0.5]
    # a second layer where every token keeps its experts
    r2 = routed([[[0, 1], [0, 2], [3, 4], [5, 4], [6, 7]], [[2, 3]] * 5])
    first, topk = repeat_rates([r2])
    assert first.tolist() == [0.25, 1.0] and topk.tolist() == [0.5, 1.0]
    # no pair crosses a chunk boundary: with a chunk starting at token 2, pair (1, 2) is not counted
    first, topk = repeat_rates([routed([[[0, 1], [0, 2], [3, 4], [5, 4], [6, 7]]], starts=(0, 2))])
    assert first.tolist() == pytest.approx([1 / 3]) and topk.tolist() == pytest.approx([2 / 3])


def test_share_per_expert():
    share = expert_share(torch.tensor([[[0, 1], [0, 2], [3, 0], [3, 1]]]), n_experts=4)
    assert share.tolist() == [[0.5, 0.0, 0.0, 0.5]]


def test_chance_rates():
    first, topk = chance_rates(8, 2)
    assert first == 0.125 and abs(topk - (1 - 15 / 28)) < 1e-12  # about 46%
    assert chance_rates(8, 1) == (0.125, 0.125)


def test_shuffled_baseline_removes_order_but_keeps_shares():
    # expert 0 for the first half of the tokens, expert 1 for the second: long runs, equal shares
    T = 1000
    first = torch.tensor([0] * (T // 2) + [1] * (T // 2))
    choices = torch.stack([first, (first + 2)], dim=-1)[None]  # [1, T, 2]
    r = Routed("runs", list(range(T)), choices, [0])
    measured, _ = repeat_rates([r])
    shuffled, _ = shuffled_rates([r])
    assert measured.item() > 0.99
    assert abs(shuffled.item() - 0.5) < 0.05  # two experts with equal shares: repeats half the time by chance


def test_uniform_random_routing_is_at_chance():
    g = torch.Generator().manual_seed(0)
    T = 20000
    choices = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(T)])[None]  # [1, T, 2]
    first, topk = repeat_rates([Routed("random", list(range(T)), choices, [0])])
    c_first, c_topk = chance_rates(8, 2)
    assert abs(first.item() - c_first) < 0.01 and abs(topk.item() - c_topk) < 0.015


def test_routing_command_writes_table_and_plots(tmp_path):
    torch.manual_seed(0)
    model = mixtral.Transformer(mixtral.get_preset("tiny"))
    with torch.no_grad():
        for layer in model.layers:
            layer.moe.gate.weight.mul_(30)
    mixtral.save_model(model, tmp_path / "ckpt")
    texts = []
    for name, body in [
        ("a.txt", "To be, or not to be: that is the question. " * 20),
        ("b.txt", "def f(x): return x\n" * 30),
    ]:
        (tmp_path / name).write_text(body)
        texts.append(str(tmp_path / name))
    out = subprocess.run(
        [str(Path(sys.executable).parent / "mixtral"), "routing", "--checkpoint", str(tmp_path / "ckpt"),
         "--text", *texts, "--out", str(tmp_path / "report"), "--layer", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "| layer | same first choice | shuffled | chance |" in out.stdout
    report = json.loads((tmp_path / "report" / "routing.json").read_text())
    assert len(report["same_first_by_layer"]) == 2 and set(report["share_by_source"]) == set(texts)
    for source in texts:
        for row in report["share_by_source"][source]:
            assert abs(sum(row) - 1) < 1e-6
    png = (tmp_path / "report" / "routing_share.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    page = (tmp_path / "report" / "routing_tokens.html").read_text()
    assert page.count("<span") > 50 and "expert 7" in page


def test_layer_out_of_range(tmp_path):
    from mixtral.routing import write_report

    model = mixtral.Transformer(mixtral.get_preset("tiny"))
    (tmp_path / "a.txt").write_text("hello world")
    with pytest.raises(ValueError, match=r"--layer 5 is out of range: the model has layers 0\.\.1"):
        write_report(model, mixtral.load_tokenizer(), [tmp_path / "a.txt"], tmp_path / "out", layer=5)


# ---- token classes of Python source (synthetic) -------------------------------------------------------------


def test_python_char_classes():
    from mixtral.routing import TOKEN_CLASSES, python_char_classes

    src = 'def f(x):\n    return x + 1  # one\ns = "a b"\n'
    names = [TOKEN_CLASSES[c] for c in python_char_classes(src)]
    expect = {
        "def": "keyword", "f": "identifier", "(": "operator", "    ": "whitespace", "return": "keyword",
        "+": "operator", "1": "number", "# one": "comment", '"a b"': "string", "=": "operator",
    }  # fmt: skip
    for text, cls in expect.items():
        i = src.index(text) if text != "f" else src.index("f(")
        assert set(names[i : i + len(text)]) == {cls}, text
    assert names[src.index("\n")] == "whitespace"
    # an unterminated construct stops tokenizing: the classes found before it stay
    broken = "x = 1\ny = (\n"
    names = [TOKEN_CLASSES[c] for c in python_char_classes(broken)]
    assert names[0] == "identifier" and names[2] == "operator"


class _Pieces:
    """A tokenizer stand-in with fixed pieces (sentencepiece conventions: \u2581 for a space, <0xNN> bytes)."""

    bos_id, eos_id = 1, 2

    def __init__(self, pieces):
        self.pieces = ["<unk>", "<s>", "</s>", *pieces]

    def id_to_piece(self, i):
        return self.pieces[i]


def test_piece_spans_with_dummy_prefix_and_bytes():
    from mixtral.routing import piece_spans

    text = "if é:\n  x"  # é is two bytes in UTF-8, spelled by two byte pieces
    tok = _Pieces(["\u2581if", "\u2581", "<0xC3>", "<0xA9>", ":", "<0x0A>", "\u2581\u2581", "x"])
    ids = [1, *range(3, 11)]
    spans = piece_spans(tok, ids, text)
    assert [text[a:b] for a, b in spans] == ["", "if", " ", "é", "", ":", "\n", "  ", "x"]
    # without a dummy prefix the first piece spells the first characters
    tok = _Pieces(["if", "\u2581x"])
    assert piece_spans(tok, [1, 3, 4], "if x") == [(0, 0), (0, 2), (2, 4)]
    with pytest.raises(ValueError, match="do not spell"):
        piece_spans(tok, [3, 4], "else")


def test_token_classes_take_the_first_non_whitespace_character():
    from mixtral.routing import TOKEN_CLASSES, token_classes

    src = "for i in x:\n    pass\n"
    tok = _Pieces(
        ["\u2581for", "\u2581i", "\u2581in", "\u2581x", ":", "<0x0A>", "\u2581\u2581\u2581\u2581", "pass", "<0x0A>"]
    )
    ids = [1, *range(3, 12)]
    names = [TOKEN_CLASSES[c] if c >= 0 else None for c in token_classes(tok, ids, src).tolist()]
    assert names == [None, "keyword", "identifier", "keyword", "identifier", "operator", "whitespace",
                     "whitespace", "keyword", "whitespace"]  # fmt: skip


def test_token_classes_on_the_real_tokenizer_cover_the_text():
    from mixtral.routing import piece_spans, token_classes

    tokenizer = mixtral.load_tokenizer()
    src = 'class A:\n    """Doc."""\n\n    def m(self, n=3):  # é\n        return [n ** 2 for _ in "ab"]\n'
    ids = tokenizer.encode(src, bos=True)
    spans = piece_spans(tokenizer, ids, src)
    assert "".join(src[a:b] for a, b in spans) == src
    classes = token_classes(tokenizer, ids, src)
    assert classes.shape == (len(ids),) and classes[0] == -1 and (classes[1:] >= 0).all()


def test_share_by_class_counts_first_choices():
    from mixtral.routing import TOKEN_CLASSES, analyze, markdown_table, share_by_class

    kw, ident = TOKEN_CLASSES.index("keyword"), TOKEN_CLASSES.index("identifier")
    # one layer, 4 experts: keywords always go to expert 0, identifiers half to 1 and half to 2
    choices = torch.tensor([[[0, 3], [1, 3], [0, 3], [2, 3], [3, 0]]])
    r = Routed("a.py", [1, 5, 6, 7, 8], choices, [0], torch.tensor([kw, ident, kw, ident, -1]))
    counts, shares = share_by_class([r], n_experts=4)
    assert counts[kw] == 2 and counts[ident] == 2 and counts.sum() == 4
    assert shares[0, kw].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert shares[0, ident].tolist() == [0.0, 0.5, 0.5, 0.0]
    report = analyze([r], n_experts=4, top_k=2)
    assert report["class_tokens"]["keyword"] == 2 and set(report["share_by_class"]) == {"keyword", "identifier"}
    table = markdown_table(report)
    assert "| keyword | 2 | **100%** | 0% | 0% | 0% | e0 (100%) |" in table
    assert "| all | 4 |" in table
    # texts without classes (not Python) give no class table
    plain = Routed("a.txt", [1, 5, 6, 7, 8], choices, [0])
    assert "share_by_class" not in analyze([plain], n_experts=4, top_k=2)


def test_first_choice_load_logged_by_the_trainer():
    from mixtral.train.loss import first_choice_load

    # two layers, four tokens, three experts: layer 0 sends 3 tokens to expert 2, layer 1 two each to experts 0 and 2
    logits = [
        torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.5]]),
        torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 5.0]]),
    ]
    load = first_choice_load(logits, n_experts=3)
    assert load.tolist() == [[0.25, 0.0, 0.75], [0.5, 0.0, 0.5]]
