"""The analysis of the paper-claims runs (issue 26, docs/paper-claims.md): held-out loss of MoE and dense at
equal active compute per size, the balance of the MoE routers, and routing on held-out code.

    .venv/bin/python scripts/paper_claims_analysis.py            (after scripts/paper_claims.sh's runs)

For each size S it reads runs/code/S-moe and runs/code/S-dense (metrics.jsonl, model/) and
experiments/code/S-{moe,dense}.toml, and writes into docs/paper-claims/:
- curves.png: held-out loss against training tokens, MoE and dense per size (and the training loss);
- load_S-moe.png: each expert's share of first choices per layer over training (from metrics.jsonl);
- routing_S-moe/: `mixtral routing` on the held-out code files (repeat rates against chance and the
  shuffled baseline, expert share by token class, the token view coloured by expert);
- results.md and results.json: the table, the verdicts, and the routing tables; readme_table.md: a short
  table for the README;
and replaces the text between `<!-- results:begin -->` and `<!-- results:end -->` of docs/paper-claims.md
with results.md. Every final model is also evaluated on 1024 held-out sequences spread evenly over the split
(262k tokens from every held-out module; the runs' curves use the split's first 32 sequences), which also
gives the busiest expert's share of first choices per layer on held-out code.
A run that is missing or unfinished is reported as such; nothing is made up.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
import tomllib
from pathlib import Path

import torch

from mixtral.checkpoint import load_model
from mixtral.routing import markdown_table, write_report
from mixtral.tokenizer import load_tokenizer
from mixtral.train.data import PackedSequences, expand_paths, load_tokenized
from mixtral.train.loss import cross_entropy
from mixtral.train.trainer import TrainConfig

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
FAIR_LIMIT = 2.0  # the target: the busiest expert takes at most 2x a fair share of first choices


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def full_eval(model, seqs: PackedSequences, batch_size: int, n_seqs: int) -> dict:
    """Mean loss per target token over `n_seqs` held-out sequences spread evenly over the split (0: all), and
    (MoE) the share of first choices of each expert per layer over all those tokens."""
    model.eval()
    mc = model.config
    model.keep_router_logits = mc.n_experts > 1
    nats, count = 0.0, 0
    first = torch.zeros(mc.n_layers, mc.n_experts)
    step = max(1, len(seqs) // n_seqs) if n_seqs else 1
    picked = list(range(0, len(seqs), step))[: n_seqs or None]
    for b in range(0, len(picked), batch_size):
        inputs, targets, mask = seqs.batch(picked[b : b + batch_size])
        logits = model(inputs)
        m = int(mask.sum())
        nats += cross_entropy(logits, targets, mask).item() * m
        count += m
        if mc.n_experts > 1:
            for layer, r in enumerate(model.router_logits):
                first[layer] += torch.bincount(r.argmax(-1), minlength=mc.n_experts).float()
    loss = nats / max(count, 1)
    out = {"loss": loss, "tokens": count, "sequences": len(picked)}
    if seqs.chars_per_target:
        out["bpc"] = loss / math.log(2) / seqs.chars_per_target
    if mc.n_experts > 1:
        out["first_choice_share"] = (first / first.sum(1, keepdim=True)).tolist()
    return out


def run_info(name: str, runs: Path, configs: Path) -> dict:
    cfg_path = configs / f"{name}.toml"
    info: dict = {"name": name, "config": str(cfg_path)}
    if not cfg_path.is_file():
        info["status"] = "no config"
        return info
    cfg = TrainConfig(**tomllib.loads(cfg_path.read_text()))
    mc = cfg.model_config()
    total, active = mc.param_counts()
    records = read_records(runs / name / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    last_step = max((r["step"] for r in records), default=0)
    finished = (runs / name / "model").is_dir() and last_step >= cfg.steps

    def last(key: str):
        return next((r[key] for r in reversed(train) if key in r), None)

    speeds = sorted(r["tokens_per_s"] for r in train if "tokens_per_s" in r)
    info.update(
        cfg=cfg,
        moe=mc.n_experts > 1,
        params_total=total,
        params_active=active,
        params_embedding=mc.vocab_size * mc.dim,
        tokens_planned=cfg.steps * tokens_per_step,
        tokens_seen=last_step * tokens_per_step,
        tokens_per_step=tokens_per_step,
        steps=cfg.steps,
        last_step=last_step,
        status="finished" if finished else ("in progress or stopped" if records else "not run"),
        train=[(r["step"] * tokens_per_step, r["loss"]) for r in train],
        evals=[(r["step"] * tokens_per_step, r["eval_loss"]) for r in evals],
        final_eval=evals[-1]["eval_loss"] if evals else None,
        tokens_per_s=speeds[len(speeds) // 2] if speeds else None,
        load_over_training=[(r["step"], r["first_choice_load"]) for r in train if "first_choice_load" in r],
        train_last_first_choice=last("first_choice_load"),
        train_last_max_load=last("max_load_by_layer"),
    )
    return info


def plot_curves(sizes: list[str], infos: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(sizes), figsize=(5.5 * len(sizes), 7.5), squeeze=False, layout="constrained")
    for j, size in enumerate(sizes):
        for kind, color in (("moe", "tab:red"), ("dense", "tab:blue")):
            info = infos.get(f"{size}-{kind}")
            if not info or not info.get("evals"):
                continue
            label = f"{kind} ({info['params_total'] / 1e6:.2f}M params, {info['params_active'] / 1e6:.2f}M active)"
            x, y = zip(*info["evals"], strict=True)
            axes[0, j].plot([t / 1e6 for t in x], y, marker="o", color=color, label=label)
            if "full_eval" in info:
                axes[0, j].scatter([x[-1] / 1e6], [info["full_eval"]["loss"]], marker="*", s=120, color=color,
                                   label=f"{kind}: spread held-out sample {info['full_eval']['loss']:.3f}")  # fmt: skip
            tx, ty = zip(*info["train"], strict=True)
            k = 10  # moving average over 10 logs
            smooth = [sum(ty[max(0, i - k + 1) : i + 1]) / len(ty[max(0, i - k + 1) : i + 1]) for i in range(len(ty))]
            axes[1, j].plot([t / 1e6 for t in tx], smooth, color=color, label=kind)
        axes[0, j].set(title=f"size {size}: held-out loss", xlabel="training tokens (M)", ylabel="nats / token")
        axes[1, j].set(title=f"size {size}: training loss (moving average)", xlabel="training tokens (M)",
                       ylabel="nats / token")  # fmt: skip
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        ys = [v for k in ("moe", "dense") for _, v in infos.get(f"{size}-{k}", {}).get("evals", [])[1:]]
        if ys:
            axes[0, j].set_ylim(min(ys) - 0.05, max(ys) + 0.05)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_load(info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _ in info["load_over_training"]]
    load = torch.tensor([v for _, v in info["load_over_training"]])  # [steps, L, E]
    _, L, E = load.shape
    fig, axes = plt.subplots(1, L, figsize=(4.2 * L, 3.4), squeeze=False, layout="constrained")
    for layer in range(L):
        ax = axes[0, layer]
        for e in range(E):
            ax.plot(steps, load[:, layer, e].numpy(), lw=1, label=f"expert {e}")
        ax.axhline(1 / E, color="k", ls="--", lw=0.8, label="fair share")
        ax.axhline(FAIR_LIMIT / E, color="tab:red", ls=":", lw=0.8, label=f"{FAIR_LIMIT:g}x fair")
        ax.set(title=f"layer {layer}", xlabel="step", ylim=(0, max(0.5, float(load[:, layer].max()) + 0.02)))
        if layer == 0:
            ax.set_ylabel("share of first choices (training batch)")
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{info['name']}: per-expert load over training")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def results_markdown(sizes: list[str], infos: dict, routing: dict, prefix: str) -> str:
    lines = [
        "| size | model | parameters (total / active) | tokens | tokens per parameter | held-out loss "
        "(first 32 seqs) | held-out loss (spread sample) | bits/char | train tok/s (1 thread) | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for size in sizes:
        for kind in ("moe", "dense"):
            i = infos.get(f"{size}-{kind}", {})
            if "params_total" not in i:
                lines.append(f"| {size} | {kind} | | | | | | | | {i.get('status', 'not run')} |")
                continue
            fe = i.get("full_eval", {})
            lines.append(
                f"| {size} | {kind} | {i['params_total'] / 1e6:.2f}M / {i['params_active'] / 1e6:.2f}M | "
                f"{i['tokens_seen'] / 1e6:.2f}M of {i['tokens_planned'] / 1e6:.2f}M | "
                f"{i['tokens_seen'] / i['params_total']:.1f} | "
                + (f"{i['final_eval']:.4f}" if i["final_eval"] is not None else "")
                + " | "
                + (f"{fe['loss']:.4f}" if fe else "")
                + " | "
                + (f"{fe['bpc']:.3f}" if fe.get("bpc") else "")
                + " | "
                + (f"{i['tokens_per_s']:.0f}" if i["tokens_per_s"] else "")
                + f" | {i['status']} |"
            )
        moe, dense = infos.get(f"{size}-moe", {}), infos.get(f"{size}-dense", {})
        if moe.get("full_eval") and dense.get("full_eval"):
            d = moe["full_eval"]["loss"] - dense["full_eval"]["loss"]
            who = "MoE lower (the paper's claim holds)" if d < 0 else "dense lower (the claim does not hold here)"
            verdicts.append(
                f"- size {size}: MoE {moe['full_eval']['loss']:.4f} vs dense {dense['full_eval']['loss']:.4f} "
                f"nats/token on the spread held-out sample: {d:+.4f}, {who}."
            )
        else:
            verdicts.append(f"- size {size}: no verdict: the pair of runs is not finished.")
    text = "### Held-out loss at equal active compute\n\n" + "\n".join(lines) + "\n\n" + "\n".join(verdicts) + "\n"
    text += f"\n![held-out and training loss, MoE vs dense]({prefix}curves.png)\n"

    text += "\n### Router balance: the busiest expert's share of first choices per layer\n\n"
    text += f"Target: at most {FAIR_LIMIT:g}x a fair share in every layer (for 8 experts: 25%).\n\n"
    text += "| run | aux / first-choice aux / z-loss / jitter | held-out code (spread sample), per layer "
    text += "| last training batch, per layer | target met |\n"
    text += "|---|---|---|---|---|\n"
    for size in sizes:
        i = infos.get(f"{size}-moe", {})
        if not i.get("moe"):
            continue
        cfg = i["cfg"]
        held = i.get("full_eval", {}).get("first_choice_share")
        held_max = [max(row) for row in held] if held else None
        train_max = [max(row) for row in i["train_last_first_choice"]] if i["train_last_first_choice"] else None
        E = cfg.model_config().n_experts
        ok = "" if held_max is None else ("yes" if max(held_max) <= FAIR_LIMIT / E else "no")
        text += (
            f"| {i['name']} | {cfg.aux_loss_coef:g} / {cfg.first_choice_aux_coef:g} / {cfg.z_loss_coef:g} / "
            f"{cfg.router_jitter:g}{' (per layer)' if cfg.balance_per_layer else ''} | "
            + (", ".join(pct(x) for x in held_max) if held_max else "")
            + " | "
            + (", ".join(pct(x) for x in train_max) if train_max else "")
            + f" | {ok} |\n"
        )
    for size in sizes:
        name = f"{size}-moe"
        if infos.get(name, {}).get("load_over_training"):
            text += f"\n![per-expert load over training, {name}]({prefix}load_{name}.png)\n"

    for name, report in routing.items():
        text += f"\n### Routing on held-out code: {name}\n\n"
        text += (
            f"{sum(report['tokens'].values())} tokens of {len(report['tokens'])} held-out files "
            f"(`data/code/heldout_files/`). Repeat rates of consecutive tokens' experts, against uniform chance "
            f"and against the same tokens shuffled (which keeps each expert's share), then the first-choice "
            f"expert shares by token class for each layer (classes by Python's `tokenize`).\n\n"
        )
        text += markdown_table(report)
        text += (
            f"\nFiles: [report]({prefix}routing_{name}/routing.md), "
            f"[token view coloured by expert]({prefix}routing_{name}/routing_tokens.html), "
            f"![shares]({prefix}routing_{name}/routing_share.png)\n"
        )
    return text


def readme_table(sizes: list[str], infos: dict) -> str:
    """A short table for the README: per size, held-out loss of MoE and dense and the busiest expert."""
    lines = [
        "| size | parameters MoE / dense (active) | tokens | held-out loss MoE | dense | MoE - dense "
        "| busiest expert, first choices (per layer) |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        moe, dense = infos.get(f"{size}-moe", {}), infos.get(f"{size}-dense", {})
        if not (moe.get("full_eval") and dense.get("full_eval")):
            lines.append(f"| {size} | not finished | | | | | |")
            continue
        m, d = moe["full_eval"], dense["full_eval"]
        busiest = ", ".join(pct(max(row)) for row in m["first_choice_share"])
        lines.append(
            f"| {size} | {moe['params_total'] / 1e6:.2f}M / {dense['params_total'] / 1e6:.2f}M "
            f"({moe['params_active'] / 1e6:.2f}M) | {moe['tokens_seen'] / 1e6:.2f}M | {m['loss']:.4f} | "
            f"{d['loss']:.4f} | {m['loss'] - d['loss']:+.4f} | {busiest} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["xs", "s"])
    p.add_argument("--runs", default="runs/code", help="folder of the runs (default: runs/code)")
    p.add_argument("--configs", default="experiments/code", help="folder of the TOML configs")
    p.add_argument("--out", default="docs/paper-claims", help="folder for plots and tables")
    p.add_argument("--doc", default="docs/paper-claims.md", help="markdown file whose results section is replaced")
    p.add_argument("--routing-texts", default="data/code/heldout_files/*.py")
    p.add_argument("--no-full-eval", action="store_true", help="skip the evaluation on the spread held-out sample")
    p.add_argument("--eval-seqs", type=int, default=1024, help="held-out sequences for the final evaluation (0: all)")
    args = p.parse_args()
    torch.manual_seed(0)
    runs, configs, out = Path(args.runs), Path(args.configs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    infos = {}
    for size in args.sizes:
        for kind in ("moe", "dense"):
            name = f"{size}-{kind}"
            infos[name] = run_info(name, runs, configs)
            print(f"{name}: {infos[name]['status']}", file=sys.stderr)

    routing = {}
    eval_cache: dict = {}
    texts = sorted(glob.glob(args.routing_texts))
    for name, info in infos.items():
        if info["status"] != "finished":
            continue
        model_dir = runs / name / "model"
        model = load_model(model_dir, dtype=torch.float32)
        tokenizer = load_tokenizer(model_dir)
        cfg = info["cfg"]
        if not args.no_full_eval:
            key = (tuple(cfg.eval_data), cfg.seq_len)
            if key not in eval_cache:
                cache = cfg.data_cache and Path(cfg.data_cache).expanduser()
                data = load_tokenized(expand_paths(cfg.eval_data), tokenizer, cfg.split, cache)
                eval_cache[key] = PackedSequences(data, cfg.seq_len)
            info["full_eval"] = full_eval(model, eval_cache[key], cfg.batch_size, args.eval_seqs)
            fe = info["full_eval"]
            print(f"{name}: held-out {fe['loss']:.4f} nats/token over {fe['tokens']} tokens", file=sys.stderr)
        if info["moe"] and texts:
            model.keep_router_logits = False
            routing[name] = write_report(model, tokenizer, texts, out / f"routing_{name}")
    plot_curves(args.sizes, infos, out / "curves.png")
    for name, info in infos.items():
        if info.get("load_over_training"):
            plot_load(info, out / f"load_{name}.png")

    doc = Path(args.doc)
    prefix = (out.relative_to(doc.parent).as_posix() + "/") if out.is_relative_to(doc.parent) else f"{out}/"
    text = results_markdown(args.sizes, infos, routing, prefix)
    (out / "results.md").write_text(text.replace(prefix, ""))
    (out / "readme_table.md").write_text(readme_table(args.sizes, infos))
    keep = ("name", "status", "params_total", "params_active", "params_embedding", "tokens_planned", "tokens_seen")
    keep += ("evals", "final_eval", "full_eval", "tokens_per_s", "train_last_first_choice", "train_last_max_load")
    summary = {n: {k: v for k, v in i.items() if k in keep} for n, i in infos.items()}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    if doc.is_file() and BEGIN in doc.read_text() and END in doc.read_text():
        body = doc.read_text()
        head, rest = body.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
        print(f"filled the results of {doc}", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    main()
