"""KV caches: created after the model, for a given batch size and length, and passed to `model(...)`.

One class covers both kinds:
- full: one slot per position (position p in slot p), for models without a sliding window;
- rolling buffer: W slots for a sliding window W, position p in slot p mod W, so memory stays bounded
  however long the sequence grows.

Each slot remembers the position it holds (-1 when empty); attention masks are built from those
positions, so sequences of a batch may sit at different positions (prompts of different lengths).

Shape legend: B batch, G key/value heads, S slots, T new tokens, d head dim.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .kernels.ops import attention_mask


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if max_seq_len > config.max_seq_len:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's context of {config.max_seq_len} tokens")
        window = self.window = config.sliding_window
        self.rolling = window is not None and window < max_seq_len
        self.n_slots = window if self.rolling else max_seq_len
        shape = (batch_size, config.n_kv_heads, self.n_slots, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.slot_pos = torch.full((batch_size, self.n_slots), -1, dtype=torch.long, device=device)
        # Set by layer 0's update and reused by the others: every layer writes the same slots.
        self._step: tuple | None = None

    @property
    def batch_size(self) -> int:
        return self.slot_pos.shape[0]

    def reset(self, rows: list[int] | None = None) -> None:
        """Empty the whole cache, or only the given batch rows (their slots become free)."""
        if rows is None:
            self.slot_pos.fill_(-1)
        else:
            self.slot_pos[rows] = -1

    def rows(self, rows: list[int]) -> CacheRows:
        """A view of some batch rows, for a forward pass over only those sequences (e.g. a prefill)."""
        return CacheRows(self, torch.tensor(rows, dtype=torch.long, device=self.slot_pos.device))

    def update(
        self, layer: int, k_BGTd: torch.Tensor, v_BGTd: torch.Tensor, pos_BT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if pos_BT.shape[0] != self.batch_size:
            raise ValueError(f"batch of {pos_BT.shape[0]} sequences does not fit a cache made for {self.batch_size}")
        return self._update(layer, k_BGTd, v_BGTd, pos_BT, None)

    def decode_slot(self, layer: int, pos_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """For one token of a one-row cache at position >= 0 (decode at batch 1), what `update` would use, for a
        caller that writes and attends itself (the fused CPU decode kernel): this layer's key and value buffers
        [1, G, slots, d], the slot the token goes to, and the mask [1, 1, 1, S] over slots 0..S-1 once it is there."""
        _, _, slot, mask, _, _ = self._step_of(layer, pos_BT, None)
        return self.k[layer], self.v[layer], slot, mask

    def _step_of(self, layer: int, pos_BT: torch.Tensor, rows: torch.Tensor | None) -> tuple:
        """This step's plan: made by layer 0 and reused by the others (every layer writes the same slots)."""
        if layer == 0:
            self._step = self._plan(pos_BT, rows)
        return self._step

    def _plan(self, pos_BT: torch.Tensor, rows: torch.Tensor | None) -> tuple:
        """Which new tokens go to which slots, and which key positions the attention looks at."""
        T = pos_BT.shape[1]
        slot_pos = self.slot_pos if rows is None else self.slot_pos[rows]
        before = slot_pos.clone() if self.rolling and T > 1 else None
        single = pos_BT.numel() == 1 and pos_BT.device.type == "cpu"  # reading the position costs nothing here
        pos = int(pos_BT) if single else -1
        if pos >= 0:
            b = t = None
            if not self.rolling and pos >= self.n_slots:
                raise ValueError(f"position {pos} does not fit a cache of {self.n_slots} positions")
            slots = pos % self.n_slots
            slot_pos[0, slots] = pos_BT[0, 0]
        else:
            # A chunk longer than the buffer writes some slots twice: only the last n_slots positions of a
            # row are kept (and padding, position < 0, is never written).
            keep = (pos_BT >= 0) & (pos_BT > pos_BT.max(dim=1, keepdim=True).values - self.n_slots)
            b, t = torch.where(keep)
            slots = pos_BT[b, t] % self.n_slots
            slot_pos[b, slots] = pos_BT[b, t]
        if rows is not None:
            self.slot_pos[rows] = slot_pos
        # Writing first and attending over the cache is right unless a write evicts a position that a
        # query of this same chunk still needs: in a rolling buffer that happens once T > 1. Then the
        # chunk attends over [old slots, new tokens] and the writes happen afterwards.
        concat = self.rolling and T > 1
        if concat:
            n_used = self.n_slots
            kpos = torch.cat((before, pos_BT), dim=1)
        else:
            # Attend over the slots up to the last one in use (a full cache is mostly empty early on).
            n_used = self.n_slots if self.rolling else max(int(slot_pos.max()) + 1, 1)
            kpos = slot_pos[:, :n_used]
        return b, t, slots, attention_mask(pos_BT, kpos, self.window), concat, n_used

    def _update(  # data-dependent slots and lengths: kept eager by generate.compile_model
        self,
        layer: int,
        k_BGTd: torch.Tensor,
        v_BGTd: torch.Tensor,
        pos_BT: torch.Tensor,
        rows: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, slots, mask, concat, n_used = self._step_of(layer, pos_BT, rows)
        ck, cv = self.k[layer], self.v[layer]
        if rows is not None:
            ck, cv = ck[rows], cv[rows]  # copies: written back below
        if concat:
            keys, values = torch.cat((ck, k_BGTd), dim=2), torch.cat((cv, v_BGTd), dim=2)
        if isinstance(slots, int):  # one token of one sequence (decode at batch 1): a plain copy
            ck[:, :, slots] = k_BGTd[:, :, 0]
            cv[:, :, slots] = v_BGTd[:, :, 0]
        else:
            ck[b, :, slots] = k_BGTd[b, :, t]
            cv[b, :, slots] = v_BGTd[b, :, t]
        if rows is not None:
            self.k[layer][rows], self.v[layer][rows] = ck, cv
        if not concat:
            keys, values = ck[:, :, :n_used], cv[:, :, :n_used]
        return keys, values, mask


class CacheRows:
    """Some rows of a KVCache, seen as a cache of their own (what `KVCache.rows` returns)."""

    def __init__(self, cache: KVCache, rows: torch.Tensor) -> None:
        self.cache, self.index = cache, rows

    def update(
        self, layer: int, k_BGTd: torch.Tensor, v_BGTd: torch.Tensor, pos_BT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if pos_BT.shape[0] != len(self.index):
            raise ValueError(f"batch of {pos_BT.shape[0]} sequences does not match {len(self.index)} cache rows")
        return self.cache._update(layer, k_BGTd, v_BGTd, pos_BT, self.index)
