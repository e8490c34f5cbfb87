"""Training: the MoE losses against transformers, the loop, exact resume after a kill, chat masks, LoRA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import WORDS

import mixtral
from mixtral.train.data import PackedSequences, load_tokenized, read_documents, tokenize
from mixtral.train.lora import apply_lora, load_adapter, merge_lora, save_adapter
from mixtral.train.loss import load_balancing_loss
from mixtral.train.trainer import ResumeError, TrainConfig, Trainer

MIXTRAL = str(Path(sys.executable).parent / "mixtral")


def config(corpus: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=sorted(str(p) for p in corpus.glob("doc*.txt")),
        out_dir=str(out),
        preset="tiny",
        seq_len=32,
        batch_size=2,
        steps=20,
        warmup=3,
        lr=3e-3,
        eval_every=10,
        checkpoint_every=10,
        log_every=1,
        data_cache=None,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_balancing_loss_equals_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    B, T, E, K, L = 3, 7, 8, 2, 4
    logits = tuple(torch.randn(B * T, E) * 2 for _ in range(L))
    ours = load_balancing_loss(logits, E, K)
    theirs = load_balancing_loss_func(logits, E, K)
    assert torch.allclose(ours, theirs, atol=1e-6)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    ours_m = load_balancing_loss(logits, E, K, mask)
    assert torch.allclose(ours_m, load_balancing_loss_func(logits, E, K, mask), atol=1e-6)
    assert not torch.allclose(ours_m, ours)  # the mask matters
    # padding never counts: garbage in the padded positions changes nothing
    noisy = tuple(r.clone() for r in logits)
    for r in noisy:
        r.view(B, T, E)[0, :3] = 100 * torch.randn(3, E)
    assert torch.allclose(load_balancing_loss(noisy, E, K, mask), ours_m, atol=1e-6)


def test_balancing_loss_per_layer_sees_skews_that_offset():
    # Two layers that each send every token to one expert, a different one: pooled over the layers the
    # first choices look even (two experts of two), per layer each layer is wholly skewed.
    N, E = 64, 2
    skewed = torch.tensor([4.0, 0.0]).repeat(N, 1)
    layers = (skewed, skewed.flip(-1))
    assert torch.allclose(load_balancing_loss(layers, E, 1), torch.tensor(1.0))  # its value at balance
    per_layer = load_balancing_loss(layers, E, 1, per_layer=True)
    assert per_layer > 1.9  # near its worst, E = 2
    alone = [load_balancing_loss([r], E, 1) for r in layers]
    assert torch.allclose(per_layer, (alone[0] + alone[1]) / 2)
    mask = torch.ones(4, N // 4, dtype=torch.long)
    mask[0, :5] = 0
    masked = [load_balancing_loss([r], E, 1, mask) for r in layers]
    assert torch.allclose(load_balancing_loss(layers, E, 1, mask, per_layer=True), (masked[0] + masked[1]) / 2)
    # at balance both are top_k
    even = (torch.zeros(N, E),) * 2
    assert torch.allclose(load_balancing_loss(even, E, 1, per_layer=True), torch.tensor(1.0))


def test_a_few_steps_reduce_the_loss(corpus, tmp_path):
    trainer = Trainer(config(corpus, tmp_path, steps=25), progress=False)
    first = trainer.evaluate()["eval_loss"]
    last = trainer.run()
    assert last["eval_loss"] < first - 2.0
    assert "eval_bpc" in last and last["eval_bpc"] > 0
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 26))
    assert {"aux_loss", "tokens_per_s", "max_load", "lr"} <= records[0].keys()
    # the final model is a normal checkpoint, with its tokenizer, loadable by our loader and by transformers
    model = mixtral.load_model(tmp_path / "model")
    assert (tmp_path / "model" / "tokenizer.model").is_file()
    from transformers import MixtralForCausalLM

    theirs = MixtralForCausalLM.from_pretrained(tmp_path / "model").eval()
    tokens = torch.tensor([[1, 415, 4983, 773]])
    with torch.no_grad():
        assert (theirs(tokens).logits - model(tokens)).abs().max() < 1e-4


def test_bf16_autocast_and_activation_checkpointing(corpus, tmp_path):
    cfg = config(corpus, tmp_path / "a", steps=3)
    ref = Trainer(cfg, progress=False)
    ref_metrics = [ref.train_step() for _ in range(3)]
    ckpt = Trainer(config(corpus, tmp_path / "b", steps=3, activation_checkpointing=True), progress=False)
    ckpt_metrics = [ckpt.train_step() for _ in range(3)]
    for a, b in zip(ref_metrics, ckpt_metrics, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5  # recomputation gives the same numbers
    bf16 = Trainer(config(corpus, tmp_path / "c", steps=3, dtype="bfloat16"), progress=False)
    losses = [bf16.train_step()["loss"] for _ in range(3)]
    assert all(abs(x - y["loss"]) < 0.1 for x, y in zip(losses, ref_metrics, strict=True))


def test_chat_data_masks_non_assistant_tokens(corpus):
    tok = mixtral.load_tokenizer()
    docs = read_documents([corpus / "chat.jsonl"])
    data = tokenize(docs, tok, progress=False)
    first = data.tokens[: data.offsets[1]].tolist()
    mask = data.targets[: data.offsets[1]].tolist()
    targets = [t for t, m in zip(first, mask, strict=True) if m]
    assert tok.decode(targets) == f"{WORDS[0]} {WORDS[0]}"  # only the answer (and its </s>) is learned
    assert targets[-1] == tok.eos_id
    prompt_ids = tok.encode_chat([{"role": "user", "content": f"say {WORDS[0]}"}])
    assert first[: len(prompt_ids)] == prompt_ids and not any(mask[: len(prompt_ids)])
    seqs = PackedSequences(data, 16)
    inputs, tgt, m = seqs.batch([0])
    assert torch.equal(inputs[0, 1:], tgt[0, :-1]) and m.dtype == torch.bool
    assert seqs.chars_per_target is None  # chats have no bits-per-character


def test_tokenized_data_is_cached(corpus, tmp_path, monkeypatch):
    tok = mixtral.load_tokenizer()
    files = sorted(corpus.glob("doc*.txt"))
    first = load_tokenized(files, tok, "file", tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    import mixtral.train.data as data_mod

    monkeypatch.setattr(data_mod, "tokenize", lambda *a, **k: pytest.fail("tokenized again"))
    again = load_tokenized(files, tok, "file", tmp_path)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.offsets, again.offsets)


def _train_cmd(corpus: Path, out: Path, *extra: str) -> list[str]:
    data = sorted(str(p) for p in corpus.glob("doc*.txt"))
    return [
        MIXTRAL, "train", "--data", *data, "--out-dir", str(out), "--preset", "tiny", "--seq-len", "32",
        "--batch-size", "2", "--steps", "150", "--warmup", "5", "--lr", "3e-3", "--checkpoint-every", "5",
        "--eval-every", "1000", "--log-every", "1", "--data-cache", "", "--router-jitter", "0.05", *extra,
    ]  # fmt: skip


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_killed_and_resumed_run_equals_uninterrupted_run(corpus, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(_train_cmd(corpus, tmp_path / "whole"), env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(corpus, out), env=env, stderr=subprocess.DEVNULL)
    log = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and max(_losses(out), default=0) >= 13:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists(), "the run finished before it could be killed"
    killed_at = max(_losses(out))
    assert killed_at < 150
    resumed = subprocess.run(_train_cmd(corpus, out, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(out) == _losses(tmp_path / "whole")  # every step, bit for bit
    a, b = mixtral.load_model(out / "model"), mixtral.load_model(tmp_path / "whole" / "model")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_resume_without_a_usable_checkpoint_touches_nothing(corpus, tmp_path):
    with pytest.raises(ResumeError, match="no checkpoint at"):
        Trainer(config(corpus, tmp_path, resume=True), progress=False).run()
    Trainer(config(corpus, tmp_path, steps=10), progress=False).run()
    state = tmp_path / "checkpoint" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ResumeError, match=r"train_state\.pt is unreadable"):
        Trainer(config(corpus, tmp_path, steps=20, resume=True), progress=False).run()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    out = subprocess.run(
        [MIXTRAL, "train", "--data", *config(corpus, tmp_path).data, "--out-dir", str(tmp_path), "--resume"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "unreadable (truncated or corrupt?)" in out.stderr
    assert "Traceback" not in out.stderr


def test_lora_merge_equals_base_plus_adapter(tmp_path):
    torch.manual_seed(0)
    model = mixtral.Transformer(mixtral.get_preset("tiny")).eval()
    mixtral.save_model(model, tmp_path / "base")
    params = apply_lora(model, rank=4, alpha=8.0, targets=("wq", "wv", "w1", "w2"))
    assert all(not p.requires_grad for n, p in model.named_parameters() if "original" in n)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(p.numel() for p in params)
    tokens = torch.tensor([[1, 22, 333, 4444, 555]])
    with torch.no_grad():
        base_logits = model(tokens)
        for p in params:
            p.normal_(0, 0.1)  # a trained-looking adapter
        adapted = model(tokens)
    assert (adapted - base_logits).abs().max() > 1e-2  # the adapter changes the function
    save_adapter(model, tmp_path / "adapter")
    # merge in-process and through the CLI: both equal base + adapter
    merged = merge_lora(model)
    with torch.no_grad():
        assert (merged(tokens) - adapted).abs().max() < 1e-5
    out = subprocess.run(
        [MIXTRAL, "merge-lora", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
         "--out", str(tmp_path / "merged")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    with torch.no_grad():
        assert (mixtral.load_model(tmp_path / "merged")(tokens) - adapted).abs().max() < 1e-5
    fresh = mixtral.load_model(tmp_path / "base")
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert (fresh(tokens) - adapted).abs().max() < 1e-5


def test_lora_training_changes_only_the_adapters(corpus, tmp_path):
    torch.manual_seed(0)
    mixtral.save_model(mixtral.Transformer(mixtral.get_preset("tiny")), tmp_path / "base")
    cfg = config(corpus, tmp_path / "run", init_from=str(tmp_path / "base"), lora_rank=4,
                 lora_targets=["wq", "wv", "w1", "w3"], steps=6, lr=1e-2)  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    before = {n: p.clone() for n, p in trainer.model.named_parameters()}
    trainer.run()
    for n, p in trainer.model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (".A" in n or ".B" in n), n
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run" / "model").exists()


def test_toml_config_and_flag_precedence(corpus, tmp_path):
    from mixtral.cli import build_parser
    from mixtral.train.cli import config_from_args

    toml = tmp_path / "run.toml"
    toml.write_text("steps = 7\nlr = 0.01\nseq_len = 48\n[model]\nn_layers = 1\n")
    args = build_parser().parse_args(["train", "--config", str(toml), "--data", "x.txt", "--lr", "0.002"])
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.lr, cfg.seq_len, cfg.data) == (7, 0.002, 48, ["x.txt"])
    assert cfg.model_config().n_layers == 1
    toml.write_text("stpes = 3\n")
    with pytest.raises(ValueError, match=r"unknown settings \['stpes'\]"):
        config_from_args(build_parser().parse_args(["train", "--config", str(toml)]))
    with pytest.raises(ValueError, match="no training data"):
        config_from_args(build_parser().parse_args(["train"]))


def _run_files(out: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_an_existing_run_needs_resume_or_force(corpus, tmp_path):
    Trainer(config(corpus, tmp_path, steps=5, checkpoint_every=5, eval_every=5), progress=False).run()
    (tmp_path / "notes.txt").write_text("mine")
    before = _run_files(tmp_path)
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoint/ at step 5, .*--resume.*--force"):
        Trainer(config(corpus, tmp_path, steps=3), progress=False).run()
    assert _run_files(tmp_path) == before
    out = subprocess.run(
        [MIXTRAL, "train", "--data", *config(corpus, tmp_path).data, "--out-dir", str(tmp_path), "--steps", "3"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "--resume to continue it" in out.stderr and "Traceback" not in out.stderr
    assert _run_files(tmp_path) == before
    with pytest.raises(ValueError, match="resume and force"):
        config(corpus, tmp_path, resume=True, force=True)
    # --force starts over: the run's own files go, nothing else
    Trainer(config(corpus, tmp_path, steps=3, eval_every=3, force=True), progress=False).run()
    assert [r["step"] for r in _read_metrics(tmp_path) if "loss" in r] == [1, 2, 3]
    assert torch.load(tmp_path / "checkpoint" / "train_state.pt", weights_only=True)["step"] == 3
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _read_metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# Runs a training in a child process that kills itself with SIGKILL at one point of its second checkpoint save.
KILLED_RUN = """
import json, os, shutil, signal, sys, torch
from pathlib import Path
from mixtral.train.trainer import TrainConfig, Trainer

point, cfg = sys.argv[1], TrainConfig(**json.loads(sys.argv[2]))
checkpoint = Path(cfg.out_dir) / "checkpoint"
real_replace, real_rmtree, real_save = os.replace, shutil.rmtree, torch.save
saves = []

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

def replace(src, dst):
    if Path(src) == checkpoint and point == "before the swap":
        kill()
    real_replace(src, dst)
    if Path(src) == checkpoint and point == "between the renames":
        kill()

def rmtree(path, *args, **kwargs):
    if Path(path).name.startswith(".checkpoint.old-") and point == "after the swap":
        kill()
    real_rmtree(path, *args, **kwargs)

def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    saves.append(f)
    if len(saves) == 2 and point == "while writing":
        Path(f).write_bytes(Path(f).read_bytes()[:5000])  # the rest never reached the disk
        kill()

os.replace, shutil.rmtree, torch.save = replace, rmtree, save
Trainer(cfg, progress=False).run()
"""


@pytest.mark.parametrize(
    ("point", "resumes_at"),
    [("while writing", 5), ("before the swap", 10), ("between the renames", 10), ("after the swap", 10)],
)
def test_a_kill_during_the_checkpoint_swap_resumes_from_the_newest_complete_state(corpus, tmp_path, point, resumes_at):
    import dataclasses

    cfg = config(corpus, tmp_path, steps=20, checkpoint_every=5, eval_every=100)
    child = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, point, json.dumps(dataclasses.asdict(cfg))],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]  # killed at its second save (step 10)
    assert not (tmp_path / "model").exists()
    if point == "between the renames":
        assert not (tmp_path / "checkpoint").exists()
    resumed = Trainer(dataclasses.replace(cfg, resume=True), progress=False)
    resumed.load_checkpoint()
    assert resumed.step == resumes_at
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".checkpoint"))
    assert leftovers == [], "stale copies are removed"
    resumed.run()
    assert torch.load(tmp_path / "checkpoint" / "train_state.pt", weights_only=True)["step"] == 20
    assert [r["step"] for r in _read_metrics(tmp_path) if "loss" in r] == list(range(1, 21))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
