"""The `mixtral` command. Thin: it parses flags and calls the library."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import signal
import sys
import time
from collections.abc import Sequence

import torch

from . import bench, cli_args, parallel
from .checkpoint import (
    QUANT_FILE,
    check_output,
    find_checkpoint,
    load_model,
    own_tokenizer,
    save_gguf,
    save_model,
    save_quantized,
    stored_dtype,
    stored_tensors,
)
from .checkpoint.gguf import EXPORT_TYPES, describe_types
from .checkpoint.load import memory_fit
from .config import PRESETS, get_preset
from .eval import cli as eval_cli
from .generate import generate_stream
from .model import Transformer
from .quantize import GROUP_SIZES, QUANT_MODES
from .sampling import SamplingParams
from .serve import cli as serve_cli
from .tokenizer import Tokenizer, load_tokenizer
from .train import cli as train_cli

# ---- generating text ----------------------------------------------------------------------------------------


def _stream(model: Transformer, tokenizer: Tokenizer, ids: list[int], params: SamplingParams, args) -> tuple:
    """Stream one continuation to stdout; returns (text, n_generated, prefill_s, decode_s)."""
    t0 = time.perf_counter()
    t_first = None
    pieces, n = [], 0
    for ev in generate_stream(
        model, [ids], params, tokenizer=tokenizer, eos_id=tokenizer.eos_id, prefill_chunk=args.prefill_chunk
    ):
        if t_first is None:
            t_first = time.perf_counter()
        n += ev.generated
        if ev.text:
            pieces.append(ev.text)
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    t_end = time.perf_counter()
    return "".join(pieces), n, (t_first or t_end) - t0, t_end - (t_first or t_end)


def _timings(n_prompt: int, n_gen: int, prefill_s: float, decode_s: float) -> str:
    prompt_rate = n_prompt / prefill_s if prefill_s > 0 else float("inf")
    gen_rate = (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else float("nan")
    return (
        f"prompt: {n_prompt} tokens in {prefill_s:.2f}s ({prompt_rate:.1f} tokens/s); "
        f"generated: {n_gen} tokens in {prefill_s + decode_s:.2f}s ({gen_rate:.1f} tokens/s after the first)"
    )


# ---- commands ---------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> None:
    if args.lora and (args.quantize or args.ep > 1 or args.tp > 1):
        raise cli_args.CLIError("--lora applies to a plain model in one process: without --quantize, --ep, --tp")
    model, tokenizer = cli_args.load(args)
    if args.lora:
        from .quantize import quantization_of
        from .train.lora import load_adapter

        if quantization_of(model) is not None:
            raise cli_args.CLIError("--lora needs a floating-point model, and this checkpoint is quantized")
        load_adapter(model, args.lora)  # computed into the weights as they are read, not merged
    prompt = args.prompt
    if prompt == "-":  # only rank 0 reads stdin
        prompt = parallel.broadcast_from_main(sys.stdin.read() if parallel.is_main_process() else None)
        if not prompt:
            raise cli_args.CLIError("the prompt read from stdin (--prompt -) is empty: give the text to continue")
    elif not prompt:
        raise cli_args.CLIError("--prompt is empty: give the text to continue ('-' reads it from stdin)")
    ids = tokenizer.encode(prompt, bos=not args.no_bos)
    if not ids:
        raise cli_args.CLIError("the prompt is empty and --no-bos leaves no token to start from")
    params = cli_args.sampling_params(args, len(ids), model.config.max_seq_len)
    _, n, prefill_s, decode_s = _stream(model, tokenizer, ids, params, args)
    sys.stdout.write("\n")
    if parallel.is_main_process():
        print(_timings(len(ids), n, prefill_s, decode_s) + _offload_line(model), file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    model, tokenizer = cli_args.load(args)
    interactive = sys.stdin.isatty()
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    if interactive:
        # Ctrl-C must stop an answer even where the launcher left SIGINT ignored or blocked (inherited across exec)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("Chat with the model. Ctrl-C stops an answer; Ctrl-D (or Ctrl-C at the prompt) quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not interactive and not line:
            return  # end of piped input
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if not interactive:  # the transcript a terminal shows: each message, then its answer
            sys.stdout.write(f"> {line}\n")
        messages.append({"role": "user", "content": line})
        context = model.config.max_seq_len
        want = args.max_new_tokens or min(args.default_max_new_tokens, context // 2)
        ids = tokenizer.encode_chat(messages)
        # Keep the conversation inside the context: drop the oldest exchanges (never the system message
        # or the new message) until the answer has room.
        dropped = 0
        while len(ids) + want > context and len(messages) - (1 if args.system else 0) > 1:
            first = 1 if args.system else 0
            cut = 2 if messages[first]["role"] == "user" and len(messages) - first > 2 else 1
            del messages[first : first + cut]
            dropped += cut
            ids = tokenizer.encode_chat(messages)
        if dropped:
            print(f"mixtral: dropped the {dropped} oldest messages to fit the context of {context}", file=sys.stderr)
        if len(ids) + want > context:
            messages.pop()
            print(
                f"mixtral: this message is {len(ids)} tokens; with {want} new tokens that is more than the "
                f"context of {context}. Send a shorter message or lower --max-new-tokens.",
                file=sys.stderr,
            )
            continue
        params = cli_args.sampling_params(args, len(ids), context)
        try:
            answer, n, prefill_s, decode_s = _stream(model, tokenizer, ids, params, args)
            sys.stdout.write("\n")
        except KeyboardInterrupt:
            # Ctrl-C stops this answer, not the program; what was said so far stays in the conversation.
            sys.stdout.write("\n[interrupted]\n")
            answer = ""
            n = prefill_s = decode_s = 0
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": answer})
        if args.verbose and n:
            print(_timings(len(ids), n, prefill_s, decode_s) + _offload_line(model), file=sys.stderr)


def _offload_line(model: Transformer) -> str:
    """The offloaded experts' cache counters so far as a line to add to the timings ("" without offloading)."""
    from .offload import offload_of

    offload = offload_of(model)
    if offload is None:
        return ""
    t = offload.total()
    return (
        f"\nmixtral: expert cache: {t.hit_rate:.1%} hits ({t.hits} of {t.hits + t.misses}), {t.loads} experts "
        f"copied in, {t.prefetch_used} of {t.prefetches} prefetched used"
    )


def _count(n: int) -> str:
    """A parameter count as people write it: 21.4M, 46.7B, 680.5K."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _quantization(ckpt) -> dict | None:
    """A quantized checkpoint's quantization.json ({"mode", "group_size", "dtype"}); None for a plain one."""
    if ckpt.layout != "quantized":
        return None
    try:
        return json.loads((ckpt.path / QUANT_FILE).read_text())
    except (OSError, ValueError) as e:
        raise cli_args.CLIError(f"{ckpt.path / QUANT_FILE} cannot be read: {e}") from None


def cmd_info(args: argparse.Namespace) -> None:
    ckpt = find_checkpoint(cli_args.checkpoint(args))
    cfg = ckpt.config
    total, active = cfg.param_counts()
    quant = _quantization(ckpt)
    info = {
        "checkpoint": str(ckpt.path),
        "layout": {"hf": "Hugging Face", "mistral": "Mistral consolidated", "gguf": "GGUF", "quantized": "quantized"}[
            ckpt.layout
        ],
        "files": [f.name for f in ckpt.files],
        "size_on_disk_bytes": ckpt.size_bytes,
        "dtype": (
            describe_types(stored_tensors(ckpt.files[0]))
            if ckpt.layout == "gguf"
            else quant.get("dtype", "?")
            if quant
            else str(stored_dtype(ckpt)).removeprefix("torch.")
        ),
        "quantization": quant,
        "parameters_total": total,
        "parameters_active_per_token": active,
        "memory": memory_fit(ckpt.size_bytes, in_place=quant is not None),
        "config": cfg.__dict__,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"checkpoint   {info['checkpoint']} ({info['layout']} layout, {len(ckpt.files)} weight file(s))")
    stored = info["dtype"]
    if quant:
        group = f", groups of {quant['group_size']}" if quant["mode"] == "int4" and quant.get("group_size") else ""
        stored = f"{quant['mode']} (weight-only quantized{group}; router, norms and embedding in {stored})"
    print(f"size on disk {ckpt.size_bytes / 1e9:.3f} GB, stored as {stored}")
    print(f"parameters   {_count(total)} total, {_count(active)} active per token")
    print(f"memory       {info['memory']}")
    for key, value in cfg.__dict__.items():
        print(f"  {key:<15}{value}")


def cmd_quantize(args: argparse.Namespace) -> None:
    check_output(args.out, overwrite=args.force, force="--force")  # before minutes of work
    path, dtype = cli_args.checkpoint(args), cli_args.dtype(args.dtype)
    model = load_model(path, dtype=dtype, quantize=args.mode, group_size=args.group_size)
    save_quantized(model, args.out, tokenizer=own_tokenizer(path), overwrite=args.force)
    print(f"wrote an {args.mode} checkpoint to {args.out}", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> None:
    path = cli_args.checkpoint(args)
    model = load_model(path, dtype=cli_args.dtype(args.dtype))
    try:
        tokenizer = load_tokenizer(args.tokenizer or path)
        save_gguf(model, args.out, tokenizer, args.type)
    except ValueError as e:
        raise cli_args.CLIError(str(e)) from None
    print(f"wrote a {args.type} GGUF file to {args.out}", file=sys.stderr)


def cmd_routing(args: argparse.Namespace) -> None:
    from .routing import markdown_table, write_report

    model, tokenizer = cli_args.load(args)
    report = write_report(model, tokenizer, args.text, args.out, args.layer, args.max_tokens, progress=True)
    print(markdown_table(report), end="")
    print(f"wrote routing.json, routing.md, routing_share.png and routing_tokens.html to {args.out}", file=sys.stderr)


def cmd_init(args: argparse.Namespace) -> None:
    check_output(args.out, overwrite=args.force, force="--force")
    config = get_preset(args.preset)
    torch.manual_seed(args.seed)
    model = Transformer(config).to(cli_args.DTYPES[args.dtype])
    tokenizer = load_tokenizer()  # Mixtral's, where the vocabulary holds it
    save_model(model, args.out, tokenizer=tokenizer if tokenizer.vocab_size <= config.vocab_size else None,
               overwrite=args.force)  # fmt: skip
    total, _ = config.param_counts()
    print(f"wrote a random {args.preset} model ({total / 1e6:.1f}M parameters, {args.dtype}) to {args.out}")


def version() -> str:
    try:
        return importlib.metadata.version("mixtral")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


# ---- entry point ------------------------------------------------------------------------------------------


def add_force_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force",
        action="store_true",
        help="replace whatever is at --out; without it only a previous output of mixtral (config.json, weights, "
        "quantization.json, tokenizer and nothing else) or an empty folder is replaced",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixtral", description="The Mixtral sparse mixture-of-experts model.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "generate",
        help="continue a prompt, streaming the text to stdout",
        description="Continue a prompt, streaming the text to stdout; timings go to stderr.",
    )
    cli_args.add_model_flags(p)
    p.add_argument("--prompt", required=True, help="the text to continue ('-' reads it from stdin)")
    p.add_argument("--no-bos", action="store_true", help="do not start the prompt with the BOS token")
    p.add_argument(
        "--lora",
        metavar="DIR",
        help="a LoRA adapter to apply at load, without merging: PEFT's format or `mixtral train`'s out_dir/adapter",
    )
    cli_args.add_sampling_flags(p, max_new_tokens=128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat",
        help="interactive multi-turn chat (also reads piped stdin, one message per line)",
        description="Multi-turn chat in the Mixtral Instruct v1 format. On a terminal: type a "
        "message, Ctrl-C stops an answer, Ctrl-D quits. Piped: each input line is a user message.",
    )
    cli_args.add_model_flags(p)
    p.add_argument("--system", metavar="TEXT", help="system message for the whole conversation")
    p.add_argument("--verbose", action="store_true", help="print timings after each answer to stderr")
    cli_args.add_sampling_flags(p, max_new_tokens=256)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "info",
        help="a checkpoint's config, parameter counts, dtype and size",
        description="Show a checkpoint's layout, config, total and active parameters, dtype, size.",
    )
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (any layout); default: the built-in model")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "init",
        help="write a randomly initialised checkpoint of a preset shape",
        description="Write a model with random weights in the Hugging Face layout (for tests, "
        "benchmarks, or as a starting point for training).",
    )
    p.add_argument("--preset", choices=list(PRESETS), default="tiny", help="model shape (default: tiny)")
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write (see --force)")
    add_force_flag(p)
    p.add_argument("--dtype", choices=list(cli_args.DTYPES), default="float32", help="stored dtype (default: float32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "routing",
        help="routing analysis: expert shares per layer and source, repeat rates, plots",
        description="Run texts through the model and report which experts the router picks "
        "(per layer and text), how often consecutive tokens keep the same expert against chance, "
        "a heat map PNG and a token-level HTML view.",
    )
    cli_args.add_model_flags(p)
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="text files to route (one source each)")
    p.add_argument("--out", default="routing", metavar="DIR", help="output folder (default: routing)")
    p.add_argument("--layer", type=int, help="layer for the token-level view (default: the middle one)")
    p.add_argument(
        "--max-tokens", type=cli_args.positive_int, default=16384, help="tokens analysed per text (default: 16384)"
    )
    p.set_defaults(func=cmd_routing)

    p = sub.add_parser(
        "quantize",
        help="write a weight-only quantized copy of a checkpoint (int8, int4 or fp8)",
        description="Quantize once and save, so later runs load the quantized weights directly (--checkpoint OUT).",
    )
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint to quantize; default: the built-in model")
    p.add_argument(
        "--mode",
        choices=list(QUANT_MODES),
        required=True,
        help="int8 (per channel), int4 (per group) or fp8 (e4m3 per channel)",
    )
    p.add_argument("--group-size", type=int, choices=list(GROUP_SIZES), default=64, help="int4 group size")
    p.add_argument("--dtype", choices=["auto", *cli_args.DTYPES], default="auto", help="activation and scale dtype")
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write (see --force)")
    add_force_flag(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "export",
        help="write a checkpoint in another format: llama.cpp's GGUF",
        description="Write any checkpoint we load as a GGUF file that llama.cpp (and Ollama) run: names, metadata "
        "and tokenizer as llama.cpp's converter writes them.",
    )
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint to export; default: the built-in model")
    p.add_argument("--format", choices=["gguf"], default="gguf", help="the format to write (default: gguf)")
    p.add_argument(
        "--type",
        choices=list(EXPORT_TYPES),
        default="bf16",
        help="type of the matrices (router and norms stay F32); q8_0 / q4_0 as llama.cpp quantizes (default: bf16)",
    )
    p.add_argument("--dtype", choices=["auto", *cli_args.DTYPES], default="auto", help="dtype to load in")
    p.add_argument("--tokenizer", help="tokenizer.model to write; default: the checkpoint's own, else Mixtral's v1")
    p.add_argument("--out", metavar="FILE.gguf", required=True, help="file to write")
    p.set_defaults(func=cmd_export)

    serve_cli.add_command(sub)
    train_cli.add_command(sub)
    eval_cli.add_command(sub)
    bench.add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said with the command's own usage, not the top level's
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return cli_args.run(args)


if __name__ == "__main__":
    sys.exit(main())
