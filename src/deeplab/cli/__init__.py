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


def main(argv: Sequence[str] | None = None, *, whole_process: bool = False) -> int:
    """The command line. Every failure ends in one line on stderr and an exit status (2: the input or a flag,
    3: files or disk, 4: memory, 130: interrupted, 70: a bug); with --debug or DEEPLAB_DEBUG=1 it raises with the
    traceback. `whole_process`: this process runs only this command, so it may configure malloc for it and, after
    the commands in ENDS_AT_ONCE, end as soon as they return (`_end_now`)."""
    import os

    parser = build_parser()
    args = parser.parse_args(argv)
    if whole_process:
        _configure_malloc(args.command)
    debug = args.debug or os.environ.get("DEEPLAB_DEBUG", "") not in ("", "0")
    try:
        code = args.func(args)
    except (Exception, KeyboardInterrupt) as e:
        if debug:
            raise
        code, line = failure_line(e)
        print(f"deeplab {args.command}: {line}", file=sys.stderr)
    if whole_process and args.command in ENDS_AT_ONCE:
        _end_now(code)
    return code


def run() -> int:
    """The `deeplab` command (console script and ``python -m deeplab``): `main` in a process of its own, so it may
    set the process's memory allocator for the command first (`_configure_malloc`) and end the process when the
    command is done (`_end_now`); tests call `main` directly."""
    return main(whole_process=True)


# Commands whose every output is whole and closed when they return: their process ends right then (`_end_now`).
ENDS_AT_ONCE = ("predict", "eval")


def _end_now(code: int) -> None:
    """End the process with exit status `code` without tearing the interpreter down. Freeing torch's and the
    runtimes' modules object by object only delays the exit, by a few tenths of a second in every process (each of
    a torchrun's too). The exit handlers still run (logging's flush, multiprocessing's end of daemonic children);
    threads still running (OpenVINO's usage report, sent on import) are not waited for."""
    import atexit
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def _configure_malloc(command: str) -> None:
    """Every command keeps freed memory for reuse (`deeplab.deploy.fast.retain_freed_memory`); the service, whose
    threads each allocate, also limits malloc's arenas (`limit_malloc_arenas`)."""
    from ..deploy.fast import limit_malloc_arenas, retain_freed_memory

    retain_freed_memory()
    if command == "serve":
        limit_malloc_arenas(2)


if __name__ == "__main__":
    sys.exit(run())
