"""Walking a TFLite graph from its input: the MobileNetV2 / MobileNet-EdgeTPU backbone block by block, the ASPP
head, the logits and the final resize, into a `Plan`. Every op must be placed; an op the walk cannot place is an
error naming it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..models.backbones.mobilenet_edgetpu import EDGETPU_BLOCKS
from .tflite_file import (
    REPRESENTATION_OPS,
    SUPPORTED_OPS,
    TFLiteGraph,
    TFLiteImportError,
    TFLiteOp,
    op_error,
)

NUM_MOBILENET_V2_BLOCKS = 17  # the inverted residuals of MobileNetV2 Table 2 (1 + 2 + 3 + 4 + 3 + 3 + 1)


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
        return op_error(self.graph.source, op, f" {message}")

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
class Plan:
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


def _walk_backbone(w: _Walk, plan: Plan, x: str) -> str:
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


def backbone_name(graph: TFLiteGraph, plan: Plan) -> str:
    """mobilenet_v2 or mobilenet_edgetpu, from the block kinds and the block count."""
    kinds = [b["kind"] for b in plan.blocks]
    edgetpu = plan.final is not None or "fused" in kinds or "project" in kinds
    name, count = ("mobilenet_edgetpu", len(EDGETPU_BLOCKS)) if edgetpu else ("mobilenet_v2", NUM_MOBILENET_V2_BLOCKS)
    if len(plan.blocks) != count or (edgetpu and plan.final is None):
        op = plan.blocks[-1]["project"] if plan.blocks else plan.stem
        looks = "MobileNet-EdgeTPU" if edgetpu else "MobileNetV2"
        raise op_error(
            graph.source,
            op,
            f" ends the backbone after {len(plan.blocks)} blocks{'' if plan.final is None else ' and a 1x1 conv'}; "
            f"it looks like {looks}, which has {count}{' and a last 1x1 conv' if edgetpu else ''} (another "
            "backbone, or a DeepLabv3+ decoder tap, which is not supported)",
        )
    return name


def walk_graph(graph: TFLiteGraph) -> Plan:
    w = _Walk(graph)
    plan = Plan()
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


BACKBONE_NAMES = {"mobilenet_v2": "MobileNetV2", "mobilenet_edgetpu": "MobileNet-EdgeTPU"}
