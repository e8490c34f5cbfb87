"""The layouts checkpoints come in, and every mapping between their keys and the model's parameters, both
ways (`target_of` reading, `hf_tensors` writing).

- Hugging Face: `config.json` + `model.safetensors`, or shards listed in `model.safetensors.index.json`;
  experts either per expert (`block_sparse_moe.experts.{e}.w1.weight`, what `save_pretrained` writes) or
  stacked (`mlp.experts.gate_up_proj` / `mlp.experts.down_proj`, the in-memory layout of transformers 5).
- Mistral consolidated: `params.json` + `consolidated.safetensors` or `consolidated.00.pth`, whose q/k rows
  are in the interleaved RoPE layout and get permuted into the rotate-half layout the model uses.
- llama.cpp's GGUF: one `.gguf` file, config in its metadata (`ModelConfig.from_gguf`), keys like
  `blk.{i}.attn_q.weight`; experts merged (`blk.{i}.ffn_gate_exps.weight` [E, F, D], what its converter writes
  today) or per expert (`blk.{i}.ffn_gate.{e}.weight`, older files). Its converter permutes the q/k rows of
  llama-family models into the interleaved RoPE layout (`half_to_interleaved`): undone as for Mistral's files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, ModelConfig
from ..kernels.weights import dequantized
from ..model import Transformer
from .reader import CheckpointError, open_gguf

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
QUANT_FILE = "quantization.json"  # a quantized checkpoint's description (quantized.py)
QUANT_WEIGHTS = "model.quantized.safetensors"  # a quantized checkpoint's weights (a name transformers never reads)
# config.json's model_type in a quantized checkpoint of ours: one no other loader takes for plain Mixtral weights
QUANTIZED_MODEL_TYPE = "mixtral_quantized"


# ---- layouts ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint found on disk: its layout, config and weight files."""

    path: Path
    layout: str  # "hf", "mistral", "gguf" or "quantized" (ours: loaded by quantized.py, not key by key)
    config: ModelConfig
    config_file: Path
    files: tuple[Path, ...]
    # For sharded HF checkpoints: which file the index says holds each key.
    index: dict[str, str] | None = None

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def find_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Recognise the layout of a checkpoint directory (or GGUF file) and read its config."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"checkpoint {root} does not exist")
    if root.is_file() and root.suffix == ".gguf":
        return Checkpoint(root, "gguf", read_gguf_config(root), root, (root,))
    if not root.is_dir():
        raise CheckpointError(
            f"checkpoint {root} is neither a directory (a folder with config and weights) nor a .gguf file"
        )
    if (root / "config.json").is_file():
        config = read_config(root / "config.json")
        if (root / QUANT_FILE).is_file():  # older ones keep their weights in model.safetensors
            weights = root / QUANT_WEIGHTS if (root / QUANT_WEIGHTS).is_file() else root / HF_SINGLE
            if not weights.is_file():
                raise CheckpointError(f"{root} has {QUANT_FILE} but no {QUANT_WEIGHTS}")
            return Checkpoint(root, "quantized", config, root / "config.json", (weights,))
        if (root / HF_INDEX).is_file():
            index = _read_index(root / HF_INDEX)
            files = tuple(root / name for name in sorted(set(index.values())))
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{root / HF_INDEX} lists shard {f.name}, which is missing from {root}")
            return Checkpoint(root, "hf", config, root / "config.json", files, index)
        if (root / HF_SINGLE).is_file():
            return Checkpoint(root, "hf", config, root / "config.json", (root / HF_SINGLE,))
        raise CheckpointError(f"{root} has config.json but neither {HF_SINGLE} nor {HF_INDEX}")
    if (root / "params.json").is_file():
        config = read_config(root / "params.json")
        if (root / "consolidated.safetensors").is_file():
            files = (root / "consolidated.safetensors",)
        else:
            pth = sorted(root.glob("consolidated.*.pth"))
            if not pth:
                raise CheckpointError(
                    f"{root} has params.json but neither consolidated.safetensors nor consolidated.00.pth"
                )
            if len(pth) > 1:
                raise CheckpointError(
                    f"{root} holds {len(pth)} consolidated.*.pth files (a tensor-parallel split); "
                    "only a single consolidated file is supported"
                )
            files = (pth[0],)
        return Checkpoint(root, "mistral", config, root / "params.json", files)
    raise CheckpointError(
        f"{root} is not a checkpoint: expected config.json with {HF_SINGLE} or {HF_INDEX} (Hugging Face layout), "
        "or params.json with consolidated.safetensors or consolidated.00.pth (Mistral layout)"
    )


def read_config(path: Path) -> ModelConfig:
    """A config file (`ModelConfig.from_file`); a quantized checkpoint's `config.json` (`QUANTIZED_MODEL_TYPE`)
    reads as the Mixtral config it is."""
    try:
        if path.name == "config.json" and _model_type(path) == QUANTIZED_MODEL_TYPE:
            return ModelConfig.from_hf({**json.loads(path.read_text()), "model_type": "mixtral"})
        return ModelConfig.from_file(path)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None


def _model_type(path: Path) -> object:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # from_file reports it
    return data.get("model_type") if isinstance(data, dict) else None


def read_gguf_config(path: Path) -> ModelConfig:
    """The config in a GGUF file's metadata (only its header is read)."""
    reader = open_gguf(path)
    wanted = [k for k in reader.fields if k.startswith("llama.") or k == "general.architecture"]
    meta = {k: _shortest(reader.fields[k].contents()) for k in wanted}
    if (tokens := reader.fields.get("tokenizer.ggml.tokens")) is not None:
        meta["tokenizer.ggml.tokens"] = len(tokens.data)
    try:
        return ModelConfig.from_gguf(meta, has_output=any(t.name == "output.weight" for t in reader.tensors))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _shortest(value: object) -> object:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value))) if isinstance(value, float) else value


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors index (needs a 'weight_map' object): {e}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: 'weight_map' must map tensor names to shard files")
    for shard in set(weight_map.values()):
        # A shard is a file in the index's own folder: a name reaching outside it (a path, '..') is refused.
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{path} names shard {shard!r}, which is not a file name in {path.parent}")
    return weight_map


# ---- key mapping ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a stored tensor goes: a parameter, optionally one expert of it and a range of its rows."""

    param: str
    expert: int | None = None
    rows: tuple[int, int] | None = None  # a slice of the stored tensor's dim -2 (gate/up halves)
    rope_heads: int | None = None  # permute interleaved-RoPE rows of this many heads


_HF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "block_sparse_moe.gate.weight": "moe.gate.weight",
    "mlp.gate.weight": "moe.gate.weight",
}
_HF_TOP = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_MISTRAL_LAYER = {
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attention.wq.weight": "attn.wq.weight",
    "attention.wk.weight": "attn.wk.weight",
    "attention.wv.weight": "attn.wv.weight",
    "attention.wo.weight": "attn.wo.weight",
    "feed_forward.gate.weight": "moe.gate.weight",
}
_MISTRAL_TOP = {
    "tok_embeddings.weight": "embed.weight",
    "norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_GGUF_LAYER = {
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attn_q.weight": "attn.wq.weight",
    "attn_k.weight": "attn.wk.weight",
    "attn_v.weight": "attn.wv.weight",
    "attn_output.weight": "attn.wo.weight",
    "ffn_gate_inp.weight": "moe.gate.weight",
    "ffn_gate_exps.weight": "moe.w1",
    "ffn_down_exps.weight": "moe.w2",
    "ffn_up_exps.weight": "moe.w3",
}
_GGUF_TOP = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
_GGUF_EXPERT_RE = re.compile(r"ffn_(gate|down|up)\.(\d+)\.weight")
_GGUF_EXPERT_W = {"gate": "w1", "down": "w2", "up": "w3"}
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_MISTRAL_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")
_HF_EXPERT_RE = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_MISTRAL_EXPERT_RE = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])\.weight")


def target_of(key: str, layout: str, config: ModelConfig) -> list[Target] | None:
    """The parameter(s) a stored tensor fills, or None for a key this layout does not have."""
    if layout == "gguf":
        return _gguf_target(key, config)
    top, layer_re, per_layer, expert_re = (
        (_HF_TOP, _HF_LAYER_RE, _HF_LAYER, _HF_EXPERT_RE)
        if layout == "hf"
        else (_MISTRAL_TOP, _MISTRAL_LAYER_RE, _MISTRAL_LAYER, _MISTRAL_EXPERT_RE)
    )
    if key in top:
        return [Target(top[key])]
    m = layer_re.fullmatch(key)
    if m is None:
        return None
    prefix, rest = f"layers.{m.group(1)}.", m.group(2)
    if rest in per_layer:
        name = per_layer[rest]
        heads = None
        if layout == "mistral" and name == "attn.wq.weight":
            heads = config.n_heads
        elif layout == "mistral" and name == "attn.wk.weight":
            heads = config.n_kv_heads
        return [Target(prefix + name, rope_heads=heads)]
    if m2 := expert_re.fullmatch(rest):
        return [Target(f"{prefix}moe.{m2.group(2)}", expert=int(m2.group(1)))]
    if layout == "hf" and rest == "mlp.experts.gate_up_proj":
        F_ = config.hidden_dim
        return [Target(prefix + "moe.w1", rows=(0, F_)), Target(prefix + "moe.w3", rows=(F_, 2 * F_))]
    if layout == "hf" and rest == "mlp.experts.down_proj":
        return [Target(prefix + "moe.w2")]
    return None


def _gguf_target(key: str, config: ModelConfig) -> list[Target] | None:
    if key in _GGUF_TOP:
        return [Target(_GGUF_TOP[key])]
    m = _GGUF_LAYER_RE.fullmatch(key)
    if m is None:
        return None
    prefix, rest = f"layers.{m.group(1)}.", m.group(2)
    if rest in _GGUF_LAYER:
        heads = {"attn_q.weight": config.n_heads, "attn_k.weight": config.n_kv_heads}.get(rest)
        return [Target(prefix + _GGUF_LAYER[rest], rope_heads=heads)]
    if m2 := _GGUF_EXPERT_RE.fullmatch(rest):
        return [Target(f"{prefix}moe.{_GGUF_EXPERT_W[m2.group(1)]}", expert=int(m2.group(2)))]
    return None


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the rows of a q/k projection from the interleaved-pairs RoPE layout (Mistral's consolidated
    files: pair i of a head is rows 2i, 2i+1) to the rotate-half layout (rows i and i + d/2)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `interleaved_to_half`."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def is_expert_param(name: str) -> bool:
    return name.endswith(("moe.w1", "moe.w2", "moe.w3"))


def expert_pieces(name: str, shape: torch.Size) -> set[int]:
    """The pieces a parameter is filled in: its experts for stacked expert tensors, else the whole {0}."""
    return set(range(shape[0])) if is_expert_param(name) else {0}


def gguf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under llama.cpp's names as its converter writes them: experts merged, q/k rows permuted
    into the interleaved RoPE order; quantized weights dequantized (the model's dtype)."""
    cfg = model.config

    def w(obj: object) -> torch.Tensor:
        return dequantized(obj.weight if isinstance(obj, torch.nn.Linear) else obj)  # type: ignore[arg-type]

    yield "token_embd.weight", model.embed.weight
    yield "output_norm.weight", model.norm.weight
    if model.output is not None:
        yield "output.weight", w(model.output)
    for i, layer in enumerate(model.layers):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", layer.attn_norm.weight
        yield b + "attn_q.weight", half_to_interleaved(w(layer.attn.wq), cfg.n_heads)
        yield b + "attn_k.weight", half_to_interleaved(w(layer.attn.wk), cfg.n_kv_heads)
        yield b + "attn_v.weight", w(layer.attn.wv)
        yield b + "attn_output.weight", w(layer.attn.wo)
        yield b + "ffn_norm.weight", layer.ffn_norm.weight
        yield b + "ffn_gate_inp.weight", layer.moe.gate.weight
        yield b + "ffn_gate_exps.weight", w(layer.moe.w1)
        yield b + "ffn_down_exps.weight", w(layer.moe.w2)
        yield b + "ffn_up_exps.weight", w(layer.moe.w3)


def hf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under Hugging Face keys, experts split per expert (what transformers writes)."""
    to_hf = {v: k for k, v in _HF_LAYER.items() if k.startswith(("input", "post", "self_attn", "block_sparse"))}
    params = dict(model.named_parameters())
    for top_key, name in _HF_TOP.items():
        if name in params:
            yield top_key, params[name]
    for i in range(model.config.n_layers):
        for name, hf in to_hf.items():
            yield f"model.layers.{i}.{hf}", params[f"layers.{i}.{name}"]
        for w in ("w1", "w2", "w3"):
            stacked = params[f"layers.{i}.moe.{w}"]
            for e in range(stacked.shape[0]):
                yield f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight", stacked[e]


def claim(t: Target, file: Path, key: str, full_shape: torch.Size, filled: dict[str, set[int]], source: str) -> None:
    """Mark what stored tensor `key` of `file` fills of its parameter (one expert, or all of it): an expert beyond
    the `source`'s (config's, metadata's) count, or a part filled a second time, is an error."""
    if t.expert is not None and t.expert >= full_shape[0]:
        raise CheckpointError(f"{file}: tensor {key!r} names expert {t.expert}, but the {source} has {full_shape[0]}")
    pieces = {t.expert} if t.expert is not None else expert_pieces(t.param, full_shape)
    if pieces & filled[t.param]:
        raise CheckpointError(f"{file}: tensor {key!r} fills {t.param} a second time (duplicate key)")
    filled[t.param] |= pieces
