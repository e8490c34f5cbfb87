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
