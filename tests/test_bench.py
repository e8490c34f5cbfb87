"""`mixtral bench` end to end on a tiny shape: every configuration in its own process, interleaved rounds with
a bandwidth probe before each child, medians per row, ratios against transformers, JSON written. (Speed itself
is never asserted: the figures come from the benchmark run on a quiet machine, see docs/performance.md.)"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from conftest import make_hf_model


def test_bench_runs_rounds_and_writes_medians(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, "-m", "mixtral", "bench", "--preset", "tiny", "--modes", "bf16", "int8", "--batch", "1",
        "--prompt-len", "8", "--new-tokens", "4", "--runs", "1", "--rounds", "2", "--interleaved", "3",
        "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "median" in done.stdout and done.stdout.count("round 2: ") == 3
    res = json.loads(out.read_text())
    assert len(res["bandwidth_probes_gbs"]) == 2 * 3  # one before each child
    rows = {r["impl"]: r for r in res["rows"]}
    assert set(rows) == {"bf16", "int8", "transformers"}
    for r in rows.values():
        assert r["rounds"] == 2 and len(r["decode_tok_s_runs"]) == 2
        assert min(r["decode_tok_s_runs"]) <= r["decode_tok_s"] <= max(r["decode_tok_s_runs"])
        assert r["bandwidth_fraction"] > 0 and r["peak_rss"] > 0
    assert rows["int8"]["decode_vs_our_bf16"] == rows["int8"]["decode_tok_s"] / rows["bf16"]["decode_tok_s"]
    assert rows["bf16"]["decode_vs_transformers"] == rows["bf16"]["decode_tok_s"] / rows["transformers"]["decode_tok_s"]
    # batch 1 with all three in one process, 3 interleaved rounds; ratios are medians of per-round ratios
    inter = res["interleaved"]
    for part in ("prefill", "decode"):
        assert {k: len(v) for k, v in inter[part]["tok_s"].items()} == {"bf16": 3, "int8": 3, "transformers": 3}
        assert set(inter[part]["vs_transformers"]) == {"bf16", "int8"}
    dec = inter["decode"]
    per_round = sorted(a / b for a, b in zip(dec["tok_s"]["int8"], dec["tok_s"]["bf16"], strict=True))
    assert dec["vs_our_bf16"] == {"int8": per_round[1]}
    assert "every model in one process, 3 interleaved rounds" in done.stdout


def test_interleaved_ratios_are_medians_of_per_round_ratios():
    from mixtral.bench import interleaved_ratios

    r = interleaved_ratios({"bf16": [10.0, 20.0, 10.0], "int4": [30.0, 40.0, 20.0], "transformers": [5.0, 4.0, 5.0]})
    assert r["median_tok_s"] == {"bf16": 10.0, "int4": 30.0, "transformers": 5.0}
    assert r["vs_our_bf16"] == {"int4": 2.0}  # rounds: 3.0, 2.0, 2.0 (a ratio of medians would say 3.0)
    assert r["vs_transformers"] == {"bf16": 2.0, "int4": 6.0}  # rounds: 2, 5, 2 and 6, 10, 4


def test_transformers_prefill_computes_the_last_positions_logits_only_as_its_generate_does():
    # A fair peer: transformers' generate passes logits_to_keep=1, and our prefill computes the LM head for the
    # last position only; the timed prefill must not make the peer compute 128 rows of logits it would not.
    from mixtral.bench import _run_transformers

    model = make_hf_model()
    shapes = []
    real = model.forward
    model.forward = lambda *a, **kw: shapes.append((kw.get("input_ids").shape[1], out := real(*a, **kw))) or out
    _run_transformers(model, [[1, 5, 6, 7, 8]], 5, 3)
    assert [(n, tuple(o.logits.shape)) for n, o in shapes] == [(5, (1, 1, 320)), (1, (1, 1, 320)), (1, (1, 1, 320))]


def test_contention_measures_quiet_busy_and_one_thread_and_prints_the_ratios(tmp_path):
    # The flag's plumbing only: each model decodes quiet and beside 1 and 2 busy processes, at 2 threads and at 1,
    # in interleaved rounds; the ratios are medians of per-round ratios. (How fast is for the benchmark run.)
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, "-m", "mixtral", "bench", "--preset", "tiny", "--modes", "bf16", "int8", "--prompt-len",
        "8", "--new-tokens", "4", "--contention", "2", "--contention-rounds", "2", "--threads", "2", "--json",
        str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| impl | busy processes | decode tok/s, 2 threads | decode tok/s, 1 thread |" in done.stdout
    res = json.loads(out.read_text())["contention"]
    assert res["busy"] == [1, 2] and res["rounds"] == 2 and set(res["models"]) == {"bf16", "int8"}
    for c in res["models"].values():
        assert {k: len(v) for k, v in c["tok_s"].items()} == {f"{b}x{t}": 2 for b in (0, 1, 2) for t in (2, 1)}
        assert set(c["busy_vs_quiet"]) == {"1", "2"} and set(c["vs_1_thread"]) == {"0", "1", "2"}
        s = c["tok_s"]
        assert c["busy_vs_quiet"]["2"] == statistics.median(a / b for a, b in zip(s["2x2"], s["0x2"], strict=True))
        assert c["vs_1_thread"]["1"] == statistics.median(a / b for a, b in zip(s["1x2"], s["1x1"], strict=True))
    assert "| bf16 | 2 |" in done.stdout and "| int8 | 0 |" in done.stdout
