"""A DeepLab written as a TF Lite flatbuffer and run by the official TF Lite runtime (ai-edge-litert, XNNPACK).

`tflite_bytes(model, shape)` traces the inference graph (BatchNorm folded, image pooling projected once per image:
`deeplab.deploy.fast`) with `torch.export` at one input shape and writes it with the TF Lite schema (the `tflite`
package's flatbuffer builders) as NHWC operators: CONV_2D (weights OHWI), DEPTHWISE_CONV_2D (1HWO), ADD / SUB /
MUL, MEAN, CONCATENATION, RESIZE_BILINEAR, MAX_POOL_2D, STRIDED_SLICE, HARD_SWISH, LOGISTIC, PAD. A ReLU or ReLU6 that follows a
convolution or an addition becomes that operator's fused activation, as TF's own converter writes it. TF Lite graphs
are static: one input shape per file (the runtime below writes one per shape it meets).

Padding: PyTorch pads a convolution by p on both sides; TF Lite knows SAME (the extra row, if any, at the bottom)
and VALID. Where SAME reads the same input rows as PyTorch's padding (same output size, same padding before) the
convolution is SAME, with p = 0 it is VALID, otherwise an explicit PAD precedes a VALID convolution (MAX_POOL_2D:
PADV2 with the lowest float, as PyTorch pads max pooling with -inf). Bilinear resizing maps to RESIZE_BILINEAR with
align_corners, or half_pixel_centers when align_corners is off (PyTorch's convention for align_corners=False).

The graph reads an NHWC float32 image and writes NHWC logits (N, H, W, K). The model's `deeplab` metadata (class
names, preprocessing, input size) travels in the file's metadata table under the name "deeplab".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .artefacts import cached_bytes

NCHW_TO_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}
FUSABLE = ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "SUB", "MUL", "CONCATENATION")
SHAPES = 4  # input shapes the runtime writes a graph for; others run in the PyTorch fast path

__all__ = [
    "SHAPES", "UnsupportedOp", "input_shape", "interpreter", "litert_runner", "missing", "read_tflite_metadata",
    "tflite_bytes",
]


class UnsupportedOp(ValueError):
    """The traced graph holds an operator (or a form of one) this writer has no TF Lite equivalent for."""


def missing() -> str | None:
    """None when the TF Lite runtime and schema are importable, else why not (with the install command)."""
    for module in ("ai_edge_litert.interpreter", "tflite", "flatbuffers"):
        try:
            __import__(module)
        except ImportError:
            return f"the TF Lite runtime is not installed ({module}): pip install 'deeplab[litert]'"
    return None


# -- the graph, as TF Lite sees it --------------------------------------------------------------------------------


class _Graph:
    """Tensors (shape, type, buffer), buffers (bytes) and operators (name, inputs, outputs, options) of one
    TF Lite subgraph."""

    def __init__(self) -> None:
        self.tensors: list[dict[str, Any]] = []
        self.buffers: list[bytes] = [b""]  # buffer 0 is the empty buffer, by the schema's convention
        self.ops: list[dict[str, Any]] = []
        self.producer: dict[int, dict[str, Any]] = {}
        self.aliased: set[int] = set()  # tensors that also stand for another node's output (`_identity`)
        self.inputs: list[int] = []
        self.outputs: list[int] = []

    def tensor(self, shape, *, name: str, data: np.ndarray | None = None, dtype: str = "float32") -> int:
        buffer = 0
        if data is not None:
            self.buffers.append(np.ascontiguousarray(data, dtype=dtype).tobytes())
            buffer = len(self.buffers) - 1
        self.tensors.append({"shape": [int(s) for s in shape], "dtype": dtype, "buffer": buffer, "name": name})
        return len(self.tensors) - 1

    def const(self, array: np.ndarray, *, name: str, dtype: str = "float32") -> int:
        array = np.asarray(array, dtype=dtype)
        return self.tensor(array.shape, name=name, data=array, dtype=dtype)

    def op(self, kind: str, inputs: list[int], shape, *, name: str, **options: Any) -> int:
        out = self.tensor(shape, name=name)
        record = {"kind": kind, "inputs": inputs, "outputs": [out], "options": options}
        self.ops.append(record)
        self.producer[out] = record
        return out


def _nhwc(shape) -> list[int]:
    shape = [int(s) for s in shape]
    if len(shape) != 4:
        raise UnsupportedOp(f"a {len(shape)}-d tensor (only 4-d image tensors are written)")
    n, c, h, w = shape
    return [n, h, w, c]


def _padding(size: int, kernel: int, stride: int, dilation: int, pad: int, out: int) -> str:
    """SAME, VALID, or EXPLICIT: which TF Lite padding reads the rows PyTorch's symmetric `pad` reads."""
    if pad == 0:
        return "VALID"
    span = dilation * (kernel - 1) + 1
    same_out = -(-size // stride)
    before = max((same_out - 1) * stride + span - size, 0) // 2
    return "SAME" if same_out == out and before == pad else "EXPLICIT"


def _pads(g: _Graph, x: int, node, pads: list[int], kernel, stride, dilation, *, fill: float | None = None) -> tuple[int, str]:
    """`x` ready for a windowed op with PyTorch padding `pads` (h, w): (tensor, TF Lite padding)."""
    n, h, w, c = g.tensors[x]["shape"]
    out_h, out_w = _nhwc(node.meta["val"].shape)[1:3]
    kinds = {_padding(h, kernel[0], stride[0], dilation[0], pads[0], out_h),
             _padding(w, kernel[1], stride[1], dilation[1], pads[1], out_w)}
    if len(kinds) == 1 and "EXPLICIT" not in kinds:
        return x, kinds.pop()
    paddings = g.const(np.array([[0, 0], [pads[0], pads[0]], [pads[1], pads[1]], [0, 0]]), name=f"{node.name}/paddings",
                       dtype="int32")
    shape = [n, h + 2 * pads[0], w + 2 * pads[1], c]
    if fill is None:
        return g.op("PAD", [x, paddings], shape, name=f"{node.name}/pad"), "VALID"
    value = g.const(np.array([fill]), name=f"{node.name}/pad_value")
    return g.op("PADV2", [x, paddings, value], shape, name=f"{node.name}/pad"), "VALID"


def _conv(g: _Graph, node, env) -> int:
    args = list(node.args) + [None] * (7 - len(node.args))
    x, weight, bias = env[args[0].name], env[args[1].name], (env[args[2].name] if args[2] is not None else None)
    if isinstance(args[4], str):
        raise UnsupportedOp(f"convolution padding {args[4]!r}")
    if not isinstance(weight, torch.Tensor) or not (bias is None or isinstance(bias, torch.Tensor)):
        raise UnsupportedOp("a convolution whose weights are computed in the graph")
    stride, pads, dilation = (list(a) if a is not None else d for a, d in zip(args[3:6], ([1, 1], [0, 0], [1, 1])))
    stride, pads, dilation = ([v[0], v[0]] if len(v) == 1 else v for v in (stride, pads, dilation))
    groups = args[6] or 1
    w = weight.detach().float().numpy()
    out_c, in_per_group, kh, kw = w.shape
    in_c = g.tensors[x]["shape"][3]
    b = np.zeros(out_c, np.float32) if bias is None else bias.detach().float().numpy()
    x, padding = _pads(g, x, node, pads, (kh, kw), stride, dilation)
    shape = _nhwc(node.meta["val"].shape)
    common = {"padding": padding, "stride_h": stride[0], "stride_w": stride[1], "dilation_h_factor": dilation[0],
              "dilation_w_factor": dilation[1], "fused_activation_function": "NONE"}
    b_idx = g.const(b, name=f"{node.name}/bias")
    if groups == 1:
        w_idx = g.const(w.transpose(0, 2, 3, 1), name=f"{node.name}/weight")  # OHWI
        return g.op("CONV_2D", [x, w_idx, b_idx], shape, name=node.name, **common)
    if groups == in_c and in_per_group == 1 and out_c % in_c == 0:
        w_idx = g.const(w.transpose(1, 2, 3, 0), name=f"{node.name}/weight")  # 1HWO
        return g.op("DEPTHWISE_CONV_2D", [x, w_idx, b_idx], shape, name=node.name, depth_multiplier=out_c // in_c,
                    **common)
    raise UnsupportedOp(f"grouped convolution ({groups} groups of {in_per_group} channels)")


def _activation(kind: str):
    def lower(g: _Graph, node, env) -> int:
        if kind == "RELU6" and tuple(node.args[1:3]) != (0.0, 6.0):
            raise UnsupportedOp(f"hardtanh{tuple(node.args[1:3])} (only ReLU6's 0..6 is written)")
        x = env[node.args[0].name]
        producer = g.producer.get(x)
        if (producer is not None and producer["kind"] in FUSABLE and len(node.args[0].users) == 1
                and producer["options"].get("fused_activation_function") == "NONE" and x not in g.aliased):
            producer["options"]["fused_activation_function"] = kind
            return x
        return g.op(kind, [x], g.tensors[x]["shape"], name=node.name)

    return lower


def _binary(kind: str):
    def lower(g: _Graph, node, env) -> int:
        if len(node.args) > 2 or node.kwargs.get("alpha", 1) != 1:
            raise UnsupportedOp(f"{node.target} with alpha")
        inputs = []
        for i, a in enumerate(node.args[:2]):
            if isinstance(a, torch.fx.Node):
                value = env[a.name]
                if isinstance(value, torch.Tensor):  # a constant tensor operand
                    value = g.const(_const_nhwc(value), name=f"{node.name}/{i}")
                inputs.append(value)
            else:
                inputs.append(g.const(np.array([float(a)]), name=f"{node.name}/{i}"))
        return g.op(kind, inputs, _nhwc(node.meta["val"].shape), name=node.name, fused_activation_function="NONE")

    return lower


def _const_nhwc(t: torch.Tensor) -> np.ndarray:
    a = t.detach().float().numpy()
    if a.ndim == 4:
        return a.transpose(0, 2, 3, 1)
    if a.size == 1:
        return a.reshape(1)
    raise UnsupportedOp(f"a {a.ndim}-d constant of shape {list(a.shape)} broadcast against an image tensor")


def _mean(g: _Graph, node, env) -> int:
    dims = sorted(d % 4 for d in node.args[1])
    keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    if dims != [2, 3] or not keep:
        raise UnsupportedOp(f"mean over dims {node.args[1]} (keepdim={keep}); only the spatial mean is written")
    return _spatial_mean(g, node, env)


def _adaptive_avg_pool(g: _Graph, node, env) -> int:
    if list(node.args[1]) != [1, 1]:
        raise UnsupportedOp(f"adaptive average pooling to {list(node.args[1])} (only to 1x1)")
    return _spatial_mean(g, node, env)


def _spatial_mean(g: _Graph, node, env) -> int:
    axes = g.const(np.array([1, 2]), name=f"{node.name}/axes", dtype="int32")
    return g.op("MEAN", [env[node.args[0].name], axes], _nhwc(node.meta["val"].shape), name=node.name, keep_dims=True)


def _resize(g: _Graph, node, env) -> int:
    shape = _nhwc(node.meta["val"].shape)
    align = bool(node.args[2])
    scales = [v for a in node.args[3:] for v in (a if isinstance(a, (list, tuple)) else [a]) if v is not None]
    in_h, in_w = g.tensors[env[node.args[0].name]]["shape"][1:3]
    if scales and not align and any(abs(1 / s - i / o) > 1e-9 for s, i, o in zip(scales, (in_h, in_w), shape[1:3])):
        # PyTorch maps output to input pixels by 1 / scale_factor, TF Lite by in / out
        raise UnsupportedOp(f"bilinear resizing by scale factors {list(scales)} that are not out / in")
    size = g.const(np.array(shape[1:3]), name=f"{node.name}/size", dtype="int32")
    return g.op("RESIZE_BILINEAR", [env[node.args[0].name], size], shape, name=node.name, align_corners=align,
                half_pixel_centers=not align)


def _cat(g: _Graph, node, env) -> int:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    inputs = [env[a.name] for a in node.args[0]]
    return g.op("CONCATENATION", inputs, _nhwc(node.meta["val"].shape), name=node.name,
                axis=NCHW_TO_NHWC_AXIS[dim % 4], fused_activation_function="NONE")


def _max_pool(g: _Graph, node, env) -> int:
    args = list(node.args) + [None] * (6 - len(node.args))
    kernel = list(args[1])
    stride = list(args[2]) if args[2] else kernel
    pads = list(args[3]) if args[3] is not None else [0, 0]
    dilation = list(args[4]) if args[4] is not None else [1, 1]
    kernel, stride, pads, dilation = ([v[0], v[0]] if len(v) == 1 else v for v in (kernel, stride, pads, dilation))
    if dilation != [1, 1] or args[5]:
        raise UnsupportedOp("max pooling with dilation or ceil_mode")
    x, padding = _pads(g, env[args[0].name], node, pads, kernel, stride, dilation,
                       fill=float(np.finfo(np.float32).min))
    return g.op("MAX_POOL_2D", [x], _nhwc(node.meta["val"].shape), name=node.name, padding=padding,
                stride_h=stride[0], stride_w=stride[1], filter_height=kernel[0], filter_width=kernel[1],
                fused_activation_function="NONE")


def _slice(g: _Graph, node, env) -> int:
    """x[..., start:end:step] along one dim (ResNet's subsampled shortcut) as STRIDED_SLICE."""
    args = list(node.args) + [None] * (5 - len(node.args))
    x = env[args[0].name]
    shape = g.tensors[x]["shape"]
    axis = NCHW_TO_NHWC_AXIS[(args[1] or 0) % 4]
    size = shape[axis]
    start, stop, step = (args[2] or 0), min(size if args[3] is None else args[3], size), args[4] or 1
    start, stop = (v + size if v < 0 else v for v in (start, stop))
    if (start, stop, step) == (0, size, 1):
        return x
    begin, end, strides = [0, 0, 0, 0], list(shape), [1, 1, 1, 1]
    begin[axis], end[axis], strides[axis] = start, stop, step
    inputs = [x] + [g.const(np.array(v), name=f"{node.name}/{k}", dtype="int32")
                    for k, v in (("begin", begin), ("end", end), ("strides", strides))]
    return g.op("STRIDED_SLICE", inputs, _nhwc(node.meta["val"].shape), name=node.name)


def _unary(kind: str):
    def lower(g: _Graph, node, env) -> int:
        x = env[node.args[0].name]
        return g.op(kind, [x], g.tensors[x]["shape"], name=node.name)

    return lower


def _hardsigmoid(g: _Graph, node, env) -> int:
    """relu6(x + 3) / 6, as TF writes it."""
    x = env[node.args[0].name]
    shape = g.tensors[x]["shape"]
    three = g.const(np.array([3.0]), name=f"{node.name}/three")
    shifted = g.op("ADD", [x, three], shape, name=f"{node.name}/add", fused_activation_function="RELU6")
    sixth = g.const(np.array([1.0 / 6.0]), name=f"{node.name}/sixth")
    return g.op("MUL", [shifted, sixth], shape, name=node.name, fused_activation_function="NONE")


def _identity(g: _Graph, node, env):
    x = env[node.args[0].name]
    g.aliased.add(x)  # read through two nodes now: an activation after either must not be fused into its producer
    return x


LOWER: dict[str, Callable[..., Any]] = {
    "conv2d": _conv, "convolution": _conv,
    "relu": _activation("RELU"), "hardtanh": _activation("RELU6"),
    "add": _binary("ADD"), "sub": _binary("SUB"), "mul": _binary("MUL"),
    "mean": _mean, "adaptive_avg_pool2d": _adaptive_avg_pool, "upsample_bilinear2d": _resize, "cat": _cat,
    "max_pool2d": _max_pool, "slice": _slice, "hardswish": _unary("HARD_SWISH"), "sigmoid": _unary("LOGISTIC"),
    "hardsigmoid": _hardsigmoid, "dropout": _identity, "clone": _identity, "alias": _identity,
    "contiguous": _identity,
}


def _op_name(target) -> str:
    name = getattr(target, "_schema", None)
    name = name.name if name is not None else str(target)
    return name.split("::")[-1].rstrip("_")


def _lower(ep: torch.export.ExportedProgram, *, nchw_input: bool = False) -> _Graph:
    """The exported program's ATen graph as a TF Lite graph (NHWC; with `nchw_input` the graph reads the image NCHW
    and its first operator, a TRANSPOSE, makes it NHWC)."""
    from torch.export.graph_signature import InputKind

    constants: dict[str, torch.Tensor] = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            constants[spec.arg.name] = ep.state_dict[spec.target]
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            constants[spec.arg.name] = ep.constants[spec.target]
    g = _Graph()
    env: dict[str, Any] = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            if node.name in constants:
                env[node.name] = constants[node.name]
            elif nchw_input:
                image = g.tensor(node.meta["val"].shape, name="image")
                g.inputs.append(image)
                perm = g.const(np.array([0, 2, 3, 1]), name="image/perm", dtype="int32")
                env[node.name] = g.op("TRANSPOSE", [image, perm], _nhwc(node.meta["val"].shape), name="image/nhwc")
            else:
                env[node.name] = g.tensor(_nhwc(node.meta["val"].shape), name="image")
                g.inputs.append(env[node.name])
        elif node.op == "call_function":
            name = _op_name(node.target)
            lower = LOWER.get(name)
            if lower is None:
                where = (node.meta.get("stack_trace") or "").strip().splitlines()
                raise UnsupportedOp(f"operator {name} (at {where[-1].strip() if where else node.name})")
            env[node.name] = lower(g, node, env)
        elif node.op == "output":
            g.outputs = [env[a.name] for a in node.args[0]]
    g.tensors[g.outputs[0]]["name"] = "logits"
    return g


# -- the flatbuffer -----------------------------------------------------------------------------------------------


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


OPTIONS = {  # operator -> its options table in the schema (None: it has none we set)
    "CONV_2D": "Conv2DOptions", "DEPTHWISE_CONV_2D": "DepthwiseConv2DOptions", "ADD": "AddOptions",
    "SUB": "SubOptions", "MUL": "MulOptions", "MEAN": "ReducerOptions", "RESIZE_BILINEAR": "ResizeBilinearOptions",
    "CONCATENATION": "ConcatenationOptions", "MAX_POOL_2D": "Pool2DOptions", "PAD": "PadOptions",
    "PADV2": "PadV2Options", "STRIDED_SLICE": "StridedSliceOptions", "TRANSPOSE": "TransposeOptions", "HARD_SWISH": "HardSwishOptions", "RELU": None, "RELU6": None, "LOGISTIC": None,
}


def _options(builder, tfl, table: str, values: dict[str, Any]) -> int:
    enums = {"padding": tfl.Padding, "fused_activation_function": tfl.ActivationFunctionType}
    getattr(tfl, f"{table}Start")(builder)
    for key, value in values.items():
        if key in enums:
            value = getattr(enums[key], value)
        getattr(tfl, f"{table}Add{_camel(key)}")(builder, value)
    return getattr(tfl, f"{table}End")(builder)


def _int_vector(builder, values) -> int:
    return builder.CreateNumpyVector(np.asarray(values, dtype=np.int32))


def _table_vector(b, offsets) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _write_buffers(b, tfl, buffers: list[bytes]) -> int:
    offsets = []
    for data in buffers:
        data_off = None
        if data:
            b.StartVector(1, len(data), 16)  # 16-byte aligned, as TF Lite's kernels expect of weights
            b.head -= len(data)
            b.Bytes[b.head:b.head + len(data)] = data
            data_off = b.EndVector()
        tfl.BufferStart(b)
        if data_off is not None:
            tfl.BufferAddData(b, data_off)
        offsets.append(tfl.BufferEnd(b))
    return _table_vector(b, offsets)


def _write_tensors(b, tfl, tensors: list[dict[str, Any]]) -> int:
    types = {"float32": tfl.TensorType.FLOAT32, "int32": tfl.TensorType.INT32}
    offsets = []
    for t in tensors:
        name, shape = b.CreateString(t["name"]), _int_vector(b, t["shape"])
        tfl.TensorStart(b)
        tfl.TensorAddShape(b, shape)
        tfl.TensorAddType(b, types[t["dtype"]])
        tfl.TensorAddBuffer(b, t["buffer"])
        tfl.TensorAddName(b, name)
        offsets.append(tfl.TensorEnd(b))
    return _table_vector(b, offsets)


def _write_operators(b, tfl, ops: list[dict[str, Any]], kinds: list[str]) -> int:
    offsets = []
    for op in ops:
        inputs, outputs = _int_vector(b, op["inputs"]), _int_vector(b, op["outputs"])
        table = OPTIONS[op["kind"]]
        options = _options(b, tfl, table, op["options"]) if table else None
        tfl.OperatorStart(b)
        tfl.OperatorAddOpcodeIndex(b, kinds.index(op["kind"]))
        tfl.OperatorAddInputs(b, inputs)
        tfl.OperatorAddOutputs(b, outputs)
        if options is not None:
            tfl.OperatorAddBuiltinOptionsType(b, getattr(tfl.BuiltinOptions, table))
            tfl.OperatorAddBuiltinOptions(b, options)
        offsets.append(tfl.OperatorEnd(b))
    return _table_vector(b, offsets)


def _write_codes(b, tfl, kinds: list[str]) -> int:
    offsets = []
    for kind in kinds:
        code = getattr(tfl.BuiltinOperator, kind)
        tfl.OperatorCodeStart(b)
        tfl.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))  # 127: "see builtin_code"
        tfl.OperatorCodeAddBuiltinCode(b, code)
        tfl.OperatorCodeAddVersion(b, 1)
        offsets.append(tfl.OperatorCodeEnd(b))
    return _table_vector(b, offsets)


def _write_subgraph(b, tfl, g: _Graph, kinds: list[str]) -> int:
    tensors, operators = _write_tensors(b, tfl, g.tensors), _write_operators(b, tfl, g.ops, kinds)
    inputs, outputs, name = _int_vector(b, g.inputs), _int_vector(b, g.outputs), b.CreateString("main")
    tfl.SubGraphStart(b)
    tfl.SubGraphAddTensors(b, tensors)
    tfl.SubGraphAddInputs(b, inputs)
    tfl.SubGraphAddOutputs(b, outputs)
    tfl.SubGraphAddOperators(b, operators)
    tfl.SubGraphAddName(b, name)
    return _table_vector(b, [tfl.SubGraphEnd(b)])


def _serialize(g: _Graph, metadata: dict[str, Any] | None) -> bytes:
    """The graph as a TF Lite flatbuffer (schema version 3); `metadata` as JSON in a buffer named "deeplab"."""
    import flatbuffers
    import tflite as tfl

    buffers = list(g.buffers) + ([json.dumps(metadata).encode()] if metadata is not None else [])
    b = flatbuffers.Builder(sum(len(x) for x in buffers) + 64 * len(buffers) + (1 << 20))
    buffer_vec = _write_buffers(b, tfl, buffers)
    kinds = sorted({op["kind"] for op in g.ops})
    subgraphs, codes = _write_subgraph(b, tfl, g, kinds), _write_codes(b, tfl, kinds)
    metadata_vec = None
    if metadata is not None:
        meta_name = b.CreateString("deeplab")
        tfl.MetadataStart(b)
        tfl.MetadataAddName(b, meta_name)
        tfl.MetadataAddBuffer(b, len(buffers) - 1)
        metadata_vec = _table_vector(b, [tfl.MetadataEnd(b)])
    description = b.CreateString("deeplab")
    tfl.ModelStart(b)
    tfl.ModelAddVersion(b, 3)
    tfl.ModelAddOperatorCodes(b, codes)
    tfl.ModelAddSubgraphs(b, subgraphs)
    tfl.ModelAddDescription(b, description)
    tfl.ModelAddBuffers(b, buffer_vec)
    if metadata_vec is not None:
        tfl.ModelAddMetadata(b, metadata_vec)
    b.Finish(tfl.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def tflite_bytes(model: nn.Module, shape, *, metadata: dict[str, Any] | None = None, fold_bn: bool = True,
                 nchw_input: bool = False) -> bytes:
    """`model` (eval mode, CPU, float) as a TF Lite flatbuffer for NCHW input `shape` (the file reads it NHWC);
    `metadata` is stored as JSON under "deeplab". With `fold_bn`, the graph of `deeplab.deploy.fast` (BatchNorm folded,
    image pooling projected once) is written, else `model` as it is. `nchw_input`: the file reads the image NCHW
    (its first operator transposes it), as PyTorch holds it: `litert_runner`'s in-memory graphs. Raises UnsupportedOp
    when the graph holds an operator without a TF Lite equivalent here."""
    import warnings

    from .fast import optimize_for_inference as torch_fast_path

    graph = torch_fast_path(model, channels_last=False, skip_taps=False, prepacked_shapes=0) if fold_bn else model
    x = torch.zeros(*[int(s) for s in shape])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ep = torch.export.export(graph, (x,))
    return _serialize(_lower(ep, nchw_input=nchw_input), metadata)


def read_tflite_metadata(content: bytes) -> dict[str, Any]:
    """The "deeplab" metadata of a .tflite flatbuffer ({} when it has none)."""
    import tflite as tfl

    m = tfl.Model.GetRootAs(content, 0)
    for i in range(m.MetadataLength()):
        entry = m.Metadata(i)
        if entry.Name() == b"deeplab":
            return json.loads(m.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return {}


def input_shape(content: bytes) -> tuple[int, int, int, int]:
    """The NCHW input shape a .tflite flatbuffer (NHWC input) was written for."""
    import tflite as tfl

    graph = tfl.Model.GetRootAs(content, 0).Subgraphs(0)
    n, h, w, c = graph.Tensors(graph.Inputs(0)).ShapeAsNumpy().tolist()
    return n, c, h, w


def interpreter(content: bytes, *, threads: int, nchw_input: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """run(NCHW float32 array) -> NHWC logits, by the TF Lite runtime (XNNPACK) on the flatbuffer `content`, whose
    input is NHWC (transposed here) or, with `nchw_input`, NCHW (`tflite_bytes(nchw_input=True)`: copied as it is)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=content, num_threads=threads)
    interp.allocate_tensors()
    buffer = interp.tensor(interp.get_input_details()[0]["index"])  # a view of the input, valid until invoke
    out = interp.get_output_details()[0]["index"]

    def run(x: np.ndarray) -> np.ndarray:
        # NCHW -> the graph's NHWC in one copy, by numpy: PyTorch's copy is faster alone, but its OpenMP threads spin
        # after it and slow XNNPACK's at 2 threads (8.6 -> 14.2 ms, MobileNetV2 dm0.5 257); the view is dropped
        # before invoke, as the runtime requires
        buffer()[...] = x if nchw_input else x.transpose(0, 2, 3, 1)
        interp.invoke()
        return interp.get_tensor(out)

    run.content = content  # keeps the flatbuffer alive as long as the interpreter
    return run


def litert_runner(model: nn.Module, *, threads: int, fallback: Callable[[], Callable] | None = None,
                  cache_key: dict[str, Any] | None = None):
    """(run, "NHWC"): `model` in the TF Lite runtime, one graph written and loaded per input shape for the first
    SHAPES shapes; any other shape runs `fallback()` (called once, on first need; it returns a module giving NCHW
    logits, handed back NHWC as a view) or raises. With `cache_key` (`deeplab.deploy.artefacts`) each shape's graph
    is kept on disk, and a later process reads it instead of writing it again."""
    graphs: dict[tuple[int, ...], Callable] = {}
    other: list[Callable] = []

    def run(x: np.ndarray) -> np.ndarray:
        shape = tuple(x.shape)
        fn = graphs.get(shape)
        if fn is None and len(graphs) < SHAPES:
            key = None if cache_key is None else {**cache_key, "shape": list(shape)}
            content = cached_bytes(key, "model.tflite", lambda: tflite_bytes(model, shape, nchw_input=True))
            fn = graphs[shape] = interpreter(content, threads=threads, nchw_input=True)
        if fn is not None:
            return fn(x)
        if fallback is None:
            raise ValueError(f"TF Lite graphs are static: this one was written for {list(graphs)}, got {list(shape)}")
        if not other:
            other.append(fallback())
        with torch.no_grad():
            return other[0](torch.from_numpy(x)).permute(0, 2, 3, 1).numpy()

    return run, "NHWC"
