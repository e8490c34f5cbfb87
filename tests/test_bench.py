"""`mixtral bench` end to end on a tiny shape: every configuration in its own process, interleaved rounds with
a bandwidth probe before each child, medians per row, ratios against transformers, JSON written. (Speed itself
is never asserted: the figures come from the benchmark run on a quiet machine, see the README.)"""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_runs_rounds_and_writes_medians(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, "-m", "mixtral", "bench", "--preset", "tiny", "--modes", "bf16", "int8", "--batch", "1",
        "--prompt-len", "8", "--new-tokens", "4", "--runs", "1", "--rounds", "2", "--json", str(out),
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
