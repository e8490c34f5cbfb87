"""Weight-only quantization, a transform applied to a built model (or to the skeleton a quantized checkpoint
fills), as LoRA and parallelism are: `quantize_model` puts quantized weights (`kernels/weights.py`: int8 with a
scale per output channel, int4 with a (scale, zero) pair per group) where the plain ones were, and the kernels
that read them are chosen by `kernels/ops.py`.

What is quantized: the attention projections (wq, wk, wv, wo), the stacked experts (w1, w2, w3) and the
LM head (int8 in both modes: int4 there costs quality for little speed). The router, norms and embedding stay
in the model's dtype: the router decides which experts run (a flipped top-k is a large error), the norms are
tiny, and one embedding row is read per token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .kernels import ops
from .kernels.weights import GROUP_SIZES, INT4_BLOCK, QUANT_MODES, QuantizedWeight, block_major, int4_blocks

QUANT_FILE = "quantization.json"


class QuantizedLinear(QuantizedWeight):
    """A quantized weight in a projection's place (attention, LM head): calling it is `F.linear(x, w)` through
    `kernels.ops`, so that hooks registered on it (tensor parallelism's all-reduce) run as on an nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self)


# ---- applying it to a model -----------------------------------------------------------------------------


def _check_int4_shape(name: str, shape: torch.Size, group_size: int) -> None:
    N, K = shape[-2], shape[-1]
    if N % INT4_BLOCK or K % group_size:
        raise ValueError(
            f"{name} has shape {tuple(shape)}: int4 needs output rows divisible by {INT4_BLOCK} and input "
            f"size divisible by the group size {group_size}"
        )


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(owner module, attribute, full name) of every weight that gets quantized."""
    out = []
    for i, layer in enumerate(model.layers):
        for proj in ("wq", "wk", "wv", "wo"):
            out.append((layer.attn, proj, f"layers.{i}.attn.{proj}"))
        for w in ("w1", "w2", "w3"):
            out.append((layer.moe, w, f"layers.{i}.moe.{w}"))
    if model.output is not None:
        out.append((model, "output", "output"))
    return out


def _weight_of(owner: nn.Module, attr: str) -> torch.Tensor:
    obj = getattr(owner, attr)
    return obj.weight if isinstance(obj, nn.Linear) else obj


def _set(owner: nn.Module, attr: str, qw: QuantizedWeight) -> None:
    if attr in owner._parameters:
        del owner._parameters[attr]
    setattr(owner, attr, qw)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = 64) -> nn.Module:
    """Quantize the model's attention projections and experts in place (`mode` int8 or int4) and its LM
    head (int8). Works on a meta-device model too (building the structure a quantized checkpoint fills).
    Returns the model."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {QUANT_MODES}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size} is not supported; choose one of {GROUP_SIZES}")
    if any(layer.moe.dispatch_hook is not None for layer in model.layers):
        raise ValueError("quantize the model before applying expert/tensor parallelism, not after")
    for owner, attr, name in _targets(model):
        w = _weight_of(owner, attr)
        if isinstance(w, QuantizedWeight):
            raise ValueError(f"{name} is already quantized")
        this_mode = "int8" if attr == "output" else mode
        cls = QuantizedWeight if attr in ("w1", "w2", "w3") else QuantizedLinear  # experts are not called
        if this_mode == "int4":
            _check_int4_shape(name, w.shape, group_size)
        if w.is_meta:  # a skeleton to load into: quantize zeros of the right shape on the CPU, then move
            qw = cls.from_float(torch.zeros(w.shape[-2:], dtype=w.dtype), this_mode, group_size)
            tensors = {
                n: torch.empty((*w.shape[:-2], *b.shape), dtype=b.dtype, device="meta") for n, b in qw.named_buffers()
            }
            qw = cls(this_mode, tensors, qw.group_size, qw.scale_dtype)
        else:
            qw = cls.from_float(w.detach(), this_mode, group_size)
        _set(owner, attr, qw)
    model.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None}
    model.version += 1
    return model


def quantization_of(model: nn.Module) -> dict | None:
    """{"mode", "group_size"} of a quantized model, None for a plain one."""
    return getattr(model, "quantization", None)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (quantized or not)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def active_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights read to decode one token: everything but the embedding (one row of it is read) and
    the experts not chosen (top_k of n_experts per layer)."""
    cfg = model.config
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        nbytes = t.numel() * t.element_size()
        if name.startswith("embed."):
            nbytes = nbytes // cfg.vocab_size
        elif ".moe.w" in name:
            nbytes = nbytes * cfg.top_k // cfg.n_experts
        total += nbytes
    return total


# ---- quantized checkpoints ------------------------------------------------------------------------------


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a quantized model: `config.json` (Hugging Face style), `quantization.json` and
    `model.safetensors` holding our own state dict (q / scale buffers for int8, blocks for int4)."""
    from safetensors.torch import save_file

    from .checkpoint import _replace_dir

    q = quantization_of(model)
    if q is None:
        raise ValueError("the model is not quantized: use save_model for plain checkpoints")
    import tempfile

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt", "quantization": q["mode"]})
        dtype = model.embed.weight.dtype
        hf = model.config.to_hf()
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        desc = {**q, "dtype": str(dtype).removeprefix("torch.")}  # the activations' (and scales') dtype
        (tmp / QUANT_FILE).write_text(json.dumps(desc, indent=2) + "\n")
        _replace_dir(tmp, path)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / QUANT_FILE).is_file()


_ST_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file straight into freshly allocated tensors, one `readinto` each.

    Not `safetensors.torch.load_file`: its tensors sit at the file's byte offsets, and the int8/int4 CPU
    kernels crash on weights that are not 64-byte aligned (a copy to fix that would double the peak
    memory). torch's allocator aligns, and reading in place keeps the peak at the weights' size."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        out = {}
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
            f.seek(8 + n + start)
            if end > start and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != end - start:
                raise OSError(f"{path}: truncated tensor {key}")
            out[key] = t
    return out


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


def load_quantized(path: str | os.PathLike, device: torch.device | str | None = None) -> nn.Module:
    """Read a checkpoint written by `save_quantized`: built on the meta device, filled from the memory-mapped
    file (assign, strict: a missing or extra tensor is an error)."""
    from .checkpoint import CheckpointError, _read_config
    from .model import Transformer

    root = Path(path).expanduser()
    try:
        q = json.loads((root / QUANT_FILE).read_text())
        mode, group_size = q["mode"], q.get("group_size") or 64
        dtype = getattr(torch, q["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype {q['dtype']!r}")
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{root / QUANT_FILE}: not a readable quantization description ({e})") from None
    config = _read_config(root / "config.json")
    model = Transformer.skeleton(config).to(dtype)
    quantize_model(model, mode, group_size)
    state = _read_safetensors(root / "model.safetensors")
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
