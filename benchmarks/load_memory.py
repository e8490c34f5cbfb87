"""Peak resident memory while loading a bf16 checkpoint: ours against transformers, in the same run.

Target: peak RSS of the loading process <= 1.3x the checkpoint's size on disk (the weights are streamed
from the memory-mapped files into place; no second full copy).

    .venv/bin/python benchmarks/load_memory.py [--preset bench-791m] [--runs 3] [--quantized int8]

With `--quantized`, loading a quantized checkpoint of the same model is measured too (ours only): it is read
into freshly allocated, aligned memory rather than streamed from the mapping, against the same target.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import mixtral
from mixtral.bench import machine_line, memory_bandwidth_gbs
from mixtral.checkpoint import save_quantized
from mixtral.quantize import QUANT_MODES, quantize_model

# Each loader runs in a fresh process that reports its own peak RSS (VmHWM: ru_maxrss would include the
# parent's peak from before the exec) and the RSS just after its imports, so the import overhead can be
# told apart from the loading itself.
CHILD = r"""
import sys, torch
def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field)) * 1024
def rss_now():
    return status("VmRSS")
which, path = sys.argv[1], sys.argv[2]
if which == "mixtral":
    import mixtral
    base = rss_now()
    model = mixtral.load_model(path, dtype=torch.bfloat16)
else:
    from transformers import MixtralForCausalLM
    base = rss_now()
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
n = sum(p.numel() for p in model.parameters())
print(base, status("VmHWM"), n)
"""


def measure(which: str, path: Path) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(path)], check=True, capture_output=True, text=True)
    base, peak, _ = map(int, out.stdout.split())
    return base, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-791m", help="model shape (see mixtral.config.PRESETS)")
    parser.add_argument("--runs", type=int, default=3, help="runs per loader; the median is reported")
    parser.add_argument("--quantized", choices=QUANT_MODES, help="also load a checkpoint quantized in this mode")
    args = parser.parse_args()
    print(machine_line())
    print(f"memory read bandwidth: {memory_bandwidth_gbs():.1f} GB/s")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        torch.manual_seed(0)
        model = mixtral.Transformer(mixtral.get_preset(args.preset)).to(torch.bfloat16)
        mixtral.save_model(model, path)
        qpath = Path(tmp) / f"ckpt-{args.quantized}"
        if args.quantized:
            save_quantized(quantize_model(model, args.quantized), qpath)
        del model
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        print(f"checkpoint: preset {args.preset}, bf16, {size / 1e9:.2f} GB on disk")
        results = {}
        for which in ("mixtral", "transformers"):
            results[which] = report(which, which, path, size, args.runs)
        ratio = results["mixtral"] / results["transformers"]
        verdict = "OK" if results["mixtral"] <= 1.3 * size else "OVER TARGET"
        print(f"ours / transformers peak RSS: {ratio:.2f}; target peak <= 1.3x checkpoint: {verdict}")
        if args.quantized:
            qsize = (qpath / "model.safetensors").stat().st_size
            print(f"quantized checkpoint: {args.quantized}, {qsize / 1e9:.2f} GB on disk")
            peak = report("mixtral", args.quantized, qpath, qsize, args.runs)
            print(f"target peak <= 1.3x checkpoint: {'OK' if peak <= 1.3 * qsize else 'OVER TARGET'}")


def report(which: str, label: str, path: Path, size: int, runs: int) -> float:
    """Measure one loader `runs` times, print the medians against the checkpoint's size; the peak RSS."""
    results = [measure(which, path) for _ in range(runs)]
    base = statistics.median(r[0] for r in results)
    peak = statistics.median(r[1] for r in results)
    print(
        f"{label:>12}: peak RSS {peak / 1e9:.2f} GB = {peak / size:.2f}x checkpoint "
        f"(after imports {base / 1e9:.2f} GB; loading added {(peak - base) / size:.2f}x)"
    )
    return peak


if __name__ == "__main__":
    main()
