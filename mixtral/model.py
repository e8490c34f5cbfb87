"""The Mixtral network for one device: RMSNorm, rotary embeddings, grouped-query attention with an optional
sliding window, sparse MoE feed-forward blocks, final norm and LM head.

The model knows nothing about devices, parallelism or cache allocation: a KV cache (see `cache.py`) is
created by the caller and passed to `forward`.

Shape legend: B batch, T query tokens, S key tokens, H query heads, G key/value heads, d head dim,
D model dim, V vocab.
"""

from __future__ import annotations

import weakref
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache as KVCacheImpl
from .cache import attention_mask
from .config import ModelConfig
from .kernels import cpu as cpu_kernels
from .moe import MOE_IMPLS, MoE
from .quantize import QuantizedWeight, gemv_cat, kernel_tensors, linear, project


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
        # Normalise in float32 (bf16 sums of squares lose too much), cast back, then scale: the same
        # order of roundings as the reference implementations.
        if x.dtype == self.weight.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled():
            ops = cpu_kernels.ops()  # the same roundings in one call (the ops below are ~10 small kernels)
            if ops is not None and x.is_contiguous():
                return ops.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The rotary frequencies [d/2], float32: the angle of pair i at position p is p * inv_freq[i]."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def rope_cos_sin(
    pos_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, T, d] for the rotate-half layout, angles computed in float32."""
    angles = pos_BT.float()[..., None] * rope_inv_freq(head_dim, theta, pos_BT.device)  # [B, T, d/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x_BHTd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of each head by the position's angles ("rotate-half" layout, the one
    Hugging Face checkpoints use; consolidated checkpoints are permuted into it when loaded)."""
    half = x_BHTd.shape[-1] // 2
    rotated = torch.cat((-x_BHTd[..., half:], x_BHTd[..., :half]), dim=-1)
    return x_BHTd * cos_BTd[:, None] + rotated * sin_BTd[:, None]


def attend(q_BHTd: torch.Tensor, k_BGSd: torch.Tensor, v_BGSd: torch.Tensor, mask_B1TS: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), masked) v, query head h reading key/value head h // (H / G).

    bf16 on a CPU without gradients goes to our kernel (`decode_attention`, the same sums in float32) for one
    new token per sequence (decode): PyTorch's CPU flash attention pays ~250 us per call for a single query row
    (its blocking is made for long queries), about 10% of a decode step of the 791M benchmark model. A short
    prompt of one sequence (T * S <= ROW_ATTENTION_MAX) goes there too, each query row as a sequence of its own
    over the same keys (views, no copies): 0.08 / 0.5 / 1.8 / 7.7 ms against flash attention's 0.10 / 0.82 / 2.7 /
    9.6 at T = S = 32 / 128 / 256 / 512 (16 query heads, 4 key/value heads of 64)."""
    B, _, T, d = q_BHTd.shape
    if q_BHTd.device.type == "cpu" and q_BHTd.dtype == torch.bfloat16 and d % 32 == 0 and not torch.is_grad_enabled():
        ops = cpu_kernels.ops()
        scale = d**-0.5
        if ops is not None and T == 1:
            return ops.decode_attention(q_BHTd.contiguous(), k_BGSd, v_BGSd, mask_B1TS.contiguous(), scale)
        if ops is not None and B == 1 and T * k_BGSd.shape[2] <= ROW_ATTENTION_MAX:
            q_T = q_BHTd[0].transpose(0, 1).unsqueeze(2).contiguous()  # [T, H, 1, d]: query rows as a batch
            k, v = k_BGSd.expand(T, -1, -1, -1), v_BGSd.expand(T, -1, -1, -1)
            out_TH1d = ops.decode_attention(q_T, k, v, mask_B1TS[0, 0, :, None, None, :].contiguous(), scale)
            return out_TH1d.squeeze(2).transpose(0, 1).unsqueeze(0)  # [1, H, T, d] (a view)
    gqa = q_BHTd.shape[1] != k_BGSd.shape[1]
    return F.scaled_dot_product_attention(q_BHTd, k_BGSd, v_BGSd, attn_mask=mask_B1TS, enable_gqa=gqa)


# Query rows x key positions up to which a one-sequence prompt's attention runs row by row in our kernel (above,
# flash attention's blocking wins in time; measured up to 512 x 512).
ROW_ATTENTION_MAX = 512 * 512


def _int4_dims(block: nn.Module) -> tuple[int, ...]:
    """Rows and columns of a block's matrices (int4 kernels take multiples of 64)."""
    a = block.attn
    return (a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, block.moe.w1.shape[1], block.moe.w1.shape[2])


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
        qkv = self._qkv_one_row(x_BTD) if B * T == 1 and rows is None else None
        if qkv is not None:  # one token: q, k and v from one kernel call, rotary embedding applied once
            qk = apply_rope(qkv[: (H + G) * d].view(1, H + G, 1, d), *rope)
            q, k, v = qk[:, :H], qk[:, H:], qkv[(H + G) * d :].view(1, G, 1, d)
        else:
            k = apply_rope(project(self.wk, x_BTD).view(B, T, G, d).transpose(1, 2), *rope)
            v = project(self.wv, x_BTD).view(B, T, G, d).transpose(1, 2)
            q = None
            if rows is None:
                q = apply_rope(project(self.wq, x_BTD).view(B, T, H, d).transpose(1, 2), *rope)
        if cache is None:
            mask = attention_mask(pos_BT, pos_BT, self.window)
        else:
            k, v, mask = cache.update(self.layer, k, v, pos_BT)
        if rows is not None:
            return self._chosen_rows(x_BTD, rope, k, v, mask, rows)
        out = attend(q, k, v, mask)
        return project(self.wo, out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

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
        q = project(self.wq, x_BTD[b, t][None]).view(N, 1, H, d).transpose(1, 2)  # [N, H, 1, d]
        q = apply_rope(q, *(r[b, t][:, None] for r in rope))
        if B == 1:  # every chosen token reads row 0's keys: a view, not N copies
            k, v = k_BGSd.expand(N, -1, -1, -1), v_BGSd.expand(N, -1, -1, -1)
        else:
            k, v = k_BGSd.index_select(0, b), v_BGSd.index_select(0, b)
        out = attend(q, k, v, mask_B1TS[b, :, t][:, :, None])  # mask [B, 1, T, S] -> [N, 1, 1, S]
        return project(self.wo, out.transpose(1, 2).reshape(1, N, H * d))

    def _qkv_one_row(self, x_BTD: torch.Tensor) -> torch.Tensor | None:
        """[q; k; v] of a single token from one CPU kernel call, or None (then one projection each)."""
        weights = [kernel_tensors(m) for m in (self.wq, self.wk, self.wv)]
        if any(w is None or len(w) != 1 for w in weights):  # bf16 nn.Linear without hooks only
            return None
        return gemv_cat([w[0] for w in weights], x_BTD)


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
        if rows is None and _fusable(x, pos_BT, cache):
            fused = self._decode_fused(x, pos_BT, rope, cache)
            if fused is not None:
                return fused
        return self.ops(x, pos_BT, rope, cache, rows)

    def ops(
        self,
        x: torch.Tensor,
        pos_BT: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block op by op (what `generate.compile_model` compiles): attention and MoE with residuals."""
        attn_out = self.attn(self.attn_norm(x), pos_BT, rope, cache, rows)
        h = x + attn_out if rows is None else x[rows[:, 0], rows[:, 1]][None] + attn_out
        moe_out, router_logits = self.moe(self.ffn_norm(h))
        return h + moe_out, router_logits

    def _decode_fused(
        self, x: torch.Tensor, pos_BT: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCacheImpl
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The whole block for one token in one call to the CPU kernel `decode_layer` (the same roundings as the
        code above, which stays the reference: `tests/test_cpu_kernels.py` compares the two), or None where it
        cannot run: not bf16 on a CPU, gradients on, the kernels unavailable, or modules it does not know
        (tensor/expert parallelism's hooks, the reference MoE path, router jitter in training); Block.forward
        checked the rest (`_fusable`)."""
        ops = cpu_kernels.ops()
        args = self._fused_args() if ops is not None else None
        if args is None:
            return None
        k_buf, v_buf, slot, mask = cache.decode_slot(self.attn.layer, pos_BT)
        norms, attn, moe, group = args
        cos, sin = (t.reshape(-1) for t in rope)
        out, router_logits = ops.decode_layer(
            x.contiguous(), *norms, *attn, cos, sin, k_buf, v_buf, slot, mask.contiguous(), *moe, group
        )
        return out, router_logits

    def _fused_args(self) -> tuple | None:
        """`decode_layer`'s arguments for this block, or None where it cannot run. Derived once and cached (it
        walks ~40 module attributes, ~50 us a layer per token); the cache is dropped when any module, parameter
        or buffer is assigned (quantization, parallelism, LoRA, loading) or the block is converted (`.to()`),
        and checked at each use for what can change without that: forward hooks on the projections, the
        MoE's dispatch hook, path and training-time router jitter."""
        cached = _fused_cache.get(self)
        if cached is None:
            cached = _fused_cache[self] = (self._derive_fused_args(), (self.moe,), self._inner_modules())
        return _unless_changed(*cached)

    def _inner_modules(self) -> tuple[nn.Module, ...]:
        """The block's modules below it (norms, attention and its projections, MoE, router, quantized experts):
        the op-by-op code calls them, so their hooks run there; the fused kernels would skip them."""
        return tuple(self.modules())[1:]

    def _derive_fused_args(self) -> tuple | None:
        def tensors(m: nn.Module) -> list[torch.Tensor] | None:  # (a Linear's hooks are checked at each use)
            return kernel_tensors(m.weight) if type(m) is nn.Linear else kernel_tensors(m)

        moe = self.moe
        mats = [tensors(m) for m in (self.attn.wq, self.attn.wk, self.attn.wv, self.attn.wo)]
        experts = [kernel_tensors(w) for w in (moe.w1, moe.w2, moe.w3)]
        router = tensors(moe.gate)
        norms = (self.attn_norm.weight, self.ffn_norm.weight)
        if any(m is None for m in (*mats, *experts, router)) or len(router) != 1:
            return None
        if any(w.dtype != torch.bfloat16 or not w.is_contiguous() for w in norms):
            return None
        groups = {
            m.group_size
            for m in (self.attn.wq, self.attn.wk, self.attn.wv, self.attn.wo, moe.w1, moe.w2, moe.w3)
            if isinstance(m, QuantizedWeight) and m.mode == "int4"
        }
        if len(groups) > 1 or self.attn.head_dim % 32 or (groups and any(n % 64 for n in _int4_dims(self))):
            return None
        return (
            (*norms, self.attn_norm.eps),
            mats,
            (router[0], *experts, moe.top_k),
            groups.pop() if groups else 0,
        )

    def _apply(self, fn, recurse=True):  # .to(), .half(), .cuda(), ...: tensors may change in place
        _fused_cache.clear()  # (the model's `decode_token` arguments hold this block's tensors too)
        return super()._apply(fn, recurse)


# Each block's cached `decode_layer` arguments and the model's `decode_token` ones, with what to check at each use
# (outside the modules, so copies and pickles of a model never carry them). A module, parameter or buffer assigned
# anywhere drops them all (PyTorch's global registration hooks): a stale entry never outlives a change nor holds
# replaced weights alive.
_fused_cache: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def _unless_changed(args: tuple | None, moes: tuple[MoE, ...], watched: tuple[nn.Module, ...]) -> tuple | None:
    """Cached fused-kernel arguments, or None where what can change without a registration forbids them now: a
    forward hook on a watched module (the modules the op-by-op code calls), an MoE's dispatch hook, its reference
    path or training-time router jitter."""
    if args is None or any(m._forward_hooks or m._forward_pre_hooks for m in watched):
        return None
    for moe in moes:
        if moe.dispatch_hook is not None or moe.impl == "reference" or (moe.training and moe.router_jitter > 0):
            return None
    return args


def _fusable(x: torch.Tensor, pos_BT: torch.Tensor, cache: KVCache | None) -> bool:
    """Whether a step may take the fused CPU decode kernels: one bf16 token at a position >= 0, on a CPU, with
    our KV cache, gradients off (the blocks' modules are checked by `Block._fused_args`)."""
    one = x.device.type == "cpu" and x.shape[0] * x.shape[1] == 1 and type(cache) is KVCacheImpl
    return one and x.dtype == torch.bfloat16 and not torch.is_grad_enabled() and int(pos_BT) >= 0


def _stack_fused_args(per_layer: list[tuple]) -> tuple | None:
    """The blocks' `decode_layer` arguments as `decode_layers` takes them (lists over the layers), or None where
    the layers differ in what one call must share (norm eps, experts per token, int4 group size)."""
    # each block's: ((attn_norm, ffn_norm, eps), [wq, wk, wv, wo], (router, w1, w2, w3, top_k), group)
    shared = {(eps, moe[4], group) for (_, _, eps), _, moe, group in per_layer}
    if len(shared) != 1:
        return None
    (eps, top_k, group), *_ = shared
    norms = [w for (attn_norm, ffn_norm, _), *_ in per_layer for w in (attn_norm, ffn_norm)]
    attn = [[t for _, mats, *_ in per_layer for t in mats[i]] for i in range(4)]  # wq, wk, wv, wo
    router = [moe[0] for _, _, moe, _ in per_layer]
    experts = [[t for _, _, moe, _ in per_layer for t in moe[i]] for i in (1, 2, 3)]  # w1, w2, w3
    return norms, eps, attn, (router, *experts, top_k), group


def _global_hooks() -> bool:
    """Whether forward hooks registered for every module are set (the fused step would skip them)."""
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


def _drop_fused_caches(module: nn.Module, name: str, value: object) -> None:
    _fused_cache.clear()


nn.modules.module.register_module_module_registration_hook(_drop_fused_caches)
nn.modules.module.register_module_parameter_registration_hook(_drop_fused_caches)
nn.modules.module.register_module_buffer_registration_hook(_drop_fused_caches)


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
        """Choose the expert dispatch path: 'grouped' (fast) or 'reference' (plain loop)."""
        if impl not in MOE_IMPLS:
            raise ValueError(f"unknown MoE implementation {impl!r}; choose one of {MOE_IMPLS}")
        for layer in self.layers:
            layer.moe.impl = impl

    def _decode_fused(
        self, tokens_BT: torch.Tensor, positions: torch.Tensor | None, cache: KVCache | None
    ) -> torch.Tensor | None:
        """One token of one sequence (decode at batch 1) in one call to the CPU kernel `decode_token`: embedding,
        every layer (each block's `decode_layer`, one after another), final norm and LM head, without coming back
        to Python in between; or None where it cannot run (then each block decides for itself): not one bf16
        token on a CPU at a position >= 0 with our cache, gradients on, or a module whose hooks or code it would
        skip. -> logits [1, 1, V] (and the router logits, if kept)."""
        if type(cache) is not KVCacheImpl or cache.batch_size != 1 or tokens_BT.device.type != "cpu":
            return None
        pos = 0 if positions is None else int(positions)
        if pos < 0 or torch.is_grad_enabled() or _global_hooks() or cache.k[0].dtype != torch.bfloat16:
            return None
        ops = cpu_kernels.ops()
        cached = _fused_cache.get(self)
        if cached is None:
            cached = _fused_cache[self] = self._derive_token_args()
        args = _unless_changed(*cached) if ops is not None else None
        if args is None:
            return None
        embed, inv_freq, norms, eps, attn, moe, group, head, head_group = args
        logits, router_LBE = ops.decode_token(
            int(tokens_BT), pos, embed, inv_freq, cache.slot_pos, cache.window or 0, cache.rolling, norms, eps,
            *attn, cache.k, cache.v, *moe, group, head, head_group,
        )  # fmt: skip
        if self.keep_router_logits:
            self.router_logits = list(router_LBE.unbind(0))
        return logits

    def _derive_token_args(self) -> tuple:
        """-> (`decode_token`'s arguments but the step's own, or None where it cannot run; the MoEs and the modules
        whose hooks it would skip: see `_unless_changed`)."""
        blocks, embed, norm, output = list(self.layers), self.embed, self.norm, self.output
        ends = (embed, norm) if output is None else (embed, norm, output)
        if any(type(b) is not Block for b in blocks):
            return None, (), ()
        watched = (*ends, *blocks, *(m for b in blocks for m in b._inner_modules()))
        moes = tuple(b.moe for b in blocks)
        per_layer = [b._derive_fused_args() for b in blocks]
        stacked = None if any(a is None for a in per_layer) else _stack_fused_args(per_layer)
        head = kernel_tensors(embed.weight if output is None else output)
        plain = type(embed) is nn.Embedding and embed.max_norm is None and type(norm) is RMSNorm
        weights = (embed.weight, norm.weight)
        bf16 = all(w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous() for w in weights)
        if stacked is None or head is None or not plain or not bf16 or norm.eps != stacked[1]:
            return None, moes, watched
        head_group = output.group_size if isinstance(output, QuantizedWeight) and output.mode == "int4" else 0
        layer_norms, eps, attn, moe, group = stacked
        inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta)
        args = embed.weight, inv_freq, [*layer_norms, norm.weight], eps, attn, moe, group, head, head_group
        return args, moes, watched

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
        if B * T == 1 and logits_at is None:
            logits = self._decode_fused(tokens_BT, positions, cache)
            if logits is not None:
                return logits
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
            return linear(x, self.embed.weight)
        return project(self.output, x)
