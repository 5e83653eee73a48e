"""The `deeplab` command: one module per command (`add_parser` declares its flags, `run` does it), thin over the
library; flags shared by several commands are in `flags.py`, the one error path in `errors.py`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import benchmark, convert, data, export, predict, profile, quantize, serve, train
from . import eval as eval_
from .errors import (
    EXIT_BUG,
    EXIT_FILES,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_MEMORY,
    failure_line,
)

# In the order `deeplab --help` lists them.
COMMANDS = (train, eval_, predict, data, export, quantize, convert, profile, benchmark, serve)

__all__ = ["EXIT_BUG", "EXIT_FILES", "EXIT_INPUT", "EXIT_INTERRUPTED", "EXIT_MEMORY", "build_parser", "failure_line",
           "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeplab", description="DeepLab semantic segmentation: train, evaluate, "
                                     "predict, export and import the official TF models")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a failure (also DEEPLAB_DEBUG=1), e.g. deeplab --debug train ...")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. Every failure ends in one line on stderr and an exit status (2: the input or a flag,
    3: files or disk, 4: memory, 130: interrupted, 70: a bug); with --debug or DEEPLAB_DEBUG=1 it raises with the
    traceback."""
    import os

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("DEEPLAB_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as e:
        if debug:
            raise
        code, line = failure_line(e)
        print(f"deeplab {args.command}: {line}", file=sys.stderr)
        return code


def run() -> int:
    """The `deeplab` command (console script and ``python -m deeplab``): `main` in a process of its own, so it
    first keeps freed memory for reuse (`deeplab.deploy.fast.retain_freed_memory`; tests call `main` directly)."""
    from ..deploy.fast import retain_freed_memory

    retain_freed_memory()
    return main()


if __name__ == "__main__":
    sys.exit(run())
