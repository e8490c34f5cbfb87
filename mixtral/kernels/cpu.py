"""The CPU decode kernels of `cpu_decode.cpp`, built on first use with torch.utils.cpp_extension.

`ops()` returns the loaded ops (`torch.ops.mixtral_cpu`), or None where they cannot run: a CPU without
AVX512-BF16, no C++ compiler, a failed build, or `MIXTRAL_CPU_KERNELS=0` in the environment. Callers then
use the plain PyTorch path, which computes the same function (see `quantize.linear` and `moe.experts_decode`);
`status()` says which path is in use and why, and a failed build is reported once on stderr.

The build takes about a minute the first time and is cached (torch's extension folder, keyed by the source).
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
NAME = "mixtral_cpu_decode"
# -fopenmp: ATen's parallel_for is inline OpenMP; without the flag it runs on one thread.
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"]

_ops: Any = None
_reason: str | None = None  # why the kernels are not in use; None before the first try


def cpu_has_avx512_bf16() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags and " avx512bw" in flags and " avx512vl" in flags


def ops() -> Any:
    """torch.ops.mixtral_cpu once built and loaded, else None (see `status()` for why)."""
    global _ops, _reason
    if _ops is not None or _reason is not None:
        return _ops
    if os.environ.get("MIXTRAL_CPU_KERNELS", "1") == "0":
        _reason = "turned off by MIXTRAL_CPU_KERNELS=0"
    elif not cpu_has_avx512_bf16():
        _reason = "this CPU lacks AVX512-BF16"
    else:
        try:
            _build()
            _ops = torch.ops.mixtral_cpu
            _reason = ""
        except Exception as e:  # no compiler, no ninja, headers missing: the PyTorch path does the same work
            _reason = f"the build failed ({type(e).__name__}: {str(e).strip().splitlines()[-1][:300]})"
            print(f"mixtral: CPU decode kernels not available, using torch.mv instead: {_reason}", file=sys.stderr)
    return _ops


def status() -> str:
    """Which kernels single-token CPU matmuls use, in words."""
    ops()
    return "AVX512-BF16 decode kernels" if _ops is not None else f"torch.mv ({_reason})"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside: the plain PyTorch path, as if the kernels were unavailable (to compare the two)."""
    global _ops, _reason
    saved = ops(), _reason
    _ops, _reason = None, "disabled for comparison"
    try:
        yield
    finally:
        _ops, _reason = saved


def _build() -> None:
    from torch.utils.cpp_extension import _get_build_directory, load

    folder = Path(_get_build_directory(NAME, verbose=False))
    if not any(folder.glob(f"{NAME}*.so")):
        print("mixtral: compiling the CPU decode kernels (once; about a minute)...", file=sys.stderr, flush=True)
    load(NAME, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)

    @torch.library.register_fake("mixtral_cpu::gemv")
    def _(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(W.shape[0])

    @torch.library.register_fake("mixtral_cpu::experts")
    def _(x, w1, w2, w3, weights, idx) -> torch.Tensor:
        return x.new_empty(x.shape[0])
