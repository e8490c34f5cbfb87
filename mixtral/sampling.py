"""How the next token is chosen from one sequence's logits.

- `SamplingParams`: the knobs of one sequence (temperature, top-k/-p, min-p, the penalties, seed, stop
  strings, max_new_tokens), checked when made;
- `process_logits`: the penalties and filters, in that order; `sample`: the next token under them, drawn
  with the sequence's own generator, so a seeded sequence gives the same output alone or in a batch;
- `logprobs`: the model's own log-probabilities of a token and the most likely ones (for the server).
"""

from __future__ import annotations

import math
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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
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
        ]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {valid}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


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
        sorted_logits, order = torch.sort(logits, descending=True)
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
    probs = torch.softmax(logits, -1)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        return int(torch.nan_to_num(logits, nan=-math.inf).argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def logprobs(logits_V: torch.Tensor, token: int, top_n: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` and the `top_n` most likely (id, log-probability) pairs, best first,
    under the model's own distribution (the raw logits: before penalties, temperature and filters)."""
    logp = torch.log_softmax(logits_V.float(), -1)
    top: list[tuple[int, float]] = []
    if top_n > 0:
        values, ids = torch.topk(logp, min(top_n, logp.numel()))
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return float(logp[token]), top


@dataclass
class TokenLogprob:
    """A chosen token's log-probability and the most likely (id, log-probability) pairs, best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
