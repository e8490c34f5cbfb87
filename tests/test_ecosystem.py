"""Files other tools read: a saved folder works with transformers' AutoTokenizer and `generate`, files get the
modes the umask gives, a quantized checkpoint is refused by transformers (never random weights) and still loads
in ours; `mixtral --version`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from conftest import random_tokens, tiny_model

import mixtral
from mixtral.checkpoint import save_quantized
from mixtral.quantize import quantize_model

MIXTRAL = [sys.executable, "-m", "mixtral"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, model): the tiny model saved with Mixtral's tokenizer."""
    model = tiny_model()
    path = tmp_path_factory.mktemp("eco") / "model"
    mixtral.save_model(model, path, tokenizer=mixtral.load_tokenizer())
    return path, model


def test_autotokenizer_encodes_as_ours(saved):
    from transformers import AutoTokenizer

    path, _ = saved
    ours = mixtral.load_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(path)
    for text in ["Hello world", "  two  spaces\nand a newline, é 中文 🙂", "[INST] hi [/INST] answer"]:
        assert theirs(text)["input_ids"] == ours.encode(text), text
    assert theirs.decode(ours.encode("Hello world"), skip_special_tokens=True) == "Hello world"
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_id, ours.eos_id)


def test_transformers_generate_on_a_saved_folder(saved):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path, model = saved
    assert GenerationConfig.from_pretrained(path).eos_token_id == 2
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path)("The king said", return_tensors="pt")["input_ids"]
    out = hf.generate(ids, max_new_tokens=5, do_sample=False)
    with torch.no_grad():  # greedy, step by step, in ours
        seq = ids
        for _ in range(5):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == seq.tolist()


def test_saved_files_follow_the_umask(tmp_path):
    model = tiny_model()
    old = os.umask(0o022)
    try:
        mixtral.save_model(model, tmp_path / "a", tokenizer=mixtral.load_tokenizer())
        os.umask(0o077)
        mixtral.save_model(model, tmp_path / "b")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "a").iterdir()} == {0o644}
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o700
    assert {stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "b").iterdir()} == {0o600}


def test_quantized_checkpoint_is_refused_by_transformers_and_read_by_ours(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, MixtralForCausalLM

    model = quantize_model(tiny_model(), "int8")
    save_quantized(model, tmp_path / "q")
    with pytest.raises(ValueError, match="mixtral_quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="mixtral_quantized"):
        AutoConfig.from_pretrained(tmp_path / "q")
    # the explicit class reads any config.json, but finds no weights it knows: an error, not random weights
    with pytest.raises(OSError, match=r"model\.safetensors"):
        MixtralForCausalLM.from_pretrained(tmp_path / "q")
    tokens = random_tokens(model.config.vocab_size, 1, 6)
    with torch.no_grad():
        assert torch.equal(mixtral.load_model(tmp_path / "q")(tokens), model(tokens))


def test_older_quantized_checkpoints_still_load(tmp_path):
    """Written before the marks: model.safetensors and model_type "mixtral"."""
    model = quantize_model(tiny_model(), "int8")
    save_quantized(model, tmp_path / "q")
    (tmp_path / "q" / "model.quantized.safetensors").rename(tmp_path / "q" / "model.safetensors")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config.update(model_type="mixtral", architectures=["MixtralForCausalLM"])
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    tokens = random_tokens(model.config.vocab_size, 1, 6)
    with torch.no_grad():
        assert torch.equal(mixtral.load_model(tmp_path / "q")(tokens), model(tokens))


def test_version():
    out = subprocess.run([*MIXTRAL, "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().startswith("mixtral ") and out.stdout.split()[1][0].isdigit()
