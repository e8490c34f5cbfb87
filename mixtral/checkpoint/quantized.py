"""Quantized checkpoints: `config.json` (Hugging Face style), `quantization.json` ({"mode", "group_size",
"dtype"}) and `model.quantized.safetensors` holding the quantized model's own state dict (q / scale buffers for
int8, blocks for int4).

On a CPU the weights are used in place: views of the file's mapping, laid out 64-byte aligned by the writer, so
loading takes no time and no memory, the OS keeps the pages in use in RAM and reads the rest from the file when
touched, and a model larger than the RAM still runs (at the speed the disk allows for what does not fit).

Other loaders must refuse them rather than fill a model with random weights where no key matches: the config's
`model_type` is "mixtral_quantized" (transformers' `AutoModelForCausalLM` / `AutoConfig` raise: an architecture
they do not know) and the weights are not in `model.safetensors` (`MixtralForCausalLM.from_pretrained` finds no
weights to load). Checkpoints written before that (`model.safetensors`, `model_type` "mixtral") still load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..kernels.weights import block_major, int4_blocks
from ..model import Transformer
from ..quantize import quantization_of, quantize_model
from ..tokenizer import Tokenizer
from .layouts import HF_SINGLE, QUANTIZED_MODEL_TYPE, read_config
from .reader import CheckpointError, stored_tensors
from .writer import ALIGN, QUANT_FILE, QUANT_WEIGHTS, new_folder, write_config, write_safetensors, write_tokenizer


def save_quantized(
    model: nn.Module, path: str | os.PathLike, *, tokenizer: Tokenizer | None = None, overwrite: bool = False
) -> None:
    """Write a quantized model (and `tokenizer`'s files, as `save_model` does). As with `save_model`, a previous
    output of ours at `path` is replaced, anything else only with `overwrite=True` (else `OutputExistsError`,
    before anything is written)."""
    q = quantization_of(model)
    if q is None:
        raise ValueError("the model is not quantized: use save_model for plain checkpoints")
    with new_folder(path, overwrite=overwrite) as tmp:
        state = model.state_dict()
        specs = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
        write_safetensors(tmp / QUANT_WEIGHTS, specs, state.__getitem__, {"format": "pt", "quantization": q["mode"]})
        dtype = model.embed.weight.dtype
        arch = {"model_type": QUANTIZED_MODEL_TYPE, "architectures": ["MixtralQuantizedForCausalLM"]}
        write_config(tmp, model.config, dtype, **arch, mixtral_quantization=q["mode"])
        write_tokenizer(tmp, tokenizer, model.config)
        desc = {**q, "dtype": str(dtype).removeprefix("torch.")}  # the activations' (and scales') dtype
        (tmp / QUANT_FILE).write_text(json.dumps(desc, indent=2) + "\n")


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / QUANT_FILE).is_file()


def load_quantized(
    path: str | os.PathLike, device: torch.device | str | None = None, *, in_place: bool | None = None
) -> nn.Module:
    """Read a checkpoint written by `save_quantized`: built on the meta device, filled from the file (assign,
    strict: a missing or extra tensor is an error). `in_place` (default: on a CPU) uses the file's mapping as the
    weights' memory (see the module's docstring); a tensor the mapping leaves unaligned (a file written before
    the aligned layout) is read into memory instead. `model.mapped` records the bytes used in place and the file."""
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
    on_cpu = device is None or torch.device(device).type == "cpu"
    in_place = on_cpu if in_place is None else in_place
    if in_place and not on_cpu:
        raise ValueError(f"weights are used in place from the file's mapping only on a CPU, not on {device}")
    state, mapped = {}, 0
    weights = root / QUANT_WEIGHTS if (root / QUANT_WEIGHTS).is_file() else root / HF_SINGLE  # older: model.safetensors
    for key, stored in stored_tensors(weights):
        t = stored.map() if in_place else None
        if t is None or t.data_ptr() % ALIGN:  # a copy, straight into (aligned) memory
            t = stored.read_aligned()
        else:
            mapped += stored.nbytes
        state[key] = t
    if not on_cpu:
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
    model.mapped = {"file": str(weights), "bytes": mapped}
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
