"""Export to ONNX, OpenVINO IR, TorchScript, torch.export (.pt2) and TF Lite, each verified against eager PyTorch
before it is trusted.

Every export takes a normalised (N, C, H, W) float32 batch named `image` (C the model's bands, 3 for RGB) and returns (N, K, H, W) `logits` at the
input size, with batch, height and width dynamic. After writing, the file is loaded back with its own runtime
(onnxruntime, torch.jit.load, torch.export.load) and run at two input sizes (by default 257x257 and 193x321: square
and not, both 16k+1 and not); the largest absolute difference from eager logits, divided by the range of those logits
(max - min), must stay under `rtol` (1e-4; an absolute bound fails large models whose logits reach 100 and more), or
`ExportCheckError` is raised and nothing is written (the file is written and checked under a temporary name). Running at a second size is what catches a size frozen into the
graph at export time (the classic failure of adaptive pooling and traced `interpolate` sizes).

ONNX uses the legacy TorchScript-based exporter by default (`dynamo=False`, about 3 s here) with `dynamic_axes`;
`dynamo=True` uses the torch.export-based one (about 25 s). Opset 17 at least (18 with dynamo, its minimum). The
image-pooling branch takes a global mean, not adaptive pooling, so it exports with dynamic sizes. The model's class
names, mean / std, input size and align_corners travel in the file as JSON under the key `deeplab` (ONNX metadata,
TorchScript and .pt2 extra files, the TF Lite metadata table), so a consumer can preprocess without the checkpoint.

TF Lite files (`deeplab.deploy.litert`) are static: one input size (`input_size`, default the model's fixed input size,
else 513x513), batch 1, NHWC image in and NHWC logits out; they are checked at that size only.
"""

from __future__ import annotations

import copy
import functools
import inspect
import io
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.checkpoint import named_os_error
from .fast import optimize_for_inference

FORMATS = ("onnx", "openvino", "torchscript", "pt2", "tflite")
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


def model_metadata(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a consumer of an exported file needs to feed it and read its output (JSON-ready): class names and
    palette, preprocessing, input size, align_corners, the model's config; `extra` (e.g. the training run's
    `train_config`, or how an int8 file was calibrated) is added as is."""
    from ..data.palettes import model_palette

    pre = getattr(model, "preprocessing", None)
    cfg = getattr(model, "config", None)
    names = list(getattr(model, "class_names", ()) or ())
    return {
        "format": "deeplab-export/1",
        "class_names": names,
        "palette": [list(map(int, rgb)) for rgb in model_palette(model).colors[: len(names)]] if names else None,
        **({"class_colors": [list(c) for c in model.class_colors]} if getattr(model, "class_colors", None) else {}),
        **({"class_values": list(model.class_values)} if getattr(model, "class_values", None) else {}),
        "mean": list(pre.mean) if pre is not None else None,
        "std": list(pre.std) if pre is not None else None,
        "input_size": list(pre.input_size) if pre is not None and pre.input_size else None,
        "align_corners": bool(getattr(cfg, "align_corners", False)),
        "input": (f"image: float32 (N, {getattr(cfg, 'in_channels', 3)}, H, W), "
                  + ("RGB normalised as (x - mean) / std with x in 0..255" if getattr(cfg, "in_channels", 3) == 3 else
                     "each band normalised as (x - mean) / std in the imagery's own units")),
        "output": "logits: float32 (N, K, H, W), at the input size",
        "activations_rounded_to_uint8": bool(getattr(model, "activation_rounding", None)),
        "model_config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
        **(extra or {}),
    }


def _bands(model: nn.Module) -> int:
    """The model's input bands (3 for RGB; `config.in_channels`)."""
    return int(getattr(getattr(model, "config", None), "in_channels", 3))


def _example(size: Sequence[int], *, seed: int = 0, batch: int = 1, bands: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, bands, int(size[0]), int(size[1]), generator=g)


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
    metadata: dict[str, Any] | None = None,
    output_layout: str = "NCHW",
) -> Path:
    """Write `model` as ONNX with dynamic batch, height and width (not verified: `export_model` verifies);
    `metadata` adds to `model_metadata(model)` under the key `deeplab`. `output_layout="NHWC"` gives logits
    (N, H, W, K) (see `nhwc_logits`), recorded in the metadata as `output_layout`."""
    if output_layout not in ("NCHW", "NHWC"):
        raise ValueError(f"output_layout={output_layout!r}: use 'NCHW' or 'NHWC'")
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs onnx, onnxruntime and onnxscript: pip install 'deeplab[onnx]'") from None
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _example(example_size, bands=_bands(model))
    with warnings.catch_warnings():
        # The legacy exporter announces its deprecation, and tracing warns that shapes become constants; the
        # two-size check after export is what decides whether any did.
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(
                model, (_example(example_size, batch=2, bands=_bands(model)),), str(path), dynamo=True, opset_version=max(opset, 18), input_names=["image"],
                output_names=["logits"], dynamic_shapes=_dynamic_shapes(model), verbose=False,
            )
        else:
            axes = {0: "batch", 2: "height", 3: "width"}
            torch.onnx.export(
                model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["image"],
                output_names=["logits"], dynamic_axes={"image": axes, "logits": axes},
            )
    proto = onnx.load(str(path))
    extra = dict(metadata or {})
    if output_layout == "NHWC":
        nhwc_logits(proto)
        extra["output_layout"] = "NHWC"
    entry = proto.metadata_props.add()
    entry.key, entry.value = "deeplab", json.dumps(model_metadata(model, extra))
    onnx.save(proto, str(path))
    return path


def nhwc_logits(proto: Any) -> None:
    """Make an exported graph's logits (N, H, W, K), in place: its last upsampling runs on NHWC data.

    ONNX Runtime's bilinear Resize on NHWC data is vectorised over channels (1.6 ms against 3.4 ms NCHW for 21
    classes 33x33 -> 257x257, one thread here). So the final Resize gets a Transpose of its small input and its sizes
    (or scales) permuted; a graph whose output is not a Resize gets a Transpose at the end. For ONNX Runtime only:
    OpenVINO picks a slow kernel for such a Resize (25 ms here) and gets NHWC logits from its output tensor's layout
    instead (`runtimes.openvino_runner`).
    """
    from onnx import TensorProto, helper

    graph = proto.graph
    output = graph.output[0]
    last = next(node for node in graph.node if output.name in node.output)
    perm = [0, 2, 3, 1]
    if last.op_type == "Resize":
        transposed = f"{last.input[0]}_nhwc"
        nodes = [helper.make_node("Transpose", [last.input[0]], [transposed], perm=perm)]
        last.input[0] = transposed
        index = f"{output.name}_nhwc_order"
        graph.initializer.append(helper.make_tensor(index, TensorProto.INT64, [4], perm))
        for i in (2, 3):  # scales, sizes: whichever is given
            if len(last.input) > i and last.input[i]:
                nodes.append(helper.make_node("Gather", [last.input[i], index], [f"{last.input[i]}_nhwc"], axis=0))
                last.input[i] = f"{last.input[i]}_nhwc"
        at = list(graph.node).index(last)
        for offset, node in enumerate(nodes):
            graph.node.insert(at + offset, node)
    else:
        inner = f"{output.name}_nchw"
        for node in graph.node:
            node.output[:] = [inner if name == output.name else name for name in node.output]
        graph.node.append(helper.make_node("Transpose", [inner], [output.name], perm=perm))
    dims = output.type.tensor_type.shape.dim
    if len(dims) == 4:
        nchw = [copy.deepcopy(d) for d in dims]
        for d, j in zip(dims, perm):
            d.CopyFrom(nchw[j])


def export_openvino(
    model: nn.Module, path: str | os.PathLike, *, opset: int = MIN_OPSET,
    example_size: Sequence[int] = DEFAULT_CHECK_SIZES[0], metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as OpenVINO IR (`path` .xml plus the weights in the .bin beside it), fp32, dynamic batch, height
    and width, converted from the ONNX export; the metadata goes in the IR's rt_info under `deeplab`."""
    try:
        import openvino as ov
    except ImportError:
        raise ImportError("OpenVINO export needs openvino: pip install 'deeplab[openvino]'") from None
    path = Path(path)
    if path.suffix.lower() != ".xml":
        raise ValueError(f"--out {path}: an OpenVINO IR file ends in .xml (its weights go to the .bin beside it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_path = path.with_name(f".{path.stem}.tmp.onnx")
    try:
        export_onnx(model, onnx_path, opset=opset, example_size=example_size, metadata=metadata)
        ov_model = ov.convert_model(str(onnx_path))
    finally:
        onnx_path.unlink(missing_ok=True)
    ov_model.set_rt_info(json.dumps(model_metadata(model, metadata)), ["deeplab"])
    ov.save_model(ov_model, str(path), compress_to_fp16=False)
    return path


def export_tflite(
    model: nn.Module, path: str | os.PathLike, *, input_size: Sequence[int], metadata: dict[str, Any] | None = None,
    fold_bn: bool = True,
) -> Path:
    """Write `model` as a TF Lite flatbuffer for one input size (TF Lite graphs are static): NHWC float32 image
    (1, H, W, 3) in, NHWC logits (1, H, W, K) out (`deeplab.deploy.litert`); the metadata, with that input size, goes in
    the file's metadata table under `deeplab`."""
    from .litert import missing, tflite_bytes

    why = missing()
    if why:
        raise ImportError(f"TF Lite export: {why}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = (int(v) for v in input_size)
    meta = model_metadata(model, {
        **(metadata or {}), "input_size": [h, w], "input_layout": "NHWC", "output_layout": "NHWC",
        "input": f"image: float32 (1, {h}, {w}, {_bands(model)}) NHWC, normalised as (x - mean) / std per band",
        "output": f"logits: float32 (1, {h}, {w}, K) NHWC",
    })
    path.write_bytes(tflite_bytes(model, (1, _bands(model), h, w), metadata=meta, fold_bn=fold_bn))
    return path


def export_torchscript(
    model: nn.Module, path: str | os.PathLike, *, example_size: Sequence[int] = DEFAULT_CHECK_SIZES[0],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `model` traced with torch.jit.trace (not verified: `export_model` checks it at a second size)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # TracerWarnings (shapes read as constants) are what the two-size check after export settles; TorchScript's
        # deprecation notice is not news to someone who asked for it.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, _example(example_size, bands=_bands(model)), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={"deeplab.json": json.dumps(model_metadata(model, metadata))})
    # Written by Python, not by torch's C++ writer, which aborts the process on a full disk.
    path.write_bytes(buffer.getvalue())
    return path


def export_pt2(model: nn.Module, path: str | os.PathLike, *, example_size: Sequence[int] = DEFAULT_CHECK_SIZES[0],
               metadata: dict[str, Any] | None = None) -> Path:
    """Write `model` as a torch.export program with dynamic batch, height and width (torch.export.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A batch of 2: torch.export specialises a dimension traced at size 1 to a constant 1.
    program = torch.export.export(model, (_example(example_size, batch=2, bands=_bands(model)),),
                                  dynamic_shapes=_dynamic_shapes(model))
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={"deeplab.json": json.dumps(model_metadata(model, metadata))})
    path.write_bytes(buffer.getvalue())  # Python's write: a full disk raises instead of aborting in C++
    return path


def fixed_input_size(model: nn.Module, input_size: Sequence[int] | None = None) -> tuple[int, int]:
    """`input_size` when given, else the model's fixed input size (its preprocessing), else 513x513."""
    if input_size is None:
        pre = getattr(model, "preprocessing", None)
        input_size = pre.input_size if pre is not None and pre.input_size else (513, 513)
    return int(input_size[0]), int(input_size[1])


def _runner(path: Path, fmt: str):
    """A function numpy (N, C, H, W) -> numpy logits, running the exported file with its own runtime."""
    if fmt in ("onnx", "openvino", "tflite"):
        from .runners import RUNNERS, read_metadata

        layout = read_metadata(path).get("output_layout", "NCHW")
        runtime = {"onnx": "onnxruntime", "openvino": "openvino", "tflite": "tflite"}[fmt]
        run, out_layout = RUNNERS[runtime](path, threads=torch.get_num_threads(), layout=layout)
        return (lambda x: run(x).transpose(0, 3, 1, 2)) if out_layout == "NHWC" else run
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
    rtol: float = 1e-4,
) -> dict[str, float]:
    """Run the exported file and eager `model` on the same random inputs at each (H, W) in `sizes` (batch 1 at the
    first size, 2 at the others).

    Returns {"HxW": max abs difference / range of the eager logits}; raises ExportCheckError naming the file, the
    size and the difference when one exceeds `rtol`, or when the runtime fails on a size (e.g. a size frozen into the
    graph).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose from {list(FORMATS)}")
    path = Path(path)
    run = _runner(path, format)
    diffs: dict[str, float] = {}
    model_device = next(model.parameters()).device
    for k, size in enumerate(sizes):
        x = _example(size, seed=k + 1, batch=1 if k == 0 else 2, bands=_bands(model))  # a second batch size too
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
        spread = max(float(expected.max() - expected.min()), 1e-12)
        diffs[key] = float(np.abs(got.astype(np.float64) - expected).max()) / spread
        if not diffs[key] <= rtol:  # also catches NaN
            raise ExportCheckError(
                f"{path}: the exported {format} model differs from eager PyTorch by {diffs[key]:.3g} of the logits' "
                f"range at {key} (allowed {rtol:g}); the export is wrong, do not use it (report the model config and "
                "torch version)"
            )
    return diffs


def _write(graph: nn.Module, path: Path, *, format: str, opset: int, dynamo: bool, example_size: Sequence[int],
           metadata: dict[str, Any] | None = None, output_layout: str = "NCHW") -> None:
    if format == "onnx":
        export_onnx(graph, path, opset=opset, dynamo=dynamo, example_size=example_size, metadata=metadata,
                    output_layout=output_layout)
    elif format == "openvino":
        export_openvino(graph, path, opset=opset, example_size=example_size, metadata=metadata)
    elif format == "tflite":
        export_tflite(graph, path, input_size=example_size, metadata=metadata, fold_bn=False)  # `graph` is folded
    elif format == "torchscript":
        export_torchscript(graph, path, example_size=example_size, metadata=metadata)
    else:
        export_pt2(graph, path, example_size=example_size, metadata=metadata)


def _remove(path: Path, format: str) -> None:
    path.unlink(missing_ok=True)
    if format == "openvino":  # its weights file
        path.with_suffix(".bin").unlink(missing_ok=True)


def _rounding_ops(path: Path, format: str) -> int:
    """How many activation roundings the exported file holds (ONNX QuantizeLinear, TorchScript / torch.export
    fake_quantize calls)."""
    if format == "onnx":
        import onnx

        return sum(node.op_type == "QuantizeLinear" for node in onnx.load(str(path)).graph.node)
    if format == "openvino":
        import openvino as ov

        return sum(op.get_type_name() == "FakeQuantize" for op in ov.Core().read_model(str(path)).get_ops())
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            graph = torch.jit.load(str(path), map_location="cpu").inlined_graph
        return sum(node.kind() == "aten::fake_quantize_per_tensor_affine" for node in graph.nodes())
    program = torch.export.load(str(path))
    return sum("fake_quantize_per_tensor_affine" in str(node.target) for node in program.graph.nodes)


def _check_rounded(
    path: Path,
    model: nn.Module,
    graph: nn.Module,
    *,
    write: Callable[[nn.Module, Path], None],
    format: str,
    sizes: Sequence[Sequence[int]],
    rtol: float,
) -> dict[str, float]:
    """Verify the export of a model that rounds its activations. Rounding makes the function a staircase, on which
    two runtimes' 1e-6 float differences move whole steps (random inputs: 6-22% of the argmax), so the numbers are
    checked on the model without rounding, exported the same way, with `rtol`; the file itself must run at every
    size with the right shape and hold every rounding of the model's table."""
    from ..models.activation_rounding import without_activation_rounding

    twin_path = path.with_name(f"{path.stem}.float{path.suffix}")
    try:
        write(without_activation_rounding(graph), twin_path)
        diffs = check_export(twin_path, without_activation_rounding(model), format=format, sizes=sizes, rtol=rtol)
    except ExportCheckError as e:
        raise ExportCheckError(f"{str(e).replace(str(twin_path), str(path))} (checked without activation rounding)") from None
    finally:
        _remove(twin_path, format)
    run = _runner(path, format)
    for k, size in enumerate(sizes):
        x = _example(size, seed=k + 1, batch=1 if k == 0 else 2, bands=_bands(model))
        got = run(x.numpy())
        if got.shape != (x.shape[0], model.config.num_classes, *x.shape[2:]):
            raise ExportCheckError(f"{path}: the exported {format} model returns shape {got.shape} at {size}")
    found, expected = _rounding_ops(path, format), len(model.activation_rounding)
    if found != expected:
        raise ExportCheckError(
            f"{path}: the exported {format} model rounds {found} activations where the model rounds {expected}; "
            "the export is wrong, do not use it (report the model config and torch version)"
        )
    return diffs


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str,
    sizes: Sequence[Sequence[int]] = DEFAULT_CHECK_SIZES,
    rtol: float = 1e-4,
    opset: int = MIN_OPSET,
    dynamo: bool = False,
    fold_bn: bool = True,
    metadata: dict[str, Any] | None = None,
    output_layout: str = "NCHW",
    input_size: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Export `model` (in eval mode, on CPU, float32) to `path` and verify it at every size in `sizes`.

    Returns {"path", "format", "max_rel_diff": {"HxW": max abs difference / logit range}, "seconds"}. On a failed check nothing is written at
    `path` and ExportCheckError is raised. `opset` and `dynamo` apply to ONNX only. With `fold_bn` the exported graph has its
    BatchNorms folded into the convolutions (`deeplab.deploy.fast`); it is still checked against the unfolded eager model.
    Padding-only taps are not skipped in an export: that is decided per input size, and the graph serves every size.
    `metadata` adds to what the file carries (`model_metadata`). OpenVINO IR (`format="openvino"`) is written as
    `path` (.xml) and the .bin beside it. `output_layout="NHWC"` (ONNX only) gives (N, H, W, K) logits, upsampled
    NHWC, which ONNX Runtime does about twice as fast (`nhwc_logits`). `format="tflite"` writes a static graph for
    `input_size` (default: the model's fixed input size, else 513x513), checked at that size only.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose from {list(FORMATS)}")
    if output_layout != "NCHW" and format != "onnx":
        raise ValueError(f"--nhwc-logits applies to --format onnx, not {format}")
    if format == "tflite":
        sizes = (fixed_input_size(model, input_size),)  # a static graph: checked at the one size it runs at
    elif input_size is not None:
        raise ValueError(f"--input-size applies to --format tflite (a {format} file takes any input size)")
    elif len(sizes) < 2:
        raise ValueError(f"check at two sizes at least (got {list(sizes)}), so a size frozen into the graph shows")
    cfg = getattr(model, "config", None)
    if getattr(cfg, "pointrend", False) and len({tuple(int(v) for v in size) for size in sizes}) > 1:
        raise ValueError(
            "a PointRend model exports at one fixed input size: its subdivision schedule (how many 2x steps, how many "
            "points each) is computed from the input size while tracing, so the graph holds it as constants. Pass the "
            f"size you will run at twice, e.g. --check-sizes 513x513,513x513 (got {[list(s) for s in sizes]})"
        )
    if format in ("pt2", "tflite") and getattr(model, "activation_rounding", None):
        raise ValueError(
            "this model rounds its activations as its uint8 .tflite file does, and torch.export cannot trace that "
            "rounding (fake_quantize has no meta kernel); export it with --format onnx or torchscript, or convert the "
            ".tflite again with --float-activations for a plain float model"
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
    write = functools.partial(_write, format=format, opset=opset, dynamo=dynamo, example_size=sizes[0],
                              metadata=metadata, output_layout=output_layout)
    try:
        write(graph, partial)
        try:
            if getattr(model, "activation_rounding", None):
                diffs = _check_rounded(partial, model, graph, write=write, format=format, sizes=sizes, rtol=rtol)
            else:
                diffs = check_export(partial, model, format=format, sizes=sizes, rtol=rtol)
        except ExportCheckError as e:  # name the file the user asked for
            raise ExportCheckError(str(e).replace(str(partial), str(path))) from None
        if format == "openvino":  # the weights file first: an .xml is never left without its .bin
            os.replace(partial.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(partial, path)
    except OSError as e:  # a full disk, a read-only folder: name the file the user asked for
        raise named_os_error(OSError(e.errno, e.strerror or str(e)), path) from None
    finally:
        _remove(partial, format)
        model.train(was_training)
    return {"path": str(path), "format": format, "max_rel_diff": diffs, "seconds": time.perf_counter() - started}
