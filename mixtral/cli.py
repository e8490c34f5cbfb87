"""The `mixtral` command. Thin: it parses flags and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import parallel
from .checkpoint import CheckpointError, find_checkpoint, load_model, save_model, save_quantized, stored_dtype
from .config import PRESETS, ConfigError, get_preset
from .generate import SamplingParams, compile_model, generate_stream
from .model import Transformer
from .quantize import GROUP_SIZES, QUANT_MODES, quantize_model
from .tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


BUILTIN = Path(__file__).parent / "data" / "builtin"


class CLIError(Exception):
    """A problem with the command's input, reported as one line without a traceback."""


def default_checkpoint() -> Path:
    """The built-in model shipped inside the package (a small Mixtral trained on Shakespeare)."""
    if not (BUILTIN / "config.json").is_file():
        raise CLIError(f"no --checkpoint given and the built-in model is missing ({BUILTIN}); pass --checkpoint DIR")
    return BUILTIN


# ---- shared flags ---------------------------------------------------------------------------------------


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="checkpoint folder: Hugging Face layout (config.json + model*.safetensors) or Mistral's "
        "(params.json + consolidated.safetensors / consolidated.00.pth); default: the built-in model",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="dtype to compute in; 'auto' keeps the dtype the weights are stored in (default: auto)",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument(
        "--ep",
        type=int,
        default=1,
        metavar="N",
        help="expert parallelism: split each layer's experts over N processes (run under torchrun; default: 1)",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        metavar="N",
        help="tensor parallelism: split attention heads and expert hidden dims over N processes (under torchrun)",
    )
    p.add_argument(
        "--quantize",
        choices=list(QUANT_MODES),
        help="weight-only quantization after loading (CPU): experts and attention projections (int8 per output "
        "channel, int4 per group), LM head int8; router, norms and embedding stay as loaded",
    )
    p.add_argument(
        "--group-size", type=int, choices=list(GROUP_SIZES), default=64, help="int4 group size (default: 64)"
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the blocks (CPU). Off by default: on the 2-core machine we measured it costs ~75 s "
        "per process and decodes no faster (README); falls back to eager where no compiler works",
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="tokenizer.model or tokenizer.json to use; default: the checkpoint's own, else the Mixtral v1 "
        "tokenizer shipped in mistral-common",
    )


def _add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"tokens to generate at most (default: {max_new_tokens}, or the room left in the context if less)",
    )
    p.set_defaults(default_max_new_tokens=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 picks the most likely token (default: 0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0: off")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1: off")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability; 0: off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeats; 1: off")
    g.add_argument("--seed", type=int, help="random seed: the same seed gives the same output")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per forward pass (default: 512)")


def _sampling(args: argparse.Namespace, n_prompt: int, context: int) -> SamplingParams:
    """The sampling flags; without --max-new-tokens, the command's default capped to the room in the context
    (an explicit value beyond the context is refused when generation starts)."""
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = min(args.default_max_new_tokens, context - n_prompt)
        if max_new_tokens < 1:
            raise CLIError(f"the prompt is {n_prompt} tokens and fills the model's context of {context} tokens")
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a torch device (try cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    return device


def _load(args: argparse.Namespace) -> tuple[Transformer, Tokenizer]:
    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    path = args.checkpoint or default_checkpoint()
    if args.quantize and (args.ep > 1 or args.tp > 1):
        raise CLIError("--quantize does not combine with --ep/--tp")
    if args.ep > 1 or args.tp > 1:
        device = parallel.init_distributed(_device(args.device).type)  # cuda:LOCAL_RANK with NCCL, or gloo
        parallel.quiet_other_ranks()  # one copy of the streamed text: rank 0's
        torch.manual_seed(parallel.broadcast_from_main(torch.initial_seed()))  # unseeded sampling agrees
        model = parallel.load_model_parallel(path, ep=args.ep, tp=args.tp, dtype=dtype, device=device)
    else:
        model = load_model(path, dtype=dtype, device=_device(args.device))
        if args.quantize:
            if model.embed.weight.device.type != "cpu":
                raise CLIError("--quantize uses CPU kernels; use --device cpu")
            model = quantize_model(model, args.quantize, args.group_size)
        if args.compile and model.embed.weight.device.type == "cpu":
            compile_model(model)
    tokenizer = load_tokenizer(args.tokenizer or path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CLIError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is only "
            f"{model.config.vocab_size}; pass the matching --tokenizer"
        )
    return model, tokenizer


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
        n += ev.token != tokenizer.eos_id
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
    model, tokenizer = _load(args)
    prompt = args.prompt
    if prompt == "-":  # only rank 0 reads stdin
        prompt = parallel.broadcast_from_main(sys.stdin.read() if parallel.is_main_process() else None)
    ids = tokenizer.encode(prompt, bos=not args.no_bos)
    if not ids:
        raise CLIError("the prompt is empty and --no-bos leaves no token to start from")
    params = _sampling(args, len(ids), model.config.max_seq_len)
    _, n, prefill_s, decode_s = _stream(model, tokenizer, ids, params, args)
    sys.stdout.write("\n")
    if parallel.is_main_process():
        print(_timings(len(ids), n, prefill_s, decode_s), file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    model, tokenizer = _load(args)
    interactive = sys.stdin.isatty()
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    if interactive:
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
        params = _sampling(args, len(ids), context)
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
            print(_timings(len(ids), n, prefill_s, decode_s), file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> None:
    ckpt = find_checkpoint(args.checkpoint or default_checkpoint())
    cfg = ckpt.config
    total, active = cfg.param_counts()
    info = {
        "checkpoint": str(ckpt.path),
        "layout": {"hf": "Hugging Face", "mistral": "Mistral consolidated"}[ckpt.layout],
        "files": [f.name for f in ckpt.files],
        "size_on_disk_bytes": ckpt.size_bytes,
        "dtype": str(stored_dtype(ckpt)).removeprefix("torch."),
        "parameters_total": total,
        "parameters_active_per_token": active,
        "config": cfg.__dict__,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"checkpoint   {info['checkpoint']} ({info['layout']} layout, {len(ckpt.files)} weight file(s))")
    print(f"size on disk {ckpt.size_bytes / 1e9:.3f} GB, stored as {info['dtype']}")
    print(f"parameters   {total / 1e9:.3f}B total, {active / 1e9:.3f}B active per token")
    for key, value in cfg.__dict__.items():
        print(f"  {key:<15}{value}")


def cmd_quantize(args: argparse.Namespace) -> None:
    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    model = load_model(args.checkpoint or default_checkpoint(), dtype=dtype)
    save_quantized(quantize_model(model, args.mode, args.group_size), args.out)
    print(f"wrote an {args.mode} checkpoint to {args.out}", file=sys.stderr)


def cmd_routing(args: argparse.Namespace) -> None:
    from .routing import markdown_table, write_report

    model, tokenizer = _load(args)
    report = write_report(model, tokenizer, args.text, args.out, args.layer, args.max_tokens)
    print(markdown_table(report), end="")
    print(f"wrote routing.json, routing.md, routing_share.png and routing_tokens.html to {args.out}", file=sys.stderr)


def cmd_init(args: argparse.Namespace) -> None:
    config = get_preset(args.preset)
    torch.manual_seed(args.seed)
    model = Transformer(config).to(DTYPES[args.dtype])
    save_model(model, args.out)
    total, _ = config.param_counts()
    print(f"wrote a random {args.preset} model ({total / 1e6:.1f}M parameters, {args.dtype}) to {args.out}")


# ---- entry point ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixtral", description="The Mixtral sparse mixture-of-experts model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "generate",
        help="continue a prompt, streaming the text to stdout",
        description="Continue a prompt, streaming the text to stdout; timings go to stderr.",
    )
    _add_model_flags(p)
    p.add_argument("--prompt", required=True, help="the text to continue ('-' reads it from stdin)")
    p.add_argument("--no-bos", action="store_true", help="do not start the prompt with the BOS token")
    _add_sampling_flags(p, max_new_tokens=128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat",
        help="interactive multi-turn chat (also reads piped stdin, one message per line)",
        description="Multi-turn chat in the Mixtral Instruct v1 format. On a terminal: type a "
        "message, Ctrl-C stops an answer, Ctrl-D quits. Piped: each input line is a user message.",
    )
    _add_model_flags(p)
    p.add_argument("--system", metavar="TEXT", help="system message for the whole conversation")
    p.add_argument("--verbose", action="store_true", help="print timings after each answer to stderr")
    _add_sampling_flags(p, max_new_tokens=256)
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
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write (replaced if it exists)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="stored dtype (default: float32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "routing",
        help="routing analysis: expert shares per layer and source, repeat rates, plots",
        description="Run texts through the model and report which experts the router picks "
        "(per layer and text), how often consecutive tokens keep the same expert against chance, "
        "a heat map PNG and a token-level HTML view.",
    )
    _add_model_flags(p)
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="text files to route (one source each)")
    p.add_argument("--out", default="routing", metavar="DIR", help="output folder (default: routing)")
    p.add_argument("--layer", type=int, help="layer for the token-level view (default: the middle one)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens analysed per text (default: 16384)")
    p.set_defaults(func=cmd_routing)

    p = sub.add_parser(
        "quantize",
        help="write a weight-only quantized copy of a checkpoint (int8 or int4)",
        description="Quantize once and save, so later runs load the quantized weights directly (--checkpoint OUT).",
    )
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint to quantize; default: the built-in model")
    p.add_argument("--mode", choices=list(QUANT_MODES), required=True, help="int8 (per channel) or int4 (per group)")
    p.add_argument("--group-size", type=int, choices=list(GROUP_SIZES), default=64, help="int4 group size")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="activation and scale dtype")
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write")
    p.set_defaults(func=cmd_quantize)

    from .bench import add_command as add_bench_command
    from .serve.cli import add_command as add_serve_command
    from .train.cli import add_command as add_train_commands

    add_serve_command(sub)
    add_train_commands(sub)
    add_bench_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CLIError, CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"mixtral {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    finally:
        parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
