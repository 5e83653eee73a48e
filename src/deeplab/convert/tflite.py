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
  reads where and how the file rounds activations (`deeplab.models.activation_rounding`). Every op of the graph must be accounted for: an op the walk cannot place is
  an error, never silently dropped.

`load_tflite(path)` does both and picks the class names.

The files fold BatchNorm into the conv biases. Our layers are Conv (no bias) + BatchNorm, so each BatchNorm is set to
an identity plus the folded bias: weight 1, running mean 0 and running variance 1 - eps, so that
(x - 0) / sqrt(var + eps) is x up to float rounding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models.activation_rounding import attach_activation_rounding
from ..models.backbones.mobilenet_edgetpu import MobileNetEdgeTPU
from ..models.backbones.mobilenet_v2 import MobileNetV2
from ..models.checkpoint import load_state_dict_strict
from ..models.config import OUTPUT_STRIDES, ModelConfig
from ..models.model import DeepLab, build_model
from .tflite_file import (
    TFLiteGraph,
    TFLiteImportError,
    TFLiteOp,
    op_error,
    read_tflite_graph,
)
from .tflite_graph import BACKBONE_NAMES, Plan, backbone_name, walk_graph
from .tflite_quant import (
    check_residuals,
    input_preprocessing,
    module_places,
    rounding_table,
)

# Multipliers TF publishes MobileNetV2 checkpoints at; tried when stem_channels / 32 does not reproduce the file.
KNOWN_DEPTH_MULTIPLIERS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)


# --------------------------------------------------------------------------------------------------- reading


# --------------------------------------------------------------------------------------------------- mapping


_BUILDERS = {"mobilenet_v2": MobileNetV2, "mobilenet_edgetpu": MobileNetEdgeTPU}


def _depth_multiplier(
    graph: TFLiteGraph, plan: Plan, weights: dict[int, np.ndarray], output_stride: int, backbone: str
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
    name = BACKBONE_NAMES[backbone]
    raise op_error(
        graph.source,
        op,
        f": {name} block {i} has (expanded, output) channels {found}, which no depth multiplier reproduces "
        f"(stem {stem_channels} channels suggests {stem_channels / 32:g}); not an official {name}"
    )


def _output_stride(graph: TFLiteGraph, plan: Plan) -> int:
    stride = 1
    for op in [plan.stem] + [b[k] for b in plan.blocks for k in ("expand", "depthwise") if b[k] is not None]:
        sh, sw = op.options.get("stride", (1, 1))
        if sh != sw:
            raise op_error(
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
    A uint8 file's activation rounding is attached unless `activation_rounding=False` (deeplab.models.activation_rounding).

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
    plan = walk_graph(graph)
    backbone = backbone_name(graph, plan)
    convs = [plan.stem] + ([plan.final] if plan.final is not None else [])
    for block in plan.blocks:
        convs += [op for op in (block["expand"], block["depthwise"], block["project"]) if op is not None]
    convs += [op for _, op, _ in plan.aspp_branches] + [plan.projection, plan.logits]
    params = {op.index: _conv_weights(graph, op, plan.alias) for op in convs}  # OIHW weights and biases
    weights = {index: weight for index, (weight, _) in params.items()}
    cfg = _config(graph, plan, weights, backbone, class_names)
    model = build_model(cfg, class_names=class_names, preprocessing=input_preprocessing(graph))
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    places = module_places(graph, plan, model)
    rounding = rounding_table(graph, plan, places) if activation_rounding else {}
    for op, module_name, activation in places:
        _check_conv(graph, op, modules[module_name], activation)
        weight, bias = params[op.index]
        if module_name == "aspp.project":
            weight = _reorder_projection(graph, plan, weight, cfg)
        _fill(state, modules[module_name], module_name, weight, bias, graph, op)
    check_residuals(graph, plan, model)
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
    plan: Plan,
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


def _conv_weights(
    graph: TFLiteGraph, op: TFLiteOp, alias: dict[str, str]
) -> tuple[np.ndarray, np.ndarray | None]:
    """The op's weight as OIHW float32 ([1, H, W, C] depthwise -> [C, 1, H, W]) and its bias (None if absent).
    A weight behind a DEQUANTIZE (float16 files) is read from the constant the DEQUANTIZE reads."""
    inputs = [None if name is None else alias.get(name, name) for name in op.inputs]
    weight_name = inputs[1] if len(inputs) > 1 else None
    if weight_name not in graph.constants:
        raise op_error(
            graph.source,
            op,
            f": its weight {weight_name!r} has no data in the file (a weight computed at run time is not "
            f"mapped)"
        )
    weight = graph.constants[weight_name]
    if weight.ndim != 4:
        raise op_error(
            graph.source,
            op,
            f": weight {weight_name!r} has shape {weight.shape}, expected 4 dimensions"
        )
    if op.type == "DEPTHWISE_CONV_2D" and weight.shape[0] != 1:
        raise op_error(
            graph.source,
            op,
            f": depthwise weight {weight_name!r} has shape {weight.shape}; expected [1, H, W, C]"
        )
    weight = weight.astype(np.float32)
    weight = weight.transpose(3, 0, 1, 2) if op.type == "DEPTHWISE_CONV_2D" else weight.transpose(0, 3, 1, 2)
    bias = None
    if len(inputs) > 2 and inputs[2] is not None:
        if inputs[2] not in graph.constants:
            raise op_error(
                graph.source,
                op,
                f": its bias {inputs[2]!r} has no data in the file"
            )
        bias = graph.constants[inputs[2]].reshape(-1).astype(np.float32)
    for name, array in ((weight_name, weight), (inputs[2] if bias is not None else None, bias)):
        if array is not None and not np.isfinite(array).all():
            raise op_error(
                graph.source,
                op,
                f": tensor {name!r} holds NaN or infinite values; the file is corrupted, download it again"
            )
    return np.ascontiguousarray(weight), bias


def _check_conv(graph: TFLiteGraph, op: TFLiteOp, module: nn.Module, activation: str) -> None:
    """The file's stride, dilation, padding and fused activation must be the ones our module computes with."""
    conv = module if isinstance(module, nn.Conv2d) else module.conv

    def fail(message: str) -> TFLiteImportError:
        return op_error(graph.source, op, f" {message}")

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


def _reorder_projection(graph: TFLiteGraph, plan: Plan, weight: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Permute the projection's input channels from the file's concatenation order to ours
    ([pooling], 1x1, atrous branches by rate)."""
    width = cfg.aspp_channels
    if weight.shape[1] != width * len(plan.aspp_branches):
        op = plan.projection
        raise op_error(
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
        raise op_error(
            graph.source,
            op,
            f" has weight shape {tuple(weight.shape)} (OIHW) where the model built from the file's config "
            f"has {tuple(conv.weight.shape)} ({name}); unexpected channel count"
        )
    out_channels = weight.shape[0]
    bias = np.zeros(out_channels, dtype=np.float32) if bias is None else bias
    if bias.shape != (out_channels,):
        raise op_error(
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
    "load_tflite",
    "model_from_graph",
    "read_tflite_graph",
]
