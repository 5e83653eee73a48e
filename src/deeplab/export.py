"""Export to ONNX, TorchScript and torch.export (.pt2), each verified against eager PyTorch before it is trusted.

Every export takes a normalised (N, 3, H, W) float32 batch named `image` and returns (N, K, H, W) `logits` at the
input size, with batch, height and width dynamic. After writing, the file is loaded back with its own runtime
(onnxruntime, torch.jit.load, torch.export.load) and run at two input sizes (by default 257x257 and 193x321: square
and not, both 16k+1 and not); the largest absolute difference from eager logits must stay under `atol` (1e-4), or
`ExportCheckError` is raised and nothing is written (the file is written and checked under a temporary name). Running at a second size is what catches a size frozen into the
graph at export time (the classic failure of adaptive pooling and traced `interpolate` sizes).

ONNX uses the legacy TorchScript-based exporter by default (`dynamo=False`, about 3 s here) with `dynamic_axes`;
`dynamo=True` uses the torch.export-based one (about 25 s). Opset 17 at least (18 with dynamo, its minimum). The
image-pooling branch takes a global mean, not adaptive pooling, so it exports with dynamic sizes. The model's class
names, mean / std, input size and align_corners travel in the file as JSON under the key `deeplab` (ONNX metadata,
TorchScript and .pt2 extra files), so a consumer can preprocess without the checkpoint.
"""

from __future__ import annotations

import inspect
import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .fast import optimize_for_inference

FORMATS = ("onnx", "torchscript", "pt2")
DEFAULT_CHECK_SIZES: tuple[tuple[int, int], ...] = ((257, 257), (193, 321))
MIN_OPSET = 17

__all__ = [
    "DEFAULT_CHECK_SIZES",
    "FORMATS",
    "ExportCheckError",
    "check_export",
    "export_model",
    "export_onnx",
    "export_pt2",
    "export_torchscript",
    "model_metadata",
]


class ExportCheckError(RuntimeError):
    """An exported file whose outputs differ from eager PyTorch (or that its runtime cannot run)."""


def model_metadata(model: nn.Module) -> dict[str, Any]:
    """What a consumer of an exported file needs to feed it: class names and preprocessing (JSON-ready)."""
    pre = getattr(model, "preprocessing", None)
    cfg = getattr(model, "config", None)
    return {
        "class_names": list(getattr(model, "class_names", ()) or ()),
        "mean": list(pre.mean) if pre is not None else None,
        "std": list(pre.std) if pre is not None else None,
        "input_size": list(pre.input_size) if pre is not None and pre.input_size else None,
        "align_corners": bool(getattr(cfg, "align_corners", False)),
        "input": "image: float32 (N, 3, H, W), RGB normalised as (x - mean) / std with x in 0..255",
        "output": "logits: float32 (N, K, H, W), at the input size",
    }


def _example(size: Sequence[int], *, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, int(size[0]), int(size[1]), generator=g)


def _dynamic_shapes(model: nn.Module) -> dict[str, dict[int, Any]]:
    """torch.export's dynamic_shapes for forward's one argument: batch, height and width free."""
    arg = next(iter(inspect.signature(model.forward).parameters))
    dim = torch.export.Dim.DYNAMIC
    return {arg: {0: dim, 2: dim, 3: dim}}


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = MIN_OPSET,
    dynamo: bool = False,
    example_size: Sequence[int] = DEFAULT_CHECK_SIZES[0],
) -> Path:
    """Write `model` as ONNX with dynamic batch, height and width (not verified: `export_model` verifies)."""
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs onnx, onnxruntime and onnxscript: pip install 'deeplab[onnx]'") from None
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _example(example_size)
    with warnings.catch_warnings():
        # The legacy exporter announces its deprecation, and tracing warns that shapes become constants; the
        # two-size check after export is what decides whether any did.
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(
                model, (_example(example_size, batch=2),), str(path), dynamo=True, opset_version=max(opset, 18), input_names=["image"],
                output_names=["logits"], dynamic_shapes=_dynamic_shapes(model), verbose=False,
            )
        else:
            axes = {0: "batch", 2: "height", 3: "width"}
            torch.onnx.export(
                model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["image"],
                output_names=["logits"], dynamic_axes={"image": axes, "logits": axes},
            )
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "deeplab", json.dumps(model_metadata(model))
    onnx.save(proto, str(path))
    return path


def export_torchscript(
    model: nn.Module, path: str | os.PathLike, *, example_size: Sequence[int] = DEFAULT_CHECK_SIZES[0]
) -> Path:
    """Write `model` traced with torch.jit.trace (not verified: `export_model` checks it at a second size)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # TracerWarnings (shapes read as constants) are what the two-size check after export settles; TorchScript's
        # deprecation notice is not news to someone who asked for it.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, _example(example_size), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"deeplab.json": json.dumps(model_metadata(model))})
    return path


def export_pt2(model: nn.Module, path: str | os.PathLike, *, example_size: Sequence[int] = DEFAULT_CHECK_SIZES[0]) -> Path:
    """Write `model` as a torch.export program with dynamic batch, height and width (torch.export.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A batch of 2: torch.export specialises a dimension traced at size 1 to a constant 1.
    program = torch.export.export(model, (_example(example_size, batch=2),), dynamic_shapes=_dynamic_shapes(model))
    torch.export.save(program, str(path), extra_files={"deeplab.json": json.dumps(model_metadata(model))})
    return path


def _runner(path: Path, fmt: str):
    """A function numpy (N, 3, H, W) -> numpy logits, running the exported file with its own runtime."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            loaded = torch.jit.load(str(path), map_location="cpu").eval()
    else:
        loaded = torch.export.load(str(path)).module()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()

    return run


def check_export(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    format: str,
    sizes: Sequence[Sequence[int]] = DEFAULT_CHECK_SIZES,
    atol: float = 1e-4,
) -> dict[str, float]:
    """Run the exported file and eager `model` on the same random inputs at each (H, W) in `sizes` (batch 1 at the
    first size, 2 at the others).

    Returns {"HxW": max abs difference}; raises ExportCheckError naming the file, the size and the difference when
    one exceeds `atol`, or when the runtime fails on a size (e.g. a size frozen into the graph).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose from {list(FORMATS)}")
    path = Path(path)
    run = _runner(path, format)
    diffs: dict[str, float] = {}
    model_device = next(model.parameters()).device
    for k, size in enumerate(sizes):
        x = _example(size, seed=k + 1, batch=1 if k == 0 else 2)  # a second batch size too: batch is dynamic
        with torch.no_grad():
            expected = model(x.to(model_device)).float().cpu().numpy()
        key = f"{int(size[0])}x{int(size[1])}"
        try:
            got = run(x.numpy())
        except Exception as exc:  # any runtime failure means the export is unusable at this size
            raise ExportCheckError(f"{path}: the exported {format} model fails at {key} ({type(exc).__name__}: "
                                   f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''})") from exc
        if got.shape != expected.shape:
            raise ExportCheckError(
                f"{path}: the exported {format} model returns shape {got.shape} at {key}, eager {expected.shape}; "
                "a size was frozen into the graph at export time"
            )
        diffs[key] = float(np.abs(got.astype(np.float64) - expected).max())
        if not diffs[key] <= atol:  # also catches NaN
            raise ExportCheckError(
                f"{path}: the exported {format} model differs from eager PyTorch by {diffs[key]:.3g} at {key} "
                f"(allowed {atol:g}); the export is wrong, do not use it (report the model config and torch version)"
            )
    return diffs


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str,
    sizes: Sequence[Sequence[int]] = DEFAULT_CHECK_SIZES,
    atol: float = 1e-4,
    opset: int = MIN_OPSET,
    dynamo: bool = False,
    fold_bn: bool = True,
) -> dict[str, Any]:
    """Export `model` (in eval mode, on CPU, float32) to `path` and verify it at every size in `sizes`.

    Returns {"path", "format", "max_abs_diff": {"HxW": diff}, "seconds"}. On a failed check nothing is written at
    `path` and ExportCheckError is raised. `opset` and `dynamo` apply to ONNX only. With `fold_bn` the exported graph has its
    BatchNorms folded into the convolutions (`deeplab.fast`); it is still checked against the unfolded eager model.
    Padding-only taps are not skipped in an export: that is decided per input size, and the graph serves every size.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose from {list(FORMATS)}")
    if len(sizes) < 2:
        raise ValueError(f"check at two sizes at least (got {list(sizes)}), so a size frozen into the graph shows")
    cfg = getattr(model, "config", None)
    if getattr(cfg, "pointrend", False) and len({tuple(int(v) for v in size) for size in sizes}) > 1:
        raise ValueError(
            "a PointRend model exports at one fixed input size: its subdivision schedule (how many 2x steps, how many "
            "points each) is computed from the input size while tracing, so the graph holds it as constants. Pass the "
            f"size you will run at twice, e.g. --check-sizes 513x513,513x513 (got {[list(s) for s in sizes]})"
        )
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("export a model on the CPU: load it with deeplab.load(path), which maps to the CPU")
    started = time.perf_counter()
    path = Path(path)
    was_training = model.training
    model.eval()
    graph = optimize_for_inference(model, channels_last=False, skip_taps=False, prepacked_shapes=0) if fold_bn else model
    # Written and checked under a temporary name, renamed only once it passes: a failed check, a full disk or a
    # crash never leaves a file at `path` (nor replaces one that was there).
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        if format == "onnx":
            export_onnx(graph, partial, opset=opset, dynamo=dynamo, example_size=sizes[0])
        elif format == "torchscript":
            export_torchscript(graph, partial, example_size=sizes[0])
        else:
            export_pt2(graph, partial, example_size=sizes[0])
        try:
            diffs = check_export(partial, model, format=format, sizes=sizes, atol=atol)
        except ExportCheckError as e:  # name the file the user asked for
            raise ExportCheckError(str(e).replace(str(partial), str(path))) from None
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
        model.train(was_training)
    return {"path": str(path), "format": format, "max_abs_diff": diffs, "seconds": time.perf_counter() - started}
