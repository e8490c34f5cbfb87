"""What the paged KV cache's gather costs: the median decode step through `Steps` over a `KVCache` (the rows in
place) and over a `PagedKVCache` (the rows' blocks copied into a contiguous cache and the new keys copied back),
at batch 1 and 8, 1,000 positions of context each, bf16, one thread.

    PYTHONPATH=. .venv/bin/python benchmarks/paged_gather.py tiny
"""

import dataclasses
import sys
import time

import torch

import mixtral
from mixtral.cache import KVCache, PagedKVCache
from mixtral.serve.steps import Steps

torch.set_num_threads(1)
preset = sys.argv[1] if len(sys.argv) > 1 else "tiny"
torch.manual_seed(0)
config = mixtral.get_preset(preset)
config = dataclasses.replace(config, max_seq_len=max(config.max_seq_len, 2048))
model = mixtral.Transformer(config).eval().to(torch.bfloat16)
for B in (1, 8):
    ctx = 1000
    res = {}
    for name in ("slab", "paged"):
        cache = (
            KVCache(config, B, 1100, dtype=torch.bfloat16)
            if name == "slab"
            else PagedKVCache(config, B, B * 70, dtype=torch.bfloat16)
        )
        steps = Steps(model, cache)
        for r in range(B):
            steps.admit(r, 1100, [1])
            for a in range(0, ctx, 512):
                steps.prefill(r, list(range(5, 5 + min(512, ctx - a))), a)
        pos = torch.full((B,), ctx)
        tok = torch.full((B,), 7)
        times = []
        for _ in range(40):
            t = time.perf_counter()
            steps.decode(tok, pos)
            times.append(time.perf_counter() - t)
            pos += 1
        times.sort()
        res[name] = times[len(times) // 2] * 1e3
    slab, paged = res["slab"], res["paged"]
    print(f"{preset} B={B}, context {ctx}: decode step median {slab:.2f} ms in place, {paged:.2f} ms paged", end="")
    print(f" (paged / in place {paged / slab:.2f})")
