"""GPU kernels. Each has a plain PyTorch path beside it (in `mixtral/moe.py`) that is its reference and its
fallback; Triton is optional and imported only when a kernel runs."""

from .fused_moe import align_by_expert, fused_experts, triton_unavailable_reason

__all__ = ["align_by_expert", "fused_experts", "triton_unavailable_reason"]
