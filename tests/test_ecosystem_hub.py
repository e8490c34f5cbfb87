"""Hugging Face model ids (org/name[@revision]) as checkpoints: read from a Hugging Face cache laid out here in
huggingface_hub's own layout (no Hub is reachable from the tests), offline or after a failed download; a local
path of that name wins; a clear error naming the id when neither works."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_tokens, tiny_model

import mixtral
from mixtral.checkpoint import CheckpointError, resolve_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_cache(cache: Path, repo: str, folder: Path, commit: str = COMMIT, branch: str = "main") -> Path:
    """Put `folder`'s files into `cache` as huggingface_hub stores a download: blobs named by hash, the snapshot's
    files links to them, refs/<branch> naming the commit."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / branch).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(cache, model): the tiny model saved (with a tokenizer) into a Hugging Face cache as test-org/tiny."""
    root = tmp_path_factory.mktemp("hub")
    model = tiny_model(seed=3)
    mixtral.save_model(model, root / "saved", tokenizer=mixtral.load_tokenizer())
    lay_out_cache(root / "cache", "test-org/tiny", root / "saved")
    return root / "cache", model


@pytest.fixture
def offline_cache(hub, monkeypatch):
    cache, model = hub
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, model


def test_id_loads_from_the_cache(offline_cache):
    from huggingface_hub import snapshot_download

    cache, model = offline_cache
    # the layout is huggingface_hub's: its own offline lookup finds the same snapshot
    assert Path(snapshot_download("test-org/tiny", cache_dir=cache, local_files_only=True)).name == COMMIT
    tokens = random_tokens(model.config.vocab_size, 1, 6)
    with torch.no_grad():
        want = model(tokens)
        for spec in ("test-org/tiny", "test-org/tiny@main", f"test-org/tiny@{COMMIT}"):
            assert torch.equal(mixtral.load_model(spec)(tokens), want), spec
    assert resolve_checkpoint("test-org/tiny") == cache / "models--test-org--tiny" / "snapshots" / COMMIT
    assert mixtral.checkpoint.own_tokenizer("test-org/tiny").vocab_size == 32000


def test_a_local_path_wins(offline_cache, tmp_path, monkeypatch):
    _, model = offline_cache
    local = tiny_model(seed=4)
    mixtral.save_model(local, tmp_path / "test-org" / "tiny")
    monkeypatch.chdir(tmp_path)
    tokens = random_tokens(model.config.vocab_size, 1, 6)
    with torch.no_grad():
        assert torch.equal(mixtral.load_model("test-org/tiny")(tokens), local(tokens))
    assert resolve_checkpoint("test-org/tiny") == Path("test-org/tiny")


def test_unknown_id_is_a_clear_error(offline_cache):
    cache, _ = offline_cache
    for spec in ("test-org/missing", "test-org/tiny@v9"):
        with pytest.raises(CheckpointError) as e:
            mixtral.load_model(spec)
        msg = str(e.value)
        assert spec in msg and "HF_HUB_OFFLINE" in msg and str(cache) in msg


def test_cli_reads_the_cache_when_the_hub_is_unreachable(hub, tmp_path):
    """Not offline: the download fails (nothing listens at the endpoint), the cache under HF_HOME answers."""
    cache, _model = hub
    home = tmp_path / "hf_home"
    home.mkdir()
    (home / "hub").symlink_to(cache)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(
        HF_HOME=str(home), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2"
    )
    cmd = [sys.executable, "-m", "mixtral", "info", "--checkpoint", "test-org/tiny", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["checkpoint"].endswith(f"snapshots/{COMMIT}")
    out = subprocess.run([*cmd[:-3], "--checkpoint", "test-org/nothing"], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "test-org/nothing" in out.stderr and "downloading failed" in out.stderr
    assert "Traceback" not in out.stderr
