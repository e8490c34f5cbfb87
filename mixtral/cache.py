"""KV caches: created after the model, for a given batch size and length, and passed to `model(...)`.

One class covers both kinds:
- full: one slot per position (position p in slot p), for models without a sliding window;
- rolling buffer: W slots for a sliding window W, position p in slot p mod W, so memory stays bounded
  however long the sequence grows.

Each slot remembers the position it holds (-1 when empty); attention masks are built from those
positions, so sequences of a batch may sit at different positions (prompts of different lengths).

`PagedKVCache` is the server's: blocks from one pool, a block table per sequence, prefix caching; each forward
pass runs on a `KVCache` gathered from its blocks.

Shape legend: B batch, G key/value heads, S slots, T new tokens, d head dim.
"""

from __future__ import annotations

import collections
import hashlib

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
        # Decode steps captured in CUDA graphs for this cache's tensors (generate.py), shared with its views.
        self.graphs: dict = {}

    @classmethod
    def of(
        cls, k: list[torch.Tensor], v: list[torch.Tensor], slot_pos: torch.Tensor, window: int | None, rolling: bool
    ) -> KVCache:
        """A cache over given tensors (keys and values [B, G, S, d] per layer, slot positions [B, S]): what
        `PagedKVCache.gather` hands to a forward pass."""
        cache = object.__new__(cls)
        cache.window, cache.rolling, cache.n_slots = window, rolling, slot_pos.shape[1]
        cache.k, cache.v, cache.slot_pos = k, v, slot_pos
        cache._step = None
        cache.graphs = {}
        return cache

    @property
    def batch_size(self) -> int:
        return self.slot_pos.shape[0]

    def reset(self, rows: list[int] | None = None) -> None:
        """Empty the whole cache, or only the given batch rows (their slots become free)."""
        if rows is None:
            self.slot_pos.fill_(-1)
        else:
            self.slot_pos[rows] = -1

    def view(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as a cache of their own that shares this one's memory (no copy): a forward pass over
        only those sequences reads and writes them here. A one-row view is what the fused decode step takes."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows {start}..{stop - 1} are not rows of a cache of {self.batch_size}")
        if (start, stop) == (0, self.batch_size):
            return self
        view = object.__new__(KVCache)
        view.window, view.rolling, view.n_slots = self.window, self.rolling, self.n_slots
        view.k = [k[start:stop] for k in self.k]
        view.v = [v[start:stop] for v in self.v]
        view.slot_pos = self.slot_pos[start:stop]
        view._step = None
        view.graphs = self.graphs
        return view

    def swap(self, a: int, b: int) -> None:
        """Exchange the contents of rows a and b (a scheduler keeping its live rows together). Only the slots in
        use are copied: slots fill from 0 up, and a slot past them is empty (-1) whatever its keys hold."""
        if a == b:
            return
        used = int((self.slot_pos[[a, b]] >= 0).sum(dim=1).max())
        self.slot_pos[[a, b]] = self.slot_pos[[b, a]]
        if used:
            for t in (*self.k, *self.v):
                t[[a, b], :, :used] = t[[b, a], :, :used]

    def fixed(self, span: int) -> FixedStep:
        """This cache for one decode step planned on the device alone (`FixedStep`): attention over slots
        0..span-1, a span the caller knows holds every live row's positions (`decode_span`)."""
        return FixedStep(self, span)

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


def decode_span(cache: KVCache, pos_B: torch.Tensor, smallest: int = 128) -> int:
    """How many slots a decode step at host-side positions `pos_B` (-1: an idle row) attends over, for
    `KVCache.fixed`: the slots up to the highest position, rounded up to a power of two (at least `smallest`,
    at most the cache's): a few sizes over a whole generation, so a few CUDA graphs. A live row at position p
    holds positions <= p in slots 0..p (full cache) or in all W slots once p >= W - 1 (rolling buffer); any
    slot past them holds nothing or a position the mask hides."""
    top = int(pos_B.max()) + 1  # (pos_B on the host: no synchronisation)
    if not cache.rolling and top > cache.n_slots:
        raise ValueError(f"position {top - 1} does not fit a cache of {cache.n_slots} positions")
    return min(cache.n_slots, max(smallest, 1 << max(top - 1, 0).bit_length()))


class FixedStep:
    """A KVCache for one decode step (one new token per row) planned without reading anything back to the host:
    fixed shapes and no synchronisation, so a step can run ahead of the host, be compiled whole and be captured in
    a CUDA graph. The same slots and masks as `KVCache.update` plans for one token, but every row writes its slot
    (an idle row, position < 0, writes back what its slot held) and the keys are the first `span` slots."""

    def __init__(self, cache: KVCache, span: int) -> None:
        if not 0 < span <= cache.n_slots:
            raise ValueError(f"span {span} is not within the cache's {cache.n_slots} slots")
        self.cache, self.span = cache, span
        self._plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def update(
        self, layer: int, k_BGTd: torch.Tensor, v_BGTd: torch.Tensor, pos_BT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = self.cache
        B, G, T, d = k_BGTd.shape
        if T != 1 or cache.batch_size != B:
            raise ValueError(f"a fixed step takes one token per row of all {cache.batch_size} rows, got [{B}, {T}]")
        if layer == 0:  # planned once, reused by every layer: they write the same slots
            slot_B1 = pos_BT % cache.n_slots  # (an idle row's slot is written back unchanged)
            live_B1 = pos_BT >= 0
            old = cache.slot_pos.gather(1, slot_B1)
            cache.slot_pos.scatter_(1, slot_B1, torch.where(live_B1, pos_BT, old))
            mask = attention_mask(pos_BT, cache.slot_pos[:, : self.span], cache.window)
            self._plan = slot_B1, live_B1, mask
        slot_B1, live_B1, mask = self._plan
        index = slot_B1[:, None, :, None].expand(B, G, 1, d)
        live = live_B1[:, None, :, None]
        for buf, new in ((cache.k[layer], k_BGTd), (cache.v[layer], v_BGTd)):
            buf.scatter_(2, index, torch.where(live, new, buf.gather(2, index)))
        return cache.k[layer][:, :, : self.span], cache.v[layer][:, :, : self.span], mask


class PagedKVCache:
    """Keys and values in blocks of `block_size` positions, taken from one pool as a sequence's tokens arrive and
    given back when it ends: the memory in use follows the tokens in flight, not rows x context. Full blocks of
    prompt tokens are shared between sequences with the same prefix (prefix caching).

    The scheduler's sequences sit in rows (as in a `KVCache`); a row's block table lists its blocks in position
    order (block i holds positions i*BS .. i*BS + BS - 1). Block 0 is never handed out: it stays empty (zeros,
    positions -1) and stands in a table for a block a sliding-window row has dropped, and pads tables in a gather.

    A forward pass runs on `gather(rows, ...)`: a contiguous `KVCache` of those rows' blocks (a copy) laid out as a
    plain cache is (full attention: slot p holds position p, so attention sees exactly what it sees in a `KVCache`;
    sliding window: a ring of N blocks, block b at place b mod N, so position p's slot is p mod N*BS, as in a
    rolling buffer of N*BS slots), and `scatter` copies the positions it wrote back to their blocks. Every existing
    step runs on it unchanged (the fused CPU step at batch 1 included); the price is the copy of the rows' keys and
    values per forward pass. A pass over the same rows that goes on where the last one ended, within the blocks
    already gathered (decode: 15 steps of 16 with blocks of 16), reuses the last view, which that pass has already
    written; any change of rows (admit, release, swap) or of a row's blocks gathers again.

    Prefix caching: the full blocks of a prompt are keyed by a chained hash (SHA-256 of the previous block's key and
    this block's token ids, and a salt for whatever else changes keys and values), registered once written, and
    reference counted. `prefix` gives a new sequence the blocks of the longest cached start of its prompt (at most
    up to its last token, whose logits it needs) and promises the rest of its full blocks; a later sequence whose
    next block is promised by another waits until that one has written it, so a prefix shared by concurrent
    sequences is computed once. A block nobody holds stays cached and is evicted, least recently released first,
    when the pool runs short. A block is never written once registered: a sequence writes only blocks of its own.

    Admission (`can_admit`, `admit`) reserves a sequence's worst case (prompt + tokens to generate, in blocks), so a
    block is always there when a sequence needs one: free blocks + cached blocks >= the reservations outstanding.
    """

    def __init__(
        self,
        config: ModelConfig,
        rows: int,
        n_blocks: int,
        *,
        block_size: int = 16,
        prefix_caching: bool = True,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if block_size < 1 or n_blocks < 1:
            raise ValueError(f"{n_blocks} blocks of {block_size} positions: both must be >= 1")
        self.window = config.sliding_window
        self.block_size, self.n_blocks, self.prefix_caching = block_size, n_blocks, prefix_caching
        shape = (n_blocks + 1, config.n_kv_heads, block_size, config.head_dim)
        # Empty: on a CPU the pool's pages become resident as blocks are first taken (each is zeroed then).
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        for t in (*self.k, *self.v):
            t[0].zero_()
        self.block_pos = torch.full((n_blocks + 1, block_size), -1, dtype=torch.long, device=device)
        self.refs = [0] * (n_blocks + 1)
        self.free = list(range(n_blocks, 0, -1))  # a stack: the lowest block first, recently freed ones reused first
        self.cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # held by nobody, LRU first
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.promised: dict[bytes, int] = {}  # key -> owner (see `admit`) that will write that block
        self.tables: list[list[int]] = [[] for _ in range(rows)]
        self.first = [0] * rows  # a row's first block still held (sliding window: the older ones are dropped)
        self.reserve = [0] * rows  # blocks a row may still take
        self.chain: list[list[bytes]] = [[] for _ in range(rows)]  # keys of its prompt's full blocks
        self.done = [0] * rows  # of those, how many are registered (or were hits)
        self.limit = [0] * rows  # of those, how many it may take from the cache
        self.prompt_len = [0] * rows
        self.owner = [0] * rows  # which admission a row's promises belong to (rows move; admissions do not)
        self._owners = 0
        self.queries = self.hits = 0  # prompt tokens looked up, and found (prefix caching)
        # `gather`'s last views by their rows: (the rows' ends, the view); two, so that a prefill chunk of another
        # row between two decode steps keeps the decode view
        self._last: collections.OrderedDict[tuple[int, ...], tuple[list[int], KVCache]] = collections.OrderedDict()

    # ---- accounting -----------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return len(self.tables)

    @property
    def blocks_used(self) -> int:
        """Blocks held by sequences (a shared one counts once)."""
        return self.n_blocks - len(self.free) - len(self.cached)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def available(self) -> int:
        return len(self.free) + len(self.cached) - sum(self.reserve)

    def can_admit(self, tokens: int, prompt: list[int] = (), reuse: bool = True, salt: bytes = b"") -> bool:
        """Whether a sequence of at most `tokens` positions fits now (`admit` with the same arguments)."""
        hits = self._hits(self._chain(prompt, salt), self._limit(prompt, reuse))
        idle = sum(1 for block in hits if self.refs[block] == 0)  # taking these makes them unavailable to others
        return self.blocks_for(tokens) - len(hits) + idle <= self.available()

    def admit(self, row: int, tokens: int, prompt: list[int] = (), reuse: bool = True, salt: bytes = b"") -> int:
        """Row `row` (emptied) for a sequence of at most `tokens` positions starting with `prompt`: it takes the
        cached blocks the prompt starts with (prefix caching; with `reuse`, else none: e.g. when every prompt
        position's logits are wanted) and the rest of its blocks are reserved. Returns the prompt tokens cached."""
        self.release(row)
        self._owners += 1
        self.owner[row] = self._owners
        chain = self.chain[row] = self._chain(prompt, salt)
        self.limit[row], self.prompt_len[row] = self._limit(prompt, reuse), len(prompt)
        hits = self._hits(chain, self.limit[row])
        for block in hits:
            self._ref(block)
        self.tables[row] = list(hits)
        self.done[row] = len(hits)
        self.reserve[row] = self.blocks_for(tokens) - len(hits)
        return len(hits) * self.block_size

    def release(self, row: int) -> None:
        """Give back a row's blocks and reservation (cached ones stay cached) and drop its promises."""
        self._last.clear()
        for block in self.tables[row]:
            if block:
                self._unref(block)
        for key in self.chain[row][self.done[row] :]:
            if self.promised.get(key) == self.owner[row]:
                del self.promised[key]
        self.tables[row], self.chain[row] = [], []
        self.first[row] = self.done[row] = self.reserve[row] = self.limit[row] = self.prompt_len[row] = 0

    def reset(self, rows: list[int] | None = None) -> None:
        for row in range(self.batch_size) if rows is None else rows:
            self.release(row)

    def swap(self, a: int, b: int) -> None:
        """Exchange two rows (their tables: no keys or values move)."""
        self._last.clear()
        for state in (
            self.tables,
            self.first,
            self.reserve,
            self.chain,
            self.done,
            self.limit,
            self.prompt_len,
            self.owner,
        ):
            state[a], state[b] = state[b], state[a]

    def _take(self) -> int:
        if self.free:
            block = self.free.pop()
        elif self.cached:
            block, _ = self.cached.popitem(last=False)
            del self.by_hash[self.hash_of.pop(block)]
        else:  # admission reserves every block a sequence takes: this is a bug
            raise RuntimeError("the KV block pool is exhausted")
        for t in (*self.k, *self.v):
            t[block].zero_()  # never garbage (NaN) under a masked slot: softmax weight 0 times NaN is NaN
        self.block_pos[block] = -1
        self.refs[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self.refs[block] == 0:
            del self.cached[block]
        self.refs[block] += 1

    def _unref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.hash_of:
                self.cached[block] = None  # the most recently released, evicted last
            else:
                self.free.append(block)

    # ---- prefix caching -------------------------------------------------------------------------------------

    def keys(self, tokens: list[int], salt: bytes = b"") -> list[bytes]:
        """The chained keys of the full blocks of `tokens`."""
        keys, parent, bs = [], hashlib.sha256(salt).digest(), self.block_size
        for i in range(len(tokens) // bs):
            block = b"".join(t.to_bytes(4, "little") for t in tokens[i * bs : (i + 1) * bs])
            parent = hashlib.sha256(parent + block).digest()
            keys.append(parent)
        return keys

    def _chain(self, prompt: list[int], salt: bytes) -> list[bytes]:
        return self.keys(prompt, salt) if self.prefix_caching else []

    def _limit(self, prompt: list[int], reuse: bool) -> int:
        """How many of a prompt's blocks may come from the cache: none of its last token's (its logits are needed)."""
        return (len(prompt) - 1) // self.block_size if reuse and self.prefix_caching else 0

    def _hits(self, chain: list[bytes], limit: int) -> list[int]:
        hits = []
        for key in chain[:limit]:
            if key not in self.by_hash:
                break
            hits.append(self.by_hash[key])
        return hits

    def prefix(self, row: int) -> tuple[int, bool]:
        """Before a sequence's first prefill: the cached blocks its prompt goes on with since `admit` (written
        meanwhile by another sequence), and a promise of its other full blocks. Returns (prompt tokens now in the
        cache, wait): with wait, another sequence has promised the next block and nothing changed: ask again once
        that one has run."""
        chain, table, limit = self.chain[row], self.tables[row], self.limit[row]
        if len(table) != self.done[row]:
            raise ValueError(f"row {row} has begun its prefill")
        more = self._hits(chain[len(table) :], limit - len(table))
        n = len(table) + len(more)
        if n < limit and self.promised.get(chain[n], self.owner[row]) != self.owner[row]:
            return 0, True
        for block in more:
            self._ref(block)
            table.append(block)
            self.reserve[row] = max(0, self.reserve[row] - 1)
        for key in chain[n:]:
            self.promised.setdefault(key, self.owner[row])
        self.done[row] = n
        if self.prefix_caching:
            self.queries += self.prompt_len[row]
            self.hits += n * self.block_size
        return n * self.block_size, False

    # ---- forward passes -------------------------------------------------------------------------------------

    def gather(self, rows: list[int], start_B: list[int], end_B: list[int]) -> KVCache:
        """A `KVCache` of these rows (batch row i: `rows[i]`) for a forward pass writing positions start..end-1 of
        each: blocks taken up to end, a sliding-window row's blocks wholly before the window of its first query
        dropped, and the rest copied into a contiguous cache (see the class). `scatter` writes the new ones back."""
        bs, window = self.block_size, self.window
        last = self._last.pop(tuple(rows), None)
        if (
            window is None
            and last is not None
            and last[0] == list(start_B)
            and all(len(self.tables[row]) * bs >= end for row, end in zip(rows, end_B, strict=True))
        ):
            self._last[tuple(rows)] = (list(end_B), last[1])
            return last[1]
        spans = []
        for row, start, end in zip(rows, start_B, end_B, strict=True):
            table = self.tables[row]
            while len(table) * bs < end:
                table.append(self._take())
                self.reserve[row] = max(0, self.reserve[row] - 1)
            if window is not None:
                keep = max(0, start - window + 1) // bs  # the block of the oldest key the first query sees
                for b in range(self.first[row], keep):
                    if table[b]:
                        self._unref(table[b])
                        table[b] = 0
                self.first[row] = max(self.first[row], keep)
            spans.append((self.first[row], len(table)))
        N = max(max(hi - lo for lo, hi in spans), 1)
        index = torch.zeros((len(rows), N), dtype=torch.long)
        for i, (row, (lo, hi)) in enumerate(zip(rows, spans, strict=True)):
            places = torch.arange(lo, hi) % N
            index[i, places] = torch.tensor(self.tables[row][lo:hi], dtype=torch.long)
        index = index.to(self.block_pos.device)
        flat = index.view(-1)
        B, S = len(rows), N * bs

        def contiguous(pool: torch.Tensor) -> torch.Tensor:  # [B*N, G, BS, d] -> [B, G, N*BS, d]
            blocks = pool.index_select(0, flat)
            return blocks.view(B, N, *blocks.shape[1:]).transpose(1, 2).reshape(B, blocks.shape[1], S, -1)

        k = [contiguous(t) for t in self.k]
        v = [contiguous(t) for t in self.v]
        slot_pos = self.block_pos.index_select(0, flat).view(B, S)
        view = KVCache.of(k, v, slot_pos, window, rolling=window is not None)
        if window is None:
            self._last[tuple(rows)] = (list(end_B), view)
            while len(self._last) > 2:
                self._last.popitem(last=False)
        return view

    def scatter(self, view: KVCache, rows: list[int], start_B: list[int], end_B: list[int]) -> None:
        """Copy positions start..end-1 of each row from `view` (what `gather` gave, after the forward pass wrote
        them) back to the rows' blocks; then register the prompt blocks that are now full."""
        bs = self.block_size
        b_idx, slots, blocks, offsets, positions = [], [], [], [], []
        for i, (row, start, end) in enumerate(zip(rows, start_B, end_B, strict=True)):
            for p in range(start, end):
                b_idx.append(i)
                slots.append(p % view.n_slots)
                blocks.append(self.tables[row][p // bs])
                offsets.append(p % bs)
                positions.append(p)
        device = self.block_pos.device
        b_idx, slots, blocks, offsets, positions = (
            torch.tensor(x, dtype=torch.long, device=device) for x in (b_idx, slots, blocks, offsets, positions)
        )
        for pool, new in ((self.k, view.k), (self.v, view.v)):
            for layer in range(len(pool)):
                pool[layer][blocks, :, offsets] = new[layer][b_idx, :, slots]
        self.block_pos[blocks, offsets] = positions
        for row, end in zip(rows, end_B, strict=True):
            chain, table = self.chain[row], self.tables[row]
            while self.done[row] < len(chain) and (self.done[row] + 1) * bs <= end:
                key, block = chain[self.done[row]], table[self.done[row]]
                if block and key not in self.by_hash and block not in self.hash_of:
                    self.by_hash[key], self.hash_of[block] = block, key
                if self.promised.get(key) == self.owner[row]:
                    del self.promised[key]
                self.done[row] += 1
