"""The built-in model: a small Mixtral trained on Shakespeare, shipped inside the package. It loads like any
checkpoint (`mixtral.load_model(mixtral.BUILTIN)`), and the commands use it when no checkpoint is given."""

from __future__ import annotations

from pathlib import Path

BUILTIN = Path(__file__).parent / "data" / "builtin"


def default_checkpoint() -> Path:
    """The built-in model's folder; FileNotFoundError where the package was installed without it."""
    if not (BUILTIN / "config.json").is_file():
        raise FileNotFoundError(f"the built-in model is missing ({BUILTIN})")
    return BUILTIN
