"""The real Mixtral 8x7B shape on the machine at hand, against llama.cpp on the same weights.

Seeded random weights are generated straight in the stored format, tensor by tensor (the disk has room for the
int4 model, ~26 GB, not for the 93 GB bf16 one, and the RAM holds neither), and written twice with the same
numbers: as our checkpoint and as a GGUF file for llama.cpp (`twin_specs` / `write_ours` / `write_gguf_twin`).
Speed at batch 1 depends on the bytes read per token and on the kernels, not on the values.

The same numbers in both files:
- int4 and Q4_0: 4-bit codes q in 1..15 and one scale d per 64 weights of a row, w = (q - 8) d (zero mean). Our int4 has
  group size 64 and zero 0; in the Q4_0 file the two blocks of 32 of a group carry the same fp16 d. d is drawn in
  bfloat16 within float16's normal range, so both hold it exactly: 4.5 bits per weight in both files.
- int8 and Q8_0: codes in -127..127 (one of them 127 in every row) and one scale per row, repeated in each Q8_0
  block of 32.
- bf16 and BF16. The embedding is bf16 in both; norms (ones) and router as Q.F32 in the GGUF, as llama.cpp's
  quantizer keeps them; q/k rows in llama.cpp's permuted order, as its converter writes them.

Two runs (`mixtral bench --full-scale [--slice]`, `benchmarks/full_scale.py`):
- full: the whole model at int4 against Q4_0: load time, peak RSS, prefill and decode tokens/s, bytes read from
  the disk per decoded token against the active weight bytes (the page-cache misses), the fraction of the
  measured memory bandwidth; llama.cpp reads the same file with `--repack 0` (its repacked copy would not fit).
- slice: the first `--layers` layers of the real shape in bf16, int8 and int4 against BF16, Q8_0 and Q4_0 (one
  pair of files at a time, removed after its run unless `--keep`), llama.cpp with its defaults.

Each side runs in its own process, alternately, `--rounds` times; the ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import torch
from tqdm import tqdm

from .checkpoint.gguf import write_gguf
from .checkpoint.layouts import gguf_tensors, half_to_interleaved, hf_tensors, target_of
from .checkpoint.writer import QUANT_FILE, QUANT_WEIGHTS, new_folder, write_config, write_safetensors, write_tokenizer
from .config import ModelConfig, get_preset
from .kernels.weights import block_major, int4_blocks, pack_int4
from .measure import machine_line, memory_bandwidth_gbs, random_prompts, run_ours, status
from .model import Transformer
from .quantize import is_quantizable, quantize_model
from .tokenizer import load_tokenizer

MODES = ("bf16", "int8", "int4")
GROUP = 64  # our int4 group size here: two Q4_0 blocks of 32 with one scale
Q = gguf.GGMLQuantizationType
GGUF_TYPES = {"bf16": Q.BF16, "int8": Q.Q8_0, "int4": Q.Q4_0}  # the twin of each of our formats
FILE_TYPES = {
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "int8": gguf.LlamaFileType.MOSTLY_Q8_0,
    "int4": gguf.LlamaFileType.MOSTLY_Q4_0,
}
# The weights' scale. Random weights of one std everywhere make the tokens' hidden states converge in a deep, wide
# model, and every token goes to the same experts per layer (at 0.02, the real shape's 32 layers of width 4096 sent
# all tokens to 2 experts per layer from layer 4 on; an embedding of std 1 and residual writes / 8 still left 4), so
# that a decode reads a fraction of the experts. So: an embedding of std 1; each projection of gain GAIN (std GAIN /
# sqrt(fan-in): 0.02 at width 1024, where 32 layers kept every expert in use among 24 tokens) and the writes into the
# residual stream (wo, w2) a further 1 / sqrt(2 x 32 layers) smaller.
EMBED_STD, GAIN, RESIDUAL = 1.0, 0.64, 1 / 8


# ---- the weights ------------------------------------------------------------------------------------------


def _generator(seed: int, param: str, piece: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{param}/{piece}".encode()))


def codes(param: str, shape: tuple[int, ...], mode: str, seed: int, piece: int = 0) -> dict[str, torch.Tensor]:
    """One matrix [N, K] (expert `piece` of a stack, or the whole weight) of parameter `param`, drawn from its own
    seed: {"w"} bf16 for a plain weight (and for every weight in mode bf16); {"q" int8 [N, K], "d" [N]} in int8;
    {"q" uint8 1..15 [N, K], "d" [N, K / 64]} in int4; scales bf16 that float16 holds exactly."""
    g = _generator(seed, param, piece)
    mode = mode_of(param, mode)
    if param.endswith("norm.weight"):
        return {"w": torch.ones(shape, dtype=torch.bfloat16)}
    std = EMBED_STD if param == "embed.weight" else GAIN / math.sqrt(shape[-1])
    if param.endswith(("wo.weight", "moe.w2")):
        std *= RESIDUAL
    if mode == "bf16":
        return {"w": (torch.randn(shape, generator=g) * std).to(torch.bfloat16)}
    N, K = shape
    if mode == "int8":
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        q[:, 0] = 127  # the row's largest |q|: a per-row re-quantization gives back the same numbers
        d = torch.empty(N).uniform_(0.5, 1.0, generator=g) * (std / 64)
        return {"q": q, "d": _both_halves(d)}
    # Codes symmetric about 8: with 0..15 every weight's mean is -d / 2, the positive scales add up along the
    # all-ones direction, and from layer 3 on every token's hidden state is that direction (one expert per layer).
    q = torch.randint(1, 16, (N, K), dtype=torch.uint8, generator=g)
    d = torch.empty(N, K // GROUP).uniform_(0.5, 1.0, generator=g) * (std / 3)
    return {"q": q, "d": _both_halves(d)}


def _both_halves(d: torch.Tensor) -> torch.Tensor:
    """Scales as bfloat16 values that float16 holds exactly too: multiples of float16's smallest step (2^-24, so
    also below its normal range) with at most 8 significant bits."""
    return (torch.round(d * 2**24).clamp(min=1) / 2**24).to(torch.bfloat16)


def mode_of(param: str, mode: str) -> str:
    """The format of `param` in a model of `mode`: the quantized model's LM head is int8 (`quantize_model`)."""
    if mode == "bf16" or not is_quantizable(param):
        return "bf16"
    return "int8" if param == "output.weight" else mode


def dense(c: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weight the codes stand for, in float32 (the reference the tests compare both files with)."""
    if "w" in c:
        return c["w"].float()
    if c["q"].dtype == torch.int8:
        return c["q"].float() * c["d"].float()[:, None]
    return (c["q"].float() - 8) * c["d"].float().repeat_interleave(GROUP, dim=1)


def _pieces(param: str, shape: tuple[int, ...], mode: str, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """The matrices of a parameter: one per expert for a stack [E, N, K], else the one."""
    if len(shape) == 3:
        for e in range(shape[0]):
            yield codes(param, shape[1:], mode, seed, e)
    else:
        yield codes(param, shape, mode, seed)


def _params(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in Transformer.skeleton(config).named_parameters()}


# ---- ours ---------------------------------------------------------------------------------------------------


def write_ours(path: Path, config: ModelConfig, mode: str, seed: int = 0, *, overwrite: bool = False) -> int:
    """Our checkpoint of the seeded weights: a plain bf16 one (Hugging Face layout) or a quantized one (int8,
    int4 group 64), written tensor by tensor; returns the weights' bytes."""
    params = _params(config)
    tokenizer = load_tokenizer(None)
    with new_folder(path, overwrite=overwrite) as tmp:
        if mode == "bf16":
            model = Transformer.skeleton(config).to(torch.bfloat16)
            specs = {key: (torch.bfloat16, tuple(t.shape)) for key, t in hf_tensors(model)}

            def produce(key: str) -> torch.Tensor:
                (target,) = target_of(key, "hf", config)
                shape = params[target.param]
                if target.expert is not None:
                    return codes(target.param, shape[1:], mode, seed, target.expert)["w"]
                return codes(target.param, shape, mode, seed)["w"]

            _write(tmp / "model.safetensors", specs, produce, {"format": "pt"})
            write_config(tmp, config, torch.bfloat16)
        else:
            model = Transformer.skeleton(config).to(torch.bfloat16)
            quantize_model(model, mode, GROUP)
            specs = {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}
            _write(tmp / QUANT_WEIGHTS, specs, lambda key: _ours_quantized(key, params, mode, seed), {"format": "pt"})
            arch = {"model_type": "mixtral_quantized", "architectures": ["MixtralQuantizedForCausalLM"]}
            write_config(tmp, config, torch.bfloat16, **arch, mixtral_quantization=mode)
            desc = {"mode": mode, "group_size": GROUP if mode == "int4" else None, "dtype": "bfloat16"}
            (tmp / QUANT_FILE).write_text(json.dumps(desc, indent=2) + "\n")
        write_tokenizer(tmp, tokenizer, config)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _ours_quantized(key: str, params: dict[str, tuple[int, ...]], mode: str, seed: int) -> torch.Tensor:
    """A tensor of the quantized model's state dict: a plain parameter, or `.q` / `.scale` (int8) / `.blocks`
    (int4) of a quantized one, made from the codes."""
    if key in params:
        return codes(key, params[key], mode, seed)["w"]
    base, part = key.rsplit(".", 1)
    param = base + ".weight" if base + ".weight" in params else base
    out = []
    for c in _pieces(param, params[param], mode, seed):
        if part == "q":
            out.append(c["q"])
        elif part == "scale":
            out.append(c["d"])
        else:
            sz = block_major(torch.stack((c["d"], torch.zeros_like(c["d"])), dim=-1))
            out.append(int4_blocks(pack_int4(c["q"]), sz, GROUP))
    return out[0] if len(params[param]) == 2 else torch.stack(out)


def _write(path: Path, specs: dict, produce: Callable[[str], torch.Tensor], metadata: dict[str, str]) -> None:
    total = sum(math.prod(shape) * dtype.itemsize for dtype, shape in specs.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, file=sys.stderr, leave=False) as bar:

        def tracked(key: str) -> torch.Tensor:
            t = produce(key)
            bar.update(t.numel() * t.element_size())
            return t

        write_safetensors(path, specs, tracked, metadata)


# ---- llama.cpp's twin ---------------------------------------------------------------------------------------


def write_gguf_twin(path: Path, config: ModelConfig, mode: str, seed: int = 0) -> int:
    """The same weights as `write_ours(..., mode)` in a GGUF file (BF16, Q8_0 or Q4_0 matrices; see the module's
    docstring); returns the file's size."""
    params = _params(config)
    model = Transformer.skeleton(config).to(torch.bfloat16)  # names and shapes as llama.cpp's converter writes
    specs, targets = {}, {}
    for name, t in gguf_tensors(model):
        (target,) = target_of(name, "gguf", config)
        plain = t.dim() == 1 or name.endswith("ffn_gate_inp.weight")
        kind = Q.F32 if plain else GGUF_TYPES[mode_of(target.param, mode)]
        specs[name], targets[name] = (kind, tuple(t.shape)), target
    total = sum(_gguf_nbytes(kind, shape) for kind, shape in specs.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=path.name, file=sys.stderr, leave=False)

    def produce(name: str):
        target, (kind, _) = targets[name], specs[name]
        blocks = []
        for c in _pieces(target.param, params[target.param], mode, seed):
            if target.rope_heads:  # llama.cpp's order of the q/k rows
                c = {k: _rows_interleaved(v, target.rope_heads) for k, v in c.items()}
            blocks.append(_gguf_bytes(c, kind))
        out = torch.stack(blocks) if len(blocks) > 1 else blocks[0]
        bar.update(out.numel() * out.element_size())
        return out.numpy()

    try:
        write_gguf(path, config, load_tokenizer(None), FILE_TYPES[mode], specs, produce, name=path.stem)
    finally:
        bar.close()
    return path.stat().st_size


def _rows_interleaved(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    return half_to_interleaved(t.view(t.shape[0], -1), n_heads).view(t.shape)


def _gguf_nbytes(kind: Q, shape: tuple[int, ...]) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[kind]
    return math.prod(shape[:-1]) * shape[-1] // block * type_size


def _gguf_bytes(c: dict[str, torch.Tensor], kind: Q) -> torch.Tensor:
    """One matrix's codes as the GGUF type's bytes: F32 / BF16 values, or rows of Q8_0 blocks (fp16 d, 32 int8)
    or Q4_0 blocks (fp16 d, 16 bytes whose low nibbles are weights 0..15 and high nibbles 16..31)."""
    if kind == Q.F32:
        return c["w"].float().view(torch.uint8)
    if kind == Q.BF16:
        return c["w"].view(torch.uint8)
    q = c["q"]
    N, K = q.shape
    if kind == Q.Q8_0:
        d = c["d"].to(torch.float16)[:, None].expand(N, K // 32)
        qs = q.view(torch.uint8).reshape(N, K // 32, 32)
    else:
        d = c["d"].to(torch.float16).repeat_interleave(GROUP // 32, dim=1)
        qb = q.reshape(N, K // 32, 32)
        qs = qb[..., :16] | (qb[..., 16:] << 4)
    d_bytes = d.contiguous().view(torch.uint8).reshape(N, K // 32, 2)
    return torch.cat((d_bytes, qs), dim=-1).reshape(N, -1)


# ---- measuring ----------------------------------------------------------------------------------------------


def _io_read_bytes() -> int:
    """Bytes this process has had read from storage (page-cache misses, with the kernel's read-ahead)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def child_main(argv: list[str]) -> None:
    """Time our model in this process: `python -m mixtral.full_scale --child JSON` prints one JSON line."""
    from .checkpoint import load_model
    from .quantize import active_weight_bytes

    spec = json.loads(argv[0])
    torch.set_num_threads(spec["threads"])
    base = status("VmRSS")
    t0 = time.perf_counter()
    model = load_model(spec["path"])
    load_s = time.perf_counter() - t0
    loaded = status("VmRSS")
    prompts = random_prompts(1, spec["prompt_len"], model.config.vocab_size)
    run_ours(model, prompts, min(8, spec["prompt_len"]), 4)  # warm up: kernels built, pages touched once
    read0 = _io_read_bytes()
    times = [run_ours(model, prompts, spec["prompt_len"], spec["new_tokens"]) for _ in range(spec["runs"])]
    read = _io_read_bytes() - read0
    prefill_s, decode_s = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
    tokens = spec["runs"] * (spec["prompt_len"] + spec["new_tokens"] - 1)
    print(
        json.dumps(
            {
                "load_s": load_s,
                "rss_after_imports": base,
                "rss_after_load": loaded,
                "peak_rss": status("VmHWM"),
                "prefill_tok_s": spec["prompt_len"] / prefill_s,
                "decode_tok_s": (spec["new_tokens"] - 1) / decode_s,
                "active_bytes": active_weight_bytes(model),
                "disk_bytes_per_token": read / tokens,
            }
        )
    )


def time_ours(path: Path, threads: int, prompt_len: int, new_tokens: int, runs: int) -> dict:
    spec = {"path": str(path), "threads": threads, "prompt_len": prompt_len, "new_tokens": new_tokens, "runs": runs}
    out = subprocess.run(
        [sys.executable, "-m", "mixtral.full_scale", "--child", json.dumps(spec)], capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"our run on {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_llama(
    bench: Path, path: Path, threads: int, prompt_len: int, new_tokens: int, runs: int, repack: bool
) -> dict:
    """llama.cpp's `llama-bench` on the GGUF file (run from its folder: it loads the libraries beside it): prefill
    and decode tokens/s (its means over `runs`), its peak RSS (`/usr/bin/time`) and bytes read from the disk."""
    cmd = [str(bench.resolve()), "-m", str(path.resolve()), "-t", str(threads), "-p", str(prompt_len)]
    cmd += ["-n", str(new_tokens), "-r", str(runs), "-o", "json"] + ([] if repack else ["--repack", "0"])
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock
        out = subprocess.run(
            ["/usr/bin/time", "-o", rss.name, "-f", "%M", *cmd], capture_output=True, text=True, cwd=bench.parent
        )
        read = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock - before) * 512
        if out.returncode:
            raise RuntimeError(f"llama-bench failed on {path}:\n{out.stderr[-3000:]}")
        peak = int(rss.read().split()[-1]) * 1024
    rows = json.loads(out.stdout)
    pp = next(r for r in rows if r["n_prompt"] and not r["n_gen"])
    tg = next(r for r in rows if r["n_gen"] and not r["n_prompt"])
    # llama-bench runs one warm-up of each test and `runs` timed ones
    tokens = (runs + 1) * (prompt_len + new_tokens)
    return {
        "prefill_tok_s": pp["avg_ts"],
        "decode_tok_s": tg["avg_ts"],
        "peak_rss": peak,
        "disk_bytes_per_token": read / tokens,
    }


# ---- the runs -----------------------------------------------------------------------------------------------


def _ratio(ours: list[dict], theirs: list[dict], key: str) -> float:
    return statistics.median(o[key] / t[key] for o, t in zip(ours, theirs, strict=True))


def compare(ours_path: Path, gguf_path: Path, args: argparse.Namespace, *, repack: bool, label: str) -> dict:
    """`args.rounds` alternating runs of ours and llama-bench (or ours alone without `--llama-bench`)."""
    ours, theirs = [], []
    for r in range(args.rounds):
        sides = ["ours", "llama"] if r % 2 == 0 else ["llama", "ours"]
        for side in sides:
            if side == "ours":
                ours.append(time_ours(ours_path, args.threads, args.prompt_len, args.new_tokens, args.runs))
                print(f"  {label} ours   round {r + 1}: {_line(ours[-1])}", flush=True)
            elif args.llama_bench:
                theirs.append(
                    time_llama(
                        args.llama_bench, gguf_path, args.threads, args.prompt_len, args.new_tokens, args.runs, repack
                    )
                )
                print(f"  {label} llama  round {r + 1}: {_line(theirs[-1])}", flush=True)
    row = {"label": label, "ours": ours, "llama": theirs}
    if theirs:
        row["decode_ratio"] = _ratio(ours, theirs, "decode_tok_s")
        row["prefill_ratio"] = _ratio(ours, theirs, "prefill_tok_s")
    return row


def _line(r: dict) -> str:
    parts = [f"prefill {r['prefill_tok_s']:.2f} tok/s", f"decode {r['decode_tok_s']:.2f} tok/s"]
    if "load_s" in r:
        parts.append(f"load {r['load_s']:.1f} s")
    parts.append(f"peak RSS {r['peak_rss'] / 1e9:.2f} GB")
    parts.append(f"disk {r['disk_bytes_per_token'] / 1e6:.0f} MB/token")
    return ", ".join(parts)


def _need_disk(folder: Path, nbytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < nbytes * 1.02 + (1 << 30):
        raise SystemExit(f"{folder}: {free / 1e9:.1f} GB free, the files need {nbytes / 1e9:.1f} GB (+1 GB)")


def _files(folder: Path, config: ModelConfig, mode: str, seed: int) -> tuple[Path, Path]:
    """Our checkpoint and the GGUF twin in `folder`, written unless a complete pair of this shape is there."""
    ours, twin = folder / f"ours-{mode}", folder / f"twin-{mode}.gguf"
    stamp = folder / f"stamp-{mode}.json"
    want = {
        "config": config.to_hf(),
        "mode": mode,
        "seed": seed,
        "group_size": GROUP,
        "scales": [EMBED_STD, GAIN, RESIDUAL],
    }
    if stamp.is_file() and json.loads(stamp.read_text()) == want and ours.is_dir() and twin.is_file():
        print(f"  reusing {ours} and {twin}")
        return ours, twin
    stamp.unlink(missing_ok=True)
    t0 = time.perf_counter()
    write_ours(ours, config, mode, seed, overwrite=True)
    t1 = time.perf_counter()
    write_gguf_twin(twin, config, mode, seed)
    print(
        f"  wrote {ours} in {t1 - t0:.0f} s, {twin} ({twin.stat().st_size / 1e9:.1f} GB) in "
        f"{time.perf_counter() - t1:.0f} s"
    )
    stamp.write_text(json.dumps(want))
    return ours, twin


def estimated_bytes(config: ModelConfig, mode: str) -> int:
    """Bytes of our checkpoint of the seeded weights (the GGUF twin's are within a few percent)."""
    bits = {"bf16": 16, "int8": 8 + 16 / config.dim, "int4": 4 + 16 / GROUP}[mode]
    total = 0
    for name, shape in _params(config).items():
        n = math.prod(shape)
        total += n * bits / 8 if is_quantizable(name) else n * 2
    return int(total)


def run(args: argparse.Namespace) -> list[dict]:
    real = get_preset(args.preset)
    folder = Path(args.dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    bandwidth = memory_bandwidth_gbs()
    print(machine_line())
    print(f"memory read bandwidth {bandwidth:.1f} GB/s; threads {args.threads}")
    if args.llama_bench and not Path(args.llama_bench).is_file():
        raise SystemExit(f"--llama-bench {args.llama_bench}: no such file (llama.cpp's llama-bench binary)")
    rows = []
    if args.slice:
        config = real.replace(n_layers=args.layers)
        for mode in args.modes:
            if not (folder / f"stamp-{mode}.json").is_file():  # else kept from an earlier run (--keep)
                _need_disk(folder, 2 * estimated_bytes(config, mode))
            print(f"{args.layers} layers of the {args.preset} shape, {mode}")
            ours, twin = _files(folder, config, mode, args.seed)
            rows.append(compare(ours, twin, args, repack=True, label=f"{args.layers}L {mode}"))
            if not args.keep:
                shutil.rmtree(ours)
                twin.unlink()
    else:
        print(f"the whole {args.preset} shape, int4 (ours) / Q4_0 (llama.cpp)")
        if not (folder / "stamp-int4.json").is_file():
            _need_disk(folder, 2 * estimated_bytes(real, "int4"))
        ours, twin = _files(folder, real, "int4", args.seed)
        rows.append(compare(ours, twin, args, repack=False, label=f"{args.preset} int4"))
    for row in rows:
        med = {k: statistics.median(r["decode_tok_s"] for r in row[k]) for k in ("ours", "llama") if row[k]}
        active = row["ours"][0]["active_bytes"]
        share = med["ours"] * active / 1e9 / bandwidth
        line = f"{row['label']}: ours decode {med['ours']:.2f} tok/s ({share:.0%} of the bandwidth)"
        if "decode_ratio" in row:
            line += (
                f", llama.cpp {med['llama']:.2f} tok/s; ours/llama.cpp decode {row['decode_ratio']:.2f}x, "
                f"prefill {row['prefill_ratio']:.2f}x"
            )
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_gbs": bandwidth, "rows": rows}, indent=2) + "\n")
    return rows


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="mixtral-8x7b", help="the shape (default: mixtral-8x7b, the real one)")
    p.add_argument("--dir", default="full-scale", help="where the files are written and kept (default: ./full-scale)")
    p.add_argument("--slice", action="store_true", help="the first --layers layers in bf16, int8, int4 instead")
    p.add_argument("--layers", type=int, default=4, help="layers of the slice (default: 4)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="formats of the slice")
    p.add_argument("--llama-bench", type=Path, metavar="PATH", help="llama.cpp's llama-bench, run on the same weights")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default: 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens (default: 32)")
    p.add_argument("--runs", type=int, default=2, help="timed runs per process (default: 2)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of ours and llama.cpp (default: 2)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for both (default: all)")
    p.add_argument("--seed", type=int, default=0, help="the weights' seed (default: 0)")
    p.add_argument("--keep", action="store_true", help="keep the slice's files after their run")
    p.add_argument("--json", metavar="FILE", help="write the results here")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    p = argparse.ArgumentParser(prog="mixtral bench --full-scale", description=__doc__.split("\n\n")[0])
    add_flags(p)
    args = p.parse_args(argv)
    for flag in ("layers", "prompt_len", "new_tokens", "runs", "rounds", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    run(args)


if __name__ == "__main__":
    main()
