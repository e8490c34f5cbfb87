"""The fused one-token decode step on a CPU: a plan that generation asks for.

Decode at batch 1 on a CPU with our kernels can run a whole step in one kernel call (`decode_token` in
`cpu_decode.cpp`): the embedding row, rotary angles, cache slot and mask, every layer (`decode_layer` for each),
the final norm and the LM head, without coming back to Python in between. It computes what the model's own code
computes op by op through `ops`, with the same roundings (the tests compare the two bit for bit); the model's
code stays the reference and the path wherever the plan cannot run.

`plan(model, ...)` derives the kernel's arguments once (it walks ~40 module attributes a layer) and keeps them
with the model's `version`: the transforms that change a built model's tensors (quantization, LoRA, loading,
`.to()`) bump it, and the next `plan` derives them again. What can change without a new version is checked at
each step (`Step.usable`): forward hooks on any module the step covers (it would skip them), an MoE's dispatch
hook or reference path, and training-time router jitter.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from . import cpu
from .ops import global_hooks, int4_group, kernel_tensors, rope_inv_freq


class Step:
    """`decode_token`'s arguments for one model, and what to check before each use."""

    def __init__(self, args: tuple | None, moes: tuple[nn.Module, ...], watched: tuple[nn.Module, ...]) -> None:
        self.args, self.moes, self.watched = args, moes, watched

    def usable(self) -> bool:
        """Whether the step may run now: derived arguments, no forward hooks on the modules it covers (nor any
        registered for every module), no MoE whose dispatch is replaced, on its reference path or jittering."""
        if self.args is None or global_hooks():
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in self.watched):
            return False
        return not any(
            moe.dispatch_hook is not None or moe.impl == "reference" or (moe.training and moe.router_jitter > 0)
            for moe in self.moes
        )

    def __call__(self, token: int, pos: int, cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [1, 1, V] and router logits [L, 1, E] of `token` at position `pos` >= 0, its keys and values
        written to `cache` (a one-row `KVCache` in bf16)."""
        embed, inv_freq, norms, eps, attn, moe, group, head, head_group = self.args
        return cpu.ops().decode_token(
            token, pos, embed, inv_freq, cache.slot_pos, cache.window or 0, cache.rolling, norms, eps,
            *attn, cache.k, cache.v, *moe, group, head, head_group,
        )  # fmt: skip


# Each model's step, with the version it was derived at (outside the modules, so copies and pickles of a model
# never carry it; weak, so it never keeps a model alive).
_steps: weakref.WeakKeyDictionary[nn.Module, tuple[int, Step]] = weakref.WeakKeyDictionary()


def plan(model: nn.Module, block_type: type, norm_type: type) -> Step | None:
    """The model's one-call decode step where it can run now, else None (then the model runs op by op). The
    model's blocks must be `block_type` and its final norm `norm_type` (a wrapped block, e.g. for activation
    checkpointing, runs code the step does not know)."""
    if cpu.ops() is None:
        return None
    version = getattr(model, "version", 0)
    cached = _steps.get(model)
    if cached is None or cached[0] != version:
        cached = _steps[model] = (version, _derive(model, block_type, norm_type))
    step = cached[1]
    return step if step.usable() else None


def _derive(model: nn.Module, block_type: type, norm_type: type) -> Step:
    blocks, embed, norm, output = list(model.layers), model.embed, model.norm, model.output
    ends = (embed, norm) if output is None else (embed, norm, output)
    if any(type(b) is not block_type for b in blocks):
        return Step(None, (), ())
    watched = (*ends, *(m for b in blocks for m in b.modules()))
    moes = tuple(b.moe for b in blocks)
    per_layer = [_layer_args(b) for b in blocks]
    stacked = None if any(a is None for a in per_layer) else _stack(per_layer)
    head = kernel_tensors(embed.weight) if output is None else _tensors(output)
    plain = type(embed) is nn.Embedding and embed.max_norm is None and type(norm) is norm_type
    weights = (embed.weight, norm.weight)
    bf16 = all(w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous() for w in weights)
    if stacked is None or head is None or not plain or not bf16 or norm.eps != stacked[1]:
        return Step(None, moes, watched)
    layer_norms, eps, attn, moe, group = stacked
    inv_freq = rope_inv_freq(model.config.head_dim, model.config.rope_theta)
    args = embed.weight, inv_freq, [*layer_norms, norm.weight], eps, attn, moe, group, head, int4_group(output)
    return Step(args, moes, watched)


def _layer_args(block: nn.Module) -> tuple | None:
    """`decode_layer`'s arguments for one block: ((attn_norm, ffn_norm, eps), [wq, wk, wv, wo], (router, w1, w2,
    w3, top_k), int4 group), or None where the kernel cannot run (a weight it does not read, mixed int4 group
    sizes, dims it does not take)."""
    attn, moe = block.attn, block.moe
    mats = [_tensors(m) for m in (attn.wq, attn.wk, attn.wv, attn.wo)]
    experts = [kernel_tensors(w) for w in (moe.w1, moe.w2, moe.w3)]
    router = _tensors(moe.gate)
    norms = (block.attn_norm.weight, block.ffn_norm.weight)
    if any(m is None for m in (*mats, *experts, router)) or len(router) != 1:
        return None
    if any(w.dtype != torch.bfloat16 or not w.is_contiguous() for w in norms):
        return None
    groups = {int4_group(m) for m in (attn.wq, attn.wk, attn.wv, attn.wo, moe.w1, moe.w2, moe.w3)} - {0}
    dims = (attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim, moe.w1.shape[1], moe.w1.shape[2])
    if len(groups) > 1 or attn.head_dim % 32 or (groups and any(n % 64 for n in dims)):  # int4: multiples of 64
        return None
    return (*norms, block.attn_norm.eps), mats, (router[0], *experts, moe.top_k), groups.pop() if groups else 0


def _tensors(m: nn.Module) -> list[torch.Tensor] | None:
    """A projection's tensors for the kernel; a Linear's hooks are not looked at here but at each use (`usable`)."""
    return kernel_tensors(m.weight) if type(m) is nn.Linear else kernel_tensors(m)


def _stack(per_layer: list[tuple]) -> tuple | None:
    """The blocks' arguments as `decode_token` takes them (lists over the layers), or None where the layers differ
    in what one call must share (norm eps, experts per token, int4 group size)."""
    shared = {(eps, moe[4], group) for (_, _, eps), _, moe, group in per_layer}
    if len(shared) != 1:
        return None
    (eps, top_k, group), *_ = shared
    norms = [w for (attn_norm, ffn_norm, _), *_ in per_layer for w in (attn_norm, ffn_norm)]
    attn = [[t for _, mats, *_ in per_layer for t in mats[i]] for i in range(4)]  # wq, wk, wv, wo
    router = [moe[0] for _, _, moe, _ in per_layer]
    experts = [[t for _, _, moe, _ in per_layer for t in moe[i]] for i in (1, 2, 3)]  # w1, w2, w3
    return norms, eps, attn, (router, *experts, top_k), group
