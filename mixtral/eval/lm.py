"""`mixtral eval`: EleutherAI's lm-evaluation-harness run in process on a loaded model.

`MixtralLM` is lm-eval's model class for ours (a `TemplateLM`, lm-eval's `LM` with its text-to-token handling):
loglikelihood requests (multiple choice) and rolling loglikelihoods (perplexity) score the continuation's tokens
from one forward pass per batch of requests (padded rows: positions -1, which attention leaves out); generate_until
runs our batched generation (`generate_stream`) with the request's stop strings. Texts are split into tokens as
lm-eval's own models split them (`TemplateLM._encode_pair`: the whole text's tokens, the context's first; no BOS),
so the numbers equal those of lm-eval's `local-completions` against `mixtral serve` on the same model.

lm-eval is an optional extra (`pip install 'mixtral[eval]'`): this module imports it, and is imported only by
`mixtral eval` (and tests that have lm-eval).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.writer import apply_umask
from ..generate import generate_stream
from ..model import Transformer
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer


def import_lm_eval() -> Any:
    """lm_eval, or an ImportError saying how to install it. lm-eval 0.4.9 names transformers'
    `AutoModelForVision2Seq` as it imports, which transformers 5 renamed `AutoModelForImageTextToText`: the new
    name is given under the old first (peft imported before, as it re-imports transformers' module)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError("mixtral eval needs lm-eval: pip install 'mixtral[eval]' (or lm_eval==0.4.9)")
    import transformers

    with contextlib.suppress(ImportError):
        import peft  # noqa: F401
    if not hasattr(transformers, "AutoModelForVision2Seq") and hasattr(transformers, "AutoModelForImageTextToText"):
        transformers.AutoModelForVision2Seq = transformers.AutoModelForImageTextToText
    return importlib.import_module("lm_eval")


import_lm_eval()
from lm_eval.api.model import TemplateLM  # noqa: E402 - after the name transformers 5 took away is given back


class MixtralLM(TemplateLM):
    """lm-eval's model for a loaded `mixtral.Transformer` and our tokenizer, run here: `batch_size` requests per
    forward pass, inputs cut on the left to `max_length` tokens (default: the model's context)."""

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, *, batch_size: int = 8, max_length: int | None = None
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: must be >= 1")
        self.model, self.tok = model, tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_seq_len

    # ---- what TemplateLM asks for ------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:  # the context of a request with none: <s>, as for lm-eval's HF models
        return self.tok.bos_id

    def tok_encode(self, string: str, **kwargs: Any) -> list[int]:
        return self.tok.encode(string, bos=False)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tok.decode(list(tokens))

    # ---- loglikelihoods ----------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        """[(key, context ids, continuation ids)] -> [(log P(continuation | context), whether it is greedy)]."""
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        out = score(self.model, pairs, self.batch_size, self.max_length)
        for (key, _, _), result in zip(requests, out, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood, in windows of `max_length` tokens (lm-eval's rolling windows)."""
        from lm_eval import utils

        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append(utils.make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, score(self.model, windows, self.batch_size, self.max_length), strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ------------------------------------------------------------------------------------------

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Each request's text after its context, up to its stop strings (`until`, and the end of sequence) or
        `max_gen_toks` tokens; greedy unless `do_sample`. Requests of similar length run as one batch."""
        jobs = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.pop("max_gen_toks", 256))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            top_p = float(kwargs.pop("top_p", 1.0) or 1.0) if sample else 1.0
            ids = self.tok_encode(context)[-max(1, self.max_length - max_gen) :] or [self.prefix_token_id]
            params = SamplingParams(
                temperature=temperature, top_p=top_p, max_new_tokens=min(max_gen, self.max_length - len(ids)),
                stop=tuple(until),
            )  # fmt: skip
            jobs.append((ids, params, until))
        order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][0]))
        out: list[str] = [""] * len(jobs)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            texts = [""] * len(batch)
            events = generate_stream(
                self.model,
                [jobs[i][0] for i in batch],
                [jobs[i][1] for i in batch],
                tokenizer=self.tok,
                eos_id=self.tok.eos_id,
            )
            for ev in events:
                texts[ev.index] += ev.text
            for i, text in zip(batch, texts, strict=True):
                for stop in jobs[i][2]:  # as lm-eval's own models cut it
                    text = text.split(stop)[0] if stop else text
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


@torch.no_grad()
def score(
    model: Transformer, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int, max_length: int
) -> list[tuple[float, bool]]:
    """(sum of log P(continuation token | what precedes it), whether every one is the most likely) for each
    (context ids, continuation ids): rows of `batch_size` pairs in one forward pass each, padded on the right
    (position -1), the input cut on the left to `max_length` tokens; log_softmax in float32."""
    device = model.embed.weight.device
    out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
    inputs = []
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("a loglikelihood request has an empty continuation: nothing to score")
        inputs.append((ctx + cont)[-(max_length + 1) :][:-1])
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))  # similar lengths together: less padding
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        T = max(len(inputs[i]) for i in batch)
        tokens = torch.zeros((len(batch), T), dtype=torch.long)
        positions = torch.full((len(batch), T), -1, dtype=torch.long)
        for r, i in enumerate(batch):
            tokens[r, : len(inputs[i])] = torch.tensor(inputs[i])
            positions[r, : len(inputs[i])] = torch.arange(len(inputs[i]))
        logits = model(tokens.to(device), positions=positions.to(device))
        for r, i in enumerate(batch):
            cont, n = pairs[i][1], len(inputs[i])
            logp = torch.log_softmax(logits[r, n - len(cont) : n].float(), dim=-1)  # row j predicts token j + 1
            target = torch.tensor(cont, device=logp.device)
            total = logp.gather(1, target[:, None]).sum().item()
            out[i] = (total, bool((logp.argmax(-1) == target).all()))
    return out


def evaluate(
    lm: Any,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: str | os.PathLike | None = None,
    seed: int = 0,
) -> dict:
    """lm-eval's `simple_evaluate` of `lm` on `tasks` (names lm-eval knows, or defined in YAML files under
    `include_path`); a ValueError naming the tasks it does not know."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path:  # tasks of one's own alone: lm-eval's ~10k task files need not be indexed (tens of seconds)
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if not all(manager.match_tasks([t]) for t in tasks):
            manager = None
    manager = manager or TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        import difflib

        close = sorted({m for t in unknown for m in difflib.get_close_matches(t, manager.all_tasks, n=3)})
        hint = f"; close names: {close}" if close else ""
        raise ValueError(f"unknown lm-eval tasks {unknown}{hint} (`lm_eval ls tasks` lists them; a task of your "
                         "own: its YAML file in a folder given as --include-path)")  # fmt: skip
    return simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


def write_results(results: dict, path: str | os.PathLike) -> None:
    """The results as JSON at `path`, written atomically (a temporary file beside it, then renamed)."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
            f.write("\n")
        apply_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
