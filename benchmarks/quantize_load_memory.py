"""Peak resident memory of quantizing while loading, on a slice of the real Mixtral 8x7B shape.

A bf16 checkpoint of the first `--layers` layers of the real shape (dim 4096, 8 experts of 14336, 32/8 heads,
vocab 32000) is written in the Hugging Face layout with seeded random weights, one tensor at a time (shards of
`--layers-per-shard` layers, an index beside them: never the whole model in memory), then loaded with
`load_model(..., quantize=MODE)` in a fresh process that reports its own peak RSS (VmHWM).

Target: peak RSS <= 1.15x the quantized model's size + the RSS after the imports (issue 20), where loading
first and quantizing afterwards needs the whole bf16 model.

    .venv/bin/python benchmarks/quantize_load_memory.py [--layers 2] [--mode int4] [--dir DIR] [--keep]
        [--after] [--cli]

`--after` also measures loading in bf16 and then `quantize_model` (the old way; only where the bf16 model fits
in the memory available); `--cli` also measures `mixtral quantize` (loading + writing the quantized checkpoint).
The checkpoint (about 2.8 GB per layer) is removed at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mixtral.checkpoint.writer import write_config
from mixtral.config import get_preset
from mixtral.measure import machine_line
from mixtral.quantize import GROUP_SIZES, QUANT_MODES

# The loader runs in a fresh process that reports the RSS after its imports, its peak RSS (VmHWM: ru_maxrss
# would include the parent's peak from before the exec), the loaded model's bytes and the load time.
CHILD = r"""
import sys, time, torch
def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field)) * 1024
how, path, mode, group_size, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
import mixtral
from mixtral.quantize import quantize_model, weight_bytes
if how == "cli":
    import mixtral.cli
base = status("VmRSS")
t0 = time.perf_counter()
if how == "while":
    model = mixtral.load_model(path, dtype=torch.bfloat16, quantize=mode, group_size=group_size, progress=False)
elif how == "after":
    model = quantize_model(mixtral.load_model(path, dtype=torch.bfloat16, progress=False), mode, group_size)
else:
    args = ["quantize", "--checkpoint", path, "--mode", mode, "--group-size", str(group_size), "--out", out]
    assert mixtral.cli.main(args) == 0
    model = None
seconds = time.perf_counter() - t0
print(base, status("VmHWM"), weight_bytes(model) if model is not None else 0, seconds)
"""


def write_checkpoint(path: Path, n_layers: int, layers_per_shard: int, seed: int = 0) -> int:
    """The first `n_layers` layers of Mixtral 8x7B in the HF layout (per-expert keys), bf16, seeded random weights,
    written tensor by tensor into shards of `layers_per_shard` layers; returns the bytes of weights."""
    config = get_preset("mixtral-8x7b").replace(n_layers=n_layers)
    D, F, E, V = config.dim, config.hidden_dim, config.n_experts, config.vocab_size
    hd = config.head_dim or D // config.n_heads
    top = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    shards = [top]
    for first in range(0, n_layers, layers_per_shard):
        shard = {}
        for i in range(first, min(n_layers, first + layers_per_shard)):
            p = f"model.layers.{i}."
            shard[p + "input_layernorm.weight"] = (D,)
            shard[p + "post_attention_layernorm.weight"] = (D,)
            shard[p + "self_attn.q_proj.weight"] = (config.n_heads * hd, D)
            shard[p + "self_attn.k_proj.weight"] = (config.n_kv_heads * hd, D)
            shard[p + "self_attn.v_proj.weight"] = (config.n_kv_heads * hd, D)
            shard[p + "self_attn.o_proj.weight"] = (D, config.n_heads * hd)
            shard[p + "block_sparse_moe.gate.weight"] = (E, D)
            for e in range(E):
                for w, shape in (("w1", (F, D)), ("w2", (D, F)), ("w3", (F, D))):
                    shard[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] = shape
        shards.append(shard)
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(path / name, shard, g)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_config(path, config, torch.bfloat16)
    return total


def write_safetensors(file: Path, shapes: dict[str, tuple[int, ...]], g: torch.Generator) -> int:
    """A bf16 safetensors file of random tensors of `shapes`, each generated and written on its own (the header
    first: the offsets follow from the shapes)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, shape in shapes.items():
            if key.endswith("norm.weight"):
                t = torch.empty(shape).uniform_(0.5, 1.5, generator=g)
            else:  # N(0, 0.02), the usual initialisation; the router a little larger so that it decides
                t = torch.randn(shape, generator=g) * (1.0 if "gate" in key else 0.02)
            f.write(t.to(torch.bfloat16).view(torch.uint8).numpy().data)
            del t
    return offset


def measure(how: str, path: Path, mode: str, group_size: int, out: Path) -> tuple[int, int, int, float]:
    args = [sys.executable, "-c", CHILD, how, str(path), mode, str(group_size), str(out)]
    done = subprocess.run(args, check=True, capture_output=True, text=True)
    base, peak, qbytes, seconds = done.stdout.split()
    return int(base), int(peak), int(qbytes), float(seconds)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="layers of the real shape to write (default: 2)")
    parser.add_argument("--layers-per-shard", type=int, default=1, help="layers per safetensors shard (default: 1)")
    parser.add_argument("--mode", choices=QUANT_MODES, default="int4", help="quantization (default: int4)")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64, help="int4 group size")
    parser.add_argument("--dir", type=Path, help="where to write the checkpoint (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the quantized copy")
    parser.add_argument("--after", action="store_true", help="also measure loading in bf16, then quantizing")
    parser.add_argument("--cli", action="store_true", help="also measure `mixtral quantize` (load + write)")
    args = parser.parse_args()
    print(machine_line())
    work = Path(tempfile.mkdtemp(prefix="qload-", dir=args.dir))
    try:
        path = work / f"mixtral-8x7b-{args.layers}layers-bf16"
        t0 = time.perf_counter()
        size = write_checkpoint(path, args.layers, args.layers_per_shard)
        print(
            f"checkpoint: the real 8x7B shape, {args.layers} layers, bf16, {size / 1e9:.2f} GB in "
            f"{len(list(path.glob('*.safetensors')))} shards (written in {time.perf_counter() - t0:.0f} s)"
        )
        base, peak, qbytes, seconds = measure("while", path, args.mode, args.group_size, work / "q")
        target = 1.15 * qbytes + base
        print(
            f"quantize while loading ({args.mode}): peak RSS {peak / 1e9:.2f} GB, after imports {base / 1e9:.2f} GB; "
            f"{args.mode} model {qbytes / 1e9:.2f} GB; loading added {(peak - base) / qbytes:.3f}x the "
            f"{args.mode} size ({(peak - base) / size:.3f}x the bf16 size) in {seconds:.0f} s"
        )
        verdict = "OK" if peak <= target else "OVER TARGET"
        print(f"target peak <= 1.15x {args.mode} size + imports = {target / 1e9:.2f} GB: {verdict}")
        if args.after:
            if size > 0.8 * mem_available():
                print(f"load then quantize: skipped (the bf16 model, {size / 1e9:.1f} GB, does not fit)")
            else:
                base, peak, _, seconds = measure("after", path, args.mode, args.group_size, work / "q")
                print(
                    f"load bf16, then quantize_model: peak RSS {peak / 1e9:.2f} GB "
                    f"(loading added {(peak - base) / size:.3f}x the bf16 size) in {seconds:.0f} s"
                )
        if args.cli:
            base, peak, _, seconds = measure("cli", path, args.mode, args.group_size, work / "q")
            qsize = sum(f.stat().st_size for f in (work / "q").glob("*.safetensors"))
            print(
                f"mixtral quantize (load + write {qsize / 1e9:.2f} GB): peak RSS {peak / 1e9:.2f} GB "
                f"= {(peak - base) / qsize:.3f}x the written size + imports, in {seconds:.0f} s"
            )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
