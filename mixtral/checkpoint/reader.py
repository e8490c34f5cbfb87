"""The one reader of stored tensors: every weight file, whatever its format, is read as a sequence of
(key, `StoredTensor`), each with its shape and dtype (one table, `DTYPES`) and readers for any slice of it
or for all of it into fresh memory. Plain, quantized and per-rank loading all read through here.

A format is one function `Path -> Iterator[(key, StoredTensor)]` in `FORMATS`, chosen by the file's suffix:
safetensors, PyTorch `.pth` and llama.cpp's GGUF (parsed by the `gguf` package, llama.cpp's own reader). A GGUF
tensor in a block format (Q4_0, Q8_0, Q4_K ...) has the type's name as its dtype and reads as its raw blocks
(`checkpoint/gguf.py` turns those into our weights).

Reads are memory-mapped: a slice touches only its own pages. The mapping of a safetensors file is reopened
once `_REMAP_BYTES` have been read through it, between tensors and within one read in parts, so that the pages
already copied out stop counting against the process (a view still held keeps its own) and the peak memory of
loading stays close to the size of the loaded model, not twice it.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np
import torch
from safetensors import SafetensorError, safe_open

# 16 MiB: peak RSS while loading the 791M benchmark model 1.75 GiB (64 MiB: 1.80; 1.70 once loaded, imports
# included), no slower. A tensor read whole holds its pages until it is dropped; one read in parts (quantizing
# while loading: rows at a time) holds one part's.
_REMAP_BYTES = 16 << 20

# safetensors' names for the dtypes we can hold; a stored dtype missing here stays a string on `StoredTensor`.
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and the key."""


@dataclass(eq=False)
class StoredTensor:
    """One tensor in a weight file, not yet read: its shape and dtype, and readers for any slice of it.

    Valid while its file is being iterated (the mapping it reads from is closed afterwards)."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype | str  # a string for a stored dtype torch has no type for (e.g. a GGUF block format)
    _slice: Callable[[tuple[slice, ...]], torch.Tensor]  # a view of the mapping; only its pages are touched
    _read_into: Callable[[torch.Tensor], object]  # fill a tensor of `shape` and `dtype` with all of it
    bytes_read: int = 0
    stored_bytes: int | None = None  # its size in the file, where the dtype does not tell (block formats)

    @property
    def nbytes(self) -> int:
        if self.stored_bytes is not None:
            return self.stored_bytes
        itemsize = self.dtype.itemsize if isinstance(self.dtype, torch.dtype) else 1
        return math.prod(self.shape) * itemsize

    def read(self, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """The part `index` (one slice per leading dim; `()` for all of it), memory-mapped, not copied."""
        t = self._slice(index)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read_aligned(self) -> torch.Tensor:
        """All of it, read from the file straight into freshly allocated memory: torch's allocator aligns to 64
        bytes, and the int8/int4 CPU kernels crash on weights that are not aligned (a mapped tensor sits at
        the file's byte offset). One read per tensor and no mapping: the peak memory stays at the weights'
        size."""
        if not isinstance(self.dtype, torch.dtype):
            raise CheckpointError(f"{self.file}: tensor {self.key!r} has dtype {self.dtype}, which torch cannot hold")
        out = torch.empty(self.shape, dtype=self.dtype)
        self._read_into(out)
        self.bytes_read += self.nbytes
        return out


def stored_tensors(path: Path) -> Iterator[tuple[str, StoredTensor]]:
    """(key, stored tensor) for every tensor in the weight file `path`, in the file's order."""
    return FORMATS.get(path.suffix, _safetensors)(path)


# ---- safetensors ------------------------------------------------------------------------------------------


def _safetensors(path: Path) -> Iterator[tuple[str, StoredTensor]]:
    try:
        with safe_open(path, framework="pt") as f:  # validates the header against the file's size
            keys = list(f.keys())
        header, data_start = _safetensors_header(path)
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    mapping = _Mapping(path)
    with open(path, "rb") as raw:  # for read_aligned: plain reads, no mapping
        for key in keys:
            info = header[key]
            start, end = info["data_offsets"]
            yield (
                key,
                StoredTensor(
                    path,
                    key,
                    tuple(info["shape"]),
                    DTYPES.get(info["dtype"], info["dtype"]),
                    partial(mapping.slice, key),
                    partial(_read_at, raw, path, key, data_start + start, end - start),
                ),
            )


class _Mapping:
    """A safetensors file opened for slicing, reopened before a slice once `_REMAP_BYTES` have been read
    through the current mapping: the old one is unmapped when the last view of it is dropped."""

    def __init__(self, path: Path) -> None:
        self.path, self._f, self._mapped = path, None, 0

    def slice(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        try:
            if self._f is None or self._mapped >= _REMAP_BYTES:
                self._f, self._mapped = None, 0
                self._f = safe_open(self.path, framework="pt")
            t = self._f.get_slice(key)[index]
        except SafetensorError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r}: {e}") from None
        self._mapped += t.numel() * t.element_size()
        return t


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header (key -> dtype, shape, data_offsets) and where the data starts."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_at(raw: BinaryIO, path: Path, key: str, offset: int, nbytes: int, out: torch.Tensor) -> None:
    if out.numel() * out.element_size() != nbytes:
        raise CheckpointError(f"{path}: tensor {key!r} holds {nbytes} bytes, not what its shape and dtype need")
    raw.seek(offset)
    if nbytes and raw.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != nbytes:
        raise CheckpointError(f"{path}: tensor {key!r} is truncated")


# ---- PyTorch .pth ------------------------------------------------------------------------------------------


def _pth(path: Path) -> Iterator[tuple[str, StoredTensor]]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for a bad zip/pickle; all mean the same to a user
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a dict of tensors")
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        yield (
            key,
            StoredTensor(path, key, tuple(tensor.shape), tensor.dtype, tensor.__getitem__, partial(_copy, tensor)),
        )


def _copy(src: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(src)


# ---- GGUF (llama.cpp) ------------------------------------------------------------------------------------

# GGUF's plain types; every other type is a block format, read as its raw bytes.
GGUF_DTYPES = {
    gguf.GGMLQuantizationType.F32: torch.float32,
    gguf.GGMLQuantizationType.F16: torch.float16,
    gguf.GGMLQuantizationType.BF16: torch.bfloat16,
}


def open_gguf(path: Path) -> gguf.GGUFReader:
    """The `gguf` package's reader of `path` (memory-mapped, copy-on-write so that torch can wrap its arrays
    without copying; nothing is written); a clear error for a file it cannot parse.

    The reader parses the header in Python, element by element: seconds for a 32000-token vocabulary. The last
    file's reader is kept, so that finding a checkpoint and loading it parse it once; `release_gguf` drops it
    (and its mapping, whose pages would otherwise count in the process's memory) once the weights are loaded."""
    st = path.stat()
    return _open_gguf(path.resolve(), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1)
def _open_gguf(path: Path, mtime_ns: int, size: int) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path, "c")
    except Exception as e:  # the reader raises ValueError, IndexError, UnicodeDecodeError ... for a bad file
        what = f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt?): {what}") from None


def release_gguf() -> None:
    """Drop the kept reader of `open_gguf`."""
    _open_gguf.cache_clear()


def _gguf(path: Path) -> Iterator[tuple[str, StoredTensor]]:
    """Each tensor with its shape in torch's order (GGUF lists dims innermost first). A block format reads as its
    raw blocks, uint8 [..., rows, bytes per row]; a slice of it may cut any dim but the last."""
    reader = open_gguf(path)
    mapping = getattr(reader.data, "_mmap", None)  # numpy's memmap keeps the mmap object here
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        dtype = GGUF_DTYPES.get(t.tensor_type, t.tensor_type.name)
        data = torch.from_numpy(np.asarray(t.data))  # a view of the mapping
        if dtype == torch.bfloat16:  # the reader hands BF16 out as bytes
            data = data.view(torch.bfloat16)
        yield (
            t.name,
            StoredTensor(
                path,
                t.name,
                shape,
                dtype,
                partial(_gguf_slice, data, path, t.name, None if isinstance(dtype, torch.dtype) else shape[-1]),
                partial(_copy, data),
                stored_bytes=int(t.n_bytes),
            ),
        )
        if mapping is not None:  # its pages read: out of this process's memory (they are refetched if needed)
            _drop_pages(mapping, int(t.data_offset), int(t.n_bytes))


def _drop_pages(mapping: mmap.mmap, offset: int, nbytes: int) -> None:
    """madvise(DONTNEED) the whole pages of [offset, offset + nbytes) of a read-only (copy-on-write, never
    written) file mapping: they stop counting in the process's resident memory, and a later read of them is
    served again from the file. What `_REMAP_BYTES` does for safetensors: peak memory = the loaded model's."""
    start = offset // mmap.PAGESIZE * mmap.PAGESIZE
    end = (offset + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start and hasattr(mapping, "madvise"):
        mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


def _gguf_slice(
    data: torch.Tensor, path: Path, key: str, columns: int | None, index: tuple[slice, ...]
) -> torch.Tensor:
    """`columns`: the logical number of columns of a block format (None for a plain type)."""
    if columns is not None and len(index) >= data.dim():
        if index[data.dim() - 1].indices(columns) != (0, columns, 1):
            raise CheckpointError(f"{path}: tensor {key!r} is in a block format; its columns cannot be sliced")
        index = (*index[: data.dim() - 1], slice(None), *index[data.dim() :])
    return data[index]


FORMATS: dict[str, Callable[[Path], Iterator[tuple[str, StoredTensor]]]] = {
    ".safetensors": _safetensors,
    ".pth": _pth,
    ".gguf": _gguf,
}
