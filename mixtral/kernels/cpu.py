"""The CPU decode kernels of `cpu_decode.cpp`, built on first use with torch.utils.cpp_extension.

The source builds for one of two instruction sets (`isa()`): AVX512-BF16, -VNNI and -VBMI (Zen 4, Sapphire
Rapids), or else AVX2 with FMA and F16C (most other x86 CPUs of the last decade); the same ops, signatures and
weight layouts either way. `ops()` returns the loaded ops (`torch.ops.mixtral_cpu`), or None where they cannot
run: a CPU with neither set, no C++ compiler, a failed build, or `MIXTRAL_CPU_KERNELS=0` in the environment
(`MIXTRAL_CPU_KERNELS=avx2` builds the AVX2 kernels on an AVX-512 CPU too, to compare the two).
Callers then use the plain PyTorch path, which computes the same function (see `quantize.linear` and
`moe.experts_decode`); `status()` says which path is in use and why, and a failed build is reported once on stderr.

The build takes a minute or two the first time and is kept in a folder of this installed copy's own
(`build_directory`), keyed by the source and the flags of the instruction set.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
# -fopenmp: ATen's parallel_for is inline OpenMP; without the flag it runs on one thread.
BASE_FLAGS = ["-O3", "-fopenmp"]
# Per instruction set: the compiler flags, and the /proc/cpuinfo flags a CPU needs for them.
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mavx512vbmi", "-mfma"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}
CPU_FLAGS = {
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx512vbmi", "fma"),
    "avx2": ("avx2", "fma", "f16c"),
}
ISA_NAMES = {"avx512": "AVX512-BF16", "avx2": "AVX2"}

_ops: Any = None
_reason: str | None = None  # why the kernels are not in use; None before the first try
_isa: str | None = None  # the instruction set of the loaded kernels


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty off Linux x86-64)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def pick_isa(flags: set[str], wanted: str = "") -> str | None:
    """The instruction set to build for a CPU with these flags: "avx512" where it has all of CPU_FLAGS["avx512"],
    else "avx2" where it has AVX2, FMA and F16C, else None; `wanted` ("avx2") asks for the AVX2 build even where
    AVX-512 is there."""
    order = ["avx2"] if wanted == "avx2" else list(ISA_FLAGS)
    return next((isa for isa in order if all(f in flags for f in CPU_FLAGS[isa])), None)


def isa() -> str | None:
    """The instruction set the kernels are built for on this CPU (see `pick_isa`)."""
    return pick_isa(cpu_flags(), os.environ.get("MIXTRAL_CPU_KERNELS", ""))


def ops() -> Any:
    """torch.ops.mixtral_cpu once built and loaded, else None (see `status()` for why)."""
    global _ops, _reason
    if _ops is not None or _reason is not None:
        return _ops
    if os.environ.get("MIXTRAL_CPU_KERNELS", "1") == "0":
        _reason = "turned off by MIXTRAL_CPU_KERNELS=0"
    elif isa() is None:
        _reason = "this CPU has neither AVX512-BF16/VNNI/VBMI nor AVX2 with FMA and F16C"
    else:
        try:
            _build(isa())
            _ops = torch.ops.mixtral_cpu
            _reason = ""
        except Exception as e:  # no compiler, no ninja, headers missing: the PyTorch path does the same work
            _reason = f"the build failed ({type(e).__name__}: {str(e).strip().splitlines()[-1][:300]})"
            print(f"mixtral: CPU decode kernels not available, using torch.mv instead: {_reason}", file=sys.stderr)
    return _ops


def status() -> str:
    """Which kernels single-token CPU matmuls use, in words."""
    ops()
    return f"{ISA_NAMES[_isa]} decode kernels" if _ops is not None else f"torch.mv ({_reason})"


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


def build_directory(name: str) -> Path:
    """Where this installed copy builds the kernels: a folder of its own under the user's cache (MIXTRAL_KERNEL_DIR
    or $XDG_CACHE_HOME/mixtral/kernels), named by the Python environment, torch version and location of this copy,
    so that two installs (two venvs) never share, nor rebuild each other's, build."""
    root = os.environ.get("MIXTRAL_KERNEL_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    owner = f"{sys.prefix}|{torch.__version__}|{SOURCE.parent.resolve()}"
    copy = hashlib.sha256(owner.encode()).hexdigest()[:12]
    base = Path(root) if os.environ.get("MIXTRAL_KERNEL_DIR") else Path(root) / "mixtral" / "kernels"
    return base / copy / name


def build_name(target: str) -> str:
    """The build's name, by a hash of the source and the flags of instruction set `target`: a changed source is a
    new name, so "not built yet" is exact."""
    flags = BASE_FLAGS + ISA_FLAGS[target]
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    return f"mixtral_cpu_decode_{target}_{digest}"


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """One builder at a time per build folder, by an OS lock (`flock`) that the kernel releases when its holder
    dies. torch's own lock is a file that a killed build leaves behind, after which every later build would wait
    for it forever; holding ours, any such file is stale, and it is removed."""
    with open(folder / "build.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            (folder / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(target: str | None = None) -> None:
    """Builds (or loads a finished build of) the kernels for instruction set `target` (default: this CPU's)."""
    from torch.utils.cpp_extension import load

    global _isa
    target = target or isa() or "avx2"
    flags = BASE_FLAGS + ISA_FLAGS[target]
    name = build_name(target)
    folder = build_directory(name)
    folder.mkdir(parents=True, exist_ok=True)
    fresh = not any(folder.glob(f"{name}*.so"))
    if fresh:
        print(f"mixtral: compiling the CPU kernels into {folder} (once per install; 1-3 minutes)...", file=sys.stderr)
        sys.stderr.flush()
    start = time.perf_counter()
    with _build_lock(folder):
        load(
            name,
            [str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            is_python_module=False,
            verbose=False,
        )
    if fresh:
        print(f"mixtral: CPU kernels built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    _isa = target

    @torch.library.register_fake("mixtral_cpu::gemv")
    def _(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(W.shape[0])

    @torch.library.register_fake("mixtral_cpu::gemm")
    def _(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], W.shape[0]))

    @torch.library.register_fake("mixtral_cpu::swiglu")
    def _(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], w2.shape[0]))

    @torch.library.register_fake("mixtral_cpu::swiglu_int8")
    def _(x: torch.Tensor, q1, s1, q2: torch.Tensor, s2, q3, s3) -> torch.Tensor:
        return x.new_empty((x.shape[0], q2.shape[0]))

    @torch.library.register_fake("mixtral_cpu::swiglu_int4")
    def _(x: torch.Tensor, b1, b2: torch.Tensor, b3, group: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], b2.shape[0] * 64))

    @torch.library.register_fake("mixtral_cpu::gemm_int8")
    def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], q.shape[0]))

    @torch.library.register_fake("mixtral_cpu::gemm_int4")
    def _(x: torch.Tensor, blocks: torch.Tensor, group: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], blocks.shape[0] * 64))

    @torch.library.register_fake("mixtral_cpu::gemv_cat")
    def _(Ws: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(sum(W.shape[0] for W in Ws))

    @torch.library.register_fake("mixtral_cpu::combine")
    def _(ys: list[torch.Tensor], weights: torch.Tensor, token_of: torch.Tensor, T: int) -> torch.Tensor:
        return ys[0].new_empty((T, ys[0].shape[-1]))

    @torch.library.register_fake("mixtral_cpu::rms_norm")
    def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.empty_like(x)

    @torch.library.register_fake("mixtral_cpu::gemv_int8")
    def _(Q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], Q.shape[0]))

    @torch.library.register_fake("mixtral_cpu::gemv_int4")
    def _(blocks: torch.Tensor, x: torch.Tensor, group: int) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], blocks.shape[0] * 64))

    @torch.library.register_fake("mixtral_cpu::experts_int4")
    def _(x, b1, b2, b3, weights, idx, group) -> torch.Tensor:
        return torch.empty_like(x)

    @torch.library.register_fake("mixtral_cpu::decode_layer")
    def _(x, attn_norm, ffn_norm, eps, wq, wk, wv, wo, cos, sin, cache_k, cache_v, slot, mask, router, *rest):
        return torch.empty_like(x), x.new_empty((1, router.shape[0]))

    @torch.library.register_fake("mixtral_cpu::decode_token")
    def _(token, pos, embed, inv_freq, slot_pos, window, rolling, norms, eps, wq, wk, wv, wo, k, v, router, *rest):
        head = rest[-2][0]  # int4 blocks [V / 64, ...]; else [V, D]
        vocab = head.shape[0] * (64 if head.dtype == torch.uint8 else 1)
        return embed.new_empty((1, 1, vocab)), embed.new_empty((len(router), 1, router[0].shape[0]))

    @torch.library.register_fake("mixtral_cpu::experts")
    def _(x, w1, w2, w3, weights, idx) -> torch.Tensor:
        return torch.empty_like(x)

    @torch.library.register_fake("mixtral_cpu::decode_attention")
    def _(q, k, v, mask, scale) -> torch.Tensor:
        return torch.empty_like(q)

    @torch.library.register_fake("mixtral_cpu::experts_int8")
    def _(x, q1, s1, q2, s2, q3, s3, weights, idx) -> torch.Tensor:
        return torch.empty_like(x)
