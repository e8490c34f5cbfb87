"""Damaged and hostile files (issue 24's points 10-12): every one is a clear error that names the file, raised before
anything large is allocated; never a traceback from deep inside, nor a read without bound."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import mixtral
from mixtral.checkpoint import CheckpointError, load_model, save_model, save_quantized
from mixtral.config import ConfigError
from mixtral.quantize import quantize_model

CONFIG = mixtral.get_preset("tiny").replace(vocab_size=512, hidden_dim=128)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plain") / "m"
    save_model(tiny_model(CONFIG), path)
    return path


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("quantized") / "m"
    save_quantized(quantize_model(tiny_model(CONFIG, dtype=torch.bfloat16), "int8"), path)
    return path


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _with_header(raw: bytes, header: dict) -> bytes:
    """A safetensors file's bytes with another header in front of the same data."""
    n = int.from_bytes(raw[:8], "little")
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


def _damaged(raw: bytes, how: str) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    if how == "huge header length":
        return (1 << 60).to_bytes(8, "little") + raw[8:]
    if how == "truncated":
        return raw[: len(raw) // 2]
    if how == "empty":
        return b""
    if how == "no data_offsets":
        return _with_header(raw, {**header, key: {k: v for k, v in header[key].items() if k != "data_offsets"}})
    assert how == "64 TB shape"
    return _with_header(raw, {**header, key: {**header[key], "shape": [1 << 23, 1 << 23]}})


@pytest.mark.parametrize("how", ["huge header length", "truncated", "empty", "no data_offsets", "64 TB shape"])
@pytest.mark.parametrize("kind", ["plain", "quantized"])
def test_a_damaged_weight_file_is_an_error_naming_it(kind, how, plain, quantized, tmp_path):
    path = _copy(plain if kind == "plain" else quantized, tmp_path)
    weights = path / ("model.safetensors" if kind == "plain" else "model.quantized.safetensors")
    weights.write_bytes(_damaged(weights.read_bytes(), how))
    with pytest.raises(CheckpointError, match=str(weights)):
        load_model(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_parameters": "default"}, "rope_parameters must be an object"),
        ({"rope_parameters": None, "rope_theta": "abc"}, "rope_theta must be a number, got 'abc'"),
        ({"rms_norm_eps": [1]}, "rms_norm_eps must be a number"),
        ({"num_hidden_layers": 10_000_000}, "n_layers=10000000 is beyond any real model"),
        ({"hidden_size": 1 << 40, "intermediate_size": 1 << 40}, "dim=1099511627776 is beyond any real model"),
        ({"num_local_experts": "8"}, "n_experts must be a positive integer, got '8'"),
        ({"num_hidden_layers": True}, "n_layers must be a positive integer, got True"),
        ({"vocab_size": -5}, "vocab_size must be a positive integer, got -5"),
    ],
)
def test_config_values_are_typed_and_bounded(change, message, plain, tmp_path):
    path = _copy(plain, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError) as e:  # (a ConfigError wrapped with the file's name)
        load_model(path)
    assert str(path / "config.json") in str(e.value) and message in str(e.value)


def test_a_config_file_that_cannot_be_read_is_a_config_error(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError, match=r"config\.json cannot be read"):
        mixtral.ModelConfig.from_file(tmp_path / "config.json")


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/model.safetensors", ".."])
def test_an_index_cannot_name_a_file_outside_its_folder(shard, plain, tmp_path):
    path = _copy(plain, tmp_path)
    (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
    # (the shard names are checked before any key)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(CheckpointError, match="which is not a file name in"):
        load_model(path)


def test_a_tokenizer_path_that_is_not_a_regular_file_is_refused_without_reading_it():
    with pytest.raises(ValueError, match="/dev/zero is not a regular file"):
        mixtral.load_tokenizer("/dev/zero")
