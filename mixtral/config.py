"""The model's numbers: a small typed dataclass, named presets, and readers for the config files of real
checkpoints (Hugging Face `config.json`, Mistral `params.json`, the metadata of llama.cpp's GGUF files)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config that cannot describe a working Mixtral model; the message names the field."""


# Upper bounds far beyond any real model (Mixtral 8x22B: dim 6144, 56 layers, hidden 16384, 48 heads, vocab 32768,
# 64k context): a config past one is corrupt or hostile, and building it would allocate without bound.
LIMITS = {
    "dim": 1 << 16,
    "n_layers": 1 << 10,
    "hidden_dim": 1 << 18,
    "n_heads": 1 << 10,
    "n_kv_heads": 1 << 10,
    "vocab_size": 1 << 22,
    "n_experts": 1 << 12,
    "top_k": 1 << 12,
    "head_dim": 1 << 12,
    "max_seq_len": 1 << 24,
}
MAX_PARAMETERS = 1 << 44  # ~17.6 trillion


@dataclass(frozen=True)
class ModelConfig:
    dim: int  # hidden size
    n_layers: int
    hidden_dim: int  # per-expert SwiGLU hidden size
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    n_experts: int = 8
    top_k: int = 2  # experts per token
    head_dim: int | None = None  # None means dim // n_heads
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    max_seq_len: int = 32768  # context length
    sliding_window: int | None = None  # None: full causal attention
    tie_embeddings: bool = False  # LM head shares the embedding matrix (SPEC: untied for Mixtral releases)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.n_heads > 0 and self.dim % self.n_heads:
                raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.dim // max(self.n_heads, 1))
        self.validate()

    def validate(self) -> None:
        positive = (
            "dim",
            "n_layers",
            "hidden_dim",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "n_experts",
            "top_k",
            "head_dim",
            "max_seq_len",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            if value > LIMITS[name]:
                raise ConfigError(f"{name}={value} is beyond any real model (at most {LIMITS[name]}): corrupt config?")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} "
                "(each key/value head serves a whole group of query heads)"
            )
        if self.top_k > self.n_experts:
            raise ConfigError(f"top_k={self.top_k} (experts per token) exceeds n_experts={self.n_experts}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window must be a positive integer or null, got {self.sliding_window!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be positive, got {value!r}")
        if self.param_counts()[0] > MAX_PARAMETERS:
            raise ConfigError(f"{self.param_counts()[0]:,} parameters is beyond any real model: a corrupt config?")

    # ---- derived numbers -------------------------------------------------------------------------------

    def param_counts(self) -> tuple[int, int]:
        """(total, active per token) parameter counts."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        expert = 3 * self.dim * self.hidden_dim
        per_layer_fixed = attn + self.dim * self.n_experts + 2 * self.dim  # + router + two norms
        embed = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else embed
        fixed = self.n_layers * per_layer_fixed + embed + head + self.dim
        total = fixed + self.n_layers * self.n_experts * expert
        active = fixed + self.n_layers * self.top_k * expert
        return total, active

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face `MixtralConfig` dict (`config.json`)."""
        model_type = hf.get("model_type")
        if model_type not in (None, "mixtral"):
            raise ConfigError(f"model_type={model_type!r} is not a Mixtral config (expected 'mixtral')")
        rope = hf.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters must be an object like {{'rope_type': 'default', ...}}, got {rope!r}")
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ConfigError(f"rope_parameters.rope_type={rope_type!r} is not supported (only 'default')")
        theta = rope.get("rope_theta", hf.get("rope_theta", 1e6))
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported (Mixtral experts use 'silu')")
        try:
            return cls(
                dim=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"],
                hidden_dim=hf["intermediate_size"],
                n_heads=hf["num_attention_heads"],
                n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                vocab_size=hf["vocab_size"],
                n_experts=hf.get("num_local_experts", 8),
                top_k=hf.get("num_experts_per_tok", 2),
                head_dim=hf.get("head_dim"),
                rope_theta=_number("rope_theta", theta),
                norm_eps=_number("rms_norm_eps", hf.get("rms_norm_eps", 1e-5)),
                max_seq_len=hf.get("max_position_embeddings", 32768),
                sliding_window=hf.get("sliding_window"),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the required field {e.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that `transformers.MixtralConfig` reads."""
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "intermediate_size": self.hidden_dim,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "num_local_experts": self.n_experts,
            "num_experts_per_tok": self.top_k,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "router_aux_loss_coef": 0.02,
        }

    # ---- Mistral params.json ---------------------------------------------------------------------------

    @classmethod
    def from_mistral(cls, params: dict[str, Any]) -> ModelConfig:
        """Read Mistral's `params.json` (consolidated checkpoints)."""
        moe = params.get("moe")
        if not moe:
            raise ConfigError("params.json has no 'moe' section: this is a dense Mistral model, not Mixtral")
        try:
            return cls(
                dim=params["dim"],
                n_layers=params["n_layers"],
                hidden_dim=params["hidden_dim"],
                n_heads=params["n_heads"],
                n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
                vocab_size=params["vocab_size"],
                n_experts=moe["num_experts"],
                top_k=moe["num_experts_per_tok"],
                head_dim=params.get("head_dim"),
                # Older MoE params.json files omit rope_theta; Mixtral was trained with 1e6.
                rope_theta=_number("rope_theta", params.get("rope_theta", 1e6)),
                norm_eps=_number("norm_eps", params.get("norm_eps", 1e-5)),
                max_seq_len=params.get("max_seq_len", 32768),
                sliding_window=params.get("sliding_window"),
                tie_embeddings=bool(params.get("tied_embeddings", False)),
            )
        except KeyError as e:
            raise ConfigError(f"params.json lacks the required field {e.args[0]!r}") from None

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], *, has_output: bool = True) -> ModelConfig:
        """Read the metadata of a llama.cpp GGUF file (key -> value, as the `gguf` package reads them). llama.cpp
        writes Mixtral as the "llama" architecture with experts: `llama.block_count`, `llama.expert_count` ...;
        the vocabulary's size is `llama.vocab_size`, else the length of `tokenizer.ggml.tokens` (given as that
        key's value). `has_output`: whether the file holds `output.weight` (without it, llama.cpp ties the LM
        head to the embedding)."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ConfigError(f"general.architecture={arch!r}: only llama.cpp's 'llama' architecture (Mixtral's) reads")
        if not meta.get("llama.expert_count"):
            raise ConfigError("llama.expert_count is missing or 0: this is a dense Llama/Mistral model, not Mixtral")
        scaling = meta.get("llama.rope.scaling.type", "none")
        if scaling != "none":
            raise ConfigError(f"llama.rope.scaling.type={scaling!r} is not supported (only 'none')")

        def need(key: str) -> Any:
            if key not in meta:
                raise ConfigError(f"the GGUF metadata lacks the required key {key!r}")
            return meta[key]

        n_heads = need("llama.attention.head_count")
        vocab = meta.get("llama.vocab_size", meta.get("tokenizer.ggml.tokens"))
        if vocab is None:
            raise ConfigError("the GGUF metadata has neither llama.vocab_size nor tokenizer.ggml.tokens")
        return cls(
            dim=need("llama.embedding_length"),
            n_layers=need("llama.block_count"),
            hidden_dim=meta.get("llama.expert_feed_forward_length") or need("llama.feed_forward_length"),
            n_heads=n_heads,
            n_kv_heads=meta.get("llama.attention.head_count_kv") or n_heads,
            vocab_size=vocab,
            n_experts=need("llama.expert_count"),
            top_k=need("llama.expert_used_count"),
            head_dim=meta.get("llama.attention.key_length") or meta.get("llama.rope.dimension_count"),
            # llama.cpp's defaults where a key is missing: base 10000, eps 1e-5
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            max_seq_len=need("llama.context_length"),
            tie_embeddings=not has_output,
        )

    def to_mistral(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "hidden_dim": self.hidden_dim,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_seq_len": self.max_seq_len,
            "sliding_window": self.sliding_window,
            "moe": {"num_experts": self.n_experts, "num_experts_per_tok": self.top_k},
        }

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ModelConfig:
        """Read `config.json` (Hugging Face) or `params.json` (Mistral)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a text file (JSON expected)") from None
        except OSError as e:  # unreadable (permissions), a folder, ...
            raise ConfigError(f"{path} cannot be read: {e.strerror or e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
        try:
            # The two formats are told apart by their file names, as the checkpoints name them.
            mistral = path.name == "params.json" or (path.name != "config.json" and "dim" in data)
            return cls.from_mistral(data) if mistral else cls.from_hf(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except TypeError as e:  # e.g. a field of the wrong JSON type reaching a comparison
            raise ConfigError(f"{path}: a field has the wrong type: {e}") from None


def _number(field: str, value: Any) -> float:
    """A config file's number field as a float, or a ConfigError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{field} must be a number, got {value!r}")
    return float(value)


PRESETS: dict[str, ModelConfig] = {
    "mixtral-8x7b": ModelConfig(
        dim=4096,
        n_layers=32,
        hidden_dim=14336,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=32000,
        n_experts=8,
        top_k=2,
        rope_theta=1e6,
        max_seq_len=32768,
    ),
    "mixtral-8x22b": ModelConfig(
        dim=6144,
        n_layers=56,
        hidden_dim=16384,
        n_heads=48,
        n_kv_heads=8,
        vocab_size=32768,
        n_experts=8,
        top_k=2,
        rope_theta=1e6,
        max_seq_len=65536,
    ),
    # The shape that the CPU benchmarks use (791M parameters, 460 MB of active bf16 weights per token).
    "bench-791m": ModelConfig(
        dim=1024,
        n_layers=8,
        hidden_dim=3584,
        n_heads=16,
        n_kv_heads=4,
        vocab_size=32000,
        n_experts=8,
        top_k=2,
        max_seq_len=4096,
    ),
    # The built-in model (trained on Shakespeare, shipped in bf16) and its dense twin with the same active
    # parameters per token (one expert of twice the hidden size = two active experts' worth).
    "shakespeare-moe": ModelConfig(
        dim=256,
        n_layers=4,
        hidden_dim=512,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=32000,
        n_experts=8,
        top_k=2,
        max_seq_len=256,
        tie_embeddings=True,
    ),
    "shakespeare-dense": ModelConfig(
        dim=256,
        n_layers=4,
        hidden_dim=1024,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=32000,
        n_experts=1,
        top_k=1,
        max_seq_len=256,
        tie_embeddings=True,
    ),
    # Tiny shapes for tests: fast on one CPU core, still every feature (GQA, top-2 of 8).
    "tiny": ModelConfig(
        dim=64,
        n_layers=2,
        hidden_dim=128,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=32000,
        n_experts=8,
        top_k=2,
        max_seq_len=512,
    ),
    "tiny-swa": ModelConfig(
        dim=64,
        n_layers=2,
        hidden_dim=128,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=32000,
        n_experts=4,
        top_k=2,
        max_seq_len=512,
        sliding_window=16,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
