"""The training losses: per-pixel cross-entropy with the ignore label, class weights and hard-pixel mining, DeepLab
v2's multi-scale (MSC) loss, and a step's forward pass under autocast with its losses (`step_losses`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

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


# DeepLab v2's MSC: the input at these scales besides 1 (its Caffe prototxts shrink the image to 3/4 and 1/2).
MSC_SCALES = (0.75, 0.5)


def scaled_size(size: int, scale: float) -> int:
    """Caffe's Interp size for a shrunk image, corners aligned: (size - 1) * scale + 1, e.g. 513 -> 385, 257."""
    return int((size - 1) * scale) + 1


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) labels at `size` by nearest neighbour with the corners aligned, as the shrunk image is: output pixel i
    takes input pixel round(i * (H - 1) / (h - 1))."""
    rows = [_aligned_indices(n, m, masks.device) for n, m in zip(masks.shape[-2:], size)]
    return masks[:, rows[0]][:, :, rows[1]]


def _aligned_indices(n: int, m: int, device: torch.device) -> torch.Tensor:
    if m == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    return torch.round(torch.arange(m, device=device, dtype=torch.float64) * ((n - 1) / (m - 1))).long()


def msc_fused_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """DeepLab v2's fusion: every scale's logits resized to the first's size (bilinear, corners aligned, as Caffe's
    Interp), then the element-wise maximum."""
    size = logits[0].shape[-2:]
    fused = logits[0]
    for y in logits[1:]:
        fused = torch.maximum(fused, F.interpolate(y, size=size, mode="bilinear", align_corners=True))
    return fused


def msc_pixel_loss(
    logits: Sequence[torch.Tensor], masks: torch.Tensor, *, ignore_index: int = 255,
    class_weights: torch.Tensor | None = None, hard_pixel_fraction: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepLab v2's MSC loss from the logits of the scale-1 input (first, at the masks' size) and of the shrunk inputs:
    the mean loss of each scale against the labels resized to its size, plus the mean loss of the max-fused logits,
    as the v2 prototxts' four SoftmaxWithLoss layers (each normalised by its own valid pixels, weight 1).

    Returned as (sum, count) like `pixel_loss`, count being the scale-1 pixels: sum / count is the sum of the four means
    (each other term is rescaled by count / its own count). Under torchrun that count is this process's.
    """
    options = dict(ignore_index=ignore_index, class_weights=class_weights, hard_pixel_fraction=hard_pixel_fraction)
    total, count = pixel_loss(logits[0], masks, **options)
    terms = [(y, resize_masks(masks, tuple(y.shape[-2:]))) for y in logits[1:]]
    terms.append((msc_fused_logits(logits), masks))
    for y, target in terms:
        term, term_count = pixel_loss(y, target, **options)
        total = total + term * (count / term_count.clamp_min(1)).to(term.dtype)
    return total, count


def step_losses(
    model: nn.Module, images: torch.Tensor, masks: torch.Tensor, *, amp: str = "off", channels_last: bool = False,
    ignore_index: int = 255, class_weights: torch.Tensor | None = None, hard_pixel_fraction: float = 1.0,
    msc: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward pass of a training step under `amp` autocast and its losses: (pixel loss sum, pixels counted,
    PointRend point loss sum, points counted; both 0 without PointRend). Sums, not means: the caller divides by
    the global counts.

    `msc`: DeepLab v2's multi-scale training: the images also at 3/4 and 1/2 size (bilinear, corners aligned), and the
    loss `msc_pixel_loss` (each scale's and the max-fused logits'). PointRend's point loss is the scale-1 input's.
    """
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(images.device.type, amp):
        outputs = model(images)
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs
    options = dict(ignore_index=ignore_index, class_weights=class_weights, hard_pixel_fraction=hard_pixel_fraction)
    if msc:
        scaled = [logits]
        for scale in MSC_SCALES:
            size = [scaled_size(n, scale) for n in images.shape[-2:]]
            small = F.interpolate(images, size=size, mode="bilinear", align_corners=True)  # (N, 3, h, w)
            with autocast(images.device.type, amp):
                out = model(small)
            scaled.append(out["logits"] if isinstance(out, dict) else out)
        loss_sum, count = msc_pixel_loss(scaled, masks, **options)
    else:
        loss_sum, count = pixel_loss(logits, masks, **options)
    point_sum = point_count = torch.zeros((), device=images.device)
    if isinstance(outputs, dict):  # PointRend: the point loss is added to the main loss
        point_sum, point_count = point_loss(outputs["point_logits"], outputs["point_coords"], masks,
                                            ignore_index=ignore_index)
    return loss_sum, count, point_sum, point_count
