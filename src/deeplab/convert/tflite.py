"""Import the official TensorFlow DeepLab MobileNetV2 and MobileNet-EdgeTPU TFLite models (float and uint8) exactly.

Two steps, each usable alone:

- `read_tflite_graph(path)` parses the flatbuffer (subgraph 0) into a plain `TFLiteGraph`: the ops in execution
  order with their tensors and options, every tensor's shape and quantization, and the constant tensors
  dequantized to float32. Nothing here knows about DeepLab.
- `model_from_graph(graph)` walks that graph from the input tensor, recognises the backbone by its blocks
  (MobileNetV2: stem, 17 inverted residuals; MobileNet-EdgeTPU: stem, 22 fused or inverted blocks, a last 1x1
  conv), the ASPP head (image pooling broadcast by a resize or by TILE) and the logits, reads the architecture
  from it (depth multiplier, output stride, ASPP branches, image pooling, number of classes, `align_corners`, input
  normalisation and size), builds the model with `build_model` and loads the weights. For a uint8 file it also
  reads where and how the file rounds activations (`deeplab.activation_rounding`). Every op of the graph must be accounted for: an op the walk cannot place is
  an error, never silently dropped.

`load_tflite(path)` does both and picks the class names.

The files fold BatchNorm into the conv biases. Our layers are Conv (no bias) + BatchNorm, so each BatchNorm is set to
an identity plus the folded bias: weight 1, running mean 0 and running variance 1 - eps, so that
(x - 0) / sqrt(var + eps) is x up to float rounding.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..backbones.mobilenet_edgetpu import EDGETPU_BLOCKS, MobileNetEdgeTPU
from ..backbones.mobilenet_v2 import MobileNetV2
from ..activation_rounding import attach_activation_rounding
from ..checkpoint import load_state_dict_strict
from ..config import OUTPUT_STRIDES, TF_MEAN, TF_STD, ModelConfig, Preprocessing
from ..model import DeepLab, build_model

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
NUM_MOBILENET_V2_BLOCKS = 17  # the inverted residuals of MobileNetV2 Table 2 (1 + 2 + 3 + 4 + 3 + 3 + 1)
# Multipliers TF publishes MobileNetV2 checkpoints at; tried when stem_channels / 32 does not reproduce the file.
KNOWN_DEPTH_MULTIPLIERS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)

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


# --------------------------------------------------------------------------------------------------- reading


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


# --------------------------------------------------------------------------------------------------- mapping


def _op_error(source: str, op: TFLiteOp, message: str) -> TFLiteImportError:
    """The error for a part of the graph that does not map: file, op index, op type and tensor, then `message`
    (which starts with its own separator)."""
    tensor = op.outputs[0] if op.outputs else "?"
    return TFLiteImportError(f"{source}: op {op.index} ({op.type}) producing tensor {tensor!r}{message}")


class _Walk:
    """Tensor-level navigation of a graph, with QUANTIZE/DEQUANTIZE folded away as aliases."""

    def __init__(self, graph: TFLiteGraph) -> None:
        self.graph = graph
        self.alias: dict[str, str] = {}
        self.visited: set[int] = set()
        self.producer: dict[str, TFLiteOp] = {}
        self.consumers: dict[str, list[TFLiteOp]] = {}
        for op in graph.ops:
            if op.type not in SUPPORTED_OPS:
                supported = ", ".join(SUPPORTED_OPS)
                raise self.error(op, f"is not supported; DeepLab MobileNetV2 graphs are made of {supported}")
            if not op.outputs:
                raise self.error(op, "has no output tensor; the file is corrupted")
            if op.type in REPRESENTATION_OPS:
                if len(op.inputs) != 1 or op.inputs[0] is None or len(op.outputs) != 1:
                    raise self.error(op, "should have one input and one output")
                self.alias[op.outputs[0]] = self.resolve(op.inputs[0])
                self.visited.add(op.index)
                continue
            for name in op.outputs:
                self.producer[name] = op
            for name in op.inputs:
                if name is not None:
                    self.consumers.setdefault(self.resolve(name), []).append(op)

    def resolve(self, name: str) -> str:
        return self.alias.get(name, name)

    def error(self, op: TFLiteOp, message: str) -> TFLiteImportError:
        return _op_error(self.graph.source, op, f" {message}")

    def input(self, op: TFLiteOp, i: int) -> str:
        if i >= len(op.inputs) or op.inputs[i] is None:
            raise self.error(op, f"lacks its input {i}")
        return self.resolve(op.inputs[i])

    def output(self, op: TFLiteOp) -> str:
        return self.resolve(op.outputs[0])

    def shape(self, op: TFLiteOp, name: str, rank: int) -> tuple[int, ...]:
        shape = self.graph.tensors[name].shape if name in self.graph.tensors else ()
        if len(shape) != rank:
            raise self.error(op, f"has tensor {name!r} of shape {shape}, expected rank {rank}")
        return shape

    def users(self, name: str) -> list[TFLiteOp]:
        return self.consumers.get(name, [])

    def only_user(self, name: str, op_types: Sequence[str], after: TFLiteOp) -> TFLiteOp:
        users = self.users(name)
        if len(users) != 1 or users[0].type not in op_types:
            found = ", ".join(f"op {u.index} ({u.type})" for u in users) or "nothing"
            expected = " or ".join(op_types)
            raise self.error(after, f"feeds {found}; expected a single {expected} (not a DeepLab MobileNetV2 graph)")
        return users[0]

    def visit(self, op: TFLiteOp) -> TFLiteOp:
        # Every step of the walk visits a new op, so a corrupted graph with a cycle ends here instead of looping.
        if op.index in self.visited:
            raise self.error(op, "is reached twice: the graph has a cycle or a shared layer; the file is corrupted")
        self.visited.add(op.index)
        return op


@dataclass
class _Plan:
    stem: TFLiteOp | None = None
    blocks: list[dict[str, Any]] = field(default_factory=list)  # kind, expand, depthwise, project, residual
    final: TFLiteOp | None = None  # the backbone's last 1x1 conv (MobileNet-EdgeTPU's Conv_1)
    pool: TFLiteOp | None = None  # the image pooling's AVERAGE_POOL_2D / MEAN
    concat: TFLiteOp | None = None  # the ASPP concatenation
    pooling: TFLiteOp | None = None
    aspp_branches: list[tuple[str, TFLiteOp, int]] = field(default_factory=list)  # (kind, conv op, rate)
    projection: TFLiteOp | None = None
    logits: TFLiteOp | None = None
    align_corners: bool = False
    argmax: bool = False  # the file ends in ARG_MAX (the quantized one); our model returns the logits before it
    alias: dict[str, str] = field(default_factory=dict)  # QUANTIZE/DEQUANTIZE outputs -> the tensor they re-store

_CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")
# A block's convs from its input to its linear projection, by op type and kernel: which of our layers each fills.
_BLOCK_KINDS = {
    ("1x1",): "project",  # MobileNet-EdgeTPU's first block (expansion 1, fused: the projection alone)
    ("dw", "1x1"): "depthwise",  # MobileNetV2's first block (expansion 1)
    ("kxk", "1x1"): "fused",  # MobileNet-EdgeTPU's fused blocks: a full kxk conv expands
    ("1x1", "dw", "1x1"): "inverted",  # the inverted residual: 1x1 expand, depthwise, 1x1 project
}


def _conv_chain(w: _Walk, op: TFLiteOp) -> list[TFLiteOp] | None:
    """The convs of one block starting at `op`, ending at the first conv with no fused activation (the linear
    projection); None when `op` does not start a block (the head begins, or the backbone's last 1x1 conv)."""
    chain = [op]
    while chain[-1].options.get("activation", "NONE") != "NONE":
        users = w.users(w.output(chain[-1]))
        if len(chain) == 3 or len(users) != 1 or users[0].type not in _CONV_OPS:
            return None
        chain.append(users[0])
    return chain


def _block_kind(w: _Walk, chain: list[TFLiteOp]) -> str:
    shape = []
    for op in chain:
        if op.type == "DEPTHWISE_CONV_2D":
            shape.append("dw")
        else:
            shape.append("1x1" if _kernel(w, op) == (1, 1) else "kxk")
    kind = _BLOCK_KINDS.get(tuple(shape))
    if kind is None:
        raise w.error(chain[-1], f"ends a block of convs {shape}, which is no MobileNet block (expected one of "
                      f"{[list(k) for k in _BLOCK_KINDS]})")
    return kind


def _walk_backbone(w: _Walk, plan: _Plan, x: str) -> str:
    """Blocks from the stem's output to the backbone's output (returned), then the backbone's last 1x1 conv if the
    file has one (MobileNet-EdgeTPU's 1280-channel `Conv_1`)."""
    while True:
        convs = [u for u in w.users(x) if u.type != "ADD"]
        adds = [u for u in w.users(x) if u.type == "ADD"]
        if len(convs) != 1 or convs[0].type not in _CONV_OPS:
            return x
        chain = _conv_chain(w, convs[0])
        if chain is None:
            last = convs[0]
            if not adds and last.type == "CONV_2D" and _kernel(w, last) == (1, 1) and len(w.users(w.output(last))) > 1:
                plan.final = w.visit(last)  # read by several head branches: the backbone's last conv
                return w.output(last)
            return x  # a head conv: the ASPP begins here
        for op in chain:
            w.visit(op)
        kind = _block_kind(w, chain)
        if len(adds) > 1:
            raise w.error(adds[1], "is a second residual ADD on one block input")
        project = chain[-1]
        y = w.output(project)
        residual = None
        if adds:
            residual = adds[0]
            operands = {w.input(residual, 0), w.input(residual, 1)} if len(residual.inputs) == 2 else set()
            if operands != {x, y}:
                raise w.error(residual, "does not add a block's input to its projection (not a MobileNet residual)")
            w.only_user(y, ("ADD",), after=project)
            x = w.output(w.visit(residual))
        else:
            x = y
        spatial = [op for op in chain[:-1] if kind != "inverted" or op.type == "DEPTHWISE_CONV_2D"]
        plan.blocks.append(
            {
                "kind": kind,
                "expand": chain[0] if kind in ("fused", "inverted") else None,
                "depthwise": spatial[-1] if kind in ("depthwise", "inverted") else None,
                "project": project,
                "residual": residual,
            }
        )


def _backbone_name(graph: TFLiteGraph, plan: _Plan) -> str:
    """mobilenet_v2 or mobilenet_edgetpu, from the block kinds and the block count."""
    kinds = [b["kind"] for b in plan.blocks]
    edgetpu = plan.final is not None or "fused" in kinds or "project" in kinds
    name, count = ("mobilenet_edgetpu", len(EDGETPU_BLOCKS)) if edgetpu else ("mobilenet_v2", NUM_MOBILENET_V2_BLOCKS)
    if len(plan.blocks) != count or (edgetpu and plan.final is None):
        op = plan.blocks[-1]["project"] if plan.blocks else plan.stem
        looks = "MobileNet-EdgeTPU" if edgetpu else "MobileNetV2"
        raise _op_error(
            graph.source,
            op,
            f" ends the backbone after {len(plan.blocks)} blocks{'' if plan.final is None else ' and a 1x1 conv'}; "
            f"it looks like {looks}, which has {count}{' and a last 1x1 conv' if edgetpu else ''} (another "
            "backbone, or a DeepLabv3+ decoder tap, which is not supported)",
        )
    return name


def _walk(graph: TFLiteGraph) -> _Plan:
    w = _Walk(graph)
    plan = _Plan()
    if len(graph.inputs) != 1:
        raise TFLiteImportError(f"{graph.source}: the graph has {len(graph.inputs)} inputs; DeepLab takes one image")
    x = w.resolve(graph.inputs[0])
    first = w.users(x)
    if len(first) != 1 or first[0].type != "CONV_2D":
        found = ", ".join(f"op {u.index} ({u.type})" for u in first) or "nothing"
        raise TFLiteImportError(
            f"{graph.source}: the input tensor {graph.inputs[0]!r} feeds {found}; MobileNetV2 starts with one CONV_2D"
        )
    plan.stem = w.visit(first[0])
    x = _walk_backbone(w, plan, w.output(plan.stem))
    backbone_out = x
    _, fh, fw, _ = w.shape(plan.blocks[-1]["project"], backbone_out, 4)

    # ASPP head: every branch starts at the backbone output and ends at one CONCATENATION.
    concat: TFLiteOp | None = None
    branch_ends: dict[str, tuple[str, TFLiteOp, int]] = {}
    for user in w.users(backbone_out):
        if user.type in ("AVERAGE_POOL_2D", "MEAN"):
            if plan.pooling is not None:
                raise w.error(user, f"is a second image pooling branch (op {plan.pooling.index} is the first)")
            pool = plan.pool = w.visit(user)
            if user.type == "AVERAGE_POOL_2D":
                if user.options.get("filter") != (fh, fw) or user.options.get("padding") != "VALID":
                    raise w.error(
                        user,
                        f"pools with filter {user.options.get('filter')} and padding {user.options.get('padding')} "
                        f"over a {fh}x{fw} feature; image pooling needs a global (VALID, {fh}x{fw}) pool",
                    )
            else:
                axes = graph.constants.get(w.input(user, 1)) if len(user.inputs) > 1 else None
                spatial = axes is not None and sorted(int(a) for a in np.ravel(axes)) == [1, 2]
                if not spatial or not user.options.get("keep_dims"):
                    raise w.error(user, "is not a mean over height and width keeping dims (image pooling)")
            conv = w.visit(w.only_user(w.output(pool), ("CONV_2D",), after=pool))
            # Back to the feature's size: a bilinear resize of the 1x1 map, or TILE (the same values, copied).
            resize = w.visit(w.only_user(w.output(conv), ("RESIZE_BILINEAR", "TILE"), after=conv))
            if w.shape(resize, w.output(resize), 4)[1:3] != (fh, fw):
                raise w.error(resize, f"does not broadcast the pooled feature back to {fh}x{fw}")
            if resize.type == "TILE":
                multiples = graph.constants.get(w.input(resize, 1)) if len(resize.inputs) > 1 else None
                pooled = w.shape(resize, w.input(resize, 0), 4)
                if multiples is None or [int(m) for m in np.ravel(multiples)] != [1, fh, fw, 1] or pooled[1:3] != (1, 1):
                    raise w.error(resize, f"tiles a {pooled} tensor by {multiples}; image pooling tiles 1x1 to {fh}x{fw}")
            plan.pooling = conv
            branch_ends[w.output(resize)] = ("pooling", conv, 0)
            end = w.output(resize)
        elif user.type == "CONV_2D":
            conv = w.visit(user)
            ksize = _kernel(w, conv)
            rate = conv.options.get("dilation", (1, 1))
            if ksize == (1, 1):
                kind = "1x1"
            elif ksize == (3, 3) and rate[0] == rate[1]:
                kind = "atrous"
            else:
                raise w.error(conv, f"is an ASPP branch with kernel {ksize} and dilation {rate}; expected 1x1 or 3x3")
            branch_ends[w.output(conv)] = (kind, conv, rate[0])
            end = w.output(conv)
        else:
            raise w.error(user, "reads the backbone output but is neither image pooling nor an ASPP conv branch")
        nxt = w.only_user(end, ("CONCATENATION",), after=w.producer[end] if end in w.producer else user)
        if concat is not None and nxt is not concat:
            raise w.error(nxt, f"is a second concatenation in the ASPP head (op {concat.index} is the first)")
        concat = nxt
    if concat is None:
        raise w.error(plan.blocks[-1]["project"], "is the backbone output but no ASPP head reads it")
    plan.concat = w.visit(concat)
    if concat.options.get("axis") not in (3, -1):
        raise w.error(concat, f"concatenates along axis {concat.options.get('axis')}; ASPP concatenates channels (3)")
    for name in concat.inputs:
        key = w.resolve(name) if name is not None else None
        if key not in branch_ends:
            raise w.error(concat, f"concatenates {name!r}, which is not an ASPP branch output")
        plan.aspp_branches.append(branch_ends.pop(key))
    if branch_ends:
        raise w.error(concat, f"leaves ASPP branches out: {sorted(branch_ends)}")

    plan.projection = w.visit(w.only_user(w.output(concat), ("CONV_2D",), after=concat))
    plan.logits = w.visit(w.only_user(w.output(plan.projection), ("CONV_2D",), after=plan.projection))
    for op in (plan.projection, plan.logits):
        if _kernel(w, op) != (1, 1):
            raise w.error(op, f"has kernel {_kernel(w, op)}; the ASPP projection and the logits are 1x1 convs")

    # Resizes to the input size; the file's 33->33 resize is an identity and changes nothing.
    y = w.output(plan.logits)
    in_hw = w.shape(plan.stem, w.resolve(graph.inputs[0]), 4)[1:3]
    final_resize = None
    while w.users(y):
        op = w.only_user(y, ("RESIZE_BILINEAR", "ARG_MAX"), after=w.producer.get(y, plan.logits))
        w.visit(op)
        if op.type == "ARG_MAX":
            axis = graph.constants.get(w.input(op, 1)) if len(op.inputs) > 1 else None
            if axis is None or int(np.ravel(axis)[0]) not in (3, -1):
                raise w.error(op, "is an argmax over something other than the class axis")
            plan.argmax = True
            y = w.output(op)
            if w.users(y):
                raise w.error(w.users(y)[0], "follows the final argmax; nothing should")
            break
        src_hw = w.shape(op, w.input(op, 0), 4)[1:3]
        dst_hw = w.shape(op, w.output(op), 4)[1:3]
        if dst_hw == in_hw:
            final_resize = op
        elif dst_hw != src_hw:
            raise w.error(op, f"resizes the logits to {dst_hw}; expected the input size {in_hw}")
        y = w.output(op)
    if final_resize is None:
        raise w.error(plan.logits, f"is never resized to the input size {in_hw}; DeepLab returns logits at input size")
    plan.align_corners = bool(final_resize.options.get("align_corners", False))
    if final_resize.options.get("half_pixel_centers"):
        raise w.error(final_resize, "uses half_pixel_centers; only align_corners True/False resizes are mapped")

    left = [op for op in graph.ops if op.index not in w.visited]
    if left:
        raise w.error(left[0], "is not part of the DeepLab MobileNetV2 structure the importer maps")
    plan.alias = w.alias
    return plan


def _kernel(w: _Walk, op: TFLiteOp) -> tuple[int, int]:
    shape = w.shape(op, w.input(op, 1), 4)
    return shape[1], shape[2]


_BUILDERS = {"mobilenet_v2": MobileNetV2, "mobilenet_edgetpu": MobileNetEdgeTPU}
_NAMES = {"mobilenet_v2": "MobileNetV2", "mobilenet_edgetpu": "MobileNet-EdgeTPU"}


def _depth_multiplier(
    graph: TFLiteGraph, plan: _Plan, weights: dict[int, np.ndarray], output_stride: int, backbone: str
) -> float:
    """stem channels / 32, checked against every block; TF's published multipliers are the fallback, since TF
    rounds 32 * dm (0.35 -> 11 channels, and 11 / 32 would not reproduce the later layers)."""
    stem_channels = weights[plan.stem.index].shape[0]
    # (expanded, output) channels of each block: the projection's input and output widths.
    file_channels = [
        (weights[b["project"].index].shape[1], weights[b["project"].index].shape[0]) for b in plan.blocks
    ]
    candidates = [stem_channels / 32, *KNOWN_DEPTH_MULTIPLIERS]
    best: tuple[int, float] | None = None
    for dm in candidates:
        with torch.device("meta"):
            net = _BUILDERS[backbone](depth_multiplier=dm, output_stride=output_stride)
        if net.stem.conv.out_channels != stem_channels:
            continue
        ours = [(b.hidden_channels, b.project.conv.out_channels) for b in net.blocks]
        agree = next((i for i, (a, b) in enumerate(zip(ours, file_channels)) if a != b), len(ours))
        if agree == len(ours):
            return dm
        best = max(best or (agree, dm), (agree, dm))
    i, dm = best if best is not None else (0, stem_channels / 32)
    op = plan.blocks[i]["project"] if i < len(plan.blocks) else plan.stem
    found = file_channels[i] if i < len(file_channels) else "?"
    name = _NAMES[backbone]
    raise _op_error(
        graph.source,
        op,
        f": {name} block {i} has (expanded, output) channels {found}, which no depth multiplier reproduces "
        f"(stem {stem_channels} channels suggests {stem_channels / 32:g}); not an official {name}"
    )


def _output_stride(graph: TFLiteGraph, plan: _Plan) -> int:
    stride = 1
    for op in [plan.stem] + [b[k] for b in plan.blocks for k in ("expand", "depthwise") if b[k] is not None]:
        sh, sw = op.options.get("stride", (1, 1))
        if sh != sw:
            raise _op_error(
                graph.source,
                op,
                f" has stride ({sh}, {sw}); only square strides are mapped"
            )
        stride *= sh
    if stride not in OUTPUT_STRIDES:
        raise TFLiteImportError(
            f"{graph.source}: the backbone's strides multiply to output stride {stride}; "
            f"DeepLab supports {OUTPUT_STRIDES}"
        )
    return stride


def model_from_graph(
    graph: TFLiteGraph, *, class_names: Sequence[str] | None = None, activation_rounding: bool = True
) -> DeepLab:
    """Map a TFLite DeepLab MobileNetV2 / MobileNet-EdgeTPU graph onto `build_model` and load its weights (eval mode).
    A uint8 file's activation rounding is attached unless `activation_rounding=False` (deeplab.activation_rounding).

    Raises `TFLiteImportError` naming the op type, its index and tensor for any part of the graph that does not map.
    """
    try:
        return _model_from_graph(graph, class_names, activation_rounding)
    except TFLiteImportError:
        raise
    except Exception as e:  # a graph odd enough to trip the walk itself still gets one clear error naming the file
        raise TFLiteImportError(
            f"{graph.source}: the graph does not map onto a DeepLab MobileNetV2 ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else 'no detail'}); the file may be corrupted"
        ) from None


def _model_from_graph(
    graph: TFLiteGraph, class_names: Sequence[str] | None, activation_rounding: bool
) -> DeepLab:
    plan = _walk(graph)
    backbone = _backbone_name(graph, plan)
    convs = [plan.stem] + ([plan.final] if plan.final is not None else [])
    for block in plan.blocks:
        convs += [op for op in (block["expand"], block["depthwise"], block["project"]) if op is not None]
    convs += [op for _, op, _ in plan.aspp_branches] + [plan.projection, plan.logits]
    params = {op.index: _conv_weights(graph, op, plan.alias) for op in convs}  # OIHW weights and biases
    weights = {index: weight for index, (weight, _) in params.items()}
    cfg = _config(graph, plan, weights, backbone, class_names)
    model = build_model(cfg, class_names=class_names, preprocessing=_preprocessing(graph))
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    places = _places(graph, plan, model)
    rounding = _rounding_table(graph, plan, places) if activation_rounding else {}
    for op, module_name, activation in places:
        _check_conv(graph, op, modules[module_name], activation)
        weight, bias = params[op.index]
        if module_name == "aspp.project":
            weight = _reorder_projection(graph, plan, weight, cfg)
        _fill(state, modules[module_name], module_name, weight, bias, graph, op)
    _check_residuals(graph, plan, model)
    # num_batches_tracked is bookkeeping for training; keep the fresh model's.
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
    load_state_dict_strict(model, state, source=graph.source)
    if rounding:
        attach_activation_rounding(model, rounding, source=graph.source)
    return model.eval()


def _config(
    graph: TFLiteGraph,
    plan: _Plan,
    weights: dict[int, np.ndarray],
    backbone: str,
    class_names: Sequence[str] | None,
) -> ModelConfig:
    output_stride = _output_stride(graph, plan)
    depth_multiplier = _depth_multiplier(graph, plan, weights, output_stride, backbone)
    kinds = [kind for kind, _, _ in plan.aspp_branches]
    if kinds.count("1x1") != 1:
        raise TFLiteImportError(f"{graph.source}: the ASPP head has {kinds.count('1x1')} 1x1 branches; DeepLab has one")
    rates = tuple(rate for kind, _, rate in plan.aspp_branches if kind == "atrous")
    if len(set(rates)) != len(rates):
        raise TFLiteImportError(f"{graph.source}: the ASPP head repeats an atrous rate {sorted(rates)}; not mapped")
    num_classes = weights[plan.logits.index].shape[0]
    if class_names is not None and len(class_names) != num_classes:
        raise TFLiteImportError(
            f"{graph.source}: {len(class_names)} class names given for the file's {num_classes} classes; "
            "give one per class"
        )
    return ModelConfig(
        backbone=backbone,
        num_classes=num_classes,
        output_stride=output_stride,
        atrous_rates=tuple(sorted(rates)),
        decoder=False,
        image_pooling=plan.pooling is not None,
        aspp_channels=weights[plan.projection.index].shape[0],
        align_corners=plan.align_corners,
        depth_multiplier=depth_multiplier,
    )


def _places(graph: TFLiteGraph, plan: _Plan, model: DeepLab) -> list[tuple[TFLiteOp, str, str]]:
    """Which file conv fills which of our modules, and the fused activation it must carry (MobileNetV2: ReLU6,
    MobileNet-EdgeTPU: ReLU; the projections are linear)."""
    act = "RELU6" if model.config.backbone == "mobilenet_v2" else "RELU"
    places: list[tuple[TFLiteOp, str, str]] = [(plan.stem, "backbone.stem", act)]
    for i, block in enumerate(plan.blocks):
        ours = model.backbone.blocks[i]
        for part in ("expand", "depthwise"):
            if (block[part] is None) != (getattr(ours, part) is None):
                op = block[part] or block["project"]
                raise _op_error(
                    graph.source,
                    op,
                    f": block {i} {'lacks' if block[part] is None else 'has'} an {part} conv, which "
                    f"{_NAMES[model.config.backbone]} {'has' if block[part] is None else 'does not have'} there",
                )
            if block[part] is not None:
                places.append((block[part], f"backbone.blocks.{i}.{part}", act))
        places.append((block["project"], f"backbone.blocks.{i}.project", "NONE"))
    if plan.final is not None:
        places.append((plan.final, "backbone.final", act))
    branch_index = {rate: 1 + j for j, rate in enumerate(model.config.rates)}
    for kind, op, rate in plan.aspp_branches:
        atrous = f"aspp.branches.{branch_index.get(rate)}"
        module = {"pooling": "aspp.pooling", "1x1": "aspp.branches.0"}.get(kind, atrous)
        places.append((op, module, "RELU"))
    places.append((plan.projection, "aspp.project", "RELU"))
    places.append((plan.logits, "classifier", "NONE"))
    return places


def _rounding_table(
    graph: TFLiteGraph, plan: _Plan, places: list[tuple[TFLiteOp, str, str]]
) -> dict[str, tuple[float, int]]:
    """Where a uint8 file rounds an activation, and to which scale and zero point (deeplab.activation_rounding):
    every conv's output, every residual sum, the concatenation before the projection, the pooled feature. Empty for
    a float file."""
    sites: list[tuple[str, TFLiteOp | None]] = [(name, op) for op, name, _ in places]
    sites += [(f"backbone.blocks.{i}", b["residual"]) for i, b in enumerate(plan.blocks) if b["residual"] is not None]
    sites.append(("aspp.project:input", plan.concat))
    if plan.pooling is not None:
        sites.append(("aspp.pooling.conv:input", plan.pool))
    table: dict[str, tuple[float, int]] = {}
    for site, op in sites:
        if op is None:
            continue
        tensor = graph.tensors.get(plan.alias.get(op.outputs[0], op.outputs[0]))
        if tensor is None or tensor.dtype != "UINT8" or len(tensor.scale) != 1:
            return {}  # a float file (or one quantized otherwise): nothing to round
        table[site] = (float(tensor.scale[0]), int(tensor.zero_point[0]))
    return table


def _check_residuals(graph: TFLiteGraph, plan: _Plan, model: DeepLab) -> None:
    name = _NAMES[model.config.backbone]
    for i, block in enumerate(plan.blocks):
        if (block["residual"] is not None) != model.backbone.blocks[i].use_residual:
            op = block["residual"] or block["project"]
            raise _op_error(
                graph.source,
                op,
                f": block {i} {'has' if block['residual'] is not None else 'lacks'} a residual connection, "
                f"which {name} {'does not' if block['residual'] is not None else 'does'} have there"
            )
        if block["residual"] is not None and block["residual"].options.get("activation", "NONE") != "NONE":
            op = block["residual"]
            raise _op_error(
                graph.source,
                op,
                f" fuses activation {op.options['activation']}; {name}'s residual add is linear"
            )


def _preprocessing(graph: TFLiteGraph) -> Preprocessing:
    """(x - mean) / std on 0-255 pixels. A float input was normalised by (x - 127.5) / 127.5 in TF DeepLab's graph
    (the `sub_7` input is after that step); a quantized input holds the pixel itself, read as (q - zp) * scale."""
    tensor = graph.tensors[graph.inputs[0]]
    _, h, w, c = tensor.shape
    if c != 3:
        raise TFLiteImportError(f"{graph.source}: input tensor {tensor.name!r} has {c} channels; DeepLab takes RGB")
    if tensor.dtype in ("UINT8", "INT8") and tensor.quantized:
        if len(tensor.scale) != 1 or tensor.scale[0] <= 0:
            raise TFLiteImportError(
                f"{graph.source}: input tensor {tensor.name!r} has quantization scales {tensor.scale}; expected one "
                "positive scale"
            )
        # int8 inputs carry pixel - 128, so the pixel's zero point is 128 higher.
        mean = tensor.zero_point[0] + (128 if tensor.dtype == "INT8" else 0)
        std = 1.0 / tensor.scale[0]
        return Preprocessing(mean=(mean,) * 3, std=(std,) * 3, input_size=(h, w))
    if tensor.dtype != "FLOAT32":
        raise TFLiteImportError(
            f"{graph.source}: input tensor {tensor.name!r} is {tensor.dtype} without quantization; expected FLOAT32, "
            "or UINT8/INT8 with a scale and zero point"
        )
    return Preprocessing(mean=TF_MEAN, std=TF_STD, input_size=(h, w))


def _conv_weights(
    graph: TFLiteGraph, op: TFLiteOp, alias: dict[str, str]
) -> tuple[np.ndarray, np.ndarray | None]:
    """The op's weight as OIHW float32 ([1, H, W, C] depthwise -> [C, 1, H, W]) and its bias (None if absent).
    A weight behind a DEQUANTIZE (float16 files) is read from the constant the DEQUANTIZE reads."""
    inputs = [None if name is None else alias.get(name, name) for name in op.inputs]
    weight_name = inputs[1] if len(inputs) > 1 else None
    if weight_name not in graph.constants:
        raise _op_error(
            graph.source,
            op,
            f": its weight {weight_name!r} has no data in the file (a weight computed at run time is not "
            f"mapped)"
        )
    weight = graph.constants[weight_name]
    if weight.ndim != 4:
        raise _op_error(
            graph.source,
            op,
            f": weight {weight_name!r} has shape {weight.shape}, expected 4 dimensions"
        )
    if op.type == "DEPTHWISE_CONV_2D" and weight.shape[0] != 1:
        raise _op_error(
            graph.source,
            op,
            f": depthwise weight {weight_name!r} has shape {weight.shape}; expected [1, H, W, C]"
        )
    weight = weight.astype(np.float32)
    weight = weight.transpose(3, 0, 1, 2) if op.type == "DEPTHWISE_CONV_2D" else weight.transpose(0, 3, 1, 2)
    bias = None
    if len(inputs) > 2 and inputs[2] is not None:
        if inputs[2] not in graph.constants:
            raise _op_error(
                graph.source,
                op,
                f": its bias {inputs[2]!r} has no data in the file"
            )
        bias = graph.constants[inputs[2]].reshape(-1).astype(np.float32)
    for name, array in ((weight_name, weight), (inputs[2] if bias is not None else None, bias)):
        if array is not None and not np.isfinite(array).all():
            raise _op_error(
                graph.source,
                op,
                f": tensor {name!r} holds NaN or infinite values; the file is corrupted, download it again"
            )
    return np.ascontiguousarray(weight), bias


def _check_conv(graph: TFLiteGraph, op: TFLiteOp, module: nn.Module, activation: str) -> None:
    """The file's stride, dilation, padding and fused activation must be the ones our module computes with."""
    conv = module if isinstance(module, nn.Conv2d) else module.conv

    def fail(message: str) -> TFLiteImportError:
        return _op_error(graph.source, op, f" {message}")

    stride = tuple(op.options.get("stride", (1, 1)))
    dilation = tuple(op.options.get("dilation", (1, 1)))
    if stride != conv.stride or dilation != conv.dilation:
        raise fail(
            f"has stride {stride} and dilation {dilation}; the model built from the file's config has "
            f"{conv.stride} and {conv.dilation} there (its atrous plan differs from TF's)"
        )
    file_activation = op.options.get("activation", "NONE")
    if file_activation != activation:
        raise fail(f"fuses activation {file_activation}; our layer there applies {activation}")
    if op.type == "DEPTHWISE_CONV_2D" and op.options.get("depth_multiplier", 1) not in (0, 1):
        raise fail(f"has depth multiplier {op.options['depth_multiplier']}; MobileNetV2's depthwise convs have 1")
    kh, kw = conv.kernel_size
    if (kh, kw) != (1, 1) or stride != (1, 1):
        # TF's SAME pads (out - 1) * stride + dilated kernel - in in total, the extra pixel at the bottom/right.
        # Our convs pad symmetrically, so the file's input size must make TF's padding symmetric (16k+1 crops do).
        in_shape = graph.tensors[op.inputs[0]].shape if op.inputs[0] in graph.tensors else ()
        if len(in_shape) != 4:
            raise fail(f"reads a tensor of shape {in_shape}, expected NHWC")
        for size, k, s, d, pad in zip(in_shape[1:3], (kh, kw), stride, dilation, conv.padding):
            padding = op.options.get("padding", "SAME")
            if padding == "SAME":
                out = -(-size // s)
                total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
            else:
                total = 0
            if total != 2 * pad:
                raise fail(
                    f"pads {padding} over a size-{size} input (total {total} pixels), which our symmetric padding "
                    f"of {pad} per side does not reproduce; export the model at an input size of the form 16k+1"
                )


def _reorder_projection(graph: TFLiteGraph, plan: _Plan, weight: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Permute the projection's input channels from the file's concatenation order to ours
    ([pooling], 1x1, atrous branches by rate)."""
    width = cfg.aspp_channels
    if weight.shape[1] != width * len(plan.aspp_branches):
        op = plan.projection
        raise _op_error(
            graph.source,
            op,
            f" reads {weight.shape[1]} channels; {len(plan.aspp_branches)} ASPP branches of {width} channels "
            f"give {width * len(plan.aspp_branches)}"
        )
    rank = {"pooling": 0, "1x1": 1, "atrous": 2}
    keys = [(rank[kind], rate) for kind, _, rate in plan.aspp_branches]
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    return np.concatenate([weight[:, i * width : (i + 1) * width] for i in order], axis=1)


def _fill(
    state: dict[str, torch.Tensor],
    module: nn.Module,
    name: str,
    weight: np.ndarray,
    bias: np.ndarray | None,
    graph: TFLiteGraph,
    op: TFLiteOp,
) -> None:
    conv = module if isinstance(module, nn.Conv2d) else module.conv
    if tuple(weight.shape) != tuple(conv.weight.shape):
        raise _op_error(
            graph.source,
            op,
            f" has weight shape {tuple(weight.shape)} (OIHW) where the model built from the file's config "
            f"has {tuple(conv.weight.shape)} ({name}); unexpected channel count"
        )
    out_channels = weight.shape[0]
    bias = np.zeros(out_channels, dtype=np.float32) if bias is None else bias
    if bias.shape != (out_channels,):
        raise _op_error(
            graph.source,
            op,
            f" has a bias of shape {bias.shape} for {out_channels} output channels"
        )
    prefix = f"{name}.conv" if not isinstance(module, nn.Conv2d) else name
    state[f"{prefix}.weight"] = torch.from_numpy(weight.copy())
    if isinstance(module, nn.Conv2d):
        state[f"{name}.bias"] = torch.from_numpy(bias.copy())
        return
    bn = module.bn
    # Identity BatchNorm carrying the folded bias: (x - 0) / sqrt((1 - eps) + eps) * 1 + bias.
    state[f"{name}.bn.weight"] = torch.ones(out_channels)
    state[f"{name}.bn.bias"] = torch.from_numpy(bias.copy())
    state[f"{name}.bn.running_mean"] = torch.zeros(out_channels)
    state[f"{name}.bn.running_var"] = torch.full((out_channels,), 1.0 - bn.eps)


# --------------------------------------------------------------------------------------------------- public entry


def _read_labels(path: Path, num_classes: int, *, source: str) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TFLiteImportError(
            f"{path}: cannot read the label file ({type(e).__name__}: {e}); pass a UTF-8 text file, one label per line"
        ) from None
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    if len(names) != num_classes:
        raise TFLiteImportError(
            f"{path}: {len(names)} labels for the {num_classes} classes of {source}; give one label per line, "
            "in class order"
        )
    return names


def load_tflite(
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    labels_path: str | os.PathLike | None = None,
    activation_rounding: bool = True,
) -> DeepLab:
    """Import an official TF DeepLab MobileNetV2 or MobileNet-EdgeTPU TFLite model (float or quantized) as a
    `DeepLab` in eval mode.

    The architecture, preprocessing and weights all come from the file (quantized weights are dequantized). A uint8
    file also rounds its activations as the file does (`activation_rounding=False`: plain float activations).
    Class names, first found wins: `labels_path` (one per line) or `class_names` (give at most one of the two), then a
    `labelmap.txt` beside the file, then generic `class_<i>`.
    A quantized file that ends in ARG_MAX gives a model returning the logits before it: take `.argmax(1)`.
    """
    if labels_path is not None and class_names is not None:
        raise ValueError("give class_names or labels_path, not both")
    path = Path(path)
    model = model_from_graph(read_tflite_graph(path), class_names=class_names, activation_rounding=activation_rounding)
    if class_names is not None:
        return model
    num_classes = model.config.num_classes
    sibling = path.with_name("labelmap.txt")
    if labels_path is not None:
        model.class_names = tuple(_read_labels(Path(labels_path), num_classes, source=str(path)))
    elif sibling.is_file():
        model.class_names = tuple(_read_labels(sibling, num_classes, source=str(path)))
    return model


__all__ = [
    "TFLiteGraph",
    "TFLiteImportError",
    "TFLiteOp",
    "TFLiteTensor",
    "load_tflite",
    "model_from_graph",
    "read_tflite_graph",
]
