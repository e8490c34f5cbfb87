"""Hugging Face model ids (`org/name`, `org/name@revision`) as checkpoints, through `huggingface_hub`.

The name `builtin` is the built-in model (a local folder of that name is `./builtin`). Otherwise a local path
that exists always wins: an id is only looked up when no file or folder of that name exists. Then:

- online, the repository's file list says which layout it holds, and only the files we load are downloaded (with
  huggingface_hub's progress bars): `config.json` and the weights (`model.safetensors`, or the index and the shards
  it names), or `params.json` and the consolidated file, plus the tokenizer and generation files it has;
- offline (`HF_HUB_OFFLINE=1`), or when the download fails (no network), the snapshot in the local cache is used;
- neither: a `CheckpointError` naming the id, the cache searched and why each way failed.

The cache is huggingface_hub's own (`models--org--name/snapshots/<commit>/...`, `refs/<branch>`), at
`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`; the variables are read at each call, so a
process that sets them after importing huggingface_hub is still followed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..builtin import default_checkpoint
from .layouts import HF_INDEX, HF_SINGLE
from .reader import CheckpointError
from .writer import QUANT_FILE, QUANT_WEIGHTS

# org/name with the characters the Hub allows in names, then an optional @revision (branch, tag or commit).
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
# Files fetched beside the weights when the repository has them.
EXTRA_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
_TRUE = {"1", "on", "yes", "true"}


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """The folder (or file) `spec` names: the built-in model for "builtin"; a local path that exists as it is;
    else, for a string shaped like `org/name[@revision]`, the Hugging Face model's snapshot (downloaded, or from
    the cache). Anything else is returned as a path, for the loader to report missing."""
    if spec == "builtin":  # the string only: Path("builtin") is a local folder
        return default_checkpoint()
    path = Path(spec).expanduser()
    if not isinstance(spec, str) or path.exists() or path.is_symlink():
        return path
    m = HUB_ID.fullmatch(spec)
    if m is None:
        return path
    return hub_snapshot(m["repo"], m["revision"])


def hub_cache() -> Path:
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def hub_snapshot(repo: str, revision: str | None = None) -> Path:
    """The local folder of Hugging Face model `repo` at `revision` (default: main), with the files we load."""
    try:
        import huggingface_hub
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:  # pragma: no cover - a dependency of the package
        raise CheckpointError(f"{repo} is not a local path, and huggingface_hub is not installed to fetch it") from None
    name = f"{repo}@{revision}" if revision else repo
    cache, offline = hub_cache(), hub_offline()
    reasons = []
    if offline:
        reasons.append("offline mode is on (HF_HUB_OFFLINE)")
    else:
        try:
            return _download(repo, revision, cache)
        except CheckpointError:
            raise
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
            # the Hub answered: no such model (or revision), or not for us
            raise CheckpointError(
                f"checkpoint {name} is not a local path, and the Hugging Face Hub has no model {name} we can "
                f"read: {_first_line(e)}"
            ) from None
        except Exception as e:  # no network, a proxy, a server error: the cache may still hold it
            reasons.append(f"downloading failed ({type(e).__name__}: {_first_line(e)})")
    try:
        folder = huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True)
    except Exception as e:
        reasons.append(f"it is not in the cache ({type(e).__name__}: {_first_line(e)})")
    else:
        return Path(folder)
    raise CheckpointError(
        f"checkpoint {name} does not exist locally and is not a Hugging Face model we could get: "
        f"{'; '.join(reasons)}; cache searched: {cache} (set HF_HUB_CACHE or HF_HOME to use another)"
    )


def _download(repo: str, revision: str | None, cache: Path) -> Path:
    """Download the files we load of `repo` (the Hub's file list picks the layout) and return its snapshot."""
    import huggingface_hub

    info = huggingface_hub.HfApi().model_info(repo, revision=revision)
    names = {s.rfilename for s in info.siblings or ()}
    if "config.json" in names and QUANT_FILE in names:  # a quantized checkpoint of ours
        files = ["config.json", QUANT_FILE, QUANT_WEIGHTS if QUANT_WEIGHTS in names else HF_SINGLE]
    elif "config.json" in names and HF_INDEX in names:
        index = huggingface_hub.hf_hub_download(repo, HF_INDEX, revision=revision, cache_dir=cache)
        try:
            shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{repo}: {HF_INDEX} is not a safetensors index: {e}") from None
        files = ["config.json", HF_INDEX, *shards]
    elif "config.json" in names and HF_SINGLE in names:
        files = ["config.json", HF_SINGLE]
    elif "params.json" in names and ({"consolidated.safetensors", "consolidated.00.pth"} & names):
        weights = "consolidated.safetensors" if "consolidated.safetensors" in names else "consolidated.00.pth"
        files = ["params.json", weights]
    else:
        gguf = sorted(n for n in names if n.endswith(".gguf"))
        hint = f" (it holds GGUF files such as {gguf[0]}: download one and pass its path)" if gguf else ""
        raise CheckpointError(
            f"Hugging Face model {repo} holds no checkpoint we read: neither config.json with {HF_SINGLE} or "
            f"{HF_INDEX} nor params.json with consolidated.safetensors{hint}"
        )
    files += [n for n in EXTRA_FILES if n in names]
    folder = huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=files)
    return Path(folder)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
