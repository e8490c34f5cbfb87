"""`mixtral bench`: CPU prefill/decode speed and peak memory of ours (bf16, int8, int4) against
`transformers` (bf16) on the same weights, in one run, plus the quality of the quantized models.

Decode at batch 1 reads every active weight once per token, so its limit is
(memory read bandwidth) / (active weight bytes per token); the machine's bandwidth is measured first and
each batch-1 decode is reported as a fraction of that limit.

Every configuration runs in a fresh subprocess (`python -m mixtral.bench --child ...`) that loads the
weights, times `runs` runs of [prefill a batch of prompts, then greedy-decode new tokens] and reports
the medians and its peak RSS (VmHWM from /proc/self/status). Quantized weights are prepared once by the
parent and read by the child from a quantized checkpoint, as a user would run them. With `--rounds R` the
whole list of configurations runs R times, interleaved, with a bandwidth probe before each child; rows are
medians over rounds and the bandwidth limit uses the median probe.

On a shared machine whose speed drifts from minute to minute, configurations timed a minute apart can be
1.5x apart for that reason alone. So batch 1 is also measured in one process (`--interleaved R`, default
10): every model loaded together, then R rounds of [prefill, decode] for each in turn (order reversed every
other round); the ratios are medians of the per-round ratios.

With `--contention [N ...]` it measures instead how batch-1 decode holds up on a machine whose cores are shared:
quiet, beside 1 (and N) busy processes, at --threads threads and at 1, all in one process over interleaved rounds.

    mixtral bench [--preset bench-791m | --checkpoint DIR] [--batch 1 8] [--runs 3] [--rounds 3] [--json out.json]
                  [--plot out.png]
    mixtral bench --contention [N ...] [--contention-rounds R] [--modes bf16 int4] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import cli_args
from .measure import machine, machine_line, memory_bandwidth_gbs, random_prompts, run_ours, status

# ---- measurements --------------------------------------------------------------------------------------


@torch.no_grad()
def _run_transformers(model, prompts: list[list[int]], n_prompt: int, n_new: int) -> tuple[float, float]:
    """The same with a transformers model and its own cache. Its prefill computes the LM head for the last
    position only (`logits_to_keep=1`), as its `generate` does and as ours does."""
    ids = torch.tensor(prompts)[:, :n_prompt]
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    t1 = time.perf_counter()
    pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(n_new - 1):
        out = model(input_ids=nxt, past_key_values=pkv, use_cache=True)
        pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return t1 - t0, time.perf_counter() - t1


def _time_ours(path: str, batch: int, prompt_len: int, new_tokens: int, runs: int, compile_: bool) -> dict:
    from .checkpoint import load_model

    base = status("VmRSS")
    model = load_model(path)
    loaded = status("VmRSS")
    if compile_:
        from .generate import compile_model

        compile_model(model)
    prompts = random_prompts(batch, prompt_len, model.config.vocab_size)
    run_ours(model, prompts, min(16, prompt_len), 4)  # warm up (and compile)
    times = [run_ours(model, prompts, prompt_len, new_tokens) for _ in range(runs)]
    return _result(times, batch, prompt_len, new_tokens, base, loaded)


def _time_transformers(path: str, batch: int, prompt_len: int, new_tokens: int, runs: int) -> dict:
    from transformers import MixtralForCausalLM

    base = status("VmRSS")
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    loaded = status("VmRSS")
    prompts = random_prompts(batch, prompt_len, model.config.vocab_size)
    _run_transformers(model, prompts, min(16, prompt_len), 4)
    times = [_run_transformers(model, prompts, prompt_len, new_tokens) for _ in range(runs)]
    return _result(times, batch, prompt_len, new_tokens, base, loaded)


def _result(times, batch, prompt_len, new_tokens, base, loaded) -> dict:
    prefill_s = statistics.median(t[0] for t in times)
    decode_s = statistics.median(t[1] for t in times)
    return {
        "prefill_tok_s": batch * prompt_len / prefill_s,
        # the first new token comes from the prefill's logits: new_tokens - 1 decode steps
        "decode_tok_s": batch * (new_tokens - 1) / decode_s,
        "decode_tok_s_runs": [batch * (new_tokens - 1) / t[1] for t in times],
        "peak_rss": status("VmHWM"),
        "rss_after_imports": base,
        "rss_after_load": loaded,
    }


def _interleaved(spec: dict) -> dict[str, dict[str, list[float]]]:
    """Batch-1 prefill and decode tok/s of each model in `spec["paths"]` (and transformers on
    spec["transformers"]), all loaded in this process: per round, each in turn (reversed every other round)
    prefills the prompt and greedy-decodes `new_tokens` (timed as in the separate runs: the prefill, then
    new_tokens - 1 decode steps). -> {"prefill": {name: [per round]}, "decode": {...}}"""
    from .checkpoint import load_model

    models = {name: (run_ours, load_model(path)) for name, path in spec["paths"].items()}
    if spec.get("transformers"):
        from transformers import MixtralForCausalLM

        tf = MixtralForCausalLM.from_pretrained(spec["transformers"], dtype=torch.bfloat16).eval()
        models["transformers"] = (_run_transformers, tf)
    n_prompt, n_new = spec["prompt_len"], spec["new_tokens"]
    prompts = random_prompts(1, n_prompt, next(iter(models.values()))[1].config.vocab_size)
    for run, model in models.values():
        run(model, prompts, min(16, n_prompt), 4)  # warm up
    speeds: dict[str, dict[str, list[float]]] = {"prefill": {}, "decode": {}}
    for rnd in range(spec["rounds"]):
        for name in list(models)[:: 1 if rnd % 2 == 0 else -1]:
            run, model = models[name]
            p, d = run(model, prompts, n_prompt, n_new)
            speeds["prefill"].setdefault(name, []).append(n_prompt / p)
            speeds["decode"].setdefault(name, []).append((n_new - 1) / d)
    return speeds


def _busy_processes(n: int) -> list[subprocess.Popen]:
    """n processes that each keep a core busy (a Python loop), as another program sharing the machine would."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.2)  # started and running before the timing starts
    return procs


def _contention(spec: dict) -> dict[str, dict[str, list[float]]]:
    """Batch-1 decode tok/s of each model in `spec["paths"]`, all loaded in this process, quiet and beside each
    number of busy processes in spec["busy"], at spec["threads"] threads and at 1: per round, each busy level in
    turn (its processes started for it, then stopped), and within it each model at each thread count (order
    reversed every other round). -> {model: {"<busy>x<threads>": [tok/s per round]}}"""
    from .checkpoint import load_model

    models = {name: load_model(path) for name, path in spec["paths"].items()}
    n_prompt, n_new = spec["prompt_len"], spec["new_tokens"]
    prompts = random_prompts(1, n_prompt, next(iter(models.values())).config.vocab_size)
    for model in models.values():
        run_ours(model, prompts, min(16, n_prompt), 4)  # warm up
    runs = [(name, threads) for name in models for threads in dict.fromkeys([spec["threads"], 1])]
    speeds: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    for rnd in range(spec["rounds"]):
        for busy in [0, *spec["busy"]]:
            procs = _busy_processes(busy)
            try:
                for name, threads in runs[:: 1 if rnd % 2 == 0 else -1]:
                    torch.set_num_threads(threads)
                    _, d = run_ours(models[name], prompts, n_prompt, n_new)
                    speeds[name].setdefault(f"{busy}x{threads}", []).append((n_new - 1) / d)
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
    torch.set_num_threads(spec["threads"])
    return speeds


def contention_ratios(speeds: dict[str, list[float]], threads: int, busy: list[int]) -> dict:
    """For one model: median tok/s per "<busy>x<threads>" condition, and medians of the per-round ratios busy /
    quiet (at `threads` threads) and `threads` threads / 1 thread at each busy level."""

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(speeds[a], speeds[b], strict=True))

    out: dict = {"tok_s": speeds, "median_tok_s": {k: statistics.median(v) for k, v in speeds.items()}}
    out["busy_vs_quiet"] = {str(b): ratio(f"{b}x{threads}", f"0x{threads}") for b in busy}
    if threads != 1:
        out["vs_1_thread"] = {str(b): ratio(f"{b}x{threads}", f"{b}x1") for b in [0, *busy]}
    return out


def contention_table(contention: dict, threads: int) -> str:
    """The contention measurement as a markdown table: one row per model and busy level."""
    lines = [
        f"| impl | busy processes | decode tok/s, {threads} threads | decode tok/s, 1 thread | busy / quiet | "
        f"{threads} threads / 1 |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in contention["models"].items():
        for b in [0, *contention["busy"]]:
            med = c["median_tok_s"]
            rel = "-" if b == 0 else f"{c['busy_vs_quiet'][str(b)]:.2f}"
            one = f"{c['vs_1_thread'][str(b)]:.2f}" if "vs_1_thread" in c else "-"
            lines.append(f"| {name} | {b} | {med[f'{b}x{threads}']:.1f} | {med[f'{b}x1']:.1f} | {rel} | {one} |")
    return "\n".join(lines) + "\n"


def interleaved_ratios(speeds: dict[str, list[float]]) -> dict:
    """Medians of the per-round speeds and of the per-round ratios to transformers and to our bf16."""
    out: dict = {"tok_s": speeds, "median_tok_s": {k: statistics.median(v) for k, v in speeds.items()}}
    for base, key in (("transformers", "vs_transformers"), ("bf16", "vs_our_bf16")):
        if base in speeds:
            out[key] = {
                k: statistics.median(a / b for a, b in zip(v, speeds[base], strict=True))
                for k, v in speeds.items()
                if k != base and (base != "bf16" or k != "transformers")
            }
    return out


def child_main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    torch.set_num_threads(spec["threads"])
    if spec["impl"] == "interleaved":
        print("RESULT " + json.dumps(_interleaved(spec)))
        return
    if spec["impl"] == "contention":
        print("RESULT " + json.dumps(_contention(spec)))
        return
    if spec["impl"] == "transformers":
        res = _time_transformers(spec["path"], spec["batch"], spec["prompt_len"], spec["new_tokens"], spec["runs"])
    else:
        res = _time_ours(
            spec["path"], spec["batch"], spec["prompt_len"], spec["new_tokens"], spec["runs"], spec["compile"]
        )
    print("RESULT " + json.dumps(res))


def _run_child(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "mixtral.bench", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"benchmark child {spec['impl']} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


# ---- quality of the quantized models ---------------------------------------------------------------------


@torch.no_grad()
def quantization_quality(model, quantized: dict, tokens_NT: torch.Tensor) -> dict[str, dict[str, float]]:
    """Next-token KL(bf16 || quantized) (mean over positions, nats), top-1 agreement with bf16, and the
    loss (nats/token) of each model on `tokens_NT` (fixed prompts, every position predicted)."""

    def run(m) -> torch.Tensor:
        return m(tokens_NT[:, :-1]).float().log_softmax(-1)

    ref = run(model)
    targets = tokens_NT[:, 1:]
    out = {"bf16": {"loss": float(-ref.gather(-1, targets[..., None]).mean())}}
    for name, qm in quantized.items():
        lp = run(qm)
        kl = (ref.exp() * (ref - lp)).sum(-1).mean()
        agree = (lp.argmax(-1) == ref.argmax(-1)).float().mean()
        out[name] = {
            "kl": float(kl),
            "top1_agreement": float(agree),
            "loss": float(-lp.gather(-1, targets[..., None]).mean()),
        }
    return out


def quality_report(
    checkpoint: str | None,
    texts: list[str],
    group_sizes: list[int],
    seq_len: int = 256,
    n_seqs: int = 16,
    save_dir: str | None = None,
) -> dict:
    """Quality of int8 and int4 (each group size) against bf16 on a trained checkpoint (default: the
    built-in model): KL, top-1 agreement and loss on the first `n_seqs` windows of `seq_len` tokens of
    `texts` (fixed prompts: every position of each window is a next-token prediction). With `save_dir`,
    the quantized checkpoints are written there (for `mixtral eval`)."""
    from .builtin import default_checkpoint
    from .checkpoint import load_model, save_quantized
    from .quantize import quantize_model
    from .tokenizer import load_tokenizer
    from .train.data import expand_paths, read_documents, tokenize

    path = checkpoint or str(default_checkpoint())
    model = load_model(path, dtype=torch.bfloat16)
    seq_len = min(seq_len, model.config.max_seq_len)
    data = tokenize(read_documents(expand_paths(texts)), load_tokenizer(path), progress=False)
    n = min(n_seqs, (len(data.tokens) - 1) // seq_len)
    # windows spread evenly over the texts, each seq_len inputs + 1 target
    step = (len(data.tokens) - seq_len - 1) // max(n - 1, 1)
    tokens = torch.stack([data.tokens[i * step : i * step + seq_len + 1] for i in range(n)]).long()
    quantized = {"int8": quantize_model(load_model(path, dtype=torch.bfloat16), "int8")}
    for g in group_sizes:
        quantized[f"int4-g{g}"] = quantize_model(load_model(path, dtype=torch.bfloat16), "int4", g)
    if save_dir:
        for name, qm in quantized.items():
            save_quantized(qm, Path(save_dir) / name)
    out = quantization_quality(model, quantized, tokens)
    return {"checkpoint": path, "texts": texts, "windows": n, "seq_len": seq_len, "quality": out}


# ---- the whole benchmark --------------------------------------------------------------------------------


def run_benchmark(args: argparse.Namespace) -> dict:
    from .checkpoint import load_model, save_model, save_quantized
    from .config import get_preset
    from .generate import prepare_kernels
    from .model import Transformer
    from .quantize import active_weight_bytes, quantize_model, weight_bytes

    args.threads = cli_args.threads(args)  # the children get the same number
    torch.set_num_threads(args.threads)
    info = machine()
    print(machine_line(info), flush=True)
    bandwidth = memory_bandwidth_gbs()
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s (torch.sum over 512 MB, median of 7)", flush=True)
    results: dict = {"machine": info, "bandwidth_gbs": bandwidth, "args": vars(args).copy(), "rows": []}
    results["args"].pop("func", None)

    with tempfile.TemporaryDirectory(prefix="mixtral-bench-") as tmp:
        if args.checkpoint:
            src = Path(args.checkpoint)
            model = load_model(src, dtype=torch.bfloat16)
        else:
            torch.manual_seed(0)
            model = Transformer.skeleton(get_preset(args.preset))
            model = model.to_empty(device="cpu").to(torch.bfloat16)
            model.init_weights()
            model.eval()
        prepare_kernels(model)  # a first run builds them here, not inside a timed child
        # Both peers read the same bf16 weights (transformers wants the HF layout, which save_model writes).
        src = Path(tmp) / "bf16"
        save_model(model, src)
        paths = {"bf16": (str(src), active_weight_bytes(model), weight_bytes(model))}
        quantized = {}
        for mode in args.modes:
            if mode == "bf16":
                continue
            qm = quantize_model(load_model(src, dtype=torch.bfloat16), mode, args.group_size)
            qpath = Path(tmp) / mode
            save_quantized(qm, qpath)
            paths[mode] = (str(qpath), active_weight_bytes(qm), weight_bytes(qm))
            quantized[f"{mode}" + (f"-g{args.group_size}" if mode == "int4" else "")] = qm
        cfg = model.config
        print(
            f"model: {'checkpoint ' + args.checkpoint if args.checkpoint else 'preset ' + args.preset + ' (random)'}"
            f", {sum(cfg.param_counts()) and cfg.param_counts()[0] / 1e6:.0f}M parameters; active weight bytes "
            f"per token: " + ", ".join(f"{m} {p[1] / 1e6:.0f} MB" for m, p in paths.items()),
            flush=True,
        )
        if quantized and args.contention is None:
            prompts = torch.tensor(random_prompts(4, 64, cfg.vocab_size))
            results["quality_random_prompts"] = quantization_quality(model, quantized, prompts)
        del model, quantized

        if args.contention is not None:
            return _run_contention(args, results, {m: paths[m][0] for m in args.modes if m in paths})
        impls = [m for m in args.modes if m in paths] + ([] if args.no_transformers else ["transformers"])
        # Rounds interleave the configurations (and a bandwidth probe before each), so that a noisy stretch
        # of a shared machine is spread over all of them rather than landing on one.
        per_config: dict[tuple[str, int], list[dict]] = {}
        probes = []
        for rnd in range(args.rounds):
            for batch in args.batch:
                for impl in impls:
                    path, active, wbytes = paths["bf16" if impl == "transformers" else impl]
                    spec = {
                        "impl": impl,
                        "path": path,
                        "batch": batch,
                        "prompt_len": args.prompt_len,
                        "new_tokens": args.new_tokens,
                        "runs": args.runs,
                        "threads": args.threads,
                        "compile": args.compile,
                    }
                    probes.append(memory_bandwidth_gbs())
                    r = _run_child(spec)
                    r.update(impl=impl, batch=batch, active_bytes=active, weight_bytes=wbytes)
                    per_config.setdefault((impl, batch), []).append(r)
                    print(("" if args.rounds == 1 else f"round {rnd + 1}: ") + _row_line(r), flush=True)
        if args.interleaved and 1 in args.batch:
            spec = {
                "impl": "interleaved",
                "paths": {m: paths[m][0] for m in args.modes if m in paths},
                "transformers": None if args.no_transformers else paths["bf16"][0],
                "rounds": args.interleaved,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "threads": args.threads,
            }
            results["interleaved"] = {k: interleaved_ratios(v) for k, v in _run_child(spec).items()}
    bandwidth = statistics.median(probes)
    results["bandwidth_gbs"], results["bandwidth_probes_gbs"] = bandwidth, probes
    if len(probes) > 1:
        print(
            f"memory read bandwidth over the run: median {bandwidth:.1f} GB/s of {len(probes)} probes "
            f"(range {min(probes):.1f}-{max(probes):.1f}); the limits below use the median",
            flush=True,
        )
    for rs in per_config.values():
        results["rows"].append(_merge_rounds(rs, bandwidth))
    _add_ratios(results)
    print()
    print(markdown_table(results))
    return results


def _run_contention(args: argparse.Namespace, results: dict, paths: dict[str, str]) -> dict:
    """`--contention`: batch-1 decode quiet, beside 1 (and each further N) busy processes, at --threads threads
    and at 1, in one process over interleaved rounds; prints the table of medians and ratios."""
    busy = sorted({1, *args.contention})
    spec = {
        "impl": "contention",
        "paths": paths,
        "busy": busy,
        "rounds": args.contention_rounds,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
    }
    print(
        f"contention: decode of {args.new_tokens} tokens after {args.prompt_len}, quiet and beside "
        f"{', '.join(map(str, busy))} busy processes, at {args.threads} threads and 1, "
        f"{args.contention_rounds} interleaved rounds in one process",
        flush=True,
    )
    speeds = _run_child(spec)
    results["contention"] = {
        "busy": busy,
        "rounds": args.contention_rounds,
        "models": {name: contention_ratios(v, args.threads, busy) for name, v in speeds.items()},
    }
    print()
    print(
        f"Medians over {args.contention_rounds} rounds; ratios are medians of per-round ratios "
        "(busy / quiet at the same thread count; threads / 1 thread at the same busy level):"
    )
    print()
    print(contention_table(results["contention"], args.threads))
    return results


def _merge_rounds(rs: list[dict], bandwidth: float) -> dict:
    """One configuration's rounds as one row: medians of the speeds, the largest peak RSS."""
    r = dict(rs[0])
    for key in ("prefill_tok_s", "decode_tok_s"):
        r[key] = statistics.median(x[key] for x in rs)
    r["decode_tok_s_runs"] = [v for x in rs for v in x["decode_tok_s_runs"]]
    r["peak_rss"] = max(x["peak_rss"] for x in rs)
    r["rounds"] = len(rs)
    if r["batch"] == 1:
        r["bandwidth_fraction"] = r["active_bytes"] * r["decode_tok_s"] / (bandwidth * 1e9)
    return r


def _row_line(r: dict) -> str:
    frac = f", {r['bandwidth_fraction']:.0%} of the bandwidth limit" if "bandwidth_fraction" in r else ""
    return (
        f"{r['impl']:>12} batch {r['batch']}: prefill {r['prefill_tok_s']:.0f} tok/s, decode "
        f"{r['decode_tok_s']:.1f} tok/s{frac}, peak RSS {r['peak_rss'] / 1e9:.2f} GB"
    )


def _add_ratios(results: dict) -> None:
    by = {(r["impl"], r["batch"]): r for r in results["rows"]}
    for r in results["rows"]:
        tf = by.get(("transformers", r["batch"]))
        if tf is not None:
            r["prefill_vs_transformers"] = r["prefill_tok_s"] / tf["prefill_tok_s"]
            r["decode_vs_transformers"] = r["decode_tok_s"] / tf["decode_tok_s"]
        ours = by.get(("bf16", r["batch"]))
        if ours is not None and r["impl"] in ("int8", "int4"):
            r["decode_vs_our_bf16"] = r["decode_tok_s"] / ours["decode_tok_s"]


def markdown_table(results: dict) -> str:
    def f(r, key, fmt):
        return format(r[key], fmt) if key in r else "-"

    lines = [
        "| impl | batch | prefill tok/s | decode tok/s | decode / transformers | prefill / transformers | "
        "decode / our bf16 | % of bandwidth limit | peak RSS GB | peak RSS / weights |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        frac = f"{r['bandwidth_fraction']:.0%}" if "bandwidth_fraction" in r else "-"
        lines.append(
            f"| {r['impl']} | {r['batch']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
            f"{f(r, 'decode_vs_transformers', '.2f')} | {f(r, 'prefill_vs_transformers', '.2f')} | "
            f"{f(r, 'decode_vs_our_bf16', '.2f')} | {frac} | {r['peak_rss'] / 1e9:.2f} | "
            f"{r['peak_rss'] / r['weight_bytes']:.2f} |"
        )
    inter = results.get("interleaved")
    if inter:
        n = len(next(iter(inter["decode"]["tok_s"].values())))
        lines += [
            "",
            f"Batch 1, every model in one process, {n} interleaved rounds (medians; ratios: medians of per-round "
            "ratios):",
            "",
            "| impl | prefill tok/s | decode tok/s | prefill / transformers | decode / transformers | "
            "decode / our bf16 |",
            "|---|---|---|---|---|---|",
        ]
        pre, dec = inter["prefill"], inter["decode"]

        def ratio(part: dict, key: str, name: str) -> str:
            x = part.get(key, {}).get(name)
            return "-" if x is None else f"{x:.2f}"

        for name in dec["median_tok_s"]:
            lines.append(
                f"| {name} | {pre['median_tok_s'][name]:.0f} | {dec['median_tok_s'][name]:.1f} | "
                f"{ratio(pre, 'vs_transformers', name)} | {ratio(dec, 'vs_transformers', name)} | "
                f"{ratio(dec, 'vs_our_bf16', name)} |"
            )
    q = results.get("quality_random_prompts")
    if q:
        lines = lines if results["rows"] else []
        lines += ["", "| weights | KL vs bf16 (nats) | top-1 agreement | loss (nats/token) |", "|---|---|---|---|"]
        for name, v in q.items():
            kl = f"{v['kl']:.5f}" if "kl" in v else "-"
            agree = f"{v['top1_agreement']:.3f}" if "top1_agreement" in v else "-"
            lines.append(f"| {name} | {kl} | {agree} | {v['loss']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in (
        (axes[0], "prefill_tok_s", "prefill tokens/s"),
        (axes[1], "decode_tok_s", "decode tokens/s"),
    ):
        labels = [f"{r['impl']}\nB={r['batch']}" for r in results["rows"]]
        values = [r[key] for r in results["rows"]]
        colors = ["tab:gray" if r["impl"] == "transformers" else "tab:blue" for r in results["rows"]]
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)), labels, fontsize=8)
        ax.set_title(title)
    m = results["machine"]
    fig.suptitle(
        f"{m['cpu']}, {m['threads']} threads, {results['bandwidth_gbs']:.1f} GB/s, {m['date'][:10]}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- command line ---------------------------------------------------------------------------------------------


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="bench-791m", help="model shape with random weights (default: bench-791m)")
    p.add_argument("--checkpoint", metavar="DIR", help="benchmark this checkpoint instead of random weights")
    p.add_argument(
        "--modes",
        nargs="+",
        default=["bf16", "int8", "int4"],
        choices=["bf16", "int8", "int4"],
        help="our weight formats to time (default: all three)",
    )
    p.add_argument("--group-size", type=int, default=64, help="int4 group size (default: 64)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: 128)")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per sequence (default: 128)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per configuration and round (default: 3)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds over all configurations, interleaved, each in fresh processes with a bandwidth probe "
        "before each; the table gives medians over rounds (default: 1)",
    )
    p.add_argument(
        "--interleaved",
        type=int,
        default=10,
        metavar="R",
        help="also time batch 1 with every model in one process, R interleaved rounds of [prefill, decode] "
        "(ratios robust to a machine whose speed drifts; 0: off; default: 10)",
    )
    cli_args.add_threads_flag(p)
    p.add_argument(
        "--contention",
        type=int,
        nargs="*",
        metavar="N",
        help="instead of the table: batch-1 decode quiet, beside 1 busy process (and beside each N), at --threads "
        "threads and at 1, in one process; prints busy / quiet and threads / 1-thread ratios",
    )
    p.add_argument(
        "--contention-rounds",
        type=int,
        default=5,
        metavar="R",
        help="interleaved rounds of --contention (default: 5)",
    )
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile our blocks (off by default, as in generate: it did not pay on our 2-core machine)",
    )
    p.add_argument("--json", metavar="FILE", default="bench.json", help="write results here (default: bench.json)")
    p.add_argument("--plot", metavar="PNG", nargs="?", const="bench.png", help="also write a bar chart")
    p.add_argument(
        "--quality",
        nargs="+",
        metavar="TEXT",
        help="instead of speed: quality of int8/int4 against "
        "bf16 on these text files, for --checkpoint (default: the built-in model)",
    )
    p.add_argument(
        "--full-scale",
        nargs=argparse.REMAINDER,
        metavar="...",
        help="the real Mixtral 8x7B shape (or a slice of it) against llama.cpp on the same weights; the flags after "
        "it are the full-scale run's own (--full-scale --help lists them)",
    )
    p.add_argument("--quality-group-sizes", type=int, nargs="+", default=[32, 64, 128], help="int4 group sizes")
    p.add_argument("--save-quantized", metavar="DIR", help="with --quality: write the quantized checkpoints here")


def cmd_bench(args: argparse.Namespace) -> None:
    if args.full_scale is not None:
        from . import full_scale

        full_scale.main(args.full_scale)
        return
    if args.quality:
        rep = quality_report(args.checkpoint, args.quality, args.quality_group_sizes, save_dir=args.save_quantized)
        print(f"{rep['checkpoint']}: {rep['windows']} windows of {rep['seq_len']} tokens from {' '.join(rep['texts'])}")
        print(markdown_table({"rows": [], "quality_random_prompts": rep["quality"]}), end="")
        Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
        return
    results = run_benchmark(args)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="CPU prefill/decode speed and memory: ours (bf16, int8, int4) against transformers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_flags(p)
    p.set_defaults(func=cmd_bench)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(argv[1:])
        return
    p = argparse.ArgumentParser(
        prog="benchmarks/decode.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_flags(p)
    cmd_bench(p.parse_args(argv))


if __name__ == "__main__":
    main()
