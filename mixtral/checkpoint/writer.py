"""Writing checkpoints: every format is written into a temporary folder beside its destination and renamed
into place (`new_folder`), so a crash never leaves a half-written checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ModelConfig
from ..model import Transformer
from .layouts import HF_INDEX, HF_SINGLE, hf_tensors


def save_model(model: Transformer, path: str | os.PathLike, *, max_shard_bytes: int = 4 << 30) -> None:
    """Write the model in the Hugging Face layout (`config.json` + safetensors, sharded with an index
    above `max_shard_bytes`), loadable by `transformers`' `MixtralForCausalLM.from_pretrained`.

    The folder is written under a temporary name beside `path` and renamed into place, so a crash
    never leaves a half-written checkpoint; an existing checkpoint at `path` is replaced.
    """
    with new_folder(path) as tmp:
        shards: list[list[tuple[str, torch.Tensor]]] = [[]]
        size = 0
        for key, tensor in hf_tensors(model):
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
        write_config(tmp, model.config, next(model.parameters()).dtype)


def write_config(folder: Path, config: ModelConfig, dtype: torch.dtype) -> None:
    """`config.json` in the Hugging Face style, naming the weights' dtype."""
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


@contextmanager
def new_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `path` to write a checkpoint into: on success it replaces whatever was at
    `path`, with as short a gap as renames allow; on any error it is removed and `path` is left as it was."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
