"""Routing analysis (the Mixtral paper's section 5): which experts the router picks, per layer and per text
source, and how often consecutive tokens get the same expert compared with chance.

`collect` runs a model over texts and keeps each token's ranked expert choices per layer; the statistics are
plain functions of those choices (so they can be checked on synthetic assignments); `write_report` writes
the JSON + markdown table, the heat map, and a token-level HTML view.

Shape legend: L layers, T tokens, K experts per token, E experts.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .model import Transformer
from .tokenizer import Tokenizer


@dataclass
class Routed:
    """One text's routing: `choices[l, t]` are token t's top-k experts at layer l, best first."""

    source: str
    tokens: list[int]
    choices: torch.Tensor  # [L, T, K] int64
    starts: list[int]  # token indices where a forward chunk starts: no "consecutive" pair crosses them


@torch.no_grad()
def collect(model: Transformer, tokenizer: Tokenizer, text: str, source: str, max_tokens: int | None = None) -> Routed:
    """Run `text` (its first `max_tokens` tokens) through the model in context-sized chunks and record the
    router's choices."""
    ids = tokenizer.encode(text, bos=True)[:max_tokens]
    chunk = model.config.max_seq_len
    device = model.embed.weight.device
    keep = model.keep_router_logits
    model.keep_router_logits = True
    per_chunk = []
    try:
        for start in range(0, len(ids), chunk):
            model(torch.tensor([ids[start : start + chunk]], device=device))
            per_chunk.append(
                torch.stack([r.topk(model.config.top_k, dim=-1).indices.cpu() for r in model.router_logits])
            )
    finally:
        model.keep_router_logits = keep
    return Routed(source, ids, torch.cat(per_chunk, dim=1), list(range(0, len(ids), chunk)))


def expert_share(choices_LTK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[L, E]: the share of tokens whose first choice is each expert."""
    first = choices_LTK[..., 0]
    return torch.stack([torch.bincount(row, minlength=n_experts).float() / row.numel() for row in first])


def _pairs(r: Routed) -> torch.Tensor:
    """Indices t such that tokens t and t+1 were routed in the same forward chunk."""
    T = r.choices.shape[1]
    ok = torch.ones(max(T - 1, 0), dtype=torch.bool)
    for s in r.starts[1:]:
        ok[s - 1] = False
    return torch.nonzero(ok).flatten()


def repeat_rates(routed: Sequence[Routed]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer: the rate at which consecutive tokens get the same first-choice expert, and the rate at which
    their top-k sets share an expert (the paper's Table 5 statistics)."""
    same_first, overlap, n = 0.0, 0.0, 0
    for r in routed:
        t = _pairs(r)
        a, b = r.choices[:, t], r.choices[:, t + 1]  # [L, P, K]
        same_first = same_first + (a[..., 0] == b[..., 0]).float().sum(1)
        overlap = overlap + (a[..., :, None] == b[..., None, :]).any(-1).any(-1).float().sum(1)
        n += len(t)
    if n == 0:
        raise ValueError("texts too short: no pair of consecutive tokens to compare")
    return same_first / n, overlap / n


def shuffled_rates(routed: Sequence[Routed], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rates with each text's tokens in random order: what the experts' unequal shares alone give,
    without any temporal locality. Uneven routing raises it above the uniform chance rates."""
    g = torch.Generator().manual_seed(seed)
    shuffled = []
    for r in routed:
        perm = torch.randperm(r.choices.shape[1], generator=g)
        shuffled.append(Routed(r.source, r.tokens, r.choices[:, perm], [0]))
    return repeat_rates(shuffled)


def chance_rates(n_experts: int, top_k: int) -> tuple[float, float]:
    """Rates for independent uniform routing: 1/E for the first choice; two random k-subsets of E intersect
    with probability 1 - C(E-k, k) / C(E, k) (46.4% for top-2 of 8)."""
    return 1 / n_experts, 1 - math.comb(n_experts - top_k, top_k) / math.comb(n_experts, top_k)


# ---- report ------------------------------------------------------------------------------------------------


def analyze(routed: Sequence[Routed], n_experts: int, top_k: int) -> dict:
    first, topk = repeat_rates(routed)
    shuffled_first, shuffled_topk = shuffled_rates(routed)
    chance_first, chance_topk = chance_rates(n_experts, top_k)
    return {
        "n_experts": n_experts,
        "top_k": top_k,
        "tokens": {r.source: len(r.tokens) for r in routed},
        "chance_same_first": chance_first,
        "chance_same_topk": chance_topk,
        "same_first_by_layer": first.tolist(),
        "same_topk_by_layer": topk.tolist(),
        "shuffled_same_first_by_layer": shuffled_first.tolist(),
        "shuffled_same_topk_by_layer": shuffled_topk.tolist(),
        "share_by_source": {r.source: expert_share(r.choices, n_experts).tolist() for r in routed},
    }


def markdown_table(report: dict) -> str:
    """Per layer: the measured repeat rates, the rates with the tokens shuffled (same expert shares, no
    order), and the uniform chance rates."""
    k = report["top_k"]
    lines = [
        f"| layer | same first choice | shuffled | chance | same expert among top-{k} | shuffled | chance |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = zip(
        report["same_first_by_layer"],
        report["shuffled_same_first_by_layer"],
        report["same_topk_by_layer"],
        report["shuffled_same_topk_by_layer"],
        strict=True,
    )
    for i, (f, fs, t, ts) in enumerate(rows):
        lines.append(
            f"| {i} | {100 * f:.1f}% | {100 * fs:.1f}% | {100 * report['chance_same_first']:.1f}% | "
            f"{100 * t:.1f}% | {100 * ts:.1f}% | {100 * report['chance_same_topk']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def plot_shares(report: dict, path: Path) -> None:
    """Heat maps (one per layer) of the first-choice share per source and expert, coloured around the uniform
    share 1/E, and a bar chart of the pooled share per layer with the uniform line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    sources = list(report["share_by_source"])
    shares = torch.tensor([report["share_by_source"][s] for s in sources])  # [S, L, E]
    S, L, E = shares.shape
    uniform = 1 / E
    fig, axes = plt.subplots(2, L, figsize=(3.2 * L + 2, 2.0 + 0.35 * S + 3.0), squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": [max(S, 2), 3]})  # fmt: skip
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=max(float(shares.max()), uniform * 2))
    labels = [Path(s).stem for s in sources]
    for layer in range(L):
        ax = axes[0, layer]
        im = ax.imshow(shares[:, layer].numpy(), cmap="RdBu_r", norm=norm, aspect="auto")
        ax.set_title(f"layer {layer}")
        ax.set_xticks(range(E))
        ax.set_xlabel("expert")
        ax.set_yticks(range(S))
        ax.set_yticklabels(labels if layer == 0 else [""] * S, fontsize=7)
        tokens = torch.tensor([report["tokens"][s] for s in sources], dtype=torch.float)
        pooled = (shares[:, layer] * tokens[:, None]).sum(0) / tokens.sum()
        bx = axes[1, layer]
        bx.bar(range(E), pooled.numpy(), color="tab:gray")
        bx.axhline(uniform, color="tab:red", linestyle="--", label=f"uniform 1/{E}")
        bx.set_xticks(range(E))
        bx.set_xlabel("expert")
        if layer == 0:
            bx.set_ylabel("share of tokens (first choice)")
            bx.legend(fontsize=7)
    fig.colorbar(im, ax=axes[0, :].tolist(), label=f"share of tokens (white = uniform {uniform:.3f})")
    fig.suptitle("First-choice expert per layer and text source")
    fig.savefig(path, dpi=110)
    plt.close(fig)


_PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
            "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"]  # fmt: skip


def token_html(r: Routed, tokenizer: Tokenizer, layer: int, n_experts: int, max_tokens: int = 600) -> str:
    """The text with each token's background coloured by its first-choice expert at `layer`."""
    spans = []
    ids = r.tokens[:max_tokens]
    for t, tok in enumerate(ids):
        if tok == tokenizer.bos_id:
            continue
        piece = tokenizer.id_to_piece(tok).replace("\u2581", " ")
        if piece.startswith("<0x"):
            piece = "·"
        e = int(r.choices[layer, t, 0])
        color = _PALETTE[e % len(_PALETTE)]
        spans.append(f'<span style="background:{color}55" title="expert {e}">{html.escape(piece)}</span>')
    legend = " ".join(
        f'<span style="background:{_PALETTE[e % len(_PALETTE)]}55;padding:0 6px">expert {e}</span>'
        for e in range(n_experts)
    )
    body = "".join(spans).replace("\n", "<br>\n")
    return (
        "<!doctype html><meta charset='utf-8'><title>routing</title>"
        f"<h3>First-choice expert per token, layer {layer}: {html.escape(r.source)}</h3><p>{legend}</p>"
        f"<div style='font-family:monospace;line-height:1.7;white-space:pre-wrap'>{body}</div>"
    )


def write_report(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    layer: int | None = None,
    max_tokens: int | None = None,
) -> dict:
    """Analyse `texts` (files) and write routing.json, routing.md, routing_share.png and routing_tokens.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    layer = cfg.n_layers // 2 if layer is None else layer
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"--layer {layer} is out of range: the model has layers 0..{cfg.n_layers - 1}")
    routed = []
    for path in map(Path, texts):
        if not path.is_file():
            raise ValueError(f"text file {path} does not exist")
        routed.append(collect(model, tokenizer, path.read_text(encoding="utf-8"), str(path), max_tokens))
    report = analyze(routed, cfg.n_experts, cfg.top_k)
    (out / "routing.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "routing.md").write_text(markdown_table(report))
    plot_shares(report, out / "routing_share.png")
    (out / "routing_tokens.html").write_text(token_html(routed[0], tokenizer, layer, cfg.n_experts))
    return report
