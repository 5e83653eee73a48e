"""What every backbone shares: the rule that turns strides into dilations, and the feature contract."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

OUTPUT_STRIDES = (8, 16, 32)


def atrous_plan(unit_strides: Sequence[int], *, output_stride: int, current_stride: int) -> list[tuple[int, int]]:
    """(stride, dilation) for each unit, decided while building (TF's `stack_blocks_dense`).

    Units run at their nominal stride until the feature map reaches `output_stride`; from then on every stride
    becomes 1 and multiplies the dilation of the units *after* it. The unit whose stride was removed keeps the
    previous dilation (1 for the first such unit), as TF DeepLab and torchvision's `replace_stride_with_dilation` do.
    `current_stride` is the stride of the stem that comes before the first unit.
    """
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    plan = []
    rate = 1
    for stride in unit_strides:
        if current_stride > output_stride:
            raise ValueError(f"output stride {output_stride} cannot be reached: the stem alone has stride {current_stride}")
        if current_stride == output_stride:
            plan.append((1, rate))
            rate *= stride
        else:
            plan.append((stride, 1))
            current_stride *= stride
    if current_stride != output_stride:
        raise ValueError(f"output stride {output_stride} cannot be reached: the network's total stride is {current_stride}")
    return plan


def check_multi_grid(multi_grid: Sequence[int], *, expected: int, backbone: str) -> tuple[int, ...]:
    grid = tuple(int(r) for r in multi_grid)
    if len(grid) != expected or any(r < 1 for r in grid):
        raise ValueError(
            f"{backbone}: multi_grid needs {expected} positive unit rates for its last stage, got {multi_grid!r}"
        )
    return grid


class Backbone(nn.Module):
    """The contract with the heads: forward(x) -> {"low_level": stride-4 feature, "out": output-stride feature}.

    `channels` and `reductions` declare, as data, the channel count and stride of each returned feature.
    """

    channels: dict[str, int]
    reductions: dict[str, int]
