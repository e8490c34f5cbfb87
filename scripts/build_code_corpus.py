"""Build the code corpus of the paper-claims experiments (issue 26) from Python sources on this machine.

    .venv/bin/python scripts/build_code_corpus.py [--out data/code]

Sources, each under a permissive licence (the licence of every installed package is read from its
metadata and checked against the one named here; a package whose metadata disagrees is skipped):
- the standard library of the interpreter that runs this script, tests included (PSF-2.0);
- the installed packages of PACKAGES below (BSD, MIT, Apache-2.0 licences).

Every `.py` file is read as UTF-8 (files that are not are skipped), files under 64 bytes or over 512 KB
(generated tables) are dropped, and exact duplicates (same SHA-256 of the bytes) are kept once: the first in
the sorted order of (source, path). Files are grouped into modules, a module being the package folder a
file lives in (`json`, `asyncio`, `test.test_asyncio`, `numpy.linalg`, ...) or the file itself for a
top-level module (`os.py`); a module is held out when the SHA-256 of its name, taken modulo 1000, is below
HELDOUT_PER_MILLE. The split is therefore deterministic and never cuts a module in two.

Output (one document per source file, each prefixed with its path as a comment line):
- OUT/train.jsonl, OUT/heldout.jsonl: `{"text": ...}` per file, for `mixtral train --data / --eval-data`;
- OUT/heldout_files/*.py: a few held-out files as plain text, for `mixtral routing --text`;
- OUT/tokenizer.model: a byte-fallback BPE sentencepiece model of CODE_VOCAB pieces trained on the
  training split only (see below);
- OUT/manifest.json: every kept file with its split, module, licence, bytes and tokens; and the totals.

Why a second tokenizer: at the model sizes this 2-core machine trains in the data-rich regime (~1M
parameters), Mixtral's 32000-piece vocabulary would put most of the parameters in the embedding and most
of the compute (about 80% at dim 64, measured) in the LM head and its softmax. The experiments therefore
use a 4096-piece code tokenizer (same kind as Mixtral's: sentencepiece BPE with byte fallback, BOS 1,
EOS 2, a dummy prefix), trained here deterministically; whitespace runs are kept as pieces, so
indentation stays visible to the model and to the routing analysis. Sizes are printed in tokens of both
tokenizers (`<s> text </s>` per document, as the trainer reads it), and the corpus tokenized with the
code tokenizer is stored in the trainer's data cache, so the runs that follow do not tokenize it again.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

HELDOUT_PER_MILLE = 50  # ~5% of the modules
CODE_VOCAB = 4096
TOKENIZER_SAMPLE_EVERY = 4  # the tokenizer learns from every 4th training file (a fixed sample, ~25%)
MIN_BYTES, MAX_BYTES = 64, 512 * 1024

# distribution name -> (import folders, SPDX licence, words one of which its metadata must contain)
PACKAGES: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "numpy": (("numpy",), "BSD-3-Clause", ("BSD",)),
    "networkx": (("networkx",), "BSD-3-Clause", ("BSD",)),
    "mpmath": (("mpmath",), "BSD-3-Clause", ("BSD",)),
    "Jinja2": (("jinja2",), "BSD-3-Clause", ("BSD",)),
    "click": (("click",), "BSD-3-Clause", ("BSD",)),
    "packaging": (("packaging",), "Apache-2.0 OR BSD-2-Clause", ("Apache", "BSD")),
    "idna": (("idna",), "BSD-3-Clause", ("BSD",)),
    "h11": (("h11",), "MIT", ("MIT",)),
    "anyio": (("anyio",), "MIT", ("MIT",)),
    "pluggy": (("pluggy",), "MIT", ("MIT",)),
    "fsspec": (("fsspec",), "BSD-3-Clause", ("BSD",)),
}
STDLIB_LICENCE = "PSF-2.0"


@dataclass
class SourceFile:
    path: str  # as written in the document header: stdlib/json/decoder.py, numpy/linalg/_linalg.py
    module: str
    licence: str
    text: str
    split: str = ""
    tokens: int = 0


def metadata_licence(dist: str) -> str:
    """Everything the package's metadata says about its licence, in one string."""
    meta = importlib.metadata.metadata(dist)
    parts = [meta.get("License-Expression") or "", (meta.get("License") or "")[:200]]
    parts += [c for c in meta.get_all("Classifier") or [] if c.startswith("License")]
    return " | ".join(p for p in parts if p)


def module_of(rel: Path) -> str:
    """The module a file belongs to: its package folder, or the file itself at the top level."""
    if len(rel.parts) == 1:
        return rel.stem
    return ".".join(rel.parts[:-1])


def read_tree(root: Path, prefix: str, licence: str, skip: set[str]) -> list[SourceFile]:
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in skip or "__pycache__" in rel.parts:
            continue
        size = path.stat().st_size
        if not MIN_BYTES <= size <= MAX_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        module = module_of(rel) if prefix == "stdlib" else module_of(Path(root.name) / rel)
        name = f"{prefix}/{rel}" if prefix == "stdlib" else f"{root.name}/{rel}"
        files.append(SourceFile(name, module, licence, text))
    return files


def collect() -> tuple[list[SourceFile], dict[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # site-packages (and the pyenv/venv machinery) are not the standard library
    files = read_tree(stdlib, "stdlib", STDLIB_LICENCE, skip={"site-packages", "dist-packages"})
    licences = {f"Python {sys.version.split()[0]} standard library": STDLIB_LICENCE}
    purelib = Path(sysconfig.get_paths()["purelib"])
    for dist, (folders, spdx, words) in PACKAGES.items():
        try:
            found = metadata_licence(dist)
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            print(f"skipped {dist}: not installed", file=sys.stderr)
            continue
        if not any(w.lower() in found.lower() for w in words):
            print(f"skipped {dist}: its metadata says {found!r}, not {spdx}", file=sys.stderr)
            continue
        licences[f"{dist} {version}"] = spdx
        for folder in folders:
            files += read_tree(purelib / folder, dist, spdx, skip=set())
    return files, licences


def dedupe(files: list[SourceFile]) -> list[SourceFile]:
    seen: set[bytes] = set()
    kept = []
    for f in files:
        h = hashlib.sha256(f.text.encode()).digest()
        if h not in seen:
            seen.add(h)
            kept.append(f)
    return kept


def is_heldout(module: str) -> bool:
    return int(hashlib.sha256(module.encode()).hexdigest(), 16) % 1000 < HELDOUT_PER_MILLE


def document(f: SourceFile) -> str:
    return f"# {f.path}\n{f.text}"


def train_tokenizer(files: list[SourceFile], out: Path) -> Path:
    """A sentencepiece BPE model on a fixed sample of the training files (one thread: deterministic)."""
    import sentencepiece

    sample = out / "tokenizer_sample.txt"
    # sentencepiece reads one sentence per line: newlines become byte pieces (<0x0A>), as in Mixtral's
    sample.write_text("".join(document(f) + "\n" for f in files[::TOKENIZER_SAMPLE_EVERY]))
    sentencepiece.SentencePieceTrainer.train(
        input=str(sample),
        model_prefix=str(out / "tokenizer"),
        model_type="bpe",
        vocab_size=CODE_VOCAB,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",  # no NFKC, no whitespace collapsing: code is kept byte-exact
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,  # runs of spaces (indentation) become pieces
        split_digits=True,
        max_sentence_length=1 << 16,
        input_sentence_size=0,  # every line of the sample, no random subsampling
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    sample.unlink()
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    return out / "tokenizer.model"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/code", help="output folder (default: data/code)")
    p.add_argument("--heldout-files", type=int, default=8, help="held-out files written as .py for routing")
    p.add_argument("--data-cache", default="~/.cache/mixtral/data", help="the trainer's tokenized-data cache")
    args = p.parse_args()

    from mixtral.tokenizer import load_tokenizer
    from mixtral.train.data import load_tokenized

    out = Path(args.out)
    (out / "heldout_files").mkdir(parents=True, exist_ok=True)
    found, licences = collect()
    files = dedupe(found)
    print(f"{len(found)} files read, {len(found) - len(files)} exact duplicates dropped", file=sys.stderr)
    for f in files:
        f.split = "heldout" if is_heldout(f.module) else "train"

    code_tokenizer = load_tokenizer(train_tokenizer([f for f in files if f.split == "train"], out))
    v1_tokenizer = load_tokenizer(None)
    totals = {}
    for split in ("train", "heldout"):
        part = [f for f in files if f.split == split]
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"text": document(f)}) + "\n" for f in part))
        # the trainer's own reader and tokenizer; the code tokenizer's result goes into the trainer's cache
        data = load_tokenized([path], code_tokenizer, "file", Path(args.data_cache).expanduser())
        v1 = load_tokenized([path], v1_tokenizer, "file", None)
        lengths = (data.offsets[1:] - data.offsets[:-1]).tolist()
        for f, n in zip(part, lengths, strict=True):
            f.tokens = n
        totals[split] = {
            "files": len(part),
            "modules": len({f.module for f in part}),
            "bytes": sum(len(document(f).encode()) for f in part),
            "tokens": int(data.offsets[-1]),
            "tokens_mixtral_v1": int(v1.offsets[-1]),
        }

    # A few held-out files for the routing analysis: mid-sized ones, from different modules, in a fixed order.
    for old in (out / "heldout_files").glob("*.py"):
        old.unlink()
    picked, modules = [], set()
    for f in sorted((f for f in files if f.split == "heldout"), key=lambda f: hashlib.sha256(f.path.encode()).digest()):
        if 4_000 <= len(f.text) <= 40_000 and f.module not in modules and len(picked) < args.heldout_files:
            picked.append(f)
            modules.add(f.module)
    for f in picked:
        (out / "heldout_files" / f.path.replace("/", "__")).write_text(f.text)

    manifest = {
        "licences": licences,
        "heldout_per_mille": HELDOUT_PER_MILLE,
        "tokenizer": {"file": str(out / "tokenizer.model"), "vocab": CODE_VOCAB},
        "totals": totals,
        "routing_files": [f.path for f in picked],
        "files": [{k: v for k, v in asdict(f).items() if k != "text"} for f in files],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for name, spdx in licences.items():
        print(f"  {name}: {spdx}")
    for split, t in totals.items():
        print(
            f"{split}: {t['files']} files in {t['modules']} modules, {t['bytes'] / 1e6:.1f} MB; "
            f"{t['tokens'] / 1e6:.2f}M tokens of the code tokenizer ({t['bytes'] / t['tokens']:.2f} bytes/token), "
            f"{t['tokens_mixtral_v1'] / 1e6:.2f}M of Mixtral v1 ({t['bytes'] / t['tokens_mixtral_v1']:.2f} bytes/token)"
        )


if __name__ == "__main__":
    main()
