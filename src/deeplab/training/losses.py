"""The training losses: per-pixel cross-entropy with the ignore label, class weights and hard-pixel mining, and a
step's forward pass under autocast with its losses (`step_losses`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..inference.segment import autocast
from ..models.pointrend import point_loss


def pixel_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    class_weights: torch.Tensor | None = None,
    hard_pixel_fraction: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-pixel cross-entropy, number of pixels it sums over); the caller divides.

    Pixels labelled `ignore_index` never count. With `hard_pixel_fraction` < 1 only the hardest fraction of the
    valid pixels of each image counts (online hard pixel mining, as TF DeepLab's `top_k_percent_pixels`).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the loss in full precision under autocast
    losses = F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    if hard_pixel_fraction >= 1.0:
        return losses[valid].sum(), valid.sum()
    total = losses.new_zeros(())
    count = torch.zeros((), dtype=torch.long, device=losses.device)
    for per_image, ok in zip(losses.flatten(1), valid.flatten(1)):
        k = int(math.ceil(hard_pixel_fraction * int(ok.sum())))
        if k:
            total = total + per_image[ok].topk(k).values.sum()
            count += k
    return total, count


def step_losses(
    model: nn.Module, images: torch.Tensor, masks: torch.Tensor, *, amp: str = "off", channels_last: bool = False,
    ignore_index: int = 255, class_weights: torch.Tensor | None = None, hard_pixel_fraction: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward pass of a training step under `amp` autocast and its losses: (pixel loss sum, pixels counted,
    PointRend point loss sum, points counted; both 0 without PointRend). Sums, not means: the caller divides by
    the global counts."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(images.device.type, amp):
        outputs = model(images)
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs
    loss_sum, count = pixel_loss(logits, masks, ignore_index=ignore_index, class_weights=class_weights,
                                 hard_pixel_fraction=hard_pixel_fraction)
    point_sum = point_count = torch.zeros((), device=images.device)
    if isinstance(outputs, dict):  # PointRend: the point loss is added to the main loss
        point_sum, point_count = point_loss(outputs["point_logits"], outputs["point_coords"], masks,
                                            ignore_index=ignore_index)
    return loss_sum, count, point_sum, point_count
