"""Peak resident memory while loading a bf16 checkpoint: ours against transformers, in the same run.

Target: peak RSS of the loading process <= 1.3x the checkpoint's size on disk (the weights are streamed
from the memory-mapped files into place; no second full copy).

    .venv/bin/python benchmarks/load_memory.py [--preset bench-791m] [--runs 3] [--quantized int8]

With `--quantized`, a quantized checkpoint of the same model is measured too (ours only), used in place (its
weights are views of the file's mapping: the default on a CPU) and copied into memory (`in_place=False`): load
time, RSS after loading and after a 16-token forward pass. In place, the pages of the file count in the RSS only
once touched, and they are the page cache's to drop: a model larger than the RAM still runs.
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
from mixtral.checkpoint import save_quantized
from mixtral.checkpoint.writer import QUANT_WEIGHTS
from mixtral.measure import machine_line, memory_bandwidth_gbs
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
import time
which, path = sys.argv[1], sys.argv[2]
if which.startswith("mixtral"):
    import mixtral
    from mixtral.checkpoint.quantized import load_quantized
    base = rss_now()
    t0 = time.perf_counter()
    if which == "mixtral-copied":
        model = load_quantized(path, in_place=False)
    else:
        model = mixtral.load_model(path, dtype=None if which == "mixtral-in-place" else torch.bfloat16)
else:
    from transformers import MixtralForCausalLM
    base = rss_now()
    t0 = time.perf_counter()
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
seconds = time.perf_counter() - t0
loaded = rss_now()
with torch.no_grad():
    model(torch.arange(1, 17)[None])
print(base, status("VmHWM"), loaded, rss_now(), seconds)
"""


def measure(which: str, path: Path) -> tuple[int, ...]:
    """(RSS after imports, peak RSS, RSS after loading, RSS after a forward pass, load seconds) of one run."""
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(path)], check=True, capture_output=True, text=True)
    base, peak, loaded, after, seconds = out.stdout.split()
    return int(base), int(peak), int(loaded), int(after), float(seconds)


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
            qsize = (qpath / QUANT_WEIGHTS).stat().st_size
            print(f"quantized checkpoint: {args.quantized}, {qsize / 1e9:.2f} GB on disk")
            for which in ("mixtral-in-place", "mixtral-copied"):
                report(which, f"{args.quantized} {which.removeprefix('mixtral-')}", qpath, qsize, args.runs)


def report(which: str, label: str, path: Path, size: int, runs: int) -> float:
    """Measure one loader `runs` times, print the medians against the checkpoint's size; the peak RSS."""
    results = [measure(which, path) for _ in range(runs)]
    base, peak, loaded, after, seconds = (statistics.median(r[i] for r in results) for i in range(5))
    print(
        f"{label:>16}: load {seconds:.2f} s, peak RSS {peak / 1e9:.2f} GB = {peak / size:.2f}x checkpoint "
        f"(after imports {base / 1e9:.2f} GB; loading added {(loaded - base) / size:.2f}x, a 16-token forward pass "
        f"{(after - loaded) / size:.2f}x more)"
    )
    return peak


if __name__ == "__main__":
    main()
