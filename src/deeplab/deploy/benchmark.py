"""`deeplab benchmark`: milliseconds per image of one model on every installed runtime and thread count.

Each (runtime, threads) pair is built once (and checked against the eager model, as `deeplab.deploy.runtimes` does), warmed
up with two runs, then timed in rounds: every round runs each pair once (after 50 ms idle; a call under 0.1 s
after one untimed call and back to back for about 50 ms: `time_in_rounds`), so drift on a shared machine (another
process, the CPU clock) hits all pairs alike instead of whichever was timed last. Reported per pair: the median and
the minimum over the rounds, and images per second from the median. Batch 1, a random normalised input.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .export import fixed_input_size
from .runners import EXPORTED_SUFFIXES, FILE_RUNTIMES, load_exported, missing_runtime
from .runtimes import optimize_for_inference, time_in_rounds, torch_only_reason

__all__ = ["benchmark", "format_table", "time_in_rounds"]


def _models(path: str | os.PathLike, runtimes: Sequence[str], threads: Sequence[int], skipped: list[dict]):
    from ..models.checkpoint import load

    suffix = Path(path).suffix.lower()
    exported = suffix in EXPORTED_SUFFIXES
    model = None if exported else load(path)
    for runtime in runtimes:
        why = missing_runtime(runtime)
        if exported and runtime not in FILE_RUNTIMES[suffix]:
            why = f"a {suffix} file runs in {' or '.join(FILE_RUNTIMES[suffix])}"
        elif not exported and runtime not in ("torch", "eager"):
            why = why or torch_only_reason(model)
        if why:
            skipped.append({"runtime": runtime, "skipped": why})
            continue
        for n in threads:
            if exported:
                yield runtime, n, load_exported(path, runtime=runtime, threads=n)
            else:
                yield runtime, n, optimize_for_inference(model, runtime=runtime, threads=n)


def benchmark(
    path: str | os.PathLike, *, runtimes: Sequence[str] = ("torch", "onnxruntime", "openvino", "tflite"),
    threads: Sequence[int] | None = None, size: Sequence[int] | None = None, runs: int = 10, progress: bool = False,
) -> list[dict[str, Any]]:
    """Rows {runtime, threads, size, ms_median, ms_min, images_per_s} for the model at `path` (a checkpoint or an
    exported file), and {runtime, skipped: reason} for each runtime that cannot run here."""
    threads = tuple(threads or sorted({1, torch.get_num_threads()}))
    skipped: list[dict[str, Any]] = []
    entries: dict[tuple[str, int], tuple[int, Any]] = {}
    x = None
    for runtime, n, model in _models(path, runtimes, threads, skipped):
        if x is None:
            bands = int(getattr(getattr(model, "config", None), "in_channels", 3))
            x = torch.randn(1, bands, *fixed_input_size(model, size), generator=torch.Generator().manual_seed(0))
        torch.set_num_threads(n)
        with torch.no_grad():
            model(x)  # builds and checks it (an exported-graph runtime is compared with eager on this input)
        entries[(runtime, n)] = (n, lambda m=model: _no_grad(m, x))
    default = torch.get_num_threads()
    try:
        times = time_in_rounds(entries, runs=runs, progress=progress)
    finally:
        torch.set_num_threads(default)
    rows = []
    for (runtime, n), values in times.items():
        median = statistics.median(values)
        rows.append({"runtime": runtime, "threads": n, "size": list(x.shape[-2:]), "ms_median": round(median, 2),
                     "ms_min": round(min(values), 2), "images_per_s": round(1000 / median, 2), "rounds": runs,
                     "calls": len(values)})
    return rows + skipped


def _no_grad(model, x):
    with torch.no_grad():
        return model(x)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of `benchmark`'s rows, fastest first per thread count; skipped runtimes listed below."""
    timed = sorted((r for r in rows if "ms_median" in r), key=lambda r: (r["threads"], r["ms_median"]))
    lines = ["| runtime | threads | input | ms / image (median) | min | images / s |", "|---|---|---|---|---|---|"]
    for r in timed:
        lines.append(f"| {r['runtime']} | {r['threads']} | {r['size'][0]}x{r['size'][1]} | {r['ms_median']:.1f} | "
                     f"{r['ms_min']:.1f} | {r['images_per_s']:.1f} |")
    lines += [f"skipped {r['runtime']}: {r['skipped']}" for r in rows if "skipped" in r]
    return "\n".join(lines)
