"""GGUF files made by llama.cpp's own tools, read by us: how close each type's logits are to the bf16 model's.

The checkpoint (default: the built-in model) is written as a Hugging Face folder with its tokenizer, converted by
llama.cpp's `convert_hf_to_gguf.py` to BF16, then quantized by its `llama-quantize` to each type (Q8_0, Q4_0,
Q4_K_M by default: its mixed recipe, with Q6_K / Q5_K tensors that we re-quantize on loading). Every file is loaded
by `load_model` and compared with the bf16 safetensors model on windows of the text files: next-token KL (nats),
top-1 agreement and loss, as `mixtral bench --quality` does for our own int8 / int4. The BF16 file must give the
safetensors model's logits exactly.

    .venv/bin/python benchmarks/gguf_quality.py --llama-cpp SRC --llama-quantize PATH/llama-quantize
        [--checkpoint DIR] [--types Q8_0 Q4_0 Q4_K_M] [--text README.md docs/*.md] [--keep DIR]

SRC is llama.cpp's source folder (its converter and gguf-py); llama.cpp is a benchmark dependency only
(docs/performance.md says how to build it).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mixtral.bench import quantization_quality
from mixtral.builtin import default_checkpoint
from mixtral.checkpoint import load_model, save_model
from mixtral.measure import machine_line
from mixtral.tokenizer import load_tokenizer
from mixtral.train.data import read_documents, tokenize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp's source folder (convert_hf_to_gguf.py)")
    p.add_argument("--llama-quantize", type=Path, required=True, help="llama.cpp's llama-quantize binary")
    p.add_argument("--checkpoint", help="the model (default: the built-in one)")
    p.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0", "Q4_K_M"], help="llama-quantize types")
    p.add_argument("--text", nargs="+", help="text files to compare on (default: README.md and docs/*.md)")
    p.add_argument("--windows", type=int, default=16, help="windows of --seq-len tokens (default: 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default: 256)")
    p.add_argument("--keep", type=Path, help="write the GGUF files here and keep them")
    args = p.parse_args()
    converter = args.llama_cpp / "convert_hf_to_gguf.py"
    for path in (converter, args.llama_quantize):
        if not path.is_file():
            p.error(f"{path}: no such file")
    root = Path(__file__).resolve().parent.parent
    texts = args.text or [str(root / "README.md"), *sorted(glob.glob(str(root / "docs" / "*.md")))]
    print(machine_line())

    source = args.checkpoint or str(default_checkpoint())
    model = load_model(source, dtype=torch.bfloat16)
    tokenizer = load_tokenizer(source)
    data = tokenize(read_documents([Path(t) for t in texts]), tokenizer, progress=False)
    seq_len = min(args.seq_len, model.config.max_seq_len)
    n = min(args.windows, (len(data.tokens) - 1) // seq_len)
    step = (len(data.tokens) - seq_len - 1) // max(n - 1, 1)
    tokens = torch.stack([data.tokens[i * step : i * step + seq_len + 1] for i in range(n)]).long()
    print(f"{source}: {n} windows of {seq_len} tokens from {len(texts)} text files")

    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        hf = Path(scratch) / "hf"
        save_model(model, hf, tokenizer=tokenizer)
        env = {**os.environ, "PYTHONPATH": str(args.llama_cpp / "gguf-py")}
        files = {"BF16": work / "model-bf16.gguf"}
        run([sys.executable, str(converter), str(hf), "--outtype", "bf16", "--outfile", str(files["BF16"])], env=env)
        for t in args.types:
            files[t] = work / f"model-{t.lower()}.gguf"
            quantize = args.llama_quantize.resolve()
            run([str(quantize), str(files["BF16"]), str(files[t]), t], cwd=quantize.parent)  # its libraries beside it
        loaded = {t: load_model(f) for t, f in files.items()}
        with torch.no_grad():
            diff = (model(tokens[:2]).float() - loaded["BF16"](tokens[:2]).float()).abs().max().item()
        print(f"BF16 file against the safetensors model: max |logit difference| {diff:.3g}")
        quality = quantization_quality(model, loaded, tokens)
        sizes = {t: f.stat().st_size for t, f in files.items()}
    print("| file | size (MB) | KL (nats) | top-1 agreement | loss |")
    print("|---|---|---|---|---|")
    print(f"| bf16 safetensors | | | | {quality['bf16']['loss']:.4f} |")
    for t, size in sizes.items():
        q = quality[t]
        print(f"| {t} | {size / 1e6:.1f} | {q['kl']:.2e} | {q['top1_agreement']:.3f} | {q['loss']:.4f} |")


def run(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")


if __name__ == "__main__":
    main()
