"""Constrained decoding overhead: xgrammar against llguidance, per token, in % of a decode step of the 791M model.

    PYTHONPATH=. .venv/bin/python benchmarks/constrained.py [--runs 5] [--tokens 24]

Per token and batch size (1 and 32): the time to compute every row's grammar mask (a strict JSON schema, the
tokens of one valid output replayed) and apply it to that row's logits, as the server does (one row at a time,
`SequenceState.allowed`), and with each library's batched call; beside it, one `decode_step` of bench-791m
(random weights, bf16) at that batch. Medians of `--runs`. The mask is computed on the CPU whatever the model runs on.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import statistics
import time

import llguidance
import llguidance.torch as llg_torch
import sentencepiece
import torch
import xgrammar
from sentencepiece import sentencepiece_model_pb2

import mixtral
from mixtral.cache import KVCache
from mixtral.constrained import vocabulary
from mixtral.generate import decode_step, prepare_kernels
from mixtral.tokenizer import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"enum": ["Paris", "Lima", "Oslo"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}
TEXT = '{"name": "Alice Smith", "age": 42, "city": "Lima", "tags": ["one", "two words", "three"]}'


def llguidance_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    """llguidance's tokenizer over our vocabulary: control tokens marked with 0xFF, text encoded without the dummy
    prefix (as a continuation)."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.sentencepiece_model())
    proto.normalizer_spec.add_dummy_prefix = False
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    tokens = [
        (b"\xff" + tokenizer.id_to_piece(i).encode()) if v == b"" else v for i, v in enumerate(vocabulary(tokenizer))
    ]

    class Wrapped:
        eos_token_id, bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        special_token_ids = sorted(tokenizer.control_ids)

        def __init__(self) -> None:
            self.tokens = tokens

        def __call__(self, s):
            return sp.encode(s.decode("utf-8", "replace") if isinstance(s, bytes) else s)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()))


def time_masks(lib: str, B: int, V: int, ids: list[int], state, batched: bool) -> float:
    """Seconds per token to compute and apply B rows' masks over the replayed `ids`."""
    logits = torch.randn(B, V)
    if lib == "xgrammar":
        matchers = [xgrammar.GrammarMatcher(state) for _ in range(B)]
        bitmask = xgrammar.allocate_token_bitmask(B, V)
        batch = xgrammar.BatchGrammarMatcher()
    else:
        tok, grammar = state
        matchers = [llguidance.LLMatcher(tok, grammar) for _ in range(B)]
        bitmask = llg_torch.allocate_token_bitmask(B, V)
        executor = llguidance.LLExecutor()
    start = time.perf_counter()
    for t in ids:
        if lib == "xgrammar":
            if batched:
                batch.batch_fill_next_token_bitmask(matchers, bitmask)
                xgrammar.apply_token_bitmask_inplace(logits, bitmask)
            else:
                for b, m in enumerate(matchers):
                    m.fill_next_token_bitmask(bitmask, b)
                    xgrammar.apply_token_bitmask_inplace(logits[b : b + 1], bitmask[b : b + 1])
            for m in matchers:
                m.accept_token(t)
        else:
            if batched:
                llg_torch.fill_next_token_bitmask_par(executor, [(m, b) for b, m in enumerate(matchers)], bitmask)
                llg_torch.apply_token_bitmask_inplace(logits, bitmask)
            else:
                for b, m in enumerate(matchers):
                    llg_torch.fill_next_token_bitmask(m, bitmask, b)
                    llg_torch.apply_token_bitmask_inplace(logits[b : b + 1], bitmask[b : b + 1])
            for m in matchers:
                m.consume_token(t)
    return (time.perf_counter() - start) / len(ids)


def time_decode(model, B: int, steps: int) -> float:
    cache = KVCache(model.config, B, 256, dtype=torch.bfloat16, device="cpu")
    tokens = torch.randint(0, model.config.vocab_size, (B,))
    with torch.inference_mode():
        decode_step(model, cache, tokens, torch.zeros(B, dtype=torch.long))  # warm-up
        start = time.perf_counter()
        for p in range(1, steps + 1):
            decode_step(model, cache, tokens, torch.full((B,), p, dtype=torch.long))
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="decode steps timed per run")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    args = ap.parse_args()
    versions = f"torch {torch.__version__}, {importlib.metadata.version('xgrammar')=}, {llguidance.get_version()=}"
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {platform.machine()}, {torch.get_num_threads()} thr; {versions}")
    tokenizer = load_tokenizer()
    V = tokenizer.vocab_size
    xgr_info = xgrammar.TokenizerInfo(vocabulary(tokenizer), xgrammar.VocabType.RAW, stop_token_ids=[tokenizer.eos_id])
    xgr_grammar = xgrammar.GrammarCompiler(xgr_info).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": ")
    )
    llg_tok = llguidance_tokenizer(tokenizer)
    llg_grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    ids = llg_tok.greedy_tokenize(TEXT)  # one tokenization both grammars accept
    model = mixtral.Transformer(mixtral.get_preset("bench-791m")).to(torch.bfloat16).eval()
    prepare_kernels(model)
    print(f"# bench-791m bf16 random weights; schema output of {len(ids)} tokens; medians of {args.runs} runs")
    print(f"{'batch':>5} {'decode step ms':>15} {'library':>11} {'path':>8} {'mask ms/token':>14} {'% of step':>10}")
    for B in args.batch:
        step = statistics.median(time_decode(model, B, args.steps) for _ in range(args.runs))
        figures = {}
        for lib, state in (("xgrammar", xgr_grammar), ("llguidance", (llg_tok, llg_grammar))):
            for batched in (False, True):
                t = statistics.median(time_masks(lib, B, V, ids, state, batched) for _ in range(args.runs))
                figures[lib, batched] = t
                path = "batched" if batched else "per-row"
                print(f"{B:>5} {step * 1e3:>15.1f} {lib:>11} {path:>8} {t * 1e3:>14.3f} {100 * t / step:>9.2f}%")
        for batched in (False, True):
            ratio = figures["llguidance", batched] / figures["xgrammar", batched]
            print(f"{B:>5} llguidance / xgrammar ({'batched' if batched else 'per-row'}): {ratio:.2f}x")


if __name__ == "__main__":
    main()
