"""Which outputs of `deeplab predict` are complete, so that a rerun over the same inputs and output folder skips them.

One small JSON record per input, `OUT/.deeplab-predict/NAME.json` (NAME the input's output name, folders mirrored),
holding what the outputs depend on and what was written:

    {"input": "tiles/a.jpg", "input_bytes": 48213, "input_mtime_ns": 1733..., "run": {"model": DIGEST,
     "options": {...}}, "outputs": {"a.png": 912, "a_overlay.png": 30511}}

* **When it is written.** Every output file is written under a temporary name and renamed when whole
  (`deeplab.models.checkpoint.write_atomically`), and the record only after all of an input's outputs exist; a
  record about to be redone is removed first. A process killed at any moment therefore leaves either a record whose
  outputs are all whole, or no record (the input is predicted again).
* **When an input counts as done**: its record reads, its `run` equals this run's (the model's digest and every
  option that changes the output), the input file has the recorded size and modification time, and every recorded
  output exists with the recorded size. Anything else (a partial or stale output, another checkpoint, --probs added)
  redoes the input. The runtime and thread count are not part of the key: the float32 runtimes agree to 1e-4 of the
  logit range (`deeplab.deploy.runtimes`); `precision` is.
* **Several writers.** Each input has a record of its own and each input is predicted by one process
  (`deeplab predict` under torchrun shares the inputs out), so no two processes write one file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from ..models.checkpoint import write_atomically

RECORDS = ".deeplab-predict"  # the folder of records under --out

__all__ = ["RECORDS", "done_outputs", "forget", "model_id", "record_path", "run_key", "write_record"]

# InferenceOptions fields that do not change what is written: how fast it runs, not what it computes.
_NOT_IN_KEY = ("runtime", "threads", "retime")


def run_key(model: nn.Module, options: Any, **settings: Any) -> dict[str, Any]:
    """What a prediction's outputs depend on, as plain JSON data: the model's digest, the inference options (an
    `InferenceOptions`) but those of speed alone, and `settings` (output kinds, tiling, ...)."""
    from dataclasses import asdict

    opts = {k: v for k, v in asdict(options).items() if k not in _NOT_IN_KEY}
    # Through JSON and back: tuples become lists, as a record read from disk holds them.
    return json.loads(json.dumps({"model": model_id(model), "options": {**opts, **settings}}, default=str))


def model_id(model: nn.Module) -> str:
    """A digest of the model: its tensors and configuration (`deeplab.deploy.choice.model_digest`), or for an
    exported graph run by a runtime (no tensors in torch), the bytes of its file."""
    from ..deploy.choice import model_digest

    if next(iter(model.state_dict().values()), None) is not None:
        return model_digest(model)
    source = getattr(model, "source", None)
    h = hashlib.blake2b(repr(getattr(model, "config", None)).encode(), digest_size=16)
    if source and Path(source).is_file():
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        h.update(repr(sorted(getattr(model, "metadata", {}).items())).encode())
    return h.hexdigest()


def record_path(out: Path, name: str) -> Path:
    return Path(out) / RECORDS / f"{name}.json"


def _stamp(path: Path) -> dict[str, int]:
    st = Path(path).stat()
    return {"input_bytes": st.st_size, "input_mtime_ns": st.st_mtime_ns}


def done_outputs(out: Path, name: str, source: Path, run: dict[str, Any]) -> list[Path] | None:
    """The outputs of input `source` (output name `name`) when its record says they are complete and were made by
    `run` from the file as it is now; None when it must be predicted (again)."""
    try:
        record = json.loads(record_path(out, name).read_text())
        if record.get("run") != run or {k: record.get(k) for k in ("input_bytes", "input_mtime_ns")} != _stamp(source):
            return None
        outputs = [(Path(out) / rel, size) for rel, size in record["outputs"].items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no record, a stale one, or one from another version: predict it again
    for path, size in outputs:
        try:
            if path.stat().st_size != size:
                return None
        except OSError:
            return None
    return [path for path, _ in outputs]


def forget(out: Path, name: str) -> None:
    """Remove the record of `name` before its outputs are rewritten: a kill in between leaves no record."""
    record_path(out, name).unlink(missing_ok=True)


def write_record(out: Path, name: str, source: Path, run: dict[str, Any], outputs: list[Path]) -> Path:
    """Record that every file of `outputs` (all existing, whole) was made by `run` from `source` as it is now."""
    out = Path(out)
    record = {"input": str(source), **_stamp(source), "run": run,
              "outputs": {p.relative_to(out).as_posix(): p.stat().st_size for p in outputs}}
    path = record_path(out, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=1).encode()
    return write_atomically(path, lambda f: f.write(text))
