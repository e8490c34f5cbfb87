"""What the commands share: the model flags and loading by them, the sampling flags and `SamplingParams` by
them, and running a command with its errors as one line (`CLIError`). Used by `mixtral` (cli.py), `mixtral
serve` (serve/cli.py), `mixtral train` / `eval` (train/cli.py) and `mixtral bench` (bench.py)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from . import parallel
from .builtin import default_checkpoint
from .checkpoint import CheckpointError, load_model, resolve_checkpoint
from .config import ConfigError
from .generate import prepare_for_device, prepare_kernels
from .model import Transformer
from .offload import expert_bytes, non_expert_bytes, offload_experts, resident_for_budget
from .quantize import GROUP_SIZES, QUANT_MODES
from .sampling import SamplingParams
from .tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CLIError(Exception):
    """A problem with the command's input, reported as one line without a traceback."""


def run(args: argparse.Namespace) -> int:
    """Run the parsed command (`args.func`); its input errors are one line on stderr and exit status 2."""
    try:
        if "threads" in args:
            apply_threads(args)
        args.func(args)
    except (CLIError, CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"mixtral {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    finally:
        parallel.shutdown()
    return 0


def positive_int(text: str) -> int:
    """An argparse `type`: a whole number >= 1, else one line saying so (with the command's usage)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: give one >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: must be >= 1")
    return value


# ---- threads ----------------------------------------------------------------------------------------------

CGROUP = Path("/sys/fs/cgroup")  # where this process's cgroup (v2: cpu.max; v1: cpu/cpu.cfs_*) is mounted


def cgroup_cpus(root: Path | None = None) -> float | None:
    """The CPUs the cgroup CPU quota allows (quota / period, maybe fractional), or None where there is none."""
    root = CGROUP if root is None else root
    try:  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct", root):  # cgroup v1: quota -1 means none
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def available_cpus() -> int:
    """The cores this process may use: its CPU affinity, capped by the cgroup quota (rounded down), at least 1.
    torch's own default counts every core of the machine, which in a container or under taskset oversubscribes."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpus()
    if quota is not None:
        n = min(n, math.floor(quota))
    return max(1, n)


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="CPU threads for torch and the CPU kernels (default: the cores this process may use, by its CPU "
        "affinity and cgroup quota); on a busy machine fewer threads than cores can be much faster",
    )


def threads(args: argparse.Namespace) -> int:
    """The --threads value, or the default: `available_cpus()`."""
    return getattr(args, "threads", None) or available_cpus()


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's intra-op threads (the CPU kernels run on the same OpenMP pool) from --threads."""
    torch.set_num_threads(threads(args))


# ---- the model --------------------------------------------------------------------------------------------


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="checkpoint folder: Hugging Face layout (config.json + model*.safetensors) or Mistral's "
        "(params.json + consolidated.safetensors / consolidated.00.pth), or a llama.cpp .gguf file (its own "
        "tokenizer inside; loaded quantized where it is), or a Hugging Face model id org/name[@revision] (from the "
        "local Hugging Face cache, else downloaded; HF_HUB_OFFLINE=1 keeps to the cache); default (or 'builtin'): the "
        "built-in model",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="dtype to compute in; 'auto' keeps the dtype the weights are stored in, bfloat16 for a quantized "
        "GGUF file (default: auto)",
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
        help="weight-only quantization while loading: experts and attention projections (int8 per output "
        "channel, int4 per group, fp8 e4m3 per output channel: for GPUs, dequantized per call on a CPU), LM head "
        "int8; router, norms and embedding stay as loaded",
    )
    p.add_argument(
        "--group-size", type=int, choices=list(GROUP_SIZES), default=64, help="int4 group size (default: 64)"
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the blocks (CPU or GPU). Off by default: on the 2-core machine we measured it costs "
        "~75 s per process and decodes no faster (docs/performance.md); falls back to eager where no compiler works",
    )
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on a GPU, replay decode steps from CUDA graphs (default: on; --no-cuda-graphs runs them eagerly)",
    )
    offload = p.add_mutually_exclusive_group()
    offload.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GB",
        help="offload experts, for GPUs smaller than the model: every weight but the experts goes to --device, with "
        "as many experts per layer as fit in GB of its memory beside them and a reserve for the KV cache and "
        "activations; the other experts stay in CPU memory and are copied in as the routing asks (the next layer's "
        "guessed ones ahead). Works on any device (a CPU one stands in for tests); not with --ep/--tp",
    )
    offload.add_argument(
        "--resident-experts",
        type=positive_int,
        metavar="N",
        help="offload experts as --gpu-memory does, with N experts per layer on --device (top_k <= N <= n_experts)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="tokenizer.model or tokenizer.json to use; default: the checkpoint's own, else the Mixtral v1 "
        "tokenizer shipped in mistral-common",
    )
    add_threads_flag(p)


def checkpoint(args: argparse.Namespace) -> Path:
    """The --checkpoint folder (a Hugging Face id, org/name[@revision], is fetched or read from the HF cache
    unless a local path of that name exists), else the built-in model."""
    if args.checkpoint:
        return resolve_checkpoint(args.checkpoint)
    try:
        return default_checkpoint()
    except FileNotFoundError as e:
        raise CLIError(f"no --checkpoint given and {e}; pass --checkpoint DIR") from None


def dtype(name: str) -> torch.dtype | None:
    """A --dtype value as a torch dtype; None for 'auto' (the stored one)."""
    return None if name == "auto" else DTYPES[name]


def device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a torch device (try cpu, cuda, cuda:1)") from None
    if dev.type == "meta":
        raise CLIError(f"--device {name}: the meta device holds no numbers to run a model on (try cpu, cuda)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    return dev


def load(args: argparse.Namespace) -> tuple[Transformer, Tokenizer]:
    """The model and tokenizer the model flags name, with the kernels it runs on built (`prepare_kernels`)."""
    path = checkpoint(args)
    if args.quantize and (args.ep > 1 or args.tp > 1):
        raise CLIError("--quantize does not combine with --ep/--tp")
    offloading = args.gpu_memory is not None or args.resident_experts is not None
    if offloading and (args.ep > 1 or args.tp > 1):
        raise CLIError("--gpu-memory/--resident-experts (offloading experts) do not combine with --ep/--tp")
    if offloading and getattr(args, "lora", None):  # (adapted experts would be recomputed whole on the CPU each step)
        raise CLIError("--lora does not combine with --gpu-memory/--resident-experts: merge it first (merge-lora)")
    if args.ep > 1 or args.tp > 1:
        dev = parallel.init_distributed(device(args.device).type)  # cuda:LOCAL_RANK with NCCL, or gloo
        parallel.quiet_other_ranks()  # one copy of the streamed text: rank 0's
        torch.manual_seed(parallel.broadcast_from_main(torch.initial_seed()))  # unseeded sampling agrees
        model = parallel.load_model_parallel(path, ep=args.ep, tp=args.tp, dtype=dtype(args.dtype), device=dev)
    else:
        dev = device(args.device)
        # quantized while it is read: the memory holds the quantized model, never the whole one in bf16
        quantize = {"quantize": args.quantize, "group_size": args.group_size}
        # offloading: loaded in CPU memory, then everything but the experts moved to the device (offload.py)
        model = load_model(path, dtype=dtype(args.dtype), device="cpu" if offloading else dev, **quantize)
        if offloading:
            offload(model, dev, args)
        # the Triton MoE kernel on a GPU, compiled when asked (on any device), CUDA graphs unless turned off
        prepare_for_device(model, compile=args.compile, cuda_graphs=args.cuda_graphs)
    tokenizer = load_tokenizer(args.tokenizer or path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CLIError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is only "
            f"{model.config.vocab_size}; pass the matching --tokenizer"
        )
    prepare_kernels(model)  # before anything is timed
    return model, tokenizer


def offload(model: Transformer, dev: torch.device, args: argparse.Namespace) -> None:
    """Offload the experts of `model` (in CPU memory) to `dev` as --gpu-memory or --resident-experts say, and say
    how on stderr."""
    if args.gpu_memory is not None:
        if not args.gpu_memory > 0:
            raise CLIError(f"--gpu-memory {args.gpu_memory:g} is invalid: give the GB of device memory to use, > 0")
        try:
            resident = resident_for_budget(model, int(args.gpu_memory * 1e9))
        except ValueError as e:
            raise CLIError(f"--gpu-memory {args.gpu_memory:g}: {e}") from None
    else:
        resident = args.resident_experts
    offload_experts(model, dev, resident)
    on_device = non_expert_bytes(model) + resident * expert_bytes(model) * len(model.layers)
    print(
        f"mixtral: experts offloaded: {resident} of {model.config.n_experts} per layer on {dev} "
        f"({on_device / 1e9:.2f} GB of weights there), the rest in CPU memory",
        file=sys.stderr,
    )


# ---- sampling ---------------------------------------------------------------------------------------------


def add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
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
    g.add_argument(
        "--prefill-chunk", type=positive_int, default=512, help="prompt tokens per forward pass (default: 512)"
    )


def sampling_params(args: argparse.Namespace, n_prompt: int, context: int) -> SamplingParams:
    """The sampling flags; without --max-new-tokens, the command's default capped to the room in the context
    (an explicit value beyond the context is refused when generation starts)."""
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = min(args.default_max_new_tokens, context - n_prompt)
        if max_new_tokens < 1:
            raise CLIError(f"the prompt is {n_prompt} tokens and fills the model's context of {context} tokens")
    elif max_new_tokens >= 1 and n_prompt + max_new_tokens > context:
        room = f"at most {context - n_prompt} new tokens fit" if n_prompt < context else "no new token fits"
        raise CLIError(
            f"the prompt is {n_prompt} tokens and --max-new-tokens is {max_new_tokens}: together "
            f"{n_prompt + max_new_tokens}, more than the model's context of {context} tokens ({room})"
        )
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
