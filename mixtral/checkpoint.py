"""Reading and writing weights. Every mapping between on-disk key layouts and the model's parameters lives
here, in `_target_of`.

Layouts read:
- Hugging Face: `config.json` + `model.safetensors`, or shards listed in `model.safetensors.index.json`;
  experts either per expert (`block_sparse_moe.experts.{e}.w1.weight`, what `save_pretrained` writes) or
  stacked (`mlp.experts.gate_up_proj` / `mlp.experts.down_proj`, the in-memory layout of transformers 5).
- Mistral consolidated: `params.json` + `consolidated.safetensors` or `consolidated.00.pth`, whose q/k rows
  are in the interleaved RoPE layout and get permuted into the rotate-half layout the model uses.

Loading builds the model on the meta device, streams each tensor out of the memory-mapped file straight
into its (cast) destination, and assigns the result strictly: every parameter must be covered exactly
once, and every tensor in the files must have a place. The memory mapping is reopened every
`_REMAP_BYTES` so that the pages already copied stop counting against the process: peak memory stays
close to the size of the loaded model, not twice it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .config import ConfigError, ModelConfig
from .model import Transformer

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
# 16 MiB: peak RSS while loading the 791M benchmark model 1.75 GiB (64 MiB: 1.80; 1.70 once loaded, imports
# included), no slower. A tensor larger than this is one chunk of its own.
_REMAP_BYTES = 16 << 20
_PROGRESS_MIN_BYTES = 512 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and the key."""


# ---- layouts ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint found on disk: its layout, config and weight files."""

    path: Path
    layout: str  # "hf" or "mistral"
    config: ModelConfig
    config_file: Path
    files: tuple[Path, ...]
    # For sharded HF checkpoints: which file the index says holds each key.
    index: dict[str, str] | None = None

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def find_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Recognise the layout of a checkpoint directory and read its config."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"checkpoint {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint {root} is not a directory (expected a folder with config and weights)")
    if (root / "config.json").is_file():
        config = _read_config(root / "config.json")
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
        config = _read_config(root / "params.json")
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


def _read_config(path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_file(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors index (needs a 'weight_map' object): {e}") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: 'weight_map' must map tensor names to shard files")
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
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_MISTRAL_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")
_HF_EXPERT_RE = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_MISTRAL_EXPERT_RE = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])\.weight")


def _target_of(key: str, layout: str, config: ModelConfig) -> list[Target] | None:
    """The parameter(s) a stored tensor fills, or None for a key this layout does not have."""
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


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the rows of a q/k projection from the interleaved-pairs RoPE layout (Mistral's consolidated
    files: pair i of a head is rows 2i, 2i+1) to the rotate-half layout (rows i and i + d/2)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `interleaved_to_half`."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# ---- reading tensors ------------------------------------------------------------------------------------


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from a safetensors file, reopening the mapping every _REMAP_BYTES."""
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    done = 0
    while done < len(keys):
        mapped = 0
        try:
            with safe_open(path, framework="pt") as f:
                while done < len(keys) and mapped < _REMAP_BYTES:
                    tensor = f.get_tensor(keys[done])
                    mapped += tensor.numel() * tensor.element_size()
                    yield keys[done], tensor
                    done += 1
        except SafetensorError as e:
            raise CheckpointError(f"{path}: cannot read tensor {keys[done]!r}: {e}") from None


def iter_pth(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for a bad zip/pickle; all mean the same to a user
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a dict of tensors")
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        yield key, tensor


def _iter_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    return iter_pth(path) if path.suffix == ".pth" else _iter_safetensors(path)


def stored_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The floating dtype of the stored weights (the first floating tensor's)."""
    for _, tensor in _iter_file(ckpt.files[0]):
        if tensor.is_floating_point():
            return tensor.dtype
    raise CheckpointError(f"{ckpt.files[0]} holds no floating-point tensors")


# ---- loading ----------------------------------------------------------------------------------------------


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> Transformer:
    """Load a checkpoint in any supported layout. `dtype` defaults to the stored weights' dtype, `device`
    to the CPU. `progress=None` shows a progress bar for checkpoints over 512 MiB.

    A quantized checkpoint (written by `quantize.save_quantized`) loads as the quantized model; its
    dtype is the one it was quantized in."""
    from .quantize import is_quantized_checkpoint, load_quantized

    if is_quantized_checkpoint(path):
        model = load_quantized(path, device)
        if dtype is not None and dtype != model.embed.weight.dtype:
            raise CheckpointError(
                f"{path} is quantized with {model.embed.weight.dtype} activations; it cannot be loaded as {dtype}"
            )
        return model
    ckpt = find_checkpoint(path)
    config = ckpt.config
    dtype = dtype or stored_dtype(ckpt)
    device = torch.device(device or "cpu")
    model = Transformer.skeleton(config)
    expected = {name: p.shape for name, p in model.named_parameters()}
    dests: dict[str, torch.Tensor] = {}
    # Which pieces of each parameter are filled: expert indices for stacked expert tensors, else {0}.
    filled: dict[str, set[int]] = {name: set() for name in expected}

    show = progress if progress is not None else ckpt.size_bytes >= _PROGRESS_MIN_BYTES
    bar = tqdm(total=ckpt.size_bytes, unit="B", unit_scale=True, desc=f"loading {ckpt.path.name}", disable=not show)
    with bar:
        for file in ckpt.files:
            for key, tensor in _iter_file(file):
                for t in targets_of_stored(ckpt, file, key, expected):
                    _place(t, key, file, tensor, expected[t.param], dests, filled, dtype, device, ckpt)
                bar.update(tensor.numel() * tensor.element_size())
    check_complete(ckpt, expected, filled)
    model.load_state_dict(dests, strict=True, assign=True)
    return model.eval()


def targets_of_stored(ckpt: Checkpoint, file: Path, key: str, expected: dict[str, torch.Size]) -> list[Target]:
    """Where a stored tensor goes; an error naming the file and key if it has no place or is in the wrong
    shard of an index."""
    if ckpt.index is not None and ckpt.index.get(key) != file.name:
        raise CheckpointError(f"{file}: tensor {key!r} is not listed for this shard in {ckpt.path / HF_INDEX}")
    config = ckpt.config
    targets = _target_of(key, ckpt.layout, config)
    if targets is None or any(t.param not in expected for t in targets):
        raise CheckpointError(
            f"{file}: unexpected tensor {key!r} (not part of a {config.n_layers}-layer "
            f"{'tied' if config.tie_embeddings else 'untied'} Mixtral in the {ckpt.layout} layout)"
        )
    return targets


def check_complete(ckpt: Checkpoint, expected: dict[str, torch.Size], filled: dict[str, set[int]]) -> None:
    """Every parameter (every expert of the stacked ones) was filled: else an error naming what is missing."""
    for name, shape in expected.items():
        missing = expert_pieces(name, shape) - filled[name]
        if missing:
            what = f" (experts {sorted(missing)})" if is_expert_param(name) else ""
            raise CheckpointError(
                f"{ckpt.path}: missing weights for {name}{what}; "
                f"the files hold no tensor for it in the {ckpt.layout} layout"
            )


def _place(
    t: Target,
    key: str,
    file: Path,
    tensor: torch.Tensor,
    full_shape: torch.Size,
    dests: dict[str, torch.Tensor],
    filled: dict[str, set[int]],
    dtype: torch.dtype,
    device: torch.device,
    ckpt: Checkpoint,
) -> None:
    if not tensor.is_floating_point():
        raise CheckpointError(f"{file}: tensor {key!r} has dtype {tensor.dtype}, expected floating point")
    src = tensor
    if t.rows is not None:
        src = src.narrow(-2, t.rows[0], t.rows[1] - t.rows[0]) if src.shape[-2] >= t.rows[1] else None
    want = full_shape[1:] if t.expert is not None else full_shape
    if src is None or tuple(src.shape) != tuple(want):
        raise CheckpointError(
            f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, but {ckpt.config_file.name} implies "
            f"{tuple(want) if t.rows is None else 'rows ' + str(t.rows) + ' of ' + str(tuple(want))} "
            f"for {t.param}; the config does not match the weights"
        )
    if t.rope_heads is not None:
        src = interleaved_to_half(src, t.rope_heads)
    if t.expert is not None and t.expert >= full_shape[0]:
        raise CheckpointError(f"{file}: tensor {key!r} names expert {t.expert}, but the config has {full_shape[0]}")
    pieces = {t.expert} if t.expert is not None else expert_pieces(t.param, full_shape)
    if pieces & filled[t.param]:
        raise CheckpointError(f"{file}: tensor {key!r} fills {t.param} a second time (duplicate key)")
    if t.param not in dests:
        dests[t.param] = torch.empty(full_shape, dtype=dtype, device=device)
    dest = dests[t.param] if t.expert is None else dests[t.param][t.expert]
    dest.copy_(src)  # casts to the model's dtype and moves to its device in one step
    filled[t.param] |= pieces


def is_expert_param(name: str) -> bool:
    return name.endswith(("moe.w1", "moe.w2", "moe.w3"))


def expert_pieces(name: str, shape: torch.Size) -> set[int]:
    """The pieces a parameter is filled in: its experts for stacked expert tensors, else the whole {0}."""
    return set(range(shape[0])) if is_expert_param(name) else {0}


# ---- saving -----------------------------------------------------------------------------------------------


def _hf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
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


def save_model(model: Transformer, path: str | os.PathLike, *, max_shard_bytes: int = 4 << 30) -> None:
    """Write the model in the Hugging Face layout (`config.json` + safetensors, sharded with an index
    above `max_shard_bytes`), loadable by `transformers`' `MixtralForCausalLM.from_pretrained`.

    The folder is written under a temporary name beside `path` and renamed into place, so a crash
    never leaves a half-written checkpoint; an existing checkpoint at `path` is replaced.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        shards: list[list[tuple[str, torch.Tensor]]] = [[]]
        size = 0
        for key, tensor in _hf_tensors(model):
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((key, tensor))
            size += nbytes
        weight_map: dict[str, str] = {}
        total = 0
        for n, shard in enumerate(shards, start=1):
            name = HF_SINGLE if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            # One shard at a time is copied out of the stacked tensors (safetensors wants separate storage).
            tensors = {key: t.detach().to("cpu").contiguous().clone() for key, t in shard}
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, name))
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / HF_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        hf_config = model.config.to_hf()
        hf_config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, dest: Path) -> None:
    """Move the finished folder `new` to `dest`, replacing what was there with as short a gap as renames allow."""
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)
