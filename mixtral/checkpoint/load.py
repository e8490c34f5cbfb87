"""Loading a plain (floating-point) checkpoint, whole or one process's shard of it, or quantizing it while loading.

The model is built on the meta device, each stored tensor is streamed out of the memory-mapped file straight
into its (cast) destination, and the result is assigned strictly: every parameter must be covered exactly
once, and every tensor in the files must have a place.

Quantizing while loading (`load_model(..., quantize=...)`): the skeleton is quantized first (`quantize_model` on
the meta device gives every quantized weight's buffers their shapes), and each stored weight is read a few rows
at a time, cast and quantized into its rows of those buffers (one expert at a time for stacked experts). The
int8 scales are per output row and the int4 ones per (row, group), so the numbers are exactly those of
quantizing the whole model after loading it, and the peak memory is the quantized model plus one part.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from ..kernels.weights import INT4_BLOCK, QuantizedWeight
from ..model import Transformer
from ..quantize import quantization_of, quantize_model
from ..tokenizer import Tokenizer, load_tokenizer
from .gguf import load_gguf
from .hub import resolve_checkpoint
from .layouts import (
    HF_INDEX,
    Checkpoint,
    Target,
    claim,
    expert_pieces,
    find_checkpoint,
    interleaved_to_half,
    is_expert_param,
    target_of,
)
from .quantized import is_quantized_checkpoint, load_quantized
from .reader import CheckpointError, StoredTensor, stored_tensors

PROGRESS_MIN_BYTES = 512 << 20

# Stored bytes read and quantized at a time (512 rows of 4096 in bf16). Quantizing a part makes float32 and int32
# temporaries a few times its size, which the allocator keeps in part: on one layer of the 8x7B shape, loading
# added 1.26x the int4 model's size with 16 MiB parts, 1.08x with 4 MiB, 1.05x with 1 MiB (and 40% slower).
QUANTIZE_PART_BYTES = 4 << 20

# The part of a full parameter (name, full shape) that this process holds, as one slice per dim.
Shard = Callable[[str, torch.Size], tuple[slice, ...]]


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    quantize: str | None = None,
    group_size: int = 64,
) -> Transformer:
    """Load a checkpoint in any supported layout. `dtype` defaults to the stored weights' dtype, `device`
    to the CPU. `progress=None` shows a progress bar for checkpoints over 512 MiB.

    With `quantize` ("int8" or "int4", `group_size` for int4), the weights are quantized while they are read,
    a few rows at a time, never the whole model in `dtype`: the result is the same, bit for bit, as
    `quantize_model(load_model(path, dtype=dtype), quantize, group_size)`.

    A quantized checkpoint (written by `save_quantized`) loads as the quantized model; its dtype is the one
    it was quantized in. A GGUF file loads as `load_gguf` says (quantized where its weights are).

    `path` may also be a Hugging Face model id, `"org/name"` or `"org/name@revision"` (a string naming no local
    file or folder): it is read from the Hugging Face cache or downloaded (`hub.resolve_checkpoint`)."""
    path = resolve_checkpoint(path)
    if is_quantized_checkpoint(path):
        model = load_quantized(path, device)
        if model.mapped["bytes"] > ram_available():
            print(f"mixtral: {memory_fit(model.mapped['bytes'], in_place=True)}", file=sys.stderr)
        if dtype is not None and dtype != model.embed.weight.dtype:
            raise CheckpointError(
                f"{path} is quantized with {model.embed.weight.dtype} activations; it cannot be loaded as {dtype}"
            )
        if quantize is not None:
            raise CheckpointError(
                f"{path} is already quantized ({quantization_of(model)['mode']}); load it without quantizing again"
            )
        return model
    ckpt = find_checkpoint(path)
    if ckpt.layout == "gguf":
        if quantize is not None:
            raise CheckpointError(
                f"{path} is a GGUF file: its weights load in their own formats; load it without quantize"
            )
        return load_gguf(ckpt, dtype=dtype, device=device, progress=progress)
    dtype = dtype or stored_dtype(ckpt)
    model = Transformer.skeleton(ckpt.config)
    expected = {name: p.shape for name, p in model.named_parameters()}
    if quantize is not None:
        quantize_model(model.to(dtype), quantize, group_size)  # checks the mode, group size and shapes first
    load_weights(model, ckpt, expected, dtype=dtype, device=device, progress=progress)
    return model.eval()


def ram_available() -> int:
    """Bytes of RAM the kernel says can be used without swapping (MemAvailable: free memory plus the page cache
    it can drop), or the total where /proc/meminfo is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_fit(weight_bytes: int, *, in_place: bool) -> str:
    """How `weight_bytes` of weights fit in the RAM available now, in one line. In place (a quantized checkpoint's
    weights are views of the file), what does not fit is read from the file when used, so the model still runs;
    read into memory (other formats), it must fit."""
    avail = ram_available()
    gb = f"{weight_bytes / 1e9:.2f} GB of weights"
    if weight_bytes <= avail:
        where = "used in place from the file" if in_place else "read into memory"
        return f"{gb}, {where}; fits in the {avail / 1e9:.2f} GB of RAM available"
    if in_place:
        return (
            f"{gb}, used in place from the file, more than the {avail / 1e9:.2f} GB of RAM available: about "
            f"{avail / weight_bytes:.0%} can stay in memory, the rest is read from the disk as it is used "
            "(each token's experts that are not resident cost a disk read)"
        )
    return (
        f"{gb}, read into memory, more than the {avail / 1e9:.2f} GB of RAM available: it will not load; "
        "a quantized checkpoint (`mixtral quantize --mode int4`) is used in place and runs larger than the RAM"
    )


def own_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer a checkpoint folder carries (its tokenizer.model or tokenizer.json), else None."""
    path = resolve_checkpoint(path)
    has = path.is_dir() and any((path / name).is_file() for name in ("tokenizer.model", "tokenizer.json"))
    return load_tokenizer(path) if has else None


def load_weights(
    model: torch.nn.Module,
    ckpt: Checkpoint,
    expected: dict[str, torch.Size],
    *,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    shard: Shard | None = None,
) -> int:
    """Fill `model` (on the meta device) from `ckpt` and assign, strictly. `expected` holds the full shape of
    every parameter; with `shard`, only this process's part of each is read (and every tensor is still
    checked). Where the model holds a (meta) quantized weight in a parameter's place, the parameter is
    quantized into it as it is read. Returns the bytes read."""
    device = torch.device(device or "cpu")
    quantized = quantized_places(model)
    if quantized and shard is not None:
        raise ValueError("quantizing while loading a shard is not supported")
    dests: dict[str, torch.Tensor] = {}
    # Which pieces of each parameter are filled: expert indices for stacked expert tensors, else {0}.
    filled: dict[str, set[int]] = {name: set() for name in expected}
    show = progress if progress is not None else ckpt.size_bytes >= PROGRESS_MIN_BYTES
    bar = tqdm(total=ckpt.size_bytes, unit="B", unit_scale=True, desc=f"loading {ckpt.path.name}", disable=not show)
    n_read = 0
    with bar:
        for file in ckpt.files:
            for key, stored in stored_tensors(file):
                for t in targets_of_stored(ckpt, file, key, expected):
                    if t.param in quantized:
                        _check(t, stored, expected[t.param], filled, ckpt)
                        n_read += quantize_into(t, stored, expected[t.param], *quantized[t.param], dests, dtype, device)
                    else:
                        n_read += place(t, stored, expected[t.param], dests, filled, dtype, device, ckpt, shard)
                bar.update(stored.nbytes)
    check_complete(ckpt, expected, filled)
    model.load_state_dict(dests, strict=True, assign=True)
    return n_read


def stored_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The floating dtype of the stored weights (the first floating tensor's)."""
    for _, stored in stored_tensors(ckpt.files[0]):
        if isinstance(stored.dtype, torch.dtype) and stored.dtype.is_floating_point:
            return stored.dtype
    raise CheckpointError(f"{ckpt.files[0]} holds no floating-point tensors")


def targets_of_stored(ckpt: Checkpoint, file: Path, key: str, expected: dict[str, torch.Size]) -> list[Target]:
    """Where a stored tensor goes; an error naming the file and key if it has no place or is in the wrong
    shard of an index."""
    if ckpt.index is not None and ckpt.index.get(key) != file.name:
        raise CheckpointError(f"{file}: tensor {key!r} is not listed for this shard in {ckpt.path / HF_INDEX}")
    config = ckpt.config
    targets = target_of(key, ckpt.layout, config)
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


def place(
    t: Target,
    stored: StoredTensor,
    full_shape: torch.Size,
    dests: dict[str, torch.Tensor],
    filled: dict[str, set[int]],
    dtype: torch.dtype,
    device: torch.device,
    ckpt: Checkpoint,
    shard: Shard | None = None,
) -> int:
    """Check one stored tensor against its target and copy its part `shard` (all of it without one) into
    `dests`, cast and on `device`; returns the bytes read (0 for another process's expert: checked, not
    read)."""
    _check(t, stored, full_shape, filled, ckpt)
    slices = list(shard(t.param, full_shape) if shard is not None else (slice(0, n) for n in full_shape))
    local_shape = tuple(s.stop - s.start for s in slices)
    dest_index: tuple[int, ...] = ()
    if t.expert is not None:
        own = slices.pop(0)
        if not own.start <= t.expert < own.stop:
            return 0
        dest_index = (t.expert - own.start,)
    if t.rows is not None:  # a gate/up half of a stacked tensor: shift dim -2 into the half
        s = slices[-2]
        slices[-2] = slice(t.rows[0] + s.start, t.rows[0] + s.stop)
    src = stored.read(tuple(slices))
    if t.rope_heads is not None:  # whole heads are read: permute those
        src = interleaved_to_half(src, t.rope_heads * src.shape[0] // full_shape[0])
    if t.param not in dests:
        dests[t.param] = torch.empty(local_shape, dtype=dtype, device=device)
    dests[t.param][dest_index].copy_(src)  # casts to the model's dtype and moves to its device in one step
    return src.numel() * src.element_size()


def quantized_places(model: torch.nn.Module) -> dict[str, tuple[str, QuantizedWeight]]:
    """parameter name -> (module name, quantized weight) for every quantized weight standing in a parameter's
    place: an expert stack is the parameter itself (`layers.0.moe.w1`), a projection its `.weight`."""
    return {
        (name if is_expert_param(name) else f"{name}.weight"): (name, module)
        for name, module in model.named_modules()
        if isinstance(module, QuantizedWeight)
    }


def quantize_into(
    t: Target,
    stored: StoredTensor,
    full_shape: torch.Size,
    qname: str,
    qw: QuantizedWeight,
    dests: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> int:
    """Quantize the (checked) stored tensor `t` names into the buffers of `qw` (module `qname`, on the meta
    device: its buffers are allocated in `dests` on first use), a few rows of one matrix at a time: each part
    is read from the mapping, put in the rotate-half RoPE order, cast to `dtype` and quantized exactly as
    `QuantizedWeight.from_float` quantizes the whole weight (its scales are per row and group of one row).
    Returns the bytes read."""
    buffers = dict(qw.named_buffers())
    for name, b in buffers.items():
        if f"{qname}.{name}" not in dests:
            dests[f"{qname}.{name}"] = torch.empty(b.shape, dtype=b.dtype, device=device)
    N, K = full_shape[-2], full_shape[-1]
    itemsize = stored.dtype.itemsize if isinstance(stored.dtype, torch.dtype) else dtype.itemsize
    # Rows per part: whole int4 blocks, whole heads where RoPE rows are permuted, ~QUANTIZE_PART_BYTES.
    step = math.lcm(INT4_BLOCK if qw.mode == "int4" else 1, N // t.rope_heads if t.rope_heads else 1)
    rows = max(step, QUANTIZE_PART_BYTES // (K * itemsize) // step * step)
    row0 = t.rows[0] if t.rows is not None else 0  # a gate/up half of a stacked tensor
    # One matrix of the destination per expert: the stored tensor's own (per-expert files) or each of a stack.
    experts = [None] if t.expert is not None or len(full_shape) == 2 else range(full_shape[0])
    n_read = 0
    for e in experts:
        dest_e = t.expert if t.expert is not None else e
        lead = () if e is None else (slice(e, e + 1),)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            w = stored.read((*lead, slice(row0 + r0, row0 + r1))).reshape(r1 - r0, K)
            n_read += w.numel() * w.element_size()
            if t.rope_heads is not None:
                w = interleaved_to_half(w, (r1 - r0) // (N // t.rope_heads))
            # on the destination's device: a GPU quantizes at its own speed, and the CPU holds one part at a time
            part = QuantizedWeight.from_float(w.to(device=device, dtype=dtype), qw.mode, qw.group_size)
            del w  # the mapped pages can go
            for name, b in part.named_buffers():
                dest = dests[f"{qname}.{name}"]
                dest = dest if dest_e is None else dest[dest_e]
                # dim 0 holds the rows: one each in q and scale, blocks of 64 in int4's blocks
                lo, hi = r0 * dest.shape[0] // N, r1 * dest.shape[0] // N
                assert dest[lo:hi].shape == b.shape, (qname, name, b.shape, dest.shape)  # copy_ would broadcast
                dest[lo:hi].copy_(b)
    return n_read


def _check(
    t: Target, stored: StoredTensor, full_shape: torch.Size, filled: dict[str, set[int]], ckpt: Checkpoint
) -> None:
    """The stored tensor's dtype and shape fit its target, which it fills for the first time."""
    file, key = stored.file, stored.key
    if not isinstance(stored.dtype, torch.dtype) or not stored.dtype.is_floating_point:
        raise CheckpointError(f"{file}: tensor {key!r} has dtype {stored.dtype}, expected floating point")
    shape = list(stored.shape)
    want = tuple(full_shape[1:]) if t.expert is not None else tuple(full_shape)
    rows_ok = t.rows is None or (len(shape) >= 2 and shape[-2] >= t.rows[1])
    if rows_ok and t.rows is not None:
        shape[-2] = t.rows[1] - t.rows[0]
    if not rows_ok or tuple(shape) != want:
        raise CheckpointError(
            f"{file}: tensor {key!r} has shape {tuple(stored.shape)}, but {ckpt.config_file.name} implies "
            f"{want if t.rows is None else 'rows ' + str(t.rows) + ' of ' + str(want)} "
            f"for {t.param}; the config does not match the weights"
        )
    claim(t, file, key, full_shape, filled, "config")
