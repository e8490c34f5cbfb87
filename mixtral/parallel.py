"""Expert and tensor parallelism, applied to a built single-device model, and loading that reads only each
rank's own shard of the weights.

The world is a DeviceMesh of ep x tp ranks, dims ("ep", "tp"), tp innermost (a TP group is consecutive
ranks: keep it inside one node, where the links are fast):
- expert parallelism (EP): the experts of every layer are split over the ep ranks (the stacked w1/w2/w3
  on dim 0); in each MoE block the ranks exchange how many (token, expert) pairs they send to each
  expert, then the tokens travel to their experts and back with `all_to_all_single`;
- tensor parallelism (TP): attention heads are split over the tp ranks (wq/wk/wv rows: column parallel;
  wo columns: row parallel), and so is every expert's hidden dim F (w1/w3 rows, w2 columns): one
  all-reduce after attention and one after the MoE block;
- embeddings, norms, routers and the LM head are replicated.
All collectives are autograd-aware, so the same model trains.

Which tokens a rank holds (`tokens=`):
- "replicated" (default): every rank holds the same tokens, e.g. one `generate` run spread over GPUs.
  Every rank routes all tokens (cheap), each EP rank dispatches 1/ep of them, and the outputs are
  all-gathered, so no expert work is repeated. Outputs and gradients equal single-process ones on every
  rank; training needs no gradient synchronisation.
- "sharded": each EP rank holds its own tokens (data parallel over the EP group, as in training), and
  all of them are dispatched. After backward, `reduce_gradients` averages the replicated parameters'
  gradients over the EP group (the DDP convention: equal batches per rank, mean loss on each).
Every MoE block is a collective: all ranks must run the same number of forward passes, in step.

Shape legend: T tokens, D model dim, E experts, F expert hidden dim, K experts per token.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import CheckpointError, find_checkpoint, is_expert_param, load_weights, stored_dtype
from .config import ModelConfig
from .kernels import ops
from .kernels.ops import Experts, Routing
from .model import Transformer

TOKENS = ("replicated", "sharded")


class ParallelError(ValueError):
    """A parallel layout that cannot work (sizes that do not divide, a process group of the wrong size)."""


# ---- process groups -----------------------------------------------------------------------------------------


def init_distributed(device_type: str | None = None, timeout: timedelta | None = None) -> torch.device:
    """Join the process group that `torchrun` describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in
    the environment) and return this process's device: cuda:LOCAL_RANK with NCCL for `device_type="cuda"`
    (the default when CUDA is available), the CPU with gloo otherwise."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ParallelError(
            f"expert/tensor parallelism runs under torchrun, but the environment lacks {', '.join(missing)}; "
            "launch with: torchrun --nproc-per-node N -m mixtral ..."
        )
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ParallelError("device cuda was asked for, but CUDA is not available on this machine")
        if local_rank >= torch.cuda.device_count():
            raise ParallelError(
                f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                "launch at most that many processes per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device_type == "cpu":
        device, backend = torch.device("cpu"), "gloo"
    else:
        raise ParallelError(f"device type {device_type!r} is not supported for parallelism (cuda or cpu)")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        if backend == "nccl":
            kwargs["device_id"] = device  # binds the communicator to this GPU up front
        dist.init_process_group(backend, **kwargs)
    return device


def shutdown() -> None:
    """Leave the process group (at the end of a torchrun command); nothing to do without one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def quiet_other_ranks() -> bool:
    """Send the standard output of every rank but 0 to /dev/null (each rank computes the same text);
    standard error stays, so a rank's own error still shows. Returns whether this is rank 0."""
    if is_main_process():
        return True
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    return False


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (e.g. a prompt that only rank 0 read from stdin)."""
    if not dist.is_initialized():
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- the layout ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How the model is split, and where this rank sits in the split."""

    ep: int = 1
    tp: int = 1
    ep_rank: int = 0
    tp_rank: int = 0

    def shard(self, name: str, shape: torch.Size | tuple[int, ...], config: ModelConfig) -> tuple[slice, ...]:
        """The part of the full parameter `name` (of `shape`) that this rank holds, as one slice per dim."""
        full = [slice(0, n) for n in shape]
        if is_expert_param(name):
            E = shape[0]
            full[0] = _part(E, self.ep, self.ep_rank)
            f_dim = 2 if name.endswith("moe.w2") else 1  # w1/w3 [E, F, D], w2 [E, D, F]
            full[f_dim] = _part(shape[f_dim], self.tp, self.tp_rank)
        elif name.endswith(("attn.wq.weight", "attn.wk.weight", "attn.wv.weight")):
            full[0] = _part(shape[0], self.tp, self.tp_rank)  # whole heads: rows come head by head
        elif name.endswith("attn.wo.weight"):
            full[1] = _part(shape[1], self.tp, self.tp_rank)
        return tuple(full)

    def experts(self, n_experts: int) -> range:
        s = _part(n_experts, self.ep, self.ep_rank)
        return range(s.start, s.stop)


def _part(n: int, parts: int, index: int) -> slice:
    size = n // parts
    return slice(index * size, (index + 1) * size)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_layout(config: ModelConfig, ep: int, tp: int, world_size: int | None = None) -> None:
    """Raise a ParallelError naming the problem if `config` cannot be split into ep x tp ranks."""
    for name, value in (("ep", ep), ("tp", tp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ParallelError(f"{name} must be a positive integer, got {value!r}")
    if config.n_experts % ep:
        raise ParallelError(
            f"cannot split n_experts={config.n_experts} over ep={ep} ranks: expert parallelism gives every rank "
            f"the same number of whole experts, so ep must divide {config.n_experts} "
            f"(one of {_divisors(config.n_experts)})"
        )
    for what, n in (("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads)):
        if n % tp:
            raise ParallelError(
                f"cannot split {what}={n} over tp={tp} ranks: tensor parallelism gives every rank whole "
                f"query and key/value heads, so tp must divide n_heads={config.n_heads} and "
                f"n_kv_heads={config.n_kv_heads} (one of {_divisors(config.n_kv_heads)})"
            )
    if config.hidden_dim % tp:
        raise ParallelError(
            f"cannot split the experts' hidden_dim={config.hidden_dim} over tp={tp} ranks: tp must divide it"
        )
    if world_size is not None and world_size != ep * tp:
        raise ParallelError(
            f"ep={ep} x tp={tp} needs {ep * tp} processes, but the process group has {world_size}: "
            f"launch with torchrun --nproc-per-node {ep * tp} (or ep x tp = nodes x processes per node)"
        )


@dataclass
class ParallelState:
    """What `parallelize` attaches to the model as `model.parallel`."""

    layout: Layout
    tokens: str
    config: ModelConfig  # the full model's config (model.config becomes this rank's view)
    mesh: Any  # torch.distributed DeviceMesh with dims ("ep", "tp")
    ep_group: Any = None
    tp_group: Any = None
    bytes_read: int = 0  # weights read from disk by `load_model_parallel` on this rank


# ---- applying it to a model -----------------------------------------------------------------------------------


def parallelize(
    model: Transformer, *, ep: int = 1, tp: int = 1, tokens: str = "replicated", mesh: Any = None
) -> Transformer:
    """Split a built single-device model over ep x tp ranks, in place, and return it.

    Each rank keeps its experts and its heads (parameters sliced: build the optimizer afterwards);
    the MoE blocks and attention get the collectives they need. `model.config` becomes this rank's view
    (n_heads and n_kv_heads per rank), so that a KV cache made from it holds this rank's heads; the full
    config is `model.parallel.config`. A model on the meta device works too (see `load_model_parallel`).
    Needs the process group to exist (`init_distributed`); `mesh` defaults to a new DeviceMesh of all
    ranks with dims ("ep", "tp"), and one passed in must have those dims (e.g. a slice of a larger mesh).

    With `tokens="replicated"` every rank must see the same router decisions: seed every rank alike when
    the routers add noise in training (`MoE.router_jitter`).
    """
    if tokens not in TOKENS:
        raise ParallelError(f"tokens={tokens!r} is not one of {TOKENS}")
    if getattr(model, "parallel", None) is not None:
        raise ParallelError("the model is already parallelized")
    config = model.config
    check_layout(config, ep, tp)
    if not dist.is_initialized():
        raise ParallelError("no process group: call mixtral.parallel.init_distributed() first (under torchrun)")
    check_layout(config, ep, tp, dist.get_world_size() if mesh is None else mesh.size())
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = "cuda" if "nccl" in str(dist.get_backend()) else "cpu"
        mesh = init_device_mesh(device_type, (ep, tp), mesh_dim_names=("ep", "tp"))
    layout = Layout(ep, tp, mesh.get_local_rank("ep"), mesh.get_local_rank("tp"))
    state = ParallelState(layout, tokens, config, mesh, mesh.get_group("ep"), mesh.get_group("tp"))

    for name, module, pname, p in list(_named_params(model)):
        slices = layout.shard(name, p.shape, config)
        if any(s.stop - s.start != n for s, n in zip(slices, p.shape, strict=True)):
            # a copy, not a view: the full tensor is freed once nothing else holds it
            part = nn.Parameter(p.detach()[slices].clone(), requires_grad=p.requires_grad)
            setattr(module, pname, part)

    for layer in model.layers:
        if tp > 1:
            attn = layer.attn
            attn.n_heads //= tp
            attn.n_kv_heads //= tp
            attn.register_forward_pre_hook(_AttentionInput(state.tp_group))
            attn.wo.register_forward_hook(_AttentionOutput(state.tp_group))
        if ep > 1 or tp > 1:
            layer.moe.dispatch_hook = ParallelExperts(state)
    model.parallel = state
    model.config = config.replace(n_heads=config.n_heads // tp, n_kv_heads=config.n_kv_heads // tp)
    return model


@torch.no_grad()
def gather_model(model: Transformer) -> Transformer | None:
    """The whole model, put together from every rank's shards, as a single-device model on rank 0's CPU
    (e.g. for `save_model` after parallel training); None on the other ranks. Every rank must call it.
    One parameter at a time travels, so no rank holds more than one full parameter beyond its shards."""
    state: ParallelState = model.parallel
    config, layout = state.config, state.layout
    world = dist.get_world_size()
    # Where each rank sits in the mesh, to know which slice its shard is.
    coords = [None] * world
    dist.all_gather_object(coords, (layout.ep_rank, layout.tp_rank))
    main = dist.get_rank() == 0
    full = Transformer.skeleton(config)
    full_shapes = {name: p.shape for name, p in full.named_parameters()}
    gathered: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        shard = p.detach().contiguous()
        pieces = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(pieces, shard)
        if not main:
            continue
        out = torch.empty(full_shapes[name], dtype=shard.dtype)
        for (ep_rank, tp_rank), piece in zip(coords, pieces, strict=True):
            where = Layout(layout.ep, layout.tp, ep_rank, tp_rank).shard(name, full_shapes[name], config)
            out[where] = piece.cpu()
        gathered[name] = out
    if not main:
        return None
    full.load_state_dict(gathered, strict=True, assign=True)
    return full.eval()


def _named_params(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            yield (f"{mname}.{pname}" if mname else pname), module, pname, p


def reduce_gradients(model: Transformer) -> None:
    """After backward with tokens="sharded": average the gradients over the EP group, as DDP would.

    Replicated parameters (attention, norms, routers, embeddings) get the mean of the ranks' gradients;
    each expert already received the gradients of every rank's tokens through the all-to-all, summed, so
    it is divided by ep. With tokens="replicated" there is nothing to do.
    """
    state: ParallelState = model.parallel
    ep = state.layout.ep
    if state.tokens == "replicated" or ep == 1:
        return
    replicated = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # every rank must take part in the same reduction
        if is_expert_param(name):
            p.grad.div_(ep)
        else:
            replicated.append(p.grad)
    for dtype in sorted({g.dtype for g in replicated}, key=str):  # one all-reduce per dtype
        grads = [g for g in replicated if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=state.ep_group)
        flat.div_(ep)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_grad_norm(model: Transformer, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a parallelized model, after `reduce_gradients`: the norm of the
    whole model's gradient, the same on every rank. A parameter split over ranks (experts over EP and TP,
    attention heads over TP) counts with every rank's shard; a replicated one, equal on every rank, once."""
    state: ParallelState = model.parallel
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    if not grads:
        return torch.zeros(())
    device = next(iter(grads.values())).device
    # Squared norms in float32: [replicated, split over TP only (attention), split over EP and TP (experts)].
    sq = torch.zeros(3, dtype=torch.float32, device=device)
    for name, g in grads.items():
        n2 = torch.linalg.vector_norm(g.float()) ** 2
        if is_expert_param(name):
            sq[2] += n2
        elif name.endswith(("attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "attn.wo.weight")):
            sq[1] += n2
        else:
            sq[0] += n2
    experts = sq[2:].clone()
    dist.all_reduce(experts, group=state.ep_group)
    split = sq[1:2] + experts
    dist.all_reduce(split, group=state.tp_group)
    total = (sq[0] + split[0]).sqrt()
    # As torch does: scale by max_norm / (norm + 1e-6) when that is below 1.
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads.values():
        g.mul_(coef.to(g.dtype))
    return total


# ---- autograd-aware collectives ----------------------------------------------------------------------------------


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; gradient all-reduced backward: the input of a part split over the group, to
    which every rank's shard contributes a partial gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward: the partial outputs of a split part, whose sum every
    rank then uses alike."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_group(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _CopyToGroup.apply(x, group) if _needs_grad(x) else x


def sum_over_group(x: torch.Tensor, group: Any) -> torch.Tensor:
    if _needs_grad(x):
        return _SumOverGroup.apply(x, group)
    x = x.contiguous()
    dist.all_reduce(x, group=group)  # in place: x is a fresh partial result nobody else holds
    return x


def _all_to_all_raw(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with its gradient: the same exchange backwards, splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all_raw(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        return _all_to_all_raw(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    """Send rows x[sum(in_splits[:r]) : ...] to rank r; receive out_splits[r] rows from rank r, in rank order."""
    if _needs_grad(x):
        return _AllToAll.apply(x, out_splits, in_splits, group)
    return _all_to_all_raw(x, out_splits, in_splits, group)


def _chunk(n: int, parts: int, index: int) -> tuple[int, int]:
    """Rows [lo, hi) of n rows that rank `index` of `parts` takes (the last ranks may get fewer, or none)."""
    size = -(-n // parts)
    lo = min(index * size, n)
    return lo, min(lo + size, n)


def _gather_rows(x: torch.Tensor, n: int, group: Any) -> torch.Tensor:
    """Every rank's chunk of n rows (see `_chunk`), concatenated in rank order: the n rows on every rank."""
    parts = dist.get_world_size(group)
    size = -(-n // parts)
    padded = x.new_zeros((size, *x.shape[1:]))
    padded[: x.shape[0]] = x
    pieces = [torch.empty_like(padded) for _ in range(parts)]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat(pieces)[:n]


class _Split(torch.autograd.Function):
    """Replicated rows -> this rank's chunk; backward gathers the chunks' gradients (every rank's rows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any, rank: int, parts: int) -> torch.Tensor:
        ctx.n, ctx.group = x.shape[0], group
        lo, hi = _chunk(x.shape[0], parts, rank)
        return x[lo:hi].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _gather_rows(grad.contiguous(), ctx.n, ctx.group), None, None, None


class _Gather(torch.autograd.Function):
    """This rank's chunk -> all n rows, replicated; backward keeps this rank's chunk of the gradient (every
    rank holds the same gradient of replicated rows, so nothing is summed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int, group: Any, rank: int, parts: int) -> torch.Tensor:
        ctx.bounds = _chunk(n, parts, rank)
        return _gather_rows(x, n, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        lo, hi = ctx.bounds
        return grad[lo:hi].clone(), None, None, None, None


# ---- the parallel pieces of the model -------------------------------------------------------------------------


class _AttentionInput:
    """Forward pre-hook of a tensor-parallel Attention: its input feeds heads split over the group."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        return (copy_to_group(x, self.group), *rest)


class _AttentionOutput:
    """Forward hook of wo (row parallel): each rank's heads give a partial sum; one all-reduce makes it whole."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return sum_over_group(out, self.group)


class ParallelExperts:
    """The MoE dispatch hook (`MoE.dispatch_hook`) for EP and TP. The local expert computation is whichever
    path the model chose (`local`: grouped, reference or the Triton kernel), run on this rank's experts."""

    def __init__(self, state: ParallelState) -> None:
        self.ep, self.tp = state.layout.ep, state.layout.tp
        self.ep_rank = state.layout.ep_rank
        self.ep_group, self.tp_group = state.ep_group, state.tp_group
        self.replicated = state.tokens == "replicated"

    def __call__(
        self, x_TD: torch.Tensor, stack: Experts, routing: Routing, local: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        weights_TK, idx_TK = routing
        if self.tp > 1:
            # Every TP rank computes part of F for all its tokens: the gradients of x and of the router
            # weights are partial on each rank and summed backwards.
            x_TD, weights_TK = copy_to_group(x_TD, self.tp_group), copy_to_group(weights_TK, self.tp_group)
        T = x_TD.shape[0]
        if self.ep == 1:
            out_TD = local(x_TD, stack, Routing(weights_TK, idx_TK))
        else:
            if self.replicated:
                lo, hi = _chunk(T, self.ep, self.ep_rank)
                x_TD = _split(x_TD, self.ep_group, self.ep_rank, self.ep)
                weights_TK = _split(weights_TK, self.ep_group, self.ep_rank, self.ep)
                idx_TK = idx_TK[lo:hi]
            out_TD = self._exchange(x_TD, stack, Routing(weights_TK, idx_TK), local)
        if self.tp > 1:
            out_TD = sum_over_group(out_TD, self.tp_group)
        if self.ep > 1 and self.replicated:
            if _needs_grad(out_TD):
                out_TD = _Gather.apply(out_TD, T, self.ep_group, self.ep_rank, self.ep)
            else:
                out_TD = _gather_rows(out_TD, T, self.ep_group)
        return out_TD

    def _exchange(
        self, x_TD: torch.Tensor, stack: Experts, routing: Routing, local: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        """Send each (token, expert) pair to the rank holding the expert, run the experts there, bring the
        results back, weight and sum them: `ops.experts`' grouping with an all-to-all on each side."""
        T = routing.idx_TK.shape[0]
        n_local = stack.n
        n_experts = n_local * self.ep
        flat = routing.idx_TK.reshape(-1)
        order, token_of = ops.pairs_by_expert(routing.idx_TK)  # grouped by expert, hence by the rank holding it
        counts = torch.bincount(flat, minlength=n_experts)  # pairs this rank sends to each expert
        # From each rank, how many pairs it sends to each of this rank's experts: [ep * n_local].
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.ep_group)
        send = counts.view(self.ep, n_local).sum(1).tolist()
        recv = recv_counts.view(self.ep, n_local).sum(1).tolist()
        x_recv = all_to_all(x_TD[token_of], recv, send, self.ep_group)
        # Received rows come by source rank, then by local expert: each is one pair with weight 1 for its expert.
        local_idx = torch.repeat_interleave(
            torch.arange(n_local, device=flat.device).repeat(self.ep), recv_counts
        ).view(-1, 1)
        ones = torch.ones(local_idx.shape, dtype=torch.float32, device=flat.device)
        y_recv = local(x_recv, stack, Routing(ones, local_idx))
        if _needs_grad(x_recv) and not y_recv.requires_grad:
            # No pair came to this rank's experts, so no expert ran and the result is outside the graph: tie
            # it back in (adding 0) so that this rank, too, runs both all-to-alls backward, in step with the rest.
            y_recv = y_recv + x_recv.sum().to(y_recv.dtype) * 0
        ys = all_to_all(y_recv, send, recv, self.ep_group)
        # Weighted and summed in float32 on the token's own rank, as in `ops.experts`.
        return ops.combine([ys], routing.weights_TK.reshape(-1)[order], token_of, T)


def _split(x: torch.Tensor, group: Any, rank: int, parts: int) -> torch.Tensor:
    if _needs_grad(x):
        return _Split.apply(x, group, rank, parts)
    lo, hi = _chunk(x.shape[0], parts, rank)
    return x[lo:hi]


# ---- loading each rank's shard --------------------------------------------------------------------------------


def load_model_parallel(
    path: str | os.PathLike,
    *,
    ep: int = 1,
    tp: int = 1,
    tokens: str = "replicated",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> Transformer:
    """`load_model` for one rank of an ep x tp layout: the model is built on the meta device, parallelized,
    and only this rank's part of each tensor is read from the memory-mapped files (the experts it holds,
    the rows or columns of its heads and of its share of F). Strict, like `load_model`: every stored
    tensor must have a place and every parameter must be covered exactly once (the other ranks' experts
    are checked by shape, not read). `model.parallel.bytes_read` says how much this rank read."""
    ckpt = find_checkpoint(path)
    if ckpt.layout == "quantized":
        raise CheckpointError(
            f"{path} is quantized: --ep/--tp split a floating-point checkpoint; load it in one process"
        )
    config = ckpt.config
    check_layout(config, ep, tp)
    model = Transformer.skeleton(config)
    full_shapes = {name: p.shape for name, p in model.named_parameters()}
    parallelize(model, ep=ep, tp=tp, tokens=tokens)
    layout: Layout = model.parallel.layout
    model.parallel.bytes_read = load_weights(
        model,
        ckpt,
        full_shapes,
        dtype=dtype or stored_dtype(ckpt),
        device=device,
        progress=False if progress is None and not is_main_process() else progress,
        shard=partial(layout.shard, config=config),
    )
    return model.eval()
