"""How often offloaded experts are already resident when the routing chooses them (`mixtral.offload`), with and
without the prefetch, for a few slot counts: counts of a real model's routing, not times (any device does; the CPU
stands in for the GPU). Prints, per slot count, the hit rate, the experts copied and the prefetches used.

    python benchmarks/offload_hits.py [--checkpoint DIR] [--resident 2 3 4 6] [--new-tokens 64]
"""

from __future__ import annotations

import argparse

import mixtral
from mixtral.offload import offload_experts

PROMPTS = [
    "To be, or not to be",
    "ROMEO:\nBut soft, what light",
    "KING HENRY:\nOnce more unto the breach",
    "First Citizen:\nBefore we proceed",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=mixtral.BUILTIN, help="model (default: the built-in one)")
    parser.add_argument("--resident", type=int, nargs="+", default=[2, 3, 4, 6], help="expert slots per layer")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt (default: 64)")
    args = parser.parse_args()
    tok = mixtral.load_tokenizer(args.checkpoint)
    print("| resident per layer | prefetch | hit rate | experts copied | prefetches used |")
    print("|---|---|---|---|---|")
    for resident in args.resident:
        for prefetch in (False, True):
            model = mixtral.load_model(args.checkpoint)
            offload = offload_experts(model, "cpu", resident, prefetch=prefetch)
            for prompt in PROMPTS:
                mixtral.generate(model, [tok.encode(prompt)], max_new_tokens=args.new_tokens, temperature=0.0)
            t = offload.total()
            used = f"{t.prefetch_used} of {t.prefetches}" if prefetch else "-"
            print(
                f"| {resident} of {model.config.n_experts} | {'on' if prefetch else 'off'} | {t.hit_rate:.1%} "
                f"({t.hits} of {t.hits + t.misses}) | {t.loads} | {used} |"
            )


if __name__ == "__main__":
    main()
