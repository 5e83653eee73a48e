"""The training losses, DeepLab v2's multi-scale (MSC) loss, and a step's forward pass under autocast with its
losses (`step_losses`).

`pixel_loss` returns (sum, count): the caller divides by the global count (summed over processes), so a distributed
step's gradient is one process's over the whole batch. Every loss here skips pixels labelled `ignore_index`, takes
the logits in float32 whatever the autocast dtype, and takes `class_weights` (one per class) as follows:

* **ce**: per-pixel cross-entropy, the pixel's loss times its class's weight (PyTorch's `weight=`); the sum is divided
  by the number of valid pixels (not by the summed weights, as TF DeepLab's weighted loss divides). With
  `hard_pixel_fraction` < 1, only the hardest fraction of each image's valid pixels counts (TF DeepLab's
  `top_k_percent_pixels`).
* **focal** (Lin et al. 2017, eq. 5): -alpha_t (1 - p_t)^gamma log p_t per pixel, alpha_t the class weight of the
  pixel's class (1 without weights), gamma `focal_gamma` (the paper's best: 2); summed and counted like ce.
* **dice**: soft Dice over the batch (Milletari et al. 2016 with the plain, not squared, denominator): for each class
  c present in the batch's labels, D_c = 2 sum(p_c g_c) / (sum(p_c) + sum(g_c)) over the valid pixels, p the
  softmax and g the one-hot labels; loss = sum_c w_c (1 - D_c) / sum_c w_c over those classes. A class absent from
  the labels is left out (its Dice would be 0 or undefined whatever the prediction).
* **ce+dice**: the ce mean plus the dice loss.
* **lovasz**: Lovasz-softmax (Berman, Rannen Triki & Blaschko, CVPR 2018, eq. 12 with the 'present' classes of their
  reference code): for each class c present in the labels, the Lovasz extension of the Jaccard loss evaluated at the
  errors m_i = |g_ic - p_ic| of the valid pixels; averaged over those classes (weighted by `class_weights`).

Dice and Lovasz are defined over the whole batch, not per pixel: they come back as (loss * count, count), so the
division gives the loss; under torchrun each process's batch is its own set (their mean over processes, weighted by
pixels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..inference.segment import autocast
from ..models.pointrend import point_loss
from .config import LOSSES


def _per_pixel(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int, class_weights: torch.Tensor | None,
               loss: str, focal_gamma: float) -> torch.Tensor:
    """(N, H, W) per-pixel cross-entropy or focal loss; 0 at ignored pixels."""
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")  # -log p_t
    if loss == "focal":
        p_t = torch.exp(-ce)
        # Clamped off 0: at p_t = 1 (and at ignored pixels) the power's derivative is infinite for gamma < 1.
        ce = (1.0 - p_t).clamp_min(1e-12).pow(focal_gamma) * ce if focal_gamma else ce
    if class_weights is not None:
        valid = target != ignore_index
        ce = ce * class_weights.to(ce.dtype)[torch.where(valid, target, 0)] * valid
    return ce


def _valid_probabilities(logits: torch.Tensor, target: torch.Tensor, ignore_index: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, K) softmax of the valid pixels and their (P,) labels."""
    k = logits.shape[1]
    probs = logits.softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, k)
    labels = target.reshape(-1)
    valid = labels != ignore_index
    return probs[valid], labels[valid]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = 255,
              class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice loss of a batch (the module docstring); logits (N, K, H, W), target (N, H, W)."""
    probs, labels = _valid_probabilities(logits.float(), target, ignore_index)
    if labels.numel() == 0:
        return logits.float().sum() * 0.0
    onehot = F.one_hot(labels, probs.shape[1]).to(probs.dtype)  # (P, K)
    intersection = (probs * onehot).sum(0)
    denominator = probs.sum(0) + onehot.sum(0)
    dice = 2.0 * intersection / denominator.clamp_min(1e-12)
    present = onehot.sum(0) > 0
    w = class_weights.to(probs) if class_weights is not None else torch.ones_like(dice)
    w = w * present
    return ((1.0 - dice) * w).sum() / w.sum().clamp_min(1e-12)


def lovasz_grad(sorted_fg: torch.Tensor) -> torch.Tensor:
    """The gradient of the Lovasz extension of the Jaccard loss at errors sorted in decreasing order, given the
    ground truth (1 foreground, 0 not) in that order (Berman et al., Algorithm 1)."""
    total = sorted_fg.sum()
    intersection = total - sorted_fg.cumsum(0)
    union = total + (1.0 - sorted_fg).cumsum(0)
    jaccard = 1.0 - intersection / union
    if sorted_fg.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_softmax_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = 255,
                        class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Lovasz-softmax loss of a batch (the module docstring); logits (N, K, H, W), target (N, H, W)."""
    probs, labels = _valid_probabilities(logits.float(), target, ignore_index)
    losses, weights = [], []
    for c in range(probs.shape[1]):
        fg = (labels == c).to(probs.dtype)
        if not fg.any():
            continue
        errors = (fg - probs[:, c]).abs()
        order = torch.argsort(errors, descending=True)
        losses.append(torch.dot(errors[order], lovasz_grad(fg[order])))
        weights.append(class_weights[c].to(probs) if class_weights is not None else probs.new_ones(()))
    if not losses:
        return logits.float().sum() * 0.0
    w = torch.stack(weights)
    return (torch.stack(losses) * w).sum() / w.sum().clamp_min(1e-12)


def pixel_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    class_weights: torch.Tensor | None = None,
    hard_pixel_fraction: float = 1.0,
    loss: str = "ce",
    focal_gamma: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, number of valid pixels) of `loss` (one of LOSSES, see the module docstring); the caller divides.

    Pixels labelled `ignore_index` never count. `hard_pixel_fraction` < 1 (ce and focal, and the ce of ce+dice) keeps
    only the hardest fraction of the valid pixels of each image.
    """
    if loss not in LOSSES:
        raise ValueError(f"--loss {loss}: choose one of {', '.join(LOSSES)}")
    if hard_pixel_fraction < 1.0 and loss in ("dice", "lovasz"):
        raise ValueError(f"--hard-pixel-fraction mines pixels of a per-pixel loss; --loss {loss} is not one (use ce, "
                         "focal or ce+dice)")
    logits = logits.float()  # the loss in full precision under autocast
    valid = target != ignore_index
    count = valid.sum()
    if loss in ("dice", "lovasz"):
        region = dice_loss if loss == "dice" else lovasz_softmax_loss
        return region(logits, target, ignore_index=ignore_index, class_weights=class_weights) * count, count
    losses = _per_pixel(logits, target, ignore_index=ignore_index, class_weights=class_weights,
                        loss="focal" if loss == "focal" else "ce", focal_gamma=focal_gamma)
    if hard_pixel_fraction >= 1.0:
        total = losses[valid].sum()
    else:
        total = losses.new_zeros(())
        count = torch.zeros((), dtype=torch.long, device=losses.device)
        for per_image, ok in zip(losses.flatten(1), valid.flatten(1)):
            k = int(math.ceil(hard_pixel_fraction * int(ok.sum())))
            if k:
                total = total + per_image[ok].topk(k).values.sum()
                count += k
    if loss == "ce+dice":
        total = total + dice_loss(logits, target, ignore_index=ignore_index, class_weights=class_weights) * count
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
    class_weights: torch.Tensor | None = None, hard_pixel_fraction: float = 1.0, loss: str = "ce",
    focal_gamma: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepLab v2's MSC loss from the logits of the scale-1 input (first, at the masks' size) and of the shrunk inputs:
    the mean loss of each scale against the labels resized to its size, plus the mean loss of the max-fused logits,
    as the v2 prototxts' four SoftmaxWithLoss layers (each normalised by its own valid pixels, weight 1).

    Returned as (sum, count) like `pixel_loss`, count being the scale-1 pixels: sum / count is the sum of the four means
    (each other term is rescaled by count / its own count). Under torchrun that count is this process's.
    """
    options = dict(ignore_index=ignore_index, class_weights=class_weights, hard_pixel_fraction=hard_pixel_fraction,
                   loss=loss, focal_gamma=focal_gamma)
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
    loss: str = "ce", focal_gamma: float = 2.0, msc: bool = False,
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
    options = dict(ignore_index=ignore_index, class_weights=class_weights, hard_pixel_fraction=hard_pixel_fraction,
                   loss=loss, focal_gamma=focal_gamma)
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
