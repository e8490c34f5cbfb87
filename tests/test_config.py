"""Config: presets, the two on-disk formats, and refusal of invalid combinations naming the field."""

from __future__ import annotations

import json

import pytest

from mixtral.config import ConfigError, ModelConfig, get_preset


def test_mixtral_8x7b_parameter_counts():
    total, active = get_preset("mixtral-8x7b").param_counts()
    assert round(total / 1e9, 1) == 46.7  # SPEC: 46.7B total, 12.9B active
    assert round(active / 1e9, 1) == 12.9


def test_mixtral_8x22b_parameter_counts():
    total, active = get_preset("mixtral-8x22b").param_counts()
    assert round(total / 1e9) == 141 and round(active / 1e9) == 39


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="unknown preset 'gpt4'; choose one of: mixtral-8x7b"):
        get_preset("gpt4")


HF_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1e6,
    "sliding_window": None,
    "vocab_size": 32000,
}


def test_hf_config_matches_preset():
    assert ModelConfig.from_hf(HF_8X7B) == get_preset("mixtral-8x7b")


def test_hf_rope_parameters_spelling_and_head_dim():
    newer = dict(HF_8X7B, rope_parameters={"rope_type": "default", "rope_theta": 5e5}, head_dim=64)
    del newer["rope_theta"]
    cfg = ModelConfig.from_hf(newer)
    assert cfg.rope_theta == 5e5 and cfg.head_dim == 64
    assert ModelConfig.from_hf(dict(HF_8X7B, head_dim=None)).head_dim == 128
    assert ModelConfig.from_hf(dict(HF_8X7B, sliding_window=4096)).sliding_window == 4096


def test_hf_round_trip():
    cfg = get_preset("tiny-swa")
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_mistral_params_without_rope_theta_defaults_to_1e6(tmp_path):
    params = {
        "dim": 4096,
        "n_layers": 32,
        "head_dim": 128,
        "hidden_dim": 14336,
        "n_heads": 32,
        "n_kv_heads": 8,
        "norm_eps": 1e-05,
        "vocab_size": 32000,
        "moe": {"num_experts_per_tok": 2, "num_experts": 8},
    }
    (tmp_path / "params.json").write_text(json.dumps(params))
    cfg = ModelConfig.from_file(tmp_path / "params.json")
    assert cfg.rope_theta == 1e6
    assert cfg.replace(max_seq_len=32768) == get_preset("mixtral-8x7b")
    assert ModelConfig.from_mistral(get_preset("tiny-swa").to_mistral()) == get_preset("tiny-swa")


def test_dense_params_json_is_refused():
    with pytest.raises(ConfigError, match="no 'moe' section"):
        ModelConfig.from_mistral({"dim": 8, "n_layers": 1, "hidden_dim": 8, "n_heads": 1, "vocab_size": 8})


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_kv_heads=3), "n_heads=4 must be a multiple of n_kv_heads=3"),
        (dict(top_k=9), "top_k=9 .* exceeds n_experts=8"),
        (dict(n_layers=0), "n_layers must be a positive integer, got 0"),
        (dict(head_dim=15), "head_dim=15 must be even"),
        (dict(sliding_window=0), "sliding_window must be a positive integer or null"),
        (dict(rope_theta=-1.0), "rope_theta must be positive"),
        (dict(vocab_size=1.5), "vocab_size must be a positive integer, got 1.5"),
    ],
)
def test_invalid_combinations_name_the_field(change, message):
    base = dict(dim=64, n_layers=2, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=100)
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**base, **change})


def test_dim_not_divisible_by_heads_needs_head_dim():
    with pytest.raises(ConfigError, match="dim=66 is not divisible by n_heads=4; set head_dim"):
        ModelConfig(dim=66, n_layers=1, hidden_dim=8, n_heads=4, n_kv_heads=2, vocab_size=10)
    assert ModelConfig(dim=66, n_layers=1, hidden_dim=8, n_heads=4, n_kv_heads=2, vocab_size=10, head_dim=16)


def test_hf_missing_field_and_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match="lacks the required field 'num_hidden_layers'"):
        ModelConfig.from_hf({k: v for k, v in HF_8X7B.items() if k != "num_hidden_layers"})
    with pytest.raises(ConfigError, match="not a Mixtral config"):
        ModelConfig.from_hf(dict(HF_8X7B, model_type="llama"))
    (tmp_path / "config.json").write_text(json.dumps(dict(HF_8X7B, num_attention_heads="32")))
    with pytest.raises(ConfigError, match=r"config\.json: a field has the wrong type"):
        ModelConfig.from_file(tmp_path / "config.json")
