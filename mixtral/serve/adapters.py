"""Several LoRA adapters served at once on one un-merged base model: each row of a batch with its own adapter, or
none, in one forward pass (the batched LoRA of Punica and S-LoRA).

An adapted weight W computes, for a row whose adapter is a, y = x W^T + s_a (x A_a^T) B_a^T. Every adapted weight
holds a stack of all the adapters' A and B (scale folded into B, ranks padded with zeros to the largest, zeros where
an adapter leaves that weight alone) with one slot more, all zeros, for rows without an adapter: their delta is 0.
An attention projection's step gathers each row's A and B from the stack and runs two batched matmuls (bmm), whatever
the mix of adapters (where every row has the same adapter, its A and B are used as they are, without a gather).

- Attention projections: a forward hook on the projection adds the delta to its output (`ops.project` runs the
  base weight through its kernel, plain or quantized, then the module's forward hooks).
- Experts: the adapter changes the inside of the SwiGLU (silu(w1 x) * (w3 x) before w2), so a layer whose experts
  are adapted replaces its dispatch (`MoE.dispatch_hook`) while a row of the step has an adapter: all the step's
  (token, expert) pairs, sorted by expert and adapter, run on the base weights once per used expert, with each
  (expert, adapter)'s delta from its A[e] and B[e] on its rows (none for rows without an adapter), and are summed
  with their router weights in float32.

The hooks are there only while a row of the step has an adapter (`select`): a batch of base rows runs the base
model's own path (the fused one-token step, CUDA graphs). `merged_reference` is the plain path the batched one is
checked against: the adapter merged into a copy of the model.

Shape legend: N adapters, R rank (the largest), B rows, T tokens, P (token, expert) pairs, D model dim, E experts.
"""

from __future__ import annotations

import copy
import functools
import itertools
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from ..kernels import ops
from ..kernels.ops import Experts, Routing
from ..model import Transformer
from ..train.lora import load_adapter, merge_lora, read_adapter

Deltas = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


class AdapterBank:
    """The adapters {name: deltas} (`train.lora.read_adapter`) of one model, ready for batched steps: `select` the
    adapter of each row of the next forward pass (None: the base model)."""

    def __init__(self, model: Transformer, adapters: Mapping[str, Deltas]) -> None:
        if not adapters:
            raise ValueError("an AdapterBank needs at least one adapter")
        for layer in model.layers:
            if layer.moe.dispatch_hook is not None:
                raise ValueError("LoRA adapters cannot be served on a model split over processes (--ep/--tp)")
        self.model = model
        self.names = list(adapters)
        self.none = len(self.names)  # the slot of rows without an adapter: zeros
        device = model.embed.weight.device
        self.stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (A [N+1, (E,) R, in], B [.., out, R])
        self.users: dict[str, set[int]] = {}  # name -> the adapters that adapt it
        targets = sorted({t for deltas in adapters.values() for t in deltas})
        for t in targets:
            present = {i: d[t] for i, d in enumerate(adapters.values()) if t in d}
            R = max(A.shape[-2] for A, _, _ in present.values())
            A0, B0, _ = next(iter(present.values()))
            lead, n_in, n_out = A0.shape[:-2], A0.shape[-1], B0.shape[-2]
            A_all = torch.zeros(self.none + 1, *lead, R, n_in, dtype=torch.float32, device=device)
            B_all = torch.zeros(self.none + 1, *lead, n_out, R, dtype=torch.float32, device=device)
            for i, (A, B, scale) in present.items():
                r = A.shape[-2]
                A_all[i, ..., :r, :] = A
                B_all[i, ..., :r] = B * scale
            self.stacks[t] = (A_all, B_all)
            self.users[t] = set(present)
        self.expert_layers = sorted({int(t.split(".")[1]) for t in targets if ".moe." in t})
        self._slots: torch.Tensor | None = None  # [B] the adapter slot of each row of the next step
        self._chosen: set[int] = set()
        self._uniform: int | None = None  # the slot of every row where they all have the same one
        self._handles: list[RemovableHandle | _Restore] = []

    @classmethod
    def load(cls, model: Transformer, paths: Mapping[str, str | os.PathLike]) -> AdapterBank:
        """Read the adapters {name: folder} (PEFT's format or ours) for `model`."""
        adapters = {}
        for name, path in paths.items():
            try:
                adapters[name] = read_adapter(model, path)
            except ValueError as e:
                raise ValueError(f"LoRA adapter {name!r}: {e}") from None
        return cls(model, adapters)

    def index(self, name: str) -> int:
        """The slot of adapter `name`; a ValueError naming the valid ones."""
        if name not in self.names:
            raise ValueError(f"no LoRA adapter named {name!r}; the adapters are {self.names}")
        return self.names.index(name)

    def select(self, slots: Sequence[int | None]) -> None:
        """The adapter slot (`index`) of each row of the next forward pass, None for the base model. Rows of a
        forward pass with one row (a prefill chunk) all share its slot."""
        chosen = {s for s in slots if s is not None}
        if not chosen:
            self._remove_hooks()
            self._slots, self._chosen, self._uniform = None, set(), None
            return
        for s in chosen:
            if not 0 <= s < self.none:
                raise ValueError(f"adapter slot {s} is out of range: there are {self.none} adapters")
        device = next(iter(self.stacks.values()))[0].device
        self._slots = torch.tensor([self.none if s is None else s for s in slots], dtype=torch.long, device=device)
        self._uniform = slots[0] if len(set(slots)) == 1 else None
        self._chosen = chosen
        if not self._handles:
            self._add_hooks()

    # ---- the hooks ------------------------------------------------------------------------------------------

    def _add_hooks(self) -> None:
        for name in self.stacks:
            if ".attn." in name:
                module = self.model.get_submodule(name)
                self._handles.append(module.register_forward_hook(functools.partial(self._projection, name)))
        for i in self.expert_layers:
            moe = self.model.layers[i].moe
            moe.dispatch_hook = functools.partial(self._experts, i)
            self._handles.append(_Restore(moe))

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _row_slots(self, rows: int) -> torch.Tensor:
        """The slot of each of `rows` rows: as selected, or one slot for all rows of a one-row step."""
        assert self._slots is not None
        if rows == len(self._slots):
            return self._slots
        if len(self._slots) == 1:
            return self._slots.expand(rows)
        raise ValueError(f"{len(self._slots)} adapter slots were selected for a step of {rows} rows")

    def _projection(self, name: str, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if not self.users[name] & self._chosen:
            return out
        x = args[0]
        x_BTI = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, in]: the model's projections take [B, T, in]
        A_all, B_all = self.stacks[name]
        # one adapter for all rows: its A and B as they are (a view); else each row's, gathered
        rows = self._uniform if self._uniform is not None else self._row_slots(x_BTI.shape[0])
        return out + lora_delta(x_BTI, A_all[rows], B_all[rows]).to(out.dtype).view(out.shape)

    def _experts(
        self,
        layer: int,
        x_TD: torch.Tensor,
        experts: Experts,
        routing: Routing,
        local: Callable[[torch.Tensor, Experts, Routing], torch.Tensor],
    ) -> torch.Tensor:
        names = [f"layers.{layer}.moe.{w}" for w in ("w1", "w2", "w3")]
        if not any(n in self.stacks and self.users[n] & self._chosen for n in names):
            return local(x_TD, experts, routing)
        assert self._slots is not None
        T, B = x_TD.shape[0], len(self._slots)
        if T % B:
            raise ValueError(f"{B} adapter slots were selected for a step of {T} tokens")
        slot_T = self._slots.repeat_interleave(T // B)  # a [B, T] batch's tokens, row after row
        # every token in one pass over the experts' weights: base rows take the zero slot (their delta is 0)
        return experts_lora(x_TD, experts, routing, slot_T, *(self.stacks.get(n) for n in names))


class _Restore:
    """A handle that takes an MoE's dispatch hook away again."""

    def __init__(self, moe: nn.Module) -> None:
        self.moe = moe

    def remove(self) -> None:
        self.moe.dispatch_hook = None


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(x A^T) B^T in float32: x [..., in] with one adapter's A [R, in] and B [out, R], or x [B, T, in] with each
    row's A [B, R, in] and B [B, out, R] (batched matmuls) -> [..., out]."""
    return (x.float() @ A.transpose(-1, -2)) @ B.transpose(-1, -2)


def experts_lora(
    x_TD: torch.Tensor,
    experts: Experts,
    routing: Routing,
    slot_T: torch.Tensor,
    w1: tuple[torch.Tensor, torch.Tensor] | None,
    w2: tuple[torch.Tensor, torch.Tensor] | None,
    w3: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Each token's chosen experts with its own adapter's deltas on w1, w2, w3 (stacks [N+1, E, R, in] /
    [N+1, E, out, R], the last slot all zeros, or None where no adapter touches that weight), scaled by the router
    weights and summed in float32 -> [T, D]. The (token, expert) pairs are sorted by expert, then by slot: the base
    weights run once per used expert on its contiguous rows (plain or quantized, through `ops.linear`), and the
    delta once per (expert, adapter) on its rows, from that adapter's A[e] and B[e] as they are (no gather); rows
    without an adapter add none."""
    weights_TK, idx_TK = routing
    K = idx_TK.shape[1]
    slots = next(stack for stack in (w1, w2, w3) if stack is not None)[0].shape[0]
    key_P = idx_TK.reshape(-1) * slots + slot_T.repeat_interleave(K)  # expert-major, then slot
    order = torch.argsort(key_P, stable=True)
    tok_P = order // K
    counts = torch.bincount(key_P, minlength=experts.n * slots).tolist()  # slice bounds, on the host
    ends = list(itertools.accumulate(counts))
    runs = [(k // slots, k % slots, end - n, end) for k, (n, end) in enumerate(zip(counts, ends, strict=True)) if n]
    spans: dict[int, slice] = {}  # expert -> its pairs
    for e, _, start, end in runs:
        spans[e] = slice(spans[e].start if e in spans else start, end)
    x_PD = x_TD[tok_P]

    def project(h_PI: torch.Tensor, w: int, stack: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """h through each pair's expert weight w (0: w1, 1: w2, 2: w3) plus its adapter's delta."""
        y = torch.cat([ops.linear(h_PI[rows], experts[e][w]) for e, rows in spans.items()])
        if stack is None:
            return y
        A_all, B_all = stack
        y = y.float()
        for e, slot, start, end in runs:
            if slot != slots - 1:
                y[start:end] += lora_delta(h_PI[start:end], A_all[slot, e], B_all[slot, e])
        return y.to(h_PI.dtype)

    g_PF = F.silu(project(x_PD, 0, w1)) * project(x_PD, 2, w3)
    y_PD = project(g_PF, 1, w2)
    out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    out_TD.index_add_(0, tok_P, y_PD.float() * weights_TK.reshape(-1)[order, None])
    return out_TD.to(x_TD.dtype)


def merged_reference(model: Transformer, path: str | os.PathLike) -> Transformer:
    """The plain path: a copy of `model` (floating-point) with the adapter at `path` merged into its weights."""
    merged = copy.deepcopy(model)
    load_adapter(merged, path)
    return merge_lora(merged).eval()
