"""Peak resident memory while loading a bf16 checkpoint: ours against transformers, in the same run.

Target: peak RSS of the loading process <= 1.3x the checkpoint's size on disk (the weights are streamed
from the memory-mapped files into place; no second full copy).

    .venv/bin/python benchmarks/load_memory.py [--preset bench-791m] [--runs 3]
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
    args = parser.parse_args()
    print(machine_line())
    print(f"memory read bandwidth: {memory_bandwidth_gbs():.1f} GB/s")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        torch.manual_seed(0)
        model = mixtral.Transformer(mixtral.get_preset(args.preset)).to(torch.bfloat16)
        mixtral.save_model(model, path)
        del model
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        print(f"checkpoint: preset {args.preset}, bf16, {size / 1e9:.2f} GB on disk")
        results = {}
        for which in ("mixtral", "transformers"):
            runs = [measure(which, path) for _ in range(args.runs)]
            base = statistics.median(r[0] for r in runs)
            peak = statistics.median(r[1] for r in runs)
            results[which] = peak
            print(
                f"{which:>12}: peak RSS {peak / 1e9:.2f} GB = {peak / size:.2f}x checkpoint "
                f"(after imports {base / 1e9:.2f} GB; loading added {(peak - base) / size:.2f}x)"
            )
        ratio = results["mixtral"] / results["transformers"]
        verdict = "OK" if results["mixtral"] <= 1.3 * size else "OVER TARGET"
        print(f"ours / transformers peak RSS: {ratio:.2f}; target peak <= 1.3x checkpoint: {verdict}")


if __name__ == "__main__":
    main()
