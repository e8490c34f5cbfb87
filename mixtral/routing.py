"""Routing analysis (the Mixtral paper's section 5): which experts the router picks, per layer and per text
source, and how often consecutive tokens get the same expert compared with chance.

`collect` runs a model over texts and keeps each token's ranked expert choices per layer; the statistics are
plain functions of those choices (so they can be checked on synthetic assignments); `write_report` writes
the JSON + markdown table, the heat map, and a token-level HTML view.

For Python source (`.py` texts) the report also gives the expert shares by token class (the paper's
observation that routing follows syntax in code): every character is classed by Python's own `tokenize`
(keyword, identifier, whitespace incl. indentation and newlines, operator, string, comment, number), each
model token is mapped to the characters it spells (`piece_spans`), and takes the class of its first
non-whitespace character (whitespace if it has none).

Shape legend: L layers, T tokens, K experts per token, E experts, C token classes.
"""

from __future__ import annotations

import html
import io
import json
import keyword
import math
import os
import re
import token as token_types
import tokenize
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .model import Transformer
from .tokenizer import Tokenizer


@dataclass
class Routed:
    """One text's routing: `choices[l, t]` are token t's top-k experts at layer l, best first."""

    source: str
    tokens: list[int]
    choices: torch.Tensor  # [L, T, K] int64
    starts: list[int]  # token indices where a forward chunk starts: no "consecutive" pair crosses them
    classes: torch.Tensor | None = None  # [T] int64: index into TOKEN_CLASSES, -1 for none (<s>); Python only


@torch.no_grad()
def collect(
    model: Transformer,
    tokenizer: Tokenizer,
    text: str,
    source: str,
    max_tokens: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> Routed:
    """Run `text` (its first `max_tokens` tokens) through the model in context-sized chunks and record the
    router's choices; `progress` is called with the tokens of each chunk done."""
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} is invalid: must be >= 1")
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
            if progress is not None:
                progress(len(ids[start : start + chunk]))
    finally:
        model.keep_router_logits = keep
    return Routed(source, ids, torch.cat(per_chunk, dim=1), list(range(0, len(ids), chunk)))


# ---- token classes of Python source -------------------------------------------------------------------------

TOKEN_CLASSES = ("keyword", "identifier", "whitespace", "operator", "string", "comment", "number", "other")
_CLASS = {name: i for i, name in enumerate(TOKEN_CLASSES)}
_TOKEN_TYPE_CLASS = {
    token_types.OP: "operator",
    token_types.STRING: "string",
    token_types.COMMENT: "comment",
    token_types.NUMBER: "number",
}
for _name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"):  # Python 3.12+: f-strings come in parts
    if hasattr(token_types, _name):
        _TOKEN_TYPE_CLASS[getattr(token_types, _name)] = "string"


def python_char_classes(source: str) -> list[int]:
    """The class (index into TOKEN_CLASSES) of every character of Python source, by `tokenize`.

    Whitespace characters are "whitespace" unless a token covers them (inside a string or a comment);
    characters no token covers are "other". Source that stops tokenizing (a syntax error) keeps the
    classes found up to the error and "whitespace"/"other" after it.
    """
    ws, other = _CLASS["whitespace"], _CLASS["other"]
    classes = [ws if ch.isspace() else other for ch in source]
    lines = io.StringIO(source).readlines()  # the lines tokenize reads: cut after each "\n"
    line_start = [0]
    for line in lines:
        line_start.append(line_start[-1] + len(line))
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == token_types.NAME:
                name = "keyword" if keyword.iskeyword(tok.string) else "identifier"
            else:
                name = _TOKEN_TYPE_CLASS.get(tok.type)
            if name is None:  # NEWLINE, NL, INDENT, DEDENT, ENDMARKER: whitespace (or nothing)
                continue
            (srow, scol), (erow, ecol) = tok.start, tok.end
            if srow > len(lines):
                continue
            start, end = line_start[srow - 1] + scol, line_start[min(erow, len(lines)) - 1] + ecol
            c = _CLASS[name]
            for i in range(start, min(end, len(classes))):
                classes[i] = c
    except (tokenize.TokenError, SyntaxError):
        pass
    return classes


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _piece_bytes(tokenizer: Tokenizer, i: int) -> bytes:
    if i in (tokenizer.bos_id, tokenizer.eos_id):
        return b""
    piece = tokenizer.id_to_piece(i)
    m = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()


def piece_spans(tokenizer: Tokenizer, ids: Sequence[int], text: str) -> list[tuple[int, int]]:
    """For each token id, the characters [start, end) of `text` it spells (empty for <s> and </s>, and for
    the bytes of a character after its first). `ids` must encode `text` or a prefix of it; sentencepiece's
    dummy-prefix space, when present, belongs to no character."""
    parts = [_piece_bytes(tokenizer, i) for i in ids]
    spelled = b"".join(parts)
    target = text.encode()
    prefixed = (" " + text).encode()
    if spelled[:1] == b" " and not text.startswith(" ") and prefixed.startswith(spelled):
        skip = 1  # the dummy prefix
    elif target.startswith(spelled):
        skip = 0
    elif prefixed.startswith(spelled):
        skip = 1
    else:
        raise ValueError("the token pieces do not spell the text (a normalising tokenizer?)")
    char_of_byte = []
    for c, ch in enumerate(text):
        char_of_byte += [c] * len(ch.encode())
    char_of_byte.append(len(text))
    spans, pos = [], -skip
    for part in parts:
        b0, b1 = max(pos, 0), max(pos + len(part), 0)
        pos += len(part)
        if b1 <= b0:
            spans.append((char_of_byte[b0], char_of_byte[b0]))
            continue
        c0 = char_of_byte[b0]
        # a piece that starts inside a character (a later byte of it) owns no character
        if b0 > 0 and char_of_byte[b0 - 1] == c0:
            c0 += 1
        c1 = char_of_byte[b1 - 1] + 1
        spans.append((c0, max(c0, c1)))
    return spans


def token_classes(tokenizer: Tokenizer, ids: Sequence[int], source: str) -> torch.Tensor:
    """[T] the class of each token of Python `source`: that of its first non-whitespace character, else
    whitespace; -1 for tokens that spell no character (<s>, </s>, later bytes of a character)."""
    chars = python_char_classes(source)
    ws = _CLASS["whitespace"]
    out = []
    for start, end in piece_spans(tokenizer, ids, source):
        if start == end:
            out.append(-1)
            continue
        out.append(next((chars[i] for i in range(start, end) if chars[i] != ws), ws))
    return torch.tensor(out, dtype=torch.long)


def share_by_class(routed: Sequence[Routed], n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([C] tokens per class, [L, C, E] share of each class's tokens whose first choice is each expert), over
    the texts that have classes."""
    counts, n = None, torch.zeros(len(TOKEN_CLASSES), dtype=torch.long)
    for r in routed:
        if r.classes is None:
            continue
        first_LT = r.choices[..., 0]
        if counts is None:
            counts = torch.zeros(first_LT.shape[0], len(TOKEN_CLASSES), n_experts)
        keep = r.classes >= 0
        cls_T, first_LT = r.classes[keep], first_LT[:, keep]
        n += torch.bincount(cls_T, minlength=len(TOKEN_CLASSES))
        for layer in range(first_LT.shape[0]):
            flat = cls_T * n_experts + first_LT[layer]
            counts[layer] += torch.bincount(flat, minlength=len(TOKEN_CLASSES) * n_experts).view(-1, n_experts)
    if counts is None:
        raise ValueError("no text with token classes (Python source)")
    return n, counts / n.clamp(min=1)[None, :, None]


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
    report = {
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
    if any(r.classes is not None for r in routed):
        counts, shares = share_by_class(routed, n_experts)
        report["class_tokens"] = dict(zip(TOKEN_CLASSES, counts.tolist(), strict=True))
        # [class][layer][expert]: share of the class's tokens whose first choice is the expert
        report["share_by_class"] = {c: shares[:, i].tolist() for i, c in enumerate(TOKEN_CLASSES) if counts[i]}
    return report


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
    text = "\n".join(lines) + "\n"
    if "share_by_class" in report:
        for layer in range(len(report["same_first_by_layer"])):
            text += "\n" + class_table(report, layer)
    return text


def class_table(report: dict, layer: int) -> str:
    """One layer's first-choice expert shares by token class (Python source), the busiest expert of each class
    in bold, and the row of all classed tokens together."""
    E = report["n_experts"]
    counts = report["class_tokens"]
    shares = {c: torch.tensor(v[layer]) for c, v in report["share_by_class"].items()}
    total = sum(counts[c] for c in shares)
    pooled = sum(shares[c] * counts[c] for c in shares) / max(total, 1)
    head = "| layer " + str(layer) + " | tokens | " + " | ".join(f"e{e}" for e in range(E)) + " | top expert |"
    lines = [head, "|---|---|" + "---|" * E + "---|"]
    for c, row in [*shares.items(), ("all", pooled)]:
        top = int(row.argmax())
        cells = [f"**{100 * x:.0f}%**" if e == top else f"{100 * x:.0f}%" for e, x in enumerate(row.tolist())]
        n = total if c == "all" else counts[c]
        lines.append(f"| {c} | {n} | " + " | ".join(cells) + f" | e{top} ({100 * float(row[top]):.0f}%) |")
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
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the colour bar's long label reaches past the figure
    plt.close(fig)


_PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
            "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"]  # fmt: skip


def _token_texts(r: Routed, tokenizer: Tokenizer, max_tokens: int) -> list[tuple[int, str]]:
    """(token index, text it shows) for the first `max_tokens` tokens: byte pieces decoded (a multi-byte
    character shows on its first byte's token), sentencepiece's \u2581 as a space, newlines as \u21b5 + newline."""
    out: list[tuple[int, str]] = []
    pending, owner = b"", -1
    for t, tok in enumerate(r.tokens[:max_tokens]):
        if tok in (tokenizer.bos_id, tokenizer.eos_id):
            continue
        piece = tokenizer.id_to_piece(tok)
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            if not pending:
                owner = t
            pending += bytes([int(m.group(1), 16)])
            try:
                text = pending.decode()
            except UnicodeDecodeError:
                if len(pending) < 4:
                    continue
                text = pending.decode(errors="replace")
            out.append((owner, text))
            pending = b""
            continue
        if pending:
            out.append((owner, pending.decode(errors="replace")))
            pending = b""
        out.append((t, piece.replace("\u2581", " ")))
    return [(t, x.replace("\n", "\u21b5\n")) for t, x in out]


def token_html(
    r: Routed, tokenizer: Tokenizer, layers: int | Sequence[int], n_experts: int, max_tokens: int = 600
) -> str:
    """The text with each token's background coloured by its first-choice expert, one panel per layer (as the
    paper's Figure 8 shows for code)."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    legend = " ".join(
        f'<span style="background:{_PALETTE[e % len(_PALETTE)]}55;padding:0 6px">expert {e}</span>'
        for e in range(n_experts)
    )
    texts = _token_texts(r, tokenizer, max_tokens)
    panels = []
    for layer in layers:
        spans = []
        for t, text in texts:
            e = int(r.choices[layer, t, 0])
            color = _PALETTE[e % len(_PALETTE)]
            spans.append(f'<span style="background:{color}55" title="expert {e}">{html.escape(text)}</span>')
        panels.append(
            f"<div style='flex:1;min-width:28em'><h4>layer {layer}</h4>"
            f"<div style='font-family:monospace;line-height:1.5;white-space:pre-wrap'>{''.join(spans)}</div></div>"
        )
    return (
        "<!doctype html><meta charset='utf-8'><title>routing</title>"
        f"<h3>First-choice expert per token: {html.escape(r.source)}</h3><p>{legend}</p>"
        f"<div style='display:flex;gap:1.5em'>{''.join(panels)}</div>"
    )


def write_report(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    layer: int | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
) -> dict:
    """Analyse `texts` (files) and write routing.json, routing.md, routing_share.png and routing_tokens.html.
    Python files (.py) also get the expert shares by token class (in routing.json and routing.md). `progress`:
    a bar of the tokens routed on stderr."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    layer = cfg.n_layers // 2 if layer is None else layer
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"--layer {layer} is out of range: the model has layers 0..{cfg.n_layers - 1}")
    paths = list(map(Path, texts))
    for path in paths:  # before minutes of work
        if not path.is_file():
            raise ValueError(f"text file {path} does not exist")
    routed = []
    with tqdm(desc="routing", unit="token", disable=not progress) as bar:
        for path in paths:
            text = path.read_text(encoding="utf-8")
            r = collect(model, tokenizer, text, str(path), max_tokens, bar.update)
            if path.suffix == ".py":
                r.classes = token_classes(tokenizer, r.tokens, text)
            routed.append(r)
    report = analyze(routed, cfg.n_experts, cfg.top_k)
    (out / "routing.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "routing.md").write_text(markdown_table(report))
    plot_shares(report, out / "routing_share.png")
    # the first, the chosen and the last layer, side by side
    layers = sorted({0, layer, cfg.n_layers - 1})
    (out / "routing_tokens.html").write_text(token_html(routed[0], tokenizer, layers, cfg.n_experts))
    return report
