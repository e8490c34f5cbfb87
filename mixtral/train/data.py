"""Training data: documents from text and JSONL files, tokenized once (cached on disk), split into training
and held-out documents, and packed into fixed-length sequences.

- `.txt` (any non-.jsonl file): one document per file, or per blank-line-separated block (`split="paragraph"`);
  each document becomes `<s> text </s>`, every token but <s> is a target.
- `.jsonl`: one object per line, `{"text": ...}` (as above) or `{"messages": [...]}` (a chat in the v1 format;
  only the assistant's tokens are targets).

Packing concatenates the documents and cuts the stream into sequences of `seq_len + 1` tokens (inputs and
shifted targets), so there is no padding; attention may cross document boundaries, as in GPT-style packing.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..tokenizer import Tokenizer


class DataError(ValueError):
    """Training data that cannot be used; the message names the file (and line)."""


@dataclass
class Document:
    text: str | None = None
    messages: list[dict] | None = None
    source: str = ""


def expand_paths(patterns: Sequence[str | os.PathLike], what: str = "training data") -> list[Path]:
    """Paths with shell wildcards (*, ?, [..]) expanded, sorted; a pattern that matches nothing is an error
    (naming the paths as `what`)."""
    out: list[Path] = []
    for pattern in map(str, patterns):
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
            if not matches:
                raise DataError(f"{what} pattern {pattern!r} matches no files")
            out += map(Path, matches)
        else:
            out.append(Path(pattern).expanduser())
    return out


def read_documents(
    paths: Sequence[str | os.PathLike], split: str = "file", what: str = "training data"
) -> list[Document]:
    if split not in ("file", "paragraph"):
        raise DataError(f"split={split!r} is invalid: choose 'file' or 'paragraph'")
    docs: list[Document] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{what} {path} does not exist or is not a file")
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text: {e}") from None
        if path.suffix == ".jsonl":
            docs += _read_jsonl(path, content)
        elif split == "paragraph":
            docs += [Document(text=b.strip(), source=str(path)) for b in re.split(r"\n\s*\n", content) if b.strip()]
        elif content.strip():
            docs.append(Document(text=content, source=str(path)))
    if not docs:
        raise DataError(f"no documents in {', '.join(map(str, paths)) or 'the given paths'}")
    return docs


def _read_jsonl(path: Path, content: str) -> list[Document]:
    docs = []
    for n, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON: {e}") from None
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            docs.append(Document(text=obj["text"], source=f"{path}:{n}"))
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            docs.append(Document(messages=obj["messages"], source=f"{path}:{n}"))
        else:
            raise DataError(f'{path}:{n}: expected an object with "text" (a string) or "messages" (a list)')
    return docs


@dataclass
class Tokenized:
    """Documents as one flat token stream: doc i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: torch.Tensor  # int32
    targets: torch.Tensor  # bool: is this token a training target
    offsets: torch.Tensor  # int64 [n_docs + 1]
    chars: torch.Tensor  # int64 [n_docs]: characters of text documents (0 for chats)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def select(self, docs: Sequence[int]) -> Tokenized:
        parts = [slice(int(self.offsets[i]), int(self.offsets[i + 1])) for i in docs]
        lengths = torch.tensor([p.stop - p.start for p in parts], dtype=torch.long)
        return Tokenized(
            tokens=torch.cat([self.tokens[p] for p in parts]) if parts else self.tokens[:0],
            targets=torch.cat([self.targets[p] for p in parts]) if parts else self.targets[:0],
            offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
            chars=self.chars[list(docs)],
        )


def tokenize(docs: Sequence[Document], tokenizer: Tokenizer, progress: bool = True) -> Tokenized:
    tokens: list[int] = []
    targets: list[bool] = []
    offsets, chars = [0], []
    for doc in tqdm(docs, desc="tokenizing", unit="doc", disable=not progress or len(docs) < 50):
        if doc.text is not None:
            ids = tokenizer.encode(doc.text, bos=True, eos=True)
            mask = [False] + [True] * (len(ids) - 1)
            chars.append(len(doc.text))
        else:
            try:
                ids, mask = tokenizer.encode_chat_with_mask(doc.messages)
            except (ValueError, TypeError) as e:
                raise DataError(f"{doc.source}: invalid chat: {e}") from None
            chars.append(0)
        tokens += ids
        targets += mask
        offsets.append(len(tokens))
    return Tokenized(
        tokens=torch.tensor(tokens, dtype=torch.int32),
        targets=torch.tensor(targets, dtype=torch.bool),
        offsets=torch.tensor(offsets, dtype=torch.long),
        chars=torch.tensor(chars, dtype=torch.long),
    )


def load_tokenized(
    paths: Sequence[str | os.PathLike], tokenizer: Tokenizer, split: str, cache_dir: str | os.PathLike | None
) -> Tokenized:
    """Read and tokenize `paths`, reusing a cached result for the same file contents, split and tokenizer."""
    key = hashlib.sha256(f"v1|{split}|{tokenizer!r}|{tokenizer.vocab_size}".encode())
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"training data {path} does not exist or is not a file")
        key.update(str(path.resolve()).encode())
        key.update(hashlib.sha256(path.read_bytes()).digest())
    cache_file = Path(cache_dir) / f"{key.hexdigest()[:32]}.pt" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        try:
            return Tokenized(**torch.load(cache_file, weights_only=True))
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            cache_file.unlink(missing_ok=True)
    data = tokenize(read_documents(paths, split), tokenizer)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp")
        os.close(fd)
        torch.save(data.__dict__, tmp)
        os.replace(tmp, cache_file)
    return data


def split_heldout(data: Tokenized, fraction: float, seed: int) -> tuple[Tokenized, Tokenized]:
    """Hold out a fixed pseudo-random `fraction` of the documents (at least one)."""
    n = len(data)
    if n < 2:
        raise DataError("need at least 2 documents to hold some out (use --split paragraph or --eval-data)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(max(1, round(n * fraction)), n - 1)
    return data.select(sorted(order[n_eval:])), data.select(sorted(order[:n_eval]))


class PackedSequences:
    """Sequences of seq_len inputs + seq_len targets cut from the concatenated documents."""

    def __init__(self, data: Tokenized, seq_len: int) -> None:
        self.data, self.seq_len = data, seq_len
        self.n = (len(data.tokens) - 1) // seq_len
        if self.n == 0:
            raise DataError(f"{len(data.tokens)} tokens are too few for one sequence of {seq_len} (+1) tokens")
        total_chars = int(data.chars.sum())
        n_targets = int(data.targets[1:].sum())
        # Characters per target token, to turn a loss per token into bits per character.
        self.chars_per_target = total_chars / n_targets if total_chars and n_targets else None

    def __len__(self) -> int:
        return self.n

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, target mask), each [len(indices), seq_len]."""
        L = self.seq_len
        rows = torch.stack([self.data.tokens[i * L : i * L + L + 1] for i in indices]).long()
        mask = torch.stack([self.data.targets[i * L + 1 : i * L + L + 1] for i in indices])
        return rows[:, :-1], rows[:, 1:], mask


class Loader:
    """Shuffled batches, epoch after epoch; its position is part of a training checkpoint."""

    def __init__(self, seqs: PackedSequences, batch_size: int, seed: int) -> None:
        if batch_size > len(seqs):
            raise DataError(f"batch size {batch_size} exceeds the {len(seqs)} training sequences")
        self.seqs, self.batch_size, self.seed = seqs, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        return torch.randperm(len(self.seqs), generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.cursor + self.batch_size > len(self._order):  # drop the incomplete tail of an epoch
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation()
        idx = self._order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return self.seqs.batch(idx)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation()
