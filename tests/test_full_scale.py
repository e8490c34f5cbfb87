"""The full-scale benchmark's files: our checkpoint and its GGUF twin hold the same numbers (read back by our
loader, and by the `gguf` package in llama.cpp's layout), and the run goes end to end on a small shape."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

import mixtral
from mixtral import full_scale
from mixtral.checkpoint import load_model
from mixtral.checkpoint.layouts import half_to_interleaved
from mixtral.kernels.weights import dequantized
from mixtral.quantize import quantization_of

# The smallest shape int4 takes (rows in blocks of 64, groups of 64); the real tokenizer's vocabulary.
CONFIG = mixtral.get_preset("tiny").replace(dim=128, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=192)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of a model as float32, quantized ones dequantized."""

    def w(m: object) -> torch.Tensor:
        return dequantized(m.weight if isinstance(m, torch.nn.Linear) else m).float()

    out = {name: p.float() for name, p in model.named_parameters()}
    for i, layer in enumerate(model.layers):
        for proj in ("wq", "wk", "wv", "wo"):
            out[f"layers.{i}.attn.{proj}.weight"] = w(getattr(layer.attn, proj))
        for name in ("w1", "w2", "w3"):
            out[f"layers.{i}.moe.{name}"] = w(getattr(layer.moe, name))
    out["output.weight"] = w(model.output)
    return out


@pytest.mark.parametrize("mode", full_scale.MODES)
def test_our_checkpoint_and_its_gguf_twin_hold_the_same_weights(mode, tmp_path):
    full_scale.write_ours(tmp_path / "ours", CONFIG, mode)
    full_scale.write_gguf_twin(tmp_path / "twin.gguf", CONFIG, mode)
    ours, twin = load_model(tmp_path / "ours"), load_model(tmp_path / "twin.gguf")
    assert (quantization_of(ours) or {}).get("mode") == (None if mode == "bf16" else mode)
    a, b = _weights(ours), _weights(twin)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the numbers the module's docstring states: expert 1 of layer 0's w2 from its codes (the model's dtype)
    codes = full_scale.codes("layers.0.moe.w2", (CONFIG.dim, CONFIG.hidden_dim), mode, 0, piece=1)
    assert torch.equal(a["layers.0.moe.w2"][1], full_scale.dense(codes).bfloat16().float())
    tokens = torch.tensor([[1, 415, 2936, 9060, 285, 1142]])
    assert torch.equal(ours(tokens), twin(tokens))


def test_the_gguf_twin_is_in_llama_cpps_layout(tmp_path):
    """Read by the gguf package alone: llama.cpp's names and types, q rows in its permuted order, and Q4_0 blocks
    that its dequantization turns into the codes' weights."""
    path = tmp_path / "twin.gguf"
    full_scale.write_gguf_twin(path, CONFIG, "int4")
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q4_0" and types["blk.1.attn_q.weight"] == "Q4_0"
    assert types["output.weight"] == "Q8_0"  # our int4 model's LM head is int8
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["token_embd.weight"] == "BF16"
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]) == b"llama"
    assert int(fields["llama.expert_count"].parts[-1][0]) == CONFIG.n_experts
    tensors = {t.name: t for t in reader.tensors}
    experts = tensors["blk.1.ffn_up_exps.weight"]
    got = gguf.quants.dequantize(np.asarray(experts.data), gguf.GGMLQuantizationType.Q4_0)
    want = full_scale.dense(full_scale.codes("layers.1.moe.w3", (CONFIG.hidden_dim, CONFIG.dim), "int4", 0, piece=5))
    assert np.array_equal(got[5], want.numpy())
    q = tensors["blk.0.attn_q.weight"]
    got = gguf.quants.dequantize(np.asarray(q.data), gguf.GGMLQuantizationType.Q4_0)
    shape = (CONFIG.n_heads * CONFIG.head_dim, CONFIG.dim)
    want = full_scale.dense(full_scale.codes("layers.0.attn.wq.weight", shape, "int4", 0))
    assert np.array_equal(got, half_to_interleaved(want, CONFIG.n_heads).numpy())


def test_the_run_times_ours_and_reuses_its_files(tmp_path, capsys):
    """The slice run on a small shape without llama.cpp: files written, timed in a child process, reported,
    removed with the slice (no timing is checked)."""
    mixtral.config.PRESETS["full-scale-test"] = CONFIG.replace(n_layers=4)
    try:
        out = tmp_path / "r.json"
        args = ["--preset", "full-scale-test", "--dir", str(tmp_path / "files"), "--slice", "--layers", "1"]
        args += ["--modes", "int4", "--prompt-len", "4", "--new-tokens", "3", "--runs", "1", "--rounds", "1"]
        full_scale.main([*args, "--json", str(out)])
        result = json.loads(out.read_text())
        (row,) = result["rows"]
        assert row["label"] == "1L int4" and len(row["ours"]) == 1 and row["llama"] == []
        assert row["ours"][0]["decode_tok_s"] > 0 and row["ours"][0]["peak_rss"] > 0
        assert "of the bandwidth" in capsys.readouterr().out
        assert not list((tmp_path / "files").glob("ours-*"))  # the slice's files are removed after its run
    finally:
        del mixtral.config.PRESETS["full-scale-test"]


@pytest.mark.parametrize("flag", ["--layers", "--runs", "--rounds", "--threads"])
def test_counts_below_one_are_refused(flag, capsys):
    with pytest.raises(SystemExit):
        full_scale.main([flag, "0"])
    assert f"{flag} must be at least 1" in capsys.readouterr().err
