"""`python -m mixtral.serve ARGS`: the same as `mixtral serve ARGS`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .cli import add_command


def main(argv: Sequence[str] | None = None) -> int:
    from ..checkpoint import CheckpointError
    from ..cli import CLIError
    from ..config import ConfigError

    parser = argparse.ArgumentParser(prog="mixtral")
    add_command(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.func(args)
    except (CLIError, CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"mixtral serve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
