"""`deeplab benchmark`: milliseconds per image of one model on every installed runtime and thread count.

Each (runtime, threads) pair is built once (and checked against the eager model, as `deeplab.deploy.runtimes` does), warmed
up with two runs, then timed in rounds: every round runs each pair once (after 50 ms idle; a call under 0.1 s
after one untimed call and back to back for about 50 ms: `time_in_rounds`), so drift on a shared machine (another
process, the CPU clock) hits all pairs alike instead of whichever was timed last. Reported per pair: the median and
the minimum over the rounds, and images per second from the median, for each precision (float32; bf16 on CPUs with
AMX or AVX512_BF16; int8 when `deeplab quantize` wrote its file beside the checkpoint) with the argmax agreement
with float32 of the reduced ones. Batch 1, a random normalised input. The table starts with the machine line (CPU
model, flags of note, runtime versions).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .export import fixed_input_size
from .precision import SUPPORTED, machine_line, native_bf16
from .runners import EXPORTED_SUFFIXES, FILE_RUNTIMES, load_exported, missing_runtime
from .runtimes import optimize_for_inference, time_in_rounds, torch_only_reason

__all__ = ["benchmark", "format_table", "time_in_rounds"]


def _precisions(requested: Sequence[str] | None, *, int8: bool) -> tuple[str, ...]:
    """The precisions to time: as requested, else float32, bf16 where the CPU runs it natively, int8 with a file."""
    if requested:
        unknown = [p for p in requested if p not in SUPPORTED]
        if unknown:
            raise ValueError(f"--precisions {','.join(requested)}: {unknown[0]!r} is not one of fp32, bf16, int8")
        return tuple(requested)
    return ("fp32",) + (("bf16",) if native_bf16() else ()) + (("int8",) if int8 else ())


def _models(path: str | os.PathLike, runtimes: Sequence[str], threads: Sequence[int], skipped: list[dict],
            precisions: Sequence[str] | None = None):
    from ..models.checkpoint import load
    from .quantize import int8_beside

    suffix = Path(path).suffix.lower()
    exported = suffix in EXPORTED_SUFFIXES
    model = None if exported else load(path)
    int8 = None if exported or missing_runtime("onnxruntime") else int8_beside(path, model)
    for runtime in runtimes:
        why = missing_runtime(runtime)
        if exported and runtime not in FILE_RUNTIMES[suffix]:
            why = f"a {suffix} file runs in {' or '.join(FILE_RUNTIMES[suffix])}"
        elif not exported and runtime not in ("torch", "eager"):
            why = why or torch_only_reason(model)
        if why:
            skipped.append({"runtime": runtime, "skipped": why})
            continue
        for precision in (("file",) if exported else _precisions(precisions, int8=int8 is not None)):
            if precision != "file" and runtime not in SUPPORTED[precision] + (("eager",) if precision == "fp32" else ()):
                continue
            if precision == "int8" and int8 is None:
                skipped.append({"runtime": runtime, "precision": "int8", "skipped": "no int8 file beside the "
                                "checkpoint: deeplab quantize --checkpoint CKPT writes one"})
                continue
            for n in threads:
                if exported:
                    yield runtime, precision, n, load_exported(path, runtime=runtime, threads=n)
                else:
                    yield runtime, precision, n, optimize_for_inference(model, runtime=runtime, precision=precision,
                                                                        threads=n, int8=int8)


def benchmark(
    path: str | os.PathLike, *, runtimes: Sequence[str] = ("torch", "onnxruntime", "openvino", "tflite"),
    threads: Sequence[int] | None = None, size: Sequence[int] | None = None, runs: int = 10, progress: bool = False,
    precisions: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Rows {runtime, precision, threads, size, ms_median, ms_min, images_per_s, agreement} for the model at `path` (a
    checkpoint or an exported file) in each of `precisions` (default: fp32, bf16 where the CPU runs it natively, int8
    when an int8 file is beside the checkpoint), and {runtime, skipped: reason} for each that cannot run here.
    `agreement` is a reduced-precision row's argmax agreement with float32 on the benchmark's input."""
    threads = tuple(threads or sorted({1, torch.get_num_threads()}))
    skipped: list[dict[str, Any]] = []
    entries: dict[tuple[str, str, int], tuple[int, Any]] = {}
    agreement: dict[tuple[str, str, int], float | None] = {}
    x = None
    for runtime, precision, n, model in _models(path, runtimes, threads, skipped, precisions):
        if x is None:
            bands = int(getattr(getattr(model, "config", None), "in_channels", 3))
            x = torch.randn(1, bands, *fixed_input_size(model, size), generator=torch.Generator().manual_seed(0))
        torch.set_num_threads(n)
        with torch.no_grad():
            model(x)  # builds and checks it (an exported-graph runtime is compared with eager on this input)
        entries[(runtime, precision, n)] = (n, lambda m=model: _no_grad(m, x))
        agreement[(runtime, precision, n)] = getattr(model, "agreement", None)
    default = torch.get_num_threads()
    try:
        times = time_in_rounds(entries, runs=runs, progress=progress)
    finally:
        torch.set_num_threads(default)
    rows = []
    for (runtime, precision, n), values in times.items():
        median = statistics.median(values)
        rows.append({"runtime": runtime, "precision": precision, "threads": n, "size": list(x.shape[-2:]),
                     "ms_median": round(median, 2), "ms_min": round(min(values), 2),
                     "images_per_s": round(1000 / median, 2), "rounds": runs, "calls": len(values),
                     "agreement": agreement[(runtime, precision, n)]})
    return rows + skipped


def _no_grad(model, x):
    with torch.no_grad():
        return model(x)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of `benchmark`'s rows, fastest first per thread count; skipped runtimes listed below."""
    timed = sorted((r for r in rows if "ms_median" in r), key=lambda r: (r["threads"], r["ms_median"]))
    lines = [f"{machine_line()}", "",
             "| runtime | precision | threads | input | ms / image (median) | min | images / s | argmax as fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in timed:
        share = "" if r.get("agreement") is None else f"{100 * r['agreement']:.2f}%"
        lines.append(f"| {r['runtime']} | {r.get('precision', 'fp32')} | {r['threads']} | {r['size'][0]}x{r['size'][1]} "
                     f"| {r['ms_median']:.1f} | {r['ms_min']:.1f} | {r['images_per_s']:.1f} | {share} |")
    lines += [f"skipped {r['runtime']}{' ' + r['precision'] if 'precision' in r else ''}: {r['skipped']}"
              for r in rows if "skipped" in r]
    return "\n".join(lines)
