"""What a quantized (uint8) TFLite file adds to the float mapping: which file op fills which of our modules, where
and to which scale the file rounds activations, and how its uint8 input maps to 0-255 pixels."""

from __future__ import annotations

from ..models.config import TF_MEAN, TF_STD, Preprocessing
from ..models.model import DeepLab
from .tflite_file import TFLiteGraph, TFLiteImportError, TFLiteOp, op_error
from .tflite_graph import BACKBONE_NAMES, Plan


def module_places(graph: TFLiteGraph, plan: Plan, model: DeepLab) -> list[tuple[TFLiteOp, str, str]]:
    """Which file conv fills which of our modules, and the fused activation it must carry (MobileNetV2: ReLU6,
    MobileNet-EdgeTPU: ReLU; the projections are linear)."""
    act = "RELU6" if model.config.backbone == "mobilenet_v2" else "RELU"
    places: list[tuple[TFLiteOp, str, str]] = [(plan.stem, "backbone.stem", act)]
    for i, block in enumerate(plan.blocks):
        ours = model.backbone.blocks[i]
        for part in ("expand", "depthwise"):
            if (block[part] is None) != (getattr(ours, part) is None):
                op = block[part] or block["project"]
                raise op_error(
                    graph.source,
                    op,
                    f": block {i} {'lacks' if block[part] is None else 'has'} an {part} conv, which "
                    f"{BACKBONE_NAMES[model.config.backbone]} {'has' if block[part] is None else 'does not have'} there",
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


def rounding_table(
    graph: TFLiteGraph, plan: Plan, places: list[tuple[TFLiteOp, str, str]]
) -> dict[str, tuple[float, int]]:
    """Where a uint8 file rounds an activation, and to which scale and zero point (deeplab.models.activation_rounding):
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


def check_residuals(graph: TFLiteGraph, plan: Plan, model: DeepLab) -> None:
    name = BACKBONE_NAMES[model.config.backbone]
    for i, block in enumerate(plan.blocks):
        if (block["residual"] is not None) != model.backbone.blocks[i].use_residual:
            op = block["residual"] or block["project"]
            raise op_error(
                graph.source,
                op,
                f": block {i} {'has' if block['residual'] is not None else 'lacks'} a residual connection, "
                f"which {name} {'does not' if block['residual'] is not None else 'does'} have there"
            )
        if block["residual"] is not None and block["residual"].options.get("activation", "NONE") != "NONE":
            op = block["residual"]
            raise op_error(
                graph.source,
                op,
                f" fuses activation {op.options['activation']}; {name}'s residual add is linear"
            )


def input_preprocessing(graph: TFLiteGraph) -> Preprocessing:
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
