"""Plot training curves (metrics.jsonl files written by `mixtral train`) into one PNG.

python scripts/plot_curves.py OUT.png LABEL=metrics.jsonl [LABEL=metrics.jsonl ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(out: str, runs: list[str]) -> None:
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for spec in runs:
        label, path = spec.split("=", 1)
        records = [json.loads(line) for line in Path(path).read_text().splitlines()]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        steps, losses = zip(*train, strict=True)
        smooth = [sum(losses[max(0, i - 9) : i + 1]) / len(losses[max(0, i - 9) : i + 1]) for i in range(len(losses))]
        ax_train.plot(steps, smooth, label=label)
        ax_eval.plot(*zip(*evals, strict=True), marker="o", label=f"{label} (final {evals[-1][1]:.3f})")
    ax_train.set(title="training loss (moving average of 10 logs)", xlabel="step", ylabel="nats / token", ylim=(3.5, 7))
    ax_eval.set(title="held-out loss (plays never trained on)", xlabel="step", ylabel="nats / token")
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
