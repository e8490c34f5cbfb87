"""Writing checkpoints: every format is written into a temporary folder beside its destination and renamed
into place (`new_folder`), so a crash never leaves a half-written checkpoint.

What is at the destination is replaced only when it is nothing (absent, or an empty folder) or a previous
output of ours: a folder of plain files, all of them names our writers write (`OUTPUT_FILES`, or the shards
`model-NNNNN-of-NNNNN.safetensors`), `config.json` and the weights (`model.safetensors` or the index) among
them. Anything else (a file, a link, a folder with one foreign file in it) is replaced only with
`overwrite=True` (the commands' `--force`); without it, `OutputExistsError` names the path and what is there.

Files and folders get the modes the umask gives (`0o666 & ~umask`, `0o777 & ~umask`), as a plain `open` would:
the temporary folder is created private (0700) and opened up just before the rename.

Beside the weights, `save_model` writes what other tools read from a model folder: the tokenizer it is given
(`tokenizer.model` or `tokenizer.json`, and a `tokenizer_config.json` that names its special tokens, so that
transformers' `AutoTokenizer` encodes as ours does) and `generation_config.json` (BOS / EOS ids for `generate`)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ModelConfig
from ..model import Transformer
from ..tokenizer import Tokenizer
from .layouts import HF_INDEX, HF_SINGLE, QUANT_FILE, QUANT_WEIGHTS, hf_tensors
from .reader import DTYPES

# Every name a folder written by save_model / save_quantized holds (`train` adds the tokenizer to its model/).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
OUTPUT_FILES = frozenset(
    {"config.json", HF_SINGLE, HF_INDEX, QUANT_FILE, QUANT_WEIGHTS, "generation_config.json", *TOKENIZER_FILES}
)
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class OutputExistsError(FileExistsError, ValueError):
    """The destination holds something that is not a previous output of ours; nothing was written."""


def save_model(
    model: Transformer,
    path: str | os.PathLike,
    *,
    tokenizer: Tokenizer | None = None,
    max_shard_bytes: int = 4 << 30,
    overwrite: bool = False,
) -> None:
    """Write the model in the Hugging Face layout (`config.json` + safetensors, sharded with an index
    above `max_shard_bytes`, `generation_config.json`, and `tokenizer`'s files when one is given), loadable by
    `transformers`' `MixtralForCausalLM.from_pretrained` and, with a tokenizer, `AutoTokenizer.from_pretrained`.

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
        write_tokenizer(tmp, tokenizer, model.config)


# Where the tensors of a file written by `write_safetensors` start: a multiple of this in the file (the data's
# start is, and each tensor whose size is a multiple of it is placed first), so that a view of the file's mapping
# is as aligned as memory from torch's allocator.
ALIGN = 64
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def write_safetensors(
    path: Path,
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """A safetensors file written tensor by tensor: `specs` gives each key's dtype and shape (the header comes
    first), `produce(key)` the tensor, asked for once and dropped after writing, so a file of any size is written
    with one tensor in memory (`safetensors.save_file` holds them all). Laid out for use in place: the data starts
    at a multiple of `ALIGN` and the tensors whose size is a multiple of it come first (safetensors allows no gaps
    between tensors). `path` is written as it is: call it inside `new_folder`."""

    def nbytes(key: str) -> int:
        dtype, shape = specs[key]
        return math.prod(shape) * dtype.itemsize

    order = sorted(specs, key=lambda k: (nbytes(k) % ALIGN != 0, k))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in order:
        dtype, shape = specs[key]
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {key!r}: safetensors has no name for {dtype}")
        end = offset + nbytes(key)
        header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)  # safetensors allows trailing spaces in the header
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for key in order:
            t = produce(key).detach().to("cpu").contiguous()
            if (t.dtype, tuple(t.shape)) != specs[key]:
                raise ValueError(f"tensor {key!r} is {t.dtype}{tuple(t.shape)}, the header says {specs[key]}")
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t
        f.flush()
        os.fsync(f.fileno())


def write_config(folder: Path, config: ModelConfig, dtype: torch.dtype, **extra: object) -> None:
    """`config.json` in the Hugging Face style, naming the weights' dtype (`extra` fields override)."""
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf_config.update(extra)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def write_tokenizer(folder: Path, tokenizer: Tokenizer | None, config: ModelConfig) -> None:
    """`generation_config.json` and, with a tokenizer, its file and a `tokenizer_config.json`: the Llama
    sentencepiece tokenizer transformers builds for Mixtral, BOS added and EOS not (as `Tokenizer.encode`)."""
    bos, eos = (tokenizer.bos_id, tokenizer.eos_id) if tokenizer is not None else (1, 2)
    generation = {"bos_token_id": bos, "eos_token_id": eos}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is None:
        return
    if tokenizer.is_tekken:  # mistral-common's file, as Mistral ships it (transformers has no tokenizer class for it)
        shutil.copyfile(tokenizer.source, folder / "tekken.json")
        return
    try:
        (folder / "tokenizer.model").write_bytes(tokenizer.sentencepiece_model())
    except ValueError:  # loaded from a tokenizer.json: that file, as it is
        shutil.copyfile(tokenizer.source, folder / "tokenizer.json")
    special = {name: tokenizer.id_to_piece(i) for name, i in (("bos_token", bos), ("eos_token", eos))}
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "unk_token": tokenizer.id_to_piece(0),
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,  # sentencepiece's own handling of the text after special tokens, as ours
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_seq_len,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only for a moment)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give `path` (a file, or a folder and what it holds) the modes a plain `open` / `mkdir` would: temporary
    files and folders are created private (0600 / 0700) whatever the umask."""
    mask = umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


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
    return "config.json" in names and bool(names & {HF_SINGLE, HF_INDEX, QUANT_WEIGHTS})


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
        apply_umask(tmp)
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
