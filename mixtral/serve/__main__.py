"""`python -m mixtral.serve ARGS`: the same as `mixtral serve ARGS`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import cli_args
from .cli import add_command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mixtral")
    add_command(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return cli_args.run(parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
