"""A converted uint8 TFLite model run with the file's activation rounding, so that it computes what the file computes.

A uint8 TFLite file stores every activation as an integer q in 0..255 with a scale and a zero point (the value is
(q - zero_point) * scale). Its weights convert exactly (they are dequantized), but a float model built from them
skips the rounding of the activations, and the rounding moves the argmax: on street scenes, the official
MobileNet-EdgeTPU-slim Cityscapes model converted to float agrees with the official TF Lite runtime on 93.0-99.1% of
the pixels; with each activation rounded as the file rounds it, on 97.3-99.3% (tests/test_mobilenet_edgetpu.py).

The rounding is data: a table `{site: (scale, zero_point)}` read from the file by the importer and stored in the
checkpoint (`activation_rounding`). A site is a module path, whose output is rounded, or `path:input`, whose input
is (the concatenation before the ASPP projection, the pooled feature before the image-pooling conv).
`attach_activation_rounding` puts the table on a model as forward hooks. Rounding is
`torch.fake_quantize_per_tensor_affine` to 0..255: the value stays a float tensor, the function is the file's, and
an ONNX export of the model carries it as QuantizeLinear/DequantizeLinear pairs.

What is not reproduced: the runtime's integer requantization (fixed-point multipliers) can land one step away
from float rounding, and its final resize and argmax run on uint8 logits, where ties go to the lower class index.
Training ignores the table: `--init-checkpoint` takes the weights only.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

QMIN, QMAX = 0, 255  # uint8

RoundingTable = dict[str, tuple[float, int]]


def round_like_uint8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """x rounded to the nearest value (q - zero_point) * scale with q in 0..255 (clamped at both ends)."""
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, QMIN, QMAX)


class _RoundOutput:
    def __init__(self, scale: float, zero_point: int) -> None:
        self.scale, self.zero_point = scale, zero_point

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return round_like_uint8(output, self.scale, self.zero_point)


class _RoundInput(_RoundOutput):
    def __call__(self, module: nn.Module, args: tuple) -> tuple:  # type: ignore[override]
        return (round_like_uint8(args[0], self.scale, self.zero_point), *args[1:])


def check_table(table: Mapping[str, Any], *, source: str) -> RoundingTable:
    """The table as plain (float, int) pairs, each scale positive and each zero point in 0..255."""
    out: RoundingTable = {}
    for site, pair in table.items():
        try:
            scale, zero_point = float(pair[0]), int(pair[1])
        except (TypeError, ValueError, IndexError):
            raise ValueError(f"{source}: activation rounding for {site!r} is {pair!r}; expected (scale, zero point)") from None
        if not (scale > 0 and scale < float("inf")) or not QMIN <= zero_point <= QMAX:
            raise ValueError(
                f"{source}: activation rounding for {site!r} has scale {scale} and zero point {zero_point}; "
                f"expected a positive scale and a zero point in {QMIN}..{QMAX} (convert the .tflite file again)"
            )
        out[str(site)] = (scale, zero_point)
    return out


def attach_activation_rounding(model: nn.Module, table: Mapping[str, Any], *, source: str = "model") -> None:
    """Round, in place, the activations the table names (see the module docstring); sets
    `model.activation_rounding` to the table, which `checkpoint_dict` saves."""
    table = check_table(table, source=source)
    modules = dict(model.named_modules())
    for site in table:
        path = site.removesuffix(":input")
        if path not in modules:
            raise ValueError(f"{source}: activation rounding names {path!r}, which this model does not have")
    for site, (scale, zero_point) in table.items():
        if site.endswith(":input"):
            modules[site.removesuffix(":input")].register_forward_pre_hook(_RoundInput(scale, zero_point))
        else:
            modules[site].register_forward_hook(_RoundOutput(scale, zero_point))
    model.activation_rounding = table


def without_activation_rounding(model: nn.Module) -> nn.Module:
    """A copy of `model` computing in plain float: the same weights, the rounding hooks removed."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(hook, _RoundOutput)]:
                del hooks[key]
    if hasattr(twin, "activation_rounding"):
        twin.activation_rounding = None
    return twin


__all__ = [
    "RoundingTable",
    "attach_activation_rounding",
    "check_table",
    "round_like_uint8",
    "without_activation_rounding",
]
