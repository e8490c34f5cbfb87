"""The built-in model ships inside the package and loads like any checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import mixtral
from mixtral import BUILTIN
from mixtral.config import get_preset
from mixtral.train.loss import cross_entropy

HAMLET = """HAMLET.
To be, or not to be,--that is the question:--
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles,
And by opposing end them?"""


def test_builtin_loads_through_the_public_loader():
    model = mixtral.load_model(BUILTIN)
    assert model.config == get_preset("shakespeare-moe")
    assert next(model.parameters()).dtype == torch.bfloat16
    size = sum(f.stat().st_size for f in BUILTIN.glob("*.safetensors"))
    assert size <= 60e6  # the package stays small


def test_builtin_is_trained_not_random():
    model = mixtral.load_model(BUILTIN, dtype=torch.float32)
    tok = mixtral.load_tokenizer(BUILTIN)
    ids = torch.tensor([tok.encode(HAMLET)])
    with torch.no_grad():
        loss = cross_entropy(model(ids[:, :-1]), ids[:, 1:], torch.ones_like(ids[:, 1:], dtype=torch.bool))
    assert loss.item() < 6.0  # uniform guessing over 32000 tokens would be ln(32000) = 10.4


def test_generate_without_checkpoint_uses_the_builtin_model():
    out = subprocess.run(
        [str(Path(sys.executable).parent / "mixtral"), "generate", "--prompt", "KING. Now, my good lords,",
         "--max-new-tokens", "20", "--seed", "3", "--temperature", "0.7"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip()) > 20 and "tokens/s" in out.stderr
