"""Weight-only quantization, a transform applied to a built model (or to the skeleton a quantized checkpoint
fills), as LoRA and parallelism are: `quantize_model` puts quantized weights (`kernels/weights.py`: int8 with a
scale per output channel, int4 with a (scale, zero) pair per group) where the plain ones were, and the kernels
that read them are chosen by `kernels/ops.py`.

What is quantized: the attention projections (wq, wk, wv, wo), the stacked experts (w1, w2, w3) and the
LM head (int8 in every mode: int4 there costs quality for little speed). The router, norms and embedding stay
in the model's dtype: the router decides which experts run (a flipped top-k is a large error), the norms are
tiny, and one embedding row is read per token.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import ops
from .kernels.weights import GROUP_SIZES, INT4_BLOCK, QUANT_MODES, QuantizedWeight


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
        if w.is_meta:  # a skeleton to load into: the buffers' shapes, nothing quantized
            qw = cls.empty(w.shape, this_mode, group_size if this_mode == "int4" else 0, w.dtype)
        else:
            qw = cls.from_float(w.detach(), this_mode, group_size)
        _set(owner, attr, qw)
    model.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None}
    model.version += 1
    return model


def place_quantized(
    model: nn.Module, name: str, mode: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype, group_size: int = 0
) -> None:
    """Put a weight that is already in a quantized form (read from a file: a GGUF file's blocks) in the place of
    the parameter `name` ("layers.0.attn.wq.weight", "layers.0.moe.w1", "output.weight"), with its scales in
    `dtype`. The caller sets `model.quantization` once all are placed."""
    for owner, attr, target in _targets(model):
        if name in (target, target + ".weight"):
            cls = QuantizedWeight if attr in ("w1", "w2", "w3") else QuantizedLinear
            _set(owner, attr, cls(mode, tensors, group_size, dtype))
            model.version += 1
            return
    raise ValueError(f"{name} is not a weight that is quantized")


def is_quantizable(name: str) -> bool:
    """Whether the parameter `name` is one that `quantize_model` quantizes."""
    suffixes = ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "attn.wo.weight", "moe.w1", "moe.w2", "moe.w3")
    return name == "output.weight" or name.endswith(suffixes)


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
