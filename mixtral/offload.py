"""Experts offloaded to CPU memory, for GPUs smaller than the model (mixtral-offloading's approach, Eliseev and
Mazur 2023): a transform applied to a built model, as quantization and parallelism are.

`offload_experts(model, device, resident)` puts everything but the stacked experts (`layer.moe.w1/w2/w3`) on
`device`. The experts stay in CPU memory, pinned where `device` is a CUDA GPU so that copies run asynchronously, and
each MoE layer gets an `ExpertCache`: `resident` expert slots on the device (stacked tensors of the experts' own
format, [S, ...] per tensor), which expert each slot holds, least recently used first, and counters.

Each step, a layer's dispatch hook (`MoE.dispatch_hook`) reads which experts the routing chose: a host read per
layer that offloading cannot avoid (so no CUDA graphs: `generate.graphable` says so of any hook). It makes them
resident, evicting the least recently used slots whose experts this step does not need, remaps the routing's
expert ids to slots and runs the model's own dispatch (`local`) on the slots. A step that needs more experts than
there are slots (a prefill) runs in passes over whole experts (`_passes`).

Prefetch (speculative loading): at layer i, layer i+1's router is applied to layer i's MoE input, rescaled from
layer i's FFN norm to layer i+1's (`x / w_i * w_{i+1}`, what layer i+1's norm would make of the residual stream
without the layer i MoE and the layer i+1 attention in between), and the guessed experts that are not resident
start loading into layer i+1's cache: on a GPU on a side stream, while layer i's experts run, with an event that
layer i+1 waits for before it touches the slot; on another device the copy is simply made.

Shape legend: T tokens, D model dim, E experts, S slots, K experts per token, P (token, expert) pairs.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.nn.utils import parametrize

from .kernels import ops
from .kernels.ops import Experts, Routing
from .kernels.weights import QuantizedWeight
from .model import Transformer
from .quantize import weight_bytes

EXPERT_WEIGHTS = ("w1", "w2", "w3")

# The default reserve of device memory beside the weights (`reserve_bytes`): the KV cache of this many tokens at
# batch 1, and this many bytes for activations, kernel workspaces and the CUDA context (~0.5 GB on its own).
RESERVE_TOKENS = 4096
RESERVE_FIXED = 1 << 30


# ---- one layer's slots ----------------------------------------------------------------------------------------


@dataclass
class CacheStats:
    """Counters of one layer's cache (or their sum): per step, each expert the routing chose is a hit (resident,
    prefetched or not) or a miss (loaded then); `loads` counts every expert copied to the device (misses and
    prefetches); `prefetch_used` the prefetched experts that the step they were guessed for chose."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    prefetches: int = 0
    prefetch_used: int = 0

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else float("nan")

    def __add__(self, other: CacheStats) -> CacheStats:
        return CacheStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def _weights(experts: Experts) -> tuple:
    return experts.w1, experts.w2, experts.w3


def _parts(w: torch.Tensor | QuantizedWeight) -> dict[str, torch.Tensor]:
    """A stacked expert weight's tensors by name, each [E, ...]: the tensor itself, or a quantized weight's buffers."""
    if isinstance(w, QuantizedWeight):
        return dict(w.named_buffers(recurse=False))
    return {"": w}


def _empty_stack(w: torch.Tensor | QuantizedWeight, n: int, device: torch.device) -> torch.Tensor | QuantizedWeight:
    """Zeroed slots for `n` experts of `w`'s format on `device`. Zeros, not uninitialised memory: the dense dispatch
    multiplies every slot, an unused one by a router weight of 0, which a NaN left in memory would poison."""
    if isinstance(w, QuantizedWeight):
        stack = QuantizedWeight.empty(torch.Size((n, *w.shape[1:])), w.mode, w.group_size, w.dtype, device)
        for t in stack.buffers():
            t.zero_()
        return stack
    return torch.zeros((n, *w.shape[1:]), dtype=w.dtype, device=device)


class ExpertCache:
    """One MoE layer's `n_slots` expert slots on `device` (`slots`, an `Experts` of stacked tensors [S, ...]), which
    expert each holds (`slot_of`, least recently used first), and its `stats`.

    `make_resident` loads what a step needs on demand (on a GPU on the current stream); `prefetch` loads guesses
    ahead of the step (on a GPU on `stream`, with an event per slot that whatever uses or overwrites that slot
    waits for first)."""

    def __init__(
        self, experts: Experts, n_slots: int, device: torch.device, stream: torch.cuda.Stream | None = None
    ) -> None:
        self.n_experts, self.n_slots, self.device, self.stream = experts.n, n_slots, device, stream
        self.slots = Experts(*(_empty_stack(w, n_slots, device) for w in _weights(experts)))
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self.free = list(range(n_slots))
        self.prefetched: set[int] = set()  # loaded by a prefetch, not yet chosen by a step
        self.pending: dict[int, torch.cuda.Event] = {}  # slot -> its prefetch copy's event (CUDA)
        self.stats = CacheStats()

    def count(self, needed: Sequence[int]) -> None:
        """Count a step's hits and misses, and which prefetched experts it used (those it did not are dropped from
        the count: a prefetch is for the step after it)."""
        hits = sum(e in self.slot_of for e in needed)
        self.stats.hits += hits
        self.stats.misses += len(needed) - hits
        self.stats.prefetch_used += sum(e in self.prefetched for e in needed)
        self.prefetched.clear()

    def make_resident(self, experts: Sequence[int], source: Experts) -> None:
        """Load those of `experts` (at most `n_slots`) that are not resident from `source`, each into a free slot or
        the least recently used one holding an expert not among `experts`; all of them become the most recently
        used, in the order given, and ready for the current stream."""
        keep = set(experts)
        for e in experts:
            if e not in self.slot_of:
                self._load(source, e, self._victim(keep), prefetch=False)
            self.slot_of.move_to_end(e)
            self._wait(self.slot_of[e])

    def prefetch(self, guess: Sequence[int], source: Experts) -> None:
        """Start loading the guessed experts (best first; the first `n_slots`) that are not resident.

        The step it guesses for has not run yet, so what that step needs is not known: a prefetch takes only free
        slots and slots holding experts it does not guess, least recently used first. It never evicts an expert
        it guesses the step needs for another, and never one of its own; an expert it evicts that the step then
        chooses is a miss, loaded when the step runs."""
        wanted = list(guess[: self.n_slots])
        keep = set(wanted)
        for e in wanted:
            if e not in self.slot_of:
                self._load(source, e, self._victim(keep), prefetch=True)
                self.prefetched.add(e)

    def table(self) -> torch.Tensor:
        """Expert id -> slot ([E] int64 on the device; 0 for experts not resident)."""
        table = [0] * self.n_experts
        for e, slot in self.slot_of.items():
            table[e] = slot
        return torch.tensor(table, dtype=torch.long, device=self.device)

    def clear(self) -> None:
        """Forget what the slots hold (the weights they copied have changed)."""
        for slot in list(self.pending):
            self._wait(slot)
        self.slot_of.clear()
        self.prefetched.clear()
        self.free = list(range(self.n_slots))

    def _victim(self, keep: set[int]) -> int:
        """A free slot, else the least recently used one whose expert is not in `keep` (forgotten here)."""
        if self.free:
            return self.free.pop(0)
        for e, slot in self.slot_of.items():
            if e not in keep:
                del self.slot_of[e]
                self.prefetched.discard(e)
                return slot
        raise RuntimeError(f"more than {self.n_slots} experts wanted in the slots at once")  # callers split first

    @torch.no_grad()
    def _load(self, source: Experts, e: int, slot: int, *, prefetch: bool) -> None:
        """Copy expert e of `source` into `slot`: a prefetch on the side stream (after what the current stream has
        queued, which may still read the slot), recording the event that users of the slot wait for; else on the
        current stream, after any prefetch copy into the slot."""
        side = self.stream if prefetch else None
        if side is None:
            self._wait(slot)
        else:
            side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for src, dst in zip(_weights(source), _weights(self.slots), strict=True):
                src_parts = _parts(src)
                for name, t in _parts(dst).items():
                    t[slot].copy_(src_parts[name][e], non_blocking=True)
        if side is not None:
            event = torch.cuda.Event()
            event.record(side)
            self.pending[slot] = event
        for w in _weights(self.slots):  # ATen-layout int4 copies kept per weight (CPUs where it differs) are now stale
            if isinstance(w, QuantizedWeight):
                ops._aten_int4_cache.pop(w, None)
        self.slot_of[e] = slot
        self.stats.loads += 1
        self.stats.prefetches += int(prefetch)

    def _wait(self, slot: int) -> None:
        event = self.pending.pop(slot, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)


# ---- the model's hooks --------------------------------------------------------------------------------------


class Offload:
    """A model's offloaded experts: one `ExpertCache` per layer (`caches`), the dispatch hooks that use them, and
    the counters (`stats`, `total`, `summary`). Made by `offload_experts`."""

    def __init__(self, model: Transformer, device: torch.device, n_slots: int, prefetch: bool) -> None:
        self.model, self.device, self.n_slots, self.prefetch = model, device, n_slots, prefetch
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and prefetch else None
        self.caches: list[ExpertCache] = []
        self._derive()

    def _derive(self) -> None:
        """The caches (counters kept) and the norm ratios of the prefetch, from the model as it is now."""
        for cache in self.caches:  # (their copies done before their slots are freed)
            cache.clear()
        stats = [cache.stats for cache in self.caches]
        self.caches = []  # (the old slots freed before the new ones are made)
        layers = self.model.layers
        self.caches = [ExpertCache(layer.moe.experts, self.n_slots, self.device, self.stream) for layer in layers]
        for cache, before in zip(self.caches, stats, strict=False):
            cache.stats = before
        norms = [layer.ffn_norm.weight.detach().float() for layer in self.model.layers]
        # (a zero gain in layer i leaves nothing to rescale: that channel is 0 in the guess's input)
        self.ratios = [torch.where(a != 0, b / a, 0.0) for a, b in itertools.pairwise(norms)]
        self.version = self.model.version

    def __call__(
        self, layer: int, x_TD: torch.Tensor, experts: Experts, routing: Routing, local: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        """Layer `layer`'s dispatch (`MoE.dispatch_hook`): the chosen experts made resident, the next layer's guessed
        ones prefetched, then `local` on the slots."""
        if self.model.version != self.version:  # weights changed (LoRA, loading, `.to()`): the slots copied old ones
            self._derive()
        cache = self.caches[layer]
        E = cache.n_experts
        counts_E = torch.bincount(routing.idx_TK.reshape(-1), minlength=E)
        guess_E = self._guess(layer, x_TD)
        counts = (counts_E if guess_E is None else torch.cat((counts_E, guess_E))).tolist()  # the one host read
        needed = [e for e in range(E) if counts[e]]
        cache.count(needed)
        if len(needed) <= cache.n_slots:
            cache.make_resident(needed, experts)
        if guess_E is not None:  # after this step's own copies, before its experts run: they overlap on a GPU
            ranked = sorted((e for e in range(E) if counts[E + e]), key=lambda e: -counts[E + e])
            self.caches[layer + 1].prefetch(ranked, self.model.layers[layer + 1].moe.experts)
        if len(needed) <= cache.n_slots:
            return local(x_TD, cache.slots, Routing(routing.weights_TK, cache.table()[routing.idx_TK]))
        return _passes(cache, x_TD, experts, routing, local, needed, counts[:E])

    @torch.no_grad()
    def _guess(self, layer: int, x_TD: torch.Tensor) -> torch.Tensor | None:
        """How many of these tokens the next layer's router sends to each expert ([E]) when applied to this layer's
        MoE input rescaled to the next layer's norm; None without a prefetch or a next layer."""
        if not self.prefetch or layer + 1 >= len(self.caches) or x_TD.shape[0] == 0:
            return None
        moe = self.model.layers[layer + 1].moe
        x = (x_TD.float() * self.ratios[layer]).to(x_TD.dtype)
        idx_TK = torch.topk(ops.project(moe.gate, x).float(), moe.top_k, dim=-1).indices
        return torch.bincount(idx_TK.reshape(-1), minlength=self.caches[layer + 1].n_experts)

    def stats(self) -> list[CacheStats]:
        """Each layer's counters."""
        return [cache.stats for cache in self.caches]

    def total(self) -> CacheStats:
        return sum(self.stats(), CacheStats())

    def summary(self) -> str:
        """The counters per layer and in total, as a small table."""
        E = self.caches[0].n_experts if self.caches else 0
        lines = [
            f"experts offloaded: {self.n_slots} of {E} per layer resident on {self.device}"
            f"{', prefetch on' if self.prefetch else ''}",
            f"{'layer':>6} {'hits':>8} {'misses':>8} {'hit rate':>8} {'loads':>8} {'prefetched':>10} {'used':>8}",
        ]
        rows = [(str(i), s) for i, s in enumerate(self.stats())] + [("total", self.total())]
        for name, s in rows:
            lines.append(
                f"{name:>6} {s.hits:>8} {s.misses:>8} {s.hit_rate:>8.1%} {s.loads:>8} {s.prefetches:>10} "
                f"{s.prefetch_used:>8}"
            )
        return "\n".join(lines)


class _LayerHook:
    """`MoE.dispatch_hook` of one layer: its `Offload`'s dispatch."""

    def __init__(self, offload: Offload, layer: int) -> None:
        self.offload, self.layer = offload, layer

    def __call__(
        self, x_TD: torch.Tensor, experts: Experts, routing: Routing, local: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        return self.offload(self.layer, x_TD, experts, routing, local)


def _passes(
    cache: ExpertCache,
    x_TD: torch.Tensor,
    experts: Experts,
    routing: Routing,
    local: Callable[..., torch.Tensor],
    needed: list[int],
    counts: list[int],
) -> torch.Tensor:
    """A step that needs more experts than there are slots: passes over whole experts, those resident first.

    The (token, expert) pairs are sorted by expert as the grouped path sorts them (`ops.pairs_by_expert`); each pass
    runs its experts on their rows (`local` with one expert per row and router weight 1: the expert's output as
    it is), and one `ops.combine` at the end scales and sums each token's outputs in float32, in the same order, and
    rounds once. So each expert runs on the same rows as in one pass and nothing is rounded per pass: with the
    grouped path, the same numbers as the model with every expert resident (one exception: a pass of one row
    takes the one-token path, whose kernel may round differently)."""
    T = x_TD.shape[0]
    order_P, token_of_P = ops.pairs_by_expert(routing.idx_TK)
    start = [0] * len(counts)
    for e in range(1, len(counts)):
        start[e] = start[e - 1] + counts[e - 1]
    y_PD = x_TD.new_empty((order_P.numel(), x_TD.shape[1]))
    ordered = [e for e in needed if e in cache.slot_of] + [e for e in needed if e not in cache.slot_of]
    for first in range(0, len(ordered), cache.n_slots):
        group = sorted(ordered[first : first + cache.n_slots])
        cache.make_resident(group, experts)
        rows = [r for e in group for r in range(start[e], start[e] + counts[e])]
        slots = [cache.slot_of[e] for e in group for _ in range(counts[e])]
        rows_P = torch.tensor(rows, dtype=torch.long, device=x_TD.device)
        slots_P1 = torch.tensor(slots, dtype=torch.long, device=x_TD.device).view(-1, 1)
        ones_P1 = torch.ones(slots_P1.shape, dtype=torch.float32, device=x_TD.device)
        y_PD[rows_P] = local(x_TD[token_of_P[rows_P]], cache.slots, Routing(ones_P1, slots_P1))
    return ops.combine([y_PD], routing.weights_TK.reshape(-1)[order_P], token_of_P, T)


# ---- applying it to a model -----------------------------------------------------------------------------------


@torch.no_grad()
def offload_experts(
    model: Transformer,
    device: torch.device | str,
    resident: int,
    *,
    prefetch: bool = True,
    pin: bool | None = None,
) -> Offload:
    """Put everything but the stacked experts on `device` and give each MoE layer `resident` expert slots there
    (top_k <= resident <= n_experts); the experts stay in CPU memory, pinned when `pin` (default: on a CUDA device),
    and are loaded as routing asks (see the module's docstring). With `prefetch`, layer i guesses layer i+1's
    experts and starts loading them. Returns the `Offload` (also `model.offload`) with the counters.

    For inference: the experts' gradients are not computed. Apply it after quantizing, never with expert or tensor
    parallelism. LoRA adapters added afterwards work but are slow (an adapted stack is computed whole on the CPU at
    each step): merge them first."""
    device = torch.device(device)
    cfg = model.config
    if not cfg.top_k <= resident <= cfg.n_experts:
        raise ValueError(
            f"{resident} resident experts per layer: give between top_k={cfg.top_k} (the experts of one token) and "
            f"n_experts={cfg.n_experts}"
        )
    if any(layer.moe.dispatch_hook is not None for layer in model.layers):
        raise ValueError("the experts' dispatch is already replaced (expert/tensor parallelism, adapters, offloading)")
    if any(parametrize.is_parametrized(layer.moe) for layer in model.layers):
        raise ValueError("offload the experts before adding LoRA adapters to them")
    held = []  # (the dict a stacked expert weight is registered in, its name, the weight), out while the rest moves
    for layer in model.layers:
        moe = layer.moe
        for name in EXPERT_WEIGHTS:
            store = moe._parameters if name in moe._parameters else moe._modules
            held.append((store, name, store.pop(name)))
    try:
        model.to(device)
    finally:
        for store, name, w in held:
            store[name] = w
    if pin if pin is not None else device.type == "cuda":
        _pin(model)
    offload = Offload(model, device, resident, prefetch)
    for i, layer in enumerate(model.layers):
        layer.moe.dispatch_hook = _LayerHook(offload, i)
    model.offload = offload
    return offload


def _pin(model: Transformer) -> None:
    """The CPU experts moved into page-locked memory (one tensor at a time), so that copies to the GPU run
    asynchronously; where the system refuses, they stay where they are (copies then wait for the host)."""
    try:
        for layer in model.layers:
            for name in EXPERT_WEIGHTS:
                w = getattr(layer.moe, name)
                if isinstance(w, QuantizedWeight):
                    for key, t in list(w.named_buffers(recurse=False)):
                        if not t.is_pinned():
                            setattr(w, key, t.pin_memory())
                elif isinstance(w, nn.Parameter) and not w.is_pinned():
                    w.data = w.data.pin_memory()
    except RuntimeError as e:
        warnings.warn(f"the offloaded experts stay in pageable memory ({e}): copies wait for the host", stacklevel=3)


def offload_of(model: Transformer) -> Offload | None:
    """The model's `Offload`, None where its experts are not offloaded."""
    return getattr(model, "offload", None)


# ---- the memory budget ----------------------------------------------------------------------------------------


def expert_bytes(model: Transformer) -> int:
    """Bytes of one expert of one layer (its w1, w2 and w3; quantized: all its buffers)."""
    moe = model.layers[0].moe
    total = sum(t.numel() * t.element_size() for name in EXPERT_WEIGHTS for t in _parts(getattr(moe, name)).values())
    return total // moe.experts.n


def non_expert_bytes(model: Transformer) -> int:
    """Bytes of every weight but the stacked experts: what offloading puts on the device whatever the slots."""
    return weight_bytes(model) - expert_bytes(model) * model.config.n_experts * len(model.layers)


def reserve_bytes(model: Transformer, tokens: int = RESERVE_TOKENS) -> int:
    """Device memory to leave beside the weights: the KV cache of `tokens` tokens at batch 1 (within the sliding
    window) in the model's dtype, and RESERVE_FIXED for activations, workspaces and the CUDA context."""
    cfg = model.config
    if cfg.sliding_window is not None:
        tokens = min(tokens, cfg.sliding_window)
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * model.embed.weight.element_size()
    return tokens * per_token + RESERVE_FIXED


def resident_for_budget(model: Transformer, budget_bytes: int, device_reserve_bytes: int | None = None) -> int:
    """How many expert slots per layer fit in `budget_bytes` of device memory once the non-expert weights and the
    reserve (`reserve_bytes` by default) are placed: at most n_experts. Fewer than top_k (one token's experts, the
    least that works) is a ValueError naming the bytes needed."""
    cfg = model.config
    reserve = reserve_bytes(model) if device_reserve_bytes is None else device_reserve_bytes
    fixed = non_expert_bytes(model) + reserve
    per_slot = expert_bytes(model) * len(model.layers)  # one slot in every layer
    slots = (budget_bytes - fixed) // per_slot if budget_bytes > fixed else 0
    if slots < cfg.top_k:
        need = fixed + cfg.top_k * per_slot
        raise ValueError(
            f"{budget_bytes / 1e9:.2f} GB of device memory does not hold {cfg.top_k} experts per layer (top_k, the "
            f"least that works): the non-expert weights take {non_expert_bytes(model) / 1e9:.2f} GB, the reserve for "
            f"the KV cache and activations {reserve / 1e9:.2f} GB, and {cfg.top_k} experts in each of the "
            f"{len(model.layers)} layers {cfg.top_k * per_slot / 1e9:.2f} GB: {need / 1e9:.2f} GB ({need} bytes) in "
            "all; quantized experts need less"
        )
    return int(min(slots, cfg.n_experts))
