"""`mixtral train` and `mixtral merge-lora`. Flags mirror TrainConfig's fields; `--config FILE.toml` sets
any of them (flags given on the command line win)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
import typing
from pathlib import Path

import torch

from .. import cli_args

HELP = {
    "data": "training data: text files (a document per file, or per blank-line block with --split paragraph) "
    'and/or JSONL files ({"text": ...} or {"messages": [...]} chats, loss on assistant tokens only)',
    "out_dir": "output folder: metrics.jsonl, checkpoint/ (for --resume), model/ (Hugging Face layout) or adapter/",
    "preset": "model shape to train from scratch (see `mixtral init --help`); [model] in the TOML overrides fields",
    "init_from": "start from this checkpoint's weights instead of random ones (fine-tuning): a folder, a .gguf "
    "file, a Hugging Face id, or 'builtin' (the built-in model)",
    "tokenizer": "tokenizer file; default: --init-from's, else Mixtral's v1 tokenizer",
    "eval_data": "held-out files; default: hold out --eval-fraction of the documents",
    "eval_fraction": "fraction of documents held out when no --eval-data is given",
    "split": "what a document is in a text file: 'file' or 'paragraph' (blank-line separated)",
    "data_cache": "folder where tokenized data is cached ('' to turn off)",
    "seq_len": "tokens per training sequence",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step (gradient accumulation)",
    "steps": "optimizer steps in total",
    "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "the cosine decay ends at this fraction of the peak learning rate",
    "warmup": "linear warmup steps",
    "weight_decay": "AdamW weight decay on matrices (not on norms)",
    "grad_clip": "clip the gradient norm to this",
    "aux_loss_coef": "coefficient of the load-balancing loss (Mixtral: 0.02)",
    "first_choice_aux_coef": "coefficient of a second balancing loss over the first choices alone (top-1): the "
    "top-k loss can sit at its minimum while one expert takes most first choices (0: off)",
    "balance_per_layer": "average the balancing losses over layers, each from its own layer's routing (default: "
    "pooled over layers, as transformers computes it, where one layer's skew can offset another's)",
    "z_loss_coef": "coefficient of the router z-loss (0: off)",
    "router_jitter": "multiply router inputs by U(1-j, 1+j) noise while training (0: off)",
    "dtype": "float32, or bfloat16 autocast (master weights stay float32)",
    "activation_checkpointing": "recompute activations in the backward pass to save memory",
    "device": "torch device: cpu, cuda, cuda:1, ...",
    "seed": "random seed (initialisation, data order, held-out split)",
    "checkpoint_every": "save the full training state every N steps (and at the end)",
    "eval_every": "evaluate held-out loss and bits per character every N steps (and at the end)",
    "eval_batches": "held-out batches per evaluation (0: all)",
    "log_every": "write training metrics to metrics.jsonl every N steps",
    "resume": "continue exactly from out_dir/checkpoint (with the same --ep and --tp it was written with); "
    "after a kill during a checkpoint's save, from the newest complete state it left",
    "force": "start over in an out_dir that holds a run: removes its checkpoint/, metrics.jsonl, model/, adapter/ "
    "and tensorboard/ first (nothing else); without --resume or --force such an out_dir is refused",
    "ep": "expert parallelism: split the experts over N processes, each training on batch_size / N sequences "
    "of every batch (launch with torchrun --nproc-per-node N; gloo on CPU, NCCL with --device cuda)",
    "tp": "tensor parallelism: split the attention heads and the experts' hidden units over N processes that "
    "train on the same rows (with --ep M: M x N processes under torchrun)",
    "lora_rank": "LoRA rank; 0 trains all weights",
    "lora_alpha": "LoRA alpha (the adapter is scaled by alpha / rank)",
    "lora_targets": "weights that get adapters: wq wk wv wo (attention) and w1 w2 w3 (experts)",
}


def add_command(sub) -> None:
    from .trainer import TrainConfig

    p = sub.add_parser(
        "train",
        help="pretrain or fine-tune (full or LoRA) on text / JSONL data",
        description="Train with cross-entropy + load-balancing loss, AdamW, warmup + cosine schedule; "
        "atomic checkpoints and exact --resume. Every flag can also be set in --config FILE.toml.",
    )
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with any of the settings below (and [model])")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=HELP[f.name])
        elif typing.get_origin(kind) is list:
            p.add_argument(flag, nargs="+", default=argparse.SUPPRESS, metavar="X", help=HELP[f.name])
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            p.add_argument(flag, type=base, default=argparse.SUPPRESS, help=HELP[f.name])
    cli_args.add_threads_flag(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "merge-lora",
        help="fold a LoRA adapter into its base model and save the result",
        description="Write base + adapter as one checkpoint (Hugging Face layout).",
    )
    p.add_argument(
        "--base",
        required=True,
        metavar="DIR",
        help="the base checkpoint the adapter was trained on ('builtin': the built-in model); the merged model is "
        "stored in its dtype, with its tokenizer",
    )
    p.add_argument("--adapter", required=True, metavar="DIR",
                   help="the adapter folder: out_dir/adapter of a run, or a PEFT LoRA adapter (adapter_config.json + "
                   "adapter_model.safetensors)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the merged checkpoint (see --force)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace whatever is at --out; without it, only a previous output of mixtral or an empty folder "
        "is replaced",
    )
    p.set_defaults(func=cmd_merge_lora)


def config_from_args(args: argparse.Namespace):
    from .trainer import TrainConfig

    values: dict = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        try:
            values = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"--config {path}: {e}") from None
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"--config {path}: unknown settings {unknown}")
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "func", "command", "threads")})
    if values.get("data_cache") == "":
        values["data_cache"] = None
    return TrainConfig(**values)


def cmd_train(args: argparse.Namespace) -> None:
    from .trainer import Trainer

    cfg = config_from_args(args)
    trainer = Trainer(cfg)
    main = trainer.main  # under torchrun, rank 0 speaks for all
    total, active = trainer.model.config.param_counts()
    if main:
        print(
            f"model: {total / 1e6:.1f}M parameters ({active / 1e6:.1f}M active per token); "
            f"data: {len(trainer.train_seqs)} training and {len(trainer.eval_seqs)} held-out sequences of "
            f"{cfg.seq_len}",
            file=sys.stderr,
        )
    last = trainer.run()
    where = "adapter" if cfg.lora_rank else "model"
    summary = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k in ("loss", "eval_loss", "eval_bpc"))
    if main:
        print(f"done: step {trainer.step}; {summary}; saved {trainer.out / where}", file=sys.stderr)


def cmd_merge_lora(args: argparse.Namespace) -> None:
    from ..checkpoint import check_output, find_checkpoint, load_model, resolve_checkpoint, save_model, stored_dtype
    from ..tokenizer import load_tokenizer
    from .lora import adapter_format, load_adapter, merge_lora

    check_output(args.out, overwrite=args.force, force="--force")  # before loading anything
    adapter_format(args.adapter)  # an adapter folder (PEFT's format or ours), before loading the base
    base = resolve_checkpoint(args.base)  # a folder, a .gguf file, a Hugging Face id or "builtin"
    stored = stored_dtype(find_checkpoint(base))
    model = load_model(base, dtype=torch.float32)  # merged in float32, then stored as the base was
    load_adapter(model, args.adapter)
    merged = merge_lora(model).to(stored)
    # the base's tokenizer (its own, a GGUF file's, else Mixtral's v1), so that the output is a whole model folder
    tokenizer = load_tokenizer(base)
    if tokenizer.vocab_size > merged.config.vocab_size:
        tokenizer = None
    save_model(merged, args.out, tokenizer=tokenizer, overwrite=args.force)
    print(f"wrote {args.out}", file=sys.stderr)


def cmd_eval_text(args: argparse.Namespace) -> None:
    """`mixtral eval --text FILE ...` (the command is registered in `eval/cli.py`): held-out loss and bits per
    character, as `mixtral train` reports them."""
    from ..checkpoint import load_model
    from ..tokenizer import load_tokenizer
    from .data import PackedSequences, expand_paths, read_documents, tokenize
    from .trainer import evaluate

    path = cli_args.checkpoint(args)
    model = load_model(path, dtype=cli_args.dtype(args.dtype))
    context = model.config.max_seq_len
    seq_len = context if args.seq_len is None else args.seq_len
    if seq_len > context:
        raise cli_args.CLIError(f"--seq-len {seq_len} is more than the model's context of {context} tokens")
    tokenizer = load_tokenizer(path)
    data = tokenize(read_documents(expand_paths(args.text, what="--text"), what="--text"), tokenizer)
    out = evaluate(model, PackedSequences(data, seq_len), args.batch_size, progress=True)
    bpc = f", bits per character {out['eval_bpc']:.4f}" if "eval_bpc" in out else ""
    print(f"{path}: loss {out['eval_loss']:.4f} nats/token{bpc} ({len(data.tokens)} tokens, sequences of {seq_len})")
