"""The command line's one error path: every exception becomes one line and an exit status."""

from __future__ import annotations

# Exit status of each kind of failure (1: the command ran but failed, e.g. a diverged run; 70: a bug, BSD's
# EX_SOFTWARE).
EXIT_INPUT, EXIT_FILES, EXIT_MEMORY, EXIT_INTERRUPTED, EXIT_BUG = 2, 3, 4, 130, 70


# What allocators say when an allocation fails (PyTorch's CPU and CUDA allocators, oneDNN, the C++ runtime, numpy,
# ONNX Runtime, OpenVINO): any of these is the out-of-memory line, whatever the exception's type.
_ALLOCATION_WORDS = ("out of memory", "not enough memory", "cannot allocate memory", "bad_alloc",
                     "failed to allocate", "unable to allocate", "allocation failed", "could not allocate")


# What PyTorch says when the device named by --device cannot be used: only these are blamed on the flag.
_DEVICE_WORDS = ("torch not compiled with cuda", "no cuda gpus are available", "invalid device ordinal",
                 "found no nvidia driver", "cuda driver version is insufficient", "cuda unavailable",
                 "expected one of cpu, cuda", "invalid device string", "no mps device")


def _original(e: BaseException) -> tuple[str, str]:
    """(type name, first message line) of `e`, seen through PyTorch's DataLoader worker wrapper, which re-raises a
    worker's exception as 'Caught X in DataLoader worker process N.' with the worker's traceback as its message."""
    text = str(e)
    first = (text.splitlines() or [""])[0]
    if first.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name, _, message = last.partition(": ")
        return name.rsplit(".", 1)[-1], message
    return type(e).__name__, first


def _raised_by_deeplab(e: BaseException) -> bool:
    """Whether `e` comes from a `raise` statement in deeplab's own code (a refusal written for the user, with the
    fix in its message) rather than from a library call or a mistake in the code (a bug)."""
    import linecache
    from pathlib import Path

    if type(e).__module__.startswith("deeplab"):
        return True
    if str(e).startswith("Caught ") and "Original Traceback" in str(e):
        return "/deeplab/" in str(e).rsplit('File "', 1)[-1].split('"', 1)[0].replace("\\", "/")
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:  # never raised: made to be shown
        return True
    path = Path(tb.tb_frame.f_code.co_filename)
    package = Path(__file__).resolve().parent.parent
    inside = package in path.resolve().parents
    return inside and linecache.getline(str(path), tb.tb_lineno).strip().startswith("raise")


def failure_line(e: BaseException) -> tuple[int, str]:
    """(exit status, one line naming what failed and the fix), for every exception: an expected failure names the
    file or flag; anything else says it is a bug and how to see its traceback."""
    import errno

    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    name, first = _original(e)
    lowered = str(e).lower()
    if isinstance(e, MemoryError) or any(w in lowered for w in _ALLOCATION_WORDS):
        cuda = "cuda" in lowered or "gpu" in lowered
        return EXIT_MEMORY, (f"out of {'GPU ' if cuda else ''}memory: {_asked(str(e))}; lower --batch-size or "
                             "--crop-size (training), or predict large images with --window 513")
    if isinstance(e, (RuntimeError, AssertionError)) and any(w in lowered for w in _DEVICE_WORDS):
        return EXIT_INPUT, f"error: --device: {first}; pick a device this machine has (--device cpu)"
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, FileExistsError, NotADirectoryError,
                                                      IsADirectoryError)) and e.errno is not None:
        where = f"{e.filename}: " if e.filename else ""
        if e.errno == errno.ENOSPC:
            return EXIT_FILES, f"error: {where}no space left on the device; free some or write elsewhere (--out)"
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return EXIT_FILES, f"error: {where}permission denied; write elsewhere (--out) or fix the permissions"
        return EXIT_FILES, f"error: {where}{e.strerror or e}"
    if isinstance(e, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ImportError)):
        return EXIT_INPUT, f"error: {e}"
    if isinstance(e, OSError):  # e.g. PIL's UnidentifiedImageError: the message names the file
        return EXIT_FILES, f"error: {first}"
    if isinstance(e, ValueError) and _raised_by_deeplab(e):
        return EXIT_INPUT, f"error: {first if name != type(e).__name__ else e}"
    return EXIT_BUG, (f"bug: {name}: {first[:300]} -- this is a bug in deeplab, not in your input; please report it "
                      "with the traceback that --debug shows (deeplab --debug COMMAND ...)")


def _asked(message: str) -> str:
    """The size an allocator asked for, as its message states it ('Tried to allocate 2.00 GiB', 'you tried to
    allocate 9663676416 bytes'), or its first line."""
    import re

    found = re.search(r"(?i)tried to allocate ([0-9]+ bytes|[0-9.]+ ?[KMGT]?i?B)", message)
    if found:
        size = found.group(1)
        if size.endswith(" bytes"):
            size = f"{int(size.split()[0]) / 2**30:.2f} GiB"
        return f"an allocation of {size} failed"
    return (message.splitlines() or [""])[0][:160]
