"""The training loop: AdamW with warmup + cosine decay, gradient clipping and accumulation, bf16 autocast,
activation checkpointing, the MoE auxiliary losses, periodic evaluation, and exact resume from atomic
checkpoints.

With `ep` > 1 (under torchrun) the experts are split over the processes (`parallel.parallelize`, tokens
"sharded") and each process trains on its own rows of every batch (rank r takes rows r::ep). Each process
computes the losses over the whole batch, pooling sums over the ranks (`parallel.sum_over_group`, identity
backward), so its backward pass reaches only its own tokens; it back-propagates ep x loss, and
`reduce_gradients` averages over the ranks: the sum of the ranks' parts, i.e. the gradient one process
would get for the whole batch. The gradient norm for clipping is the whole model's.

With `tp` > 1 each group of tp processes splits the attention heads and every expert's hidden units
(`parallelize`'s tensor parallelism) and trains on the same rows: the tp ranks of one group compute the
same losses, and their gradients of the replicated parameters are already whole (the collectives' backward
sums the partial ones). ep x tp processes in all; the rows of a batch are split over the ep groups."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from .. import parallel
from ..checkpoint import load_model, resolve_checkpoint, save_model
from ..config import ModelConfig, get_preset
from ..model import Transformer
from ..tokenizer import load_tokenizer
from .data import Loader, PackedSequences, expand_paths, load_tokenized, split_heldout
from .lora import ATTENTION_TARGETS, apply_lora, save_adapter
from .loss import cross_entropy, expert_load, first_choice_load, load_balancing_loss, router_z_loss

STATE_FILE = "train_state.pt"
# What a run writes into its out_dir; beside them the temporary and set-aside copies of each (.NAME.tmp-*,
# .NAME.old-*) that a kill during a swap may leave.
RUN_ENTRIES = ("checkpoint", "metrics.jsonl", "model", "adapter", "tensorboard")


class ResumeError(ValueError):
    """No usable checkpoint to resume from; nothing was changed."""


class RunExistsError(FileExistsError, ValueError):
    """A new run's out_dir already holds a run (neither resume nor force asked for); nothing was changed."""


def rank_state_file(rank: int, world: int) -> str:
    """The training state of one rank of `world` parallel processes, inside the checkpoint folder."""
    return f"train_state.rank{rank}-of-{world}.pt"


def _gather_errors(error: BaseException | None) -> list[str]:
    """Every rank's error message (none where a rank succeeded), so that all ranks fail together."""
    messages: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(messages, None if error is None else str(error))
    return [m for m in messages if m is not None]


@dataclass
class TrainConfig:
    """Everything a run depends on; a TOML file's keys are these field names (plus a [model] table)."""

    data: list[str] = field(default_factory=list)
    out_dir: str = "runs/train"
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's fields
    init_from: str | None = None  # a checkpoint to start from instead of random weights
    tokenizer: str | None = None
    eval_data: list[str] = field(default_factory=list)
    eval_fraction: float = 0.05
    split: str = "file"  # "file" or "paragraph": what a document is in a text file
    data_cache: str | None = "~/.cache/mixtral/data"
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.02
    first_choice_aux_coef: float = 0.0
    balance_per_layer: bool = False
    z_loss_coef: float = 0.0
    router_jitter: float = 0.0
    dtype: str = "float32"  # "bfloat16": autocast; master weights stay float32
    activation_checkpointing: bool = False
    device: str = "cpu"
    seed: int = 0
    checkpoint_every: int = 200
    eval_every: int = 200
    eval_batches: int = 0  # 0: the whole held-out set
    log_every: int = 10
    resume: bool = False
    force: bool = False  # start over in an out_dir that holds a run: its RUN_ENTRIES are removed first
    ep: int = 1  # expert parallelism: processes (under torchrun) that split the experts and each batch
    tp: int = 1  # tensor parallelism: not supported for training (must be 1)
    lora_rank: int = 0  # 0: full training
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))

    def __post_init__(self) -> None:
        positive = ("seq_len", "batch_size", "grad_accum", "steps", "checkpoint_every", "eval_every", "log_every")
        positive += ("ep", "tp")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be an integer >= 1")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction!r} is invalid: must be in (0, 1)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} is invalid: choose float32 or bfloat16")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is invalid: must be > 0")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup!r} is invalid: must be >= 0")
        if not self.data:
            raise ValueError("no training data: give --data FILE... (text or JSONL)")
        if self.batch_size % self.ep:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by ep={self.ep}: each of the {self.ep} "
                f"expert-parallel processes trains on batch_size / ep sequences of every batch; "
                f"choose a multiple of {self.ep}"
            )
        if self.resume and self.force:
            raise ValueError(
                "resume and force do not combine: --resume continues the run in out_dir, --force starts it over"
            )
        if (self.ep > 1 or self.tp > 1) and self.lora_rank:
            raise ValueError(
                f"LoRA (lora_rank={self.lora_rank}) is not supported with parallel training (ep={self.ep}, "
                f"tp={self.tp}): fine-tune LoRA adapters in one process"
            )

    def model_config(self) -> ModelConfig:
        return get_preset(self.preset).replace(**self.model)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio x peak at the last step."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def enable_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them."""
    for layer in model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


class Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.out_dir).expanduser()
        self.device = torch.device(cfg.device)
        self.ep, self.tp, self.ep_rank, self.group = cfg.ep, cfg.tp, 0, None
        self.world, self.rank = cfg.ep * cfg.tp, 0
        self.distributed = self.world > 1
        if self.distributed:
            self.device = parallel.init_distributed(self.device.type)  # cuda:LOCAL_RANK with NCCL, or gloo
        self.main = parallel.is_main_process()
        self.progress = progress and self.main
        torch.manual_seed(cfg.seed)  # the same on every rank: the same initial model
        # a folder, a .gguf file, a Hugging Face id or "builtin"
        init_from = resolve_checkpoint(cfg.init_from) if cfg.init_from else None
        self.tokenizer = load_tokenizer(cfg.tokenizer or init_from)
        if init_from and self.distributed:
            self.model = parallel.load_model_parallel(
                init_from, ep=cfg.ep, tp=cfg.tp, tokens="sharded", dtype=torch.float32, device=self.device
            )
        elif init_from:
            self.model = load_model(init_from, dtype=torch.float32, device=self.device)
        else:
            with torch.device(self.device):
                self.model = Transformer(cfg.model_config())
            if self.distributed:
                parallel.parallelize(self.model, ep=cfg.ep, tp=cfg.tp, tokens="sharded")
        if self.distributed:
            self.ep_rank, self.group = self.model.parallel.layout.ep_rank, self.model.parallel.ep_group
            self.rank = torch.distributed.get_rank()
            # Router jitter: each EP rank draws its own noise; the TP ranks of a group draw the same (same tokens).
            torch.manual_seed(cfg.seed + self.ep_rank)
        mc = self.model.config
        if self.tokenizer.vocab_size > mc.vocab_size:
            raise ValueError(
                f"the tokenizer's {self.tokenizer.vocab_size} tokens exceed the model's vocabulary of {mc.vocab_size}"
            )
        if cfg.seq_len > mc.max_seq_len:
            raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's context of {mc.max_seq_len}")
        for layer in self.model.layers:
            layer.moe.router_jitter = cfg.router_jitter
        self.model.keep_router_logits = True
        self.model.train()
        if cfg.lora_rank:
            trainable = apply_lora(self.model, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets))
        else:
            trainable = list(self.model.parameters())
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(self.model)

        cache = cfg.data_cache and Path(cfg.data_cache).expanduser()
        data = load_tokenized(expand_paths(cfg.data), self.tokenizer, cfg.split, cache)
        if cfg.eval_data:
            eval_data = load_tokenized(expand_paths(cfg.eval_data), self.tokenizer, cfg.split, cache)
            train_data = data
        else:
            train_data, eval_data = split_heldout(data, cfg.eval_fraction, cfg.seed)
        self.train_seqs = PackedSequences(train_data, cfg.seq_len)
        self.eval_seqs = PackedSequences(eval_data, cfg.seq_len)
        self.loader = Loader(self.train_seqs, cfg.batch_size, cfg.seed)

        decay = [p for p in trainable if p.dim() >= 2]
        no_decay = [p for p in trainable if p.dim() < 2]  # norms
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.95),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.step = 0

    # ---- checkpoints -----------------------------------------------------------------------------------

    def _state(self) -> dict:
        return {
            "step": self.step,
            "model": {k: v for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": dataclasses.asdict(self.cfg),
        }

    def _state_file(self) -> str:
        """This rank's file in a checkpoint folder: one per rank when parallel."""
        return STATE_FILE if not self.distributed else rank_state_file(self.rank, self.world)

    def save_checkpoint(self) -> None:
        """Write the whole training state to out/checkpoint, atomically (temp folder, then rename). Under
        expert parallelism rank 0 makes the temp folder, every rank writes its own file into it, and rank 0
        renames it into place once all have written."""
        dest = self.out / "checkpoint"
        tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.tmp-", dir=self.out)) if self.main else None
        if self.distributed:
            tmp = Path(parallel.broadcast_from_main(str(tmp)))
        try:
            error = None
            try:
                _save_synced(self._state(), tmp / self._state_file())
            except Exception as e:  # the other ranks must learn of it, or they would wait for this one
                error = e
            if self.distributed:
                errors = _gather_errors(error)
                if errors and error is None:
                    raise RuntimeError(f"checkpoint not saved: another rank failed: {errors[0]}")
            if error is not None:
                raise error
            if self.main:
                _swap_into_place(tmp, dest)
        except BaseException:
            if self.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if self.distributed:
                torch.distributed.barrier()  # the checkpoint is in place before any rank goes on

    def load_checkpoint(self) -> None:
        """Restore everything from the newest complete training state (`newest_checkpoint`: out/checkpoint,
        or what a kill during its swap left beside it); raises ResumeError (changing nothing) if it can't.
        Once it is read, it is renamed to out/checkpoint if it was not there, and stale copies are removed.
        Under expert parallelism rank 0 picks the folder, each rank reads its own file, and if any rank
        cannot, every rank raises."""
        folder = Path(parallel.broadcast_from_main(str(newest_checkpoint(self.out)) if self.main else None))
        if not self.distributed:
            self._load_checkpoint(folder)
        else:
            error = None
            try:
                self._load_checkpoint(folder)
            except Exception as e:  # the other ranks must learn of it, or they would wait for this one
                error = e
            errors = _gather_errors(error)
            if error is not None:
                raise error
            if errors:
                raise ResumeError(f"cannot resume: another rank failed: {errors[0]}")
        if self.main:
            _settle_checkpoint(self.out, folder)
        if self.distributed:
            torch.distributed.barrier()

    def _load_checkpoint(self, folder: Path) -> None:
        path = folder / self._state_file()
        if not path.is_file():
            others = sorted(p.name for p in folder.glob("train_state*.pt")) if folder.is_dir() else []
            if others:
                n = 1 if others == [STATE_FILE] else len(others)
                raise ResumeError(
                    f"cannot resume: {folder} was written by {n} process(es), but this run has {self.world} "
                    f"(ep={self.ep}, tp={self.tp}): resume with the same --ep and --tp"
                    + (f" under torchrun --nproc-per-node {n}" if n > 1 else "")
                )
            raise ResumeError(f"cannot resume: no checkpoint at {path}")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
            step = int(state["step"])
            model_state, optim_state = state["model"], state["optimizer"]
        except Exception as e:
            raise ResumeError(f"cannot resume: {path} is unreadable (truncated or corrupt?): {e}") from None
        saved = {k: v for k, v in state.get("config", {}).items() if k in ("preset", "model", "lora_rank")}
        now = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k in saved}
        if saved != now:
            raise ResumeError(f"cannot resume: {path} was written for a different model ({saved} vs {now})")
        saved_layout = tuple(state.get("config", {}).get(k, 1) for k in ("ep", "tp"))
        if saved_layout != (self.ep, self.tp):
            raise ResumeError(
                f"cannot resume: {path} was written with ep={saved_layout[0]}, tp={saved_layout[1]}, but this "
                f"run has ep={self.ep}, tp={self.tp}"
            )
        try:
            self.model.load_state_dict(model_state, strict=True)
        except RuntimeError as e:
            raise ResumeError(f"cannot resume: {path} does not fit this model: {e}") from None
        self.optimizer.load_state_dict(optim_state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = step

    # ---- steps -----------------------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.dtype == "bfloat16")

    def train_step(self) -> dict[str, float]:
        cfg, mc = self.cfg, self.model.config
        ce_sum = aux_sum = aux1_sum = z_sum = 0.0
        loads, firsts = [], []
        for _ in range(cfg.grad_accum):
            # Every rank draws the same batch and keeps its own rows.
            inputs, targets, mask = (t[self.ep_rank :: self.ep].to(self.device) for t in self.loader.next())
            with self._autocast():
                logits = self.model(inputs)
            router = self.model.router_logits
            if self.ep == 1:
                ce = cross_entropy(logits, targets, mask)
                aux = load_balancing_loss(router, mc.n_experts, mc.top_k, per_layer=cfg.balance_per_layer)
                aux1 = (
                    load_balancing_loss(router, mc.n_experts, 1, per_layer=cfg.balance_per_layer)
                    if cfg.first_choice_aux_coef
                    else torch.zeros(())
                )
                z = router_z_loss(router) if cfg.z_loss_coef else torch.zeros(())
            else:
                ce, aux, aux1, z = self._global_losses(logits, targets, mask, router)
            loss = ce + cfg.aux_loss_coef * aux + cfg.first_choice_aux_coef * aux1 + cfg.z_loss_coef * z
            # ep x: reduce_gradients averages the ranks' parts of the gradient, which add up to the whole.
            (loss * self.ep / cfg.grad_accum).backward()
            ce_sum, aux_sum, z_sum = ce_sum + ce.item(), aux_sum + aux.item(), z_sum + z.item()
            aux1_sum += aux1.item()
            loads.append(expert_load(router, mc.n_experts, mc.top_k))
            firsts.append(first_choice_load(router, mc.n_experts))
        if not self.distributed:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            parallel.reduce_gradients(self.model)
            grad_norm = parallel.clip_grad_norm(self.model, cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        load, first = torch.stack(loads).mean(0), torch.stack(firsts).mean(0)
        if self.ep > 1:  # every rank routes as many tokens: the mean of the ranks' shares
            load = parallel.sum_over_group(load, self.group) / self.ep
            first = parallel.sum_over_group(first, self.group) / self.ep
        n = cfg.grad_accum
        return {
            "step": self.step,
            "loss": ce_sum / n,
            "aux_loss": aux_sum / n,
            "first_choice_aux_loss": aux1_sum / n,
            "z_loss": z_sum / n,
            "grad_norm": float(grad_norm),
            "lr": self.scheduler.get_last_lr()[0],
            # the busiest expert's share of the routed tokens relative to a fair share (1.0 = balanced)
            "max_load": float(load.max() * mc.n_experts),
            "max_load_by_layer": [round(x, 3) for x in (load.max(dim=1).values * mc.n_experts).tolist()],
            # per layer and expert: share of the routed (token, slot) pairs, and of the tokens' first choices
            "expert_load": [[round(x, 4) for x in row] for row in load.tolist()],
            "first_choice_load": [[round(x, 4) for x in row] for row in first.tolist()],
        }

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return parallel.sum_over_group(x, self.group)

    def _global_losses(
        self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, router: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The losses over every rank's rows together, equal on every rank; each rank's gradient through them
        reaches only its own tokens (the pooling sums backward as the identity)."""
        mc = self.model.config
        count = mask.sum().float()
        # The ranks' target counts differ when chat masks do: weight each rank's mean by its count.
        ce = self._pool(cross_entropy(logits, targets, mask) * count) / self._pool(count.clone()).clamp(min=1)
        per_layer = self.cfg.balance_per_layer
        aux = load_balancing_loss(router, mc.n_experts, mc.top_k, pool=self._pool, per_layer=per_layer)
        aux1 = (
            load_balancing_loss(router, mc.n_experts, 1, pool=self._pool, per_layer=per_layer)
            if self.cfg.first_choice_aux_coef
            else torch.zeros(())
        )
        # Every rank routes as many tokens: the z-loss is the mean of the ranks' means.
        z = self._pool(router_z_loss(router)) / self.ep if self.cfg.z_loss_coef else torch.zeros(())
        return ce, aux, aux1, z

    def evaluate(self) -> dict[str, float]:
        # Under expert parallelism every rank runs the whole eval batch (each dispatches its own copy of the
        # tokens), so all ranks get the same numbers and run the same forward passes.
        out = evaluate(self.model, self.eval_seqs, self.cfg.batch_size, self.cfg.eval_batches, self._autocast)
        return {"step": self.step, **out}

    # ---- the run ---------------------------------------------------------------------------------------

    def run(self) -> dict[str, float]:
        cfg = self.cfg
        if cfg.resume:
            self.load_checkpoint()  # raises before anything in out_dir is touched
        else:
            self._claim_out_dir()  # raises if out_dir holds a run (unless force: then it is removed)
        self.out.mkdir(parents=True, exist_ok=True)
        log = tb = None  # rank 0 writes the metrics (global values, the same on every rank)
        if self.main:
            log_path = self.out / "metrics.jsonl"
            records = _read_log(log_path) if cfg.resume else []
            # A killed run may have logged steps past its last checkpoint: those are redone, so drop them.
            _write_atomic(log_path, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= self.step))
            log = open(log_path, "a")  # noqa: SIM115 - closed in the finally below
            tb = _tensorboard(self.out)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", disable=not self.progress, unit="step")
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        last = {}
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                metrics = self.train_step()
                metrics["tokens_per_s"] = tokens_per_step / (time.perf_counter() - t0)
                last = metrics
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}",
                    aux=f"{metrics['aux_loss']:.3f}",
                    tok_s=f"{metrics['tokens_per_s']:.0f}",
                    load=f"{metrics['max_load']:.2f}",
                )
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    _log(log, tb, metrics)
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    ev = self.evaluate()
                    _log(log, tb, ev)
                    last.update(ev)
                    bpc = f", bits/char {ev['eval_bpc']:.3f}" if "eval_bpc" in ev else ""
                    if self.main:
                        bar.write(f"step {self.step}: held-out loss {ev['eval_loss']:.4f}{bpc}")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            if log is not None:
                log.close()
            if tb is not None:
                tb.close()
        self.save_final()
        return last

    def _claim_out_dir(self) -> None:
        """A new run: out_dir must not hold a run (it would be overwritten), unless `force`, which removes the
        run's own entries first and nothing else. Rank 0 decides; every rank raises."""
        message = None
        if self.main:
            found = run_entries(self.out)
            if found and self.cfg.force:
                for entry in found:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            elif found:
                names = ", ".join(_entry_name(p) for p in found)
                step = _complete_step(self.out / "checkpoint")
                what = names if step is None else names.replace("checkpoint/", f"checkpoint/ at step {step}", 1)
                message = (
                    f"{self.out} already holds a run ({what}): pass --resume to continue it, or --force to "
                    f"start over (which removes {names} and nothing else)"
                )
        message = parallel.broadcast_from_main(message)
        if message:
            raise RunExistsError(message)

    def save_final(self) -> None:
        if self.cfg.lora_rank:
            save_adapter(self.model, self.out / "adapter")
            return
        model = self.model
        if self.distributed:
            model = parallel.gather_model(self.model)  # every rank sends its shards; rank 0 gets the whole
            if not self.main:
                return
        # the run's own, claimed at its start; with the tokenizer it was trained with (from a GGUF file: its
        # metadata's, rebuilt as a tokenizer.model)
        save_model(model, self.out / "model", tokenizer=self.tokenizer, overwrite=True)


def run_entries(out: Path) -> list[Path]:
    """What a run wrote in `out` (RUN_ENTRIES and the leftovers of their swaps)."""
    found = [out / name for name in RUN_ENTRIES if (out / name).exists() or (out / name).is_symlink()]
    for name in RUN_ENTRIES:
        found += sorted([*out.glob(f".{name}.tmp-*"), *out.glob(f".{name}.old-*")])
    return found


def _entry_name(p: Path) -> str:
    return p.name + ("/" if p.is_dir() else "")


def _save_synced(state: dict, path: Path) -> None:
    torch.save(state, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # on disk before the rename that makes it the checkpoint


def _swap_into_place(new: Path, dest: Path) -> None:
    """Rename the complete folder `new` to `dest`: the previous `dest` is moved aside first (to
    .checkpoint.old-*/c) and removed after. A kill between the two renames leaves no `dest` but both states
    beside it, from which `newest_checkpoint` picks."""
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=".checkpoint.old-", dir=dest.parent))
        os.replace(dest, old / "c")
        os.replace(new, dest)
        shutil.rmtree(old)
    else:
        os.replace(new, dest)


def _complete_step(folder: Path) -> int | None:
    """The step of a complete training state: every process's file there and readable (one cut short by a
    kill is not), all at the same step; None if the folder holds no complete state."""
    files = sorted(folder.glob("train_state*.pt")) if folder.is_dir() else []
    names = {p.name for p in files}
    if names != {STATE_FILE}:  # one file per process: all of one world size
        worlds = {int(m[1]) for n in names if (m := re.fullmatch(r"train_state\.rank\d+-of-(\d+)\.pt", n))}
        if len(worlds) != 1 or names != {rank_state_file(r, w) for w in worlds for r in range(w)}:
            return None
    steps = set()
    for f in files:
        try:  # memory-mapped: the tensors are not read
            steps.add(int(torch.load(f, map_location="cpu", weights_only=True, mmap=True)["step"]))
        except Exception:
            return None
    return steps.pop() if len(steps) == 1 else None


def newest_checkpoint(out: Path) -> Path:
    """The folder holding the newest complete training state in `out`: `checkpoint/`, or a state that a kill
    during a swap left beside it, a new one written in full (.checkpoint.tmp-*) or the previous one moved
    aside (.checkpoint.old-*/c). At the same step, checkpoint/ wins. Without any, out/checkpoint (for the
    loader's message)."""
    candidates = [(1, p) for p in out.glob(".checkpoint.tmp-*")] + [(0, p / "c") for p in out.glob(".checkpoint.old-*")]
    ranked = []
    for order, folder in [(2, out / "checkpoint"), *candidates]:
        step = _complete_step(folder)
        if step is not None:
            ranked.append((step, order, str(folder)))
    return Path(max(ranked)[2]) if ranked else out / "checkpoint"


def _settle_checkpoint(out: Path, folder: Path) -> None:
    """After resuming from `folder`: it becomes out/checkpoint (if it was not), and the stale copies go."""
    dest = out / "checkpoint"
    if folder != dest:
        _swap_into_place(folder, dest)
    for stale in [*out.glob(".checkpoint.tmp-*"), *out.glob(".checkpoint.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)


@torch.no_grad()
def evaluate(
    model: Transformer,
    seqs: PackedSequences,
    batch_size: int,
    max_batches: int = 0,
    autocast=contextlib.nullcontext,
    progress: bool = False,
) -> dict[str, float]:
    """Mean loss per target token over the sequences (the first `max_batches` batches; 0: all) and, for text,
    bits per character: the summed loss in bits divided by the characters those tokens spell. `progress`: a
    bar on stderr."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: must be >= 1")
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    nats, count = 0.0, 0
    n_batches = math.ceil(len(seqs) / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in tqdm(range(n_batches), desc="eval", unit="batch", disable=not progress):
        idx = range(b * batch_size, min((b + 1) * batch_size, len(seqs)))
        inputs, targets, mask = (t.to(device) for t in seqs.batch(idx))
        with autocast():
            logits = model(inputs)
        m = mask.sum().item()
        nats += cross_entropy(logits, targets, mask).item() * m
        count += m
    model.train(was_training)
    loss = nats / max(count, 1)
    out = {"eval_loss": loss}
    if seqs.chars_per_target:
        out["eval_bpc"] = loss / math.log(2) / seqs.chars_per_target
    return out


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _log(log, tb, metrics: dict) -> None:
    if log is None:
        return
    log.write(json.dumps(metrics) + "\n")
    log.flush()
    if tb is not None:
        for k, v in metrics.items():
            if isinstance(v, int | float) and k != "step":
                tb.add_scalar(k, v, metrics["step"])


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional: metrics.jsonl always has everything
        return None
    return SummaryWriter(str(out / "tensorboard"))
