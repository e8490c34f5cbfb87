"""Helpers shared by the benchmark scripts: the machine's description and its memory bandwidth."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import torch


def machine_header() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers

    return (
        f"date {datetime.datetime.now().isoformat(timespec='seconds')} | {cpu} | {os.cpu_count()} cores | "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads) | transformers {transformers.__version__} | "
        f"python {platform.python_version()}"
    )


def memory_bandwidth_gbs(nbytes: int = 512 << 20, repeats: int = 7) -> float:
    """Read bandwidth in GB/s: the median time of a vectorised full read (torch.sum) of `nbytes`."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()  # warm up: fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9
