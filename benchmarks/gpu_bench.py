"""The fused MoE Triton kernel against the plain PyTorch path, on one GPU, on a full-size Mixtral-8x7B-shaped
model with random weights: decode tokens/s at batch 1, 8 and 32 with and without CUDA graphs, prefill
tokens/s, the fraction of the GPU's memory bandwidth (measured here) that decoding reaches, peak GPU memory.
Run by benchmarks/gpu.sh.

Weights are bf16 where the whole model fits in free GPU memory (93 GB: an H200 or larger), else the
experts are int8 with per-channel scales (48 GB: an H100). Both paths use the same weights; with int8 the
plain path dequantizes each used expert before its matmuls, the kernel dequantizes in registers.

Order of work, each part on its own so that a failure is reported and the rest still runs:
  1. memory bandwidth (device copy and read-only reduction);
  2. build the model on the GPU;
  3. the kernel against the plain path on one layer at decode and prefill sizes (correctness);
  4. the kernel's tile sizes, a few candidates at each size, the fastest kept;
  5. one MoE layer alone: time per call and bandwidth fraction, both paths;
  6. the whole model: prefill, decode at batch 1, 8 and 32, the plain path, the kernel, and the kernel with
     decode steps replayed from CUDA graphs (as `mixtral generate` runs on a GPU); peak GPU memory of each;
  7. a summary table with the ratios.

The whole-model runs use the kernel's default tiles (what generation uses); section 4's tuned tiles are
reported and used for the one-layer timings only.

    python benchmarks/gpu_bench.py [--weights auto|bf16|int8] [--prompt-len 2048] [--decode-steps 32]
    # a smoke test of the script itself, the kernel interpreted:
    TRITON_INTERPRET=1 python benchmarks/gpu_bench.py --preset tiny --device cpu --dtype float32 \
        --prompt-len 64 --decode-prompt 16 --decode-steps 4
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import sys
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def import_mixtral() -> None:
    """Import the package; on a bare GPU machine without its tokenizer/checkpoint dependencies, register the
    package without its __init__ so that the modules used here (torch only) still import."""
    sys.path.insert(0, str(ROOT))
    try:
        import mixtral  # noqa: F401
    except ImportError as e:
        print(f"note: `import mixtral` failed ({e}); importing only the model modules, which need torch alone")
        for name in [m for m in sys.modules if m == "mixtral" or m.startswith("mixtral.")]:
            del sys.modules[name]
        pkg = types.ModuleType("mixtral")
        pkg.__path__ = [str(ROOT / "mixtral")]
        sys.modules["mixtral"] = pkg


import_mixtral()

from mixtral.cache import KVCache  # noqa: E402
from mixtral.config import ModelConfig, get_preset  # noqa: E402
from mixtral.generate import decode_step, graphable, prefill  # noqa: E402
from mixtral.kernels.fused_moe import (  # noqa: E402
    DECODE_CONFIG,
    PREFILL_CONFIG,
    KernelConfig,
    default_config,
    fused_experts,
    triton_unavailable_reason,
)
from mixtral.kernels.ops import Experts, Routing, experts, experts_int8_reference  # noqa: E402
from mixtral.model import Transformer  # noqa: E402
from mixtral.moe import route  # noqa: E402

DECODE_CANDIDATES = [
    DECODE_CONFIG,
    KernelConfig(block_m=16, up_n=32, up_k=256, down_n=32, down_k=256, num_warps=4, num_stages=3),
    KernelConfig(block_m=16, up_n=128, up_k=64, down_n=64, down_k=128, num_warps=4, num_stages=4),
    KernelConfig(block_m=16, up_n=64, up_k=128, down_n=64, down_k=128, num_warps=8, num_stages=3),
]
PREFILL_CANDIDATES = [
    PREFILL_CONFIG,
    KernelConfig(block_m=128, up_n=128, up_k=64, down_n=128, down_k=64, num_warps=8, num_stages=3),
    KernelConfig(block_m=64, up_n=64, up_k=64, down_n=64, down_k=64, num_warps=4, num_stages=4),
]


def log(msg: str = "") -> None:
    print(msg, flush=True)


def section(title: str) -> None:
    log(f"\n== {title} ==")


def failed(what: str) -> str:
    """Print the current exception for `what`; returns a short reason for the summary."""
    exc = sys.exc_info()[1]
    log(f"FAILED: {what}: {type(exc).__name__}: {exc}")
    traceback.print_exc(file=sys.stdout)
    sys.stdout.flush()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Seconds per call of fn: `repeats` calls back to back after `warmup` ones, one synchronisation at the
    end (so a path that never waits for the GPU is timed by the GPU's work, one that waits by both)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


# ---- 1. the machine -----------------------------------------------------------------------------------------


def header(device: torch.device) -> None:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    log(f"date {datetime.datetime.now().isoformat(timespec='seconds')} | python {platform.python_version()}")
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton_version}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        log(
            f"GPU {props.name} | {props.multi_processor_count} SMs | memory {total / 1e9:.1f} GB, "
            f"{free / 1e9:.1f} GB free"
        )
    else:
        log(f"device {device} (smoke test of the script: timings mean nothing here)")


def measure_bandwidth(device: torch.device) -> float:
    """Bytes/s the GPU's memory delivers: the best of a device copy (read + write) and a read-only sum."""
    n = (2 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.ones(n // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), device, repeats=10)
    t_read = timed(lambda: src.sum(dtype=torch.float32), device, repeats=10)
    copy_bw, read_bw = 2 * n / t_copy, n / t_read
    log(f"memory bandwidth: copy {copy_bw / 1e12:.2f} TB/s (read + write), read-only sum {read_bw / 1e12:.2f} TB/s")
    return max(copy_bw, read_bw)


# ---- 2. the model ---------------------------------------------------------------------------------------------


def choose_weights(config: ModelConfig, device: torch.device, wanted: str) -> str:
    total, _ = config.param_counts()
    expert = config.n_layers * config.n_experts * 3 * config.dim * config.hidden_dim
    bf16_bytes = 2 * total
    int8_bytes = (
        2 * (total - expert) + expert + config.n_layers * config.n_experts * 4 * (2 * config.hidden_dim + config.dim)
    )
    headroom = 6e9 if device.type == "cuda" else 0  # KV caches, activations, the kernel's buffers
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else float("inf")
    log(
        f"model: {total / 1e9:.1f}B parameters; bf16 {bf16_bytes / 1e9:.1f} GB, "
        f"int8 experts {int8_bytes / 1e9:.1f} GB; free GPU memory {free / 1e9:.1f} GB "
        f"(keeping {headroom / 1e9:.0f} GB for caches and activations)"
    )
    if wanted == "auto":
        if bf16_bytes + headroom <= free:
            choice = "bf16"
        elif int8_bytes + headroom <= free:
            choice = "int8"
        else:
            raise SystemExit(f"the model does not fit: {int8_bytes / 1e9:.1f} GB even with int8 experts")
    else:
        choice = wanted
    log(
        f"weights: {choice}"
        + (" (every weight bf16)" if choice == "bf16" else " (experts int8 with per-channel scales, the rest bf16)")
        + ("" if wanted == "auto" else " (as asked)")
        + (" because bf16 does not fit" if choice == "int8" and wanted == "auto" else "")
    )
    return choice


def build_model(
    config: ModelConfig, device: torch.device, weights: str, dtype: torch.dtype = torch.bfloat16
) -> tuple[Transformer, list]:
    """Random weights straight on the device, scaled like a trained model's (unit-size activations, random
    routing). Returns the model and, with int8 experts, the (s1, s2, s3) scales of each layer.

    For int8 the weights are uniform over [-127, 127] (RMS ~73), the scales 1/(73 sqrt(fan in))."""
    model = Transformer.skeleton(config)
    gen = torch.Generator(device=device).manual_seed(0)
    for mname, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if pname in ("w1", "w2", "w3") and weights == "int8":
                t = torch.randint(-127, 128, p.shape, dtype=torch.int8, device=device, generator=gen)
            elif mname.endswith("norm"):
                t = torch.ones(p.shape, dtype=dtype, device=device)
            else:
                # uniform of unit variance: as good as normal here, and quicker to draw for 90 GB
                t = torch.empty(p.shape, dtype=dtype, device=device).uniform_(-(3**0.5), 3**0.5, generator=gen)
                if mname != "embed":
                    t.mul_(p.shape[-1] ** -0.5)  # 1/sqrt(fan in): activations stay of unit size
            setattr(module, pname, torch.nn.Parameter(t, requires_grad=False))
    scales = []
    if weights == "int8":
        E, F_, D = config.n_experts, config.hidden_dim, config.dim
        for _ in range(config.n_layers):
            s1 = torch.full((E, F_), D**-0.5 / 73.0, device=device)
            s2 = torch.full((E, D), F_**-0.5 / 73.0, device=device)
            scales.append((s1, s2, s1.clone()))
    return model.eval(), scales


# ---- the two paths ---------------------------------------------------------------------------------------------


def install(model: Transformer, path: str, weights: str, scales: list, graphs: bool) -> None:
    """Make every MoE block run `path` ('plain': the grouped PyTorch path; 'triton': the fused kernel with its
    default tiles, as `mixtral generate` runs it on a GPU) on its (bf16 or int8) experts, and allow CUDA graphs
    for decode or not. int8 experts go through a dispatch hook (their scales live outside the model), which
    rules CUDA graphs out (`generate.graphable`)."""
    model.cuda_graphs = graphs
    for i, layer in enumerate(model.layers):
        moe = layer.moe
        moe.impl = "grouped" if path == "plain" else "triton"
        moe.dispatch_hook = None
        if weights == "int8":
            moe.dispatch_hook = _int8_hook(path, scales[i])


def _int8_hook(path: str, s: tuple) -> Callable:
    def hook(x, stack, routing, local):
        if path == "plain":
            return experts_int8_reference(x, stack, routing, s)
        return fused_experts(x, stack.w1, stack.w2, stack.w3, *routing, scales=s)

    return hook


def pick_config(configs: dict | None, n_pairs: int, n_experts: int) -> KernelConfig:
    default = default_config(n_pairs, n_experts)
    if not configs:
        return default
    return configs["decode"] if default is DECODE_CONFIG else configs["prefill"]


def moe_call(model: Transformer, layer: int, path: str, weights: str, scales: list, config: KernelConfig | None):
    """A function (x, weights_TK, idx_TK) -> output running one layer's experts through `path`."""
    moe = model.layers[layer].moe
    stack = Experts(moe.w1, moe.w2, moe.w3)
    s = scales[layer] if weights == "int8" else None
    if path == "plain":
        if s is None:
            return lambda x, w, i: experts(x, stack, Routing(w, i))
        return lambda x, w, i: experts_int8_reference(x, stack, Routing(w, i), s)
    return lambda x, w, i: fused_experts(x, moe.w1, moe.w2, moe.w3, w, i, scales=s, config=config)


def routed_input(config: ModelConfig, model: Transformer, T: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, config.dim, device=device, generator=g).to(model.embed.weight.dtype)
    weights_TK, idx_TK = route(model.layers[0].moe.gate(x), config.top_k)
    return x, weights_TK, idx_TK


def expert_bytes(config: ModelConfig, weights: str) -> int:
    per_weight = 1 if weights == "int8" else 2
    return 3 * config.dim * config.hidden_dim * per_weight


# ---- 3-5. one MoE layer -------------------------------------------------------------------------------------------


def check_kernel(model, config, device, weights, scales, sizes) -> str | None:
    """The kernel against the plain path on layer 0; returns None when it agrees, else the reason."""
    worst = 0.0
    for T in sizes:
        x, w, i = routed_input(config, model, T, device, seed=T)
        want = moe_call(model, 0, "plain", weights, scales, None)(x, w, i).float()
        got = moe_call(model, 0, "triton", weights, scales, None)(x, w, i).float()
        err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
        worst = max(worst, err)
        log(f"  T={T:5d}: max |triton - plain| / max |plain| = {err:.2e}")
    if worst > 3e-2:
        return f"the kernel disagrees with the plain path (relative error {worst:.2e})"
    log("  the kernel agrees with the plain path")
    return None


def tune(model, config, device, weights, scales, sizes: dict) -> dict:
    chosen = {}
    for kind, (T, candidates) in sizes.items():
        x, w, i = routed_input(config, model, T, device, seed=1)
        best = None
        for c in candidates:
            try:
                fn = moe_call(model, 0, "triton", weights, scales, c)
                t = timed(functools.partial(fn, x, w, i), device, repeats=20, warmup=2)
                log(f"  {kind:7s} T={T:5d}: {t * 1e6:9.1f} us  {c}")
                if best is None or t < best[0]:
                    best = (t, c)
            except Exception:
                failed(f"tiles {c}")
        if best is not None:
            chosen[kind] = best[1]
            log(f"  {kind}: keeping {best[1]}")
    if len(chosen) < 2:
        chosen = {"decode": DECODE_CONFIG, "prefill": PREFILL_CONFIG} | chosen
    return chosen


def bench_moe_layer(model, config, device, weights, scales, configs, paths, bw) -> dict:
    out = {}
    for T in (1, 32, 2048):
        x, w, i = routed_input(config, model, T, device, seed=2)
        unique = i.unique().numel()
        moved = unique * expert_bytes(config, weights)
        flops = 2 * 3 * config.dim * config.hidden_dim * T * config.top_k
        for path in paths:
            try:
                cfg = pick_config(configs, i.numel(), config.n_experts) if path == "triton" else None
                fn = moe_call(model, 0, path, weights, scales, cfg)
                t = timed(functools.partial(fn, x, w, i), device, repeats=20)
                out[(path, T)] = t
                log(
                    f"  T={T:5d} {path:6s}: {t * 1e6:9.1f} us/layer, {unique} experts read, "
                    f"{moved / t / bw:6.1%} of bandwidth, {flops / t / 1e12:7.1f} TFLOP/s"
                )
            except Exception:
                failed(f"MoE layer, {path}, T={T}")
    return out


# ---- 6. the whole model ---------------------------------------------------------------------------------------------


def fixed_bytes(config: ModelConfig) -> int:
    """Bytes every decode step reads besides the experts: attention, routers, norms, LM head (bf16)."""
    attn = config.dim * config.head_dim * (2 * config.n_heads + 2 * config.n_kv_heads)
    per_layer = attn + config.dim * config.n_experts + 2 * config.dim
    return 2 * (config.n_layers * per_layer + config.vocab_size * config.dim + config.dim)


def bench_prefill(model: Transformer, config: ModelConfig, device: torch.device, P: int) -> float:
    """Seconds to prefill one prompt of P tokens into an empty cache."""
    cache = KVCache(config, 1, P + 1, dtype=model.embed.weight.dtype, device=device)
    prompt = [torch.randint(0, config.vocab_size, (P,), generator=torch.Generator().manual_seed(0)).tolist()]

    def run() -> None:
        cache.reset()
        prefill(model, cache, prompt, chunk_size=P)

    return timed(run, device, repeats=3, warmup=1)


def bench_decode(
    model: Transformer, config: ModelConfig, device: torch.device, B: int, context: int, steps: int
) -> tuple[float, float, int]:
    """(seconds per step, experts read per layer per step, KV-cache bytes read by the last step) for B
    sequences decoding one token each per step after a prompt of `context` tokens."""
    g = torch.Generator().manual_seed(B)
    cache = KVCache(config, B, context + steps + 5, dtype=model.embed.weight.dtype, device=device)
    prompts = [torch.randint(0, config.vocab_size, (context,), generator=g).tolist() for _ in range(B)]
    prefill(model, cache, prompts, chunk_size=context)
    pos = [context]

    def step() -> None:
        tokens = torch.randint(0, config.vocab_size, (B,), generator=g)
        decode_step(model, cache, tokens, torch.full((B,), pos[0]))
        pos[0] += 1

    for _ in range(3):
        step()
    # How many experts a step reads, per layer: from the routing of one real step.
    model.keep_router_logits = True
    step()
    model.keep_router_logits = False
    tops = [torch.topk(r.float(), config.top_k, dim=-1).indices for r in model.router_logits]
    unique = sum(t.unique().numel() for t in tops) / len(tops)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    kv = B * config.n_layers * 2 * config.n_kv_heads * config.head_dim * pos[0] * 2
    return seconds, unique, kv


BATCHES = (1, 8, 32)


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")


def bench_model(model, config, device, weights, bw, args, label: str, with_prefill: bool) -> dict:
    """Prefill (when asked) and decode at each of BATCHES for the installed path; peak GPU memory over them."""
    res: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if with_prefill:
        try:
            t = bench_prefill(model, config, device, args.prompt_len)
            res["prefill"] = args.prompt_len / t
            log(f"  [{label}] prefill {args.prompt_len} tokens: {t * 1e3:8.1f} ms, {res['prefill']:9.1f} tokens/s")
        except Exception:
            res["prefill_error"] = failed(f"[{label}] prefill")
    for B in BATCHES:
        try:
            t, unique, kv = bench_decode(model, config, device, B, args.decode_prompt, args.decode_steps)
            moved = fixed_bytes(config) + config.n_layers * unique * expert_bytes(config, weights) + kv
            res[f"decode{B}"] = B / t
            res[f"bw{B}"] = moved / t / bw
            log(
                f"  [{label}] decode batch {B:2d}: {t * 1e3:8.2f} ms/step, {B / t:8.1f} tokens/s, "
                f"{unique:.2f} experts/layer read, {moved / 1e9:.2f} GB/step, {res[f'bw{B}']:6.1%} of the HBM roofline"
            )
        except Exception:
            res[f"decode{B}_error"] = failed(f"[{label}] decode batch {B}")
    res["peak"] = peak_gb(device)
    log(f"  [{label}] peak GPU memory {res['peak']:.1f} GB")
    return res


# ---- main ---------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mixtral-8x7b", help="model shape (default: mixtral-8x7b)")
    parser.add_argument("--layers", type=int, help="use fewer layers than the preset (a quicker run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--weights", choices=["auto", "bf16", "int8"], default="auto")
    parser.add_argument("--prompt-len", type=int, default=2048, help="prefill benchmark prompt (default: 2048)")
    parser.add_argument("--decode-prompt", type=int, default=128, help="context before decoding (default: 128)")
    parser.add_argument("--decode-steps", type=int, default=32, help="timed decode steps (default: 32)")
    parser.add_argument("--no-tune", action="store_true", help="keep the kernel's default tile sizes")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="activations and non-expert weights; float32 is for the CPU smoke test (Triton's interpreter has no "
        "bf16 arithmetic)",
    )
    args = parser.parse_args()
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: this benchmark needs a GPU (or --device cpu for a smoke test)")
    torch.set_grad_enabled(False)

    section("machine")
    header(device)
    bw = measure_bandwidth(device)

    section("model")
    config = get_preset(args.preset)
    if args.layers:
        config = config.replace(n_layers=args.layers)
    weights = choose_weights(config, device, args.weights)
    t0 = time.perf_counter()
    model, scales = build_model(config, device, weights, getattr(torch, args.dtype))
    sync(device)
    used = torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    log(f"built {config.n_layers} layers on {device} in {time.perf_counter() - t0:.1f}s ({used:.1f} GB allocated)")

    paths = ["plain"]
    triton_error = triton_unavailable_reason(device)
    section("kernel check (layer 0, triton against plain)")
    if triton_error is None:
        try:
            triton_error = check_kernel(model, config, device, weights, scales, (1, 32, min(2048, args.prompt_len)))
        except Exception:
            triton_error = failed("the Triton kernel")
    if triton_error is None:
        paths.append("triton")
    else:
        log(f"the Triton path is left out: {triton_error}")

    configs = None
    if "triton" in paths and not args.no_tune:
        section("kernel tiles (layer 0)")
        try:
            configs = tune(
                model,
                config,
                device,
                weights,
                scales,
                {"decode": (32, DECODE_CANDIDATES), "prefill": (min(2048, args.prompt_len), PREFILL_CANDIDATES)},
            )
        except Exception:
            failed("tile tuning")

    section("one MoE layer")
    layer_times = bench_moe_layer(model, config, device, weights, scales, configs, paths, bw)

    section("whole model")
    # (path, CUDA graphs): the plain path reads expert counts on the host each layer, so it runs eagerly; the
    # kernel eagerly and from CUDA graphs (`generate.decode_step`), bf16 only (int8 runs through a hook).
    runs = [("plain", False)]
    if "triton" in paths:
        runs.append(("triton", False))
        if device.type == "cuda" and weights == "bf16":
            runs.append(("triton", True))
        else:
            log("CUDA graphs: not measured (they need a CUDA device and bf16 experts; int8 runs through a hook)")
    results = {}
    for path, graphs in runs:
        label = path + (" + graphs" if graphs else "")
        try:
            install(model, path, weights, scales, graphs)
            if graphs and not graphable(model):
                raise RuntimeError("the model cannot be captured in CUDA graphs (generate.graphable)")
            results[label] = bench_model(model, config, device, weights, bw, args, label, with_prefill=not graphs)
        except Exception:
            results[label] = {"error": failed(f"whole model, {label}")}

    section("summary")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    log(
        f"{gpu}, Mixtral shape {args.preset} ({config.n_layers} layers), {weights} weights, "
        f"measured bandwidth {bw / 1e12:.2f} TB/s, torch {torch.__version__}; decode after a "
        f"{args.decode_prompt}-token prompt, {args.decode_steps} timed steps; (bw): share of the HBM roofline"
    )
    titles = ["prefill tok/s"] + [t for B in BATCHES for t in (f"decode b={B} tok/s", "(bw)")] + ["peak GB"]
    widths = [14] + [w for _ in BATCHES for w in (18, 7)] + [8]
    log(f"{'path':16s} " + " ".join(t.rjust(w) for t, w in zip(titles, widths, strict=True)))

    def cell(r: dict, key: str, width: int, fmt: str = "{:.1f}") -> str:
        return (fmt.format(r[key]) if key in r else "failed" if f"{key}_error" in r else "-").rjust(width)

    for label, r in results.items():
        cells = [cell(r, "prefill", 14)]
        for B in BATCHES:
            cells += [cell(r, f"decode{B}", 18), cell(r, f"bw{B}", 7, "{:.1%}")]
        log(f"{label:16s} " + " ".join(cells) + " " + cell(r, "peak", 8))
    plain = results.get("plain", {})
    for label in [k for k in results if k != "plain"]:
        r = results[label]
        keys = ["prefill", *(f"decode{B}" for B in BATCHES)]
        ratios = [f"{k} x{r[k] / plain[k]:.2f}" for k in keys if k in r and k in plain]
        log(f"{label} / plain: " + (", ".join(ratios) if ratios else "n/a"))
    if "triton" in paths:
        layer = [
            f"T={T} x{layer_times[('plain', T)] / layer_times[('triton', T)]:.2f}"
            for T in (1, 32, 2048)
            if ("plain", T) in layer_times and ("triton", T) in layer_times
        ]
        log("one MoE layer, plain time / triton time: " + (", ".join(layer) if layer else "n/a"))
    else:
        log(f"triton: not run ({triton_error})")
    log(f"total time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
