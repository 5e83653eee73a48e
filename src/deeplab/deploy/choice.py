"""`auto`'s runtime choice made once per machine and model, and made in paired rounds.

- **Paired rounds.** `fastest_paired` compares the candidates round by round: in each round every candidate ran one
  block, close in time to the others, so a slow stretch of a shared machine slows them all alike. A candidate's
  score is the median over rounds of its time over the round's fastest; the lowest score wins. One noisy round (a
  slow second at the start) moves one ratio, not the decision.
- **A cache per machine.** The choice is stored as a small JSON file in the user's cache folder
  (``$DEEPLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/deeplab``, else ``~/.cache/deeplab``), under a key made of what the
  timing depends on: the CPU model and flags, the runtime versions, deeplab's version, the model's digest (its
  weights and configuration), the input shape, the thread count, and the candidates. A later process with the same
  key builds only the chosen runtime and checks it; anything changed, or ``--retime``, times again. A cache folder
  that cannot be written only costs the timing next time. What the chosen runtime builds from the model (exported
  graph, compiled model) is kept beside the choice (`deeplab.deploy.artefacts`).
- **One process times, the others wait.** Timing is done holding a lock on the model's choice
  (``runtime-choice/NAME.lock``, `choosing`; an advisory ``flock``, released by the system when its holder ends
  however it ends). Processes that start together (torchrun's, or several jobs on one machine) find no choice; the
  first to take the lock builds, times and writes the choice and the artefacts, the others wait (without using a
  core), then read that choice and build the chosen runtime from its artefacts. So they run the same runtime, and
  timing is not disturbed by the others' timing. Without a writable cache folder (or ``fcntl``, as on Windows)
  there is no lock: each process times on its own, as they all did before there was one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .precision import machine_key

CACHE_VERSION = 1


def cache_dir() -> Path:
    """Where choices are kept: $DEEPLAB_CACHE_DIR, else $XDG_CACHE_HOME/deeplab, else ~/.cache/deeplab."""
    if os.environ.get("DEEPLAB_CACHE_DIR"):
        return Path(os.environ["DEEPLAB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deeplab"


def model_digest(model: nn.Module) -> str:
    """A digest of the model's tensors (names, dtypes, shapes, bytes) and configuration: equal for the same weights."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(getattr(model, "config", None)).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def deeplab_version() -> str:
    """The installed deeplab's version ("unknown" when it runs from a tree that was never installed)."""
    try:
        return metadata.version("deeplab")
    except metadata.PackageNotFoundError:
        return "unknown"


def choice_key(*, digest: str, shape: tuple[int, ...], threads: int, candidates: list[str]) -> dict[str, Any]:
    return {"version": CACHE_VERSION, "deeplab": deeplab_version(), **machine_key(), "model": digest, "shape": list(shape),
            "threads": threads, "candidates": sorted(candidates)}


def _path(key: dict[str, Any]) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / "runtime-choice" / f"{name}.json"


def read_choice(key: dict[str, Any]) -> dict[str, Any] | None:
    """The stored choice for `key`, or None (none stored, unreadable, or stored under another key)."""
    try:
        entry = json.loads(_path(key).read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("key") == key and "label" in entry else None


def write_choice(key: dict[str, Any], choice: dict[str, Any]) -> Path | None:
    """Store `choice` under `key` (written whole or not at all); None when the cache folder cannot be written."""
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps({"key": key, **choice, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
        os.replace(partial, path)
    except OSError:
        return None
    return path


@contextlib.contextmanager
def choosing(key: dict[str, Any] | None) -> Iterator[None]:
    """Hold this machine's lock on choosing a runtime for `key`'s model (every shape, thread count and candidate
    list of it) while the block runs; waits while another process holds it. No lock for `key` None, without
    ``fcntl``, or when the cache folder cannot be written."""
    if key is None:
        yield
        return
    name = hashlib.sha256(json.dumps([key["model"], key.get("cpu"), key.get("flags")]).encode()).hexdigest()[:32]
    path = cache_dir() / "runtime-choice" / f"{name}.lock"
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path, "a")  # noqa: SIM115 - held until the block ends
    except (ImportError, OSError):
        yield
        return
    with lock:
        with contextlib.suppress(OSError):  # a file system without locks: no lock
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield


def scores(rounds: dict[str, list[list[float]]]) -> dict[str, float]:
    """Each candidate's median over rounds of (its time in the round / the round's fastest): 1.0 is fastest in every
    round. `rounds[label][r]` holds the ms of the calls of round r."""
    per_round = {label: [statistics.median(calls) for calls in values] for label, values in rounds.items()}
    n = min(len(v) for v in per_round.values())
    ratios: dict[str, list[float]] = {label: [] for label in per_round}
    for r in range(n):
        best = min(v[r] for v in per_round.values())
        for label, v in per_round.items():
            ratios[label].append(v[r] / max(best, 1e-9))
    return {label: statistics.median(r) for label, r in ratios.items()}


def fastest_paired(rounds: dict[str, list[list[float]]]) -> str:
    """The candidate with the lowest paired score (`scores`); equal scores go to the lower median time."""
    s = scores(rounds)
    medians = {label: statistics.median(t for calls in v for t in calls) for label, v in rounds.items()}
    return min(s, key=lambda label: (round(s[label], 6), medians[label]))
