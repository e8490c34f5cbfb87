"""Quantized checkpoints: `config.json` (Hugging Face style), `quantization.json` ({"mode", "group_size",
"dtype"}) and `model.safetensors` holding the quantized model's own state dict (q / scale buffers for
int8, blocks for int4), read into 64-byte aligned memory (what the int8/int4 CPU kernels need)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..kernels.weights import block_major, int4_blocks
from ..model import Transformer
from ..quantize import quantization_of, quantize_model
from .layouts import HF_SINGLE, read_config
from .reader import CheckpointError, stored_tensors
from .writer import QUANT_FILE, new_folder, write_config


def save_quantized(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write a quantized model. As with `save_model`, a previous output of ours at `path` is replaced, anything
    else only with `overwrite=True` (else `OutputExistsError`, before anything is written)."""
    q = quantization_of(model)
    if q is None:
        raise ValueError("the model is not quantized: use save_model for plain checkpoints")
    with new_folder(path, overwrite=overwrite) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, tmp / HF_SINGLE, metadata={"format": "pt", "quantization": q["mode"]})
        dtype = model.embed.weight.dtype
        write_config(tmp, model.config, dtype)
        desc = {**q, "dtype": str(dtype).removeprefix("torch.")}  # the activations' (and scales') dtype
        (tmp / QUANT_FILE).write_text(json.dumps(desc, indent=2) + "\n")


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / QUANT_FILE).is_file()


def load_quantized(path: str | os.PathLike, device: torch.device | str | None = None) -> nn.Module:
    """Read a checkpoint written by `save_quantized`: built on the meta device, filled from the file (assign,
    strict: a missing or extra tensor is an error)."""
    root = Path(path).expanduser()
    try:
        q = json.loads((root / QUANT_FILE).read_text())
        mode, group_size = q["mode"], q.get("group_size") or 64
        dtype = getattr(torch, q["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype {q['dtype']!r}")
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{root / QUANT_FILE}: not a readable quantization description ({e})") from None
    config = read_config(root / "config.json")
    model = Transformer.skeleton(config).to(dtype)
    quantize_model(model, mode, group_size)
    # Not memory-mapped views: those sit at the file's byte offsets, and a copy of all of them to align
    # them would double the peak memory. Each tensor is read once, straight into aligned memory.
    state = {key: stored.read_aligned() for key, stored in stored_tensors(root / HF_SINGLE)}
    if device is not None and torch.device(device).type != "cpu":
        state = {k: v.to(device) for k, v in state.items()}
    expected = model.state_dict()
    _upgrade_int4(state, group_size)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{root}: quantized checkpoint does not match its config: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for k, t in state.items():
        if t.shape != expected[k].shape or t.dtype != expected[k].dtype:
            raise CheckpointError(
                f"{root}: {k} is {t.dtype}{tuple(t.shape)}, expected {expected[k].dtype}{tuple(expected[k].shape)}"
            )
    model.load_state_dict(state, strict=True, assign=True)
    model.quantization = {"mode": q["mode"], "group_size": q.get("group_size")}
    return model.eval()


def _upgrade_int4(state: dict[str, torch.Tensor], group_size: int) -> None:
    """int4 weights of checkpoints written before the scales went inline, in place: `packed` (int4pack) and
    `scales_zeros` (by block, [..., N/64, G, 64, 2]; earlier still ATen's [..., G, N, 2]) -> `blocks`."""
    for key in [k for k in state if k.endswith(".packed")]:
        base = key.removesuffix(".packed")
        packed, sz = state.pop(key), state.pop(base + ".scales_zeros", None)
        if sz is None:
            continue  # reported as missing below
        if sz.dim() == packed.dim() + 1:  # ATen's order
            sz = block_major(sz.transpose(-3, -2))
        state[base + ".blocks"] = int4_blocks(packed, sz, group_size)
