"""Writing checkpoints: every format is written into a temporary folder beside its destination and renamed
into place (`new_folder`), so a crash never leaves a half-written checkpoint.

What is at the destination is replaced only when it is nothing (absent, or an empty folder) or a previous
output of ours: a folder of plain files, all of them names our writers write (`OUTPUT_FILES`, or the shards
`model-NNNNN-of-NNNNN.safetensors`), `config.json` and the weights (`model.safetensors` or the index) among
them. Anything else (a file, a link, a folder with one foreign file in it) is replaced only with
`overwrite=True` (the commands' `--force`); without it, `OutputExistsError` names the path and what is there."""

from __future__ import annotations

import json
import os
import re
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

QUANT_FILE = "quantization.json"  # a quantized checkpoint's description (quantized.py)
# Every name a folder written by save_model / save_quantized holds (`train` adds the tokenizer to its model/).
OUTPUT_FILES = frozenset({"config.json", HF_SINGLE, HF_INDEX, QUANT_FILE, "tokenizer.model", "tokenizer.json"})
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class OutputExistsError(FileExistsError, ValueError):
    """The destination holds something that is not a previous output of ours; nothing was written."""


def save_model(
    model: Transformer, path: str | os.PathLike, *, max_shard_bytes: int = 4 << 30, overwrite: bool = False
) -> None:
    """Write the model in the Hugging Face layout (`config.json` + safetensors, sharded with an index
    above `max_shard_bytes`), loadable by `transformers`' `MixtralForCausalLM.from_pretrained`.

    The folder is written under a temporary name beside `path` and renamed into place, so a crash
    never leaves a half-written checkpoint. A previous output of ours at `path` is replaced; anything else
    only with `overwrite=True` (else `OutputExistsError`, before anything is written).
    """
    with new_folder(path, overwrite=overwrite) as tmp:
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


def is_our_output(path: Path) -> bool:
    """Whether `path` is a folder written by `save_model` / `save_quantized` (see the module's docstring)."""
    if path.is_symlink() or not path.is_dir():
        return False
    entries = list(path.iterdir())
    names = {p.name for p in entries}
    if not all(p.is_file() and not p.is_symlink() for p in entries):
        return False
    if not all(n in OUTPUT_FILES or SHARD_NAME.fullmatch(n) for n in names):
        return False
    return "config.json" in names and bool(names & {HF_SINGLE, HF_INDEX})


def check_output(path: str | os.PathLike, *, overwrite: bool = False, force: str = "overwrite=True") -> None:
    """Raise `OutputExistsError` unless `path` may be written: it is absent, an empty folder, a previous output
    of ours, or `overwrite` is set. `force` names the way to replace it anyway in the message (a flag)."""
    path = Path(path).expanduser()
    if overwrite or not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink():
        what = f"a symbolic link (to {os.readlink(path)})"
    elif path.is_dir():
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        if not entries or is_our_output(path):
            return
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        what = f"a folder that is not a checkpoint written by mixtral (it holds {shown})"
    elif path.is_file():
        what = f"a file ({path.stat().st_size} bytes)"
    else:
        what = "not a folder"
    raise OutputExistsError(
        f"{path} is {what}: nothing was written; choose another output, remove it, or pass {force} to replace it"
    )


@contextmanager
def new_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside `path` to write a checkpoint into: on success it replaces what was at `path`
    (which `check_output` allows, before anything is written and again before the swap), with as short a gap
    as renames allow; on any error it is removed and `path` is left as it was."""
    path = Path(path).expanduser()
    check_output(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        check_output(path, overwrite=overwrite)  # nothing appeared there meanwhile
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
