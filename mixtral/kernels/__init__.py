"""Kernels and the one place that chooses between them and plain PyTorch (`ops.py`):
- `ops`: every operation the model runs, with its plain PyTorch reference and the thresholds that pick a kernel;
- `weights`: the stored forms of quantized weights the kernels read;
- `cpu`: the AVX512-BF16 CPU kernels (`cpu_decode.cpp`), built once per installed copy;
- `cpu_step`: the fused one-token decode step, a plan that generation asks for;
- `fused_moe`: the fused MoE Triton kernel for GPUs (Triton is optional and imported only when it runs).
"""
