"""What serving a LoRA adapter costs a decode step: the median step time (`generate.decode_step` on a `KVCache`,
`--context` positions of context per row) at batch 1 and 8 with every row on the base model, every row on one
adapter (`serve.adapters.AdapterBank`, un-merged), and half the rows each; plus the base model's eager step (the
model's code, not the fused one-token step), the path a step with an adapter takes. Ratios to the base step.

    PYTHONPATH=. .venv/bin/python benchmarks/adapters.py [--preset bench-791m] [--rank 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

import mixtral
from mixtral.cache import KVCache
from mixtral.generate import decode_step
from mixtral.measure import machine_line
from mixtral.serve.adapters import AdapterBank
from mixtral.train.lora import ATTENTION_TARGETS, EXPERT_TARGETS, apply_lora, save_adapter


def write_adapter(config: mixtral.ModelConfig, rank: int, path: Path) -> None:
    """A rank-`rank` adapter on every weight LoRA can target, with random (non-zero) A and B."""
    model = mixtral.Transformer(config)
    for p in apply_lora(model, rank, 2.0 * rank, ATTENTION_TARGETS + EXPERT_TARGETS):
        torch.nn.init.normal_(p, std=0.02)
    save_adapter(model, path)


def step_ms(model: mixtral.Transformer, cache: KVCache, batch: int, pos: int, rounds: int) -> float:
    tokens, positions = torch.full((batch,), 7), torch.full((batch,), pos)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        decode_step(model, cache, tokens, positions)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-791m")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20, help="steps timed per case (the median is reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    torch.manual_seed(0)
    config = dataclasses.replace(mixtral.get_preset(args.preset), max_seq_len=max(args.context + 16, 256))
    model = mixtral.Transformer(config).eval().to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        write_adapter(config, args.rank, Path(tmp) / "a")
        bank = AdapterBank.load(model, {"a": Path(tmp) / "a"})
    total, active = config.param_counts()
    print(
        f"model: {args.preset} ({total / 1e6:.0f}M parameters, {active / 1e6:.0f}M active) bf16; adapter rank "
        f"{args.rank} on {', '.join(ATTENTION_TARGETS + EXPERT_TARGETS)}; {args.context} positions of context; "
        f"{args.threads} thread(s); median of {args.rounds} steps\n"
    )
    print("| batch | base ms | base, eager ms | all rows adapted ms | half the rows ms | adapted / base |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for batch in (1, 8):
            cache = KVCache(config, batch, config.max_seq_len, dtype=torch.bfloat16)
            prompt = torch.randint(3, config.vocab_size, (batch, args.context))
            model(prompt, positions=torch.arange(args.context).expand(batch, -1), cache=cache)

            def timed(slots: list[int | None], cache: KVCache = cache, batch: int = batch) -> float:
                bank.select(slots)
                step_ms(model, cache, batch, args.context, 3)  # warm up
                return step_ms(model, cache, batch, args.context, args.rounds)

            base = timed([None] * batch)
            handle = model.layers[0].attn.wq.register_forward_hook(lambda *_: None)  # a hook: the eager path
            eager = timed([None] * batch)
            handle.remove()
            adapted = timed([0] * batch)
            half = timed([0, None] * (batch // 2)) if batch > 1 else float("nan")
            print(f"| {batch} | {base:.1f} | {eager:.1f} | {adapted:.1f} | {half:.1f} | {adapted / base:.2f} |")
    bank.select([None])


if __name__ == "__main__":
    main()
