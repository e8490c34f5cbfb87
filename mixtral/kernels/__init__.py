"""Kernels beside the plain PyTorch paths of `mixtral/moe.py` and `mixtral/quantize.py`, each with that path as its
reference and its fallback:
- `fused_moe`: the fused MoE Triton kernel for GPUs (Triton is optional and imported only when a kernel runs);
- `cpu`: AVX512-BF16 batch-1 decode kernels for CPUs (`cpu_decode.cpp`, built on first use).

The names of `fused_moe` are loaded on first access, so that importing `kernels.cpu` does not import the model."""

from typing import Any

__all__ = ["align_by_expert", "fused_experts", "triton_unavailable_reason"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import fused_moe

        return getattr(fused_moe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
