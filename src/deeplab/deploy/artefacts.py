"""What a runtime builds from a model, kept on disk beside the runtime choice (`deeplab.deploy.choice`), so that a later
process (another run, or the other processes of a torchrun) loads it instead of building it again.

- **What is kept.** For ONNX Runtime the model exported to ONNX; for OpenVINO the same graph as OpenVINO IR (.xml and
  .bin) and, per input shape, the compiled model (OpenVINO's `export_model` blob); for TF Lite the flatbuffer written
  for each input shape. An exported file run by OpenVINO (``--checkpoint model.xml``, an int8 file) has its compiled
  models kept too, under the digest of the file's bytes. Exporting (torch.onnx.export, then OpenVINO's converter) and compiling are most of what a
  process spends preparing a runtime; loading the kept files skips both, and skips importing the exporters too.
- **Keys.** Each entry is a folder, ``CACHE/runtime-artefacts/NAME/``, named after a hash of its key: the model's
  digest (weights and configuration), what the entry is, the versions of deeplab, torch, onnx and the runtimes, and a
  digest of the source of deeplab's models/ and deploy/ (a source tree edited in place has no new version number).
  A compiled model adds the input shape, thread count, precision and the CPU (model and flags of note). Anything that
  differs is another folder, so an entry made by other code, versions or weights is never read.
- **Whole or not at all.** An entry is written into a partial folder, its manifest last (the key and a BLAKE2b digest
  of every file), and renamed into place. A reader takes an entry only when its manifest holds the same key and every
  file has its recorded digest; anything else (missing, partial, corrupt, unreadable) is as if absent, and the caller
  builds as it would without a cache and writes the entry again. A cache folder that cannot be written only costs
  the build next time.

- **Bounded.** Reading an entry marks it used; after writing one, the least recently used entries are removed
  while all of them hold more than MAX_BYTES (the one just written stays), and so are partial folders a killed
  process left more than a day ago. A large model's entries (its graph, twice, and a compiled copy per shape) take
  a few times its weights.

``CACHE`` is `deeplab.deploy.choice.cache_dir()`; deleting ``CACHE/runtime-artefacts`` is always safe.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from .choice import cache_dir, deeplab_version
from .precision import machine_key

ARTEFACTS_VERSION = 1
MANIFEST = "manifest.json"
PACKAGES = ("torch", "onnx", "onnxruntime", "openvino", "ai-edge-litert")  # what an exported graph depends on
MAX_BYTES = 4 << 30  # the entries kept at most, all together; the least recently used go first
STALE_PARTIAL_S = 24 * 3600  # a partial folder this old was left by a process that ended while writing it


@functools.cache
def code_digest() -> str:
    """A digest of the source of the code that builds the graphs (deeplab's models/ and deploy/), read once per
    process."""
    h = hashlib.blake2b(digest_size=16)
    package = Path(__file__).resolve().parents[1]
    for path in sorted([*package.glob("models/**/*.py"), *package.glob("deploy/**/*.py")]):
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def artefact_key(*, digest: str, kind: str, **fields: Any) -> dict[str, Any]:
    """The key of what `kind` ("onnxruntime-graph", "openvino-graph", "tflite-graph", ...) builds from the model of
    `digest` (`choice.model_digest`), with `fields` (layout, shape, ...) that also change it."""
    return {"version": ARTEFACTS_VERSION, "deeplab": deeplab_version(), "code": code_digest(),
            "packages": _versions(), "model": digest, "kind": kind, **fields}


def compiled_key(graph_key: dict[str, Any], *, shape: list[int] | None, threads: int, precision: str) -> dict[str, Any]:
    """The key of a model compiled from the graph of `graph_key` for this CPU, input `shape` (None: dynamic),
    `threads` and `precision`."""
    return {**graph_key, "kind": f"{graph_key['kind']}-compiled", "shape": shape, "threads": threads,
            "precision": precision, "machine": {k: v for k, v in machine_key().items() if k != "runtimes"}}


def entry_path(key: dict[str, Any]) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / "runtime-artefacts" / name


def _file_digest(path: Path) -> str:
    return files_digest([path])


def files_digest(paths: list[Path]) -> str:
    """A digest of the bytes of `paths`, in order (an exported file a user passes stands for the model)."""
    h = hashlib.blake2b(digest_size=16)
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_entry(key: dict[str, Any]) -> Path | None:
    """The folder of the entry stored under `key`, or None: none stored, stored under another key, unreadable, or a
    file missing or not of the digest its manifest records."""
    folder = entry_path(key)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("key") != key or not isinstance(files, dict):
            return None
        if any(_file_digest(folder / name) != digest for name, digest in files.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    with contextlib.suppress(OSError):
        os.utime(folder / MANIFEST)  # used now: the last to be pruned
    return folder


def write_entry(key: dict[str, Any], files: dict[str, bytes | Path]) -> Path | None:
    """Store `files` (name -> bytes, or a file to copy) as the entry for `key`, whole or not at all; returns its
    folder, or None when the cache folder cannot be written. A valid entry written meanwhile by another process is
    kept; an invalid one (`read_entry` refused it) is replaced."""
    folder = entry_path(key)
    partial = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        digests = {}
        for name, content in files.items():
            target = partial / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                shutil.copyfile(content, target)
            digests[name] = _file_digest(target)
        (partial / MANIFEST).write_text(json.dumps({"key": key, "files": digests}, indent=1))
        if read_entry(key) is not None:  # another process stored it first
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(partial, folder)
    except OSError:
        return read_entry(key)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    with contextlib.suppress(OSError):
        prune(folder.parent, keep=folder)
    return folder


def prune(root: Path, *, keep: Path, limit: int | None = None) -> None:
    """Remove the least recently used entries under `root` while they hold more than `limit` bytes (default
    MAX_BYTES), never `keep`; and partial folders older than STALE_PARTIAL_S."""
    limit = MAX_BYTES if limit is None else limit
    now, entries = time.time(), []
    for folder in root.iterdir():
        try:
            if folder.name.startswith("."):
                if now - folder.stat().st_mtime > STALE_PARTIAL_S:
                    shutil.rmtree(folder, ignore_errors=True)
                continue
            size = sum(f.stat().st_size for f in folder.iterdir())
            entries.append(((folder / MANIFEST).stat().st_mtime, size, folder))
        except OSError:  # removed meanwhile by another process, or a folder without a manifest
            continue
    total = sum(size for _, size, _ in entries)
    for _, size, folder in sorted(entries):
        if total <= limit:
            break
        if folder != keep:
            shutil.rmtree(folder, ignore_errors=True)
            total -= size


def cached_bytes(key: dict[str, Any] | None, name: str, build: Callable[[], bytes]) -> bytes:
    """The file `name` of the entry stored under `key`; else `build()`, stored there (`key` None: no cache)."""
    entry = read_entry(key) if key is not None else None
    if entry is not None:
        try:
            return (entry / name).read_bytes()
        except OSError:
            pass
    content = build()
    if key is not None:
        write_entry(key, {name: content})
    return content
