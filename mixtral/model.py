"""The Mixtral network for one device: RMSNorm, rotary embeddings, grouped-query attention with an optional
sliding window, sparse MoE feed-forward blocks, final norm and LM head.

The model knows nothing about devices, parallelism or cache allocation: a KV cache (see `cache.py`) is
created by the caller and passed to `forward`. Every operation goes through `kernels.ops`, which picks its
implementation; the fused one-token decode step (`kernels/cpu_step.py`) is asked for by generation, not here.

Shape legend: B batch, T query tokens, S key tokens, H query heads, G key/value heads, d head dim,
D model dim, V vocab.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .config import ModelConfig
from .kernels import ops
from .kernels.ops import apply_rope, rope_cos_sin
from .moe import MOE_IMPLS, MoE


class KVCache(Protocol):
    """What attention needs from a cache (implemented in `cache.py`)."""

    def update(
        self, layer: int, k_BGTd: torch.Tensor, v_BGTd: torch.Tensor, pos_BT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the new keys/values; return (keys, values, mask): what to attend over and which of those
        keys each query sees (`cache.attention_mask`)."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.window = config.sliding_window
        self.rope_theta = config.rope_theta
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    def forward(
        self,
        x_BTD: torch.Tensor,
        pos_BT: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, T, D] -> [B, T, D]; with `rows` (long [N, 2] of (row, index) pairs, `Transformer.forward`'s
        `logits_at`) every token's keys and values still go to the cache, but only those N tokens' outputs are
        computed: [1, N, D]."""
        B, T, _ = x_BTD.shape
        H, G, d = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = ops.qkv_one_row(self.wq, self.wk, self.wv, x_BTD) if B * T == 1 and rows is None else None
        if qkv is not None:  # one token: q, k and v from one kernel call, rotary embedding applied once
            qk = apply_rope(qkv[: (H + G) * d].view(1, H + G, 1, d), *rope)
            q, k, v = qk[:, :H], qk[:, H:], qkv[(H + G) * d :].view(1, G, 1, d)
        else:
            k = apply_rope(ops.project(self.wk, x_BTD).view(B, T, G, d).transpose(1, 2), *rope)
            v = ops.project(self.wv, x_BTD).view(B, T, G, d).transpose(1, 2)
            q = None
            if rows is None:
                q = apply_rope(ops.project(self.wq, x_BTD).view(B, T, H, d).transpose(1, 2), *rope)
        if cache is None:
            mask = ops.attention_mask(pos_BT, pos_BT, self.window)
        else:
            k, v, mask = cache.update(self.layer, k, v, pos_BT)
        if rows is not None:
            return self._chosen_rows(x_BTD, rope, k, v, mask, rows)
        out = ops.attention(q, k, v, mask)
        return ops.project(self.wo, out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _chosen_rows(
        self,
        x_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        k_BGSd: torch.Tensor,
        v_BGSd: torch.Tensor,
        mask_B1TS: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """`forward`'s end with `rows`, given every token's keys, values and mask: queries and outputs of the chosen
        tokens alone, each attending as a batch row of its own (one query: the CPU decode attention kernel)."""
        B, N, H, d = x_BTD.shape[0], rows.shape[0], self.n_heads, self.head_dim
        if N == 0:
            return x_BTD.new_empty((1, 0, x_BTD.shape[-1]))
        b, t = rows[:, 0], rows[:, 1]
        q = ops.project(self.wq, x_BTD[b, t][None]).view(N, 1, H, d).transpose(1, 2)  # [N, H, 1, d]
        q = apply_rope(q, *(r[b, t][:, None] for r in rope))
        if B == 1:  # every chosen token reads row 0's keys: a view, not N copies
            k, v = k_BGSd.expand(N, -1, -1, -1), v_BGSd.expand(N, -1, -1, -1)
        else:
            k, v = k_BGSd.index_select(0, b), v_BGSd.index_select(0, b)
        out = ops.attention(q, k, v, mask_B1TS[b, :, t][:, :, None])  # mask [B, 1, T, S] -> [N, 1, 1, S]
        return ops.project(self.wo, out.transpose(1, 2).reshape(1, N, H * d))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.moe = MoE(config)

    def forward(
        self,
        x: torch.Tensor,
        pos_BT: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (x [B, T, D], router logits [B * T, E]); with `rows` (see `Attention.forward`) the chosen tokens'
        alone: ([1, N, D], [N, E])."""
        attn_out = self.attn(self.attn_norm(x), pos_BT, rope, cache, rows)
        h = x + attn_out if rows is None else x[rows[:, 0], rows[:, 1]][None] + attn_out
        moe_out, router_logits = self.moe(self.ffn_norm(h))
        return h + moe_out, router_logits


class Transformer(nn.Module):
    """Mixtral: tokens -> embedding -> N x [attention + sparse MoE] -> RMSNorm -> LM head -> logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        # Router logits of the last forward, per layer ([B*T, E] each), kept only when asked for
        # (load-balancing loss, routing analysis).
        self.keep_router_logits = False
        self.router_logits: list[torch.Tensor] = []
        # Whether generation may replay decode steps from CUDA graphs on a GPU (`generate.decode_step`); False: eager.
        self.cuda_graphs = True
        # Bumped by whatever changes the model's tensors or modules after it is built (quantization, LoRA, loading,
        # `.to()`): what was derived from them before (the fused decode step's arguments) is derived again.
        self.version = 0
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @classmethod
    def skeleton(cls, config: ModelConfig) -> Transformer:
        """The network on the meta device (shapes, no memory) for a loader to fill, built without running
        torch's default initialisers: on meta tensors those go through reference kernels that import the
        compiler stack (dynamo, sympy), ~150 MB of resident memory for nothing."""
        init = torch.nn.init
        saved = {name: getattr(init, name) for name in ("normal_", "uniform_", "kaiming_uniform_")}
        try:
            for name in saved:
                setattr(init, name, lambda tensor, *args, **kwargs: tensor)
            with torch.device("meta"):
                return cls(config)
        finally:
            for name, fn in saved.items():
                setattr(init, name, fn)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random initialisation for training from scratch: N(0, std) matrices, unit norms."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)

    def set_moe_impl(self, impl: str) -> None:
        """Choose the expert dispatch path (`moe.py`): 'grouped' (CPUs), 'triton' (GPUs), 'dense' (fixed shapes) or
        'reference' (plain loop)."""
        if impl not in MOE_IMPLS:
            raise ValueError(f"unknown MoE implementation {impl!r}; choose one of {MOE_IMPLS}")
        for layer in self.layers:
            layer.moe.impl = impl

    def _apply(self, fn, recurse=True):  # .to(), .float(), .cuda(), ...: tensors may change in place
        self.version += 1
        return super()._apply(fn, recurse)

    def forward(
        self,
        tokens_BT: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for token ids [B, T].

        `positions` ([B, T] or [T], default 0..T-1) are the tokens' positions in their sequences;
        a negative position marks a padding token. With a `cache`, keys and values of earlier calls
        are attended to and the new ones stored. With `logits_at` (long [N, 2] of (row, index) pairs), only
        those tokens' logits are computed, [N, V]: a prefill needs the last prompt token's alone, and the
        LM head over a whole prompt is ~13% of a 128-token prefill of the 791M benchmark model.
        """
        if tokens_BT.dim() != 2:
            raise ValueError(f"tokens must have shape [batch, seq], got {tuple(tokens_BT.shape)}")
        B, T = tokens_BT.shape
        self.router_logits = []
        if positions is None:
            positions = torch.arange(T, device=tokens_BT.device)
        pos_BT = positions.expand(B, T) if positions.dim() == 1 else positions
        x = self.embed(tokens_BT)
        rope = rope_cos_sin(pos_BT.clamp(min=0), self.config.head_dim, self.config.rope_theta, x.dtype)
        # Past the last layer only the `logits_at` tokens are used: that layer computes their outputs alone
        # (every token's keys and values still go to the cache), ~1/L of a prefill's expert work saved.
        # Not when router logits are kept: those are wanted for every token.
        rows = logits_at if logits_at is not None and not self.keep_router_logits else None
        for i, layer in enumerate(self.layers):
            last = rows if i == len(self.layers) - 1 else None
            x, router_logits = layer(x, pos_BT, rope, cache, last)
            if self.keep_router_logits:
                self.router_logits.append(router_logits)
        if rows is not None:
            logits_at, x = None, x[0]  # [N, D]: already the chosen tokens
        if logits_at is not None:
            if logits_at.shape[0] == 0:
                return x.new_empty((0, self.config.vocab_size))
            x = x[logits_at[:, 0], logits_at[:, 1]]
        x = self.norm(x)
        if self.output is None:
            return ops.linear(x, self.embed.weight)
        return ops.project(self.output, x)
