"""LoRA adapters in PEFT's format, checked against the `peft` library both ways on transformers'
MixtralForCausalLM of the same tiny checkpoint: ours (trained by `mixtral train --lora-rank`) loads with
`PeftModel.from_pretrained` to the same logits, and PEFT's (attention and expert adapters) loads in ours
(`load_adapter`, `mixtral merge-lora`) to the same logits. Our format from before still loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import random_tokens
from safetensors.torch import save_file

import mixtral
from mixtral.train.lora import adapter_state_dict, apply_lora, load_adapter, merge_lora

peft = pytest.importorskip("peft")
MIXTRAL = [sys.executable, "-m", "mixtral"]
TOL = 2e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny preset, random, saved in the Hugging Face layout (transformers reads it)."""
    torch.manual_seed(0)
    model = mixtral.Transformer(mixtral.get_preset("tiny")).eval()
    path = tmp_path_factory.mktemp("peft") / "base"
    mixtral.save_model(model, path)
    return path


def hf_model(path):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def logits_of(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out).float()


def test_our_trained_adapter_loads_in_peft(base, corpus, tmp_path):
    from mixtral.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(
        data=sorted(str(p) for p in corpus.glob("doc*.txt")), out_dir=str(tmp_path / "run"), init_from=str(base),
        seq_len=32, batch_size=2, steps=3, warmup=1, lr=2e-2, eval_every=3, checkpoint_every=3, log_every=1,
        lora_rank=4, lora_alpha=8.0, lora_targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
    )  # fmt: skip
    Trainer(cfg, progress=False).run()
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (adapter / "adapter_model.safetensors").is_file()
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]

    tokens = random_tokens(32000, 2, 12)
    ours = mixtral.load_model(base)
    base_logits = logits_of(ours, tokens)
    load_adapter(ours, adapter)
    want = logits_of(ours, tokens)
    assert (want - base_logits).abs().max() > 1e-3  # the trained adapter changes the function

    theirs = peft.PeftModel.from_pretrained(hf_model(base), adapter).eval()
    got = logits_of(theirs, tokens)
    assert (got - want).abs().max() < TOL
    # PEFT applied the expert adapters too: without them (lora_B zeroed) the logits differ
    wrappers = [m for m in theirs.modules() if type(m).__name__ == "ParamWrapper"]
    assert len(wrappers) == 2 * ours.config.n_layers  # gate_up_proj and down_proj of each layer
    with torch.no_grad():
        for m in wrappers:
            m.lora_B["default"].weight.zero_()
    assert (logits_of(theirs, tokens) - want).abs().max() > 1e-3


def test_peft_adapter_loads_in_ours(base, tmp_path):
    torch.manual_seed(1)
    hf = hf_model(base)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        init_lora_weights=False,  # random A and B: an adapter that changes the function
        task_type="CAUSAL_LM",
    )
    pm = peft.get_peft_model(hf, config).eval()
    tokens = random_tokens(32000, 2, 12)
    want = logits_of(pm, tokens)
    pm.save_pretrained(tmp_path / "peft")

    ours = mixtral.load_model(base)
    assert (logits_of(ours, tokens) - want).abs().max() > 1e-2
    load_adapter(ours, tmp_path / "peft")
    assert (logits_of(ours, tokens) - want).abs().max() < TOL
    assert (logits_of(merge_lora(ours), tokens) - want).abs().max() < TOL

    out = subprocess.run(
        [*MIXTRAL, "merge-lora", "--base", str(base), "--adapter", str(tmp_path / "peft"),
         "--out", str(tmp_path / "m")], capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (logits_of(mixtral.load_model(tmp_path / "m"), tokens) - want).abs().max() < TOL
    # `generate --lora` (applied at load, not merged) continues as the merged checkpoint does
    texts = []
    for flags in (["--checkpoint", str(base), "--lora", str(tmp_path / "peft")], ["--checkpoint", str(tmp_path / "m")]):
        run = [*MIXTRAL, "generate", *flags, "--prompt", "the king said", "--max-new-tokens", "8"]
        out = subprocess.run(run, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        texts.append(out.stdout)
    assert texts[0] == texts[1] and texts[0].strip()

    # and back: ours written from PEFT's loads in PEFT again, gate_up's shared A kept (rank r, not 2r)
    ours = mixtral.load_model(base)
    load_adapter(ours, tmp_path / "peft")
    from mixtral.train.lora import save_adapter

    save_adapter(ours, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["rank_pattern"] == {}
    again = peft.PeftModel.from_pretrained(hf_model(base), tmp_path / "again").eval()
    assert (logits_of(again, tokens) - want).abs().max() < TOL


def test_old_format_still_loads(base, tmp_path):
    torch.manual_seed(2)
    model = mixtral.load_model(base)
    params = apply_lora(model, rank=2, alpha=4.0, targets=("wq", "w2"))
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    tokens = random_tokens(32000, 1, 8)
    want = logits_of(model, tokens)
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v.contiguous() for k, v in adapter_state_dict(model).items()}, old / "adapter.safetensors")
    (old / "adapter_config.json").write_text(json.dumps({"rank": 2, "alpha": 4.0, "targets": ["wq", "w2"]}))
    fresh = mixtral.load_model(base)
    load_adapter(fresh, old)
    assert (logits_of(fresh, tokens) - want).abs().max() < 1e-5


def test_merge_lora_on_a_folder_that_is_no_adapter(base, tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "adapter_config.json").write_text('{"something": 1}')
    (tmp_path / "empty").mkdir()
    for folder in ("junk", "empty", "absent"):
        out = subprocess.run(
            [*MIXTRAL, "merge-lora", "--base", str(base), "--adapter", str(tmp_path / folder), "--out",
             str(tmp_path / "m")], capture_output=True, text=True,
        )  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert "is not a LoRA adapter" in out.stderr and "adapter_model.safetensors" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
