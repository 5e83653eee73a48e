"""Files a reader never sees half of (written through a temporary file and a rename), and the error every reader of
a saved model raises: below both the .pt checkpoint (checkpoint.py) and the model folder (hub.py), which share them."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch


class CheckpointError(ValueError):
    """A file or model folder that is not a deeplab model, or one that does not fit the model asked for."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to `path` through a temp file and a rename: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the mode any new file would get
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise named_os_error(e, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def named_os_error(e: OSError, path: str | os.PathLike) -> OSError:
    """`e` with `path` as its file name when the writer that raised it (torch, PIL, a flush) gave none, so the one-line
    error can say which file could not be written."""
    return e if e.filename is not None else OSError(e.errno, e.strerror or str(e), str(path))


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(file)` on a temporary file beside `path`, then rename it to `path`: a reader, or a crash, sees the
    old file or the new one, never part of one; the temporary file is removed on any failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise named_os_error(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


__all__ = ["CheckpointError", "atomic_save", "named_os_error", "write_atomically"]
