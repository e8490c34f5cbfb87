"""Mixtral 8x7B-shaped models with random weights on one GPU, in each weight format (bf16, int8, int4, fp8): the
Triton kernels against the reference, prefill and decode tokens/s at batch 1, 8 and 32 with and without CUDA
graphs, the fraction of the GPU's memory bandwidth (measured here) that decoding reaches, peak GPU memory; and a
model whose experts are offloaded to CPU memory within a GPU budget. Run by benchmarks/gpu.sh.

Each format is a fresh model built on the GPU weight by weight (each quantized as `quantize_model` would, the bf16
model never held whole); a format that does not fit the free memory with room for caches is skipped with the
reason (bf16 needs 93 GB: an H200). Order of work, each part on its own so that a failure is reported and the rest
still runs:
  1. memory bandwidth (device copy and read-only reduction);
  2. per format: build; the MoE kernel against the reference (each used expert dequantized) on layer 0; with
     --tune a few tile sizes; one MoE layer alone (plain path and kernel); the quantized projections (wq, wk, LM
     head) against bf16 F.linear of the same shapes; the whole model: prefill and decode at batch 1, 8 and 32 with
     the kernel eagerly and from CUDA graphs (as `mixtral generate` runs on a GPU), bf16 also on the plain path;
  3. before int4: int4 with its experts in pinned CPU memory and --offload-gb of GPU memory (`mixtral.offload`);
  4. a summary table, the ratios, and the issue's targets as measured.
Whole-model runs are skipped once --budget seconds have passed, so that the script ends within its time.

    python benchmarks/gpu_bench.py [--formats bf16 int8 int4 fp8] [--offload-gb 24] [--prompt-len 2048]
    # a smoke test of the script itself, the kernels interpreted (~1 minute):
    TRITON_INTERPRET=1 python benchmarks/gpu_bench.py --preset tiny --device cpu --dtype float32 \
        --prompt-len 64 --decode-prompt 16 --decode-steps 2 --formats bf16 int8 fp8 --offload-gb 1.2 \
        --offload-format int8
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
    PREFILL_CONFIG_QUANTIZED,
    KernelConfig,
    default_config,
    fused_experts,
    triton_unavailable_reason,
)
from mixtral.kernels.ops import Experts, Routing, experts  # noqa: E402
from mixtral.kernels.weights import QuantizedWeight  # noqa: E402
from mixtral.model import Transformer  # noqa: E402
from mixtral.moe import experts_reference, route  # noqa: E402
from mixtral.offload import expert_bytes  # noqa: E402
from mixtral.quantize import active_weight_bytes, is_quantizable, place_quantized  # noqa: E402

DECODE_CANDIDATES = [
    DECODE_CONFIG,
    KernelConfig(block_m=16, up_n=32, up_k=256, down_n=32, down_k=256, num_warps=4, num_stages=3),
    KernelConfig(block_m=16, up_n=128, up_k=64, down_n=64, down_k=128, num_warps=4, num_stages=4),
    KernelConfig(block_m=16, up_n=64, up_k=128, down_n=64, down_k=128, num_warps=8, num_stages=3),
]
PREFILL_CANDIDATES = [
    PREFILL_CONFIG,
    PREFILL_CONFIG_QUANTIZED,
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
    end (so a path that never waits for the GPU is timed by the GPU's work, one that waits by both). Off a GPU (the
    smoke test, kernels interpreted) once after one warm-up: the timings mean nothing there."""
    if device.type != "cuda":
        repeats, warmup = 1, min(warmup, 1)
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

FORMATS = ("bf16", "int8", "int4", "fp8")


def model_bytes(config: ModelConfig, fmt: str, group_size: int = 64) -> tuple[int, int]:
    """(bytes of the whole model, bytes of its experts) in `fmt`: what `quantize_model` makes (attention and experts
    in the format, the LM head int8, embedding, router and norms bf16)."""
    total, _ = config.param_counts()
    expert = config.n_layers * config.n_experts * 3 * config.dim * config.hidden_dim
    attn = config.n_layers * config.dim * config.head_dim * (2 * config.n_heads + 2 * config.n_kv_heads)
    head = 0 if config.tie_embeddings else config.vocab_size * config.dim
    per_weight = {"bf16": 2.0, "int8": 1.0, "fp8": 1.0, "int4": 0.5 + 4 / group_size}[fmt]
    head_bytes = 2 * head if fmt == "bf16" else head  # (+ scales, small)
    expert_bytes = int(expert * per_weight)
    return int(2 * (total - expert - attn - head) + (expert + attn) * per_weight + head_bytes), expert_bytes


def fits(config: ModelConfig, fmt: str, device: torch.device) -> str | None:
    """Why the model in `fmt` does not fit the free GPU memory (keeping room for caches and activations), or None."""
    if device.type != "cuda":
        return None
    free = torch.cuda.mem_get_info(device)[0]
    need = model_bytes(config, fmt)[0] + HEADROOM
    if need > free:
        return f"needs {need / 1e9:.1f} GB with {HEADROOM / 1e9:.0f} GB of headroom, {free / 1e9:.1f} GB free"
    return None


HEADROOM = 8e9  # KV caches, activations, CUDA graph pools, the kernels' buffers


def random_weight(name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device, gen) -> torch.Tensor:
    """Random weights scaled like a trained model's: unit-size activations, random routing."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    # uniform of unit variance: as good as normal here, and quicker to draw for 90 GB
    t = torch.empty(shape, dtype=dtype, device=device).uniform_(-(3**0.5), 3**0.5, generator=gen)
    return t if name.startswith("embed") else t.mul_(shape[-1] ** -0.5)  # 1/sqrt(fan in)


def build_model(
    config: ModelConfig, device: torch.device, fmt: str, dtype: torch.dtype = torch.bfloat16, *, experts_on=None
) -> Transformer:
    """The model with random weights straight on `device`, in `fmt` as `quantize_model` would make it, each weight
    quantized on its own (the whole model is never held in bf16). `experts_on`: another device for the stacked
    experts (the CPU for the offloaded mode)."""
    model = Transformer.skeleton(config)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in list(model.named_parameters()):
        where = experts_on if experts_on is not None and ".moe.w" in name else device
        t = random_weight(name, p.shape, dtype, device, gen)
        if fmt != "bf16" and is_quantizable(name):
            mode = "int8" if name == "output.weight" else fmt
            qw = QuantizedWeight.from_float(t, mode, group_size=64)
            del t
            tensors = {n: b.to(where) for n, b in qw.named_buffers()}
            place_quantized(model, name, mode, tensors, dtype, qw.group_size)
        else:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            setattr(module, attr, torch.nn.Parameter(t.to(where), requires_grad=False))
    if fmt != "bf16":
        model.quantization = {"mode": fmt, "group_size": 64 if fmt == "int4" else None}
    for buf_owner in model.modules():  # the non-persistent buffers a skeleton leaves on meta (RoPE tables)
        for bname, b in list(buf_owner.named_buffers(recurse=False)):
            if b.is_meta:
                raise RuntimeError(f"buffer {bname} of {type(buf_owner).__name__} left on meta")
    return model.eval()


def install(model: Transformer, path: str, graphs: bool) -> None:
    """Make every MoE block run `path` ('plain': the grouped PyTorch path, host-planned; 'triton': the fused kernel
    with its default tiles, as `mixtral generate` runs it on a GPU), and allow CUDA graphs for decode or not."""
    model.cuda_graphs = graphs
    for layer in model.layers:
        layer.moe.impl = "grouped" if path == "plain" else "triton"


def moe_call(model: Transformer, layer: int, path: str, config: KernelConfig | None):
    """A function (x, weights_TK, idx_TK) -> output running one layer's experts through `path` ('reference': each
    used expert dequantized, 'plain': the grouped path, 'triton': the kernel)."""
    moe = model.layers[layer].moe
    stack = Experts(moe.w1, moe.w2, moe.w3)
    if path == "reference":
        return lambda x, w, i: experts_reference(x, stack, Routing(w, i))
    if path == "plain":
        return lambda x, w, i: experts(x, stack, Routing(w, i))
    return lambda x, w, i: fused_experts(x, moe.w1, moe.w2, moe.w3, w, i, config=config)


def routed_input(config: ModelConfig, model: Transformer, T: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, config.dim, device=device, generator=g).to(model.embed.weight.dtype)
    weights_TK, idx_TK = route(model.layers[0].moe.gate(x), config.top_k)
    return x, weights_TK, idx_TK


# ---- 3-5. one MoE layer -------------------------------------------------------------------------------------------


def check_kernel(model, config, device, sizes) -> str | None:
    """The kernel against the reference (each used expert dequantized) on layer 0; None when it agrees, else why."""
    worst = 0.0
    for T in sizes:
        x, w, i = routed_input(config, model, T, device, seed=T)
        want = moe_call(model, 0, "reference", None)(x, w, i).float()
        got = moe_call(model, 0, "triton", None)(x, w, i).float()
        err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
        worst = max(worst, err)
        log(f"  T={T:5d}: max |triton - reference| / max |reference| = {err:.2e}")
    if worst > 3e-2:
        return f"the kernel disagrees with the reference (relative error {worst:.2e})"
    log("  the kernel agrees with the reference")
    return None


def tune(model, config, device, sizes: dict) -> dict:
    chosen = {}
    for kind, (T, candidates) in sizes.items():
        x, w, i = routed_input(config, model, T, device, seed=1)
        best = None
        for c in candidates:
            try:
                fn = moe_call(model, 0, "triton", c)
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


def pick_config(configs: dict | None, n_pairs: int, n_experts: int, quantized: bool) -> KernelConfig:
    default = default_config(n_pairs, n_experts, quantized)
    if not configs:
        return default
    return configs["decode"] if default is DECODE_CONFIG else configs["prefill"]


def bench_moe_layer(model, config, device, configs, paths, bw, sizes=(1, 32, 2048)) -> dict:
    out = {}
    for T in sizes:
        x, w, i = routed_input(config, model, T, device, seed=2)
        unique = i.unique().numel()
        moved = unique * expert_bytes(model)
        flops = 2 * 3 * config.dim * config.hidden_dim * T * config.top_k
        for path in paths:
            try:
                quantized = not isinstance(model.layers[0].moe.w1, torch.Tensor)
                cfg = pick_config(configs, i.numel(), config.n_experts, quantized) if path == "triton" else None
                fn = moe_call(model, 0, path, cfg)
                t = timed(functools.partial(fn, x, w, i), device, repeats=20)
                out[(path, T)] = t
                log(
                    f"  T={T:5d} {path:6s}: {t * 1e6:9.1f} us/layer, {unique} experts read, "
                    f"{moved / t / bw:6.1%} of bandwidth, {flops / t / 1e12:7.1f} TFLOP/s"
                )
            except Exception:
                failed(f"MoE layer, {path}, T={T}")
    return out


def bench_projections(model: Transformer, device: torch.device, bw: float) -> dict:
    """The quantized matmul (`triton_linear`) on layer 0's wq and wk and the LM head against F.linear on bf16
    weights of the same shape, at 1, 8, 32 and 2048 rows: time, and the share of the bandwidth reading the weight."""
    from mixtral.kernels import triton_linear

    out = {}
    dtype = model.embed.weight.dtype
    weights = {"wq": model.layers[0].attn.wq, "wk": model.layers[0].attn.wk, "head": model.output}
    sizes = (1, 8, 32, 2048)
    if device.type != "cuda":  # the smoke test: interpreted, the head's 32000 rows take minutes
        weights.pop("head")
        sizes = (1, 8)
    for name, w in weights.items():
        reason = triton_linear.unavailable_reason(torch.empty(1, w.shape[1], device=device, dtype=dtype), w)
        if reason is not None:
            log(f"  {name}: skipped ({reason})")
            continue
        dense = torch.randn(tuple(w.shape), device=device, dtype=dtype)
        nbytes = sum(t.numel() * t.element_size() for t in w.buffers())
        for M in sizes:
            x = torch.randn(M, w.shape[1], device=device, dtype=dtype)
            try:
                tq = timed(functools.partial(triton_linear.linear, x, w), device, repeats=20)
                tb = timed(functools.partial(torch.nn.functional.linear, x, dense), device, repeats=20)
                out[(name, M)] = (tq, tb)
                log(
                    f"  {name} {tuple(w.shape)} {w.mode} M={M:5d}: {tq * 1e6:8.1f} us ({nbytes / tq / bw:6.1%} of "
                    f"bandwidth), bf16 F.linear {tb * 1e6:8.1f} us: x{tb / tq:.2f}"
                )
            except Exception:
                failed(f"projection {name}, M={M}")
    return out


# ---- 6. the whole model ---------------------------------------------------------------------------------------------


def fixed_bytes(model: Transformer) -> int:
    """Bytes every decode step reads besides the experts: attention, routers, norms, LM head, one embedding row."""
    cfg = model.config
    return active_weight_bytes(model) - cfg.n_layers * cfg.top_k * expert_bytes(model)


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


def bench_model(model, config, device, bw, args, label: str, with_prefill: bool, batches=BATCHES) -> dict:
    """Prefill (when asked) and decode at each of `batches` for the installed path; peak GPU memory over them."""
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
    fixed, per_expert = fixed_bytes(model), expert_bytes(model)
    for B in batches:
        try:
            t, unique, kv = bench_decode(model, config, device, B, args.decode_prompt, args.decode_steps)
            moved = fixed + config.n_layers * unique * per_expert + kv
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


def bench_format(config, device, fmt: str, dtype, bw, args, deadline: float) -> dict:
    """One format: build, check the kernel on layer 0, one MoE layer, then the whole model (the kernel eagerly
    with prefill, from CUDA graphs; the plain path too for bf16, the baseline)."""
    results: dict = {}
    section(f"{fmt}: model")
    t0 = time.perf_counter()
    model = build_model(config, device, fmt, dtype)
    sync(device)
    used = torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    log(f"built {config.n_layers} layers in {fmt} on {device} in {time.perf_counter() - t0:.1f}s ({used:.1f} GB)")
    section(f"{fmt}: kernel check (layer 0, triton against the reference)")
    triton_error = triton_unavailable_reason(device)
    if triton_error is None:
        try:
            triton_error = check_kernel(model, config, device, (1, 32))
        except Exception:
            triton_error = failed(f"{fmt}: the Triton kernel")
    paths = ["plain"] + (["triton"] if triton_error is None else [])
    if triton_error is not None:
        log(f"the Triton path is left out: {triton_error}")
    configs = None
    if triton_error is None and args.tune:
        section(f"{fmt}: kernel tiles (layer 0)")
        try:
            sizes = {"decode": (32, DECODE_CANDIDATES), "prefill": (min(2048, args.prompt_len), PREFILL_CANDIDATES)}
            configs = tune(model, config, device, sizes)
        except Exception:
            failed("tile tuning")
    section(f"{fmt}: one MoE layer")
    results["layer"] = bench_moe_layer(model, config, device, configs, paths, bw, sizes=(1, 32))
    if fmt != "bf16":
        section(f"{fmt}: projections (weight-only Triton matmul against bf16 F.linear of the same shape)")
        results["projections"] = bench_projections(model, device, bw)
    section(f"{fmt}: whole model")
    runs = [("triton", False), ("triton", True)] if triton_error is None else []
    if fmt == "bf16" or not runs:
        runs.insert(0, ("plain", False))
    for path, graphs in runs:
        label = f"{fmt} {path}" + (" + graphs" if graphs else "")
        if time.perf_counter() > deadline:
            log(f"  [{label}] skipped: the time budget is spent")
            continue
        if graphs and device.type != "cuda":
            log(f"  [{label}] skipped: CUDA graphs need a CUDA device")
            continue
        try:
            install(model, path, graphs)
            if graphs and not graphable(model):
                raise RuntimeError("the model cannot be captured in CUDA graphs (generate.graphable)")
            results[label] = bench_model(model, config, device, bw, args, label, with_prefill=not graphs)
        except Exception:
            results[label] = {"error": failed(f"whole model, {label}")}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def bench_offloaded(config, device, fmt: str, dtype, bw, args) -> dict:
    """The experts in (pinned) CPU memory, `args.offload_gb` GB of GPU memory for the rest and the resident experts
    (`mixtral.offload`): decode at batch 1 and 8."""
    from mixtral.offload import offload_experts, resident_for_budget

    label = f"{fmt} offloaded {args.offload_gb:g} GB"
    section(label)
    t0 = time.perf_counter()
    model = build_model(config, device, fmt, dtype, experts_on=torch.device("cpu"))
    resident = resident_for_budget(model, int(args.offload_gb * 1e9))
    offload = offload_experts(model, device, resident)
    sync(device)
    log(f"built and offloaded in {time.perf_counter() - t0:.1f}s: {resident} resident experts per layer")
    install(model, "triton" if triton_unavailable_reason(device) is None else "plain", graphs=False)
    res = bench_model(model, config, device, bw, args, label, with_prefill=False, batches=(1, 8))
    log(f"  [{label}] {offload.summary()}")
    del model, offload
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {label: res}


def offloaded(config, device, dtype, bw, args) -> dict:
    try:
        return bench_offloaded(config, device, args.offload_format, dtype, bw, args)
    except Exception:
        return {f"{args.offload_format} offloaded": {"error": failed("the offloaded run")}}


# ---- main ---------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mixtral-8x7b", help="model shape (default: mixtral-8x7b)")
    parser.add_argument("--layers", type=int, help="use fewer layers than the preset (a quicker run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--formats",
        nargs="+",
        choices=FORMATS,
        default=list(FORMATS),
        help="weight formats, each a fresh model "
        "(default: all; one that does not fit the free GPU memory is skipped with the reason)",
    )
    parser.add_argument("--offload-gb", type=float, default=24.0, help="GPU budget of the offloaded run (0: skip)")
    parser.add_argument("--offload-format", choices=FORMATS, default="int4")
    parser.add_argument("--prompt-len", type=int, default=2048, help="prefill benchmark prompt (default: 2048)")
    parser.add_argument("--decode-prompt", type=int, default=128, help="context before decoding (default: 128)")
    parser.add_argument("--decode-steps", type=int, default=32, help="timed decode steps (default: 32)")
    parser.add_argument("--tune", action="store_true", help="time a few tile sizes of the kernel on layer 0")
    parser.add_argument("--budget", type=float, default=420, help="seconds after which whole-model runs are skipped")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="activations and non-expert weights; float32 is for the CPU smoke test (Triton's interpreter has no "
        "bf16 arithmetic)",
    )
    args = parser.parse_args()
    t_start = time.perf_counter()
    deadline = t_start + args.budget
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: this benchmark needs a GPU (or --device cpu for a smoke test)")
    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)

    section("machine")
    header(device)
    bw = measure_bandwidth(device)
    config = get_preset(args.preset)
    if args.layers:
        config = config.replace(n_layers=args.layers)
    total, _ = config.param_counts()
    sizes = ", ".join(f"{f} {model_bytes(config, f)[0] / 1e9:.1f} GB" for f in FORMATS)
    log(f"model {args.preset} ({config.n_layers} layers): {total / 1e9:.1f}B parameters; {sizes}")

    results: dict = {}
    layers: dict = {}
    offload_pending = args.offload_gb > 0
    for fmt in args.formats:
        if offload_pending and fmt in ("int4", "fp8"):  # before them: the targets first, in the time budget
            results |= offloaded(config, device, dtype, bw, args)
            offload_pending = False
        reason = fits(config, fmt, device)
        if reason is not None:
            log(f"\n{fmt}: skipped: {reason}")
            continue
        try:
            r = bench_format(config, device, fmt, dtype, bw, args, deadline)
            layers[fmt] = r.pop("layer")
            r.pop("projections", None)
            results |= r
        except Exception:
            results[f"{fmt}"] = {"error": failed(f"{fmt}")}
    if offload_pending and time.perf_counter() < deadline:
        results |= offloaded(config, device, dtype, bw, args)

    section("summary")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    log(
        f"{gpu}, Mixtral shape {args.preset} ({config.n_layers} layers), measured bandwidth {bw / 1e12:.2f} TB/s, "
        f"torch {torch.__version__}; decode after a {args.decode_prompt}-token prompt, {args.decode_steps} timed "
        "steps; (bw): share of the HBM roofline (weights, scales and KV cache a step reads / time / bandwidth)"
    )
    titles = ["prefill tok/s"] + [t for B in BATCHES for t in (f"decode b={B} tok/s", "(bw)")] + ["peak GB"]
    widths = [14] + [w for _ in BATCHES for w in (18, 7)] + [8]
    log(f"{'run':28s} " + " ".join(t.rjust(w) for t, w in zip(titles, widths, strict=True)))

    def cell(r: dict, key: str, width: int, fmt: str = "{:.1f}") -> str:
        return (fmt.format(r[key]) if key in r else "failed" if f"{key}_error" in r else "-").rjust(width)

    for label, r in results.items():
        cells = [cell(r, "prefill", 14)]
        for B in BATCHES:
            cells += [cell(r, f"decode{B}", 18), cell(r, f"bw{B}", 7, "{:.1%}")]
        log(f"{label:28s} " + " ".join(cells) + " " + cell(r, "peak", 8) + ("  " + r["error"] if "error" in r else ""))
    for fmt, times in layers.items():
        ratios = [f"T={T} x{times[('plain', T)] / times[('triton', T)]:.2f}" for T in (1, 32) if ("triton", T) in times]
        log(f"{fmt}: one MoE layer, plain time / triton time: " + (", ".join(ratios) or "n/a"))
    targets(results)
    log(f"total time {time.perf_counter() - t_start:.0f}s")


def targets(results: dict) -> None:
    """The issue's targets, each as measured (or why not)."""

    def get(label: str, key: str) -> float | None:
        return results.get(label, {}).get(key)

    best = {
        f: max(
            (r for k, r in results.items() if k.startswith(f + " triton")),
            key=lambda r: r.get("decode1", 0),
            default={},
        )
        for f in FORMATS
    }
    lines = []
    bw1 = best["bf16"].get("bw1")
    lines.append(f"bf16 batch-1 decode at {bw1:.1%} of the HBM roofline (target >= 70%)" if bw1 else "bf16: not run")
    if best["bf16"].get("decode1") and best["int8"].get("decode1"):
        lines.append(f"int8 / bf16 batch-1 decode x{best['int8']['decode1'] / best['bf16']['decode1']:.2f} (>= 1.7)")
    for f in FORMATS:
        r = best[f]
        if r.get("decode1") and r.get("decode32"):
            lines.append(
                f"{f}: batch-32 / batch-1 tokens/s x{r['decode32'] / r['decode1']:.1f} (>= 15), peak "
                f"{r.get('peak', float('nan')):.1f} GB" + (" (fits 80 GB)" if r.get("peak", 99) < 80 else "")
            )
    for label, r in results.items():
        if "offloaded" in label and get(label, "decode1"):
            lines.append(f"{label}: batch-1 decode {r['decode1']:.2f} tokens/s (>= 3)")
    log("targets: " + "; ".join(lines))


if __name__ == "__main__":
    main()
