"""Loading a plain (floating-point) checkpoint, whole or one process's shard of it.

The model is built on the meta device, each stored tensor is streamed out of the memory-mapped file straight
into its (cast) destination, and the result is assigned strictly: every parameter must be covered exactly
once, and every tensor in the files must have a place.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from ..model import Transformer
from .gguf import load_gguf
from .layouts import (
    HF_INDEX,
    Checkpoint,
    Target,
    expert_pieces,
    find_checkpoint,
    interleaved_to_half,
    is_expert_param,
    target_of,
)
from .quantized import is_quantized_checkpoint, load_quantized
from .reader import CheckpointError, StoredTensor, stored_tensors

PROGRESS_MIN_BYTES = 512 << 20

# The part of a full parameter (name, full shape) that this process holds, as one slice per dim.
Shard = Callable[[str, torch.Size], tuple[slice, ...]]


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> Transformer:
    """Load a checkpoint in any supported layout. `dtype` defaults to the stored weights' dtype, `device`
    to the CPU. `progress=None` shows a progress bar for checkpoints over 512 MiB.

    A quantized checkpoint (written by `save_quantized`) loads as the quantized model; its dtype is the one
    it was quantized in. A GGUF file loads as `load_gguf` says (quantized where its weights are)."""
    if is_quantized_checkpoint(path):
        model = load_quantized(path, device)
        if dtype is not None and dtype != model.embed.weight.dtype:
            raise CheckpointError(
                f"{path} is quantized with {model.embed.weight.dtype} activations; it cannot be loaded as {dtype}"
            )
        return model
    ckpt = find_checkpoint(path)
    if ckpt.layout == "gguf":
        return load_gguf(ckpt, dtype=dtype, device=device, progress=progress)
    model = Transformer.skeleton(ckpt.config)
    expected = {name: p.shape for name, p in model.named_parameters()}
    load_weights(model, ckpt, expected, dtype=dtype or stored_dtype(ckpt), device=device, progress=progress)
    return model.eval()


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
    checked). Returns the bytes read."""
    device = torch.device(device or "cpu")
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
    if t.expert is not None and t.expert >= full_shape[0]:
        raise CheckpointError(f"{file}: tensor {key!r} names expert {t.expert}, but the config has {full_shape[0]}")
    pieces = {t.expert} if t.expert is not None else expert_pieces(t.param, full_shape)
    if pieces & filled[t.param]:
        raise CheckpointError(f"{file}: tensor {key!r} fills {t.param} a second time (duplicate key)")
    filled[t.param] |= pieces
