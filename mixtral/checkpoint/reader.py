"""The one reader of stored tensors: every weight file, whatever its format, is read as a sequence of
(key, `StoredTensor`), each with its shape and dtype (one table, `DTYPES`) and readers for any slice of it
or for all of it into fresh memory. Plain, quantized and per-rank loading all read through here.

A format is one function `Path -> Iterator[(key, StoredTensor)]` in `FORMATS`, chosen by the file's suffix:
safetensors, PyTorch `.pth` and llama.cpp's GGUF (parsed by the `gguf` package, llama.cpp's own reader). A GGUF
tensor in a block format (Q4_0, Q8_0, Q4_K ...) has the type's name as its dtype and reads as its raw blocks
(`checkpoint/gguf.py` turns those into our weights).

Reads are memory-mapped: a slice touches only its own pages. `StoredTensor.map()` gives the whole tensor as a view
of one mapping of its file kept for as long as a view lives: a model can use its weights in place (a quantized
checkpoint does), so that the OS keeps the pages in use in RAM and reads the others from the file when touched.
For slices, the mapping of a safetensors file is reopened once `_REMAP_BYTES` have been read through it,
between tensors and within one read in parts, so that the pages already copied out stop counting against the
process (a view still held keeps its own) and the peak memory of loading stays close to the size of the loaded
model, not twice it.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np
import torch

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
    _map: Callable[[], torch.Tensor] | None = None  # all of it as a view of a mapping that the view keeps alive
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

    def map(self) -> torch.Tensor:
        """All of it, as a view of the file's mapping (copy-on-write: writing to it never changes the file; not
        reserved against the RAM, so a file larger than the RAM maps), for using in place: its pages are read
        from the file when first touched and are the OS's to evict."""
        if self._map is None:
            raise CheckpointError(f"{self.file}: tensor {self.key!r} cannot be mapped in place ({self.file.suffix})")
        t = self._map()
        self.bytes_read += self.nbytes
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
    header, data_start = _safetensors_header(path)
    mapping, whole = _Mapping(path, header, data_start), _FileMap(path)
    with open(path, "rb") as raw:  # for read_aligned: plain reads, no mapping
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            dtype, shape = DTYPES.get(info["dtype"], info["dtype"]), tuple(info["shape"])
            yield (
                key,
                StoredTensor(
                    path,
                    key,
                    shape,
                    dtype,
                    partial(mapping.slice, key),
                    partial(_read_at, raw, path, key, data_start + start, end - start),
                    partial(whole.view, key, data_start + start, end - start, dtype, shape),
                ),
            )


# Linux's MAP_NORESERVE (Python < 3.13 does not name it): a private mapping not counted against the RAM + swap
# the kernel's overcommit heuristic allows, so that a file larger than the RAM can be mapped copy-on-write.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)


def _map_file(path: Path) -> mmap.mmap:
    """The whole file mapped copy-on-write (writing to a view never changes the file) and unreserved, so its size
    may exceed the RAM: pages are read when touched and are the OS's to evict. Where the system refuses that
    (strict overcommit accounting), a read-only mapping, which is never reserved."""
    with open(path, "rb") as f:
        try:
            return mmap.mmap(
                f.fileno(), 0, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class _FileMap:
    """One mapping of a whole file (`_map_file`), made on first use; a view keeps it alive."""

    def __init__(self, path: Path) -> None:
        self.path, self._m = path, None

    def view(
        self, key: str, offset: int, nbytes: int, dtype: torch.dtype | str, shape: tuple[int, ...]
    ) -> torch.Tensor:
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{self.path}: tensor {key!r} has dtype {dtype}, which torch cannot hold")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        try:
            if self._m is None:
                self._m = _map_file(self.path)
            with warnings.catch_warnings():  # a read-only mapping: torch warns that the buffer is not writable
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.frombuffer(self._m, dtype=torch.uint8, count=nbytes, offset=offset)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: cannot map tensor {key!r}: {e}") from None
        return flat.view(dtype).reshape(shape)


class _Mapping:
    """A safetensors file mapped for slicing, remapped before a slice once `_REMAP_BYTES` have been read through
    the current mapping: the old one is unmapped when the last view of it is dropped."""

    def __init__(self, path: Path, header: dict[str, Any], data_start: int) -> None:
        self.path, self.header, self.data_start = path, header, data_start
        self._f, self._mapped = _FileMap(path), 0

    def slice(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        if self._mapped >= _REMAP_BYTES:
            self._f, self._mapped = _FileMap(self.path), 0
        info = self.header[key]
        start, end = info["data_offsets"]
        dtype = DTYPES.get(info["dtype"], info["dtype"])
        t = self._f.view(key, self.data_start + start, end - start, dtype, tuple(info["shape"]))[index]
        self._mapped += t.numel() * t.element_size()
        return t


_MAX_HEADER = 100 << 20  # bytes of JSON header at most (safetensors' own limit)


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header (key -> dtype, shape, data_offsets) and where the data starts, checked against the file: a
    header within the file and of bounded size, every tensor's offsets within the data and its byte count what
    its shape and dtype need. A damaged file is a `CheckpointError` naming it, before anything is allocated."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {why}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(f.read(8), "little")
            if n > min(size - 8, _MAX_HEADER):
                raise bad(f"header length {n} beyond the file's {size} bytes (or over {_MAX_HEADER})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
            ok = ok and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_size
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise bad(f"tensor {key!r} has no valid dtype, shape and data_offsets within the data ({info!r:.200})")
        if dtype in DTYPES and math.prod(shape) * DTYPES[dtype].itemsize != end - start:
            raise bad(f"tensor {key!r} is {dtype}{shape} but holds {end - start} bytes")
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
