"""Post-training static int8 quantization: an ONNX file that ONNX Runtime (or OpenVINO) runs in int8.

`quantize_model(model, images, path)` exports the model to ONNX (BatchNorm folded), runs it on the calibration
images (normalised with the model's preprocessing, at the size inference will use), records each activation's
range (min / max), and writes the graph in QDQ form: weights int8 per output channel (symmetric), activations
uint8 per tensor (asymmetric), biases int32. ONNX Runtime fuses each QuantizeLinear -> op -> DequantizeLinear
group into an int8 kernel (QLinearConv and friends), which is where the speed comes from.

Kept in float, because 8 bits do not serve them well:

- **The image-pooling branch** (global mean, 1x1 conv, ReLU, and its share of the ASPP projection, which the export
  computes once per image: `deeplab.deploy.fast.PooledProjectionASPP`): one value per channel for the whole image from a
  mean over every pixel; it costs nothing and its rounding would shift every pixel's logits alike.
- **The classifier's output and the last upsampling**: the logits are upsampled 4-16x bilinearly and then
  compared across classes; rounding them to 256 levels before that moves the argmax at every boundary. The
  classifier convolution reads its quantized input and computes in float (a few thousand multiply-adds per pixel).

The file carries the model's metadata (as every export) plus `int8`: the calibration images' count and source,
which nodes stayed in float, the quantization scheme, the float model's digest (`deeplab.deploy.choice.model_digest`)
and the measured agreement, so `deeplab predict --checkpoint model-int8.onnx` runs it with nothing else. Written
beside its checkpoint as NAME.int8.onnx (`int8_path`, `deeplab quantize`'s default), it is found by `int8_beside`
when the checkpoint is loaded for inference, and `--precision auto` considers it (`deeplab.deploy.runtimes`). Accuracy is measured, not assumed: `deeplab eval --checkpoint model-int8.onnx` scores it as any
checkpoint, and `quantize_model` reports its argmax agreement with the float model on held-out images.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.checkpoint import named_os_error
from ..models.hub import INT8_FILE

__all__ = ["float_nodes", "int8_beside", "int8_path", "quantize_model"]

INT8_SUFFIX = ".int8.onnx"


def int8_path(checkpoint: str | os.PathLike) -> Path:
    """Where `deeplab quantize` writes a checkpoint's int8 file by default: beside it, NAME.int8.onnx; for a model
    folder, inside it (DIR/model.int8.onnx), so it travels with the folder."""
    path = Path(checkpoint)
    if path.is_dir():
        return path / INT8_FILE
    return path.with_name(path.stem + INT8_SUFFIX)


def int8_beside(checkpoint: str | os.PathLike, model: nn.Module) -> Path | None:
    """The int8 file beside `checkpoint` (`int8_path`) when it was made from these weights (its recorded digest
    equals `model`'s), else None; a file made from other weights is named in a warning and left unused."""
    path = int8_path(checkpoint)
    if not path.is_file():
        return None
    from .choice import model_digest
    from .runners import read_metadata

    try:
        recorded = (read_metadata(path).get("int8") or {}).get("model_digest")
    except Exception:  # noqa: BLE001 - onnx missing or an unreadable file: not an int8 candidate
        return None
    if recorded != model_digest(model):
        warnings.warn(f"{path}: made from other weights than {checkpoint} (or by an older deeplab); not used. Make it "
                      f"again: deeplab quantize --checkpoint {checkpoint}", stacklevel=2)
        return None
    return path

# Node-name prefixes of what stays in float (the legacy ONNX exporter names nodes after the module path).
FLOAT_SCOPES = ("/aspp/pooling/", "/aspp/project_pool/", "/aspp/Add")


def float_nodes(graph) -> list[str]:
    """The nodes of an exported DeepLab ONNX graph that stay in float (see the module docstring): the image-pooling
    branch and the last Resize (logits to the input size)."""
    names = [n.name for n in graph.node if n.name.startswith(FLOAT_SCOPES)]
    resizes = [n for n in graph.node if n.op_type == "Resize"]
    outputs = {o.name for o in graph.output}
    names += [n.name for n in resizes if set(n.output) & outputs]
    return names


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over normalised (1, 3, H, W) float32 arrays."""

    def __init__(self, batches: Iterable[np.ndarray], name: str) -> None:
        self._it = iter(batches)
        self._name = name

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {self._name: x}

    def rewind(self) -> None:  # onnxruntime calls it for some methods; one pass is all MinMax needs
        pass


def _agreement(float_run, int8_run, images: Sequence[np.ndarray]) -> float:
    same = total = 0
    for x in images:
        a = float_run(x).argmax(1)
        b = int8_run(x).argmax(1)
        same += int((a == b).sum())
        total += a.size
    return same / max(total, 1)


def quantize_model(
    model: nn.Module,
    calibration: Sequence[torch.Tensor],
    path: str | os.PathLike,
    *,
    held_out: Sequence[torch.Tensor] = (),
    metadata: dict[str, Any] | None = None,
    per_channel: bool = True,
) -> dict[str, Any]:
    """Write `model` quantized to int8 (QDQ ONNX) at `path`, calibrated on `calibration` (normalised (1, 3, H, W)
    tensors); `held_out` images measure its argmax agreement with the float model. Returns {"path", "seconds",
    "float_nodes", "agreement" (None without held_out), "quantized_convs", "calibration_images"}."""
    try:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ImportError("int8 quantization runs on ONNX Runtime: pip install 'deeplab[onnx]'") from None
    import onnx

    from .choice import model_digest
    from .export import export_onnx, model_metadata
    from .fast import optimize_for_inference as torch_fast_path
    from .runners import onnxruntime_runner
    from .runtimes import torch_only_reason

    if not calibration:
        raise ValueError("quantization needs calibration images: pass --calibration-images 1 or more")
    why = torch_only_reason(model)
    if why:
        raise ValueError(f"cannot quantize this model with ONNX Runtime: {why}")
    started = time.perf_counter()
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"--out {path}: the int8 model is an ONNX file; name it .onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    graph = torch_fast_path(model, channels_last=False, skip_taps=False, prepacked_shapes=0)
    arrays = [np.ascontiguousarray(x.detach().float().cpu().numpy()) for x in calibration]
    with tempfile.TemporaryDirectory(prefix="deeplab-quantize-") as tmp:
        fp32, prepared = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx"
        export_onnx(graph, fp32)
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False)
        keep = float_nodes(onnx.load(str(prepared)).graph)
        partial = path.with_name(f".{path.stem}.partial.onnx")
        try:
            quantize_static(
                str(prepared), str(partial), _Reader(arrays, "image"), quant_format=QuantFormat.QDQ,
                per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
            agreement = None
            if held_out:
                threads = torch.get_num_threads()
                float_run, _ = onnxruntime_runner(fp32, threads=threads)
                int8_run, _ = onnxruntime_runner(partial, threads=threads)
                agreement = _agreement(float_run, int8_run, [x.detach().float().cpu().numpy() for x in held_out])
            proto = onnx.load(str(partial))
            int8 = {
                "scheme": "QDQ; weights int8 symmetric per output channel" if per_channel else
                "QDQ; weights int8 symmetric per tensor",
                "activations": "uint8 asymmetric per tensor, ranges from min/max over the calibration images",
                "calibration_images": len(arrays), "float_nodes": keep, "model_digest": model_digest(model),
                "agreement": agreement, "agreement_images": len(held_out),
            }
            del proto.metadata_props[:]
            entry = proto.metadata_props.add()
            entry.key, entry.value = "deeplab", json.dumps(model_metadata(model, {**(metadata or {}), "int8": int8}))
            onnx.save(proto, str(partial))
            convs = sum(n.op_type == "Conv" for n in proto.graph.node)
            os.replace(partial, path)
        except OSError as e:
            raise named_os_error(OSError(e.errno, e.strerror or str(e)), path) from None
        finally:
            partial.unlink(missing_ok=True)
    return {"path": str(path), "seconds": time.perf_counter() - started, "float_nodes": keep,
            "agreement": agreement, "quantized_convs": convs, "calibration_images": len(arrays)}
