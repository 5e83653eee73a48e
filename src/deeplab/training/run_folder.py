"""A run folder's files: the lock, the resume state, flushed CSV logs repaired after a crash, atomic small files,
TensorBoard, and torchrun restarts."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..models.checkpoint import check_training_state, export_folder, named_os_error, read_checkpoint


def elastic_restart(
    out: Path, resume: bool, *, echo: Callable[[str], None] | None, main: bool
) -> tuple[bool, bool]:
    """(resume, restarted). torchrun restarts a failed group with the same command (`--max-restarts N`); its workers
    then see TORCHELASTIC_RESTART_COUNT > 0. A restarted run resumes from its last.pt; one killed before its first
    checkpoint starts over in its own folder (config.json names the torchrun run id that wrote it)."""
    count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if count == 0 or resume:
        return resume, False
    say = echo if (echo is not None and main) else (lambda _msg: None)
    if (out / "last.pt").is_file():
        say(f"torchrun restart {count}: resuming from {out / 'last.pt'}")
        return True, False
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    try:
        owner = json.loads((out / "config.json").read_text()).get("torchelastic_run_id")
    except (OSError, ValueError):
        owner = None
    if owner is None or owner != run_id:
        return False, False  # not this group's folder: the usual refusal of an existing run applies
    say(f"torchrun restart {count}: no checkpoint was written yet, starting over in {out}")
    return False, True


# Files that make a folder a run folder: a new run never writes over them.
RUN_FILES = ("last.pt", "best.pt", "best", "config.json", "metrics.json", "log.csv", "val.csv")


def recorded_command(out: Path) -> str | None:
    """The command line that started the run in `out` (its config.json's `command`), kept when the run resumes."""
    try:
        return json.loads((out / "config.json").read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def hardware_line(device: Any, dist: Any) -> str:
    """What the run trained on, for the model card: the GPU's name or the CPU's model, and how many processes."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        from ..deploy.precision import cpu_model

        threads = torch.get_num_threads()
        name = f"{cpu_model()} ({threads} thread{'s' if threads > 1 else ''})"
    return f"{dist.world_size} x {name}" if dist.enabled else name


def best_folder(out: Path, *, card: dict[str, Any]) -> Path | None:
    """best.pt as a model folder, `out/best` (config.json, model.safetensors, the model card with the run's metrics
    and data report, predictions.png): what a run's model is shared as. None when no validation made a best.pt."""
    if not (out / "best.pt").is_file():
        return None
    return export_folder(out / "best.pt", out / "best", card=card)["path"]


def read_resume_state(last_path: Path, resume: bool, *, restarted: bool = False) -> dict[str, Any] | None:
    if resume:
        if not last_path.is_file():
            raise FileNotFoundError(f"--resume: {last_path} does not exist; start a new run without --resume")
        state = read_checkpoint(last_path)
        check_training_state(state, source=str(last_path))
        return state
    if restarted:  # this torchrun group's own folder, killed before its first checkpoint: written over
        return None
    found = [name for name in RUN_FILES if (last_path.parent / name).exists()]
    if found:
        hint = "pass --resume to continue that run" if "last.pt" in found else "it has no last.pt to resume from"
        raise FileExistsError(
            f"{last_path.parent} already holds a run ({', '.join(found)}): {hint}, or choose another --out"
        )
    return None


class RunFolderBusy(FileExistsError):
    """Another process is training in the run folder."""


class RunFolderLock:
    """An exclusive lock on a run folder (`DIR/.lock`, holding the PID) while a run uses it, so two `deeplab train
    --out DIR` never interleave their logs and checkpoints. The lock is the kernel's (flock): a killed run leaves no
    stale lock behind. A folder the lock created is removed again if the run leaves nothing in it."""

    def __init__(self, out: Path) -> None:
        self.created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.path = out, out / ".lock"
        self.file = open(self.path, "a+")
        try:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock (Windows): no lock
            pass
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise RunFolderBusy(
                f"{out} is in use by another deeplab train (PID {holder}); wait for it to finish or choose another --out"
            ) from None
        try:
            self.file.seek(0)
            self.file.truncate()
            self.file.write(f"{os.getpid()}\n")
            self.file.flush()
        except OSError as e:  # a full disk: leave nothing behind
            self.release()
            raise named_os_error(e, self.path) from None

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        try:
            self.file.close()
        except OSError:  # the PID that could not be flushed to a full disk: nothing of it is needed
            pass
        if self.created and not any(self.out.iterdir()):
            self.out.rmdir()


def write_text(path: Path, text: str) -> None:
    """A small text file written through a temporary file and a rename (readable by the group, as umask allows)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _intact_rows(path: Path, keep_below: int) -> tuple[list[dict[str, str]], str | None]:
    """The rows of a run's CSV up to step `keep_below`, and a note when damaged rows were dropped: a write cut off by a
    crash or power loss leaves a partial last line or NUL bytes, which must not stop a resume."""
    import io

    text = path.read_bytes().decode("utf-8", errors="replace")
    clean = text.replace("\x00", "")
    rows, damaged = [], 0
    for row in csv.DictReader(io.StringIO(clean)):
        try:
            step = int(row["step"])
        except (KeyError, TypeError, ValueError):
            damaged += 1
            continue
        if None in row.values() or None in row:  # a short or an overlong row
            damaged += 1
        elif step <= keep_below:
            rows.append(row)
    if damaged or clean != text:
        return rows, (f"{path}: dropped {damaged} damaged row(s) and {len(text) - len(clean)} NUL byte(s) left by an "
                      f"interrupted write; the {len(rows)} intact rows up to step {keep_below} are kept")
    return rows, None


class CsvLog:
    """A CSV file with one row per step (log.csv) or per validation (val.csv), flushed per row; on resume, rows
    after the resumed step are dropped (they are run again)."""

    step_columns = ("step", "epoch", "loss", "lr", "images_per_s", "wait_s", "time")

    def __init__(self, path: Path, columns: tuple[str, ...], *, keep_below: int, enabled: bool) -> None:
        self.file = None
        if not enabled:
            return
        rows, self.repaired = [], None
        if keep_below > 0 and path.exists():
            rows, self.repaired = _intact_rows(path, keep_below)
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=columns, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def write(self, **row: Any) -> None:
        if self.file is None:
            return
        row["time"] = f"{time.time():.3f}"
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: an optional extra
        return None
    return SummaryWriter(str(path))
