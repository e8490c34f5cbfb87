"""What every benchmark measures the same way: the machine and its memory bandwidth, a process's memory, and the
timed prefill + greedy decode of our model (`bench`, `full_scale` and the scripts in benchmarks/ share them)."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import torch


def memory_bandwidth_gbs(nbytes: int = 512 << 20, repeats: int = 7) -> float:
    """Read bandwidth in GB/s: the median time of a vectorised full read (torch.sum) of `nbytes`."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()  # fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
    }


def machine_line(info: dict | None = None) -> str:
    """The machine, versions and date on one line, for the top of a benchmark's output."""
    return " | ".join(f"{k} {v}" for k, v in (info or machine()).items())


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024


def random_prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [[1, *torch.randint(3, vocab, (length - 1,), generator=g).tolist()] for _ in range(batch)]


def run_ours(model, prompts: list[list[int]], n_prompt: int, n_new: int) -> tuple[float, float]:
    """Seconds of our prefill of the prompts' first `n_prompt` tokens, then of `n_new` - 1 greedy decode steps."""
    from .cache import KVCache
    from .generate import decode_step, prefill

    batch = len(prompts)
    cache = KVCache(model.config, batch, n_prompt + n_new, dtype=model.embed.weight.dtype)
    t0 = time.perf_counter()
    logits = prefill(model, cache, [p[:n_prompt] for p in prompts])
    t1 = time.perf_counter()
    pos = torch.full((batch,), n_prompt, dtype=torch.long)
    for _ in range(n_new - 1):
        logits = decode_step(model, cache, logits.argmax(-1), pos)
        pos += 1
    return t1 - t0, time.perf_counter() - t1
