"""`mixtral eval`: lm-eval's tasks in process on the loaded model (`--tasks`, `lm.py`), or the held-out loss and
bits per character on text files (`--text`, as `mixtral train` reports them: `train/cli.py`).

Kept light at import time (no lm-eval) so that `mixtral --help` stays fast and works without the extra.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import cli_args
from ..cli_args import CLIError


def add_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `eval` on the `mixtral` command's subparsers."""
    p = subparsers.add_parser(
        "eval",
        help="score the model: lm-eval tasks (--tasks), or held-out loss and bits per character (--text)",
        description="With --tasks: run lm-eval's tasks (multiple choice, perplexity, generation) on the loaded model "
        "with our own forward pass and generation, batched; print lm-eval's table and optionally write its results "
        "as JSON (needs the eval extra: pip install 'mixtral[eval]'). With --text: mean next-token loss and bits per "
        "character on text files (each file a document, packed into sequences of --seq-len tokens), as `mixtral "
        "train` reports them.",
    )
    cli_args.add_model_flags(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", nargs="+", metavar="FILE", help="text files (wildcards allowed): loss and bits/char")
    what.add_argument(
        "--tasks",
        nargs="+",
        metavar="NAME",
        help="lm-eval task or group names (space- or comma-separated), e.g. hellaswag arc_easy",
    )
    p.add_argument("--num-fewshot", type=int, metavar="N", help="examples in each prompt (default: each task's own)")
    p.add_argument(
        "--limit",
        type=float,
        metavar="N",
        help="documents per task: a count, or a fraction below 1 (default: all; for quick checks only)",
    )
    p.add_argument(
        "--batch-size",
        type=cli_args.positive_int,
        default=8,
        metavar="N",
        help="requests (--text: sequences) per forward pass (default: 8)",
    )
    p.add_argument(
        "--seq-len",
        type=cli_args.positive_int,
        help="--text: tokens per sequence, at most the model's context (default: it)",
    )
    p.add_argument("--output", metavar="FILE", help="write lm-eval's results as JSON here (atomically)")
    p.add_argument(
        "--include-path", metavar="DIR", help="a folder of task YAML files of your own, beside lm-eval's tasks"
    )
    p.add_argument(
        "--lora",
        metavar="DIR",
        help="a LoRA adapter to evaluate, applied without merging: PEFT's format or `mixtral train`'s out_dir/adapter",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of few-shot sampling and sampled generation (default: 0)")
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> None:
    if args.text is not None:
        from ..train.cli import cmd_eval_text

        tasks_only = [f for f in ("num_fewshot", "limit", "output", "include_path", "lora") if getattr(args, f)]
        if tasks_only or args.quantize or args.ep > 1 or args.tp > 1:
            flags = [f"--{f.replace('_', '-')}" for f in tasks_only]
            raise CLIError(f"--text computes the loss of the stored model; {flags or '--quantize/--ep/--tp'} go "
                           "with --tasks")  # fmt: skip
        cmd_eval_text(args)
        return
    if args.seq_len is not None:
        raise CLIError("--seq-len goes with --text; lm-eval's tasks (--tasks) use the model's context")
    if args.ep > 1 or args.tp > 1:
        raise CLIError("mixtral eval runs in one process: without --ep/--tp")
    tasks = [t for item in args.tasks for t in item.split(",") if t]
    if not tasks:
        raise CLIError("--tasks names no task")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise CLIError(f"--num-fewshot {args.num_fewshot} is invalid: must be >= 0")
    if args.limit is not None and not (args.limit > 0 and (args.limit < 1 or args.limit.is_integer())):
        raise CLIError(f"--limit {args.limit:g} is invalid: a whole number >= 1, or a fraction in (0, 1)")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise CLIError(f"--include-path {args.include_path} is not a folder")
    if args.output is not None and Path(args.output).is_dir():
        raise CLIError(f"--output {args.output} is a folder; give a file name")
    if args.lora:
        from ..train.lora import adapter_format

        adapter_format(args.lora)  # before the model loads: a ValueError naming what is wrong
    try:
        from . import lm
    except ImportError as e:
        raise CLIError(str(e)) from None

    model, tokenizer = cli_args.load(args)
    if args.lora:
        apply_adapter(model, args.lora)
    limit = None if args.limit is None else args.limit if args.limit < 1 else int(args.limit)
    harness = lm.MixtralLM(model, tokenizer, batch_size=args.batch_size)
    results = lm.evaluate(
        harness, tasks, num_fewshot=args.num_fewshot, limit=limit, include_path=args.include_path, seed=args.seed
    )
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output is not None:
        lm.write_results(results, args.output)
        print(f"mixtral eval: results written to {args.output}", file=sys.stderr)


def apply_adapter(model, path: str) -> None:
    """The adapter at `path` on `model`, un-merged: as `mixtral generate --lora` applies it to a floating-point
    model; on a quantized one as `mixtral serve --lora` serves it (the delta added to the quantized weights' output)."""
    from ..quantize import quantization_of

    if quantization_of(model) is None:
        from ..train.lora import load_adapter

        load_adapter(model, path)
        return
    from ..serve.adapters import AdapterBank

    bank = AdapterBank.load(model, {"adapter": path})
    bank.select([bank.index("adapter")])  # one slot: every row of every step
