"""Reading a TFLite flatbuffer (subgraph 0) into a plain `TFLiteGraph`: ops in execution order, tensors with
shapes and quantization, constants dequantized to float32. Nothing here knows about DeepLab."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FILE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier, bytes 4-8 of every TFLite model


# Ops that change only how a value is stored (quantized <-> float); in float they are the identity.
REPRESENTATION_OPS = ("QUANTIZE", "DEQUANTIZE")


# Every op type the DeepLab MobileNetV2 walk can place. Anything else is refused by name.
SUPPORTED_OPS = (
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "ADD",
    "AVERAGE_POOL_2D",
    "MEAN",
    "RESIZE_BILINEAR",
    "CONCATENATION",
    "ARG_MAX",
    "TILE",
    *REPRESENTATION_OPS,
)


_NUMPY_DTYPES = {
    "FLOAT32": "<f4",
    "FLOAT16": "<f2",
    "FLOAT64": "<f8",
    "INT32": "<i4",
    "INT64": "<i8",
    "INT16": "<i2",
    "INT8": "i1",
    "UINT8": "u1",
    "BOOL": "?",
}


class TFLiteImportError(ValueError):
    """A TFLite file that cannot be read, or a graph that does not map onto a deeplab model."""


@dataclass(frozen=True)
class TFLiteTensor:
    """One tensor of the graph. `scale`/`zero_point` are empty for float tensors; per-channel quantization has one
    scale per index of `quantized_dimension`."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # TFLite's TensorType name: "FLOAT32", "UINT8", "INT8", "INT32", ...
    scale: tuple[float, ...] = ()
    zero_point: tuple[int, ...] = ()
    quantized_dimension: int = 0

    @property
    def quantized(self) -> bool:
        return len(self.scale) > 0


@dataclass(frozen=True)
class TFLiteOp:
    """One operator, in execution order. `inputs` holds None where an optional input (e.g. a bias) is absent.

    `options` holds the builtin options that matter for mapping: `stride` and `dilation` as (h, w), `padding`
    ("SAME"/"VALID"), `activation` ("NONE", "RELU", "RELU6", ...), `filter` (pools), `depth_multiplier`, `axis`,
    `align_corners`, `half_pixel_centers`, `keep_dims`.
    """

    index: int
    type: str
    inputs: tuple[str | None, ...]
    outputs: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TFLiteGraph:
    """Subgraph 0 of a TFLite file as plain data.

    `constants` maps the name of every tensor that has data in the file to a numpy array: quantized and float
    tensors dequantized to float32 ((q - zero_point) * scale, per tensor or per channel); integer tensors without
    quantization (resize sizes, axes) keep their integer dtype since they are indices, not values.
    Tensor names are made unique (a repeated name gets `#<tensor index>` appended).
    """

    source: str  # the file it was read from, for error messages
    ops: tuple[TFLiteOp, ...]
    tensors: dict[str, TFLiteTensor]
    constants: dict[str, np.ndarray]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    description: str = ""


def _import_tflite() -> Any:
    try:
        import tflite  # noqa: PLC0415 - optional dependency, imported where it is needed
    except ImportError:
        raise ImportError(
            "reading TFLite files needs the `tflite` flatbuffer package: pip install 'deeplab[tflite]'"
        ) from None
    return tflite


def _enum_names(enum_class: type) -> dict[int, str]:
    return {v: k for k, v in vars(enum_class).items() if k.isupper() and isinstance(v, int)}


def read_tflite_graph(path: str | os.PathLike) -> TFLiteGraph:
    """Parse a .tflite file into a `TFLiteGraph` (subgraph 0).

    Raises `TFLiteImportError` naming the file for anything that is not a readable TFLite flatbuffer: a missing,
    empty, truncated or corrupted file, or another format altogether.
    """
    tflite = _import_tflite()
    path = Path(path)
    if not path.is_file():
        raise TFLiteImportError(f"{path}: no such file; pass the path of a .tflite model")
    data = path.read_bytes()
    if len(data) < 8:
        raise TFLiteImportError(
            f"{path}: {len(data)} bytes is too short to be a TFLite model (empty or truncated); download it again"
        )
    if data[4:8] != FILE_IDENTIFIER:
        raise TFLiteImportError(
            f"{path}: not a TFLite flatbuffer (bytes 4-8 are {data[4:8]!r}, expected {FILE_IDENTIFIER!r}); "
            "pass a .tflite file exported by the TFLite converter"
        )
    try:
        return _parse(tflite, data, str(path))
    except TFLiteImportError:
        raise
    except Exception as e:  # the flatbuffer reader fails with IndexError, struct.error, ValueError... on bad bytes
        raise TFLiteImportError(
            f"{path}: the TFLite flatbuffer is truncated or corrupted ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else 'no detail'}); download the file again"
        ) from None


def _check_count(count: int, what: str, data: bytes, source: str) -> int:
    # A corrupted length field can claim billions of entries; each entry takes at least 4 bytes of the file.
    if count < 0 or count * 4 > len(data):
        raise TFLiteImportError(
            f"{source}: the TFLite flatbuffer is truncated or corrupted ({count} {what} cannot fit in "
            f"{len(data)} bytes); download the file again"
        )
    return count


def _parse(tflite: Any, data: bytes, source: str) -> TFLiteGraph:
    model = tflite.Model.GetRootAsModel(data, 0)
    op_names = _enum_names(tflite.BuiltinOperator)
    type_names = _enum_names(tflite.TensorType)
    n_subgraphs = _check_count(model.SubgraphsLength(), "subgraphs", data, source)
    if n_subgraphs < 1:
        raise TFLiteImportError(f"{source}: the TFLite model has no subgraph; the file is corrupted")
    sub = model.Subgraphs(0)
    n_buffers = _check_count(model.BuffersLength(), "buffers", data, source)
    n_codes = _check_count(model.OperatorCodesLength(), "operator codes", data, source)
    n_tensors = _check_count(sub.TensorsLength(), "tensors", data, source)
    n_ops = _check_count(sub.OperatorsLength(), "operators", data, source)

    codes = []
    for i in range(n_codes):
        oc = model.OperatorCodes(i)
        # Schema >= 2.3 moved codes past 127 to BuiltinCode and keeps a clamped DeprecatedBuiltinCode: take the max.
        code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
        name = op_names.get(code, f"UNKNOWN_BUILTIN_{code}")
        if name == "CUSTOM":
            custom = oc.CustomCode()
            name = f"CUSTOM:{custom.decode('utf-8', 'replace') if custom else '?'}"
        codes.append(name)

    names: list[str] = []
    tensors: dict[str, TFLiteTensor] = {}
    constants: dict[str, np.ndarray] = {}
    for i in range(n_tensors):
        t = sub.Tensors(i)
        raw_name = t.Name()
        name = raw_name.decode("utf-8", "replace") if raw_name else f"tensor_{i}"
        if name in tensors:
            name = f"{name}#{i}"
        shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        if any(d < 0 for d in shape):
            raise TFLiteImportError(
                f"{source}: tensor {i} ({name!r}) has a negative dimension in shape {shape}; the file is corrupted"
            )
        dtype = type_names.get(int(t.Type()), f"UNKNOWN_TYPE_{t.Type()}")
        scale: tuple[float, ...] = ()
        zero_point: tuple[int, ...] = ()
        qdim = 0
        q = t.Quantization()
        if q is not None and q.ScaleLength():
            scale = tuple(float(s) for s in q.ScaleAsNumpy())
            zero_point = tuple(int(z) for z in q.ZeroPointAsNumpy()) if q.ZeroPointLength() else (0,) * len(scale)
            qdim = int(q.QuantizedDimension())
        tensor = TFLiteTensor(name, shape, dtype, scale, zero_point, qdim)
        names.append(name)
        tensors[name] = tensor
        buffer_index = int(t.Buffer())
        if not 0 <= buffer_index < n_buffers:
            raise TFLiteImportError(f"{source}: tensor {i} ({name!r}) points at buffer {buffer_index} of {n_buffers}")
        raw = _buffer_bytes(model.Buffers(buffer_index), data, source, name)
        if raw is not None:
            constants[name] = _decode_constant(tensor, raw, source)

    def tensor_names(indices: np.ndarray | int, *, optional: bool, where: str) -> tuple[str | None, ...]:
        if isinstance(indices, int):  # the reader returns 0 for an absent vector
            return ()
        out: list[str | None] = []
        for j in (int(v) for v in indices):
            if j == -1 and optional:
                out.append(None)
            elif 0 <= j < n_tensors:
                out.append(names[j])
            else:
                raise TFLiteImportError(f"{source}: {where} refers to tensor {j}, but the graph has {n_tensors}")
        return tuple(out)

    ops = []
    for i in range(n_ops):
        op = sub.Operators(i)
        code_index = int(op.OpcodeIndex())
        if not 0 <= code_index < n_codes:
            raise TFLiteImportError(f"{source}: op {i} uses operator code {code_index} of {n_codes}")
        op_type = codes[code_index]
        where = f"op {i} ({op_type})"
        inputs = tensor_names(op.InputsAsNumpy(), optional=True, where=where)
        outputs = tensor_names(op.OutputsAsNumpy(), optional=False, where=where)
        ops.append(TFLiteOp(i, op_type, inputs, outputs, _read_options(tflite, op, op_type, source, i)))

    graph_inputs = tensor_names(sub.InputsAsNumpy(), optional=False, where="the graph's inputs")
    graph_outputs = tensor_names(sub.OutputsAsNumpy(), optional=False, where="the graph's outputs")
    description = model.Description()
    return TFLiteGraph(
        source=source,
        ops=tuple(ops),
        tensors=tensors,
        constants=constants,
        inputs=tuple(n for n in graph_inputs if n is not None),
        outputs=tuple(n for n in graph_outputs if n is not None),
        description=description.decode("utf-8", "replace") if description else "",
    )


def _buffer_bytes(buffer: Any, data: bytes, source: str, name: str) -> bytes | None:
    """The bytes of a buffer, or None for a tensor without data (activations)."""
    offset = int(buffer.Offset()) if hasattr(buffer, "Offset") else 0
    if offset > 1:  # models over 2 GB keep buffers after the flatbuffer, addressed by offset and size
        size = int(buffer.Size())
        if offset + size > len(data):
            raise TFLiteImportError(f"{source}: the data of tensor {name!r} lies past the end of the file (truncated)")
        return data[offset : offset + size]
    length = buffer.DataLength()
    if length == 0:
        return None
    _check_count(length // 4, f"bytes of tensor {name!r}", data, source)
    return buffer.DataAsNumpy().tobytes()


def _decode_constant(tensor: TFLiteTensor, raw: bytes, source: str) -> np.ndarray:
    if tensor.dtype not in _NUMPY_DTYPES:
        raise TFLiteImportError(f"{source}: constant tensor {tensor.name!r} has unsupported type {tensor.dtype}")
    dtype = np.dtype(_NUMPY_DTYPES[tensor.dtype])
    count = math.prod(tensor.shape)
    if len(raw) != count * dtype.itemsize:
        raise TFLiteImportError(
            f"{source}: constant tensor {tensor.name!r} of shape {tensor.shape} ({tensor.dtype}) needs "
            f"{count * dtype.itemsize} bytes, the file holds {len(raw)}; the file is corrupted"
        )
    q = np.frombuffer(raw, dtype=dtype).reshape(tensor.shape)
    if tensor.quantized:
        return _dequantize(tensor, q, source)
    if dtype.kind == "f":
        return q.astype(np.float32)
    return q.copy()


def _dequantize(tensor: TFLiteTensor, q: np.ndarray, source: str) -> np.ndarray:
    """(q - zero_point) * scale, per tensor or per channel along `quantized_dimension` (biases: int32, zero point 0,
    scale = input scale * weight scale, as stored in the bias tensor itself)."""
    scale = np.asarray(tensor.scale, dtype=np.float64)
    zero_point = np.asarray(tensor.zero_point, dtype=np.float64)
    if scale.size > 1 or zero_point.size > 1:
        axis = tensor.quantized_dimension
        if not 0 <= axis < q.ndim or q.shape[axis] != scale.size or zero_point.size not in (1, scale.size):
            raise TFLiteImportError(
                f"{source}: tensor {tensor.name!r} of shape {tensor.shape} has {scale.size} scales and "
                f"{zero_point.size} zero points along dimension {axis}; the quantization parameters are corrupted"
            )
        bshape = [1] * q.ndim
        bshape[axis] = -1
        scale = scale.reshape(bshape)
        zero_point = zero_point.reshape(bshape) if zero_point.size > 1 else zero_point.reshape(())
    elif zero_point.size == 0:
        zero_point = np.zeros(())
    return ((q.astype(np.float64) - zero_point) * scale).astype(np.float32)


_PADDING = {0: "SAME", 1: "VALID"}


def _read_options(tflite: Any, op: Any, op_type: str, source: str, index: int) -> dict[str, Any]:
    """The options of the op types we map; other ops keep an empty dict (the walk refuses them by name anyway)."""
    option_classes = {
        "CONV_2D": ("Conv2DOptions", "Conv2DOptions"),
        "DEPTHWISE_CONV_2D": ("DepthwiseConv2DOptions", "DepthwiseConv2DOptions"),
        "AVERAGE_POOL_2D": ("Pool2DOptions", "Pool2DOptions"),
        "MAX_POOL_2D": ("Pool2DOptions", "Pool2DOptions"),
        "ADD": ("AddOptions", "AddOptions"),
        "CONCATENATION": ("ConcatenationOptions", "ConcatenationOptions"),
        "RESIZE_BILINEAR": ("ResizeBilinearOptions", "ResizeBilinearOptions"),
        "MEAN": ("ReducerOptions", "ReducerOptions"),
    }
    if op_type not in option_classes:
        return {}
    union_name, class_name = option_classes[op_type]
    table = op.BuiltinOptions()
    if table is None:
        return {}  # defaults: no fused activation, no align_corners
    if int(op.BuiltinOptionsType()) != getattr(tflite.BuiltinOptions, union_name):
        raise TFLiteImportError(
            f"{source}: op {index} ({op_type}) carries options of type {op.BuiltinOptionsType()}, "
            f"not {union_name}; the file is corrupted"
        )
    opts = getattr(tflite, class_name)()
    opts.Init(table.Bytes, table.Pos)
    activations = _enum_names(tflite.ActivationFunctionType)
    out: dict[str, Any] = {}
    if hasattr(opts, "FusedActivationFunction"):
        code = int(opts.FusedActivationFunction())
        out["activation"] = activations.get(code, f"UNKNOWN_{code}")
    if hasattr(opts, "StrideH"):
        out["stride"] = (int(opts.StrideH()), int(opts.StrideW()))
    if hasattr(opts, "Padding"):
        out["padding"] = _PADDING.get(int(opts.Padding()), f"UNKNOWN_{opts.Padding()}")
    if hasattr(opts, "DilationHFactor"):
        out["dilation"] = (int(opts.DilationHFactor()), int(opts.DilationWFactor()))
    if hasattr(opts, "DepthMultiplier"):
        out["depth_multiplier"] = int(opts.DepthMultiplier())
    if hasattr(opts, "FilterHeight"):
        out["filter"] = (int(opts.FilterHeight()), int(opts.FilterWidth()))
    if op_type == "CONCATENATION":
        out["axis"] = int(opts.Axis())
    if op_type == "RESIZE_BILINEAR":
        out["align_corners"] = bool(opts.AlignCorners())
        out["half_pixel_centers"] = bool(opts.HalfPixelCenters())
    if op_type == "MEAN":
        out["keep_dims"] = bool(opts.KeepDims())
    return out


def op_error(source: str, op: TFLiteOp, message: str) -> TFLiteImportError:
    """The error for a part of the graph that does not map: file, op index, op type and tensor, then `message`
    (which starts with its own separator)."""
    tensor = op.outputs[0] if op.outputs else "?"
    return TFLiteImportError(f"{source}: op {op.index} ({op.type}) producing tensor {tensor!r}{message}")
