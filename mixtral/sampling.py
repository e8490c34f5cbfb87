"""How the next token is chosen from one sequence's logits.

- `SamplingParams`: the knobs of one sequence (temperature, top-k/-p, min-p, the penalties, seed, stop
  strings, max_new_tokens), checked when made;
- `process_logits`: the penalties and filters, in that order; `sample`: the next token under them, drawn
  with the sequence's own generator, so a seeded sequence gives the same output alone or in a batch;
- `sample_batch`: the same tokens for a whole batch of sequences at once, each with its own parameters and
  generator, in a few tensor ops (the server samples every running sequence with it; `sample` is its
  one-row reference);
- `logprobs`: the model's own log-probabilities of a token and the most likely ones (for the server);
  `prompt_logprobs`: the same for every token of a prompt chunk at once (echo, prompt_logprobs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 is greedy; the filters apply in the order
    repetition penalty, presence/frequency penalties, temperature, top-k, top-p, min-p."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; >1 discourages tokens already in the prompt or output
    # OpenAI's penalties, on generated tokens only: logit -= presence * (count > 0) + frequency * count
    presence_penalty: float = 0.0  # 0: off; in [-2, 2]
    frequency_penalty: float = 0.0  # 0: off; in [-2, 2]
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends when the text contains one; it is not part of the output
    # vLLM's extensions: EOS does not end the sequence; EOS and stop_token_ids cannot end it before min_tokens
    # tokens; a token of stop_token_ids ends it as EOS does (not part of the output)
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", _finite(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 turns it off)"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("min_p", _finite(self.min_p) and 0 <= self.min_p <= 1, "a number in [0, 1]"),
            ("repetition_penalty", _finite(self.repetition_penalty) and self.repetition_penalty > 0, "a number > 0"),
            ("presence_penalty", _penalty(self.presence_penalty), "a number in [-2, 2]"),
            ("frequency_penalty", _penalty(self.frequency_penalty), "a number in [-2, 2]"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer or None"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "true or false"),
            (
                "min_tokens",
                _int(self.min_tokens) and 0 <= self.min_tokens <= self.max_new_tokens,
                "in [0, max_new_tokens]",
            ),
            ("stop_token_ids", all(_int(t) and t >= 0 for t in self.stop_token_ids), "token ids (integers >= 0)"),
        ]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {valid}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _penalty(x: object) -> bool:
    return _finite(x) and -2 <= x <= 2  # type: ignore[operator]


# ---- sampling -------------------------------------------------------------------------------------------


# The repetition penalty's factor, kept where float32 holds it and its effect: any logit below 1e8 in size,
# divided or multiplied by it, stays finite and keeps its order (0 * inf or x / 0 would give NaN or inf).
_PENALTY_RANGE = (1e-30, 1e30)
# The smallest temperature divided by: float32's smallest normal number (a smaller one rounds to 0).
_MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def process_logits(
    logits_V: torch.Tensor, params: SamplingParams, history: torch.Tensor, prompt_len: int = 0
) -> torch.Tensor:
    """Apply the penalties and filters; removed tokens get -inf. `history` holds the ids seen so far, the
    first `prompt_len` of them the prompt: the repetition penalty counts them all, the presence and
    frequency penalties only the generated ones (as OpenAI's do).

    Any valid `params` give finite logits for the best token: extreme values (a temperature of 1e-40, a
    top_p of 1e-300, a penalty of 1e-308) act as their limits (greedy, the top token only, ...) rather than
    overflow float32."""
    logits = logits_V.float().clone()
    if params.repetition_penalty != 1.0 and history.numel():
        penalty = min(max(params.repetition_penalty, _PENALTY_RANGE[0]), _PENALTY_RANGE[1])
        seen = logits[history]
        logits[history] = torch.where(seen > 0, seen / penalty, seen * penalty)
    generated = history[prompt_len:]
    if (params.presence_penalty or params.frequency_penalty) and generated.numel():
        counts = torch.bincount(generated, minlength=logits.numel()).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    if params.greedy:
        return logits
    # The best token at 0 and the rest below it before dividing: a tiny temperature sends the others to
    # -inf (greedy, its limit), never the best one to inf (inf - inf is NaN in the softmax).
    best = logits.max()
    if torch.isfinite(best):
        logits = (logits - best) / max(params.temperature, _MIN_TEMPERATURE)
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits[logits < kth] = -math.inf
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, stable=True)
        probs = torch.softmax(sorted_logits, -1)
        # drop a token when the tokens ranked above it already reach top_p; the first always stays (a top_p
        # below float32's range rounds to 0, which the first token's 0 would reach)
        drop = probs.cumsum(-1) - probs >= params.top_p
        drop[0] = False
        logits[order[drop]] = -math.inf
    if params.min_p > 0.0:
        probs = torch.softmax(logits, -1)
        logits[probs < params.min_p * probs.max()] = -math.inf
    return logits


def sample(
    logits_V: torch.Tensor,
    params: SamplingParams,
    history: torch.Tensor,
    generator: torch.Generator | None,
    prompt_len: int = 0,
) -> int:
    """The next token for one sequence (`history` and `prompt_len` as in `process_logits`). A distribution
    that is not one (the logits themselves hold NaN or inf) falls back to the most likely token."""
    logits = process_logits(logits_V, params, history, prompt_len)
    if params.greedy:
        return int(logits.argmax())
    if not bool(torch.isfinite(logits.max())):
        return int(torch.nan_to_num(logits, nan=-math.inf).argmax())
    # The best logit is 0 now (process_logits moved it there and no filter removes it): exp gives weights in
    # [0, 1] with a total >= 1, no softmax needed.
    return int(_draw(logits.exp()[None].cumsum(-1), torch.rand(1, generator=generator)[None])[0])


def _draw(cdf_BV: torch.Tensor, u_B1: torch.Tensor) -> torch.Tensor:
    """One token per row from its cumulative weights, by inverse CDF: the first whose cumulative weight passes
    u (uniform in [0, 1)) times the row's total. A token of weight 0 adds nothing, so it is never the first to
    pass; should u * total round up to the total, the last token of positive weight is taken."""
    total_B1 = cdf_BV[:, -1:].contiguous()
    token_B1 = torch.searchsorted(cdf_BV, u_B1 * total_B1, right=True)
    return torch.minimum(token_B1, torch.searchsorted(cdf_BV, total_B1))[:, 0]


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows], without a copy when they are all the rows (the common case: every row samples)."""
    return x if rows == list(range(x.shape[0])) else x[rows]


def _column(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[:, None]


def _process_batch(
    logits_BV: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
) -> tuple[torch.Tensor, list[int], list[bool]]:
    """`process_logits_batch`, and which rows sample (not greedy) and whether each of them has a finite best
    logit (else its filtered logits are `process_logits`'s own: the row falls back to its most likely token).
    Each op runs over the rows that use it, in place where it can: a [B, V] tensor is bigger than a core's
    cache, so every pass over it costs memory traffic."""
    logits = logits_BV.float().clone()
    B = logits.shape[0]
    # The penalties touch only the tokens seen (each row's history), as `process_logits` does.
    rep = [b for b in range(B) if params[b].repetition_penalty != 1.0 and len(histories[b]) > 0]
    if rep:
        lo, hi = _PENALTY_RANGE
        penalty = torch.ones(B, dtype=torch.float32)
        penalty[rep] = torch.tensor([min(max(params[b].repetition_penalty, lo), hi) for b in rep], dtype=torch.float32)
        r = torch.cat([torch.full((len(histories[b]),), b, dtype=torch.long) for b in rep])
        t = torch.cat([torch.as_tensor(histories[b], dtype=torch.long) for b in rep])
        seen, p = logits[r, t], penalty[r]
        logits[r, t] = torch.where(seen > 0, seen / p, seen * p)
    pf = [
        b
        for b in range(B)
        if (params[b].presence_penalty or params[b].frequency_penalty) and len(histories[b]) > prompt_lens[b]
    ]
    if pf:
        frequency, presence = torch.zeros(B), torch.zeros(B)
        frequency[pf] = torch.tensor([params[b].frequency_penalty for b in pf], dtype=torch.float32)
        presence[pf] = torch.tensor([params[b].presence_penalty for b in pf], dtype=torch.float32)
        rows, ids, counts = [], [], []
        for b in pf:
            u, c = torch.unique(torch.as_tensor(histories[b][prompt_lens[b] :], dtype=torch.long), return_counts=True)
            rows.append(torch.full_like(u, b))
            ids.append(u)
            counts.append(c.float())
        r, t, c = torch.cat(rows), torch.cat(ids), torch.cat(counts)
        logits[r, t] -= frequency[r] * c + presence[r] * (c > 0).float()
    hot = [b for b in range(B) if not params[b].greedy]
    if not hot:
        return logits, hot, []
    x = _rows(logits, hot)
    best = x.max(-1, keepdim=True).values
    finite = torch.isfinite(best)[:, 0].tolist()
    if not all(finite):  # logits holding NaN or inf: those rows are filtered one by one, as `process_logits` does
        for i, b in enumerate(hot):
            if not finite[i]:
                history = torch.as_tensor(histories[b], dtype=torch.long)
                logits[b] = process_logits(logits_BV[b], params[b], history, prompt_lens[b])
        ok = [b for b, good in zip(hot, finite, strict=True) if good]
        if ok:
            logits[ok] = _filter(logits[ok], [params[b] for b in ok], best[finite])
        return logits, hot, finite
    x = _filter(x, [params[b] for b in hot], best)
    if x.data_ptr() != logits.data_ptr():
        logits[hot] = x
    return logits, hot, finite


def _filter(x: torch.Tensor, params: list[SamplingParams], best: torch.Tensor) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p of rows whose best logit is finite, in place: as `process_logits`,
    the best at 0 and the rest below it before dividing by the temperature."""
    V = x.shape[1]
    x.sub_(best).div_(_column([max(p.temperature, _MIN_TEMPERATURE) for p in params]))
    top_k = [(i, p.top_k) for i, p in enumerate(params) if 0 < p.top_k < V]
    if top_k:
        at, k = [i for i, _ in top_k], [k for _, k in top_k]
        kth = torch.topk(x[at], max(k)).values.gather(1, torch.tensor(k)[:, None] - 1)
        x[at] = x[at].masked_fill(x[at] < kth, -math.inf)
    at = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if at:
        sorted_x, order = torch.sort(x[at], descending=True, stable=True)
        probs = torch.softmax(sorted_x, -1)
        drop = probs.cumsum(-1) - probs >= _column([params[i].top_p for i in at])
        drop[:, 0] = False
        x[at] = x[at].scatter(1, order, sorted_x.masked_fill(drop, -math.inf))
    at = [i for i, p in enumerate(params) if p.min_p > 0.0]
    if at:
        probs = torch.softmax(x[at], -1)
        floor = _column([params[i].min_p for i in at]) * probs.max(-1, keepdim=True).values
        x[at] = x[at].masked_fill(probs < floor, -math.inf)
    return x


def process_logits_batch(
    logits_BV: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
) -> torch.Tensor:
    """`process_logits` for each row b under `params[b]`, `histories[b]` and `prompt_lens[b]`, with the same
    float32 operations over the rows that use each filter. Greedy rows are left after their penalties."""
    return _process_batch(logits_BV, params, histories, prompt_lens)[0]


# On a CPU, rows are sampled this many bytes of float32 logits at a time: a block that stays in a core's L2 cache
# through the ~8 passes over it is faster than one pass after another over the whole batch from memory.
CPU_BLOCK_BYTES = 1 << 19


def sample_batch(
    logits_BV: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
    prompt_lens: Sequence[int],
) -> list[int]:
    """The next token of each row b, as `sample(logits_BV[b], params[b], history b, generators[b],
    prompt_lens[b])` gives it: the same filters, the same single uniform drawn from the same generator (and none
    drawn for a row that falls back to its most likely token), so a sequence's tokens do not depend on the
    batch it is sampled in. Greedy rows take their argmax, without sorting or softmax."""
    B, V = logits_BV.shape
    step = B if logits_BV.device.type != "cpu" else max(1, CPU_BLOCK_BYTES // (4 * V))
    tokens: list[int] = []
    for s in range(0, B, step):
        e = min(s + step, B)
        tokens += _sample_block(logits_BV[s:e], params[s:e], histories[s:e], generators[s:e], prompt_lens[s:e])
    return tokens


def _sample_block(
    logits_BV: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
    prompt_lens: Sequence[int],
) -> list[int]:
    logits, hot, finite = _process_batch(logits_BV, params, histories, prompt_lens)
    tokens: list[int] = [0] * len(params)
    hot_rows = set(hot)
    cold = [b for b in range(len(params)) if b not in hot_rows]
    if cold:
        for b, t in zip(cold, _rows(logits, cold).argmax(-1).tolist(), strict=True):
            tokens[b] = t
    drawn = [b for b, good in zip(hot, finite, strict=True) if good]
    if drawn:
        u = torch.cat([torch.rand(1, generator=generators[b]) for b in drawn])[:, None]
        weights = _rows(logits, drawn).exp_()  # in place when it is every row: the logits are not needed after
        for b, t in zip(drawn, _draw(weights.cumsum(-1), u).tolist(), strict=True):
            tokens[b] = t
    bad = [b for b, good in zip(hot, finite, strict=True) if not good]
    if bad:
        for b, t in zip(bad, torch.nan_to_num(logits[bad], nan=-math.inf).argmax(-1).tolist(), strict=True):
            tokens[b] = t
    return tokens


def logprobs(logits_V: torch.Tensor, token: int, top_n: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` and the `top_n` most likely (id, log-probability) pairs, best first,
    under the model's own distribution (the raw logits: before penalties, temperature and filters)."""
    logp = torch.log_softmax(logits_V.float(), -1)
    top: list[tuple[int, float]] = []
    if top_n > 0:
        values, ids = torch.topk(logp, min(top_n, logp.numel()))
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return float(logp[token]), top


def prompt_logprobs(logits_TV: torch.Tensor, targets: Sequence[int], top_n: int = 0) -> list[TokenLogprob]:
    """Log-probabilities of `targets` (prompt tokens), each under the logits of the position before it: row i of
    `logits_TV` gives `targets[i]` (rows past the targets are not read); with its rank (1: the most likely) and
    the `top_n` most likely. log_softmax in float32 on the logits' device; a few numbers per token come back."""
    n = len(targets)
    if n == 0:
        return []
    logp_TV = torch.log_softmax(logits_TV[:n].float(), -1)
    target_T = torch.tensor(list(targets), dtype=torch.long, device=logp_TV.device)
    chosen_T = logp_TV.gather(1, target_T[:, None])[:, 0]
    rank_T = (logp_TV > chosen_T[:, None]).sum(1) + 1
    if top_n > 0:
        values, ids = torch.topk(logp_TV, min(top_n, logp_TV.shape[-1]), -1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        tops = [[] for _ in range(n)]
    return [
        TokenLogprob(t, lp, top, rank)
        for t, lp, top, rank in zip(targets, chosen_T.tolist(), tops, rank_T.tolist(), strict=True)
    ]


@dataclass
class TokenLogprob:
    """A chosen token's log-probability and the most likely (id, log-probability) pairs, best first; for a prompt
    token also its rank among all tokens (1: the most likely)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int | None = None
