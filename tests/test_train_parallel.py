"""`mixtral train --ep 2` and `--tp 2` under torchrun (2 CPU processes, gloo) against the same run in one process: the
logged losses step by step and the final model; exact resume from the per-rank checkpoint; clear errors.

The runs are costly to start, so one module fixture trains once with each layout and the tests check them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mixtral
from mixtral.parallel import ParallelError
from mixtral.train.trainer import ResumeError, TrainConfig, Trainer, rank_state_file

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

BIN = Path(sys.executable).parent
# Losses and gradient norms are global values: the same sums in another order, so equal to a few float32 ulps.
LOSS_ATOL = 1e-5
PARAM_ATOL = 1e-4


def _data(corpus: Path) -> list[str]:
    return [*sorted(str(p) for p in corpus.glob("doc*.txt")), str(corpus / "chat.jsonl")]


def _train(corpus: Path, out: Path, steps: int, *extra: str, ep: int = 1, tp: int = 1) -> subprocess.CompletedProcess:
    # min-lr-ratio 1: a constant rate after warmup, so a 6-step run resumed to 10 steps has the schedule of
    # a 10-step run; grad-clip 0.5 so that clipping (with the global norm) really happens.
    args = [
        "train", "--data", *_data(corpus), "--out-dir", str(out), "--preset", "tiny", "--seq-len", "32",
        "--batch-size", "4", "--grad-accum", "2", "--steps", str(steps), "--warmup", "2", "--lr", "3e-3",
        "--min-lr-ratio", "1", "--grad-clip", "0.5", "--z-loss-coef", "0.001", "--first-choice-aux-coef", "0.05",
        "--checkpoint-every", "3", "--eval-every", "3", "--log-every", "1", "--data-cache", "", "--seed", "1",
        *extra,
    ]  # fmt: skip
    if ep * tp > 1:
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(ep * tp), "-m", "mixtral", *args]
        cmd += ["--ep", str(ep), "--tp", str(tp)]
    else:
        cmd = [str(BIN / "mixtral"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, tuple[float, ...]]:
    keys = ("loss", "aux_loss", "first_choice_aux_loss", "z_loss", "grad_norm")
    return {r["step"]: tuple(r[k] for k in keys) for r in _records(out) if "loss" in r}


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    outs: dict = {}
    runs = [("one", 6, 1, 1, ()), ("ep", 6, 2, 1, ()), ("ep10", 10, 2, 1, ()), ("tp", 6, 1, 2, ())]
    # Fine-tuning: each rank reads only its own experts of the starting checkpoint.
    start = ("--init-from", str(root / "one" / "model"))
    runs += [("init-one", 2, 1, 1, start), ("init-ep", 2, 2, 1, start)]
    for label, steps, ep, tp, extra in runs:
        outs[label] = root / label
        done = _train(corpus, outs[label], steps, *extra, ep=ep, tp=tp)
        assert done.returncode == 0, f"{label}: {done.stderr[-3000:]}"
        outs[label + ":stderr"] = done.stderr
    return outs


@pytest.mark.parametrize("layout", ["ep", "tp"])
def test_parallel_training_equals_one_process(runs, layout):
    one, par = _losses(runs["one"]), _losses(runs[layout])
    assert sorted(par) == sorted(one) == list(range(1, 7))
    for step in one:
        diffs = [abs(a - b) for a, b in zip(par[step], one[step], strict=True)]
        assert max(diffs) < LOSS_ATOL, (step, par[step], one[step])
    assert max(g for *_, g in one.values()) > 0.5, "the gradient was never clipped: clipping is not tested"
    evals = [(r["step"], r["eval_loss"]) for r in _records(runs[layout]) if "eval_loss" in r]
    want = [(r["step"], r["eval_loss"]) for r in _records(runs["one"]) if "eval_loss" in r]
    assert [s for s, _ in evals] == [s for s, _ in want] == [3, 6]
    assert all(abs(a - b) < LOSS_ATOL for (_, a), (_, b) in zip(evals, want, strict=True))
    # The final model is gathered into one ordinary checkpoint that one process loads.
    a, b = mixtral.load_model(runs[layout] / "model"), mixtral.load_model(runs["one"] / "model")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    worst = max((sa[k] - sb[k]).abs().max().item() for k in sa)
    assert worst < PARAM_ATOL, worst
    assert (runs[layout] / "model" / "tokenizer.model").is_file()
    # One file per rank in the checkpoint; rank 0 alone prints.
    files = sorted(p.name for p in (runs[layout] / "checkpoint").iterdir())
    assert files == [rank_state_file(r, 2) for r in (0, 1)]
    assert runs[layout + ":stderr"].count("done: step 6") == 1


def test_ep_fine_tuning_equals_one_process(runs):
    one, ep = _losses(runs["init-one"]), _losses(runs["init-ep"])
    assert sorted(ep) == sorted(one) == [1, 2]
    assert one[1][0] < 10.0  # from the trained model: about 10.4 from random weights
    for step in one:
        assert max(abs(a - b) for a, b in zip(ep[step], one[step], strict=True)) < LOSS_ATOL, (ep[step], one[step])


def test_ep_resume_equals_uninterrupted_run(corpus, runs):
    out = runs["ep"]
    resumed = _train(corpus, out, 10, "--resume", ep=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(out) == _losses(runs["ep10"])  # every step, bit for bit
    a, b = mixtral.load_model(out / "model"), mixtral.load_model(runs["ep10"] / "model")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _config(corpus: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=_data(corpus), out_dir=str(out), preset="tiny", seq_len=32, batch_size=4, data_cache=None, seed=1)
    return TrainConfig(**{**base, **kw})


def test_resume_needs_the_same_number_of_processes(corpus, runs):
    with pytest.raises(ResumeError, match=r"written by 2 process\(es\), but this run has 1 \(ep=1, tp=1\)"):
        Trainer(_config(corpus, runs["ep10"], steps=12, resume=True), progress=False).run()


def test_impossible_layouts_are_clear_errors(corpus, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"batch_size=3 is not divisible by ep=2"):
        _config(corpus, tmp_path, batch_size=3, ep=2)
    for layout in ({"ep": 2}, {"tp": 2}):
        with pytest.raises(ValueError, match=r"LoRA .* is not supported with parallel training"):
            _config(corpus, tmp_path, lora_rank=4, **layout)
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ParallelError, match="launch with: torchrun --nproc-per-node N"):
        Trainer(_config(corpus, tmp_path, ep=2), progress=False)
    out = subprocess.run(
        [str(BIN / "mixtral"), "train", "--data", *_data(corpus), "--out-dir", str(tmp_path), "--tp", "2"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "launch with: torchrun" in out.stderr and "Traceback" not in out.stderr
