"""A quick check of the CUDA path on a lent GPU (the test suite runs on CPUs only): a small random model's
logits on the GPU against the CPU in float32, token-by-token decoding against a full forward pass on the
GPU (full attention and a sliding window), and the Triton MoE kernel against the plain path in bf16.

    python benchmarks/cuda_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixtral
from mixtral.cache import KVCache
from mixtral.generate import decode_step, prefill


def decode_vs_forward(model: mixtral.Transformer, tokens: torch.Tensor) -> float:
    """Max |logit diff| between decoding token by token (after an 8-token prefill) and one forward pass."""
    full = model(tokens)[0].float()
    cache = KVCache(model.config, 1, tokens.shape[1], dtype=torch.float32, device=tokens.device)
    steps = [prefill(model, cache, [tokens[0, :8].tolist()])]
    for i in range(8, tokens.shape[1] - 1):
        steps.append(decode_step(model, cache, tokens[:, i], torch.tensor([i], device=tokens.device)))
    return (torch.cat(steps) - full[7:-1]).abs().max().item()


@torch.no_grad()
def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    failures = []
    for preset in ("tiny", "tiny-swa"):
        torch.manual_seed(0)
        config = mixtral.get_preset(preset).replace(vocab_size=512)
        cpu = mixtral.Transformer(config).eval()
        gpu = mixtral.Transformer(config).to("cuda").eval()
        gpu.load_state_dict(cpu.state_dict())
        tokens = torch.randint(0, 512, (1, 40))
        diff = (cpu(tokens) - gpu(tokens.cuda()).cpu()).abs().max().item()
        dec = decode_vs_forward(gpu, tokens.cuda())
        print(f"{preset}: CPU vs CUDA fp32 logits max diff {diff:.2e}; CUDA decode vs forward {dec:.2e}")
        failures += [f"{preset} cpu/cuda {diff}"] if diff > 1e-4 else []
        failures += [f"{preset} decode {dec}"] if dec > 1e-4 else []
        gpu_bf16 = gpu.to(torch.bfloat16)
        plain = gpu_bf16(tokens.cuda()).float()
        gpu_bf16.set_moe_impl("triton")
        fused = gpu_bf16(tokens.cuda()).float()
        rel = ((fused - plain).abs().max() / plain.abs().max()).item()
        print(f"{preset}: bf16 Triton MoE vs plain path, max relative logit diff {rel:.2e}")
        failures += [f"{preset} triton {rel}"] if rel > 5e-2 else []
    print("FAILED: " + "; ".join(failures) if failures else "all CUDA checks passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
